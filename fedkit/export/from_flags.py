"""``fedkit export nvflare --out DIR <the flags of fedkit run>``: the command line's half (`fedkit.cli` parses).

The flags are those of ``fedkit run`` and mean the same: they are checked as a run checks them
(`refuse_unused`, the workflow's `check_federation`), mapped to the same `fk.Experiment`, then exported (`nvflare`).
"""

from __future__ import annotations

from typing import Any, Collection

from ..cli_flags import check_federation, experiment_from_args, refuse_unused
from ..errors import ConfigError
from .nvflare_job import FlareJob, nvflare

# flags of fedkit run that mean nothing for a job FLARE runs: refused if typed, with what to do instead
RUN_ONLY = {
    "engine": "FLARE runs the clients itself (nvflare simulator -t THREADS, or one process per site)",
    "no_progress": "FLARE prints its own logs",
    "max_norm_ratio": "FLARE's FedAvg has no update-norm screen: it aggregates every update that arrives",
}


def job_from_args(a: Any, given: Collection[str] | None) -> FlareJob:
    """The FLARE job the flags ``a`` describe, written to ``a.out`` (``given``: the dests of the flags typed)."""
    if given is not None:
        typed = [d for d in RUN_ONLY if d in given]
        if typed:
            raise ConfigError("; ".join(f"--{d.replace('_', '-')} means nothing for an exported job: {RUN_ONLY[d]}; "
                                        f"drop it" for d in typed))
        refuse_unused(a, given, [a.algorithm])
    exp = experiment_from_args(a)
    check_federation(exp)
    return nvflare(exp, a.out, overwrite=a.overwrite)
