"""FLARE's heuristic privacy filters: exclude variables, percentile privacy (Shokri & Shmatikov 2015)."""

import numpy as np
import pytest
import torch

import fedkit as fk
from fedkit.exchange import FilterContext
from fedkit.privacy.filters import ExcludeVars, PercentilePrivacy, excluded, percentile_privacy


pytestmark = pytest.mark.usefixtures("one_thread")


def ctx():
    return FilterContext("client", "result", "site-1", fk.Task("train", fk.DXO(fk.DataKind.WEIGHTS, {})))


def flare_percentile_privacy(diff, percentile, gamma, steps):
    """FLARE's PercentilePrivacy.process, on numpy arrays: the reference."""
    delta_w = {k: v / steps for k, v in diff.items()}
    cutoff = np.percentile(np.concatenate([np.abs(v.ravel()) for v in delta_w.values()]), q=percentile)
    out = {}
    for k, w in delta_w.items():
        w = w.copy()
        w[(w > -cutoff) & (w < cutoff)] = 0.0
        out[k] = np.clip(w, -gamma, gamma) * steps
    return out


def test_percentile_privacy_matches_flare_on_random_updates():
    gen = torch.Generator().manual_seed(0)
    update = {"a": torch.randn(20, 30, generator=gen, dtype=torch.float64) * 0.05,
              "b": torch.randn(50, generator=gen, dtype=torch.float64) * 0.05}
    for percentile, gamma, steps in [(10, 0.01, 1), (50, 0.05, 7), (90, 0.2, 3), (0, 1.0, 1)]:
        ours = percentile_privacy(update, percentile, gamma, steps)
        ref = flare_percentile_privacy({k: v.numpy() for k, v in update.items()}, percentile, gamma, steps)
        for k in update:
            np.testing.assert_allclose(ours[k].numpy(), ref[k], rtol=0, atol=1e-15)
    shared = percentile_privacy(update, 50, 1.0)
    kept = sum(int((v != 0).sum()) for v in shared.values())
    assert kept == 325  # the largest half of the 650 entries


def test_percentile_privacy_filter_uses_the_clients_steps_and_passes_other_kinds():
    dxo = fk.DXO(fk.DataKind.WEIGHT_DIFF, {"w": torch.tensor([0.001, -0.5, 0.02, 0.0]), "n": torch.tensor(3)},
                 {fk.MetaKey.NUM_STEPS: 10})
    out = PercentilePrivacy(percentile=50, gamma=0.01)(dxo, ctx())
    # per step: [1e-4, -0.05, 2e-3, 0]; the 50th percentile is 1.05e-3; kept entries are clipped to 0.01, times 10 steps
    assert torch.allclose(out.data["w"], torch.tensor([0.0, -0.1, 0.02, 0.0]))
    assert torch.equal(out.data["n"], torch.tensor(3))
    metrics = fk.DXO(fk.DataKind.METRICS, {"accuracy": 0.5})
    assert PercentilePrivacy()(metrics, ctx()) is metrics
    for bad, match in [(dict(percentile=101), "percentile must be in"), (dict(gamma=0), "gamma must be")]:
        with pytest.raises(fk.ConfigError, match=match):
            PercentilePrivacy(**bad)


def test_exclude_vars_by_name_or_regex():
    names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert excluded(names, ("fc1.bias", "other")) == ["fc1.bias"]
    assert excluded(names, r"\.bias$") == ["fc1.bias", "fc2.bias"]
    diff = fk.DXO(fk.DataKind.WEIGHT_DIFF, {n: torch.ones(2) for n in names})
    out = ExcludeVars(r"^fc2\.")(diff, ctx())
    assert [k for k, v in out.data.items() if v.abs().sum() == 0] == ["fc2.weight", "fc2.bias"]
    assert out.meta["excluded"] == ["fc2.weight", "fc2.bias"] and list(out.data) == names
    weights = fk.DXO(fk.DataKind.WEIGHTS, {n: torch.ones(2) for n in names})
    assert list(ExcludeVars(("fc1.weight",))(weights, ctx()).data) == ["fc1.bias", "fc2.weight", "fc2.bias"]
    assert ExcludeVars(("nothing",))(diff, ctx()) is diff
    with pytest.raises(fk.ConfigError, match="does not compile"):
        ExcludeVars("fc[")
    with pytest.raises(fk.ConfigError, match="tuple of variable names or a regular expression"):
        ExcludeVars(["fc1.bias"])


def test_excluded_variables_never_change_in_a_run(digits):
    parts = fk.data.iid(digits.train, clients=3, seed=0)
    sim = fk.Simulator(fk.FedAvg(rounds=2), model=lambda: fk.models.for_data(digits), clients=parts,
                       train=fk.TrainConfig(validate=False), client_result_filters=[ExcludeVars(r"\.bias$")])
    run = sim.run(progress=False)
    start = sim.initial_weights()
    assert all(torch.equal(run.weights[k], start[k]) for k in start if k.endswith(".bias"))
    assert not torch.equal(run.weights["fc1.weight"], start["fc1.weight"])
