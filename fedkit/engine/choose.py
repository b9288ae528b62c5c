"""Engines by name: what ``Simulator(engine="auto")`` and ``fedkit run --engine`` mean."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import ConfigError
from .ray_engine import ray
from .sequential import sequential
from .vectorized import vectorized_engine

NAMES = ("auto", "sequential", "vectorized", "ray")
"""The engines a name can ask for. ``auto`` is the vectorized engine: it trains together the clients of a round
that use the standard trainer, and every other task one client after another (the reason logged once)."""


def resolve(engine: str | Callable[..., Any]) -> tuple[Callable[..., Any], str]:
    """The engine ``engine`` names (or ``engine`` itself, a function or engine object) and its name for the summary.

    A name gives a new engine object each time (``"ray"`` starts a local Ray at the first round, or joins the one
    this process has already); pass ``fk.engine.ray(address=...)`` for a cluster.
    """
    if callable(engine):
        return engine, getattr(engine, "engine_name", None) or getattr(engine, "__name__", type(engine).__name__)
    if not isinstance(engine, str) or engine not in NAMES:
        raise ConfigError(f"{{engine}} must be one of {', '.join(NAMES)} or an engine such as fk.engine.sequential",
                          field="engine", value=engine)
    if engine == "sequential":
        return sequential, "sequential"
    if engine == "ray":
        return ray(), "ray"
    return vectorized_engine(), engine
