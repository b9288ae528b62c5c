"""Checkpoints and resume: a run killed after round k and resumed ends with the same weights."""

import hashlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import fedkit as fk
from interrupts import interrupted, stop_after  # noqa: E402
from fedkit import checkpoint
from fedkit.data import ClientData


def digits_sim(digits, out, rounds=6, lr=0.05, faults=None, on_round=(), model=None, engine="sequential"):
    parts = fk.data.dirichlet(digits.train, clients=4, alpha=0.5, seed=0)
    return fk.Simulator(fk.FedAvg(rounds=rounds, min_clients=2), model=model or (lambda: fk.models.for_data(digits)),
                        clients=parts, test=digits.test, train=fk.TrainConfig(lr=lr), seed=0, out=out, faults=faults,
                        on_round=list(on_round), engine=engine)


def test_every_round_leaves_a_verified_checkpoint(digits, tmp_path):
    run = digits_sim(digits, tmp_path / "r", rounds=3).run(progress=False)
    manifest = json.loads((tmp_path / "r" / "checkpoints" / "latest.json").read_text())
    assert manifest["round"] == 2 and manifest["dir"] == "round-00002"
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["latest.json", "round-00002"]
    ckpt = checkpoint.load(tmp_path / "r")
    assert fk.weights.sha256(ckpt.weights) == run.model_sha256
    assert ckpt.history.series("accuracy") == run.history.series("accuracy")


@pytest.mark.parametrize("faults", [None, fk.Faults(crash=0.2, corrupt=0.2, seed=5)], ids=["clean", "faulty"])
def test_interrupted_and_resumed_equals_uninterrupted(digits, tmp_path, faults):
    whole = digits_sim(digits, tmp_path / "whole", faults=faults).run(progress=False)
    cut = interrupted(digits_sim(digits, tmp_path / "cut", faults=faults, on_round=[stop_after(2)]))
    assert cut.status == "aborted" and len(cut.history) == 3
    assert checkpoint.load(tmp_path / "cut").round == 2
    resumed = digits_sim(digits, tmp_path / "cut", faults=faults).resume(progress=False)
    assert resumed.status == "done" and len(resumed.history) == 6
    assert resumed.model_sha256 == whole.model_sha256
    assert not [e for e in resumed.history.events if e["what"] == "engine_changed"]  # the same engine: nothing to say
    assert resumed.history.series("accuracy") == pytest.approx(whole.history.series("accuracy"))


def test_abort_keeps_the_last_completed_round_checkpointed(digits, tmp_path):
    sim = digits_sim(digits, tmp_path / "r", rounds=50)
    run = sim.start()
    while len(run.history) < 2:
        time.sleep(0.01)
    run.abort()
    run.wait(30)
    assert run.status == "aborted"
    ckpt = checkpoint.load(tmp_path / "r")
    assert ckpt.round == len(run.history) - 1
    assert fk.weights.sha256(ckpt.weights) == run.model_sha256


def test_client_state_survives_a_resume(tmp_path, tiny_model):
    seen = []

    def counting(task, ctx, abort):
        ctx.state["calls"] = ctx.state.get("calls", 0) + 1
        ctx.state["_cache"] = object()  # a cache: never checkpointed
        seen.append(ctx.state["calls"])
        return fk.DXO("WEIGHT_DIFF", {k: torch.zeros_like(v) for k, v in task.data.data.items()}, {"num_samples": 1})

    d = fk.Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 2)

    def sim(on_round=()):
        return fk.Simulator(fk.FedAvg(rounds=4), model=tiny_model, clients=[fk.Client("a", ClientData(d, d), {"train": counting})],
                            out=tmp_path, on_round=list(on_round))

    interrupted(sim([stop_after(1)]))
    sim().resume(progress=False)
    assert seen == [1, 2, 3, 4]


