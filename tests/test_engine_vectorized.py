"""The vectorized engine gives the sequential engine's results: weights, steps, samples, history rows."""

import logging
import math

import pytest
import torch

import fedkit as fk
from fedkit.data import ClientData
from fedkit.engine import Vectorized, vectorized_engine
from interrupts import interrupted, stop_after  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LOGGER = "fedkit.engine.vectorized"


def sim(digits, engine, workflow=None, parts=None, kind="mlp", train=None, **kw):
    parts = parts if parts is not None else fk.data.dirichlet(digits.train, clients=5, alpha=0.3, seed=0)
    return fk.Simulator(workflow or fk.FedAvg(rounds=2), model=lambda: fk.models.for_data(digits, kind), clients=parts,
                        test=digits.test, train=train or fk.TrainConfig(epochs=2, weight_decay=1e-3), seed=0,
                        engine=engine, **kw)


def close(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return b == pytest.approx(a, rel=1e-4, abs=1e-5)
    return a == b


def assert_same(a, b):
    """Runs ``a`` (sequential) and ``b`` (vectorized) agree: weights, history keys and rows, steps and samples."""
    assert a.status == b.status
    for k, v in a.weights.items():
        torch.testing.assert_close(b.weights[k], v, atol=1e-5, rtol=0)
    assert len(a.history) == len(b.history)
    for ra, rb in zip(a.history, b.history):
        assert ra.metrics.keys() == rb.metrics.keys()
        for k, v in ra.metrics.items():
            assert close(v, rb.metrics[k]), (ra.round, k, v, rb.metrics[k])
        assert list(ra.clients) == list(rb.clients)
        for name, row in ra.clients.items():
            other = rb.clients[name]
            assert row.keys() == other.keys(), name
            assert row.get("steps") == other.get("steps") and row.get("samples") == other.get("samples")
            for k, v in row.items():
                if k != "seconds":
                    assert close(v, other[k]), (ra.round, name, k, v, other[k])
    assert [(e.get("round"), e.get("client"), e.get("what")) for e in a.history.events] == \
        [(e.get("round"), e.get("client"), e.get("what")) for e in b.history.events]


@pytest.mark.parametrize("workflow", [lambda: fk.FedAvg(rounds=2), lambda: fk.FedProx(rounds=2, mu=0.1),
                                      lambda: fk.SCAFFOLD(rounds=2)], ids=["fedavg", "fedprox", "scaffold"])
def test_equals_sequential(digits, workflow, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        b = sim(digits, vectorized_engine(), workflow()).run(progress=False)
    assert not [r for r in caplog.records if r.name == LOGGER]  # nothing fell back
    a = sim(digits, fk.engine.sequential, workflow()).run(progress=False)
    assert_same(a, b)


def test_uneven_clients_and_partial_batches(digits):
    """Very different sizes (1 to 130 samples before the validation split), partial last batches."""
    bounds = [0, 1, 4, 21, 61, 191]
    parts = [digits.train.subset(range(lo, hi)) for lo, hi in zip(bounds, bounds[1:])]
    train = fk.TrainConfig(epochs=3, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3)
    a = sim(digits, fk.engine.sequential, fk.FedProx(rounds=2, mu=0.05), parts, train=train).run(progress=False)
    b = sim(digits, vectorized_engine(), fk.FedProx(rounds=2, mu=0.05), parts, train=train).run(progress=False)
    assert_same(a, b)
    rows = b.history.rounds[0].clients.values()
    assert len({r["steps"] for r in rows}) >= 3 and any(r["samples"] % 16 for r in rows)


def test_faults(digits):
    faults = fk.Faults(crash=0.15, straggle=0.15, corrupt=0.15, dropout=0.1, seed=3)
    a = sim(digits, fk.engine.sequential, fk.FedAvg(rounds=3, min_clients=1), faults=faults).run(progress=False)
    b = sim(digits, vectorized_engine(), fk.FedAvg(rounds=3, min_clients=1), faults=faults).run(progress=False)
    kinds = {e.get("what") for e in b.history.events}
    assert {"rejected", "injected", "failed"} <= kinds  # corrupt, straggle, crash: injected and seen
    assert_same(a, b)


def test_small_cnn(digits):
    a = sim(digits, fk.engine.sequential, kind="cnn").run(progress=False)
    b = sim(digits, vectorized_engine(), kind="cnn").run(progress=False)
    assert_same(a, b)


def test_chunks_give_the_same_result(digits):
    a = sim(digits, vectorized_engine(), fk.SCAFFOLD(rounds=2)).run(progress=False)
    b = sim(digits, vectorized_engine(chunk=2), fk.SCAFFOLD(rounds=2)).run(progress=False)
    assert_same(a, b)
    with pytest.raises(fk.ConfigError, match="chunk"):
        vectorized_engine(chunk=0)


def test_resume(digits, tmp_path):
    whole = sim(digits, fk.engine.sequential, fk.SCAFFOLD(rounds=3), out=tmp_path / "whole").run(progress=False)
    cut = interrupted(sim(digits, vectorized_engine(), fk.SCAFFOLD(rounds=3), out=tmp_path / "cut",
                          on_round=[stop_after(1)]))
    assert cut.status == "aborted"
    resumed = sim(digits, vectorized_engine(), fk.SCAFFOLD(rounds=3), out=tmp_path / "cut").resume(progress=False)
    assert resumed.status == "done"
    for k, v in whole.weights.items():
        torch.testing.assert_close(resumed.weights[k], v, atol=1e-5, rtol=0)
    assert resumed.history.series("accuracy") == pytest.approx(whole.history.series("accuracy"), abs=1e-6)


class Tripwire(fk.Signal):
    """A child of the run's abort signal that triggers the run's abort at its ``n``-th check."""

    def __init__(self, parent, n):
        super().__init__(parent)
        self.n = n

    def check(self):
        self.n -= 1
        if self.n == 0:
            self.parent.trigger("tripwire")
        super().check()


def test_abort_between_steps(digits, monkeypatch):
    import sys

    module = sys.modules["fedkit.engine.vectorized"]
    steps = []
    original = module._steps

    def counting(entries, abort):
        steps.append(len(entries))
        return original(entries, abort)

    monkeypatch.setattr(module, "_steps", counting)
    engine = vectorized_engine()
    # 5 clients pulled (5 checks), then the steps: abort at the third step of the first round
    run = sim(digits, lambda c, s, d, abort: engine(c, s, d, Tripwire(abort, 8))).run(progress=False)
    assert run.status == "aborted" and len(run.history) == 0
    assert steps == [5]


class MyTrainer(fk.Trainer):
    """A user's executor: the standard trainer under another name (so results equal the sequential engine's)."""


def test_fallback_for_other_executors_is_logged_once(digits, caplog):
    parts = fk.data.iid(digits.train, clients=3, seed=0)
    mine = {"train": MyTrainer(lambda: fk.models.for_data(digits, "mlp"), fk.TrainConfig())}
    with caplog.at_level(logging.INFO, logger=LOGGER):
        b = sim(digits, vectorized_engine(), parts=parts, executors=mine).run(progress=False)
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(said) == 1 and "MyTrainer is not the standard fk.Trainer" in said[0]
    a = sim(digits, fk.engine.sequential, parts=parts, executors=mine).run(progress=False)
    assert_same(a, b)


def test_fallback_for_dp_sgd(digits, caplog):
    pytest.importorskip("opacus")
    from fedkit.privacy.dp_sgd import DPSGD

    parts = fk.data.iid(digits.train, clients=3, seed=0)

    def dp():
        return fk.FedAvg(rounds=2, extensions=(DPSGD(noise_multiplier=1.0),))

    train = fk.TrainConfig(validate=False)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        b = sim(digits, vectorized_engine(), dp(), parts, train=train).run(progress=False)
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(said) == 1 and "DP-SGD runs per client (Opacus)" in said[0]
    a = sim(digits, fk.engine.sequential, dp(), parts, train=train).run(progress=False)
    assert_same(a, b)


class WithBatchNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)
        self.bn = torch.nn.BatchNorm1d(10)

    def forward(self, x):
        return self.bn(self.fc(torch.flatten(x, 1)))


def test_fallback_for_a_model_with_buffers(digits, caplog):
    parts = fk.data.iid(digits.train, clients=3, seed=0)

    def run(engine):
        return fk.Simulator(fk.FedAvg(rounds=2), model=WithBatchNorm, clients=parts, test=digits.test, seed=0,
                            engine=engine).run(progress=False)

    with caplog.at_level(logging.INFO, logger=LOGGER):
        b = run(vectorized_engine())
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(said) == 1 and "WithBatchNorm has buffers" in said[0]
    assert_same(run(fk.engine.sequential), b)


def test_cross_site_eval_submits_the_locally_trained_models(digits):
    from fedkit.workflows import Chain, CrossSiteEval, FedAvg

    parts = fk.data.dirichlet(digits.train, clients=3, alpha=0.3, seed=0)
    data = [ClientData(*p.split(0.2, seed=i)) for i, p in enumerate(parts)]

    def run(engine):
        return fk.Simulator(Chain(FedAvg(rounds=2), CrossSiteEval()), model=lambda: fk.models.for_data(digits),
                            clients=data, test=digits.test, seed=0, engine=engine).run(progress=False)

    a, b = run(fk.engine.sequential), run(vectorized_engine())
    ca, cb = a.history.results["cross_site"], b.history.results["cross_site"]
    assert cb["trained"] == {"site-1": True, "site-2": True, "site-3": True} == ca["trained"]
    for metric in ("accuracy", "loss"):
        for model, row in ca[metric].items():
            assert cb[metric][model] == pytest.approx(row, rel=1e-4, abs=1e-5), (metric, model)


def test_is_an_engine():
    assert isinstance(fk.engine.vectorized, Vectorized) and fk.engine.vectorized.chunk is None
    assert "vectorized" in fk.engine.__all__ and "vectorized_engine" in fk.engine.__all__


def test_a_task_past_its_deadline_answers_late(digits):
    parts = fk.data.iid(digits.train, clients=3, seed=0)
    with pytest.raises(fk.errors.RoundFailed, match="late: ran past its 0.001 s deadline"):
        sim(digits, vectorized_engine(), fk.FedAvg(rounds=1, task_timeout=1e-3, max_retries=0),
            parts).run(progress=False)


@pytest.mark.parametrize("error", ["oom", "other"])
def test_a_chunk_that_fails_is_halved_or_trained_per_client(digits, monkeypatch, caplog, error):
    import sys

    module = sys.modules["fedkit.engine.vectorized"]
    original = module._steps

    def failing(entries, abort):
        if len(entries) > 2:
            raise torch.OutOfMemoryError("out of memory (test)") if error == "oom" else RuntimeError("vmap said no")
        return original(entries, abort)

    monkeypatch.setattr(module, "_steps", failing)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        b = sim(digits, vectorized_engine(), fk.SCAFFOLD(rounds=2)).run(progress=False)
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(said) == 1 and ("halved" if error == "oom" else "vmap said no") in said[0]
    monkeypatch.setattr(module, "_steps", original)
    assert_same(sim(digits, fk.engine.sequential, fk.SCAFFOLD(rounds=2)).run(progress=False), b)


class Nudge(fk.workflows.Extension):
    """A client half that says it is vectorized but adds a plain gradient hook: those clients train alone."""

    vectorized = True

    def client_begin(self, t):
        params = list(t.model.parameters())

        def hook():
            with torch.no_grad():
                for p in params:
                    p.grad.add_(p, alpha=0.01)

        t.grad_hooks.append(hook)


def test_a_plain_gradient_hook_trains_alone(digits, caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        b = sim(digits, vectorized_engine(), fk.FedAvg(rounds=2, extensions=(Nudge(),))).run(progress=False)
    said = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(said) == 1 and "not a fedkit.train.GradTerm" in said[0]
    assert_same(sim(digits, fk.engine.sequential, fk.FedAvg(rounds=2, extensions=(Nudge(),))).run(progress=False), b)


def frozen_first_layer(digits):
    """The digits MLP with its first layer frozen (``requires_grad=False``), its initial weights fixed by a seed."""
    with torch.random.fork_rng():
        torch.manual_seed(7)
        model = fk.models.for_data(digits, "mlp")
    for p in model.fc1.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("workflow", [lambda: fk.FedAvg(rounds=2), lambda: fk.FedProx(rounds=2, mu=0.1),
                                      lambda: fk.SCAFFOLD(rounds=2)], ids=["fedavg", "fedprox", "scaffold"])
def test_frozen_parameters_stay_frozen_as_in_the_sequential_engine(digits, workflow, caplog):
    train = fk.TrainConfig(epochs=2, momentum=0.9, weight_decay=1e-3)  # decay and momentum would move a frozen one
    build = lambda: frozen_first_layer(digits)  # noqa: E731
    with caplog.at_level(logging.INFO, logger=LOGGER):
        b = fk.Simulator(workflow(), model=build, clients=fk.data.dirichlet(digits.train, clients=5, alpha=0.3, seed=0),
                         test=digits.test, train=train, seed=0, engine=vectorized_engine()).run(progress=False)
    assert not [r for r in caplog.records if r.name == LOGGER]  # trained together, not fallen back
    a = fk.Simulator(workflow(), model=build, clients=fk.data.dirichlet(digits.train, clients=5, alpha=0.3, seed=0),
                     test=digits.test, train=train, seed=0, engine=fk.engine.sequential).run(progress=False)
    assert_same(a, b)
    start = build().state_dict()
    for k in ("fc1.weight", "fc1.bias"):
        assert torch.equal(b.weights[k], start[k]) and torch.equal(a.weights[k], start[k]), k
    assert not torch.equal(b.weights["fc2.weight"], start["fc2.weight"])


def test_a_float64_model_trains_together_as_in_the_sequential_engine(digits, caplog):
    """A model made ``.double()`` on float64 features (the kit keeps the data's dtype): the same float64 weights."""
    def double(d):
        return fk.data.Dataset(d.x.double(), d.y, d.num_classes, d.name)

    train, test = double(digits.train), double(digits.test)
    parts = fk.data.dirichlet(train, clients=5, alpha=0.3, seed=0)

    def run(engine):
        return fk.Simulator(fk.FedProx(rounds=2, mu=0.1), model=lambda: fk.models.for_data(digits, "mlp").double(),
                            clients=parts, test=test, train=fk.TrainConfig(epochs=2, momentum=0.9), seed=0,
                            engine=engine).run(progress=False)

    with caplog.at_level(logging.INFO, logger=LOGGER):
        b = run(vectorized_engine())
    assert not [r for r in caplog.records if r.name == LOGGER]
    a = run(fk.engine.sequential)
    assert b.status == "done" and all(v.dtype == torch.float64 for v in b.weights.values())
    for k, v in a.weights.items():
        torch.testing.assert_close(b.weights[k], v, atol=1e-12, rtol=0)
    assert_same(a, b)
