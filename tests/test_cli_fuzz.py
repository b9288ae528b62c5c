"""A seeded loop of a few hundred bad inputs to `fedkit run` / `fedkit compare` and to the API's entry points.

Each generated input is bad by construction (one to three mutations of a good command, chosen so that none
can cure another). Every one must be refused: exit code 2 (or `ConfigError`, `CheckpointError` from the
API) with a message in the flags' words and a hint, no traceback, and nothing written anywhere, not even
inside ``--out``. Almost all are refused before any data is loaded, so the loop takes seconds.
"""

import functools
import io
import json
import random
import re
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

import fedkit as fk
from fedkit import rundir
from fedkit.checkpoint import CheckpointError
from fedkit.cli import main
from fedkit.experiment import DataSpec, Experiment

SEED, CASES, API_CASES = 20240601, 320, 60
# the API's words, which a refusal on the command line must not use (it speaks flags)
API_WORDS = re.compile(r"\bhe=|\baggregate=|FedAvg\(|\bTrainConfig\.|\bDataSpec\.|\bExperiment\.|\bFaults\.|\bout=|"
                       r"overwrite=True|Simulator\(|\bclients_per_round\b|\bmin_clients\b|\bmax_retries\b")

POSITIVE_INTS = ["clients", "shards-per-client", "rounds", "clients-per-round", "min-clients", "local-epochs",
                 "batch-size", "he-scale-bits"]
NON_NEGATIVE_INTS = ["max-retries", "byzantine"]
SEEDS = ["seed", "fault-seed"]
POSITIVE_FLOATS = ["alpha", "server-lr", "lr", "task-timeout", "max-grad-norm", "clip-norm", "target-epsilon"]
RANGES = {"trim": ["0.5", "0.7", "-0.1", "1"], "momentum": ["1", "1.5", "-0.1"], "server-momentum": ["1", "2", "-1"],
          "delta": ["0", "1", "2", "-1e-5"], "sample-rate": ["0", "1.5", "-0.5"], "mu": ["-1", "-0.01"],
          "noise-multiplier": ["-1", "-0.5"], "max-norm-ratio": ["1", "0.5", "0", "-2", "offf", "no"]}
PROBABILITIES = ["dropout", "crash", "straggle", "corrupt"]
CHOICES = {"dataset": "imagenet", "partition": "random", "algorithm": "fedmagic", "aggregate": "mode",
           "weigh-by": "votes", "model": "resnet", "server-opt": "lamb", "order": "random",
           "dp-accountant": "gdp", "he-poly-modulus": "1000"}
NOT_A_NUMBER = ["abc", "", "nan", "inf", "-inf", "1e400", "0x10", "one", "1,5", "--"]
ENABLERS = {"algorithm", "aggregate", "partition", "dataset", "dp_sgd", "dp_fedavg", "he", "clients", "task_timeout"}


def _dest(flag):
    return flag.lstrip("-").replace("-", "_")


def value_mutation(rng):
    """One flag with a value that is bad whatever else is given: (argv fragment, dests it touches)."""
    kind = rng.randrange(7)
    if kind == 0:
        flag = rng.choice(POSITIVE_INTS)
        value = rng.choice(["0", "-1", "-7", "1.5", "2e3", *NOT_A_NUMBER])
    elif kind == 1:
        flag = rng.choice(NON_NEGATIVE_INTS)
        value = rng.choice(["-1", "-3", "0.5", *NOT_A_NUMBER])
    elif kind == 2:
        flag = rng.choice(SEEDS)
        value = rng.choice(["-1", str(2**63), str(2**70), str(-2**70), "1.0", "1e3", *NOT_A_NUMBER])
    elif kind == 3:
        flag = rng.choice(POSITIVE_FLOATS)
        value = rng.choice(["0", "-1", "-1e-9", "-0.0", *NOT_A_NUMBER])
    elif kind == 4:
        flag = rng.choice(list(RANGES))
        value = rng.choice(RANGES[flag] + ["nan", "inf", "abc"])
    elif kind == 5:
        flag = rng.choice(PROBABILITIES)
        value = rng.choice(["1.5", "-0.1", "2", "nan", "inf", "-inf", "abc"])
    else:
        flag = rng.choice(list(CHOICES))
        value = CHOICES[flag]
    touched = {_dest(flag)} | ({"task_timeout"} if flag == "straggle" else set())
    glued = value.startswith("-") or not value or rng.random() < 0.5  # --flag=value, or --flag value
    return ([f"--{flag}={value}"] if glued else [f"--{flag}", value]), touched


