"""The standard PyTorch executors: local training (SGD with momentum) and evaluation.

The trainer is the client half of FedAvg: load the global weights, train ``epochs`` passes over the
local data, return the difference (WEIGHT_DIFF) with the number of samples and steps. It checks the
abort signal between batches. Its model instance is borrowed for the task from a pool shared by all
clients (`local_model`), so that a federation holds a few models however many clients it registers,
and no task after the first pays for building one; data is moved to an accelerator once per client.
"""

from __future__ import annotations

import math
import numbers
import threading
import warnings
import weakref
from abc import ABC, abstractmethod
from dataclasses import InitVar, dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset
from .errors import ConfigError
from .exchange import DXO, ClientContext, DataKind, MetaKey, Signal, Task, Weights
from .weights import check_update, subtract

ModelFn = Callable[[], nn.Module]


@dataclass(frozen=True)
class TrainConfig:
    """Local training settings, the same on every client."""

    epochs: int = 1  # local passes over the client's data per round (FedAvg's E)
    batch_size: int = 16  # FedAvg's B (McMahan et al. used 10 and 50): small client datasets need small batches
    lr: float = 0.05
    momentum: float = 0.9  # the optimizer is fresh each round: no momentum leaks across rounds
    weight_decay: float = 0.0
    validate: bool = True  # score the received global model on the local validation split first
    dp: InitVar[Any] = None  # refused: DP-SGD is an algorithm of the workflow (see __post_init__)

    def __post_init__(self, dp: Any) -> None:
        if dp is not None:
            raise ConfigError("TrainConfig takes no dp: DP-SGD is one object with a client half (private steps) and a "
                              "server half (the budget, the round's client_epsilon); put it in the workflow: "
                              "fk.FedAvg(extensions=(fk.DPSGD(noise_multiplier=1.0),))")
        for name, low in (("epochs", 1), ("batch_size", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"{{{name}}} must be an integer >= {low}", obj=self, field=name, value=v)
        for name, rule, ok in (("lr", "a finite number > 0", lambda v: v > 0),
                               ("momentum", "a number in [0, 1)", lambda v: 0 <= v < 1),
                               ("weight_decay", "a finite number >= 0", lambda v: v >= 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not ok(v):
                raise ConfigError(f"{{{name}}} must be {rule}", obj=self, field=name, value=v)
        if not isinstance(self.validate, bool):
            raise ConfigError("{validate} must be True or False", obj=self, field="validate", value=self.validate)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else must be a device torch knows."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'", field="device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available here; use 'auto' or 'cpu'",
                          field="device")
    return dev


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, device: torch.device | None = None,
             batch_size: int = 1024) -> dict[str, float]:
    """Mean cross-entropy ``loss`` and ``accuracy`` of ``model`` on ``data``."""
    if len(data) == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    if len(data) <= batch_size and data.x.device == device and data.y.device == device:
        # one batch, already in place (a client's validation split, a small test set): the same numbers, fewer ops
        out = model(data.x)
        loss = F.cross_entropy(out, data.y, reduction="sum").item()
        correct = int((out.argmax(1) == data.y).sum())
        model.train(was_training)
        return {"loss": loss / len(data), "accuracy": correct / len(data)}
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for i in range(0, len(data), batch_size):
        x = data.x[i:i + batch_size].to(device, non_blocking=True)
        y = data.y[i:i + batch_size].to(device, non_blocking=True)
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    model.train(was_training)
    return {"loss": loss.item() / len(data), "accuracy": correct.item() / len(data)}


LOCAL_WEIGHTS = "_local_weights"  # client state: a CPU copy of its last locally trained weights (cross-site evaluation)
POOL_IDLE = 4  # idle model instances kept per (builder, device); more are left to the garbage collector


class _Pool:
    """Model instances lent to tasks, per (model builder, device): a federation of 10,000 clients that trains
    100 a round one at a time holds one model, not 10,000. A task borrows with `local_model` and `Client.handle`
    gives the instance back when the task ends (`give_back`); a task that never ends (a stuck client) keeps its
    own. Instances are built with torch's global random state saved and restored around ``model_fn()``, so a task
    sees the same random numbers whether its model was just built or borrowed (dropout repeats exactly)."""

    def __init__(self) -> None:
        self._idle: "weakref.WeakKeyDictionary[Any, dict[str, list[nn.Module]]]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def take(self, model_fn: ModelFn, device: torch.device) -> nn.Module:
        with self._lock:
            try:
                idle = self._idle.get(model_fn, {}).get(str(device))
            except TypeError:  # a builder that cannot be weakly referenced: never pooled
                idle = None
            if idle:
                return idle.pop()
        with torch.random.fork_rng(devices=[]):
            return model_fn().to(device)

    def give_back(self, model_fn: ModelFn, device: torch.device, model: nn.Module) -> None:
        if _hooked(model):  # e.g. Opacus' GradSampleModule hooked it: another task must not inherit the hooks
            return
        with self._lock:
            try:
                idle = self._idle.setdefault(model_fn, {}).setdefault(str(device), [])
            except TypeError:
                return
            if len(idle) < POOL_IDLE and all(m is not model for m in idle):
                idle.append(model)


def _hooked(model: nn.Module) -> bool:
    """Whether ``model`` carries module hooks (or Opacus' per-example gradient hooks)."""
    if hasattr(model, "autograd_grad_sample_hooks"):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None)
               for m in model.modules())


