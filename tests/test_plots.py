"""Plotly figures: the data in their traces, not their look."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import fedkit as fk
from fedkit import plots
from fedkit.data import Dataset
from fedkit.history import History, RoundRecord


def make_history(acc, clients=None) -> History:
    h = History()
    for i, a in enumerate(acc):
        h.append(RoundRecord(i, 1.0, {"accuracy": a, "loss": 1 - a}, (clients or {}).get(i, {})))
    return h


def test_curves_single_history():
    h = make_history([0.25, 0.5, 0.75])
    fig = plots.curves(h)
    assert isinstance(fig, go.Figure) and len(fig.data) == 1
    tr = fig.data[0]
    assert list(tr.x) == [1, 2, 3]  # rounds 0, 1, 2 plotted 1-based
    assert list(tr.y) == h.series("accuracy")
    assert tr.name == "run"
    assert fig.layout.yaxis.title.text == "accuracy"
    assert "accuracy" in fig.layout.title.text


def test_curves_dict_of_histories_and_other_metric():
    runs = {"iid": make_history([0.5, 0.6]), "alpha=0.1": make_history([0.1, 0.2, 0.3, 0.4])}
    fig = plots.curves(runs, metric="loss", title="compare")
    assert len(fig.data) == 2
    assert [t.name for t in fig.data] == ["iid", "alpha=0.1"]
    assert list(fig.data[0].x) == [1, 2] and list(fig.data[1].x) == [1, 2, 3, 4]
    np.testing.assert_allclose(fig.data[1].y, [0.9, 0.8, 0.7, 0.6])
    assert list(fig.data[0].y) == runs["iid"].series("loss")
    assert fig.layout.title.text == "compare"


def test_curves_missing_metric_is_nan():
    fig = plots.curves(make_history([0.5, 0.6]), metric="f1")
    assert len(fig.data[0].y) == 2 and all(math.isnan(v) for v in fig.data[0].y)


def test_curves_of_a_real_run():
    data = fk.data.synthetic(samples=200, features=4, classes=2, seed=0)
    parts = fk.data.iid(data.train, clients=2, seed=0)
    run = fk.Simulator(fk.FedAvg(rounds=2), model=lambda: fk.models.for_data(data), clients=parts,
                       test=data.test).run(progress=False)
    fig = plots.curves({"fedavg": run, "same history": run.history})
    assert len(fig.data) == 2
    assert list(fig.data[0].x) == [1, 2]
    assert list(fig.data[0].y) == run.history.series("accuracy") == list(fig.data[1].y)
    assert all(0.0 <= v <= 1.0 for v in fig.data[0].y)


def he_history() -> History:
    """Like an HE run: the server cannot read its model, so only the clients' scores of it are recorded."""
    h = History()
    for i, (a, l) in enumerate([(0.5, 1.5), (0.625, 1.25), (0.75, 1.0)]):
        h.append(RoundRecord(round=i, seconds=0.1, metrics={"client_accuracy": a, "client_loss": l,
                                                            "clients_validated": 2, "he_encrypt_s": 0.5}))
    return h


def test_curves_of_an_he_run_are_the_clients_scores():
    fig = plots.curves({"he": he_history(), "plain": make_history([0.25, 0.5])})
    assert [t.name for t in fig.data] == ["he (on clients)", "plain"]
    assert list(fig.data[0].x) == [1, 2, 3] and list(fig.data[0].y) == [0.5, 0.625, 0.75]
    assert list(fig.data[1].y) == [0.25, 0.5]
    loss = plots.curves(he_history(), metric="loss")
    assert loss.data[0].name == "run (on clients)" and list(loss.data[0].y) == [1.5, 1.25, 1.0]
    other = plots.curves(he_history(), metric="he_encrypt_s")  # not a score: drawn as is
    assert other.data[0].name == "run" and list(other.data[0].y) == [0.5] * 3


def with_metrics(h: History, **series) -> History:
    """``h`` with each round's metrics extended by ``series`` (name: one value per round)."""
    return History([RoundRecord(r.round, r.seconds, {**r.metrics, **{k: v[r.round] for k, v in series.items()}})
                    for r in h])


def test_privacy_utility_picks_each_runs_epsilon_and_names_the_kind():
    dp_sgd = with_metrics(make_history([0.25, 0.5, 0.75]), client_epsilon=[0.5, 1.0, 1.5])
    fig = plots.privacy_utility({"dp-sgd": dp_sgd, "plain": make_history([0.875])})
    assert [(t.name, list(t.x), list(t.y)) for t in fig.data] == [("dp-sgd", [0.5, 1.0, 1.5], [0.25, 0.5, 0.75])]
    assert fig.layout.xaxis.title.text == "epsilon, example-level (DP-SGD, worst client)"
    assert len(fig.layout.shapes) == 1 and fig.layout.shapes[0].y0 == 0.875  # the non-private reference

    dp_fedavg = with_metrics(make_history([0.5, 0.625]), epsilon=[2.0, 3.0])
    mixed = plots.privacy_utility({"dp-fedavg": dp_fedavg, "dp-sgd": dp_sgd})
    assert [list(t.x) for t in mixed.data] == [[2.0, 3.0], [0.5, 1.0, 1.5]]
    assert mixed.layout.xaxis.title.text == "epsilon (user- and example-level mixed)"
    only_user = plots.privacy_utility({"dp-fedavg": dp_fedavg, "dp-sgd": dp_sgd}, epsilon="epsilon")
    assert [t.name for t in only_user.data] == ["dp-fedavg"] and len(only_user.layout.shapes) == 1
    assert only_user.layout.xaxis.title.text == "epsilon, user-level (DP-FedAvg)"


