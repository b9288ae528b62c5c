"""How many torch CPU threads a run uses: ``threads="auto"`` or a number, set for the run and restored after.

>>> check_threads("auto"), check_threads(2)
('auto', 2)
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any

import torch
from torch import nn

from .errors import refusal

# threads="auto": one torch CPU thread for a model smaller than this (parameters). Such models train in tiny
# matrix products (batches of 16-64) where splitting work over threads saves nothing, and a thread pool on a busy
# (shared, oversubscribed) machine can collapse: 5 rounds of the digits MLP (~5k parameters) were seen to take
# 122 s with torch's default threads on a busy 2-core machine against 3 s with one. benchmarks/threads.py measures
# it: one thread is as fast idle (ratio ~1.0) and faster under contention (~1.1-1.5x on 2 cores). At ~1M
# parameters (a CNN on 32x32 images, wide MLPs) the products are large enough for several threads to pay off.
AUTO_ONE_THREAD_BELOW = 1_000_000


def check_threads(threads: Any, what: str = "threads") -> str | int:
    """``"auto"`` or a whole number >= 1 (torch's CPU threads for the run); `ConfigError` otherwise."""
    if threads == "auto" and isinstance(threads, str):
        return threads
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise refusal(what, "must be 'auto' or a whole number >= 1 (torch's CPU threads)", threads)
    return int(threads)


def resolve_threads(threads: str | int, model: nn.Module, device: torch.device) -> int:
    """The torch CPU threads a run uses: ``threads`` itself, or for ``"auto"`` one thread for a model under
    `AUTO_ONE_THREAD_BELOW` parameters on the CPU, else torch's current setting (its default: the cores)."""
    if threads != "auto":
        return int(threads)
    size = sum(p.numel() for p in model.parameters())
    return 1 if device.type == "cpu" and size < AUTO_ONE_THREAD_BELOW else torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(n: int):
    """Set torch's CPU threads to ``n`` for the block, and restore the previous value after.

    ``torch.set_num_threads`` is process-wide: while a run goes, all of the process's torch work (another run
    started with ``start()``, a cell running meanwhile) uses ``n`` threads; two runs at once with different
    settings leave whichever ended last's "previous" value behind.
    """
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)
