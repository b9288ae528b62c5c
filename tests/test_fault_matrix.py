"""The fault matrix: every fault kind x {2, 3, 8} clients x {min_clients: all, half}.

Each run must end within a bounded time (no hang, also with a client that blocks forever), either
finished or stopped with `RoundFailed`, and its history must hold every injected fault exactly: the
events' ``(round, client, attempt) -> fault`` equal what `Faults.draw` says for each task a client
pulled and started (one still stuck in an earlier task starts nothing), no more and no less. Retries
must ask only the clients that failed, and each client's row must be the reply that counted.
"""

import threading
import time

import pytest
import torch

import fedkit as fk
from fedkit.data import ClientData
from fedkit.engine import sequential

pytestmark = pytest.mark.usefixtures("one_thread")

RELEASE = threading.Event()  # what the blocking client waits for; set when this module is done
ROUNDS, P, SEED = 3, 0.4, 3
BLOCK_TIMEOUT = 1.0  # the deadline when a client blocks: long enough for a tiny task on a busy machine
LIMIT = 20.0  # seconds any one run may take before the test calls it a hang

# kind -> (Faults settings, task_timeout, how the history reports each injected fault)
KINDS = {
    "dropout": (dict(dropout=P), 30.0, "dropped"),
    "crash": (dict(crash=P), 30.0, "failed"),
    "straggle": (dict(straggle=P), 30.0, "late"),  # stamped an hour late: past the deadline
    "straggle, no deadline": (dict(straggle=P), None, "injected"),  # accepted, but still on record
    **{f"corrupt: {how}": (dict(corrupt=P, corruptions=(how,)), 30.0, "rejected")
       for how in ("nan", "inf", "keys", "shape", "scale")},  # every corruption screened, also 'scale' with 2 clients
    "block": (None, BLOCK_TIMEOUT, "late"),  # the last client never returns from its executor
    "block + crash": (dict(crash=P), BLOCK_TIMEOUT, "failed"),  # and every client, the blocked one too, may crash
}


@pytest.fixture(scope="module", autouse=True)
def release_blocked_clients():
    warm = federation(1, None, block=False)[0]  # a process's first training task is slow (lazy set-up): not in a run
    warm.handle(fk.Task("train", fk.DXO(fk.DataKind.WEIGHTS, dict(model().state_dict()))), torch.device("cpu"), fk.Signal())
    yield
    RELEASE.set()  # the blocked tasks end with the module; wait for them, so none is still busy at exit
    until = time.monotonic() + 10
    while any(t.name.startswith("fedkit-site-") for t in threading.enumerate()) and time.monotonic() < until:
        time.sleep(0.01)


def blocked(task, ctx, abort):
    RELEASE.wait()  # checks no deadline and no abort signal
    raise RuntimeError("released at the end of the test module")


def model():
    return torch.nn.Linear(4, 2)


def federation(n, faults, block):
    x = torch.randn(16 * n, 4, generator=torch.Generator().manual_seed(0))
    parts = fk.data.iid(fk.Dataset(x, (x[:, 0] > 0).long(), 2), n, seed=0)
    clients = [fk.Client(f"site-{i + 1}", ClientData(p, p.subset([])),
                         {"train": fk.Trainer(model, fk.TrainConfig(lr=0.1, validate=False))}, faults=faults)
               for i, p in enumerate(parts)]
    if block:
        last = clients[-1]
        clients[-1] = fk.Client(last.name, last.data, {"train": blocked}, faults=faults)
    return clients


def logging_engine(asked):
    """The standard engine, noting (round, client, attempt) of every task a client pulls."""
    def engine(clients, server, device, abort):
        if not hasattr(server, "_logged"):
            pull = server.pull

            def logged(name):
                task = pull(name)
                if task is not None:
                    asked.append((task.round, name, task.attempt))
                return task

            server.pull, server._logged = logged, True
        sequential(clients, server, device, abort)
    return engine


@pytest.mark.parametrize("half", [False, True], ids=["min_clients=all", "min_clients=half"])
@pytest.mark.parametrize("n", [2, 3, 8])
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_injected_fault_is_on_record_and_no_run_hangs(kind, n, half):
    settings, timeout, reported = KINDS[kind]
    faults = fk.Faults(**settings, seed=SEED) if settings else None
    asked = []
    workflow = fk.FedAvg(rounds=ROUNDS, min_clients=max(1, n // 2) if half else None, max_retries=2,
                         task_timeout=timeout)
    block = kind.startswith("block")
    sim = fk.Simulator(workflow, model=model, clients=federation(n, faults, block=block),
                       engine=logging_engine(asked))
    started = time.perf_counter()
    run = sim.start()
    try:
        run.wait(LIMIT)
    except fk.RoundFailed:
        pass
    seconds = time.perf_counter() - started
    assert run.done, f"the run hung: still {run.status} after {LIMIT} s"
    assert run.status == "done" or isinstance(run.error, fk.RoundFailed), run.error
    events = run.history.events

    # every injected fault, exactly: what Faults.draw says for each task pulled and started (a client still stuck
    # in an earlier task starts nothing)
    unstarted = {(e["round"], e["client"], e["attempt"]) for e in events
                 if "client" in e and e["reason"].startswith("late: still busy")}
    injected = {(r, c, a): faults.draw(r, c, a) for r, c, a in asked
                if faults is not None and faults.draw(r, c, a) and (r, c, a) not in unstarted}
    recorded = {(e["round"], e["client"], e["attempt"]): e["fault"] for e in events if "fault" in e}
    assert recorded == injected
    assert injected or block or faults is None, "this combination injected nothing: pick another SEED"
    assert all(e["what"] == reported for e in events if "fault" in e), [e for e in events if "fault" in e]
    assert all(e["reason"] for e in events)
    if kind == "corrupt: scale":
        assert all("norm" in e["reason"] for e in events if "fault" in e)

    # retries ask only the clients that failed; each client's row is the reply that counted
    failed = {(e["round"], e["client"], e["attempt"]) for e in events if "client" in e and e["what"] != "injected"}
    assert all((r, c, a - 1) in failed for r, c, a in asked if a > 0)
    assert len(asked) == len(set(asked))
    for record in run.history:
        for client, row in record.clients.items():
            assert (record.round, client, row["attempt"]) in asked
            assert ((record.round, client, row["attempt"]) in failed) == (row["status"] != "ok")
            assert all((record.round, client, a) in failed for a in range(row["attempt"]))

    if block:
        blocker = f"site-{n}"
        assert {(e["round"], e["attempt"]) for e in events if e.get("client") == blocker} == \
               {(r, a) for r, c, a in asked if c == blocker}
        assert all(e["what"] == ("failed" if "fault" in e else "late") for e in events if e.get("client") == blocker)
        assert unstarted or kind != "block"
        assert seconds < BLOCK_TIMEOUT + 4  # one wait for the deadline; afterwards the client is skipped as busy
        stuck = [t for t in threading.enumerate() if t.name.startswith(f"fedkit-{blocker}-")]
        assert len(stuck) <= 12  # one per run at most (this module has twelve runs with a blocker)
    else:
        assert seconds < 10
