"""The robust aggregation rules (median, trimmed mean, Krum, Multi-Krum, norm clipping), checked by hand."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import fedkit as fk
from fedkit import ConfigError, UpdateError
from fedkit.aggregate import (by_samples, coordinate_median, krum, multi_krum, norm_clipped_mean, rule_name,
                              trimmed_mean, weighted_mean)
from fedkit.data import ClientData


def ups(*rows, weights=None):
    """One update ``{"w": tensor(row)}`` per row, weight 1 unless given."""
    weights = weights or [1.0] * len(rows)
    return [({"w": torch.tensor(r)}, w) for r, w in zip(rows, weights)]


def norm(u) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in u.values() if v.is_floating_point()))


# ---------------------------------------------------------------------------- coordinate_median

def test_median_of_three_per_coordinate_ignores_weights():
    # Prepare: the middle value of each coordinate comes from a different client
    updates = ups([1.0, 5.0, -2.0], [3.0, 0.0, 7.0], [2.0, 9.0, 1.0], weights=[1.0, 100.0, 1.0])
    # Execute
    out = coordinate_median(updates)
    # Assert
    assert torch.equal(out["w"], torch.tensor([2.0, 5.0, 1.0]))


def test_median_of_four_averages_the_two_middle_values():
    updates = ups([1.0, 5.0, -2.0], [3.0, 0.0, 7.0], [2.0, 9.0, 1.0], [10.0, -1.0, 3.0])
    # sorted: (1, 2, 3, 10) -> 2.5; (-1, 0, 5, 9) -> 2.5; (-2, 1, 3, 7) -> 2.0
    assert torch.equal(coordinate_median(updates)["w"], torch.tensor([2.5, 2.5, 2.0]))


def test_median_keeps_every_key_shape_and_dtype():
    a = {"h": torch.tensor([[1.0, 2.0]], dtype=torch.float16), "d": torch.tensor(1.0, dtype=torch.float64),
         "n": torch.tensor(10)}
    b = {"h": torch.tensor([[3.0, 0.0]], dtype=torch.float16), "d": torch.tensor(4.0, dtype=torch.float64),
         "n": torch.tensor(30)}
    c = {"h": torch.tensor([[2.0, 8.0]], dtype=torch.float16), "d": torch.tensor(2.5, dtype=torch.float64),
         "n": torch.tensor(20)}
    out = coordinate_median([(a, 1.0), (b, 1.0), (c, 1.0)])
    assert torch.equal(out["h"], torch.tensor([[2.0, 2.0]], dtype=torch.float16))
    assert out["d"].dtype == torch.float64 and out["d"].shape == () and out["d"].item() == 2.5
    assert out["n"].dtype == torch.int64 and out["n"].item() == 20


# --------------------------------------------------------------------------------- trimmed_mean

def test_trimmed_mean_drops_one_from_each_end_of_five():
    # Prepare: beta 0.2 of 5 clients cuts 1 value from each end of every coordinate
    updates = ups([1.0, -50.0], [100.0, 0.0], [2.0, 3.0], [3.0, 1.0], [4.0, 2.0], weights=[9.0, 1.0, 1.0, 1.0, 1.0])
    # Execute
    out = trimmed_mean(updates, beta=0.2)
    # Assert: mean(2, 3, 4) = 3; mean(0, 1, 2) = 1 (the weights are ignored)
    assert torch.equal(out["w"], torch.tensor([3.0, 1.0]))


def test_trimmed_mean_of_ten_with_beta_quarter_cuts_two_each_end():
    updates = ups(*[[float(v)] for v in (7, -100, 1, 2, 3, 4, 5, 6, 900, 8)])
    # floor(0.25 * 10) = 2 cut from each end: -100, 1 and 8, 900 go; mean(2..7) = 4.5
    assert torch.equal(trimmed_mean(updates, beta=0.25)["w"], torch.tensor([4.5]))


def test_trimmed_mean_with_nothing_to_cut_is_the_plain_mean():
    updates = ups([1.0], [2.0], [6.0], [7.0], weights=[1.0, 1.0, 1.0, 5.0])
    assert torch.equal(trimmed_mean(updates, beta=0.0)["w"], torch.tensor([4.0]))
    # floor(0.1 * 4) = 0: with fewer than 10 clients, beta 0.1 trims nothing
    assert torch.equal(trimmed_mean(updates)["w"], torch.tensor([4.0]))


@pytest.mark.parametrize("beta", [0.5, 0.7, -0.1, 1, float("nan"), True, "0.1", None])
def test_trimmed_mean_rejects_beta_outside_zero_to_half(beta):
    with pytest.raises(ConfigError, match=r"beta in \[0, 0.5\)") as e:
        trimmed_mean(ups([1.0], [2.0], [3.0]), beta=beta)
    assert repr(beta) in str(e.value)


# ------------------------------------------------------------------------------ krum, multi_krum

def krum_case():
    """Five updates over two keys, the last one an outlier.

    Squared distances of the flattened (a0, a1, b): d01=1 d02=2 d03=6 d12=3 d13=3 d23=4, and the
    outlier is 243, 226, 245, 213 away. With n=5, f=1 a score sums the 2 nearest:
    u0 1+2=3, u1 1+3=4, u2 2+3=5, u3 3+4=7, u4 213+226=439.
    """
    rows = [([0.0, 0.0], [0.0]), ([1.0, 0.0], [0.0]), ([0.0, 1.0], [1.0]), ([2.0, 1.0], [1.0]), ([9.0, 9.0], [-9.0])]
    weights = [1.0, 3.0, 4.0, 2.0, 50.0]
    return [({"a": torch.tensor(a), "b": torch.tensor(b)}, w) for (a, b), w in zip(rows, weights)]


def test_krum_picks_the_update_with_the_lowest_score():
    out = krum(krum_case(), f=1)
    assert torch.equal(out["a"], torch.tensor([0.0, 0.0])) and torch.equal(out["b"], torch.tensor([0.0]))


def test_krum_breaks_ties_by_first_and_copies_its_pick():
    # 1-D: scores of 0, 1, 2, 3, 100 with f=1 are 5, 2, 2, 5, 19013: clients 1 and 2 tie
    updates = ups([0.0], [1.0], [2.0], [3.0], [100.0])
    out = krum(updates, f=1)
    assert torch.equal(out["w"], torch.tensor([1.0]))
    out["w"] += 10
    assert torch.equal(updates[1][0]["w"], torch.tensor([1.0]))


def test_multi_krum_averages_the_m_best_with_their_weights():
    updates = krum_case()
    two = multi_krum(updates, f=1, m=2)  # u0 (weight 1) and u1 (weight 3)
    assert torch.equal(two["a"], torch.tensor([0.75, 0.0])) and torch.equal(two["b"], torch.tensor([0.0]))
    three = multi_krum(updates, f=1, m=3)  # u0, u1, u2 with weights 1, 3, 4
    assert torch.equal(three["a"], torch.tensor([0.375, 0.5])) and torch.equal(three["b"], torch.tensor([0.5]))
    default = multi_krum(updates, f=1)  # m = n - f = 4: u0..u3 with weights 1, 3, 4, 2
    torch.testing.assert_close(default["a"], torch.tensor([0.7, 0.6]), rtol=0, atol=1e-7)
    torch.testing.assert_close(default["b"], torch.tensor([0.6]), rtol=0, atol=1e-7)


def test_multi_krum_with_one_is_krum():
    updates = krum_case()
    for k, v in krum(updates, f=1).items():
        assert torch.equal(multi_krum(updates, f=1, m=1)[k], v)


def test_multi_krum_keeping_all_with_f_zero_is_weighted_mean():
    g = torch.Generator().manual_seed(3)
    updates = [({"a": torch.randn(3, 2, generator=g), "b": torch.randn(4, generator=g)}, w) for w in (1.0, 7.0, 2.5, 0.5)]
    out, ref = multi_krum(updates, f=0, m=4), weighted_mean(updates)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("f, outliers", [(1, 1), (2, 2)])
def test_krum_never_picks_an_outlier(seed, f, outliers):
    # Prepare: 5 honest updates near 0, then f wild ones far away, shuffled
    g = torch.Generator().manual_seed(seed)
    honest = [{"w": 0.1 * torch.randn(6, generator=g)} for _ in range(5)]
    wild = [{"w": 50 + 10 * torch.randn(6, generator=g)} for _ in range(outliers)]
    everyone = honest + wild
    order = torch.randperm(len(everyone), generator=g).tolist()
    updates = [(everyone[i], 1.0) for i in order]
    # Execute
    out = krum(updates, f=f)
    chosen = multi_krum(updates, f=f, m=5)
    # Assert: Krum returns one honest update; the 5 best of Multi-Krum are exactly the honest ones
    assert any(torch.equal(out["w"], h["w"]) for h in honest)
    assert float(chosen["w"].abs().max()) < 1.0


@pytest.mark.parametrize("n, f", [(4, 1), (2, 0), (6, 2), (1, 0)])
def test_krum_needs_more_than_2f_plus_2_updates(n, f):
    updates = ups(*[[float(i)] for i in range(n)])
    for rule in (krum, multi_krum):
        with pytest.raises(ConfigError, match=rf"f={f} needs more than 2f\+2 = {2 * f + 2} updates, got {n}"):
            rule(updates, f=f)


def test_krum_smallest_federation_works():
    # n = 2f + 3 is the smallest allowed: f=0 with 3 updates (1 neighbour each)
    assert torch.equal(krum(ups([0.0], [1.0], [5.0]), f=0)["w"], torch.tensor([0.0]))


@pytest.mark.parametrize("f", [-1, 1.5, True, "1", None])
def test_krum_rejects_bad_f(f):
    with pytest.raises(ConfigError, match="f, the number of Byzantine clients") as e:
        krum(krum_case(), f=f)
    assert repr(f) in str(e.value)


@pytest.mark.parametrize("m", [0, 6, -1, 2.0, True])
def test_multi_krum_rejects_bad_m(m):
    with pytest.raises(ConfigError, match=r"m must be an integer in \[1, 5\]") as e:
        multi_krum(krum_case(), f=1, m=m)
    assert repr(m) in str(e.value)


# ---------------------------------------------------------------------------- norm_clipped_mean

def test_norm_clipped_mean_scales_long_updates_only():
    # Prepare: norm 5 (clipped to 1: [0.6, 0.8]) and norm 0.5 (kept)
    updates = ups([3.0, 4.0], [0.3, 0.4], weights=[1.0, 3.0])
    # Execute
    out = norm_clipped_mean(updates, max_norm=1.0)
    # Assert: (1 * [0.6, 0.8] + 3 * [0.3, 0.4]) / 4
    torch.testing.assert_close(out["w"], torch.tensor([0.375, 0.5]), rtol=0, atol=1e-7)


def test_norm_is_global_over_all_float_tensors_and_skips_integer_buffers():
    # Prepare: a=[3], b=[4] is one update of norm 5; the integer buffer is not a parameter
    a = {"a": torch.tensor([3.0]), "b": torch.tensor([4.0]), "n": torch.tensor(10)}
    b = {"a": torch.tensor([0.0]), "b": torch.tensor([0.0]), "n": torch.tensor(30)}
    # Execute
    out = norm_clipped_mean([(a, 1.0), (b, 1.0)], max_norm=2.5)
    # Assert: a is halved to (1.5, 2.0), then averaged with zeros; n is the plain weighted mean
    assert torch.equal(out["a"], torch.tensor([0.75])) and torch.equal(out["b"], torch.tensor([1.0]))
    assert out["n"].dtype == torch.int64 and out["n"].item() == 20


def test_norm_clipped_mean_bounds_every_norm():
    g = torch.Generator().manual_seed(0)
    updates = [({"a": s * torch.randn(5, 3, generator=g), "b": s * torch.randn(4, generator=g)}, w)
               for s, w in ((1.0, 1.0), (30.0, 2.0), (1000.0, 0.5), (0.01, 4.0))]
    for max_norm in (0.1, 1.0, 10.0):
        out = norm_clipped_mean(updates, max_norm)
        assert norm(out) <= max_norm * (1 + 1e-6)
        # a lone long update is clipped to exactly max_norm
        assert norm(norm_clipped_mean(updates[2:3], max_norm)) == pytest.approx(max_norm, rel=1e-6)


def test_norm_clipped_mean_with_huge_bound_is_weighted_mean():
    g = torch.Generator().manual_seed(1)
    updates = [({"a": torch.randn(3, 3, generator=g), "n": torch.tensor(i)}, w) for i, w in enumerate((1.0, 2.0, 5.0))]
    out, ref = norm_clipped_mean(updates, max_norm=1e9), weighted_mean(updates)
    for k in ref:
        assert torch.equal(out[k], ref[k]), k


@pytest.mark.parametrize("max_norm", [0, -1.0, float("inf"), float("nan"), True, "1"])
def test_norm_clipped_mean_rejects_bad_bound(max_norm):
    with pytest.raises(ConfigError, match="finite max_norm > 0") as e:
        norm_clipped_mean(ups([1.0]), max_norm)
    assert repr(max_norm) in str(e.value)


# ---------------------------------------------------------------------------- shared invariants

ROBUST = {
    "coordinate_median": coordinate_median,
    "trimmed_mean": functools.partial(trimmed_mean, beta=0.2),
    "krum": krum,
    "multi_krum": multi_krum,
    "norm_clipped_mean": functools.partial(norm_clipped_mean, max_norm=1e6),
}


@pytest.mark.parametrize("name", ROBUST)
def test_identical_updates_give_that_update(name):
    g = torch.Generator().manual_seed(2)
    u = {"a": torch.randn(4, 3, generator=g), "h": torch.randn(2, generator=g).half(), "n": torch.tensor(5)}
    out = ROBUST[name]([({k: v.clone() for k, v in u.items()}, w) for w in (1.0, 2.5, 7.0, 0.3, 1.0)])
    for k in u:
        assert out[k].dtype == u[k].dtype and torch.equal(out[k], u[k]), k


@pytest.mark.parametrize("name", ROBUST)
def test_nothing_to_aggregate(name):
    with pytest.raises(UpdateError, match="no client update"):
        ROBUST[name]([])


@pytest.mark.parametrize("rule", [coordinate_median, functools.partial(trimmed_mean, beta=0.2)])
def test_median_and_trimmed_mean_ignore_one_wild_client(rule):
    # Prepare: four honest clients and one that sends 1e6
    updates = ups([1.0, -4.0], [2.0, -3.0], [3.0, -2.0], [4.0, -1.0], [1e6, 1e6])
    # Execute
    out = rule(updates)["w"]
    # Assert: median (1,2,3,4,1e6) = 3; trimmed (2,3,4) = 3; second coordinate likewise -2
    assert torch.equal(out, torch.tensor([3.0, -2.0]))
    assert weighted_mean(updates)["w"][0] > 1e5  # the mean is dragged away


# ------------------------------------------------------------------ weighted_mean and weighings

def test_weighted_mean_names_negative_weights():
    with pytest.raises(UpdateError, match=r"must be >= 0.*\(1, -2.0\)"):
        weighted_mean(ups([1.0], [2.0], [3.0], weights=[5.0, -2.0, 1.0]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weighted_mean_names_non_finite_weights(bad):
    with pytest.raises(UpdateError, match=rf"finite.*\(0, {bad}\)"):
        weighted_mean(ups([1.0], [2.0], weights=[bad, 1.0]))


def test_weighted_mean_rejects_an_overflowing_total():
    with pytest.raises(UpdateError, match="total of inf.*overflows"):
        weighted_mean(ups([1.0], [2.0], weights=[1e308, 1e308]))


@pytest.mark.parametrize("value, expected", [(np.int64(32), 32.0), (np.float32(2.5), 2.5), (np.uint8(7), 7.0)])
def test_by_samples_accepts_numpy_scalars(value, expected):
    r = fk.DXO("WEIGHT_DIFF", {}, {"num_samples": value})
    assert by_samples(r) == expected and type(by_samples(r)) is float


@pytest.mark.parametrize("value", [True, False, np.bool_(True), float("-inf"), np.float64("nan"), torch.tensor(3)])
def test_by_samples_rejects_bools_non_finite_and_tensors(value):
    with pytest.raises(UpdateError, match="'num_samples'.*finite number >= 0"):
        by_samples(fk.DXO("WEIGHT_DIFF", {}, {"num_samples": value}))


# ------------------------------------------------------------------------------- rules in FedAvg

def test_rule_name_reads_partials_lambdas_functions_and_objects():
    class Mine:
        def __call__(self, updates):
            return weighted_mean(updates)

    lam = lambda updates: trimmed_mean(updates, beta=0.2)  # noqa: E731
    line = lam.__code__.co_firstlineno
    assert rule_name(functools.partial(trimmed_mean, beta=0.2)) == "trimmed_mean(beta=0.2)"
    assert rule_name(functools.partial(multi_krum, f=2, m=None)) == "multi_krum(f=2, m=None)"
    assert rule_name(lam) == f"<lambda> at test_aggregate_rules.py:{line}"
    assert rule_name(coordinate_median) == "coordinate_median"
    assert rule_name(Mine()) == "Mine"


def fixed_diff(value: float, samples: int = 1):
    def execute(task, ctx, abort):
        return fk.DXO(fk.DataKind.WEIGHT_DIFF, {k: torch.full_like(v, value) for k, v in task.data.data.items()},
                      {fk.MetaKey.NUM_SAMPLES: samples})
    return execute


def toy_run(tiny_model, rule, *values):
    d = fk.Dataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), 2)
    clients = [fk.Client(f"c{i}", ClientData(d, d), {"train": fixed_diff(v)}) for i, v in enumerate(values)]
    # the norm screen is off: these tests show what the rule alone does with a wild client
    return fk.Simulator(fk.FedAvg(rounds=1, aggregate=rule, max_norm_ratio=None), model=tiny_model, clients=clients)


def test_robust_rule_with_settings_runs_in_fedavg(tiny_model):
    # global 1.0; diffs 1, 2, 3, 4 and a wild 1e6: the trimmed mean of the diffs is 3
    run = toy_run(tiny_model, functools.partial(trimmed_mean, beta=0.2), 1.0, 2.0, 3.0, 4.0, 1e6).run(progress=False)
    assert run.weights["weight"].item() == 4.0
    run = toy_run(tiny_model, lambda u: krum(u, f=1), 1.0, 2.0, 3.0, 4.0, 1e6).run(progress=False)
    assert run.weights["weight"].item() == 3.0  # diffs 2 and 3 tie with score 1 + 1; the first wins


def test_user_rule_with_wrong_dtype_is_named(tiny_model):
    def to_double(updates):
        return {k: v.double() for k, v in weighted_mean(updates).items()}
    sim = toy_run(tiny_model, to_double, 1.0, 2.0)
    with pytest.raises(UpdateError, match=r"aggregation rule 'to_double' gave 'weight' as torch.float64; "
                                          r"the global model holds torch.float32"):
        sim.run(progress=False)


def test_user_rule_with_wrong_shape_is_named_even_as_partial_or_lambda(tiny_model):
    def flat(updates, scale):
        return {k: scale * v.reshape(-1) for k, v in weighted_mean(updates).items()}
    with pytest.raises(UpdateError, match=r"aggregation rule 'flat\(scale=2.0\)' gave 'weight' with shape \(1,\)"):
        toy_run(tiny_model, functools.partial(flat, scale=2.0), 1.0).run(progress=False)
    with pytest.raises(UpdateError, match=r"aggregation rule '<lambda> at test_aggregate_rules.py:\d+' gave 'weight'"):
        toy_run(tiny_model, lambda u: flat(u, 1.0), 1.0).run(progress=False)


def test_krum_with_too_few_clients_fails_the_run_with_the_reason(tiny_model):
    with pytest.raises(ConfigError, match=r"krum with f=1 needs more than 2f\+2 = 4 updates, got 3"):
        toy_run(tiny_model, krum, 1.0, 2.0, 3.0).run(progress=False)


def test_fedavg_rejects_a_rule_that_is_not_callable():
    with pytest.raises(ConfigError, match="FedAvg.aggregate must be a rule"):
        fk.FedAvg(aggregate="median")


def test_a_rule_returning_none_and_a_weigh_returning_a_string_are_named(tiny_model):
    """Issue 18 item 9: the user's function is named, with what it returned and what was expected."""
    def forgets_return(updates):
        weighted_mean(updates)

    with pytest.raises(UpdateError, match=r"aggregation rule forgets_return returned None \(a NoneType\); a rule must "
                                          r"return the aggregated update, a dict of tensors"):
        toy_run(tiny_model, forgets_return, 1.0, 2.0).run(progress=False)
    d = fk.Dataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), 2)
    clients = [fk.Client(f"c{i}", ClientData(d, d), {"train": fixed_diff(1.0)}) for i in range(2)]

    def by_name(result):
        return "3"

    for weigh, match in ((by_name, r"weighing by_name returned '3' \(a str\) for client 'c0'"),
                         (lambda r: float("nan"), r"weighing <lambda> at test_aggregate_rules\.py:\d+ returned nan"),
                         (lambda r: True, r"returned True \(a bool\)")):
        sim = fk.Simulator(fk.FedAvg(rounds=1, weigh=weigh), model=tiny_model, clients=clients)
        with pytest.raises(UpdateError, match=match + r".*a finite number >= 0"):
            sim.run(progress=False)
