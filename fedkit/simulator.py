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

import dataclasses
import functools
import hashlib
import json
import numbers
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from . import checkpoint, rundir, seeds
from . import weights as W
from .artifacts import SaveError, check_run_dir, shared_plotlyjs, write_config, write_html
from .checkpoint import CheckpointError
from .client import Client
from .data import ClientData, Dataset, check_dataset, check_seed
from .engine import Engine
from .engine.choose import resolve as resolve_engine
from .errors import ConfigError
from .exchange import ExecutorLike, Filter, Weights
from .faults import Faults
from .global_model import Encryption, GlobalModel, PlainModel
from .history import History, RoundRecord
from .models import architecture
from .preprocess import Standardize
from .progress import bar as progress_bar
from .run import IncompleteRun, Run, RunExited, RunInterrupted, check_rounds_run
from .rounds import check_settings
from .serve import ABORT_GRACE, serve
from .server import Channel, Controller, Server, ServerContext
from .sim_checks import (RESUMABLE, as_model_fn, build_model, check_client_data, check_fits, check_new_each_call,
                         check_rounds, differing, engine_change)
from .stats import StatsExecutor
from .status import Event
from .threads import AUTO_ONE_THREAD_BELOW, check_threads, resolve_threads, torch_threads
from .train import Evaluator, ModelFn, SubmitModel, TrainConfig, Trainer, evaluate, load_weights, resolve_device

__all__ = ["ABORT_GRACE", "AUTO_ONE_THREAD_BELOW", "RESUMABLE", "ClientsLike", "IncompleteRun", "Run", "RunExited",
           "RunInterrupted", "SaveError", "Simulator", "check_threads", "resolve_threads", "serve", "shared_plotlyjs",
           "torch_threads", "write_html"]

ClientsLike = Sequence[Dataset] | Sequence[ClientData] | Sequence[Client]

