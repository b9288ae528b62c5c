"""A run directory holds one run at a time: an OS lock while a run writes there, and no silent overwrite.

`claim` takes an exclusive, non-blocking OS lock (``flock``) on ``DIR/run.lock`` for as long as a run
(``Simulator.run``, ``start`` or ``resume`` with ``out=``) writes into ``DIR``, and records in the file who
holds it (pid, host, start time, command). A second run or resume in the same directory, from this
process or another, is refused at once with `RunDirBusy`, which names the holder. The operating system
drops the lock when the holder's process ends, however it ends (a ``kill -9`` included): a stale
``run.lock`` file never blocks anybody, it only says who ran there last.

A new run refuses a directory that already holds a run (a checkpoint, ``checkpoints/latest.json``, or a
``summary.json``) with `RunExists`, unless ``overwrite=True``: a finished 20-round run is never replaced
by a 1-round one without a word.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> with claim(d) as lock:
...     try:
...         claim(d)
...     except RunDirBusy as e:
...         print(e.holder["pid"] == lock.holder["pid"])
True
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import checkpoint
from .errors import ConfigError
from .status import RunStatus

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: msvcrt's byte-range lock, also dropped when the process ends
    fcntl = None  # type: ignore[assignment]
    import msvcrt

LOCK = "run.lock"

_held: dict[str, "_Held"] = {}  # the run directories this process holds, by real path
_guard = threading.Lock()


class RunDirBusy(ConfigError):
    """Another run (in this process or another) holds the run directory; ``holder`` says who (may be empty)."""

    def __init__(self, message: str, directory: Path, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.directory, self.holder = directory, holder


class RunExists(ConfigError):
    """A new run was asked for in a directory that holds a run already; ``found`` describes it."""

    def __init__(self, message: str, directory: Path, found: str) -> None:
        super().__init__(message)
        self.directory, self.found = directory, found


class _Held:
    """This process's lock on one run directory: the locked file, who holds it, and how many claims share it."""

    def __init__(self, directory: Path, key: str, fd: int, holder: dict[str, Any], reentrant: bool) -> None:
        self.directory, self.key, self.fd, self.holder, self.reentrant = directory, key, fd, holder, reentrant
        self.thread, self.claims = threading.get_ident(), 0

    def drop(self) -> None:
        """The last claim is released: remove the file (while still locked, so nobody takes a file on its way
        out), then unlock; a process that opened it meanwhile sees it gone and locks the next one."""
        _held.pop(self.key, None)
        try:
            if _same_file(self.fd, self.directory / LOCK):
                (self.directory / LOCK).unlink()
        except OSError:
            pass
        _unlock(self.fd)
        os.close(self.fd)


class RunDirLock:
    """One run's claim on its directory; `release` (or leaving the ``with`` block) gives it back, once."""

    def __init__(self, held: _Held, created: list[Path]) -> None:
        self.directory, self.path, self.holder = held.directory, held.directory / LOCK, held.holder
        self._held: _Held | None = held
        self._created = created  # the folders this claim made (removed again by release(undo=True) when empty)
        held.claims += 1

    def __enter__(self) -> "RunDirLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._held is not None

    @property
    def made(self) -> bool:
        """Did this claim create the run directory (so that everything in it was written under the claim)?"""
        return bool(self._created) and self._created[-1] == self.directory

    def release(self, undo: bool = False) -> None:
        """Give the claim back (the lock goes with the last claim that shares it). ``undo`` (a refused run):
        also remove the run directory with what was written into it, and the folders above it, when this
        claim created them: a run refused before its first round leaves nothing behind."""
        with _guard:
            held, self._held = self._held, None
            if held is None:
                return
            if undo and self.made and held.claims == 1:
                shutil.rmtree(self.directory, ignore_errors=True)  # still locked: nobody else wrote there
            held.claims -= 1
            if held.claims == 0:
                held.drop()
        if undo:
            _undo(self._created)

    def __repr__(self) -> str:
        return f"<RunDirLock {self.directory} {'held' if self.held else 'released'}>"


def claim(directory: str | os.PathLike, *, fresh: bool = True, overwrite: bool = False,
          reentrant: bool = False) -> RunDirLock:
    """Lock ``directory`` for one run (creating it if needed) and return the lock.

    `RunDirBusy` when another run holds it; with ``fresh`` (a new run, not a resume), `RunExists` when it
    holds a run already, unless ``overwrite`` (then that run's summary goes: the new run replaces it).
    `ConfigError` when it cannot be a run directory (a file, under a file, not writable).
    ``reentrant``: a claim of the same directory later in this thread (the run that the command line
    starts after writing its ``cli.json``) shares this lock instead of being refused.
    """
    path = Path(directory)
    _check_path(path)
    created = [p for p in (path, *path.parents) if not p.exists()][::-1]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"the run directory ({{out}}) {str(path)!r} cannot be created ({e.strerror or e}); give a "
                          "directory you can write into", field="out") from None
    key = os.path.realpath(path)
    with _guard:
        mine = _held.get(key)
        if mine is not None:
            if mine.reentrant and mine.thread == threading.get_ident():
                return RunDirLock(mine, [])
            raise RunDirBusy(_busy(path, mine.holder, here=True), path, dict(mine.holder))
        try:
            fd = _lock(path)
        except RunDirBusy:
            _undo(created)
            raise
        except OSError as e:
            _undo(created)
            raise ConfigError(f"the run directory ({{out}}) {str(path)!r} cannot be written to ({e.strerror or e}); "
                              "give a directory you can write into, or fix its permissions", field="out") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": _command()}
        _held[key] = held = _Held(path, key, fd, holder, reentrant)
        lock = RunDirLock(held, created)
    try:
        found = existing_run(path) if fresh else None
        if found is not None:
            if not overwrite:
                raise RunExists(f"{str(path)!r} holds {found}; a new run there would replace it", path, found)
            (path / "summary.json").unlink(missing_ok=True)  # the new run replaces it: no summary of the old one
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(holder).encode())
    except BaseException:
        lock.release(undo=True)
        raise
    return lock


