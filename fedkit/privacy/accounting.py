"""Privacy accounting: how much epsilon a sequence of subsampled Gaussian steps spends (Opacus' maths).

An accountant is its history, ``[(noise_multiplier, sample_rate, steps), ...]``, exactly as Opacus'
``accountant.history``; fedkit keeps that list as plain data in a client's or the server's state, so
it survives checkpoints, and `epsilon` rebuilds the number from it. Use ``"rdp"`` (Rényi DP, Opacus'
default, quick) or ``"prv"`` (privacy random variables, tighter, slower). The numbers equal Opacus'
own accountants exactly; these functions only make them quick enough to report every round.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from types import ModuleType
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import ConfigError, refusal
from ..extras import require

if TYPE_CHECKING:
    from opacus.accountants import IAccountant

MECHANISMS = ("rdp", "prv")
History = list[list[float]]
"""An accountant's history: ``[[noise_multiplier, sample_rate, steps], ...]``, as Opacus' ``accountant.history``."""


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


def opacus(module: str = "opacus") -> ModuleType:
    """``module`` of Opacus (optional: ``fedkit[privacy]``), imported when DP is used; or `MissingExtra` saying how
    to install it."""
    return require(module, "differential privacy (DP-SGD, DP-FedAvg and their accounting)")


def opacus_accountant(history: Sequence[Sequence[float]], accountant: str = "rdp") -> "IAccountant":
    """Opacus' own accountant (`RDPAccountant` or `PRVAccountant`) holding ``history``."""
    check_mechanism(accountant)
    acc = opacus("opacus.accountants").create_accountant(mechanism=accountant)
    acc.history = [(float(z), float(q), int(s)) for z, q, s in history]
    return acc


def _rdp() -> tuple[ModuleType, list[float]]:
    """Opacus' RDP analysis, and the orders its `RDPAccountant` uses."""
    return opacus("opacus.accountants.analysis.rdp"), opacus("opacus.accountants").RDPAccountant.DEFAULT_ALPHAS


@functools.lru_cache(maxsize=512)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    rdp, orders = _rdp()
    return rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders)


def epsilon(history: Sequence[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """The epsilon spent by ``history`` at ``delta``: what Opacus' accountant with this history answers.

    For RDP the per-step RDP curve of each (sample rate, noise) is cached and scaled by the steps,
    the same arithmetic as `RDPAccountant.get_epsilon` (equal to the last bit), but quick enough to
    report every round. No noise gives ``inf``; an empty history 0. Never negative: the RDP conversion
    can fall below 0 for a large delta, and (epsilon, delta)-DP implies (0, delta)-DP for any epsilon <= 0
    (e^epsilon <= 1), so 0 is the sound answer there.
    """
    check_mechanism(accountant)
    if not history:
        return 0.0
    with warnings.catch_warnings():  # "optimal order is the largest alpha": expected for large epsilons
        warnings.filterwarnings("ignore", message="Optimal order")
        if accountant == "rdp":
            curve = sum([_rdp_per_step(float(q), float(z)) * int(s) for z, q, s in history])
            rdp, orders = _rdp()
            eps, _ = rdp.get_privacy_spent(orders=orders, rdp=curve, delta=delta)
            return max(0.0, float(eps))
        if any(z == 0 for z, _, _ in history):
            return math.inf
        return max(0.0, float(opacus_accountant(history, accountant).get_epsilon(delta=delta)))


@functools.lru_cache(maxsize=256)
def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         accountant: str = "rdp") -> float:
    """The smallest noise multiplier (to Opacus' tolerance) that spends at most ``target_epsilon``
    in ``steps`` steps at ``sample_rate``: Opacus' `get_noise_multiplier` (a search of a second or
    so, remembered for the same arguments)."""
    get_noise_multiplier = opacus("opacus.accountants.utils").get_noise_multiplier
    check_mechanism(accountant)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Optimal order")
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=int(steps), accountant=accountant))
    except ValueError as e:
        raise ConfigError(f"no noise multiplier reaches epsilon {target_epsilon} at delta {delta} over {steps} step(s) "
                          f"at sample rate {sample_rate:.4g} ({e}); raise target_epsilon or delta, or plan fewer rounds") from None


def check_mechanism(accountant: str) -> None:
    """Raise `ConfigError` unless ``accountant`` is one of Opacus' and Opacus is installed (`MissingExtra`): what
    every DP setting checks when it is made, so that DP without Opacus is refused before any round."""
    if accountant not in MECHANISMS:
        raise ConfigError(f"unknown {{accountant}} {accountant!r}; use one of: {', '.join(MECHANISMS)}", field="accountant")
    opacus()


def check_delta(name: str, delta: Any) -> None:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise refusal(name, "must be in (0, 1), and well below 1 / (number of records)", delta)


def check_delta_below(name: str, delta: float, population: int, what: str) -> None:
    """Refuse a ``delta`` of 1 / ``population`` or more: ``population`` is how many individuals the guarantee
    hides (clients for user-level DP, a client's examples for example-level DP), ``what`` says which.

    With delta >= 1/n a mechanism that publishes one of the n records in the clear, at random, meets the
    guarantee: (epsilon, delta) then promises nothing, and the accountant's epsilon means nothing either.
    """
    if population < 1 or delta < 1 / population:
        return
    advice = min(1e-5, 10.0 ** math.floor(math.log10(0.1 / population)))
    raise refusal(name, f"is {delta:g}, but it must be below 1 / {what} (1/{population} = {1 / population:.3g}): with "
                  "a delta that large, publishing one of them in the clear at random would meet the guarantee, so it "
                  f"would promise nothing. Use a delta well below 1/{population}, e.g. {advice:g}")


def check_number(name: str, v: Any, low: float, strict: bool = False, high: float | None = None,
                  allow_none: bool = False, finite: bool = False) -> None:
    if v is None and allow_none:
        return
    ok = not isinstance(v, bool) and isinstance(v, numbers.Real) and not math.isnan(v)
    ok = ok and (v > low if strict else v >= low) and (high is None or v <= high) and (not finite or math.isfinite(v))
    if not ok:
        bound = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise refusal(name, f"must be a {'finite ' if finite else ''}number {bound}{' or None' if allow_none else ''}", v)
