"""Engines decide how the clients' work runs; every engine gives the same results.

An engine is a function ``engine(clients, server, device, abort)`` that lets each client pull and
run its tasks until the server has none left for it.
"""

from typing import Callable, Sequence

import torch

from ..client import Client
from ..exchange import Signal
from ..server import Server
from .ray_engine import RayEngine, ray
from .sequential import sequential
from .vectorized import Vectorized, vectorized, vectorized_engine

Engine = Callable[[Sequence[Client], Server, torch.device, Signal], None]
"""How the clients' work runs: ``engine(clients, server, device, abort)``."""

__all__ = ["Engine", "RayEngine", "ray", "sequential", "Vectorized", "vectorized", "vectorized_engine"]
