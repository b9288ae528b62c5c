"""Cyclic weight transfer: the model visits clients one after another, each update applied before the next visit."""

import math

import numpy as np
import pytest
import torch

import fedkit as fk
from fedkit.data import ClientData
from fedkit.workflows import Cyclic


def diff_executor(fn, seen=None):
    """A plain-function executor answering WEIGHT_DIFF fn(w) for the weight w it receives."""
    def execute(task, ctx, abort):
        w = task.data.data["weight"]
        if seen is not None:
            seen.append((task.round, ctx.client, w.item()))
        return fk.DXO(fk.DataKind.WEIGHT_DIFF, {"weight": fn(w)}, {fk.MetaKey.NUM_SAMPLES: 1})
    return execute


def clients(*executors, names=None):
    d = fk.Dataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), 2)
    names = names or [f"c{i}" for i in range(len(executors))]
    return [fk.Client(n, ClientData(d, d), {"train": ex}) for n, ex in zip(names, executors)]


def test_each_client_trains_the_model_the_previous_one_left(tiny_model):
    # c0 doubles the weight, c1 adds 1. Start 1: round 0: 1 -> 2 -> 3; round 1: 3 -> 6 -> 7.
    seen = []
    sim = fk.Simulator(Cyclic(rounds=2), model=tiny_model,
                       clients=clients(diff_executor(lambda w: w, seen), diff_executor(torch.ones_like, seen)))
    run = sim.run(progress=False)
    assert run.weights["weight"].item() == pytest.approx(7.0)
    assert seen == [(0, "c0", 1.0), (0, "c1", 2.0), (1, "c0", 3.0), (1, "c1", 6.0)]


def test_the_order_matters_unlike_averaging(tiny_model):
    # the same two clients visited the other way round: 1 -> 2 -> 4 -> 5 -> 10
    sim = fk.Simulator(Cyclic(rounds=2), model=tiny_model,
                       clients=clients(diff_executor(torch.ones_like), diff_executor(lambda w: w)))
    assert sim.run(progress=False).weights["weight"].item() == pytest.approx(10.0)


def visits(order, seed, rounds=4, n=5):
    seen = []
    sim = fk.Simulator(Cyclic(rounds=rounds, order=order), model=torch.nn.Linear(1, 1, bias=False),
                       clients=clients(*[diff_executor(torch.zeros_like, seen) for _ in range(n)]), seed=seed)
    run = sim.run(progress=False)
    per_round = [[c for r, c, _ in seen if r == rnd] for rnd in range(rounds)]
    assert [list(rec.clients) for rec in run.history] == per_round  # history rows in visit order
    return per_round


def test_fixed_order_visits_in_federation_order_every_round():
    assert visits("fixed", seed=0) == [["c0", "c1", "c2", "c3", "c4"]] * 4


def test_shuffled_order_is_a_new_permutation_each_round_fixed_by_the_seed():
    a, b, other = visits("shuffled", seed=0), visits("shuffled", seed=0), visits("shuffled", seed=1)
    names = ["c0", "c1", "c2", "c3", "c4"]
    assert all(sorted(r) == names for r in a)  # every client once per round
    assert a == b
    assert a != other
    assert len({tuple(r) for r in a}) > 1
    assert a == [Cyclic(order="shuffled").visit_order(names, np.random.default_rng([0, rnd, 3])) for rnd in range(4)]


def test_one_history_round_per_cycle_with_server_accuracy(digits):
    parts = fk.data.iid(digits.train, clients=4, seed=0)
    run = fk.Simulator(Cyclic(rounds=3), model=lambda: fk.models.for_data(digits), clients=parts,
                       test=digits.test, seed=0).run(progress=False)
    acc = run.history.series("accuracy")
    assert [r.round for r in run.history] == [0, 1, 2]
    assert all(list(r.clients) == ["site-1", "site-2", "site-3", "site-4"] for r in run.history)
    assert acc[-1] >= 0.93, acc
    assert acc[-1] > acc[0]
    assert fk.evaluate(run.model(), digits.test)["accuracy"] == pytest.approx(acc[-1])


def test_a_failing_client_stops_the_cycle_and_is_named(tiny_model):
    def boom(task, ctx, abort):
        raise RuntimeError("GPU fell off")
    sim = fk.Simulator(Cyclic(rounds=1), model=tiny_model, clients=clients(diff_executor(torch.ones_like), boom))
    with pytest.raises(fk.UpdateError, match="c1: RuntimeError: GPU fell off"):
        sim.run(progress=False)


def test_weights_instead_of_a_diff_is_rejected(tiny_model):
    def full(task, ctx, abort):
        return fk.DXO(fk.DataKind.WEIGHTS, dict(task.data.data))
    with pytest.raises(fk.UpdateError, match="client 'c0' answered WEIGHTS; expected WEIGHT_DIFF"):
        fk.Simulator(Cyclic(rounds=1), model=tiny_model, clients=clients(full)).run(progress=False)


def test_a_bad_update_mid_cycle_leaves_the_global_model_untouched(tiny_model):
    sim = fk.Simulator(Cyclic(rounds=1), model=tiny_model,
                       clients=clients(diff_executor(torch.ones_like), diff_executor(lambda w: w * math.nan)))
    run = sim.start()
    run._done.wait(10)
    assert run.status == "failed" and "client 'c1'" in run.history.events[-1]["reason"]
    assert run.weights["weight"].item() == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(rounds=0), "Cyclic.rounds must be an integer >= 1, got 0"),
    (dict(rounds=True), "Cyclic.rounds"),
    (dict(order="random"), "Cyclic.order must be one of 'fixed', 'shuffled', got 'random'"),
])
def test_bad_cyclic_settings(kwargs, match):
    with pytest.raises(fk.ConfigError, match=match):
        Cyclic(**kwargs)


def test_an_encryption_mismatch_says_how_to_fix_it():
    """Review item 7: the message said what was wrong, not what to do (as FedAvg's check_context does)."""
    from fedkit.global_model import PlainModel
    from fedkit.server import Channel, Server, ServerContext
    model = PlainModel({"w": torch.zeros(1)})
    model.encryption = "another scheme"
    fl = ServerContext(Server(model), ("a",), Channel(), fk.Signal(), fk.History(), seed=0)
    with pytest.raises(fk.ConfigError, match=r"not provisioned for it\. A controller that runs it must declare the "
                                             r"same he \(e\.g\. `he = inner\.he`\)"):
        fk.Cyclic(rounds=1).control_flow(fl)
