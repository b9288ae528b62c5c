"""Preprocessing as a federated task: FederatedScaling standardizes every client with the global statistics."""

import numpy as np
import pytest
import torch

import fedkit as fk
from fedkit.data import ClientData
from fedkit.preprocess import Standardize, standardize
from fedkit.stats import StatsExecutor
from fedkit.workflows import Chain, FederatedScaling, FedAvg, statistics_arrays

SCALE = torch.tensor([1000.0] * 10 + [1.0] * 10)  # half the features in the thousands, half near 1


def badly_scaled(seed=0):
    data = fk.data.synthetic(samples=2000, features=20, classes=4, seed=seed)
    scale = lambda d: fk.Dataset(d.x * SCALE, d.y, d.num_classes, "scaled")  # noqa: E731
    return scale(data.train), scale(data.test)


def test_standardize_is_x_minus_mean_over_std_per_feature():
    x = torch.arange(24, dtype=torch.float32).reshape(4, 2, 3)
    data = fk.Dataset(x, torch.zeros(4, dtype=torch.long), 2)
    mean, std = np.arange(6.0), np.full(6, 2.0)
    out = standardize(data, mean, std)
    assert out.x.shape == (4, 2, 3) and out.x.dtype == torch.float32
    torch.testing.assert_close(out.x, (x - torch.arange(6.0).reshape(2, 3)) / 2)
    with pytest.raises(ValueError, match="has 6 features per sample but the scaling has mean of 5"):
        standardize(data, np.zeros(5), np.ones(5))
    with pytest.raises(ValueError, match="std must be a finite number > 0"):
        standardize(data, mean, np.zeros(6))


def test_standardize_task_replaces_the_data_for_later_tasks():
    raw = fk.Dataset(torch.tensor([[1.0], [3.0]]), torch.zeros(2, dtype=torch.long), 2)
    seen = []

    def peek(task, ctx, abort):
        seen.append(ctx.data.train.x.flatten().tolist())
        return fk.DXO(fk.DataKind.COLLECTION, {})

    client = fk.Client("c", ClientData(raw, raw), {"standardize": Standardize(), "peek": peek})
    client.state["_train_on_device"] = raw  # what a trainer caches
    client.handle(fk.Task("peek", fk.DXO(fk.DataKind.COLLECTION, {})), torch.device("cpu"), fk.Signal())
    task = fk.Task("standardize", fk.DXO(fk.DataKind.STATISTICS, {"mean": np.array([2.0]), "std": np.array([0.5])}))
    client.handle(task, torch.device("cpu"), fk.Signal())
    client.handle(fk.Task("peek", fk.DXO(fk.DataKind.COLLECTION, {})), torch.device("cpu"), fk.Signal())
    assert seen == [[1.0, 3.0], [-2.0, 2.0]]
    assert "_train_on_device" not in client.state
    assert client.data.train.x.flatten().tolist() == [1.0, 3.0]  # the raw data itself is kept


class Peek(fk.Controller):
    """Ask every client for its current training features (a test-only window into the clients)."""

    rounds = 0

    def control_flow(self, fl):
        replies = fl.broadcast_and_wait(fk.Task("peek", fk.DXO(fk.DataKind.COLLECTION, {})))
        fl.history.results["peek"] = {n: r.result.data["x"] for n, r in replies.items()}


def scaling_clients(train):
    parts = fk.data.dirichlet(train, clients=4, alpha=0.3, seed=0)
    stats = StatsExecutor()
    peek = lambda task, ctx, abort: fk.DXO(fk.DataKind.COLLECTION, {"x": ctx.data.train.x.clone()})  # noqa: E731
    return [fk.Client(f"site-{i + 1}", ClientData(p, p.subset([])),
                      {"stats_range": stats, "stats": stats, "standardize": Standardize(), "peek": peek})
            for i, p in enumerate(parts)]


def test_after_scaling_the_pooled_data_has_global_mean_0_and_std_1():
    train, _ = badly_scaled()
    run = fk.Simulator(Chain(FederatedScaling(), Peek()), model=torch.nn.Linear(1, 1),
                       clients=scaling_clients(train)).run(progress=False)
    xs = run.history.results["peek"]
    x = torch.cat(list(xs.values())).double()
    assert len(x) == len(train)
    torch.testing.assert_close(x.mean(0), torch.zeros(20, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(0, unbiased=False), torch.ones(20, dtype=torch.float64), atol=1e-5, rtol=0)
    # global, not local: label-skewed clients keep their own offsets from the global mean
    assert max(v.double().mean(0).abs().max().item() for v in xs.values()) > 0.3
    scaling = statistics_arrays(run, "scaling")
    np.testing.assert_allclose(scaling["mean"], train.x.double().mean(0).numpy(), rtol=1e-9)
    np.testing.assert_allclose(scaling["std"], train.x.double().std(0, unbiased=False).numpy(), rtol=1e-9)


def test_every_run_starts_again_from_the_raw_data():
    train, _ = badly_scaled()
    sim = fk.Simulator(FederatedScaling(), model=torch.nn.Linear(1, 1), clients=scaling_clients(train))
    first, second = sim.run(progress=False), sim.run(progress=False)
    assert statistics_arrays(first, "scaling")["mean"].tolist() == statistics_arrays(second, "scaling")["mean"].tolist()
    assert np.abs(statistics_arrays(second, "scaling")["mean"][:10]).max() > 100  # not the already-scaled data


def test_scaling_then_fedavg_trains_better_than_fedavg_alone():
    # The same local SGD (lr 0.003) on raw features: the large columns dominate and the model stalls;
    # at FedAvg's usual lr (0.05) raw training diverges to NaN, standardized training does not.
    train, test = badly_scaled()
    parts = fk.data.dirichlet(train, clients=5, alpha=0.5, seed=0)
    config = fk.TrainConfig(lr=0.003)
    mk = lambda wf: fk.Simulator(wf, model=lambda: fk.models.MLP(20, 4), clients=parts, train=config)  # noqa: E731
    alone = mk(FedAvg(rounds=3, max_norm_ratio=None)).run(progress=False)  # raw updates differ wildly in norm
    scaled = mk(Chain(FederatedScaling(), FedAvg(rounds=3))).run(progress=False)  # test=None: see the caveat
    raw_acc = fk.evaluate(alone.model(), test)["accuracy"]
    scaled_acc = fk.evaluate(scaled.model(), standardize(test, **statistics_arrays(scaled, "scaling")))["accuracy"]
    assert raw_acc < 0.6 and scaled_acc > 0.95, (raw_acc, scaled_acc)
    assert len(scaled.history) == 3
    last = scaled.history.client_dataframe().query("round == 3")
    assert (last["val_accuracy"] > 0.9).all()  # clients validate on their standardized splits
