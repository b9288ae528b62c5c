"""An engine that trains the clients of a round together: one batched forward and backward pass per step.

The standard `fedkit.train.Trainer`'s local steps are the same computation on every client, only on other
data and from (usually) the same weights. Here the clients' parameters are stacked along a leading client
axis and each local step is one forward pass of all of them (``torch.func.vmap`` of ``functional_call``) and
one backward pass (the clients are independent, so the gradient of the sum of their mean losses is each
client's own gradient), followed by SGD with momentum and weight decay written on the stacked tensors (the
maths of ``torch.optim.SGD``). Everything around the steps is the trainer's own (`Trainer.begin` and
`Trainer.finish`: filters, the algorithms' client halves, the diff, the result filters), run per client on
one model instance shared by the group; the validation of the received model is one forward pass over all
the clients' validation data. Results equal the `fedkit.engine.sequential` engine's (to float rounding).
The steps and the validation are in `fedkit.engine.stacked`; which tasks fall back, and the chunk size, in
`fedkit.engine.fallback`.

How the clients differ is kept exactly:

* batch order: each client draws its own permutations from ``torch.Generator().manual_seed(seed)``, as
  `fedkit.train.sgd_epochs` does; a partial last batch is padded and masked, and its loss is the mean over
  its real samples only;
* number of steps: clients are sorted by the steps they take, so at step s the clients still training are a
  prefix of the stack; only that prefix is computed and updated (a client that has finished changes no more,
  neither its parameters nor its momentum);
* algorithms: a client half whose class says ``vectorized = True`` (FedProx, SCAFFOLD, DP-FedAvg) changes the
  steps only through `fedkit.train.GradTerm` terms, which stack along the client axis;
* faults and deadlines: drawn and noted as in the sequential engine; a task past its deadline answers ``late``;
* frozen parameters (``requires_grad=False``) are left as received, as ``torch.optim.SGD`` leaves them, and the
  model's dtype is kept (a float64 model on float64 data trains in float64).

Whatever cannot be trained this way runs as in the sequential engine, and the reason is logged once per
engine (logger ``fedkit.engine.vectorized``, level INFO): other tasks than ``train``, executors other than
``fk.Trainer``, DP-SGD (Opacus trains per client), models with buffers (batch norm) or randomness (dropout)
or that ``vmap`` cannot run, client halves that declare no vectorized form, crash and dropout faults.

The client axis is cut in chunks (``chunk=``; default: from free memory, at most 256 clients on a CPU); a
chunk that runs out of memory is halved, and one that fails otherwise trains per client (logged).

What it gains is the per-step cost of small models: about 4-8x on the clients' side for digits' MLP with
64-256 clients on one CPU thread (``benchmarks/engines_vectorized.py``). What it cannot remove is the work
per client and per round outside the steps (filters, diff, screening and aggregation on the server), so with
one short local epoch the whole run gains less (2.5-3.5x).

>>> import fedkit as fk
>>> engine = fk.engine.vectorized_engine(chunk=16)  # or engine=fk.engine.vectorized
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import torch
from torch import nn

from ..client import Client
from ..errors import ConfigError
from ..exchange import Aborted, DeadlineExceeded, Signal
from ..grad_terms import GradTerm, TermHook, grad_term_hook
from ..local_sgd import evaluate, sgd_epochs
from ..model_pool import MODELS, load_weights, local_model, on_device
from ..server import Server
from .fallback import Probes
from .sequential import still_busy, supervise
from .stacked import _Entry, _settle, _steps, _validate

log = logging.getLogger(__name__)


class Vectorized:
    """The vectorized engine: ``Vectorized(chunk=None)(clients, server, device, abort)``; see the module."""

    engine_name = "vectorized"  # as the run's summary names it

    def __init__(self, chunk: int | None = None) -> None:
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ConfigError(f"chunk must be a whole number of clients >= 1 (or None: from free memory), "
                              f"got {chunk!r}")
        self.chunk = chunk
        self._said: set[str] = set()
        self._lock = threading.Lock()
        self._probes = Probes()

    def __repr__(self) -> str:
        return f"vectorized_engine(chunk={self.chunk})"

    # ---- the engine

    def __call__(self, clients: Sequence[Client], server: Server, device: torch.device, abort: Signal) -> None:
        pending = list(clients)
        while pending:  # each pass: one task per client that still has one
            group: list[_Entry] = []
            still: list[Client] = []
            for client in pending:
                abort.check()
                task = server.pull(client.name)
                if task is None:
                    continue
                still.append(client)
                answer = still_busy(client)
                if answer is not None:
                    client.deliver(server, task, answer)
                    continue
                fault = client.fault(task)
                if fault is not None:
                    server.note_fault(client.name, task, fault)  # fault injection's ground truth, for the history
                reason = self._probes.why_sequential(client, task, fault, device)
                if reason is None:
                    group.append(_Entry(client, task, fault, client.executors["train"]))
                else:
                    self.say(reason)
                    client.deliver(server, task, supervise(client, task, device, abort, fault))
            if group:
                self._train(group, server, device, abort)
            pending = still

    def say(self, reason: str) -> None:
        """Log why a task runs as in the sequential engine, once per reason."""
        with self._lock:
            if reason in self._said:
                return
            self._said.add(reason)
        log.info("vectorized engine: %s; such tasks run one client after another, as in the sequential engine", reason)

    # ---- training together

    def _train(self, group: list[_Entry], server: Server, device: torch.device, abort: Signal) -> None:
        shared = _Instances(device)
        try:
            self._together(group, device, abort, shared)
        finally:
            shared.give_back()
        for e in group:  # in the clients' order, as the sequential engine answers
            e.client.deliver(server, e.task, e.answer)

    def _together(self, group: list[_Entry], device: torch.device, abort: Signal, shared: "_Instances") -> None:
        with _forked(device):
            begun = [e for e in group if self._begin(e, device, abort, shared)]
        _validate(begun)
        batches: dict[Any, list[_Entry]] = {}
        for e in begun:
            if e.answer is not None or e.trained is not None:
                continue
            t = e.t
            params = tuple((k, tuple(v.shape), v.dtype) for k, v in t.received.items())
            key = (id(e.executor.model_fn), e.executor.config, type(t.model), params, tuple(type(x) for x in e.terms),
                   tuple(t.data.x.shape[1:]), t.data.x.dtype)
            batches.setdefault(key, []).append(e)
        for entries in batches.values():
            size = self.chunk or self._probes.chunk(entries[0], device)
            for i in range(0, len(entries), size):
                self._steps(entries[i:i + size], abort)
        with _forked(device):
            for e in group:
                if e.answer is None:
                    self._finish(e, shared)

    def _steps(self, entries: list[_Entry], abort: Signal) -> None:
        """`_steps` of a chunk; out of memory, of each half; failing, of each client alone (`_train_alone`)."""
        try:
            _steps(entries, abort)
        except (Aborted, DeadlineExceeded):
            raise
        except torch.OutOfMemoryError:
            if len(entries) == 1:
                raise
            self.say("a chunk of clients did not fit in memory: halved (give a smaller chunk=)")
            half = len(entries) // 2
            self._steps(entries[:half], abort)
            self._steps(entries[half:], abort)
        except Exception as err:  # noqa: BLE001 - whatever vmap refused: the trainer's own steps, per client
            first = str(err).splitlines()[0][:120] if str(err) else ""
            self.say(f"training together failed ({type(err).__name__}: {first})")
            for e in entries:
                if e.answer is None:
                    _settle(e, lambda e=e: _train_alone(e))

    def _begin(self, e: _Entry, device: torch.device, abort: Signal, shared: "_Instances") -> bool:
        """What `Client.handle` and `Trainer.execute` do before the first step; False if the task is settled.

        `Trainer.begin` runs on one model instance shared by the whole group (``shared``: the steps need only the
        weights, ``t.received``, and the terms). A client whose client half turned out not to stack trains here
        and now, as the trainer would.
        """
        client, task = e.client, e.task

        def begin() -> None:
            e.filtered, ctx = client.context(task, device)
            e.seed = ctx.seed
            e.signal = abort if task.deadline is None else abort.child(task.deadline)  # a child costs an Event
            _seed(ctx.seed, device)  # the caller forked torch's generators (once for the group: a fork costs)
            model = ctx.state["_model"] = shared.get(e.executor.model_fn)  # what local_model hands the trainer
            try:
                e.t, e.hooks = e.executor.begin(e.filtered, ctx, validate=False)  # validated together: _validate
                if e.t.private is None and all(isinstance(h, TermHook) and type(h.term).stack is not GradTerm.stack
                                               for h in e.t.grad_hooks):
                    e.terms = [h.term for h in e.t.grad_hooks]
                    return
                self.say("a client half added a gradient hook that is not a fedkit.train.GradTerm with a stacked form")
                t = e.t
                if t.config.validate and len(t.ctx.data.val):
                    val = evaluate(t.model, on_device(t.ctx, "_val_on_device", t.ctx.data.val), device)
                    t.metrics = {"val_loss": val["loss"], "val_accuracy": val["accuracy"], **t.metrics}
                t.stats = sgd_epochs(t.model, t.data, t.config, t.ctx.seed, e.signal, t.grad_hooks, t.private)
                e.trained = {k: v.detach().clone() for k, v in t.model.state_dict().items()}
            finally:
                if ctx.state.get("_model") is model:
                    del ctx.state["_model"]
                if ctx.leases:  # anything else the client half borrowed
                    client.release(ctx)

        return _settle(e, begin)

    def _finish(self, e: _Entry, shared: "_Instances") -> None:
        """What `Trainer.execute` and `Client.answer` do after the last step: client_end, diff, filters, faults;
        and, when the client keeps its local model, what `Client.handle` keeps of it (a CPU copy of its weights)."""
        def finish() -> None:
            _seed(e.seed, e.t.ctx.device)
            t = e.t
            t.model = shared.get(e.executor.model_fn)
            with torch.no_grad():
                for k, v in shared.state(t.model).items():
                    v.copy_(e.trained[k])
            e.dxo = e.executor.finish(t, e.hooks)
            e.client.keep_local(e.trained)
            e.trained = None
            e.answer = e.client.outcome(e.client.filter_result(e.dxo, e.filtered, e.seed), e.task, e.fault)

        _settle(e, finish)


vectorized = Vectorized()
"""The vectorized engine with the chunk size chosen from free memory: ``fk.Simulator(..., engine=vectorized)``."""


def vectorized_engine(chunk: int | None = None) -> Vectorized:
    """A vectorized engine that trains at most ``chunk`` clients together (None: as many as free memory allows)."""
    return Vectorized(chunk)


# ---- helpers


class _Instances:
    """One model instance per model builder for a whole group, borrowed once from the trainer's pool
    (`fedkit.model_pool.MODELS`, see `fedkit.model_pool.local_model`) and given back at the end."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.lent: dict[int, tuple[Any, nn.Module, dict[str, torch.Tensor]]] = {}

    def get(self, model_fn: Any) -> nn.Module:
        if id(model_fn) not in self.lent:
            model = MODELS.take(model_fn, self.device)
            self.lent[id(model_fn)] = (model_fn, model, model.state_dict())
        return self.lent[id(model_fn)][1]

    def state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model.state_dict()``, once (the entries are the module's own tensors: copying into them loads it)."""
        return next(state for _, m, state in self.lent.values() if m is model)

    def give_back(self) -> None:
        for model_fn, model, _ in self.lent.values():
            MODELS.give_back(model_fn, self.device, model)
        self.lent.clear()


def _train_alone(e: _Entry) -> None:
    """``e``'s steps as `Trainer.execute` takes them (`sgd_epochs`), on a borrowed model, with its terms."""
    t = e.t
    with _forked(t.ctx.device):
        _seed(t.ctx.seed, t.ctx.device)
        model = local_model(t.ctx, e.executor.model_fn)
        try:
            load_weights(model, t.received)
            hooks = [grad_term_hook(model, term) for term in e.terms]
            t.stats = sgd_epochs(model, t.data, t.config, t.ctx.seed, e.signal, hooks)
            e.trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
        finally:
            e.client.release(t.ctx)


def _cuda(device: torch.device) -> list[int]:
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def _forked(device: torch.device) -> Any:
    """A fork of torch's global generators (those of ``device``): whatever runs inside leaves them as they were."""
    return torch.random.fork_rng(devices=_cuda(device))


def _seed(seed: int, device: torch.device) -> None:
    """Seed torch's global generators as `Client.handle` does for a task (inside a fork)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