def combination_mutation(rng):
    """Flags that are fine alone but mean nothing, or cannot work, together (items 9 and 13 of the issue)."""
    options = [
        ["--mu", str(rng.choice([0.1, 0.5]))], ["--server-lr", "0.5"], ["--server-opt", "adam"],
        ["--algorithm", "fedopt", "--server-opt", "yogi", "--server-momentum", "0.9"], ["--order", "shuffled"],
        ["--trim", "0.2"], ["--byzantine", str(rng.randint(0, 3))], ["--alpha", "0.3"],
        ["--shards-per-client", "3"], ["--data-root", "/elsewhere"], ["--download"], ["--max-grad-norm", "2"],
        ["--clip-norm", "0.5"], ["--delta", "1e-6"], ["--dp-accountant", "prv"], ["--fault-seed", str(rng.randint(0, 9))],
        ["--algorithm", "cyclic", "--clients-per-round", "2"], ["--algorithm", "cyclic", "--min-clients", "2"],
        ["--algorithm", "cyclic", "--aggregate", "median"], ["--algorithm", "cyclic", "--task-timeout", "30"],
        ["--algorithm", "cyclic", "--weigh-by", "uniform"], ["--dp-fedavg", "--max-retries", "1"],
        ["--algorithm", "cyclic", "--max-norm-ratio", "5"], ["--dp-fedavg", "--max-norm-ratio", "5"],
        ["--he", "--max-norm-ratio", "off"],
        ["--dp-fedavg", "--min-clients", "1"], ["--dp-fedavg", "--aggregate", "median"],
        ["--dp-fedavg", "--weigh-by", "samples"], ["--dp-fedavg", "--clients-per-round", "2"],
        ["--dp-sgd", "--dp-fedavg"], ["--dp-fedavg", "--delta", rng.choice(["0.34", "0.5", "0.9"])],  # >= 1/3 clients
        ["--dp-sgd", "--delta", rng.choice(["0.1", "0.5"])], ["--noise-multiplier", "1"],  # >= 1/(a client's examples) ["--target-epsilon", "3"], ["--sample-rate", "0.5"],
        ["--adaptive-clip"], ["--dp-sgd", "--sample-rate", "0.5"], ["--dp-sgd", "--algorithm", "cyclic"],
        ["--he-layers", "fc2.*"], ["--he-scale-bits", "30"], ["--he", "--algorithm", "fedopt"],
        ["--he", "--algorithm", "scaffold"], ["--he", "--aggregate", "median"], ["--he", "--dp-fedavg"],
        ["--he", "--he-coeff-mod-bits", "60,x,60"], ["--he", "--he-poly-modulus", "4096"],
        ["--straggle", "0.2"], ["--dropout", "0.6", "--crash", "0.6"],
        ["--clients-per-round", str(rng.randint(4, 40))], ["--min-clients", str(rng.randint(4, 40))],
        ["--clients-per-round", "2", "--min-clients", "3"],
        ["--aggregate", rng.choice(["krum", "multi-krum"]), "--byzantine", str(rng.randint(1, 12))],
        ["--clients", "5000"], ["--partition", "shards", "--clients", "800", "--shards-per-client", "3"],
        ["--model", "simple"], ["--device", rng.choice(["warp-drive", "gpu", "tpu:0"])],
    ]
    fragment = rng.choice(options)
    return fragment, {_dest(a) for a in fragment if a.startswith("--")} | ENABLERS


def unknown_mutation(rng):
    fragment = rng.choice([["--rond", "3"], ["--lr-rate", "0.1"], ["--clientz", "4"], ["extra"], ["--dp"],
                           ["--he-"], ["-x"], ["--=1"], ["--rounds"]])
    return fragment, {"unknown"}


class Tree:
    """What a directory holds, to assert that a refusal wrote nothing."""

    def __init__(self, root):
        self.root = root

    def snapshot(self):
        return sorted((str(p.relative_to(self.root)), p.is_dir()) for p in self.root.rglob("*"))


