"""The controller's toolbox (`ServerContext`) and the `Controller` base; the task board is `fedkit.task_board`.

A `Controller` (workflow) never talks to clients directly. It runs each round in a block,
``with fl.round(r) as rnd:``, and sends tasks in it with ``rnd.train()`` / ``rnd.send(task)``
(`fedkit.rounds.Round`: retries, screens, the round recorded when the block ends); below them,
`ServerContext.broadcast_and_wait` / `send_and_wait` post one task. The engine lets the targeted clients
pull and run them; replies come back through the server's result filters. ``fl.stop(reason)`` ends a run
early, on purpose.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Iterator, Mapping, NoReturn, Sequence

import numpy as np
import torch
from torch import nn

from . import metrics as M
from .errors import ConfigError, UpdateError
from .exchange import MetaKey, Reply, Signal, Task, Weights
from .global_model import Encryption, GlobalModel

from .history import History, RoundRecord
from . import seeds
from .rounds import Round
from .task_board import Channel, Order, Server  # noqa: F401 (fedkit.server's names since 0.1)
from .status import Event, Status


class RunStopped(Exception):
    """``fl.stop(reason)`` ended the run on purpose (a spent privacy budget, a plateau): a clean end, not a failure.
    Raised through the controller, whatever runs it (a `Chain` stops too); the simulator ends the run as done."""


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
    current_round: int | None = None  # the round a ``with fl.round(r)`` block is in (`fedkit.rounds.Round` sets it)
    # the reason fl.stop gave, once it ran: one list shared with the contexts made from this one (a Chain's parts,
    # by dataclasses.replace), so that a stop a part caught still stops the parts after it
    stopped: list[str] = field(default_factory=list, repr=False)

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
        """The controller whose ``control_flow`` runs now (the innermost): `Round` takes its settings as defaults."""
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
        if self.current_round is not None:
            return self.current_round
        rounds = self.history.rounds
        return rounds[-1].round + 1 - self.offset if rounds else self.start_round

    def sample(self, k: int | None = None, *, rate: float | None = None) -> list[str]:
        """The clients of the current round (`next_round`): ``k`` of them drawn without replacement (None: all),
        or each with probability ``rate`` (Poisson sampling); the same for the same seed and round."""
        if k is not None and rate is not None:
            raise ConfigError(f"fl.sample takes k (a number of clients) or rate (Poisson sampling), not both; got "
                              f"k={k!r} and rate={rate!r}")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"fl.sample(k) takes a whole number of clients >= 1 (None: every client), got k={k!r}")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 < rate <= 1):
            raise ConfigError(f"fl.sample(rate=...) takes the probability that a client joins the round, in (0, 1], "
                              f"got rate={rate!r}")
        if rate is not None:
            return self.sample_poisson(rate, self.next_round)
        return self.sample_clients(k, self.next_round)

    def stop(self, reason: str) -> NoReturn:
        """End the run cleanly now, saying why (a ``stopped`` event): the last completed round stays the result.
        It raises `RunStopped`, which the run takes as the controller's normal end; a round in progress is not
        recorded. The stop holds even if the controller catches it (``except Exception``): every later round or
        task raises `RunStopped` again (`check_not_stopped`), and the run ends as stopped."""
        if not self.stopped:
            self.stopped.append(reason)
            self.event(self.next_round, Event.STOPPED, reason=reason)
        raise RunStopped(self.stopped[0])

    def check_not_stopped(self) -> None:
        """Raise `RunStopped` again if ``fl.stop`` ended the run (a controller that caught it goes no further)."""
        if self.stopped:
            raise RunStopped(self.stopped[0])

    def broadcast_and_wait(self, task: Task, targets: Sequence[str] | None = None) -> dict[str, Reply]:
        """Send ``task`` to ``targets`` (default: all clients) and return their replies by client."""
        targets = list(self.client_names) if targets is None else list(targets)
        known = self.__dict__.get("_known")  # (names, their set): 100 targets of 10,000 clients cost 100 lookups
        if known is None or known[0] is not self.client_names:
            known = self.__dict__["_known"] = (self.client_names, frozenset(self.client_names))
        unknown = [t for t in targets if t not in known[1]]
        if unknown:
            raise ConfigError(f"unknown client(s) {unknown}; the federation has: {', '.join(self.client_names)}")
        self.check_not_stopped()
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
        rng = self.rng(round, seeds.SAMPLE_CLIENTS)
        return [names[i] for i in sorted(rng.choice(len(names), size=k, replace=False))]

    def sample_poisson(self, rate: float, round: int) -> list[str]:
        """Each client independently with probability ``rate`` (Poisson sampling, which DP accountants
        assume); possibly none. The same clients for the same seed and round."""
        draws = self.rng(round, seeds.SAMPLE_POISSON).random(len(self.client_names))
        return [name for name, u in zip(self.client_names, draws) if u < rate]

    def state_of(self, owner: object) -> dict[str, Any]:
        """``owner``'s own part of the run's server state (an extension's: SCAFFOLD's c, DP-FedAvg's accountant), a
        dict checkpointed with the run under `state_name`: two extensions of a workflow never share one."""
        return self.server.state.setdefault(state_name(owner), {})

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
                     "what": r.status if not r.ok else Event.INJECTED, "reason": r.error if not r.ok else _unnoticed(r)}
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
                    r.reject(Status.REJECTED, f"client {name!r} answered the validation with accuracy {acc!r}, "
                                              f"loss {lo!r} on {n!r} samples; expected an accuracy in [0, 1], a loss "
                                              ">= 0 and a sample count")
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

    def check_next(self, round: int, did: str = "ended") -> None:
        """Refuse ``round`` unless it follows the last round recorded (`Round` asks at the ``with``, ``did="began"``)."""
        rounds = self.history.rounds
        expected = rounds[-1].round + 1 if rounds else self.start_round + self.offset
        given = round + self.offset if isinstance(round, int) and not isinstance(round, bool) else round
        if given != expected:
            last = f"the last round recorded is {rounds[-1].round}" if rounds else "no round is recorded yet"
            raise ConfigError(f"{self.controller} {did} round {given!r}, but {last}: rounds go 0, 1, 2, ... with one "
                              f"`with fl.round(r)` block each, so this one must be round {expected - self.offset}")

    def _check_round(self, round: int) -> None:
        """Refuse to end ``round`` unless it follows the last round recorded and leaves a finite global model."""
        self.check_next(round)
        rounds = self.history.rounds
        given = round + self.offset
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


STATE_NAME = "_state_name"  # the attribute a workflow names an extension's state by (workflows.extensions.bind_all)


def state_name(owner: object) -> str:
    """Under which key of ``fl.server.state`` ``owner`` keeps its state (`ServerContext.state_of`): the name its
    workflow gave it (``Scaffold``; ``Scaffold#2`` for a second of the class), else its class's name."""
    return getattr(owner, STATE_NAME, None) or type(owner).__name__


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

    def check_population(self, examples: Mapping[str, int]) -> None:
        """Refuse, with how to fix it, settings that these clients' data cannot meet (``examples``: each client's
        number of training examples), such as a DP delta that is not below 1 / the number of individuals hidden.
        The simulator asks when it is built; the default accepts any data."""

    def check_model(self, model: nn.Module) -> None:
        """Refuse, with how to fix it, a model this workflow cannot train (DP-SGD cannot train BatchNorm)."""
