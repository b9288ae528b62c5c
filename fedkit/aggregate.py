"""Aggregation rules: small pure functions from ``[(update, weight), ...]`` to one update.

A rule sees only named tensors and their aggregation weights, never clients or configs, so a new
rule is a function written in a notebook cell:

>>> import torch
>>> ups = [({"w": torch.tensor([1.0])}, 1.0), ({"w": torch.tensor([4.0])}, 3.0)]
>>> weighted_mean(ups)["w"]
tensor([3.2500])

Use `weighted_mean` (FedAvg) when every client is honest. The robust rules (`coordinate_median`,
`trimmed_mean`, `krum`, `multi_krum`) tolerate a few clients that send arbitrary updates, at the
price of ignoring most clients' weights and learning more slowly on non-iid data;
`norm_clipped_mean` bounds how far any one client can pull the model. A rule with settings goes
into `FedAvg` through a lambda or `functools.partial`:
``FedAvg(aggregate=functools.partial(trimmed_mean, beta=0.2))``.

How much each client weighs is chosen separately, by a *weighing* function of its result
(`by_samples`, the FedAvg default of McMahan et al. 2017, or `by_steps`, as NVFlare offers).
"""

from __future__ import annotations

import functools
import math
import numbers
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .errors import ConfigError, UpdateError
from .exchange import DXO, MetaKey, Weights

Update = tuple[Weights, float]
Rule = Callable[[Sequence[Update]], Weights]


def weighted_mean(updates: Sequence[Update]) -> Weights:
    """FedAvg's rule: sum_i w_i * u_i / sum_i w_i, computed in float64 and cast back to each dtype."""
    _require_updates(updates)
    weights = [w for _, w in updates]
    negative = [(i, w) for i, w in enumerate(weights) if w < 0]
    if negative:
        raise UpdateError(f"aggregation weights must be >= 0 and sum to a positive number; got negative "
                          f"weight(s) (update index, weight): {negative}")
    total = float(sum(weights))
    if not math.isfinite(total):
        bad = [(i, w) for i, w in enumerate(weights) if not math.isfinite(w)]
        raise UpdateError(f"aggregation weights must be finite numbers; got a total of {total}"
                          + (f" from (update index, weight): {bad}" if bad else " (the sum overflows)"))
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


def coordinate_median(updates: Sequence[Update]) -> Weights:
    """The median of every coordinate across clients; the weights are ignored.

    Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates".
    With an even number of clients a coordinate's median is the mean of its two middle values, as
    ``numpy.median``. Fewer than half of the clients cannot move it arbitrarily far.

    >>> ups = [({"w": torch.tensor([1.0])}, 1.0), ({"w": torch.tensor([2.0])}, 1.0), ({"w": torch.tensor([1e6])}, 1.0)]
    >>> coordinate_median(ups)["w"]
    tensor([2.])
    """
    _require_updates(updates)
    n = len(updates)
    out = {}
    for k, ref in updates[0][0].items():
        s = _stack(updates, k).sort(dim=0).values
        mid = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        out[k] = mid.to(ref.dtype)
    return out


def trimmed_mean(updates: Sequence[Update], beta: float = 0.1) -> Weights:
    """Per coordinate, drop the ``floor(beta * n)`` largest and smallest values and average the rest.

    Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates".
    The weights are ignored. ``beta`` is in [0, 0.5); ``beta=0`` is the plain mean. With few clients
    ``floor(beta * n)`` may be 0, and then nothing is trimmed (e.g. beta 0.1 needs 10 clients).

    >>> ups = [({"w": torch.tensor([v])}, 1.0) for v in (1.0, 2.0, 3.0, 1e6)]
    >>> trimmed_mean(ups, beta=0.25)["w"]
    tensor([2.5000])
    """
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < 0.5:
        raise ConfigError("trimmed_mean needs {trimmed_mean.beta} in [0, 0.5) (the fraction cut from each end)",
                          obj="trimmed_mean", field="beta", value=beta)
    _require_updates(updates)
    n = len(updates)
    cut = math.floor(beta * n)
    out = {}
    for k, ref in updates[0][0].items():
        kept = _stack(updates, k).sort(dim=0).values[cut:n - cut]
        out[k] = kept.mean(dim=0).to(ref.dtype)
    return out


def krum(updates: Sequence[Update], f: int = 1) -> Weights:
    """The one update closest to its ``n - f - 2`` nearest neighbours (its weight is ignored).

    Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent".
    Each update is flattened into one vector; its score is the sum of squared distances to the
    ``n - f - 2`` updates nearest to it; the lowest score wins (the first on ties). Tolerates ``f``
    Byzantine clients out of ``n > 2f + 2``.

    >>> ups = [({"w": torch.tensor([v])}, 1.0) for v in (0.0, 1.0, 2.0, 3.0, 100.0)]
    >>> krum(ups, f=1)["w"]
    tensor([1.])
    """
    best = _krum_order(updates, f, "krum")[0]
    return {k: v.clone() for k, v in updates[best][0].items()}


def multi_krum(updates: Sequence[Update], f: int = 1, m: int | None = None) -> Weights:
    """The weighted mean of the ``m`` updates with the best Krum scores (default ``m = n - f``).

    Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent"
    (Multi-Krum). Scores are computed once, as in `krum`; ``m = 1`` is Krum, and ``m = n`` with
    ``f = 0`` is `weighted_mean`.

    >>> ups = [({"w": torch.tensor([v])}, 1.0) for v in (0.0, 1.0, 2.0, 3.0, 100.0)]
    >>> multi_krum(ups, f=1, m=3)["w"]
    tensor([1.])
    """
    n = len(updates)
    if m is not None and (isinstance(m, bool) or not isinstance(m, numbers.Integral) or not 1 <= m <= n):
        raise ConfigError(f"multi_krum averages m of the n={n} updates; m must be an integer in [1, {n}] "
                          f"or None (n - f), got {m!r}")
    order = _krum_order(updates, f, "multi_krum")
    keep = n - f if m is None else int(m)
    # kept in input order, so that m = n sums in the same order as weighted_mean: the same bits
    return weighted_mean([updates[i] for i in sorted(order[:keep])])


