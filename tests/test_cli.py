"""`fedkit run`: the acceptance numbers, the JSON summary, and clear errors with exit code 2."""

import json
import re
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


# ------------------------------------------------------------------------------ flags -> objects

import functools  # noqa: E402

import fedkit as fk  # noqa: E402
from fedkit.cli import experiment_from_args, parser, resumed_args  # noqa: E402
from fedkit.cli_flags import RULES, faults_from_args, workflow_from_args  # noqa: E402
from fedkit.experiment import DataSpec, Experiment  # noqa: E402
from fedkit.privacy.dp import DPSGD, AdaptiveClip, UserDP  # noqa: E402
from fedkit.privacy.he import CKKS  # noqa: E402
from fedkit.server_opt import SGD, Adagrad, Adam, Yogi  # noqa: E402

# what --dp-fedavg makes of a scatter-gather workflow: fk.DPFedAvg's settings
DP_FEDAVG = dict(sample_rate=1.0, weigh=fk.aggregate.uniform, min_clients=0, max_retries=0, max_norm_ratio=None)


def flags(*argv, command="run"):
    return parser().parse_args([command, *argv])


def workflow(*argv):
    return experiment_from_args(flags(*argv)).workflow


def test_the_readme_command_is_the_quickstart_preset():
    readme = flags("--dataset", "digits", "--clients", "8", "--partition", "dirichlet", "--alpha", "0.5", "--rounds", "20")
    assert experiment_from_args(readme) == Experiment.preset("quickstart")
    assert experiment_from_args(flags()) == Experiment()  # every flag's default is the Experiment's


def test_every_part_comes_from_its_flags():
    exp = experiment_from_args(flags(
        "--dataset", "synthetic", "--data-root", "/d", "--download", "--clients", "5", "--partition", "shards",
        "--alpha", "2", "--shards-per-client", "3", "--local-epochs", "2", "--lr", "0.1", "--momentum", "0.5",
        "--batch-size", "32", "--model", "mlp", "--seed", "7", "--device", "cpu", "--dropout", "0.1", "--crash", "0.05",
        "--straggle", "0.05", "--corrupt", "0.02", "--fault-seed", "3", "--task-timeout", "30"))
    assert exp == Experiment(
        data=DataSpec(dataset="synthetic", data_root="/d", download=True, clients=5, partition="shards", alpha=2.0,
                      shards_per_client=3),
        workflow=fk.FedAvg(rounds=10, task_timeout=30.0),
        train=fk.TrainConfig(epochs=2, lr=0.1, momentum=0.5, batch_size=32), model="mlp",
        faults=fk.Faults(dropout=0.1, crash=0.05, straggle=0.05, corrupt=0.02, seed=3), seed=7, device="cpu")
    assert faults_from_args(flags()) is None and faults_from_args(flags("--crash", "0.1")) == fk.Faults(crash=0.1)


