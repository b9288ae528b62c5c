"""Aggregation rules: small pure functions from ``[(update, weight), ...]`` to one update.

A rule sees only named tensors and their aggregation weights, never clients or configs, so a new
rule is a function written in a notebook cell:

>>> import torch
>>> ups = [({"w": torch.tensor([1.0])}, 1.0), ({"w": torch.tensor([4.0])}, 3.0)]
>>> weighted_mean(ups)["w"]
tensor([3.2500])

How much each client weighs is chosen separately, by a *weighing* function of its result
(`by_samples`, the FedAvg default of McMahan et al. 2017, or `by_steps`, as NVFlare offers).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .errors import UpdateError
from .exchange import DXO, MetaKey, Weights

Update = tuple[Weights, float]
Rule = Callable[[Sequence[Update]], Weights]


def weighted_mean(updates: Sequence[Update]) -> Weights:
    """FedAvg's rule: sum_i w_i * u_i / sum_i w_i, computed in float64 and cast back to each dtype."""
    if not updates:
        raise UpdateError("nothing to aggregate: no client update arrived this round")
    total = float(sum(w for _, w in updates))
    if not total > 0:
        raise UpdateError(f"aggregation weights must sum to a positive number, got {total}; "
                          "did every client train on zero samples?")
    first = updates[0][0]
    out = {}
    for k, ref in first.items():
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for u, w in updates:
            acc += u[k].to(torch.float64) * (w / total)
        out[k] = acc.to(ref.dtype)
    return out


def by_samples(result: DXO) -> float:
    """Weigh a client by the number of samples it trained on (``meta['num_samples']``)."""
    return _meta_number(result, MetaKey.NUM_SAMPLES)


def by_steps(result: DXO) -> float:
    """Weigh a client by the optimizer steps it took (``meta['num_steps']``)."""
    return _meta_number(result, MetaKey.NUM_STEPS)


def uniform(result: DXO) -> float:
    """Weigh every client the same."""
    return 1.0


def _meta_number(result: DXO, key: str) -> float:
    value = result.meta.get(key)
    if not isinstance(value, (int, float)) or value < 0:
        raise UpdateError(f"a client result has meta[{key!r}] = {value!r}; the weighing needs a number >= 0. "
                          f"Executors must report {key!r} in the DXO meta.")
    return float(value)
