"""Server optimizers (FedOpt): treat the aggregated client update as a gradient and take an optimizer step.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR). The server aggregates the clients'
weight differences into the pseudo-gradient ``delta`` (the weighted mean of local minus global)
and moves the global model ``x`` with an optimizer instead of plainly adding ``delta``:

- `SGD` with ``lr=1, momentum=0`` *is* FedAvg (``x + delta``); with momentum it is FedAvgM
  (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated
  Visual Classification"), NVFlare's FedOpt default (``lr=1.0, momentum=0.6``).
- `Adam`, `Yogi` and `Adagrad` are FedAdam, FedYogi and FedAdagrad of Algorithm 2 in the paper.
  Reach for them when clients' data differ a lot (non-iid) or the model has sparse or badly
  scaled parameters; they need their server ``lr`` tuned (the paper searches 10^-3 .. 10^0).

Each optimizer is a frozen settings object with two pure methods, so one object can drive many runs:

>>> import torch
>>> opt = SGD(lr=1.0, momentum=0.5)
>>> x, state = {"w": torch.tensor([1.0])}, opt.init({"w": torch.tensor([1.0])})
>>> x, state = opt.step(x, {"w": torch.tensor([2.0])}, state, round=0)
>>> x, state = opt.step(x, {"w": torch.tensor([2.0])}, state, round=1)
>>> x["w"], state["momentum/w"]
(tensor([6.]), tensor([3.]))

The state is a flat dict of tensors (``"m/<name>"``, ``"v/<name>"``, ``"momentum/<name>"``), so it
saves with ``torch.save`` and loads with ``torch.load(..., weights_only=True)``. The optimizer
moves floating-point tensors only; integer buffers (BatchNorm's ``num_batches_tracked``) get
``delta`` added as in FedAvg. The maths is in the plain functions `sgd_update`, `first_moment`,
`adagrad_second_moment`, `adam_second_moment`, `yogi_second_moment` and `adaptive_update`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch

from .errors import ConfigError
from .exchange import Weights

State = dict[str, torch.Tensor]
Schedule = Callable[[int], float]
"""A server learning-rate schedule: round (from 0) -> factor on ``lr``."""


@runtime_checkable
class ServerOptimizer(Protocol):
    """What `FedAvg(server_opt=...)` needs: a fresh state for a model, and one step."""

    def init(self, weights: Weights) -> State:
        """The optimizer state before the first round, for a model with these ``weights``."""

    def step(self, weights: Weights, delta: Weights, state: State, round: int) -> tuple[Weights, State]:
        """The new global weights and state after applying the pseudo-gradient ``delta``."""


# ------------------------------------------------------------------------------------ the maths

def sgd_update(x: torch.Tensor, delta: torch.Tensor, buf: torch.Tensor | None, lr: float, momentum: float,
               nesterov: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One SGD step along ``delta``: ``buf = momentum * buf + delta``; ``x + lr * buf``.

    The same as ``torch.optim.SGD`` on the gradient ``-delta`` (dampening 0), with ``buf`` the
    negated momentum buffer; Nesterov steps along ``delta + momentum * buf``. ``buf`` is None when
    ``momentum`` is 0.
    """
    if buf is None:
        return x + lr * delta, None
    buf = momentum * buf + delta
    return x + lr * (delta + momentum * buf if nesterov else buf), buf


def first_moment(m: torch.Tensor, delta: torch.Tensor, beta1: float) -> torch.Tensor:
    """``m = beta1 * m + (1 - beta1) * delta`` (Reddi et al. 2021, Algorithm 2)."""
    return beta1 * m + (1 - beta1) * delta


def adagrad_second_moment(v: torch.Tensor, delta: torch.Tensor, beta2: float) -> torch.Tensor:
    """FedAdagrad: ``v = v + delta^2`` (``beta2`` is unused: the sum never forgets)."""
    return v + delta * delta


