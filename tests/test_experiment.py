"""Experiment: typed settings objects and named presets, which the CLI and the widget panel build."""

import dataclasses

import pytest
import torch

import fedkit as fk
from fedkit.experiment import PRESETS, DataSpec, Experiment


def test_defaults_are_fedkit_runs():
    exp = Experiment()
    assert exp.data == DataSpec(dataset="digits", data_root="data", download=False, clients=8, partition="iid",
                                alpha=0.5, shards_per_client=2)
    assert exp.workflow == fk.FedAvg(rounds=10)
    assert exp.train == fk.TrainConfig(epochs=1, batch_size=16, lr=0.05, momentum=0.9)
    assert (exp.model, exp.faults, exp.seed, exp.device) == ("auto", None, 0, "auto")
    assert fk.Experiment is Experiment


def test_presets_hold_exact_settings():
    assert list(PRESETS) == ["quickstart", "smoke", "pathological"]
    quick = Experiment.preset("quickstart")  # the README's fedkit run command
    assert quick == Experiment(data=DataSpec(clients=8, partition="dirichlet", alpha=0.5), workflow=fk.FedAvg(rounds=20))
    assert (quick.data.dataset, quick.data.clients, quick.data.partition, quick.data.alpha) == ("digits", 8, "dirichlet", 0.5)
    assert quick.workflow.rounds == 20 and quick.train == fk.TrainConfig() and quick.seed == 0
    smoke = Experiment.preset("smoke")
    assert (smoke.data.clients, smoke.data.partition, smoke.workflow.rounds) == (3, "iid", 2)
    shards = Experiment.preset("pathological")
    assert (shards.data.clients, shards.data.partition, shards.data.shards_per_client) == (10, "shards", 2)


def test_a_preset_with_changes_leaves_the_preset_alone():
    prox = Experiment.preset("quickstart", workflow=fk.FedProx(rounds=5, mu=0.1), seed=3)
    assert prox.workflow == fk.FedProx(rounds=5, mu=0.1) and prox.seed == 3 and prox.data.partition == "dirichlet"
    assert Experiment.preset("quickstart").workflow == fk.FedAvg(rounds=20)


@pytest.mark.parametrize("call, match", [
    (lambda: Experiment.preset("huge"), "no preset 'huge'; the presets are: quickstart, smoke, pathological"),
    (lambda: Experiment.preset("smoke", rounds=3), "an Experiment has no rounds; it has: data, workflow, train"),
])
def test_bad_presets_say_what_there_is(call, match):
    with pytest.raises(fk.ConfigError, match=match):
        call()


@pytest.mark.parametrize("kwargs, match", [
    (dict(partition="random"), "partition 'random' is not known; choose one of: iid, dirichlet, shards, quantity"),
    (dict(dataset="imagenet"), "dataset 'imagenet' is not known"),
    (dict(clients=0), "DataSpec.clients must be an integer >= 1, got 0"),
    (dict(alpha=0.0), "DataSpec.alpha must be a finite number > 0"),
    (dict(alpha=float("inf")), "DataSpec.alpha must be a finite number > 0"),
    (dict(shards_per_client=1.5), "DataSpec.shards_per_client must be an integer >= 1"),
])
def test_bad_data_settings(kwargs, match):
    with pytest.raises(fk.ConfigError, match=match):
        DataSpec(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(workflow="fedavg"), r"Experiment.workflow must be a fk.FedAvg\(...\), got 'fedavg'"),
    (dict(data={"clients": 3}), r"Experiment.data must be a DataSpec\(...\)"),
    (dict(train=None), r"Experiment.train must be a fk.TrainConfig\(...\)"),
    (dict(model="resnet"), "model 'resnet' is not known; choose one of: auto, mlp, cnn, simple"),
    (dict(faults={"crash": 0.1}), r"Experiment.faults must be a fk.Faults\(...\) or None"),
    (dict(seed=-1), "Experiment.seed must be a whole number in \\[0, 2\\*\\*63\\)"),
    (dict(faults=fk.Faults(straggle=0.2)), "needs a deadline: add task_timeout=SECONDS"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(fk.ConfigError, match=match):
        Experiment(**kwargs)


def test_stragglers_with_a_deadline_are_accepted():
    exp = Experiment(workflow=fk.FedAvg(task_timeout=30), faults=fk.Faults(straggle=0.2))
    assert exp.faults.straggle == 0.2


@pytest.mark.parametrize("spec, deal", [
    (DataSpec(clients=4), lambda train, seed: fk.data.iid(train, 4, seed=seed)),
    (DataSpec(clients=5, partition="dirichlet", alpha=0.1),
     lambda train, seed: fk.data.dirichlet(train, 5, alpha=0.1, seed=seed)),
    (DataSpec(clients=4, partition="shards", shards_per_client=3),
     lambda train, seed: fk.data.shards(train, 4, 3, seed=seed)),
    (DataSpec(clients=5, partition="quantity", alpha=0.3),
     lambda train, seed: fk.data.quantity_skew(train, 5, alpha=0.3, seed=seed)),
], ids=["iid", "dirichlet", "shards", "quantity"])
def test_partition_of_deals_the_training_set_as_the_settings_say(digits, spec, deal):
    parts = spec.partition_of(digits, seed=2)
    assert len(parts) == spec.clients and sum(len(p) for p in parts) == len(digits.train)
    expected = deal(digits.train, 2)
    assert all(torch.equal(a.y, b.y) and torch.equal(a.x, b.x) for a, b in zip(parts, expected, strict=True))


def test_the_simulator_has_every_part_and_repeats_exactly(digits):
    exp = Experiment.preset("smoke", train=fk.TrainConfig(lr=0.1), seed=4)
    sim = exp.simulator(data=digits)
    assert sim.workflow is exp.workflow and sim.train == fk.TrainConfig(lr=0.1) and sim.seed == 4
    assert len(sim.clients) == 3 and sim.faults is None
    a, b = exp.simulator(data=digits).run(progress=False), exp.simulator().run(progress=False)
    assert a.status == "done" and len(a.history) == 2 and a.model_sha256 == b.model_sha256
    other = dataclasses.replace(exp, seed=5).simulator(data=digits).run(progress=False)
    assert other.model_sha256 != a.model_sha256


def test_faults_reach_the_simulator_and_a_bad_model_fails_before_the_run(digits, tmp_path):
    exp = Experiment.preset("smoke", faults=fk.Faults(crash=0.1))
    sim = exp.simulator(out=tmp_path, data=digits)
    assert sim.faults == fk.Faults(crash=0.1) and str(sim.out) == str(tmp_path)
    with pytest.raises(fk.ConfigError, match="needs 3x32x32 images"):
        Experiment.preset("smoke", model="simple").simulator(data=digits)