MODELS = _Pool()


def local_model(ctx: ClientContext, model_fn: ModelFn, key: str = "_model") -> nn.Module:
    """A model instance for this task, under ``key`` in the client's state (a cache key, starting with ``_``).

    The instance is borrowed from a pool shared by all clients (one per model builder and device) and is
    only the task's: its weights are whatever the previous borrower left, so load the weights to use first
    (`load_weights` copies every entry of the state dict). Run through `fedkit.client.Client.handle`, the task
    gives it back when it ends and ``key`` leaves the state; the trained one (``"_model"``) leaves a CPU copy of its
    weights under `LOCAL_WEIGHTS` when the client keeps its local model (cross-site evaluation, see `SubmitModel`).
    Called outside ``handle`` (an executor run by hand), the instance stays in the state, as a cache.
    """
    model = ctx.state.get(key)
    if model is None:
        model = ctx.state[key] = MODELS.take(model_fn, ctx.device)
        ctx.leases.append((key, model_fn, model))
    return model


def load_weights(model: nn.Module, weights: Weights) -> None:
    """Copy ``weights`` into ``model``; `UpdateError` if their names or shapes do not fit it."""
    own = model.state_dict()
    check_update(weights, own, f"the weights given to {type(model).__name__}", finite=False)
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(weights[k])


def on_device(ctx: ClientContext, key: str, data: Dataset) -> Dataset:
    """``data`` on the client's device: as it is when it is there already (nothing is kept), else moved once and
    cached in the client's state under ``key`` (a copy of the client's data on the accelerator)."""
    if data.x.device == ctx.device and data.y.device == ctx.device:
        return data
    if key not in ctx.state:
        ctx.state[key] = Dataset(data.x.to(ctx.device), data.y.to(ctx.device), data.num_classes, data.name)
    return ctx.state[key]


GradHook = Callable[[], None]


class GradTerm(ABC):
    """A term added to the gradients, written on parameter dicts: ``add_to(params, grads)`` adds it in place.

    The same term runs on one model (`grad_term_hook` binds it to a model's parameters, for `sgd_epochs`) and
    on many clients' parameters stacked along a leading client axis (`stack`, for
    `fedkit.engine.vectorized`): that is what lets an algorithm's client half train clients together.
    """

    @abstractmethod
    def add_to(self, params: Weights, grads: Weights) -> None:
        """Add the term to ``grads`` in place, for ``params`` (the same keys; stacked or not)."""

    @classmethod
    @abstractmethod
    def stack(cls, terms: Sequence["GradTerm"], keys: Sequence[str]) -> "GradTerm":
        """One term over parameters stacked along a leading client axis, from one term per client (in order)."""


def _stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach() for t in tensors])


class ProximalTerm(GradTerm):
    """FedProx's mu * (w - w_global); ``mu`` a number, or (stacked) a tensor with one value per client."""

    def __init__(self, anchor: Weights, mu: float | torch.Tensor) -> None:
        self.anchor, self.mu = anchor, mu

    def add_to(self, params: Weights, grads: Weights) -> None:
        with torch.no_grad():
            for k, p in params.items():
                if isinstance(self.mu, torch.Tensor):
                    n = len(p)
                    mu = self.mu[:n].reshape((n,) + (1,) * (p.dim() - 1))
                    grads[k].add_(mu * (p - self.anchor[k][:n]))
                else:
                    grads[k].add_(p - self.anchor[k], alpha=self.mu)

    @classmethod
    def stack(cls, terms: Sequence[GradTerm], keys: Sequence[str]) -> GradTerm:
        mus = [t.mu for t in terms]  # type: ignore[attr-defined]
        anchor = {k: _stacked([t.anchor[k] for t in terms]) for k in keys}  # type: ignore[attr-defined]
        return cls(anchor, torch.tensor(mus, dtype=anchor[keys[0]].dtype, device=anchor[keys[0]].device))


