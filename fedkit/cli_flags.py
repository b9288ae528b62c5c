"""The flags of ``fedkit run`` / ``fedkit compare`` as the typed objects of an `fk.Experiment`.

The command line's half of the mapping (`fedkit.cli` holds the parser): each function reads a parsed
namespace (``argparse.Namespace``, or one rebuilt from a run's ``cli.json``) and builds one part, a
`DataSpec`, a `TrainConfig`, `Faults`, the CKKS settings, the DP extension, the workflow, refusing
combinations that mean nothing with a message that names the flags to change. The tables map each
``--algorithm``, ``--aggregate``, ``--weigh-by`` and ``--server-opt`` name to what it builds; their keys
are the parser's choices.

>>> from types import SimpleNamespace
>>> encryption_from_args(SimpleNamespace(he=True, he_poly_modulus=16384, he_coeff_mod_bits="60,40,40,60",
...                                      he_scale_bits=40, he_layers=["fc2.*"]))
CKKS(poly_modulus_degree=16384, coeff_mod_bit_sizes=(60, 40, 40, 60), scale_bits=40, layers=('fc2.*',))
"""

from __future__ import annotations

import functools
from typing import Any, Callable

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
                    partition=a.partition, alpha=a.alpha, shards_per_client=a.shards_per_client)


def train_from_args(a: Flags) -> TrainConfig:
    """The local-training flags as a `TrainConfig`."""
    return TrainConfig(epochs=a.local_epochs, batch_size=a.batch_size, lr=a.lr, momentum=a.momentum)


def faults_from_args(a: Flags) -> Faults | None:
    """The fault flags as `Faults`, or None when no fault is asked for."""
    if a.straggle > 0 and a.task_timeout is None:
        raise ConfigError("straggle > 0 needs a task_timeout (--task-timeout SECONDS): a straggler is a client "
                          "that answers after the deadline")
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


def scatter_gather_options(a: Flags, he: CKKS | None, dp: DP) -> dict[str, Any]:
    """The `FedAvg` settings the federation and fault-tolerance flags give, with ``he`` and ``dp`` in."""
    options: dict[str, Any] = dict(
        rounds=a.rounds, clients_per_round=a.clients_per_round, weigh=WEIGHINGS[a.weigh_by],
        aggregate=RULES[a.aggregate](a), min_clients=a.min_clients, max_retries=a.max_retries,
        task_timeout=a.task_timeout, he=he, extensions=(dp,) if dp is not None else ())
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


def experiment_from_args(a: Flags, algorithm: str | None = None) -> Experiment:
    """The `Experiment` that ``fedkit run`` / ``compare`` flags describe, for one ``algorithm``."""
    faults = faults_from_args(a)
    return Experiment(data=data_from_args(a), workflow=workflow_from_args(a, algorithm), train=train_from_args(a),
                      model=a.model, faults=faults, seed=a.seed, device=a.device)
