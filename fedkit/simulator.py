"""Wire a server, its clients and an engine together, and run a workflow in this process.

>>> import fedkit as fk
>>> data = fk.data.load("digits")
>>> sim = fk.Simulator(fk.FedAvg(rounds=2), model=lambda: fk.models.for_data(data),
...                    clients=fk.data.iid(data.train, clients=4), test=data.test)
>>> run = sim.run(progress=False)
>>> run.status, len(run.history)
('done', 2)

``run()`` blocks; ``start()`` runs in a background thread and returns the same `Run` at once,
with live ``history``, ``status``, ``abort()`` and ``wait()``. Ctrl-C (Kernel > Interrupt) during ``run()``
checkpoints the run (with ``out``) and raises `RunInterrupted`, a KeyboardInterrupt: the cell stops.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import numbers
import os
import queue
import threading
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from . import checkpoint, metrics as M, plots
from .metrics import ACCURACY, LOSS
from . import rundir
from . import weights as W
from .checkpoint import CheckpointError
from .client import Client, derive_seed
from .data import ClientData, Dataset, check_dataset, check_seed
from .engine import Engine, sequential
from .engine.choose import resolve as resolve_engine
from .errors import ConfigError, ConfigWarning, refusal
from .exchange import Aborted, ExecutorLike, Filter, Signal, Weights
from .faults import Faults
from .global_model import GlobalModel, PlainModel
from .history import LOG, History, HistoryLog, RoundRecord, strict, write_atomic
from .models import architecture
from .preprocess import Standardize
from .progress import bar as progress_bar
from .privacy.ckks import STATE_KEY
from .privacy.he_filters import decrypt_global, provision
from .privacy.he_model import EncryptedModel
from .server import Channel, Controller, Server, ServerContext
from .stats import StatsExecutor
from .train import Evaluator, ModelFn, SubmitModel, TrainConfig, Trainer, evaluate, load_weights, resolve_device
from .workflows import Cyclic, FedAvg, FedStats, FederatedScaling

ClientsLike = Sequence[Dataset] | Sequence[ClientData] | Sequence[Client]

# threads="auto": one torch CPU thread for a model smaller than this (parameters). Such models train in tiny
# matrix products (batches of 16-64) where splitting work over threads saves nothing, and a thread pool on a busy
# (shared, oversubscribed) machine can collapse: 5 rounds of the digits MLP (~5k parameters) were seen to take
# 122 s with torch's default threads on a busy 2-core machine against 3 s with one. benchmarks/threads.py measures
# it: one thread is as fast idle (ratio ~1.0) and faster under contention (~1.1-1.5x on 2 cores). At ~1M
# parameters (a CNN on 32x32 images, wide MLPs) the products are large enough for several threads to pay off.
AUTO_ONE_THREAD_BELOW = 1_000_000

RESUMABLE = ("engine",)
"""Settings in config.json that a resume may change (with a warning): not in the fingerprint. The engine changes how
a round's work runs, not what it computes (engines agree to float rounding), and a run may continue on a machine
without the engine it began with (Ray, a GPU)."""


def check_threads(threads: Any, what: str = "threads") -> str | int:
    """``"auto"`` or a whole number >= 1 (torch's CPU threads for the run); `ConfigError` otherwise."""
    if threads == "auto" and isinstance(threads, str):
        return threads
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise refusal(what, "must be 'auto' or a whole number >= 1 (torch's CPU threads)", threads)
    return int(threads)


def resolve_threads(threads: str | int, model: nn.Module, device: torch.device) -> int:
    """The torch CPU threads a run uses: ``threads`` itself, or for ``"auto"`` one thread for a model under
    `AUTO_ONE_THREAD_BELOW` parameters on the CPU, else torch's current setting (its default: the cores)."""
    if threads != "auto":
        return int(threads)
    size = sum(p.numel() for p in model.parameters())
    return 1 if device.type == "cpu" and size < AUTO_ONE_THREAD_BELOW else torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int):
    """Set torch's CPU threads to ``n`` for the block, and restore the previous value after.

    ``torch.set_num_threads`` is process-wide: while a run goes, all of the process's torch work (another run
    started with ``start()``, a cell running meanwhile) uses ``n`` threads; two runs at once with different
    settings leave whichever ended last's "previous" value behind.
    """
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