class CorrectionTerm(GradTerm):
    """SCAFFOLD's drift correction c - c_i, a fixed tensor per parameter (stacked: one row per client)."""

    def __init__(self, correction: Weights) -> None:
        self.correction = correction
        self.stacked = False

    def add_to(self, params: Weights, grads: Weights) -> None:
        with torch.no_grad():
            for k, p in params.items():
                grads[k].add_(self.correction[k][:len(p)] if self.stacked else self.correction[k])

    @classmethod
    def stack(cls, terms: Sequence[GradTerm], keys: Sequence[str]) -> GradTerm:
        out = cls({k: _stacked([t.correction[k] for t in terms]) for k in keys})  # type: ignore[attr-defined]
        out.stacked = True
        return out


class TermHook:
    """A `GradHook` that adds a `GradTerm` to one model's gradients; ``term`` is there for engines that stack it."""

    def __init__(self, model: nn.Module, term: GradTerm) -> None:
        self.term = term
        # a frozen parameter has no gradient to add to, and SGD leaves it as it is
        self.params = {k: p for k, p in model.named_parameters() if p.requires_grad}

    def __call__(self) -> None:
        self.term.add_to(self.params, {k: p.grad for k, p in self.params.items()})


def grad_term_hook(model: nn.Module, term: GradTerm) -> GradHook:
    """``term`` as a gradient hook on ``model``'s parameters (vectorizable: see `GradTerm`)."""
    return TermHook(model, term)


def proximal_hook(model: nn.Module, anchor: Weights, mu: float) -> GradHook:
    """FedProx's proximal term (Li et al. 2020): add mu * (w - w_global) to each gradient.

    That is the gradient of (mu/2) * ||w - w_global||^2, added directly rather than through the loss.
    """
    return grad_term_hook(model, ProximalTerm({k: anchor[k] for k, _ in model.named_parameters()}, mu))


def correction_hook(model: nn.Module, correction: Weights) -> GradHook:
    """SCAFFOLD's drift correction (Karimireddy et al. 2020): add (c - c_i) to each gradient."""
    return grad_term_hook(model, CorrectionTerm({k: correction[k] for k, _ in model.named_parameters()}))


class PrivateSteps(Protocol):
    """What DP-SGD changes in `sgd_epochs` (made by `fedkit.privacy.dp.DPSGD.prepare`): how batches are
    drawn (Poisson sampling) and the optimizer (Opacus' DPOptimizer: clip each example's gradient, add noise)."""

    def batches(self, n: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]: ...

    def optimizer(self, opt: torch.optim.Optimizer, seed: int) -> Any: ...


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """One epoch of batch indices: a random permutation cut into ``batch_size`` pieces (the last may be smaller)."""
    order = torch.randperm(n, generator=generator).to(device)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def sgd_epochs(model: nn.Module, data: Dataset, cfg: TrainConfig, seed: int, abort: Signal,
               grad_hooks: Sequence[GradHook] = (), private: PrivateSteps | None = None) -> dict[str, float]:
    """Train ``model`` in place for ``cfg.epochs`` with SGD; returns loss, accuracy, steps, samples.

    Batches are drawn from a generator seeded with ``seed`` (so runs repeat exactly), and the abort
    signal is checked before every batch. ``grad_hooks`` run after each backward pass, before the
    optimizer step: that is where FedProx and SCAFFOLD change the local update. With ``private``
    (DP-SGD), batches are Poisson-sampled and each step clips every example's gradient and adds noise
    before the hooks run (the hooks then see only privatized gradients).
    """
    sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    opt = sgd if private is None else private.optimizer(sgd, seed)
    gen = torch.Generator().manual_seed(seed)
    device = data.x.device
    n = len(data)
    model.train()
    loss_sum = torch.zeros((), device=device)
    preds: list[torch.Tensor] = []  # each batch's predictions and labels, compared once at the end (an exact count)
    labels: list[torch.Tensor] = []
    steps = seen = 0
    with warnings.catch_warnings():
        if private is not None:  # Opacus hooks the first layer too, whose input needs no gradient: torch warns each step
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(cfg.epochs):
            batches = shuffled_batches(n, cfg.batch_size, gen, device) if private is None else private.batches(n, gen, device)
            for idx in batches:
                abort.check()
                x, y = data.x[idx], data.y[idx]
                out = model(x)
                loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if private is not None:
                    opt.pre_step()  # Opacus' named stages: clip each example's gradient, add noise, scale
                for hook in grad_hooks:
                    hook()
                sgd.step()
                steps += 1
                b = len(idx)
                if b:  # a Poisson batch may be empty: it still takes a (noise-only) step
                    loss_sum += loss.detach() * b
                    preds.append(out.detach().argmax(1))
                    labels.append(y)
                seen += b
    seen = max(seen, 1)
    correct = int((torch.cat(preds) == torch.cat(labels)).sum()) if preds else 0
    return {"train_loss": loss_sum.item() / seen, "train_accuracy": correct / seen,
            "steps": steps, "samples": n}


