"""Gather: send a round's task until enough valid results are in, retrying only the clients that failed.

Any controller can use it; FedAvg's loop does. ``task(attempt)`` builds the task of each attempt
and ``keep(replies)`` returns the valid results, rejecting the rest in place (with
`fedkit.global_model.screen` or the model's own ``fl.model.screen``). A retry asks only the clients
whose reply failed, came late, dropped or was rejected: a valid result is kept, and its client is not
asked to work (and spend privacy budget) again. A client that refuses (`fedkit.client.Refused`, e.g.
a spent privacy budget) is not asked again either, and a round that refusals leave short ends the run
cleanly (`RoundRefused`), not as a failure.

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


class RoundRefused(Exception):
    """A round cannot go ahead because clients refused it (e.g. their privacy budget is spent): a clean end.

    ``reason`` says who refused and why; FedAvg records it as the run's ``stopped`` event.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def gather(fl: ServerContext, targets: Sequence[str], task: Callable[[int], Task],
           keep: Callable[[dict[str, Reply]], dict[str, DXO]], min_clients: int | None = None,
           max_retries: int = 0) -> tuple[dict[str, Reply], dict[str, DXO], int]:
    """Send ``task(attempt)`` until ``min_clients`` valid results are in; (replies, valid, attempts).

    Attempt 0 goes to every target; each retry only to the targets still without a valid result (and
    that did not refuse). ``keep`` screens each attempt's new replies. ``replies`` holds, for each
    target, the reply that counted: its valid one, else its last. Every failed, refused or rejected
    reply of every attempt is recorded in the history's events, with every injected fault.

    When refusals leave fewer targets than needed, `RoundRefused` (a clean stop). After ``max_retries``
    retries a round still short stops the run with `RoundFailed`. Either way the global model is left
    untouched.
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
        refused = {n: r for n, r in replies.items() if r.status == "refused"}
        if refused and len(targets) - len(refused) < need:
            first = next(iter(refused.values())).error  # each refusal is in the events, with its client's reason
            raise RoundRefused(f"{first} (round {sent.round + fl.offset}: {len(refused)} of {len(targets)} client(s) "
                               f"refused the task, and {need} valid result(s) are needed)")
        asked = [n for n in targets if n not in results and n not in refused]
        if attempt >= max_retries or not asked:
            break
        attempt += 1
    failures = "; ".join(f"{n}: {r.error}" for n, r in replies.items() if not r.ok)
    raise RoundFailed(
        f"round {sent.round + fl.offset}: only {len(results)} valid result(s) from {len(targets)} client(s) after "
        f"{attempt + 1} attempt(s), and {{min_clients}} is {need}; the global model is left as the last completed "
        "round made it. Lower {min_clients}, raise {max_retries} or {task_timeout}, or fix the failing clients. "
        f"Failures (each client's last reply): {failures}", field="min_clients"
    )
