"""The server: global model, a task board that clients pull from, and the controller's toolbox.

A `Controller` (workflow) never talks to clients directly. It posts tasks with
`ServerContext.broadcast_and_wait` / `send_and_wait`; the engine lets the targeted clients pull
and run them; replies come back through the server's result filters.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Iterator, NoReturn, Sequence

import numpy as np
import torch
from torch import nn

from . import metrics as M
from .errors import ConfigError, Unreadable, UpdateError
from .exchange import DXO, Filter, FilterContext, MetaKey, Reply, Signal, Task, Weights, apply_filters
from .global_model import Encryption, GlobalModel, PlainModel

from .history import History, RoundRecord
from .rounds import Round


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
            reply.reject("late", f"late: answered after {reply.seconds:.3g} s, the deadline is {task.deadline:g} s")
            return
        reply.result = apply_filters(self.result_filters, result, FilterContext("server", "result", client, task))
        reply.status = "ok"

    def fail(self, client: str, task: Task, error: str, detail: str = "", status: str = "failed") -> None:
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
                if reply.status == "pending":
                    reply.status, reply.error = "dropped", "no answer: the client dropped out"
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


class RunStopped(Exception):
    """``fl.stop(reason)`` ended the run on purpose (a spent privacy budget, a plateau): a clean end, not a failure.
    Raised through the controller, whatever runs it (a `Chain` stops too); the simulator ends the run as done."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ServerContext:
    """What a controller works with: the server, the clients' names, and the run's services.

    ``offset`` shifts every round that leaves the controller (in tasks, client sampling, events and
    the history) and is applied by every method here, so a part of a `Chain` cannot escape it.
    """

    server: Server
    client_names: tuple[str, ...]
    channel: Channel
    abort: Signal
    history: History
    seed: int
    evaluate: Callable[[Weights], dict[str, float]] | None = None  # global model on the server's test set
    start_round: int = 0
    offset: int = 0
    validate_task: str = "validate"  # the clients' task that scores a model they can read and the server cannot
    controller: str = "the controller"  # the workflow's name, in the errors of the rounds it ends

    def __post_init__(self) -> None:
        # the global model as the last round left it (here: as this context found it); end_round falls back on it
        model = getattr(self.server, "model", None)
        self.__dict__["_good"] = dict(model.weights) if model is not None and model.readable else None

    @property
    def model(self) -> GlobalModel:
        """The global model (plaintext or encrypted): send it, screen results, update it."""
        return self.server.model

    @property
    def workflow(self) -> Controller | None:
        """The controller whose ``control_flow`` runs now (the innermost, for one that runs another): `Round`
        takes its settings (``min_clients``, ``max_retries``, ...) as defaults."""
        return self.__dict__.get("_workflow")

    @contextmanager
    def running(self, workflow: Controller) -> Iterator[None]:
        """``workflow`` is the running one for the block (`Controller` wraps every ``control_flow`` in it)."""
        outer = self.__dict__.get("_workflow")
        self.__dict__["_workflow"] = workflow
        try:
            yield
        finally:
            self.__dict__["_workflow"] = outer

    def round(self, number: int, *, record: bool = True) -> Round:
        """Round ``number`` (0, 1, 2, ...) as a context manager: ``with fl.round(r) as rnd: fl.model.update(rnd.train())``
        sends, gathers and screens in ``rnd``, and records the round when the block ends (`fedkit.rounds.Round`)."""
        return Round(self, number, record)

    @property
    def next_round(self) -> int:
        """The round in progress (the one a ``with fl.round(r)`` block is in), else the next one to record
        (rounds as the controller numbers them, without ``offset``)."""
        if "_round" in self.__dict__:
            return self.__dict__["_round"]
        rounds = self.history.rounds
        return rounds[-1].round + 1 - self.offset if rounds else self.start_round

    def sample(self, k: int | None = None, *, rate: float | None = None) -> list[str]:
        """The clients of the current round (`next_round`): ``k`` of them drawn without replacement (None: all),
        or each with probability ``rate`` (Poisson sampling); the same for the same seed and round."""
        if k is not None and rate is not None:
            raise ConfigError(f"fl.sample takes k (a number of clients) or rate (Poisson sampling), not both; got "
                              f"k={k!r} and rate={rate!r}")
        if rate is not None:
            return self.sample_poisson(rate, self.next_round)
        return self.sample_clients(k, self.next_round)

    def stop(self, reason: str) -> NoReturn:
        """End the run cleanly now, saying why (a ``stopped`` event): the last completed round stays the result.
        It raises `RunStopped`, which the run takes as the controller's normal end; a round in progress is not recorded."""
        self.event(self.next_round, "stopped", reason=reason)
        raise RunStopped(reason)

    def broadcast_and_wait(self, task: Task, targets: Sequence[str] | None = None) -> dict[str, Reply]:
        """Send ``task`` to ``targets`` (default: all clients) and return their replies by client."""
        targets = list(self.client_names) if targets is None else list(targets)
        known = self.__dict__.get("_known")  # (names, their set): 100 targets of 10,000 clients cost 100 lookups
        if known is None or known[0] is not self.client_names:
            known = self.__dict__["_known"] = (self.client_names, frozenset(self.client_names))
        unknown = [t for t in targets if t not in known[1]]
        if unknown:
            raise ConfigError(f"unknown client(s) {unknown}; the federation has: {', '.join(self.client_names)}")
        self.abort.check()
        posted = self.server.post(replace(task, round=task.round + self.offset), targets)
        self.channel.request(Order("work", tuple(targets)))
        self.abort.check()
        return self.server.collect(posted)

    def send_and_wait(self, task: Task, target: str) -> Reply:
        """Send ``task`` to one client and return its reply."""
        return self.broadcast_and_wait(task, [target])[target]

    def rng(self, round: int, stream: int) -> np.random.Generator:
        """A generator for ``round`` (shifted like everything else) and a ``stream`` of a workflow's own."""
        return np.random.default_rng([self.seed, round + self.offset, stream])

    def sample_clients(self, k: int | None, round: int) -> list[str]:
        """``k`` clients drawn without replacement for ``round`` (all when k is None), same for the same seed."""
        names = list(self.client_names)
        if k is None or k >= len(names):
            return names
        if k < 1:
            raise ConfigError(f"clients_per_round must be >= 1 (or None for all), got {k}")
        rng = self.rng(round, 1)
        return [names[i] for i in sorted(rng.choice(len(names), size=k, replace=False))]

    def sample_poisson(self, rate: float, round: int) -> list[str]:
        """Each client independently with probability ``rate`` (Poisson sampling, which DP accountants
        assume); possibly none. The same clients for the same seed and round."""
        draws = self.rng(round, 4).random(len(self.client_names))  # 4: a stream apart from sample_clients and Cyclic
        return [name for name, u in zip(self.client_names, draws) if u < rate]

    def event(self, round: int, what: str, **fields: Any) -> None:
        """Record an event of ``round`` (a stop, a warning) in the history."""
        self.history.events.append({"round": round + self.offset, "what": what, **fields})

    def record_failures(self, replies: dict[str, Reply]) -> None:
        """Add every reply that is not ok to the history's events, with its reason (rounds as sent).

        With fault injection, every injected fault shows too: a failure it caused carries ``fault`` (and
        the corruption), and one that went unnoticed (a reply that passed every check) is an event of
        its own, ``what: "injected"``. So the events hold every injected fault, screened or not.
        """
        for name, r in replies.items():
            if r.ok and not r.injected:
                continue
            entry = {"round": r.task.round, "attempt": r.task.attempt, "client": name,
                     "what": r.status if not r.ok else "injected", "reason": r.error if not r.ok else _unnoticed(r)}
            if r.task.name == self.validate_task:
                entry.update(task=r.task.name, reason=f"{r.task.name} task: {entry['reason']}")
            if r.injected:
                entry.update(r.injected)
            self.history.events.append(entry)

    def score_on_clients(self, targets: Sequence[str], round: int) -> dict[str, float]:
        """Send the global model to ``targets`` to score on their validation splits; their weighted mean.

        This is how a round is scored when the server cannot read its model (HE). Clients need a
        ``validate`` executor (the simulator's dataset clients have `fedkit.train.Evaluator`).
        Failed or implausible answers are left out and recorded as events.
        """
        replies = self.broadcast_and_wait(Task(self.validate_task, self.model.task_data({}), round=round), targets)
        self.model.observe(replies)
        samples = loss = correct = 0.0
        scored = 0
        for name, r in replies.items():
            if r.ok:
                acc, lo, n = r.result.data.get("accuracy"), r.result.data.get("loss"), r.result.meta.get(MetaKey.NUM_SAMPLES)
                if n == 0:
                    continue  # an empty validation split scores nothing
                if not (_finite(acc) and 0 <= acc <= 1 and _finite(lo) and lo >= 0 and _finite(n) and n > 0):
                    r.reject("rejected", f"client {name!r} answered the validation with accuracy {acc!r}, loss {lo!r} "
                                         f"on {n!r} samples; expected an accuracy in [0, 1], a loss >= 0 and a sample count")
                else:
                    samples, loss, correct, scored = samples + n, loss + lo * n, correct + acc * n, scored + 1
        self.record_failures(replies)
        if not samples:
            return {M.CLIENT_ACCURACY: math.nan, M.CLIENT_LOSS: math.nan, M.CLIENTS_VALIDATED: 0}
        return {M.CLIENT_ACCURACY: correct / samples, M.CLIENT_LOSS: loss / samples, M.CLIENTS_VALIDATED: scored}

    def end_round(self, round: int, replies: dict[str, Reply], started: float, **metrics: float) -> RoundRecord:
        """Score the global model, record the round in the history, and hand it to the clients' side
        (checkpoint, progress, listeners).

        The server scores a model it can read on its test set (when it has one); a model it cannot
        read is scored by the round's clients on their validation splits.

        Refused: a round that does not follow the last one recorded (rounds go 0, 1, 2, ...), and a readable
        model holding NaN or infinite values, which is put back to the last round's before the run fails.
        """
        self._check_round(round)
        if not self.model.readable:
            metrics = {**self.score_on_clients(list(replies), round), **metrics}
        elif self.evaluate is not None:
            metrics = {**self.evaluate(self.model.weights), **metrics}
        metrics = {**self.model.round_metrics(), **metrics}
        clients = {}
        for name, r in replies.items():
            row = {"status": r.status, "attempt": r.task.attempt, "samples": 0, "steps": 0, "seconds": r.seconds,
                   "bytes_down": r.bytes_down, "bytes_up": r.bytes_up}
            if r.injected:
                row["fault"] = r.injected["fault"]
            if r.ok:
                row.update(samples=r.result.meta.get(MetaKey.NUM_SAMPLES, 0),
                           steps=r.result.meta.get(MetaKey.NUM_STEPS, 0),
                           **r.result.meta.get(MetaKey.METRICS, {}))
            else:
                row["error"] = r.error
            clients[name] = row
        metrics.setdefault(M.CLIENTS_OK, sum(r.ok for r in replies.values()))
        metrics.setdefault(M.CLIENTS_FAILED, sum(not r.ok for r in replies.values()))
        metrics.setdefault(M.BYTES_DOWN, sum(r.bytes_down for r in replies.values()))
        metrics.setdefault(M.BYTES_UP, sum(r.bytes_up for r in replies.values()))
        record = RoundRecord(round=round + self.offset, seconds=time.perf_counter() - started, metrics=metrics,
                             clients=clients)
        self.history.append(record)
        if self.model.readable:
            self.__dict__["_good"] = dict(self.model.weights)  # tensors are replaced, never edited in place
        self.channel.request(Order("round", record=record))
        return record

    def _check_round(self, round: int) -> None:
        """Refuse to end ``round`` unless it follows the last round recorded and leaves a finite global model."""
        rounds = self.history.rounds
        expected = rounds[-1].round + 1 if rounds else self.start_round + self.offset
        given = round + self.offset if isinstance(round, int) and not isinstance(round, bool) else round
        if given != expected:
            last = f"the last round recorded is {rounds[-1].round}" if rounds else "no round is recorded yet"
            raise ConfigError(f"{self.controller} ended round {given!r}, but {last}: rounds go 0, 1, 2, ... with one "
                              f"fl.end_round each, so this one must be round {expected - self.offset}")
        if not self.model.readable:
            return  # the server cannot read it; the clients that decrypt it score it
        weights = self.model.weights
        bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            good = self.__dict__.get("_good")
            if good is not None:
                self.server.weights = good
            kept = f"round {rounds[-1].round}'s" if rounds else "the initial"
            names = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
            raise UpdateError(f"round {given}: {self.controller} left NaN or infinite values in the global model "
                              f"({names}); the run stops with {kept} model (and its checkpoint) as the last good one. "
                              "Check the aggregation rule, the server optimizer's settings (a learning rate too large) "
                              "or the controller's own arithmetic")


