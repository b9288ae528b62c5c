"""The flags of ``fedkit run`` / ``fedkit compare`` as the typed objects of an `fk.Experiment`.

The command line's half of the mapping (`fedkit.cli` holds the parser): each function reads a parsed
namespace (``argparse.Namespace``, or one rebuilt from a run's ``cli.json``) and builds one part, a
`DataSpec`, a `TrainConfig`, `Faults`, the CKKS settings, the DP extension, the workflow, refusing
combinations that mean nothing with a message that names the flags to change. The tables map each
``--algorithm``, ``--aggregate``, ``--weigh-by`` and ``--server-opt`` name to what it builds; their keys
are the parser's choices.

No option is ever ignored: `refuse_unused` refuses a flag given where it means nothing (``--mu`` without
FedProx, ``--trim`` without the trimmed mean...), before anything is loaded or trained. Every other rule is the
API's, stated once: the objects refuse a bad setting with a structured `ConfigError` (object, field), which
the command line says in its flags' words (`dest_of` maps a setting to its flag).

>>> from types import SimpleNamespace
>>> encryption_from_args(SimpleNamespace(he=True, he_poly_modulus=16384, he_coeff_mod_bits="60,40,40,60",
...                                      he_scale_bits=40, he_layers=["fc2.*"]))
CKKS(poly_modulus_degree=16384, coeff_mod_bit_sizes=(60, 40, 40, 60), scale_bits=40, layers=('fc2.*',))
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Collection, Sequence

from . import aggregate, server_opt
from .errors import ConfigError
from .experiment import DataSpec, Experiment
from .faults import Faults
from .privacy.ckks import CKKS
from .privacy.clipping import AdaptiveClip
from .privacy.dp_fedavg import UserDP
from .privacy.dp_sgd import DPSGD
from .server import Controller
from .train import TrainConfig
from .workflows import SCAFFOLD, Cyclic, FedAvg, FedOpt, FedProx

Flags = Any  # a parsed namespace: argparse's, or one rebuilt from cli.json (this module never parses)
DP = DPSGD | UserDP | None  # the one DP extension a run may have: example-level or user-level

# --weigh-by NAME -> a client's aggregation weight
WEIGHINGS = {"samples": aggregate.by_samples, "steps": aggregate.by_steps, "uniform": aggregate.uniform}
# --aggregate NAME -> the rule; a rule with settings reads them from its own flags (--trim, --byzantine)
RULES: dict[str, Callable[[Flags], aggregate.Rule]] = {
    "mean": lambda a: aggregate.weighted_mean,
    "median": lambda a: aggregate.coordinate_median,
    "trimmed-mean": lambda a: functools.partial(aggregate.trimmed_mean, beta=a.trim),
    "krum": lambda a: functools.partial(aggregate.krum, f=a.byzantine),
    "multi-krum": lambda a: functools.partial(aggregate.multi_krum, f=a.byzantine),
}
# --server-opt NAME -> FedOpt's server optimizer; without --server-lr: 1.0 for sgd (a FedAvg step, plus NVFlare's momentum), 0.01 for the adaptive ones (Reddi et al.)
SERVER_OPTS: dict[str, Callable[[Flags], Any]] = {
    "sgd": lambda a: server_opt.SGD(lr=a.server_lr or 1.0, momentum=a.server_momentum),
    "adam": lambda a: server_opt.Adam(lr=a.server_lr or 0.01),
    "yogi": lambda a: server_opt.Yogi(lr=a.server_lr or 0.01),
    "adagrad": lambda a: server_opt.Adagrad(lr=a.server_lr or 0.01),
}


def data_from_args(a: Flags) -> DataSpec:
    """The data flags (--dataset ... --shards-per-client) as a `DataSpec`."""
    return DataSpec(dataset=a.dataset, data_root=a.data_root, download=a.download, clients=a.clients,
                    partition=a.partition, alpha=a.alpha, shards_per_client=a.shards_per_client,
                    min_size=getattr(a, "min_size", None))  # absent from a cli.json written before the flag


def train_from_args(a: Flags) -> TrainConfig:
    """The local-training flags as a `TrainConfig`."""
    return TrainConfig(epochs=a.local_epochs, batch_size=a.batch_size, lr=a.lr, momentum=a.momentum)


def faults_from_args(a: Flags) -> Faults | None:
    """The fault flags as `Faults`, or None when no fault is asked for (`fk.Experiment` refuses a straggler without
    a deadline)."""
    f = Faults(dropout=a.dropout, crash=a.crash, straggle=a.straggle, corrupt=a.corrupt, seed=a.fault_seed)
    return f if f.any else None


def encryption_from_args(a: Flags) -> CKKS | None:
    """The CKKS settings that --he and its options describe, or None; options without --he are refused."""
    d = CKKS()
    if not a.he:
        given = [name for name, value, default in (
            ("he_poly_modulus", a.he_poly_modulus, d.poly_modulus_degree),
            ("he_coeff_mod_bits", a.he_coeff_mod_bits, ",".join(map(str, d.coeff_mod_bit_sizes))),
            ("he_scale_bits", a.he_scale_bits, d.scale_bits), ("he_layers", a.he_layers, None))
            if value != default]
        if given:
            raise ConfigError(f"{', '.join('--' + g.replace('_', '-') for g in given)} only mean something with --he; "
                              "add --he or drop them")
        return None
    try:
        bits = tuple(int(b) for b in str(a.he_coeff_mod_bits).split(","))
    except ValueError:
        raise ConfigError(f"--he-coeff-mod-bits must be comma-separated whole numbers such as 60,40,40,60, "
                          f"got {a.he_coeff_mod_bits!r}") from None
    return CKKS(poly_modulus_degree=a.he_poly_modulus, coeff_mod_bit_sizes=bits, scale_bits=a.he_scale_bits,
                layers=tuple(a.he_layers) if a.he_layers else None)


def privacy_from_args(a: Flags) -> DPSGD | UserDP | None:
    """The DP mechanism --dp-sgd or --dp-fedavg asks for, as the workflow's one extension, or None."""
    if a.dp_sgd and a.dp_fedavg:
        raise ConfigError("choose one of --dp-sgd (example-level) and --dp-fedavg (user-level); both at once share "
                          "--noise-multiplier, which cannot mean both")
    z, target = a.noise_multiplier, a.target_epsilon
    if not (a.dp_sgd or a.dp_fedavg):
        given = [flag for flag, value in (("--noise-multiplier", z), ("--target-epsilon", target),
                                          ("--sample-rate", a.sample_rate),
                                          ("--adaptive-clip", a.adaptive_clip or None)) if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} need --dp-sgd or --dp-fedavg")
        return None
    if z is None and target is None:
        z = 1.0
    if a.dp_sgd:
        if a.sample_rate is not None or a.adaptive_clip:
            raise ConfigError("--sample-rate and --adaptive-clip are DP-FedAvg options; DP-SGD's sample rate is "
                              "--batch-size / (examples per client)")
        return DPSGD(noise_multiplier=z, max_grad_norm=a.max_grad_norm, target_epsilon=target, delta=a.delta,
                     accountant=a.dp_accountant)
    if a.clients_per_round is not None:
        raise ConfigError("DP-FedAvg samples each client with probability --sample-rate (its accountant assumes it); "
                          "drop --clients-per-round")
    return UserDP(clip=a.clip_norm, noise_multiplier=z, delta=a.delta, target_epsilon=target,
                  accountant=a.dp_accountant, adaptive_clip=AdaptiveClip() if a.adaptive_clip else None)


