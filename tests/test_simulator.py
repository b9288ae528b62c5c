"""The in-process federation: FedAvg end to end, pull semantics, filters, threads and aborts."""

import gc
import json
import math
import os
import re
import threading
import time
import weakref
from pathlib import Path

import pandas as pd
import pytest
import torch

import fedkit as fk
from fedkit import checkpoint
from fedkit.data import ClientData
from fedkit.simulator import RunInterrupted


def fixed_diff(value: float, samples: int, steps: int = 1):
    """A plain-function executor that always answers the same WEIGHT_DIFF."""
    def execute(task, ctx, abort):
        return fk.DXO(fk.DataKind.WEIGHT_DIFF, {k: torch.full_like(v, value) for k, v in task.data.data.items()},
                      {fk.MetaKey.NUM_SAMPLES: samples, fk.MetaKey.NUM_STEPS: steps})
    return execute


def toy_clients(*executors, extra=None):
    d = fk.Dataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), 2)
    return [fk.Client(f"c{i}", ClientData(d, d), {"train": ex, **(extra or {})}) for i, ex in enumerate(executors)]


def fedavg_digits(digits, rounds=10, seed=0, **kw):
    parts = fk.data.iid(digits.train, clients=8, seed=seed)
    return fk.Simulator(fk.FedAvg(rounds=rounds, **kw), model=lambda: fk.models.for_data(digits),
                        clients=parts, test=digits.test, seed=seed)


def test_fedavg_learns_digits(digits):
    run = fedavg_digits(digits).run(progress=False)
    acc = run.history.series("accuracy")
    assert run.status == "done" and len(acc) == 10
    assert acc[-1] >= 0.93, acc  # the headline band the CLI acceptance promises
    assert acc[-1] > acc[0]


def test_same_seed_same_weights_other_seed_other_weights(digits):
    a = fedavg_digits(digits, rounds=3).run(progress=False)
    b = fedavg_digits(digits, rounds=3).run(progress=False)
    c = fedavg_digits(digits, rounds=3, seed=1).run(progress=False)
    assert a.model_sha256 == b.model_sha256
    assert a.model_sha256 != c.model_sha256


def test_aggregation_matches_hand_computed_weighted_mean(tiny_model):
    # global weight 1.0; client diffs +1 (1 sample) and +4 (3 samples): 1 + (1*1 + 3*4)/4 = 4.25
    sim = fk.Simulator(fk.FedAvg(rounds=1), model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1), fixed_diff(4.0, 3)))
    run = sim.run(progress=False)
    assert run.weights["weight"].item() == pytest.approx(4.25)


def test_weigh_by_steps_and_uniform(tiny_model):
    clients = toy_clients(fixed_diff(1.0, samples=1, steps=3), fixed_diff(4.0, samples=3, steps=1))
    by_steps = fk.Simulator(fk.FedAvg(rounds=1, weigh=fk.aggregate.by_steps), model=tiny_model, clients=clients).run(progress=False)
    assert by_steps.weights["weight"].item() == pytest.approx(1 + (3 * 1 + 1 * 4) / 4)
    uniform = fk.Simulator(fk.FedAvg(rounds=1, weigh=fk.aggregate.uniform), model=tiny_model, clients=clients).run(progress=False)
    assert uniform.weights["weight"].item() == pytest.approx(1 + 2.5)


def test_two_rounds_accumulate(tiny_model):
    run = fk.Simulator(fk.FedAvg(rounds=2), model=tiny_model, clients=toy_clients(fixed_diff(0.5, 1))).run(progress=False)
    assert run.weights["weight"].item() == pytest.approx(2.0)
    assert [r.round for r in run.history] == [0, 1]


def test_user_rule_plugs_in_without_subclassing(tiny_model):
    def take_max(updates):
        return {k: torch.stack([u[k] for u, _ in updates]).max(0).values for k in updates[0][0]}
    clients = toy_clients(fixed_diff(1.0, 1), fixed_diff(4.0, 3))
    run = fk.Simulator(fk.FedAvg(rounds=1, aggregate=take_max), model=tiny_model, clients=clients).run(progress=False)
    assert run.weights["weight"].item() == pytest.approx(5.0)


def test_rule_returning_wrong_keys_is_named(tiny_model):
    bad_rule = lambda updates: {"nope": torch.zeros(1)}  # noqa: E731
    sim = fk.Simulator(fk.FedAvg(rounds=1, aggregate=bad_rule), model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1)))
    with pytest.raises(fk.UpdateError, match="aggregation rule.*missing: \\['weight'\\]"):
        sim.run(progress=False)


def test_update_with_wrong_shape_says_which_client_and_key(tiny_model):
    def wrong(task, ctx, abort):
        return fk.DXO("WEIGHT_DIFF", {"weight": torch.zeros(2, 2)}, {"num_samples": 1})
    sim = fk.Simulator(fk.FedAvg(rounds=1), model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1), wrong))
    with pytest.raises(fk.RoundFailed, match=r"client 'c1'.*'weight' with shape \(2, 2\).*\(1, 1\)"):
        sim.run(progress=False)


def test_nan_update_is_rejected_with_reason(tiny_model):
    sim = fk.Simulator(fk.FedAvg(rounds=1), model=tiny_model, clients=toy_clients(fixed_diff(math.nan, 1)))
    with pytest.raises(fk.RoundFailed, match="non-finite.*NaN"):
        sim.run(progress=False)
    run = fk.Simulator(fk.FedAvg(rounds=1), model=tiny_model, clients=toy_clients(fixed_diff(math.nan, 1))).start()
    run._done.wait(10)
    assert run.status == "failed" and "non-finite" in run.history.events[-1]["reason"]
    assert run.weights["weight"].item() == 1.0  # the global model is left untouched


