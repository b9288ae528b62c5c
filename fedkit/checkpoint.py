"""Checkpoints: everything a run needs to continue after round k, written so that a crash cannot tear it.

Layout inside a run directory, by party: the server's files apart from each client's::

    history.jsonl                                the run's history, a line per round and event (appended, never rewritten)
    checkpoints/round-00007/server/model.pt      global weights (with HE: the plaintext layers only)
                                  /state.pt      server state (server-optimizer moments; with HE the encrypted model
                                                 and the public context)
                           /clients/site-1.pt    one client's state, less its caches (keys starting with "_"); with
                                   /site-2.pt    HE it holds the federation's SECRET key: never share this folder
    checkpoints/latest.json                      {"round": 7, "dir": "round-00007", "files": {path: sha256},
                                                  "clients": {name: path}, "history": {"bytes": ..., "sha256": ...,
                                                  "rounds": 8, "events": ...}, ...}

Everything outside ``clients/`` is what the server holds, and holds no secret key: a run directory less
``checkpoints/round-*/clients/`` is safe to share. A client's file is named after it (characters other
than letters, digits, ``_``, ``-`` and ``.`` become ``_``); ``latest.json`` says which file is whose.

A round's folder is written under a temporary name and renamed when complete; ``latest.json`` is
then replaced atomically (write, then rename), and only after that are older folders removed. A kill
at any instant leaves either the previous checkpoint or the new one, never a mix. The history is
appended to ``history.jsonl`` before the folder is written, and ``latest.json`` records how many of its
bytes belong to the checkpoint (with their SHA-256): lines appended after that, or an append cut short
by a kill, are cut off when the run is resumed. Tensors are loaded with ``torch.load(weights_only=True)``,
so a checkpoint can never run code, and every file is checked against the SHA-256 in ``latest.json``
before it is used; what the files hold is then checked to have the structure a checkpoint has, and the
round ``latest.json`` names to be the history's last.

fedkit draws every random number from generators seeded by (seed, round, client, attempt), so the
random state of a run is fully described by its seed and the round it reached.

Formats 1 and 2 (older fedkit) kept every party's state in one folder (``model.pt``, ``server.pt`` and
``clients.pt``, which holds every client's state, HE secret key included); they are still read, and the
next checkpoint is written by party. Format 1 also kept the whole history in ``round-NNNNN/history.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .client import Client
from .exchange import Weights
from .history import (LOG, History, HistoryLog, LogState, RoundRecord, dumps as history_dumps, loads as history_loads,
                      read_log, write_atomic)
from .server import Server

FORMAT = 3
READS = (1, 2, 3)
LATEST = "latest.json"
SERVER, CLIENTS = "server", "clients"  # a round's folder holds one per party: the server's, and the clients' (secret)
FILES = {"model": f"{SERVER}/model.pt", "server": f"{SERVER}/state.pt", "history": f"{SERVER}/history.json"}
OLD_FILES = {"model": "model.pt", "server": "server.pt", "clients": "clients.pt", "history": "history.json"}  # 1, 2
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CLIENT_FILE = re.compile(CLIENTS + r"/[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}\.pt")  # no "..", no "/": stays in its folder


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupted, truncated, or written by a run with other settings."""


@dataclass
class Checkpoint:
    round: int  # the last completed round
    weights: Weights
    server_state: dict[str, Any]
    client_states: dict[str, dict[str, Any]]
    history: History
    fingerprint: str
    log: LogState | None = None  # how far the run directory's history.jsonl belongs to it (None: format 1)

    def check_clients(self, names: Iterable[str], where: str | Path = "") -> None:
        """Raise `CheckpointError` unless the checkpoint holds a state for exactly the clients ``names``."""
        names = sorted(names)
        if sorted(self.client_states) != names:
            raise CheckpointError(
                f"the checkpoint{f' in {where}' if where else ''} holds the states of clients "
                f"{sorted(self.client_states)}, but this federation's clients are {names}; it will not be resumed"
            )


