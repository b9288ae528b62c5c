"""A client: a named site with its data, executors by task name, filters, and state that survives rounds."""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .data import ClientData
from .exchange import (DXO, Aborted, ClientContext, DeadlineExceeded, ExecutorLike, Filter, FilterContext, Signal,
                       Task, Weights, apply_filters, run_executor)
from .faults import Faults
from .preprocess import current_data
from .seeds import derive_seed, task_seed  # noqa: F401 (derive_seed: fedkit.client's since 0.1)
from .server import Server
from .status import Status
from .train import LOCAL_MODEL, LOCAL_WEIGHTS, MODELS


class Refused(Exception):
    """Raised by an executor (or an algorithm's client half) that declines a task instead of failing at it, such
    as DP-SGD's `BudgetExhausted`. The reply is ``refused`` and is not retried (asking again changes nothing);
    a round that falls short because of refusals ends the run cleanly, with the reason, rather than failing."""


@dataclass
class Answer:
    """What a client made of one task: a result, or why not.

    ``status`` is a `Reply`'s: ok, failed, refused, late or dropped (no answer at all); ``delay`` is an
    injected straggler's simulated lateness.
    """

    status: Status = Status.OK
    result: DXO | None = None
    error: str = ""
    detail: str = ""
    delay: float = 0.0


def failed(error: Exception) -> Answer:
    """What a client answers when its task raised ``error`` (anything but `Aborted`, which ends the run): ``late`` past
    its deadline, ``refused`` when it declined, else ``failed`` with the traceback (so call it in the ``except``)."""
    if isinstance(error, DeadlineExceeded):
        return Answer(Status.LATE, error=f"late: {error}")
    if isinstance(error, Refused):  # declined, not broken: e.g. a spent privacy budget
        return Answer(Status.REFUSED, error=str(error))
    return Answer(Status.FAILED, error=f"{type(error).__name__}: {error}", detail=traceback.format_exc())


