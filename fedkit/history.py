"""What happened in a run, round by round and client by client; saved with the run as JSON and CSV.

A run directory holds its history twice: ``history.jsonl`` grows by a line per round and per event while
the run goes (`HistoryLog`; what checkpoints refer to), and ``history.json`` with ``rounds.csv`` and
``clients.csv`` are written whole when the run ends (`History.save`). `History.load` reads either.

All of it is strict JSON: NaN and infinities are written as ``null`` (what other tools read), and
a ``"nonfinite"`` entry (JSON pointers to "NaN", "Infinity" or "-Infinity") lets fedkit read them
back as the floats they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

LOG = "history.jsonl"  # the run directory's append-only history
LOG_FORMAT = 1


@dataclass
class RoundRecord:
    """One round: the global model's metrics (``accuracy``, ``loss``, bytes...) and each client's row."""

    round: int
    seconds: float
    metrics: dict[str, Any]
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def number(self) -> int:
        """The round's number as a person reads it, counting from 1: in tables, CSV files, plots and progress.
        ``round`` is its 0-based index, which ``history.json``, the log and checkpoints keep."""
        return self.round + 1


class History:
    """The records of a run. Appended to while the run goes, so it can be read live from another thread."""

    def __init__(self, rounds: list[RoundRecord] | None = None, events: list[dict] | None = None,
                 results: dict[str, Any] | None = None) -> None:
        self.rounds: list[RoundRecord] = list(rounds or [])
        self.events: list[dict] = list(events or [])  # failures, warnings, aborts: {"round", "client", "what"}
        # whole-run outcomes of analysis workflows, JSON-friendly: "cross_site", "statistics", "scaling"
        self.results: dict[str, Any] = dict(results or {})

    def append(self, record: RoundRecord) -> None:
        self.rounds.append(record)

    def __len__(self) -> int:
        return len(self.rounds)

    def __iter__(self) -> Iterator[RoundRecord]:
        return iter(list(self.rounds))

    def series(self, metric: str) -> list[float]:
        """The global ``metric`` of each round (NaN where a round did not report it)."""
        return [float(r.metrics.get(metric, math.nan)) for r in list(self.rounds)]

    def last(self, metric: str, default: float = math.nan) -> float:
        """The last reported value of a global ``metric``."""
        for r in reversed(list(self.rounds)):
            if metric in r.metrics:
                return float(r.metrics[metric])
        return default

    def to_dataframe(self):
        """One row per round: ``round`` (its number, from 1, as plotted), ``seconds`` and every global metric."""
        import pandas as pd

        return pd.DataFrame([{"round": r.number, "seconds": r.seconds, **r.metrics} for r in list(self.rounds)])

    def client_dataframe(self):
        """One row per round (its number, from 1) and client: samples, steps, seconds, bytes, losses and accuracies."""
        import pandas as pd

        return pd.DataFrame([{"round": r.number, "client": c, **row}
                             for r in list(self.rounds) for c, row in r.clients.items()])

    def to_dict(self) -> dict:
        return {"rounds": [asdict(r) for r in list(self.rounds)], "events": list(self.events),
                "results": dict(self.results)}

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        """The history ``d`` describes (as `to_dict` writes it); `ValueError` saying what is wrong if it is malformed."""
        if not isinstance(d, dict):
            raise ValueError(f"a history is a JSON object, got {type(d).__name__}")
        rounds, events, results = d.get("rounds", []), d.get("events", []), d.get("results", {})
        if not isinstance(rounds, list):
            raise ValueError(f"'rounds' must be a list, got {type(rounds).__name__}")
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise ValueError("'events' must be a list of objects")
        if not isinstance(results, dict):
            raise ValueError(f"'results' must be an object, got {type(results).__name__}")
        return cls([_record(r, f"rounds[{i}]") for i, r in enumerate(rounds)], events, results)

    def save(self, directory: str | Path) -> None:
        """Write ``history.json``, ``rounds.csv`` and ``clients.csv`` into ``directory`` (strict JSON: NaN is null).

        The CSV files are `to_dataframe` and `client_dataframe`: they count rounds from 1, as the plots and the
        progress bar do (`RoundRecord.number`); ``history.json`` keeps the 0-based index (`RoundRecord.round`).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / "history.json", dumps(self.to_dict(), indent=1).encode())
        for name, frame in (("rounds.csv", self.to_dataframe()), ("clients.csv", self.client_dataframe())):
            frame.to_csv(directory / name, index=False)

    @classmethod
    def load(cls, directory: str | Path) -> "History":
        """The history saved in ``directory``: ``history.json``, or the run's ``history.jsonl`` where that is
        further along (a run still going, or killed before its end); older runs have ``history.json`` only."""
        directory = Path(directory)
        found = []
        if (directory / "history.json").exists():
            found.append(cls.from_dict(loads((directory / "history.json").read_text())))
        if (directory / LOG).exists():
            try:
                found.append(read_log(directory / LOG).history)
            except ValueError:
                if not found:  # with history.json at hand, a damaged log does not hide it
                    raise
        if not found:
            raise FileNotFoundError(f"there is no history in {directory} (neither history.json nor {LOG})")
        return max(found, key=lambda h: (len(h.rounds), len(h.events)))  # the first (history.json) on a tie