def test_failing_executor_is_reported_with_client_and_reason(tiny_model):
    def boom(task, ctx, abort):
        raise RuntimeError("disk full")
    sim = fk.Simulator(fk.FedAvg(rounds=1), model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1), boom))
    with pytest.raises(fk.RoundFailed, match="c1: RuntimeError: disk full"):
        sim.run(progress=False)


def test_missing_executor_names_the_task(tiny_model):
    d = fk.Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 2)
    clients = [fk.Client("lonely", ClientData(d, d), {"validate": fixed_diff(1.0, 1)})]
    with pytest.raises(fk.RoundFailed, match="no executor for task 'train'"):
        fk.Simulator(fk.FedAvg(rounds=1), model=tiny_model, clients=clients).run(progress=False)


def test_filters_run_on_both_sides_in_order(tiny_model):
    seen = []

    def spy(name, scale=1.0):
        def f(dxo, ctx):
            seen.append((name, ctx.side, ctx.direction, ctx.client))
            return dxo.with_data({k: v * scale for k, v in dxo.data.items()})
        return f

    d = fk.Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 2)
    client = fk.Client("c0", ClientData(d, d), {"train": fixed_diff(1.0, 1)},
                       task_data_filters=[spy("client-in")], result_filters=[spy("client-out", 2.0)])
    sim = fk.Simulator(fk.FedAvg(rounds=1), model=tiny_model, clients=[client],
                       server_filters=[spy("server-out")], server_result_filters=[spy("server-in", 3.0)])
    run = sim.run(progress=False)
    assert seen == [("server-out", "server", "task", "c0"), ("client-in", "client", "task", "c0"),
                    ("client-out", "client", "result", "c0"), ("server-in", "server", "result", "c0")]
    assert run.weights["weight"].item() == pytest.approx(1.0 + 1.0 * 2 * 3)


def test_client_state_survives_rounds_but_not_runs(tiny_model):
    counts = []

    def counting(task, ctx, abort):
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        counts.append(ctx.state["n"])
        return fixed_diff(0.0, 1)(task, ctx, abort)

    sim = fk.Simulator(fk.FedAvg(rounds=3), model=tiny_model, clients=toy_clients(counting))
    sim.run(progress=False)
    sim.run(progress=False)
    assert counts == [1, 2, 3, 1, 2, 3]


def test_history_records_every_client_with_costs(digits):
    run = fedavg_digits(digits, rounds=2).run(progress=False)
    df = run.history.client_dataframe()
    assert len(df) == 16 and set(df["client"]) == {f"site-{i}" for i in range(1, 9)}
    model_bytes = fk.weights.nbytes(run.weights)
    assert (df["bytes_down"] == model_bytes).all() and (df["bytes_up"] == model_bytes).all()
    assert (df["samples"] > 0).all() and (df["steps"] == (df["samples"] / 16).apply(math.ceil)).all()
    assert {"train_loss", "val_accuracy", "seconds"} <= set(df.columns)
    rounds = run.history.to_dataframe()
    assert list(rounds["bytes_down"]) == [8 * model_bytes] * 2
    assert {"accuracy", "loss"} <= set(rounds.columns)


def test_clients_per_round_samples_deterministically(digits):
    a = fedavg_digits(digits, rounds=3, clients_per_round=3).run(progress=False)
    b = fedavg_digits(digits, rounds=3, clients_per_round=3).run(progress=False)
    picked = [sorted(r.clients) for r in a.history]
    assert all(len(p) == 3 for p in picked)
    assert picked == [sorted(r.clients) for r in b.history]
    assert len({tuple(p) for p in picked}) > 1  # not the same three every round


def slow_executor(delay=0.02):
    def execute(task, ctx, abort):
        for _ in range(200):
            abort.check()
            time.sleep(delay)
        return fixed_diff(1.0, 1)(task, ctx, abort)
    return execute


def test_start_returns_at_once_and_abort_stops_cleanly(tiny_model):
    before = threading.active_count()
    run = fk.Simulator(fk.FedAvg(rounds=50), model=tiny_model, clients=toy_clients(slow_executor())).start()
    assert run.status == "running"
    time.sleep(0.1)
    run.abort("stop button")
    run.wait(timeout=10)
    assert run.status == "aborted" and run.done
    assert run.history.events[-1]["reason"] == "stop button"
    assert run.weights["weight"].item() == 1.0  # no half-finished round leaked into the global model
    time.sleep(0.05)
    assert threading.active_count() == before


def test_background_run_equals_blocking_run(digits):
    a = fedavg_digits(digits, rounds=2).start().wait(timeout=60)
    b = fedavg_digits(digits, rounds=2).run(progress=False)
    assert a.status == "done" and a.model_sha256 == b.model_sha256


def test_history_is_live_while_running(tiny_model):
    def slowish(task, ctx, abort):
        time.sleep(0.05)
        return fixed_diff(1.0, 1)(task, ctx, abort)
    run = fk.Simulator(fk.FedAvg(rounds=40), model=tiny_model, clients=toy_clients(slowish)).start()
    deadline = time.time() + 10
    while len(run.history) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert 2 <= len(run.history) < 40
    run.abort()
    run.wait(10)


