"""Terms added to the gradients between the backward pass and the step: FedProx's proximal term, SCAFFOLD's
drift correction.

A `GradTerm` is written on parameter dicts, so the same term runs on one model (bound to its parameters by
`grad_term_hook`, a gradient hook of `fedkit.local_sgd.sgd_epochs`) and on many clients' parameters stacked
along a leading client axis (`fedkit.engine.vectorized`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import nn

from .exchange import Weights
from .local_sgd import GradHook


class GradTerm(ABC):
    """A term added to the gradients, written on parameter dicts: ``add_to(params, grads)`` adds it in place.

    The same term runs on one model (`grad_term_hook` binds it to a model's parameters, for `sgd_epochs`) and
    on many clients' parameters stacked along a leading client axis (`stack`, for
    `fedkit.engine.vectorized`): that is what lets an algorithm's client half train clients together.
    """

    @abstractmethod
    def add_to(self, params: Weights, grads: Weights) -> None:
        """Add the term to ``grads`` in place, for ``params`` (the same keys; stacked or not)."""

    @classmethod
    @abstractmethod
    def stack(cls, terms: Sequence["GradTerm"], keys: Sequence[str]) -> "GradTerm":
        """One term over parameters stacked along a leading client axis, from one term per client (in order)."""


def _stacked(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.detach() for t in tensors])


class ProximalTerm(GradTerm):
    """FedProx's mu * (w - w_global); ``mu`` a number, or (stacked) a tensor with one value per client."""

    def __init__(self, anchor: Weights, mu: float | torch.Tensor) -> None:
        self.anchor, self.mu = anchor, mu

    def add_to(self, params: Weights, grads: Weights) -> None:
        with torch.no_grad():
            for k, p in params.items():
                if isinstance(self.mu, torch.Tensor):
                    n = len(p)
                    mu = self.mu[:n].reshape((n,) + (1,) * (p.dim() - 1))
                    grads[k].add_(mu * (p - self.anchor[k][:n]))
                else:
                    grads[k].add_(p - self.anchor[k], alpha=self.mu)

    @classmethod
    def stack(cls, terms: Sequence[GradTerm], keys: Sequence[str]) -> GradTerm:
        mus = [t.mu for t in terms]  # type: ignore[attr-defined]
        anchor = {k: _stacked([t.anchor[k] for t in terms]) for k in keys}  # type: ignore[attr-defined]
        return cls(anchor, torch.tensor(mus, dtype=anchor[keys[0]].dtype, device=anchor[keys[0]].device))


class CorrectionTerm(GradTerm):
    """SCAFFOLD's drift correction c - c_i, a fixed tensor per parameter (stacked: one row per client)."""

    def __init__(self, correction: Weights) -> None:
        self.correction = correction
        self.stacked = False

    def add_to(self, params: Weights, grads: Weights) -> None:
        with torch.no_grad():
            for k, p in params.items():
                grads[k].add_(self.correction[k][:len(p)] if self.stacked else self.correction[k])

    @classmethod
    def stack(cls, terms: Sequence[GradTerm], keys: Sequence[str]) -> GradTerm:
        out = cls({k: _stacked([t.correction[k] for t in terms]) for k in keys})  # type: ignore[attr-defined]
        out.stacked = True
        return out


class TermHook:
    """A `GradHook` that adds a `GradTerm` to one model's gradients; ``term`` is there for engines that stack it."""

    def __init__(self, model: nn.Module, term: GradTerm) -> None:
        self.term = term
        # a frozen parameter has no gradient to add to, and SGD leaves it as it is
        self.params = {k: p for k, p in model.named_parameters() if p.requires_grad}

    def __call__(self) -> None:
        self.term.add_to(self.params, {k: p.grad for k, p in self.params.items()})


def grad_term_hook(model: nn.Module, term: GradTerm) -> GradHook:
    """``term`` as a gradient hook on ``model``'s parameters (vectorizable: see `GradTerm`)."""
    return TermHook(model, term)


def proximal_hook(model: nn.Module, anchor: Weights, mu: float) -> GradHook:
    """FedProx's proximal term (Li et al. 2020): add mu * (w - w_global) to each gradient.

    That is the gradient of (mu/2) * ||w - w_global||^2, added directly rather than through the loss.
    """
    return grad_term_hook(model, ProximalTerm({k: anchor[k] for k, _ in model.named_parameters()}, mu))


def correction_hook(model: nn.Module, correction: Weights) -> GradHook:
    """SCAFFOLD's drift correction (Karimireddy et al. 2020): add (c - c_i) to each gradient."""
    return grad_term_hook(model, CorrectionTerm({k: correction[k] for k, _ in model.named_parameters()}))
