"""Checkpoints: everything a run needs to continue after round k, written so that a crash cannot tear it.

Layout inside a run directory::

    checkpoints/round-00007/model.pt      global weights
                           server.pt      server state (e.g. server-optimizer moments)
                           clients.pt     each client's state, less its caches (keys starting with "_")
                           history.json   the run's history so far
    checkpoints/latest.json               {"round": 7, "dir": "round-00007", "files": {name: sha256}, ...}

A round's folder is written under a temporary name and renamed when complete; ``latest.json`` is
then replaced atomically (write, then rename), and only after that are older folders removed. A kill
at any instant leaves either the previous checkpoint or the new one, never a mix. Tensors are loaded
with ``torch.load(weights_only=True)``, so a checkpoint can never run code, and every file is checked
against the SHA-256 in ``latest.json`` before it is used.

fedkit draws every random number from generators seeded by (seed, round, client, attempt), so the
random state of a run is fully described by its seed and the round it reached.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .exchange import Weights
from .history import History

FORMAT = 1
LATEST = "latest.json"


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


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _tensor_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save(run_dir: str | Path, round: int, weights: Weights, server_state: dict[str, Any],
         client_states: dict[str, dict[str, Any]], history: History, fingerprint: str) -> Path:
    """Write the checkpoint of a completed ``round`` into ``run_dir/checkpoints`` and return its folder."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "model.pt": _tensor_bytes({k: v.detach().cpu() for k, v in weights.items()}),
        "server.pt": _tensor_bytes(persistent(server_state, "the server")),
        "clients.pt": _tensor_bytes({c: persistent(s, f"client {c!r}") for c, s in client_states.items()}),
        "history.json": json.dumps(history.to_dict(), default=_jsonable).encode(),
    }
    name = f"round-{round:05d}"
    tmp = root / (name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for fname, data in files.items():
        (tmp / fname).write_bytes(data)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    manifest = {"format": FORMAT, "round": round, "dir": name, "fingerprint": fingerprint,
                "files": {f: hashlib.sha256(d).hexdigest() for f, d in files.items()}}
    _write_atomic(root / LATEST, json.dumps(manifest, indent=1).encode())
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _jsonable(v: Any) -> Any:
    return v.tolist() if hasattr(v, "tolist") else str(v)


def exists(run_dir: str | Path) -> bool:
    return (Path(run_dir) / "checkpoints" / LATEST).exists()


def load(run_dir: str | Path) -> Checkpoint:
    """Read and verify the latest checkpoint in ``run_dir``; raise `CheckpointError` if anything is off."""
    root = Path(run_dir) / "checkpoints"
    latest = root / LATEST
    if not latest.exists():
        raise CheckpointError(
            f"there is no checkpoint in {Path(run_dir)} (no {latest.relative_to(Path(run_dir))}); nothing to resume. "
            "Check the path, or start a new run."
        )
    try:
        manifest = json.loads(latest.read_text())
        folder = root / manifest["dir"]
        expected = manifest["files"]
        rnd, fingerprint = int(manifest["round"]), str(manifest["fingerprint"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{latest} is corrupted or truncated ({type(e).__name__}: {e}); it cannot be resumed") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{latest} has format {manifest.get('format')!r}; this fedkit reads format {FORMAT}")
    blobs = {}
    for fname, digest in expected.items():
        path = folder / fname
        if not path.exists():
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
            return torch.load(io.BytesIO(blobs[fname]), weights_only=True, map_location="cpu")
        except Exception as e:  # unpickling refused or failed: say so without torch's deep traceback
            raise CheckpointError(f"checkpoint file {folder / fname} could not be read safely "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

    try:
        history = History.from_dict(json.loads(blobs["history.json"]))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint file {folder / 'history.json'} is not a valid history ({e})") from None
    return Checkpoint(rnd, tensors("model.pt"), tensors("server.pt"), tensors("clients.pt"), history, fingerprint)