def test_keyboard_interrupt_stops_as_aborted_and_propagates(tiny_model):
    def interrupted(task, ctx, abort):
        if task.round == 1:
            raise KeyboardInterrupt
        return fixed_diff(1.0, 1)(task, ctx, abort)
    sim = fk.Simulator(fk.FedAvg(rounds=5), model=tiny_model, clients=toy_clients(interrupted))
    with pytest.raises(KeyboardInterrupt, match=r"interrupted after 1 of 5 round\(s\)") as e:
        sim.run(progress=False)  # a cell (a loop) stops: the partial run is never returned as a result
    run = e.value.run
    assert run is sim.last_run and run.status == "aborted" and len(run.history) == 1 and run.done
    assert run.weights["weight"].item() == 2.0
    summary = run.summary()
    assert summary["status"] == "aborted" and summary["complete"] is False
    assert (summary["rounds"], summary["rounds_planned"]) == (1, 5)
    assert "aborted: INCOMPLETE, 1 of 5 round(s)" in repr(run)
    assert run.history.events[-1]["what"] == "aborted" and "KeyboardInterrupt" in run.history.events[-1]["reason"]


def test_ctrl_c_checkpoints_then_propagates(tiny_model, tmp_path):
    def stop_after_first(record):
        if record.round == 0:
            raise KeyboardInterrupt
    sim = fk.Simulator(fk.FedAvg(rounds=5), model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1)),
                       out=tmp_path / "r", on_round=[stop_after_first])
    with pytest.raises(RunInterrupted):
        sim.run(progress=False)
    assert checkpoint.load(tmp_path / "r").round == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["complete"] is False
    sim.on_round.clear()
    resumed = sim.resume(progress=False)
    assert resumed.status == "done" and resumed.complete and len(resumed.history) == 5


def test_abort_returns_without_raising(tiny_model):
    sim = fk.Simulator(fk.FedAvg(rounds=5), model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1)))
    sim.on_round.append(lambda record: sim.last_run.abort("stop button") if record.round == 1 else None)
    run = sim.run(progress=False)  # the Stop button (run.abort()) is not an interrupt: the run is returned
    assert run.status == "aborted" and not run.complete and len(run.history) == 2


def test_finished_runs_are_released(tiny_model):
    """Re-running a cell must not pile up runs, threads or models: nothing global holds them."""
    sim = fk.Simulator(fk.FedAvg(rounds=2), model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1)))
    refs = []
    for _ in range(3):
        run = sim.start().wait(10)
        refs.append(weakref.ref(run))
        del run
    gc.collect()
    assert all(r() is None for r in refs)
    assert not [t for t in threading.enumerate() if t.name == "fedkit-run"]


def test_run_dir_holds_history_model_and_plot(digits, tmp_path):
    parts = fk.data.iid(digits.train, clients=3, seed=0)
    run = fk.Simulator(fk.FedAvg(rounds=2), model=lambda: fk.models.for_data(digits), clients=parts,
                       test=digits.test, out=tmp_path / "r").run(progress=False)
    for name in ("history.json", "rounds.csv", "clients.csv", "model.pt", "summary.json", "config.json", "plot.html"):
        assert (tmp_path / "r" / name).exists(), name
    loaded = torch.load(tmp_path / "r" / "model.pt", weights_only=True)
    assert fk.weights.sha256(loaded) == run.model_sha256
    assert fk.History.load(tmp_path / "r").series("accuracy") == run.history.series("accuracy")
    assert pd.read_csv(tmp_path / "r" / "rounds.csv")["round"].tolist() == [1, 2]  # counted as the plots count
    assert set(pd.read_csv(tmp_path / "r" / "clients.csv")["round"]) == {1, 2}


def test_plot_has_context_and_loss_and_shares_one_plotlyjs(digits, tmp_path):
    parts = fk.data.iid(digits.train, clients=3, seed=0)
    for name in ("a", "b"):
        fk.Simulator(fk.FedProx(rounds=2, mu=0.1), model=lambda: fk.models.for_data(digits), clients=parts,
                     test=digits.test, out=tmp_path / name).run(progress=False)
    assert (tmp_path / "plotly.min.js").stat().st_size > 1_000_000  # one copy, in the folder of the runs
    for name in ("a", "b"):
        html = (tmp_path / name / "plot.html").read_text()
        assert not (tmp_path / name / "plotly.min.js").exists() and 'src="../plotly.min.js"' in html
        assert len(html) < 100_000
    fig = fk.Simulator(fk.FedProx(rounds=3, mu=0.1), model=lambda: fk.models.for_data(digits), clients=parts,
                       test=digits.test).run(progress=False).figure()
    assert [t.name for t in fig.data] == ["accuracy", "loss"] and fig.data[1].yaxis == "y2"
    assert fig.layout.title.text.startswith("FedAvg + Proximal(mu=0.1), 3 clients: 3 of 3 rounds, final accuracy")


def test_progress_without_a_terminal_is_a_line_per_round(tiny_model, capsys):
    fk.Simulator(fk.FedAvg(rounds=3), model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1))).run(desc="toy")
    err = capsys.readouterr().err
    assert err.splitlines() == ["toy: round 1/3", "toy: round 2/3", "toy: round 3/3"] and "\r" not in err


def test_custom_controller_with_send_and_wait(tiny_model):
    class AskEach(fk.Controller):
        rounds = 0  # it records no round (fl.end_round): a controller that planned one and ran none would fail

        def control_flow(self, fl):
            for name in fl.client_names:
                reply = fl.send_and_wait(fk.Task("train", fk.DXO("WEIGHTS", fl.server.weights)), name)
                fl.history.events.append({"client": name, "value": reply.result.data["weight"].item()})

    run = fk.Simulator(AskEach(), model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1), fixed_diff(2.0, 1))).run(progress=False)
    assert [e["value"] for e in run.history.events] == [1.0, 2.0]


