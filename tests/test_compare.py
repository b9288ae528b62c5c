"""compare() and `fedkit compare`: the same data, seed and initial model for every workflow."""

import _thread
import json
import threading

import pytest

import fedkit as fk
from fedkit import checkpoint
from fedkit.cli import main
from fedkit.simulator import RunInterrupted


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


def test_ctrl_c_stops_the_whole_comparison(digits, tmp_path):
    """Kernel > Interrupt during the first run: it is checkpointed, the exception reaches the cell, the next
    workflow never starts, and nothing presents the partial run as a result."""
    timers = []

    def interrupt_soon(record):  # a real Ctrl-C: SIGINT's KeyboardInterrupt in the main thread, mid-training
        if record.round == 0:
            timers.append(threading.Timer(0.05, _thread.interrupt_main))
            timers[-1].start()

    parts = fk.data.iid(digits.train, clients=3, seed=0)
    with pytest.raises(KeyboardInterrupt) as e:
        fk.compare({"FedProx": fk.FedProx(rounds=200, mu=0.1), "FedOpt": fk.FedOpt(rounds=2)},
                   model=lambda: fk.models.for_data(digits), clients=parts, test=digits.test, progress=False,
                   out=tmp_path, on_round=[interrupt_soon])
    timers[0].join()
    assert isinstance(e.value, RunInterrupted) and list(e.value.runs) == ["FedProx"]
    cut = e.value.run
    assert cut.status == "aborted" and not cut.complete and 1 <= len(cut.history) < 200
    assert checkpoint.exists(tmp_path / "FedProx") and checkpoint.load(tmp_path / "FedProx").round >= 0
    assert not (tmp_path / "FedOpt").exists()
    assert json.loads((tmp_path / "FedProx" / "summary.json").read_text())["complete"] is False


def test_cli_compare_interrupted_exits_130_and_runs_nothing_more(tmp_path, capsys, monkeypatch):
    original = fk.Simulator.run

    def run_then_ctrl_c(self, *a, **kw):
        self.on_round.append(stop_after_first)
        return original(self, *a, **kw)

    def stop_after_first(record):
        if record.round == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(fk.Simulator, "run", run_then_ctrl_c)
    rc = main(["compare", "--algorithms", "fedavg,fedprox", "--clients", "3", "--rounds", "3", "--json",
               "--no-progress", "--out", str(tmp_path)])
    assert rc == 130
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["interrupted"] == "fedavg" and summary["not_run"] == ["fedprox"]
    assert summary["runs"]["fedavg"]["status"] == "aborted" and summary["runs"]["fedavg"]["complete"] is False
    assert "interrupted during fedavg" in captured.err and not (tmp_path / "fedprox" / "history.json").exists()


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
    assert [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("plotly.min.js")] == ["plotly.min.js"]  # one copy
    assert 'src="plotly.min.js"' in html and 'src="../plotly.min.js"' in (tmp_path / "scaffold" / "plot.html").read_text()
    assert "scaffold: digits, dirichlet alpha=0.3, 4 clients" in (tmp_path / "scaffold" / "plot.html").read_text()


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