_PLAIN = (torch.Tensor, int, float, bool, str, type(None))


def persistent(state: dict[str, Any], owner: str) -> dict[str, Any]:
    """The checkpointable part of a state dict: every key not starting with ``_``, checked to be plain data."""
    out = {k: v for k, v in state.items() if not str(k).startswith("_")}

    def check(v: Any, path: str) -> None:
        if isinstance(v, _PLAIN):
            return
        if isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                check(x, f"{path}[{i}]")
            return
        if isinstance(v, dict):
            for k, x in v.items():
                check(x, f"{path}[{k!r}]")
            return
        raise CheckpointError(
            f"{owner} keeps a {type(v).__name__} in its state at {path}; a checkpoint holds only tensors, numbers, "
            "strings and lists/dicts of them. Store plain data there, or name the key with a leading '_' to mark it "
            "as a cache that the executor rebuilds."
        )

    for k, v in out.items():
        check(v, repr(k))
    return out


def _tensor_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def client_files(names: Iterable[str]) -> dict[str, str]:
    """Each client's file in a round's folder, ``clients/<name>.pt``: the name with characters other than letters,
    digits, ``_``, ``-`` and ``.`` replaced by ``_`` (no leading ``.``, at most 90), numbered if two would collide.

    >>> client_files(["site-1", "a/b", "a_b"])
    {'site-1': 'clients/site-1.pt', 'a/b': 'clients/a_b.pt', 'a_b': 'clients/a_b-3.pt'}
    """
    out: dict[str, str] = {}
    used: set[str] = set()
    for i, name in enumerate(names):
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")[:90] or "client"
        while stem.lower() in used:  # lower: two names that differ in case only collide on some file systems
            stem = f"{stem}-{i + 1}"
        used.add(stem.lower())
        out[name] = f"{CLIENTS}/{stem}.pt"
    return out