@pytest.mark.parametrize("argv, expected", [
    ([], fk.FedAvg(rounds=10)),
    (["--algorithm", "fedprox"], fk.FedProx(rounds=10, mu=0.01)),
    (["--algorithm", "fedprox", "--mu", "0.1", "--rounds", "3"], fk.FedProx(rounds=3, mu=0.1)),
    (["--algorithm", "scaffold"], fk.SCAFFOLD(rounds=10)),
    (["--algorithm", "fedopt"], fk.FedOpt(rounds=10, server_opt=SGD(lr=1.0, momentum=0.6))),
    (["--algorithm", "fedopt", "--server-lr", "0.5", "--server-momentum", "0.9"], fk.FedOpt(server_opt=SGD(0.5, 0.9))),
    (["--algorithm", "fedopt", "--server-opt", "adam"], fk.FedOpt(server_opt=Adam(lr=0.01))),
    (["--algorithm", "fedopt", "--server-opt", "yogi", "--server-lr", "0.03"], fk.FedOpt(server_opt=Yogi(lr=0.03))),
    (["--algorithm", "fedopt", "--server-opt", "adagrad"], fk.FedOpt(server_opt=Adagrad(lr=0.01))),
    (["--algorithm", "cyclic"], fk.Cyclic(rounds=10)),
    (["--algorithm", "cyclic", "--order", "shuffled", "--rounds", "4"], fk.Cyclic(rounds=4, order="shuffled")),
    (["--weigh-by", "steps", "--clients-per-round", "4"], fk.FedAvg(weigh=fk.aggregate.by_steps, clients_per_round=4)),
    (["--weigh-by", "uniform"], fk.FedAvg(weigh=fk.aggregate.uniform)),
    (["--aggregate", "median"], fk.FedAvg(aggregate=fk.aggregate.coordinate_median)),
    (["--min-clients", "4", "--max-retries", "1", "--task-timeout", "30"],
     fk.FedAvg(min_clients=4, max_retries=1, task_timeout=30.0)),
    (["--max-norm-ratio", "4"], fk.FedAvg(max_norm_ratio=4.0)),
    (["--max-norm-ratio", "off"], fk.FedAvg(max_norm_ratio=None)),
    (["--algorithm", "scaffold", "--max-norm-ratio", "None"], fk.SCAFFOLD(max_norm_ratio=None)),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_algorithm_flags_build_their_workflow(argv, expected):
    assert workflow(*argv) == expected


@pytest.mark.parametrize("argv, func, keywords", [
    (["--aggregate", "trimmed-mean", "--trim", "0.2"], fk.aggregate.trimmed_mean, {"beta": 0.2}),
    (["--aggregate", "krum", "--byzantine", "2"], fk.aggregate.krum, {"f": 2}),
    (["--aggregate", "multi-krum"], fk.aggregate.multi_krum, {"f": 1}),
])
def test_rules_with_settings_take_them_from_their_flags(argv, func, keywords):
    rule = workflow(*argv).aggregate
    assert isinstance(rule, functools.partial) and (rule.func, rule.keywords) == (func, keywords)
    assert set(RULES) == {"mean", "median", "trimmed-mean", "krum", "multi-krum"}


@pytest.mark.parametrize("argv, expected", [
    (["--dp-sgd"], fk.FedAvg(extensions=(DPSGD(noise_multiplier=1.0),))),
    (["--dp-sgd", "--noise-multiplier", "1.2", "--max-grad-norm", "0.5", "--dp-accountant", "prv"],
     fk.FedAvg(extensions=(DPSGD(noise_multiplier=1.2, max_grad_norm=0.5, accountant="prv"),))),
    (["--dp-sgd", "--target-epsilon", "3", "--delta", "1e-6"],  # the noise is computed for the workflow's 10 rounds
     fk.FedAvg(extensions=(DPSGD(target_epsilon=3.0, delta=1e-6, rounds=10),))),
    (["--dp-sgd", "--algorithm", "fedprox"], fk.FedProx(mu=0.01, extensions=(DPSGD(noise_multiplier=1.0),))),
    (["--dp-fedavg"], fk.DPFedAvg(rounds=10)),
    (["--dp-fedavg", "--clip-norm", "0.5", "--noise-multiplier", "0.8", "--sample-rate", "0.5", "--dp-accountant", "prv"],
     fk.DPFedAvg(rounds=10, clip=0.5, noise_multiplier=0.8, sample_rate=0.5, accountant="prv")),
    (["--dp-fedavg", "--target-epsilon", "5", "--adaptive-clip", "--rounds", "4"],
     fk.DPFedAvg(rounds=4, noise_multiplier=None, target_epsilon=5.0, adaptive_clip=AdaptiveClip())),
    (["--dp-fedavg", "--algorithm", "fedprox", "--weigh-by", "uniform"],
     fk.FedProx(mu=0.01, **DP_FEDAVG, extensions=(UserDP(),))),
    (["--dp-fedavg", "--algorithm", "fedopt", "--server-opt", "adam"],
     fk.FedOpt(server_opt=Adam(lr=0.01), **DP_FEDAVG, extensions=(UserDP(),))),
    (["--dp-fedavg", "--algorithm", "scaffold"], fk.SCAFFOLD(**DP_FEDAVG, extensions=(UserDP(),))),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_dp_flags_build_one_extension_in_the_workflow(argv, expected):
    assert workflow(*argv) == expected


@pytest.mark.parametrize("argv, expected", [
    (["--he"], fk.FedAvg(he=CKKS())),
    (["--he", "--algorithm", "fedprox", "--mu", "0.1"], fk.FedProx(mu=0.1, he=CKKS())),
    (["--he", "--algorithm", "cyclic", "--he-layers", "fc2.*"], fk.Cyclic(rounds=10, he=CKKS(layers="fc2.*"))),
    (["--he", "--he-poly-modulus", "16384", "--he-coeff-mod-bits", "60,40,40,40,60", "--he-scale-bits", "40",
      "--he-layers", "fc2.*", "conv1.weight"],
     fk.FedAvg(he=CKKS(16384, (60, 40, 40, 40, 60), 40, ("fc2.*", "conv1.weight")))),
    (["--he", "--dp-sgd", "--noise-multiplier", "0.5"], fk.FedAvg(he=CKKS(), extensions=(DPSGD(noise_multiplier=0.5),))),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_he_flags_build_the_ckks_settings(argv, expected):
    assert workflow(*argv) == expected


@pytest.mark.parametrize("args, message", [
    (["--dp-sgd", "--dp-fedavg"], "choose one of --dp-sgd (example-level) and --dp-fedavg (user-level)"),
    (["--noise-multiplier", "1"], "--noise-multiplier need --dp-sgd or --dp-fedavg"),
    (["--target-epsilon", "3", "--sample-rate", "0.5"], "--target-epsilon, --sample-rate need --dp-sgd or --dp-fedavg"),
    (["--adaptive-clip"], "--adaptive-clip need --dp-sgd or --dp-fedavg"),
    (["--dp-sgd", "--sample-rate", "0.1"], "--sample-rate and --adaptive-clip are DP-FedAvg options"),
    (["--dp-sgd", "--adaptive-clip"], "DP-SGD's sample rate is --batch-size / (examples per client)"),
    (["--dp-sgd", "--delta", "2"], "--delta: must be in (0, 1), got 2"),
    (["--dp-fedavg", "--clients-per-round", "3"], "drop --clients-per-round"),
    (["--dp-fedavg", "--weigh-by", "steps"], "DP-FedAvg weighs every client the same"),
    (["--dp-fedavg", "--sample-rate", "0"], "--sample-rate: must be in (0, 1], got 0"),
    (["--dp-fedavg", "--algorithm", "cyclic"], "cyclic weight transfer runs no extensions"),
    (["--dp-sgd", "--algorithm", "cyclic"], "use fedavg, fedprox, fedopt or scaffold with DP"),
    (["--he-layers", "fc2.*"], "--he-layers only mean something with --he; add --he or drop them"),
    (["--he-poly-modulus", "16384", "--he-scale-bits", "30"], "--he-poly-modulus, --he-scale-bits only mean something"),
    (["--he", "--he-coeff-mod-bits", "60,forty,60"], "--he-coeff-mod-bits must be comma-separated whole numbers"),
    (["--he", "--he-poly-modulus", "4096"], "allows at most 109 bits"),
    (["--he", "--algorithm", "fedopt"], "--he cannot use the server optimizer SGD(lr=1.0, momentum=0.6"),
    (["--he", "--algorithm", "scaffold"], "--he cannot run Scaffold: its control variates"),
    (["--he", "--aggregate", "median"], "--he cannot use the aggregation rule 'coordinate_median' (--aggregate median)"),
    (["--he", "--dp-fedavg"], "--he cannot run UserDP: it clips each client's update"),
    (["--straggle", "0.1"], "--straggle > 0 needs a deadline: add --task-timeout SECONDS"),
    (["--seed", "-1"], "--seed: must be a whole number in [0, 2**63) (e.g. 0), got -1"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_refusals_exit_2_with_what_to_change(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["run", "--no-progress", "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_unknown_algorithm_is_refused_by_name():
    with pytest.raises(fk.ConfigError, match="unknown algorithm 'fedmagic'; choose one of: fedavg, fedprox"):
        workflow_from_args(flags(), "fedmagic")


def test_output_flags_do_not_change_the_experiment_and_it_repeats_exactly():
    a = experiment_from_args(flags("--rounds", "2", "--clients", "3", "--json", "--no-progress", "--out", "x"))
    b = experiment_from_args(flags("--rounds", "2", "--clients", "3"))
    assert a == b
    first, second = (e.simulator().run(progress=False) for e in (a, b))
    assert first.model_sha256 == second.model_sha256


def test_compare_builds_one_experiment_per_algorithm():
    args = flags("--algorithms", "fedavg,cyclic", "--rounds", "3", "--partition", "dirichlet", command="compare")
    fedavg, cyclic = (experiment_from_args(args, name) for name in args.algorithms)
    assert fedavg.workflow == fk.FedAvg(rounds=3) and cyclic.workflow == fk.Cyclic(rounds=3)
    assert fedavg.data == cyclic.data == DataSpec(partition="dirichlet")


# ------------------------------------------------------------------------------ --resume

def test_cli_json_holds_the_flags_and_resume_rebuilds_the_same_experiment(tmp_path, capsys):
    argv = ["--algorithm", "fedprox", "--mu", "0.1", "--partition", "dirichlet", "--clients", "4", "--rounds", "2",
            "--dp-sgd", "--noise-multiplier", "0.5"]
    assert main(["run", *argv, "--no-progress", "--json", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "cli.json").read_text())
    assert (saved["algorithm"], saved["mu"], saved["dp_sgd"], saved["noise_multiplier"]) == ("fedprox", 0.1, True, 0.5)
    assert "resume" not in saved and "json" not in saved
    resumed = resumed_args(parser(), flags("--resume", str(tmp_path)))
    assert experiment_from_args(resumed) == experiment_from_args(flags(*argv))
    assert resumed.out == str(tmp_path)


def test_fedkit_run_finishes_on_quantity_skew_and_a_norm_rejection_names_max_norm_ratio(tmp_path, capsys):
    """Issue 18 item 5: the command exited 1 (the 1,001-sample client rejected every attempt). A screen set too
    tight still fails the run, with a hint that names --max-norm-ratio; off is stored in cli.json and resumes."""
    argv = ["run", "--partition", "quantity", "--alpha", "0.3", "--clients", "6", "--rounds", "2", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "default")]) == 0
    assert main([*argv, "--max-norm-ratio", "1.01", "--out", str(tmp_path / "tight")]) == 1
    err = capsys.readouterr().err
    assert "per step" in err and "raise --max-norm-ratio or set --max-norm-ratio off" in err and "max_norm_ratio" not in err
    assert err.splitlines()[-1].startswith("hint: the norm screen rejected an update") and "--max-norm-ratio off" in err
    (tmp_path / "off").mkdir()
    (tmp_path / "off" / "cli.json").write_text(json.dumps({"max_norm_ratio": "off"}))
    assert experiment_from_args(resumed_args(parser(), flags("--resume", str(tmp_path / "off")))).workflow == \
        fk.FedAvg(max_norm_ratio=None)


def test_a_cli_json_of_an_older_fedkit_still_resumes(tmp_path):
    """A run directory written before the settings became objects: flags only, some of them missing."""
    (tmp_path / "cli.json").write_text(json.dumps({"algorithm": "fedopt", "server_opt": "adam", "rounds": 3,
                                                   "clients": 4, "he": False, "he_layers": None, "device": "auto"}))
    exp = experiment_from_args(resumed_args(parser(), flags("--resume", str(tmp_path))))
    assert exp == Experiment(data=DataSpec(clients=4), workflow=fk.FedOpt(rounds=3, server_opt=Adam(lr=0.01)))


def test_an_interrupted_run_resumes_to_the_model_of_an_uninterrupted_one(tmp_path, capsys, monkeypatch):
    argv = ["--partition", "dirichlet", "--clients", "4", "--rounds", "4", "--algorithm", "scaffold", "--crash", "0.1",
            "--min-clients", "2", "--json", "--no-progress"]
    assert main(["run", *argv, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    def interrupt_after_round_2(record):
        if record.round == 1:
            raise KeyboardInterrupt  # as Ctrl-C: the round is checkpointed first

    original = fk.Simulator.run
    monkeypatch.setattr(fk.Simulator, "run", lambda self, *a, **kw: (
        self.on_round.append(interrupt_after_round_2), original(self, *a, **kw))[1])
    assert main(["run", *argv, "--out", str(tmp_path / "cut")]) == 130
    assert "continue with: fedkit run --resume" in capsys.readouterr().err
    monkeypatch.setattr(fk.Simulator, "run", original)
    assert main(["run", "--resume", str(tmp_path / "cut"), "--json", "--no-progress"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert resumed["rounds"] == whole["rounds"] == 4 and resumed["model_sha256"] == whole["model_sha256"]


def test_sigterm_mid_run_stops_like_ctrl_c_with_a_quoted_resume_command(tmp_path):
    """SIGTERM (kill, a scheduler) ended the process at once: exit -15, no JSON line, a stale run.lock. Now it stops as
    Ctrl-C does (checkpoint, the JSON summary, the resume command, quoted for a shell), exit 143."""
    import shlex
    import signal
    import time

    out = tmp_path / "a run's dir"  # a space and a quote: the resume command must survive a paste into a shell
    p = subprocess.Popen([sys.executable, "-m", "fedkit", "run", "--dataset", "digits", "--clients", "2", "--rounds",
                          "20", "--json", "--no-progress", "--out", str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if (out / "history.jsonl").is_file() and '{"round":' in (out / "history.jsonl").read_text():
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 143, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["status"] == "aborted" and summary["complete"] is False and 1 <= summary["rounds"] < 20
    assert not (out / "run.lock").exists()
    assert "Traceback" not in stderr
    command = shlex.split(re.search(r"continue with: (.*)", stderr).group(1))
    assert command[:3] == ["fedkit", "run", "--resume"] and command[3] == str(out)
    resumed = subprocess.run([sys.executable, "-m", "fedkit", *command[1:]], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr  # the command as printed
    final = json.loads((out / "summary.json").read_text())
    assert final["status"] == "done" and final["rounds"] == 20


def test_the_library_leaves_sigterm_alone_and_the_cli_restores_it(tmp_path):
    import signal

    import torch

    before = signal.getsignal(signal.SIGTERM)
    fk.Simulator(fk.FedAvg(rounds=1), model=lambda: torch.nn.Linear(2, 2),
                 clients=[fk.Dataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), 2)] * 2).run(progress=False)
    assert signal.getsignal(signal.SIGTERM) is before
    assert main(["run", "--clients", "2", "--rounds", "1", "--no-progress", "--out", str(tmp_path / "r")]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def test_run_directory_line_lists_what_was_written(tmp_path, capsys):
    assert main(["run", "--clients", "3", "--rounds", "2", "--no-progress", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("run directory:"))
    written = sorted(p.name for p in (tmp_path / "r").iterdir() if not p.name.startswith(".") and p.name != "run.lock")
    assert all(name in line for name in written) and "checkpoints/" in line and "cli.json" in line
    assert "../plotly.min.js" in line and (tmp_path / "plotly.min.js").is_file()


def test_resume_may_run_on_another_engine_and_warns_that_the_bits_differ(tmp_path, capsys):
    assert main(["run", "--clients", "3", "--rounds", "2", "--no-progress", "--out", str(tmp_path),
                 "--engine", "vectorized"]) == 0
    assert resumed_args(parser(), flags("--resume", str(tmp_path)), ["resume"]).engine == "vectorized"  # kept
    capsys.readouterr()
    assert main(["run", "--resume", str(tmp_path), "--engine", "sequential", "--json", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.strip().splitlines()[-1])["engine"] == "sequential"
    assert f"fedkit run: warning: the run in {tmp_path} ran on engine 'vectorized' and resumes on 'sequential'" in err
    assert "resume with --engine vectorized to get the same bits" in err and "UserWarning" not in err


def test_resume_refuses_new_settings(tmp_path, capsys):
    (tmp_path / "cli.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main(["run", "--resume", str(tmp_path), "--rounds", "5", "--mu", "0.2"])
    assert e.value.code == 2 and "drop --rounds, --mu" in capsys.readouterr().err


# ------------------------------------------------------------------------------ refusals before the first round

def test_version_and_help_give_every_default_once(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fedkit {fk.__version__}"
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--algorithm", "fedavg"), ("--clients", "8"), ("--partition", "iid"), ("--rounds", "10"),
                          ("--lr", "0.05"), ("--batch-size", "16"), ("--local-epochs", "1"), ("--model", "auto"),
                          ("--seed", "0"), ("--server-momentum", "0.6"), ("--clients-per-round", "all")]:
        entry = re.search(rf" {flag} [A-Z_{{]\S*( [A-Z_]+)? (.*?)(?= --[a-z]|$)", text).group(2)
        assert entry.count("default") == 1 and f"(default: {default}" in entry, (flag, entry)


def test_every_error_has_one_format_and_a_hint(capsys):
    for argv, prog, words in [([], "fedkit", "no command"), (["run", "--rounds", "zero"], "fedkit run", "--rounds"),
                              (["run", "--lr-rate", "1"], "fedkit run", "unrecognized arguments: --lr-rate"),
                              (["compare", "--algorithms", "fedmagic"], "fedkit compare", "--algorithms")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 2, lines
        assert lines[0].startswith(f"{prog}: error: ") and words in lines[0] and lines[1].startswith("hint: ")
    main_hint = "did you mean --lr?"
    with pytest.raises(SystemExit):
        main(["run", "--lr-rate", "1"])
    assert main_hint in capsys.readouterr().err


@pytest.mark.parametrize("out, message", [
    (lambda t: (t / "f").write_text("x") and t / "f", "is a file, not a directory"),
    (lambda t: (t / "f").write_text("x") and t / "f" / "sub", "is a file, not a directory"),
    (lambda t: "/proc/fedkit-run", "cannot be created"),
], ids=["a file", "under a file", "in /proc"])
def test_an_out_that_cannot_be_a_run_directory_exits_2(tmp_path, capsys, out, message):
    with pytest.raises(SystemExit) as e:
        main(["run", "--rounds", "1", "--clients", "2", "--no-progress", "--out", str(out(tmp_path))])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "(--out)" in err and "hint: choose another --out" in err


def test_a_finished_run_is_replaced_only_with_overwrite(tmp_path, capsys):
    argv = ["run", "--clients", "2", "--no-progress", "--json", "--out", str(tmp_path)]
    assert main([*argv, "--rounds", "2"]) == 0
    before = {f: (tmp_path / f).read_text() for f in ("summary.json", "cli.json")}
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*argv, "--rounds", "1"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and f"--out {tmp_path} holds a finished run of 2 round(s)" in err
    assert f"fedkit run --resume {tmp_path}" in err and "add --overwrite" in err
    assert json.loads(out.splitlines()[-1])["status"] == "refused"
    assert {f: (tmp_path / f).read_text() for f in before} == before  # not a byte changed
    assert main([*argv, "--rounds", "1", "--overwrite"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["rounds"] == 1
    assert json.loads((tmp_path / "cli.json").read_text())["rounds"] == 1 and "overwrite" not in before["cli.json"]


@pytest.mark.parametrize("content, message", [
    ("[]", "holds a JSON list, not the flags of a run"),
    ('"x"', "holds a JSON str, not the flags of a run"),
    ('{"rounds": "x"}', "holds a setting that cannot work (--rounds: expected a whole number, got 'x')"),
    ('{"clients": -1}', "(--clients: must be >= 1, got -1)"),
    ('{"seed": 1180591620717411303424}', "(--seed: must be a whole number in [0, 2**63)"),
    ('{"dp_sgd": "yes"}', 'holds dp_sgd="yes", but --dp-sgd is a switch'),
    ('{"lr": null}', "holds lr=null, but --lr needs a value"),
    ('{"bogus": 1}', "holds settings this fedkit does not know (bogus)"),
    ("{", "is not valid JSON"),
], ids=["list", "string", "rounds", "clients", "seed", "switch", "null", "unknown", "broken"])
def test_a_damaged_cli_json_is_refused(tmp_path, capsys, content, message):
    (tmp_path / "cli.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["run", "--resume", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--resume", "{d}", "--out", "{d}-other"], "continues {d} in place, so --out {d}-other would be ignored"),
    (["--resume", "{d}", "--rounds", "10"], "drop --rounds"),  # the default value, typed: still refused
    (["--resume", "{d}", "--overwrite"], "--overwrite replaces it: choose one"),
    (["--mu", "0.1"], "--mu only means something with --algorithm fedprox: add that or drop --mu"),
    (["--max-grad-norm", "2", "--clip-norm", "2"], "--max-grad-norm only means something with --dp-sgd"),
    (["--algorithm", "fedopt", "--server-opt", "adam", "--server-momentum", "0.9"], "and --server-opt sgd"),
    (["--trim", "0.2", "--byzantine", "2"], "--trim only means something with --aggregate trimmed-mean"),
    (["--alpha", "0.3"], "--alpha only means something with --partition dirichlet or quantity"),
    (["--algorithm", "cyclic", "--clients-per-round", "2"], "--clients-per-round only means something with"),
    (["--dp-fedavg", "--max-retries", "3"], "--dp-fedavg sets --max-retries itself"),
    (["--fault-seed", "3"], "--fault-seed only means something with a fault to inject"),
    (["--algorithm", "cyclic", "--max-norm-ratio", "5"], "--max-norm-ratio only means something with"),
    (["--he", "--max-norm-ratio", "5"], "with --he only the layers left out of --he-layers are screened"),
    (["--dp-fedavg", "--max-norm-ratio", "5"], "--dp-fedavg sets --max-norm-ratio itself"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_options_that_would_be_ignored_are_refused(tmp_path, capsys, argv, message):
    d = tmp_path / "run"
    d.mkdir()
    (d / "cli.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        main(["run", "--no-progress", *[a.format(d=d) for a in argv]])
    assert e.value.code == 2 and message.format(d=d) in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--aggregate", "krum", "--byzantine", "10"], ("--aggregate krum cannot aggregate the 8 updates of a round (every client): krum with "
                                                "--byzantine 10 needs more than 2f+2 = 22")),
    (["--aggregate", "trimmed-mean", "--trim", "0.6"], "--trim: must be in [0, 0.5), got 0.6"),
    (["--min-clients", "20"], "--min-clients 20 but the federation has only 8 clients"),
    (["--clients-per-round", "20"], "--clients-per-round 20 but the federation has only 8 clients"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_settings_the_federation_cannot_meet_are_refused_before_the_first_round(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["run", "--no-progress", "--json", "--out", str(tmp_path / "run"), *argv])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and message in err
    assert json.loads(out.splitlines()[-1]) == {"status": "refused", "error": err.splitlines()[0].split("error: ", 1)[1],
                                                "run_dir": str(tmp_path / "run")}
    assert not (tmp_path / "run").exists()  # no failed run directory, no NaN summary


def test_a_failed_run_prints_its_json_summary_too(tmp_path, capsys):
    rc = main(["run", "--crash", "1", "--rounds", "2", "--clients", "2", "--max-retries", "0", "--no-progress", "--json",
               "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    summary = json.loads(out.splitlines()[-1])
    assert rc == 1 and summary["status"] == "failed" and "RoundFailed" in summary["error"]
    assert summary["run_dir"] == str(tmp_path) and "rounds" in summary
    assert err.splitlines()[-2].startswith("fedkit run: error: the run failed: RoundFailed")


@pytest.mark.parametrize("argv, message", [
    (["--he", "--he-layers", "nothing-matches"], "--he-layers pattern 'nothing-matches' matches no"),
    (["--dp-fedavg", "--target-epsilon", "0.0001"], "no noise multiplier reaches epsilon 0.0001"),
], ids=["he layers", "dp budget"])
def test_a_run_refused_as_it_starts_leaves_nothing_behind(tmp_path, capsys, argv, message):
    out = tmp_path / "new" / "run"
    assert main(["run", "--rounds", "1", "--clients", "3", "--no-progress", "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_min_size_reaches_the_partition_and_is_refused_where_it_means_nothing(capsys):
    exp = experiment_from_args(flags("--clients", "300", "--partition", "dirichlet", "--alpha", "0.1", "--min-size", "3"))
    assert exp.data.min_size == 3
    assert min(len(p) for p in exp.data.partition_of(exp.load())) >= 3  # 300 clients: the draw no longer gives up
    with pytest.raises(SystemExit) as e:
        main(["run", "--min-size", "3", "--no-progress"])
    assert e.value.code == 2 and "--min-size only means something with --partition dirichlet or quantity" in \
        capsys.readouterr().err


# ------------------------------------------------------------------------------ one rule, one message: the API's

from pathlib import Path  # noqa: E402

from fedkit.cli.say import flag_namer, in_flag_words  # noqa: E402
from fedkit.cli_flags import check_federation, dest_of  # noqa: E402
from test_cli_fuzz import API_WORDS  # noqa: E402

# flags no object of the API checks: the command's own (output, --resume), switches, the tables the parser's
# choices are the keys of (--algorithm, --aggregate, --weigh-by, --server-opt), and paths
CLI_ONLY = {"help", "out", "json", "no_progress", "overwrite", "resume", "data_root", "download", "adaptive_clip",
            "dp_sgd", "dp_fedavg", "he", "algorithm", "aggregate", "weigh_by", "server_opt",
            "device"}  # checked as the simulator is built, after the data loads: below
# what a flag needs to mean something (else refuse_unused refuses it first)
ENABLE = {"trim": {"aggregate": "trimmed-mean"}, "byzantine": {"aggregate": "krum"}, "mu": {"algorithm": "fedprox"},
          "server_lr": {"algorithm": "fedopt"}, "server_momentum": {"algorithm": "fedopt"},
          "order": {"algorithm": "cyclic"}, "clip_norm": {"dp_fedavg": True}, "sample_rate": {"dp_fedavg": True},
          **{d: {"dp_sgd": True} for d in ("max_grad_norm", "noise_multiplier", "target_epsilon", "delta",
                                           "dp_accountant")},
          **{d: {"he": True} for d in ("he_poly_modulus", "he_coeff_mod_bits", "he_scale_bits", "he_layers")}}
BAD = [0, -1, 0.5, 1.5, 2**63, float("nan"), "bogus", ["("]]  # one of them is bad for each flag's setting


def test_flag_words_are_gone_and_every_setting_the_api_refuses_maps_to_its_flag():
    """No regex rewrites the API's messages (FLAG_WORDS is gone): for every option of `fedkit run`, a bad value
    given past the parser (straight into the namespace the objects are built from) is refused by the API with a
    structured `ConfigError` whose (object, field) the command line maps back to that very flag, and the line it
    prints names the flag and none of the API's words."""
    sources = "\n".join(p.read_text() for p in Path(fk.__file__).parent.rglob("*.py"))
    assert "FLAG_WORDS" not in sources and not re.search(r"\bflag_words\(", sources)
    run = next(a for a in parser()._actions if a.dest == "command").choices["run"]
    unmapped = {}
    for action in run._actions:
        if action.dest in CLI_ONLY or not action.option_strings:
            continue
        refusals = []
        for bad in BAD:
            a = flags(**{})
            vars(a).update(ENABLE.get(action.dest, {}), **{action.dest: bad})
            try:
                check_federation(experiment_from_args(a))
            except fk.ConfigError as e:
                refusals.append(e)
                if any(action.dest in dest_of(owner, field) for owner, field in e.settings):
                    said = in_flag_words(e, flag_namer("run", a))
                    assert action.option_strings[0] in said and not API_WORDS.search(said), (action.dest, said)
                    break
            except Exception:  # noqa: BLE001: a value of the wrong type for this setting; the next one is bad
                continue
        else:
            unmapped[action.dest] = [(e.owner, e.field, str(e)[:80]) for e in refusals]
    assert not unmapped, unmapped
    with pytest.raises(fk.ConfigError) as e:
        fk.train.resolve_device("warp-drive")
    assert dest_of(e.value.owner, e.value.field) == ("device",)
