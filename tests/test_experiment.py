"""Experiment: the plain settings that the CLI and the widget panel turn into a simulator."""

import pytest

import fedkit as fk
from fedkit.experiment import Experiment


@pytest.mark.parametrize("algorithm, check", [
    ("fedavg", lambda wf: wf.extensions == () and wf.server_opt is None),
    ("fedprox", lambda wf: wf.extensions[0].mu == 0.01),
    ("scaffold", lambda wf: type(wf.extensions[0]).__name__ == "Scaffold"),
    ("fedopt", lambda wf: wf.server_opt == fk.server_opt.SGD(lr=1.0, momentum=0.6)),
    ("cyclic", lambda wf: type(wf).__name__ == "Cyclic"),
])
def test_algorithms_map_to_workflows(algorithm, check):
    assert check(Experiment(algorithm=algorithm).workflow())


def test_from_mapping_ignores_other_keys_and_builds_the_same_run():
    exp = Experiment.from_mapping({"rounds": 2, "clients": 3, "json": True, "command": "run"})
    assert (exp.rounds, exp.clients) == (2, 3)
    a, b = (exp.simulator().run(progress=False) for _ in range(2))
    assert a.model_sha256 == b.model_sha256


@pytest.mark.parametrize("kwargs, match", [
    (dict(partition="random"), "partition 'random' is not known"),
    (dict(algorithm="fedmagic"), "algorithm 'fedmagic'"),
    (dict(straggle=0.2), "needs a task_timeout"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(fk.ConfigError, match=match):
        Experiment(**kwargs)


def test_rules_and_faults():
    assert Experiment(aggregate="trimmed-mean", trim=0.2).rule().keywords == {"beta": 0.2}
    assert Experiment().faults() is None
    assert Experiment(crash=0.1).faults() == fk.Faults(crash=0.1)


def test_dp_settings_reach_the_trainer_the_workflow_and_the_filters():
    sgd = Experiment(dp_sgd=True, noise_multiplier=1.1, rounds=2).simulator()
    assert sgd.train.dp is not None and sgd.train.dp.noise_multiplier == 1.1
    fed = Experiment(dp_fedavg=True, sample_rate=0.5, clients=10, rounds=2).simulator()
    assert fed.workflow.sample_rate == 0.5 and type(fed.workflow.extensions[0]).__name__ == "ServerDP"
    assert len(fed.client_result_filters) == 1
    with pytest.raises(fk.ConfigError, match="cyclic weight transfer has no such sum"):
        Experiment(dp_fedavg=True, algorithm="cyclic").workflow()
