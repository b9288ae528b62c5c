"""The Ray engine: each client's task runs as a Ray task, on this machine or on a cluster.

>>> import fedkit as fk
>>> with fk.engine.ray(num_cpus=2) as engine:                              # doctest: +SKIP
...     run = fk.Simulator(fk.FedAvg(rounds=2), model=..., clients=..., engine=engine).run()

Every remote call does what `Client.answer` does in-process (it *is* `Client.answer`, run in a Ray worker
on a copy of the client), so a run gives the same bits as with `fedkit.engine.sequential`: the same
``model_sha256`` for the same seed (with the same torch threads: the worker sets ``threads``, one by default).

What travels, and how often (Ray's object store):
  * a client's data and its "shell" (name, executors, filters, faults, seed: no state, no data) are put once
    per run; the ObjectRefs are cached per client object and data object (clients are fresh each run);
  * a round's task data (the global weights) is put once per distinct DXO: the same object for every client
    of the round unless the server's task-data filters made one per client;
  * the client's ``state`` goes with each task, without its caches (keys starting with ``_``: model
    instances, data on the device), and comes back with the answer: the driver's ``client.state`` gets the
    remote changes (SCAFFOLD's control variates, a DP accountant), so checkpoints and resumes see them.
    Caches are rebuilt in the worker on each task; ``keep`` names those that travel too: by default the
    client's last locally trained weights (``fedkit.train.LOCAL_WEIGHTS``, present only when the workflow
    asks for them: cross-site evaluation's ``submit_model``).

Faults are drawn on the driver exactly as the sequential engine draws them (a dropout makes no remote call).
The driver waits with ``ray.wait`` in short steps: ``abort`` cancels every outstanding task and raises
`Aborted`; a task past its deadline (``task.deadline`` plus a grace) is answered ``late`` and its worker is
killed (so a stuck client never holds a CPU); a worker that dies is a ``failed`` answer with Ray's reason.
At most as many tasks run as the cluster has CPUs (per ``num_cpus_per_task``): a task's time, and so its
deadline, counts from when it was handed out, not from a place in Ray's queue.

Starting Ray costs seconds (tens on a busy laptop: ``startup_seconds`` says how long): the engine starts it
once, on first use (or ``start()``), warms one worker per slot (imports torch and fedkit) and keeps it for
every run until ``close()``. Ray is started from a thread of the engine's own that lives until ``close()``,
whichever thread first uses the engine (a run's, with ``Simulator.start()``): see `_start_kept`.
Workers need fedkit and torch at the driver's versions; a cluster's address given explicitly (not ``"auto"``)
may need ``RAY_AUTH_MODE=token`` and the cluster's token (Ray's own rule).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import traceback
import weakref
from collections import Counter, deque
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch

from ..client import Answer, Client
from ..errors import ConfigError
from ..exchange import DXO, Signal, Task
from ..extras import require
from ..server import Server
from ..train import LOCAL_WEIGHTS

POLL = 0.05  # seconds between checks of the abort signal and deadlines while tasks run
GRACE = 0.5  # seconds past a deadline before the driver gives up on a task that does not report it itself


def _import_ray() -> Any:
    """The ``ray`` package (imported on first use only, never by ``import fedkit``), or `MissingExtra` naming the
    extra."""
    return require("ray", "the ray engine")


def _work(shell: Client, data: Any, state: dict[str, Any], task: Task, task_data: DXO, device: str,
          fault: dict[str, Any] | None, threads: int | None, keep: frozenset[str]) -> tuple[Answer, dict[str, Any]]:
    """In a Ray worker: ``Client.answer`` on a copy of the client; its answer and its state after, less caches."""
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    client = replace(shell, data=data, state=state)
    # the worker's own signal: the driver's abort reaches it as a cancellation; the deadline starts here
    answer = client.answer(replace(task, data=task_data), torch.device(device), Signal(), fault)
    return answer, _travels(client.state, keep)


def _warm(threads: int | None) -> int:
    """In a Ray worker: import what tasks need before the first task is timed: torch, fedkit, and what torch
    imports on first use (the first optimizer imports torch._dynamo: seconds, which a task's deadline would pay)."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    return torch.get_num_threads()


def _travels(state: dict[str, Any], keep: frozenset[str]) -> dict[str, Any]:
    """What of a client's state goes to and comes back from a worker: all but caches (unless kept)."""
    return {k: v for k, v in state.items() if not k.startswith("_") or k in keep}


@dataclass
class _Running:
    client: Client
    task: Task
    limit: float | None  # perf_counter time past which the driver answers ``late``


@dataclass
class _Cached:
    """A client's parts in the object store for one run, and what they were made from."""

    made_from: tuple
    data: Any  # ObjectRef of the client's data
    shell: Any  # ObjectRef of the client without data and state


class RayEngine:
    """An engine (``engine(clients, server, device, abort)``) that runs each task as a Ray task; see the module.

    Ray starts on first use (or attaches to a running one). ``close()`` shuts down what this engine
    started or connected to, never a Ray that was already running in this process; also a context manager.
    ``puts`` counts what was put in the object store: ``data``, ``client`` (shells) and ``task_data``.
    """

    engine_name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None, *, threads: int | None = 1,
                 num_cpus_per_task: float = 1.0, num_gpus_per_task: float | None = None,
                 keep: Sequence[str] = (LOCAL_WEIGHTS,), warm: bool = True, quiet: bool = True,
                 init_kwargs: dict[str, Any] | None = None) -> None:
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ConfigError(f"threads must be a whole number >= 1 (torch's CPU threads in each worker) or None "
                              f"(leave them), got {threads!r}")
        if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
            raise ConfigError(f"num_cpus must be a whole number >= 1 or None (all cores), got {num_cpus!r}")
        if not (isinstance(num_cpus_per_task, (int, float)) and num_cpus_per_task > 0):
            raise ConfigError(f"num_cpus_per_task must be > 0, got {num_cpus_per_task!r}")
        if num_cpus is not None and address is not None:
            raise ConfigError("num_cpus is for a local Ray that this engine starts; with address=..., the cluster "
                              "says how many CPUs it has")
        bad = [k for k in keep if not isinstance(k, str) or not k.startswith("_")]
        if bad:
            raise ConfigError(f"keep names cache keys of a client's state (starting with '_'), got {bad}")
        self.address, self.num_cpus, self.threads = address, num_cpus, threads
        self.num_cpus_per_task, self.num_gpus_per_task = float(num_cpus_per_task), num_gpus_per_task
        self.keep = frozenset(keep)
        self.warm, self.quiet = warm, quiet
        self.init_kwargs = dict(init_kwargs or {})
        self.puts: Counter[str] = Counter()
        self.startup_seconds = 0.0  # how long starting (or connecting to) Ray and warming its workers took
        self._ray: Any = None  # the ray package, once started
        self._owned = False  # this engine called ray.init: close() calls ray.shutdown
        self._keeper: threading.Event | None = None  # set by close(): the thread that started Ray may end
        self._remote: Any = None
        self._cache: "weakref.WeakKeyDictionary[Client, _Cached]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        _import_ray()  # now, not at the first round: a missing Ray is a configuration error

    def __repr__(self) -> str:
        where = self.address or (f"local, {self.num_cpus} CPUs" if self.num_cpus else "local")
        return f"<fedkit ray engine ({where}){', started' if self._ray is not None else ''}>"

    # ---- lifetime

    def start(self) -> "RayEngine":
        """Start (or connect to) Ray now rather than at the first task; returns the engine."""
        self._ensure()
        return self

    def _ensure(self) -> Any:
        with self._lock:
            if self._ray is not None:
                return self._ray
            ray_package = _import_ray()
            t0 = time.perf_counter()
            if not ray_package.is_initialized():
                kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": not self.quiet}
                if self.quiet:
                    kwargs["logging_level"] = logging.ERROR  # not its start-up banners and notices
                if self.address is None:  # "local": a new Ray of its own, even where `ray start` left one running
                    kwargs.update(address="local", num_cpus=self.num_cpus)
                else:
                    kwargs["address"] = self.address
                    kwargs.pop("include_dashboard")  # a setting of the head node, not of a driver
                kwargs.update(self.init_kwargs)
                self._keeper = _start_kept(lambda: ray_package.init(**kwargs))
                self._owned = True
                atexit.register(self.close)
            gpus = self.num_gpus_per_task
            self._remote = ray_package.remote(_work).options(num_cpus=self.num_cpus_per_task, num_gpus=gpus or 0,
                                                             max_retries=0)
            self._ray = ray_package
            if self.warm:  # one no-op per slot: the workers import torch and fedkit before any task is timed
                warm = ray_package.remote(_warm).options(num_cpus=self.num_cpus_per_task, max_retries=0)
                ray_package.get([warm.remote(self.threads) for _ in range(self._slots())])
            self.startup_seconds = time.perf_counter() - t0
            return ray_package

    def close(self) -> None:
        """Shut down the Ray this engine started or connected to (not one it found running); idempotent."""
        with self._lock:
            ray_package, owned, keeper = self._ray, self._owned, self._keeper
            self._ray, self._remote, self._owned, self._keeper = None, None, False, None
            self._cache = weakref.WeakKeyDictionary()
        try:
            atexit.unregister(self.close)
        except Exception:
            pass
        try:
            if ray_package is not None and owned and ray_package.is_initialized():
                ray_package.shutdown()
        finally:
            if keeper is not None:
                keeper.set()  # Ray is down: the thread that started it may end now

    def __enter__(self) -> "RayEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the engine

    def _slots(self) -> int:
        """How many tasks may run at once: the cluster's CPUs (GPUs) over what one task asks for."""
        resources = self._ray.cluster_resources()
        slots = int(resources.get("CPU", 1) // self.num_cpus_per_task)
        if self.num_gpus_per_task:
            slots = min(slots, int(resources.get("GPU", 0) // self.num_gpus_per_task))
        return max(1, slots)

    def _client_refs(self, client: Client) -> _Cached:
        """The client's data and shell in the object store: put once per run (per client object and data object)."""
        made_from = (client.data, client.executors, client.task_data_filters, client.result_filters, client.faults,
                     client.seed, client.name)
        cached = self._cache.get(client)
        if cached is not None and all(a is b for a, b in zip(cached.made_from, made_from)):
            return cached
        data = cached.data if cached is not None and cached.made_from[0] is client.data else None
        if data is None:
            data = self._ray.put(client.data)
            self.puts["data"] += 1
        shell = self._ray.put(replace(client, data=None, state={}))
        self.puts["client"] += 1
        cached = self._cache[client] = _Cached(made_from, data, shell)
        return cached

    def __call__(self, clients: Sequence[Client], server: Server, device: torch.device, abort: Signal) -> None:
        ray_package = self._ensure()
        abort.check()
        where = "cuda" if device.type == "cuda" else str(device)
        if device.type == "cuda" and not self.num_gpus_per_task:
            raise ConfigError("the run's device is a GPU: give the ray engine num_gpus_per_task (e.g. 1 or 0.25)")
        slots = self._slots()
        waiting = deque(clients)  # clients that may still have tasks, in order
        running: dict[Any, _Running] = {}
        task_data: dict[int, tuple[DXO, Any]] = {}  # id(DXO) -> (the DXO, kept alive; its ObjectRef)
        try:
            while waiting or running:
                abort.check()
                while waiting and len(running) < slots:  # hand out tasks while there are free slots
                    client = waiting.popleft()
                    task = server.pull(client.name)
                    if task is None:
                        continue
                    fault = client.fault(task)
                    if fault is not None:
                        server.note_fault(client.name, task, fault)  # fault injection's ground truth, for the history
                    if fault is not None and fault["fault"] == "dropout":
                        client.deliver(server, task, client.answer(task, device, abort, fault))  # nothing runs
                        waiting.appendleft(client)
                        continue
                    try:  # what cannot be pickled (a lock in an executor, in the state) cannot reach a worker
                        refs = self._client_refs(client)
                        held = task_data.get(id(task.data))
                        if held is None:
                            held = task_data[id(task.data)] = (task.data, ray_package.put(task.data))
                            self.puts["task_data"] += 1
                        ref = self._remote.remote(refs.shell, refs.data, _travels(client.state, self.keep),
                                                  replace(task, data=None), held[1], where, fault, self.threads,
                                                  self.keep)
                    except Exception as e:
                        client.deliver(server, task, Answer(
                            "failed", error=f"ray: could not send the task to a worker: {type(e).__name__}: "
                                            f"{_first_line(e)} (executors, filters, data and state must pickle)",
                            detail=traceback.format_exc()))
                        waiting.appendleft(client)
                        continue
                    limit = None if task.deadline is None else time.perf_counter() + task.deadline + GRACE
                    running[ref] = _Running(client, task, limit)
                if not running:
                    continue
                now = time.perf_counter()
                limits = [r.limit for r in running.values() if r.limit is not None]
                timeout = max(0.0, min([POLL, *(t - now for t in limits)]))
                ready, _ = ray_package.wait(list(running), num_returns=1, timeout=timeout)
                for ref in ready:
                    job = running.pop(ref)
                    try:
                        answer, state = ray_package.get(ref)
                    except Exception as e:  # a worker that died, a cancelled task, a result that did not unpickle
                        answer = Answer("failed", error=f"ray: {type(e).__name__}: {_first_line(e)}", detail=str(e))
                    else:
                        self._take_state(job.client, state)
                    job.client.deliver(server, job.task, answer)
                    waiting.appendleft(job.client)  # its next task, if any, before other clients' first
                now = time.perf_counter()
                for ref, job in list(running.items()):
                    if job.limit is not None and now >= job.limit:
                        del running[ref]
                        _cancel(ray_package, ref, force=True)  # stuck: free its CPU; whatever it did is dropped
                        job.client.deliver(server, job.task, Answer(
                            "late", error=f"late: no answer within the task's {job.task.deadline:g} s deadline; "
                                          "its Ray task was cancelled"))
                        waiting.appendleft(job.client)
            abort.check()
        except BaseException:
            for ref in running:  # aborted (or failed): nothing of this call keeps running
                _cancel(ray_package, ref, force=False)
            raise

    def _take_state(self, client: Client, state: dict[str, Any]) -> None:
        """Bring the remote state changes into ``client.state`` (the driver's caches stay as they are)."""
        for k in [k for k in client.state if k not in state and (not k.startswith("_") or k in self.keep)]:
            del client.state[k]
        client.state.update(state)


def _start_kept(start: Callable[[], Any]) -> threading.Event:
    """Call ``start`` (``ray.init``) in a daemon thread that then waits until the returned event is set (by
    ``close()``); re-raise here what ``start`` raised.

    Why a thread of its own: a local Ray's processes (GCS, raylet) are started with Linux's
    ``PR_SET_PDEATHSIG``, which kills them when the *thread* that started them ends, not the process. Started
    in a run's thread (``Simulator.start()``, or ``run()`` in a thread of the user's), Ray died with that run,
    and the next run on the engine waited 60 s for Ray's GCS before Ray terminated the process (a dead kernel).
    """
    started, stop = threading.Event(), threading.Event()
    outcome: list[BaseException | None] = []

    def keep() -> None:
        try:
            start()
            outcome.append(None)
        except BaseException as e:  # handed to the caller, which raises it
            outcome.append(e)
        started.set()
        if outcome[0] is None:
            stop.wait()

    threading.Thread(target=keep, name="fedkit-ray", daemon=True).start()
    started.wait()
    if outcome[0] is not None:
        raise outcome[0]
    return stop


def _cancel(ray_package: Any, ref: Any, force: bool) -> None:
    try:
        ray_package.cancel(ref, force=force)
    except Exception:  # already finished, or gone with its worker: nothing left to stop
        pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no reason given"


def ray(address: str | None = None, num_cpus: int | None = None, *, threads: int | None = 1,
        num_cpus_per_task: float = 1.0, num_gpus_per_task: float | None = None, keep: Sequence[str] = (LOCAL_WEIGHTS,),
        warm: bool = True, quiet: bool = True, init_kwargs: dict[str, Any] | None = None) -> RayEngine:
    """An engine that runs each client's task as a Ray task (``pip install 'fedkit[ray]'``).

    ``address=None`` starts a local Ray on first use (``num_cpus`` of this machine's cores, all by default)
    unless one is running in this process already; ``address="auto"`` connects to the cluster started with
    ``ray start --head`` on this machine, ``"ray://host:10001"`` to a remote one through Ray Client.
    ``threads`` are torch's CPU threads in each worker (None: leave Ray's setting); ``num_cpus_per_task`` and
    ``num_gpus_per_task`` are what each task asks Ray for (a run on a GPU needs the latter). ``keep``: cache
    keys of the clients' state that travel with each task too (the others are rebuilt in the worker).
    ``warm`` starts the workers (importing torch) when Ray starts. ``init_kwargs`` go to ``ray.init``.
    The engine's ``close()`` (or ``with``) shuts down the Ray it started; at interpreter exit too.
    """
    return RayEngine(address, num_cpus, threads=threads, num_cpus_per_task=num_cpus_per_task,
                     num_gpus_per_task=num_gpus_per_task, keep=keep, warm=warm, quiet=quiet, init_kwargs=init_kwargs)