class Run:
    """One execution of a workflow: its status, live history and global weights.

    ``status`` is one of ``"pending"``, ``"running"``, ``"done"``, ``"aborted"`` or ``"failed"``.
    """

    def __init__(self, simulator: "Simulator") -> None:
        self.simulator = simulator
        self.status = "pending"
        self.history = History()
        self._weights: Weights = {}
        self._live: Callable[[], Weights] | None = None  # while running: how to read the current global model
        self._live_round = -1
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.run_dir: Path | None = Path(simulator.out) if simulator.out else None
        self.signal = Signal()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._interrupted = False  # ended by Ctrl-C (KeyboardInterrupt), not by abort(): run()/resume() re-raise it

    def __repr__(self) -> str:
        s = self.summary() if self.weights else {"final_accuracy": float("nan"), "accuracy_on": "none"}
        where = " (on clients)" if s["accuracy_on"].startswith("clients") else ""
        planned = self.rounds_planned
        done = f"{len(self.history)} of {planned} round(s)" if planned else f"{len(self.history)} round(s)"
        if self.status in ("aborted", "failed"):
            done = f"INCOMPLETE, {done}"
        return f"<fedkit Run {self.status}: {done}, accuracy {s['final_accuracy']:.4f}{where}>"

    @property
    def rounds_planned(self) -> int | None:
        """The rounds the workflow was to run (None for a workflow without a round count)."""
        rounds = getattr(self.simulator.workflow, "rounds", None)
        return rounds if isinstance(rounds, int) else None

    @property
    def complete(self) -> bool:
        """Did the run end on its own (``done``)? An aborted or failed run is a partial result, never a final one."""
        return self.status == "done"

    def abort(self, reason: str = "aborted by the user") -> None:
        """Ask the run to stop: training stops at the next batch, and a client blocked inside its executor is
        left behind at once; the last completed global model is kept. A workflow's ``control_flow`` that sends no
        task meanwhile gets `ABORT_GRACE` seconds to end; then the run ends without it (warning that its thread
        keeps running)."""
        self.signal.trigger(reason)

    def wait(self, timeout: float | None = None) -> "Run":
        """Block until the run ends (or ``timeout`` seconds pass); re-raise its error if it failed."""
        self._done.wait(timeout)
        if self.status == "failed" and self.error is not None:
            raise self.error
        return self

    @property
    def weights(self) -> Weights:
        """The global model's weights: the last completed round's while running, the final ones after.

        With HE a client decrypts them, so they are read lazily (once per round, when asked for)
        rather than decrypted on every round whether anyone looks or not.
        """
        if self._live is not None and self._live_round != len(self.history):
            self._live_round = len(self.history)
            self._weights = self._live()
        return self._weights

    @weights.setter
    def weights(self, value: Weights) -> None:
        self._weights, self._live = value, None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def model_sha256(self) -> str:
        return W.sha256(self.weights)

    def model(self) -> nn.Module:
        """A fresh model instance holding the current global weights."""
        m = self.simulator.model_fn()
        load_weights(m, self.weights)
        return m

    def summary(self) -> dict[str, Any]:
        """The headline numbers, as the CLI prints them with ``--json``.

        ``epsilon`` is DP-FedAvg's user-level epsilon, ``client_epsilon`` the largest example-level
        (DP-SGD) epsilon of any client, ``delta`` theirs (None when the run is not private);
        ``stopped`` says why a run ended before its last round (e.g. its privacy budget), else None.
        ``complete`` is False unless the run is ``done``: an aborted (interrupted) or failed run's numbers are those
        of its last completed round (``rounds`` of ``rounds_planned``), not a final result.
        """
        failures = [e for e in self.history.events if "client" in e]
        last = self.history.rounds[-1].metrics if len(self.history) else {}
        accuracy, loss, where = M.scored(last)  # with HE only the clients can score the model
        return {
            "status": self.status,
            "complete": self.complete,
            "rounds_planned": self.rounds_planned,
            "final_accuracy": self.history.last(accuracy),
            "final_loss": self.history.last(loss),
            "accuracy_on": where,
            "rounds": len(self.history),
            "seconds": round(self.seconds, 3),
            "threads": self.simulator.threads,  # torch CPU threads: part of the result (model_sha256 depends on it)
            "engine": self.simulator.engine_name,
            "model_sha256": self.model_sha256,
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "failures": len(failures),
            "failures_by_kind": dict(Counter(e["what"] for e in failures)),
            "error": f"{type(self.error).__name__}: {self.error}" if self.error else None,
            **_privacy(self.history),
            "stopped": next((e["reason"] for e in self.history.events if e.get("what") == "stopped"), None),
        }

    def save(self, directory: str | Path | None = None) -> Path:
        """Write history (JSON, CSV), final model (``model.pt``), summary and ``plot.html`` into ``directory``.

        The JSON files are strict JSON: a number that is NaN or infinite (an accuracy never measured) is ``null``.
        """
        directory = Path(directory or self.run_dir or "runs/latest")
        directory.mkdir(parents=True, exist_ok=True)
        self.history.save(directory)
        torch.save(self.weights, directory / "model.pt")
        (directory / "config.json").write_text(_strict_json(self.simulator.describe()))
        if len(self.history):
            write_html(self.figure(), directory / "plot.html", js_folder=directory.parent)
        _write_summary(self, directory)  # last: a summary that says "done" comes after everything it sums up
        self.run_dir = directory
        return directory

    def figure(self):
        """The run's plot (``plot.html``): the global model's accuracy and loss per round (loss on the right axis),
        titled with the run's context (workflow, data, clients, rounds done of planned, status)."""
        s = self.summary()
        names = M.reported(r.metrics for r in self.history)
        accuracy, loss, _ = M.scored(names)
        sim = self.simulator
        context = sim.title or f"{_workflow_label(sim.workflow)}, {len(sim.clients)} clients"
        done = f"{len(self.history)}" + (f" of {self.rounds_planned}" if self.rounds_planned else "") + " rounds"
        status = "" if self.complete else f" ({self.status.upper()}, incomplete)"
        fig = plots.curves({"accuracy": self}, metric=ACCURACY,
                           title=f"{context}: {done}{status}, final accuracy {s['final_accuracy']:.4f}")
        lines = plots.curves({"loss": self}, metric=LOSS).data if loss in names else ()
        for trace in lines:
            trace.update(yaxis="y2", line={"dash": "dot"})
            fig.add_trace(trace)
        if lines:
            fig.update_layout(yaxis_title=accuracy, yaxis2={"title": loss, "overlaying": "y", "side": "right",
                                                            "showgrid": False}, legend_title_text="")
        return fig


class RunExited(RuntimeError):
    """The run's code (an executor, a ``control_flow``, a listener) raised a BaseException that is neither an
    Exception nor a KeyboardInterrupt (``sys.exit()``'s SystemExit, a GeneratorExit...): the run failed with it as
    ``__cause__``, rather than letting it end the run's thread with the run left ``running`` (or exit the caller)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"the run's code raised {type(error).__name__}({', '.join(map(repr, error.args))}), which ends "
                         "the run: a client's executor, a workflow's control_flow or a listener must raise an Exception "
                         "(or return) instead")
        self.__cause__ = error


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (Kernel > Interrupt) stopped a blocking run: raised by `Simulator.run` / `resume` (and `fk.compare`)
    after the run was recorded as ``aborted`` and, with ``out``, checkpointed. ``run`` is that partial `Run`
    (also ``simulator.last_run``); it is a KeyboardInterrupt, so a cell, a loop or a script stops."""

    def __init__(self, run: "Run") -> None:
        where = f"; continue it with Simulator.resume() from {run.run_dir}" if run.run_dir is not None else ""
        super().__init__(f"interrupted after {len(run.history)} of {run.rounds_planned or '?'} round(s): the run is "
                         f"aborted, not finished (the exception's .run and simulator.last_run hold it{where})")
        self.run = run
        self.runs: dict[str, Run] = {}  # fk.compare: the runs so far, this one last


def _differing(saved: Path, sim: "Simulator") -> str:
    """Which of the settings in ``saved`` (a run's config.json) ``sim`` does not share, in words."""
    try:
        before = json.loads(saved.read_text())
        now = json.loads(_strict_json(sim.describe()))
        keys = [k for k in sorted(set(before) | set(now)) if k not in RESUMABLE and before.get(k) != now.get(k)]
    except (OSError, ValueError, AttributeError):
        keys = []
    if not keys:
        return "workflow, training, data split, model, seed or threads differ"
    return "these differ: " + ", ".join(_one_difference(k, before, now) for k in keys)


def _one_difference(key: str, before: dict[str, Any], now: dict[str, Any]) -> str:
    """A setting of config.json that differs, in words: its name, and for threads and the model, how."""
    if key == "threads":
        return f"threads {before.get('threads')} then, {now.get('threads')} now"
    if key == "model":
        return f"the model ({_model_difference(before.get('model'), now['model'])})"
    return key


def _model_difference(then: Any, now: dict[str, Any]) -> str:
    """How the `fedkit.models.architecture` of a run's model (``then``, from its config.json) differs from ``now``."""
    if not isinstance(then, dict) or not isinstance(then.get("forward"), dict):
        return "not recorded by the fedkit that started the run, so this version cannot tell it is the same"
    a, b = str(then.get("modules")).splitlines(), now["modules"].splitlines()
    if a != b:  # the first line that differs (a layer, its size, an activation module)
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        first = [repr(lines[i].strip()) if i < len(lines) else "nothing" for lines in (a, b)]
        return f"its modules: {first[0]} then, {first[1]} now"
    classes = sorted(k for k in set(then["forward"]) | set(now["forward"]) if then["forward"].get(k) != now["forward"].get(k))
    unread = [k for k in classes if None in (then["forward"].get(k), now["forward"].get(k))]
    return (f"the code of {', '.join(c + '.forward' for c in classes)}"
            + (f"; the source of {', '.join(unread)} could not be read then or now" if unread else ""))


