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

import math
import numbers
import statistics
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Mapping

from .aggregate import Rule, apply_rule, by_samples, rule_name, weigh_result, weighted_mean
from .errors import UpdateError, Worded, refusal
from .exchange import DXO, DataKind, MetaKey, Reply, Weights
from .status import Status
from .weights import add, check_update, norm

Step = Callable[[Weights, dict[str, DXO]], Weights]
"""How a workflow moves readable weights with a round's valid results: ``step(weights, results) -> new weights``."""

Weigh = Callable[[DXO], float]
"""A client's aggregation weight from its result (`fedkit.aggregate.by_samples`, `by_steps`, `uniform`)."""


HE_RULE = ("with HE the server only adds ciphertexts and scales them by public weights, so it can compute the weighted "
           "mean and nothing that compares, sorts or measures values (median, trimmed mean, Krum, clipping)")
"""Why an encrypted model runs no aggregation rule but the weighted mean (said by FedAvg and the model alike)."""


def check_results(results: Any) -> None:
    """Refuse (`UpdateError`) what ``fl.model.update`` cannot apply: anything but a dict of WEIGHT_DIFF results,
    such as the replies of a validation task (``rnd.send("validate")``)."""
    if not isinstance(results, Mapping):
        raise UpdateError(f"fl.model.update takes the valid training results by client (a dict), got "
                          f"{type(results).__name__}; pass what rnd.train() returns")
    for name, r in results.items():
        kind = getattr(r, "kind", None)
        if not isinstance(r, DXO) or kind != DataKind.WEIGHT_DIFF:
            got = kind.value if isinstance(kind, DataKind) else type(r).__name__
            raise UpdateError(f"fl.model.update applies weight differences, but client {name!r}'s result is {got}; "
                              "pass rnd.train()'s results (a task whose clients answer WEIGHT_DIFF)")


def check_callable(name: str, value: Any, what: str) -> None:
    """Refuse (`ConfigError`) an argument ``name`` of ``fl.model.update`` that is not a function (``what``: which)."""
    if not callable(value):
        raise refusal(name, f"must be {what}", value)


def aggregate(results: dict[str, DXO], rule: Rule, weigh: Weigh, reference: Weights) -> Weights:
    """``rule`` applied to the ``results``' diffs, each weighed by ``weigh``; refused unless it fits ``reference``."""
    diff = apply_rule(rule, [(r.data, weigh_result(weigh, r, n)) for n, r in results.items()])
    check_update(diff, reference, f"aggregation rule {rule_name(rule)!r}")
    return diff


class Encryption(ABC):
    """Base of an encryption scheme for the global model (`fedkit.privacy.he.CKKS`).

    A workflow that holds one in its ``he`` field runs on an encrypted model; the workflow itself stays
    the same. The simulator calls the scheme's hooks: `provision` before a run (FLARE's provisioning),
    `check_saved` before a resume, `decrypt` when the run's owner reads the model. So privacy plugs in
    from above, through the object the workflow holds: no module below it imports the scheme.
    """

    state_key: ClassVar[str] = "he"  # the server-state entry that holds its model in a checkpoint (`GlobalModel.checkpoint`)

    @abstractmethod
    def provision(self, clients: Mapping[str, Any], initial: Weights,
                  saved: tuple[Weights, dict[str, Any]] | None = None) -> GlobalModel:
        """Make the federation's keys (or keep those the restored state of ``clients``, `fedkit.client.Client`s,
        holds), give every client its secret part and filters, and return the server's encrypted model, built
        from the public part only: ``initial`` encrypted, or the model that ``saved`` (a checkpoint's weights and
        server state) holds. `fedkit.errors.ConfigError` if the clients' keys do not fit it."""

    @abstractmethod
    def check_saved(self, server_state: dict[str, Any]) -> None:
        """Refuse (`ValueError`, saying what is missing) a checkpoint's server state without a model of this scheme."""

    @abstractmethod
    def decrypt(self, model: GlobalModel, client_state: dict[str, Any]) -> Weights:
        """The global ``model`` in plaintext, as the client whose state is ``client_state`` decrypts it."""


