"""An algorithm is one Extension: server hooks with no-op defaults, and a client half the trainer runs."""

import dataclasses

import pytest
import torch

import fedkit as fk
from fedkit import checkpoint
from fedkit.server import state_name
from fedkit.train import has_client_half


def test_an_extension_overrides_only_what_it_changes(digits):
    class CountClients(fk.Extension):
        def round_metrics(self, fl, results):
            return {"clients_heard": len(results)}

    ext = CountClients()
    assert not has_client_half(ext)  # nothing for the clients: no task carries it
    parts = fk.data.iid(digits.train, clients=3, seed=0)
    run = fk.Simulator(fk.FedAvg(rounds=2, extensions=(ext,)), model=lambda: fk.models.for_data(digits),
                       clients=parts, seed=0).run(progress=False)
    plain = fk.Simulator(fk.FedAvg(rounds=2), model=lambda: fk.models.for_data(digits), clients=parts,
                         seed=0).run(progress=False)
    assert run.history.series("clients_heard") == [3.0, 3.0]
    assert run.model_sha256 == plain.model_sha256  # every other hook did nothing


@dataclasses.dataclass(frozen=True)
class ScaleSteps(fk.Extension):
    """A client half written in a cell: halve every gradient (as if lr were halved)."""

    factor: float = 0.5

    def client_begin(self, t):
        params = list(t.model.parameters())

        def hook():
            with torch.no_grad():
                for p in params:
                    p.grad.mul_(self.factor)
        t.grad_hooks.append(hook)

    def client_end(self, t):
        t.metrics["scaled_by"] = self.factor


def test_a_client_half_written_in_a_cell_runs_in_the_standard_trainer(digits):
    parts = fk.data.iid(digits.train, clients=2, seed=0)
    model = lambda: fk.models.for_data(digits)  # noqa: E731
    plain = fk.TrainConfig(lr=0.05, momentum=0.0, validate=False)
    half = fk.TrainConfig(lr=0.025, momentum=0.0, validate=False)
    scaled = fk.Simulator(fk.FedAvg(rounds=1, extensions=(ScaleSteps(),)), model=model, clients=parts, train=plain,
                          seed=0).run(progress=False)
    slower = fk.Simulator(fk.FedAvg(rounds=1), model=model, clients=parts, train=half, seed=0).run(progress=False)
    for k, v in slower.weights.items():
        torch.testing.assert_close(scaled.weights[k], v)
    rows = scaled.history.rounds[0].clients
    assert {row["scaled_by"] for row in rows.values()} == {0.5}


def test_extensions_must_be_extension_objects():
    class Duck:
        def task_meta(self, fl):
            return {}

    with pytest.raises(fk.ConfigError, match="tuple of fedkit.workflows.Extension objects"):
        fk.FedAvg(extensions=(Duck(),))


def test_an_executor_that_ignores_fedprox_is_rejected_not_silently_plain(tiny_model):
    """A train executor of your own that skips the client half would turn FedProx into FedAvg unnoticed."""
    def own(task, ctx, abort):
        return fk.DXO(fk.DataKind.WEIGHT_DIFF, {k: torch.zeros_like(v) for k, v in task.data.data.items()},
                      {fk.MetaKey.NUM_SAMPLES: 1})

    d = fk.Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 2)
    sim = fk.Simulator(fk.FedProx(rounds=1, mu=0.1, max_retries=0), model=tiny_model, clients=[d, d],
                       executors={"train": own})
    with pytest.raises(fk.RoundFailed, match="did not run the client half of Proximal"):
        sim.run(progress=False)


@dataclasses.dataclass(frozen=True)
class Tally(fk.Extension):
    """Server state written in a cell: count the rounds this extension has seen, and what it added up."""

    step: int = 1

    def after_aggregate(self, fl, results):
        state = fl.state_of(self)
        state["rounds"] = state.get("rounds", 0) + 1
        state["total"] = state.get("total", 0) + self.step


def test_two_instances_of_one_extension_keep_separate_state(tmp_path, tiny_model):
    d = fk.Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 2)
    workflow = fk.FedAvg(rounds=3, extensions=(Tally(), Tally(), Tally(step=10)))
    fk.Simulator(workflow, model=tiny_model, clients=[d, d], out=tmp_path).run(progress=False)
    state = checkpoint.load(tmp_path).server_state  # each namespace is checkpointed on its own
    assert {k: v for k, v in state.items() if k.startswith("Tally")} == {
        "Tally": {"rounds": 3, "total": 3}, "Tally#2": {"rounds": 3, "total": 3}, "Tally#3": {"rounds": 3, "total": 30}}


def test_an_extension_is_named_by_its_workflow_alone():
    t = Tally()
    first, second = fk.FedAvg(extensions=(t,)), fk.FedAvg(extensions=(Tally(step=2), t))
    assert [state_name(e) for e in first.extensions] == ["Tally"]  # the same object, in another workflow's place
    assert [state_name(e) for e in second.extensions] == ["Tally", "Tally#2"]
    assert first.extensions == (t,) and second.extensions[1] == t  # copies: the settings, not the object
    again = dataclasses.replace(second, rounds=4)  # bound once more: the same names, so a resume finds its state
    assert [state_name(e) for e in again.extensions] == ["Tally", "Tally#2"]
    dp = fk.DPFedAvg(rounds=2, extensions=(fk.UserDP(clip=2.0),))
    assert [state_name(e) for e in dp.extensions] == ["UserDP", "UserDP#2"]
