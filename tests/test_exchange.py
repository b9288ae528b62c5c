"""DXO, Signal, filters and executors: the vocabulary between server and clients."""

from __future__ import annotations

import functools
import threading

import numpy as np
import pytest
import torch

from fedkit.exchange import (DXO, Aborted, ClientContext, DataKind, Executor, FilterContext, MetaKey, Signal, Task,
                             apply_filters, payload_bytes, run_executor)


@pytest.fixture
def task() -> Task:
    return Task("train", DXO(DataKind.WEIGHTS, {"w": torch.zeros(2)}), round=3, id="t-1")


@pytest.fixture
def ctx() -> ClientContext:
    return ClientContext(client="site-2", data=None, state={}, device=torch.device("cpu"), seed=7)


@pytest.fixture
def fctx(task) -> FilterContext:
    return FilterContext(side="client", direction="result", client="site-2", task=task)


# ------------------------------------------------------------------------------------------ DXO

@pytest.mark.parametrize("kind", list(DataKind))
def test_kind_coerced_from_string(kind):
    d = DXO(kind.value, {})
    assert d.kind is kind and isinstance(d.kind, DataKind)


def test_kind_enum_kept_and_meta_defaults_to_empty():
    d = DXO(DataKind.METRICS, {"accuracy": 0.9})
    assert d.kind is DataKind.METRICS and d.meta == {}
    assert DXO(DataKind.METRICS, {}).meta is not d.meta  # no shared default dict


@pytest.mark.parametrize("bad", ["PARAMS", "weights", 3, None])
def test_bad_kind_lists_the_kinds(bad):
    with pytest.raises(ValueError) as e:
        DXO(bad, {})
    msg = str(e.value)
    assert repr(bad) in msg
    for k in DataKind:
        assert k.value in msg


@pytest.mark.parametrize("bad", [[1, 2], None, torch.zeros(2), "w"])
def test_non_dict_data(bad):
    with pytest.raises(TypeError, match=type(bad).__name__):
        DXO(DataKind.WEIGHTS, bad)


def test_nbytes_of_tensors_arrays_bytes_and_nesting():
    d = DXO(DataKind.COLLECTION, {
        "t": torch.zeros(3, 4),                        # 48
        "i": torch.zeros(2, dtype=torch.int64),        # 16
        "a": np.zeros(5, dtype=np.float64),            # 40
        "b": b"abcdefg",                               # 7
        "ba": bytearray(3),                            # 3
        "nested": {"x": torch.zeros(2, dtype=torch.float16), "l": [np.zeros(1, np.int8), (b"zz", torch.zeros(1))]},
        "scalar": 3.5, "text": "not counted", "none": None,
    })
    assert d.nbytes == 48 + 16 + 40 + 7 + 3 + (4 + 1 + 2 + 4)
    assert DXO(DataKind.METRICS, {"accuracy": 0.9, "loss": 1}).nbytes == 0
    assert payload_bytes([torch.zeros(10), [torch.zeros(10)]]) == 80


def test_with_data_copies_and_merges_meta():
    d = DXO(DataKind.WEIGHTS, {"w": torch.ones(2)}, {MetaKey.NUM_SAMPLES: 10, "a": 1})
    e = d.with_data({"w": torch.zeros(2), "v": torch.zeros(1)}, a=2, clipped=True)
    assert e is not d and e.kind is DataKind.WEIGHTS
    assert set(e.data) == {"w", "v"} and torch.equal(e.data["w"], torch.zeros(2))
    assert e.meta == {MetaKey.NUM_SAMPLES: 10, "a": 2, "clipped": True}
    # the original is untouched
    assert set(d.data) == {"w"} and torch.equal(d.data["w"], torch.ones(2))
    assert d.meta == {MetaKey.NUM_SAMPLES: 10, "a": 1}
    with pytest.raises(TypeError):
        d.with_data([1, 2])


# --------------------------------------------------------------------------------------- Signal

def test_signal_trigger_and_check():
    s = Signal()
    assert not s.triggered
    s.check()  # nothing happens before the trigger
    s.trigger("user pressed Stop")
    assert s.triggered and s.reason == "user pressed Stop"
    with pytest.raises(Aborted, match="user pressed Stop"):
        s.check()
    with pytest.raises(Aborted):  # stays triggered
        s.check()


