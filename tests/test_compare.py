"""compare() and `fedkit compare`: the same data, seed and initial model for every workflow."""

import json

import pytest

import fedkit as fk
from fedkit.cli import main


def test_every_run_starts_from_the_same_model(digits, tmp_path):
    parts = fk.data.dirichlet(digits.train, clients=4, alpha=0.5, seed=0)
    runs = fk.compare({"FedAvg": fk.FedAvg(rounds=2), "FedOpt": fk.FedOpt(rounds=2)}, model=lambda: fk.models.for_data(digits),
                      clients=parts, test=digits.test, progress=False, out=tmp_path)
    assert list(runs) == ["FedAvg", "FedOpt"]
    assert fk.weights.sha256(runs["FedAvg"].simulator.initial_weights()) == fk.weights.sha256(
        runs["FedOpt"].simulator.initial_weights())
    assert (tmp_path / "FedAvg" / "history.json").exists() and (tmp_path / "FedOpt" / "model.pt").exists()
    assert runs["FedAvg"].model_sha256 != runs["FedOpt"].model_sha256
    fig = fk.plots.curves(runs)
    assert [t.name for t in fig.data] == ["FedAvg", "FedOpt"]


def test_compare_needs_workflows():
    with pytest.raises(fk.ConfigError, match="at least one workflow"):
        fk.compare({}, model=None, clients=[])


def test_cli_compare_writes_one_plot_and_a_summary(tmp_path, capsys):
    rc = main(["compare", "--algorithms", "fedavg,fedprox,fedopt,scaffold,cyclic", "--partition", "dirichlet",
               "--alpha", "0.3", "--clients", "4", "--rounds", "2", "--json", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(summary["runs"]) == ["fedavg", "fedprox", "fedopt", "scaffold", "cyclic"]
    assert all(r["rounds"] == 2 and r["final_accuracy"] > 0.3 for r in summary["runs"].values())
    html = (tmp_path / "compare.html").read_text()
    assert all(name in html for name in ("fedavg", "scaffold", "cyclic"))


@pytest.mark.parametrize("algorithm, extra", [("fedprox", ["--mu", "0.1"]), ("fedopt", ["--server-opt", "adam"]),
                                               ("fedopt", ["--server-opt", "yogi", "--server-lr", "0.03"]),
                                               ("scaffold", []), ("cyclic", ["--order", "shuffled"]),
                                               ("fedavg", ["--aggregate", "trimmed-mean", "--trim", "0.2"]),
                                               ("fedavg", ["--aggregate", "krum", "--byzantine", "1"])])
def test_cli_run_algorithms(algorithm, extra, tmp_path, capsys):
    rc = main(["run", "--algorithm", algorithm, *extra, "--clients", "5", "--rounds", "2", "--json", "--no-progress",
               "--out", str(tmp_path)])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rounds"] == 2


def test_cli_rejects_unknown_algorithms(capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", "--algorithms", "fedavg,fedmagic"])
    assert e.value.code == 2 and "fedmagic" in capsys.readouterr().err