def save(run_dir: str | Path, round: int, weights: Weights, server_state: dict[str, Any],
         client_states: dict[str, dict[str, Any]], history: History, fingerprint: str,
         log: HistoryLog | None = None) -> Path:
    """Write the checkpoint of a completed ``round`` into ``run_dir/checkpoints`` and return its folder.

    With ``log`` (the run directory's `HistoryLog` of ``history``) the history is appended there and the
    checkpoint records how much of it is its own; without, the whole history goes into the folder.
    The server's files go into the folder's ``server/``, each client's state into ``clients/`` (`client_files`).
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    owned = client_files(client_states)
    files = {
        FILES["model"]: _tensor_bytes({k: v.detach().cpu() for k, v in weights.items()}),
        FILES["server"]: _tensor_bytes(persistent(server_state, "the server")),
        **{owned[c]: _tensor_bytes(persistent(s, f"client {c!r}")) for c, s in client_states.items()},
    }
    manifest: dict[str, Any] = {"format": FORMAT, "round": round, "dir": f"round-{round:05d}", "fingerprint": fingerprint,
                                "clients": owned}
    if log is not None:
        manifest["history"] = log.sync().to_dict()  # appended before the checkpoint that refers to it
    else:
        files[FILES["history"]] = history_dumps(history.to_dict()).encode()
    name = manifest["dir"]
    tmp = root / (name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        (tmp / SERVER).mkdir()
        (tmp / CLIENTS).mkdir(mode=0o700)  # the clients' secrets (HE keys): not even readable by other users
        for fname, data in files.items():
            (tmp / fname).write_bytes(data)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial folder would hold the space a full disk needs back
        raise
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    manifest["files"] = {f: hashlib.sha256(d).hexdigest() for f, d in files.items()}
    write_atomic(root / LATEST, json.dumps(manifest, indent=1).encode())
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


class Checkpointer:
    """A round listener that checkpoints a run into ``run_dir``: after every ``every`` rounds and after the last of
    the ``rounds`` planned; `finish`, once the run has ended, the last round of a run that stopped early on purpose.

    It reads the run as a round ends: the ``server``'s model and state, the ``clients``' states, the ``history``
    (appended to ``log``, the run directory's `HistoryLog`). ``saved``: the round already checkpointed (a resume's).
    """

    def __init__(self, run_dir: Path, server: Server, clients: Mapping[str, Client], history: History,
                 fingerprint: str, log: HistoryLog | None, every: int, rounds: int, saved: int = -1) -> None:
        self.run_dir, self.server, self.clients, self.history = run_dir, server, clients, history
        self.fingerprint, self.log, self.every, self.rounds, self.saved = fingerprint, log, every, rounds, saved

    def __call__(self, record: RoundRecord) -> None:
        last = record.round + 1 >= self.rounds
        if (record.round + 1) % self.every == 0 or last:
            self.save(record.round)

    def save(self, round: int) -> None:
        """Checkpoint the run as it is after ``round``."""
        weights, extra = self.server.model.checkpoint()
        save(self.run_dir, round, weights, {**self.server.state, **extra},
             {n: c.state for n, c in self.clients.items()}, self.history, self.fingerprint, log=self.log)
        self.saved = round

    def finish(self) -> None:
        """Checkpoint the last round unless it is: a workflow that stopped early (privacy budget) is checkpointed too."""
        if len(self.history) and self.saved != self.history.rounds[-1].round:
            self.save(self.history.rounds[-1].round)


def exists(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "checkpoints" / LATEST).exists()


def discard(run_dir: str | Path) -> None:
    """Forget the checkpoint in ``run_dir`` (a new run starts there, with a new history): remove ``latest.json``;
    the folders go with the next checkpoint."""
    try:
        (Path(run_dir) / "checkpoints" / LATEST).unlink()
    except FileNotFoundError:
        pass


def _manifest_problem(m: Any) -> str | None:
    """What is wrong with a parsed ``latest.json`` (None: nothing)."""
    if not isinstance(m, dict):
        return f"is not a JSON object but a {type(m).__name__}"
    if m.get("format") not in READS:
        return f"has format {m.get('format')!r}; this fedkit reads formats {', '.join(map(str, READS))}"
    rnd = m.get("round")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        return f"says the last completed round is {rnd!r}; a round is an integer >= 0"
    if m.get("dir") != f"round-{rnd:05d}":
        return f"names the folder {m.get('dir')!r} for round {rnd}; that round's folder is 'round-{rnd:05d}'"
    if not isinstance(m.get("fingerprint"), str):
        return "has no fingerprint (the hash of the run's settings)"
    files = m.get("files")
    names = _names(m)
    if "clients" in names:  # formats 1 and 2: one file for all the clients
        clients = {names["clients"]}
    else:
        owned = m.get("clients")
        if not (_is_str_dict(owned) and all(isinstance(f, str) and _CLIENT_FILE.fullmatch(f) for f in owned.values())
                and len(set(owned.values())) == len(owned)):
            return (f"lists the clients' files as {owned!r}; expected a distinct file under {CLIENTS}/ for each client, "
                    "named <client>.pt")
        clients = set(owned.values())
    expected = {names["model"], names["server"], *clients} | ({names["history"]} if "history" not in m else set())
    if not isinstance(files, dict) or set(files) != expected:
        listed = sorted(files) if isinstance(files, dict) else files
        return f"lists the files {listed!r}; a checkpoint of this format has {sorted(expected)}"
    bad = [f for f, d in files.items() if not (isinstance(d, str) and _HEX64.fullmatch(d))]
    if bad:
        return f"has no valid SHA-256 for {bad}"
    if "history" in m:
        h = m["history"]
        ok = isinstance(h, dict) and set(h) == {"bytes", "sha256", "rounds", "events"}
        ok = ok and all(isinstance(h[k], int) and not isinstance(h[k], bool) and h[k] >= 0 for k in ("bytes", "rounds", "events"))
        if not ok or not (isinstance(h["sha256"], str) and _HEX64.fullmatch(h["sha256"])):
            return f"describes the history as {h!r}; expected bytes, sha256, rounds and events of {LOG}"
    return None


def _names(manifest: dict) -> dict[str, str]:
    """Where the files of a checkpoint of ``manifest``'s format are in its round's folder."""
    return FILES if manifest["format"] >= 3 else OLD_FILES


def _unpickling_message(path: Path, e: Exception) -> str:
    """Why ``path`` was refused, in our words: torch's message offers ways to load the file anyway
    (with code execution allowed, or by allow-listing its classes), which is never the right advice here."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError):
        m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\s+was not an allowed global|\.?\s*Please use|\n\n|$)", text, re.S)
        detail = " ".join((m.group(1) if m else "").split())
        if not detail or "weights_only" in detail or "safe_globals" in detail:
            detail = "something other than tensors and plain data"
        return (f"checkpoint file {path} could not be read safely: it holds more than tensors and plain data "
                f"({detail}), and loading it could run code, so it is refused. fedkit never writes such a file; if you "
                "did not put it there, treat the run directory as tampered with: restore it from a backup or start a new run.")
    first = text.splitlines()[0] if text else ""
    if "weights_only" in first or "safe_globals" in first:
        first = ""
    return (f"checkpoint file {path} could not be read safely ({type(e).__name__}{': ' + first if first else ''}); it is "
            "damaged or not a fedkit checkpoint file. Restore the run directory from a backup or start a new run.")


