"""Cyclic weight transfer: one model travels from client to client, each training it in turn.

Chang et al. 2018 ("Distributed deep learning networks among institutions for medical imaging",
JAMIA) train one model by passing it around the sites; NVFlare's ``CyclicController`` is this
workflow. There is no averaging: each client starts from the model the previous one left, so the
order matters and a client sees every other client's progress within the same round. Use it with a
handful of sites that are reachable one after another and whose data are not too different; with
strongly non-IID data the model tends to forget the sites visited earlier in the cycle.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, UpdateError
from ..exchange import DXO, DataKind, Task, Weights
from ..server import Controller, ServerContext, require_ok
from ..weights import add, check_update

ORDERS = ("fixed", "shuffled")


@dataclass(frozen=True)
class Cyclic(Controller):
    """Cyclic weight transfer over ``rounds`` cycles; one history round per full cycle.

    Each client answers the ``train`` task (WEIGHTS in) with a WEIGHT_DIFF, which is added to the
    model before it goes to the next client. ``order="fixed"`` visits the clients in the federation's
    order every cycle; ``"shuffled"`` draws a new order each cycle from the run's seed and the round.

    >>> Cyclic(rounds=3, order="shuffled").rounds
    3
    """

    rounds: int = 5
    order: str = "fixed"
    task_name: str = "train"

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 1:
            raise ConfigError(f"Cyclic.rounds must be an integer >= 1, got {self.rounds!r}")
        if self.order not in ORDERS:
            raise ConfigError(f"Cyclic.order must be one of {', '.join(map(repr, ORDERS))}, got {self.order!r}")

    def visit_order(self, clients: list[str], seed: int, round: int) -> list[str]:
        """The clients in the order ``round`` visits them: the same for the same seed and round."""
        if self.order == "fixed":
            return list(clients)
        rng = np.random.default_rng([seed, round, 3])  # 3: a stream of its own, apart from client sampling
        return [clients[i] for i in rng.permutation(len(clients))]

    def control_flow(self, fl: ServerContext) -> None:
        for rnd in range(fl.start_round, self.rounds):
            started = time.perf_counter()
            weights = fl.server.weights
            replies = {}
            for name in self.visit_order(fl.client_names, fl.seed, rnd):
                reply = fl.send_and_wait(Task(self.task_name, DXO(DataKind.WEIGHTS, weights), round=rnd), name)
                replies[name] = reply
                weights = self.step(weights, name, require_ok({name: reply}, rnd)[name])
            # the global model changes only once the cycle is complete: an abort mid-cycle leaves the last one
            fl.server.weights = weights
            fl.end_round(rnd, replies, started)

    def step(self, weights: Weights, client: str, result: DXO) -> Weights:
        """Add one client's checked WEIGHT_DIFF to the travelling model."""
        if result.kind != DataKind.WEIGHT_DIFF:
            raise UpdateError(f"client {client!r} answered {result.kind.value}; Cyclic expects WEIGHT_DIFF "
                              "(local weights minus the weights it received)")
        check_update(result.data, weights, f"client {client!r}")
        return add(weights, result.data)
