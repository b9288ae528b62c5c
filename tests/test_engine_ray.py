"""The Ray engine: the same bits as the sequential engine, faults and resumes included; aborts and dead workers end."""

import subprocess
import sys
import threading
import time

import pytest
import torch

import fedkit as fk
from fedkit.data import ClientData
from interrupts import interrupted, stop_after  # noqa: E402

ray = pytest.importorskip("ray", reason="the ray engine needs Ray: pip install 'fedkit[ray]'")


@pytest.fixture(scope="module")
def engine():
    """One local Ray (2 CPUs) for the module: starting one costs seconds. It is started from a thread that ends at
    once, as the run's thread of ``Simulator.start()`` would start it: Ray must outlive that thread."""
    e = fk.engine.ray(num_cpus=2)
    starter = threading.Thread(target=e.start)
    starter.start()
    starter.join()
    yield e
    e.close()
    assert not ray.is_initialized()


def sim(digits, engine="sequential", workflow=None, faults=None, out=None, on_round=(), clients=None):
    parts = clients or fk.data.iid(digits.train, clients=4, seed=0)
    return fk.Simulator(workflow or fk.FedAvg(rounds=2), model=lambda: fk.models.for_data(digits), clients=parts,
                        test=digits.test, seed=0, engine=engine, faults=faults, out=out, on_round=list(on_round))


def test_a_dead_kernel_ray_outlives_the_thread_that_started_it(digits, engine):
    """Ray's processes died with the thread that called ray.init (a run's thread, with start()): the next run
    waited 60 s for Ray's GCS, then Ray ended the process. start/wait twice, then run, on one engine."""
    assert ray._private.worker._global_node.remaining_processes_alive()  # the GCS and raylet, after their starter ended
    want = sim(digits).run(progress=False).model_sha256
    started = time.perf_counter()
    runs = [sim(digits, engine).start().wait(timeout=120), sim(digits, engine).start().wait(timeout=120),
            sim(digits, engine).run(progress=False)]
    assert [r.status for r in runs] == ["done"] * 3 and {r.model_sha256 for r in runs} == {want}
    assert time.perf_counter() - started < 60


def test_fedavg_gives_the_sequential_bits_and_puts_client_data_once(digits, engine):
    before = engine.puts.copy()
    run = sim(digits, engine).run(progress=False)
    assert run.status == "done" and run.model_sha256 == sim(digits).run(progress=False).model_sha256
    puts = engine.puts - before
    assert puts["data"] == 4 and puts["client"] == 4  # once per client per run, not per round
    assert puts["task_data"] == 2  # the global weights, once per round for all four clients
    assert run.summary()["engine"] == "ray"


def test_scaffold_client_state_comes_back(digits, engine):
    run = sim(digits, engine, fk.SCAFFOLD(rounds=2)).run(progress=False)
    assert run.status == "done"
    assert run.model_sha256 == sim(digits, workflow=fk.SCAFFOLD(rounds=2)).run(progress=False).model_sha256


def test_faults_give_the_same_history_and_bits(digits, engine):
    faults = fk.Faults(dropout=0.15, crash=0.15, straggle=0.15, corrupt=0.15, seed=3)

    def go(e):
        return sim(digits, e, fk.FedAvg(rounds=3, min_clients=1, task_timeout=60), faults=faults).run(progress=False)

    a, b = go(engine), go("sequential")
    assert a.status == b.status == "done" and a.model_sha256 == b.model_sha256
    def rows(run):
        return [(r.round, n, c["status"]) for r in run.history for n, c in sorted(r.clients.items())]

    def events(run):
        return [(e["round"], e["what"], e.get("client")) for e in run.history.events]

    assert rows(a) == rows(b) and events(a) == events(b)
    assert {s for _, _, s in rows(a)} > {"ok"}  # faults were drawn


