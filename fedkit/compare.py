"""Run several workflows on the same data partition, seed and initial model, and compare them.

>>> import fedkit as fk
>>> data = fk.data.load("digits")
>>> runs = fk.compare({"FedAvg": fk.FedAvg(rounds=2), "FedProx": fk.FedProx(rounds=2, mu=0.1)},
...                   model=lambda: fk.models.for_data(data), clients=fk.data.iid(data.train, 4),
...                   test=data.test, progress=False)
>>> sorted(runs), all(r.status == "done" for r in runs.values())
(['FedAvg', 'FedProx'], True)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from .errors import ConfigError
from .server import Controller
from .simulator import Run, RunInterrupted, Simulator


def compare(workflows: Mapping[str, Controller], *, out: str | Path | None = None, progress: bool = True,
            **simulator_options: Any) -> dict[str, Run]:
    """Run each labelled workflow with the same `Simulator` settings; returns ``{label: Run}`` in order.

    ``simulator_options`` are those of `Simulator` (``model``, ``clients``, ``test``, ``train``,
    ``seed``, ``device``, ...): every run starts from the same initial weights, because they come
    from the same model function and seed. With ``out``, each run is saved in ``out/<label>``.
    Plot them together with ``fk.plots.curves(runs)``.

    Ctrl-C (Kernel > Interrupt) stops the comparison: the running run is recorded as aborted (checkpointed
    with ``out``), no further workflow starts, and `fedkit.simulator.RunInterrupted` (a KeyboardInterrupt) is
    raised; its ``.run`` is the interrupted run and ``.runs`` the runs so far (``{label: Run}``, that one last).
    """
    if not workflows:
        raise ConfigError("compare needs at least one workflow, e.g. {'FedAvg': fk.FedAvg(rounds=10)}")
    runs: dict[str, Run] = {}
    for label, workflow in workflows.items():
        run_dir = Path(out) / _slug(label) if out is not None else None
        sim = Simulator(workflow, out=run_dir, **simulator_options)
        try:
            runs[label] = sim.run(progress=progress, desc=str(label))
        except RunInterrupted as e:
            e.runs = {**runs, label: e.run}
            raise
    return runs


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in str(label)).strip("-") or "run"