def norm_ratio_from_args(a: Flags) -> float | None:
    """FedAvg's ``max_norm_ratio`` from --max-norm-ratio (off: None); FedAvg's default where the flag is absent
    (a cli.json written before it)."""
    ratio = getattr(a, "max_norm_ratio", FedAvg.max_norm_ratio)
    return None if ratio == "off" else ratio


def scatter_gather_options(a: Flags, he: CKKS | None, dp: DP) -> dict[str, Any]:
    """The `FedAvg` settings the federation and fault-tolerance flags give, with ``he`` and ``dp`` in."""
    options: dict[str, Any] = dict(
        rounds=a.rounds, clients_per_round=a.clients_per_round, weigh=WEIGHINGS[a.weigh_by],
        aggregate=RULES[a.aggregate](a), min_clients=a.min_clients, max_retries=a.max_retries,
        task_timeout=a.task_timeout, he=he, extensions=(dp,) if dp is not None else (),
        max_norm_ratio=norm_ratio_from_args(a))
    if isinstance(dp, UserDP):
        if a.weigh_by == "steps":
            raise ConfigError("DP-FedAvg weighs every client the same (its sensitivity bound needs it); drop --weigh-by")
        # as fk.DPFedAvg: Poisson sampling, equal weights, and a failed client is simply absent from the noisy sum
        options.update(sample_rate=1.0 if a.sample_rate is None else a.sample_rate, weigh=aggregate.uniform,
                       min_clients=0, max_retries=0, max_norm_ratio=None)
    return options