def _record(r: Any, where: str) -> RoundRecord:
    """A `RoundRecord` from its dict, checked to have the types a record has."""
    if not isinstance(r, dict):
        raise ValueError(f"{where} must be an object, got {type(r).__name__}")
    unknown = set(r) - {"round", "seconds", "metrics", "clients"}
    if unknown or not {"round", "seconds", "metrics"} <= set(r):
        raise ValueError(f"{where} must have the keys round, seconds, metrics (and clients); it has {sorted(r)}")
    rnd, seconds, metrics, clients = r["round"], r["seconds"], r["metrics"], r.get("clients", {})
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise ValueError(f"{where}.round must be an integer >= 0, got {rnd!r}")
    if seconds is not None and (not isinstance(seconds, numbers.Real) or isinstance(seconds, bool)):
        raise ValueError(f"{where}.seconds must be a number, got {seconds!r}")
    if not isinstance(metrics, dict):
        raise ValueError(f"{where}.metrics must be an object, got {type(metrics).__name__}")
    if not isinstance(clients, dict) or not all(isinstance(row, dict) for row in clients.values()):
        raise ValueError(f"{where}.clients must map client names to objects")
    return RoundRecord(rnd, math.nan if seconds is None else seconds, metrics, clients)


# ---- strict JSON

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _plain(v: Any) -> Any:
    """JSON for numpy and torch scalars and arrays; anything else unknown as its text."""
    if hasattr(v, "tolist"):  # numpy arrays and scalars, torch tensors
        return v.tolist()
    return str(v)


