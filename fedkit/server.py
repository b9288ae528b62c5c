"""The server: global model, a task board that clients pull from, and the controller's toolbox.

A `Controller` (workflow) never talks to clients directly. It posts tasks with
`ServerContext.broadcast_and_wait` / `send_and_wait`; the engine lets the targeted clients pull
and run them; replies come back through the server's result filters.
"""

from __future__ import annotations

import itertools
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from .errors import ConfigError, UpdateError
from .exchange import DXO, Filter, FilterContext, MetaKey, Signal, Task, Weights, apply_filters

if TYPE_CHECKING:
    from .client import Client
    from .history import History, RoundRecord


@dataclass
class Reply:
    """What came back from one client for one task: a result or an error, with its cost."""

    client: str
    task: Task
    result: DXO | None = None
    error: str = ""
    detail: str = ""  # the traceback, for debugging a failing executor
    seconds: float = 0.0
    bytes_down: int = 0  # task data as sent, after the server's task-data filters
    bytes_up: int = 0  # result as sent, after the client's result filters
    status: str = "pending"  # ok, failed (raised), dropped (no answer), late (past the deadline), rejected (screened out)

    @property
    def ok(self) -> bool:
        return self.result is not None

    def reject(self, status: str, reason: str) -> None:
        """Discard this reply's result, recording why."""
        self.result, self.status, self.error = None, status, reason


class Server:
    """Holds the global model and the task board; it never holds a client's secrets."""

    def __init__(self, weights: Weights, task_data_filters: Sequence[Filter] = (),
                 result_filters: Sequence[Filter] = ()) -> None:
        self.weights = weights
        self.state: dict = {}  # run-time state of the workflow (e.g. "server_opt" moments), checkpointed each round
        self.task_data_filters = list(task_data_filters)
        self.result_filters = list(result_filters)
        self._queues: dict[str, deque[Task]] = {}
        self._replies: dict[str, dict[str, Reply]] = {}
        self._started: dict[tuple[str, str], float] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def post(self, task: Task, targets: Sequence[str]) -> Task:
        """Queue ``task`` for each target; returns the task with its id."""
        task = replace(task, id=f"{task.name}-{task.round}-{next(self._ids)}")
        with self._lock:
            self._replies[task.id] = {}
            for name in targets:
                self._queues.setdefault(name, deque()).append(task)
        return task

    def pull(self, client: str) -> Task | None:
        """The next task for ``client`` with the server's task-data filters applied, or None."""
        with self._lock:
            queue = self._queues.get(client)
            if not queue:
                return None
            task = queue.popleft()
        data = apply_filters(self.task_data_filters, task.data, FilterContext("server", "task", client, task))
        with self._lock:
            self._replies[task.id][client] = Reply(client, task, bytes_down=data.nbytes)
            self._started[(task.id, client)] = time.perf_counter()
        return replace(task, data=data)

    def submit(self, client: str, task: Task, result: DXO, delay: float = 0.0) -> None:
        """Accept ``client``'s result for ``task`` through the server's result filters.

        ``delay`` adds simulated seconds to the reply's time (fault injection's stragglers).
        """
        reply = self._reply(client, task)
        reply.seconds += delay
        reply.bytes_up = result.nbytes
        if task.deadline is not None and reply.seconds > task.deadline:
            reply.reject("late", f"late: answered after {reply.seconds:.3g} s, the deadline is {task.deadline:g} s")
            return
        reply.result = apply_filters(self.result_filters, result, FilterContext("server", "result", client, task))
        reply.status = "ok"

    def fail(self, client: str, task: Task, error: str, detail: str = "", status: str = "failed") -> None:
        """Record that ``client`` could not complete ``task``."""
        reply = self._reply(client, task)
        reply.error, reply.detail, reply.status = error, detail, status

    def _reply(self, client: str, task: Task) -> Reply:
        replies = self._replies.get(task.id)
        if replies is None or client not in replies:
            raise LookupError(f"client {client!r} answered task {task.id!r}, which it was never given")
        reply = replies[client]
        reply.seconds = time.perf_counter() - self._started.pop((task.id, client), time.perf_counter())
        return reply

    def collect(self, task: Task) -> dict[str, Reply]:
        """The replies to ``task`` (one per client that pulled it), removing them from the board.

        A client that pulled the task and never answered is marked ``dropped``.
        """
        with self._lock:
            replies = self._replies.pop(task.id, {})
        for reply in replies.values():
            if reply.status == "pending":
                reply.status, reply.error = "dropped", "no answer: the client dropped out"
                self._started.pop((task.id, reply.client), None)
        return replies


Engine = Callable[[Sequence["Client"], Server, torch.device, Signal], None]


