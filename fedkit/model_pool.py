"""Where a client's task finds its model and data: model instances lent from a pool shared by all clients
(`MODELS`, `local_model`), weights loaded into them (`load_weights`), data moved to the device once (`on_device`).

A federation holds a few model instances however many clients it registers, and no task after the first
pays for building one.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

import torch
from torch import nn

from .data import Dataset
from .exchange import ClientContext, Weights
from .weights import check_update

ModelFn = Callable[[], nn.Module]


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