def test_signal_default_reason_and_other_thread():
    s = Signal()
    t = threading.Thread(target=s.trigger)
    t.start()
    t.join()
    assert s.triggered
    with pytest.raises(Aborted, match="aborted"):
        s.check()


# -------------------------------------------------------------------------------------- filters

def test_apply_filters_runs_in_order(fctx):
    seen = []

    def add(tag):
        def f(dxo, ctx):
            seen.append((tag, ctx.side, ctx.direction, ctx.client))
            return dxo.with_data({"w": dxo.data["w"] * 2 + tag}, last=tag)
        return f

    start = DXO(DataKind.WEIGHTS, {"w": torch.tensor([1.0])})
    out = apply_filters([add(1), add(10)], start, fctx)
    assert torch.equal(out.data["w"], torch.tensor([16.0]))  # (1*2+1)*2+10; the other order gives 25
    assert out.meta["last"] == 10
    assert [s[0] for s in seen] == [1, 10] and seen[0][1:] == ("client", "result", "site-2")
    assert torch.equal(start.data["w"], torch.tensor([1.0]))
    assert torch.equal(apply_filters((add(10), add(1)), start, fctx).data["w"], torch.tensor([25.0]))


def test_no_filters_gives_the_same_dxo(fctx):
    d = DXO(DataKind.METRICS, {"a": 1})
    assert apply_filters([], d, fctx) is d


def test_filter_returning_non_dxo_is_named(fctx):
    def clip_norm(dxo, ctx):
        return dxo.data

    d = DXO(DataKind.WEIGHTS, {"w": torch.zeros(1)})
    with pytest.raises(TypeError) as e:
        apply_filters([lambda x, c: x, clip_norm], d, fctx)
    msg = str(e.value)
    assert "'clip_norm'" in msg and "dict" in msg and "client result filter" in msg


def test_callable_object_filter_named_by_type(fctx):
    class Noise:
        def __call__(self, dxo, ctx):
            return None

    with pytest.raises(TypeError, match="'Noise' returned NoneType"):
        apply_filters([Noise()], DXO(DataKind.WEIGHTS, {}), fctx)
    with pytest.raises(TypeError, match="'partial'"):
        apply_filters([functools.partial(lambda d, c, k: k, k=3)], DXO(DataKind.WEIGHTS, {}), fctx)


# ------------------------------------------------------------------------------------ executors

def test_run_executor_with_function(task, ctx):
    abort = Signal()
    calls = []

    def train(t, c, a):
        calls.append((t, c, a))
        return DXO(DataKind.WEIGHT_DIFF, {"w": t.data.data["w"] + 1}, {MetaKey.NUM_SAMPLES: c.seed})

    out = run_executor(train, task, ctx, abort)
    assert out.kind is DataKind.WEIGHT_DIFF and torch.equal(out.data["w"], torch.ones(2))
    assert out.meta == {"num_samples": 7}
    assert calls == [(task, ctx, abort)]


def test_run_executor_with_object(task, ctx):
    class Trainer:
        def __init__(self):
            self.rounds = []

        def execute(self, t, c, a):
            self.rounds.append(t.round)
            return DXO("METRICS", {"client": c.client})

        def __call__(self, *args):  # must not be used when .execute exists
            raise AssertionError("called instead of execute")

    ex = Trainer()
    assert isinstance(ex, Executor)
    out = run_executor(ex, task, ctx, Signal())
    assert out.data == {"client": "site-2"} and ex.rounds == [3]


def test_executor_sees_abort(task, ctx):
    def ex(t, c, a):
        a.check()
        return DXO(DataKind.METRICS, {})

    s = Signal()
    s.trigger("stop now")
    with pytest.raises(Aborted, match="stop now"):
        run_executor(ex, task, ctx, s)


@pytest.mark.parametrize("answer", [{"w": torch.zeros(1)}, None, 0.5])
def test_executor_returning_non_dxo(task, ctx, answer):
    with pytest.raises(TypeError) as e:
        run_executor(lambda t, c, a: answer, task, ctx, Signal())
    msg = str(e.value)
    assert "'train'" in msg and "'site-2'" in msg and type(answer).__name__ in msg