@dataclass
class ServerContext:
    """What a controller works with: the server, the clients' names, and the run's services."""

    server: Server
    clients: dict[str, "Client"]
    engine: Engine
    device: torch.device
    abort: Signal
    history: "History"
    seed: int
    evaluate: Callable[[Weights], dict[str, float]] | None = None  # global model on the server's test set
    on_round: list[Callable[["RoundRecord"], None]] = field(default_factory=list)
    start_round: int = 0

    @property
    def client_names(self) -> list[str]:
        return list(self.clients)

    def broadcast_and_wait(self, task: Task, targets: Sequence[str] | None = None) -> dict[str, Reply]:
        """Send ``task`` to ``targets`` (default: all clients) and return their replies by client."""
        targets = self.client_names if targets is None else list(targets)
        unknown = [t for t in targets if t not in self.clients]
        if unknown:
            raise ConfigError(f"unknown client(s) {unknown}; the federation has: {', '.join(self.clients)}")
        self.abort.check()
        posted = self.server.post(task, targets)
        self.engine([self.clients[t] for t in targets], self.server, self.device, self.abort)
        self.abort.check()
        return self.server.collect(posted)

    def send_and_wait(self, task: Task, target: str) -> Reply:
        """Send ``task`` to one client and return its reply."""
        return self.broadcast_and_wait(task, [target])[target]

    def sample_clients(self, k: int | None, round: int) -> list[str]:
        """``k`` clients drawn without replacement for ``round`` (all when k is None), same for the same seed."""
        names = self.client_names
        if k is None or k >= len(names):
            return names
        if k < 1:
            raise ConfigError(f"clients_per_round must be >= 1 (or None for all), got {k}")
        rng = np.random.default_rng([self.seed, round, 1])
        return [names[i] for i in sorted(rng.choice(len(names), size=k, replace=False))]

    def sample_poisson(self, rate: float, round: int) -> list[str]:
        """Each client independently with probability ``rate`` (Poisson sampling, which DP accountants
        assume); possibly none. The same clients for the same seed and round."""
        rng = np.random.default_rng([self.seed, round, 4])  # 4: a stream apart from sample_clients and Cyclic
        draws = rng.random(len(self.client_names))
        return [name for name, u in zip(self.client_names, draws) if u < rate]

    def record_failures(self, replies: dict[str, Reply]) -> None:
        """Add every reply that is not ok to the history's events, with its reason."""
        for name, r in replies.items():
            if not r.ok:
                self.history.events.append({"round": r.task.round, "attempt": r.task.attempt, "client": name,
                                            "what": r.status, "reason": r.error})

    def end_round(self, round: int, replies: dict[str, Reply], started: float, **metrics: float) -> "RoundRecord":
        """Evaluate the global model, record the round in the history, and tell the listeners."""
        from .history import RoundRecord

        if self.evaluate is not None:
            metrics = {**self.evaluate(self.server.weights), **metrics}
        clients = {}
        for name, r in replies.items():
            row = {"status": r.status, "samples": 0, "steps": 0, "seconds": r.seconds, "bytes_down": r.bytes_down,
                   "bytes_up": r.bytes_up}
            if r.ok:
                row.update(samples=r.result.meta.get(MetaKey.NUM_SAMPLES, 0),
                           steps=r.result.meta.get(MetaKey.NUM_STEPS, 0),
                           **r.result.meta.get(MetaKey.METRICS, {}))
            else:
                row["error"] = r.error
            clients[name] = row
        eps = [row["epsilon"] for row in clients.values() if "epsilon" in row]
        if eps:  # DP-SGD clients report a cumulative epsilon that only grows: the federation's worst so far
            metrics.setdefault("client_epsilon", max([*eps, self.history.last("client_epsilon", 0.0)]))
        metrics.setdefault("clients_ok", sum(r.ok for r in replies.values()))
        metrics.setdefault("clients_failed", sum(not r.ok for r in replies.values()))
        metrics.setdefault("bytes_down", sum(r.bytes_down for r in replies.values()))
        metrics.setdefault("bytes_up", sum(r.bytes_up for r in replies.values()))
        record = RoundRecord(round=round, seconds=time.perf_counter() - started, metrics=metrics, clients=clients)
        self.history.append(record)
        for fn in self.on_round:
            fn(record)
        return record


def require_ok(replies: dict[str, Reply], round: int) -> dict[str, DXO]:
    """The results of ``replies``, or an error naming each client that failed and why."""
    failed = {n: r for n, r in replies.items() if not r.ok}
    if failed:
        lines = "; ".join(f"{n}: {r.error or 'no answer'}" for n, r in failed.items())
        raise UpdateError(f"round {round}: {len(failed)} of {len(replies)} client(s) failed ({lines})")
    return {n: r.result for n, r in replies.items()}


class Controller(ABC):
    """A workflow: decides which tasks go to which clients, and what to do with the replies.

    Subclasses implement `control_flow`; a controller holds only its settings, so the same object can
    drive many runs (run-time state lives in the `ServerContext`).
    """

    rounds: int

    @abstractmethod
    def control_flow(self, fl: ServerContext) -> None:
        """Run the workflow to the end, using ``fl.broadcast_and_wait`` and ``fl.end_round``."""
