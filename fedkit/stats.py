"""Federated statistics, client half and the exact way to combine it: NumPy only, no torch.

Each client summarises its own features (count, sum, mean, M2 = sum of squared deviations from its
mean, min, max, histogram over bin edges the server fixed for everyone); the server combines the
summaries into the statistics of the pooled data *without* ever seeing a sample. The variance
uses the parallel algorithm of Chan, Golub and LeVeque (1979, "Updating formulae and a pairwise
algorithm for computing sample variances"), which is exact and stable where sum-of-squares is not.
This is what NVFlare's federated statistics does; the workflow is `fedkit.workflows.FedStats`.

Nothing here imports torch: the executor turns the client's features into a NumPy array once, so
any training library's tensors (or plain arrays) work.

>>> import numpy as np
>>> x = np.arange(10.0).reshape(5, 2)
>>> whole = combine([summarize(x[:2], histogram_edges(x.min(0), x.max(0), 2)),
...                  summarize(x[2:], histogram_edges(x.min(0), x.max(0), 2))])
>>> bool(np.allclose(whole["var"], x.var(0)))
True
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .exchange import DXO, ClientContext, DataKind, MetaKey, Signal, Task

WITHHELD = "withheld"  # meta key: the client has too few samples and sends no numbers


def as_features(x: Any) -> np.ndarray:
    """Samples as rows of flattened float64 features: (N, ...) -> (N, F)."""
    a = np.asarray(x, dtype=np.float64)
    return a.reshape(len(a), int(np.prod(a.shape[1:])))


def feature_range(x: np.ndarray) -> dict[str, Any]:
    """The first pass: ``count`` and the per-feature ``min`` and ``max`` of ``x`` (N, F)."""
    return {"count": len(x), "min": x.min(0), "max": x.max(0)}


def histogram_edges(low: np.ndarray, high: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width edges per feature, shape (F, bins + 1); a constant feature gets [v - 0.5, v + 0.5] as NumPy does."""
    low, high = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
    same = low == high
    low, high = np.where(same, low - 0.5, low), np.where(same, high + 0.5, high)
    return np.linspace(low, high, bins + 1, axis=1)


def summarize(x: np.ndarray, edges: np.ndarray) -> dict[str, Any]:
    """The second pass: count, sum, mean, m2, min, max and per-feature histograms of ``x`` (N, F)."""
    mean = x.mean(0)
    return {"count": len(x), "sum": x.sum(0), "mean": mean, "m2": ((x - mean) ** 2).sum(0),
            "min": x.min(0), "max": x.max(0),
            "histogram": np.stack([np.histogram(x[:, j], bins=edges[j])[0] for j in range(x.shape[1])])}


def merge_moments(a: tuple[int, np.ndarray, np.ndarray],
                  b: tuple[int, np.ndarray, np.ndarray]) -> tuple[int, np.ndarray, np.ndarray]:
    """Chan et al. 1979: (count, mean, M2) of two disjoint sets -> that of their union."""
    (na, ma, m2a), (nb, mb, m2b) = a, b
    n = na + nb
    if na == 0 or nb == 0:
        return (n, ma, m2a) if nb == 0 else (n, mb, m2b)
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta ** 2 * (na * nb / n)


def combine(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The statistics of the pooled data from each part's `summarize`: exact up to float rounding.

    ``mean`` is sum / count; ``var`` (ddof=0, as NumPy) and ``std`` come from the pairwise M2;
    histograms (over the same edges) add up exactly.
    """
    if not summaries:
        raise ValueError("nothing to combine: no client summary")
    count, mean, m2 = 0, np.zeros_like(summaries[0]["mean"]), np.zeros_like(summaries[0]["m2"])
    for s in summaries:
        count, mean, m2 = merge_moments((count, mean, m2), (int(s["count"]), s["mean"], s["m2"]))
    total = np.sum([s["sum"] for s in summaries], axis=0)
    var = m2 / count
    return {"count": count, "sum": total, "mean": total / count, "m2": m2, "var": var, "std": np.sqrt(var),
            "min": np.min([s["min"] for s in summaries], axis=0), "max": np.max([s["max"] for s in summaries], axis=0),
            "histogram": np.sum([s["histogram"] for s in summaries], axis=0)}


class StatsExecutor:
    """Executor for the ``stats_range`` and ``stats`` tasks of `FedStats` (one object serves both).

    Works on the client's training split. A client with fewer than ``min_count`` samples (its own
    floor, or the server's ``min_count`` in the task if that is higher) withholds: it answers
    ``meta["withheld"] = True`` and no numbers, not even its count (a client without samples always
    does). The client has the last word:
    the server can raise the bar, never lower it.
    """

    def __init__(self, min_count: int = 0) -> None:
        self.min_count = int(min_count)

    def execute(self, task: Task, ctx: ClientContext, abort: Signal) -> DXO:
        x = self._features(ctx)
        floor = max(1, self.min_count, int(task.data.data.get("min_count", 0)))  # no samples: nothing to say
        if len(x) < floor:
            return DXO(DataKind.STATISTICS, {}, {WITHHELD: True})
        meta = {MetaKey.NUM_SAMPLES: len(x)}
        if task.name == "stats_range":
            return DXO(DataKind.STATISTICS, feature_range(x), meta)
        edges = np.asarray(task.data.data.get("edges"), dtype=np.float64)
        if edges.ndim != 2 or edges.shape[0] != x.shape[1]:
            raise ValueError(f"client {ctx.client!r} has {x.shape[1]} features but the task's histogram edges "
                             f"have shape {edges.shape}; expected ({x.shape[1]}, bins + 1)")
        return DXO(DataKind.STATISTICS, summarize(x, edges), meta)

    @staticmethod
    def _features(ctx: ClientContext) -> np.ndarray:
        # converted once per dataset: a preprocessing task that replaces the data gets a fresh array
        train = ctx.data.train
        cached = ctx.state.get("_stats_features")
        if cached is None or cached[0] is not train:
            cached = ctx.state["_stats_features"] = (train, as_features(train.x))
        return cached[1]
