"""One run per run directory: an OS lock that names its holder and dies with it, and no silent overwrite."""

import json
import subprocess
import sys
import threading

import pytest
import torch

import fedkit as fk
from interrupts import interrupted  # noqa: E402
from fedkit import rundir
from fedkit.cli import main
from fedkit.data import ClientData
from fedkit.rundir import LOCK, RunDirBusy, RunExists


def _zero(task, ctx, abort):
    return fk.DXO("WEIGHT_DIFF", {k: torch.zeros_like(v) for k, v in task.data.data.items()}, {"num_samples": 1})


def tiny_sim(out, model, rounds=2, train=_zero, clients=2, **kw):
    d = fk.Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 2)
    parts = [fk.Client(f"site-{i}", ClientData(d, d), {"train": train}) for i in range(clients)]
    workflow = kw.pop("workflow", None) or fk.FedAvg(rounds=rounds)
    return fk.Simulator(workflow, model=model, clients=parts, out=out, **kw)


def files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ------------------------------------------------------------------------------ the lock

def test_a_claim_records_its_holder_and_leaves_nothing_behind(tmp_path):
    d = tmp_path / "run"
    with rundir.claim(d) as lock:
        held = json.loads((d / LOCK).read_text())
        assert held == lock.holder and held["pid"] > 0 and {"host", "started", "command"} <= set(held)
        assert rundir.holder(d) == held
    assert not (d / LOCK).exists() and rundir.holder(d) is None
    assert d.is_dir()  # the run directory stays; only the lock goes


def test_a_second_claim_is_refused_by_name_and_a_reentrant_one_shares(tmp_path):
    with rundir.claim(tmp_path, reentrant=True) as lock:
        with rundir.claim(tmp_path) as inner:  # the run that the command line starts in the same thread
            assert inner.holder == lock.holder
        assert rundir.holder(tmp_path) is not None  # the inner release gave back its claim only
        failed = []
        t = threading.Thread(target=lambda: failed.append(pytest.raises(RunDirBusy, rundir.claim, tmp_path)))
        t.start(), t.join()
        assert failed and "another run of this process" in str(failed[0].value)
    with rundir.claim(tmp_path):
        with pytest.raises(RunDirBusy, match=f"in use by another run of this process, process {lock.holder['pid']}"):
            rundir.claim(tmp_path)


def test_another_process_holds_it_until_killed(tmp_path):
    code = ("import sys, time; from fedkit import rundir; lock = rundir.claim(sys.argv[1]); print('held', flush=True); "
            "time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirBusy) as e:
            rundir.claim(tmp_path)
        assert e.value.holder["pid"] == holder.pid and f"process {holder.pid}" in str(e.value)
        assert rundir.holder(tmp_path)["pid"] == holder.pid
    finally:
        holder.kill()  # SIGKILL: no finally, no atexit; the OS drops the lock
        holder.wait()
    assert (tmp_path / LOCK).exists()  # a stale file, which says who ran last...
    assert rundir.holder(tmp_path) is None  # ...and blocks nobody
    with rundir.claim(tmp_path) as lock:
        assert lock.holder["pid"] != holder.pid


@pytest.mark.parametrize("make, match", [
    (lambda t: (t / "f").write_text("x") and t / "f", "is a file, not a directory"),
    (lambda t: (t / "f").write_text("x") and t / "f" / "sub", "cannot be created: .* is a file"),
    (lambda t: "/proc/fedkit-run", "cannot be created"),
], ids=["a file", "under a file", "in /proc"])
def test_a_path_that_cannot_be_a_run_directory_is_refused(tmp_path, make, match):
    before = files(tmp_path)
    with pytest.raises(fk.ConfigError, match=match):
        rundir.claim(make(tmp_path))
    assert files(tmp_path) == before or files(tmp_path) == ["f"]


def test_a_directory_holding_a_run_is_refused_unless_overwritten(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"status": "done", "rounds": 20}))
    with pytest.raises(RunExists, match="holds a finished run of 20 round"):
        rundir.claim(tmp_path)
    assert not (tmp_path / LOCK).exists()
    with rundir.claim(tmp_path, fresh=False):  # a resume may
        pass
    with rundir.claim(tmp_path, overwrite=True):
        assert not (tmp_path / "summary.json").exists()  # the new run replaces it
    (tmp_path / "summary.json").write_text(json.dumps({"status": "failed", "rounds": 0}))
    rundir.claim(tmp_path).release()  # a run that ended before its first round: nothing to lose


# ------------------------------------------------------------------------------ the simulator takes it

def test_run_refuses_a_finished_run_unless_overwrite(tmp_path, tiny_model):
    assert tiny_sim(tmp_path, tiny_model, rounds=3).run(progress=False).status == "done"
    before = (tmp_path / "summary.json").read_text()
    with pytest.raises(RunExists, match="holds a finished run of 3 round.*overwrite=True"):
        tiny_sim(tmp_path, tiny_model, rounds=1).run(progress=False)
    assert (tmp_path / "summary.json").read_text() == before
    run = tiny_sim(tmp_path, tiny_model, rounds=1, overwrite=True).run(progress=False)
    assert run.status == "done" and json.loads((tmp_path / "summary.json").read_text())["rounds"] == 1
    assert not (tmp_path / LOCK).exists()
    with pytest.raises(fk.ConfigError, match="overwrite must be True or False"):
        tiny_sim(tmp_path, tiny_model, overwrite="yes")


