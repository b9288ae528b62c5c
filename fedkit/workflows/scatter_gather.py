"""Scatter and gather: send the global model to the sampled clients, aggregate what they send back.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data") is this loop with the weighted mean of the clients' weight differences, each client weighed
by its number of training samples. Use it as the baseline for every other algorithm.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ..aggregate import Rule, by_samples, rule_name, weighted_mean
from ..errors import ConfigError, UpdateError
from ..exchange import DXO, DataKind, Task
from ..server import Controller, ServerContext, require_ok
from ..weights import add, check_update


@dataclass(frozen=True)
class FedAvg(Controller):
    """Federated averaging over ``rounds`` rounds.

    ``aggregate`` is any rule ``[(update, weight), ...] -> update`` (see `fedkit.aggregate`; a rule
    with settings goes in as ``functools.partial(trimmed_mean, beta=0.2)`` or a lambda);
    ``weigh`` turns a client's result into its aggregation weight (`by_samples` by default,
    `by_steps` as NVFlare offers, or `uniform`).

    >>> FedAvg(rounds=5, clients_per_round=4).rounds
    5
    """

    rounds: int = 10
    clients_per_round: int | None = None  # None: every client, every round
    aggregate: Rule = weighted_mean
    weigh: Callable[[DXO], float] = by_samples
    task_name: str = "train"

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 1:
            raise ConfigError(f"FedAvg.rounds must be an integer >= 1, got {self.rounds!r}")
        k = self.clients_per_round
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ConfigError(f"FedAvg.clients_per_round must be an integer >= 1 or None (all), got {k!r}")
        if not callable(self.aggregate):
            raise ConfigError(f"FedAvg.aggregate must be a rule [(update, weight), ...] -> update such as "
                              f"fedkit.aggregate.weighted_mean, got {self.aggregate!r}")

    def control_flow(self, fl: ServerContext) -> None:
        for rnd in range(fl.start_round, self.rounds):
            started = time.perf_counter()
            targets = fl.sample_clients(self.clients_per_round, rnd)
            task = Task(self.task_name, DXO(DataKind.WEIGHTS, fl.server.weights), round=rnd)
            replies = fl.broadcast_and_wait(task, targets)
            fl.server.weights = self.step(fl.server.weights, require_ok(replies, rnd))
            fl.end_round(rnd, replies, started)

    def step(self, weights, results: dict[str, DXO]):
        """One server update: check each WEIGHT_DIFF, aggregate them, add the result to ``weights``."""
        for name, r in results.items():
            if r.kind != DataKind.WEIGHT_DIFF:
                raise UpdateError(f"client {name!r} answered {r.kind.value}; {type(self).__name__} expects "
                                  "WEIGHT_DIFF (local weights minus the global weights it received)")
            check_update(r.data, weights, f"client {name!r}")
        diff = self.aggregate([(r.data, self.weigh(r)) for r in results.values()])
        check_update(diff, weights, f"aggregation rule {rule_name(self.aggregate)!r}")
        return add(weights, diff)
