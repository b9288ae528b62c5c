"""Progress over a run's rounds, with the latest global accuracy, shown where a person looks at it.

In a notebook, a progress widget (tqdm's); on a terminal, a tqdm bar on stderr; anywhere else (a log file,
a pipe, CI) one plain line per round on stderr instead of carriage-return updates that would flood the log.
A notebook never gets progress on stderr: JupyterLab draws stderr in a red box that a student reads as an
error, so a kernel without ipywidgets gets its lines on stdout. Command-line tools keep progress on stderr,
which leaves stdout to their results (``fedkit run --json`` prints its summary as stdout's last line).
"""

from __future__ import annotations

import sys
import warnings
from typing import Any, TextIO

from .history import RoundRecord


class Bar:
    """Progress of a run of ``total`` rounds (None: not known), ``done`` of them already (a resumed run)."""

    def __init__(self, total: int | None, done: int = 0, desc: str = "rounds") -> None:
        self._total, self._done, self._desc = total, done, desc
        self._lines: TextIO | None = None
        self._bar = None
        tqdm = _tqdm_class()
        if tqdm is not None:
            self._bar = tqdm(total=total, initial=done, desc=desc, unit="round")
        else:
            self._lines = sys.stdout if in_kernel() else sys.stderr

    def update_record(self, record: RoundRecord) -> None:
        """Count ``record``'s round and show its accuracy (a listener of the run)."""
        acc = record.metrics.get("accuracy")
        self._done += 1
        if self._bar is None:
            of = f"/{self._total}" if self._total else ""
            score = f", accuracy {acc:.3f}" if acc is not None else ""
            print(f"{self._desc}: round {self._done}{of}{score}", file=self._lines, flush=True)
            return
        if acc is not None:
            self._bar.set_postfix(accuracy=f"{acc:.3f}")
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def bar(total: int | None, enabled: bool, done: int = 0, desc: str = "rounds") -> Bar | None:
    """A `Bar` when ``enabled`` (a run's ``progress=True``), else None."""
    return Bar(total, done, desc) if enabled else None


def in_kernel() -> bool:
    """Whether this runs in a Jupyter kernel, whose outputs a notebook front-end shows (not a terminal IPython)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and type(shell).__module__.startswith("ipykernel")


def _tqdm_class() -> type | None:
    """tqdm's widget in a kernel whose front-end shows widgets; its text bar on a terminal; else None (lines)."""
    if in_kernel():
        with warnings.catch_warnings():  # no warning on stderr: without ipywidgets, lines on stdout instead
            warnings.simplefilter("ignore")
            from tqdm.auto import tqdm
            from tqdm.notebook import tqdm_notebook
        return tqdm if issubclass(tqdm, tqdm_notebook) else None
    if _isatty(sys.stderr):
        from tqdm import tqdm

        return tqdm
    return None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
