"""The standard PyTorch executors: local training (SGD with momentum) and evaluation.

The trainer is the client half of FedAvg: load the global weights, train ``epochs`` passes over the
local data, return the difference (WEIGHT_DIFF) with the number of samples and steps. It checks the
abort signal between batches. Its model instance is borrowed for the task from a pool shared by all
clients (`local_model`), so that a federation holds a few models however many clients it registers,
and no task after the first pays for building one; data is moved to an accelerator once per client.

The parts live in modules of their own, and are importable from here too: the settings, the steps and
`evaluate` in `fedkit.local_sgd`, FedProx's and SCAFFOLD's gradient terms in `fedkit.grad_terms`, the pool in
`fedkit.model_pool`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from .data import Dataset
from .exchange import DXO, ClientContext, DataKind, MetaKey, Signal, Task, Weights
from .grad_terms import (CorrectionTerm, GradTerm, ProximalTerm, TermHook, correction_hook, grad_term_hook,
                         proximal_hook)
from .local_sgd import GradHook, PrivateSteps, TrainConfig, evaluate, resolve_device, sgd_epochs, shuffled_batches
from .model_pool import LOCAL_WEIGHTS, MODELS, POOL_IDLE, ModelFn, load_weights, local_model, on_device
from .weights import subtract

# the executors' own names, and (re-exported: notebooks, tests and modules import them from here) their parts'
__all__ = ["LocalTraining", "TrainHook", "has_client_half", "hook_name", "Trainer", "Evaluator", "SubmitModel",
           "TrainConfig", "resolve_device", "evaluate", "GradHook", "PrivateSteps", "shuffled_batches", "sgd_epochs",
           "GradTerm", "ProximalTerm", "CorrectionTerm", "TermHook", "grad_term_hook", "proximal_hook",
           "correction_hook", "ModelFn", "LOCAL_WEIGHTS", "POOL_IDLE", "MODELS", "local_model", "load_weights",
           "on_device"]


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