def _is_str_dict(d: Any) -> bool:
    return isinstance(d, dict) and all(isinstance(k, str) for k in d)


def load(run_dir: str | Path, clients: Iterable[str] | None = None) -> Checkpoint:
    """Read and verify the latest checkpoint in ``run_dir``; raise `CheckpointError` if anything is off.

    ``clients``: the federation's client names, which the checkpoint's client states must match.
    """
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    latest = root / LATEST
    if not latest.exists():
        raise CheckpointError(
            f"there is no checkpoint in {run_dir} (no {latest.relative_to(run_dir)}); nothing to resume. "
            "Check the path, or start a new run."
        )
    try:
        manifest = json.loads(latest.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{latest} is corrupted or truncated ({type(e).__name__}: {e}); it cannot be resumed") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"{latest} {problem}; the checkpoint is malformed and will not be resumed. "
                              "Restore the run directory from a backup or start a new run.")
    rnd, fingerprint, folder = manifest["round"], manifest["fingerprint"], root / manifest["dir"]
    blobs = {}
    for fname, digest in manifest["files"].items():
        path = folder / fname
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint of round {rnd} is incomplete")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(
                f"checkpoint file {path} is corrupted or truncated (its SHA-256 does not match {latest.name}); "
                "it will not be loaded. Restore it from a backup or start a new run."
            )
        blobs[fname] = data

    def tensors(fname: str) -> Any:
        try:
            with warnings.catch_warnings():  # "Detected pickle protocol ...": the refusal below says what matters
                warnings.simplefilter("ignore", UserWarning)
                return torch.load(io.BytesIO(blobs[fname]), weights_only=True, map_location="cpu")
        except Exception as e:  # unpickling refused or failed: say so without torch's deep traceback and advice
            raise CheckpointError(_unpickling_message(folder / fname, e)) from None

    history, log = _history(run_dir, manifest, blobs, folder)
    if not history.rounds:
        raise CheckpointError(f"{latest} says round {rnd} was completed, but the checkpoint's history holds no rounds; "
                              "the checkpoint is inconsistent and will not be resumed")
    numbers = [r.round for r in history.rounds]
    if any(b <= a for a, b in zip(numbers, numbers[1:])):
        raise CheckpointError(f"the checkpoint's history has its rounds out of order ({numbers[:20]}...); "
                              "it will not be resumed")
    if numbers[-1] != rnd:
        raise CheckpointError(
            f"{latest} says round {rnd} was the last completed, but the checkpoint's history ends with round "
            f"{numbers[-1]}; the checkpoint is inconsistent and will not be resumed. Restore the run directory "
            "from a backup or start a new run."
        )

    names = _names(manifest)
    weights = tensors(names["model"])
    if not _is_str_dict(weights) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"checkpoint file {folder / names['model']} does not hold a model's weights (a dict of "
                              f"names to tensors) but {_kind(weights)}; it will not be resumed")
    server_state = tensors(names["server"])
    if not _is_str_dict(server_state):
        raise CheckpointError(f"checkpoint file {folder / names['server']} does not hold the server's state (a dict "
                              f"with string keys) but {_kind(server_state)}; it will not be resumed")
    if "clients" not in names:  # by party: a file per client
        client_states = {c: tensors(f) for c, f in manifest["clients"].items()}
        for c, state in client_states.items():
            if not _is_str_dict(state):
                raise CheckpointError(f"checkpoint file {folder / manifest['clients'][c]} does not hold client {c!r}'s "
                                      f"state (a dict with string keys) but {_kind(state)}; it will not be resumed")
    else:
        client_states = tensors(names["clients"])
        if not _is_str_dict(client_states) or not all(_is_str_dict(s) for s in client_states.values()):
            raise CheckpointError(f"checkpoint file {folder / names['clients']} does not hold the clients' states (a "
                                  f"dict of client names to dicts) but {_kind(client_states)}; it will not be resumed")
    ckpt = Checkpoint(rnd, weights, server_state, client_states, history, fingerprint, log)
    if clients is not None:
        ckpt.check_clients(clients, run_dir)
    return ckpt


