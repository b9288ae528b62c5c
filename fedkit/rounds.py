"""A round as an object: ``with fl.round(r) as rnd:`` sends tasks, gathers the valid results, and records the round.

A controller writes one round as a block::

    with fl.round(r) as rnd:                 # times the round; records it when the block ends
        fl.model.update(rnd.train())         # train on the round's clients; weighted mean of the valid diffs

`Round.train` sends the global model as the training task and returns the valid results (screened by the
model, by the norm screen, and for every client half the task carried); `Round.send` is the general form,
any task name and data. Both gather (`gather`): a short round is retried with the clients that failed, up to
``max_retries``, until ``min_clients`` valid results are in. Their defaults are the running workflow's own
settings of the same names (`Round.setting`), so ``FedAvg(min_clients=3, max_retries=2)`` needs no argument.
When the block ends normally the round is recorded (`fedkit.server.ServerContext.end_round`: the history
row, events, scoring, the checkpoint); when it raises (``fl.stop``, a bug), nothing is recorded, the global
model is put back as the block found it (an ``fl.model.update`` in the block is undone), and the error goes
on. Other state the block changed is not rolled back: an extension's (SCAFFOLD's control variate, moved in
``after_aggregate``) or the controller's own.

A round that clients refuse (a spent privacy budget) ends the run cleanly through ``fl.stop``: the
controller catches nothing.

>>> needed(None, 5), needed(3, 5), needed(3, 2)
(5, 3, 2)
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

from .errors import ConfigError, RoundFailed
from .exchange import DXO, MetaKey, Reply, Task
from .global_model import GlobalModel, screen_norms
from .status import Status
from .train import has_client_half, hook_name
from .weights import norm

NORMS = "accepted_norms"  # server state: the norms of the last accepted updates (plain floats, checkpointed)
STEP_NORMS = "accepted_step_norms"  # and their norms per local step (global_model.step_norms)

DEFAULTS: dict[str, Any] = {"min_clients": None, "max_retries": 0, "task_timeout": None, "max_norm_ratio": 10.0,
                            "clients_per_round": None, "sample_rate": None, "task_name": "train"}
"""A round's settings where the running workflow has none of that name: every client, no retry, no deadline."""

FROM_WORKFLOW: Any = object()
"""An argument left out of `Round.send` / `Round.train`: the running workflow's setting of that name applies."""

Keep = Callable[[dict[str, Reply]], dict[str, DXO]]
"""A screen: the valid results of an attempt's replies, the others rejected in place (``reply.reject``)."""


def needed(min_clients: int | None, targets: int) -> int:
    """How many valid results a round of ``targets`` clients needs: ``min_clients`` (None: all), at most all."""
    return targets if min_clients is None else min(min_clients, targets)


def keep_ok(replies: dict[str, Reply]) -> dict[str, DXO]:
    """Every reply that is ok, with its result: `Round.send`'s screen when it is given none."""
    return {name: r.result for name, r in replies.items() if r.ok}


def gather(fl: Any, targets: Sequence[str], task: Callable[[int], Task], keep: Keep, min_clients: int | None = None,
           max_retries: int = 0) -> tuple[dict[str, Reply], dict[str, DXO], int]:
    """Send ``task(attempt)`` until ``min_clients`` valid results are in; (replies, valid, attempts).

    The lower-level tool under `Round.send` (``fl`` is the run's `fedkit.server.ServerContext`). Attempt 0 goes
    to every target; each retry only to the targets still without a valid result (and that did not refuse):
    a valid result is kept, and its client is not asked to work (and spend privacy budget) again. ``keep``
    screens each attempt's new replies. ``replies`` holds, for each target, the reply that counted: its valid
    one, else its last. Every failed, refused or rejected reply of every attempt is recorded in the history's
    events, with every injected fault.

    When refusals (`fedkit.client.Refused`, e.g. a spent privacy budget) leave fewer targets than needed, the
    run ends cleanly (``fl.stop``). After ``max_retries`` retries a round still short stops the run with
    `RoundFailed`. Either way the global model is left untouched.
    """
    need = needed(min_clients, len(targets))
    replies: dict[str, Reply] = {}
    results: dict[str, DXO] = {}
    asked = list(targets)
    attempt = 0
    while True:
        sent = task(attempt)
        new = fl.broadcast_and_wait(sent, asked)
        results.update(keep(new))
        fl.record_failures(new)
        replies.update(new)
        if len(results) >= need:
            return {n: replies[n] for n in targets if n in replies}, results, attempt + 1
        refused = {n: r for n, r in replies.items() if r.status == Status.REFUSED}
        if refused and len(targets) - len(refused) < need:
            first = next(iter(refused.values())).error  # each refusal is in the events, with its client's reason
            fl.stop(f"{first} (round {sent.round + fl.offset}: {len(refused)} of {len(targets)} client(s) refused the "
                    f"task, and {need} valid result(s) are needed)")
        asked = [n for n in targets if n not in results and n not in refused]
        if attempt >= max_retries or not asked:
            break
        attempt += 1
    failures = "; ".join(f"{n}: {r.error}" for n, r in replies.items() if not r.ok)
    has = [name for name in ("min_clients", "max_retries", "task_timeout") if hasattr(fl.workflow, name)]
    raise RoundFailed(
        f"round {sent.round + fl.offset}: only {len(results)} valid result(s) from {len(targets)} client(s) after "
        f"{attempt + 1} attempt(s), and " + ("{min_clients} is %d" % need if "min_clients" in has else
                                              f"{need} are needed") +
        "; the global model is left as the last completed round made it. " + short_round_hint(has) +
        f". Failures (each client's last reply): {failures}", field="min_clients" if "min_clients" in has else None
    )