@pytest.fixture
def sandbox(tmp_path, monkeypatch, digits):
    """A working directory (default paths land here) with the run directories the cases point at."""
    root = tmp_path / "sandbox"
    (root / "cwd").mkdir(parents=True)
    monkeypatch.chdir(root / "cwd")
    (root / "a-file").write_text("not a directory")
    done = root / "done"
    Experiment.preset("smoke", workflow=fk.FedAvg(rounds=1)).simulator(out=done, data=digits).run(progress=False)
    saved = {"rounds": 1, "clients": 3}
    (done / "cli.json").write_text(json.dumps(saved))
    for name, text in [("list", "[]"), ("string", '"x"'), ("number", "3"), ("null", "null"), ("broken", "{"),
                       ("empty", ""), ("binary", "\udcff")]:
        (root / name).mkdir()
        (root / name / "cli.json").write_text(text, errors="surrogateescape")
    (root / "no-checkpoint").mkdir()
    (root / "no-checkpoint" / "cli.json").write_text(json.dumps(saved))
    busy = root / "busy"
    lock = rundir.claim(busy)
    yield root
    lock.release()


def resume_case(rng, root):
    """A --resume that must be refused: a damaged cli.json, or flags a resume cannot take."""
    kind = rng.randrange(5)
    if kind == 0:
        return ["run", "--resume", str(root / rng.choice(["list", "string", "number", "null", "broken", "empty",
                                                          "binary", "nowhere", "a-file", "no-checkpoint"]))]
    if kind == 1:  # a dict with one bad value, or a setting nobody knows
        key, value = rng.choice([("rounds", "x"), ("rounds", 0), ("rounds", True), ("clients", -1), ("clients", 2.5),
                                 ("algorithm", "magic"), ("dp_sgd", "yes"), ("he_layers", "fc2"), ("seed", -1),
                                 ("seed", 2**70), ("lr", "fast"), ("lr", None), ("partition", None), ("bogus", 1),
                                 ("alpha", [0.5]), ("trim", {"x": 1}), ("mu", float("nan"))])
        d = root / f"damaged-{rng.randrange(10**9)}"
        d.mkdir()
        (d / "cli.json").write_text(json.dumps({"rounds": 1, key: value}))
        return ["run", "--resume", str(d)]
    extra = rng.choice([["--rounds", "5"], ["--mu", "0.1"], ["--out", str(root / "other")], ["--overwrite"],
                        ["--rounds", "10"], ["--algorithm", "fedavg"], ["--seed", "0"]])
    return ["run", "--resume", str(root / "done"), *extra]


def out_case(rng, root):
    out = rng.choice([root / "a-file", root / "a-file" / "sub", Path("/proc/fedkit-fuzz"), root / "done",
                      root / "busy"])
    return ["run", "--no-progress", "--clients", "3", "--rounds", "1", "--out", str(out)]


def generated(rng, root, i):
    """The i-th bad command line."""
    kind = rng.random()
    if kind < 0.12:
        return resume_case(rng, root)
    if kind < 0.2:
        return out_case(rng, root)
    compare = kind > 0.9
    # no fedprox, fedopt or cyclic: their options must mean nothing here too
    base = ["compare", "--algorithms", rng.choice(["fedavg,scaffold", "scaffold"])] if compare else ["run"]
    base += ["--no-progress", "--clients", "3", "--rounds", "1", "--out", str(root / "runs" / f"case-{i}")]
    touched, fragments = set(), []
    makers = [value_mutation] * 5 + [combination_mutation] * 4 + [unknown_mutation]
    for _ in range(rng.choice([1, 1, 2, 3])):
        for _attempt in range(20):
            fragment, dests = rng.choice(makers)(rng)
            if compare and "algorithm" in dests:
                continue  # compare takes --algorithms
            if not dests & touched:
                fragments.append(fragment)
                touched |= dests
                break
    if rng.random() < 0.3:
        base.append("--json")
    return base + [a for f in fragments for a in f]


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def test_bad_command_lines_exit_2_with_a_message_and_write_nothing(sandbox, monkeypatch):
    monkeypatch.setattr(fk.Simulator, "_blocking", lambda *a, **k: pytest.fail(f"a bad command line trained: {a}"))
    rng = random.Random(SEED)
    tree = Tree(sandbox)
    kinds = {}
    for i in range(CASES):
        argv = generated(rng, sandbox, i)
        before = tree.snapshot()
        code, out, err = run_cli(argv)
        where = f"case {i}: fedkit {' '.join(argv)}\n{err}"
        assert code == 2, where
        lines = err.strip().splitlines()
        assert len(lines) == 2 and re.match(r"fedkit( run| compare)?: error: \S", lines[0]), where
        assert lines[1].startswith("hint: ") and len(lines[1]) > 10, where
        assert "Traceback" not in err and not API_WORDS.search(lines[0]) and "---" not in lines[0], where
        if "--json" in argv:
            summary = json.loads(out.strip().splitlines()[-1])
            assert summary["status"] == "refused" and summary["error"], where
        after = [p for p in tree.snapshot() if not p[0].startswith("damaged-")]
        assert after == [p for p in before if not p[0].startswith("damaged-")], f"{where}\nwrote: {set(after) - set(before)}"
        kinds[lines[0].split(": error: ")[1][:25]] = kinds.get(lines[0].split(": error: ")[1][:25], 0) + 1
    assert len(kinds) > 60  # the loop reached many different refusals, not one over and over


