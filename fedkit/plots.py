"""Plotly figures of runs and partitions. Each function returns a `plotly.graph_objects.Figure`."""

from __future__ import annotations

from typing import Any, Mapping

import plotly.graph_objects as go

from .data import Partition
from .history import History
from .metrics import ACCURACY, TRAIN_LOSS, epsilons, label, reported, resolve


def _history(run: Any) -> History:
    return run if isinstance(run, History) else run.history


def curves(runs: Mapping[str, Any] | Any, metric: str = ACCURACY, title: str | None = None) -> go.Figure:
    """The global model's ``metric`` per round, one line per run (``{"label": run_or_history}``).

    A single run or history may be passed as is. For ``accuracy`` or ``loss``, a run the server could
    not score (HE) is drawn with its clients' scores (``client_accuracy``), its label saying so.
    """
    if not isinstance(runs, Mapping):
        runs = {"run": runs}
    fig = go.Figure()
    for name, run in runs.items():
        h = _history(run)
        key = resolve(metric, reported(r.metrics for r in h))
        fig.add_trace(go.Scatter(x=[r.round + 1 for r in h], y=h.series(key), mode="lines+markers",
                                 name=str(name) if key == metric else f"{name} (on clients)"))
    fig.update_layout(title=title or f"global model {metric} per round", xaxis_title="round", yaxis_title=metric,
                      template="plotly_white", legend_title_text="run")
    return fig


def client_curves(run: Any, metric: str = TRAIN_LOSS) -> go.Figure:
    """Each client's ``metric`` per round (e.g. ``train_loss``, ``val_accuracy``) for one run."""
    df = _history(run).client_dataframe()
    fig = go.Figure()
    if metric in df:
        for client, rows in df.groupby("client", sort=False):
            fig.add_trace(go.Scatter(x=rows["round"] + 1, y=rows[metric], mode="lines", name=str(client)))
    fig.update_layout(title=f"per-client {metric}", xaxis_title="round", yaxis_title=metric, template="plotly_white")
    return fig


def partition(parts: Partition, title: str | None = None) -> go.Figure:
    """Stacked bars: how many samples of each class every client holds."""
    counts = parts.counts()
    names = [f"site-{i + 1}" for i in range(len(parts))]
    fig = go.Figure([go.Bar(x=names, y=counts[:, k], name=f"class {k}") for k in range(counts.shape[1])])
    fig.update_layout(barmode="stack", title=title or f"samples per client and class: {parts.scheme}",
                      xaxis_title="client", yaxis_title="samples", template="plotly_white")
    return fig


def privacy_utility(runs: Mapping[str, Any], metric: str = ACCURACY, epsilon: str | None = None) -> go.Figure:
    """The privacy-utility trade-off: ``metric`` against the epsilon spent, one line per run, round by round.

    ``epsilon`` names the round metric on the x axis: ``"epsilon"`` (DP-FedAvg, user-level) or
    ``"client_epsilon"`` (DP-SGD, the largest client's); None takes whichever each run recorded
    (user-level first). ``accuracy`` or ``loss`` of a run scored on its clients (HE) are the clients'.
    A run with no epsilon (not private) is drawn as a dashed horizontal line at its final ``metric``.
    """
    fig, drawn = go.Figure(), set()
    for name, run in runs.items():
        h = _history(run)
        names = reported(r.metrics for r in h)
        ykey = resolve(metric, names)  # an HE run: its clients' scores
        key = epsilon or next(iter(epsilons(names)), None)
        if key not in names:
            fig.add_hline(y=h.last(ykey), line_dash="dash", annotation_text=f"{name} (not private)")
            continue
        drawn.add(key)
        rows = [r for r in h if key in r.metrics]
        fig.add_trace(go.Scatter(x=[r.metrics[key] for r in rows], y=[r.metrics.get(ykey) for r in rows],
                                 mode="lines+markers", name=str(name)))
    fig.update_layout(title=f"privacy-utility trade-off: {metric} against epsilon",
                      xaxis_title=_epsilon_axis({epsilon} if epsilon else drawn),
                      yaxis_title=metric, template="plotly_white", legend_title_text="run")
    return fig


def _epsilon_axis(kinds: set[str]) -> str:
    """The x axis title for runs that drew ``kinds`` of epsilon: user- and example-level are not comparable."""
    if len(kinds) == 1:
        return label(next(iter(kinds)))
    return "epsilon (user- and example-level mixed)" if kinds else "epsilon"