def credited_steps(result: DXO) -> int:
    """The local steps the norm screens share ``result``'s norm over: its ``num_steps``, at least 1 and at most
    its ``num_samples``; 1 where either is missing or not a finite number (the norm is then judged whole).

    Both counts are reported by the client. One that claims more steps is allowed a proportionally larger
    update, so the credit is capped at the samples it reports: the number FedAvg already weighs it by
    (`fedkit.aggregate.by_samples`). A client that lies about its samples owns the weighted mean whatever a
    screen does, so the screen trusts nothing the aggregation does not (with ``weigh=uniform`` it is the
    one place the count is trusted). Against clients that lie, use a robust rule (median, Krum) or clipping,
    not this screen. The cap rests on a step using at least one example per epoch: with several epochs of
    batch size 1 every client's credit is cut alike, so updates stay comparable.

    >>> credited_steps(DXO(DataKind.WEIGHT_DIFF, {}, {"num_steps": 63, "num_samples": 1001}))
    63
    >>> credited_steps(DXO(DataKind.WEIGHT_DIFF, {}, {"num_steps": 10**6, "num_samples": 12})), credited_steps(DXO(DataKind.WEIGHT_DIFF, {}))
    (12, 1)
    """
    counts = [result.meta.get(k) for k in (MetaKey.NUM_STEPS, MetaKey.NUM_SAMPLES)]
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in counts):
        return 1
    return max(1, int(min(counts)))


def step_norms(valid: dict[str, DXO]) -> dict[str, tuple[float, int]]:
    """Each update's norm and its `credited_steps`: the norm screens judge the norm whole and per step.

    Why both: a client with more data takes more local steps and moves further (on quantity skew, an honest
    1,001-sample client's update was 47x the median of its 10-sample peers). An update is the sum of its
    steps, so by the triangle inequality its norm is at most the sum of their lengths: norm / steps is at
    most their mean length, which depends on the learning rate, the momentum and the gradients, not on how
    much data a client holds. Early in local training the steps point the same way and the norm grows about
    linearly with them; later it grows more slowly (steps that cancel, a model that has converged on the
    client's data), so a client that took *fewer* steps than its peers can be ahead of them per step (about
    5x on digits with 5 local epochs). So an update is too large only when it is, beyond ``max_norm_ratio``,
    larger than what is typical both whole and per step: a client with more steps may move proportionally
    further, none is rejected that the whole-norm screen alone would keep against the same typical norm,
    and garbage orders of magnitude off fails both. Dividing an update by its local steps is FedNova's normalisation
    (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
    Optimization"), used here only to judge norms: the aggregate is not changed. Median-norm screens in the
    literature (e.g. FLAME's clipping bound, Nguyen et al. 2022) compare whole norms, which assumes every
    client does the same local work.
    """
    return {name: (norm(r.data), credited_steps(r)) for name, r in valid.items()}


# ends each norm rejection, its settings named (`fedkit.errors.Worded`: the command line says them as its flags)
NORM_LIMIT = ("the limit is {max_norm_ratio=%g}, whole or per step; if this client is honest, raise {max_norm_ratio} "
              "or set {max_norm_ratio=None} to screen no norms")


