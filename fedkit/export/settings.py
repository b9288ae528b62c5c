"""An `fk.Experiment` as the plain JSON an NVIDIA FLARE job carries, and back; and what cannot go to FLARE.

`settings_of` checks that every part of the experiment has a FLARE counterpart and writes the settings
the job's client script needs to rebuild fedkit's model, data partition and local training
(`experiment_of` rebuilds them). Exported: FedAvg, FedProx, FedOpt with server SGD, each optionally
followed by cross-site evaluation (``Chain(..., CrossSiteEval())``). What FLARE cannot express is refused
with a `NotExportable` that names the FLARE counterpart to use instead: a rule written in a cell,
fedkit's HE in simulation, DP, fault injection, SCAFFOLD's and cyclic's workflows (not exported yet),
adaptive server optimizers, Poisson sampling, min_clients below the clients asked, a deadline.

>>> import fedkit as fk
>>> s = settings_of(fk.Experiment.preset("smoke", workflow=fk.FedProx(rounds=2, mu=0.1)))
>>> s["algorithm"], s["rounds"], s["mu"], s["clients"]
('fedprox', 2, 0.1, 3)
>>> experiment_of(s).workflow.extensions
(Proximal(mu=0.1),)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..aggregate import by_samples, by_steps, rule_name, uniform, weighted_mean
from ..errors import ConfigError
from ..experiment import DataSpec, Experiment
from ..server import Controller
from ..server_opt import SGD
from ..simulator import Run, Simulator
from ..train import TrainConfig
from ..workflows import Chain, CrossSiteEval, Cyclic, FedAvg, FedOpt
from ..workflows.extensions import Proximal, Scaffold

FORMAT = 1  # of the settings JSON
# fedkit's weigh function -> what the client script sends as FLARE's NUM_STEPS_CURRENT_ROUND (FLARE's FedAvg weight)
WEIGHINGS = {by_samples: "samples", by_steps: "steps", uniform: "uniform"}
_WEIGH = {name: fn for fn, name in WEIGHINGS.items()}
_RECIPES = "nvflare.app_opt.pt.recipes"


class NotExportable(ConfigError):
    """A part of the experiment that FLARE cannot run as fedkit does; the message names FLARE's counterpart (in
    FLARE's own words, which no flag rewrites), and its settings structurally, as every `ConfigError` does."""


def _no(what: str, flare: str, fix: str, obj: Any, field: str) -> NotExportable:
    """A refusal of ``what`` (``obj``'s ``field``), what FLARE has instead, and what to change to export."""
    return NotExportable(f"{what} {flare}", obj=obj, field=field, hint=fix)


def experiment_from(obj: Any) -> Experiment:
    """The `Experiment` behind ``obj``: an Experiment, or a Simulator / Run that `Experiment.simulator` built."""
    if isinstance(obj, Run):
        obj = obj.simulator
    if isinstance(obj, Experiment):
        return obj
    exp = getattr(obj, "experiment", None)
    if isinstance(exp, Experiment):
        return exp
    if isinstance(obj, (Simulator, Run)):
        raise NotExportable("this Simulator was built by hand, or by Experiment.simulator() with options that change "
                            "what is trained (executors, filters, val_fraction...): its clients' data and executors live "
                            "in this process, and FLARE's clients load their own. Describe the run as an fk.Experiment "
                            "(fk.DataSpec for the data, the workflow, fk.TrainConfig) and export that: "
                            "fk.export.nvflare(experiment, 'jobs/name')")
    raise NotExportable(f"fk.export.nvflare exports an fk.Experiment (or a Simulator built by Experiment.simulator()), "
                        f"got {type(obj).__name__}")