def adam_second_moment(v: torch.Tensor, delta: torch.Tensor, beta2: float) -> torch.Tensor:
    """FedAdam: ``v = beta2 * v + (1 - beta2) * delta^2``."""
    return beta2 * v + (1 - beta2) * delta * delta


def yogi_second_moment(v: torch.Tensor, delta: torch.Tensor, beta2: float) -> torch.Tensor:
    """FedYogi: ``v = v - (1 - beta2) * delta^2 * sign(v - delta^2)``.

    Unlike Adam, ``v`` moves by at most ``(1 - beta2) * delta^2`` per round, whatever its size, so a
    large ``v`` decays slowly and a sudden large ``delta`` does not shrink the steps as abruptly.
    """
    d2 = delta * delta
    return v - (1 - beta2) * d2 * torch.sign(v - d2)


def adaptive_update(x: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float, tau: float) -> torch.Tensor:
    """``x + lr * m / (sqrt(v) + tau)``; no bias correction, as in the paper."""
    return x + lr * m / (v.sqrt() + tau)


SecondMoment = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


# ------------------------------------------------------------------------------------ schedules

def constant() -> Schedule:
    """The factor 1 in every round."""
    def schedule(round: int) -> float:
        return 1.0
    schedule.__qualname__ = "constant()"
    return schedule


