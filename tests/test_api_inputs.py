"""Every main entry point refuses bad input with `fk.ConfigError` and a message, before doing any work.

A seeded, property-style sweep: each argument of the partitioners, `TrainConfig`, `Faults`, `Simulator`,
`FedAvg`, `DPSGD`, `fk.he.CKKS`, `DataSpec` and `Experiment` is given every value of a pool of bad values
for its kind (wrong types, NaN, infinities, negatives, huge integers, floats where whole numbers belong,
strings, None where None means nothing) plus random ones drawn from a seeded generator. Each call must
raise `ConfigError` (no TypeError, ValueError or numpy error leaking out) with a non-empty message, write
nothing to disk, and the whole sweep must take seconds.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

import fedkit as fk
from fedkit.data import ClientData, Dataset

NAN, INF = float("nan"), float("inf")
JUNK = ["x", "", "0.5", None, [1], {"a": 1}, object(), 1j, b"1"]  # never a number


def _ints(low: int, high: int | None = None, none_ok: bool = False) -> list[Any]:
    """Bad values for a whole number in [low, high) (high None: no upper bound)."""
    bad = [low - 1, low - 7, -10**30, 1.5, float(low) + 0.5, float(low + 1), NAN, INF, -INF, True, False, str(low + 1), [low]]
    if high is not None:
        bad += [high, high + 1, 10**30, 2**64]
    return [v for v in bad + [j for j in JUNK if not (none_ok and j is None)] if not _is_int_in(v, low, high)]


def _is_int_in(v: Any, low: int, high: int | None) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v < high))


def _reals(low: float, high: float | None = None, *, low_ok: bool = False, high_ok: bool = True, inf_ok: bool = False,
           none_ok: bool = False) -> list[Any]:
    """Bad values for a real number between low and high (each end included or not)."""
    bad = [NAN, -INF, low - 1, low - 1e-9, -10**30, True, "1", [1.0]]
    bad += [] if low_ok else [low]
    bad += [] if inf_ok else [INF]
    if high is not None:
        bad += [high + 1e-9, high + 1, 10**30] + ([] if high_ok else [high])
    return bad + [j for j in JUNK if not (none_ok and j is None)]


SEEDS = _ints(0, 2**63) + [2**63, -2**63, 2**70, 1.7, 0.0, np.float64(3.0), -1]
PROB = _reals(0.0, 1.0, low_ok=True)


def _random_bad(rng: np.random.Generator) -> Any:
    """One more bad value for any numeric argument swept, drawn at random beyond the fixed pools
    (no None and no +inf: some arguments take those)."""
    r = rng.random()
    if r < 0.2:
        return str(rng.integers(-5, 5))
    if r < 0.4:
        return -float(rng.uniform(1e-6, 1e6))
    if r < 0.6:
        return -int(rng.integers(1, 2**62)) * int(rng.integers(1, 2**62))  # a negative, possibly huge, integer
    if r < 0.8:
        return float(rng.choice([NAN, -INF]))
    return [(), {}, object(), "nan", np.array([1.0, 2.0])][int(rng.integers(5))]


@pytest.fixture(scope="module")
def small(digits):
    train = digits.train.subset(range(200))
    return train, fk.data.iid(train, clients=2, seed=0)


def cases(digits, small) -> list[tuple[str, str, list[Any], Callable[[Any], Any], str]]:
    """(entry point, argument, bad values, call with one value, kind for the random extras)."""
    train, parts = small
    mlp = lambda: fk.models.MLP(64, 10)  # noqa: E731
    out: list[tuple[str, str, list[Any], Callable[[Any], Any], str]] = []

    def add(entry: str, arg: str, bad: list[Any], call: Callable[[Any], Any], kind: str = "number") -> None:
        out.append((entry, arg, bad, call, kind))

    D = fk.data
    partitioners = {"iid": lambda **k: D.iid(train, **k), "dirichlet": lambda **k: D.dirichlet(train, **{"alpha": 0.5, **k}),
                    "shards": lambda **k: D.shards(train, **k), "quantity_skew": lambda **k: D.quantity_skew(train, **k)}
    for name, fn in partitioners.items():
        add(f"data.{name}", "clients", _ints(1, len(train) + 1), lambda v, fn=fn: fn(clients=v))
        add(f"data.{name}", "seed", SEEDS, lambda v, fn=fn: fn(clients=2, seed=v))
        add(f"data.{name}", "dataset", JUNK + [digits, parts, train.x], lambda v, name=name: getattr(D, name)(
            v, clients=2, **({"alpha": 0.5} if name == "dirichlet" else {})), "junk")
    for name in ("dirichlet", "quantity_skew"):
        fn = partitioners[name]
        add(f"data.{name}", "alpha", _reals(0.0), lambda v, fn=fn: fn(clients=2, alpha=v))
        add(f"data.{name}", "min_size", _ints(1, len(train) // 2 + 1, none_ok=True), lambda v, fn=fn: fn(clients=2, min_size=v))
    add("data.shards", "shards_per_client", _ints(1, len(train) // 2 + 1), lambda v: D.shards(train, 2, shards_per_client=v))

    for arg in ("epochs", "batch_size"):
        add("TrainConfig", arg, _ints(1), lambda v, arg=arg: fk.TrainConfig(**{arg: v}))
    add("TrainConfig", "lr", _reals(0.0), lambda v: fk.TrainConfig(lr=v))
    add("TrainConfig", "momentum", _reals(0.0, 1.0, low_ok=True, high_ok=False), lambda v: fk.TrainConfig(momentum=v))
    add("TrainConfig", "weight_decay", _reals(0.0, low_ok=True), lambda v: fk.TrainConfig(weight_decay=v))
    add("TrainConfig", "validate", ["yes", 1, None, 0.0], lambda v: fk.TrainConfig(validate=v), "junk")

    for arg in ("dropout", "crash", "straggle", "corrupt"):
        add("Faults", arg, PROB, lambda v, arg=arg: fk.Faults(**{arg: v}))
    add("Faults", "seed", SEEDS, lambda v: fk.Faults(seed=v))
    add("Faults", "delay", _reals(0.0), lambda v: fk.Faults(delay=v))
    add("Faults", "corruptions", [(), ("fire",), None, 3, (3,), "nan-ish"], lambda v: fk.Faults(corruptions=v), "junk")

    def sim(**changes: Any) -> fk.Simulator:
        args = dict(workflow=fk.FedAvg(rounds=1), model=mlp, clients=parts, test=digits.test, device="cpu")
        return fk.Simulator(**{**args, **changes})

    wide = Dataset(torch.zeros(3, 20), torch.zeros(3, dtype=torch.long), 10, "wide")  # 20 features, the model takes 64
    many = Dataset(digits.test.x[:3], torch.tensor([0, 1, 11]), 12, "twelve classes")  # label 11, the model scores 10
    add("Simulator", "model", [3, "mlp", None, lambda: 3, lambda: None, lambda x: x, nn.Linear, fk.models.MLP, nn.ReLU(),
                               lambda: nn.Identity(), lambda: 1 / 0, [mlp]], lambda v: sim(model=v), "junk")
    add("Simulator", "clients", [train, ClientData(train, train), "abc", 3, None, [], [3], {"a": train}, iter(parts),
                                 [train, None]], lambda v: sim(clients=v), "junk")
    add("Simulator", "test", [wide, many, "x", 3, digits, [digits.test]], lambda v: sim(test=v), "junk")
    add("Simulator", "seed", SEEDS, lambda v: sim(seed=v))
    add("Simulator", "val_fraction", _reals(0.0, 1.0, low_ok=True, high_ok=False), lambda v: sim(val_fraction=v))
    add("Simulator", "checkpoint_every", _ints(1), lambda v: sim(checkpoint_every=v))
    add("Simulator", "workflow", ["fedavg", None, fk.FedAvg], lambda v: sim(workflow=v), "junk")
    add("Simulator", "train", [None, "x", {"lr": 0.1}], lambda v: sim(train=v), "junk")
    add("Simulator", "faults", ["x", 0.1, {"dropout": 0.1}], lambda v: sim(faults=v), "junk")
    add("Simulator", "device", ["tpu9", "", "cuda:x"], lambda v: sim(device=v), "junk")
    add("Simulator", "out", [3, 1.5, ["runs"]], lambda v: sim(out=v), "junk")
    add("Simulator", "on_round", [3, "f", [3]], lambda v: sim(on_round=v), "junk")
    # issue 18 items 8 and 9: labels and features a model cannot learn from, an empty training split, one shared
    # model instance, a workflow's rounds that are not a whole number
    first = parts[0]
    bad_y = lambda y: Dataset(first.x, y, 10, "bad labels")  # noqa: E731
    nan_x = first.x.clone()
    nan_x[0] = float("nan")
    add("Simulator", "clients (labels, features)", [
        [bad_y(torch.full_like(first.y, -100)), parts[1]], [bad_y(first.y.clamp(max=0) + 10), parts[1]],
        [bad_y(first.y.int()), parts[1]], [bad_y(first.y.float()), parts[1]], [bad_y(first.y[:, None]), parts[1]],
        [Dataset(first.x, first.y, 5), parts[1]], [Dataset(nan_x, first.y, 10), parts[1]],
        [ClientData(first.subset([]), first), parts[1]], [first.subset([0, 1]), parts[1]]],
        lambda v: sim(clients=v, val_fraction=0.9), "junk")
    add("Simulator", "test (labels, features)", [Dataset(digits.test.x, torch.full_like(digits.test.y, -100), 10),
                                                  Dataset(digits.test.x, digits.test.y.int(), 10),
                                                  Dataset(digits.test.x, digits.test.y.float(), 10),
                                                  Dataset(digits.test.x * float("inf"), digits.test.y, 10)],
        lambda v: sim(test=v), "junk")
    shared = mlp()
    add("Simulator", "model (one instance)", [lambda: shared], lambda v: sim(model=v), "junk")
    add("Simulator", "workflow.rounds", ["three", True, -1, 1.5, None.__class__, [3]], lambda v: sim(
        workflow=type("Mine", (fk.Controller,), {"rounds": v, "control_flow": lambda self, fl: None})()), "junk")

    add("FedAvg", "rounds", _ints(1), lambda v: fk.FedAvg(rounds=v))
    add("FedAvg", "clients_per_round", _ints(1, none_ok=True), lambda v: fk.FedAvg(clients_per_round=v))
    add("FedAvg", "min_clients", _ints(1, none_ok=True), lambda v: fk.FedAvg(min_clients=v))
    add("FedAvg", "max_retries", _ints(0), lambda v: fk.FedAvg(max_retries=v))
    add("FedAvg", "sample_rate", _reals(0.0, 1.0, none_ok=True), lambda v: fk.FedAvg(sample_rate=v))
    add("FedAvg", "task_timeout", _reals(0.0, inf_ok=True, none_ok=True), lambda v: fk.FedAvg(task_timeout=v))
    add("FedAvg", "max_norm_ratio", _reals(1.0, inf_ok=True, none_ok=True), lambda v: fk.FedAvg(max_norm_ratio=v))
    add("FedAvg", "aggregate", [None, 3, "mean"], lambda v: fk.FedAvg(aggregate=v), "junk")
    add("FedAvg", "extensions", [3, "x", (3,), [fk.DPSGD(noise_multiplier=1.0)]], lambda v: fk.FedAvg(extensions=v), "junk")
    add("FedAvg", "he", ["ckks", 3, True], lambda v: fk.FedAvg(he=v), "junk")

    dp = lambda **k: fk.DPSGD(**{"noise_multiplier": 1.0, **k})  # noqa: E731
    add("DPSGD", "noise_multiplier", _reals(0.0, low_ok=True, none_ok=True), lambda v: dp(noise_multiplier=v))
    add("DPSGD", "max_grad_norm", _reals(0.0), lambda v: dp(max_grad_norm=v))
    add("DPSGD", "target_epsilon", _reals(0.0, inf_ok=True, none_ok=True), lambda v: dp(target_epsilon=v))
    add("DPSGD", "delta", _reals(0.0, 1.0, high_ok=False), lambda v: dp(delta=v))
    add("DPSGD", "rounds", _ints(1, none_ok=True), lambda v: dp(rounds=v))
    # a delta in (0, 1) yet not below 1 / the population the guarantee hides: refused when the simulator is built
    add("Simulator", "DPSGD delta >= 1 / the smallest client's examples (90)", [0.02, 0.5, 0.9],
        lambda v: sim(workflow=fk.FedAvg(rounds=1, extensions=(dp(delta=v),))), "junk")
    add("Simulator", "DPFedAvg delta >= 1 / the clients (2)", [0.5, 0.7, 0.99],
        lambda v: sim(workflow=fk.DPFedAvg(rounds=1, noise_multiplier=1.0, delta=v)), "junk")
    add("DPSGD", "accountant", ["gdp?", None, 3, ""], lambda v: dp(accountant=v), "junk")

    add("he.CKKS", "poly_modulus_degree", _ints(1) + [4097, 8192.0, 2**70], lambda v: fk.he.CKKS(poly_modulus_degree=v))
    add("he.CKKS", "coeff_mod_bit_sizes", [None, 3, "60,40,40,60", (60, 40), (60, 40.5, 60), (60, 10, 60), (60, 61, 60),
                                           (60, True, 60)], lambda v: fk.he.CKKS(coeff_mod_bit_sizes=v), "junk")
    add("he.CKKS", "scale_bits", _ints(20, 41), lambda v: fk.he.CKKS(scale_bits=v))
    add("he.CKKS", "layers", [3, "", "(", ("fc", 3), ()], lambda v: fk.he.CKKS(layers=v), "junk")

    S = fk.DataSpec
    add("DataSpec", "dataset", ["imagenet", None, 3, ""], lambda v: S(dataset=v), "junk")
    add("DataSpec", "partition", ["random", None, 3], lambda v: S(partition=v), "junk")
    add("DataSpec", "clients", _ints(1), lambda v: S(clients=v))
    add("DataSpec", "alpha", _reals(0.0), lambda v: S(alpha=v))
    add("DataSpec", "shards_per_client", _ints(1), lambda v: S(shards_per_client=v))
    add("DataSpec", "download", ["yes", 1, None], lambda v: S(download=v), "junk")

    E = fk.Experiment
    add("Experiment", "seed", SEEDS, lambda v: E(seed=v))
    add("Experiment", "data", [None, "digits", fk.data.load], lambda v: E(data=v), "junk")
    add("Experiment", "workflow", [None, "fedavg"], lambda v: E(workflow=v), "junk")
    add("Experiment", "train", [None, {"lr": 1}], lambda v: E(train=v), "junk")
    add("Experiment", "model", ["resnet", None, 3], lambda v: E(model=v), "junk")
    add("Experiment", "faults", ["x", 0.1], lambda v: E(faults=v), "junk")
    return out


RANDOM_PER_ARGUMENT = 2  # extra random bad values for each numeric argument


def test_bad_values_raise_config_error_with_a_message(digits, small, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever is written by mistake would land here
    rng = np.random.default_rng(20240607)
    t0 = time.perf_counter()
    calls, leaks = 0, []
    for entry, arg, bad, call, kind in cases(digits, small):
        found = leaks
        extra = [_random_bad(rng) for _ in range(RANDOM_PER_ARGUMENT)] if kind == "number" else []
        for value in [*bad, *extra]:
            calls += 1
            try:
                call(value)
            except fk.ConfigError as e:
                if not str(e).strip():
                    found.append(f"{entry}({arg}={value!r}): ConfigError without a message")
            except Exception as e:  # noqa: BLE001: any other exception is what this test looks for
                found.append(f"{entry}({arg}={value!r}): {type(e).__name__}: {str(e)[:120]}")
            else:
                found.append(f"{entry}({arg}={value!r}): accepted")
    seconds = time.perf_counter() - t0
    assert calls >= 300
    assert not leaks, f"{len(leaks)} of {calls} bad values were not refused with a ConfigError:\n" + "\n".join(leaks)
    assert os.listdir(tmp_path) == [], "a refused call wrote to disk"
    assert seconds < 30, f"{calls} refused calls took {seconds:.1f} s"


def test_good_values_next_to_the_bad_ones_still_work(digits, small):
    """The edges the sweep refuses just beyond are accepted: the checks are not stricter than the rules."""
    train, parts = small
    assert len(fk.data.iid(train, clients=np.int64(2), seed=np.uint32(5))) == 2
    assert len(fk.data.dirichlet(train, 2, alpha=1, seed=2**63 - 1, min_size=100)) == 2
    assert len(fk.data.shards(train, 2, shards_per_client=np.int64(100))) == 2
    assert fk.TrainConfig(lr=1, momentum=0, weight_decay=0).lr == 1
    assert fk.Faults(dropout=1, seed=2**63 - 1, delay=1e-9, corruptions=["nan"]).dropout == 1
    sim = fk.Simulator(fk.FedAvg(rounds=1), model=fk.models.MLP(64, 10), clients=list(parts), test=digits.test,
                       seed=np.int64(2**63 - 1), val_fraction=0, device="cpu")
    assert sim.seed == 2**63 - 1
    # a statistics-only federation needs no model that fits the data when there is no test set
    fk.Simulator(fk.FedAvg(rounds=1), model=nn.Linear(1, 1), clients=parts, device="cpu")


def test_a_test_set_of_the_wrong_shape_is_refused_before_the_first_round(digits, small):
    _, parts = small
    wide = fk.data.synthetic(samples=50, features=20, classes=10).test
    with pytest.raises(fk.ConfigError) as e:
        fk.Simulator(fk.FedAvg(rounds=1), model=lambda: fk.models.MLP(64, 10), clients=parts, test=wide)
    msg = str(e.value)
    assert "(20,)" in msg and "(1, 8, 8)" in msg  # both shapes
    with pytest.raises(fk.ConfigError, match=r"returned 3 \(of type int\)"):
        fk.Simulator(fk.FedAvg(rounds=1), model=lambda: 3, clients=parts)
    with pytest.raises(fk.ConfigError, match=r"got one Dataset.*fk\.data\.iid"):
        fk.Simulator(fk.FedAvg(rounds=1), model=lambda: fk.models.MLP(64, 10), clients=digits.train)