# ABORT_GRACE (`fedkit.serve`) is read here when a run starts: `fk.simulator.ABORT_GRACE = 1.0` sets it for runs.


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

    The simulator plays FLARE's provisioning role: when the workflow asks for HE (``he=CKKS()``), its
    encryption's hook (`fedkit.global_model.Encryption.provision`) makes the keys, gives the secret context
    to the clients and the server an encrypted model built with the public context only. The controller then runs in a thread of its own and reaches the
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
        check_rounds(workflow)
        check_settings(workflow)  # a controller's own min_clients, task_timeout...: refused now, not in a round
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
        self.model_fn = as_model_fn(model)
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
        probe = build_model(self.model_fn)
        check_new_each_call(self.model_fn, probe)
        self._architecture = architecture(probe)  # in config.json: a resume refuses a model that computes otherwise
        self.threads = resolve_threads(threads, probe, self.device)  # torch CPU threads of every run (torch_threads)
        workflow.check_model(probe)  # fail now, with how to fix the model, not in every client's first round
        self._executors: dict[str, ExecutorLike] | None = None
        self.clients = [self._client(i, c) for i, c in enumerate(clients)]
        names = [c.name for c in self.clients]
        if len(set(names)) != len(names):
            raise ConfigError(f"client names must be unique, got {names}")
        # e.g. DP's delta < 1/n; a fk.Client may hold data of its own kind, which no workflow can count
        workflow.check_population({c.name: len(c.data.train) for c in self.clients if isinstance(c.data, ClientData)})
        if test is not None:
            check_dataset(test, "the test set")
            check_fits(probe, test, self.clients)

    def _client(self, i: int, c: Dataset | ClientData | Client) -> Client:
        if isinstance(c, Client):
            if isinstance(c.data, ClientData):
                check_client_data(c.name, c.data)
            return c
        split = isinstance(c, Dataset)
        if split:
            if len(c) == 0:
                raise ConfigError(f"client {i + 1} has no data")
            seed = seeds.derive_seed(self.seed, i, seeds.VAL_SPLIT)
            train, val = c.split(self.val_fraction, seed=seed) if len(c) > 1 else (c, c.subset([]))
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
        check_client_data(name, c, self.val_fraction if split else None)
        return Client(name, c, dict(self._executors), result_filters=list(self.client_result_filters))

    def describe(self) -> dict[str, Any]:
        """The settings of this simulator, as saved in ``config.json`` (the same in every process)."""
        return {"workflow": _describe(self.workflow), "train": _describe(self.train), "seed": self.seed,
                "clients": {c.name: _client_digest(c) for c in self.clients},
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
            return self._blocking(Run(self, lock=lock), None, progress, desc)
        finally:
            if lock is not None:
                lock.release()

    def start(self) -> Run:
        """Start the workflow in a background thread; returns the `Run` handle at once (Ctrl-C does not reach it:
        stop it with ``run.abort()``)."""
        lock = self._claim(Path(self.out) if self.out else None, fresh=True)  # released by the run's thread when it ends
        try:
            run = Run(self, lock=lock)
            if run.run_dir is not None:
                check_run_dir(run.run_dir)  # refused here and now, not in the background thread
            run._launch(self._execute)
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
                    f"the checkpoint in {run_dir} was written by a run with other settings ({differing(saved, self)}; "
                    f"see {saved}); build the Simulator as it was, or start a new run"
                )
            ckpt.check_clients([c.name for c in self.clients], run_dir)
            self._check_checkpoint_model(ckpt, run_dir)
            changed = engine_change(run_dir / "config.json", self)
            if changed is not None:  # allowed (another machine may lack the engine), but said: here and in the events
                warnings.warn(changed, stacklevel=2)
                ckpt.history.events.append({"round": ckpt.round + 1, "what": Event.ENGINE_CHANGED,
                                            "reason": str(changed)})
            return self._blocking(Run(self, run_dir=run_dir, lock=lock), ckpt, progress)
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
            self.workflow.he.check_saved(ckpt.server_state)
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
        return run._outcome()

    def _execute(self, run: Run, ckpt: checkpoint.Checkpoint | None = None,
                 extra_listeners: Sequence[Callable] = ()) -> None:
        with torch_threads(self.threads):  # process-wide while the run goes; restored after
            run._execute(lambda: self._rounds(run, ckpt, extra_listeners))

    def _rounds(self, run: Run, ckpt: checkpoint.Checkpoint | None, extra_listeners: Sequence[Callable]) -> None:
        """The run's rounds, from the first (or the checkpoint's next) to the last, on fresh clients and server;
        `Run._execute` records how they ended."""
        if run.run_dir is not None:
            check_run_dir(run.run_dir)
        keep = self.workflow.uses_local_models  # may the workflow ask for local models (cross-site evaluation)?
        clients = {c.name: c.fresh(seeds.client_seed(self.seed, i), self.faults, keep)
                   for i, c in enumerate(self.clients)}
        start_round = 0
        if ckpt is not None:
            for name, state in ckpt.client_states.items():
                clients[name].state.update(state)
            run.history = ckpt.history
            start_round = ckpt.round + 1
        server = Server(self._provision(clients, ckpt, run.history), self.server_filters, self.server_result_filters)
        if ckpt is not None:
            server.state = {k: v for k, v in ckpt.server_state.items() if k != Encryption.state_key}
        owner = next(iter(clients.values()))
        run._follow(lambda: _plaintext(server.model, owner))
        saver = None  # checkpoints the run (a round listener), with a run directory
        if run.run_dir is not None:
            write_config(run.run_dir, self.describe())
            if ckpt is None:
                checkpoint.discard(run.run_dir)  # a new run, a new history: an older run's checkpoint is void
            log = run._open_log(ckpt.log if ckpt is not None else None)
            saver = checkpoint.Checkpointer(run.run_dir, server, clients, run.history, self.fingerprint(), log,
                                            self.checkpoint_every, getattr(self.workflow, "rounds", None) or 0,
                                            ckpt.round if ckpt is not None else -1)
        fl = ServerContext(server, tuple(clients), Channel(), run.signal, run.history, self.seed,
                           evaluate=self._evaluator(), start_round=start_round,
                           controller=type(self.workflow).__name__)
        listeners = [*([saver] if saver else []), *self.on_round, *extra_listeners]
        serve(self.workflow.control_flow, fl, clients, self.engine, self.device, listeners, ABORT_GRACE)
        check_rounds_run(self.workflow, run.history)
        run.weights = _plaintext(server.model, owner)
        if saver is not None:
            saver.finish()  # a workflow that stopped early (privacy budget) is checkpointed too

    def _provision(self, clients: dict[str, Client], ckpt: checkpoint.Checkpoint | None, history: History) -> GlobalModel:
        """The server's global model: plaintext, or encrypted as the workflow's encryption provisions it
        (`fedkit.global_model.Encryption.provision`: FLARE's provisioning, the keys to the clients first; a resumed
        run's clients find theirs in their restored state)."""
        initial = self.initial_weights()
        he = self.workflow.he
        if he is None:
            if ckpt is None:
                return PlainModel(initial)
            W.check_update(ckpt.weights, initial, "the checkpoint's model")
            return PlainModel(ckpt.weights)
        model = he.provision(clients, initial, (ckpt.weights, ckpt.server_state) if ckpt is not None else None)
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


def _client_digest(client: Client) -> list[str] | str:
    """What config.json records of a client's data, so that a resume on other data is refused: the digests of its
    training and validation splits; data of a kind of the client's own (not a ClientData) is named, not read."""
    if isinstance(client.data, ClientData):
        return [_data_digest(client.data.train), _data_digest(client.data.val)]
    return f"not a ClientData ({type(client.data).__name__}): not checked on resume"


def _plaintext(model: GlobalModel, owner: Client) -> Weights:
    """The global model in plaintext for the run's owner: the server's, or, with HE, as a client decrypts it."""
    if model.readable:
        return model.weights
    return model.encryption.decrypt(model, owner.state)


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