def _bad_api_calls(rng, digits, out):
    """Calls of the API's entry points with a bad setting each, and the error type each must raise."""
    parts = fk.data.iid(digits.train, clients=3, seed=0)

    def sim(workflow=None, **kw):
        return fk.Simulator(workflow or fk.FedAvg(rounds=1), model=lambda: fk.models.for_data(digits),
                            **{"clients": parts, **kw})

    shared = fk.models.for_data(digits)
    calls = [
        lambda: DataSpec(clients=rng.choice([0, -1, 2.5, "8", True])),
        lambda: DataSpec(alpha=rng.choice([0, -1, float("nan"), float("inf"), "0.5"])),
        lambda: DataSpec(partition=rng.choice(["random", "", None, 3])),
        lambda: DataSpec(dataset=rng.choice(["imagenet", None, 3])),
        lambda: Experiment(seed=rng.choice([-1, 2**63, 2**70, 1.5, "0", True])),
        lambda: Experiment(model=rng.choice(["resnet", None])),
        lambda: Experiment(workflow=rng.choice(["fedavg", None, 3])),
        lambda: Experiment.preset(rng.choice(["huge", ""])),
        lambda: fk.FedAvg(rounds=rng.choice([0, -1, 1.5, "10", None, True])),
        lambda: fk.FedAvg(clients_per_round=rng.choice([0, -2, 1.5, "3"])),
        lambda: fk.FedAvg(min_clients=rng.choice([0, -1, "2"])),
        lambda: fk.FedAvg(clients_per_round=2, min_clients=3),
        lambda: fk.FedAvg(max_retries=rng.choice([-1, 0.5])),
        lambda: fk.TrainConfig(lr=rng.choice([0, -1, float("nan")])),
        lambda: fk.TrainConfig(batch_size=rng.choice([0, -1, 1.5])),
        lambda: fk.Faults(dropout=rng.choice([-1, 1.5, float("nan"), float("inf"), "0.1", None])),
        lambda: fk.Faults(seed=rng.choice([-1, 2**63, 1.5])),
        lambda: sim(seed=rng.choice([-1, 2**63, 2**70, 1.5])),
        lambda: sim(out=rng.choice([3, 4.5, ["x"]])),
        lambda: sim(overwrite=rng.choice(["yes", 1, None])),
        lambda: sim(fk.FedAvg(rounds=1, clients_per_round=rng.randint(4, 30)), out=out / "x").run(progress=False),
        lambda: sim(fk.FedAvg(rounds=1, min_clients=rng.randint(4, 30)), out=out / "x").run(progress=False),
        lambda: sim(fk.FedAvg(rounds=1, aggregate=functools.partial(fk.aggregate.krum, f=rng.randint(1, 9))),
                    out=out / "x").run(progress=False),
        lambda: sim(fk.FedAvg(rounds=1, aggregate=functools.partial(fk.aggregate.trimmed_mean,
                                                                    beta=rng.choice([0.5, 0.9, -0.1]))),
                    out=out / "x").run(progress=False),
        lambda: sim(out=out / "a-file").run(progress=False),
        lambda: sim(out=out / "a-file" / "sub").run(progress=False),
        lambda: fk.export.nvflare(Experiment.preset("smoke"), rng.choice([".", "..", out / "done", out / "a-file"]),
                                  overwrite=rng.choice([True, False])),  # folders an export must not replace
        lambda: sim(out=out / "done").run(progress=False),
        lambda: sim(out=out / "busy").run(progress=False),
        lambda: sim(out=out / "busy").resume(progress=False),
        lambda: sim(out=out / "nowhere").resume(progress=False),
        lambda: sim(fk.FedAvg(rounds=2), out=out / "done").resume(progress=False),  # not the settings of that run
        # issue 18 items 8 and 9: refused when the Simulator is built, so nothing is written into out
        lambda: sim(clients=[_labelled(parts[0], rng.choice([-100, 10, 12])), *parts[1:]], out=out / "x").run(progress=False),
        lambda: sim(clients=[_labelled(parts[0], 0, rng.choice([torch.int32, torch.float32])), *parts[1:]],
                    out=out / "x").run(progress=False),
        lambda: sim(test=_labelled(digits.test, rng.choice([-100, 10])), out=out / "x").run(progress=False),
        lambda: sim(test=fk.Dataset(digits.test.x * rng.choice([float("nan"), float("inf")]), digits.test.y, 10),
                    out=out / "x").run(progress=False),
        lambda: sim(clients=[parts[0].subset([0, 1]), *parts[1:]], val_fraction=rng.choice([0.75, 0.9]),
                    out=out / "x").run(progress=False),
        lambda: sim(clients=[fk.data.ClientData(p.subset([]), p) for p in parts], out=out / "x").run(progress=False),
        lambda: fk.Simulator(fk.FedAvg(rounds=1), model=lambda: shared, clients=parts, out=out / "x").run(progress=False),
        lambda: sim(type("Mine", (fk.Controller,), {"rounds": rng.choice(["three", True, -1, 2.5]),
                                                    "control_flow": lambda self, fl: None})(), out=out / "x").run(progress=False),
    ]
    return calls


