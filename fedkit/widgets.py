"""ipywidgets panels for notebooks: an experiment panel, a live dashboard, a comparison view.

Every widget here only calls plain fedkit functions (`experiment_from_controls`, `Experiment.simulator`,
`Simulator.start`, `Run.abort`, the history's data frames), so what a button does can always be done in
a cell too. They import and build without a browser; tests drive them by setting values and clicking.
Shown in a notebook, a panel has its controls, Run / Stop, a progress bar and live plots.

>>> panel = ExperimentPanel()          # doctest: +SKIP
>>> panel                              # doctest: +SKIP
>>> exp = experiment_from_controls(Experiment.preset("quickstart"), algorithm="fedprox", mu=0.1, rounds=5)
>>> exp.workflow.rounds, exp.workflow.extensions, exp.data.partition
(5, (Proximal(mu=0.1),), 'dirichlet')
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable

import ipywidgets as W
import plotly.graph_objects as go

from .data import DATASETS
from .errors import ConfigError
from .experiment import PARTITIONS, Experiment
from .history import History, RoundRecord
from .metrics import ACCURACY, BYTES_DOWN, BYTES_UP, CLIENTS, TRAIN_LOSS, epsilons, label, reported, resolve, scored
from .plots import round_axis
from .server import Controller
from .simulator import Run
from .status import RunStatus
from .workflows import SCAFFOLD, Cyclic, FedAvg, FedOpt, FedProx


FIGURE_WIDTH = 480  # two figures side by side fit a notebook's ~1000 px output area


REDRAW_S = 0.5  # the live dashboard redraws at most this often while a run goes

def _figure(title: str, yaxis: str, width: int = FIGURE_WIDTH) -> go.FigureWidget:
    fig = go.FigureWidget()
    fig.update_layout(title=title, xaxis_title="round", yaxis_title=yaxis, template="plotly_white", height=320,
                      width=width, margin=dict(l=55, r=20, t=40, b=90),  # b: the legend goes below the plot
                      legend=dict(orientation="h", yanchor="top", y=-0.25, xanchor="left", x=0))
    return fig


class Dashboard:
    """Live figures of one run: global accuracy and loss, per-client training loss, bytes exchanged, epsilon.

    Accuracy and loss are the server's, or the clients' scores when the server cannot score its model (HE);
    epsilon is drawn of each kind the run spends: user-level (DP-FedAvg) and example-level (DP-SGD).
    """

    def __init__(self) -> None:
        self.accuracy = _figure("global model", "accuracy")
        self.accuracy.update_layout(yaxis2=dict(title="loss", overlaying="y", side="right", showgrid=False),
                                    margin_r=55)  # accuracy (0..1) and loss on their own axes
        self.clients = _figure("per-client training loss", "train loss")
        self.traffic = _figure("bytes exchanged per round", "bytes")
        self.traffic.update_yaxes(tickformat="~s", rangemode="tozero")  # 154k, from zero: a constant is flat
        self.privacy = _figure("privacy spent", "epsilon")
        # shown only when the run records an epsilon: a non-private run has no empty chart
        self.privacy_box = W.Box([self.privacy], layout=W.Layout(display="none"))
        self.widget = W.VBox([W.HBox([self.accuracy, self.clients]), W.HBox([self.traffic, self.privacy_box])])

    @property
    def figures(self) -> list[go.FigureWidget]:
        return [self.accuracy, self.clients, self.traffic, self.privacy]

    def clear(self) -> None:
        for fig in self.figures:
            fig.data = ()

    def update(self, history: History) -> None:
        """Redraw every figure from ``history`` (cheap: a run has tens of rounds)."""
        rounds = history.to_dataframe()
        clients = history.client_dataframe()
        if rounds.empty:
            return
        x = rounds["round"]
        scores = scored(rounds.columns)[:2]  # an HE run's server cannot score its model: its clients' scores
        _set_lines(self.accuracy, {label(m): (x, rounds[m]) for m in scores if m in rounds},
                   axes={label(m): "y2" for m in scores[1:]})  # the loss on the right-hand axis
        if TRAIN_LOSS in clients:
            per_client = {str(c): (g["round"], g[TRAIN_LOSS]) for c, g in clients.groupby("client", sort=False)}
            _set_lines(self.clients, per_client)
            self.clients.layout.showlegend = len(per_client) <= 12  # more would not fit below: names on hover
        traffic = {m: (x, rounds[m]) for m in (BYTES_DOWN, BYTES_UP) if m in rounds}
        if len(traffic) == 2 and rounds[BYTES_DOWN].equals(rounds[BYTES_UP]):
            traffic = {f"{BYTES_DOWN} = {BYTES_UP}": traffic[BYTES_DOWN]}  # one line, not two on top of each other
        _set_lines(self.traffic, traffic)
        private = epsilons(rounds.columns)
        _set_lines(self.privacy, {label(m): (x, rounds[m]) for m in private})
        self.privacy_box.layout.display = "" if private else "none"
        for fig in self.figures:
            round_axis(fig)


def _set_lines(fig: go.FigureWidget, lines: dict[str, tuple[Any, Any]], axes: dict[str, str] | None = None) -> None:
    """Make ``fig`` show exactly ``lines`` ({name: (x, y)}), updating traces in place; ``axes``: {name: "y2"}."""
    with fig.batch_update():
        names = [t.name for t in fig.data]
        if names != list(lines):
            fig.data = ()
            for name, (x, y) in lines.items():
                fig.add_scatter(x=list(x), y=list(y), mode="lines+markers", name=name,
                                yaxis=(axes or {}).get(name, "y"))
        else:
            for trace, (x, y) in zip(fig.data, lines.values()):
                trace.x, trace.y = list(x), list(y)


class ComparisonView:
    """The global accuracy of finished runs, overlaid: one line per run (the clients' scores for an HE run)."""

    def __init__(self, metric: str = ACCURACY) -> None:
        self.metric = metric
        self.figure = _figure(f"finished runs: global {metric}", metric, width=2 * FIGURE_WIDTH)
        self.figure.update_layout(showlegend=True)  # a legend even with one run
        self.runs: dict[str, Run] = {}
        clear = W.Button(description="Clear", icon="trash", layout=W.Layout(width="100px"))
        clear.on_click(lambda _: self.clear())
        self.widget = W.VBox([self.figure, clear])

    def add(self, label: str, run: Run) -> None:
        self.runs[label] = run
        h = run.history
        key = resolve(self.metric, reported(r.metrics for r in h))  # an HE run: its clients' scores
        name = label if key == self.metric else f"{label} (on clients)"
        aborted = getattr(run, "status", RunStatus.DONE) == RunStatus.ABORTED
        if aborted:
            name += f" (aborted after round {len(h)})"
        self.figure.add_scatter(x=[r.number for r in h], y=h.series(key), mode="lines+markers", name=name,
                                line_dash="dash" if aborted else "solid")
        round_axis(self.figure)

    def clear(self) -> None:
        self.runs.clear()
        self.figure.data = ()


# the panel's algorithm menu: name -> the workflow its two workflow controls give (rounds, FedProx's mu),
# with the library's defaults for the rest, so the panel runs what fk.FedProx(rounds=20, mu=0.1) runs in a cell
WORKFLOWS: dict[str, Callable[[int, float], Controller]] = {
    "fedavg": lambda rounds, mu: FedAvg(rounds=rounds),
    "fedprox": lambda rounds, mu: FedProx(rounds=rounds, mu=mu),
    "fedopt": lambda rounds, mu: FedOpt(rounds=rounds),
    "scaffold": lambda rounds, mu: SCAFFOLD(rounds=rounds),
    "cyclic": lambda rounds, mu: Cyclic(rounds=rounds),
}
CONTROLS = ("dataset", "clients", "partition", "alpha", "algorithm", "mu", "rounds", "local_epochs", "lr", "seed")


def controls_of(experiment: Experiment) -> dict[str, Any]:
    """The control values that show ``experiment``'s data, rounds, local training and seed (algorithm: fedavg)."""
    d, t = experiment.data, experiment.train
    return dict(dataset=d.dataset, clients=d.clients, partition=d.partition, alpha=d.alpha, algorithm="fedavg",
                mu=0.01, rounds=experiment.workflow.rounds, local_epochs=t.epochs, lr=t.lr, seed=experiment.seed)


def experiment_from_controls(base: Experiment, **controls: Any) -> Experiment:
    """``base`` changed as the panel's ``controls`` say (see `CONTROLS`; those not given are `controls_of(base)`).

    The data, local epochs, lr and seed are replaced in ``base``'s objects; the workflow is always a new
    one of ``algorithm`` (`WORKFLOWS`); what the panel has no control for (model, device, batch size,
    faults...) stays ``base``'s.
    """
    unknown = sorted(set(controls) - set(CONTROLS))
    if unknown:
        raise ConfigError(f"the panel has no control {', '.join(unknown)}; its controls are: {', '.join(CONTROLS)}")
    c = {**controls_of(base), **controls}
    if c["algorithm"] not in WORKFLOWS:
        raise ConfigError(f"algorithm {c['algorithm']!r} is not in the panel's menu; choose one of: {', '.join(WORKFLOWS)}")
    return dataclasses.replace(
        base, data=dataclasses.replace(base.data, dataset=c["dataset"], clients=c["clients"],
                                       partition=c["partition"], alpha=c["alpha"]),
        workflow=WORKFLOWS[c["algorithm"]](c["rounds"], c["mu"]),
        train=dataclasses.replace(base.train, epochs=c["local_epochs"], lr=c["lr"]), seed=c["seed"])


STATIC_NOTE = "fedkit experiment panel: a live widget; run this cell with a running kernel to use it."


def log_grid(low: int, high: int, given: float | None = None) -> list[float]:
    """1-2-3-5 steps per decade from ``10**low`` to ``10**high``, and ``given`` exactly as it was given.

    Each value is the float of its decimal text (``0.3``, not ``3 * 0.1``), so a value chosen on the
    slider is the one its label shows and the one a cell would write.
    """
    grid = {float(f"{m}e{e}") for e in range(low, high) for m in (1, 2, 3, 5)} | {float(f"1e{high}")}
    if given is not None:
        grid.add(float(given))
    return sorted(grid)


def log_slider(value: float, low: int, high: int, description: str, style: dict[str, str]) -> W.SelectionSlider:
    """A slider over `log_grid` that starts at ``value`` exactly (a FloatLogSlider would snap it to its steps)."""
    return W.SelectionSlider(options=[(f"{v:g}", v) for v in log_grid(low, high, value)], value=float(value),
                             description=description, style=style, continuous_update=False)


class ExperimentPanel:
    """Controls for an experiment, Run and Stop buttons, a progress bar, a live dashboard and a comparison.

    ``base`` (default: ``Experiment.preset("quickstart")``) gives what the panel has no control for, and
    the controls' first values (of its workflow, only the rounds: the menu starts at fedavg); ``values``
    set some controls (``clients=4, algorithm="scaffold"``).
    Run builds ``self.settings()`` (an `Experiment`) into a simulator and starts it in the background;
    Stop aborts it at the next batch. Each finished run is added to the comparison view.
    """

    def __init__(self, base: Experiment | None = None, **values: Any) -> None:
        base = base if base is not None else Experiment.preset("quickstart")
        v = {**controls_of(base), **values}
        experiment_from_controls(base, **v)  # refuse unknown controls and settings now, not at the first Run
        style = {"description_width": "110px"}
        self.dataset = W.Dropdown(options=list(DATASETS), value=v["dataset"], description="dataset", style=style)
        self.clients = W.IntSlider(value=v["clients"], min=2, max=50, description="clients", style=style)
        self.partition = W.Dropdown(options=list(PARTITIONS), value=v["partition"], description="partition", style=style)
        self.alpha = log_slider(v["alpha"], -2, 2, "alpha", style)  # the values given are kept exactly
        self.algorithm = W.Dropdown(options=list(WORKFLOWS), value=v["algorithm"], description="algorithm", style=style)
        self.mu = log_slider(v["mu"], -4, 0, "FedProx mu", style)
        self.rounds = W.IntSlider(value=v["rounds"], min=1, max=200, description="rounds", style=style)
        self.local_epochs = W.IntSlider(value=v["local_epochs"], min=1, max=20, description="local epochs", style=style)
        self.lr = log_slider(v["lr"], -4, 0, "lr", style)
        self.seed = W.IntText(value=v["seed"], description="seed", style=style)
        self._base = base
        self.run_button = W.Button(description="Run", button_style="success", icon="play")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=v["rounds"], description="progress")
        self.status = W.HTML("ready")
        self.dashboard = Dashboard()
        self.comparison = ComparisonView()
        self.run: Run | None = None
        self._watcher: threading.Thread | None = None
        self._drawn = 0.0  # when the dashboard was last redrawn (time.monotonic)
        self.run_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        controls = W.VBox([self.dataset, self.clients, self.partition, self.alpha, self.algorithm, self.mu,
                           self.rounds, self.local_epochs, self.lr, self.seed])
        buttons = W.VBox([W.HBox([self.run_button, self.stop_button]), self.progress, self.status])
        self.widget = W.VBox([W.HBox([controls, buttons]),
                              W.Tab(children=[self.dashboard.widget, self.comparison.widget],
                                    titles=("live run", "comparison"))])

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        """The live panel, with a plain note for where there is no kernel (a saved notebook, nbviewer, HTML)."""
        bundle = dict(self.widget._repr_mimebundle_(**kwargs) or {})
        bundle["text/plain"] = STATIC_NOTE
        bundle["text/html"] = f"<p><i>{STATIC_NOTE}</i></p>"
        return bundle

    def controls(self) -> dict[str, Any]:
        """The controls' current values, by name (`CONTROLS`)."""
        return {name: getattr(self, name).value for name in CONTROLS}

    def settings(self) -> Experiment:
        """The experiment the controls describe (a plain object: run it in a cell with ``.simulator().run()``)."""
        return experiment_from_controls(self._base, **self.controls())

    def label(self) -> str:
        """A short name of the current settings, for the status line and the comparison's legend."""
        c = self.controls()
        skew = f" a={c['alpha']:g}" if c["partition"] in ("dirichlet", "quantity") else ""
        return (f"{c['algorithm']} {c['partition']}{skew} E={c['local_epochs']} lr={c['lr']:g} "
                f"#{len(self.comparison.runs) + 1}")

    def start(self) -> Run | None:
        """What Run does: build the experiment and start it in the background."""
        if self.run is not None and not self.run.done:
            self.status.value = "a run is in progress: press Stop first"
            return None
        try:
            settings = self.settings()
            sim = settings.simulator(on_round=[self._on_round])
        except Exception as e:  # bad settings: say so in the panel, keep the panel usable
            self.status.value = f"<b>cannot start</b>: {type(e).__name__}: {e}"
            return None
        self.dashboard.clear()
        self.progress.max, self.progress.value = settings.workflow.rounds, 0
        label = self.label()
        self.run = sim.start()
        self.status.value = f"running {label}"
        self.run_button.disabled, self.stop_button.disabled = True, False
        self._watcher = threading.Thread(target=self._finish, args=(self.run, label), name="fedkit-panel", daemon=True)
        self._watcher.start()
        return self.run

    def stop(self) -> None:
        """What Stop does: abort the run at the next batch; the last completed round is kept."""
        if self.run is not None and not self.run.done:
            self.run.abort("stopped from the panel")
            self.status.value = "stopping..."

    def wait(self, timeout: float | None = None) -> Run | None:
        """Block until the current run and the panel's bookkeeping of it are finished."""
        if self._watcher is not None:
            self._watcher.join(timeout)
        return self.run

    def _on_round(self, record: RoundRecord) -> None:
        self.progress.value = record.number
        # redraw at most every REDRAW_S: a fast run (tens of rounds a second) would otherwise flood the browser
        # with figure updates, and a click on Stop would wait behind them; the run's end draws the last state
        now = time.monotonic()
        if self.run is not None and now - self._drawn >= REDRAW_S:
            self._drawn = now
            self.dashboard.update(self.run.history)

    def _finish(self, run: Run, label: str) -> None:
        run._done.wait()
        self.dashboard.update(run.history)
        key, _, where = scored(run.history.rounds[-1].metrics if len(run.history) else {})
        acc = f"accuracy {run.history.last(key):.4f}" + (" (on clients)" if where == CLIENTS else "")
        if run.status == RunStatus.FAILED:
            self.status.value = f"<b>failed</b>: {type(run.error).__name__}: {run.error}"
        else:
            self.status.value = f"{run.status}: {label}, {len(run.history)} rounds, {acc}"
            if len(run.history):
                self.comparison.add(label, run)
        self.run_button.disabled, self.stop_button.disabled = False, True