def short_round_hint(settings: Sequence[str]) -> str:
    """What to do about a round short of valid results, naming only the ``settings`` the running workflow has.

    >>> short_round_hint(["min_clients", "max_retries", "task_timeout"])
    'Lower {min_clients}, raise {max_retries} or {task_timeout}, or fix the failing clients'
    >>> short_round_hint([])
    'Fix the failing clients'
    """
    raised = " or ".join("{%s}" % s for s in settings if s != "min_clients")
    steps = (["lower {min_clients}"] if "min_clients" in settings else []) + ([f"raise {raised}"] if raised else [])
    words = ", ".join(steps + ["or fix the failing clients" if steps else "fix the failing clients"])
    return words[0].upper() + words[1:]


def check_settings(workflow: Any) -> None:
    """Refuse (`ConfigError`, naming e.g. ``OneShot.min_clients``) a round setting of ``workflow`` (a controller) that a
    round cannot use: ``min_clients``, ``max_retries``, ``task_timeout``, ``max_norm_ratio``, ``clients_per_round``,
    ``sample_rate``, each where the workflow has it (a field or a class attribute). `fedkit.FedAvg` checks its own
    with it when built; the simulator checks any controller's."""
    def value(name: str) -> Any:
        return getattr(workflow, name, DEFAULTS[name])

    def whole(name: str, low: int, allow_none: bool = True) -> None:
        v = value(name)
        if not (v is None and allow_none) and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            extra = " or None" if allow_none else ""
            raise ConfigError(f"{{{name}}} must be an integer >= {low}{extra}", obj=workflow, field=name, value=v)

    whole("clients_per_round", 1)
    q = value("sample_rate")
    if q is not None:
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q <= 1:
            raise ConfigError("{sample_rate} is the probability that a client joins a round; it must be in (0, 1] "
                              "or None", obj=workflow, field="sample_rate", value=q)
        if value("clients_per_round") is not None:
            raise ConfigError("give {clients_per_round} (a fixed number per round) or {sample_rate} (Poisson "
                              "sampling), not both; got {clients_per_round=} and {sample_rate=}", obj=workflow,
                              field="clients_per_round")
    # with Poisson sampling a round may draw nobody at all: min_clients=0 lets such rounds go ahead
    whole("min_clients", 0 if q is not None else 1)
    whole("max_retries", 0, allow_none=False)
    t = value("task_timeout")
    if t is not None and (isinstance(t, bool) or not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0)):
        raise ConfigError("{task_timeout} must be > 0 seconds or None", obj=workflow, field="task_timeout", value=t)
    ratio = value("max_norm_ratio")
    if ratio is not None and (isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and ratio > 1)):
        raise ConfigError("{max_norm_ratio} must be > 1 or None (no norm screen)", obj=workflow, field="max_norm_ratio",
                          value=ratio)
    k, m = value("clients_per_round"), value("min_clients")
    if k is not None and m is not None and m > k:
        raise ConfigError("{min_clients=} can never be met with {clients_per_round=}", obj=workflow,
                          field="min_clients", hint="lower {min_clients}")


