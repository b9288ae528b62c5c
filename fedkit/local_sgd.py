"""Local SGD, the computation a client runs: its settings (`TrainConfig`), the device it runs on, the steps
(`sgd_epochs`, with the gradient hooks of FedProx and SCAFFOLD and DP-SGD's private steps) and `evaluate`.

Plain functions over a model and a `Dataset`: the executors of `fedkit.train` call them for a task, a
benchmark or a notebook calls them directly.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import InitVar, dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset
from .errors import ConfigError
from .exchange import Signal


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



GradHook = Callable[[], None]
"""Run by `sgd_epochs` after each backward pass, before the step: where FedProx and SCAFFOLD change the update."""


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
