"""Gather: send a round's task until enough valid results are in, retrying a short round.

Any controller can use it; FedAvg's loop does. ``task(attempt)`` builds the task of each attempt
and ``keep(replies)`` returns the valid results, rejecting the rest in place (with
`fedkit.global_model.screen` or the model's own ``fl.model.screen``).

>>> from fedkit.workflows.gather import needed
>>> needed(None, 5), needed(3, 5), needed(3, 2)
(5, 3, 2)
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..errors import RoundFailed
from ..exchange import DXO, Task
from ..server import Reply, ServerContext


def needed(min_clients: int | None, targets: int) -> int:
    """How many valid results a round of ``targets`` clients needs: ``min_clients`` (None: all), at most all."""
    return targets if min_clients is None else min(min_clients, targets)


def gather(fl: ServerContext, targets: Sequence[str], task: Callable[[int], Task],
           keep: Callable[[dict[str, Reply]], dict[str, DXO]], min_clients: int | None = None,
           max_retries: int = 0) -> tuple[dict[str, Reply], dict[str, DXO], int]:
    """Send ``task(attempt)`` to ``targets`` until ``min_clients`` valid results are in; (replies, valid, attempts).

    Every failed or rejected reply is recorded in the history's events. After ``max_retries`` retries
    a round still short stops the run with `RoundFailed`, and the global model is left untouched.
    """
    need = needed(min_clients, len(targets))
    replies: dict[str, Reply] = {}
    results: dict[str, DXO] = {}
    for attempt in range(max_retries + 1):
        first = task(attempt)
        replies = fl.broadcast_and_wait(first, targets)
        results = keep(replies)
        fl.record_failures(replies)
        if len(results) >= need:
            return replies, results, attempt + 1
    failures = "; ".join(f"{n}: {r.error}" for n, r in replies.items() if not r.ok)
    raise RoundFailed(
        f"round {first.round + fl.offset}: only {len(results)} valid result(s) from {len(targets)} client(s) after "
        f"{max_retries + 1} attempt(s), and min_clients is {need}; the global model is left as the last completed "
        "round made it. Lower min_clients, raise max_retries or task_timeout, or fix the failing clients. "
        f"Failures in the last attempt: {failures}"
    )
