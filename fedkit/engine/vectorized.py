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
import math
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..client import Answer, Client, failed
from ..errors import ConfigError
from ..exchange import DXO, LOCAL_MODEL, Aborted, DataKind, DeadlineExceeded, MetaKey, Signal, Task
from ..preprocess import current_data
from ..server import Server
from ..train import (MODELS, GradTerm, LocalTraining, TermHook, Trainer, evaluate, grad_term_hook, has_client_half, hook_name,
                     load_weights, local_model, on_device, sgd_epochs)
from .sequential import still_busy, supervise

log = logging.getLogger(__name__)

CPU_CHUNK = 256  # clients trained together at most on a CPU (more gains nothing: the batch is already wide)
CUDA_CHUNK = 4096


@dataclass
class _Entry:
    """One client's training task in the group: its begun `LocalTraining` and what answering it needs."""

    client: Client
    task: Task  # as pulled (for faults and delivery)
    fault: dict | None
    executor: Trainer
    seed: int = 0
    filtered: Task | None = None  # after the client's task-data filters
    signal: Signal | None = None
    t: LocalTraining | None = None
    hooks: tuple = ()
    answer: Answer | None = None  # set once settled (failed, late, ...)
    terms: list[GradTerm] = field(default_factory=list)
    trained: dict | None = None  # after the steps: this client's trained weights (views into the stack)
    dxo: DXO | None = None  # the trainer's result, before the result filters


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
        # per model builder (weakly held: an engine kept for a session must not keep old runs' data alive), per
        # (input shape, dtype, device type): why it cannot be vmapped (or None), and about the bytes one client
        # needs per sample of a batch (for the automatic chunk)
        self._models: "weakref.WeakKeyDictionary[Any, dict[Any, tuple[str | None, int | None]]]" = \
            weakref.WeakKeyDictionary()

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
                reason = self._why_sequential(client, task, fault, device)
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

    # ---- what can be vectorized

    def _why_sequential(self, client: Client, task: Task, fault: dict | None, device: torch.device) -> str | None:
        if fault is not None and fault["fault"] in ("crash", "dropout"):
            return f"a client with an injected {fault['fault']} fault trains nothing"
        if task.name != "train":
            return f"task {task.name!r} is not a training task"
        executor = client.executors.get("train")
        if type(executor) is not Trainer:
            return f"the train executor {type(executor).__name__} is not the standard fk.Trainer"
        if task.data.kind != DataKind.WEIGHTS:
            return f"a train task carries {task.data.kind.value}, not WEIGHTS"
        for hook in task.data.meta.get(MetaKey.HOOKS, ()):
            if has_client_half(hook) and hook.vectorized is not True:
                why = hook.vectorized
                return why if isinstance(why, str) else (f"the client half {hook_name(hook)} declares no vectorized "
                                                         "form (TrainHook.vectorized)")
        return self._model_reason(executor.model_fn, current_data(client.data, client.state).train, device)

    def _model_reason(self, model_fn: Any, data: Any, device: torch.device) -> str | None:
        """Why models of ``model_fn`` cannot be trained with vmap (buffers, dropout, vmap fails), or None; cached."""
        if len(data) == 0:
            return None  # nothing to train on: trained together, it takes no step
        known = self._known(model_fn)
        key = (tuple(data.x.shape[1:]), data.x.dtype, device.type)
        if key in known:
            return known[key][0]
        size = None
        with torch.random.fork_rng(devices=[]):
            try:
                model = model_fn().to(device)
            except Exception as e:  # noqa: BLE001 - the trainer reports it, per client
                known[key] = (f"building the model failed ({type(e).__name__})", None)
                return known[key][0]
            why = None
            name = type(model).__name__
            if any(True for _ in model.buffers()):
                why = f"{name} has buffers (batch norm?), which vmap would have to update per client"
            elif any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
                why = f"{name} uses dropout, whose random masks vmap does not draw as each client would"
            else:
                try:
                    size = _probe(model, data.x[:2].to(device), data.y[:2].to(device))
                except Exception as e:  # noqa: BLE001 - anything vmap refuses
                    first = str(e).splitlines()[0][:120] if str(e) else ""
                    why = f"{name} cannot run under torch.func.vmap ({type(e).__name__}: {first})"
        known[key] = (why, size)
        return why

    def _known(self, model_fn: Any) -> dict:
        try:
            return self._models.setdefault(model_fn, {})
        except TypeError:  # a builder that cannot be weakly referenced: probed each time
            return {}

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
            size = self._chunk(entries[0], device)
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
            model = ctx.state[LOCAL_MODEL] = shared.get(e.executor.model_fn)  # what local_model hands the trainer
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
                if ctx.state.get(LOCAL_MODEL) is model:
                    del ctx.state[LOCAL_MODEL]
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

    def _chunk(self, e: _Entry, device: torch.device) -> int:
        if self.chunk is not None:
            return self.chunk
        data = e.t.data
        per_client = self._known(e.executor.model_fn).get((tuple(data.x.shape[1:]), data.x.dtype, device.type),
                                                          (None, None))[1]
        cap = CUDA_CHUNK if device.type == "cuda" else CPU_CHUNK
        if per_client is None:
            return cap
        weights = sum(v.numel() * v.element_size() for v in e.t.received.values())
        per_client = per_client * e.t.config.batch_size + 8 * weights  # weights, grads, momentum, terms, copies
        return max(1, min(cap, int(0.5 * _free_bytes(device) / max(per_client, 1))))


