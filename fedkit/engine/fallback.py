"""Which tasks the vectorized engine cannot train together, and why; and how many clients fit together.

A task runs as in the sequential engine (the engine logs the reason once) when it is no standard training task,
or its client halves declare no vectorized form, or its model has buffers or dropout or fails a probe: one
batched step of two clients under ``vmap`` (`_probe`), which also measures the memory a client needs per sample,
from which the automatic chunk size follows. What is learnt of a model builder is cached (`Probes`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from ..client import Client
from ..exchange import DataKind, MetaKey, Task
from ..preprocess import current_data
from ..train import Trainer, has_client_half, hook_name
from .stacked import _Entry, _forward, _losses

CPU_CHUNK = 256  # clients trained together at most on a CPU (more gains nothing: the batch is already wide)
CUDA_CHUNK = 4096


class Probes:
    """Why a task must run as in the sequential engine (or None), and the automatic chunk size, for one engine."""

    def __init__(self) -> None:
        # per model builder (weakly held: an engine kept for a session must not keep old runs' data alive), per
        # (input shape, dtype, device type): why it cannot be vmapped (or None), and about the bytes one client
        # needs per sample of a batch (for the automatic chunk)
        self._models: "weakref.WeakKeyDictionary[Any, dict[Any, tuple[str | None, int | None]]]" = \
            weakref.WeakKeyDictionary()

    def why_sequential(self, client: Client, task: Task, fault: dict | None, device: torch.device) -> str | None:
        """Why ``task`` (with its injected ``fault``) must run as in the sequential engine, or None."""
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

    def chunk(self, e: _Entry, device: torch.device) -> int:
        """How many clients like ``e`` to train together: as many as half the free memory holds, at most a cap."""
        data = e.t.data
        per_client = self._known(e.executor.model_fn).get((tuple(data.x.shape[1:]), data.x.dtype, device.type),
                                                          (None, None))[1]
        cap = CUDA_CHUNK if device.type == "cuda" else CPU_CHUNK
        if per_client is None:
            return cap
        weights = sum(v.numel() * v.element_size() for v in e.t.received.values())
        per_client = per_client * e.t.config.batch_size + 8 * weights  # weights, grads, momentum, terms, copies
        return max(1, min(cap, int(0.5 * _free_bytes(device) / max(per_client, 1))))


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
