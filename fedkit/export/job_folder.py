"""Where an export may write its job: a new or empty folder, or (with ``overwrite``) one an earlier export wrote.

Every job folder an export writes holds `MARKER` (``.fedkit-export.json``: what wrote it and the files it
wrote). ``overwrite=True`` (``--overwrite``) replaces only such a folder, and only while it holds nothing
but those files: a folder holding a notebook and its data is never deleted, whatever the flags say. The
working directory, a folder above it, the home folder and the filesystem root are refused outright.
Every refusal comes before anything is written or deleted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

MARKER = ".fedkit-export.json"  # in each job folder an export writes: what wrote it, and its files
WRITTEN_BY = "fedkit.export.nvflare"


class FolderRefused(ConfigError):
    """A folder an export must not write to (or replace); nothing was written or deleted."""


def files_in(folder: Path) -> list[str]:
    """The files under ``folder``, relative to it, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def write_marker(folder: Path, job: str) -> None:
    """Mark ``folder`` (a job folder, complete) as an export's, listing its files."""
    marker = {"written_by": WRITTEN_BY, "job": job, "files": files_in(folder),
              "note": "an export with overwrite=True replaces this folder only while it holds just these files"}
    (folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n")


def check_folder(out: Path, overwrite: bool) -> None:
    """Refuse ``out`` with `FolderRefused` (the reason, and what to do) unless an export may write there."""
    where, cwd, home = out.resolve(), Path.cwd().resolve(), _home()
    example = f"give the job a folder of its own, e.g. {{out='{Path('jobs') / (where.name or 'job')}'}}"
    instead = "choose another folder (a new or empty one)"
    if where == cwd or where in cwd.parents:
        said = "the working directory" if where == cwd else "a folder above the working directory"
        raise FolderRefused(f"{out} is {said}, and an export replaces the folder it writes: it never writes there "
                            f"(nothing was written); {example}", field="out")
    if where in (home, Path(where.anchor)):
        said = "your home folder" if where == home else "the filesystem root"
        raise FolderRefused(f"{out} is {said}: an export never writes there (nothing was written); {example}",
                            field="out")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FolderRefused(f"{out} is {'a link' if out.is_symlink() else 'a file'}, not a folder an export wrote "
                            f"(nothing was written); {instead}", field="out")
    if not out.exists() or not any(out.iterdir()):
        return
    written = _marked(out)
    if written is None:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
        raise FolderRefused(f"{out} holds what an export did not write ({_some(entries)}): an export replaces "
                            f"only a folder an earlier export wrote (with its {MARKER}), even with {{overwrite=True}}; "
                            f"nothing was deleted; {instead}", field="out")
    others = [f for f in files_in(out) if f not in written and f != MARKER]
    if others:
        raise FolderRefused(f"{out} was written by an export but now also holds {_some(others)}: an export does not "
                            "replace it, even with {overwrite=True} (nothing was deleted); move those files out, or "
                            + instead, field="out")
    if not overwrite:
        raise FolderRefused(f"{out} holds a job an earlier export wrote: pass {{overwrite=True}} to replace it, or "
                            + instead, field="out")


def _marked(folder: Path) -> set[str] | None:
    """The files the export that wrote ``folder`` listed in its marker; None when it has no readable marker."""
    try:
        marker: Any = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("written_by") != WRITTEN_BY or not isinstance(marker.get("files"), list):
        return None
    return {str(f) for f in marker["files"]}


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError):  # no HOME and no password entry
        return None


def _some(names: list[str], shown: int = 3) -> str:
    """A few of ``names`` for a message: ``a, b, c and 4 more``."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
