"""The clients' side of a run: answer what a controller, running in a thread of its own, asks of the clients.

The controller reaches the clients only through a `fedkit.server.Channel` of orders: work for some clients
(done by an engine) and round records (handed to the round listeners: checkpoint, progress bar, widgets).
"""

from __future__ import annotations

import queue
import threading
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch

from .client import Client
from .engine import Engine, sequential
from .exchange import Aborted, Signal
from .history import RoundRecord
from .server import Channel, RunStopped, ServerContext

# After abort() (or Ctrl-C), how long (seconds) a workflow's control_flow that sends no task (and so never meets
# the abort) may take to end: then the run ends as aborted without it, with a warning (Python cannot stop a thread).
ABORT_GRACE = 5.0


def serve(control: Callable[[ServerContext], None], fl: ServerContext, clients: Mapping[str, Client],
          engine: Engine = sequential, device: torch.device = torch.device("cpu"),
          listeners: Sequence[Callable[[RoundRecord], None]] = (), grace_s: float | None = None) -> None:
    """Run ``control(fl)`` (a controller's ``control_flow``) in a thread of its own, and do in this thread
    what it asks of the clients' side: let ``clients`` work with ``engine``, hand each round's record to
    ``listeners`` (checkpoint, progress bar, widgets). Re-raises what the controller raised.

    Kernel interrupts (Ctrl-C) arrive in this thread: they abort the run, and every order the
    controller still sends fails with `Aborted`, so its thread ends; then KeyboardInterrupt is
    raised here (after the controller's thread has ended), whatever the controller made of it.
    A controller that sends no order after an abort (a loop that never sends a task never meets it) is
    waited for ``grace_s`` seconds (default `ABORT_GRACE`); then this returns without it (`Aborted`), warning that its
    thread keeps running (a daemon thread: Python cannot stop it).
    """
    outcome: dict[str, BaseException] = {}
    interrupted: list[KeyboardInterrupt] = []

    def run_controller() -> None:
        try:
            control(fl)
        except RunStopped:  # fl.stop(reason): the controller ended the run on purpose, its event recorded
            pass
        except BaseException as e:  # handed to the calling thread, which raises it
            outcome["error"] = e
        finally:
            fl.channel.close()

    fl.channel.serving = True
    thread = threading.Thread(target=run_controller, name="fedkit-controller", daemon=True)
    thread.start()
    finished, grace = False, _Grace(fl.abort, ABORT_GRACE if grace_s is None else grace_s)
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
            warnings.warn(f"the workflow's control_flow did not end within {grace.seconds:g} s of the abort (it sent no "
                          f"task, so it never met the abort): the run ends without it, but Python cannot stop a thread, "
                          f"so its thread ({thread.name}) keeps running as a daemon thread until control_flow returns "
                          "or the process ends; make control_flow check fl.abort (or send tasks)", RuntimeWarning,
                          stacklevel=2)
    if interrupted:
        raise interrupted[0]
    if "error" in outcome:
        raise outcome["error"]


class _Grace:
    """``seconds`` (`ABORT_GRACE`), counted from the first time `over` is asked after ``abort`` was triggered."""

    def __init__(self, abort: Signal, seconds: float) -> None:
        self.abort, self.seconds, self.until = abort, seconds, None

    def over(self) -> bool:
        if not self.abort.triggered:
            return False
        if self.until is None:
            self.until = time.monotonic() + self.seconds
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
                              f"{grace.seconds:g} s: its thread keeps running)") from None


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
