"""Clipping and noise for user-level DP: the named stages of DP-FedAvg's server step, and a client filter.

Clip each update (`clip_update`), sum, add Gaussian noise (`add_noise`), divide by the expected number
of clients (`noisy_mean`); adapt the clip norm to a quantile of the update norms (`AdaptiveClip`,
`split_noise`, `adapt_clip`). `ClipUpdate` does the client's part as a result filter, for executors of
your own and for local DP (each client adds its own noise).

>>> clip_update({"w": torch.tensor([3.0, 4.0])}, 1.0)["w"]
tensor([0.6000, 0.8000])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ConfigError
from ..exchange import DXO, DataKind, FilterContext, Weights
from ..seeds import LOCAL_DP_NOISE, derive_seed
from ..weights import norm
from .accounting import check_number

CLIP_KEY = "dp_clip"  # task meta: the clip norm the server asks for this round (UserDP)
CLIPPED_KEY = "dp_clipped"  # result meta: True when the client had to scale its update down


def clip_update(update: Weights, max_norm: float) -> Weights:
    """``update`` scaled down to an L2 norm of at most ``max_norm`` (all floating-point entries together).

    An update already within the norm (always, for ``max_norm=inf``) is returned as it is.

    >>> clip_update({"w": torch.tensor([3.0, 4.0])}, 1.0)["w"]
    tensor([0.6000, 0.8000])
    """
    size = norm(update)
    if size <= max_norm:
        return dict(update)
    scale = max_norm / size
    return {k: (v.to(torch.float64) * scale).to(v.dtype) if v.is_floating_point() else v for k, v in update.items()}


def add_noise(update: Weights, std: float, generator: torch.Generator) -> Weights:
    """``update`` plus independent N(0, std^2) noise on every floating-point entry.

    The noise is drawn in float64 on the CPU from ``generator``, in the order of the update's keys, so
    the same generator state gives the same noise on any device.
    """
    if std == 0:
        return dict(update)
    out = {}
    for k, v in update.items():
        if v.is_floating_point():
            noise = torch.normal(0.0, float(std), tuple(v.shape), generator=generator, dtype=torch.float64)
            out[k] = (v.to(torch.float64) + noise.to(v.device)).to(v.dtype)
        else:
            out[k] = v
    return out


def noisy_mean(updates: Sequence[Weights], template: Weights, clip: float, noise_multiplier: float,
               expected_clients: float, generator: torch.Generator) -> Weights:
    """DP-FedAvg's server estimator (McMahan et al. 2018): (sum of clipped updates + N(0, (z S)^2)) / (q N).

    Clip, sum, add noise, divide, in float64; ``template`` (the global weights) gives names, shapes and
    dtypes, also when no update came. The denominator is fixed (the expected number of clients), so
    one client changes the result by at most S / (q N) whether or not it took part. Integer buffers
    are left unchanged (zero update).
    """
    total = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in template.items()
             if v.is_floating_point()}
    for u in updates:
        for k, v in clip_update(u, clip).items():
            if k in total:
                total[k] += v.to(torch.float64)
    noisy = add_noise(total, noise_multiplier * clip if noise_multiplier > 0 else 0.0, generator)
    return {k: (noisy[k] / expected_clients).to(v.dtype) if k in noisy else torch.zeros_like(v)
            for k, v in template.items()}


@dataclass(frozen=True)
class ClipUpdate:
    """Client result filter: clip a WEIGHT_DIFF to L2 norm ``max_norm``, then (local DP) add noise.

    ``max_norm=None`` follows the clip norm the server sends in the task (`UserDP`, also when it
    adapts). With ``noise_multiplier`` z > 0 each client adds N(0, (z S)^2) to its own clipped update
    (local DP: the server never sees a noiseless update); this noise is not accounted by the server.
    Results of other kinds (metrics, statistics) pass unchanged. Attach it before any encryption filter.

    >>> ClipUpdate(1.0).max_norm
    1.0
    """

    max_norm: float | None = None  # S; None: the server's clip norm from the task meta ("dp_clip")
    noise_multiplier: float = 0.0  # local DP noise, std z * S per client; 0: clip only (the server adds noise)

    def __post_init__(self) -> None:
        check_number("ClipUpdate.max_norm", self.max_norm, low=0.0, strict=True, allow_none=True)
        check_number("ClipUpdate.noise_multiplier", self.noise_multiplier, low=0.0, finite=True)

    def __call__(self, dxo: DXO, ctx: FilterContext) -> DXO:
        if dxo.kind != DataKind.WEIGHT_DIFF:
            return dxo
        opaque = [k for k, v in dxo.data.items() if not isinstance(v, torch.Tensor)]
        if opaque:
            raise TypeError(f"ClipUpdate got {type(dxo.data[opaque[0]]).__name__} for {opaque[0]!r}, not a tensor: the "
                            "update is already encrypted or encoded. DP filters must see the plain update: attach "
                            "ClipUpdate before the encryption filter in the client's result filters")
        clip = self.max_norm if self.max_norm is not None else ctx.task.data.meta.get(CLIP_KEY)
        if clip is None:
            raise ConfigError("ClipUpdate() without max_norm follows the server's clip norm, but the task carries none "
                              f"(no {CLIP_KEY!r} in its meta); give ClipUpdate(max_norm=...) or run DPFedAvg")
        size = norm(dxo.data)
        clipped = clip_update(dxo.data, clip)
        if self.noise_multiplier > 0:
            gen = torch.Generator().manual_seed(derive_seed(ctx.seed, ctx.task.attempt, LOCAL_DP_NOISE))
            clipped = add_noise(clipped, self.noise_multiplier * clip, gen)
        return dxo.with_data(clipped, **{CLIPPED_KEY: bool(size > clip)})


@dataclass(frozen=True)
class AdaptiveClip:
    """Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping").

    Each round the clip norm moves geometrically toward the ``target_quantile`` of the clients' update
    norms: C <- C * exp(-lr * (b - target_quantile)), where b is the noisy fraction of updates that
    were not clipped. The count is noised with std ``count_noise`` and the update noise is raised so
    that the round as a whole is still a Gaussian mechanism with the configured noise multiplier.
    """

    target_quantile: float = 0.5  # gamma: the share of updates that should pass unclipped (the median)
    lr: float = 0.2  # eta_C: the paper's geometric step
    count_noise: float | None = None  # sigma_b; None: expected clients / 20, the paper's choice

    def __post_init__(self) -> None:
        check_number("AdaptiveClip.target_quantile", self.target_quantile, low=0.0, high=1.0)
        check_number("AdaptiveClip.lr", self.lr, low=0.0, strict=True, finite=True)
        check_number("AdaptiveClip.count_noise", self.count_noise, low=0.0, strict=True, allow_none=True, finite=True)


def split_noise(noise_multiplier: float, count_noise: float) -> float:
    """The update noise multiplier that leaves room for a noised count: (z^-2 - (2 sigma_b)^-2)^-1/2.

    The count of unclipped updates (centred, sensitivity 1/2) and the update sum are two Gaussian
    mechanisms; together they are one with noise multiplier z (Andrew et al. 2021, Theorem 1).
    """
    if noise_multiplier == 0:
        return 0.0
    if 2 * count_noise <= noise_multiplier:
        raise ConfigError(f"adaptive clipping needs count_noise > noise_multiplier / 2 = {noise_multiplier / 2:g}, "
                          f"got {count_noise:g}; raise count_noise (or sample more clients per round)")
    return (noise_multiplier ** -2 - (2 * count_noise) ** -2) ** -0.5


def adapt_clip(clip: float, unclipped_fraction: float, target_quantile: float, lr: float) -> float:
    """One geometric step of adaptive clipping: C * exp(-lr * (unclipped_fraction - target_quantile))."""
    return clip * math.exp(-lr * (unclipped_fraction - target_quantile))