def _finite(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _unnoticed(reply: Reply) -> str:
    """Why an injected fault left no failure: the reply it damaged passed every check."""
    fault = reply.injected or {}
    if fault.get("fault") == "straggle":
        return (f"injected straggle: answered {fault.get('delay', 0):g} s late and accepted, as the task has no "
                "deadline (set task_timeout to cut stragglers)")
    if fault.get("fault") == "corrupt":
        return (f"injected corruption {fault.get('corruption')!r} passed every check of the server and was accepted "
                "(no screen caught it)")
    return f"injected {fault.get('fault')!r} passed every check of the server and was accepted"


class Controller(ABC):
    """A workflow: decides which tasks go to which clients, and what to do with the replies.

    Subclasses implement `control_flow`; a controller holds only its settings, so the same object can
    drive many runs (run-time state lives in the `ServerContext`).
    """

    rounds: int
    he: Encryption | None = None  # the global model's encryption, provisioned by the simulator; None: plaintext
    uses_model: ClassVar[bool] = True  # False for workflows that never send or read the global model (statistics)
    uses_local_models: ClassVar[bool] = False  # True for workflows that ask clients for their local models (submit_model)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Make each ``control_flow`` the running workflow for its call (``fl.workflow``), so that a round takes
        this controller's settings, also when another controller runs it (a `Chain`, a wrapper)."""
        super().__init_subclass__(**kwargs)
        flow = cls.__dict__.get("control_flow")
        if flow is None or getattr(flow, "__isabstractmethod__", False):
            return

        @functools.wraps(flow)
        def control_flow(self: Controller, fl: ServerContext) -> None:
            with fl.running(self):
                flow(self, fl)

        cls.control_flow = control_flow  # type: ignore[method-assign]

    @abstractmethod
    def control_flow(self, fl: ServerContext) -> None:
        """Run the workflow to the end: ``with fl.round(r) as rnd:`` ... for each round (`fedkit.rounds.Round`)."""

    def check_federation(self, clients: Sequence[str]) -> None:
        """Refuse, with how to fix it, settings that cannot work with these ``clients`` (their names), such as
        more clients per round than there are. The simulator asks before the first round; the default accepts
        any federation."""

    def check_model(self, model: nn.Module) -> None:
        """Refuse, with how to fix it, a model this workflow cannot train (DP-SGD cannot train BatchNorm)."""
