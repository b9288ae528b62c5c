"""The standard PyTorch executors: local training (SGD with momentum) and evaluation.

The trainer is the client half of FedAvg: load the global weights, train ``epochs`` passes over the
local data, return the difference (WEIGHT_DIFF) with the number of samples and steps. It checks the
abort signal between batches, and keeps its model and on-device data in the client's state so that
rounds after the first pay no set-up.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset
from .errors import ConfigError
from .exchange import DXO, ClientContext, DataKind, MetaKey, Signal, Task, Weights
from .weights import check_update, subtract

if TYPE_CHECKING:
    from .privacy.dp import DPSGD

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
    dp: "DPSGD | None" = None  # example-level DP-SGD (fedkit.privacy.dp.DPSGD); None: plain SGD

    def __post_init__(self) -> None:
        for name, low in (("epochs", 1), ("batch_size", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= {low}, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ConfigError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        for name in ("momentum", "weight_decay"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0):
                raise ConfigError(f"TrainConfig.{name} must be >= 0, got {v!r}")
        if self.momentum >= 1:
            raise ConfigError(f"TrainConfig.momentum must be < 1, got {self.momentum!r}")
        if self.dp is not None and not callable(getattr(self.dp, "prepare", None)):
            raise ConfigError(f"TrainConfig.dp must be a fedkit.privacy.dp.DPSGD(...) or None, got {self.dp!r}")


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


class Trainer:
    """Executor for the ``train`` task: global WEIGHTS in, WEIGHT_DIFF out, with samples and steps in meta.

    The server chooses the algorithm through the task's meta, so the same clients serve them all:
    ``prox_mu`` turns on FedProx's proximal term; ``scaffold_c`` (the server's control variate) turns
    on SCAFFOLD: the client corrects its gradients by c - c_i, keeps its own c_i in its state, and
    returns the change of c_i as ``scaffold_dc`` (option II of the paper: c_i+ = c_i - c + (x - y) / (K lr)).

    With ``config.dp`` (`fedkit.privacy.dp.DPSGD`) the training is DP-SGD: the client keeps its accountant's
    history in its state and reports its cumulative ``epsilon`` (and ``epsilon_next``, after one more such
    round) in its metrics; past its ``target_epsilon`` it refuses to train (`BudgetExhausted`).
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
        metrics: dict[str, float] = {}
        if self.config.validate and len(ctx.data.val):
            val = evaluate(model, on_device(ctx, "_val_on_device", ctx.data.val), ctx.device)
            metrics.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        hooks: list[GradHook] = []
        mu = float(task.data.meta.get("prox_mu", 0.0))
        if mu > 0:
            hooks.append(proximal_hook(model, received, mu))
        c = task.data.meta.get("scaffold_c")
        if c is not None:
            params = dict(model.named_parameters())
            c = {k: c[k].to(ctx.device) for k in params}
            c_i = ctx.state.setdefault("scaffold_ci", {k: torch.zeros_like(v, device="cpu") for k, v in params.items()})
            c_i = {k: v.to(ctx.device) for k, v in c_i.items()}
            hooks.append(correction_hook(model, {k: c[k] - c_i[k] for k in params}))
        train = on_device(ctx, "_train_on_device", ctx.data.train)
        private = None if self.config.dp is None else self.config.dp.prepare(ctx, model, len(train), self.config)
        stats = sgd_epochs(model, train, self.config, ctx.seed, abort, hooks, private)
        metrics.update(train_loss=stats["train_loss"], train_accuracy=stats["train_accuracy"])
        if private is not None:
            metrics.update(private.account(stats["steps"]))  # cumulative over the rounds this client trained
        diff = {k: v.detach().cpu() for k, v in subtract(model.state_dict(), received).items()}
        meta = {MetaKey.NUM_SAMPLES: stats["samples"], MetaKey.NUM_STEPS: stats["steps"], MetaKey.METRICS: metrics}
        if c is not None:
            # Option II assumes plain SGD steps of size lr; with momentum beta a step is about lr / (1 - beta)
            # long, and without this correction c_i overshoots by 1 / (1 - beta) and the run diverges.
            step_size = self.config.lr / (1.0 - self.config.momentum)
            scale = 1.0 / (max(stats["steps"], 1) * step_size)
            new_ci = {k: (c_i[k] - c[k] - diff[k].to(ctx.device) * scale).cpu() for k in c_i}
            meta["scaffold_dc"] = {k: new_ci[k] - c_i[k].cpu() for k in new_ci}
            ctx.state["scaffold_ci"] = new_ci
        return DXO(DataKind.WEIGHT_DIFF, diff, meta)


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
