"""The vectorized engine's maths: many clients' copies of one model trained and scored together.

The clients' parameters are stacked along a leading client axis: one forward pass of all of them (``vmap`` of
``functional_call``), one backward pass, and SGD with momentum and weight decay written on the stacked tensors
(`_steps`, the maths of ``torch.optim.SGD``); the received model is scored on every client's validation data in
one forward pass (`_validate`). Each client is an `_Entry` of the group; `fedkit.engine.vectorized` runs what
comes before and after the steps. These names are the engine's own (private to ``fedkit.engine``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ..client import Answer, Client, failed
from ..exchange import DXO, Aborted, DeadlineExceeded, Signal, Task
from ..grad_terms import GradTerm
from ..model_pool import on_device
from ..train import LocalTraining, Trainer


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
