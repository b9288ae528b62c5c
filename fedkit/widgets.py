"""ipywidgets panels for notebooks: an experiment panel, a live dashboard, a comparison view.

Every widget here only calls plain fedkit functions (`Experiment.simulator`, `Simulator.start`,
`Run.abort`, the history's data frames), so what a button does can always be done in a cell too.
They import and build without a browser; tests drive them by setting values and clicking.

>>> panel = ExperimentPanel()          # doctest: +SKIP
>>> panel                              # doctest: +SKIP   (shows controls, Run / Stop, progress, live plots)
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import ipywidgets as W
import plotly.graph_objects as go

from .experiment import ALGORITHMS, PARTITIONS, Experiment
from .data import DATASETS
from .history import History, RoundRecord
from .simulator import Run


def _figure(title: str, yaxis: str) -> go.FigureWidget:
    fig = go.FigureWidget()
    fig.update_layout(title=title, xaxis_title="round", yaxis_title=yaxis, template="plotly_white", height=300,
                      margin=dict(l=50, r=20, t=40, b=40))
    return fig


class Dashboard:
    """Live figures of one run: global accuracy and loss, per-client training loss, bytes exchanged, epsilon."""

    def __init__(self) -> None:
        self.accuracy = _figure("global model", "accuracy / loss")
        self.clients = _figure("per-client training loss", "train loss")
        self.traffic = _figure("bytes exchanged per round", "bytes")
        self.privacy = _figure("privacy spent", "epsilon")
        self.widget = W.VBox([W.HBox([self.accuracy, self.clients]), W.HBox([self.traffic, self.privacy])])

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
        x = rounds["round"] + 1
        _set_lines(self.accuracy, {m: (x, rounds[m]) for m in ("accuracy", "loss", "client_val_accuracy")
                                   if m in rounds})
        if "train_loss" in clients:
            _set_lines(self.clients, {str(c): (g["round"] + 1, g["train_loss"])
                                      for c, g in clients.groupby("client", sort=False)})
        _set_lines(self.traffic, {m: (x, rounds[m]) for m in ("bytes_down", "bytes_up") if m in rounds})
        eps = [m for m in rounds.columns if m.startswith("epsilon")]
        _set_lines(self.privacy, {m: (x, rounds[m]) for m in eps})


def _set_lines(fig: go.FigureWidget, lines: dict[str, tuple[Any, Any]]) -> None:
    """Make ``fig`` show exactly ``lines`` ({name: (x, y)}), updating traces in place."""
    with fig.batch_update():
        names = [t.name for t in fig.data]
        if names != list(lines):
            fig.data = ()
            for name, (x, y) in lines.items():
                fig.add_scatter(x=list(x), y=list(y), mode="lines+markers", name=name)
        else:
            for trace, (x, y) in zip(fig.data, lines.values()):
                trace.x, trace.y = list(x), list(y)


class ComparisonView:
    """The global accuracy of finished runs, overlaid: one line per run."""

    def __init__(self, metric: str = "accuracy") -> None:
        self.metric = metric
        self.figure = _figure(f"finished runs: global {metric}", metric)
        self.runs: dict[str, Run] = {}
        clear = W.Button(description="Clear", icon="trash", layout=W.Layout(width="100px"))
        clear.on_click(lambda _: self.clear())
        self.widget = W.VBox([self.figure, clear])

    def add(self, label: str, run: Run) -> None:
        self.runs[label] = run
        h = run.history
        self.figure.add_scatter(x=[r.round + 1 for r in h], y=h.series(self.metric), mode="lines+markers", name=label)

    def clear(self) -> None:
        self.runs.clear()
        self.figure.data = ()


class ExperimentPanel:
    """Controls for an experiment, Run and Stop buttons, a progress bar, a live dashboard and a comparison.

    Run builds ``self.settings()`` (an `Experiment`) into a simulator and starts it in the background;
    Stop aborts it at the next batch. Each finished run is added to the comparison view.
    """

    def __init__(self, **defaults: Any) -> None:
        d = Experiment(**{"partition": "dirichlet", "rounds": 20, **defaults})
        style = {"description_width": "110px"}
        self.dataset = W.Dropdown(options=list(DATASETS), value=d.dataset, description="dataset", style=style)
        self.clients = W.IntSlider(value=d.clients, min=2, max=50, description="clients", style=style)
        self.partition = W.Dropdown(options=list(PARTITIONS), value=d.partition, description="partition", style=style)
        self.alpha = W.FloatLogSlider(value=d.alpha, base=10, min=-2, max=2, step=0.1, description="alpha", style=style)
        self.algorithm = W.Dropdown(options=list(ALGORITHMS), value=d.algorithm, description="algorithm", style=style)
        self.mu = W.FloatLogSlider(value=d.mu, base=10, min=-4, max=0, step=0.25, description="FedProx mu", style=style)
        self.rounds = W.IntSlider(value=d.rounds, min=1, max=200, description="rounds", style=style)
        self.local_epochs = W.IntSlider(value=d.local_epochs, min=1, max=20, description="local epochs", style=style)
        self.lr = W.FloatLogSlider(value=d.lr, base=10, min=-4, max=0, step=0.1, description="lr", style=style)
        self.seed = W.IntText(value=d.seed, description="seed", style=style)
        self._base = d
        self.run_button = W.Button(description="Run", button_style="success", icon="play")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.progress = W.IntProgress(value=0, min=0, max=d.rounds, description="rounds")
        self.status = W.HTML("ready")
        self.dashboard = Dashboard()
        self.comparison = ComparisonView()
        self.run: Run | None = None
        self._watcher: threading.Thread | None = None
        self.run_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        controls = W.VBox([self.dataset, self.clients, self.partition, self.alpha, self.algorithm, self.mu,
                           self.rounds, self.local_epochs, self.lr, self.seed])
        buttons = W.VBox([W.HBox([self.run_button, self.stop_button]), self.progress, self.status])
        self.widget = W.VBox([W.HBox([controls, buttons]),
                              W.Tab(children=[self.dashboard.widget, self.comparison.widget],
                                    titles=("live run", "comparison"))])

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)

    def settings(self) -> Experiment:
        """The experiment the controls describe (a plain object: run it in a cell with ``.simulator().run()``)."""
        return dataclasses.replace(
            self._base, dataset=self.dataset.value, clients=self.clients.value, partition=self.partition.value,
            alpha=self.alpha.value, algorithm=self.algorithm.value, mu=self.mu.value, rounds=self.rounds.value,
            local_epochs=self.local_epochs.value, lr=self.lr.value, seed=self.seed.value)

    def label(self) -> str:
        s = self.settings()
        skew = f" a={s.alpha:.2g}" if s.partition in ("dirichlet", "quantity") else ""
        return f"{s.algorithm} {s.partition}{skew} E={s.local_epochs} lr={s.lr:.2g} #{len(self.comparison.runs) + 1}"

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
        self.progress.max, self.progress.value = settings.rounds, 0
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
        self.progress.value = record.round + 1
        if self.run is not None:
            self.dashboard.update(self.run.history)

    def _finish(self, run: Run, label: str) -> None:
        run._done.wait()
        self.dashboard.update(run.history)
        acc = run.history.last("accuracy")
        if run.status == "failed":
            self.status.value = f"<b>failed</b>: {type(run.error).__name__}: {run.error}"
        else:
            self.status.value = f"{run.status}: {label}, {len(run.history)} rounds, accuracy {acc:.4f}"
            if len(run.history):
                self.comparison.add(label, run)
        self.run_button.disabled, self.stop_button.disabled = False, True
