"""Differential privacy with Opacus: DP-SGD on clients, DP-FedAvg on the server, and a real accountant.

Two guarantees answer two questions; each run reports the epsilon it has spent after every round.

* **Example-level DP (DP-SGD**, Abadi et al. 2016, "Deep Learning with Differential Privacy"): what a
  client sends changes little with any one of its training examples. It is the standard trainer made
  private, ``TrainConfig(dp=DPSGD(noise_multiplier=1.0, max_grad_norm=1.0))``: batches are
  Poisson-sampled with ``sample_rate = batch_size / n`` and every step clips each example's gradient
  and adds noise (Opacus' `GradSampleModule` and `DPOptimizer`). Each client keeps its accountant's
  history in its state, so the ``epsilon`` in its history rows is cumulative over the rounds it
  trained; the round's ``client_epsilon`` is the largest over clients.
* **User-level DP (DP-FedAvg**, McMahan et al. 2018, "Learning Differentially Private Recurrent
  Language Models"): the global model changes little with any one client's whole data. ``DPFedAvg(
  rounds, clip, noise_multiplier, sample_rate)`` samples every client with probability q each round,
  clips each update to L2 norm S (`clip_update`), adds N(0, (z S)^2) to the sum (`add_noise`) and
  divides by the expected number of clients q N. The round's ``epsilon`` comes from an accountant
  with ``sample_rate`` q and one step per round. Clipping can adapt (Andrew et al. 2021, `AdaptiveClip`).

Use DP-SGD when single records (patients, images) are what must stay hidden and clients are few;
use DP-FedAvg when whole clients (users, devices) must, which needs many clients for useful accuracy.

Accounting is Opacus': RDP (``"rdp"``, the default) or PRV (``"prv"``, tighter, slower). An accountant
is its history, ``[(noise_multiplier, sample_rate, steps), ...]`` exactly as Opacus'
``accountant.history``; fedkit keeps that list as plain data in the client's or server's state, so it
survives checkpoints, and `epsilon` rebuilds the number from it.

**Budget**: with ``target_epsilon`` a run never exceeds it. Without a noise multiplier the noise is
chosen so that the planned rounds end at the target (Opacus' `get_noise_multiplier`); with one, the
run stops before the round that would cross the target (a ``"stopped"`` event in the history, the
reason in ``run.summary()["stopped"]``, status ``"done"``), and the last completed round is checkpointed.

**Order with other filters**: DP-SGD is a step of the trainer, so it happens before any result filter.
`ClipUpdate` is a client result filter; filters run in list order, so put it *before* an encryption
filter (``client_result_filters=[ClipUpdate(1.0), encrypt]``): clipping needs the plain update, and it
refuses one that is already encrypted.

Every random number is seeded from (run seed, round, client) or from the accountant's step count, so
a private run repeats exactly and a resumed one ends with the same weights and the same epsilon.
Opacus' ``secure_mode`` (noise hardened against floating-point attacks) is off, as in Opacus by default.
"""

from __future__ import annotations

import argparse
import functools
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..aggregate import uniform
from ..client import derive_seed
from ..errors import ConfigError
from ..exchange import DXO, ClientContext, DataKind, FilterContext, Weights
from ..workflows.scatter_gather import FedAvg, update_norm

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

    from ..server import ServerContext
    from ..train import TrainConfig

MECHANISMS = ("rdp", "prv")
History = list[list[float]]
"""An accountant's history: ``[[noise_multiplier, sample_rate, steps], ...]``, as Opacus' ``accountant.history``."""

CLIP_KEY = "dp_clip"  # task meta: the clip norm the server asks for this round (ServerDP)
CLIPPED_KEY = "dp_clipped"  # result meta: True when ClipUpdate had to scale the update down
_NOISE, _LOCAL_NOISE, _COUNT_NOISE = 11, 12, 13  # seed streams of their own


class BudgetExhausted(RuntimeError):
    """A client was asked to train a round that would take it past its DP-SGD ``target_epsilon``."""


# ------------------------------------------------------------------------------------------- accounting

