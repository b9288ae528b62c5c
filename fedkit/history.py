"""What happened in a run, round by round and client by client; saved with the run as JSON and CSV."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator


@dataclass
class RoundRecord:
    """One round: the global model's metrics (``accuracy``, ``loss``, bytes...) and each client's row."""

    round: int
    seconds: float
    metrics: dict[str, Any]
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)


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
        """One row per round: ``round``, ``seconds`` and every global metric."""
        import pandas as pd

        return pd.DataFrame([{"round": r.round, "seconds": r.seconds, **r.metrics} for r in list(self.rounds)])

    def client_dataframe(self):
        """One row per round and client: samples, steps, seconds, bytes, losses and accuracies."""
        import pandas as pd

        return pd.DataFrame([{"round": r.round, "client": c, **row}
                             for r in list(self.rounds) for c, row in r.clients.items()])

    def to_dict(self) -> dict:
        return {"rounds": [asdict(r) for r in list(self.rounds)], "events": list(self.events),
                "results": dict(self.results)}

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls([RoundRecord(**r) for r in d.get("rounds", [])], d.get("events", []), d.get("results", {}))

    def save(self, directory: str | Path) -> None:
        """Write ``history.json``, ``rounds.csv`` and ``clients.csv`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "history.json").write_text(json.dumps(self.to_dict(), indent=1, default=_plain))
        self.to_dataframe().to_csv(directory / "rounds.csv", index=False)
        self.client_dataframe().to_csv(directory / "clients.csv", index=False)

    @classmethod
    def load(cls, directory: str | Path) -> "History":
        return cls.from_dict(json.loads((Path(directory) / "history.json").read_text()))


def _plain(v: Any) -> Any:
    """JSON for numpy and torch scalars."""
    if hasattr(v, "tolist"):  # numpy arrays and scalars, torch tensors
        return v.tolist()
    return str(v)