def step_decay(every: int, gamma: float) -> Schedule:
    """Multiply the server lr by ``gamma`` every ``every`` rounds: factor ``gamma ** (round // every)``.

    >>> [step_decay(every=2, gamma=0.5)(r) for r in range(5)]
    [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ConfigError(f"step_decay needs every (rounds between decays) as an integer >= 1, got {every!r}")
    if not _real(gamma) or not 0 < gamma <= 1:
        raise ConfigError(f"step_decay needs gamma (the factor per decay) in (0, 1], got {gamma!r}")

    def schedule(round: int) -> float:
        return float(gamma) ** (round // every)
    schedule.__qualname__ = f"step_decay(every={every}, gamma={gamma})"
    return schedule


def cosine(rounds: int, min_factor: float = 0.0) -> Schedule:
    """Cosine annealing from 1 at round 0 to ``min_factor`` at round ``rounds`` (and after).

    Loshchilov & Hutter 2017, "SGDR: Stochastic Gradient Descent with Warm Restarts" (without restarts).

    >>> [round(cosine(rounds=4)(r), 3) for r in range(5)]
    [1.0, 0.854, 0.5, 0.146, 0.0]
    """
    if isinstance(rounds, bool) or not isinstance(rounds, numbers.Integral) or rounds < 1:
        raise ConfigError(f"cosine needs rounds (the length of the decay) as an integer >= 1, got {rounds!r}")
    if not _real(min_factor) or not 0 <= min_factor <= 1:
        raise ConfigError(f"cosine needs min_factor in [0, 1], got {min_factor!r}")

    def schedule(round: int) -> float:
        t = min(round, rounds) / rounds
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * t))
    schedule.__qualname__ = f"cosine(rounds={rounds}, min_factor={min_factor})"
    return schedule


# ----------------------------------------------------------------------------------- optimizers

@dataclass(frozen=True)
class SGD:
    """Server SGD with optional (Nesterov) momentum: FedAvg at ``lr=1, momentum=0``, else FedAvgM.

    Hsu et al. 2019 (FedAvgM); Reddi et al. 2021 (FedOpt). The momentum buffer starts at zero.

    >>> SGD(lr=1.0, momentum=0.6).init({"w": torch.zeros(2)})
    {'momentum/w': tensor([0., 0.])}
    """

    lr: float = 1.0  # 1.0 steps exactly to the clients' average, as FedAvg does
    momentum: float = 0.0  # 0: plain FedAvg; NVFlare's FedOpt uses 0.6, Hsu et al. up to 0.9-0.99
    nesterov: bool = False
    lr_schedule: Schedule | None = None  # round -> factor on lr; None: constant

    def __post_init__(self) -> None:
        _check_lr(self)
        _check_unit(self, "momentum", self.momentum)
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"SGD.nesterov must be True or False, got {self.nesterov!r}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("SGD.nesterov=True needs momentum > 0 (Nesterov momentum without momentum is plain SGD)")

    def init(self, weights: Weights) -> State:
        if self.momentum == 0:
            return {}
        return {f"momentum/{k}": torch.zeros_like(v) for k, v in weights.items() if v.is_floating_point()}

    def step(self, weights: Weights, delta: Weights, state: State, round: int) -> tuple[Weights, State]:
        lr = _scheduled_lr(self, round)
        new_x, new_state = {}, {}
        for k, x in weights.items():
            if not x.is_floating_point():
                new_x[k] = (x + delta[k]).to(x.dtype)
                continue
            buf = _state(self, state, f"momentum/{k}") if self.momentum else None
            new_x[k], buf = sgd_update(x, delta[k], buf, lr, self.momentum, self.nesterov)
            if buf is not None:
                new_state[f"momentum/{k}"] = buf
        return new_x, new_state


@dataclass(frozen=True)
class Adam:
    """FedAdam (Reddi et al. 2021, Algorithm 2): Adam on the pseudo-gradient, without bias correction.

    ``m`` starts at 0 and ``v`` at ``tau**2`` (the paper asks for ``v_{-1} >= tau^2``; Flower starts
    ``v`` at 0), so the first step is ``lr * (1 - beta1) d / (sqrt(beta2 tau^2 + (1 - beta2) d^2) + tau)``.

    >>> Adam().init({"w": torch.zeros(1)})["v/w"]
    tensor([1.0000e-06])
    """

    lr: float = 0.01  # the server step; the paper tunes it on a grid 10^-3 .. 10^0
    beta1: float = 0.9  # momentum of the pseudo-gradient (the paper's setting)
    beta2: float = 0.99  # memory of the squared pseudo-gradient (the paper's setting)
    tau: float = 1e-3  # adaptivity: larger tau, steps closer to SGD with momentum
    lr_schedule: Schedule | None = None  # round -> factor on lr; None: constant

    def __post_init__(self) -> None:
        _check_adaptive(self)

    def init(self, weights: Weights) -> State:
        return _adaptive_init(weights, self.tau)

    def step(self, weights: Weights, delta: Weights, state: State, round: int) -> tuple[Weights, State]:
        return _adaptive_step(self, adam_second_moment, weights, delta, state, round)


@dataclass(frozen=True)
class Yogi:
    """FedYogi (Reddi et al. 2021, Algorithm 2): like `Adam`, but ``v`` changes additively (see
    `yogi_second_moment`), which the paper found the most robust of the three. Same initial state as `Adam`.

    >>> Yogi(lr=0.1).lr
    0.1
    """

    lr: float = 0.01  # the server step; the paper tunes it on a grid 10^-3 .. 10^0
    beta1: float = 0.9  # momentum of the pseudo-gradient (the paper's setting)
    beta2: float = 0.99  # at most (1 - beta2) * delta^2 change in v per round
    tau: float = 1e-3  # adaptivity: larger tau, steps closer to SGD with momentum
    lr_schedule: Schedule | None = None  # round -> factor on lr; None: constant

    def __post_init__(self) -> None:
        _check_adaptive(self)

    def init(self, weights: Weights) -> State:
        return _adaptive_init(weights, self.tau)

    def step(self, weights: Weights, delta: Weights, state: State, round: int) -> tuple[Weights, State]:
        return _adaptive_step(self, yogi_second_moment, weights, delta, state, round)


@dataclass(frozen=True)
class Adagrad:
    """FedAdagrad (Reddi et al. 2021, Algorithm 2): ``v`` sums every squared pseudo-gradient, so the
    steps of a coordinate only shrink. Same initial state as `Adam`.

    Algorithm 2 shares the momentum line ``m = beta1 m + (1 - beta1) d`` between all three methods;
    here ``beta1`` defaults to 0 (``m = d``, classic Adagrad, as Flower's FedAdagrad).

    >>> Adagrad(lr=0.1, tau=1e-2).tau
    0.01
    """

    lr: float = 0.01  # the server step; the paper tunes it on a grid 10^-3 .. 10^0
    tau: float = 1e-3  # adaptivity: larger tau, steps closer to SGD
    beta1: float = 0.0  # 0: no momentum, classic Adagrad; 0.9 to match Adam and Yogi
    lr_schedule: Schedule | None = None  # round -> factor on lr; None: constant

    def __post_init__(self) -> None:
        _check_lr(self)
        _check_unit(self, "beta1", self.beta1)
        _check_positive(self, "tau", self.tau)

    def init(self, weights: Weights) -> State:
        return _adaptive_init(weights, self.tau)

    def step(self, weights: Weights, delta: Weights, state: State, round: int) -> tuple[Weights, State]:
        return _adaptive_step(self, adagrad_second_moment, weights, delta, state, round)


# ------------------------------------------------------------------------------------- plumbing

def _adaptive_init(weights: Weights, tau: float) -> State:
    state = {}
    for k, v in weights.items():
        if v.is_floating_point():
            state[f"m/{k}"] = torch.zeros_like(v)
            state[f"v/{k}"] = torch.full_like(v, tau * tau)
    return state


def _adaptive_step(opt: Adam | Yogi | Adagrad, second_moment: SecondMoment, weights: Weights, delta: Weights,
                   state: State, round: int) -> tuple[Weights, State]:
    lr = _scheduled_lr(opt, round)
    beta2 = getattr(opt, "beta2", 0.0)
    new_x, new_state = {}, {}
    for k, x in weights.items():
        d = delta[k]
        if not x.is_floating_point():
            new_x[k] = (x + d).to(x.dtype)
            continue
        m = first_moment(_state(opt, state, f"m/{k}"), d, opt.beta1)
        v = second_moment(_state(opt, state, f"v/{k}"), d, beta2)
        new_x[k] = adaptive_update(x, m, v, lr, opt.tau)
        new_state[f"m/{k}"], new_state[f"v/{k}"] = m, v
    return new_x, new_state


def _state(opt: object, state: State, key: str) -> torch.Tensor:
    if key not in state:
        raise ConfigError(f"{type(opt).__name__} state has no {key!r} (it has {len(state)} entries); "
                          f"make it with {type(opt).__name__}(...).init(weights) for this model")
    return state[key]


def _scheduled_lr(opt: SGD | Adam | Yogi | Adagrad, round: int) -> float:
    if opt.lr_schedule is None:
        return opt.lr
    factor = opt.lr_schedule(round)
    if not _real(factor) or factor < 0:
        raise ConfigError(f"{type(opt).__name__}.lr_schedule({round}) returned {factor!r}; "
                          "a schedule must return a finite factor >= 0")
    return opt.lr * float(factor)


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive(opt: object, name: str, value: object) -> None:
    if not _real(value) or not value > 0:
        raise ConfigError(f"{{{name}}} must be a finite number > 0", obj=opt, field=name, value=value)


def _check_unit(opt: object, name: str, value: object) -> None:
    if not _real(value) or not 0 <= value < 1:
        raise ConfigError(f"{{{name}}} must be in [0, 1)", obj=opt, field=name, value=value)


def _check_lr(opt: SGD | Adam | Yogi | Adagrad) -> None:
    _check_positive(opt, "lr", opt.lr)
    if opt.lr_schedule is not None and not callable(opt.lr_schedule):
        raise ConfigError(f"{type(opt).__name__}.lr_schedule must be a function round -> factor "
                          f"(e.g. fedkit.server_opt.cosine(rounds=20)) or None, got {opt.lr_schedule!r}")


def _check_adaptive(opt: Adam | Yogi) -> None:
    _check_lr(opt)
    _check_unit(opt, "beta1", opt.beta1)
    _check_unit(opt, "beta2", opt.beta2)
    _check_positive(opt, "tau", opt.tau)
