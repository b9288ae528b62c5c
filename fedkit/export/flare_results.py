"""Run an exported job in NVIDIA FLARE's simulator and read what FLARE did back into a fedkit `History`.

`run_in_flare_simulator` runs ``nvflare simulator`` in a child process (with a timeout: a hung FLARE
fails instead of hanging), then `read_flare_history` reads the workspace: each site's
``fedkit_rounds.jsonl`` (the global model FLARE sent each round, scored on the experiment's test split
before training, and the client's training metrics) and FLARE's final global model
(``FL_global_model.pt``, saved by FLARE's persistor), scored on the same split. Round ``r`` of the
history holds the global model after round ``r``'s aggregation, as fedkit's own history does, under the
same metric names (``accuracy``, ``loss``), so ``fk.plots.curves({"fedkit": run, "NVFlare": flare_run})``
overlays the two.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..history import History, RoundRecord
from ..metrics import ACCURACY, CLIENTS_OK, LOSS, SAMPLES, STEPS, TRAIN_ACCURACY, TRAIN_LOSS, VAL_ACCURACY, VAL_LOSS
from ..train import evaluate, load_weights
from .flare_site import ROUNDS_LOG
from .nvflare_job import SETTINGS, FlareJob, nvflare_module
from .settings import experiment_of

GLOBAL_MODEL = "FL_global_model.pt"  # what FLARE's PyTorch persistor saves after each round
CROSS_SITE = "cross_val_results.json"  # FLARE's cross-site evaluation matrix (server/simulate_job/cross_site_val/)
CLIENT_KEYS = (TRAIN_LOSS, TRAIN_ACCURACY, VAL_LOSS, VAL_ACCURACY, SAMPLES, STEPS, "weight")


class FlareFailed(RuntimeError):
    """FLARE's simulator failed, timed out, or left no result; the message has the log's tail."""


@dataclass
class FlareRun:
    """What FLARE's simulator did with a job: the history (fedkit's metric names), the workspace, the wall time."""

    job: FlareJob
    workspace: Path
    history: History
    seconds: float
    weights: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    status: str = "done"

    def summary(self) -> dict[str, Any]:
        return {"status": self.status, "rounds": len(self.history), "accuracy": self.history.last(ACCURACY),
                "loss": self.history.last(LOSS), "seconds": round(self.seconds, 2), "workspace": str(self.workspace)}


def nvflare_command() -> list[str]:
    """How to start the ``nvflare`` command line of the Python running fedkit."""
    exe = Path(sys.executable).with_name("nvflare")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "nvflare.cli"]


def run_in_flare_simulator(job: FlareJob | str | Path, workspace: str | Path | None = None,
                           threads: int | None = None, timeout: float = 900.0, quiet: bool = True) -> FlareRun:
    """Run ``job`` (a `FlareJob` or an exported job folder) in FLARE's simulator, one client per experiment
    client (``site-1`` ...), ``threads`` at a time (default: all; see `FlareJob.simulator_command`), and read
    the results back (`read_flare_history`).

    ``workspace`` (default: a new temporary folder) receives FLARE's logs and models; an existing one is
    emptied by FLARE. After ``timeout`` seconds the simulator is killed and `FlareFailed` raised.
    """
    nvflare_module()
    job = _as_job(job)
    ws = Path(workspace) if workspace is not None else Path(tempfile.mkdtemp(prefix="fedkit-flare-"))
    n = job.clients
    t = n if threads is None else max(1, min(threads, n))
    cmd = [*nvflare_command(), "simulator", str(job.path), "-w", str(ws), "-n", str(n), "-t", str(t)]
    ws.mkdir(parents=True, exist_ok=True)
    log = ws.parent / f"{ws.name}.simulator.log"
    started = time.perf_counter()
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                             stdin=subprocess.DEVNULL)
        try:
            code = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)  # the simulator and the client processes it started
            p.wait()
            raise FlareFailed(f"FLARE's simulator did not finish in {timeout:.0f} s ({' '.join(cmd)}); "
                              f"log: {log}\n{_tail(log)}") from None
    seconds = time.perf_counter() - started
    if not quiet:
        print(log.read_text(errors="replace"))
    if code != 0:
        raise FlareFailed(f"FLARE's simulator exited with {code} ({' '.join(cmd)}); log: {log}\n{_tail(log)}")
    history, weights = read_flare_history(ws, job)
    history.results["flare"] = {"command": " ".join(cmd), "workspace": str(ws), "seconds": seconds}
    return FlareRun(job, ws, history, seconds, weights)


def read_flare_history(workspace: str | Path, job: FlareJob | str | Path) -> tuple[History, dict[str, torch.Tensor]]:
    """The `History` of the FLARE run in ``workspace`` and FLARE's final global weights (see the module)."""
    job = _as_job(job)
    ws = Path(workspace)
    lines = [json.loads(line) for f in sorted(ws.rglob(ROUNDS_LOG)) for line in f.read_text().splitlines() if line]
    models = sorted(p for p in ws.rglob(GLOBAL_MODEL) if "server" in p.parts)
    if not models:
        raise FlareFailed(f"FLARE left no {GLOBAL_MODEL} in {ws}: the job did not finish a round. See "
                          f"{ws}/server/simulate_job/log.txt")
    saved = torch.load(models[0], map_location="cpu", weights_only=False)
    weights = {k: torch.as_tensor(v) for k, v in (saved.get("model", saved)).items()}
    exp = experiment_of(job.settings)
    data = exp.load()
    sim = exp.simulator(data=data)
    model = sim.model_fn()
    load_weights(model, weights)
    final = evaluate(model, data.test, torch.device("cpu"))
    by_round: dict[int, list[dict]] = {}
    for row in lines:
        by_round.setdefault(int(row["round"]), []).append(row)
    rounds = sorted(by_round)
    history = History()
    end = models[0].stat().st_mtime
    for i, rnd in enumerate(rounds):
        rows = by_round[rnd]
        after = by_round.get(rnd + 1)  # the global model sent in the next round is this round's result
        metrics = ({ACCURACY: after[0]["global_accuracy"], LOSS: after[0]["global_loss"]} if after
                   else {ACCURACY: final["accuracy"], LOSS: final["loss"]})
        metrics[CLIENTS_OK] = len(rows)
        start = min(r["time"] for r in rows)
        stop = min(r["time"] for r in after) if after else end
        clients = {r["site"]: {k: r[k] for k in CLIENT_KEYS if k in r} for r in sorted(rows, key=lambda r: r["site"])}
        history.append(RoundRecord(round=rnd, seconds=max(0.0, stop - start), metrics=metrics, clients=clients))
    cross_site = sorted(ws.rglob(CROSS_SITE))
    if cross_site:
        history.results["cross_site"] = cross_site_results(json.loads(cross_site[0].read_text()), job.clients)
    return history, weights