def _typical(sizes: list[float], recent: list[float], model_norm: float, max_norm_ratio: float,
             unit: str) -> tuple[float, str]:
    """What is typical for ``sizes`` (one measure, ``unit``, of a round's valid updates) and how to say it.

    The median of ``recent`` (that measure of the last accepted updates) or, before any, ``model_norm`` (0:
    unknown). With three updates or more, the round's median, but no more than ``max_norm_ratio`` times that:
    a round whose majority is garbage cannot vouch for itself."""
    if recent:
        typical = statistics.median(recent)
        what = f"the median {unit} {typical:.3g} of the last {len(recent)} accepted update(s)"
    elif model_norm > 0:
        typical, what = model_norm, f"the global model's own norm {model_norm:.3g} (no update accepted yet)"
    else:
        typical, what = 0.0, ""
    if len(sizes) >= 3:
        median = statistics.median(sizes)
        if not typical or median <= max_norm_ratio * typical:
            typical, what = median, f"the round's median {median:.3g}"
        else:
            typical, what = max_norm_ratio * typical, (f"{max_norm_ratio:g}x {what} (the round's median {median:.3g} "
                                                      "is itself implausible)")
    return typical, what


def _keep_typical(replies: dict[str, Reply], valid: dict[str, DXO], sizes: dict[str, tuple[float, int]],
                  whole: tuple[float, str], per_step: tuple[float, str], max_norm_ratio: float) -> dict[str, DXO]:
    """The ``valid`` updates within ``max_norm_ratio`` times what is typical (``(value, words)``; 0: unknown,
    within) whole or per step; the others are rejected in place, saying what to do if the client is honest."""
    (t_whole, what_whole), (t_step, what_step) = whole, per_step
    kept = {}
    for name, (size, steps) in sizes.items():
        if t_whole > 0 and size > max_norm_ratio * t_whole and t_step > 0 and size / steps > max_norm_ratio * t_step:
            replies[name].reject(Status.REJECTED, f"client {name!r} sent an update of norm {size:.3g}, "
                                                  f"{size / t_whole:.3g}x {what_whole}, and over {steps} local "
                                                  f"step(s) {size / steps:.3g} per step, {size / steps / t_step:.3g}x "
                                                  f"{what_step} ({Worded(NORM_LIMIT % max_norm_ratio)})")
        else:
            kept[name] = valid[name]
    return kept