def norm_clipped_mean(updates: Sequence[Update], max_norm: float) -> Weights:
    """Scale each update down to an L2 norm of at most ``max_norm``, then take the weighted mean.

    The norm is taken over all floating-point tensors of an update together (integer buffers such
    as BatchNorm's ``num_batches_tracked`` are left as they are). Norm clipping bounds how far one
    client can move the model (Sun et al. 2019, "Can You Really Backdoor Federated Learning?").

    >>> ups = [({"w": torch.tensor([3.0, 4.0])}, 1.0), ({"w": torch.tensor([0.3, 0.4])}, 1.0)]
    >>> norm_clipped_mean(ups, max_norm=1.0)["w"]
    tensor([0.4500, 0.6000])
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) or not (0 < max_norm < math.inf):
        raise ConfigError(f"norm_clipped_mean needs a finite max_norm > 0, got {max_norm!r}")
    _require_updates(updates)
    clipped = []
    for u, w in updates:
        norm = math.sqrt(sum(float((v.to(torch.float64) ** 2).sum()) for v in u.values() if v.is_floating_point()))
        scale = max_norm / max(norm, max_norm)  # 1 when the update is already short enough
        clipped.append(({k: (v.to(torch.float64) * scale).to(v.dtype) if v.is_floating_point() else v
                         for k, v in u.items()}, w))
    return weighted_mean(clipped)


def rule_name(rule: Callable[..., Any]) -> str:
    """A readable name for ``rule`` in messages: ``trimmed_mean(beta=0.2)`` for a partial,
    ``<lambda> at cell.py:3`` for a lambda, the class name for a callable object."""
    if isinstance(rule, functools.partial):
        args = [repr(a) for a in rule.args] + [f"{k}={v!r}" for k, v in rule.keywords.items()]
        return f"{rule_name(rule.func)}({', '.join(args)})"
    name = getattr(rule, "__name__", None)
    if name is None:
        return type(rule).__name__
    code = getattr(rule, "__code__", None)
    if name == "<lambda>" and code is not None:
        return f"<lambda> at {Path(code.co_filename).name}:{code.co_firstlineno}"
    return name


def apply_rule(rule: Rule, updates: Sequence[Update]) -> Weights:
    """``rule(updates)``, refused with the rule's name unless it returns an update: a dict of tensors by name."""
    out = rule(updates)
    tensors = isinstance(out, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in out.items())
    if not tensors:
        raise UpdateError(f"the aggregation rule {rule_name(rule)} returned {out!r:.80} (a {type(out).__name__}); "
                          "a rule must return the aggregated update, a dict of tensors keyed like the model's "
                          "state_dict ({name: tensor}), e.g. return fedkit.aggregate.weighted_mean(updates)")
    return dict(out)


def weigh_result(weigh: Callable[[DXO], float], result: DXO, client: str) -> float:
    """``weigh(result)``, client ``client``'s aggregation weight, refused with the function's name unless it is a
    finite number >= 0."""
    value = weigh(result)
    number = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if not (number and math.isfinite(value) and value >= 0):
        raise UpdateError(f"the weighing {rule_name(weigh)} returned {value!r:.80} (a {type(value).__name__}) for "
                          f"client {client!r}; it must return the client's aggregation weight, a finite number >= 0 "
                          "(int or float), e.g. result.meta['num_samples'] as fedkit.aggregate.by_samples does")
    return float(value)


def _require_updates(updates: Sequence[Update]) -> None:
    if not updates:
        raise UpdateError("nothing to aggregate: no client update arrived this round")


def _stack(updates: Sequence[Update], key: str) -> torch.Tensor:
    """The clients' values of ``key`` stacked along a new first dimension, in float64."""
    return torch.stack([u[key].to(torch.float64) for u, _ in updates])


def _krum_order(updates: Sequence[Update], f: int, name: str) -> list[int]:
    """Indices of ``updates`` from the best Krum score to the worst (stable on ties)."""
    if isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 0:
        raise ConfigError(f"{name} needs {{{name}.f}}, the number of Byzantine clients to tolerate, as an integer >= 0",
                          obj=name, field="f", value=f)
    _require_updates(updates)
    n = len(updates)
    if n <= 2 * f + 2:
        raise ConfigError(f"{name} with {{{name}.f={f}}} needs more than 2f+2 = {2 * f + 2} updates, got {n}", obj=name,
                          field="f", hint=f"lower {{{name}.f}} or gather more clients per round")
    keys = list(updates[0][0])
    x = torch.stack([torch.cat([u[k].reshape(-1).to(torch.float64) for k in keys]) for u, _ in updates])
    dist = torch.stack([((x - row) ** 2).sum(dim=1) for row in x])
    dist.fill_diagonal_(math.inf)  # an update is not its own neighbour
    scores = dist.sort(dim=1).values[:, :n - f - 2].sum(dim=1)
    return torch.argsort(scores, stable=True).tolist()


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
    # numbers.Real takes numpy scalars too; bool is an int to Python but never a count
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise UpdateError(f"a client result has meta[{key!r}] = {value!r}; the weighing needs a finite number >= 0 "
                          f"(int or float, not bool). Executors must report {key!r} in the DXO meta.")
    return float(value)
