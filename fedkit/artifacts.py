"""What a run leaves in its directory: results (history, model, settings, summary), its plot, and the checks
that refuse, before the first round, a directory it could not write them into.

The plots load plotly.js from one shared copy (`shared_plotlyjs`) next to the run directories.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .exchange import Weights
from .history import LOG, History, strict, write_atomic


def shared_plotlyjs(folder: str | Path) -> Path:
    """``folder/plotly.min.js`` (4.8 MB), written once and shared by the plots of the run directories in ``folder``
    (``runs/``, or a comparison's folder), instead of a copy in every run directory."""
    from plotly.offline import get_plotlyjs

    path = Path(folder) / "plotly.min.js"
    js = get_plotlyjs().encode()
    if not path.is_file() or path.stat().st_size != len(js):  # missing, or of another plotly version
        # a temporary name of this process and thread's own: runs in several processes may share the folder
        write_atomic(path, js, tmp=path.with_name(f".plotly.min.js.{os.getpid()}.{threading.get_ident()}"))
    return path


def write_html(figure: Any, html: Path, js_folder: Path) -> None:
    """Write ``figure`` to ``html``, loading plotly.js from the shared copy in ``js_folder`` by a relative path: it
    opens offline as long as the run directory stays next to it (move ``js_folder`` whole). Where ``js_folder``
    cannot be written, ``html``'s own folder gets a copy."""
    try:
        js = shared_plotlyjs(js_folder)
    except OSError:
        js = shared_plotlyjs(html.parent)
    page = figure.to_html(include_plotlyjs=os.path.relpath(js, html.parent).replace(os.sep, "/"))
    write_atomic(html, page.encode("utf-8"))


class SaveError(RuntimeError):
    """A run whose results could not be written into its run directory."""


def strict_json(obj: Any) -> str:
    """Indented strict JSON: NaN and infinities as null, unknown objects as their text."""
    return json.dumps(strict(obj), indent=1, allow_nan=False)


# what a run writes into its directory: name -> is it a folder
RUN_DIR_ENTRIES = {"model.pt": False, "summary.json": False, "config.json": False, "history.json": False, LOG: False,
                    "rounds.csv": False, "clients.csv": False, "plot.html": False, "plotly.min.js": False,
                    "checkpoints": True}


def check_run_dir(path: Path) -> None:
    """Refuse, before the first round, a run directory the run could not write its results into."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir():
        if existing == path:
            raise ConfigError(f"{{out={str(path)!r}}} is a file, not a directory; a run writes several files (model.pt, "
                              "history, checkpoints) into its directory. Give the path of a directory (it is created "
                              "if missing), or move the file away.", field="out")
        raise ConfigError(f"{{out={str(path)!r}}} cannot be created: {existing} is a file, not a directory. Give a path "
                          "whose parents are directories (or do not exist yet).", field="out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".fedkit-write-test-{threading.get_ident()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{{out={str(path)!r}}} cannot be written to ({e.strerror or e}); give a directory you can "
                          "write into, or fix its permissions", field="out") from None
    for name, folder in RUN_DIR_ENTRIES.items():
        p = path / name
        if (p.exists() or p.is_symlink()) and p.is_dir() != folder:
            raise ConfigError(f"{p} is {'a file' if folder else 'a directory'}, but the run writes its "
                              f"{'checkpoints into a directory' if folder else 'file ' + repr(name)} there; remove or "
                              "rename it, or give another {out}", field="out")
        if p.is_file() and not os.access(p, os.W_OK):
            raise ConfigError(f"{p} is read-only, and the run writes its {name!r} there; make it writable, remove it, "
                              "or give another {out}", field="out")


def write_config(directory: Path, config: dict[str, Any]) -> None:
    """``directory/config.json``: the settings of the run (`fedkit.simulator.Simulator.describe`)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(strict_json(config))


def write_results(directory: Path, history: History, weights: Weights, config: dict[str, Any]) -> None:
    """Write a run's history (JSON, CSV), final model (``model.pt``) and settings (``config.json``) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    history.save(directory)
    torch.save(weights, directory / "model.pt")
    write_config(directory, config)


def write_summary(directory: Path, summary: dict[str, Any]) -> None:
    """``directory/summary.json``: a run's summary (`fedkit.run.Run.summary`), replaced whole or not at all."""
    write_atomic(directory / "summary.json", strict_json({**summary, "run_dir": str(directory)}).encode())