def screen(replies: dict[str, Reply], reference: Weights, max_norm_ratio: float | None) -> dict[str, DXO]:
    """Keep the replies whose result is a finite WEIGHT_DIFF shaped like ``reference``; reject the rest in place.

    With ``max_norm_ratio``, an update whose norm is more than that multiple of the round's median norm,
    and whose norm per local step is too (`step_norms`), is rejected too (a heuristic against scaled
    garbage; it needs at least three valid updates to say what is typical, see `screen_norms` for fewer).
    Each rejected reply keeps its reason.
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
            reply.reject(Status.REJECTED, str(e))
            continue
        valid[name] = result
    if max_norm_ratio is not None and len(valid) >= 3:
        valid = screen_norms(replies, valid, max_norm_ratio, [], 0.0)
    return valid


RECENT_NORMS = 20  # how many accepted norms `screen_norms` remembers (each measure), as plain floats in the server state


def screen_norms(replies: dict[str, Reply], valid: dict[str, DXO], max_norm_ratio: float, recent: list[float],
                 model_norm: float, recent_per_step: list[float] | None = None) -> dict[str, DXO]:
    """Reject the ``valid`` updates that are too large for what is typical; keep ``recent`` up to date.

    Each update is judged whole and per local step (`step_norms`), and rejected only when it is more than
    ``max_norm_ratio`` times what is typical in both. `screen`'s norm check needs three peers. This one
    does not: what is typical is the median of ``recent`` (the norms of the last `RECENT_NORMS` accepted
    updates, oldest first, as the caller keeps them) and of ``recent_per_step`` (their norms per step; None:
    not kept), or, before any update was accepted, ``model_norm`` (the global model's norm; 0: unknown).
    With three valid updates or more, the round's median is typical, but no more than ``max_norm_ratio``
    times that: a round whose majority is garbage cannot vouch for itself. A rejected update keeps its
    reason; the norms of those kept are appended to ``recent`` and ``recent_per_step``.

    >>> import torch
    >>> from fedkit.exchange import Task
    >>> from fedkit.server import Reply
    >>> task = Task("train", DXO(DataKind.WEIGHTS, {"w": torch.zeros(2)}))
    >>> rs = {n: Reply(n, task, DXO(DataKind.WEIGHT_DIFF, {"w": torch.full((2,), v)}), status=Status.OK)
    ...       for n, v in (("a", 0.1), ("b", 1e4))}
    >>> recent = [0.2, 0.1]
    >>> sorted(screen_norms(rs, {n: r.result for n, r in rs.items()}, 10.0, recent, 1.0)), rs["b"].status
    (['a'], 'rejected')
    """
    per_step = [] if recent_per_step is None else recent_per_step
    sizes = step_norms(valid)
    whole = _typical([s for s, _ in sizes.values()], recent, model_norm, max_norm_ratio, "norm")
    stepped = _typical([s / k for s, k in sizes.values()], per_step, model_norm, max_norm_ratio, "norm per step")
    kept = _keep_typical(replies, valid, sizes, whole, stepped, max_norm_ratio)
    for history, measure in ((recent, lambda s, k: s), (per_step, lambda s, k: s / k)):
        history.extend(measure(*sizes[name]) for name in kept)
        del history[:-RECENT_NORMS]
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
    def update(self, results: dict[str, DXO], *, rule: Rule = weighted_mean, weigh: Weigh = by_samples,
               step: Step | None = None) -> None:
        """Move the model by the valid ``results``: add ``rule``'s aggregate of their diffs, each weighed by
        ``weigh`` (FedAvg's weighted mean by samples by default); nothing without results.

        ``step(weights, results) -> new weights`` replaces the whole server step (a server optimizer, noise on
        the aggregate): with a step, ``rule`` and ``weigh`` are not used (the step aggregates as it likes, e.g.
        with `aggregate`). A model that cannot run a rule or a step (an encrypted one) refuses it, saying why.
        ``results`` must be training results (WEIGHT_DIFFs, what ``rnd.train()`` returns): others are refused
        (`UpdateError`), and so is a step whose new weights do not fit the model."""

    @abstractmethod
    def copy(self) -> "GlobalModel":
        """An independent model in the same state (cyclic weight transfer works on one until a cycle is complete)."""

    @abstractmethod
    def checkpoint(self) -> tuple[Weights, dict[str, Any]]:
        """What a checkpoint keeps: the tensors for ``model.pt`` (with HE: the plaintext layers) and entries
        for the server state (with HE: the ciphertexts and the public context, under ``"he"``)."""

    def describe(self) -> dict[str, Any]:
        """What a run's history records about the model's encryption (``history.results["he"]``); plaintext: nothing."""
        return {}

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

    def update(self, results: dict[str, DXO], *, rule: Rule = weighted_mean, weigh: Weigh = by_samples,
               step: Step | None = None) -> None:
        check_results(results)
        check_callable("rule", rule, "an aggregation rule [(update, weight), ...] -> update such as "
                                     "fedkit.aggregate.weighted_mean")
        check_callable("weigh", weigh, "a function of a result such as fedkit.aggregate.by_samples")
        if step is not None:
            check_callable("step", step, "a function (weights, results) -> new weights, or None")
            new = step(self._weights, results)
            if not isinstance(new, Mapping):
                raise UpdateError(f"the server step {rule_name(step)!r} returned {type(new).__name__}; it must return "
                                  "the new weights (a dict of tensors shaped like the model's)")
            check_update(new, self._weights, f"the server step {rule_name(step)!r}", finite=False)
            self._weights = new
        elif results:
            self._weights = add(self._weights, aggregate(results, rule, weigh, self._weights))

    def copy(self) -> "PlainModel":
        return PlainModel(dict(self._weights))  # tensors are replaced, never edited in place

    def checkpoint(self) -> tuple[Weights, dict[str, Any]]:
        return self._weights, {}
