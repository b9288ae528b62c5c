"""Privacy: differential privacy (`dp`: DP-SGD, DP-FedAvg, Opacus accountants) and FLARE's heuristic filters (`filters`)."""

from . import dp, filters

__all__ = ["dp", "filters"]