def _kind(obj: Any) -> str:
    if isinstance(obj, dict):
        kinds = sorted({f"{type(k).__name__} -> {type(v).__name__}" for k, v in obj.items()})[:4]
        return f"a dict of {', '.join(kinds) or 'nothing'}"
    return f"a {type(obj).__name__}"


def _history(run_dir: Path, manifest: dict, blobs: dict[str, bytes], folder: Path) -> tuple[History, LogState | None]:
    """The checkpoint's history: the first bytes of the run's history.jsonl it recorded (format 1: history.json)."""
    if "history" not in manifest:
        fname = _names(manifest)["history"]
        try:
            return History.from_dict(history_loads(blobs[fname])), None
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint file {folder / fname} is not a valid history ({e})") from None
    state = LogState(**manifest["history"])
    path = run_dir / LOG
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint of round {manifest['round']} keeps its history there. "
                              "Restore the run directory from a backup or start a new run.")
    with open(path, "rb") as f:
        head = f.read(state.bytes)
    if len(head) < state.bytes:
        raise CheckpointError(f"{path} is truncated: it has {len(head)} bytes, and the checkpoint's history is its first "
                              f"{state.bytes}; it cannot be resumed. Restore it from a backup or start a new run.")
    if hashlib.sha256(head).hexdigest() != state.sha256:
        raise CheckpointError(
            f"{path} does not match the checkpoint (the SHA-256 of its first {state.bytes} bytes differs from "
            f"{LATEST}'s): it was changed, or a new run was started in {run_dir}; it cannot be resumed"
        )
    try:
        history = read_log(path, head, strict_end=True).history
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} does not hold a valid history ({e}); it cannot be resumed") from None
    if (len(history.rounds), len(history.events)) != (state.rounds, state.events):
        raise CheckpointError(f"the first {state.bytes} bytes of {path} hold {len(history.rounds)} round(s) and "
                              f"{len(history.events)} event(s), but {LATEST} says {state.rounds} and {state.events}; "
                              "the checkpoint is inconsistent and will not be resumed")
    return history, state
