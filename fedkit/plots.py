"""Plotly figures of runs and partitions. Each function returns a `plotly.graph_objects.Figure`."""

from __future__ import annotations

from typing import Any, Mapping

import plotly.graph_objects as go

from .data import Partition
from .history import History


def _history(run: Any) -> History:
    return run if isinstance(run, History) else run.history


def curves(runs: Mapping[str, Any] | Any, metric: str = "accuracy", title: str | None = None) -> go.Figure:
    """The global model's ``metric`` per round, one line per run (``{"label": run_or_history}``).

    A single run or history may be passed as is.
    """
    if not isinstance(runs, Mapping):
        runs = {"run": runs}
    fig = go.Figure()
    for label, run in runs.items():
        h = _history(run)
        y, name = h.series(metric), str(label)
        if all(v != v for v in y) and any(("client_" + metric) in r.metrics for r in h):
            y, name = h.series("client_" + metric), f"{label} (on clients)"  # HE: the server cannot score its model
        fig.add_trace(go.Scatter(x=[r.round + 1 for r in h], y=y, mode="lines+markers", name=name))
    fig.update_layout(title=title or f"global model {metric} per round", xaxis_title="round", yaxis_title=metric,
                      template="plotly_white", legend_title_text="run")
    return fig


def client_curves(run: Any, metric: str = "train_loss") -> go.Figure:
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


def privacy_utility(runs: Mapping[str, Any], metric: str = "accuracy", epsilon: str | None = None) -> go.Figure:
    """The privacy-utility trade-off: ``metric`` against the epsilon spent, one line per run, round by round.

    ``epsilon`` names the round metric on the x axis: ``"epsilon"`` (DP-FedAvg, user-level) or
    ``"client_epsilon"`` (DP-SGD, the largest client's); None takes whichever each run recorded.
    A run with no epsilon (not private) is drawn as a dashed horizontal line at its final ``metric``.
    """
    fig = go.Figure()
    for label, run in runs.items():
        h = _history(run)
        key = epsilon or next((k for k in ("epsilon", "client_epsilon") if any(k in r.metrics for r in h)), None)
        if key is None or not any(key in r.metrics for r in h):
            fig.add_hline(y=h.last(metric), line_dash="dash", annotation_text=f"{label} (not private)")
            continue
        rows = [r for r in h if key in r.metrics]
        fig.add_trace(go.Scatter(x=[r.metrics[key] for r in rows], y=[r.metrics.get(metric) for r in rows],
                                 mode="lines+markers", name=str(label)))
    fig.update_layout(title=f"privacy-utility trade-off: {metric} against epsilon", xaxis_title=epsilon or "epsilon",
                      yaxis_title=metric, template="plotly_white", legend_title_text="run")
    return fig
