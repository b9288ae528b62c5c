"""Wire a server, its clients and an engine together, and run a workflow in this process.

>>> import fedkit as fk
>>> data = fk.data.load("digits")
>>> sim = fk.Simulator(fk.FedAvg(rounds=2), model=lambda: fk.models.for_data(data),
...                    clients=fk.data.iid(data.train, clients=4), test=data.test)
>>> run = sim.run(progress=False)
>>> run.status, len(run.history)
('done', 2)

``run()`` blocks; ``start()`` runs in a background thread and returns the same `Run` at once,
with live ``history``, ``status``, ``abort()`` and ``wait()``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import queue
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from . import checkpoint, metrics as M, plots
from . import weights as W
from .checkpoint import CheckpointError
from .client import Client, derive_seed
from .data import ClientData, Dataset
from .engine import sequential
from .errors import ConfigError
from .exchange import Aborted, ExecutorLike, Filter, Signal, Weights
from .faults import Faults
from .global_model import GlobalModel, PlainModel
from .history import History, RoundRecord
from .preprocess import Standardize
from .privacy.ckks import STATE_KEY
from .privacy.he_filters import decrypt_global, provision
from .privacy.he_model import EncryptedModel
from .server import Channel, Controller, Engine, Server, ServerContext
from .stats import StatsExecutor
from .train import Evaluator, ModelFn, SubmitModel, TrainConfig, Trainer, evaluate, load_weights, resolve_device

ClientsLike = Sequence[Dataset] | Sequence[ClientData] | Sequence[Client]


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

    def __repr__(self) -> str:
        s = self.summary() if self.weights else {"final_accuracy": float("nan"), "accuracy_on": "none"}
        where = " (on clients)" if s["accuracy_on"].startswith("clients") else ""
        return f"<fedkit Run {self.status}: {len(self.history)} round(s), accuracy {s['final_accuracy']:.4f}{where}>"

    def abort(self, reason: str = "aborted by the user") -> None:
        """Ask the run to stop at the next batch boundary; the last completed global model is kept."""
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
        """
        failures = [e for e in self.history.events if "client" in e]
        last = self.history.rounds[-1].metrics if len(self.history) else {}
        accuracy, loss, where = M.scored(last)  # with HE only the clients can score the model
        return {
            "status": self.status,
            "final_accuracy": self.history.last(accuracy),
            "final_loss": self.history.last(loss),
            "accuracy_on": where,
            "rounds": len(self.history),
            "seconds": round(self.seconds, 3),
            "model_sha256": self.model_sha256,
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "failures": len(failures),
            "failures_by_kind": dict(Counter(e["what"] for e in failures)),
            "error": f"{type(self.error).__name__}: {self.error}" if self.error else None,
            **_privacy(self.history),
            "stopped": next((e["reason"] for e in self.history.events if e.get("what") == "stopped"), None),
        }

    def save(self, directory: str | Path | None = None) -> Path:
        """Write history (JSON, CSV), final model (``model.pt``), summary and ``plot.html`` into ``directory``."""
        directory = Path(directory or self.run_dir or "runs/latest")
        directory.mkdir(parents=True, exist_ok=True)
        self.history.save(directory)
        torch.save(self.weights, directory / "model.pt")
        (directory / "summary.json").write_text(json.dumps({**self.summary(), "run_dir": str(directory)}, indent=1))
        (directory / "config.json").write_text(json.dumps(self.simulator.describe(), indent=1, default=str))
        if len(self.history):
            plots.curves({"run": self}).write_html(directory / "plot.html", include_plotlyjs="directory")
        self.run_dir = directory
        return directory


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
    if not callable(model):
        raise ConfigError(f"model must be an nn.Module or a function that builds one, got {type(model).__name__}")
    return model


