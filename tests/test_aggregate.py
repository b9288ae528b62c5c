"""Aggregation rules and weighings, checked against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkit import UpdateError
from fedkit.aggregate import by_samples, by_steps, uniform, weighted_mean
from fedkit.exchange import DXO, DataKind, MetaKey


def result(**meta) -> DXO:
    return DXO(DataKind.WEIGHTS, {"w": torch.zeros(1)}, meta)


# ------------------------------------------------------------------------------- weighted_mean

def test_weights_one_and_three_mix_a_quarter_and_three_quarters():
    # Prepare
    a = {"w": torch.tensor([0.0, 4.0, -8.0]), "b": torch.tensor([[1.0, 2.0]])}
    b = {"w": torch.tensor([4.0, 8.0, 8.0]), "b": torch.tensor([[5.0, -2.0]])}
    # Execute
    out = weighted_mean([(a, 1.0), (b, 3.0)])
    # Assert: 0.25 * a + 0.75 * b
    assert set(out) == {"w", "b"}
    assert torch.equal(out["w"], torch.tensor([3.0, 7.0, 4.0]))
    assert torch.equal(out["b"], torch.tensor([[4.0, -1.0]]))
    assert out["w"].dtype == torch.float32 and out["b"].shape == (1, 2)


def test_docstring_example():
    ups = [({"w": torch.tensor([1.0])}, 1.0), ({"w": torch.tensor([4.0])}, 3.0)]
    assert torch.equal(weighted_mean(ups)["w"], torch.tensor([3.25]))


def test_three_clients_integer_weights():
    ups = [({"w": torch.tensor([6.0])}, 2), ({"w": torch.tensor([0.0])}, 1), ({"w": torch.tensor([3.0])}, 3)]
    # (2*6 + 1*0 + 3*3) / 6 = 21 / 6 = 3.5
    assert torch.equal(weighted_mean(ups)["w"], torch.tensor([3.5]))


def test_zero_weight_client_is_ignored():
    ups = [({"w": torch.tensor([1.0, 2.0])}, 0.0), ({"w": torch.tensor([5.0, 7.0])}, 2.0)]
    assert torch.equal(weighted_mean(ups)["w"], torch.tensor([5.0, 7.0]))


def test_accumulates_in_float64_and_casts_back():
    x = torch.tensor([0.1, 3.3], dtype=torch.float32)
    third = torch.tensor(1 / 3, dtype=torch.float32)
    # in float32, x/3 + x/3 + x/3 is not x again: the reason for the float64 accumulator
    assert not torch.equal(x * third + x * third + x * third, x)
    out = weighted_mean([({"w": x}, 1.0)] * 3)["w"]
    assert out.dtype == torch.float32
    assert torch.equal(out, x)


def test_half_precision_stays_half():
    x = torch.tensor([0.3, 3.3], dtype=torch.float16)
    out = weighted_mean([({"w": x}, 1.0)] * 3)["w"]
    assert out.dtype == torch.float16
    assert torch.equal(out, x)
    y = weighted_mean([({"w": torch.tensor([1.0], dtype=torch.float16)}, 1.0),
                       ({"w": torch.tensor([2.0], dtype=torch.float16)}, 1.0)])["w"]
    assert y.dtype == torch.float16 and torch.equal(y, torch.tensor([1.5], dtype=torch.float16))


def test_float64_input_keeps_full_precision():
    a, b = torch.tensor([1.0], dtype=torch.float64), torch.tensor([1.0 + 2**-40], dtype=torch.float64)
    out = weighted_mean([({"w": a}, 1.0), ({"w": b}, 1.0)])["w"]
    assert out.dtype == torch.float64 and out.item() == 1.0 + 2**-41


def test_integer_buffers_stay_integers():
    ups = [({"w": torch.tensor([2.0]), "num_batches_tracked": torch.tensor(10)}, 1.0),
           ({"w": torch.tensor([6.0]), "num_batches_tracked": torch.tensor(30)}, 3.0)]
    out = weighted_mean(ups)
    assert out["num_batches_tracked"].dtype == torch.int64
    assert out["num_batches_tracked"].shape == ()
    assert out["num_batches_tracked"].item() == 25  # 0.25 * 10 + 0.75 * 30
    assert torch.equal(out["w"], torch.tensor([5.0]))


def test_identical_updates_give_that_update():
    g = torch.Generator().manual_seed(0)
    u = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(7, generator=g), "n": torch.tensor(5)}
    out = weighted_mean([({k: v.clone() for k, v in u.items()}, w) for w in (1.0, 2.5, 7.0, 0.3)])
    for k in u:
        assert out[k].dtype == u[k].dtype
        assert torch.equal(out[k], u[k]), k


def test_scaling_all_weights_leaves_result_unchanged():
    g = torch.Generator().manual_seed(1)
    ups = [({"a": torch.randn(5, generator=g), "b": torch.randn(2, 2, generator=g)}, w) for w in (1.0, 3.0, 12.0)]
    base = weighted_mean(ups)
    doubled = weighted_mean([(u, w * 1024) for u, w in ups])  # power of two: bit-for-bit the same
    scaled = weighted_mean([(u, w * 0.37) for u, w in ups])
    for k in base:
        assert torch.equal(base[k], doubled[k])
        torch.testing.assert_close(base[k], scaled[k], rtol=1e-6, atol=1e-7)


def test_result_does_not_alias_inputs():
    a = {"w": torch.tensor([1.0, 2.0])}
    out = weighted_mean([(a, 1.0)])
    out["w"] += 100
    assert torch.equal(a["w"], torch.tensor([1.0, 2.0]))


def test_nothing_to_aggregate():
    with pytest.raises(UpdateError, match="no client update"):
        weighted_mean([])


@pytest.mark.parametrize("weights", [(0.0, 0.0), (0, 0, 0), (1.0, -1.0), (-2.0, 1.0)])
def test_total_weight_must_be_positive(weights):
    with pytest.raises(UpdateError, match="positive"):
        weighted_mean([({"w": torch.tensor([1.0])}, w) for w in weights])


def test_infinite_weight_is_rejected():
    ups = [({"w": torch.tensor([1.0])}, float("inf")), ({"w": torch.tensor([2.0])}, 1.0)]
    with pytest.raises(UpdateError, match="inf"):
        weighted_mean(ups)


# ------------------------------------------------------------------------------------ weighings

def test_by_samples_and_by_steps_read_their_meta():
    r = result(**{MetaKey.NUM_SAMPLES: 120, MetaKey.NUM_STEPS: 15})
    assert by_samples(r) == 120.0 and isinstance(by_samples(r), float)
    assert by_steps(r) == 15.0 and isinstance(by_steps(r), float)
    assert by_samples(result(num_samples=0)) == 0.0
    assert by_samples(result(num_samples=2.5)) == 2.5


def test_uniform_is_one_for_anything():
    assert uniform(result()) == 1.0
    assert uniform(result(num_samples=1000, num_steps=3)) == 1.0


@pytest.mark.parametrize("fn, key", [(by_samples, "num_samples"), (by_steps, "num_steps")])
@pytest.mark.parametrize("meta", [{}, {"num_samples": -1, "num_steps": -1}, {"num_samples": "10", "num_steps": "10"},
                                  {"num_samples": None, "num_steps": None}])
def test_missing_or_bad_meta_names_the_key(fn, key, meta):
    with pytest.raises(UpdateError) as e:
        fn(result(**meta))
    assert repr(key) in str(e.value)


def test_by_samples_feeds_weighted_mean():
    results = [DXO("WEIGHTS", {"w": torch.tensor([0.0])}, {"num_samples": 30}),
               DXO("WEIGHTS", {"w": torch.tensor([10.0])}, {"num_samples": 10})]
    out = weighted_mean([(r.data, by_samples(r)) for r in results])
    assert torch.equal(out["w"], torch.tensor([2.5]))  # (30*0 + 10*10) / 40
    out = weighted_mean([(r.data, uniform(r)) for r in results])
    assert torch.equal(out["w"], torch.tensor([5.0]))


def test_by_samples_accepts_numpy_integers():
    assert by_samples(result(num_samples=np.int64(32))) == 32.0


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_by_samples_rejects_non_finite(value):
    with pytest.raises(UpdateError, match="num_samples"):
        by_samples(result(num_samples=value))
