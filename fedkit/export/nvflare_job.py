"""`nvflare`: an experiment as an NVIDIA FLARE job folder, built with FLARE's own job API (its recipes).

The server side is FLARE's: `FedAvgRecipe` (FLARE's FedAvg controller, InTime weighted averaging,
PyTorch persistor), `FedProxRecipe` (the same, sending ``fedprox_mu`` to the clients) or `FedOptRecipe`
(server SGD with momentum), with the experiment's rounds and clients per round, and fedkit's initial
model (built under the experiment's seed) as the starting checkpoint. The client side is
`fedkit.export.flare_client_script`, which runs fedkit's model, data partition and local training
through FLARE's Client API; ``fedkit_experiment.json`` carries the settings. FLARE weighs each client
by the NUM_STEPS_CURRENT_ROUND it sends: the script sends fedkit's weight (training samples by default).

Run the folder with ``nvflare simulator jobs/name -w /tmp/flare-ws -n 8 -t 8`` (``-n``: the experiment's
clients; ``-t``: how many run at once, see `FlareJob.simulator_command`), or with
`fedkit.export.run_in_flare_simulator`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..errors import MissingExtra
from ..extras import require
from ..simulator import Run, Simulator
from .flare_model import SEEDED
from .job_folder import check_folder, files_in, write_marker
from .settings import NotExportable, experiment_from, settings_of

SCRIPT = "fedkit_client.py"  # the client script's name in the job
SETTINGS = "fedkit_experiment.json"  # the experiment's settings, next to the script
INITIAL = "fedkit_initial_model.pt"  # fedkit's initial weights (the experiment's seed), the server's start
FlareMissing = MissingExtra  # what a missing nvflare raises: a ConfigError naming fedkit[flare]


def nvflare_module(module: str = "nvflare") -> ModuleType:
    """``module`` of nvflare (optional: ``fedkit[flare]``), imported; or `MissingExtra` saying how to install it."""
    return require(module, "exporting to NVIDIA FLARE", " (or: pip install nvflare==2.9.0)")


@dataclass(frozen=True)
class FlareJob:
    """An exported job: its folder, the experiment's settings, and the ``nvflare simulator`` line that runs it."""

    path: Path
    name: str
    settings: dict[str, Any]

    @property
    def clients(self) -> int:
        return self.settings["clients"]

    def simulator_command(self, workspace: str | Path = "/tmp/flare-workspace", threads: int | None = None) -> str:
        """The shell line that runs this job in FLARE's simulator, ``threads`` clients at a time (default: all).

        Fewer threads than clients makes FLARE swap clients in and out every round, which costs seconds per
        client (measured: 75 s a round for 8 clients on 2 threads, 2.5 s on 8); fedkit's clients take turns
        anyway (one process, one torch generator), so a thread per client costs nothing more."""
        t = self.clients if threads is None else max(1, min(threads, self.clients))
        return f"nvflare simulator {self.path} -w {workspace} -n {self.clients} -t {t}"

    def files(self) -> list[str]:
        """The job folder's files, relative to it."""
        return files_in(self.path)


def nvflare(experiment: Any, out: str | Path, name: str | None = None, overwrite: bool = False) -> FlareJob:
    """Write ``experiment`` (an `fk.Experiment`, or a Simulator / Run that `Experiment.simulator` built) as a
    FLARE job folder ``out``, built with FLARE's recipes; `NotExportable` names FLARE's counterpart of what
    cannot be exported, `MissingExtra` says how to install nvflare.

    ``name`` is the job's name (default: the folder's name). ``out`` must be a new or empty folder, or, with
    ``overwrite=True``, one an earlier export wrote (`fedkit.export.job_folder`: any other folder is refused with
    `FolderRefused`, and nothing is deleted).
    """
    exp = experiment_from(experiment)
    settings = settings_of(exp)  # refuse before anything is built or written
    out = Path(out)
    check_folder(out, overwrite)
    nvflare_module()
    name = name or out.resolve().name
    sim = experiment.simulator if isinstance(experiment, Run) else experiment
    sim = sim if isinstance(sim, Simulator) else exp.simulator()
    model = sim.model_fn()
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        script = staged / SCRIPT
        shutil.copyfile(Path(__file__).with_name("flare_client_script.py"), script)
        (staged / SETTINGS).write_text(json.dumps(settings, indent=1) + "\n")
        initial = sim.initial_weights()
        torch.save(initial, staged / INITIAL)
        config = _model_config(model, exp.seed, initial)
        # FLARE's job API takes the script and files by paths relative to the working directory, and writes
        # them so into the job's config: build and export the recipe from the staging folder
        with contextlib.chdir(staged):
            recipe = _recipe(settings, name, config)
            recipe.add_client_file(SETTINGS)
            if settings["cross_site"]:
                nvflare_module("nvflare.recipe.utils").add_cross_site_evaluation(recipe)
            # fedkit is installed on the sites (as nvflare is): FLARE must not copy its modules into the job's
            # custom/ folder, where they would shadow the installed package
            recipe._job.set_app_packages(["fedkit"])
            recipe.export("exported")  # FLARE writes exported/<name>/; the job is that folder
        write_marker(staged / "exported" / name, name)
        if out.exists():  # empty, or an earlier export's: checked again, as it may have changed while the job was built
            check_folder(out, overwrite)
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged / "exported" / name), str(out))
    return FlareJob(out, name, settings)


def _model_config(model: torch.nn.Module, seed: int, initial: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The model as FLARE's ``{"class_path", "args"}``: fedkit's class built under ``seed`` (`flare_model`), checked
    to give fedkit's ``initial`` weights."""
    kind = type(model)
    if kind not in SEEDED:
        raise NotExportable(f"the model {kind.__name__} is not one of fedkit's (mlp, cnn, simple); FLARE's "
                            "counterpart is your own nn.Module class, importable on the server, given to the recipe as "
                            "model={'class_path': 'package.module.Class', 'args': {...}}")
    # fedkit's models keep their constructor's arguments as attributes, which is also how FLARE's job API reads them
    args = {name: getattr(model, name) for name in inspect.signature(kind).parameters}
    args = {**{k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}, "seed": seed}
    seeded = SEEDED[kind]
    rebuilt = seeded(**args).state_dict()
    if rebuilt.keys() != initial.keys() or not all(torch.equal(rebuilt[k], initial[k]) for k in initial):
        raise NotExportable(f"FLARE's server would not build fedkit's initial {kind.__name__} from its arguments")
    return {"class_path": f"{seeded.__module__}.{seeded.__qualname__}", "args": args}


def _recipe(settings: dict[str, Any], name: str, model: dict[str, Any]):
    """FLARE's recipe for the settings (FedAvg, FedProx or FedOpt), with the client script and the initial model
    (both relative to the working directory: FLARE bundles a relative initial_ckpt into the server app)."""
    common = dict(name=name, model=model, min_clients=settings["clients_per_round"],
                  num_rounds=settings["rounds"], train_script=SCRIPT,
                  initial_ckpt=INITIAL)
    recipes = "nvflare.app_opt.pt.recipes"
    if settings["algorithm"] == "fedopt":
        return nvflare_module(f"{recipes}.fedopt").FedOptRecipe(optimizer_args=settings["server_opt"], **common)
    if settings["algorithm"] == "fedprox":
        return nvflare_module(f"{recipes}.fedprox").FedProxRecipe(fedprox_mu=settings["mu"], **common)
    return nvflare_module(f"{recipes}.fedavg").FedAvgRecipe(**common)