def test_executor_object_and_model_instance_are_accepted(digits):
    class Stats(fk.Executor):
        def execute(self, task, ctx, abort):
            return fk.DXO(fk.DataKind.STATISTICS, {"mean": ctx.data.train.x.mean(0)}, {"count": len(ctx.data.train)})

    class Gather(fk.Controller):
        rounds = 0  # it records no round (fl.end_round): a controller that planned one and ran none would fail

        def control_flow(self, fl):
            replies = fl.broadcast_and_wait(fk.Task("stats", fk.DXO("WEIGHTS", {})))
            fl.history.events.append({"counts": sorted(r.result.meta["count"] for r in replies.values())})

    parts = fk.data.iid(digits.train, clients=2, seed=0)
    clients = [fk.Client(f"s{i}", ClientData(p, p), {"stats": Stats()}) for i, p in enumerate(parts)]
    run = fk.Simulator(Gather(), model=fk.models.MLP(64, 10), clients=clients).run(progress=False)
    assert run.history.events[0]["counts"] == [718, 719]


@pytest.mark.parametrize("kwargs, match", [
    (dict(workflow="fedavg"), "workflow must be a Controller"),
    (dict(val_fraction=1.5), "val_fraction"),
    (dict(clients=[]), "at least one client"),
    (dict(device="tpu9"), "unknown device"),
    (dict(model=42), "model must be"),
])
def test_bad_simulator_input_is_explained(digits, kwargs, match):
    args = dict(workflow=fk.FedAvg(rounds=1), model=lambda: fk.models.for_data(digits),
                clients=fk.data.iid(digits.train, 2), test=digits.test)
    args.update(kwargs)
    with pytest.raises(fk.ConfigError, match=match):
        fk.Simulator(**args)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rounds=0), "rounds must be an integer >= 1"),
    (dict(rounds=2.5), "rounds"),
    (dict(clients_per_round=0), "clients_per_round"),
])
def test_bad_fedavg_settings(kwargs, match):
    with pytest.raises(fk.ConfigError, match=match):
        fk.FedAvg(**kwargs)


def test_live_weights_are_read_when_asked_and_frozen_at_the_end(tiny_model):
    reads = []
    sim = fk.Simulator(fk.FedAvg(rounds=3), model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1)))
    run = sim.start().wait(10)
    assert run._live is None and run.weights["weight"].item() == 4.0
    live = fk.Simulator(fk.FedAvg(rounds=200), model=tiny_model, clients=toy_clients(slow_executor(0.001))).start()
    while len(live.history) < 1:
        time.sleep(0.005)
    reads.append(live.weights["weight"].item())
    live.abort()
    live.wait(10)
    assert reads[0] >= 2.0 and live._live is None
    assert live.weights["weight"].item() == 1.0 + len(live.history)


def test_executors_replace_the_standard_ones_by_task_name(tiny_model):
    calls = []

    def halve(task, ctx, abort):  # a train executor of your own, for every dataset client
        calls.append(ctx.client)
        return fk.DXO(fk.DataKind.WEIGHT_DIFF, {k: -v / 2 for k, v in task.data.data.items()},
                      {fk.MetaKey.NUM_SAMPLES: len(ctx.data.train)})

    d = fk.Dataset(torch.zeros(10, 1), torch.zeros(10, dtype=torch.long), 2)
    sim = fk.Simulator(fk.FedAvg(rounds=2), model=tiny_model, clients=[d, d], executors={"train": halve})
    run = sim.run(progress=False)
    assert calls == ["site-1", "site-2"] * 2 and run.weights["weight"].item() == 0.25
    assert type(sim.clients[0].executors["validate"]).__name__ == "Evaluator"  # the others stay
    with pytest.raises(fk.ConfigError, match="executors maps task names to executors"):
        fk.Simulator(fk.FedAvg(rounds=1), model=tiny_model, clients=[d], executors={"train": 3})


def test_a_controller_run_without_a_clients_side_refuses_instead_of_waiting(tiny_model):
    from fedkit.server import Channel, Server, ServerContext

    fl = ServerContext(Server({"weight": torch.ones(1, 1)}), ("c0",), Channel(), fk.Signal(), fk.History(), seed=0)
    with pytest.raises(RuntimeError, match="no clients' side serves this ServerContext's channel"):
        fk.FedAvg(rounds=1).control_flow(fl)


# ---- the run directory: refused before the first round when unusable; a failing save never hangs wait()

def _out_sim(tiny_model, out, on_round=(), rounds=2):
    return fk.Simulator(fk.FedAvg(rounds=rounds), model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1)), out=out,
                        on_round=list(on_round))


def _unusable_out(tmp_path, kind):
    (tmp_path / "file").write_text("x")
    if kind == "file":
        return tmp_path / "file", r"'.*file' is a file, not a directory"
    if kind == "under a file":
        return tmp_path / "file" / "run", r"'.*run' cannot be created: .*file is a file, not a directory"
    (tmp_path / "r" / "model.pt").mkdir(parents=True)
    return tmp_path / "r", r"r/model.pt is a directory, but the run writes its file 'model.pt' there; remove or rename it"