def account(history: Sequence[Sequence[float]], noise_multiplier: float, sample_rate: float,
            steps: int = 1) -> History:
    """``history`` after ``steps`` more steps of the subsampled Gaussian mechanism (a new list).

    Steps with the same noise and sample rate as the last entry are merged into it, as Opacus'
    accountants do, so the history stays short.

    >>> account(account([], 1.0, 0.1, 10), 1.0, 0.1, 5)
    [[1.0, 0.1, 15]]
    """
    out = [list(h) for h in history]
    if out and out[-1][0] == noise_multiplier and out[-1][1] == sample_rate:
        out[-1][2] = int(out[-1][2]) + int(steps)
    elif steps > 0:
        out.append([float(noise_multiplier), float(sample_rate), int(steps)])
    return out


def opacus_accountant(history: Sequence[Sequence[float]], accountant: str = "rdp") -> "IAccountant":
    """Opacus' own accountant (`RDPAccountant` or `PRVAccountant`) holding ``history``."""
    from opacus.accountants import create_accountant

    _check_mechanism(accountant)
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(z), float(q), int(s)) for z, q, s in history]
    return acc


@functools.lru_cache(maxsize=512)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    return rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                           orders=RDPAccountant.DEFAULT_ALPHAS)


def epsilon(history: Sequence[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """The epsilon spent by ``history`` at ``delta``: what Opacus' accountant with this history answers.

    For RDP the per-step RDP curve of each (sample rate, noise) is cached and scaled by the steps,
    the same arithmetic as `RDPAccountant.get_epsilon` (equal to the last bit), but quick enough to
    report every round. No noise gives ``inf``; an empty history 0.
    """
    _check_mechanism(accountant)
    if not history:
        return 0.0
    with warnings.catch_warnings():  # "optimal order is the largest alpha": expected for large epsilons
        warnings.filterwarnings("ignore", message="Optimal order")
        if accountant == "rdp":
            from opacus.accountants import RDPAccountant
            from opacus.accountants.analysis import rdp

            curve = sum([_rdp_per_step(float(q), float(z)) * int(s) for z, q, s in history])
            eps, _ = rdp.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=curve, delta=delta)
            return float(eps)
        if any(z == 0 for z, _, _ in history):
            return math.inf
        return float(opacus_accountant(history, accountant).get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to Opacus' tolerance) that spends at most ``target_epsilon``
    in ``steps`` steps at ``sample_rate``: Opacus' `get_noise_multiplier` (a search of a second or
    so, remembered for the same arguments)."""
    from opacus.accountants.utils import get_noise_multiplier

    _check_mechanism(accountant)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order")
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=int(steps), accountant=accountant))
    except ValueError as e:
        raise ConfigError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta} over {steps} step(s) "
                          f"at sample rate {sample_rate:.4g} ({e}); raise target_epsilon or delta, or plan fewer rounds") from None


# --------------------------------------------------------------------------------------------- DP-SGD

@dataclass(frozen=True)
class DPSGD:
    """Example-level DP-SGD for the standard trainer: ``fk.TrainConfig(dp=DPSGD(...))``.

    Give ``noise_multiplier`` (and ``max_grad_norm``), or ``target_epsilon`` with ``rounds`` (the
    rounds each client may train) and the noise is computed so that those rounds spend at most the
    target. With both, the noise is the one given and ``target_epsilon`` is a budget: a client
    refuses (`BudgetExhausted`) a round that would cross it; add `ClientBudget` to the workflow to
    stop the run cleanly before that.

    >>> DPSGD(noise_multiplier=1.1, max_grad_norm=1.0).delta
    1e-05
    """

    noise_multiplier: float | None = None  # sigma: noise std / max_grad_norm; None: from target_epsilon and rounds
    max_grad_norm: float = 1.0  # C: each example's gradient is clipped to this L2 norm (Opacus' usual 1.0)
    target_epsilon: float | None = None  # the epsilon a client never exceeds
    delta: float = 1e-5  # keep it well below 1 / (examples per client)
    rounds: int | None = None  # training rounds planned per client: turns target_epsilon into noise
    accountant: str = "rdp"  # "rdp" (Opacus' default) or "prv" (tighter, slower)

    def __post_init__(self) -> None:
        _check_number("DPSGD.noise_multiplier", self.noise_multiplier, low=0.0, allow_none=True, finite=True)
        _check_number("DPSGD.max_grad_norm", self.max_grad_norm, low=0.0, strict=True, finite=True)
        _check_number("DPSGD.target_epsilon", self.target_epsilon, low=0.0, strict=True, allow_none=True)
        _check_delta("DPSGD.delta", self.delta)
        _check_mechanism(self.accountant)
        if self.rounds is not None and (isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1):
            raise ConfigError(f"DPSGD.rounds must be an integer >= 1 or None, got {self.rounds!r}")
        if self.noise_multiplier is None and (self.target_epsilon is None or self.rounds is None):
            raise ConfigError("DPSGD needs noise_multiplier=..., or target_epsilon=... with rounds=... (the rounds each "
                              f"client may train); got noise_multiplier=None, target_epsilon={self.target_epsilon}, "
                              f"rounds={self.rounds}")

    def check_model(self, model: nn.Module) -> None:
        """Raise `ConfigError` saying how to fix ``model`` if Opacus cannot train it privately (e.g. BatchNorm)."""
        check_model(model)

    def prepare(self, ctx: ClientContext, model: nn.Module, n: int, cfg: "TrainConfig") -> "PrivateSGD":
        """Set up one round of DP-SGD on a client: check the budget, wrap the model once, resolve the noise."""
        state = ctx.state.setdefault("dp_sgd", {"history": []})
        q = min(1.0, cfg.batch_size / max(n, 1))
        per_epoch = 1 if q >= 1.0 else max(1, round(n / cfg.batch_size))
        steps = cfg.epochs * per_epoch
        z = self.noise_multiplier
        if z is None:  # a function of settings and data size only: the same after a resume
            z = noise_multiplier_for(self.target_epsilon, self.delta, q, self.rounds * steps, self.accountant)
        if self.target_epsilon is not None:
            spent = epsilon(state["history"], self.delta, self.accountant)
            after = epsilon(account(state["history"], z, q, steps), self.delta, self.accountant)
            if after > self.target_epsilon:
                raise BudgetExhausted(f"client {ctx.client!r} has spent epsilon {spent:.4g} (delta {self.delta:g}); another "
                                      f"round would take it to {after:.4g}, past its target_epsilon {self.target_epsilon:g}")
        wrapped = ctx.state.get("_grad_sample")  # a cache: (model, its GradSampleModule)
        if wrapped is None or wrapped[0] is not model:  # wrap once: GradSampleModule hooks the model's layers
            from opacus import GradSampleModule

            check_model(model)
            ctx.state["_grad_sample"] = (model, GradSampleModule(model, loss_reduction="mean"))
        return PrivateSGD(self, state, float(z), q, per_epoch, cfg.batch_size if q < 1.0 else max(n, 1))


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
        from opacus.optimizers import DPOptimizer

        device = opt.param_groups[0]["params"][0].device
        gen = torch.Generator(device=device).manual_seed(derive_seed(seed, _NOISE))
        return DPOptimizer(opt, noise_multiplier=self.noise_multiplier, max_grad_norm=self.config.max_grad_norm,
                           expected_batch_size=self.expected_batch_size, loss_reduction="mean", generator=gen)

    def account(self, steps: int) -> dict[str, float]:
        """Record ``steps`` private steps; the client's cumulative epsilon, and what one more such round would make it."""
        cfg = self.config
        self.state["history"] = account(self.state["history"], self.noise_multiplier, self.sample_rate, steps)
        return {"epsilon": epsilon(self.state["history"], cfg.delta, cfg.accountant),
                "epsilon_next": epsilon(account(self.state["history"], self.noise_multiplier, self.sample_rate, steps),
                                        cfg.delta, cfg.accountant),
                "delta": cfg.delta, "noise_multiplier": self.noise_multiplier}


def check_model(model: nn.Module) -> None:
    """Raise `ConfigError` if Opacus cannot compute per-example gradients of ``model``, saying how to fix it."""
    from opacus.validators import ModuleValidator

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


# ------------------------------------------------------------------------------------------ DP-FedAvg

def clip_update(update: Weights, max_norm: float) -> Weights:
    """``update`` scaled down to an L2 norm of at most ``max_norm`` (all floating-point entries together).

    An update already within the norm (always, for ``max_norm=inf``) is returned as it is.

    >>> clip_update({"w": torch.tensor([3.0, 4.0])}, 1.0)["w"]
    tensor([0.6000, 0.8000])
    """
    norm = update_norm(update)
    if norm <= max_norm:
        return dict(update)
    scale = max_norm / norm
    return {k: (v.to(torch.float64) * scale).to(v.dtype) if v.is_floating_point() else v for k, v in update.items()}


def add_noise(update: Weights, std: float, generator: torch.Generator) -> Weights:
    """``update`` plus independent N(0, std^2) noise on every floating-point entry.

    The noise is drawn in float64 on the CPU from ``generator``, in the order of the update's keys, so
    the same generator state gives the same noise on any device.
    """
    if std == 0:
        return dict(update)
    out = {}
    for k, v in update.items():
        if v.is_floating_point():
            noise = torch.normal(0.0, float(std), tuple(v.shape), generator=generator, dtype=torch.float64)
            out[k] = (v.to(torch.float64) + noise.to(v.device)).to(v.dtype)
        else:
            out[k] = v
    return out


def noisy_mean(updates: Sequence[Weights], template: Weights, clip: float, noise_multiplier: float,
               expected_clients: float, generator: torch.Generator) -> Weights:
    """DP-FedAvg's server estimator (McMahan et al. 2018): (sum of clipped updates + N(0, (z S)^2)) / (q N).

    Clip, sum, add noise, divide, in float64; ``template`` (the global weights) gives names, shapes and
    dtypes, also when no update came. The denominator is fixed (the expected number of clients), so
    one client changes the result by at most S / (q N) whether or not it took part. Integer buffers
    are left unchanged (zero update).
    """
    total = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in template.items()
             if v.is_floating_point()}
    for u in updates:
        for k, v in clip_update(u, clip).items():
            if k in total:
                total[k] += v.to(torch.float64)
    noisy = add_noise(total, noise_multiplier * clip if noise_multiplier > 0 else 0.0, generator)
    return {k: (noisy[k] / expected_clients).to(v.dtype) if k in noisy else torch.zeros_like(v)
            for k, v in template.items()}


