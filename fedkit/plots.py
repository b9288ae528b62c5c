"""Plotly figures of runs and partitions. Each function returns a `plotly.graph_objects.Figure`."""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

import plotly.graph_objects as go

from .data import Partition
from .history import History
from .metrics import ACCURACY, TRAIN_LOSS, epsilons, label, reported, resolve


ROUND_TICKS = 10  # up to this many rounds shown, a tick at every round; beyond, plotly's own whole steps (5, 10...)


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
        fig.add_trace(go.Scatter(x=[r.number for r in h], y=h.series(key), mode="lines+markers",
                                 name=str(name) if key == metric else f"{name} (on clients)"))
    fig.update_layout(title=title or f"global model {metric} per round", xaxis_title="round", yaxis_title=metric,
                      template="plotly_white", legend_title_text="run")
    return round_axis(fig)


def client_curves(run: Any, metric: str = TRAIN_LOSS) -> go.Figure:
    """Each client's ``metric`` per round (e.g. ``train_loss``, ``val_accuracy``) for one run."""
    df = _history(run).client_dataframe()
    fig = go.Figure()
    if metric in df:
        for client, rows in df.groupby("client", sort=False):
            fig.add_trace(go.Scatter(x=rows["round"], y=rows[metric], mode="lines", name=str(client)))
    fig.update_layout(title=f"per-client {metric}", xaxis_title="round", yaxis_title=metric, template="plotly_white")
    return round_axis(fig)


def partition(parts: Partition, title: str | None = None) -> go.Figure:
    """Stacked bars: how many samples of each class every client holds."""
    counts = parts.counts()
    names = [f"site-{i + 1}" for i in range(len(parts))]
    fig = go.Figure([go.Bar(x=names, y=counts[:, k], name=f"class {k}") for k in range(counts.shape[1])])
    fig.update_layout(barmode="stack", title=title or f"samples per client and class: {parts.scheme}",
                      xaxis_title="client", yaxis_title="samples", template="plotly_white",
                      # every class in view: a horizontal legend below the bars, no scrollbar hiding "class 0"
                      legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0,
                                  traceorder="normal", title_text="label"),
                      margin=dict(b=40 + 25 * (1 + counts.shape[1] // 8)))
    return fig


def _values(data: Any) -> list[Any]:
    """A trace's x or y as a list (None, a tuple, a NumPy array...)."""
    return [] if data is None or isinstance(data, str) else list(data)


def _numbers(fig: go.Figure, axis: str) -> list[float]:
    """The finite numbers ``fig``'s traces put on ``axis`` ("x" or "y")."""
    return [float(v) for t in fig.data for v in _values(getattr(t, axis, None))
            if isinstance(v, numbers.Real) and math.isfinite(v)]


def round_axis(fig: go.Figure, axis: str = "x") -> go.Figure:
    """Make ``fig``'s ``axis`` ("x" or "y") an axis of rounds: whole-number ticks (1, 2, 3, never 1.5).

    Up to `ROUND_TICKS` rounds in the data, a tick at each of them; more, and plotly spaces the ticks itself:
    its steps (2, 5, 10, 20...) are whole numbers once the axis spans more rounds than it has room for
    ticks, and one tick per round would crowd 200 rounds. Call it after adding the traces.
    """
    values = _numbers(fig, axis)
    update = fig.update_xaxes if axis == "x" else fig.update_yaxes
    if values and max(values) - min(values) < ROUND_TICKS:
        every = list(range(math.floor(min(values)), math.ceil(max(values)) + 1))
        return update(tickformat=",d", tickmode="array", tickvals=every)
    return update(tickformat=",d", tickmode="auto", tickvals=None)


def log_axis(fig: go.Figure, axis: str = "x") -> go.Figure:
    """Make ``fig``'s ``axis`` ("x" or "y") logarithmic, with whole tick labels: 0.01, 0.1, 1, 10 (and 2, 5
    between them when the data spans at most three powers of ten), never plotly's bare "2 5" digits.

    The ticks are chosen from the data already in ``fig``: call it after adding the traces.
    """
    values = [v for v in _numbers(fig, axis) if v > 0]
    update = fig.update_xaxes if axis == "x" else fig.update_yaxes
    if not values:
        return update(type="log", dtick=1, tickformat="~g")
    low, high = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    steps = (1, 2, 5) if high - low <= 3 else (1,)
    ticks = [float(f"{m}e{e}") for e in range(low, high + 1) for m in steps]
    return update(type="log", tickmode="array", tickvals=ticks, ticktext=[_tick(v) for v in ticks])


def _tick(v: float) -> str:
    """A tick label: 0.05, 1, 20, 500, then 2k, 1M, 5G (not 2e+06)."""
    for power, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= power:
            return f"{v / power:g}{suffix}"
    return f"{v:g}"


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