@pytest.mark.parametrize("kind", ["file", "under a file", "model.pt is a directory"])
def test_an_unusable_run_directory_is_refused_before_the_first_round(tmp_path, tiny_model, kind):
    out, message = _unusable_out(tmp_path, kind)
    rounds = []
    sim = _out_sim(tiny_model, out, on_round=[rounds.append])
    with pytest.raises(fk.ConfigError, match=message):
        sim.start()
    with pytest.raises(fk.ConfigError, match=message):
        sim.run(progress=False)
    assert rounds == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_a_run_directory_that_cannot_be_written_is_refused(tmp_path, tiny_model):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(fk.ConfigError, match="cannot be written to"):
            _out_sim(tiny_model, locked / "run").run(progress=False)
    finally:
        locked.chmod(0o700)


def test_a_run_directory_that_refuses_writes_is_refused(tmp_path, tiny_model, monkeypatch):
    """The same as root, who may write anywhere: a directory whose writes fail (read-only mount, quota...)."""
    import pathlib
    write_bytes = pathlib.Path.write_bytes

    def refusing(self, data):
        if self.parent == tmp_path / "ro":
            raise PermissionError(13, "Permission denied", str(self))
        return write_bytes(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", refusing)
    with pytest.raises(fk.ConfigError, match=r"out='.*ro' cannot be written to \(Permission denied\); give a directory"):
        _out_sim(tiny_model, tmp_path / "ro").start()


def _block_model_pt(out, at_round):
    def listener(record):
        if record.round == at_round:
            (out / "model.pt").mkdir()  # the end-of-run save will fail
    return listener


def test_a_failing_end_of_run_save_fails_the_run_and_wait_returns(tmp_path, tiny_model):
    out = tmp_path / "r"
    run = _out_sim(tiny_model, out, on_round=[_block_model_pt(out, 1)]).start()
    assert run._done.wait(30), "wait() must return"
    assert run.done and run.status == "failed"
    with pytest.raises(fk.simulator.SaveError, match=r"finished its rounds, but its results could not be saved into .*r "
                                                     r"\(.*Is a directory.*run.save\(another_directory\)"):
        run.wait(5)
    assert run.history.events[-1]["what"] == "save_failed" and len(run.history) == 2
    assert run.weights["weight"].item() == 3.0  # still there, to be saved elsewhere
    run.save(tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / "model.pt").is_file()
    with pytest.raises(fk.simulator.SaveError):
        _out_sim(tiny_model, tmp_path / "r2", on_round=[_block_model_pt(tmp_path / "r2", 1)]).run(progress=False)


def test_a_failed_run_keeps_its_error_when_its_save_fails_too(tmp_path, tiny_model):
    out = tmp_path / "r"

    def boom(record):
        raise ZeroDivisionError("the run's own error")

    run = _out_sim(tiny_model, out, on_round=[_block_model_pt(out, 0), boom]).start()
    assert run._done.wait(30)
    with pytest.raises(ZeroDivisionError, match="the run's own error"):
        run.wait(5)
    assert [e["what"] for e in run.history.events] == ["failed", "save_failed"]
    assert "Is a directory" in run.history.events[-1]["reason"]


def test_summary_and_config_are_strict_json(tmp_path, tiny_model):
    import json

    def strict(text):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in strict JSON"))

    run = _out_sim(tiny_model, tmp_path).run(progress=False)  # no test set: no accuracy, NaN in the summary
    assert math.isnan(run.summary()["final_accuracy"])
    summary = strict((tmp_path / "summary.json").read_text())
    assert summary["final_accuracy"] is None and summary["final_loss"] is None and summary["rounds"] == 2
    strict((tmp_path / "config.json").read_text())
    strict((tmp_path / "history.json").read_text())
    for line in (tmp_path / "history.jsonl").read_text().splitlines():
        strict(line)
    assert fk.History.load(tmp_path).to_dict() == run.history.to_dict()


def _relabel(d, rows, value, dtype=None):
    y = d.y.clone()
    y[rows] = value
    return fk.Dataset(d.x, y if dtype is None else y.to(dtype), d.num_classes, d.name)


def test_bad_labels_and_nan_features_are_refused_at_build_naming_the_client_or_the_test_set(digits, tmp_path):
    """Issue 18 item 8: -100 (CrossEntropy's ignore index) in training was skipped yet counted, in the test set it
    scored 0.0; labels past num_classes, int32 or float labels failed every client in round 0; NaN test features
    gave an accuracy. Each is refused when the Simulator is built, naming who holds the bad values."""
    parts = list(fk.data.iid(digits.train.subset(range(300)), clients=3, seed=0))
    nan_test, inf_train = digits.test.x.clone(), parts[1].x.clone()
    nan_test[3], inf_train[0, 0, 0, 0] = float("nan"), float("inf")
    cases = [
        (dict(clients=[_relabel(parts[0], slice(0, 40), -100), *parts[1:]]),
         r"site-1's training split: labels must be int64 class indices in \[0, 10\).*: -100 \(\d+ samples\); -100 is "
         r"CrossEntropyLoss's ignore index"),
        (dict(test=_relabel(digits.test, slice(None), -100)), r"the test set: labels must be int64.*360 of 360 label"),
        (dict(clients=[parts[0], parts[1], _relabel(parts[2], 0, 12)]), r"site-3's (training|validation) split: .*: 12 \(1 "
                                                                        r"sample\).*right num_classes"),
        (dict(clients=[_relabel(parts[0], 0, 0, torch.int32), *parts[1:]]), r"site-1's training split: .*torch\.int32.*"
                                                                            r"y\.long\(\)"),
        (dict(clients=[*parts[:2], _relabel(parts[2], 0, 0, torch.float32)]), r"site-3's training split: .*torch\.float32"),
        (dict(test=fk.Dataset(nan_test, digits.test.y, 10)), r"the test set: 1 of 360 sample\(s\) have NaN or infinite "
                                                            r"features \(rows 3\)"),
        (dict(clients=[parts[0], fk.Dataset(inf_train, parts[1].y, 10), parts[2]]), r"site-2's training split: 1 of \d+ "
                                                                                     r"sample\(s\) have NaN or infinite"),
    ]
    for changes, match in cases:
        args = dict(workflow=fk.FedAvg(rounds=1), model=lambda: fk.models.for_data(digits), clients=parts,
                    test=digits.test, out=tmp_path / "run")
        with pytest.raises(fk.ConfigError, match=match):
            fk.Simulator(**{**args, **changes})
    assert not (tmp_path / "run").exists()


def test_a_client_with_an_empty_training_split_is_refused_at_build(digits):
    """Issue 18 item 9: such a client took part in every round with 0 samples."""
    parts = list(fk.data.iid(digits.train.subset(range(300)), clients=3, seed=0))
    model = lambda: fk.models.for_data(digits)  # noqa: E731
    with pytest.raises(fk.ConfigError, match=r"site-1 has no training samples.*val_fraction=0\.9 holds out all 2 of its "
                                             r"samples for validation; lower val_fraction"):
        fk.Simulator(fk.FedAvg(rounds=1), model=model, clients=[parts[0].subset([0, 1]), *parts[1:]], val_fraction=0.9)
    with pytest.raises(fk.ConfigError, match=r"site-2 has no training samples.*ClientData has an empty train set"):
        fk.Simulator(fk.FedAvg(rounds=1), model=model,
                     clients=[ClientData(p.subset([]) if i == 1 else p, p) for i, p in enumerate(parts)])
    fk.Simulator(fk.FedAvg(rounds=1), model=model, clients=[parts[0].subset([0, 1]), *parts[1:]], val_fraction=0.5)


def test_a_model_builder_returning_one_instance_is_refused(digits):
    """Issue 18 item 9: one shared instance gave different runs and a misleading resume refusal."""
    net = fk.models.for_data(digits)
    parts = fk.data.iid(digits.train.subset(range(300)), clients=3, seed=0)
    with pytest.raises(fk.ConfigError, match=r"model\(\) returned the same MLP instance twice; return a new model each "
                                             r"call, e.g. lambda: Net\(\)"):
        fk.Simulator(fk.FedAvg(rounds=1), model=lambda: net, clients=parts)
    fk.Simulator(fk.FedAvg(rounds=1), model=net, clients=parts)  # the instance itself is copied: accepted


def test_a_workflow_whose_rounds_is_not_a_whole_number_is_refused_at_build(tiny_model):
    """Issue 18 item 9: rounds="three" on a controller of one's own was accepted."""
    for bad in ("three", True, -1, 1.5, None.__class__):
        wf = type("Mine", (fk.Controller,), {"rounds": bad, "control_flow": lambda self, fl: None})()
        with pytest.raises(fk.ConfigError, match=r"Mine\.rounds must be a whole number >= 1.*got "):
            fk.Simulator(wf, model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1)))
    for good in (0, 2):  # 0: a workflow that records no round (FedStats, CrossSiteEval)
        wf = type("Mine", (fk.Controller,), {"rounds": good, "control_flow": lambda self, fl: None})()
        fk.Simulator(wf, model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1)))