vectorized = Vectorized()
"""The vectorized engine with the chunk size chosen from free memory: ``fk.Simulator(..., engine=vectorized)``."""


def vectorized_engine(chunk: int | None = None) -> Vectorized:
    """A vectorized engine that trains at most ``chunk`` clients together (None: as many as free memory allows)."""
    return Vectorized(chunk)


# ---- helpers


def _same_start(a: LocalTraining, b: LocalTraining) -> bool:
    """Whether ``a`` and ``b`` score the same model on their validation data (same architecture and weights)."""
    if type(a.model) is not type(b.model) or a.received.keys() != b.received.keys():
        return False
    return all(a.received[k] is b.received[k] or (a.received[k].shape == b.received[k].shape
                                                    and torch.equal(a.received[k], b.received[k])) for k in a.received)


def _validate(entries: list[_Entry]) -> None:
    """What `Trainer.begin` does with ``validate=True``: score the received model on each client's validation
    split (``val_loss``, ``val_accuracy`` first in the metrics); one forward pass per distinct starting model."""
    todo = [e for e in entries if e.answer is None and e.trained is None and e.t.config.validate
            and len(e.t.ctx.data.val)]
    groups: list[list[_Entry]] = []
    for e in todo:
        for g in groups:
            if g[0].executor.model_fn is e.executor.model_fn and _same_start(g[0].t, e.t):
                g.append(e)
                break
        else:
            groups.append([e])
    def together(g: list[_Entry]) -> None:
        vals = [on_device(e.t.ctx, "_val_on_device", e.t.ctx.data.val) for e in g]
        model, weights = g[0].t.model, g[0].t.received  # any instance of the model: the weights are given
        x, y = torch.cat([v.x for v in vals]), torch.cat([v.y for v in vals])
        sizes = torch.tensor([len(v) for v in vals], device=x.device)
        owner = torch.repeat_interleave(torch.arange(len(g), device=x.device), sizes)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = torch.cat([functional_call(model, weights, (x[i:i + 4096],)) for i in range(0, len(x), 4096)])
            each = F.cross_entropy(out, y, reduction="none")  # in the model's dtype (float64 too), as `evaluate` sums
            loss = torch.zeros(len(g), dtype=each.dtype, device=x.device).index_add_(0, owner, each)
            right = torch.zeros(len(g), dtype=torch.long, device=x.device).index_add_(0, owner, (out.argmax(1) == y).long())
        model.train(was_training)
        for e, l_, r, n in zip(g, loss.tolist(), right.tolist(), sizes.tolist()):
            e.t.metrics = {"val_loss": l_ / n, "val_accuracy": r / n, **e.t.metrics}

    for g in groups:
        try:
            together(g)
        except Exception:  # noqa: BLE001 - then each client alone, as the trainer does (and fails alone)
            for e in g:
                _settle(e, lambda e=e: together([e]))


class _Instances:
    """One model instance per model builder for a whole group, borrowed once from the trainer's pool
    (`fedkit.train.MODELS`, see `fedkit.train.local_model`) and given back at the end."""

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


def _settle(e: _Entry, step: Any) -> bool:
    """Run ``step()`` for ``e``'s client as `Client.answer` would: Aborted goes up, anything else settles the task."""
    if e.answer is not None:
        return False
    try:
        step()
        return True
    except Aborted:
        raise
    except Exception as err:  # noqa: BLE001 - a failing client must not take the server down
        e.answer = failed(err)
    return False


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


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def _forward(model: nn.Module):
    """``model``'s forward over a leading client axis of parameters and inputs."""

    return vmap(lambda params, x: functional_call(model, params, (x,)), randomness="error")


def _losses(out: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, count: torch.Tensor):
    """Per client (rows): the mean cross-entropy over the real samples of a padded batch, and the number right."""
    k, b = y.shape[:2]
    each = F.cross_entropy(out.flatten(0, 1), y.flatten(0, 1), reduction="none").reshape(k, b, -1).sum(2)
    value = torch.where(mask, each, torch.zeros_like(each)).sum(1) / count
    right = ((out.argmax(2) == y) & mask).sum(1)
    return value, right


