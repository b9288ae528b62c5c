"""Example-level differential privacy: DP-SGD on every client, with each client's own accountant.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") makes what a client sends change
little with any one of its training examples: batches are Poisson-sampled with ``sample_rate =
batch_size / n`` and every step clips each example's gradient to ``max_grad_norm`` and adds Gaussian
noise (Opacus' `GradSampleModule` and `DPOptimizer`). Use it when single records (patients, images)
must stay hidden and clients are few.

`DPSGD` is one object with two halves. Its client half runs inside the standard trainer on every
client that gets a training task; each client keeps its accountant's history in its state, reports
its cumulative ``epsilon`` (and ``epsilon_next``, after one more such round) and refuses
(`BudgetExhausted`) a round that would take it past ``target_epsilon``. Its server half records the
worst client's epsilon as the round's ``client_epsilon`` and, with a target, stops the run cleanly
before a round that would cross it; a round the clients refuse (a budget too small for even one
round) ends the run cleanly too. A retried round asks only the clients that failed, so each
client's accountant counts exactly the rounds it trained. The sampling rate is the trainer's (batch
size over examples), the one place that draws batches, so the accountant cannot be told another.

>>> import fedkit as fk
>>> wf = fk.FedAvg(rounds=5, extensions=(DPSGD(noise_multiplier=1.1),))
>>> wf.extensions[0].max_grad_norm
1.0
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Mapping

import torch
from torch import nn

from .. import metrics as M
from ..client import Refused
from ..errors import ConfigError
from ..exchange import DXO, MetaKey
from ..seeds import DP_SGD_NOISE, derive_seed
from ..server import ServerContext
from ..train import LocalTraining
from ..workflows.extensions import Extension
from ..workflows.scatter_gather import FedAvg
from .accounting import (account, check_delta, check_delta_below, check_mechanism, check_number, epsilon,
                         noise_multiplier_for, opacus)


class BudgetExhausted(Refused, RuntimeError):
    """A client was asked to train a round that would take it past its DP-SGD ``target_epsilon``.

    A refusal (`fedkit.client.Refused`): the client trains nothing and spends nothing, is not asked again
    in that round, and a round left short by refusals ends the run cleanly with a ``stopped`` event.
    """


@dataclass(frozen=True)
class DPSGD(Extension):
    """Example-level DP-SGD on every client: ``FedAvg(extensions=(DPSGD(noise_multiplier=1.0),))``.

    Give ``noise_multiplier`` (and ``max_grad_norm``), or ``target_epsilon`` alone and the noise is
    computed so that the workflow's rounds (or ``rounds``, the rounds each client may train) spend
    at most the target. With both, the noise is the one given and ``target_epsilon`` is a budget:
    the run stops before a round that would take any client past it.

    >>> DPSGD(noise_multiplier=1.1, max_grad_norm=1.0).delta
    1e-05
    """

    noise_multiplier: float | None = None  # sigma: noise std / max_grad_norm; None: from target_epsilon and rounds
    max_grad_norm: float = 1.0  # C: each example's gradient is clipped to this L2 norm (Opacus' usual 1.0)
    target_epsilon: float | None = None  # the epsilon a client never exceeds
    delta: float = 1e-5  # keep it well below 1 / (examples per client)
    rounds: int | None = None  # training rounds planned per client, to turn target_epsilon into noise; None: the workflow's
    accountant: str = "rdp"  # "rdp" (Opacus' default) or "prv" (tighter, slower)
    vectorized: ClassVar[bool | str] = "DP-SGD runs per client (Opacus)"

    def __post_init__(self) -> None:
        check_number("DPSGD.noise_multiplier", self.noise_multiplier, low=0.0, allow_none=True, finite=True)
        check_number("DPSGD.max_grad_norm", self.max_grad_norm, low=0.0, strict=True, finite=True)
        check_number("DPSGD.target_epsilon", self.target_epsilon, low=0.0, strict=True, allow_none=True)
        check_delta("DPSGD.delta", self.delta)
        check_mechanism(self.accountant)
        if self.rounds is not None and (isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1):
            raise ConfigError("{rounds} must be an integer >= 1 or None", obj=self, field="rounds", value=self.rounds)
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ConfigError("DPSGD needs noise_multiplier=..., or target_epsilon=... (the noise is then computed for the "
                              "planned rounds); got neither")

    def bind(self, workflow: FedAvg) -> "DPSGD":
        if self.noise_multiplier is None and self.rounds is None:
            return dataclasses.replace(self, rounds=workflow.rounds)  # every client may train every round
        return self

    def check_population(self, examples: Mapping[str, int]) -> None:
        """Refuse a delta not below 1 / the training examples of the smallest client: the guarantee is each
        client's, over its own examples, so the client with the fewest bounds delta."""
        held = {c: n for c, n in examples.items() if n > 0}  # a client with no examples trains nothing, spends nothing
        if held:
            smallest = min(held, key=held.get)
            check_delta_below("DPSGD.delta", self.delta, held[smallest],
                              f"the training examples of the smallest client ({smallest!r}: {held[smallest]})")

    def check_model(self, model: nn.Module) -> None:
        """Raise `ConfigError` saying how to fix ``model`` if Opacus cannot train it privately (e.g. BatchNorm)."""
        check_model(model)

    # ---- client half: inside the standard trainer

    def client_begin(self, t: LocalTraining) -> None:
        """Check the budget, wrap the model once (Opacus' GradSampleModule), make the steps private."""
        ctx, n, cfg = t.ctx, len(t.data), t.config
        state = ctx.state.setdefault("dp_sgd", {"history": []})
        q = min(1.0, cfg.batch_size / max(n, 1))
        per_epoch = 1 if q >= 1.0 else max(1, round(n / cfg.batch_size))
        steps = cfg.epochs * per_epoch
        z = self.noise_multiplier
        if z is None:  # a function of settings and data size only: the same after a resume
            if self.rounds is None:
                raise ConfigError("DPSGD(target_epsilon=...) without noise_multiplier needs the planned rounds: use it "
                                  "in a FedAvg (which gives its rounds) or give DPSGD(rounds=...)")
            z = noise_multiplier_for(self.target_epsilon, self.delta, q, self.rounds * steps, self.accountant)
        if self.target_epsilon is not None:
            spent = epsilon(state["history"], self.delta, self.accountant)
            after = epsilon(account(state["history"], z, q, steps), self.delta, self.accountant)
            if after > self.target_epsilon:
                raise BudgetExhausted(f"privacy budget: client {ctx.client!r} has spent epsilon {spent:.4g} (delta "
                                      f"{self.delta:g}); another round would take it to {after:.4g}, past its "
                                      f"target_epsilon {self.target_epsilon:g}")
        wrapped = ctx.state.get("_grad_sample")  # a cache: (model, its GradSampleModule)
        if wrapped is None or wrapped[0] is not t.model:  # wrap once: GradSampleModule hooks the model's layers
            check_model(t.model)
            ctx.state["_grad_sample"] = (t.model, opacus().GradSampleModule(t.model, loss_reduction="mean"))
        t.private = PrivateSGD(self, state, float(z), q, per_epoch, cfg.batch_size if q < 1.0 else max(n, 1))

    def client_end(self, t: LocalTraining) -> None:
        """Account the private steps taken; report the client's cumulative epsilon."""
        t.metrics.update(t.private.account(int(t.stats["steps"])))  # cumulative over the rounds this client trained

    # ---- server half

    def before_round(self, fl: ServerContext, round: int) -> str | None:
        """With a target: stop before a round that would take a client past it (from the clients' ``epsilon_next``)."""
        if self.target_epsilon is None:
            return None
        latest: dict[str, float] = {}
        for record in fl.history:
            for client, row in record.clients.items():
                if M.EPSILON_NEXT in row:
                    latest[client] = row[M.EPSILON_NEXT]
        over = {c: e for c, e in latest.items() if e > self.target_epsilon}
        if not over:
            return None
        worst = max(over, key=over.get)
        return (f"privacy budget: round {round + fl.offset} would take client {worst!r} to epsilon {over[worst]:.4g} > "
                f"target_epsilon {self.target_epsilon:g} ({len(over)} client(s) at their budget)")

    def round_metrics(self, fl: ServerContext, results: dict[str, DXO]) -> dict[str, Any]:
        """The round's ``client_epsilon``: the largest cumulative epsilon of any client so far (it only grows)."""
        eps = [r.meta.get(MetaKey.METRICS, {}).get(M.EPSILON) for r in results.values()]
        eps = [e for e in eps if e is not None]
        if not eps:
            return {}
        return {M.CLIENT_EPSILON: max([*eps, fl.history.last(M.CLIENT_EPSILON, 0.0)])}


