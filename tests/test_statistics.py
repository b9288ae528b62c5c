"""Federated statistics: combined client summaries equal the statistics of the pooled data."""

import ast
import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fedkit as fk
import fedkit.stats
from fedkit.data import ClientData
from fedkit.exchange import ClientContext
from fedkit.stats import StatsExecutor, combine, histogram_edges, merge_moments, summarize
from fedkit.workflows import FedStats, statistics_arrays


def pooled(dataset):
    return dataset.x.numpy().reshape(len(dataset), -1).astype(np.float64)


def run_stats(parts, workflow=FedStats(), **kw):
    sim = fk.Simulator(workflow, model=torch.nn.Linear(1, 1), clients=parts, val_fraction=0.0, **kw)
    return sim.run(progress=False)


def assert_pooled(stats, x, bins):
    assert stats["count"] == len(x)
    np.testing.assert_allclose(stats["mean"], x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats["var"], x.var(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats["std"], x.std(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats["sum"], x.sum(0), rtol=1e-12, atol=1e-9)
    assert np.array_equal(stats["min"], x.min(0)) and np.array_equal(stats["max"], x.max(0))
    lo, hi = x.min(0), x.max(0)
    lo, hi = np.where(lo == hi, lo - 0.5, lo), np.where(lo == hi, hi + 0.5, hi)
    assert np.array_equal(stats["edges"], np.linspace(lo, hi, bins + 1, axis=1))
    expected = np.stack([np.histogram(x[:, j], bins=stats["edges"][j])[0] for j in range(x.shape[1])])
    assert np.array_equal(stats["histogram"], expected)
    assert stats["histogram"].sum() == len(x) * x.shape[1]


def test_digits_dirichlet_equals_the_pooled_statistics(digits):
    parts = fk.data.dirichlet(digits.train, clients=5, alpha=0.3, seed=0)
    run = run_stats(parts, FedStats(bins=10, min_count=10))
    stats = statistics_arrays(run)
    assert_pooled(stats, pooled(digits.train), bins=10)
    assert stats["clients"] == [f"site-{i}" for i in range(1, 6)] and stats["withheld"] == []
    assert stats["client_counts"] == {f"site-{i + 1}": len(p) for i, p in enumerate(parts)}
    assert len(run.history) == 0 and FedStats.rounds == 0


def test_synthetic_quantity_skew_equals_the_pooled_statistics():
    data = fk.data.synthetic(samples=1500, features=7, classes=3, seed=4)
    parts = fk.data.quantity_skew(data.train, clients=4, alpha=0.5, seed=1)
    assert_pooled(statistics_arrays(run_stats(parts, FedStats(bins=13, min_count=1))), pooled(data.train), bins=13)


def test_chan_merge_of_uneven_parts_equals_the_whole():
    rng = np.random.default_rng(0)
    x = rng.normal(1e4, 3.0, size=(101, 3))  # a large mean: where naive sum-of-squares loses digits
    edges = histogram_edges(x.min(0), x.max(0), 5)
    parts = [x[:1], x[1:2], x[2:40], x[40:]]
    whole = combine([summarize(p, edges) for p in parts])
    np.testing.assert_allclose(whole["var"], x.var(0), rtol=1e-9)
    np.testing.assert_allclose(whole["mean"], x.mean(0), rtol=1e-14)
    n, mean, m2 = merge_moments((0, np.zeros(3), np.zeros(3)), (3, np.ones(3), np.full(3, 2.0)))
    assert n == 3 and mean.tolist() == [1.0] * 3 and m2.tolist() == [2.0] * 3
    # two points 0 and 2: mean 1, M2 = 0 + 0 + (2 - 0)^2 * 1 * 1 / 2 = 2
    assert merge_moments((1, np.zeros(1), np.zeros(1)), (1, np.full(1, 2.0), np.zeros(1)))[2].tolist() == [2.0]


def spy(seen):
    def f(dxo, ctx):
        seen.append((ctx.client, ctx.task.name))
        return dxo
    return f


def test_a_small_client_withholds_and_the_totals_exclude_it():
    data = fk.data.synthetic(samples=200, features=5, seed=2).train
    parts = [data.subset(range(0, 40)), data.subset(range(40, 70)), data.subset(range(70, 75))]
    seen = []
    run = run_stats(parts, FedStats(bins=4, min_count=10), server_result_filters=[spy(seen)])
    stats = statistics_arrays(run)
    assert stats["withheld"] == ["site-3"] and stats["clients"] == ["site-1", "site-2"]
    assert_pooled(stats, pooled(data.subset(range(0, 70))), bins=4)
    assert ("site-3", "stats") not in seen and ("site-3", "stats_range") in seen
    assert "site-3" not in stats["client_counts"]


def test_the_client_can_raise_the_bar_but_not_the_server_lower_it():
    data = fk.data.synthetic(samples=200, features=5, seed=2).train
    strict = fk.Client("strict", ClientData(data.subset(range(40)), data.subset([])), {
        "stats_range": StatsExecutor(min_count=50), "stats": StatsExecutor(min_count=50)})
    lax = fk.Client("lax", ClientData(data.subset(range(40, 100)), data.subset([])), {
        "stats_range": StatsExecutor(), "stats": StatsExecutor()})
    stats = statistics_arrays(run_stats([strict, lax], FedStats(min_count=1)))
    assert stats["withheld"] == ["strict"] and stats["count"] == 60


def test_everyone_withholding_is_an_error():
    data = fk.data.synthetic(samples=100, features=3, seed=0).train
    with pytest.raises(fk.UpdateError, match="every client withheld.*min_count=50"):
        run_stats([data.subset(range(20)), data.subset(range(20, 40))], FedStats(min_count=50))


def test_the_executor_is_numpy_only():
    tree = ast.parse(inspect.getsource(fedkit.stats))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "torch" not in imported

    x = np.random.default_rng(0).normal(size=(30, 2, 3)).astype(np.float32)
    as_numpy = SimpleNamespace(train=SimpleNamespace(x=x))  # no tensor anywhere
    as_torch = ClientData(fk.Dataset(torch.from_numpy(x), torch.zeros(30, dtype=torch.long), 2),
                          fk.Dataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), 2))
    edges = histogram_edges(x.reshape(30, -1).min(0), x.reshape(30, -1).max(0), 3)
    task = fk.Task("stats", fk.DXO(fk.DataKind.STATISTICS, {"min_count": 1, "edges": edges}))
    outs = [StatsExecutor().execute(task, ClientContext("c", d, {}, torch.device("cpu"), 0), fk.Signal())
            for d in (as_numpy, as_torch)]
    for key in ("sum", "mean", "m2", "min", "max", "histogram"):
        assert all(isinstance(o.data[key], np.ndarray) for o in outs), key
        assert np.array_equal(outs[0].data[key], outs[1].data[key]), key
    assert outs[0].data["histogram"].shape == (6, 3)


