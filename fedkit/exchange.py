"""The vocabulary that crosses between server and clients: DXO, Task, Signal, Executor, Filter.

Names follow NVIDIA FLARE so that what a student learns here carries over: the server sends a
`Task` whose data is a `DXO` (data exchange object: a kind, a dict of named arrays, and meta);
a client runs it with an `Executor` and answers with another `DXO`. `Filter`s may rewrite a DXO on
its way out of or into either side (encryption, clipping, noise...).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np
import torch

from .status import Status

Weights = dict[str, torch.Tensor]
"""A model's parameters by name, as in ``model.state_dict()``."""


class DataKind(str, Enum):
    """What the data of a DXO means."""

    WEIGHTS = "WEIGHTS"  # full model parameters
    WEIGHT_DIFF = "WEIGHT_DIFF"  # local parameters minus the global ones received
    METRICS = "METRICS"  # scalars such as loss and accuracy
    STATISTICS = "STATISTICS"  # counts, sums, histograms (federated statistics)
    COLLECTION = "COLLECTION"  # anything else: a dict of named values


class MetaKey:
    """Well-known keys of `DXO.meta`; any other key may be used too."""

    NUM_SAMPLES = "num_samples"  # samples the client trained on this task
    NUM_STEPS = "num_steps"  # optimizer steps the client took this task
    ROUND = "round"
    METRICS = "metrics"  # dict[str, float] the client reports alongside its result
    HOOKS = "client_hooks"  # task meta: the client halves of the workflow's algorithms (see fedkit.train.TrainHook)
    HOOKS_RAN = "client_hooks_ran"  # result meta: the names of the client halves the executor ran


@dataclass
class DXO:
    """Data exchange object: ``kind`` + named ``data`` + ``meta``.

    >>> d = DXO(DataKind.METRICS, {"accuracy": 0.9})
    >>> d.kind
    <DataKind.METRICS: 'METRICS'>
    """

    kind: DataKind
    data: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, DataKind):
            try:
                self.kind = DataKind(self.kind)
            except ValueError:
                allowed = ", ".join(k.value for k in DataKind)
                raise ValueError(f"DXO kind {self.kind!r} is not known; use one of: {allowed}") from None
        if not isinstance(self.data, Mapping):
            raise TypeError(f"DXO data must be a dict of named values, got {type(self.data).__name__}")

    def with_data(self, data: dict[str, Any], **meta: Any) -> "DXO":
        """A copy with other data (and extra meta): what a filter returns."""
        return replace(self, data=data, meta={**self.meta, **meta})

    @property
    def nbytes(self) -> int:
        """Bytes of what would travel: tensors, arrays and byte strings in data and meta (e.g. control variates)."""
        return payload_bytes(self.data) + payload_bytes(self.meta)


def payload_bytes(value: Any) -> int:
    """Size in bytes of one DXO value (0 for small Python scalars and strings)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if type(value) is dict:  # the common case, without the slower check against the Mapping ABC
        return sum(payload_bytes(v) for v in value.values())
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(v) for v in value)
    if isinstance(value, Mapping):
        return sum(payload_bytes(v) for v in value.values())
    return 0


@dataclass(frozen=True)
class Task:
    """A unit of work the server posts and a client pulls: ``name`` selects the client's executor.

    ``deadline`` (seconds) is how long the client may take; ``attempt`` counts retries of a round.
    """

    name: str
    data: DXO
    round: int = 0
    id: str = ""
    deadline: float | None = None
    attempt: int = 0


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
    status: Status = Status.PENDING  # ok, or why not (see `Status`)
    # fault injection's ground truth (e.g. {"fault": "corrupt", "corruption": "scale"}), for the history only: no
    # screen reads it, so what the server catches it catches as it would a real fault
    injected: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.result is not None

    def reject(self, status: Status, reason: str) -> None:
        """Discard this reply's result, recording why."""
        self.result, self.status, self.error = None, status, reason


class Aborted(Exception):
    """Raised inside a run when its abort `Signal` has been triggered."""


class DeadlineExceeded(Exception):
    """Raised inside an executor whose task ran past its deadline; the client's answer is dropped."""