def _probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Run one batched step of two clients on ``x``; return about the bytes of activations per sample."""
    sizes: list[int] = []
    handles = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel() * o.element_size())
                                       if isinstance(o, torch.Tensor) else None) for m in model.modules()]
    try:
        model.train()
        params = {k: torch.stack([p.detach()] * 2).requires_grad_() for k, p in model.named_parameters()}
        mask = torch.ones(2, len(x), dtype=torch.bool, device=x.device)
        count = torch.full((2,), float(len(x)), device=x.device)
        value, _ = _losses(_forward(model)(params, torch.stack([x, x])), torch.stack([y, y]), mask, count)
        torch.autograd.grad(value.sum(), list(params.values()))
    finally:
        for h in handles:
            h.remove()
    return 4 * sum(sizes) // max(2 * len(x), 1) + 4 * x[0].numel() * x.element_size()


def _steps(entries: list[_Entry], abort: Signal) -> None:
    """Train ``entries`` (same model, config and terms) together; sets each ``t.stats`` and ``t.model``'s weights."""
    cfg = entries[0].t.config
    bs, lr, momentum, decay = cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay
    sizes = [len(e.t.data) for e in entries]
    steps = [cfg.epochs * math.ceil(n / bs) for n in sizes]
    order = sorted(range(len(entries)), key=lambda i: -steps[i])  # those still training at step s: a prefix
    entries = [entries[i] for i in order]
    sizes = [sizes[i] for i in order]
    steps = [steps[i] for i in order]
    count, total = len(entries), steps[0] if entries else 0
    base = entries[0].t.model
    device = entries[0].t.data.x.device
    names = [k for k, _ in base.named_parameters()]
    keys = [k for k, p in base.named_parameters() if p.requires_grad]  # trained; the others, as SGD does, left as loaded
    params = {k: torch.stack([e.t.received[k].detach() for e in entries]) for k in names}  # the loaded weights
    terms = [type(entries[0].terms[j]).stack([e.terms[j] for e in entries], keys) for j in range(len(entries[0].terms))]

    # every client's batches, as sgd_epochs draws them, as rows of one index table into the chunk's data
    xs = torch.cat([e.t.data.x for e in entries])
    ys = torch.cat([e.t.data.y for e in entries])
    index = torch.full((max(total, 1), count, bs), -1, dtype=torch.long)  # -1: padding
    start = 0
    for i, (e, n) in enumerate(zip(entries, sizes)):
        if n == 0:
            continue
        gen = torch.Generator().manual_seed(e.t.ctx.seed)
        per_epoch = steps[i] // cfg.epochs
        rows = torch.full((cfg.epochs, per_epoch * bs), -1, dtype=torch.long)
        for epoch in range(cfg.epochs):  # shuffled_batches' permutations, cut in pieces of bs
            rows[epoch, :n] = torch.randperm(n, generator=gen) + start
        index[:steps[i], i] = rows.view(steps[i], bs)
        start += n
    taken = (index >= 0).sum(2)
    index = index.clamp(min=0)  # padding reads any row; masked out of the loss
    index, taken = index.to(device), taken.to(device)
    active = [sum(1 for st in steps if st > s) for s in range(total)]
    lanes = torch.arange(bs, device=device)

    forward = _forward(base)
    bufs = {k: torch.zeros_like(params[k]) for k in keys} if momentum else {}
    loss_sum = torch.zeros(count, device=device)
    right = torch.zeros(count, dtype=torch.long, device=device)
    timed = [e for e in entries if e.signal is not None and e.signal is not abort and e.signal.seconds is not None]
    with torch.no_grad():
        for s in range(total):
            abort.check()
            for e in timed:
                if e.answer is None:
                    try:
                        e.signal.check()
                    except DeadlineExceeded as err:  # this client's result is discarded; the others go on
                        e.answer = failed(err)
            k = active[s]
            idx, n = index[s, :k], taken[s, :k]
            p = {key: params[key][:k] for key in keys}
            y = ys[idx]
            with torch.enable_grad():
                q = {key: v[:k] for key, v in params.items()}
                q.update((key, v.detach().requires_grad_()) for key, v in p.items())
                value, ok = _losses(forward(q, xs[idx]), y, lanes < n[:, None], n.to(loss_sum.dtype))
                # the clients are independent: the gradient of the sum is each client's own gradient
                grads = dict(zip(keys, torch.autograd.grad(value.sum(), [q[key] for key in keys])))
                value = value.detach()
            for term in terms:
                term.add_to(p, grads)
            for key in keys:
                d = grads[key]
                if decay:
                    d = d.add(p[key], alpha=decay)
                if momentum:
                    if s == 0:
                        bufs[key][:k].copy_(d)
                    else:
                        bufs[key][:k].mul_(momentum).add_(d)
                    d = bufs[key][:k]
                p[key].add_(d, alpha=-lr)
            loss_sum[:k] += value * n
            right[:k] += ok
        losses, rights = loss_sum.tolist(), right.tolist()
        for i, e in enumerate(entries):
            e.trained = {key: params[key][i] for key in names}
            seen = max(cfg.epochs * sizes[i], 1)
            e.t.stats = {"train_loss": losses[i] / seen, "train_accuracy": rights[i] / seen, "steps": steps[i],
                         "samples": sizes[i]}