def test_state_that_cannot_be_checkpointed_is_named(tmp_path, tiny_model):
    def messy(task, ctx, abort):
        ctx.state["optimizer"] = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        return fk.DXO("WEIGHT_DIFF", {k: torch.zeros_like(v) for k, v in task.data.data.items()}, {"num_samples": 1})
    d = fk.Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 2)
    sim = fk.Simulator(fk.FedAvg(rounds=1), model=tiny_model, clients=[fk.Client("a", ClientData(d, d), {"train": messy})],
                       out=tmp_path)
    with pytest.raises(fk.CheckpointError, match="client 'a' keeps a SGD in its state at 'optimizer'.*leading '_'"):
        sim.run(progress=False)


def test_resume_refuses_other_settings(digits, tmp_path):
    digits_sim(digits, tmp_path, rounds=2).run(progress=False)
    with pytest.raises(fk.CheckpointError, match="other settings"):
        digits_sim(digits, tmp_path, rounds=2, lr=0.1).resume(progress=False)


class ActNet(torch.nn.Module):
    """The digits MLP with its activation a module: ``ActNet(nn.ReLU())`` and ``ActNet(nn.Tanh())`` hold the same
    parameters (names, shapes, initial values), and compute different things."""

    def __init__(self, act):
        super().__init__()
        self.fc1, self.act, self.fc2 = torch.nn.Linear(64, 32), act, torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x.flatten(1))))


def functional_net(activation):
    """A class Net whose forward calls its activation as a function, as a notebook cell that is edited defines it."""
    if activation == "relu":
        class Net(ActNet):
            def forward(self, x):
                return self.fc2(torch.relu(self.fc1(x.flatten(1))))
    else:
        class Net(ActNet):
            def forward(self, x):
                return self.fc2(torch.tanh(self.fc1(x.flatten(1))))
    return lambda: Net(None)


@pytest.mark.parametrize("relu, tanh, said", [
    (lambda: ActNet(torch.nn.ReLU()), lambda: ActNet(torch.nn.Tanh()),
     r"the model \(its modules: '\(act\): ReLU\(\)' then, '\(act\): Tanh\(\)' now\)"),
    (functional_net("relu"), functional_net("tanh"), r"the model \(the code of functional_net.<locals>.Net.forward\)"),
], ids=["module", "functional"])
def test_resume_refuses_a_model_of_another_architecture_with_the_same_shapes(digits, tmp_path, relu, tanh, said):
    whole = digits_sim(digits, tmp_path / "whole", rounds=3, model=relu).run(progress=False)
    interrupted(digits_sim(digits, tmp_path / "cut", rounds=3, model=relu, on_round=[stop_after(0)]))
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert config["model"] == fk.models.architecture(relu())  # recorded
    with pytest.raises(fk.CheckpointError, match=said + r".*build the Simulator as it was, or start a new run"):
        digits_sim(digits, tmp_path / "cut", rounds=3, model=tanh).resume(progress=False)
    resumed = digits_sim(digits, tmp_path / "cut", rounds=3, model=relu).resume(progress=False)  # nothing was lost
    assert resumed.model_sha256 == whole.model_sha256


def test_resume_of_a_run_that_did_not_record_its_model_says_so(finished):
    """A run of an older fedkit (no ``model`` in config.json, another fingerprint): refused, and why."""
    run_dir, _ = finished
    config = json.loads((run_dir / "config.json").read_text())
    del config["model"]
    (run_dir / "config.json").write_text(json.dumps(config))
    manifest = _manifest(run_dir)
    _write_manifest(run_dir, {**manifest, "fingerprint": "0" * 64})
    with pytest.raises(fk.CheckpointError, match=r"these differ: the model \(not recorded by the fedkit that started"):
        digits_sim(fk.data.load("digits"), run_dir, rounds=2).resume(progress=False)