class Signal:
    """A thread-safe abort flag that training loops check between batches.

    A child signal (`Signal.child`) also fires when its parent does, and can carry a deadline.

    >>> s = Signal(); s.trigger("user pressed Stop"); s.triggered
    True
    """

    def __init__(self, parent: "Signal | None" = None, deadline: float | None = None) -> None:
        self._event = threading.Event()
        self.reason = ""
        self.parent = parent
        self.seconds = deadline
        self._expires = None if deadline is None else time.perf_counter() + deadline

    def child(self, deadline: float | None = None) -> "Signal":
        """A signal for one task: triggered by this one, or when ``deadline`` seconds have passed."""
        return Signal(self, deadline)

    def trigger(self, reason: str = "aborted") -> None:
        self.reason = reason
        self._event.set()

    @property
    def expired(self) -> bool:
        return self._expires is not None and time.perf_counter() > self._expires

    @property
    def triggered(self) -> bool:
        return self._event.is_set() or self.expired or (self.parent is not None and self.parent.triggered)

    def check(self) -> None:
        """Raise `Aborted` (or `DeadlineExceeded`) if it is time to stop; call it at batch boundaries."""
        if self.parent is not None:
            self.parent.check()
        if self._event.is_set():
            raise Aborted(self.reason)
        if self.expired:
            raise DeadlineExceeded(f"ran past its {self.seconds:g} s deadline")


@runtime_checkable
class Executor(Protocol):
    """Runs one kind of task on a client. A plain function ``f(task, ctx, abort) -> DXO`` works too."""

    def execute(self, task: Task, ctx: "ClientContext", abort: Signal) -> DXO: ...


ExecutorLike = Executor | Callable[[Task, "ClientContext", Signal], DXO]


@dataclass(frozen=True)
class FilterContext:
    """Where a filter runs: which side, which direction, for which client and task."""

    side: str  # "server" or "client"
    direction: str  # "task" (server -> client) or "result" (client -> server)
    client: str
    task: Task
    seed: int = 0  # on a client: the task's seed, from (run seed, round, client), for filters that draw noise


Filter = Callable[[DXO, FilterContext], DXO]
"""A filter is any callable ``(dxo, ctx) -> dxo``; return a new DXO rather than editing the one given."""


def apply_filters(filters: list[Filter] | tuple[Filter, ...], dxo: DXO, ctx: FilterContext) -> DXO:
    """Run ``filters`` in order, checking that each one hands on a DXO."""
    for f in filters:
        out = f(dxo, ctx)
        if not isinstance(out, DXO):
            name = getattr(f, "__name__", type(f).__name__)
            raise TypeError(
                f"{ctx.side} {ctx.direction} filter {name!r} returned {type(out).__name__}, not a DXO; "
                "a filter must return the (possibly new) DXO it was given"
            )
        dxo = out
    return dxo


@dataclass
class ClientContext:
    """What an executor sees of its client: name, data, persistent state, device, seed for this task.

    ``state`` survives rounds and is checkpointed: keep tensors and plain values there (control
    variates, accountant history). Keys that start with ``_`` are caches (a model instance, data
    already on the GPU): they are never checkpointed, so an executor must be able to rebuild them.
    A model instance from `fedkit.train.local_model` is only lent for the task: run through `Client.handle`
    it leaves the state when the task ends (see ``leases``).
    """

    client: str
    data: Any  # the client's `ClientData` (train and validation splits)
    state: dict[str, Any]
    device: torch.device
    seed: int  # derived from (run seed, round, client): the same run gives the same numbers
    # model instances this task borrowed from a shared pool (`fedkit.train.local_model`): `Client.handle` gives
    # them back when the task ends, so a federation of many clients holds a few models, not one per client
    leases: list = field(default_factory=list, repr=False, compare=False)


def run_executor(executor: ExecutorLike, task: Task, ctx: ClientContext, abort: Signal) -> DXO:
    """Call an executor object or a plain function, and check that it answered with a DXO."""
    fn = getattr(executor, "execute", None)  # what isinstance(executor, Executor) checks, at a fraction of the cost
    if not callable(fn):
        fn = executor
    out = fn(task, ctx, abort)
    if not isinstance(out, DXO):
        raise TypeError(
            f"the executor for task {task.name!r} on client {ctx.client!r} returned "
            f"{type(out).__name__}; an executor must return a DXO"
        )
    return out
