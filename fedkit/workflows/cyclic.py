"""Cyclic weight transfer: one model travels from client to client, each training it in turn.

Chang et al. 2018 ("Distributed deep learning networks among institutions for medical imaging",
JAMIA) train one model by passing it around the sites; NVFlare's ``CyclicController`` is this
workflow. There is no averaging: each client starts from the model the previous one left, so the
order matters and a client sees every other client's progress within the same round. Use it with a
handful of sites that are reachable one after another and whose data are not too different; with
strongly non-IID data the model tends to forget the sites visited earlier in the cycle.

With ``he=CKKS()`` the travelling model is encrypted: each client decrypts it, trains, and sends back
its encrypted update, which the server adds to the model it relays without being able to read it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError, UpdateError
from ..exchange import DXO, Task, Weights
from ..global_model import Encryption
from ..server import Controller, ServerContext
from ..weights import add

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
    he: Encryption | None = None  # encrypt the travelling model (fedkit.he.CKKS): the server relays ciphertexts

    def __post_init__(self) -> None:
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 1:
            raise ConfigError("{rounds} must be an integer >= 1", obj=self, field="rounds", value=self.rounds)
        if self.order not in ORDERS:
            raise ConfigError(f"{{order}} must be one of {', '.join(map(repr, ORDERS))}", obj=self, field="order",
                              value=self.order)
        if self.he is not None and not isinstance(self.he, Encryption):
            raise ConfigError(f"Cyclic.he must be fedkit.he.CKKS(...) or None, got {self.he!r}")

    def visit_order(self, clients: list[str], rng: np.random.Generator) -> list[str]:
        """The clients in the order a cycle visits them; ``rng`` draws the shuffled order (`ServerContext.rng`)."""
        if self.order == "fixed":
            return list(clients)
        return [clients[i] for i in rng.permutation(len(clients))]

    def control_flow(self, fl: ServerContext) -> None:
        if fl.model.encryption != self.he:
            raise ConfigError(f"Cyclic has he={self.he!r} but the server's model has encryption {fl.model.encryption!r}: "
                              "the run was not provisioned for it")
        for rnd in range(fl.start_round, self.rounds):
            started = time.perf_counter()
            travelling = fl.model.copy()  # the global model changes only once the cycle is complete
            replies = {}
            # stream 3: apart from client sampling; the same order for the same seed and round
            for name in self.visit_order(list(fl.client_names), fl.rng(rnd, 3)):
                reply = fl.send_and_wait(Task(self.task_name, travelling.task_data({}), round=rnd), name)
                replies[name] = reply
                valid = travelling.screen({name: reply}, max_norm_ratio=None)
                if name not in valid:
                    raise UpdateError(f"round {rnd + fl.offset}: cyclic weight transfer needs a valid update from every "
                                      f"client it visits ({name}: {reply.error or 'no answer'})")
                travelling.update(valid, {name: 1.0}, self.step)
            fl.server.model = travelling
            fl.end_round(rnd, replies, started)

    @staticmethod
    def step(weights: Weights, results: dict[str, DXO]) -> Weights:
        """Add one client's screened WEIGHT_DIFF to the travelling model."""
        (result,) = results.values()
        return add(weights, result.data)