@dataclass
class LocalTraining:
    """One client's local training for one task, as the client halves of algorithms see and change it.

    Before training a hook may add ``grad_hooks`` (run after each backward pass, before the step:
    FedProx, SCAFFOLD) or set ``private`` (DP-SGD's batches and optimizer); after training it may
    read ``stats`` and ``diff`` and add to ``meta`` and ``metrics`` (SCAFFOLD's control-variate
    change, DP-SGD's epsilon). ``notes`` is scratch space for a hook between its two calls.
    """

    task: Task
    ctx: ClientContext
    model: nn.Module
    received: Weights  # the global weights as received, on the client's device
    data: Dataset  # the training split, on the client's device
    config: "TrainConfig"
    grad_hooks: list[GradHook] = field(default_factory=list)
    private: PrivateSteps | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)  # after training: train_loss, train_accuracy, steps, samples
    diff: Weights = field(default_factory=dict)  # after training: local minus received weights, on the CPU


class TrainHook:
    """The client half of an algorithm, run by the standard `Trainer` around local training.

    Both methods do nothing here; an algorithm overrides what it needs. The server half of the same
    object (`fedkit.workflows.Extension`) sends it with each training task, under the task meta's
    ``client_hooks``, so one object holds the settings both halves share.

    ``vectorized``: True when `fedkit.engine.vectorized` may train this client together with others, that is
    when the client half changes the steps only through `GradTerm` hooks (`grad_term_hook`) and otherwise
    reads and writes ``t.diff``, ``t.stats``, ``t.meta``, ``t.metrics`` and client state (``t.model`` holds the
    received weights in ``client_begin`` and the trained ones in ``client_end``, but it is one instance shared by
    the clients trained together: keep no reference to it); else False, or the reason (a string) it runs per
    client.
    """

    vectorized: ClassVar[bool | str] = False

    def client_begin(self, t: LocalTraining) -> None:
        """Before the first batch: add gradient hooks, or make the steps private."""

    def client_end(self, t: LocalTraining) -> None:
        """After the last batch: report what the server half needs (in ``t.meta`` / ``t.metrics``)."""


def has_client_half(hook: object) -> bool:
    """Whether ``hook`` does anything on the clients (overrides `TrainHook.client_begin` or `client_end`)."""
    return isinstance(hook, TrainHook) and (type(hook).client_begin is not TrainHook.client_begin
                                            or type(hook).client_end is not TrainHook.client_end)


def hook_name(hook: object) -> str:
    """How a client half is named in a result's ``client_hooks_ran``."""
    return type(hook).__name__


