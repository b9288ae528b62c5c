"""Run workflows one after another on the same federation: ``Chain(FedAvg(rounds=5), CrossSiteEval())``.

NVFlare lists several workflows in one job and runs them in sequence; `Chain` is that. The parts
share the server (so the global model one part leaves is where the next one starts), the clients
(with their state: a trained local model, standardized data...) and the history.

Each part counts its own rounds from 0, as if it ran alone; the chain shifts them by the rounds of
the parts before it wherever a round leaves the part: in the tasks clients receive (and so in the
seeds they derive), in client sampling and in the history. ``Chain(FedAvg(rounds=2), FedAvg(rounds=2))``
therefore gives exactly the run of ``FedAvg(rounds=4)``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

from ..errors import ConfigError
from ..exchange import Task
from ..history import RoundRecord
from ..server import Controller, Reply, ServerContext


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

    @property
    def rounds(self) -> int:  # type: ignore[override]
        return sum(p.rounds for p in self.parts)

    def control_flow(self, fl: ServerContext) -> None:
        offset = 0
        for part in self.parts:
            end = offset + part.rounds
            # On a resume, parts that finished before the checkpoint are skipped: one with rounds ends
            # at or before the resumed round; one without rounds (statistics, scaling) ran if a later
            # round was checkpointed. Running them again would, e.g., scale data a second time.
            finished = end <= fl.start_round if part.rounds > 0 else offset < fl.start_round
            if not finished:
                part.control_flow(shifted(fl, offset))
            offset = end


@dataclass
class _Shifted(ServerContext):
    """A `ServerContext` whose rounds are ``offset`` later on the way out (tasks, sampling, history)."""

    offset: int = 0

    def broadcast_and_wait(self, task: Task, targets: Sequence[str] | None = None) -> dict[str, Reply]:
        return super().broadcast_and_wait(replace(task, round=task.round + self.offset), targets)

    def sample_clients(self, k: int | None, round: int) -> list[str]:
        return super().sample_clients(k, round + self.offset)

    def sample_poisson(self, rate: float, round: int) -> list[str]:
        return super().sample_poisson(rate, round + self.offset)

    def end_round(self, round: int, replies: dict[str, Reply], started: float, **metrics: float) -> RoundRecord:
        return super().end_round(round + self.offset, replies, started, **metrics)


def shifted(fl: ServerContext, by: int) -> ServerContext:
    """``fl`` as a part that starts ``by`` rounds into the run sees it (``start_round`` shifted back too)."""
    start = max(0, fl.start_round - by)
    if isinstance(fl, _Shifted):  # a chain inside a chain: offsets add up
        return replace(fl, offset=fl.offset + by, start_round=start)
    values = {f.name: getattr(fl, f.name) for f in fields(fl) if f.init}
    return _Shifted(**{**values, "start_round": start}, offset=by)