def test_checkpoint_and_resume_with_ray(digits, engine, tmp_path):
    whole = sim(digits, workflow=fk.SCAFFOLD(rounds=3)).run(progress=False)
    cut = interrupted(sim(digits, engine, fk.SCAFFOLD(rounds=3), out=tmp_path, on_round=[stop_after(0)]))
    assert cut.status == "aborted" and len(cut.history) == 1
    resumed = sim(digits, engine, fk.SCAFFOLD(rounds=3), out=tmp_path).resume(progress=False)
    assert resumed.status == "done" and resumed.model_sha256 == whole.model_sha256


def test_kept_caches_travel_and_an_attached_engine_leaves_ray_running(digits, engine):
    """Cross-site evaluation submits each client's last trained weights: a cache (``_local_weights``) that travels."""
    from fedkit.workflows import Chain, CrossSiteEval, FedAvg, cross_site_dataframe

    def cse(e):
        return sim(digits, e, Chain(FedAvg(rounds=1), CrossSiteEval())).run(progress=False)

    with fk.engine.ray() as kept:  # Ray runs already (the module's): this one attaches, and leaves it running
        a = cse(kept)
    assert ray.is_initialized()
    b = cse("sequential")
    assert a.status == b.status == "done" and a.model_sha256 == b.model_sha256
    assert cross_site_dataframe(a).equals(cross_site_dataframe(b))


def test_abort_ends_the_run_without_waiting_for_the_workers(digits, engine):
    parts = fk.data.iid(digits.train, clients=4, seed=0)
    long = fk.Simulator(fk.FedAvg(rounds=5), model=lambda: fk.models.for_data(digits), clients=parts, seed=0,
                        train=fk.TrainConfig(epochs=10_000), engine=engine)
    run = long.start()
    time.sleep(1.0)
    t0 = time.perf_counter()
    run.abort("stop button")
    run.wait(timeout=30)
    assert run.status == "aborted" and time.perf_counter() - t0 < 10
    assert run.history.events[-1]["reason"] == "stop button"


def _stuck(task, ctx, abort):
    while True:  # never checks its deadline: the driver must give up on it
        time.sleep(0.05)


def _dies(task, ctx, abort):
    import os
    os._exit(3)  # the worker process dies mid-task


def _fine(task, ctx, abort):
    ctx.state["calls"] = ctx.state.get("calls", 0) + 1
    return fk.DXO("WEIGHT_DIFF", {k: torch.full_like(v, 0.5) for k, v in task.data.data.items()}, {"num_samples": 1})


class _Locked:
    """An executor that cannot be pickled, so cannot be sent to a worker."""

    def __init__(self):
        self.lock = threading.Lock()

    def execute(self, task, ctx, abort):
        return _fine(task, ctx, abort)


def test_a_stuck_client_is_late_and_a_dead_worker_failed(tiny_model, engine):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers need not import this test file
    d = fk.Dataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), 2)
    executors = (_fine, _stuck, _dies, _Locked())
    clients = [fk.Client(f"c{i}", ClientData(d, d), {"train": ex}) for i, ex in enumerate(executors)]
    started = time.perf_counter()
    run = fk.Simulator(fk.FedAvg(rounds=1, min_clients=1, task_timeout=1.0), model=tiny_model, clients=clients,
                       engine=engine).run(progress=False)
    assert time.perf_counter() - started < 30
    row = run.history.rounds[0].clients
    assert row["c0"]["status"] == "ok" and row["c1"]["status"] == "late" and row["c2"]["status"] == "failed"
    assert "deadline" in row["c1"]["error"] and "ray" in row["c2"]["error"]
    assert row["c3"]["status"] == "failed" and "could not send" in row["c3"]["error"]
    assert run.weights["weight"].item() == pytest.approx(1.5)


def test_missing_ray_is_a_config_error_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(fk.ConfigError, match=r"pip install 'fedkit\[ray\]'"):
        fk.engine.ray()


def test_importing_fedkit_does_not_import_ray():
    code = "import sys, fedkit; fedkit.engine.ray; assert 'ray' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