def _engine_change(saved: Path, sim: "Simulator") -> ConfigWarning | None:
    """What a resume should say when ``sim``'s engine is not the one the run in ``saved`` (its config.json) used."""
    try:
        before = json.loads(saved.read_text()).get("engine")
    except (OSError, ValueError, AttributeError):
        return None
    if before is None or before == sim.engine_name:
        return None
    return ConfigWarning(f"the run in {saved.parent} ran on engine {before!r} and resumes on {sim.engine_name!r}: the "
                         "rounds from here run on another engine, so the final weights can differ from an uninterrupted "
                         "run's in the last bits (engines agree to float rounding, not bit for bit) and its model_sha256 "
                         f"will not match; resume with {{engine={before!r}}} to get the same bits", obj=sim)


def _workflow_label(workflow: Controller) -> str:
    """``FedAvg``, ``FedAvg + Proximal(mu=0.1)``, ``FedAvg + Adam server`` ...: what a plot's title says of a workflow."""
    parts = [type(workflow).__name__]
    opt = getattr(workflow, "server_opt", None)
    if opt is not None:
        parts.append(f"{type(opt).__name__} server")
    parts += [repr(e) for e in getattr(workflow, "extensions", ())]
    return " + ".join(parts)


def shared_plotlyjs(folder: str | Path) -> Path:
    """``folder/plotly.min.js`` (4.8 MB), written once and shared by the plots of the run directories in ``folder``
    (``runs/``, or a comparison's folder), instead of a copy in every run directory."""
    from plotly.offline import get_plotlyjs

    path = Path(folder) / "plotly.min.js"
    js = get_plotlyjs().encode()
    if not path.is_file() or path.stat().st_size != len(js):  # missing, or of another plotly version
        # a temporary name of this process and thread's own: runs in several processes may share the folder
        write_atomic(path, js, tmp=path.with_name(f".plotly.min.js.{os.getpid()}.{threading.get_ident()}"))
    return path


def write_html(figure: Any, html: Path, js_folder: Path) -> None:
    """Write ``figure`` to ``html``, loading plotly.js from the shared copy in ``js_folder`` by a relative path: it
    opens offline as long as the run directory stays next to it (move ``js_folder`` whole). Where ``js_folder``
    cannot be written, ``html``'s own folder gets a copy."""
    try:
        js = shared_plotlyjs(js_folder)
    except OSError:
        js = shared_plotlyjs(html.parent)
    page = figure.to_html(include_plotlyjs=os.path.relpath(js, html.parent).replace(os.sep, "/"))
    write_atomic(html, page.encode("utf-8"))


class SaveError(RuntimeError):
    """A run whose results could not be written into its run directory."""


class IncompleteRun(RuntimeError):
    """A workflow whose ``control_flow`` returned without running the rounds it plans (and without saying why)."""


def _check_rounds_run(workflow: Controller, history: History) -> None:
    """Refuse to call a run done unless its workflow ran the rounds it plans, or recorded why it stopped early
    (a ``stopped`` event, e.g. a spent privacy budget)."""
    planned, done = getattr(workflow, "rounds", None), len(history)
    if not isinstance(planned, int) or done == planned:
        return
    if done < planned and any(e.get("what") == "stopped" for e in history.events):
        return
    raise IncompleteRun(f"{type(workflow).__name__} plans {planned} round(s) but its control_flow returned after "
                        f"{done}: the run is not complete. A controller calls fl.end_round once per round, and one "
                        "that ends early on purpose says why with fl.event(round, 'stopped', reason=...)")


def _strict_json(obj: Any) -> str:
    """Indented strict JSON: NaN and infinities as null, unknown objects as their text."""
    return json.dumps(strict(obj), indent=1, allow_nan=False)


# what a run writes into its directory: name -> is it a folder
_RUN_DIR_ENTRIES = {"model.pt": False, "summary.json": False, "config.json": False, "history.json": False, LOG: False,
                    "rounds.csv": False, "clients.csv": False, "plot.html": False, "plotly.min.js": False,
                    "checkpoints": True}