def test_resume_on_another_engine_runs_and_warns_that_the_bits_differ(digits, tmp_path):
    """Allowed (engines agree to float rounding; a run may go on where its engine is missing), and said: a Python
    warning and an event in the run's history, and config.json names the engine the rounds from there ran on."""
    whole = digits_sim(digits, tmp_path / "whole", rounds=3).run(progress=False)
    interrupted(digits_sim(digits, tmp_path / "cut", rounds=3, on_round=[stop_after(0)]))
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["engine"] == "sequential"
    with pytest.warns(UserWarning, match=r"ran on engine 'sequential' and resumes on 'vectorized'.* can differ from an "
                                         r"uninterrupted run's .*resume with engine='sequential' to get the same bits"):
        resumed = digits_sim(digits, tmp_path / "cut", rounds=3, engine="vectorized").resume(progress=False)
    assert resumed.status == "done" and resumed.summary()["engine"] == "vectorized"
    for k, v in whole.weights.items():
        torch.testing.assert_close(resumed.weights[k], v, atol=1e-5, rtol=0)
    [event] = [e for e in resumed.history.events if e["what"] == "engine_changed"]
    assert event["round"] == 1 and "model_sha256 will not match" in event["reason"]
    assert event in checkpoint.load(tmp_path / "cut").history.events  # in history.jsonl, kept by the next checkpoint
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["engine"] == "vectorized"


def test_missing_checkpoint_never_starts_from_scratch(digits, tmp_path):
    with pytest.raises(fk.CheckpointError, match="no checkpoint in .*nothing to resume"):
        digits_sim(digits, tmp_path / "nowhere").resume(progress=False)
    assert not (tmp_path / "nowhere" / "model.pt").exists()


@pytest.fixture
def finished(digits, tmp_path):
    digits_sim(digits, tmp_path, rounds=2).run(progress=False)
    return tmp_path, tmp_path / "checkpoints" / "round-00001"