def test_a_controller_that_runs_no_round_does_not_end_done_and_complete(tiny_model, tmp_path):
    """Issue 18 item 9: a controller planning 3 rounds that ran none ended "done, complete: true"."""
    class Idle(fk.Controller):
        rounds = 3

        def control_flow(self, fl):
            fl.broadcast_and_wait(fk.Task("train", fl.model.task_data({})))

    sim = fk.Simulator(Idle(), model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1)), out=tmp_path / "r")
    with pytest.raises(fk.simulator.IncompleteRun, match=r"Idle plans 3 round\(s\) but its control_flow returned after 0: "
                                                          r"the run is not complete.*`with fl\.round\(r\) as rnd:` block.*fl\.stop\(reason\)"):
        sim.run(progress=False)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert (summary["status"], summary["complete"], summary["rounds"], summary["rounds_planned"]) == ("failed", False, 0, 3)
    assert summary["error"].startswith("IncompleteRun: Idle plans 3")


class _Ends(fk.Controller):
    """Ends the rounds ``order``, the weights scaled by ``scales[i]`` first (NaN makes the model non-finite)."""

    def __init__(self, order, scales=None):
        self.order, self.scales, self.rounds = order, scales or [1.0] * len(order), len(order)

    def control_flow(self, fl):
        for rnd, scale in zip(self.order, self.scales):
            replies = fl.broadcast_and_wait(fk.Task("train", fl.model.task_data({}), round=rnd))
            fl.server.weights = {k: v + scale for k, v in fl.server.weights.items()}
            fl.end_round(rnd, replies, time.perf_counter())