def _labelled(d, value, dtype=None):
    """``d`` with its first label set to ``value`` (and all labels cast to ``dtype``)."""
    y = d.y.clone()
    y[0] = value
    return fk.Dataset(d.x, y if dtype is None else y.to(dtype), d.num_classes)


def test_bad_api_calls_raise_config_errors_and_write_nothing(sandbox, digits):
    rng = random.Random(SEED + 1)
    tree = Tree(sandbox)
    calls = _bad_api_calls(rng, digits, sandbox)
    for i in range(API_CASES):
        call = calls[i % len(calls)] if i < len(calls) else rng.choice(calls)
        before = tree.snapshot()
        with pytest.raises((fk.ConfigError, CheckpointError)) as e:
            call()
        assert str(e.value).strip(), f"call {i}: an error without a message"
        assert tree.snapshot() == before, f"call {i} ({e.value}) wrote {set(tree.snapshot()) - set(before)}"


def export_folder_cases(root):
    """`fedkit export nvflare` pointed at folders it must neither write nor delete, from ``root/cwd``."""
    mine = root / "mine"  # a user's work: a notebook and its data
    mine.mkdir()
    (mine / "notebook.ipynb").write_text("{}")
    (mine / "data.csv").write_text("x\n1\n")
    flags = ["--clients", "2", "--rounds", "1"]
    return [["--out", "."], ["--out", ".", "--overwrite"], ["--out", ".."], ["--out", "..", "--overwrite"],
            ["--out", "../mine", "--overwrite"], ["--out", str(mine), "--overwrite", "--json"],
            ["--out", "../a-file", "--overwrite"], ["--out", "../done", "--overwrite"], ["--out", "", "--overwrite"]], flags


def test_export_into_a_folder_it_did_not_write_exits_2_and_deletes_nothing(sandbox, monkeypatch):
    monkeypatch.setattr("fedkit.export.nvflare_job.shutil.rmtree", lambda *a, **k: pytest.fail(f"rmtree{a}"))
    tree = Tree(sandbox)
    cases, flags = export_folder_cases(sandbox)
    for out in cases:
        argv = ["export", "nvflare", *out, *flags]
        before = tree.snapshot()
        code, stdout, err = run_cli(argv)
        where = f"fedkit {' '.join(argv)}\n{err}"
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 2 and lines[0].startswith("fedkit export nvflare: error: "), where
        assert lines[1].startswith("hint: choose another --out") and "Traceback" not in err, where
        assert "nothing was" in lines[0] and not API_WORDS.search(lines[0]), where
        if "--json" in argv:
            assert json.loads(stdout.strip().splitlines()[-1])["status"] == "refused", where
        assert tree.snapshot() == before, where