@dataclass(frozen=True)
class ClipUpdate:
    """Client result filter: clip a WEIGHT_DIFF to L2 norm ``max_norm``, then (local DP) add noise.

    ``max_norm=None`` follows the clip norm the server sends in the task (`ServerDP`, also when it
    adapts). With ``noise_multiplier`` z > 0 each client adds N(0, (z S)^2) to its own clipped update
    (local DP: the server never sees a noiseless update); this noise is not accounted by the server.
    Results of other kinds (metrics, statistics) pass unchanged. Attach it before any encryption filter.

    >>> ClipUpdate(1.0).max_norm
    1.0
    """

    max_norm: float | None = None  # S; None: the server's clip norm from the task meta ("dp_clip")
    noise_multiplier: float = 0.0  # local DP noise, std z * S per client; 0: clip only (the server adds noise)

    def __post_init__(self) -> None:
        _check_number("ClipUpdate.max_norm", self.max_norm, low=0.0, strict=True, allow_none=True)
        _check_number("ClipUpdate.noise_multiplier", self.noise_multiplier, low=0.0, finite=True)

    def __call__(self, dxo: DXO, ctx: FilterContext) -> DXO:
        if dxo.kind != DataKind.WEIGHT_DIFF:
            return dxo
        opaque = [k for k, v in dxo.data.items() if not isinstance(v, torch.Tensor)]
        if opaque:
            raise TypeError(f"ClipUpdate got {type(dxo.data[opaque[0]]).__name__} for {opaque[0]!r}, not a tensor: the "
                            "update is already encrypted or encoded. DP filters must see the plain update: attach "
                            "ClipUpdate before the encryption filter in the client's result filters")
        clip = self.max_norm if self.max_norm is not None else ctx.task.data.meta.get(CLIP_KEY)
        if clip is None:
            raise ConfigError("ClipUpdate() without max_norm follows the server's clip norm, but the task carries none "
                              f"(no {CLIP_KEY!r} in its meta); give ClipUpdate(max_norm=...) or run DPFedAvg")
        norm = update_norm(dxo.data)
        clipped = clip_update(dxo.data, clip)
        if self.noise_multiplier > 0:
            gen = torch.Generator().manual_seed(derive_seed(ctx.seed, ctx.task.attempt, _LOCAL_NOISE))
            clipped = add_noise(clipped, self.noise_multiplier * clip, gen)
        return dxo.with_data(clipped, **{CLIPPED_KEY: bool(norm > clip)})


