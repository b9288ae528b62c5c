"""The controller API (issue 20): fl.round(r) -> Round (train, send, metrics), fl.sample, fl.stop, fl.model.update."""

import dataclasses

import pytest
import torch

import fedkit as fk
from fedkit.aggregate import by_samples, uniform, weighted_mean
from fedkit.client import Refused
from fedkit.data import ClientData
from fedkit.global_model import PlainModel
from fedkit.server import Channel, Server, ServerContext
from fedkit.workflows import Chain, CrossSiteEval

pytestmark = pytest.mark.usefixtures("one_thread")


def diff(value=1.0, samples=1, fail_first=0):
    """An executor answering a WEIGHT_DIFF of ``value`` on ``samples`` samples, failing its first ``fail_first``
    attempts of every round."""
    def execute(task, ctx, abort):
        if task.attempt < fail_first:
            raise RuntimeError(f"busy (attempt {task.attempt})")
        return fk.DXO(fk.DataKind.WEIGHT_DIFF, {k: torch.full_like(v, value) for k, v in task.data.data.items()},
                      {fk.MetaKey.NUM_SAMPLES: samples})
    return execute


def refusing(task, ctx, abort):
    raise Refused("privacy budget: spent")


def clients(*executors):
    d = fk.Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 2)
    return [fk.Client(f"c{i}", ClientData(d, d), {"train": ex}) for i, ex in enumerate(executors)]


def simulate(workflow, tiny_model, *executors):
    return fk.Simulator(workflow, model=tiny_model, clients=clients(*executors)).run(progress=False)


class OneShot(fk.Controller):
    """The README's controller."""

    rounds = 1

    def control_flow(self, fl):
        with fl.round(0) as rnd:
            fl.model.update(rnd.train())


def test_a_round_is_recorded_when_its_block_ends_and_not_when_it_raises(tiny_model):
    class Fails(fk.Controller):
        rounds = 2

        def control_flow(self, fl):
            with fl.round(0) as rnd:
                fl.model.update(rnd.train())
                rnd.metrics["spread"] = 0.5
            with fl.round(1) as rnd:
                fl.model.update(rnd.train())
                raise RuntimeError("the controller's own bug")

    run = fk.Simulator(Fails(), model=tiny_model, clients=clients(diff(1.0), diff(3.0))).start()
    with pytest.raises(RuntimeError, match="the controller's own bug"):
        run.wait()
    assert run.status == "failed"
    assert [r.round for r in run.history] == [0]  # round 1 raised: nothing recorded for it
    record = run.history.rounds[0]
    assert record.metrics["spread"] == 0.5 and record.metrics["attempts"] == 1
    assert {c: row["status"] for c, row in record.clients.items()} == {"c0": "ok", "c1": "ok"}


def test_retries_min_clients_and_screening_are_on_by_default_with_the_workflows_settings(tiny_model):
    """OneShot has no settings: every client must answer at once. With min_clients and max_retries as class
    attributes, the same two lines retry the short round and go ahead without a client that keeps failing."""
    with pytest.raises(fk.RoundFailed, match=r"only 1 valid result\(s\) from 2 client\(s\) after 1 attempt"):
        simulate(OneShot(), tiny_model, diff(1.0), diff(1.0, fail_first=1))

    class Tolerant(OneShot):
        min_clients, max_retries = 2, 1

    run = simulate(Tolerant(), tiny_model, diff(1.0), diff(1.0, fail_first=1), diff(1.0, fail_first=9))
    assert run.status == "done" and run.history.rounds[0].metrics["attempts"] == 2
    assert [(e["client"], e["attempt"]) for e in run.history.events if e["what"] == "failed"] == [
        ("c1", 0), ("c2", 0), ("c2", 1)]
    # screening: an update 10^6 times larger than its peers' is rejected with its reason (max_norm_ratio default)
    run = simulate(Tolerant(), tiny_model, diff(1.0), diff(1.0), diff(1.0), diff(1e6))
    assert run.history.rounds[0].clients["c3"]["status"] == "rejected"
    assert run.weights["weight"].item() == 2.0  # 1 + the mean of the three valid ones