class Simulator:
    """A whole federation in this process: one server running ``workflow`` and one client per data part.

    ``clients`` may be a `Partition` (or any list of `Dataset`s), a list of `ClientData`, or ready
    `Client` objects. Dataset clients get the standard `Trainer` (``train`` task) and `Evaluator`
    (``validate`` task), `SubmitModel` (``submit_model``), `StatsExecutor` (``stats_range``, ``stats``)
    and `Standardize` (``standardize``), and keep ``val_fraction`` of their data to validate the global model;
    ``executors`` adds to or replaces those by task name (``executors={"train": MyTrainer(...)}``).
    ``client_result_filters`` are attached, in order, to those clients' results (e.g. DP's
    `fedkit.privacy.dp.ClipUpdate`); an encryption filter always comes last.

    The simulator plays FLARE's provisioning role: when the workflow asks for HE (``he=CKKS()``), it
    makes the keys, gives the secret context to the clients and the server an encrypted model built
    with the public context only. The controller then runs in a thread of its own and reaches the
    clients only through the server's task board and a `fedkit.server.Channel` of names: nothing the
    server or the controller can reach holds a client object or a secret key.
    """

    def __init__(self, workflow: Controller, model: ModelFn | nn.Module, clients: ClientsLike,
                 test: Dataset | None = None, train: TrainConfig = TrainConfig(), *, seed: int = 0,
                 device: str | torch.device = "auto", out: str | Path | None = None, val_fraction: float = 0.1,
                 engine: Engine = sequential, server_filters: Sequence[Filter] = (),
                 server_result_filters: Sequence[Filter] = (), client_result_filters: Sequence[Filter] = (),
                 faults: Faults | None = None, executors: Mapping[str, ExecutorLike] | None = None,
                 checkpoint_every: int = 1, on_round: Sequence[Callable[[RoundRecord], None]] = ()) -> None:
        if not isinstance(workflow, Controller):
            raise ConfigError(f"workflow must be a Controller such as fk.FedAvg(...), got {type(workflow).__name__}")
        if not isinstance(train, TrainConfig):
            raise ConfigError(f"train must be a fk.TrainConfig, got {type(train).__name__}")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if len(clients) == 0:
            raise ConfigError("a federation needs at least one client; clients is empty")
        if faults is not None and not isinstance(faults, Faults):
            raise ConfigError(f"faults must be a fk.Faults(...), got {type(faults).__name__}")
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be an integer >= 1 (rounds), got {checkpoint_every!r}")
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
        workflow.check_model(self.model_fn())  # fail now, with how to fix the model, not in every client's first round
        self.clients = [self._client(i, c) for i, c in enumerate(clients)]
        names = [c.name for c in self.clients]
        if len(set(names)) != len(names):
            raise ConfigError(f"client names must be unique, got {names}")

    def _client(self, i: int, c: Dataset | ClientData | Client) -> Client:
        if isinstance(c, Client):
            return c
        if isinstance(c, Dataset):
            if len(c) == 0:
                raise ConfigError(f"client {i + 1} has no data")
            train, val = c.split(self.val_fraction, seed=derive_seed(self.seed, i, 2)) if len(c) > 1 else (c, c.subset([]))
            c = ClientData(train, val)
        if not isinstance(c, ClientData):
            raise ConfigError(f"clients[{i}] is a {type(c).__name__}; give Datasets (e.g. a fk.data partition), "
                              "ClientData or fk.Client objects")
        stats = StatsExecutor()
        standard = {"train": Trainer(self.model_fn, self.train), "validate": Evaluator(self.model_fn),
                    "submit_model": SubmitModel(), "stats_range": stats, "stats": stats, "standardize": Standardize()}
        return Client(f"site-{i + 1}", c, {**standard, **self.executors}, result_filters=list(self.client_result_filters))

    def describe(self) -> dict[str, Any]:
        """The settings of this simulator, as saved in ``config.json`` (the same in every process)."""
        return {"workflow": _describe(self.workflow), "train": _describe(self.train), "seed": self.seed,
                "clients": {c.name: [_data_digest(c.data.train), _data_digest(c.data.val)] for c in self.clients},
                "val_fraction": self.val_fraction, "faults": _describe(self.faults),
                "client_result_filters": _describe(self.client_result_filters),
                **({"executors": _describe(self.executors)} if self.executors else {})}

    def fingerprint(self) -> str:
        """A hash of the settings and initial weights: a checkpoint resumes only under the same fingerprint."""
        blob = json.dumps(self.describe(), sort_keys=True, default=str) + W.sha256(self.initial_weights())
        return hashlib.sha256(blob.encode()).hexdigest()

    def initial_weights(self) -> Weights:
        """The global model's starting weights: built from ``model`` under the run's seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return W.clone(self.model_fn().state_dict())

    def run(self, progress: bool = True, desc: str = "rounds") -> Run:
        """Run the workflow to the end in this thread and return the finished `Run`.

        Interrupting the kernel (Ctrl-C) stops at the next batch and returns the run as ``aborted``;
        with ``out`` set, its last completed round is checkpointed and `resume` continues it.
        """
        return self._blocking(Run(self), None, progress, desc)

    def start(self) -> Run:
        """Start the workflow in a background thread; returns the `Run` handle at once."""
        run = Run(self)
        run._thread = threading.Thread(target=self._execute, args=(run,), name="fedkit-run", daemon=True)
        run.status = "running"
        run._thread.start()
        return run

    def resume(self, run_dir: str | Path | None = None, progress: bool = True) -> Run:
        """Continue the run checkpointed in ``run_dir`` (default: ``out``) to the end, in this thread.

        The simulator must have the settings the run was started with (same workflow, data, model and
        seed); otherwise `CheckpointError` says so. The resumed run ends with the same weights as a run
        that was never interrupted. A checkpoint holds no code, so it is resumed by a simulator you
        build again (in the notebook, or by ``fedkit run --resume DIR`` from the saved arguments).
        """
        run_dir = Path(run_dir or self.out or "")
        ckpt = checkpoint.load(run_dir)
        if ckpt.fingerprint != self.fingerprint():
            saved = run_dir / "config.json"
            raise CheckpointError(
                f"the checkpoint in {run_dir} was written by a run with other settings (workflow, training, data "
                f"split, model or seed differ; see {saved}); build the Simulator as it was, or start a new run"
            )
        run = Run(self)
        run.run_dir = run_dir
        return self._blocking(run, ckpt, progress)

    def _blocking(self, run: Run, ckpt: checkpoint.Checkpoint | None, progress: bool, desc: str = "rounds") -> Run:
        bar = _progress(self.workflow, progress, done=ckpt.round + 1 if ckpt else 0, desc=desc)
        try:
            self._execute(run, ckpt, extra_listeners=[bar.update_record] if bar else [])
        finally:
            if bar:
                bar.close()
        if run.status == "failed" and run.error is not None:
            raise run.error
        return run

    def _execute(self, run: Run, ckpt: checkpoint.Checkpoint | None = None,
                 extra_listeners: Sequence[Callable] = ()) -> None:
        t0 = time.perf_counter()
        run.status = "running"
        try:
            clients = {c.name: c.fresh(derive_seed(self.seed, i, 1), self.faults) for i, c in enumerate(self.clients)}
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
                                {n: c.state for n, c in clients.items()}, run.history, fingerprint)
                saved["round"] = round

            def track(record: RoundRecord) -> None:
                last = record.round + 1 >= getattr(self.workflow, "rounds", 0)
                if run.run_dir is not None and ((record.round + 1) % self.checkpoint_every == 0 or last):
                    save(record.round)

            if run.run_dir is not None:
                run.run_dir.mkdir(parents=True, exist_ok=True)
                (run.run_dir / "config.json").write_text(json.dumps(self.describe(), indent=1, default=str))
            fl = ServerContext(server, tuple(clients), Channel(), run.signal, run.history, self.seed,
                               evaluate=self._evaluator(), start_round=start_round)
            listeners = [track, *self.on_round, *extra_listeners]
            serve(self.workflow.control_flow, fl, clients, self.engine, self.device, listeners)
            run.weights = _plaintext(server.model, owner)
            if run.run_dir is not None and len(run.history) and saved["round"] != run.history.rounds[-1].round:
                save(run.history.rounds[-1].round)  # a workflow that stopped early (privacy budget) is checkpointed too
            run.status = "done"
        except (Aborted, KeyboardInterrupt) as e:
            run.status = "aborted"
            run.history.events.append({"round": len(run.history), "what": "aborted", "reason": str(e) or "interrupted"})
        except Exception as e:
            run.status, run.error = "failed", e
            run.history.events.append({"round": len(run.history), "what": "failed", "reason": f"{type(e).__name__}: {e}",
                                       "detail": traceback.format_exc()})
        finally:
            if run._live is not None:  # stopped early: freeze the last completed round's model
                try:
                    run.weights = run.weights
                except Exception:  # a client that cannot decrypt must not hide the run's own error
                    run._live = None
            run.seconds = time.perf_counter() - t0
            if run.run_dir is not None and run.weights:
                run.save()
            run._thread = None
            run._done.set()

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


def serve(control: Callable[[ServerContext], None], fl: ServerContext, clients: Mapping[str, Client],
          engine: Engine = sequential, device: torch.device = torch.device("cpu"),
          listeners: Sequence[Callable[[RoundRecord], None]] = ()) -> None:
    """Run ``control(fl)`` (a controller's ``control_flow``) in a thread of its own, and do in this thread
    what it asks of the clients' side: let ``clients`` work with ``engine``, hand each round's record to
    ``listeners`` (checkpoint, progress bar, widgets). Re-raises what the controller raised.

    Kernel interrupts (Ctrl-C) arrive in this thread: they abort the run, and every order the
    controller still sends fails with `Aborted`, so its thread always ends.
    """
    outcome: dict[str, BaseException] = {}

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
    finished = False
    try:
        while (order := fl.channel.next()) is not None:
            try:
                if order.kind == "work":
                    engine([clients[n] for n in order.targets], fl.server, device, fl.abort)
                else:
                    for listen in listeners:
                        listen(order.record)
            except KeyboardInterrupt:
                fl.abort.trigger("interrupted")
                order.error = Aborted("interrupted")
            except BaseException as e:
                order.error = e
            finally:
                order.done.set()
        finished = True
    finally:
        if not finished:  # left early (an interrupt while waiting): let the controller's thread end cleanly
            fl.abort.trigger("interrupted")
            _refuse_orders(fl.channel, thread)
        thread.join()
    if "error" in outcome:
        raise outcome["error"]


def _refuse_orders(channel: Channel, thread: threading.Thread) -> None:
    """Answer every order still coming with `Aborted` until the controller's ``thread`` has ended."""
    while thread.is_alive():
        try:
            order = channel.next(timeout=0.1)
        except queue.Empty:
            continue
        if order is None:
            return
        order.error = Aborted("interrupted")
        order.done.set()


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


class _Bar:
    """A tqdm progress bar over rounds that shows the latest global accuracy."""

    def __init__(self, total: int, done: int = 0, desc: str = "rounds") -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=done, desc=desc, unit="round")

    def update_record(self, record: RoundRecord) -> None:
        acc = record.metrics.get("accuracy")
        if acc is not None:
            self._bar.set_postfix(accuracy=f"{acc:.3f}")
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def _progress(workflow: Controller, enabled: bool, done: int = 0, desc: str = "rounds") -> _Bar | None:
    return _Bar(getattr(workflow, "rounds", None), done, desc) if enabled else None