def test_flipped_bytes_are_detected(finished):
    run_dir, folder = finished
    data = bytearray((folder / "server" / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "server" / "model.pt").write_bytes(bytes(data))
    with pytest.raises(fk.CheckpointError, match="model.pt is corrupted or truncated"):
        checkpoint.load(run_dir)


def test_truncated_files_are_detected(finished):
    run_dir, folder = finished
    (folder / "clients" / "site-1.pt").write_bytes((folder / "clients" / "site-1.pt").read_bytes()[:10])
    with pytest.raises(fk.CheckpointError, match="site-1.pt is corrupted or truncated"):
        checkpoint.load(run_dir)
    latest = run_dir / "checkpoints" / "latest.json"
    latest.write_text(latest.read_text()[:25])
    with pytest.raises(fk.CheckpointError, match="latest.json is corrupted or truncated"):
        checkpoint.load(run_dir)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_checkpoint_cannot_run_code(finished, monkeypatch):
    run_dir, folder = finished
    monkeypatch.chdir(run_dir)
    evil = pickle.dumps(_Exploit())
    (folder / "server" / "model.pt").write_bytes(evil)
    latest = run_dir / "checkpoints" / "latest.json"
    manifest = json.loads(latest.read_text())
    manifest["files"]["server/model.pt"] = hashlib.sha256(evil).hexdigest()  # even with a matching hash
    latest.write_text(json.dumps(manifest))
    with pytest.raises(fk.CheckpointError, match="could not be read safely"):
        checkpoint.load(run_dir)
    assert not (run_dir / "pwned").exists()


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "fedkit", "run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_mid_run_then_resume_gives_the_same_model(tmp_path):
    args = ["--partition", "dirichlet", "--alpha", "0.5", "--rounds", "40", "--local-epochs", "2",
            "--dropout", "0.1", "--crash", "0.05", "--min-clients", "4", "--json", "--no-progress"]
    victim = _cli(*args, "--out", str(tmp_path / "killed"))
    latest = tmp_path / "killed" / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if json.loads(latest.read_text())["round"] >= 3:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    killed_at = json.loads(latest.read_text())["round"]
    assert 3 <= killed_at < 39, "the run must really have been cut short"

    resumed = subprocess.run([sys.executable, "-m", "fedkit", "run", "--resume", str(tmp_path / "killed"), "--json",
                              "--no-progress"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    reference = subprocess.run([sys.executable, "-m", "fedkit", "run", *args, "--out", str(tmp_path / "whole")],
                               capture_output=True, text=True, timeout=300)
    a = json.loads(resumed.stdout.strip().splitlines()[-1])
    b = json.loads(reference.stdout.strip().splitlines()[-1])
    assert a["rounds"] == b["rounds"] == 40
    assert a["model_sha256"] == b["model_sha256"]
    assert a["failures"] == b["failures"] > 0


@pytest.mark.parametrize("args, message", [
    (["--resume", "/nonexistent/run"], "has no cli.json"),
    (["--straggle", "0.1"], "--straggle > 0 needs a deadline: add --task-timeout SECONDS"),
    (["--dropout", "1.5"], "dropout is a probability"),
])
def test_cli_fault_and_resume_errors(args, message, capsys):
    from fedkit.cli import main
    with pytest.raises(SystemExit) as e:
        main(["run", "--no-progress", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_cli_resume_of_a_corrupted_run_exits_2(tmp_path, capsys):
    from fedkit.cli import main
    assert main(["run", "--rounds", "2", "--clients", "2", "--no-progress", "--out", str(tmp_path)]) == 0
    (tmp_path / "checkpoints" / "round-00001" / "server" / "model.pt").write_bytes(b"junk")
    assert main(["run", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert "corrupted or truncated" in capsys.readouterr().err


WORKFLOWS = {
    "fedopt-adam": lambda: fk.FedOpt(rounds=5, server_opt=fk.server_opt.Adam(lr=0.01)),
    "scaffold": lambda: fk.SCAFFOLD(rounds=5),
    "fedprox": lambda: fk.FedProx(rounds=5, mu=0.1),
    "scaling-then-fedavg": lambda: fk.workflows.Chain(fk.workflows.FederatedScaling(), fk.FedAvg(rounds=5)),
    "cyclic": lambda: fk.workflows.Cyclic(rounds=5, order="shuffled"),
}


@pytest.mark.parametrize("name", list(WORKFLOWS))
def test_stateful_workflows_resume_exactly(digits, tmp_path, name):
    """Server state (optimizer moments, SCAFFOLD's c), client state (c_i, scaling) all survive a resume."""
    parts = fk.data.dirichlet(digits.train, clients=4, alpha=0.3, seed=0)

    def sim(out, on_round=()):
        return fk.Simulator(WORKFLOWS[name](), model=lambda: fk.models.for_data(digits), clients=parts,
                            train=fk.TrainConfig(epochs=2), seed=0, out=out, on_round=list(on_round))

    whole = sim(tmp_path / "whole").run(progress=False)
    cut = interrupted(sim(tmp_path / "cut", [stop_after(1)]))
    assert cut.status == "aborted"
    ckpt = checkpoint.load(tmp_path / "cut")
    if name == "fedopt-adam":
        assert any(k.startswith("m/") for k in ckpt.server_state["server_opt"])
    if name == "scaffold":
        assert "scaffold_c" in ckpt.server_state and all("scaffold_ci" in s for s in ckpt.client_states.values())
    if name == "scaling-then-fedavg":
        assert all("standardize" in s for s in ckpt.client_states.values())
    resumed = sim(tmp_path / "cut").resume(progress=False)
    assert resumed.model_sha256 == whole.model_sha256


# ---- checkpoints trusted no further than they are checked

def _ones(task, ctx, abort):
    ctx.state["calls"] = ctx.state.get("calls", 0) + 1
    return fk.DXO("WEIGHT_DIFF", {k: torch.full_like(v, 0.5) for k, v in task.data.data.items()}, {"num_samples": 1})


def tiny_sim(out, model, rounds=3, on_round=(), **kw):
    d = fk.Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 2)
    clients = [fk.Client(name, ClientData(d, d), {"train": _ones}) for name in ("a", "b")]
    return fk.Simulator(fk.FedAvg(rounds=rounds), model=model, clients=clients, out=out, on_round=list(on_round), **kw)


@pytest.fixture
def tiny_run(tmp_path, tiny_model):
    """A 3-round run cut after round 1 (checkpoint of round 1), and how to build its simulator again."""
    interrupted(tiny_sim(tmp_path, tiny_model, on_round=[stop_after(1)]))
    return tmp_path, lambda **kw: tiny_sim(tmp_path, tiny_model, **kw)


def _manifest(run_dir):
    return json.loads((run_dir / "checkpoints" / "latest.json").read_text())


def _write_manifest(run_dir, manifest):
    (run_dir / "checkpoints" / "latest.json").write_text(json.dumps(manifest))


def _replace_file(run_dir, fname, data: bytes):
    """Put ``data`` in the checkpoint as ``fname``, with a matching SHA-256 in latest.json."""
    m = _manifest(run_dir)
    (run_dir / "checkpoints" / m["dir"] / fname).write_bytes(data)
    m["files"][fname] = hashlib.sha256(data).hexdigest()
    _write_manifest(run_dir, m)


def _torch_bytes(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _move_to_round(run_dir, rnd):
    """Make latest.json say ``rnd`` (folder renamed to match): a checkpoint whose round disagrees with its history."""
    m = _manifest(run_dir)
    (run_dir / "checkpoints" / m["dir"]).rename(run_dir / "checkpoints" / f"round-{rnd:05d}")
    m["round"], m["dir"] = rnd, f"round-{rnd:05d}"
    _write_manifest(run_dir, m)


@pytest.mark.parametrize("rnd", [6, 100, 0])
def test_a_round_the_history_does_not_end_with_is_refused(tiny_run, rnd):
    run_dir, sim = tiny_run
    _move_to_round(run_dir, rnd)
    with pytest.raises(fk.CheckpointError, match=f"says round {rnd} was the last completed, but the checkpoint's "
                                                 "history ends with round 1"):
        checkpoint.load(run_dir)
    with pytest.raises(fk.CheckpointError, match="inconsistent"):
        sim().resume(progress=False)  # neither a wrong model nor "done" without training


@pytest.mark.parametrize("change, message", [
    (dict(round=-5, dir="round--0005"), "last completed round is -5; a round is an integer >= 0"),
    (dict(round="1"), "last completed round is '1'"),
    (dict(round=True), "last completed round is True"),
    (dict(dir="../../elsewhere"), "names the folder '../../elsewhere' for round 1; that round's folder is 'round-00001'"),
    (dict(dir="round-00000"), "names the folder 'round-00000' for round 1"),
    (dict(files=[]), "lists the files"),
    (dict(fingerprint=None), "has no fingerprint"),
    (dict(history={"bytes": "x"}), "describes the history"),
    (dict(format=99), "has format 99; this fedkit reads formats 1, 2, 3"),
    (dict(clients={"a": "clients/../../x.pt", "b": "clients/b.pt"}), "lists the clients' files as"),
    (dict(clients={"a": "clients/a.pt", "b": "clients/a.pt"}), "a distinct file under clients/ for each client"),
    (dict(clients=None), "lists the clients' files as None"),
])
def test_a_malformed_latest_json_is_refused(tiny_run, change, message):
    run_dir, _ = tiny_run
    _write_manifest(run_dir, {**_manifest(run_dir), **change})
    with pytest.raises(fk.CheckpointError, match=re.escape(message)):
        checkpoint.load(run_dir)


@pytest.mark.parametrize("fname, obj, message", [
    ("server/model.pt", [1.0, 2.0], "model.pt does not hold a model's weights (a dict of names to tensors) but a list"),
    ("server/model.pt", {"weight": 3}, "model.pt does not hold a model's weights (a dict of names to tensors) but a dict of "
                                       "str -> int"),
    ("server/model.pt", {1: torch.ones(1, 1)}, "model.pt does not hold a model's weights"),
    ("server/state.pt", [torch.ones(1)], "state.pt does not hold the server's state (a dict with string keys) but a list"),
    ("clients/a.pt", 5, "clients/a.pt does not hold client 'a''s state (a dict with string keys) but a int"),
    ("clients/b.pt", torch.ones(2), "clients/b.pt does not hold client 'b''s state"),
])
def test_correctly_hashed_but_malformed_tensors_are_refused(tiny_run, fname, obj, message):
    run_dir, sim = tiny_run
    _replace_file(run_dir, fname, _torch_bytes(obj))
    with pytest.raises(fk.CheckpointError, match=re.escape(message)):
        checkpoint.load(run_dir)
    with pytest.raises(fk.CheckpointError, match=re.escape(message)):
        sim().resume(progress=False)


def test_client_states_must_be_the_federations_clients(tiny_run):
    run_dir, sim = tiny_run
    m = _manifest(run_dir)
    m["clients"] = {"a": "clients/a.pt", "mallory": "clients/b.pt"}
    _write_manifest(run_dir, m)
    with pytest.raises(fk.CheckpointError, match=r"holds the states of clients \['a', 'mallory'\], but this "
                                                 r"federation's clients are \['a', 'b'\]"):
        sim().resume(progress=False)
    with pytest.raises(fk.CheckpointError, match="holds the states of clients"):
        checkpoint.load(run_dir, clients=["a", "b"])


def test_a_model_of_other_shapes_is_refused(tiny_run):
    run_dir, sim = tiny_run
    _replace_file(run_dir, "server/model.pt", _torch_bytes({"weight": torch.ones(3, 3)}))
    assert checkpoint.load(run_dir).weights["weight"].shape == (3, 3)  # well-formed on its own...
    with pytest.raises(fk.CheckpointError, match="does not fit this simulator's model.*shape"):
        sim().resume(progress=False)  # ...but not this model's


def _rewrite_log(run_dir, edit):
    """Rewrite the checkpointed part of history.jsonl with ``edit(lines)``, and latest.json to match it."""
    m = _manifest(run_dir)
    log = run_dir / "history.jsonl"
    lines = log.read_bytes()[:m["history"]["bytes"]].decode().splitlines()
    data = ("\n".join(edit(lines)) + "\n").encode()
    log.write_bytes(data)
    m["history"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    _write_manifest(run_dir, m)


@pytest.mark.parametrize("edit, message", [
    (lambda ls: [ls[0], ls[1].replace('"round":0', '"round":"zero"'), *ls[2:]], "round must be an integer >= 0"),
    (lambda ls: [ls[0], ls[1].replace('"metrics":', '"metrics":[],"x":'), *ls[2:]], "must have the keys round"),
    (lambda ls: [ls[0], '{"round": [1, 2]}', *ls[2:]], "must be an object"),
    (lambda ls: [ls[0], '{"gossip": 1}', *ls[1:]], "must hold one of round, event, results"),
    (lambda ls: [ls[0], "not json", *ls[1:]], "is not JSON"),
    (lambda ls: ['{"something": "else"}', *ls[1:]], "does not start with a fedkit history header"),
    (lambda ls: ls[:2], "hold 1 round(s)"),  # a well-formed history shorter than latest.json says
])
def test_a_correctly_hashed_but_malformed_history_is_refused(tiny_run, edit, message):
    run_dir, sim = tiny_run
    _rewrite_log(run_dir, edit)
    with pytest.raises(fk.CheckpointError, match=re.escape(message)):
        checkpoint.load(run_dir)


def test_a_history_log_changed_or_cut_is_refused(tiny_run):
    run_dir, _ = tiny_run
    log = run_dir / "history.jsonl"
    data = log.read_bytes()
    log.write_bytes(data.replace(b'"round":0', b'"round":7', 1))
    with pytest.raises(fk.CheckpointError, match="history.jsonl does not match the checkpoint"):
        checkpoint.load(run_dir)
    log.write_bytes(data[:40])
    with pytest.raises(fk.CheckpointError, match="history.jsonl is truncated: it has 40 bytes"):
        checkpoint.load(run_dir)
    log.unlink()
    with pytest.raises(fk.CheckpointError, match="history.jsonl is missing"):
        checkpoint.load(run_dir)


def test_a_kill_mid_append_does_not_corrupt_a_resume(digits, tmp_path):
    """Lines appended after the checkpoint, and a torn last line, are cut off when the run resumes."""
    whole = digits_sim(digits, tmp_path / "whole", rounds=4).run(progress=False)
    interrupted(digits_sim(digits, tmp_path / "cut", rounds=4, on_round=[stop_after(1)]))
    log = tmp_path / "cut" / "history.jsonl"
    checkpointed = _manifest(tmp_path / "cut")["history"]["bytes"]
    assert log.stat().st_size > checkpointed  # the "aborted" event came after the checkpoint
    with open(log, "ab") as f:
        f.write(b'{"round":{"round":2,"seconds":0.1,"metrics":{"accuracy":0.99},"clients":{}}}\n{"event":{"rou')
    assert len(fk.History.load(tmp_path / "cut")) == 3  # a reader skips the torn line
    resumed = digits_sim(digits, tmp_path / "cut", rounds=4).resume(progress=False)
    assert resumed.model_sha256 == whole.model_sha256
    assert [r.round for r in resumed.history] == [0, 1, 2, 3]
    assert resumed.history.series("accuracy") == pytest.approx(whole.history.series("accuracy"))
    on_disk = fk.History.load(tmp_path / "cut")
    assert on_disk.series("accuracy") == resumed.history.series("accuracy")
    from fedkit.history import read_log
    assert read_log(log).history.to_dict() == resumed.history.to_dict()


def _as_old_format(run_dir, fmt):
    """Rewrite the checkpoint in ``run_dir`` as fedkit wrote it before format 3: every party's state in one folder
    (model.pt, server.pt, clients.pt), and with format 1 the whole history in it (history.json), no history.jsonl."""
    ckpt = checkpoint.load(run_dir)
    m = _manifest(run_dir)
    folder = run_dir / "checkpoints" / m["dir"]
    for sub in ("server", "clients"):
        for f in (folder / sub).iterdir():
            f.unlink()
        (folder / sub).rmdir()
    files = {"model.pt": _torch_bytes(ckpt.weights), "server.pt": _torch_bytes(ckpt.server_state),
             "clients.pt": _torch_bytes(ckpt.client_states)}
    if fmt == 1:
        files["history.json"] = json.dumps(ckpt.history.to_dict()).encode()
        del m["history"]
        (run_dir / "history.jsonl").unlink()
    for fname, data in files.items():
        (folder / fname).write_bytes(data)
    del m["clients"]
    m.update(format=fmt, files={f: hashlib.sha256(d).hexdigest() for f, d in files.items()})
    _write_manifest(run_dir, m)


@pytest.mark.parametrize("fmt", [1, 2])
def test_a_format_1_or_2_checkpoint_still_resumes(tiny_run, tiny_model, tmp_path, fmt):
    """Older fedkit kept every party's state in one folder (format 2), and the whole history there too (format 1,
    history.json); such a checkpoint still resumes, and the next one is written by party."""
    run_dir, sim = tiny_run
    whole = tiny_sim(tmp_path / "whole", tiny_model).run(progress=False)
    _as_old_format(run_dir, fmt)
    old = checkpoint.load(run_dir, clients=["a", "b"])
    assert old.round == 1 and (old.log is None) == (fmt == 1) and old.client_states["a"]["calls"] == 2
    resumed = sim().resume(progress=False)
    assert resumed.model_sha256 == whole.model_sha256 and len(resumed.history) == 3
    assert checkpoint.load(run_dir).log is not None  # it goes on in the new format, by party
    folder = run_dir / "checkpoints" / "round-00002"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.pt")) == [
        "clients/a.pt", "clients/b.pt", "server/model.pt", "server/state.pt"]


def test_he_secrets_item12_a_checkpoint_is_laid_out_by_party(tmp_path, tiny_model):
    """The server's files in server/, each client's state in clients/<name>.pt (named safely, whatever the name),
    and latest.json saying which file is whose; a resume reads each client's state back from its own file."""
    d = fk.Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 2)
    names = ["site-1", "../up", "a/b", "a_b", ".hidden", "A_B"]

    def sim(on_round=()):
        clients = [fk.Client(n, ClientData(d, d), {"train": _ones}) for n in names]
        return fk.Simulator(fk.FedAvg(rounds=3), model=tiny_model, clients=clients, out=tmp_path / "r",
                            on_round=list(on_round))

    interrupted(sim([stop_after(1)]))
    folder = tmp_path / "r" / "checkpoints" / "round-00001"
    m = _manifest(tmp_path / "r")
    assert m["format"] == 3 and m["clients"] == {
        "site-1": "clients/site-1.pt", "../up": "clients/_up.pt", "a/b": "clients/a_b.pt", "a_b": "clients/a_b-4.pt",
        ".hidden": "clients/hidden.pt", "A_B": "clients/A_B-6.pt"}
    on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert on_disk == sorted(["server/model.pt", "server/state.pt", *m["clients"].values()]) == sorted(m["files"])
    assert (folder / "clients").stat().st_mode & 0o077 == 0  # the clients' folder: its owner's only
    assert {n: s["calls"] for n, s in checkpoint.load(tmp_path / "r").client_states.items()} == dict.fromkeys(names, 2)
    assert sim().resume(progress=False).status == "done"
    assert {n: s["calls"] for n, s in checkpoint.load(tmp_path / "r").client_states.items()} == dict.fromkeys(names, 3)


def test_a_new_run_in_a_directory_voids_its_old_checkpoint(tiny_run, tiny_model):
    run_dir, _ = tiny_run
    assert checkpoint.exists(run_dir)
    # a new run there that ends before its first checkpoint: the old one (of another history) is not resumed
    interrupted(tiny_sim(run_dir, tiny_model, on_round=[stop_after(0)], checkpoint_every=2, overwrite=True))
    with pytest.raises(fk.CheckpointError, match="no checkpoint in"):
        checkpoint.load(run_dir)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("payload", [pickle.dumps(_Exploit()), _torch_bytes({"m": torch.nn.Linear(1, 1)})],
                         ids=["os.system", "module"])
def test_a_refused_pickle_never_suggests_loading_it_anyway(finished, payload):
    run_dir, _ = finished
    _replace_file(run_dir, "server/model.pt", payload)
    with pytest.raises(fk.CheckpointError) as e:
        checkpoint.load(run_dir)
    message = str(e.value)
    assert "could not be read safely" in message and "loading it could run code" in message
    for advice in ("weights_only", "add_safe_globals", "safe_globals", "trusted source", "can still be loaded"):
        assert advice not in message, message


def test_checkpointing_is_a_round_listener(tmp_path):
    """Issue 20 item 3: `checkpoint.Checkpointer` is subscribed to round ends like any on_round listener; it saves every
    ``every`` rounds and the last planned one, and `finish` the last round of a run that stopped early."""
    server, history = fk.Server({"w": torch.zeros(2)}), fk.History()
    client = fk.Client("site-1", ClientData(fk.Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 2),
                                            fk.Dataset(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long), 2)), {})
    saver = checkpoint.Checkpointer(tmp_path, server, {"site-1": client}, history, "fp", None, every=2, rounds=6)
    saved = []
    for r in range(3):  # rounds 0, 1, 2 of 6: only round 1 is due
        server.model = fk.PlainModel({"w": torch.full((2,), float(r))})
        client.state["seen"] = r
        record = fk.RoundRecord(r, 0.1, {})
        history.append(record)
        saver(record)
        saved.append(checkpoint.load(tmp_path).round if checkpoint.exists(tmp_path) else None)
    assert saved == [None, 1, 1]
    saver.finish()  # the workflow stopped after round 2 (on purpose): that round is kept too
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.round == 2 and ckpt.weights["w"].tolist() == [2.0, 2.0] and ckpt.client_states["site-1"]["seen"] == 2
    assert ckpt.fingerprint == "fp" and len(ckpt.history) == 3
