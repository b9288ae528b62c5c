"""One FLARE client as fedkit's: the experiment's model, this site's part of the data split, fedkit's local training.

The exported job's client script (`fedkit.export.flare_client_script`) talks to FLARE through its Client
API and asks a `FedkitSite` for the work: `train` runs fedkit's `Trainer` on the weights FLARE sent (the
same seeds as `fedkit run`: client ``site-k`` is fedkit's k-th client), `evaluate` scores a model on the
experiment's test split. Nothing here imports nvflare: weights go in and out as numpy arrays by name.

Several FLARE clients may run as threads of one process (``nvflare simulator -t 2``): they take turns
(`LOCK`), because torch's global generator, which fedkit seeds for each task, is one per process.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..exchange import DXO, DataKind, MetaKey, Signal, Task
from ..seeds import client_seed
from ..simulator import torch_threads
from ..train import evaluate, load_weights
from ..workflows.extensions import Proximal
from .settings import experiment_of

LOCK = threading.Lock()  # one site trains at a time in a process (torch's generator is global)
ROUNDS_LOG = "fedkit_rounds.jsonl"  # each site's line per round, next to its script in the FLARE workspace


class FedkitSite:
    """FLARE client ``site`` (``site-1`` ... ``site-N``) of the experiment the ``settings`` describe."""

    def __init__(self, settings: dict[str, Any], site: str) -> None:
        self.settings = settings
        exp = experiment_of(settings)
        data = exp.load()
        self.sim = exp.simulator(data=data)
        m = re.fullmatch(r"site-(\d+)", site)
        index = int(m.group(1)) - 1 if m else -1
        if not 0 <= index < len(self.sim.clients):
            raise ValueError(f"FLARE client {site!r} is not one of the experiment's {len(self.sim.clients)} clients: "
                             f"name them site-1 ... site-{len(self.sim.clients)} (nvflare simulator -n "
                             f"{len(self.sim.clients)}, or those names in project.yml)")
        self.name = site
        # as fedkit's simulator does for a run: the client with empty state, seeded by (run seed, client index)
        self.client = self.sim.clients[index].fresh(client_seed(self.sim.seed, index))
        self.model = self.sim.model_fn().to(self.sim.device)
        self.test = data.test

    def train(self, weights: dict[str, np.ndarray], round: int, mu: float | None = None) -> dict[str, Any]:
        """fedkit's local training of round ``round`` from ``weights``: the weight difference (as the weights came:
        numpy arrays or torch tensors), the FLARE aggregation weight (``settings['weigh']``: samples, steps or 1), samples, steps and the metrics."""
        meta = {MetaKey.HOOKS: (Proximal(mu),)} if mu else {}
        task = Task("train", DXO(DataKind.WEIGHTS, _tensors(weights), meta), round=round)
        result = self._run(task)
        samples, steps = result.meta[MetaKey.NUM_SAMPLES], result.meta[MetaKey.NUM_STEPS]
        weight = {"samples": samples, "steps": steps, "uniform": 1}[self.settings["weigh"]]
        return {"diff": _like(result.data, weights), "weight": weight,
                "samples": samples, "steps": steps, "metrics": dict(result.meta.get(MetaKey.METRICS, {}))}

    def validate(self, weights: dict[str, Any]) -> dict[str, float]:
        """``weights`` scored on this site's validation split, by fedkit's ``validate`` executor (cross-site
        evaluation)."""
        result = self._run(Task("validate", DXO(DataKind.WEIGHTS, _tensors(weights))))
        return {k: float(v) for k, v in result.data.items()}

    def local_weights(self, like: dict[str, Any]) -> dict[str, Any]:
        """This site's locally trained model, by fedkit's ``submit_model`` executor (cross-site evaluation); in the
        format of ``like`` (what FLARE sent: numpy arrays or torch tensors)."""
        return _like(self._run(Task("submit_model", DXO(DataKind.WEIGHTS, _tensors(like)))).data, like)

    def _run(self, task: Task) -> DXO:
        with LOCK, torch_threads(self.sim.threads):
            return self.client.handle(task, self.sim.device, Signal())

    def evaluate(self, weights: dict[str, Any]) -> dict[str, float]:
        """``accuracy`` and ``loss`` of ``weights`` on the experiment's test split (what fedkit's server scores)."""
        with LOCK, torch_threads(self.sim.threads):
            load_weights(self.model, {k: v.to(self.sim.device) for k, v in _tensors(weights).items()})
            return evaluate(self.model, self.test, self.sim.device)


def _tensors(weights: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Copies of FLARE's arrays or tensors: what FLARE hands in stays as it was (clients may share it)."""
    return {k: torch.tensor(np.array(v, copy=True)) if not isinstance(v, torch.Tensor) else v.detach().clone()
            for k, v in weights.items()}


def _like(tensors: dict[str, torch.Tensor], like: dict[str, Any]) -> dict[str, Any]:
    """``tensors`` on the CPU, as numpy arrays unless ``like`` (what FLARE sent) holds torch tensors only."""
    cpu = {k: v.detach().cpu() for k, v in tensors.items()}
    return cpu if all(isinstance(v, torch.Tensor) for v in like.values()) else {k: v.numpy() for k, v in cpu.items()}


def log_round(folder: str | Path, row: dict[str, Any]) -> None:
    """Append ``row`` (with the time) as a JSON line to `ROUNDS_LOG` in ``folder``."""
    with open(Path(folder) / ROUNDS_LOG, "a") as f:
        f.write(json.dumps({**row, "time": time.time()}) + "\n")
