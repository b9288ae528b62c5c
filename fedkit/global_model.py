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
from typing import Any, Callable

from .errors import UpdateError
from .exchange import DXO, DataKind, Reply, Weights
from .weights import check_update, norm

Step = Callable[[Weights, dict[str, DXO]], Weights]
"""How a workflow moves readable weights with a round's valid results: ``step(weights, results) -> new weights``."""


class Encryption:
    """Base of the settings of an encryption scheme for the global model (`fedkit.privacy.he.CKKS`).

    A workflow that holds one in its ``he`` field asks the simulator to provision keys and to give
    the server an encrypted model; the workflow itself stays the same.
    """


def screen(replies: dict[str, Reply], reference: Weights, max_norm_ratio: float | None) -> dict[str, DXO]:
    """Keep the replies whose result is a finite WEIGHT_DIFF shaped like ``reference``; reject the rest in place.

    With ``max_norm_ratio``, an update whose norm is more than that multiple of the median norm of
    the round's other valid updates is rejected too (a heuristic against scaled garbage; it needs at
    least three valid updates to say what is typical, see `screen_norms` for fewer). Each rejected
    reply keeps its reason.
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


RECENT_NORMS = 20  # how many accepted update norms `screen_norms` remembers, as plain floats in the server state


def screen_norms(replies: dict[str, Reply], valid: dict[str, DXO], max_norm_ratio: float, recent: list[float],
                 model_norm: float) -> dict[str, DXO]:
    """Reject the ``valid`` updates that are too large for what is typical; keep ``recent`` up to date.

    `screen`'s norm check needs three peers. This one does not: what is typical is the median norm of
    ``recent`` (the norms of the last `RECENT_NORMS` accepted updates, oldest first, as the caller
    keeps them), or, before any update was accepted, ``model_norm`` (the global model's norm; 0:
    unknown). With three valid updates or more, the round's median is typical, but no more than
    ``max_norm_ratio`` times that: a round whose majority is garbage cannot vouch for itself. An
    update above ``max_norm_ratio`` times what is typical is rejected in place, with its reason; the
    norms of those kept are appended to ``recent``.

    >>> import torch
    >>> from fedkit.exchange import Task
    >>> from fedkit.server import Reply
    >>> task = Task("train", DXO(DataKind.WEIGHTS, {"w": torch.zeros(2)}))
    >>> rs = {n: Reply(n, task, DXO(DataKind.WEIGHT_DIFF, {"w": torch.full((2,), v)}), status="ok")
    ...       for n, v in (("a", 0.1), ("b", 1e4))}
    >>> recent = [0.2, 0.1]
    >>> sorted(screen_norms(rs, {n: r.result for n, r in rs.items()}, 10.0, recent, 1.0)), rs["b"].status
    (['a'], 'rejected')
    """
    norms = {n: norm(r.data) for n, r in valid.items()}
    if recent:
        typical = statistics.median(recent)
        what = f"the median norm {typical:.3g} of the last {len(recent)} accepted update(s)"
    elif model_norm > 0:
        typical, what = model_norm, f"the global model's own norm {model_norm:.3g} (no update accepted yet)"
    else:
        typical, what = 0.0, ""
    if len(norms) >= 3:
        median = statistics.median(norms.values())
        if not typical or median <= max_norm_ratio * typical:
            typical, what = median, f"the round's median {median:.3g}"
        else:
            typical, what = max_norm_ratio * typical, (f"{max_norm_ratio:g}x {what} (the round's median {median:.3g} is "
                                                      "itself implausible)")
    kept = {}
    for name, size in norms.items():
        if typical > 0 and size > max_norm_ratio * typical:
            replies[name].reject("rejected", f"client {name!r} sent an update of norm {size:.3g}, {size / typical:.3g}x "
                                             f"{what} (the limit is {max_norm_ratio:g}x)")
        else:
            kept[name] = valid[name]
            recent.append(size)
    del recent[:-RECENT_NORMS]
    return kept


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
    def screen(self, replies: dict[str, Reply], max_norm_ratio: float | None) -> dict[str, DXO]:
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

    def observe(self, replies: dict[str, Reply]) -> None:
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

    def screen(self, replies: dict[str, Reply], max_norm_ratio: float | None) -> dict[str, DXO]:
        return screen(replies, self._weights, max_norm_ratio)

    def update(self, results: dict[str, DXO], weights: dict[str, float], step: Step) -> None:
        self._weights = step(self._weights, results)

    def copy(self) -> "PlainModel":
        return PlainModel(dict(self._weights))  # tensors are replaced, never edited in place

    def checkpoint(self) -> tuple[Weights, dict[str, Any]]:
        return self._weights, {}