def test_wrong_edges_are_explained():
    ctx = ClientContext("c", SimpleNamespace(train=SimpleNamespace(x=np.zeros((20, 4)))), {}, torch.device("cpu"), 0)
    task = fk.Task("stats", fk.DXO(fk.DataKind.STATISTICS, {"edges": np.zeros((3, 5))}))
    with pytest.raises(ValueError, match=r"'c' has 4 features but the task's histogram edges have shape \(3, 5\)"):
        StatsExecutor().execute(task, ctx, fk.Signal())


def test_results_are_json_and_survive_save_and_load(tmp_path):
    data = fk.data.synthetic(samples=300, features=4, seed=0)
    run = run_stats(fk.data.iid(data.train, clients=3), FedStats(bins=6, min_count=1))
    run.history.save(tmp_path)
    back = statistics_arrays(fk.History.load(tmp_path))
    for key in ("mean", "var", "min", "max", "histogram", "edges"):
        assert isinstance(back[key], np.ndarray) and np.array_equal(back[key], statistics_arrays(run)[key]), key
    assert back["histogram"].shape == (4, 6)


def test_nan_in_a_clients_data_is_named():
    data = fk.data.synthetic(samples=100, features=3, seed=0).train
    x = data.x.clone()
    x[5, 1] = float("nan")
    # refused when the federation is built (fedkit.data.check_dataset), before any statistics are sent
    with pytest.raises(fk.ConfigError, match=r"site-1's training split: 1 of \d+ sample\(s\) have NaN or infinite features"):
        run_stats([fk.Dataset(x[:40], data.y[:40], 4), data.subset(range(40, 80))], FedStats(min_count=1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(bins=0), "FedStats.bins must be an integer >= 1, got 0"),
    (dict(min_count=-1), "FedStats.min_count must be an integer >= 0, got -1"),
])
def test_bad_fedstats_settings(kwargs, match):
    with pytest.raises(fk.ConfigError, match=match):
        FedStats(**kwargs)


def test_statistics_arrays_without_results_is_explained():
    with pytest.raises(fk.ConfigError, match="no 'statistics' results"):
        statistics_arrays(fk.History())
