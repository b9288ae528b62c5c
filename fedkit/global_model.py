"""The global model as the server holds it: the seam where encryption plugs in.

A workflow never touches the weights of the global model directly. It asks the model for the data
of a task (`task_data`), lets it keep the valid results of a round (`screen`) and apply them
(`update`). `PlainModel` does this on tensors the server can read; an encrypted model
(`fedkit.privacy.he_model.EncryptedModel`) does the same on ciphertexts it cannot read. So FedAvg,
cyclic weight transfer and a controller written in a cell have one loop each, with or without HE,
as FLARE's ``ScatterAndGather`` stays the same and HE lives in filters and an aggregator.

>>> import torch
>>> m = PlainModel({"w": torch.zeros(2)})
>>> m.task_data({}).kind.value, m.readable
('WEIGHTS', True)
"""

from __future__ import annotations

import statistics
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable

from .errors import UpdateError
from .exchange import DXO, DataKind, Weights
from .weights import check_update, norm

if TYPE_CHECKING:
    from .server import Reply

Step = Callable[[Weights, dict[str, DXO]], Weights]
"""How a workflow moves readable weights with a round's valid results: ``step(weights, results) -> new weights``."""


class Encryption:
    """Base of the settings of an encryption scheme for the global model (`fedkit.privacy.he.CKKS`).

    A workflow that holds one in its ``he`` field asks the simulator to provision keys and to give
    the server an encrypted model; the workflow itself stays the same.
    """


def screen(replies: dict[str, "Reply"], reference: Weights, max_norm_ratio: float | None) -> dict[str, DXO]:
    """Keep the replies whose result is a finite WEIGHT_DIFF shaped like ``reference``; reject the rest in place.

    With ``max_norm_ratio``, an update whose norm is more than that multiple of the median norm of
    the round's other valid updates is rejected too (a heuristic against scaled garbage; it needs at
    least three valid updates to say what is typical). Each rejected reply keeps its reason.
    """
    valid: dict[str, DXO] = {}
    for name, reply in replies.items():
        if not reply.ok:
            continue
        result = reply.result
        try:
            if result.kind != DataKind.WEIGHT_DIFF:
                raise UpdateError(f"client {name!r} answered {result.kind.value}; expected WEIGHT_DIFF "
                                  "(local weights minus the global weights it received)")
            check_update(result.data, reference, f"client {name!r}")
        except UpdateError as e:
            reply.reject("rejected", str(e))
            continue
        valid[name] = result
    if max_norm_ratio is not None and len(valid) >= 3:
        norms = {n: norm(r.data) for n, r in valid.items()}
        median = statistics.median(norms.values())
        for name, size in norms.items():
            if median > 0 and size > max_norm_ratio * median:
                replies[name].reject("rejected", f"client {name!r} sent an update of norm {size:.3g}, {size / median:.0f}x "
                                                 f"the round's median {median:.3g} (the limit is {max_norm_ratio:g}x)")
                del valid[name]
    return valid


class GlobalModel(ABC):
    """What a workflow may do with the global model; `PlainModel` and the encrypted model implement it.

    ``readable`` says whether the server can read the weights (``weights`` raises `Unreadable` when it
    cannot); ``encryption`` is the scheme's settings, or None.
    """

    readable: bool = True
    encryption: Encryption | None = None

    @property
    @abstractmethod
    def weights(self) -> Weights:
        """The weights, where the server can read them."""

    @abstractmethod
    def task_data(self, meta: dict[str, Any]) -> DXO:
        """The model as a task carries it to the clients (WEIGHTS), with ``meta``."""

    @abstractmethod
    def screen(self, replies: dict[str, "Reply"], max_norm_ratio: float | None) -> dict[str, DXO]:
        """The valid results of ``replies`` (WEIGHT_DIFFs that fit the model); the rest are rejected in place.

        An encrypted model also counts here what the replies cost (`observe`)."""

    @abstractmethod
    def update(self, results: dict[str, DXO], weights: dict[str, float], step: Step) -> None:
        """Move the model by the valid ``results``, each with its aggregation weight."""

    @abstractmethod
    def copy(self) -> "GlobalModel":
        """An independent model in the same state (cyclic weight transfer works on one until a cycle is complete)."""

    @abstractmethod
    def checkpoint(self) -> tuple[Weights, dict[str, Any]]:
        """What a checkpoint keeps: the tensors for ``model.pt`` (with HE: the plaintext layers) and entries
        for the server state (with HE: the ciphertexts and the public context, under ``"he"``)."""

    def observe(self, replies: dict[str, "Reply"]) -> None:
        """Take note of what replies that are not screened cost (the encrypted model counts ciphertext bytes)."""

    def round_metrics(self) -> dict[str, float]:
        """What this round cost the model (e.g. HE seconds and bytes), counted since the last call."""
        return {}


class PlainModel(GlobalModel):
    """The global model in plaintext: the server reads it, scores it and moves it with any rule."""

    def __init__(self, weights: Weights) -> None:
        self._weights = weights

    @property
    def weights(self) -> Weights:
        return self._weights

    @weights.setter
    def weights(self, value: Weights) -> None:
        self._weights = value

    def task_data(self, meta: dict[str, Any]) -> DXO:
        return DXO(DataKind.WEIGHTS, self._weights, meta)

    def screen(self, replies: dict[str, "Reply"], max_norm_ratio: float | None) -> dict[str, DXO]:
        return screen(replies, self._weights, max_norm_ratio)

    def update(self, results: dict[str, DXO], weights: dict[str, float], step: Step) -> None:
        self._weights = step(self._weights, results)

    def copy(self) -> "PlainModel":
        return PlainModel(dict(self._weights))  # tensors are replaced, never edited in place

    def checkpoint(self) -> tuple[Weights, dict[str, Any]]:
        return self._weights, {}
