"""NVIDIA FLARE's privacy filters, for teaching: exclude variables, and percentile privacy.

These are *heuristics without a formal guarantee*: they make an update less revealing, but no
epsilon can be stated for them (use `fedkit.privacy.dp` for that). Each is a small function on an
update plus a client result filter around it, as in FLARE (``ExcludeVars``, ``PercentilePrivacy``):

>>> import fedkit as fk
>>> from fedkit.privacy.filters import ExcludeVars, PercentilePrivacy
>>> sim = fk.Simulator(fk.FedAvg(rounds=2), model=..., clients=parts,                # doctest: +SKIP
...                    client_result_filters=[ExcludeVars(r"fc2\\."), PercentilePrivacy(10, 0.01)])

Filters run in list order: put them before any encryption filter, which makes the update opaque.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ..exchange import DXO, DataKind, FilterContext, MetaKey, Weights


def excluded(names: list[str], exclude: tuple[str, ...] | str) -> list[str]:
    """The ``names`` that ``exclude`` selects: a tuple of exact names, or a regular expression (searched)."""
    if isinstance(exclude, str):
        pattern = re.compile(exclude)
        return [n for n in names if pattern.search(n)]
    return [n for n in names if n in exclude]


@dataclass(frozen=True)
class ExcludeVars:
    """Client result filter: hold back the variables ``exclude`` selects (FLARE's ExcludeVars).

    ``exclude`` is a tuple of variable names or a regular expression. In a WEIGHT_DIFF the held-back
    variables are sent as zeros ("no change"), so the update still fits the global model; note that
    FedAvg then averages those zeros in, and a variable that every client holds back never changes.
    From other kinds of result (WEIGHTS, METRICS...) they are removed. ``meta["excluded"]`` lists them.
    """

    exclude: tuple[str, ...] | str = ()

    def __post_init__(self) -> None:
        if isinstance(self.exclude, str):
            try:
                re.compile(self.exclude)
            except re.error as e:
                raise ConfigError(f"ExcludeVars got the regular expression {self.exclude!r}, which does not compile: {e}") from None
        elif not (isinstance(self.exclude, tuple) and all(isinstance(n, str) for n in self.exclude)):
            raise ConfigError(f"ExcludeVars.exclude must be a tuple of variable names or a regular expression string, "
                              f"got {self.exclude!r}")

    def __call__(self, dxo: DXO, ctx: FilterContext) -> DXO:
        names = excluded(list(dxo.data), self.exclude)
        if not names:
            return dxo
        if dxo.kind == DataKind.WEIGHT_DIFF:
            data = {k: torch.zeros_like(v) if k in names else v for k, v in dxo.data.items()}
        else:
            data = {k: v for k, v in dxo.data.items() if k not in names}
        return dxo.with_data(data, excluded=names)


def percentile_privacy(update: Weights, percentile: float = 10, gamma: float = 0.01, steps: int = 1) -> Weights:
    """Share only the largest changes, truncated (Shokri & Shmatikov 2015, "Privacy-Preserving Deep Learning").

    As FLARE's PercentilePrivacy: per step (``update / steps``), every entry whose absolute value is
    below the ``percentile``-th percentile of all absolute values becomes 0, the rest are clipped to
    [-gamma, gamma], and the result is scaled back by ``steps``. Scalars pass unchanged.

    >>> w = percentile_privacy({"w": torch.tensor([0.001, -0.5, 0.02, 0.0])}, percentile=50, gamma=0.01)
    >>> w["w"]
    tensor([ 0.0000, -0.0100,  0.0100,  0.0000])
    """
    floats = [v for v in update.values() if v.is_floating_point() and v.dim() > 0]
    if not floats:
        return dict(update)
    per_step = {k: v.to(torch.float64) / steps if v.is_floating_point() else v for k, v in update.items()}
    magnitudes = torch.cat([per_step[k].abs().reshape(-1) for k, v in update.items() if v.is_floating_point() and v.dim() > 0])
    cutoff = float(np.percentile(magnitudes.cpu().numpy(), percentile))  # linear interpolation, as FLARE's
    out = {}
    for k, v in update.items():
        if not v.is_floating_point() or v.dim() == 0:
            out[k] = v
            continue
        d = per_step[k]
        d = torch.where(d.abs() < cutoff, torch.zeros_like(d), d).clamp(-gamma, gamma)
        out[k] = (d * steps).to(v.dtype)
    return out


@dataclass(frozen=True)
class PercentilePrivacy:
    """Client result filter: `percentile_privacy` on every WEIGHT_DIFF (FLARE's PercentilePrivacy).

    A heuristic with no formal guarantee. ``percentile`` in [0, 100]: the share of the smallest changes
    that are not sent; ``gamma`` > 0: the largest change per step that is. The client's steps this round
    (``meta["num_steps"]``) make it independent of the amount of local work, as in FLARE.
    """

    percentile: float = 10  # entries below this percentile of |update| per step are sent as 0
    gamma: float = 0.01  # |update| per step is truncated to this

    def __post_init__(self) -> None:
        p, g = self.percentile, self.gamma
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 100:
            raise ConfigError(f"PercentilePrivacy.percentile must be in [0, 100], got {p!r}")
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not (g > 0 and math.isfinite(g)):
            raise ConfigError(f"PercentilePrivacy.gamma must be a finite number > 0, got {g!r}")

    def __call__(self, dxo: DXO, ctx: FilterContext) -> DXO:
        if dxo.kind != DataKind.WEIGHT_DIFF:
            return dxo
        steps = max(int(dxo.meta.get(MetaKey.NUM_STEPS, 1) or 1), 1)
        return dxo.with_data(percentile_privacy(dxo.data, self.percentile, self.gamma, steps))