def existing_run(directory: str | os.PathLike) -> str | None:
    """What run ``directory`` holds ("a finished run of 20 round(s)", "an interrupted run..."), or None if none:
    a run is a checkpoint to resume (an interrupted run) or a ``summary.json`` (an ended one)."""
    path = Path(directory)
    if not ((path / "summary.json").exists() or checkpoint.exists(path)):
        return None
    try:
        summary = json.loads((path / "summary.json").read_text())
        rounds = int(summary["rounds"])
        if rounds == 0 and not checkpoint.exists(path):
            return None  # a run that ended before its first round: nothing there to lose
        status = summary.get("status")
        if status == RunStatus.DONE:
            return f"a finished run of {rounds} round(s)"
        kind = {RunStatus.ABORTED: "an interrupted", RunStatus.FAILED: "a failed"}.get(status, f"a {status}")
        return f"{kind} run ({rounds} round(s) done)"
    except (OSError, ValueError, TypeError, KeyError):
        pass
    try:
        latest = json.loads((path / "checkpoints" / "latest.json").read_text())
        return f"an interrupted run, checkpointed after round {int(latest['round']) + 1}"
    except (OSError, ValueError, TypeError, KeyError):
        return "a run (its checkpoints or summary)"


def holder(directory: str | os.PathLike) -> dict[str, Any] | None:
    """Who holds ``directory`` now (pid, host, started, command; {} if unknown), or None when nobody does."""
    path = Path(directory)
    key = os.path.realpath(path)
    with _guard:
        if key in _held:
            return dict(_held[key].holder)
    if not (path / LOCK).exists():
        return None
    try:
        fd = os.open(path / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            _unlock(fd)
            return None
        return _read_holder(path)
    finally:
        os.close(fd)


def _check_path(path: Path) -> None:
    existing = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
    if existing is not None and not existing.is_dir():
        if existing == path:
            raise ConfigError(f"the run directory ({{out}}) {str(path)!r} is a file, not a directory; a run writes "
                              "several files (model.pt, history, checkpoints) into its directory", field="out")
        raise ConfigError(f"the run directory ({{out}}) {str(path)!r} cannot be created: {existing} is a file, not a "
                          "directory", field="out")


def _lock(path: Path) -> int:
    """An fd of ``path/run.lock``, exclusively locked; `RunDirBusy` naming the holder when another has it."""
    file = path / LOCK
    for _ in range(10):
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            who = _read_holder(path)
            raise RunDirBusy(_busy(path, who, here=False), path, who)
        if _same_file(fd, file):
            return fd
        _unlock(fd)  # the holder removed the file as we opened it: lock the one now there
        os.close(fd)
    raise OSError(f"{file} keeps being replaced")


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except (BlockingIOError, PermissionError):
        return False
    except OSError as e:  # pragma: no cover - e.g. a file system without locks: the lock cannot protect anything
        raise OSError(e.errno, f"cannot lock {LOCK}: {e.strerror}") from None


def _unlock(fd: int) -> None:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        else:  # pragma: no cover
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    except OSError:
        pass


def _same_file(fd: int, file: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(file)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(path: Path) -> dict[str, Any]:
    try:
        who = json.loads((path / LOCK).read_text() or "{}")
        return who if isinstance(who, dict) else {}
    except (OSError, ValueError):
        return {}


def _busy(path: Path, who: dict[str, Any], here: bool) -> str:
    if who.get("pid") is not None:
        by = (f"process {who['pid']}" + (f" on {who['host']}" if who.get("host") else "")
              + (f" ({who['command']})" if who.get("command") else "")
              + (f", started {who['started']}" if who.get("started") else ""))
    else:
        by = "another process (it has not said which yet)"
    if here:
        by = f"another run of this process, {by}"
    return (f"the run directory ({{out}}) {str(path)!r} is in use by {by}: two runs in one directory would overwrite "
            "each other's checkpoints. Wait for that run to end (or stop it), or use another directory")


def _command() -> str:
    """This process's command line, short: ``fedkit run ...``, ``python -m fedkit run ...``, ``python`` (a kernel)."""
    argv = list(getattr(sys, "argv", None) or [""])
    first = Path(argv[0]).name
    if first == "__main__.py":
        first = f"python -m {Path(argv[0]).parent.name}"
    elif first in ("", "-", "-c"):
        return "python"
    return " ".join([first, *argv[1:]])[:300]


def _undo(created: list[Path]) -> None:
    """Remove the folders a claim created, deepest first, as long as they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            break
