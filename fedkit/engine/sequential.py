"""The simplest engine: clients work one after another, each task on a worker thread the caller watches.

The calling thread pulls each task, hands the client's answer to a worker thread and waits for it,
checking the run's abort signal every `POLL` seconds. So a client that never returns cannot hang the
run: at the task's deadline (``FedAvg(task_timeout=...)``) its reply is marked ``late`` and the round
goes on; ``run.abort()`` ends the wait at once. Whatever such a task answers later is discarded (the
server ignores answers to tasks already settled or collected).

Worker threads are reused (a new thread would set up torch's OpenMP and MKL state again, milliseconds
per task): a run without a stuck task uses one. A worker stuck in a task stays with it, and the next
task gets another worker. A client whose previous task is still running when it is asked again is
not given a second one: its reply is marked ``late`` at once ("still busy"), so at most one worker
per client is ever stuck, however many rounds it stays blocked. A stuck task still holds its
client's state and may use torch's global random generator, so a run with one is not reproducible
to the bit; runs without one give the same results as running the clients in the calling thread.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
from typing import Callable, Sequence

import torch

from ..client import Answer, Client
from ..exchange import Aborted, Signal, Task
from ..server import Server
from ..status import Status

POLL = 0.05  # seconds between checks of the abort signal while a task runs
GRACE = 0.1  # seconds past the deadline to let a task that checks its deadline report it itself


def sequential(clients: Sequence[Client], server: Server, device: torch.device, abort: Signal) -> None:
    for client in clients:
        abort.check()
        while (task := server.pull(client.name)) is not None:
            answer = still_busy(client)
            if answer is None:
                fault = client.fault(task)
                if fault is not None:
                    server.note_fault(client.name, task, fault)  # fault injection's ground truth, for the history
                answer = supervise(client, task, device, abort, fault)
            client.deliver(server, task, answer)


def still_busy(client: Client) -> Answer | None:
    """A ``late`` answer if ``client`` is still running an earlier task (one that ran past its deadline), else None."""
    busy = client.worker
    if busy is not None and busy.is_alive():
        return Answer(Status.LATE, error=f"late: still busy with an earlier task that ran past its deadline "
                                           f"({busy.name}); this one was not started")
    return None


class Job:
    """One task running on a worker thread: ``done`` once it has answered (or raised)."""

    def __init__(self, name: str, run: Callable[[], Answer]) -> None:
        self.name, self.run = name, run
        self.done = threading.Event()
        self.answer: Answer | None = None
        self.error: BaseException | None = None

    def is_alive(self) -> bool:
        return not self.done.is_set()


class _Worker:
    """A daemon thread that runs jobs one after another; idle between them, in the pool."""

    def __init__(self) -> None:
        self.jobs: "queue.SimpleQueue[Job]" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=IDLE, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        me = threading.current_thread()
        while True:
            job = self.jobs.get()
            me.name = f"fedkit-{job.name}"
            try:
                job.answer = job.run()
            except BaseException as e:  # handed to the waiting thread (Aborted, or a bug)
                job.error = e
            me.name = IDLE
            job.done.set()
            with _lock:
                _running.discard(job)
                _idle.append(self)


IDLE = "fedkit-worker (idle)"
_idle: list[_Worker] = []  # workers free for the next job, shared by every run in this process
_running: set[Job] = set()
_lock = threading.Lock()


def _start(job: Job) -> None:
    with _lock:
        worker = _idle.pop() if _idle else None
        _running.add(job)
    (worker or _Worker()).jobs.put(job)


@atexit.register
def _let_running_jobs_end(seconds: float = 1.0) -> None:
    """At exit, give a task that is still running (a client that was stuck) a moment to end: a daemon thread
    that is inside torch when the interpreter stops can abort the process ("terminate called ...")."""
    until = time.monotonic() + seconds
    while _running and time.monotonic() < until:
        time.sleep(0.01)


def supervise(client: Client, task: Task, device: torch.device, abort: Signal, fault: dict | None = None) -> Answer:
    """``client.answer(task, ...)`` on a worker thread, waited for until it ends, the task's deadline passes
    (a ``late`` answer) or the run is aborted (`Aborted`). The caller checks `still_busy` first."""
    if fault is not None and fault["fault"] == "dropout":
        return client.answer(task, device, abort, fault)  # nothing runs: no worker needed
    # the current CUDA device is a thread's own: give the worker the one this thread would have used
    cuda = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None

    def run() -> Answer:
        if cuda is not None:
            torch.cuda.set_device(cuda)
        return client.answer(task, device, abort, fault)

    job = client.worker = Job(f"{client.name}-{task.id}", run)
    _start(job)
    limit = None if task.deadline is None else time.perf_counter() + task.deadline + GRACE
    while not job.done.wait(POLL if limit is None else max(0.0, min(POLL, limit - time.perf_counter()))):
        if abort.triggered:
            raise Aborted(abort.reason or "aborted")
        if limit is not None and time.perf_counter() >= limit:
            return Answer(Status.LATE, error=f"late: no answer within the task's {task.deadline:g} s deadline; the "
                                               "client is still busy, and whatever it answers later is ignored")
    if job.error is not None:
        raise job.error
    return job.answer