@dataclass
class PrivateSGD:
    """One client's DP-SGD for one round: Poisson batches, Opacus' DPOptimizer, and the accounting after."""

    config: DPSGD
    state: dict[str, Any]  # the client's "dp_sgd" state: {"history": [...]}, checkpointed
    noise_multiplier: float
    sample_rate: float  # q = batch_size / n
    steps_per_epoch: int  # round(n / batch_size): one epoch in expectation
    expected_batch_size: int

    def batches(self, n: int, generator: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
        """One epoch of Poisson batches: every example joins each batch independently with probability q."""
        for _ in range(self.steps_per_epoch):
            yield torch.nonzero(torch.rand(n, generator=generator) < self.sample_rate).flatten().to(device)

    def optimizer(self, opt: torch.optim.Optimizer, seed: int) -> Any:
        """``opt`` inside Opacus' DPOptimizer, its noise drawn from a generator seeded by the task's seed."""
        DPOptimizer = opacus("opacus.optimizers").DPOptimizer
        device = opt.param_groups[0]["params"][0].device
        gen = torch.Generator(device=device).manual_seed(derive_seed(seed, DP_SGD_NOISE))
        return DPOptimizer(opt, noise_multiplier=self.noise_multiplier, max_grad_norm=self.config.max_grad_norm,
                           expected_batch_size=self.expected_batch_size, loss_reduction="mean", generator=gen)

    def account(self, steps: int) -> dict[str, float]:
        """Record ``steps`` private steps; the client's cumulative epsilon, and what one more such round would make it."""
        cfg = self.config
        self.state["history"] = account(self.state["history"], self.noise_multiplier, self.sample_rate, steps)
        return {M.EPSILON: epsilon(self.state["history"], cfg.delta, cfg.accountant),
                M.EPSILON_NEXT: epsilon(account(self.state["history"], self.noise_multiplier, self.sample_rate, steps),
                                        cfg.delta, cfg.accountant),
                M.DELTA: cfg.delta, M.NOISE_MULTIPLIER: self.noise_multiplier}


def check_model(model: nn.Module) -> None:
    """Raise `ConfigError` if Opacus cannot compute per-example gradients of ``model``, saying how to fix it."""
    ModuleValidator = opacus("opacus.validators").ModuleValidator
    was_training = model.training
    model.train()  # Opacus validates a model in training mode
    try:
        errors = ModuleValidator.validate(model, strict=False)
    finally:
        model.train(was_training)
    if errors:
        reasons = "; ".join(f"{type(e).__name__}: {str(e).split('. ')[0]}" for e in errors)
        raise ConfigError(
            f"DP-SGD cannot train {type(model).__name__}: Opacus reports {len(errors)} problem(s): {reasons}. "
            "Fix the model: build it as opacus.validators.ModuleValidator.fix(model) (BatchNorm becomes GroupNorm), "
            "or use nn.GroupNorm / nn.LayerNorm instead of BatchNorm and Opacus' DPLSTM instead of nn.LSTM."
        )
