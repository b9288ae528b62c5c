"""How the encrypted layers of a model are packed into CKKS ciphertexts, and unpacked.

>>> import torch
>>> w = {"a": torch.ones(2, 3), "b": torch.zeros(4)}
>>> layout = layout_for(w, CKKSParams())
>>> layout.size, layout.chunk_sizes
(10, [6, 4])
>>> unpack(pack(w, layout), layout)["a"].shape
torch.Size([2, 3])
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, UpdateError
from ..exchange import Weights
from .he_params import CIPHERTEXTS, CKKSParams

class Packing(str, Enum):
    """How layers are cut into ciphertexts."""

    PER_LAYER = "per-layer"  # each layer in ciphertexts of its own: its error relative to its own values
    CONCATENATED = "concatenated"  # older fedkit: layers concatenated, then cut; read from older checkpoints


@dataclass(frozen=True)
class Layout:
    """Where each encrypted layer sits in the ciphertexts: layers are flattened and concatenated in order
    (`pack`), and each layer is cut into ciphertexts of its own, of ``slots`` numbers (its last one shorter).

    Why a layer never shares a ciphertext: CKKS's error in a number is an absolute one (about 1e-9 to
    1e-8 at scale 2^40) plus a part proportional to the largest value in the same ciphertext (about 4e-16 of it,
    from encoding in double precision), so a layer of tiny values packed beside one of huge values
    would be off relative to its own values. Each layer in its own ciphertexts costs at most one
    ciphertext more per layer. ``Packing.CONCATENATED`` is how older fedkit packed (the whole vector
    cut into ciphertexts, layers sharing them); it is read from checkpoints that hold it.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    slots: int
    packing: Packing = Packing.PER_LAYER

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @property
    def chunk_sizes(self) -> list[int]:
        """How many numbers each ciphertext holds, in order (ciphertexts take the packed vector's numbers in turn)."""
        if self.packing == Packing.CONCATENATED:
            return _cut(self.size, self.slots)
        return [n for size in self.sizes for n in _cut(size, self.slots)]

    @property
    def plain_nbytes(self) -> int:
        """Bytes these layers take in plaintext, in their own dtypes."""
        return sum(n * torch.empty((), dtype=_dtype(d)).element_size() for n, d in zip(self.sizes, self.dtypes))

    def to_meta(self) -> dict[str, Any]:
        """Plain lists and strings: travels in DXO meta and lives in checkpoints."""
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes], "dtypes": list(self.dtypes),
                "slots": self.slots, "packing": self.packing.value}

    @classmethod
    def from_meta(cls, meta: Any) -> "Layout":
        try:
            layout = cls(tuple(meta["names"]), tuple(tuple(int(d) for d in s) for s in meta["shapes"]),
                         tuple(meta["dtypes"]), int(meta["slots"]),
                         _packing(meta.get("packing", Packing.CONCATENATED)))  # older fedkit wrote none
            if not len(layout.names) == len(layout.shapes) == len(layout.dtypes) or layout.slots < 1:
                raise ValueError("names, shapes and dtypes differ in length")
            for d in layout.dtypes:
                _dtype(d)
        except (KeyError, TypeError, ValueError) as e:
            raise UpdateError(f"an HE layout must hold names, shapes, dtypes and slots; got {meta!r} ({e})") from None
        return layout


def _packing(name: Any) -> Packing:
    """The packing a layout's meta names (older fedkit wrote none: concatenated)."""
    try:
        return Packing(name)
    except ValueError:
        raise ValueError(f"packing {name!r} is not one of {', '.join(p.value for p in Packing)}") from None


def _cut(n: int, slots: int) -> list[int]:
    """``n`` numbers in ciphertexts of ``slots``: full ones, then the rest."""
    full, rest = divmod(n, slots)
    return [slots] * full + ([rest] if rest else [])


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name!r} is not a floating-point torch dtype")
    return dtype


def layout_for(weights: Weights, ckks: CKKSParams) -> Layout:
    """The layout of the layers of ``weights`` that ``ckks.layers`` selects (floating-point ones only:
    integer buffers such as BatchNorm's counters stay plaintext)."""
    if CIPHERTEXTS in weights:
        raise ConfigError(f"the model has a layer named {CIPHERTEXTS!r}, the name HE uses for its ciphertexts; rename it")
    floating = [k for k, v in weights.items() if v.is_floating_point()]
    if ckks.layers is None:
        names = floating
    else:
        for p in ckks.layers:
            if not any(re.fullmatch(p, k) for k in floating):
                raise ConfigError(f"{{layers}} pattern {p!r} matches no floating-point layer of the model (patterns "
                                  f"match whole names); the model has: {', '.join(floating)}", obj=ckks, field="layers")
        names = [k for k in floating if any(re.fullmatch(p, k) for p in ckks.layers)]
    if not names:
        raise ConfigError("the model has no floating-point layer to encrypt")
    return Layout(tuple(names), tuple(tuple(weights[k].shape) for k in names),
                  tuple(str(weights[k].dtype).removeprefix("torch.") for k in names), ckks.slots)


def pack(weights: Weights, layout: Layout, source: str = "the update") -> np.ndarray:
    """The layout's layers of ``weights``, flattened into one float64 vector."""
    missing = [k for k in layout.names if k not in weights]
    if missing:
        raise UpdateError(f"{source} lacks the encrypted layer(s) {missing}")
    parts = []
    for k, shape in zip(layout.names, layout.shapes):
        v = weights[k]
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise UpdateError(f"{source} gave {k!r} as {got}; the HE layout expects shape {shape}")
        parts.append(v.detach().reshape(-1).to("cpu", torch.float64).numpy())
    return np.concatenate(parts)


def unpack(flat: np.ndarray, layout: Layout) -> Weights:
    """The inverse of `pack`: named tensors in the layout's shapes and dtypes."""
    out, at = {}, 0
    for k, shape, dtype, n in zip(layout.names, layout.shapes, layout.dtypes, layout.sizes):
        out[k] = torch.from_numpy(np.ascontiguousarray(flat[at:at + n])).reshape(shape).to(_dtype(dtype))
        at += n
    return out