@dataclass(frozen=True)
class AdaptiveClip:
    """Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping").

    Each round the clip norm moves geometrically toward the ``target_quantile`` of the clients' update
    norms: C <- C * exp(-lr * (b - target_quantile)), where b is the noisy fraction of updates that
    were not clipped. The count is noised with std ``count_noise`` and the update noise is raised so
    that the round as a whole is still a Gaussian mechanism with the configured noise multiplier.
    """

    target_quantile: float = 0.5  # gamma: the share of updates that should pass unclipped (the median)
    lr: float = 0.2  # eta_C: the paper's geometric step
    count_noise: float | None = None  # sigma_b; None: expected clients / 20, the paper's choice

    def __post_init__(self) -> None:
        _check_number("AdaptiveClip.target_quantile", self.target_quantile, low=0.0, high=1.0)
        _check_number("AdaptiveClip.lr", self.lr, low=0.0, strict=True, finite=True)
        _check_number("AdaptiveClip.count_noise", self.count_noise, low=0.0, strict=True, allow_none=True, finite=True)


def split_noise(noise_multiplier: float, count_noise: float) -> float:
    """The update noise multiplier that leaves room for a noised count: (z^-2 - (2 sigma_b)^-2)^-1/2.

    The count of unclipped updates (centred, sensitivity 1/2) and the update sum are two Gaussian
    mechanisms; together they are one with noise multiplier z (Andrew et al. 2021, Theorem 1).
    """
    if noise_multiplier == 0:
        return 0.0
    if 2 * count_noise <= noise_multiplier:
        raise ConfigError(f"adaptive clipping needs count_noise > noise_multiplier / 2 = {noise_multiplier / 2:g}, "
                          f"got {count_noise:g}; raise count_noise (or sample more clients per round)")
    return (noise_multiplier ** -2 - (2 * count_noise) ** -2) ** -0.5


