"""Privacy plug-ins, composed rather than inherited: each technique is a few small files.

* `dp`: differential privacy with Opacus: `accounting` (the maths), `dp_sgd` (example-level DP-SGD),
  `dp_fedavg` (user-level DP-FedAvg) and `clipping` (its clip and noise stages, and a client filter).
* `filters`: FLARE's heuristic privacy filters (exclude variables, percentile privacy), no formal guarantee.
* `he`: homomorphic encryption with CKKS (TenSEAL): `ckks` (settings), `he_layout`, `he_keys`,
  `he_filters` (the clients' half) and `he_model` (the server's encrypted global model).

Neither the simulator nor the layers below it import this package: a workflow holds the scheme
(``he=CKKS()``) and the simulator calls its hooks (`fedkit.global_model.Encryption`). Opacus and TenSEAL are
imported only when a run uses them, so ``import fedkit`` works without them.
"""

from . import dp, filters, he

__all__ = ["dp", "filters", "he"]
