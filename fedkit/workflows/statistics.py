"""Federated statistics and the preprocessing built on it.

`FedStats` is NVFlare's federated statistics: the pooled data's count, mean, variance, min, max and
histograms, computed from per-client summaries (see `fedkit.stats` for the maths, after Chan et al.
1979) without a sample leaving its site. It takes two passes: ``stats_range`` (per-feature min and
max) so the server can fix histogram edges that every client shares, then ``stats`` with those
edges. Use it to look at the data of a federation before training: feature scales, class balance,
outliers. A client with fewer than ``min_count`` samples withholds its numbers, as NVFlare's
privacy filter does, so that no summary describes a handful of people.

`FederatedScaling` uses those statistics to standardize every client's features to the *global*
mean 0 and std 1 (each client alone would standardize to its own, which differs under non-IID data):
``Chain(FederatedScaling(), FedAvg(rounds=20))``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import ConfigError, UpdateError
from ..exchange import DXO, DataKind
from ..history import History
from ..server import Controller, ServerContext
from ..stats import WITHHELD, combine, histogram_edges


@dataclass(frozen=True)
class FedStats(Controller):
    """Federated statistics of the clients' training features (flattened), per feature.

    Stores ``history.results["statistics"]`` as JSON-friendly lists: ``count``, ``sum``, ``mean``,
    ``var`` (ddof=0), ``std``, ``min``, ``max``, ``histogram`` (features x bins), ``edges``
    (features x bins+1), ``clients`` (who contributed), ``withheld`` (who did not) and
    ``client_counts``. `statistics_arrays` gives them back as NumPy arrays. ``rounds`` is 0:
    nothing is trained, so no history round is added.

    >>> FedStats(bins=20, min_count=5).bins
    20
    """

    rounds: ClassVar[int] = 0
    uses_model: ClassVar[bool] = False  # it never sends or reads the global model, so it runs beside HE
    bins: int = 10
    min_count: int = 10  # clients with fewer training samples withhold their numbers

    def __post_init__(self) -> None:
        if not isinstance(self.bins, int) or isinstance(self.bins, bool) or self.bins < 1:
            raise ConfigError(f"FedStats.bins must be an integer >= 1, got {self.bins!r}")
        if not isinstance(self.min_count, int) or isinstance(self.min_count, bool) or self.min_count < 0:
            raise ConfigError(f"FedStats.min_count must be an integer >= 0, got {self.min_count!r}")

    def control_flow(self, fl: ServerContext) -> None:
        self.collect(fl)

    def collect(self, fl: ServerContext) -> dict[str, Any]:
        """Run both passes, store the result in ``fl.history.results["statistics"]`` and return it as arrays."""
        with fl.round(fl.start_round, record=False) as rnd:  # every client must answer: no retry, no deadline
            ranges = rnd.send("stats_range", data=DXO(DataKind.STATISTICS, {"min_count": self.min_count}))
            withheld = [n for n, r in ranges.items() if r.meta.get(WITHHELD)]
            ranges = {n: r for n, r in ranges.items() if n not in withheld}
            if not ranges:
                raise UpdateError(f"every client withheld its statistics: none has at least min_count={self.min_count} "
                                  "training samples; lower min_count or add data")
            _check_summaries(ranges, ("count", "min", "max"))
            low = np.min([np.asarray(r.data["min"], dtype=np.float64) for r in ranges.values()], axis=0)
            high = np.max([np.asarray(r.data["max"], dtype=np.float64) for r in ranges.values()], axis=0)
            edges = histogram_edges(low, high, self.bins)
            results = rnd.send("stats", list(ranges),
                               data=DXO(DataKind.STATISTICS, {"min_count": self.min_count, "edges": edges}))
            withheld += [n for n, r in results.items() if r.meta.get(WITHHELD)]  # its data changed between passes
            summaries = {n: r for n, r in results.items() if n not in withheld}
            if not summaries:
                raise UpdateError("every client withheld its statistics in the second pass")
            _check_summaries(summaries, ("count", "sum", "mean", "m2", "min", "max", "histogram"))
            stats = combine([{k: np.asarray(v) for k, v in r.data.items()} for r in summaries.values()])
            stats["edges"] = edges
            fl.history.results["statistics"] = {
                **{k: np.asarray(v).tolist() for k, v in stats.items() if k != "m2"},
                "bins": self.bins, "clients": list(summaries), "withheld": withheld,
                "client_counts": {n: int(r.data["count"]) for n, r in summaries.items()},
                "seconds": time.perf_counter() - rnd.started}
        return stats


def _check_summaries(results: dict[str, DXO], keys: tuple[str, ...]) -> None:
    """Every result is STATISTICS with ``keys``, finite, and all clients have the same number of features."""
    for name, r in results.items():
        missing = [k for k in keys if k not in r.data]
        if r.kind != DataKind.STATISTICS or missing:
            raise UpdateError(f"client {name!r} answered {r.kind.value} with keys {sorted(r.data)}; a statistics "
                              f"task needs STATISTICS with {', '.join(keys)} (missing: {missing or 'none'})")
        for k in keys:
            if not np.isfinite(np.asarray(r.data[k], dtype=np.float64)).all():
                raise UpdateError(f"client {name!r} reported non-finite {k!r} (NaN or Inf); its data holds NaN or Inf")
    features = {n: int(np.size(r.data["min"])) for n, r in results.items()}
    if len(set(features.values())) > 1:
        raise UpdateError(f"clients have different numbers of features: {features}; "
                          "they must hold the same kind of data")


@dataclass(frozen=True)
class FederatedScaling(Controller):
    """Standardize every client's features with the global mean and std from `FedStats`.

    Runs ``stats`` (a `FedStats`), then sends every client, including any that withheld, a
    ``standardize`` task with the global per-feature ``mean`` and ``std`` (1 where a feature is
    constant); the `fedkit.preprocess.Standardize` executor replaces the client's train and validation
    data for the rest of the run. Stores ``history.results["scaling"]`` (``mean``, ``std``) besides
    ``"statistics"``. ``rounds`` is 0.

    Caveat: the server's test set (``Simulator(test=...)``) is not standardized, as it exists before
    the statistics do; run with ``test=None`` and score the final model on
    ``fk.preprocess.standardize(test, **statistics_arrays(run, "scaling"))``.

    >>> from fedkit.workflows import Chain, FedAvg
    >>> Chain(FederatedScaling(), FedAvg(rounds=10)).rounds
    10
    """

    rounds: ClassVar[int] = 0
    uses_model: ClassVar[bool] = False
    stats: FedStats = FedStats()
    task_name: str = "standardize"

    def control_flow(self, fl: ServerContext) -> None:
        stats = self.stats.collect(fl)
        mean, std = stats["mean"], np.where(stats["std"] > 0, stats["std"], 1.0)
        with fl.round(fl.start_round, record=False) as rnd:  # every client, those that withheld too
            rnd.send(self.task_name, data=DXO(DataKind.STATISTICS, {"mean": mean, "std": std}))
        fl.history.results["scaling"] = {"mean": mean.tolist(), "std": std.tolist()}


def statistics_arrays(run: Any, key: str = "statistics") -> dict[str, Any]:
    """``history.results[key]`` with its numeric lists as NumPy arrays (``key="scaling"`` for mean/std).

    ``run`` is a `Run` or a `History`.
    """
    history = run if isinstance(run, History) else run.history
    result = history.results.get(key)
    if result is None:
        raise ConfigError(f"this run has no {key!r} results; it holds: {', '.join(history.results) or 'none'}. "
                          "Run FedStats (statistics) or FederatedScaling (statistics and scaling).")
    return {k: np.asarray(v) if isinstance(v, list) and k not in ("clients", "withheld") else v
            for k, v in result.items()}