def test_round_defaults_come_from_the_running_workflow_also_when_another_runs_it(tiny_model):
    class Wrapper(fk.Controller):  # has none of the settings: the wrapped FedAvg's apply inside its control_flow
        def __init__(self, inner):
            self.inner, self.rounds = inner, inner.rounds

        def control_flow(self, fl):
            self.inner.control_flow(fl)

    run = simulate(Wrapper(fk.FedAvg(rounds=1, min_clients=1, max_retries=0)), tiny_model,
                   diff(1.0), diff(1.0, fail_first=1))
    assert run.status == "done" and run.history.rounds[0].metrics["clients_ok"] == 1
    # an argument overrides the setting for one call
    class Strict(OneShot):
        min_clients = 1

        def control_flow(self, fl):
            with fl.round(0) as rnd:
                fl.model.update(rnd.train(min_clients=None))

    with pytest.raises(fk.RoundFailed, match="min_clients is 2"):
        simulate(Strict(), tiny_model, diff(1.0), diff(1.0, fail_first=1))


def test_fl_stop_ends_the_run_cleanly_with_the_last_round_as_the_result(tiny_model):
    class Plateau(fk.Controller):
        rounds = 5

        def control_flow(self, fl):
            for r in range(self.rounds):
                if r == 2:
                    fl.stop("validation loss on a plateau")
                with fl.round(r) as rnd:
                    fl.model.update(rnd.train())

    run = simulate(Chain(Plateau(), fk.FedAvg(rounds=1)), tiny_model, diff(1.0))
    assert run.status == "done" and run.error is None and len(run.history) == 2  # the chain stops too
    assert run.weights["weight"].item() == 3.0
    assert run.history.events[-1] == {"round": 2, "what": "stopped", "reason": "validation loss on a plateau"}
    assert run.summary()["stopped"] == "validation loss on a plateau"


def test_a_refused_round_ends_the_run_cleanly_without_the_controller_catching_anything(tiny_model):
    run = simulate(OneShot(), tiny_model, diff(1.0), refusing)
    assert run.status == "done" and run.error is None and len(run.history) == 0
    assert run.weights["weight"].item() == 1.0  # the initial model stays the result
    assert [e["what"] for e in run.history.events] == ["refused", "stopped"]
    assert run.summary()["stopped"].startswith("privacy budget: spent (round 0: 1 of 2 client(s) refused")


def results(*pairs):
    return {f"c{i}": fk.DXO(fk.DataKind.WEIGHT_DIFF, {"w": torch.tensor([v])}, {fk.MetaKey.NUM_SAMPLES: n})
            for i, (v, n) in enumerate(pairs)}


def test_update_by_default_is_the_weighted_mean_by_samples():
    valid = results((1.0, 1), (4.0, 3), (-2.0, 2))
    default, explicit = PlainModel({"w": torch.tensor([0.5])}), PlainModel({"w": torch.tensor([0.5])})
    default.update(valid)
    explicit.update(valid, rule=weighted_mean, weigh=by_samples)
    mean = weighted_mean([(r.data, by_samples(r)) for r in valid.values()])
    assert torch.equal(default.weights["w"], explicit.weights["w"])
    assert torch.equal(default.weights["w"], torch.tensor([0.5]) + mean["w"])
    uniform_model = PlainModel({"w": torch.tensor([0.0])})
    uniform_model.update(valid, weigh=uniform)
    assert uniform_model.weights["w"].item() == pytest.approx(1.0)
    stepped = PlainModel({"w": torch.tensor([0.0])})
    stepped.update(valid, step=lambda weights, res: {"w": weights["w"] + len(res)})
    assert stepped.weights["w"].item() == 3.0
    untouched = PlainModel({"w": torch.tensor([0.5])})
    untouched.update({})  # a round without results (Poisson sampling drew nobody) leaves the model as it is
    assert untouched.weights["w"].item() == 0.5