def cross_site_results(flare: dict[str, dict[str, dict[str, float]]], clients: int) -> dict[str, Any]:
    """FLARE's ``cross_val_results.json`` (data owner -> model -> metrics) as fedkit's ``results["cross_site"]``
    (metric -> model owner -> data owner), FLARE's global model as the row ``"global"``, last."""
    sites = [f"site-{i + 1}" for i in range(clients)]
    owners = {**{s: s for s in sites}, f"SRV_{GLOBAL_MODEL}": "global"}
    out: dict[str, Any] = {m: {o: {} for o in owners.values()} for m in (ACCURACY, LOSS)}
    for data_owner, scores in flare.items():
        for model, metrics in (scores or {}).items():
            if model in owners:
                for m in (ACCURACY, LOSS):
                    if m in (metrics or {}):
                        out[m][owners[model]][data_owner] = float(metrics[m])
    return {**out, "trained": {s: True for s in sites}}


def _as_job(job: FlareJob | str | Path) -> FlareJob:
    if isinstance(job, FlareJob):
        return job
    path = Path(job)
    found = sorted(path.rglob(SETTINGS))
    if not found:
        raise FileNotFoundError(f"{path} is not a job exported by fedkit (it has no {SETTINGS}): pass the folder that "
                                "fk.export.nvflare(experiment, folder) or `fedkit export nvflare --out folder` wrote")
    return FlareJob(path, path.name, json.loads(found[0].read_text()))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
