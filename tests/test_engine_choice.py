"""Engines by name: Simulator(engine=...), Experiment.engine and `fedkit run --engine` choose the same engines,
refuse what they do not know, and the summary says which engine ran."""

import json

import pytest
import torch

import fedkit as fk
from fedkit.cli import main
from fedkit.engine import Vectorized, sequential
from fedkit.engine.choose import NAMES, resolve

pytestmark = pytest.mark.usefixtures("one_thread")


def test_names_resolve_to_engines():
    assert resolve("sequential") == (sequential, "sequential")
    for name in ("vectorized", "auto"):
        engine, said = resolve(name)
        assert isinstance(engine, Vectorized) and said == name
    engine, said = resolve(fk.engine.vectorized_engine(chunk=4))
    assert said == "vectorized" and engine.chunk == 4

    def mine(clients, server, device, abort):
        sequential(clients, server, device, abort)
    assert resolve(mine) == (mine, "mine")


@pytest.mark.parametrize("bad", ["fast", "Sequential", "", 3, None])
def test_unknown_engines_are_refused_with_the_names(digits, bad):
    parts = fk.data.iid(digits.train, clients=2, seed=0)
    with pytest.raises(fk.ConfigError, match="engine must be one of auto, sequential, vectorized, ray"):
        fk.Simulator(fk.FedAvg(rounds=1), model=lambda: fk.models.for_data(digits), clients=parts, engine=bad)
    with pytest.raises(fk.ConfigError, match="Experiment.engine"):
        fk.Experiment(engine=bad)


def test_the_experiment_passes_its_engine_and_the_summary_names_it(digits):
    assert set(NAMES) == {"auto", "sequential", "vectorized", "ray"}
    runs = {}
    for name in ("sequential", "auto"):
        exp = fk.Experiment.preset("smoke", engine=name)
        runs[name] = exp.simulator().run(progress=False)
        assert runs[name].summary()["engine"] == name
    a, b = runs["sequential"], runs["auto"]
    for k, v in a.weights.items():
        torch.testing.assert_close(b.weights[k], v, atol=1e-5, rtol=0)
    assert a.summary()["final_accuracy"] == pytest.approx(b.summary()["final_accuracy"], abs=1e-9)


def test_cli_engine_flag(tmp_path, capsys):
    rc = main(["run", "--clients", "3", "--rounds", "2", "--engine", "vectorized", "--json", "--no-progress",
               "--out", str(tmp_path / "run")])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["engine"] == "vectorized" and summary["status"] == "done"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["engine"] == "vectorized"
    with pytest.raises(SystemExit) as e:
        main(["run", "--engine", "fast"])
    assert e.value.code == 2
    assert "--engine" in capsys.readouterr().err