def test_fedavg_moves_the_model_as_its_explicit_step_does(tiny_model):
    """The default update (rule and weighing given, no step) is bit for bit FedAvg.step."""
    run = simulate(fk.FedAvg(rounds=1), tiny_model, diff(0.3, samples=3), diff(-0.7, samples=5))
    valid = {"c0": fk.DXO(fk.DataKind.WEIGHT_DIFF, {"weight": torch.full((1, 1), 0.3)}, {fk.MetaKey.NUM_SAMPLES: 3}),
             "c1": fk.DXO(fk.DataKind.WEIGHT_DIFF, {"weight": torch.full((1, 1), -0.7)}, {fk.MetaKey.NUM_SAMPLES: 5})}
    stepped = fk.FedAvg().step({"weight": torch.ones(1, 1)}, valid, {}, round=0, fl=None)
    assert torch.equal(run.weights["weight"], stepped["weight"])


def test_fl_sample_draws_k_or_poisson_from_the_seed_and_refuses_both():
    fl = ServerContext(Server({"w": torch.zeros(1)}), tuple(f"c{i}" for i in range(10)), Channel(), fk.Signal(),
                       fk.History(), seed=3)
    assert fl.sample() == list(fl.client_names)
    assert fl.sample(4) == fl.sample_clients(4, 0) and len(fl.sample(4)) == 4
    assert fl.sample(rate=0.5) == fl.sample_poisson(0.5, 0)
    with fl.round(7, record=False):
        assert fl.sample(4) == fl.sample_clients(4, 7)  # the clients of the round in progress
    with pytest.raises(fk.ConfigError, match="fl.sample takes k .* or rate .*, not both"):
        fl.sample(2, rate=0.5)


def test_uses_local_models_is_declared_by_the_controller():
    assert fk.Controller.uses_local_models is False and OneShot().uses_local_models is False
    assert CrossSiteEval().uses_local_models is True
    assert Chain(fk.FedAvg(rounds=1), CrossSiteEval()).uses_local_models is True
    assert Chain(fk.FedAvg(rounds=1), fk.Cyclic(rounds=1)).uses_local_models is False
    assert dataclasses.replace(fk.FedAvg(rounds=1)).uses_local_models is False


class UpdatesThen(fk.Controller):
    """Round 0 completes; round 1 updates the model, then ``then(fl)`` (a stop, a bug) ends the block."""

    rounds = 2

    def __init__(self, then):
        self.then = then

    def control_flow(self, fl):
        for r in range(self.rounds):
            with fl.round(r) as rnd:
                fl.model.update(rnd.train())
                if r == 1:
                    self.then(fl)


def test_a_round_that_raises_after_its_update_leaves_the_model_as_the_last_recorded_round(tiny_model, tmp_path):
    """Review item 1: the update of an unrecorded round stayed in the model (model.pt, model_sha256)."""
    def bug(fl):
        raise RuntimeError("after the update")

    for then, status in ((lambda fl: fl.stop("enough"), "done"), (bug, "failed")):
        out = tmp_path / status
        sim = fk.Simulator(UpdatesThen(then), model=tiny_model, clients=clients(diff(1.0)), out=out)
        run = sim.start()
        run._done.wait()
        assert run.status == status and len(run.history) == 1
        assert run.weights["weight"].item() == 2.0  # 1 + round 0's diff; round 1's is undone
        last = fk.checkpoint.load(out)
        assert last.round == 0 and run.summary()["model_sha256"] == fk.weights.sha256(last.weights)


def test_a_round_out_of_order_is_refused_before_it_runs(tiny_model):
    """Review item 2: fl.round(1) as the first round was refused only when it ended, after its clients had trained."""
    class StartsAtOne(OneShot):
        def control_flow(self, fl):
            with fl.round(1) as rnd:
                raise AssertionError("the block ran")

    with pytest.raises(fk.ConfigError, match=r"StartsAtOne began round 1, but no round is recorded yet: .* one "
                                             r"`with fl\.round\(r\)` block each, so this one must be round 0"):
        simulate(StartsAtOne(), tiny_model, diff(1.0))