def _check_run_dir(path: Path) -> None:
    """Refuse, before the first round, a run directory the run could not write its results into."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        if existing == path:
            raise ConfigError(f"{{out={str(path)!r}}} is a file, not a directory; a run writes several files (model.pt, "
                              "history, checkpoints) into its directory. Give the path of a directory (it is created "
                              "if missing), or move the file away.", field="out")
        raise ConfigError(f"{{out={str(path)!r}}} cannot be created: {existing} is a file, not a directory. Give a path "
                          "whose parents are directories (or do not exist yet).", field="out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".fedkit-write-test-{threading.get_ident()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{{out={str(path)!r}}} cannot be written to ({e.strerror or e}); give a directory you can "
                          "write into, or fix its permissions", field="out") from None
    for name, folder in _RUN_DIR_ENTRIES.items():
        p = path / name
        if (p.exists() or p.is_symlink()) and p.is_dir() != folder:
            raise ConfigError(f"{p} is {'a file' if folder else 'a directory'}, but the run writes its "
                              f"{'checkpoints into a directory' if folder else 'file ' + repr(name)} there; remove or "
                              "rename it, or give another {out}", field="out")
        if p.is_file() and not os.access(p, os.W_OK):
            raise ConfigError(f"{p} is read-only, and the run writes its {name!r} there; make it writable, remove it, "
                              "or give another {out}", field="out")


def _save_failed(run: "Run", error: BaseException) -> None:
    """Saving a run at its end failed: the run fails (with a run's own error kept first), and says so."""
    reason = f"{type(error).__name__}: {error}"
    run.history.events.append({"round": len(run.history), "what": "save_failed",
                               "reason": f"saving the run into {run.run_dir} failed: {reason}"})
    if run.status != "failed":
        ended = "finished its rounds" if run.status == "done" else "was aborted"
        run.error = SaveError(f"the run {ended}, but its results could not be saved into {run.run_dir} ({reason}). "
                              "run.weights and run.history still hold them: run.save(another_directory) writes them "
                              "elsewhere")
        run.error.__cause__ = error
        run.status = "failed"
    with contextlib.suppress(Exception):  # the summary says so, where the disk has room for it
        _write_summary(run, run.run_dir)


def _write_summary(run: "Run", directory: Path) -> None:
    """``directory/summary.json``: the run's summary, replaced whole or not at all."""
    write_atomic(directory / "summary.json", _strict_json({**run.summary(), "run_dir": str(directory)}).encode())


def _privacy(history: History) -> dict[str, float | None]:
    """The privacy a run has spent so far, from its history (None where it recorded none)."""
    def last(key: str) -> float | None:
        v = history.last(key)
        return None if math.isnan(v) else v

    delta = last(M.DELTA)
    if delta is None:  # DP-SGD only: the clients report their delta in their rows
        deltas = [row[M.DELTA] for r in history for row in r.clients.values() if M.DELTA in row]
        delta = max(deltas) if deltas else None
    return {M.EPSILON: last(M.EPSILON), M.CLIENT_EPSILON: last(M.CLIENT_EPSILON), M.DELTA: delta}


def _as_model_fn(model: ModelFn | nn.Module) -> ModelFn:
    if isinstance(model, nn.Module):
        template = copy.deepcopy(model)
        return lambda: copy.deepcopy(template)
    if not callable(model) or isinstance(model, type) and not issubclass(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module or a function that builds one, got {type(model).__name__}")
    try:
        inspect.signature(model).bind()
    except TypeError:
        raise ConfigError(f"model must be a function of no arguments that builds an nn.Module (e.g. lambda: "
                          f"fk.models.MLP(64, 10)); {getattr(model, '__name__', model)!r} needs arguments") from None
    except ValueError:  # a builtin without a signature: calling it tells
        pass
    return model


def _build(model_fn: ModelFn) -> nn.Module:
    """One model from ``model_fn``, refused unless it is an nn.Module with parameters to train."""
    try:
        model = model_fn()
    except Exception as e:
        raise ConfigError(f"building the model failed: model() raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must build an nn.Module, but model() returned {model!r:.80} (of type {type(model).__name__})")
    if next(model.parameters(), None) is None:
        raise ConfigError(f"model() built a {type(model).__name__} without parameters: there is nothing to train or "
                          "average; give a model with at least one parameter")
    return model


def _check_new_each_call(model_fn: ModelFn, probe: nn.Module) -> None:
    """Refuse a builder that hands out one instance every time: clients would train, and the server score, one
    shared model, so runs would differ and a resume be refused for a model that changed under it."""
    if model_fn() is probe:
        raise ConfigError(f"model() returned the same {type(probe).__name__} instance twice; return a new model each "
                          "call, e.g. lambda: Net() (or pass the instance itself, model=net, which is copied)")


def _check_rounds(workflow: Controller) -> None:
    """Refuse a workflow whose ``rounds`` is not a whole number: the rounds it plans, >= 1 (0 for a workflow that
    records no round, such as FedStats); a workflow without ``rounds`` plans no count."""
    rounds = getattr(workflow, "rounds", None)
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0):
        raise ConfigError("{rounds} must be a whole number >= 1 (the rounds it runs; 0 for one that records none)",
                          obj=workflow, field="rounds", value=rounds)


def _check_client_data(name: str, data: ClientData, val_fraction: float | None = None) -> None:
    """Refuse, naming client ``name``, an empty training split and labels or features a model cannot learn from
    (`fedkit.data.check_dataset`); ``val_fraction``: the split the simulator made, named in the hint."""
    for part, d in (("training", data.train), ("validation", data.val)):
        if isinstance(d, Dataset):
            check_dataset(d, f"{name}'s {part} split")
    if isinstance(data.train, Dataset) and len(data.train) == 0:
        held = len(data.val) if isinstance(data.val, Dataset) else 0
        why = (f"val_fraction={val_fraction:g} holds out all {held} of its samples for validation; lower val_fraction "
               "or give it more data" if val_fraction is not None else
               "its ClientData has an empty train set; give it training samples or leave it out of the federation")
        raise ConfigError(f"{name} has no training samples, so it would take part in every round with 0 samples: {why}")


def _check_fits(model: nn.Module, test: Dataset, clients: Sequence[Client]) -> None:
    """Run ``model`` once on one client example and one test example; refuse a test set it cannot score.

    Done when the simulator is built, so a test set of the wrong shape fails now, not after a round of training.
    """
    data = [getattr(getattr(c, "data", None), "train", None) for c in clients]
    client = next((d for d in data if isinstance(d, Dataset) and len(d) > 0), None)
    shape_of = lambda d: tuple(d.x.shape[1:])  # noqa: E731
    shapes = f"test examples have shape {shape_of(test)}" + (f", the clients' {shape_of(client)}" if client else "")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for what, d in (("a client's", client), ("the test set's", test)):
            if d is None or len(d) == 0:
                continue
            try:
                with torch.no_grad():
                    out = model(d.x[:1].to(device))
            except Exception as e:
                raise ConfigError(f"the model cannot take {what} examples ({shapes}): on one example it raised "
                                  f"{type(e).__name__}: {e}") from None
            if d is test:
                top = int(test.y.max()) if len(test) else -1
                if not (isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == 1 and out.shape[1] > top):
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ConfigError(f"the model cannot score the test set ({shapes}): on one test example it gives "
                                      f"{got}, but scoring needs one score per class, shape (1, >= {top + 1}) for the "
                                      f"test labels 0..{top}")
    finally:
        model.train(was_training)


class Simulator:
    """A whole federation in this process: one server running ``workflow`` and one client per data part.

    ``clients`` may be a `Partition` (or any list of `Dataset`s), a list of `ClientData`, or ready
    `Client` objects. Dataset clients get the standard `Trainer` (``train`` task) and `Evaluator`
    (``validate`` task), `SubmitModel` (``submit_model``), `StatsExecutor` (``stats_range``, ``stats``)
    and `Standardize` (``standardize``), and keep ``val_fraction`` of their data to validate the global model;
    ``executors`` adds to or replaces those by task name (``executors={"train": MyTrainer(...)}``).
    ``client_result_filters`` are attached, in order, to those clients' results (e.g. DP's
    `fedkit.privacy.dp.ClipUpdate`); an encryption filter always comes last.

    ``engine`` runs the clients' work: ``"sequential"`` (one client after another), ``"vectorized"`` (the
    clients of a round that use the standard trainer train together, stacked along a client axis),
    ``"auto"`` (vectorized where it applies), ``"ray"`` (Ray tasks, `fedkit.engine.ray`), or an engine
    object. Sequential and Ray give the same bits; vectorized the same numbers to float rounding.

    The simulator plays FLARE's provisioning role: when the workflow asks for HE (``he=CKKS()``), it
    makes the keys, gives the secret context to the clients and the server an encrypted model built
    with the public context only. The controller then runs in a thread of its own and reaches the
    clients only through the server's task board and a `fedkit.server.Channel` of names: nothing the
    server or the controller can reach holds a client object or a secret key.

    With ``out``, a run (or a resume) holds an OS lock on that directory while it runs (`fedkit.rundir`):
    a second run there is refused, naming the holder. A new run refuses a directory that holds a run
    already (a checkpoint or a summary) unless ``overwrite=True``. Before the first round the workflow
    checks its settings against the clients (``check_federation``: clients per round, Krum's f...).
    """

    def __init__(self, workflow: Controller, model: ModelFn | nn.Module, clients: ClientsLike,
                 test: Dataset | None = None, train: TrainConfig = TrainConfig(), *, seed: int = 0,
                 device: str | torch.device = "auto", out: str | Path | None = None, val_fraction: float = 0.1,
                 engine: Engine | str = "sequential", server_filters: Sequence[Filter] = (),
                 server_result_filters: Sequence[Filter] = (), client_result_filters: Sequence[Filter] = (),
                 faults: Faults | None = None, executors: Mapping[str, ExecutorLike] | None = None,
                 checkpoint_every: int = 1, on_round: Sequence[Callable[[RoundRecord], None]] = (),
                 overwrite: bool = False, threads: str | int = "auto") -> None:
        if not isinstance(workflow, Controller):
            raise ConfigError(f"workflow must be a Controller such as fk.FedAvg(...), got {type(workflow).__name__}")
        _check_rounds(workflow)
        if not isinstance(train, TrainConfig):
            raise ConfigError(f"train must be a fk.TrainConfig, got {type(train).__name__}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
        if isinstance(clients, (Dataset, ClientData, Client)):
            raise ConfigError(f"clients must be a list of clients' data, got one {type(clients).__name__}; split a dataset "
                              "over clients first, e.g. clients=fk.data.iid(dataset, clients=4)")
        if isinstance(clients, (str, bytes, Mapping)) or not isinstance(clients, Iterable) or not hasattr(clients, "__len__"):
            raise ConfigError(f"clients must be a list of Datasets (e.g. a fk.data partition), ClientData or fk.Client "
                              f"objects, got {type(clients).__name__}")
        if len(clients) == 0:
            raise ConfigError("a federation needs at least one client; clients is empty")
        if test is not None and not isinstance(test, Dataset):
            raise ConfigError(f"test must be a fk.data.Dataset (e.g. data.test) or None, got {type(test).__name__}")
        seed = check_seed(seed, "Simulator.seed")
        if out is not None and not isinstance(out, (str, os.PathLike)):
            raise ConfigError(f"out must be a directory path (str or Path) or None, got {type(out).__name__}")
        if faults is not None and not isinstance(faults, Faults):
            raise ConfigError(f"faults must be a fk.Faults(...), got {type(faults).__name__}")
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be an integer >= 1 (rounds), got {checkpoint_every!r}")
        engine, self.engine_name = resolve_engine(engine)  # a name ("auto", "vectorized", ...) or an engine
        for name, value in (("server_filters", server_filters), ("server_result_filters", server_result_filters),
                            ("client_result_filters", client_result_filters), ("on_round", on_round)):
            if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
                raise ConfigError(f"{name} must be a list, got {type(value).__name__}")
        if not all(callable(f) for f in on_round):
            raise ConfigError(f"on_round must be a list of functions of a RoundRecord, got {list(on_round)!r:.80}")
        if executors is not None and not isinstance(executors, Mapping):
            raise ConfigError(f"executors must map task names to executors (a dict), got {type(executors).__name__}")
        executors = dict(executors or {})
        bad = [name for name, ex in executors.items() if not isinstance(name, str) or not callable(getattr(ex, "execute", ex))]
        if bad:
            raise ConfigError(f"executors maps task names to executors (objects with execute(task, ctx, abort) or such "
                              f"functions); these entries are neither: {bad}")
        self.workflow = workflow
        self.model_fn = _as_model_fn(model)
        self.test = test
        self.train = train
        self.seed = int(seed)
        self.device = resolve_device(device)
        self.out = out
        self.val_fraction = val_fraction
        self.engine = engine
        self.server_filters = list(server_filters)
        self.server_result_filters = list(server_result_filters)
        self.client_result_filters = list(client_result_filters)
        self.faults = faults
        self.executors = executors
        self.checkpoint_every = checkpoint_every
        self.on_round = list(on_round)
        if not isinstance(overwrite, bool):
            raise ConfigError("{overwrite} must be True or False", field="overwrite", value=overwrite)
        self.overwrite = overwrite  # may a new run replace the run in `out`? (else it is refused)
        threads = check_threads(threads)
        self.last_run: Run | None = None  # the latest run of run() / resume(): after Ctrl-C, the interrupted one
        self.title: str | None = None  # the run's context in its plot's title (the CLI: algorithm, data, clients)
        probe = _build(self.model_fn)
        _check_new_each_call(self.model_fn, probe)
        self._architecture = architecture(probe)  # in config.json: a resume refuses a model that computes otherwise
        self.threads = resolve_threads(threads, probe, self.device)  # torch CPU threads of every run (torch_threads)
        workflow.check_model(probe)  # fail now, with how to fix the model, not in every client's first round
        self._executors: dict[str, ExecutorLike] | None = None
        self.clients = [self._client(i, c) for i, c in enumerate(clients)]
        names = [c.name for c in self.clients]
        if len(set(names)) != len(names):
            raise ConfigError(f"client names must be unique, got {names}")
        workflow.check_population({c.name: len(c.data.train) for c in self.clients})  # e.g. DP's delta < 1/n
        if test is not None:
            check_dataset(test, "the test set")
            _check_fits(probe, test, self.clients)

    def _client(self, i: int, c: Dataset | ClientData | Client) -> Client:
        if isinstance(c, Client):
            if isinstance(c.data, ClientData):
                _check_client_data(c.name, c.data)
            return c
        split = isinstance(c, Dataset)
        if split:
            if len(c) == 0:
                raise ConfigError(f"client {i + 1} has no data")
            train, val = c.split(self.val_fraction, seed=derive_seed(self.seed, i, 2)) if len(c) > 1 else (c, c.subset([]))
            c = ClientData(train, val)
        if not isinstance(c, ClientData):
            raise ConfigError(f"clients[{i}] is a {type(c).__name__}; give Datasets (e.g. a fk.data partition), "
                              "ClientData or fk.Client objects")
        if self._executors is None:  # one set shared by every client: they keep nothing of a client's own
            stats = StatsExecutor()
            self._executors = {"train": Trainer(self.model_fn, self.train), "validate": Evaluator(self.model_fn),
                               "submit_model": SubmitModel(), "stats_range": stats, "stats": stats,
                               "standardize": Standardize(), **self.executors}
        name = f"site-{i + 1}"
        _check_client_data(name, c, self.val_fraction if split else None)
        return Client(name, c, dict(self._executors), result_filters=list(self.client_result_filters))

    def describe(self) -> dict[str, Any]:
        """The settings of this simulator, as saved in ``config.json`` (the same in every process)."""
        return {"workflow": _describe(self.workflow), "train": _describe(self.train), "seed": self.seed,
                "clients": {c.name: [_data_digest(c.data.train), _data_digest(c.data.val)] for c in self.clients},
                "val_fraction": self.val_fraction, "faults": _describe(self.faults), "threads": self.threads,
                "client_result_filters": _describe(self.client_result_filters),
                **({"executors": _describe(self.executors)} if self.executors else {}),
                "model": self._architecture, "engine": self.engine_name}

    def fingerprint(self) -> str:
        """A hash of the settings (but those a resume may change, `RESUMABLE`) and initial weights: a checkpoint
        resumes only under the same fingerprint."""
        settings = {k: v for k, v in self.describe().items() if k not in RESUMABLE}
        blob = json.dumps(settings, sort_keys=True, default=str) + W.sha256(self.initial_weights())
        return hashlib.sha256(blob.encode()).hexdigest()

    def initial_weights(self) -> Weights:
        """The global model's starting weights: built from ``model`` under the run's seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return W.clone(self.model_fn().state_dict())

    def run(self, progress: bool = True, desc: str = "rounds") -> Run:
        """Run the workflow to the end in this thread and return the finished `Run`.

        Interrupting the kernel (Ctrl-C) stops at the next batch, records the run as ``aborted`` (with ``out`` set,
        its last completed round is checkpointed and `resume` continues it) and then raises `RunInterrupted` (a
        KeyboardInterrupt), so the cell, a loop or `fk.compare` stops too; the partial run is the exception's
        ``.run`` and ``self.last_run``. ``Run.abort()`` (a Stop button) ends a run as ``aborted`` without raising.
        A directory that holds a run already is refused unless ``overwrite=True``, and so is one that
        another run is writing into (`fedkit.rundir`).
        """
        lock = self._claim(self.out, fresh=True)
        try:
            run = Run(self)
            run._rundir_lock = lock
            return self._blocking(run, None, progress, desc)
        finally:
            if lock is not None:
                lock.release()

    def start(self) -> Run:
        """Start the workflow in a background thread; returns the `Run` handle at once (Ctrl-C does not reach it:
        stop it with ``run.abort()``)."""
        run = Run(self)
        lock = run._rundir_lock = self._claim(run.run_dir, fresh=True)  # released by the run's thread when it ends
        try:
            if run.run_dir is not None:
                _check_run_dir(run.run_dir)  # refused here and now, not in the background thread
            run._thread = threading.Thread(target=self._execute, args=(run,), name="fedkit-run", daemon=True)
            run.status = "running"
            run._thread.start()
        except BaseException:
            if lock is not None:
                lock.release(undo=True)
            raise
        return run

    def resume(self, run_dir: str | Path | None = None, progress: bool = True) -> Run:
        """Continue the run checkpointed in ``run_dir`` (default: ``out``) to the end, in this thread.

        The simulator must have the settings the run was started with (same workflow, data, model and
        seed; the model as `fedkit.models.architecture` describes it too, so a ReLU net is not resumed as a tanh
        one); otherwise `CheckpointError` says what differs. The resumed run ends with the same weights as a run
        that was never interrupted. Another engine (`RESUMABLE`) is allowed, with a warning (also in the run's
        events) that the weights can then differ in the last bits. A checkpoint holds no code, so it is resumed
        by a simulator you build again (in the notebook, or by ``fedkit run --resume DIR`` from the saved arguments).
        Ctrl-C raises `RunInterrupted` after checkpointing, as in `run`.
        """
        run_dir = Path(run_dir or self.out or "")
        # the lock first: a resume while the run still goes is refused (the lock file goes with the lock)
        lock = self._claim(run_dir if run_dir.is_dir() else None, fresh=False)
        try:
            ckpt = checkpoint.load(run_dir)
            if ckpt.fingerprint != self.fingerprint():
                saved = run_dir / "config.json"
                raise CheckpointError(
                    f"the checkpoint in {run_dir} was written by a run with other settings ({_differing(saved, self)}; "
                    f"see {saved}); build the Simulator as it was, or start a new run"
                )
            ckpt.check_clients([c.name for c in self.clients], run_dir)
            self._check_checkpoint_model(ckpt, run_dir)
            changed = _engine_change(run_dir / "config.json", self)
            if changed is not None:  # allowed (another machine may lack the engine), but said: here and in the events
                warnings.warn(changed, stacklevel=2)
                ckpt.history.events.append({"round": ckpt.round + 1, "what": "engine_changed", "reason": str(changed)})
            run = Run(self)
            run.run_dir = run_dir
            run._rundir_lock = lock
            return self._blocking(run, ckpt, progress)
        finally:
            if lock is not None:
                lock.release()

    def _claim(self, run_dir: str | Path | None, fresh: bool) -> rundir.RunDirLock | None:
        """Before the first round: the workflow's check of this federation, then the lock of the run directory
        (None without one); ``fresh``: a new run, which must not replace a run there unless ``overwrite``."""
        self.workflow.check_federation([c.name for c in self.clients])
        if run_dir is None:
            return None
        try:
            return rundir.claim(run_dir, fresh=fresh, overwrite=self.overwrite)
        except rundir.RunExists as e:
            raise rundir.RunExists(f"out={str(e.directory)!r} holds {e.found}, and a new run there would replace it: "
                                   "continue it with Simulator.resume() if it was interrupted, give another out=, or "
                                   "build the Simulator with overwrite=True to replace it", e.directory, e.found) from None

    def _check_checkpoint_model(self, ckpt: checkpoint.Checkpoint, run_dir: Path) -> None:
        """Refuse a checkpoint whose model does not fit this simulator's (names, shapes; with HE its encrypted part)."""
        initial = self.initial_weights()
        try:
            if self.workflow.he is None:
                W.check_update(ckpt.weights, initial, "the checkpoint's model")
                return
            he = ckpt.server_state.get(STATE_KEY)
            if not isinstance(he, dict) or not {"public_context", "key_id", "layout", "keys", "global"} <= set(he):
                raise ValueError(f"its server state has no encrypted model under {STATE_KEY!r} (public_context, key_id, "
                                 "layout, keys, global)")
            if not (isinstance(he["global"], list) and all(isinstance(c, torch.Tensor) for c in he["global"])
                    and isinstance(he["keys"], list) and isinstance(he["key_id"], str)):
                raise ValueError("its encrypted model is malformed (global must be a list of tensors, keys a list)")
            W.check_update(ckpt.weights, {k: v for k, v in initial.items() if k in ckpt.weights}, "the checkpoint's model")
        except ValueError as e:  # UpdateError included
            raise CheckpointError(f"the checkpoint in {run_dir} does not fit this simulator's model: {e}") from None

    def _blocking(self, run: Run, ckpt: checkpoint.Checkpoint | None, progress: bool, desc: str = "rounds") -> Run:
        self.last_run = run
        bar = progress_bar(getattr(self.workflow, "rounds", None), progress, done=ckpt.round + 1 if ckpt else 0,
                           desc=desc)
        try:
            self._execute(run, ckpt, extra_listeners=[bar.update_record] if bar else [])
        finally:
            if bar:
                bar.close()
        if run.status == "failed" and run.error is not None:
            raise run.error
        if run._interrupted:  # Ctrl-C: recorded and checkpointed; now the cell (loop, compare) stops too
            raise RunInterrupted(run)
        return run

    def _execute(self, run: Run, ckpt: checkpoint.Checkpoint | None = None,
                 extra_listeners: Sequence[Callable] = ()) -> None:
        with torch_threads(self.threads):  # process-wide while the run goes; restored after
            self._execute_run(run, ckpt, extra_listeners)

    def _execute_run(self, run: Run, ckpt: checkpoint.Checkpoint | None, extra_listeners: Sequence[Callable]) -> None:
        t0 = time.perf_counter()
        run.status = "running"
        log: HistoryLog | None = None
        try:
            if run.run_dir is not None:
                _check_run_dir(run.run_dir)
            keep = uses_local_models(self.workflow)
            clients = {c.name: c.fresh(derive_seed(self.seed, i, 1), self.faults, keep) for i, c in enumerate(self.clients)}
            start_round = 0
            if ckpt is not None:
                for name, state in ckpt.client_states.items():
                    clients[name].state.update(state)
                run.history = ckpt.history
                start_round = ckpt.round + 1
            server = Server(self._provision(clients, ckpt, run.history), self.server_filters, self.server_result_filters)
            if ckpt is not None:
                server.state = {k: v for k, v in ckpt.server_state.items() if k != STATE_KEY}
            owner = next(iter(clients.values()))
            run._live, run._live_round = (lambda: _plaintext(server.model, owner)), -1
            fingerprint = self.fingerprint() if run.run_dir is not None else ""
            saved = {"round": ckpt.round if ckpt is not None else -1}

            def save(round: int) -> None:
                weights, extra = server.model.checkpoint()
                checkpoint.save(run.run_dir, round, weights, {**server.state, **extra},
                                {n: c.state for n, c in clients.items()}, run.history, fingerprint, log=log)
                saved["round"] = round

            def track(record: RoundRecord) -> None:
                last = record.round + 1 >= getattr(self.workflow, "rounds", 0)
                if run.run_dir is not None and ((record.round + 1) % self.checkpoint_every == 0 or last):
                    save(record.round)

            if run.run_dir is not None:
                run.run_dir.mkdir(parents=True, exist_ok=True)
                (run.run_dir / "config.json").write_text(_strict_json(self.describe()))
                if ckpt is None:
                    checkpoint.discard(run.run_dir)  # a new run, a new history: an older run's checkpoint is void
                try:  # the history, appended as it grows; a resumed one is cut back to its checkpoint's
                    log = HistoryLog(run.run_dir / LOG, run.history, ckpt.log if ckpt is not None else None)
                except ValueError as e:
                    raise CheckpointError(str(e)) from None
            fl = ServerContext(server, tuple(clients), Channel(), run.signal, run.history, self.seed,
                               evaluate=self._evaluator(), start_round=start_round,
                               controller=type(self.workflow).__name__)
            listeners = [track, *self.on_round, *extra_listeners]
            serve(self.workflow.control_flow, fl, clients, self.engine, self.device, listeners)
            _check_rounds_run(self.workflow, run.history)
            run.weights = _plaintext(server.model, owner)
            if run.run_dir is not None and len(run.history) and saved["round"] != run.history.rounds[-1].round:
                save(run.history.rounds[-1].round)  # a workflow that stopped early (privacy budget) is checkpointed too
            run.status = "done"
        except KeyboardInterrupt as e:  # Ctrl-C in this thread (or a listener's): aborted, and said to the caller
            run.status, run._interrupted = "aborted", True
            run.history.events.append({"round": len(run.history), "what": "aborted",
                                       "reason": f"interrupted (KeyboardInterrupt){': ' + str(e) if str(e) else ''}"})
        except Aborted as e:  # Run.abort() (a Stop button): an aborted run, returned
            run.status = "aborted"
            run.history.events.append({"round": len(run.history), "what": "aborted", "reason": str(e) or "interrupted"})
        except BaseException as e:  # SystemExit, GeneratorExit... too: every way a run ends has a final status
            run.status, run.error = "failed", e if isinstance(e, Exception) else RunExited(e)
            run.history.events.append({"round": len(run.history), "what": "failed",
                                       "reason": f"{type(run.error).__name__}: {run.error}",
                                       "detail": traceback.format_exc()})
        finally:
            try:
                if run._live is not None:  # stopped early: freeze the last completed round's model
                    try:
                        run.weights = run.weights
                    except Exception:  # a client that cannot decrypt must not hide the run's own error
                        run._live = None
                run.seconds = time.perf_counter() - t0
                if run.run_dir is not None and (log is not None or run.weights):
                    try:
                        if log is not None:
                            log.sync()  # the last events (aborted, failed)
                        if run.weights:
                            run.save()
                    except Exception as e:  # the run fails (or keeps its own error): never a wait() that hangs
                        _save_failed(run, e)
                        try:
                            if log is not None:
                                log.sync()
                        except Exception:
                            pass
            finally:
                run._thread = None
                try:
                    _release(run)  # the run directory, before anyone waiting for the run wakes up
                finally:
                    run._done.set()  # always: wait() must never hang

    def _provision(self, clients: dict[str, Client], ckpt: checkpoint.Checkpoint | None, history: History) -> GlobalModel:
        """The server's global model, plaintext or encrypted; with HE, the keys go to the clients first.

        This is FLARE's provisioning: the clients get the secret context (a resumed run finds it in their
        restored state), the server a model built from the public context only.
        """
        initial = self.initial_weights()
        he = self.workflow.he
        if he is None:
            if ckpt is None:
                return PlainModel(initial)
            W.check_update(ckpt.weights, initial, "the checkpoint's model")
            return PlainModel(ckpt.weights)
        started = time.perf_counter()
        public, kid = provision(he, clients)
        if ckpt is not None and STATE_KEY in ckpt.server_state:
            model = EncryptedModel.restore(he, ckpt.server_state[STATE_KEY], ckpt.weights)
            W.check_update(ckpt.weights, {k: v for k, v in initial.items() if k in model.plain}, "the checkpoint's model")
        else:
            model = EncryptedModel.start(he, initial, public, setup_s=time.perf_counter() - started)
        if model.key_id != kid:
            raise ConfigError(f"the server's global model is encrypted under key {model.key_id!r}, but the clients hold "
                              f"key {kid!r}; they could not decrypt it (was the clients' state lost?)")
        history.results.setdefault("he", model.describe())
        return model

    def _evaluator(self) -> Callable[[Weights], dict[str, float]] | None:
        """The server's scoring of a model it can read on its test set; it closes over the test set, a model
        instance and the device only, never the simulator (which holds the clients)."""
        if self.test is None:
            return None
        device = self.device
        model = self.model_fn().to(device)
        test = Dataset(self.test.x.to(device), self.test.y.to(device), self.test.num_classes)

        def score(weights: Weights) -> dict[str, float]:
            load_weights(model, weights)
            return evaluate(model, test, device)

        return score


def uses_local_models(workflow: Controller) -> bool:
    """Whether ``workflow`` may ask clients for their locally trained models (``submit_model``), so that each client
    keeps a CPU copy of its last local weights across rounds (`Client.keep_local_model`). A `CrossSiteEval` (also
    in a `Chain`) does; the standard workflows that never ask say so with ``uses_local_models = False``; any other
    controller might, so its clients keep them (``uses_local_models`` on a controller overrides)."""
    declared = getattr(workflow, "uses_local_models", None)
    if isinstance(declared, bool):
        return declared
    parts = getattr(workflow, "parts", None)
    if isinstance(parts, tuple) and parts:
        return any(uses_local_models(p) for p in parts)
    if getattr(workflow, "submit_task", None):
        return True
    return not isinstance(workflow, (FedAvg, Cyclic, FedStats, FederatedScaling))


# After abort() (or Ctrl-C), how long (seconds) a workflow's control_flow that sends no task (and so never meets
# the abort) may take to end: then the run ends as aborted without it, with a warning (Python cannot stop a thread).
ABORT_GRACE = 5.0


def serve(control: Callable[[ServerContext], None], fl: ServerContext, clients: Mapping[str, Client],
          engine: Engine = sequential, device: torch.device = torch.device("cpu"),
          listeners: Sequence[Callable[[RoundRecord], None]] = ()) -> None:
    """Run ``control(fl)`` (a controller's ``control_flow``) in a thread of its own, and do in this thread
    what it asks of the clients' side: let ``clients`` work with ``engine``, hand each round's record to
    ``listeners`` (checkpoint, progress bar, widgets). Re-raises what the controller raised.

    Kernel interrupts (Ctrl-C) arrive in this thread: they abort the run, and every order the
    controller still sends fails with `Aborted`, so its thread ends; then KeyboardInterrupt is
    raised here (after the controller's thread has ended), whatever the controller made of it.
    A controller that sends no order after an abort (a loop that never sends a task never meets it) is
    waited for `ABORT_GRACE` seconds; then this returns without it (`Aborted`), warning that its thread
    keeps running (a daemon thread: Python cannot stop it).
    """
    outcome: dict[str, BaseException] = {}
    interrupted: list[KeyboardInterrupt] = []

    def run_controller() -> None:
        try:
            control(fl)
        except BaseException as e:  # handed to the calling thread, which raises it
            outcome["error"] = e
        finally:
            fl.channel.close()

    fl.channel.serving = True
    thread = threading.Thread(target=run_controller, name="fedkit-controller", daemon=True)
    thread.start()
    finished, grace = False, _Grace(fl.abort)
    try:
        while (order := _next_order(fl.channel, grace)) is not None:
            try:
                if order.kind == "work":
                    engine([clients[n] for n in order.targets], fl.server, device, fl.abort)
                else:
                    for listen in listeners:
                        listen(order.record)
            except KeyboardInterrupt as e:
                interrupted.append(e)
                fl.abort.trigger("interrupted")
                order.error = Aborted("interrupted")
            except BaseException as e:
                order.error = e
            finally:
                order.done.set()
        finished = True
    finally:
        if finished:  # the controller closed its channel: its thread is ending
            thread.join()
        else:  # left early (an interrupt, an abort the controller never met): let its thread end cleanly
            fl.abort.trigger("interrupted")
            _refuse_orders(fl.channel, thread, grace)
        if thread.is_alive():
            warnings.warn(f"the workflow's control_flow did not end within {ABORT_GRACE:g} s of the abort (it sent no "
                          f"task, so it never met the abort): the run ends without it, but Python cannot stop a thread, "
                          f"so its thread ({thread.name}) keeps running as a daemon thread until control_flow returns "
                          "or the process ends; make control_flow check fl.abort (or send tasks)", RuntimeWarning,
                          stacklevel=2)
    if interrupted:
        raise interrupted[0]
    if "error" in outcome:
        raise outcome["error"]


class _Grace:
    """`ABORT_GRACE` seconds, counted from the first time `over` is asked after ``abort`` was triggered."""

    def __init__(self, abort: Signal) -> None:
        self.abort, self.until = abort, None

    def over(self) -> bool:
        if not self.abort.triggered:
            return False
        if self.until is None:
            self.until = time.monotonic() + ABORT_GRACE
        return time.monotonic() >= self.until


def _next_order(channel: Channel, grace: _Grace) -> Any:
    """The controller's next order, or None once it has finished; `Aborted` when the run was aborted and ``grace``
    is over with no order (a controller that sends none never meets the abort)."""
    while True:
        try:
            return channel.next(timeout=0.1)
        except queue.Empty:
            if grace.over():
                raise Aborted(f"{grace.abort.reason or 'aborted'} (the workflow's control_flow did not end within "
                              f"{ABORT_GRACE:g} s: its thread keeps running)") from None


def _refuse_orders(channel: Channel, thread: threading.Thread, grace: _Grace) -> None:
    """Answer every order still coming with `Aborted` until the controller's ``thread`` has ended, or, after an
    abort, until ``grace`` is over."""
    while thread.is_alive() and not grace.over():
        try:
            order = channel.next(timeout=0.1)
        except queue.Empty:
            continue
        if order is None:  # the controller closed its channel: its thread is ending
            thread.join()
            return
        order.error = Aborted("interrupted")
        order.done.set()


def _release(run: Run) -> None:
    """Give back the run directory's lock that ``run`` holds (`Simulator._claim`), once."""
    lock = run.__dict__.pop("_rundir_lock", None)
    if lock is not None:
        lock.release()


def _plaintext(model: GlobalModel, owner: Client) -> Weights:
    """The global model in plaintext for the run's owner: the server's, or, with HE, as a client decrypts it."""
    if model.readable:
        return model.weights
    return decrypt_global(model.task_data({}), owner.state, model.keys)


def _data_digest(d: Dataset) -> str:
    """Size plus a hash of the labels and a sample of the features: tells two client splits apart cheaply."""
    flat = d.x.reshape(-1)
    sample = flat[:: max(1, flat.numel() // 4096)]
    h = hashlib.sha256(d.y.cpu().numpy().tobytes() + sample.cpu().numpy().tobytes()).hexdigest()
    return f"{len(d)}:{h[:16]}"


def _describe(obj: Any) -> Any:
    """A JSON-able description of a config that is the same in every process (no memory addresses)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"type": type(obj).__name__, **{f.name: _describe(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, (list, tuple)):
        return [_describe(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _describe(v) for k, v in obj.items()}
    if isinstance(obj, functools.partial):
        return {"partial": _describe(obj.func), "args": _describe(obj.args), "kwargs": _describe(obj.keywords)}
    if callable(obj) and hasattr(obj, "__qualname__"):
        return f"{getattr(obj, '__module__', '?')}.{obj.__qualname__}"
    return type(obj).__name__

