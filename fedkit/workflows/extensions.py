"""Extensions of scatter-and-gather: what FedProx and SCAFFOLD add to FedAvg, as small composable parts.

An extension has two hooks: ``task_meta(fl)`` adds entries to the meta of every training task (the
standard `fedkit.Trainer` reads them), and ``after_aggregate(fl, results)`` updates server state
once a round's valid results are in. ``FedAvg(extensions=(Proximal(0.01), Scaffold()))`` composes them.

Three more hooks are optional, called only when an extension has them (in the order of ``extensions``):
``before_round(fl, round) -> str | None`` returns a reason to stop the run before that round (a spent
privacy budget); ``on_aggregate(fl, round, results, diff) -> diff`` changes the aggregate before it moves
the global model (DP-FedAvg's noise on the sum); ``round_metrics(fl) -> dict`` adds numbers to the
round's record (the privacy spent so far). `fedkit.privacy.dp.ServerDP` uses all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import ConfigError, UpdateError
from ..exchange import DXO
from ..server import ServerContext
from ..weights import check_update


class Extension(Protocol):
    def task_meta(self, fl: ServerContext) -> dict[str, Any]: ...

    def after_aggregate(self, fl: ServerContext, results: dict[str, DXO]) -> None: ...


@dataclass(frozen=True)
class Proximal:
    """FedProx's client-side proximal term mu/2 * ||w - w_global||^2 (Li et al. 2020, "Federated
    Optimization in Heterogeneous Networks"). Use it when clients' data differ and local work is long:
    it keeps local models near the global one. mu around 0.001-0.1; 0 is FedAvg."""

    mu: float = 0.01

    def __post_init__(self) -> None:
        if not (isinstance(self.mu, (int, float)) and self.mu >= 0):
            raise ConfigError(f"FedProx mu must be a number >= 0 (0 is plain FedAvg), got {self.mu!r}")

    def task_meta(self, fl: ServerContext) -> dict[str, Any]:
        return {"prox_mu": float(self.mu)}

    def after_aggregate(self, fl: ServerContext, results: dict[str, DXO]) -> None:
        return None


@dataclass(frozen=True)
class Scaffold:
    """SCAFFOLD's server half (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
    Federated Learning"): keep the global control variate c, send it with the model, and move it by
    |S|/N times the mean of the clients' control-variate changes. Clients correct their gradients by
    c - c_i, which cancels client drift on non-IID data. c lives in the server state (checkpointed)."""

    def task_meta(self, fl: ServerContext) -> dict[str, Any]:
        c = fl.server.state.get("scaffold_c")
        if c is None:
            c = {k: torch.zeros_like(v) for k, v in fl.server.weights.items() if v.is_floating_point()}
            fl.server.state["scaffold_c"] = c
        return {"scaffold_c": c}

    def after_aggregate(self, fl: ServerContext, results: dict[str, DXO]) -> None:
        if not results:  # a round that sampled nobody (Poisson sampling) leaves c as it is
            return
        c = fl.server.state["scaffold_c"]
        changes = []
        for name, r in results.items():
            dc = r.meta.get("scaffold_dc")
            if dc is None:
                raise UpdateError(f"client {name!r} returned no 'scaffold_dc'; SCAFFOLD needs clients that run the "
                                  "standard fk.Trainer (or an executor that reports its control-variate change)")
            check_update(dc, {k: c[k] for k in dc}, f"client {name!r} (SCAFFOLD control variate)")
            changes.append(dc)
        scale = len(changes) / len(fl.clients)
        fl.server.state["scaffold_c"] = {
            k: v + scale * torch.stack([dc[k] for dc in changes]).mean(0) if k in changes[0] else v
            for k, v in c.items()
        }
