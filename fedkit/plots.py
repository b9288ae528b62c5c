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
        fig.add_trace(go.Scatter(x=[r.round + 1 for r in h], y=h.series(metric), mode="lines+markers", name=str(label)))
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
