"""Engines decide how the clients' work runs; every engine gives the same results.

An engine is a function ``engine(clients, server, device, abort)`` that lets each client pull and
run its tasks until the server has none left for it.
"""

from .sequential import sequential

__all__ = ["sequential"]
