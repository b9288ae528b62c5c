"""Run workflows one after another on the same federation: ``Chain(FedAvg(rounds=5), CrossSiteEval())``.

NVFlare lists several workflows in one job and runs them in sequence; `Chain` is that. The parts
share the server (so the global model one part leaves is where the next one starts), the clients
(with their state: a trained local model, standardized data...) and the history.

Each part counts its own rounds from 0, as if it ran alone; the chain hands it a `ServerContext`
whose ``offset`` is the rounds of the parts before it. Every round that leaves the part goes
through that context (tasks, and so the seeds clients derive, client sampling, events, the
history), so ``Chain(FedAvg(rounds=2), FedAvg(rounds=2))`` gives exactly the run of ``FedAvg(rounds=4)``.

Encryption is one setting of the whole chain: every part that uses the global model must declare
the same ``he``; a part that would read the model in plaintext (cross-site evaluation) is refused
beside an encrypted one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from torch import nn

from ..errors import ConfigError
from ..server import Controller, ServerContext


@dataclass(frozen=True, init=False)
class Chain(Controller):
    """Run ``parts`` in order; ``rounds`` is the sum of theirs (analysis workflows count 0).

    >>> from fedkit.workflows import FedAvg, CrossSiteEval
    >>> Chain(FedAvg(rounds=5), CrossSiteEval()).rounds
    5
    """

    parts: tuple[Controller, ...]

    def __init__(self, *parts: Controller) -> None:
        if not parts:
            raise ConfigError("Chain needs at least one workflow, e.g. Chain(FedAvg(rounds=5), CrossSiteEval())")
        for i, p in enumerate(parts):
            if not isinstance(p, Controller):
                raise ConfigError(f"Chain part {i} is a {type(p).__name__}; every part must be a Controller "
                                  "such as FedAvg(...) or CrossSiteEval()")
            r = getattr(p, "rounds", None)
            if not isinstance(r, int) or isinstance(r, bool) or r < 0:
                raise ConfigError(f"Chain part {i} ({type(p).__name__}) has rounds = {r!r}; a part must say how "
                                  "many history rounds it records, as an integer >= 0")
        object.__setattr__(self, "parts", tuple(parts))
        _ = self.he  # refuse mixed encryption now, not when the run starts

    @property
    def rounds(self) -> int:  # type: ignore[override]
        return sum(p.rounds for p in self.parts)

    @property
    def he(self) -> Any:  # type: ignore[override]
        """The encryption every part that uses the global model shares (None: plaintext)."""
        users = [p for p in self.parts if p.uses_model]
        settings = {p.he for p in users}
        if len(settings) > 1:
            plain = [type(p).__name__ for p in users if p.he is None]
            raise ConfigError(f"Chain mixes an encrypted global model with parts that use it in plaintext "
                              f"({', '.join(plain)}); with HE the server cannot read the model, so every part that "
                              "sends or reads it must run encrypted (FedAvg(he=...), Cyclic(he=...)). Cross-site "
                              "evaluation cannot: the clients' scores of the global model are in each round's "
                              "client_accuracy instead")
        return settings.pop() if settings else None

    @property
    def uses_local_models(self) -> bool:  # type: ignore[override]
        """Whether any part asks clients for their local models (cross-site evaluation)."""
        return any(p.uses_local_models for p in self.parts)

    def check_model(self, model: nn.Module) -> None:
        for p in self.parts:
            p.check_model(model)

    def check_federation(self, clients: Sequence[str]) -> None:
        for p in self.parts:
            p.check_federation(clients)

    def check_population(self, examples: Mapping[str, int]) -> None:
        for p in self.parts:
            p.check_population(examples)

    def control_flow(self, fl: ServerContext) -> None:
        offset = 0
        for part in self.parts:
            end = offset + part.rounds
            # On a resume, parts that finished before the checkpoint are skipped: one with rounds ends
            # at or before the resumed round; one without rounds (statistics, scaling) ran if a later
            # round was checkpointed. Running them again would, e.g., scale data a second time.
            finished = end <= fl.start_round if part.rounds > 0 else offset < fl.start_round
            if not finished:
                part.control_flow(replace(fl, offset=fl.offset + offset, start_round=max(0, fl.start_round - offset),
                                          controller=type(part).__name__))
            offset = end