class Round:
    """One round of a controller, from ``fl.round(number)``: send tasks in it, put numbers in ``metrics``.

    Used as a context manager: the round is timed from the ``with``, and recorded when the block ends
    normally (with every reply that counted, the attempts, and ``metrics``); when the block raises, the global
    model is put back as the ``with`` found it (extensions' and the controller's own state are not) and nothing
    is recorded. A round that does not follow the last one recorded is refused at the ``with``. ``record=False``
    makes a pass that trains nothing (statistics, cross-site evaluation) and adds no history round.
    """

    def __init__(self, fl: Any, number: int, record: bool = True) -> None:
        self.fl, self.number, self.record = fl, number, record
        self.metrics: dict[str, Any] = {}  # recorded with the round (e.g. an extension's epsilon)
        self.replies: dict[str, Reply] = {}  # each client's reply that counted, in the order they were asked
        self.attempts = 0  # the most attempts any task of the round took
        self.started = time.perf_counter()
        self.outer: int | None = None
        self.saved: GlobalModel | None = None  # the global model as the block found it (record=True)

    def __enter__(self) -> "Round":
        self.fl.check_not_stopped()  # a controller that caught fl.stop's RunStopped runs no further round
        if self.record:
            self.fl.check_next(self.number, "began")  # refused now, not after a wasted round
            self.saved = self.fl.server.model.copy()  # put back if the block raises
        self.started = time.perf_counter()
        self.outer = self.fl.current_round  # a pass inside a round (statistics) gives it back when done
        self.fl.current_round = self.number
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> bool:
        self.fl.current_round = self.outer
        if kind is None and self.record:
            attempts = {"attempts": self.attempts} if self.attempts else {}
            self.fl.end_round(self.number, self.replies, self.started, **attempts, **self.metrics)
        elif self.record:  # the round is not recorded, so neither is what it did to the global model
            self.fl.server.model = self.saved
        return False  # an error goes on: the round is not recorded

    def setting(self, name: str, given: Any = FROM_WORKFLOW) -> Any:
        """``given``, else the running workflow's setting ``name`` (``min_clients``, ``max_retries``,
        ``task_timeout``, ``max_norm_ratio``, ``clients_per_round``, ``sample_rate``, ``task_name``), else its
        `DEFAULTS` value."""
        return getattr(self.fl.workflow, name, DEFAULTS[name]) if given is FROM_WORKFLOW else given

    def targets(self) -> list[str]:
        """The clients a task goes to by default: ``fl.sample`` with the workflow's ``clients_per_round`` or
        ``sample_rate``; every client when it has neither."""
        return self.fl.sample(self.setting("clients_per_round"), rate=self.setting("sample_rate"))

    def send(self, task: str, targets: Sequence[str] | None = None, *, data: DXO | None = None,
             keep: Keep | None = None, min_clients: Any = FROM_WORKFLOW, max_retries: Any = FROM_WORKFLOW,
             task_timeout: Any = FROM_WORKFLOW) -> dict[str, DXO]:
        """Send the task ``task`` (a name) with ``data`` (default: the global model, ``fl.model.task_data({})``)
        to ``targets`` (default: `targets`) and return the valid results by client, as ``keep`` screens them
        (default: every reply that is ok). A short round is retried (`gather`); settings left out are the
        workflow's (`setting`)."""
        timeout = self.setting("task_timeout", task_timeout)
        data = self.fl.model.task_data({}) if data is None else data
        replies, results, attempts = gather(
            self.fl, self.targets() if targets is None else list(targets),
            lambda attempt: Task(task, data, round=self.number, deadline=timeout, attempt=attempt),
            keep_ok if keep is None else keep, self.setting("min_clients", min_clients),
            self.setting("max_retries", max_retries))
        self.replies.update(replies)
        self.attempts = max(self.attempts, attempts)
        return results

    def train(self, targets: Sequence[str] | None = None, *, meta: dict[str, Any] | None = None,
              model: GlobalModel | None = None, max_norm_ratio: Any = FROM_WORKFLOW, **settings: Any) -> dict[str, DXO]:
        """Train ``model`` (default: the global model) on ``targets``: the workflow's training task with ``meta``;
        the valid WEIGHT_DIFFs by client (`screen`). ``settings`` go to `send` (``min_clients``, ...)."""
        model = self.fl.model if model is None else model
        meta = dict(meta or {})
        ratio = self.setting("max_norm_ratio", max_norm_ratio)
        return self.send(self.setting("task_name"), targets, data=model.task_data(meta),
                         keep=lambda replies: self.screen(replies, model, meta, ratio), **settings)

    def screen(self, replies: dict[str, Reply], model: GlobalModel, meta: dict[str, Any],
               max_norm_ratio: float | None) -> dict[str, DXO]:
        """The valid training results of ``replies``: screened by ``model``, trained with every client half the
        task carried (``meta``'s hooks), and, when the server can read the model, not absurdly large for what
        is typical, also with fewer than three peers (`fedkit.global_model.screen_norms`, against recent
        accepted updates or the model's norm). The rest are rejected in place, with their reason."""
        # a readable model's norms are screened once, below (`screen_norms` also judges a round of three peers or
        # more); an encrypted model screens its own
        valid = model.screen(replies, None if model.readable else max_norm_ratio)
        wanted = [hook_name(h) for h in meta.get(MetaKey.HOOKS, ()) if getattr(h, "requires_client_half", True)
                  and has_client_half(h)]
        for name in list(valid):
            missing = [w for w in wanted if w not in valid[name].meta.get(MetaKey.HOOKS_RAN, ())]
            if missing:
                replies[name].reject(Status.REJECTED, f"client {name!r} did not run the client half of {', '.join(missing)}: "
                                                 "its train executor ignores the task's client_hooks. Use the standard "
                                                 "fk.Trainer, or run the hooks in your executor (see fedkit.train.Trainer)")
                del valid[name]
        if max_norm_ratio is not None and model.readable:
            recent, per_step = (self.fl.server.state.setdefault(key, []) for key in (NORMS, STEP_NORMS))
            valid = screen_norms(replies, valid, max_norm_ratio, recent, 0.0 if recent else norm(model.weights),
                                 per_step)
        return valid