@dataclass(eq=False)
class Client:
    """One site of the federation. It pulls tasks from the server and answers each with a DXO.

    ``executors`` maps task names (``"train"``, ``"validate"``, ...) to executors; ``state`` is the
    client's private memory across rounds (DP accountant, SCAFFOLD control variates, HE secret key, with
    ``keep_local_model`` its last locally trained weights...). Model instances and optimizers are not in it:
    a task borrows a model from a pool shared by all clients (`fedkit.train.local_model`) and gives it back
    when it ends, so a federation holds as many models as tasks run at once, however many clients are
    registered. Nothing in ``state`` is ever sent unless an executor puts it in a result.
    """

    name: str
    data: ClientData
    executors: dict[str, ExecutorLike]
    task_data_filters: list[Filter] = field(default_factory=list)
    result_filters: list[Filter] = field(default_factory=list)
    seed: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    faults: Faults | None = None
    # keep a CPU copy of the last locally trained weights in ``state`` (``fedkit.train.LOCAL_WEIGHTS``), for
    # cross-site evaluation's ``submit_model``; the simulator turns it off when its workflow never asks for them
    keep_local_model: bool = True
    # the engine's handle on this client's latest task (``is_alive()``, ``name``): while it runs, the client takes
    # no other task
    worker: Any = field(default=None, init=False, repr=False, compare=False)

    def fresh(self, seed: int, faults: Faults | None = None, keep_local_model: bool | None = None) -> "Client":
        """A copy with empty state, for a new run."""
        return replace(self, seed=seed, state={}, faults=faults if faults is not None else self.faults,
                       keep_local_model=self.keep_local_model if keep_local_model is None else keep_local_model)

    def handle(self, task: Task, device: torch.device, abort: Signal) -> DXO:
        """Filter the task's data, run the executor for ``task.name``, filter the result.

        The executor runs with torch's global RNG seeded from (run seed, client, round) and restored
        afterwards, so models with dropout repeat exactly, also after a resume.
        """
        executor = self.executors.get(task.name)
        if executor is None:
            raise LookupError(f"client {self.name!r} has no executor for task {task.name!r}; "
                              f"it has: {', '.join(self.executors) or 'none'}")
        task, ctx = self.context(task, device)
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        # what torch.random.fork_rng(devices=cuda) does, without its context manager's cost on the CPU
        saved = torch.default_generator.get_state()
        with torch.random.fork_rng(devices=cuda) if cuda else contextlib.nullcontext():
            # Seed only the generators in use: torch.manual_seed would also queue seeds for every lazy
            # accelerator backend, which costs about a millisecond per task on a machine without one.
            torch.default_generator.manual_seed(ctx.seed)
            if cuda:
                torch.cuda.manual_seed(ctx.seed)
            try:
                result = run_executor(executor, task, ctx, abort)
            finally:
                self.release(ctx)
                torch.default_generator.set_state(saved)
        return self.filter_result(result, task, ctx.seed)

    def context(self, task: Task, device: torch.device) -> tuple[Task, ClientContext]:
        """``task`` after this client's task-data filters, and the context its executor runs in: the seed derived
        from (run seed, round), the data after any preprocessing task (e.g. Standardize), the state."""
        seed = task_seed(self.seed, task.round)
        if self.task_data_filters:
            task = replace(task, data=apply_filters(self.task_data_filters, task.data,
                                                    FilterContext("client", "task", self.name, task, seed)))
        return task, ClientContext(self.name, current_data(self.data, self.state), self.state, device, seed)

    def filter_result(self, result: DXO, task: Task, seed: int) -> DXO:
        """``result`` through this client's result filters, in list order: DP filters (clip, noise) must come before
        encryption, which makes the update opaque."""
        return apply_filters(self.result_filters, result, FilterContext("client", "result", self.name, task, seed))

    def release(self, ctx: ClientContext) -> None:
        """Return the model instances the task borrowed (`fedkit.train.local_model`) to their pool; keep a CPU copy
        of the trained one's weights when the client keeps its local model. Caches that refer to a returned
        instance (e.g. DP-SGD's wrapper of it) leave the state with it. `handle` calls it when the task ends; an
        engine that runs an executor's parts itself (with a `ClientContext` of its own) calls it too."""
        for key, model_fn, model in ctx.leases:
            if self.state.get(key) is model:
                del self.state[key]
                if key == LOCAL_MODEL:
                    self.keep_local(model.state_dict())
            for k, v in list(self.state.items()):
                if k.startswith("_") and isinstance(v, tuple) and any(x is model for x in v):
                    del self.state[k]
            MODELS.give_back(model_fn, ctx.device, model)
        ctx.leases.clear()

    def fault(self, task: Task) -> dict[str, Any] | None:
        """The fault injected into this client's answer to ``task`` (``{"fault": kind, ...}``), or None.

        Drawn from ``faults`` for the task's round and attempt: the same every run.
        """
        faults = self.faults
        kind = faults.draw(task.round, self.name, task.attempt) if faults is not None else None
        if kind is None:
            return None
        fault: dict[str, Any] = {"fault": kind}
        if kind == "corrupt":
            fault["corruption"] = faults.corruption(task.round, self.name, task.attempt)
        elif kind == "straggle":
            fault["delay"] = faults.delay
        return fault

    def answer(self, task: Task, device: torch.device, abort: Signal, fault: dict[str, Any] | None = None) -> Answer:
        """Run ``task`` (with the injected ``fault``, see `fault`) and say what came of it; raises only `Aborted`.

        An engine may run this in a thread of its own: it touches only this client, never the server.
        """
        kind = fault["fault"] if fault else None
        if kind == "dropout":
            return Answer(Status.DROPPED)  # took the task and vanished: the server hears nothing
        try:
            if kind == "crash":
                raise RuntimeError("injected crash (fault injection)")
            result = self.handle(task, device, abort.child(task.deadline))
        except Aborted:
            raise
        except Exception as e:  # a failing client must not take the server down: report it
            return failed(e)
        return self.outcome(result, task, fault)

    def outcome(self, result: DXO, task: Task, fault: dict[str, Any] | None) -> Answer:
        """The answer ``result`` makes with the injected ``fault`` (see `fault`): as it is, corrupted, or late by a
        straggler's delay."""
        kind = fault["fault"] if fault else None
        if kind == "corrupt":
            result = self.faults.damage(result, task.round, self.name, task.attempt)
        return Answer(Status.OK, result, delay=fault["delay"] if kind == "straggle" else 0.0)

    def keep_local(self, weights: Weights) -> None:
        """Keep a CPU copy of locally trained ``weights`` in the state (`LOCAL_WEIGHTS`), for cross-site evaluation's
        ``submit_model``, when this client keeps its local model."""
        if self.keep_local_model:
            self.state[LOCAL_WEIGHTS] = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}

    def deliver(self, server: Server, task: Task, answer: Answer) -> None:
        """Hand ``answer`` to the server (nothing for a dropout)."""
        if answer.status == Status.DROPPED:
            return
        if answer.result is not None:
            server.submit(self.name, task, answer.result, delay=answer.delay)
        else:
            server.fail(self.name, task, answer.error, answer.detail, status=answer.status)

    def work(self, server: Server, device: torch.device, abort: Signal) -> None:
        """Pull tasks until the server has none for this client; answer each in this thread, or report its failure.

        With ``faults`` set (for teaching and testing) this client may drop out, crash, straggle or
        corrupt its result, as drawn for each task's round and attempt; what was injected is noted on
        the server's board for the history. (The `fedkit.engine.sequential` engine runs each answer in
        a thread of its own, to stop waiting at the task's deadline.)
        """
        while (task := server.pull(self.name)) is not None:
            fault = self.fault(task)
            if fault is not None:
                server.note_fault(self.name, task, fault)
            self.deliver(server, task, self.answer(task, device, abort, fault))
