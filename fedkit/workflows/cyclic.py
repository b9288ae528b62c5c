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

from dataclasses import dataclass

import numpy as np

from ..aggregate import uniform
from ..errors import ConfigError, UpdateError
from ..global_model import Encryption
from ..seeds import CYCLIC_ORDER
from ..server import Controller, ServerContext

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
                              "the run was not provisioned for it. A controller that runs it must declare the same he "
                              "(e.g. `he = inner.he`)")
        for r in range(fl.start_round, self.rounds):
            with fl.round(r) as rnd:
                travelling = fl.model.copy()  # the global model changes only once the cycle is complete
                # a stream apart from client sampling: the same order for the same seed and round
                for name in self.visit_order(list(fl.client_names), fl.rng(r, CYCLIC_ORDER)):
                    result = rnd.train([name], model=travelling, min_clients=0, max_retries=0, max_norm_ratio=None)
                    if not result:
                        raise UpdateError(f"round {r + fl.offset}: cyclic weight transfer needs a valid update from "
                                          f"every client it visits ({name}: {rnd.replies[name].error or 'no answer'})")
                    travelling.update(result, weigh=uniform)  # the one client's diff, whole
                fl.server.model = travelling
