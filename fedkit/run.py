"""A run of a workflow: its status, live history and global weights (`Run`), and how it can end.

A `fedkit.simulator.Simulator` makes a `Run` and drives it; only `Run`'s own methods change its state.
A run ends ``done``, ``aborted`` (`Run.abort`, or Ctrl-C: `RunInterrupted`) or ``failed`` (with its error;
`RunExited` for a SystemExit or such, `IncompleteRun` for a workflow that stopped short of its rounds).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from torch import nn

from . import metrics as M, plots
from . import weights as W
from .artifacts import SaveError, write_html, write_results, write_summary
from .checkpoint import CheckpointError
from .exchange import Aborted, Signal, Weights
from .history import LOG, History, HistoryLog, LogState
from .metrics import ACCURACY, LOSS
from .rundir import RunDirLock
from .server import Controller
from .status import Event, RunStatus
from .train import load_weights


class Run:
    """One execution of a workflow: its status, live history and global weights.

    ``status`` is a `RunStatus`: pending, running, done, aborted or failed.
    A `fedkit.simulator.Simulator` makes it (``run()``, ``start()``, ``resume()``) and drives it through the methods
    at the end of this class, the only ones that change its state.
    """

    def __init__(self, simulator: Any, *, run_dir: str | Path | None = None, lock: RunDirLock | None = None) -> None:
        """``simulator``: the `fedkit.simulator.Simulator` that runs it; ``run_dir``: where it writes (default: the
        simulator's ``out``); ``lock``: that directory's lock (`fedkit.rundir`), given back once when the run ends."""
        self.simulator = simulator
        self.status = RunStatus.PENDING
        self.history = History()
        self._weights: Weights = {}
        self._live: Callable[[], Weights] | None = None  # while running: how to read the current global model
        self._live_round = -1
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.run_dir: Path | None = Path(run_dir) if run_dir is not None else Path(simulator.out) if simulator.out else None
        self.signal = Signal()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._interrupted = False  # ended by Ctrl-C (KeyboardInterrupt), not by abort(): run()/resume() re-raise it
        self._lock = lock
        self._log: HistoryLog | None = None  # the run directory's history.jsonl, while the run goes
        self._started = 0.0

    def __repr__(self) -> str:
        s = self.summary() if self.weights else {"final_accuracy": float("nan"), "accuracy_on": "none"}
        where = " (on clients)" if s["accuracy_on"].startswith("clients") else ""
        planned = self.rounds_planned
        done = f"{len(self.history)} of {planned} round(s)" if planned else f"{len(self.history)} round(s)"
        if self.status in (RunStatus.ABORTED, RunStatus.FAILED):
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
        return self.status == RunStatus.DONE

    def abort(self, reason: str = "aborted by the user") -> None:
        """Ask the run to stop: training stops at the next batch, and a client blocked inside its executor is
        left behind at once; the last completed global model is kept. A workflow's ``control_flow`` that sends no
        task meanwhile gets `ABORT_GRACE` seconds to end; then the run ends without it (warning that its thread
        keeps running)."""
        self.signal.trigger(reason)

    def wait(self, timeout: float | None = None) -> "Run":
        """Block until the run ends (or ``timeout`` seconds pass); re-raise its error if it failed."""
        self._done.wait(timeout)
        if self.status == RunStatus.FAILED and self.error is not None:
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
            "stopped": next((e["reason"] for e in self.history.events if e.get("what") == Event.STOPPED), None),
        }

    def save(self, directory: str | Path | None = None) -> Path:
        """Write history (JSON, CSV), final model (``model.pt``), summary and ``plot.html`` into ``directory``.

        The JSON files are strict JSON: a number that is NaN or infinite (an accuracy never measured) is ``null``.
        """
        directory = Path(directory or self.run_dir or "runs/latest")
        write_results(directory, self.history, self.weights, self.simulator.describe())
        if len(self.history):
            write_html(self.figure(), directory / "plot.html", js_folder=directory.parent)
        write_summary(directory, self.summary())  # last: a summary that says "done" comes after everything it sums up
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

    # ---------------------------------------------------------------- the simulator's: how a run goes and ends

    def _launch(self, target: Callable[["Run"], None]) -> None:
        """Run ``target(self)`` (the simulator's execution) in a background thread, ``running`` from now."""
        self._thread = threading.Thread(target=target, args=(self,), name="fedkit-run", daemon=True)
        self.status = RunStatus.RUNNING
        self._thread.start()

    def _follow(self, read: Callable[[], Weights]) -> None:
        """While running, ``weights`` reads the current global model with ``read`` (once per completed round)."""
        self._live, self._live_round = read, -1

    def _open_log(self, resumed: LogState | None) -> HistoryLog:
        """The history's log in the run directory, appended as the history grows; a resumed one is cut back to its
        checkpoint's (``resumed``). Synced with the last events when the run ends."""
        try:
            self._log = HistoryLog(self.run_dir / LOG, self.history, resumed)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        return self._log

    def _execute(self, rounds: Callable[[], None]) -> None:
        """Run ``rounds`` (the run's rounds, to the end) and record how the run ended, whatever ended it: its final
        status (`_end`), then its results written (`_wrap_up`), its directory given back and its waiters woken."""
        self._started = time.perf_counter()
        self.status = RunStatus.RUNNING
        try:
            rounds()
        except BaseException as e:  # SystemExit, GeneratorExit... too: every way a run ends has a final status
            self._end(e)
        else:
            self._end(None)
        finally:
            self._wrap_up()

    def _end(self, error: BaseException | None) -> None:
        """The final status: ``done`` without ``error``; ``aborted`` by Ctrl-C (a KeyboardInterrupt, in this thread
        or a listener's: `_outcome` raises it to the caller) or by `abort` (`Aborted`); else ``failed`` with
        ``error`` (a BaseException that is no Exception, such as SystemExit, as `RunExited`)."""
        if error is None:
            self.status = RunStatus.DONE
        elif isinstance(error, KeyboardInterrupt):
            self.status, self._interrupted = RunStatus.ABORTED, True
            self.history.events.append({"round": len(self.history), "what": Event.ABORTED,
                                        "reason": f"interrupted (KeyboardInterrupt){': ' + str(error) if str(error) else ''}"})
        elif isinstance(error, Aborted):  # Run.abort() (a Stop button): an aborted run, returned
            self.status = RunStatus.ABORTED
            self.history.events.append({"round": len(self.history), "what": Event.ABORTED,
                                        "reason": str(error) or "interrupted"})
        else:
            self.status, self.error = RunStatus.FAILED, error if isinstance(error, Exception) else RunExited(error)
            self.history.events.append({"round": len(self.history), "what": Event.FAILED,
                                        "reason": f"{type(self.error).__name__}: {self.error}",
                                        "detail": "".join(traceback.format_exception(error))})

    def _wrap_up(self) -> None:
        """After the rounds: keep the last completed round's model, count the seconds and write the results; then,
        even if that failed, give the run directory back and, last, wake whoever waits (``wait()`` never hangs)."""
        with contextlib.ExitStack() as then:  # its callbacks run last registered first, each even if one failed
            then.callback(self._done.set)
            then.callback(self._release)  # the run directory, before anyone waiting for the run wakes up
            then.callback(setattr, self, "_thread", None)
            self._freeze()
            self.seconds = time.perf_counter() - self._started
            self._write_results()

    def _freeze(self) -> None:
        """Stop following the live model: keep the last completed round's."""
        if self._live is not None:
            try:
                self.weights = self.weights
            except Exception:  # a client that cannot decrypt must not hide the run's own error
                self._live = None

    def _write_results(self) -> None:
        """With a run directory: the log's last events (aborted, failed), then the results (`save`). A failure to
        write fails the run (`_save_failed`): never a ``wait()`` that hangs."""
        log = self._log
        if self.run_dir is None or (log is None and not self.weights):
            return
        try:
            if log is not None:
                log.sync()
            if self.weights:
                self.save()
        except Exception as e:
            self._save_failed(e)
            with contextlib.suppress(Exception):
                if log is not None:
                    log.sync()

    def _save_failed(self, error: BaseException) -> None:
        """Saving the run at its end failed: the run fails (with its own error kept first), and says so."""
        reason = f"{type(error).__name__}: {error}"
        self.history.events.append({"round": len(self.history), "what": Event.SAVE_FAILED,
                                    "reason": f"saving the run into {self.run_dir} failed: {reason}"})
        if self.status != RunStatus.FAILED:
            ended = "finished its rounds" if self.status == RunStatus.DONE else "was aborted"
            self.error = SaveError(f"the run {ended}, but its results could not be saved into {self.run_dir} ({reason}). "
                                   "run.weights and run.history still hold them: run.save(another_directory) writes them "
                                   "elsewhere")
            self.error.__cause__ = error
            self.status = RunStatus.FAILED
        with contextlib.suppress(Exception):  # the summary says so, where the disk has room for it
            write_summary(self.run_dir, self.summary())

    def _release(self) -> None:
        """Give back the run directory's lock (`fedkit.rundir`), once."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def _outcome(self) -> "Run":
        """This run, ended, for a blocking ``run()`` / ``resume()``: its error raised if it failed, and
        `RunInterrupted` if Ctrl-C ended it (recorded and checkpointed; now the cell, loop or compare stops too)."""
        if self.status == RunStatus.FAILED and self.error is not None:
            raise self.error
        if self._interrupted:
            raise RunInterrupted(self)
        return self


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


class IncompleteRun(RuntimeError):
    """A workflow whose ``control_flow`` returned without running the rounds it plans (and without saying why)."""


def check_rounds_run(workflow: Controller, history: History) -> None:
    """Refuse to call a run done unless its workflow ran the rounds it plans, or recorded why it stopped early
    (a ``stopped`` event, e.g. a spent privacy budget)."""
    planned, done = getattr(workflow, "rounds", None), len(history)
    if not isinstance(planned, int) or done == planned:
        return
    if done < planned and any(e.get("what") == Event.STOPPED for e in history.events):
        return
    raise IncompleteRun(f"{type(workflow).__name__} plans {planned} round(s) but its control_flow returned after "
                        f"{done}: the run is not complete. A controller runs each round in a `with fl.round(r) as rnd:` "
                        "block, and one that ends early on purpose says why with fl.stop(reason)")


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


def _workflow_label(workflow: Controller) -> str:
    """``FedAvg``, ``FedAvg + Proximal(mu=0.1)``, ``FedAvg + Adam server`` ...: what a plot's title says of a workflow."""
    parts = [type(workflow).__name__]
    opt = getattr(workflow, "server_opt", None)
    if opt is not None:
        parts.append(f"{type(opt).__name__} server")
    parts += [repr(e) for e in getattr(workflow, "extensions", ())]
    return " + ".join(parts)