def _pointer_part(key: Any) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def strict(obj: Any, nonfinite: dict[str, str] | None = None, where: str = "") -> Any:
    """``obj`` as plain JSON data: numpy/torch values as numbers or lists, NaN and infinities as None.

    When ``nonfinite`` is a dict, the JSON pointer of each replaced float is noted there ("NaN",
    "Infinity", "-Infinity"), so that `restore` can put it back.
    """
    if isinstance(obj, float):  # float and numpy.float64
        if math.isfinite(obj):
            return float(obj)
        if nonfinite is not None:
            nonfinite[where] = "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
        return None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, dict):
        return {k: strict(v, nonfinite, f"{where}/{_pointer_part(k)}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v, nonfinite, f"{where}/{i}") for i, v in enumerate(obj)]
    return strict(_plain(obj), nonfinite, where)


def restore(obj: Any, nonfinite: Any) -> Any:
    """Put back into ``obj`` (parsed JSON) the non-finite floats that `strict` noted in ``nonfinite``."""
    if not nonfinite:
        return obj
    if not isinstance(nonfinite, dict):
        raise ValueError("'nonfinite' must map JSON pointers to 'NaN', 'Infinity' or '-Infinity'")
    for pointer, name in nonfinite.items():
        if name not in _NONFINITE or not isinstance(pointer, str) or not pointer.startswith("/"):
            raise ValueError(f"'nonfinite' has an entry {pointer!r}: {name!r}; expected a JSON pointer and "
                             "'NaN', 'Infinity' or '-Infinity'")
        parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer[1:].split("/")]
        parent = obj
        try:
            for p in parts[:-1]:
                parent = parent[int(p)] if isinstance(parent, list) else parent[p]
            key = int(parts[-1]) if isinstance(parent, list) else parts[-1]
            if parent[key] is not None:
                raise ValueError(f"'nonfinite' points at {pointer}, which holds {parent[key]!r}, not null")
            parent[key] = _NONFINITE[name]
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"'nonfinite' points at {pointer}, which is not in the document ({type(e).__name__})") from None
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``obj`` (a dict) that `loads` reads back with its NaN and infinities."""
    nonfinite: dict[str, str] = {}
    data = strict(obj, nonfinite)
    if nonfinite and isinstance(data, dict):
        data = {**data, "nonfinite": nonfinite}
    return json.dumps(data, allow_nan=False, **kwargs)


def loads(text: str | bytes) -> Any:
    """Parse what `dumps` wrote (or plain JSON), putting the noted non-finite floats back."""
    data = json.loads(text)
    if isinstance(data, dict) and "nonfinite" in data:
        nonfinite = data.pop("nonfinite")
        restore(data, nonfinite)
    return data


def write_atomic(path: Path, data: bytes, tmp: Path | None = None) -> None:
    """Write ``data`` to ``path`` through a temporary file (``tmp``; ``path`` + ``.tmp`` by default) and a rename: a
    kill leaves the old file or the new one, and a write that fails (a full disk) leaves no temporary file behind."""
    tmp = tmp or path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # a partial file would hold the space a full disk needs back
        raise


# ---- the append-only log of a running run


@dataclass(frozen=True)
class LogState:
    """How far a `HistoryLog` had got: its first ``bytes`` bytes (SHA-256 ``sha256``) hold ``rounds`` rounds
    and ``events`` events. A checkpoint keeps this, and a resumed run cuts the log back to it."""

    bytes: int
    sha256: str
    rounds: int
    events: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _line(kind: str, value: Any) -> bytes:
    nonfinite: dict[str, str] = {}
    entry: dict[str, Any] = {kind: strict(value, nonfinite)}
    if nonfinite:
        entry["nonfinite"] = {f"/{kind}{p}": v for p, v in nonfinite.items()}
    return (json.dumps(entry, allow_nan=False, separators=(",", ":")) + "\n").encode()


class HistoryLog:
    """Keeps ``history.jsonl`` up to date with a `History` by appending what is new: a line per round,
    per event and per changed entry of ``results``. What each round costs to write does not grow with the run.

    ``sync()`` appends and returns the `LogState` a checkpoint records. The lines are
    ``{"fedkit_history": 1}`` first, then ``{"round": {...}}``, ``{"event": {...}}`` and ``{"results": {key: value}}``
    (each with an optional ``"nonfinite"``); `read_log` reads them back into a `History`.
    """

    def __init__(self, path: str | Path, history: History, state: LogState | None = None) -> None:
        """Start a new log at ``path`` holding ``history`` so far; or, with the ``state`` a checkpoint recorded
        (``history`` being what that checkpoint holds), continue the existing log from there, cutting off
        whatever was appended after it (a kill mid-append included)."""
        self.path, self.history = Path(path), history
        if state is None:
            self.path.write_bytes(b"")  # a new run: a new log
            self._hash, self._bytes, self._rounds, self._events, self._results = hashlib.sha256(), 0, 0, 0, {}
            self._append([_line_header()])
            self.sync()
            return
        with open(self.path, "r+b") as f:
            head = f.read(state.bytes)
            if len(head) != state.bytes or hashlib.sha256(head).hexdigest() != state.sha256:
                raise ValueError(f"{self.path} does not begin with the {state.bytes} bytes the checkpoint recorded "
                                 "(it was changed after the checkpoint was read)")
            f.truncate(state.bytes)
        self._hash, self._bytes = hashlib.sha256(head), state.bytes
        # the checkpoint's counts: what was added to its history since (a resume's note) is new, appended at sync
        self._rounds, self._events = state.rounds, state.events
        self._results = {k: _result_key(v) for k, v in history.results.items()}

    def _append(self, lines: list[bytes]) -> None:
        if not lines:
            return
        data = b"".join(lines)
        with open(self.path, "ab") as f:
            f.write(data)
        self._hash.update(data)
        self._bytes += len(data)

    def sync(self) -> LogState:
        """Append the rounds, events and results that are new since the last call; the state written so far."""
        h = self.history
        rounds, events = list(h.rounds), list(h.events)
        lines = [_line("round", asdict(r)) for r in rounds[self._rounds:]]
        lines += [_line("event", e) for e in events[self._events:]]
        changed = {}
        for k, v in list(h.results.items()):
            key = _result_key(v)
            if self._results.get(k) != key:
                changed[k], self._results[k] = v, key
        if changed:
            lines.append(_line("results", changed))
        self._append(lines)
        self._rounds, self._events = len(rounds), len(events)
        return self.state

    @property
    def state(self) -> LogState:
        return LogState(self._bytes, self._hash.hexdigest(), self._rounds, self._events)


def _line_header() -> bytes:
    return (json.dumps({"fedkit_history": LOG_FORMAT}) + "\n").encode()


def _result_key(value: Any) -> str:
    nonfinite: dict[str, str] = {}
    return json.dumps([strict(value, nonfinite), nonfinite], allow_nan=False, sort_keys=True)


@dataclass
class LogRead:
    history: History
    bytes: int  # the length of the complete lines read


def read_log(path: str | Path, data: bytes | None = None, strict_end: bool = False) -> LogRead:
    """The `History` in a ``history.jsonl`` file (or in its bytes ``data``).

    A last line without its newline is an append a kill cut short: it is left out, unless ``strict_end``
    (for a checkpointed prefix, which ends with a whole line). Any other malformed line is a `ValueError`.
    """
    if data is None:
        data = Path(path).read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty, or a torn line
    if tail and strict_end:
        raise ValueError(f"{path} ends inside a line")
    history, valid = History(), 0
    for i, raw in enumerate(lines):
        try:
            entry = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"{path}, line {i + 1}, is not JSON ({e})") from None
        if i == 0:
            if entry != {"fedkit_history": LOG_FORMAT}:
                raise ValueError(f"{path} does not start with a fedkit history header (line 1 is {raw[:60]!r})")
        else:
            _apply(history, entry, f"{path}, line {i + 1}")
        valid += len(raw) + 1
    return LogRead(history, valid)


def _apply(history: History, entry: Any, where: str) -> None:
    if not isinstance(entry, dict) or not entry:
        raise ValueError(f"{where} must be an object with one of round, event, results")
    nonfinite = entry.get("nonfinite")
    kinds = [k for k in entry if k != "nonfinite"]
    if len(kinds) != 1 or kinds[0] not in ("round", "event", "results"):
        raise ValueError(f"{where} must hold one of round, event, results; it has {sorted(entry)}")
    kind = kinds[0]
    try:
        restore(entry, nonfinite)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    value = entry[kind]
    if kind == "round":
        history.rounds.append(_record(value, f"{where}: round"))
    elif kind == "event":
        if not isinstance(value, dict):
            raise ValueError(f"{where}: an event must be an object, got {type(value).__name__}")
        history.events.append(value)
    else:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: results must be an object, got {type(value).__name__}")
        history.results.update(value)