def test_update_refuses_results_that_are_not_training_results_and_a_bad_step_rule_or_weigh():
    """Review item 3: a validate task's results gave a raw AttributeError; a step returning None went unnoticed."""
    model = PlainModel({"w": torch.tensor([0.5])})
    scores = {"c0": fk.DXO(fk.DataKind.METRICS, {"accuracy": 0.5})}
    with pytest.raises(fk.UpdateError, match=r"client 'c0'.s result is METRICS; pass rnd\.train\(\)'s results"):
        model.update(scores)
    with pytest.raises(fk.UpdateError, match=r"got list; pass what rnd\.train\(\) returns"):
        model.update([1.0])
    with pytest.raises(fk.UpdateError, match="the server step 'nothing' returned NoneType"):
        model.update(results((1.0, 1)), step=_named(lambda w, r: None, "nothing"))
    with pytest.raises(fk.UpdateError, match=r"the server step 'wide' gave 'w' with shape \(2,\)"):
        model.update(results((1.0, 1)), step=_named(lambda w, r: {"w": torch.zeros(2)}, "wide"))
    with pytest.raises(fk.ConfigError, match="rule must be an aggregation rule"):
        model.update(results((1.0, 1)), rule="median")
    with pytest.raises(fk.ConfigError, match="weigh must be a function of a result"):
        model.update(results((1.0, 1)), weigh=2)
    assert model.weights["w"].item() == 0.5  # nothing applied


def _named(fn, name):
    fn.__name__ = name
    return fn


def test_a_controllers_own_round_settings_are_checked_when_the_simulator_is_built(tiny_model):
    """Review item 4: min_clients = "2" on a user's controller gave a raw TypeError in a round."""
    for name, value, match in (("min_clients", "2", r"OneShot\.min_clients must be an integer >= 1 or None, got '2'"),
                               ("task_timeout", -1, r"OneShot\.task_timeout must be > 0 seconds"),
                               ("max_norm_ratio", 1, r"OneShot\.max_norm_ratio must be > 1"),
                               ("sample_rate", 2.0, r"OneShot\.sample_rate is the probability"),
                               ("max_retries", None, r"OneShot\.max_retries must be an integer >= 0, got None")):
        bad = type("OneShot", (OneShot,), {name: value})()
        with pytest.raises(fk.ConfigError, match=match) as e:
            fk.Simulator(bad, model=tiny_model, clients=clients(diff(1.0)))
        assert (e.value.owner, e.value.field, e.value.value) == ("OneShot", name, value)


def test_fl_sample_names_its_own_arguments_and_refuses_a_rate_outside_0_1():
    """Review item 6: fl.sample(0) named clients_per_round; rate=1.5 picked everyone."""
    fl = ServerContext(Server({"w": torch.zeros(1)}), ("a", "b"), Channel(), fk.Signal(), fk.History(), seed=3)
    with pytest.raises(fk.ConfigError, match=r"fl\.sample\(k\) takes a whole number of clients >= 1.*got k=0"):
        fl.sample(0)
    for rate in (1.5, 0, -0.1, True):
        with pytest.raises(fk.ConfigError, match=r"fl\.sample\(rate=\.\.\.\) takes the probability .* in \(0, 1\]"):
            fl.sample(rate=rate)
    assert fl.sample(rate=1.0) == ["a", "b"]


def test_fl_stop_holds_when_the_controller_catches_it(tiny_model):
    """Review item 9: RunStopped is an Exception; a controller's ``except Exception`` swallowed the stop."""
    class Careless(fk.Controller):
        rounds = 3

        def control_flow(self, fl):
            for r in range(self.rounds):
                try:
                    with fl.round(r) as rnd:
                        fl.model.update(rnd.train())
                        if r == 0:
                            fl.stop("enough")
                except Exception:
                    pass  # swallows RunStopped too: the next round must not run
            fl.broadcast_and_wait(fk.Task("train", fl.model.task_data({})))  # nor any task

    for workflow in (Careless(), Chain(Careless(), fk.FedAvg(rounds=1))):  # nor the parts of a chain after it
        run = simulate(workflow, tiny_model, diff(1.0))
        assert run.status == "done" and len(run.history) == 0 and run.summary()["stopped"] == "enough"
        assert run.weights["weight"].item() == 1.0
        assert [e["what"] for e in run.history.events] == ["stopped"]


def test_a_round_failure_names_only_settings_the_workflow_has():
    """Review item 8: CrossSiteEval / FedStats were told to lower min_clients, which they do not have."""
    from fedkit.rounds import short_round_hint
    assert short_round_hint(["task_timeout"]) == "Raise {task_timeout}, or fix the failing clients"
    assert short_round_hint([]) == "Fix the failing clients"
