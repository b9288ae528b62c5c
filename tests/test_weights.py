"""Operations on named tensors: arithmetic, checks against the global model, hashing, size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkit import UpdateError
from fedkit import weights as W


@pytest.fixture
def ref() -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.zeros(3, 2), "fc.bias": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(0)}


def like(ref, **changes):
    out = {k: torch.ones_like(v) for k, v in ref.items()}
    out.update(changes)
    return out


# ---------------------------------------------------------------------------------- arithmetic

def test_add_key_by_key_keeps_first_dtype():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([0.5, -4.0]), "n": torch.tensor(2.6)}
    out = W.add(a, b)
    assert torch.equal(out["w"], torch.tensor([1.5, -2.0]))
    assert out["n"].dtype == torch.int64 and out["n"].item() == 5  # 5.6 cast back to int64
    assert torch.equal(a["w"], torch.tensor([1.0, 2.0]))  # inputs untouched


def test_subtract_key_by_key():
    a = {"w": torch.tensor([[1.0, 2.0]]), "n": torch.tensor(7)}
    b = {"w": torch.tensor([[0.5, 5.0]]), "n": torch.tensor(2)}
    out = W.subtract(a, b)
    assert torch.equal(out["w"], torch.tensor([[0.5, -3.0]]))
    assert out["n"].item() == 5 and out["n"].dtype == torch.int64
    assert set(out) == {"w", "n"}


def test_add_then_subtract_round_trips():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randint(-50, 50, (4, 4), generator=g).float()}
    d = {"w": torch.randint(-50, 50, (4, 4), generator=g).float()}
    assert torch.equal(W.subtract(W.add(a, d), d)["w"], a["w"])


def test_clone_is_detached_and_independent():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    w = {"p": p, "n": torch.tensor(4)}
    c = W.clone(w)
    assert set(c) == {"p", "n"}
    assert not c["p"].requires_grad
    assert c["p"].device.type == "cpu"
    assert c["p"].data_ptr() != p.data_ptr()
    with torch.no_grad():
        p.add_(10.0)
    c["n"] += 1
    assert torch.equal(c["p"], torch.tensor([1.0, 2.0]))
    assert w["n"].item() == 4
    assert c["n"].dtype == torch.int64


# --------------------------------------------------------------------------------- check_update

def test_check_update_accepts_a_matching_update(ref):
    assert W.check_update(like(ref), ref, "client 'site-1'") is None
    # integer buffers are not checked for finiteness, and may come back in another dtype (add casts them)
    W.check_update(like(ref, **{"bn.num_batches_tracked": torch.tensor(2.0)}), ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64])
def test_floating_tensor_must_keep_its_dtype(ref, dtype):
    # Prepare: fc.bias is float32 in the global model
    upd = like(ref, **{"fc.bias": torch.ones(3, dtype=dtype)})
    # Execute
    with pytest.raises(UpdateError) as e:
        W.check_update(upd, ref, "aggregation rule 'mine'")
    # Assert: the message names the source, the key and both dtypes
    msg = str(e.value)
    assert "aggregation rule 'mine'" in msg and "'fc.bias'" in msg
    assert str(dtype) in msg and "torch.float32" in msg


def test_missing_key(ref):
    upd = like(ref)
    del upd["fc.bias"]
    with pytest.raises(UpdateError) as e:
        W.check_update(upd, ref, "client 'site-3'")
    msg = str(e.value)
    assert "client 'site-3'" in msg and "fc.bias" in msg and "missing" in msg


def test_extra_key(ref):
    upd = like(ref, **{"head.weight": torch.zeros(2)})
    with pytest.raises(UpdateError) as e:
        W.check_update(upd, ref, "client 'site-7'")
    msg = str(e.value)
    assert "client 'site-7'" in msg and "head.weight" in msg and "unexpected" in msg


def test_wrong_shape(ref):
    with pytest.raises(UpdateError) as e:
        W.check_update(like(ref, **{"fc.weight": torch.zeros(2, 3)}), ref, "client 'site-2'")
    msg = str(e.value)
    assert "client 'site-2'" in msg and "'fc.weight'" in msg and "(2, 3)" in msg and "(3, 2)" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite(ref, bad):
    w = torch.zeros(3, 2)
    w[1, 0] = bad
    w[2, 1] = bad
    with pytest.raises(UpdateError) as e:
        W.check_update(like(ref, **{"fc.weight": w}), ref, "client 'site-4'")
    msg = str(e.value)
    assert "client 'site-4'" in msg and "'fc.weight'" in msg and "2 non-finite" in msg


@pytest.mark.parametrize("value", [np.zeros(3), [0.0, 0.0, 0.0], 1.0])
def test_non_tensor(ref, value):
    with pytest.raises(UpdateError) as e:
        W.check_update(like(ref, **{"fc.bias": value}), ref, "client 'site-5'")
    msg = str(e.value)
    assert "client 'site-5'" in msg and "'fc.bias'" in msg and type(value).__name__ in msg


def test_default_source_named(ref):
    with pytest.raises(UpdateError, match="an update"):
        W.check_update({}, ref)


# --------------------------------------------------------------------------------------- sha256

def test_sha256_equal_for_equal_weights():
    a = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1.0, -1.0])}
    b = {k: v.clone() for k, v in a.items()}
    h = W.sha256(a)
    assert isinstance(h, str) and len(h) == 64 and int(h, 16) >= 0
    assert W.sha256(b) == h


def test_sha256_changes_when_one_value_changes():
    a = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1.0, -1.0])}
    b = {k: v.clone() for k, v in a.items()}
    b["w"][1, 2] = 5.000001
    assert W.sha256(a) != W.sha256(b)


def test_sha256_sees_names_shapes_and_dtypes():
    base = {"w": torch.arange(4.0)}
    assert W.sha256(base) != W.sha256({"v": torch.arange(4.0)})
    assert W.sha256(base) != W.sha256({"w": torch.arange(4.0).reshape(2, 2)})
    assert W.sha256(base) != W.sha256({"w": torch.arange(4.0, dtype=torch.float64)})


def test_sha256_zero_dim_and_other_dtypes():
    h0 = W.sha256({"n": torch.tensor(3)})
    assert h0 == W.sha256({"n": torch.tensor(3)}) != W.sha256({"n": torch.tensor(4)})
    assert W.sha256({"x": torch.tensor(1.5)}) != W.sha256({"x": torch.tensor([1.5])})  # shape () vs (1,)
    for t in (torch.tensor([True, False]), torch.ones(2, dtype=torch.bfloat16), torch.empty(0)):
        assert len(W.sha256({"t": t})) == 64


def test_sha256_independent_of_insertion_order_and_layout():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor(3.0), "z": torch.arange(6.0).reshape(3, 2)}
    b = {"z": torch.arange(6.0).reshape(3, 2), "y": torch.tensor(3.0), "x": torch.tensor([1.0, 2.0])}
    assert list(a) != list(b)
    assert W.sha256(a) == W.sha256(b)
    # a non-contiguous view hashes like its contiguous copy
    t = torch.arange(6.0).reshape(2, 3).t()
    assert not t.is_contiguous()
    assert W.sha256({"t": t}) == W.sha256({"t": t.contiguous()})


def test_sha256_of_parameters_requiring_grad():
    lin = torch.nn.Linear(2, 2)
    assert W.sha256(dict(lin.named_parameters())) == W.sha256(lin.state_dict())


# --------------------------------------------------------------------------------------- nbytes

def test_nbytes():
    w = {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float64), "n": torch.tensor(1),
         "h": torch.zeros(2, dtype=torch.float16)}
    assert W.nbytes(w) == 12 * 4 + 5 * 8 + 8 + 2 * 2
    assert W.nbytes({}) == 0
    lin = torch.nn.Linear(10, 3)
    assert W.nbytes(lin.state_dict()) == (30 + 3) * 4


def test_flatten_keeps_floating_entries_in_order_and_unflatten_undoes_it():
    w = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "count": torch.tensor(7),
         "b": torch.tensor([0.5], dtype=torch.float64)}
    vector, spec = W.flatten(w)
    assert vector.dtype == torch.float64 and vector.tolist() == [0, 1, 2, 3, 4, 5, 0.5]
    assert [name for name, *_ in spec] == ["a", "b"]  # the integer buffer is not part of the vector
    back = W.unflatten(vector, spec)
    assert torch.equal(back["a"], w["a"]) and back["a"].dtype == torch.float32 and back["b"].dtype == torch.float64
    assert W.norm(w) == pytest.approx(float(vector.norm()))


def test_unflatten_refuses_a_vector_of_the_wrong_size():
    _, spec = W.flatten({"a": torch.zeros(3)})
    with pytest.raises(UpdateError, match="a vector of 3 numbers for this spec, got shape \\(4,\\)"):
        W.unflatten(torch.zeros(4), spec)