def test_a_second_run_or_a_resume_while_one_runs_is_refused(tmp_path, tiny_model):
    gate = threading.Event()

    def slow(task, ctx, abort):
        gate.wait(30)
        return _zero(task, ctx, abort)

    first = tiny_sim(tmp_path, tiny_model, rounds=2, train=slow).start()
    try:
        with pytest.raises(RunDirBusy, match="in use by another run of this process"):
            tiny_sim(tmp_path, tiny_model, overwrite=True).run(progress=False)
        with pytest.raises(RunDirBusy):
            tiny_sim(tmp_path, tiny_model, rounds=2).resume(progress=False)
        with pytest.raises(RunDirBusy):
            tiny_sim(tmp_path, tiny_model, overwrite=True).start()
    finally:
        gate.set()
    assert first.wait(30).status == "done"
    # released before wait() returns: the next run goes at once
    assert tiny_sim(tmp_path, tiny_model, rounds=1, overwrite=True).run(progress=False).status == "done"


def test_the_lock_goes_when_a_run_fails(tmp_path, tiny_model):
    def boom(task, ctx, abort):
        raise RuntimeError("boom")

    with pytest.raises(fk.RoundFailed):
        tiny_sim(tmp_path, tiny_model, train=boom).run(progress=False)
    assert rundir.holder(tmp_path) is None and not (tmp_path / LOCK).exists()
    assert tiny_sim(tmp_path, tiny_model, overwrite=True).run(progress=False).status == "done"


def test_resume_continues_in_the_locked_directory(tmp_path, tiny_model):
    def stop(record):
        raise KeyboardInterrupt

    assert interrupted(tiny_sim(tmp_path, tiny_model, rounds=3, on_round=[stop])).status == "aborted"
    with pytest.raises(RunExists, match=r"an interrupted run \(1 round\(s\) done\)"):
        tiny_sim(tmp_path, tiny_model, rounds=3).run(progress=False)
    resumed = tiny_sim(tmp_path, tiny_model, rounds=3).resume(progress=False)
    assert resumed.status == "done" and len(resumed.history) == 3 and not (tmp_path / LOCK).exists()


# ------------------------------------------------------------------------------ the federation, before round 1

@pytest.mark.parametrize("workflow, match", [
    (lambda: fk.FedAvg(rounds=1, clients_per_round=5), "clients_per_round=5 but the federation has only 3 clients"),
    (lambda: fk.FedAvg(rounds=1, min_clients=4), "min_clients=4 but the federation has only 3"),
    (lambda: fk.FedAvg(rounds=1, aggregate=fk.aggregate.krum), r"krum cannot aggregate the 3 updates.*2f\+2 = 4"),
    (lambda: fk.FedAvg(rounds=1, clients_per_round=2, aggregate=__import__("functools").partial(
        fk.aggregate.multi_krum, f=0)), "multi_krum.*2f\\+2 = 2 updates, got 2"),
    (lambda: fk.FedAvg(rounds=1, aggregate=__import__("functools").partial(fk.aggregate.trimmed_mean, beta=0.6)),
     r"trimmed_mean\(beta=0.6\) cannot aggregate.*beta in \[0, 0.5\)"),
], ids=["clients_per_round", "min_clients", "krum", "multi-krum", "trimmed"])
def test_settings_the_federation_cannot_meet_fail_before_the_first_round(tmp_path, tiny_model, workflow, match):
    sim = tiny_sim(tmp_path / "run", tiny_model, clients=3, workflow=workflow())
    with pytest.raises(fk.ConfigError, match=match):
        sim.run(progress=False)
    with pytest.raises(fk.ConfigError, match=match):
        sim.start()
    assert not (tmp_path / "run").exists()  # nothing written: no failed run directory, no NaN summary


def test_a_rule_of_ones_own_is_not_dry_run(tmp_path, tiny_model):
    calls = []

    def mine(updates):
        calls.append(len(updates))
        return fk.aggregate.weighted_mean(updates)

    tiny_sim(None, tiny_model, rounds=1, workflow=fk.FedAvg(rounds=1, aggregate=mine)).run(progress=False)
    assert calls == [2]


# ------------------------------------------------------------------------------ the command line

def test_cli_second_run_is_refused_naming_the_process_and_a_kill_frees_it(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--rounds", "1000", "--clients", "2", "--no-progress", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "fedkit", *argv], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if (out / "checkpoints" / "latest.json").exists() or first.poll() is not None:
                break
            threading.Event().wait(0.1)
        assert first.poll() is None, first.stderr.read()
        cli = json.loads((out / "cli.json").read_text())
        for again in (["run", "--rounds", "1", "--clients", "2", "--no-progress", "--out", str(out), "--overwrite"],
                      ["run", "--resume", str(out), "--no-progress", "--json"]):
            with pytest.raises(SystemExit) as e:
                main(again)
            captured = capsys.readouterr()
            assert e.value.code == 2 and f"in use by process {first.pid}" in captured.err
            assert f"hint: wait for process {first.pid} to end" in captured.err and "Traceback" not in captured.err
        assert json.loads(captured.out.splitlines()[-1])["status"] == "refused"
        assert json.loads((out / "cli.json").read_text()) == cli  # the running run's settings are untouched
    finally:
        first.kill()
        first.wait()
    assert rundir.holder(out) is None
    rundir.claim(out, fresh=False).release()
