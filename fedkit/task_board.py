"""The task board: the server's queue of tasks that clients pull, and the replies they send back.

`Server` holds the global model (plaintext or encrypted) and the board; `Channel` carries the controller's
orders (do the posted work, a round ended) to the clients' side, which runs in the caller's thread.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from .errors import Unreadable
from .exchange import DXO, Filter, FilterContext, Reply, Task, Weights, apply_filters
from .global_model import GlobalModel, PlainModel
from .history import RoundRecord
from .status import Status


class Server:
    """Holds the global model (a `GlobalModel`: plaintext or encrypted) and the task board.

    It holds no client object and no client secret: what it knows of the clients is their names and
    what their filters let through.
    """

    def __init__(self, model: GlobalModel | Weights, task_data_filters: Sequence[Filter] = (),
                 result_filters: Sequence[Filter] = ()) -> None:
        self.model = model if isinstance(model, GlobalModel) else PlainModel(model)
        self.state: dict = {}  # run-time state of the workflow (e.g. "server_opt" moments), checkpointed each round
        self.task_data_filters = list(task_data_filters)
        self.result_filters = list(result_filters)
        self._queues: dict[str, deque[Task]] = {}
        self._replies: dict[str, dict[str, Reply]] = {}
        self._started: dict[tuple[str, str], float] = {}  # (task id, client) of the replies still awaited
        self._closed: set[str] = set()  # tasks already collected: an answer to one comes too late and is ignored
        self._ids = itertools.count()
        self._sized: tuple[DXO, int] | None = None  # the last task data pulled, and its size in bytes
        self._lock = threading.Lock()

    @property
    def weights(self) -> Weights:
        """The global model's weights; `Unreadable` when the server holds it encrypted."""
        return self.model.weights

    @weights.setter
    def weights(self, value: Weights) -> None:
        if not self.model.readable:
            raise Unreadable("the server holds the global model encrypted and cannot set its weights in plaintext; "
                             "move it with fl.model.update(results)")
        self.model.weights = value

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
            if not queue:  # the board holds the clients with work only, not every client ever sampled
                del self._queues[client]
        data = apply_filters(self.task_data_filters, task.data, FilterContext("server", "task", client, task))
        sized = self._sized  # the same DXO goes to every client of a round (without filters): size it once
        if sized is None or sized[0] is not data:
            sized = self._sized = (data, data.nbytes)
        with self._lock:
            self._replies[task.id][client] = Reply(client, task, bytes_down=sized[1])
            self._started[(task.id, client)] = time.perf_counter()
        return replace(task, data=data)

    def submit(self, client: str, task: Task, result: DXO, delay: float = 0.0) -> None:
        """Accept ``client``'s result for ``task`` through the server's result filters.

        ``delay`` adds simulated seconds to the reply's time (fault injection's stragglers). An answer
        to a task already collected, or already settled (marked late), is ignored.
        """
        reply = self._reply(client, task)
        if reply is None:
            return
        reply.seconds += delay
        reply.bytes_up = result.nbytes
        if task.deadline is not None and reply.seconds > task.deadline:
            reply.reject(Status.LATE, f"late: answered after {reply.seconds:.3g} s, the deadline is "
                                      f"{task.deadline:g} s")
            return
        reply.result = apply_filters(self.result_filters, result, FilterContext("server", "result", client, task))
        reply.status = Status.OK

    def fail(self, client: str, task: Task, error: str, detail: str = "", status: Status = Status.FAILED) -> None:
        """Record that ``client`` could not complete ``task`` (ignored once the reply is settled or collected)."""
        reply = self._reply(client, task)
        if reply is not None:
            reply.error, reply.detail, reply.status = error, detail, status

    def note_fault(self, client: str, task: Task, fault: dict[str, Any]) -> None:
        """Fault injection: record on ``client``'s reply to ``task`` what was injected, for the history.

        The simulation's ground truth, so that every injected fault shows in the events whether or not
        a screen caught it; no screen reads it.
        """
        with self._lock:
            reply = self._replies.get(task.id, {}).get(client)
            if reply is not None:
                reply.injected = dict(fault)

    def _reply(self, client: str, task: Task) -> Reply | None:
        """``client``'s awaited reply to ``task``, claimed for its answer (with its time); None when the task was
        collected or the reply already settled (a late answer, or a second one): such answers are ignored."""
        with self._lock:
            replies = self._replies.get(task.id)
            if replies is None and task.id in self._closed:
                return None
            if replies is None or client not in replies:
                raise LookupError(f"client {client!r} answered task {task.id!r}, which it was never given")
            started = self._started.pop((task.id, client), None)
            if started is None:
                return None
            reply = replies[client]
        reply.seconds = time.perf_counter() - started
        return reply

    def collect(self, task: Task) -> dict[str, Reply]:
        """The replies to ``task`` (one per client that pulled it), removing them from the board.

        A client that pulled the task and never answered is marked ``dropped``.
        """
        with self._lock:
            replies = self._replies.pop(task.id, {})
            self._closed.add(task.id)
            for reply in replies.values():
                if reply.status == Status.PENDING:
                    reply.status, reply.error = Status.DROPPED, "no answer: the client dropped out"
                    self._started.pop((task.id, reply.client), None)
        return replies


@dataclass
class Order:
    """One request from the server's side to the clients' side: let ``targets`` work, or a round ended."""

    kind: str  # "work" or "round"
    targets: tuple[str, ...] = ()
    record: RoundRecord | None = None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Channel:
    """The one link from the server's side (the controller's thread) to the clients' side (the simulator).

    The controller posts tasks on the server's board and asks, through the channel, that the
    targeted clients work; it waits until they have. Only names and round records cross it, so
    nothing the server or a controller can reach holds a client object or a client's secret.
    """

    def __init__(self) -> None:
        self._orders: "queue.Queue[Order | None]" = queue.Queue()
        self.serving = False  # set by whoever answers the orders (fedkit.simulator.serve)

    def request(self, order: Order) -> None:
        """Hand ``order`` to the clients' side and wait for it to be done; re-raise what it failed with."""
        if not self.serving:  # nobody would answer: refuse rather than wait forever
            raise RuntimeError("no clients' side serves this ServerContext's channel; run the controller through a "
                               "fk.Simulator, or fedkit.simulator.serve(controller.control_flow, fl, clients)")
        self._orders.put(order)
        order.done.wait()
        if order.error is not None:
            raise order.error

    def next(self, timeout: float | None = None) -> Order | None:
        """The next order (the clients' side); None when the server's side has finished."""
        return self._orders.get(timeout=timeout)

    def close(self) -> None:
        """Tell the clients' side that no more orders come."""
        self.serving = False
        self._orders.put(None)
