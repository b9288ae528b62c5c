"""`fedkit run`: the acceptance numbers, the JSON summary, and clear errors with exit code 2."""

import json
import subprocess
import sys

import pytest

from fedkit.cli import main


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "fedkit", "run", *args], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_iid_digits_reaches_093_and_repeats_exactly(tmp_path):
    args = ["--dataset", "digits", "--clients", "8", "--partition", "iid", "--rounds", "10", "--json"]
    rc, out, err = run_cli(*args, "--out", str(tmp_path / "a"))
    assert rc == 0, err
    first = json.loads(out.strip().splitlines()[-1])
    assert first["final_accuracy"] >= 0.93
    assert first["rounds"] == 10 and first["status"] == "done"
    assert set(first) >= {"final_accuracy", "final_loss", "rounds", "seconds", "model_sha256", "run_dir"}
    assert (tmp_path / "a" / "plot.html").exists()
    assert "rounds" in err  # the progress bar goes to stderr
    rc, out, _ = run_cli(*args, "--out", str(tmp_path / "b"), "--no-progress")
    assert json.loads(out.strip().splitlines()[-1])["model_sha256"] == first["model_sha256"]


def test_dirichlet_01_runs_to_the_end_and_learns(tmp_path, capsys):
    rc = main(["run", "--partition", "dirichlet", "--alpha", "0.1", "--rounds", "10", "--json", "--no-progress",
               "--out", str(tmp_path)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["rounds"] == 10
    history = json.loads((tmp_path / "history.json").read_text())
    accs = [r["metrics"]["accuracy"] for r in history["rounds"]]
    assert summary["final_accuracy"] > 0.7 and accs[-1] > accs[0] + 0.2


def test_human_summary_without_json(tmp_path, capsys):
    assert main(["run", "--rounds", "1", "--clients", "2", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and str(tmp_path) in out


@pytest.mark.parametrize("args, message", [
    (["--dataset", "imagenet"], "invalid choice: 'imagenet'"),
    (["--alpha", "0"], "must be a finite number > 0"),
    (["--alpha", "-1", "--partition", "dirichlet"], "must be a finite number > 0"),
    (["--clients", "5000"], "only 1437 samples"),
    (["--rounds", "zero"], "expected a whole number"),
    (["--model", "simple"], "needs 3x32x32 images"),
    (["--device", "warp-drive"], "unknown device"),
])
def test_bad_arguments_exit_2_with_a_reason(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--no-progress", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