def settings_of(exp: Experiment) -> dict[str, Any]:
    """The JSON-friendly settings of ``exp`` for a FLARE job; `NotExportable` for what FLARE cannot express."""
    wf, cross_site = _training_workflow(exp.workflow)
    _check_scatter_gather(wf, exp.data.clients)
    if exp.faults is not None:
        raise _no("fault injection ({faults})", "is fedkit's simulation of failing clients; a FLARE job runs real "
                  "clients: to rehearse failures in FLARE, stop a client of `nvflare simulator` or a POC site "
                  "(`nvflare poc stop -p site-1`) mid-run", "drop {faults} to export", exp, "faults")
    mu = [e.mu for e in wf.extensions if isinstance(e, Proximal)]
    algorithm = "fedopt" if wf.server_opt is not None else "fedprox" if mu else "fedavg"
    opt = None
    if wf.server_opt is not None:
        if mu:
            raise NotExportable(f"FLARE's FedOptRecipe ({_RECIPES}.fedopt.FedOptRecipe) has no FedProx term: export "
                                "FedOpt without Proximal, or FedProx without a server optimizer")
        opt = {"path": "torch.optim.SGD", "args": {"lr": wf.server_opt.lr, "momentum": wf.server_opt.momentum,
                                                    "nesterov": wf.server_opt.nesterov}}
    return {
        "format": FORMAT, "algorithm": algorithm, "rounds": wf.rounds,
        "clients": exp.data.clients, "clients_per_round": wf.clients_per_round or exp.data.clients,
        "mu": mu[0] if mu else None, "weigh": WEIGHINGS[wf.weigh], "server_opt": opt, "cross_site": cross_site,
        "data": dataclasses.asdict(exp.data), "train": dataclasses.asdict(exp.train), "model": exp.model,
        "seed": exp.seed, "device": exp.device, "threads": exp.threads,
    }


def experiment_of(s: dict[str, Any]) -> Experiment:
    """The `Experiment` that settings from `settings_of` describe (the job's clients build their part of it)."""
    if s.get("format") != FORMAT:
        raise ConfigError(f"these fedkit settings have format {s.get('format')!r}; this fedkit reads format {FORMAT}: "
                          "export the job again with this fedkit")
    options: dict[str, Any] = dict(rounds=s["rounds"], weigh=_WEIGH[s["weigh"]])
    if s["clients_per_round"] != s["clients"]:
        options["clients_per_round"] = s["clients_per_round"]
    if s["mu"] is not None:
        options["extensions"] = (Proximal(s["mu"]),)
    if s["server_opt"] is not None:
        a = s["server_opt"]["args"]
        workflow = FedOpt(server_opt=SGD(lr=a["lr"], momentum=a["momentum"], nesterov=a["nesterov"]), **options)
    else:
        workflow = FedAvg(**options)
    if s.get("cross_site"):
        workflow = Chain(workflow, CrossSiteEval())
    return Experiment(data=DataSpec(**s["data"]), workflow=workflow, train=TrainConfig(**s["train"]), model=s["model"],
                      seed=s["seed"], device=s["device"], threads=s["threads"])


def _training_workflow(wf: Controller) -> tuple[FedAvg, bool]:
    """The training workflow of ``wf``, and whether cross-site evaluation follows it."""
    if isinstance(wf, Chain):
        parts = wf.parts
        if (len(parts) == 2 and isinstance(parts[1], CrossSiteEval) and parts[1] == CrossSiteEval()
                and not isinstance(parts[0], (Chain, CrossSiteEval))):
            return _training_workflow(parts[0])[0], True
        raise NotExportable(f"a Chain ({', '.join(type(p).__name__ for p in parts)}) is exported only as "
                            "Chain(<FedAvg, FedProx or FedOpt>, CrossSiteEval()), which FLARE runs as the training "
                            "recipe plus nvflare.recipe.utils.add_cross_site_evaluation(recipe); FLARE's counterpart "
                            "of a longer chain is a ModelController subclass that runs the parts in its run()")
    if isinstance(wf, CrossSiteEval):
        raise NotExportable("CrossSiteEval alone trains nothing; FLARE's counterpart is "
                            "nvflare.recipe.utils.add_cross_site_evaluation(recipe) added to a training recipe")
    if isinstance(wf, Cyclic):
        raise _no("cyclic weight transfer ({workflow=cyclic})", "is not exported yet; FLARE's counterpart "
                  f"is {_RECIPES}.cyclic.CyclicRecipe(num_rounds=..., min_clients=..., train_script=...)",
                  "export FedAvg, FedProx or FedOpt", "Experiment", "workflow")
    if not isinstance(wf, FedAvg):
        raise NotExportable(f"the workflow {type(wf).__name__} is a fedkit Controller written here, which FLARE cannot "
                            "run; FLARE's counterpart is a subclass of nvflare.app_common.workflows.model_controller."
                            "ModelController (its run() sends tasks with send_model_and_wait), added with "
                            "FedJob.to_server(...). Export FedAvg, FedProx or FedOpt instead")
    return wf, False