def test_a_controller_that_writes_nan_weights_fails_keeping_the_last_good_round(tiny_model, tmp_path):
    """Issue 18 item 9: NaN weights ended "done" with a NaN model."""
    sim = fk.Simulator(_Ends([0, 1, 2], [1.0, math.nan, 1.0]), model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1)),
                       out=tmp_path)
    with pytest.raises(fk.UpdateError, match=r"round 1: _Ends left NaN or infinite values in the global model \(weight\); "
                                             r"the run stops with round 0's model \(and its checkpoint\)"):
        sim.run(progress=False)
    run = sim.last_run
    assert run.status == "failed" and len(run.history) == 1
    assert run.weights["weight"].item() == sim.initial_weights()["weight"].item() + 1.0  # round 0's model, finite
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.round == 0 and fk.weights.sha256(ckpt.weights) == run.model_sha256
    assert json.loads((tmp_path / "summary.json").read_text())["model_sha256"] == run.model_sha256


def test_end_round_refuses_a_round_that_does_not_follow_the_last(tiny_model, tmp_path):
    """Issue 18 item 9: end_round took rounds 0, 0, 5 and wrote a checkpoint that resume later refused."""
    for order, match in (([0, 0, 5], r"_Ends ended round 0, but the last round recorded is 0: rounds go 0, 1, 2, \.\.\. "
                                     r"with one `with fl\.round\(r\)` block each, so this one must be round 1"),
                         ([1, 2], r"_Ends ended round 1, but no round is recorded yet.*must be round 0")):
        sim = fk.Simulator(_Ends(order), model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1)), out=tmp_path,
                           overwrite=True)
        with pytest.raises(fk.ConfigError, match=match):
            sim.run(progress=False)
    # FedAvg in a Chain, and resumed, still numbers its rounds on from the last one recorded
    sim = fk.Simulator(fk.Chain(fk.FedAvg(rounds=1), fk.FedAvg(rounds=2)), model=tiny_model,
                       clients=toy_clients(fixed_diff(1.0, 1)), out=tmp_path / "chain")
    sim.run(progress=False)
    assert [r.round for r in checkpoint.load(tmp_path / "chain").history] == [0, 1, 2]


# ---- a run stuck "running": every way a run ends sets a final status, writes the summary, releases the lock

class _OddExit(BaseException):
    """Neither an Exception nor a KeyboardInterrupt, like GeneratorExit."""


def _exits(error):
    def execute(task, ctx, abort):
        raise error
    return execute


class _ExitingController(fk.Controller):
    rounds = 1

    def control_flow(self, fl):
        raise SystemExit(4)


@pytest.mark.parametrize("where, error", [("executor", SystemExit(3)), ("control_flow", SystemExit(4)),
                                          ("executor", _OddExit("odd"))])
def test_a_run_stuck_running_when_user_code_raises_systemexit(tmp_path, tiny_model, where, error):
    out = tmp_path / "r"
    workflow = _ExitingController() if where == "control_flow" else fk.FedAvg(rounds=2)
    sim = fk.Simulator(workflow, model=tiny_model, clients=toy_clients(_exits(error)), out=out)
    run = sim.start()
    assert run._done.wait(30)
    with pytest.raises(fk.simulator.RunExited, match=rf"raised {type(error).__name__}\(") as e:
        run.wait(5)
    assert run.status == "failed" and type(e.value.__cause__) is type(error)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and type(error).__name__ in summary["error"]
    assert not (out / "run.lock").exists() and fk.rundir.holder(out) is None
    sim.overwrite = True
    with pytest.raises(fk.simulator.RunExited):  # run(): the same failure, raised, and never an exit of the caller
        sim.run(progress=False)
    assert sim.last_run.status == "failed" and not (out / "run.lock").exists()


class _Spinning(fk.Controller):
    """A control_flow that loops without sending a task: it never meets the abort (``stop`` ends it after the test)."""
    rounds = 1

    def __init__(self):
        self.stop = threading.Event()

    def control_flow(self, fl):
        while not self.stop.is_set():
            time.sleep(0.01)