class Trainer:
    """Executor for the ``train`` task: global WEIGHTS in, WEIGHT_DIFF out, with samples and steps in meta.

    The algorithm's client halves come with the task (``meta["client_hooks"]``, see `TrainHook`):
    FedProx's proximal term, SCAFFOLD's drift correction, DP-SGD's private steps. The result's
    ``client_hooks_ran`` names those it ran, so the server can refuse results of an executor that
    ignored them. Plain FedAvg sends none.
    """

    def __init__(self, model_fn: ModelFn, config: TrainConfig = TrainConfig()) -> None:
        self.model_fn = model_fn
        self.config = config

    def execute(self, task: Task, ctx: ClientContext, abort: Signal) -> DXO:
        t, hooks = self.begin(task, ctx)
        t.stats = sgd_epochs(t.model, t.data, self.config, ctx.seed, abort, t.grad_hooks, t.private)
        return self.finish(t, hooks)

    def begin(self, task: Task, ctx: ClientContext, validate: bool = True) -> tuple[LocalTraining, tuple]:
        """Everything before the local steps: load the global weights, validate, run the client halves' begin.

        `execute` is ``begin``, `sgd_epochs`, `finish`; `fedkit.engine.vectorized` runs the steps of many
        clients together between the same two halves (and, with ``validate=False``, validates them together).
        """
        if task.data.kind != DataKind.WEIGHTS:
            raise ValueError(f"the train task needs WEIGHTS, got {task.data.kind.value}")
        model = local_model(ctx, self.model_fn)
        received = {k: v.to(ctx.device) for k, v in task.data.data.items()}
        load_weights(model, received)
        t = LocalTraining(task, ctx, model, received, on_device(ctx, "_train_on_device", ctx.data.train), self.config)
        if validate and self.config.validate and len(ctx.data.val):
            val = evaluate(model, on_device(ctx, "_val_on_device", ctx.data.val), ctx.device)
            t.metrics.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        hooks = tuple(task.data.meta.get(MetaKey.HOOKS, ()))
        for hook in hooks:
            hook.client_begin(t)
        return t, hooks

    def finish(self, t: LocalTraining, hooks: tuple) -> DXO:
        """Everything after the local steps (``t.stats`` set, ``t.model`` trained): the diff, client_end, meta."""
        model = t.model
        t.metrics.update(train_loss=t.stats["train_loss"], train_accuracy=t.stats["train_accuracy"])
        t.diff = {k: v.detach().cpu() for k, v in subtract(model.state_dict(), t.received).items()}
        for hook in hooks:
            hook.client_end(t)
        meta = {MetaKey.NUM_SAMPLES: t.stats["samples"], MetaKey.NUM_STEPS: t.stats["steps"], MetaKey.METRICS: t.metrics,
                **t.meta}
        if hooks:
            meta[MetaKey.HOOKS_RAN] = [hook_name(h) for h in hooks]
        return DXO(DataKind.WEIGHT_DIFF, t.diff, meta)


class Evaluator:
    """Executor for the ``validate`` task: scores the WEIGHTS it receives on the local validation split."""

    def __init__(self, model_fn: ModelFn) -> None:
        self.model_fn = model_fn

    def execute(self, task: Task, ctx: ClientContext, abort: Signal) -> DXO:
        # its own instance: scoring another model must not overwrite the locally trained one ("_model"),
        # which `SubmitModel` hands in for cross-site evaluation
        model = local_model(ctx, self.model_fn, key="_eval_model")
        load_weights(model, {k: v.to(ctx.device) for k, v in task.data.data.items()})
        scores = evaluate(model, on_device(ctx, "_val_on_device", ctx.data.val), ctx.device)
        return DXO(DataKind.METRICS, scores, {MetaKey.NUM_SAMPLES: len(ctx.data.val)})


class SubmitModel:
    """Executor for the ``submit_model`` task: the client's local model as WEIGHTS (cross-site evaluation).

    The local model is the client's last locally trained weights. A model instance is only lent to a task
    (`local_model`), so what survives rounds is a CPU copy of those weights, ``ctx.state[LOCAL_WEIGHTS]``, which
    `fedkit.client.Client.handle` keeps after each training task when the client keeps its local model
    (``Client.keep_local_model``; the simulator sets it only when the workflow will ask for local models, as
    `fedkit.workflows.CrossSiteEval` does, so a plain FedAvg run holds no copy per client). An executor run by hand
    leaves its instance in ``ctx.state["_model"]``, which is used then. A client that never trained (in this
    process: the copy is a cache, not part of a checkpoint) submits the WEIGHTS it received.
    ``meta["trained"]`` says which of the two it was.
    """

    def execute(self, task: Task, ctx: ClientContext, abort: Signal) -> DXO:
        model = ctx.state.get("_model")
        local = ctx.state.get(LOCAL_WEIGHTS)
        if isinstance(model, nn.Module):
            weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        elif local is not None:
            weights = {k: v.detach().cpu().clone() for k, v in local.items()}
        elif task.data.kind == DataKind.WEIGHTS:
            weights = {k: v.detach().cpu().clone() for k, v in task.data.data.items()}
        else:
            raise ValueError(f"client {ctx.client!r} never trained, so it can only submit the WEIGHTS it is sent; "
                             f"the submit_model task carried {task.data.kind.value}")
        trained = isinstance(model, nn.Module) or local is not None
        return DXO(DataKind.WEIGHTS, weights, {MetaKey.NUM_SAMPLES: len(ctx.data.train), "trained": trained})
