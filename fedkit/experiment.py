"""One experiment described by plain settings: what `fedkit run`, `fedkit compare` and the widget panel build.

>>> exp = Experiment(partition="dirichlet", alpha=0.3, algorithm="scaffold", rounds=3)
>>> sim = exp.simulator()
>>> type(sim.workflow).__name__, sim.workflow.rounds
('FedAvg', 3)
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from . import aggregate, data as fkdata, models, server_opt
from .errors import ConfigError
from .faults import Faults
from .privacy.dp import DPArgs, dp_from_args
from .privacy.he import he_from_args
from .server import Controller
from .simulator import Simulator
from .train import TrainConfig
from .workflows import SCAFFOLD, Cyclic, FedAvg, FedOpt, FedProx

PARTITIONS = ("iid", "dirichlet", "shards", "quantity")
ALGORITHMS = ("fedavg", "fedprox", "fedopt", "scaffold", "cyclic")
WEIGHINGS = {"samples": aggregate.by_samples, "steps": aggregate.by_steps, "uniform": aggregate.uniform}
SERVER_OPTS = {"sgd": server_opt.SGD, "adam": server_opt.Adam, "yogi": server_opt.Yogi, "adagrad": server_opt.Adagrad}
RULES = ("mean", "median", "trimmed-mean", "krum", "multi-krum")


@dataclass(frozen=True)
class Experiment:
    """Every setting of a federated experiment, with the defaults of `fedkit run`."""

    # data
    dataset: str = "digits"  # offline; mnist / cifar10 need torchvision and a download
    data_root: str = "data"
    download: bool = False
    clients: int = 8
    partition: str = "iid"  # iid, dirichlet, shards, quantity
    alpha: float = 0.5  # Dirichlet concentration for dirichlet / quantity: small = skewed
    shards_per_client: int = 2
    # federation
    algorithm: str = "fedavg"  # fedavg, fedprox, fedopt, scaffold, cyclic
    rounds: int = 10
    clients_per_round: int | None = None
    weigh_by: str = "samples"  # samples, steps, uniform
    aggregate: str = "mean"  # mean, median, trimmed-mean, krum, multi-krum
    trim: float = 0.1  # trimmed-mean: fraction cut at each end
    byzantine: int = 1  # krum: clients assumed malicious
    mu: float = 0.01  # FedProx
    server_opt: str = "sgd"  # FedOpt: sgd, adam, yogi, adagrad
    server_lr: float | None = None  # FedOpt: default 1.0 for sgd, 0.01 for the adaptive ones
    server_momentum: float = 0.6  # FedOpt sgd: NVFlare's default
    order: str = "fixed"  # cyclic: fixed or shuffled
    # local training
    model: str = "auto"  # auto, mlp, cnn, simple
    local_epochs: int = TrainConfig.epochs
    lr: float = TrainConfig.lr
    momentum: float = TrainConfig.momentum
    batch_size: int = TrainConfig.batch_size
    # faults and fault tolerance
    min_clients: int | None = None
    max_retries: int = 2
    task_timeout: float | None = None
    dropout: float = 0.0
    crash: float = 0.0
    straggle: float = 0.0
    corrupt: float = 0.0
    fault_seed: int = 0
    # differential privacy (see fedkit.privacy.dp)
    dp_sgd: bool = False  # example-level DP-SGD on every client
    dp_fedavg: bool = False  # user-level DP-FedAvg: Poisson-sampled clients, clipped updates, noise on the sum
    noise_multiplier: float | None = None  # default 1.0, unless target_epsilon sets it
    max_grad_norm: float = 1.0  # DP-SGD: clip norm of each example's gradient
    clip_norm: float = 1.0  # DP-FedAvg: clip norm of each client's update
    sample_rate: float | None = None  # DP-FedAvg: probability a client joins a round (default 1.0)
    adaptive_clip: bool = False  # DP-FedAvg: adapt the clip norm (Andrew et al. 2021)
    target_epsilon: float | None = None  # a budget the run never exceeds
    delta: float = 1e-5
    dp_accountant: str = "rdp"  # rdp or prv
    # homomorphic encryption (see fedkit.privacy.he)
    he: bool = False  # encrypt updates and the global model with CKKS (FedAvg and FedProx)
    he_poly_modulus: int = 8192
    he_coeff_mod_bits: str = "60,40,40,60"
    he_scale_bits: int = 40
    he_layers: tuple[str, ...] | None = None  # names or regexes of the layers to encrypt; None: all
    # run
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in (("partition", PARTITIONS), ("algorithm", ALGORITHMS), ("aggregate", RULES),
                              ("weigh_by", tuple(WEIGHINGS)), ("server_opt", tuple(SERVER_OPTS)),
                              ("order", ("fixed", "shuffled"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} {getattr(self, name)!r} is not known; choose one of: {', '.join(allowed)}")
        if self.straggle > 0 and self.task_timeout is None:
            raise ConfigError("straggle > 0 needs a task_timeout (--task-timeout SECONDS): a straggler is a client "
                              "that answers after the deadline")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "Experiment":
        """An experiment from a dict (or ``vars(argparse_namespace)``); keys that are not settings are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def rule(self) -> aggregate.Rule:
        if self.aggregate == "mean":
            return aggregate.weighted_mean
        if self.aggregate == "median":
            return aggregate.coordinate_median
        if self.aggregate == "trimmed-mean":
            return functools.partial(aggregate.trimmed_mean, beta=self.trim)
        if self.aggregate == "krum":
            return functools.partial(aggregate.krum, f=self.byzantine)
        return functools.partial(aggregate.multi_krum, f=self.byzantine)

    def workflow(self, algorithm: str | None = None) -> Controller:
        """The workflow of ``algorithm`` (default: this experiment's) with this experiment's settings."""
        algorithm = algorithm or self.algorithm
        if algorithm == "cyclic":
            if self.dp_fedavg:
                raise ConfigError("DP-FedAvg adds noise to the sum of a round's updates; cyclic weight transfer has no "
                                  "such sum. Use --dp-sgd with cyclic, or another algorithm.")
            return Cyclic(rounds=self.rounds, order=self.order)
        common = self.privacy().merge(dict(
            rounds=self.rounds, clients_per_round=self.clients_per_round, weigh=WEIGHINGS[self.weigh_by],
            aggregate=self.rule(), min_clients=self.min_clients, max_retries=self.max_retries,
            task_timeout=self.task_timeout))
        he = he_from_args(self)
        if he is not None:
            if algorithm == "cyclic":
                raise ConfigError("HE encrypts the updates that the server sums; cyclic weight transfer sums none. "
                                  "Use fedavg or fedprox with HE.")
            common["he"] = he
        if algorithm == "fedprox":
            return FedProx(mu=self.mu, **common)
        if algorithm == "scaffold":
            return SCAFFOLD(**common)
        if algorithm == "fedopt":
            cls = SERVER_OPTS[self.server_opt]
            lr = self.server_lr or (1.0 if self.server_opt == "sgd" else 0.01)
            opt = cls(lr=lr, momentum=self.server_momentum) if self.server_opt == "sgd" else cls(lr=lr)
            return FedOpt(server_opt=opt, **common)
        if algorithm == "fedavg":
            return FedAvg(**common)
        raise ConfigError(f"unknown algorithm {algorithm!r}; choose one of: {', '.join(ALGORITHMS)}")

    def partition_of(self, data: fkdata.Data) -> fkdata.Partition:
        if self.partition == "iid":
            return fkdata.iid(data.train, self.clients, seed=self.seed)
        if self.partition == "dirichlet":
            return fkdata.dirichlet(data.train, self.clients, alpha=self.alpha, seed=self.seed)
        if self.partition == "shards":
            return fkdata.shards(data.train, self.clients, self.shards_per_client, seed=self.seed)
        return fkdata.quantity_skew(data.train, self.clients, alpha=self.alpha, seed=self.seed)

    def privacy(self) -> DPArgs:
        """What the DP settings ask of the trainer, the workflow and the clients' result filters."""
        return dp_from_args(self)

    def faults(self) -> Faults | None:
        f = Faults(dropout=self.dropout, crash=self.crash, straggle=self.straggle, corrupt=self.corrupt,
                   seed=self.fault_seed)
        return f if f.any else None

    def load(self) -> fkdata.Data:
        """The experiment's dataset."""
        return fkdata.load(self.dataset, root=self.data_root, download=self.download)

    def simulator(self, algorithm: str | None = None, out: str | Path | None = None, data: fkdata.Data | None = None,
                  **options: Any) -> Simulator:
        """The `Simulator` for this experiment (``options`` go to it, e.g. ``on_round``).

        Pass ``data`` (from `load`) to build several simulators without loading the dataset again.
        """
        data = data if data is not None else self.load()
        models.for_data(data, self.model)  # fail now, not in the middle of the run, if model and data disagree
        dp = self.privacy()
        train = TrainConfig(epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                            dp=dp.train)
        kind = self.model
        return Simulator(self.workflow(algorithm), model=lambda: models.for_data(data, kind),
                         clients=self.partition_of(data), test=data.test, train=train, seed=self.seed,
                         device=self.device, out=Path(out) if out is not None else None, faults=self.faults(),
                         client_result_filters=dp.client_result_filters, **options)