def test_a_run_stuck_running_when_control_flow_spins_ends_after_the_grace(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(fk.simulator, "ABORT_GRACE", 0.5)
    out = tmp_path / "r"
    spinning = _Spinning()
    run = fk.Simulator(spinning, model=tiny_model, clients=toy_clients(fixed_diff(1.0, 1)), out=out).start()
    time.sleep(0.2)
    assert run.status == "running" and (out / "run.lock").exists()
    t0 = time.perf_counter()
    with pytest.warns(RuntimeWarning, match=r"did not end within 0.5 s .*keeps running as a daemon thread"):
        run.abort("stop button")
        assert run._done.wait(10)
    assert time.perf_counter() - t0 < 0.5 + 1.0  # the grace, and a poll or two
    assert run.wait(1).status == "aborted" and run.error is None
    assert run.history.events[-1]["reason"].startswith("stop button (the workflow's control_flow did not end")
    assert json.loads((out / "summary.json").read_text())["status"] == "aborted"
    assert not (out / "run.lock").exists() and fk.rundir.holder(out) is None
    left = [t for t in threading.enumerate() if t.name == "fedkit-controller"]
    assert left and all(t.daemon for t in left)  # left behind, as the warning says
    spinning.stop.set()


# ---- disk full: a write that fails leaves no temporary file behind, and the run can be saved (resumed) later

def _disk_full(monkeypatch, full):
    """Writes to a path for which ``full(path)`` is true write half their bytes, then fail as a full disk does."""
    import builtins
    import errno
    import pathlib

    from fedkit import history

    def enospc(path):
        return OSError(errno.ENOSPC, "No space left on device", str(path))

    class Half:
        def __init__(self, f, path):
            self.f, self.path = f, path

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            raise enospc(self.path)

    def opening(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return Half(f, path) if "w" in mode and full(pathlib.Path(path)) else f

    write_bytes = pathlib.Path.write_bytes

    def writing(self, data):
        if full(self):
            write_bytes(self, data[: len(data) // 2])
            raise enospc(self)
        return write_bytes(self, data)

    monkeypatch.setattr(history, "open", opening, raising=False)  # write_atomic's
    monkeypatch.setattr(pathlib.Path, "write_bytes", writing)


def _leftovers(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.startswith(".plotly") or p.name.endswith((".tmp", ".partial")))


def test_disk_full_leaves_no_plotlyjs_temp_and_resume_succeeds(tmp_path, tiny_model, monkeypatch):
    out = tmp_path / "runs" / "r"
    _disk_full(monkeypatch, lambda p: p.name.startswith(".plotly.min.js"))  # the shared 4.8 MB copy, in runs/
    run = _out_sim(tiny_model, out).start()
    assert run._done.wait(30) and run.status == "failed"
    assert "No space left on device" in str(run.error)
    assert _leftovers(tmp_path) == []  # in runs/ (the shared copy's folder) and in the run directory
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"  # not the "done" written before
    monkeypatch.undo()  # space freed
    resumed = _out_sim(tiny_model, out).resume(progress=False)
    assert resumed.status == "done" and (out / "plot.html").is_file() and (tmp_path / "runs" / "plotly.min.js").is_file()
    assert json.loads((out / "summary.json").read_text())["status"] == "done" and _leftovers(tmp_path) == []


def test_disk_full_leaves_no_partial_checkpoint_and_resume_succeeds(tmp_path, tiny_model, monkeypatch):
    out = tmp_path / "r"
    whole = _out_sim(tiny_model, None, rounds=3).run(progress=False)
    _disk_full(monkeypatch, lambda p: "round-00001.partial" in p.parts)  # the second round's checkpoint
    with pytest.raises(OSError, match="No space left on device"):
        _out_sim(tiny_model, out, rounds=3).run(progress=False)
    assert _leftovers(tmp_path) == [] and checkpoint.load(out).round == 0
    monkeypatch.undo()
    resumed = _out_sim(tiny_model, out, rounds=3).resume(progress=False)
    assert resumed.status == "done" and resumed.model_sha256 == whole.model_sha256 and _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------ issue 20 item 3: the split simulator

class _Recorded(fk.global_model.Encryption):
    """A stand-in scheme (no TenSEAL): its hooks record that the simulator called them, and the model stays plain."""

    def __init__(self):
        self.calls = []

    def provision(self, clients, initial, saved=None):
        self.calls.append(("provision", sorted(clients), {k: v.clone() for k, v in initial.items()}, saved))
        model = fk.PlainModel(initial)
        model.encryption = self
        return model

    def check_saved(self, server_state):
        self.calls.append(("check_saved",))

    def decrypt(self, model, client_state):
        self.calls.append(("decrypt",))
        return model.weights


def test_provisioning_is_the_workflows_encryption_hook(tiny_model):
    he = _Recorded()
    run = fk.Simulator(fk.FedAvg(rounds=2, he=he), model=tiny_model,
                       clients=toy_clients(fixed_diff(1.0, 1), fixed_diff(3.0, 1))).run(progress=False)
    assert run.status == "done" and run.weights["weight"].item() == 1.0 + 2 * 2.0
    (kind, clients, initial, saved), = he.calls  # once, before the first round, with the run's own clients
    assert (kind, clients, saved) == ("provision", ["c0", "c1"], None) and initial["weight"].item() == 1.0
    assert run.history.results["he"] == {}  # what the provisioned model says of its encryption (a plain one: nothing)


def test_a_run_is_changed_only_by_its_own_methods():
    """No module of fedkit but run.py writes a Run's private fields (the simulator drives a run through its methods)."""
    root = Path(fk.__file__).parent
    writes = [f"{p.relative_to(root)}:{n}: {line.strip()}" for p in sorted(root.rglob("*.py")) if p.name != "run.py"
              for n, line in enumerate(p.read_text().splitlines(), 1)
              if re.search(r"\brun\._\w+(\s*,\s*\w+(\.\w+)?)*\s*=(?!=)|__dict__\.pop\(", line)]
    assert writes == []
    sim = fk.Simulator(fk.FedAvg(rounds=1), model=lambda: torch.nn.Linear(1, 1), clients=toy_clients(fixed_diff(1.0, 1)))
    run = sim.start().wait(10)
    assert run.status == "done" and run.done and run._lock is None and run._thread is None and run._live is None



def test_a_client_with_data_of_its_own_kind_builds_and_runs(tiny_model, tmp_path):
    """Review item 5: check_population read c.data.train of every fk.Client; one whose data is no ClientData (a
    client that loads its own data) failed with AttributeError when the simulator was built."""
    own = fk.Client("own", {"path": "/data/site-1"}, {"train": fixed_diff(1.0, 1)})
    sim = fk.Simulator(fk.FedAvg(rounds=1), model=tiny_model, clients=[*toy_clients(fixed_diff(1.0, 1)), own])
    run = sim.run(progress=False)
    assert run.status == "done" and run.history.rounds[0].clients["own"]["status"] == "ok"
    # with a run directory too: config.json names its data instead of reading a train split it does not have
    sim.out = tmp_path / "run"
    assert sim.run(progress=False).status == "done"
    clients = json.loads((tmp_path / "run" / "config.json").read_text())["clients"]
    assert clients.pop("own").startswith("not a ClientData (dict)") and all(isinstance(d, list) for d in clients.values())
