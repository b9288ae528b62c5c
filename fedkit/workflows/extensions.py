"""Algorithms that extend scatter-and-gather, each one object with a server half and a client half.

An `Extension` is FedAvg plus one idea. Its server half is the hooks below, called by `FedAvg`'s
loop at fixed points; its client half is `fedkit.train.TrainHook`'s two methods, run by the
standard trainer on every client that gets one of FedAvg's training tasks (the object travels with
the task, so a setting both halves need, like FedProx's mu, has one home). Every hook does nothing
unless overridden, so an extension written in a cell overrides only what it changes:

>>> class CountRounds(Extension):
...     def round_metrics(self, fl, results):
...         return {"clients_heard": len(results)}

``FedAvg(extensions=(Proximal(0.01), Scaffold()))`` composes them, in order. An extension keeps its server state
in ``fl.state_of(self)``, a namespace of its own (checkpointed), so two of one class do not share it.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from ..errors import ConfigError, UpdateError
from ..exchange import DXO, Weights
from ..server import STATE_NAME, Controller, ServerContext
from ..train import LocalTraining, TrainHook, correction_hook, proximal_hook
from ..weights import check_update


class Extension(TrainHook):
    """One algorithm on top of FedAvg. Server half: the methods here; client half: `TrainHook`'s.

    ``needs_plaintext`` says why the server half cannot run on an encrypted model (None: it can);
    `FedAvg` refuses the extension with HE, quoting it.
    """

    needs_plaintext: ClassVar[str | None] = None
    # a result from an executor that skipped the client half is rejected, unless the server half alone keeps
    # the algorithm's promise (DP-FedAvg clips again on the server): then the client half is only a courtesy
    requires_client_half: ClassVar[bool] = True

    def bind(self, workflow: Controller) -> "Extension":
        """This extension as used by ``workflow``: take settings the workflow owns, refuse contradictions.

        `FedAvg` calls it when it is built; DP-FedAvg takes its sampling rate from here.
        """
        return self

    def check_model(self, model: nn.Module) -> None:
        """Refuse a model the client half cannot train (called once, when the simulator is built)."""

    def check_population(self, examples: Mapping[str, int]) -> None:
        """Refuse settings the clients' data cannot meet (``examples``: each client's training examples; called
        once, when the simulator is built), e.g. a DP delta not below 1 / the number of individuals hidden."""

    def task_meta(self, fl: ServerContext) -> dict[str, Any]:
        """Entries to add to the meta of every training task (e.g. SCAFFOLD's control variate)."""
        return {}

    def before_round(self, fl: ServerContext, round: int) -> str | None:
        """A reason to stop the run before ``round`` (a spent privacy budget), or None to go on."""
        return None

    def on_aggregate(self, fl: ServerContext, round: int, results: dict[str, DXO], diff: Weights) -> Weights:
        """The aggregate the global model moves by (DP-FedAvg replaces it by its noisy clipped mean)."""
        return diff

    @property
    def changes_aggregate(self) -> bool:
        """Whether this server half overrides `on_aggregate`: FedAvg then runs its own server step (never with HE)."""
        return type(self).on_aggregate is not Extension.on_aggregate

    def after_aggregate(self, fl: ServerContext, results: dict[str, DXO]) -> None:
        """Update server state once the round's valid results are in (SCAFFOLD's c)."""

    def round_metrics(self, fl: ServerContext, results: dict[str, DXO]) -> dict[str, Any]:
        """Numbers to add to the round's record (e.g. the privacy spent so far)."""
        return {}


def bind_all(extensions: Sequence[Extension], workflow: Controller) -> tuple[Extension, ...]:
    """``extensions`` as ``workflow`` runs them: each bound (`Extension.bind`) and named for its server state
    (`ServerContext.state_of`) by its class and rank in the workflow: ``Scaffold``, then ``Scaffold#2``.

    The names depend on the workflow alone, so a resumed run finds each state where it left it, and a `Chain` of
    two such workflows runs as one. Each is a copy: one extension object may sit in several workflows.
    """
    bound, seen = [], Counter()
    for ext in extensions:
        ext = copy.copy(ext.bind(workflow))
        kind = type(ext).__name__
        seen[kind] += 1
        object.__setattr__(ext, STATE_NAME, kind if seen[kind] == 1 else f"{kind}#{seen[kind]}")
        bound.append(ext)
    return tuple(bound)


@dataclass(frozen=True)
class Proximal(Extension):
    """FedProx's client-side proximal term mu/2 * ||w - w_global||^2 (Li et al. 2020, "Federated
    Optimization in Heterogeneous Networks"). Use it when clients' data differ and local work is long:
    it keeps local models near the global one. mu around 0.001-0.1; 0 is FedAvg."""

    mu: float = 0.01
    vectorized: ClassVar[bool | str] = True  # its term is a GradTerm (fedkit.engine.vectorized stacks it)

    def __post_init__(self) -> None:
        if isinstance(self.mu, bool) or not (isinstance(self.mu, (int, float)) and self.mu >= 0):
            raise ConfigError("{mu} must be a number >= 0 (FedProx's proximal weight; 0 is plain FedAvg)", obj=self, field="mu", value=self.mu)

    def client_begin(self, t: LocalTraining) -> None:
        if self.mu > 0:
            t.grad_hooks.append(proximal_hook(t.model, t.received, float(self.mu)))


@dataclass(frozen=True)
class Scaffold(Extension):
    """SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
    Learning"). The server keeps the global control variate c, sends it with the model, and moves it
    by |S|/N times the mean of the clients' control-variate changes; each client corrects its
    gradients by c - c_i, which cancels client drift on non-IID data, and returns the change of its
    own c_i (option II: c_i+ = c_i - c + (x - y) / (K lr)). c lives in its server state (``fl.state_of(self)``)
    and each c_i in its client's state (both checkpointed)."""

    needs_plaintext: ClassVar[str | None] = (
        "its control variates (scaffold_c, scaffold_dc) travel and are aggregated in plaintext, which would "
        "show the server what HE hides")
    vectorized: ClassVar[bool | str] = True  # its correction is a GradTerm (fedkit.engine.vectorized stacks it)

    def task_meta(self, fl: ServerContext) -> dict[str, Any]:
        state = fl.state_of(self)
        if "c" not in state:  # the first round; or a checkpoint of fedkit 0.1, which kept c under "scaffold_c"
            c = fl.server.state.pop("scaffold_c", None)
            state["c"] = c if c is not None else {k: torch.zeros_like(v) for k, v in fl.model.weights.items()
                                                  if v.is_floating_point()}
        return {"scaffold_c": state["c"]}

    def client_begin(self, t: LocalTraining) -> None:
        c = t.task.data.meta.get("scaffold_c")
        if c is None:
            raise ConfigError("a SCAFFOLD training task came without the server's control variate 'scaffold_c'")
        params = dict(t.model.named_parameters())
        c = {k: c[k].to(t.ctx.device) for k in params}
        c_i = t.ctx.state.setdefault("scaffold_ci", {k: torch.zeros_like(v, device="cpu") for k, v in params.items()})
        c_i = {k: v.to(t.ctx.device) for k, v in c_i.items()}
        t.notes["scaffold"] = (c, c_i)
        t.grad_hooks.append(correction_hook(t.model, {k: c[k] - c_i[k] for k in params}))

    def client_end(self, t: LocalTraining) -> None:
        c, c_i = t.notes["scaffold"]
        # Option II assumes plain SGD steps of size lr; with momentum beta a step is about lr / (1 - beta)
        # long, and without this correction c_i overshoots by 1 / (1 - beta) and the run diverges.
        step_size = t.config.lr / (1.0 - t.config.momentum)
        scale = 1.0 / (max(t.stats["steps"], 1) * step_size)
        new_ci = {k: (c_i[k] - c[k] - t.diff[k].to(t.ctx.device) * scale).cpu() for k in c_i}
        t.meta["scaffold_dc"] = {k: new_ci[k] - c_i[k].cpu() for k in new_ci}
        t.ctx.state["scaffold_ci"] = new_ci

    def after_aggregate(self, fl: ServerContext, results: dict[str, DXO]) -> None:
        if not results:  # a round that sampled nobody (Poisson sampling) leaves c as it is
            return
        state = fl.state_of(self)
        c = state["c"]
        changes = []
        for name, r in results.items():
            dc = r.meta.get("scaffold_dc")
            if dc is None:
                raise UpdateError(f"client {name!r} returned no 'scaffold_dc'; SCAFFOLD needs clients that run the "
                                  "standard fk.Trainer (or an executor that reports its control-variate change)")
            check_update(dc, {k: c[k] for k in dc}, f"client {name!r} (SCAFFOLD control variate)")
            changes.append(dc)
        scale = len(changes) / len(fl.client_names)
        state["c"] = {
            k: v + scale * torch.stack([dc[k] for dc in changes]).mean(0) if k in changes[0] else v
            for k, v in c.items()
        }
