"""Lean client state: many registered clients, few sampled per round, hold a few models, not one per client."""

import gc
import warnings

import pytest
import torch
from torch import nn

import fedkit as fk
from fedkit.data import ClientData
from fedkit.engine import sequential
from fedkit.train import LOCAL_WEIGHTS
from fedkit.workflows import Chain, CrossSiteEval, cross_site_dataframe
from interrupts import interrupted, stop_after  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def tiny_clients(n, samples=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda k: fk.Dataset(torch.randn(k, 8, generator=g), torch.randint(0, 3, (k,), generator=g), 3)  # noqa: E731
    return [ClientData(make(samples), make(2)) for _ in range(n)]


def model():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def watched(n, per_round, rounds=3, workflow=None, **kw):
    """Run ``n`` clients, ``per_round`` a round; returns the run and, after each engine call, what the clients held:
    (nn.Module instances in any client's state, state entries in all, clients with any state)."""
    seen = []

    def engine(clients, server, device, abort):
        sequential(clients, server, device, abort)
        states = [c.state for c in everyone]
        modules = sum(isinstance(v, nn.Module) or (isinstance(v, tuple) and any(isinstance(x, nn.Module) for x in v))
                      for s in states for v in s.values())
        seen.append((modules, sum(len(s) for s in states), sum(bool(s) for s in states)))

    everyone = []

    class Grab(fk.Simulator):
        def _provision(self, clients, ckpt, history):  # the run's own (fresh) clients
            everyone[:] = clients.values()
            return super()._provision(clients, ckpt, history)

    wf = workflow or fk.FedAvg(rounds=rounds, clients_per_round=per_round)
    sim = Grab(wf, model=model, clients=tiny_clients(n), test=tiny_clients(1)[0].train, seed=0, device="cpu",
               engine=engine, **kw)
    return sim.run(progress=False), seen


def models_alive():
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some of torch's deprecated objects warns
        warnings.simplefilter("ignore")
        return sum(isinstance(o, nn.Module) for o in gc.get_objects())


def test_many_registered_clients_hold_no_model_per_client():
    before = models_alive()
    run, seen = watched(500, 10)
    assert run.status == "done" and len(run.history) == 3
    assert {m for m, _, _ in seen} == {0}  # no client keeps a model (nor a wrapper of one) between tasks
    assert {e for _, e, _ in seen} == {0}  # plain FedAvg: nothing of a client's own survives its task
    assert models_alive() - before <= fk.train.POOL_IDLE + 1


def test_models_held_do_not_grow_with_registered_clients():
    small, big = [], []
    for n, out in ((20, small), (400, big)):
        peak = [0]

        def count(record, peak=peak):
            peak[0] = max(peak[0], models_alive())

        run, _ = watched(n, 5, on_round=[count])
        assert run.status == "done"
        out.append(peak[0])
    assert big == small


def test_scaffold_keeps_only_its_control_variates():
    run, seen = watched(100, 5, workflow=fk.SCAFFOLD(rounds=3, clients_per_round=5))
    assert run.status == "done"
    assert {m for m, _, _ in seen} == {0}
    assert seen[-1][2] <= 15  # only the clients that trained have state (their control variates)


def test_cross_site_evaluation_keeps_local_weights_not_models():
    run, seen = watched(6, 3, workflow=Chain(fk.FedAvg(rounds=2, clients_per_round=3), CrossSiteEval()))
    assert run.status == "done"
    assert {m for m, _, _ in seen} == {0}
    trained = run.history.results["cross_site"]["trained"]
    assert sum(trained.values()) >= 3 and set(trained) == {f"site-{i}" for i in range(1, 7)}
    df = cross_site_dataframe(run)
    assert df.shape == (7, 6)


def test_plain_fedavg_keeps_no_local_weights_but_a_hand_built_client_does():
    run, _ = watched(6, 3)
    assert run.status == "done"
    sim = fk.Simulator(fk.FedAvg(rounds=1), model=model, clients=tiny_clients(2), device="cpu")
    assert not sim.workflow.uses_local_models
    assert Chain(fk.FedAvg(rounds=1), CrossSiteEval()).uses_local_models
    client = fk.Client("c", tiny_clients(1)[0], {"train": fk.Trainer(model, fk.TrainConfig(validate=False))})
    task = fk.Task("train", fk.DXO(fk.DataKind.WEIGHTS, fk.weights.clone(model().state_dict())))
    client.handle(task, torch.device("cpu"), fk.Signal())
    assert set(client.state) == {LOCAL_WEIGHTS}
    assert all(isinstance(v, torch.Tensor) for v in client.state[LOCAL_WEIGHTS].values())


def test_same_weights_whatever_the_pool_held(digits):
    """A borrowed model gives the same run as a fresh one: the pool is warm in the second run."""
    parts = fk.data.iid(digits.train, 6, seed=0)

    def once():
        return fk.Simulator(fk.FedAvg(rounds=2, clients_per_round=3), model=lambda: fk.models.for_data(digits),
                            clients=parts, test=digits.test, seed=3, device="cpu").run(progress=False).model_sha256

    assert once() == once()


def test_resume_with_sampled_clients_equals_uninterrupted(tmp_path):
    clients = tiny_clients(40)

    def sim(out, on_round=()):
        return fk.Simulator(fk.FedAvg(rounds=4, clients_per_round=4), model=model, clients=clients, seed=1,
                            device="cpu", out=out, on_round=list(on_round))

    whole = sim(tmp_path / "whole").run(progress=False)
    cut = interrupted(sim(tmp_path / "cut", [stop_after(1)]))
    assert cut.status == "aborted"
    resumed = sim(tmp_path / "cut").resume(progress=False)
    assert resumed.status == "done" and resumed.model_sha256 == whole.model_sha256


def test_evaluate_in_one_batch_gives_the_numbers_of_many(digits):
    m = fk.models.for_data(digits)
    one = fk.evaluate(m, digits.test)  # 360 examples: one batch
    many = fk.evaluate(m, digits.test, batch_size=50)
    assert one["accuracy"] == many["accuracy"]
    assert one["loss"] == pytest.approx(many["loss"], rel=1e-6)


def test_a_hooked_model_is_not_lent_again():
    pool = fk.model_pool._Pool()
    m = pool.take(model, torch.device("cpu"))
    m.register_forward_hook(lambda *a: None)
    pool.give_back(model, torch.device("cpu"), m)
    assert pool.take(model, torch.device("cpu")) is not m
    clean = pool.take(model, torch.device("cpu"))
    pool.give_back(model, torch.device("cpu"), clean)
    assert pool.take(model, torch.device("cpu")) is clean