def _cyclic(a: Flags, he: CKKS | None, dp: DP) -> Cyclic:
    """Cyclic weight transfer: one model visits the clients in turn, so no scatter-gather flag applies."""
    if dp is not None:
        raise ConfigError("cyclic weight transfer runs no extensions, and DP (--dp-sgd, --dp-fedavg) is an extension "
                          "of FedAvg's loop; use fedavg, fedprox, fedopt or scaffold with DP")
    return Cyclic(rounds=a.rounds, order=a.order, he=he)


# --algorithm NAME -> its workflow, from the flags, the CKKS settings and the DP extension
ALGORITHMS: dict[str, Callable[[Flags, CKKS | None, DP], Controller]] = {
    "fedavg": lambda a, he, dp: FedAvg(**scatter_gather_options(a, he, dp)),
    "fedprox": lambda a, he, dp: FedProx(mu=a.mu, **scatter_gather_options(a, he, dp)),
    "fedopt": lambda a, he, dp: FedOpt(server_opt=SERVER_OPTS[a.server_opt](a), **scatter_gather_options(a, he, dp)),
    "scaffold": lambda a, he, dp: SCAFFOLD(**scatter_gather_options(a, he, dp)),
    "cyclic": _cyclic,
}


def workflow_from_args(a: Flags, algorithm: str | None = None) -> Controller:
    """The workflow of ``algorithm`` (default: --algorithm) with the flags' federation, HE and DP settings."""
    name = algorithm or a.algorithm
    if name not in ALGORITHMS:
        raise ConfigError(f"unknown algorithm {name!r}; choose one of: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name](a, encryption_from_args(a), privacy_from_args(a))


def _algorithm(names: str) -> Callable[[bool], str]:
    """What to add for ``names``: the --algorithm of a run, or (``compare``) a name in the --algorithms."""
    return lambda compare: f"{names} in --algorithms" if compare else f"--algorithm {names}"


_SCATTER_GATHER = "fedavg, fedprox, fedopt or scaffold"


def _scatter_gather_only(why: str) -> tuple[Callable[[Flags, Sequence[str]], bool], Callable[[bool], str]]:
    """A FedAvg-family flag: it means something when any algorithm but cyclic runs; ``why`` cyclic ignores it."""
    return (lambda a, algs: any(n != "cyclic" for n in algs),
            lambda compare: _algorithm(_SCATTER_GATHER)(compare) + f" ({why})")

_FAULTS = ("dropout", "crash", "straggle", "corrupt")
# flag (its dest) -> (does it mean something with these flags and algorithms?, what it needs, for a run or compare)
_MEANINGFUL: dict[str, tuple[Callable[[Flags, Sequence[str]], bool], Callable[[bool], str]]] = {
    "mu": (lambda a, algs: "fedprox" in algs, _algorithm("fedprox")),
    "server_opt": (lambda a, algs: "fedopt" in algs, _algorithm("fedopt")),
    "server_lr": (lambda a, algs: "fedopt" in algs, _algorithm("fedopt")),
    "server_momentum": (lambda a, algs: "fedopt" in algs and a.server_opt == "sgd",
                        lambda compare: _algorithm("fedopt")(compare) + " and --server-opt sgd (the adaptive ones keep no momentum)"),
    "order": (lambda a, algs: "cyclic" in algs, _algorithm("cyclic")),
    "clients_per_round": _scatter_gather_only("cyclic visits every client"),
    "min_clients": _scatter_gather_only("cyclic needs every client"),
    "max_retries": _scatter_gather_only("cyclic never retries"),
    "task_timeout": _scatter_gather_only("cyclic sets no deadline"),
    "max_norm_ratio": (lambda a, algs: any(n != "cyclic" for n in algs) and not (a.he and not a.he_layers),
                       lambda compare: _algorithm(_SCATTER_GATHER)(compare) + " on updates the server can read "
                       "(cyclic screens no norms; with --he only the layers left out of --he-layers are screened)"),
    "weigh_by": _scatter_gather_only("cyclic averages nothing"),
    "aggregate": _scatter_gather_only("cyclic averages nothing"),
    "trim": (lambda a, algs: a.aggregate == "trimmed-mean", lambda compare: "--aggregate trimmed-mean"),
    "byzantine": (lambda a, algs: a.aggregate in ("krum", "multi-krum"), lambda compare: "--aggregate krum or multi-krum"),
    "alpha": (lambda a, algs: a.partition in ("dirichlet", "quantity"), lambda compare: "--partition dirichlet or quantity"),
    "shards_per_client": (lambda a, algs: a.partition == "shards", lambda compare: "--partition shards"),
    "min_size": (lambda a, algs: a.partition in ("dirichlet", "quantity"), lambda compare: "--partition dirichlet or quantity"),
    "data_root": (lambda a, algs: a.dataset in ("mnist", "cifar10"), lambda compare: "--dataset mnist or cifar10"),
    "download": (lambda a, algs: a.dataset in ("mnist", "cifar10"), lambda compare: "--dataset mnist or cifar10"),
    "max_grad_norm": (lambda a, algs: a.dp_sgd, lambda compare: "--dp-sgd (DP-FedAvg clips with --clip-norm)"),
    "clip_norm": (lambda a, algs: a.dp_fedavg, lambda compare: "--dp-fedavg (DP-SGD clips with --max-grad-norm)"),
    "delta": (lambda a, algs: a.dp_sgd or a.dp_fedavg, lambda compare: "--dp-sgd or --dp-fedavg"),
    "dp_accountant": (lambda a, algs: a.dp_sgd or a.dp_fedavg, lambda compare: "--dp-sgd or --dp-fedavg"),
    "fault_seed": (lambda a, algs: any(getattr(a, f) > 0 for f in _FAULTS),
                   lambda compare: "a fault to inject (--dropout, --crash, --straggle or --corrupt)"),
}


# what --dp-fedavg sets itself (fk.DPFedAvg's settings): flag (its dest) -> (the one value it honours, or None)
_DP_FEDAVG_SETS = {"weigh_by": "uniform", "aggregate": "mean", "min_clients": None, "max_retries": None,
                   "max_norm_ratio": "off"}


def refuse_unused(a: Flags, given: Collection[str], algorithms: Sequence[str], compare: bool = False) -> None:
    """Refuse the flags in ``given`` (dests of the flags typed) that mean nothing with the other flags and
    ``algorithms`` (the run's one, or the list of ``fedkit compare``): such a flag would be ignored without a word."""
    if a.dp_fedavg:
        taken = [_flag(d) for d, honoured in _DP_FEDAVG_SETS.items() if d in given and getattr(a, d) != honoured]
        if taken:
            raise ConfigError(f"--dp-fedavg sets {', '.join(taken)} itself: DP-FedAvg weighs every client the same and "
                              "adds noise to their plain mean (its sensitivity bound needs both), and goes on with "
                              f"whichever sampled clients answer, never retrying a round, and screens no update norms (it "
                              f"clips every update to --clip-norm); drop {', '.join(taken)}")
    unused: dict[str, list[str]] = {}
    for dest, (means_something, needs) in _MEANINGFUL.items():
        if dest in given and not means_something(a, algorithms):
            unused.setdefault(needs(compare), []).append(_flag(dest))
    if unused:
        raise ConfigError("; ".join(f"{', '.join(flags)} only {'means' if len(flags) == 1 else 'mean'} something with "
                                    f"{needs}: add that or drop {', '.join(flags)}" for needs, flags in unused.items()))


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


# (the API's object, its setting) -> the dest of the flag that sets it, where the two names differ; any other setting of
# the objects the flags build (`FLAG_OWNERS`) is set by the flag of its own name, if the parser has one
SETTING_DESTS = {
    ("TrainConfig", "epochs"): "local_epochs", ("FedAvg", "weigh"): "weigh_by", ("Faults", "seed"): "fault_seed",
    ("CKKS", "poly_modulus_degree"): "he_poly_modulus", ("CKKS", "coeff_mod_bit_sizes"): "he_coeff_mod_bits",
    ("CKKS", "scale_bits"): "he_scale_bits", ("CKKS", "layers"): "he_layers", ("UserDP", "clip"): "clip_norm",
    **{(owner, "accountant"): "dp_accountant" for owner in ("DPSGD", "UserDP", None)},
    ("UserDP", "adaptive_clip"): "adaptive_clip", ("Proximal", "mu"): "mu", ("krum", "f"): "byzantine",
    ("multi_krum", "f"): "byzantine", ("trimmed_mean", "beta"): "trim", ("Experiment", "workflow"): "algorithm",
    ("Experiment", "faults"): ("dropout", "crash", "straggle", "corrupt"), ("FedAvg", "he"): "he",
    **{(opt, "lr"): "server_lr" for opt in ("SGD", "Adam", "Yogi", "Adagrad")}, ("SGD", "momentum"): "server_momentum",
}
# what the flags build (None: a keyword argument of an entry point, such as out= and overwrite=)
FLAG_OWNERS = {"FedAvg", "Cyclic", "DataSpec", "TrainConfig", "Experiment", "Faults", "DPSGD", "UserDP", "CKKS",
               "Simulator", "Proximal", None}


def dest_of(owner: str | None, field: str) -> tuple[str, ...]:
    """The dests of the flags that set ``owner``'s ``field`` (`fedkit.errors.ConfigError`'s object and field): one
    as a rule, none where the flags build no such object."""
    dests = SETTING_DESTS.get((owner, field), field if owner in FLAG_OWNERS else ())
    return (dests,) if isinstance(dests, str) else dests


def check_federation(exp: Experiment) -> None:
    """Ask ``exp``'s workflow, before anything is loaded, whether its settings can work with the federation the
    data flags describe (``--clients`` clients, named as the simulator names them)."""
    exp.workflow.check_federation([f"site-{i + 1}" for i in range(exp.data.clients)])


def experiment_from_args(a: Flags, algorithm: str | None = None) -> Experiment:
    """The `Experiment` that ``fedkit run`` / ``compare`` flags describe, for one ``algorithm``."""
    faults = faults_from_args(a)
    return Experiment(data=data_from_args(a), workflow=workflow_from_args(a, algorithm), train=train_from_args(a),
                      model=a.model, faults=faults, seed=a.seed, device=a.device, threads=getattr(a, "threads", "auto"),
                      engine=getattr(a, "engine", "sequential"))
