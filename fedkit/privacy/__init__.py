"""Privacy, composed rather than inherited: each technique is a set of filters and small functions.

* `dp`: differential privacy — DP-SGD on clients, DP-FedAvg on the server, Opacus' accountants.
* `filters`: FLARE's heuristic privacy filters (exclude variables, percentile privacy), no formal guarantee.
* `he`: homomorphic encryption of model updates (CKKS with TenSEAL), e.g. ``FedAvg(rounds=20, he=he.CKKS())``.

Opacus and TenSEAL are imported only when a run uses them, so ``import fedkit`` works without them.
"""

from . import dp, filters, he

__all__ = ["dp", "filters", "he"]
