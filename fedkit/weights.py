"""Operations on `Weights` (named tensors): arithmetic, checks against the global model, hashing."""

from __future__ import annotations

import hashlib
import math

import torch

from .errors import UpdateError
from .exchange import Weights


def clone(w: Weights, device: torch.device | str = "cpu") -> Weights:
    """A detached copy of ``w`` on ``device``."""
    return {k: v.detach().to(device, copy=True) for k, v in w.items()}


def add(a: Weights, b: Weights) -> Weights:
    """``a + b`` key by key, keeping ``a``'s dtypes (integer buffers stay integers)."""
    return {k: (a[k] + b[k]).to(a[k].dtype) for k in a}


def subtract(a: Weights, b: Weights) -> Weights:
    """``a - b`` key by key."""
    return {k: a[k] - b[k] for k in a}


def check_update(update: Weights, reference: Weights, source: str = "an update", finite: bool = True) -> None:
    """Raise `UpdateError` unless ``update`` has exactly ``reference``'s keys and shapes and is finite.

    A tensor that is floating-point in ``reference`` must have the same dtype in ``update``; integer
    buffers (e.g. BatchNorm's ``num_batches_tracked``) may come back in any dtype, as `add` casts them.

    ``source`` names where the update came from in the message, e.g. ``"client 'site-3'"``.
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise UpdateError(
            f"{source} gave an update whose keys do not match the global model "
            f"(missing: {missing or 'none'}; unexpected: {extra or 'none'}). Every client must build the "
            "same model as the server."
        )
    for k, ref in reference.items():
        v = update[k]
        if not isinstance(v, torch.Tensor):
            raise UpdateError(f"{source} gave {type(v).__name__} for {k!r}; expected a tensor "
                              f"of shape {tuple(ref.shape)}")
        if v.shape != ref.shape:
            raise UpdateError(
                f"{source} gave {k!r} with shape {tuple(v.shape)}; the global model has "
                f"{tuple(ref.shape)}. Every client must build the same model as the server."
            )
        if ref.is_floating_point() and v.dtype != ref.dtype:
            raise UpdateError(
                f"{source} gave {k!r} as {v.dtype}; the global model holds {ref.dtype}. A floating-point "
                f"update must keep the model's dtype (cast it back with .to({ref.dtype}))."
            )
        if finite and v.is_floating_point() and not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            raise UpdateError(
                f"{source} gave {bad} non-finite value(s) (NaN or Inf) in {k!r}; its local training "
                "diverged or its data holds NaN. Lower the learning rate or check that client's data."
            )


def sha256(w: Weights) -> str:
    """A hash of the values of ``w`` (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for k in sorted(w):
        t = w[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def nbytes(w: Weights) -> int:
    return sum(v.numel() * v.element_size() for v in w.values())


def norm(update: Weights) -> float:
    """The L2 norm of all floating-point entries of ``update``, taken together (in float64).

    >>> norm({"w": torch.tensor([3.0]), "b": torch.tensor([4.0])})
    5.0
    """
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in update.values() if v.is_floating_point())))


Spec = list[tuple[str, tuple[int, ...], torch.dtype]]
"""Where each named tensor sits in a flat vector: (name, shape, dtype) in order."""


def flatten(update: Weights) -> tuple[torch.Tensor, Spec]:
    """All floating-point entries of ``update`` as one float64 vector, and the spec to undo it.

    Integer buffers (BatchNorm's counters) are left out: rules that treat an update as a point in
    R^d (Krum's distances, clipping, a cosine similarity written in a cell) work on this vector.

    >>> v, spec = flatten({"w": torch.ones(2, 2), "b": torch.zeros(1)})
    >>> v.shape, [name for name, *_ in spec]
    (torch.Size([5]), ['w', 'b'])
    """
    spec = [(k, tuple(v.shape), v.dtype) for k, v in update.items() if v.is_floating_point()]
    if not spec:
        return torch.zeros(0, dtype=torch.float64), spec
    return torch.cat([update[k].detach().reshape(-1).to(torch.float64) for k, *_ in spec]), spec


def unflatten(vector: torch.Tensor, spec: Spec) -> Weights:
    """The inverse of `flatten`: named tensors in the spec's shapes and dtypes.

    >>> v, spec = flatten({"w": torch.ones(2, 2)})
    >>> unflatten(v * 2, spec)["w"]
    tensor([[2., 2.],
            [2., 2.]])
    """
    size = sum(math.prod(shape) for _, shape, _ in spec)
    if vector.dim() != 1 or vector.numel() != size:
        raise UpdateError(f"a flat update must be a vector of {size} numbers for this spec, got shape "
                          f"{tuple(vector.shape)}")
    out, at = {}, 0
    for name, shape, dtype in spec:
        n = math.prod(shape)
        out[name] = vector[at:at + n].reshape(shape).to(dtype)
        at += n
    return out
