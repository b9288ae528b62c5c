"""The standard PyTorch executors: local training (SGD with momentum) and evaluation.

The trainer is the client half of FedAvg: load the global weights, train ``epochs`` passes over the
local data, return the difference (WEIGHT_DIFF) with the number of samples and steps. It checks the
abort signal between batches, and keeps its model and on-device data in the client's state so that
rounds after the first pay no set-up.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import InitVar, dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

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
                raise ConfigError(f"TrainConfig.{name} must be an integer >= {low}, got {v!r}")
        for name, rule, ok in (("lr", "a finite number > 0", lambda v: v > 0),
                               ("momentum", "a number in [0, 1)", lambda v: 0 <= v < 1),
                               ("weight_decay", "a finite number >= 0", lambda v: v >= 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or not ok(v):
                raise ConfigError(f"TrainConfig.{name} must be {rule}, got {v!r}")
        if not isinstance(self.validate, bool):
            raise ConfigError(f"TrainConfig.validate must be True or False, got {self.validate!r}")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; anything else must be a device torch knows."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for but CUDA is not available here; use 'auto' or 'cpu'")
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


def local_model(ctx: ClientContext, model_fn: ModelFn, key: str = "_model") -> nn.Module:
    """The client's model instance under ``key`` (a cache key, starting with ``_``), built once per run."""
    if key not in ctx.state:
        ctx.state[key] = model_fn().to(ctx.device)
    return ctx.state[key]


def load_weights(model: nn.Module, weights: Weights) -> None:
    """Copy ``weights`` into ``model``; `UpdateError` if their names or shapes do not fit it."""
    check_update(weights, model.state_dict(), f"the weights given to {type(model).__name__}", finite=False)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(weights[k])


def on_device(ctx: ClientContext, key: str, data: Dataset) -> Dataset:
    """``data`` moved to the client's device once and cached in its state."""
    if key not in ctx.state:
        ctx.state[key] = Dataset(data.x.to(ctx.device), data.y.to(ctx.device), data.num_classes, data.name)
    return ctx.state[key]


GradHook = Callable[[], None]


def proximal_hook(model: nn.Module, anchor: Weights, mu: float) -> GradHook:
    """FedProx's proximal term (Li et al. 2020): add mu * (w - w_global) to each gradient.

    That is the gradient of (mu/2) * ||w - w_global||^2, added directly rather than through the loss.
    """
    pairs = [(p, anchor[name]) for name, p in model.named_parameters()]

    def hook() -> None:
        with torch.no_grad():
            for p, a in pairs:
                p.grad.add_(p - a, alpha=mu)

    return hook


def correction_hook(model: nn.Module, correction: Weights) -> GradHook:
    """SCAFFOLD's drift correction (Karimireddy et al. 2020): add (c - c_i) to each gradient."""
    pairs = [(p, correction[name]) for name, p in model.named_parameters()]

    def hook() -> None:
        with torch.no_grad():
            for p, c in pairs:
                p.grad.add_(c)

    return hook


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
    correct = torch.zeros((), device=device, dtype=torch.long)
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
                if len(idx):  # a Poisson batch may be empty: it still takes a (noise-only) step
                    loss_sum += loss.detach() * len(idx)
                    correct += (out.detach().argmax(1) == y).sum()
                seen += len(idx)
    seen = max(seen, 1)
    return {"train_loss": loss_sum.item() / seen, "train_accuracy": correct.item() / seen,
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
    """

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
        if task.data.kind != DataKind.WEIGHTS:
            raise ValueError(f"the train task needs WEIGHTS, got {task.data.kind.value}")
        model = local_model(ctx, self.model_fn)
        received = {k: v.to(ctx.device) for k, v in task.data.data.items()}
        load_weights(model, received)
        t = LocalTraining(task, ctx, model, received, on_device(ctx, "_train_on_device", ctx.data.train), self.config)
        if self.config.validate and len(ctx.data.val):
            val = evaluate(model, on_device(ctx, "_val_on_device", ctx.data.val), ctx.device)
            t.metrics.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        hooks = tuple(task.data.meta.get(MetaKey.HOOKS, ()))
        for hook in hooks:
            hook.client_begin(t)
        t.stats = sgd_epochs(model, t.data, self.config, ctx.seed, abort, t.grad_hooks, t.private)
        t.metrics.update(train_loss=t.stats["train_loss"], train_accuracy=t.stats["train_accuracy"])
        t.diff = {k: v.detach().cpu() for k, v in subtract(model.state_dict(), received).items()}
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

    The local model is the one the `Trainer` left in ``ctx.state["_model"]`` after the client's last
    training task; a client that never trained (in this process: the model is a cache, not part of a
    checkpoint) submits the WEIGHTS it received. ``meta["trained"]`` says which of the two it was.
    """

    def execute(self, task: Task, ctx: ClientContext, abort: Signal) -> DXO:
        model = ctx.state.get("_model")
        if model is not None:
            weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        elif task.data.kind == DataKind.WEIGHTS:
            weights = {k: v.detach().cpu().clone() for k, v in task.data.data.items()}
        else:
            raise ValueError(f"client {ctx.client!r} never trained, so it can only submit the WEIGHTS it is sent; "
                             f"the submit_model task carried {task.data.kind.value}")
        return DXO(DataKind.WEIGHTS, weights, {MetaKey.NUM_SAMPLES: len(ctx.data.train), "trained": model is not None})