def test_privacy_utility_of_he_with_dp_sgd_uses_the_clients_scores():
    he_dp = with_metrics(he_history(), client_epsilon=[0.5, 1.0, 1.5])
    fig = plots.privacy_utility({"he+dp-sgd": he_dp})
    assert list(fig.data[0].x) == [0.5, 1.0, 1.5] and list(fig.data[0].y) == [0.5, 0.625, 0.75]


def test_client_curves():
    clients = {0: {"site-1": {"train_loss": 2.0}, "site-2": {"train_loss": 3.0}},
               1: {"site-1": {"train_loss": 1.0}, "site-2": {"train_loss": 1.5}},
               2: {"site-2": {"train_loss": 0.5}}}
    fig = plots.client_curves(make_history([0.1, 0.2, 0.3], clients))
    assert [t.name for t in fig.data] == ["site-1", "site-2"]
    assert list(fig.data[0].x) == [1, 2] and list(fig.data[0].y) == [2.0, 1.0]
    assert list(fig.data[1].x) == [1, 2, 3] and list(fig.data[1].y) == [3.0, 1.5, 0.5]
    assert fig.layout.yaxis.title.text == "train_loss"


def test_client_curves_unknown_metric_is_empty():
    clients = {0: {"site-1": {"train_loss": 2.0}}}
    fig = plots.client_curves(make_history([0.1], clients), metric="val_accuracy")
    assert isinstance(fig, go.Figure) and len(fig.data) == 0
    assert len(plots.client_curves(History()).data) == 0


@pytest.fixture
def parts():
    y = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 1, 2])
    ds = Dataset(torch.zeros(12, 2), y, 3, "toy")
    return fk.data.shards(ds, clients=3, shards_per_client=1, seed=0)


def test_partition_stacked_bars(parts):
    fig = plots.partition(parts)
    counts = parts.counts()
    assert fig.layout.barmode == "stack"
    assert len(fig.data) == 3  # one trace per class
    assert [t.name for t in fig.data] == ["class 0", "class 1", "class 2"]
    for k, t in enumerate(fig.data):
        assert isinstance(t, go.Bar)
        assert list(t.x) == ["site-1", "site-2", "site-3"]
        assert list(t.y) == counts[:, k].tolist()
    stacked = np.sum([np.asarray(t.y) for t in fig.data], axis=0)
    assert stacked.tolist() == [len(i) for i in parts.indices] == counts.sum(axis=1).tolist()
    assert stacked.sum() == 12
    assert parts.scheme in fig.layout.title.text
    assert fig.layout.legend.orientation == "h"  # below the bars: every class in view, none behind a scrollbar


def test_log_axis_has_whole_tick_labels():
    fig = plots.log_axis(go.Figure(go.Scatter(x=[0.05, 0.5, 5], y=[1, 2, 3])))
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.tickmode == "array"
    assert list(fig.layout.xaxis.ticktext) == ["0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1", "2", "5", "10", "20", "50"]
    wide = plots.log_axis(go.Figure(go.Bar(x=["a", "b"], y=[1e-3, 1e3])), "y")  # six decades: powers of ten only
    assert list(wide.layout.yaxis.ticktext) == ["0.001", "0.01", "0.1", "1", "10", "100", "1k"]
    assert plots.log_axis(go.Figure(), "y").layout.yaxis.type == "log"
    bytes_ = plots.log_axis(go.Figure(go.Scatter(x=[1, 2], y=[76960, 4532716])), "y")
    assert list(bytes_.layout.yaxis.ticktext)[:6] == ["10k", "20k", "50k", "100k", "200k", "500k"]
    assert "1M" in bytes_.layout.yaxis.ticktext


def ticks(fig) -> tuple:
    axis = fig.layout.xaxis
    return axis.tickformat, axis.tickmode, axis.tickvals


def test_round_axes_have_integer_ticks():
    # plotly alone puts ticks at 1, 1.5, 2, 2.5, 3 for three rounds: a tick at each round, whole-number labels
    three = make_history([0.25, 0.5, 0.75], {i: {"site-1": {"train_loss": 1.0}} for i in range(3)})
    assert ticks(plots.curves(three)) == (",d", "array", (1, 2, 3))
    assert ticks(plots.client_curves(three)) == (",d", "array", (1, 2, 3))
    assert ticks(plots.curves(make_history([0.5]))) == (",d", "array", (1,))  # not 0, 1, 2 around one round
    assert ticks(plots.curves(make_history([0.5] * 10)))[2] == tuple(range(1, 11))
    # more rounds: plotly's own steps (2, 5, 10, 50: whole numbers at that span), not 200 crowded labels
    assert ticks(plots.curves(make_history([0.5] * 11))) == (",d", "auto", None)
    assert ticks(plots.curves(make_history([0.5] * 200))) == (",d", "auto", None)
    # a notebook's own figure of rounds (plotly express, NumPy values) gets the same axis
    assert ticks(plots.round_axis(go.Figure(go.Bar(x=np.array([1, 2, 3, 4]), y=[1, 2, 3, 4]))))[2] == (1, 2, 3, 4)


def test_partition_on_synthetic_dirichlet():
    data = fk.data.synthetic(samples=500, features=3, classes=5, seed=1)
    p = fk.data.dirichlet(data.train, clients=4, alpha=0.2, seed=0)
    fig = plots.partition(p, title="skew")
    assert len(fig.data) == 5 and fig.layout.title.text == "skew"
    assert np.sum([np.asarray(t.y) for t in fig.data], axis=0).tolist() == p.counts().sum(axis=1).tolist()