def _check_scatter_gather(wf: FedAvg, clients: int) -> None:
    """Refuse the FedAvg settings FLARE's FedAvg controller does not have, naming what to use instead."""
    if wf.he is not None:
        raise _no("fedkit's HE ({he})", "is a simulation in one process, with the keys in memory; FLARE's "
                  f"counterpart is {_RECIPES}.fedavg_he.FedAvgRecipeWithHE, whose TenSEAL context is made by "
                  "provisioning (`nvflare provision` with the HE builder, or `nvflare poc prepare -he`)",
                  "drop {he} to export the plaintext job, then switch its recipe to FedAvgRecipeWithHE", wf, "he")
    if wf.aggregate is not weighted_mean:
        raise _no("the aggregation rule {aggregate=}", "runs in this Python process only; FLARE's FedAvg computes the "
                  "weighted mean. Its counterpart for another rule is a subclass of nvflare.app_common.aggregators."
                  "model_aggregator.ModelAggregator (accept_model, aggregate_model, reset_stats) passed as "
                  f"{_RECIPES}.fedavg.FedAvgRecipe(aggregator=...)",
                  "use {aggregate}'s default, weighted_mean, to export", wf, "aggregate")
    if wf.weigh not in WEIGHINGS:
        raise NotExportable(f"the weighing {rule_name(wf.weigh)} runs in this Python process only; FLARE's FedAvg weighs "
                            "each client by NUM_STEPS_CURRENT_ROUND times FedAvgRecipe(aggregation_weights={site: w}). "
                            "Use weigh=fk.aggregate.by_samples, by_steps or uniform to export")
    for ext in wf.extensions:
        if isinstance(ext, Scaffold):
            raise _no("SCAFFOLD ({Experiment.workflow=scaffold})", "is not exported yet; FLARE's counterpart is "
                      f"{_RECIPES}.scaffold.ScaffoldRecipe, whose client script keeps the control variates with "
                      "nvflare.app_opt.pt.scaffold.PTScaffoldHelper", "export FedAvg, FedProx or FedOpt", wf,
                      "extensions")
        if not isinstance(ext, Proximal):
            raise _no(f"the extension {type(ext).__name__} ({{extensions}})", "has no counterpart in FLARE's FedAvg; for "
                      "DP-SGD train with Opacus in the client script, for privacy on what a client sends add FLARE's "
                      "filters (nvflare.app_common.filters: PercentilePrivacy, SVTPrivacy, ExcludeVars) with "
                      "recipe.add_client_output_filter(...)", "drop it ({extensions}) to export", wf, "extensions")
    if len([e for e in wf.extensions if isinstance(e, Proximal)]) > 1:
        raise NotExportable("two Proximal terms: FLARE's FedProxRecipe takes one fedprox_mu; keep one Proximal(mu) "
                            "(or use fk.FedProx(mu=...)) to export")
    if wf.server_opt is not None and not isinstance(wf.server_opt, SGD):
        raise _no(f"the server optimizer {type(wf.server_opt).__name__} ({{server_opt}})", "has no exact counterpart: "
                  f"FLARE's FedOptRecipe ({_RECIPES}.fedopt.FedOptRecipe(optimizer_args={{'path': 'torch.optim.Adam', "
                  "...})) runs a torch optimizer on the pseudo-gradient, not Reddi et al.'s adaptive update with tau",
                  "use {server_opt=SGD} (fk.server_opt.SGD(lr=1.0, momentum=0.6)) to export", wf, "server_opt")
    if wf.server_opt is not None and wf.server_opt.lr_schedule is not None:
        raise NotExportable("a server learning-rate schedule is fedkit's function; FLARE's counterpart is "
                            "FedOptRecipe(lr_scheduler_args={'path': 'torch.optim.lr_scheduler....', 'args': {...}})")
    if wf.sample_rate is not None:
        raise NotExportable("Poisson sampling (sample_rate=) has no counterpart in FLARE's FedAvg, which samples a fixed "
                            "number of clients a round (FedAvgRecipe(min_clients=...)); use clients_per_round")
    if wf.min_clients is not None and wf.min_clients < (wf.clients_per_round or clients):
        raise _no("{min_clients=}", "(go on with fewer valid results than clients asked) has no counterpart in FLARE's "
                  "FedAvg, which waits for every client it asked; FLARE's older nvflare.app_common.workflows."
                  "scatter_and_gather.ScatterAndGather(min_clients=..., wait_time_after_min_received=...) has it",
                  "drop {min_clients} to export", wf, "min_clients")
    if wf.task_timeout is not None:
        raise _no("{task_timeout}", "is fedkit's per-task deadline; FLARE's counterpart is the controller's "
                  "(ScatterAndGather(train_timeout=...))", "drop {task_timeout} to export", wf, "task_timeout")