def adapt_clip(clip: float, unclipped_fraction: float, target_quantile: float, lr: float) -> float:
    """One geometric step of adaptive clipping: C * exp(-lr * (unclipped_fraction - target_quantile))."""
    return clip * math.exp(-lr * (unclipped_fraction - target_quantile))


@dataclass(frozen=True)
class ServerDP:
    """The server half of DP-FedAvg, as an extension of FedAvg (use `DPFedAvg` to get it configured).

    Each round it replaces the rule's aggregate with `noisy_mean` of the clients' updates (clipped
    again here: a client without `ClipUpdate` cannot break the bound), steps the accountant held in
    ``fl.server.state["dp_fedavg"]`` (plain data, checkpointed), and records ``epsilon``, ``delta``,
    ``clip`` and ``noise_multiplier`` in the round's metrics. Before a round it stops the run if that
    round would cross ``target_epsilon``. ``sample_rate`` must be the workflow's ``sample_rate``.

    Failed clients are simply absent from the sum: the sensitivity of the sum is still S and the
    noise is unchanged, so the guarantee holds as long as failures do not depend on other clients'
    data (dropping out only removes a client's contribution, like not being sampled).
    """

    clip: float = 1.0  # S: each client's update is clipped to this L2 norm (the initial norm when adaptive)
    noise_multiplier: float | None = 1.0  # z: the noise on the sum has std z * S; None: from target_epsilon
    sample_rate: float = 1.0  # q: the probability each client joins a round (FedAvg.sample_rate)
    delta: float = 1e-5  # keep it below 1 / (number of clients)
    target_epsilon: float | None = None  # the user-level epsilon the run never exceeds
    rounds: int | None = None  # the planned rounds, to turn target_epsilon into noise (DPFedAvg fills it)
    accountant: str = "rdp"  # "rdp" or "prv"
    adaptive_clip: AdaptiveClip | None = None  # None: the clip norm stays S

    def __post_init__(self) -> None:
        _check_number("ServerDP.clip", self.clip, low=0.0, strict=True)
        _check_number("ServerDP.noise_multiplier", self.noise_multiplier, low=0.0, allow_none=True, finite=True)
        _check_number("ServerDP.sample_rate", self.sample_rate, low=0.0, strict=True, high=1.0)
        _check_delta("ServerDP.delta", self.delta)
        _check_number("ServerDP.target_epsilon", self.target_epsilon, low=0.0, strict=True, allow_none=True)
        _check_mechanism(self.accountant)
        if self.noise_multiplier is None and (self.target_epsilon is None or self.rounds is None):
            raise ConfigError("DP-FedAvg needs noise_multiplier=..., or target_epsilon=... with the planned rounds; got "
                              f"noise_multiplier=None, target_epsilon={self.target_epsilon}, rounds={self.rounds}")
        if math.isinf(self.clip) and (self.noise_multiplier != 0 or self.adaptive_clip is not None):
            raise ConfigError("an infinite clip norm gives the sum no bound, so no noise can hide a client: use it only "
                              f"with noise_multiplier=0 and no adaptive clipping (got noise_multiplier={self.noise_multiplier})")
        if self.adaptive_clip is not None and not isinstance(self.adaptive_clip, AdaptiveClip):
            raise ConfigError(f"adaptive_clip must be an AdaptiveClip(...) or None, got {self.adaptive_clip!r}")

    def _state(self, fl: "ServerContext") -> dict[str, Any]:
        return fl.server.state.setdefault("dp_fedavg", {"history": [], "clip": float(self.clip)})

    def noise(self, fl: "ServerContext") -> float:
        """The noise multiplier z of this run (computed once from ``target_epsilon`` when not given)."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        state = self._state(fl)
        if "noise_multiplier" not in state:
            state["noise_multiplier"] = noise_multiplier_for(self.target_epsilon, self.delta, self.sample_rate,
                                                             self.rounds, self.accountant)
        return state["noise_multiplier"]

    def task_meta(self, fl: "ServerContext") -> dict[str, Any]:
        return {CLIP_KEY: self._state(fl)["clip"]}

    def before_round(self, fl: "ServerContext", round: int) -> str | None:
        if self.target_epsilon is None:
            return None
        history = self._state(fl)["history"]
        after = epsilon(account(history, self.noise(fl), self.sample_rate, 1), self.delta, self.accountant)
        if after <= self.target_epsilon:
            return None
        spent = epsilon(history, self.delta, self.accountant)
        return (f"privacy budget: round {round} would spend epsilon {after:.4g} > target_epsilon {self.target_epsilon:g} "
                f"(spent {spent:.4g} at delta {self.delta:g} after {sum(int(s) for *_, s in history)} round(s))")

    def on_aggregate(self, fl: "ServerContext", round: int, results: dict[str, DXO], diff: Weights) -> Weights:
        state = self._state(fl)
        z, clip, expected = self.noise(fl), state["clip"], self.sample_rate * len(fl.clients)
        draws = sum(int(s) for *_, s in state["history"])  # a fresh noise stream for every accounted step
        gen = torch.Generator().manual_seed(derive_seed(fl.seed, _NOISE, draws))
        adaptive = self.adaptive_clip
        count_noise = None if adaptive is None else (adaptive.count_noise or expected / 20)
        z_updates = z if adaptive is None else split_noise(z, count_noise)
        new = noisy_mean([r.data for r in results.values()], fl.server.weights, clip, z_updates, expected, gen)
        if adaptive is not None:
            # the bit a ClipUpdate client reports; for a client that did not clip, its update's norm says it
            below = [0.0 if (r.meta[CLIPPED_KEY] if CLIPPED_KEY in r.meta else update_norm(r.data) > clip) else 1.0
                     for r in results.values()]
            count_gen = torch.Generator().manual_seed(derive_seed(fl.seed, _COUNT_NOISE, draws))
            noisy = sum(b - 0.5 for b in below) + float(torch.normal(0.0, count_noise, (1,), generator=count_gen,
                                                                      dtype=torch.float64))
            state["clip"] = adapt_clip(clip, noisy / expected + 0.5, adaptive.target_quantile, adaptive.lr)
        state["history"] = account(state["history"], z, self.sample_rate, 1)
        state["epsilon"] = epsilon(state["history"], self.delta, self.accountant)
        state["clip_used"] = clip
        return new

    def after_aggregate(self, fl: "ServerContext", results: dict[str, DXO]) -> None:
        return None

    def round_metrics(self, fl: "ServerContext") -> dict[str, float]:
        state = self._state(fl)
        return {"epsilon": state["epsilon"], "delta": self.delta, "noise_multiplier": self.noise(fl),
                "clip": state["clip_used"]}


@dataclass(frozen=True)
class ClientBudget:
    """Stop a DP-SGD run before a round that would take any client past ``target_epsilon``.

    Clients training with `DPSGD` report ``epsilon_next``, their epsilon after one more round like the
    last; this extension stops the workflow before a round in which one of them would cross the target.
    (The client itself refuses such a round when its DPSGD has the target too: this ends the run cleanly.)
    """

    target_epsilon: float

    def __post_init__(self) -> None:
        _check_number("ClientBudget.target_epsilon", self.target_epsilon, low=0.0, strict=True)

    def task_meta(self, fl: "ServerContext") -> dict[str, Any]:
        return {}

    def after_aggregate(self, fl: "ServerContext", results: dict[str, DXO]) -> None:
        return None

    def before_round(self, fl: "ServerContext", round: int) -> str | None:
        latest: dict[str, float] = {}
        for record in fl.history:
            for client, row in record.clients.items():
                if "epsilon_next" in row:
                    latest[client] = row["epsilon_next"]
        over = {c: e for c, e in latest.items() if e > self.target_epsilon}
        if not over:
            return None
        worst = max(over, key=over.get)
        return (f"privacy budget: round {round} would take client {worst!r} to epsilon {over[worst]:.4g} > "
                f"target_epsilon {self.target_epsilon:g} ({len(over)} client(s) at their budget)")


def DPFedAvg(rounds: int = 10, clip: float = 1.0, noise_multiplier: float | None = 1.0, sample_rate: float = 1.0,
             delta: float = 1e-5, target_epsilon: float | None = None, accountant: str = "rdp",
             adaptive_clip: AdaptiveClip | None = None, **options: Any) -> FedAvg:
    """User-level DP-FedAvg (McMahan et al. 2018): a `FedAvg` with Poisson sampling and `ServerDP`.

    Clients join each round with probability ``sample_rate``; each update is clipped to ``clip``; the
    sum gets N(0, (noise_multiplier * clip)^2) and is divided by the expected number of clients. Failed
    clients are absent from the sum (``min_clients=0``, no retries, no norm screen). ``options`` are
    other FedAvg settings (``server_opt``, ``extensions``, ``task_timeout``...). Attach `ClipUpdate`
    to the clients when the server must never see an unclipped update (with HE or local noise).

    >>> wf = DPFedAvg(rounds=5, clip=0.5, noise_multiplier=1.0, sample_rate=0.2)
    >>> wf.sample_rate, wf.extensions[0].clip
    (0.2, 0.5)
    """
    taken = sorted({"aggregate", "weigh", "clients_per_round", "sample_rate"} & set(options))
    if taken:
        raise ConfigError(f"DPFedAvg sets {', '.join(taken)} itself (its server step is the noisy clipped sum over Poisson-"
                          "sampled clients); leave them out")
    server = ServerDP(clip=clip, noise_multiplier=noise_multiplier, sample_rate=sample_rate, delta=delta,
                      target_epsilon=target_epsilon, rounds=rounds, accountant=accountant, adaptive_clip=adaptive_clip)
    settings = {"min_clients": 0, "max_retries": 0, "max_norm_ratio": None, **options}
    settings["extensions"] = (server, *settings.get("extensions", ()))
    return FedAvg(rounds=rounds, sample_rate=sample_rate, weigh=uniform, **settings)


# ---------------------------------------------------------------------------------------------- CLI

@dataclass(frozen=True)
class DPArgs:
    """What ``--dp-sgd`` / ``--dp-fedavg`` ask for, ready to pass on.

    ``train`` goes to ``TrainConfig(dp=...)``; ``workflow`` holds FedAvg settings to merge into the
    workflow's (``sample_rate``, ``extensions``, ...; `FedProx`, `SCAFFOLD` and `FedOpt` take them too);
    ``client_result_filters`` goes to ``Simulator(client_result_filters=...)``.
    """

    train: DPSGD | None = None
    workflow: dict[str, Any] = field(default_factory=dict)
    client_result_filters: tuple = ()

    def merge(self, settings: dict[str, Any]) -> dict[str, Any]:
        """A workflow's FedAvg ``settings`` with DP's on top (DP's win; ``extensions`` are joined, DP's first).

        >>> DPArgs(workflow={"sample_rate": 0.5}).merge({"rounds": 3, "min_clients": 2})
        {'rounds': 3, 'min_clients': 2, 'sample_rate': 0.5}
        """
        out = {**settings, **{k: v for k, v in self.workflow.items() if k != "extensions"}}
        extensions = (*self.workflow.get("extensions", ()), *settings.get("extensions", ()))
        if extensions:
            out["extensions"] = extensions
        return out


def add_dp_arguments(group: argparse._ActionsContainer) -> None:
    """Add the differential-privacy options of ``fedkit run`` to ``group`` (a parser or argument group)."""
    group.add_argument("--dp-sgd", action="store_true", help="example-level DP-SGD on every client (Opacus)")
    group.add_argument("--dp-fedavg", action="store_true",
                       help="user-level DP-FedAvg: Poisson-sampled clients, clipped updates, noise on the sum")
    group.add_argument("--noise-multiplier", type=float, default=None,
                       help="noise std over the clip norm (DP-SGD: default 1.0 unless --target-epsilon; DP-FedAvg: 1.0)")
    group.add_argument("--max-grad-norm", type=float, default=1.0, help="DP-SGD: clip norm of each example's gradient")
    group.add_argument("--clip-norm", type=float, default=1.0, help="DP-FedAvg: clip norm of each client's update")
    group.add_argument("--sample-rate", type=float, default=None,
                       help="DP-FedAvg: probability that a client joins a round (default 1.0)")
    group.add_argument("--adaptive-clip", action="store_true", help="DP-FedAvg: adapt the clip norm to the median norm")
    group.add_argument("--target-epsilon", type=float, default=None,
                       help="privacy budget: never exceeded; alone, it sets the noise for the planned rounds")
    group.add_argument("--delta", type=float, default=1e-5, help="the delta of (epsilon, delta)-DP")
    group.add_argument("--dp-accountant", default="rdp", choices=MECHANISMS, help="Opacus accountant")


def dp_from_args(args: argparse.Namespace) -> DPArgs:
    """The `DPArgs` that parsed ``fedkit run`` arguments ask for; `ConfigError` for settings that cannot work."""
    sgd, fedavg = bool(getattr(args, "dp_sgd", False)), bool(getattr(args, "dp_fedavg", False))
    if sgd and fedavg:
        raise ConfigError("choose one of --dp-sgd (example-level) and --dp-fedavg (user-level); both at once share "
                          "--noise-multiplier, which cannot mean both")
    dp_only = {"noise_multiplier": None, "target_epsilon": None, "sample_rate": None, "adaptive_clip": False}
    if not (sgd or fedavg):
        given = [f"--{k.replace('_', '-')}" for k, default in dp_only.items() if getattr(args, k, default) != default]
        if given:
            raise ConfigError(f"{', '.join(given)} need --dp-sgd or --dp-fedavg")
        return DPArgs()
    z, target, rounds = args.noise_multiplier, args.target_epsilon, args.rounds
    if sgd:
        if args.sample_rate is not None or args.adaptive_clip:
            raise ConfigError("--sample-rate and --adaptive-clip are DP-FedAvg options; DP-SGD's sample rate is "
                              "--batch-size / (examples per client)")
        if z is None and target is None:
            z = 1.0
        dp = DPSGD(noise_multiplier=z, max_grad_norm=args.max_grad_norm, target_epsilon=target, delta=args.delta,
                   rounds=rounds if z is None else None, accountant=args.dp_accountant)
        workflow = {"extensions": (ClientBudget(target),)} if target is not None else {}
        return DPArgs(train=dp, workflow=workflow)
    q = 1.0 if args.sample_rate is None else args.sample_rate
    if z is None and target is None:
        z = 1.0
    server = ServerDP(clip=args.clip_norm, noise_multiplier=z, sample_rate=q, delta=args.delta, target_epsilon=target,
                      rounds=rounds, accountant=args.dp_accountant,
                      adaptive_clip=AdaptiveClip() if args.adaptive_clip else None)
    workflow = {"sample_rate": q, "weigh": uniform, "min_clients": 0, "max_retries": 0, "max_norm_ratio": None,
                "extensions": (server,)}
    return DPArgs(workflow=workflow, client_result_filters=(ClipUpdate(None),))


# ------------------------------------------------------------------------------------------- checks

def _check_mechanism(accountant: str) -> None:
    if accountant not in MECHANISMS:
        raise ConfigError(f"unknown accountant {accountant!r}; use one of: {', '.join(MECHANISMS)}")


def _check_delta(name: str, delta: Any) -> None:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise ConfigError(f"{name} must be in (0, 1), and well below 1 / (number of records), got {delta!r}")


def _check_number(name: str, v: Any, low: float, strict: bool = False, high: float | None = None,
                  allow_none: bool = False, finite: bool = False) -> None:
    if v is None and allow_none:
        return
    ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and not math.isnan(v)
    ok = ok and (v > low if strict else v >= low) and (high is None or v <= high) and (not finite or math.isfinite(v))
    if not ok:
        bound = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise ConfigError(f"{name} must be a {'finite ' if finite else ''}number {bound}"
                          f"{' or None' if allow_none else ''}, got {v!r}")
