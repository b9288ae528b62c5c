"""Scatter and gather: send the global model to the sampled clients, aggregate what they send back.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data") is this loop with the weighted mean of the clients' weight differences, each client weighed
by its number of training samples. Use it as the baseline for every other algorithm.

FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization") is the same loop with a server
optimizer (`fedkit.server_opt`) applied to the aggregated difference; `FedOpt(...)` is a `FedAvg`
with ``server_opt`` set. Use it when FedAvg's progress stalls on non-iid clients.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from ..aggregate import Rule, by_samples, rule_name, weighted_mean
from ..errors import ConfigError, UpdateError
from ..exchange import DXO, DataKind, Task, Weights
from ..server import Controller, ServerContext, require_ok
from ..server_opt import SGD, ServerOptimizer
from ..weights import add, check_update


@dataclass(frozen=True)
class FedAvg(Controller):
    """Federated averaging over ``rounds`` rounds.

    ``aggregate`` is any rule ``[(update, weight), ...] -> update`` (see `fedkit.aggregate`; a rule
    with settings goes in as ``functools.partial(trimmed_mean, beta=0.2)`` or a lambda);
    ``weigh`` turns a client's result into its aggregation weight (`by_samples` by default,
    `by_steps` as NVFlare offers, or `uniform`); ``server_opt`` (see `fedkit.server_opt`) moves the
    global model along the aggregate, None adds it as it is.

    >>> FedAvg(rounds=5, clients_per_round=4).rounds
    5
    """

    rounds: int = 10
    clients_per_round: int | None = None  # None: every client, every round
    aggregate: Rule = weighted_mean
    weigh: Callable[[DXO], float] = by_samples
    task_name: str = "train"
    server_opt: ServerOptimizer | None = None  # None: plain FedAvg, global + aggregate

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 1:
            raise ConfigError(f"FedAvg.rounds must be an integer >= 1, got {self.rounds!r}")
        k = self.clients_per_round
        if k is not None and (not isinstance(k, int) or k < 1):
            raise ConfigError(f"FedAvg.clients_per_round must be an integer >= 1 or None (all), got {k!r}")
        if not callable(self.aggregate):
            raise ConfigError(f"FedAvg.aggregate must be a rule [(update, weight), ...] -> update such as "
                              f"fedkit.aggregate.weighted_mean, got {self.aggregate!r}")
        if self.server_opt is not None and not isinstance(self.server_opt, ServerOptimizer):
            raise ConfigError(f"FedAvg.server_opt must be a server optimizer (with init and step) such as "
                              f"fedkit.server_opt.SGD(momentum=0.6), or None for plain FedAvg; got {self.server_opt!r}")

    def control_flow(self, fl: ServerContext) -> None:
        for rnd in range(fl.start_round, self.rounds):
            started = time.perf_counter()
            targets = fl.sample_clients(self.clients_per_round, rnd)
            task = Task(self.task_name, DXO(DataKind.WEIGHTS, fl.server.weights), round=rnd)
            replies = fl.broadcast_and_wait(task, targets)
            fl.server.weights = self.step(fl.server.weights, require_ok(replies, rnd), fl.server.state, rnd)
            fl.end_round(rnd, replies, started)

    def step(self, weights: Weights, results: dict[str, DXO], state: dict[str, Any] | None = None,
             round: int = 0) -> Weights:
        """One server update: check each WEIGHT_DIFF, aggregate them, apply the result to ``weights``.

        ``state`` is the run's state (``fl.server.state``); the server optimizer keeps its own under
        ``"server_opt"``, made by ``server_opt.init`` on the first step. None: a fresh state.
        """
        for name, r in results.items():
            if r.kind != DataKind.WEIGHT_DIFF:
                raise UpdateError(f"client {name!r} answered {r.kind.value}; {type(self).__name__} expects "
                                  "WEIGHT_DIFF (local weights minus the global weights it received)")
            check_update(r.data, weights, f"client {name!r}")
        diff = self.aggregate([(r.data, self.weigh(r)) for r in results.values()])
        check_update(diff, weights, f"aggregation rule {rule_name(self.aggregate)!r}")
        if self.server_opt is None:
            return add(weights, diff)
        state = {} if state is None else state
        if "server_opt" not in state:
            state["server_opt"] = self.server_opt.init(weights)
        new, state["server_opt"] = self.server_opt.step(weights, diff, state["server_opt"], round)
        check_update(new, weights, f"server optimizer {self.server_opt!r}")
        return new


def FedOpt(rounds: int = 10, server_opt: ServerOptimizer = SGD(lr=1.0, momentum=0.6), **settings: Any) -> FedAvg:
    """FedAvg whose server moves the global model with ``server_opt`` (default: NVFlare's FedOpt, FedAvgM).

    Reddi et al. 2021, "Adaptive Federated Optimization". ``settings`` are the other `FedAvg`
    fields (``clients_per_round``, ``aggregate``, ``weigh``, ...).

    >>> from fedkit.server_opt import Yogi
    >>> FedOpt(rounds=20, server_opt=Yogi(lr=0.03)).server_opt
    Yogi(lr=0.03, beta1=0.9, beta2=0.99, tau=0.001, lr_schedule=None)
    """
    if server_opt is None:
        raise ConfigError("FedOpt needs a server optimizer such as fedkit.server_opt.Adam(); "
                          "for none, use FedAvg")
    return FedAvg(rounds=rounds, server_opt=server_opt, **settings)
