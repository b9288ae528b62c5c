"""Fault injection, for teaching and testing: clients that drop out, crash, straggle or send garbage.

>>> f = Faults(dropout=0.1, crash=0.05, corrupt=0.1, seed=0)
>>> [f.draw(round=0, client="site-1", attempt=a) for a in range(3)]  # doctest: +SKIP
[None, 'corrupt', None]

Each client, in each round (and each retry of a round), fails with the given probabilities, drawn
from a generator seeded by (seed, round, attempt, client): the same faults every time you run.
Stragglers are simulated without sleeping: their reply is stamped ``delay`` seconds late, so a task
deadline (``FedAvg(task_timeout=...)``) rejects them exactly as it would a really slow client.
"""

from __future__ import annotations

import math
import numbers
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError
from .exchange import DXO

KINDS = ("dropout", "crash", "straggle", "corrupt")
CORRUPTIONS = ("nan", "inf", "keys", "shape", "scale")


@dataclass(frozen=True)
class Faults:
    """Per-client, per-round fault probabilities (they must sum to at most 1)."""

    dropout: float = 0.0  # the client takes the task and never answers
    crash: float = 0.0  # the executor raises an exception
    straggle: float = 0.0  # the client answers `delay` seconds late
    corrupt: float = 0.0  # the result is damaged in one of `corruptions`
    delay: float = 3600.0  # how late a straggler is, in (simulated) seconds
    corruptions: tuple[str, ...] = CORRUPTIONS  # NaN, Inf, wrong keys, wrong shapes, scaled garbage
    seed: int = 0

    def __post_init__(self) -> None:
        for kind in KINDS:
            p = getattr(self, kind)
            if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
                raise ConfigError(f"{{{kind}}} is a probability and must be in [0, 1]", obj=self, field=kind, value=p)
        total = sum(getattr(self, k) for k in KINDS)
        if total > 1.0 + 1e-9:
            raise ConfigError(f"the fault probabilities ({{dropout}}, {{crash}}, {{straggle}}, {{corrupt}}) sum to "
                              f"{total:g}; a client can fail only one way per round, so they must sum to at most 1",
                              obj=self, field="dropout")
        d = self.delay
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not (d > 0 and math.isfinite(d)):
            raise ConfigError("{delay} must be > 0 and finite (seconds)", obj=self, field="delay", value=d)
        s = self.seed
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)) or not 0 <= s < 2**63:
            raise ConfigError("{seed} must be a whole number in [0, 2**63) (e.g. 0)", obj=self, field="seed", value=s)
        if not isinstance(self.corruptions, (tuple, list)):
            raise ConfigError(f"Faults.corruptions must be a tuple of names from {CORRUPTIONS}, got {self.corruptions!r}")
        bad = [c for c in self.corruptions if not isinstance(c, str) or c not in CORRUPTIONS]
        if bad or not self.corruptions:
            raise ConfigError(f"Faults.corruptions must be a non-empty subset of {CORRUPTIONS}, got {self.corruptions!r}")

    @property
    def any(self) -> bool:
        return any(getattr(self, k) > 0 for k in KINDS)

    def rng(self, round: int, client: str, attempt: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, round, attempt, zlib.crc32(client.encode())])

    def draw(self, round: int, client: str, attempt: int = 0) -> str | None:
        """Which fault (one of `KINDS`) strikes ``client`` in this round and attempt, or None."""
        u = self.rng(round, client, attempt).random()
        edge = 0.0
        for kind in KINDS:
            edge += getattr(self, kind)
            if u < edge:
                return kind
        return None

    def corruption(self, round: int, client: str, attempt: int = 0) -> str:
        """Which of ``corruptions`` `damage` applies to ``client``'s result in this round and attempt."""
        return self._corruption(self.rng(round, client, attempt))

    def _corruption(self, rng: np.random.Generator) -> str:
        rng.random()  # the draw that chose 'corrupt'
        return self.corruptions[int(rng.integers(len(self.corruptions)))]

    def damage(self, result: DXO, round: int, client: str, attempt: int = 0) -> DXO:
        """``result`` with its data damaged in one of ``corruptions``, chosen by the same seeded draw."""
        rng = self.rng(round, client, attempt)
        how = self._corruption(rng)
        return corrupt(result, how, seed=int(rng.integers(2**31)))


def corrupt(result: DXO, how: str, seed: int = 0) -> DXO:
    """A copy of ``result`` damaged one way: ``nan``, ``inf``, ``keys``, ``shape`` or ``scale``.

    Ciphertexts (lists of bytes, see `fedkit.privacy.he`) cannot hold a NaN the server could see: they
    get garbage bytes instead, or lose their last ciphertext for ``shape``. Plain numbers (metrics)
    become NaN, Inf, a list, or 1e4 times larger.
    """
    data = dict(result.data)
    if not data:
        return result
    key = sorted(data)[0]
    gen = torch.Generator().manual_seed(seed)
    if how not in CORRUPTIONS:
        raise ConfigError(f"unknown corruption {how!r}; use one of {CORRUPTIONS}")
    if how == "scale":  # finite, right shape, absurd size: only a norm screen or a robust rule stops it
        data = {k: _damaged(v, how, gen) for k, v in data.items()}
    elif how == "keys":
        data[key + ".renamed"] = data.pop(key)
    elif not isinstance(data[key], torch.Tensor):
        data[key] = _damaged(data[key], how, gen)
    elif how == "nan":
        data[key] = data[key].clone().fill_(float("nan"))
    elif how == "inf":
        data[key] = data[key].clone().fill_(float("inf"))
    else:  # shape
        data[key] = data[key].reshape(-1)[:-1].clone() if data[key].numel() > 1 else torch.zeros(2)
    return result.with_data(data, corrupted=how)


def _damaged(v: object, how: str, gen: torch.Generator) -> object:
    if isinstance(v, torch.Tensor):  # only 'scale' gets here
        return torch.randn(v.shape, generator=gen, dtype=v.dtype) * 1e4 if v.is_floating_point() else v
    if isinstance(v, list) and v and all(isinstance(b, (bytes, bytearray)) for b in v):  # ciphertexts
        if how == "shape":
            return v[:-1] if len(v) > 1 else [bytes(v[0][: len(v[0]) // 2])]
        first = bytearray(v[0])
        first[int(torch.randint(len(first), (1,), generator=gen))] ^= 0xFF  # one flipped byte: garbage in transit
        return [bytes(first), *v[1:]]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return {"nan": float("nan"), "inf": float("inf"), "shape": [v, v], "scale": v * 1e4}[how]
    return v
