"""User-level differential privacy: DP-FedAvg, with the maths as small named functions.

DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models") makes the
global model change little with any one client's whole data: every client joins a round with
probability q (Poisson sampling), each update is clipped to L2 norm S (`clip_update`), the sum gets
N(0, (z S)^2) (`add_noise`) and is divided by the expected number of clients q N (`noisy_mean`). The
round's ``epsilon`` comes from an accountant with sample rate q and one step per round. Clipping can
adapt (Andrew et al. 2021, `AdaptiveClip`). Use it when whole clients (users, devices) must stay
hidden; it needs many clients for useful accuracy.

`UserDP` is the mechanism as one object: its client half clips each update on the client to the
norm the server sends (so the server never sees an unclipped update), its server half clips again,
adds the noise, keeps the accountant and stops the run at its budget. The sampling rate is the
workflow's (``FedAvg(sample_rate=q)``), the one place that samples clients, so the accountant cannot
be told another; `DPFedAvg` builds the whole workflow. The clipping and noise maths are in
`fedkit.privacy.clipping`.

>>> wf = DPFedAvg(rounds=5, clip=0.5, noise_multiplier=1.0, sample_rate=0.2)
>>> wf.sample_rate, wf.extensions[0].clip, wf.extensions[0].sampling
(0.2, 0.5, 0.2)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import InitVar, dataclass, field
from typing import Any, ClassVar, Mapping

import torch

from .. import metrics as M
from ..aggregate import uniform, weighted_mean
from ..errors import ConfigError
from ..exchange import DXO, Weights
from ..seeds import DP_FEDAVG_COUNT_NOISE, DP_FEDAVG_NOISE, derive_seed
from ..server import ServerContext
from ..train import LocalTraining
from ..weights import norm
from ..workflows.extensions import Extension
from ..workflows.scatter_gather import FedAvg
from .accounting import account, check_delta, check_delta_below, check_mechanism, check_number, epsilon, noise_multiplier_for
from .clipping import CLIP_KEY, CLIPPED_KEY, AdaptiveClip, adapt_clip, clip_update, noisy_mean, split_noise


@dataclass(frozen=True)
class UserDP(Extension):
    """User-level DP of DP-FedAvg, both halves: ``FedAvg(sample_rate=q, weigh=uniform, extensions=(UserDP(...),))``.

    Each round the server replaces the rule's aggregate with `noisy_mean` of the clients' updates
    (clipped on the clients, and again here, so an executor of your own cannot break the bound),
    steps the accountant held in its server state, ``fl.state_of(self)`` (plain data, checkpointed), and
    records ``epsilon``, ``delta``, ``clip`` and ``noise_multiplier`` in the round's metrics. Before a
    round it stops the run if that round would cross ``target_epsilon``. The sampling rate and the
    planned rounds are the workflow's, taken when the workflow is built (`bind`).

    Failed clients are simply absent from the sum: the sensitivity of the sum is still S and the
    noise is unchanged, so the guarantee holds as long as failures do not depend on other clients'
    data (dropping out only removes a client's contribution, like not being sampled).
    """

    clip: float = 1.0  # S: each client's update is clipped to this L2 norm (the initial norm when adaptive)
    noise_multiplier: float | None = 1.0  # z: the noise on the sum has std z * S; None: from target_epsilon
    delta: float = 1e-5  # keep it below 1 / (number of clients)
    target_epsilon: float | None = None  # the user-level epsilon the run never exceeds
    accountant: str = "rdp"  # "rdp" or "prv"
    adaptive_clip: AdaptiveClip | None = None  # None: the clip norm stays S
    sample_rate: InitVar[Any] = None  # refused: the workflow's sample_rate is the one the accountant uses
    sampling: float | None = field(default=None, init=False)  # q, from the workflow (bind)
    rounds: int | None = field(default=None, init=False)  # the workflow's rounds, to turn target_epsilon into noise
    requires_client_half: ClassVar[bool] = False  # the server clips again, so an executor of your own keeps the bound
    vectorized: ClassVar[bool | str] = True  # its client half only clips t.diff after training
    needs_plaintext: ClassVar[str | None] = (
        "it clips each client's update and adds noise to their sum in plaintext, and with HE the server only holds "
        "ciphertexts; put DP on the clients instead (DP-SGD, or a ClipUpdate filter with noise_multiplier > 0: local "
        "DP), which runs before encryption")

    def __post_init__(self, sample_rate: Any) -> None:
        if sample_rate is not None:
            raise ConfigError(f"UserDP takes no sample_rate (got {sample_rate!r}): the accountant uses the workflow's, "
                              "FedAvg(sample_rate=q), the one place that samples clients, so the two cannot differ. "
                              "Set it there, or build the workflow with fk.DPFedAvg(sample_rate=q, ...)")
        check_number("UserDP.clip", self.clip, low=0.0, strict=True)
        check_number("UserDP.noise_multiplier", self.noise_multiplier, low=0.0, allow_none=True, finite=True)
        check_delta("UserDP.delta", self.delta)
        check_number("UserDP.target_epsilon", self.target_epsilon, low=0.0, strict=True, allow_none=True)
        check_mechanism(self.accountant)
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ConfigError("DP-FedAvg needs noise_multiplier=..., or target_epsilon=... (the noise is then computed "
                              "for the workflow's rounds); got neither")
        if math.isinf(self.clip) and (self.noise_multiplier != 0 or self.adaptive_clip is not None):
            raise ConfigError("an infinite clip norm gives the sum no bound, so no noise can hide a client: use it only "
                              f"with noise_multiplier=0 and no adaptive clipping (got noise_multiplier={self.noise_multiplier})")
        if self.adaptive_clip is not None and not isinstance(self.adaptive_clip, AdaptiveClip):
            raise ConfigError("{adaptive_clip} must be an AdaptiveClip(...) or None", obj=self, field="adaptive_clip",
                              value=self.adaptive_clip)

    def bind(self, workflow: FedAvg) -> "UserDP":
        """Take the sampling rate and rounds from ``workflow``; refuse what the accountant's maths does not cover."""
        name = type(workflow).__name__
        if workflow.clients_per_round is not None:
            raise ConfigError(f"DP-FedAvg's accountant assumes Poisson sampling, but {name} samples a fixed "
                              f"clients_per_round={workflow.clients_per_round}; use sample_rate=q instead "
                              "(each client joins a round with probability q)")
        if type(workflow).targets is not FedAvg.targets:
            raise ConfigError(f"{name} chooses its clients itself (it overrides targets), but DP-FedAvg's accountant "
                              "assumes FedAvg's Poisson sampling at sample_rate; its epsilon would be wrong. Use FedAvg")
        if workflow.aggregate is not weighted_mean or workflow.weigh is not uniform:
            raise ConfigError("DP-FedAvg replaces the aggregate with its noisy mean of clipped updates, every client "
                              "weighing the same; an aggregate or weigh of your own would be ignored. Leave aggregate "
                              "at its default and set weigh=fk.aggregate.uniform, or build it with fk.DPFedAvg(...)")
        bound = dataclasses.replace(self)
        object.__setattr__(bound, "sampling", float(workflow.sample_rate if workflow.sample_rate is not None else 1.0))
        object.__setattr__(bound, "rounds", workflow.rounds)
        return bound

    def check_population(self, examples: Mapping[str, int]) -> None:
        """Refuse a delta not below 1 / the number of clients: user-level DP hides a whole client."""
        check_delta_below("UserDP.delta", self.delta, len(examples), f"the number of clients ({len(examples)})")

    def _state(self, fl: ServerContext) -> dict[str, Any]:
        state = fl.state_of(self)
        if not state:  # the first round; or a checkpoint of fedkit 0.1, which kept it under "dp_fedavg"
            state.update(fl.server.state.pop("dp_fedavg", None) or {"history": [], "clip": float(self.clip)})
        return state

    def _rate(self) -> float:
        if self.sampling is None:
            raise ConfigError("UserDP runs inside a FedAvg, which gives it its sampling rate; put it in "
                              "FedAvg(extensions=...) or use fk.DPFedAvg(...)")
        return self.sampling

    def noise(self, fl: ServerContext) -> float:
        """The noise multiplier z of this run (computed once from ``target_epsilon`` when not given)."""
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        state = self._state(fl)
        if "noise_multiplier" not in state:
            state["noise_multiplier"] = noise_multiplier_for(self.target_epsilon, self.delta, self._rate(),
                                                             self.rounds, self.accountant)
        return state["noise_multiplier"]

    # ---- client half: clip the update before it leaves the client

    def client_end(self, t: LocalTraining) -> None:
        clip = t.task.data.meta.get(CLIP_KEY, self.clip)
        t.meta[CLIPPED_KEY] = bool(norm(t.diff) > clip)
        t.diff = clip_update(t.diff, clip)

    # ---- server half

    def task_meta(self, fl: ServerContext) -> dict[str, Any]:
        return {CLIP_KEY: self._state(fl)["clip"]}

    def before_round(self, fl: ServerContext, round: int) -> str | None:
        if self.target_epsilon is None:
            return None
        history = self._state(fl)["history"]
        after = epsilon(account(history, self.noise(fl), self._rate(), 1), self.delta, self.accountant)
        if after <= self.target_epsilon:
            return None
        spent = epsilon(history, self.delta, self.accountant)
        return (f"privacy budget: round {round + fl.offset} would spend epsilon {after:.4g} > target_epsilon "
                f"{self.target_epsilon:g} (spent {spent:.4g} at delta {self.delta:g} after "
                f"{sum(int(s) for *_, s in history)} round(s))")

    def on_aggregate(self, fl: ServerContext, round: int, results: dict[str, DXO], diff: Weights) -> Weights:
        state = self._state(fl)
        q = self._rate()
        z, clip, expected = self.noise(fl), state["clip"], q * len(fl.client_names)
        draws = sum(int(s) for *_, s in state["history"])  # a fresh noise stream for every accounted step
        gen = torch.Generator().manual_seed(derive_seed(fl.seed, DP_FEDAVG_NOISE, draws))
        adaptive = self.adaptive_clip
        count_noise = None if adaptive is None else (adaptive.count_noise or expected / 20)
        z_updates = z if adaptive is None else split_noise(z, count_noise)
        new = noisy_mean([r.data for r in results.values()], fl.model.weights, clip, z_updates, expected, gen)
        if adaptive is not None:
            # the bit the client half reports; for a client that did not clip, its update's norm says it
            below = [0.0 if (r.meta[CLIPPED_KEY] if CLIPPED_KEY in r.meta else norm(r.data) > clip) else 1.0
                     for r in results.values()]
            count_gen = torch.Generator().manual_seed(derive_seed(fl.seed, DP_FEDAVG_COUNT_NOISE, draws))
            noisy = sum(b - 0.5 for b in below) + float(torch.normal(0.0, count_noise, (1,), generator=count_gen,
                                                                      dtype=torch.float64))
            state["clip"] = adapt_clip(clip, noisy / expected + 0.5, adaptive.target_quantile, adaptive.lr)
        state["history"] = account(state["history"], z, q, 1)
        state["epsilon"] = epsilon(state["history"], self.delta, self.accountant)
        state["clip_used"] = clip
        return new

    def round_metrics(self, fl: ServerContext, results: dict[str, DXO]) -> dict[str, float]:
        state = self._state(fl)
        return {M.EPSILON: state["epsilon"], M.DELTA: self.delta, M.NOISE_MULTIPLIER: self.noise(fl),
                M.CLIP: state["clip_used"]}


def DPFedAvg(rounds: int = 10, clip: float = 1.0, noise_multiplier: float | None = 1.0, sample_rate: float = 1.0,
             delta: float = 1e-5, target_epsilon: float | None = None, accountant: str = "rdp",
             adaptive_clip: AdaptiveClip | None = None, **options: Any) -> FedAvg:
    """User-level DP-FedAvg (McMahan et al. 2018): a `FedAvg` with Poisson sampling and `UserDP`.

    Clients join each round with probability ``sample_rate``; each update is clipped to ``clip``; the
    sum gets N(0, (noise_multiplier * clip)^2) and is divided by the expected number of clients. Failed
    clients are absent from the sum (``min_clients=0``, no retries, no norm screen). ``options`` are
    other FedAvg settings (``server_opt``, ``extensions``, ``task_timeout``...).
    """
    taken = sorted({"aggregate", "weigh", "clients_per_round", "sample_rate"} & set(options))
    if taken:
        raise ConfigError(f"DPFedAvg sets {', '.join(taken)} itself (its server step is the noisy clipped sum over Poisson-"
                          "sampled clients); leave them out")
    user = UserDP(clip=clip, noise_multiplier=noise_multiplier, delta=delta, target_epsilon=target_epsilon,
                  accountant=accountant, adaptive_clip=adaptive_clip)
    settings = {"min_clients": 0, "max_retries": 0, "max_norm_ratio": None, **options}
    settings["extensions"] = (user, *settings.get("extensions", ()))
    return FedAvg(rounds=rounds, sample_rate=sample_rate, weigh=uniform, **settings)
