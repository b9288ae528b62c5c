"""One experiment as a few typed settings objects: what `fedkit run`, `fedkit compare` and the widget panel build.

An `Experiment` holds the data (`DataSpec`), the workflow (a real `fk.FedAvg`, `FedProx`, `FedOpt`,
`SCAFFOLD`, `Cyclic`, `DPFedAvg`... object, with its own DP and HE settings inside), the local training
(`TrainConfig`), the model kind, the injected faults, the seed and the device. Nothing here reads
strings or flags: the command line maps its flags to these objects (`fedkit.cli.experiment_from_args`),
the panel maps its controls (`fedkit.widgets.experiment_from_controls`), and a notebook writes them.

>>> import fedkit as fk
>>> exp = Experiment.preset("smoke", workflow=fk.FedProx(rounds=3, mu=0.1))
>>> exp.data
DataSpec(dataset='digits', data_root='data', download=False, clients=3, partition='iid', alpha=0.5, shards_per_client=2, min_size=None)
>>> exp.workflow.rounds, exp.workflow.extensions
(3, (Proximal(mu=0.1),))
>>> exp.simulator().run(progress=False).status
'done'
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import data as fkdata, models
from .data import check_seed
from .engine.choose import NAMES as ENGINES
from .errors import ConfigError
from .faults import Faults
from .server import Controller
from .simulator import Simulator, check_threads
from .train import TrainConfig
from .workflows import FedAvg

Partitioner = Callable[["DataSpec", fkdata.Dataset, int], fkdata.Partition]

# partition name -> how the training set is dealt to the clients, seeded by the experiment's seed
PARTITIONERS: dict[str, Partitioner] = {
    "iid": lambda s, train, seed: fkdata.iid(train, s.clients, seed=seed),
    "dirichlet": lambda s, train, seed: fkdata.dirichlet(train, s.clients, alpha=s.alpha, seed=seed, min_size=s.min_size),
    "shards": lambda s, train, seed: fkdata.shards(train, s.clients, s.shards_per_client, seed=seed),
    "quantity": lambda s, train, seed: fkdata.quantity_skew(train, s.clients, alpha=s.alpha, seed=seed,
                                                            min_size=s.min_size),
}
PARTITIONS = tuple(PARTITIONERS)
MODELS = ("auto", "mlp", "cnn", "simple")  # the kinds fedkit.models.for_data builds


def _whole(owner: str, name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{{{name}}} must be an integer >= {low}", obj=owner, field=name, value=value)


def _choice(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{{{name}}} {{value}} is not known; choose one of: {', '.join(allowed)}", obj=owner, field=name,
                          value=value)


@dataclass(frozen=True)
class DataSpec:
    """Which dataset, and how it is split over the clients (the partition is seeded by the experiment)."""

    dataset: str = "digits"  # offline and small (1437 training images): every default run works without a download
    data_root: str = "data"  # where mnist / cifar10 live (or are downloaded to)
    download: bool = False  # never fetch from the network unless asked: CI and classrooms are often offline
    clients: int = 8  # enough for non-IID splits to differ visibly, few enough to train in seconds on a CPU
    partition: str = "iid"  # iid, dirichlet, shards, quantity: IID first, so a baseline is one call away
    alpha: float = 0.5  # dirichlet / quantity: small = skewed; 0.5 is the usual "moderately non-IID" of the literature
    shards_per_client: int = 2  # shards: McMahan et al. 2017's pathological split, two classes per client
    min_size: int | None = None  # dirichlet / quantity: samples every client gets at least; None: min(10, N / clients)

    def __post_init__(self) -> None:
        _choice("DataSpec", "dataset", self.dataset, fkdata.DATASETS)
        _choice("DataSpec", "partition", self.partition, PARTITIONS)
        _whole("DataSpec", "clients", self.clients, 1)
        _whole("DataSpec", "shards_per_client", self.shards_per_client, 1)
        if self.min_size is not None:
            _whole("DataSpec", "min_size", self.min_size, 1)
            if self.partition not in ("dirichlet", "quantity"):
                raise ConfigError(f"{{min_size}} only means something with {{partition}} 'dirichlet' or 'quantity', "
                                  f"not {self.partition!r}", obj=self, field="min_size", hint="drop it")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not (a > 0 and math.isfinite(a)):
            raise ConfigError("{alpha} must be a finite number > 0", obj=self, field="alpha", value=a)
        if not isinstance(self.download, bool):
            raise ConfigError("{download} must be True or False", obj=self, field="download", value=self.download)

    def load(self) -> fkdata.Data:
        """The dataset (downloaded first only with ``download=True``)."""
        return fkdata.load(self.dataset, root=self.data_root, download=self.download)

    def partition_of(self, data: fkdata.Data, seed: int = 0) -> fkdata.Partition:
        """``data``'s training set dealt to the clients as ``partition`` says, drawn from ``seed``."""
        return PARTITIONERS[self.partition](self, data.train, seed)


SAME_RUN_OPTIONS = frozenset({"engine", "on_round", "overwrite", "checkpoint_every"})
"""`Experiment.simulator` options that leave the run the experiment describes as it is (how it runs, what it reports)."""


@dataclass(frozen=True)
class Experiment:
    """A federated experiment: data, workflow, local training, model, faults, seed and device.

    The defaults are `fedkit run`'s; `Experiment.preset` gives named ones. Change one part with
    ``dataclasses.replace(exp, workflow=fk.FedProx(rounds=20, mu=0.1))`` or ``Experiment.preset(name, ...)``.
    """

    data: DataSpec = DataSpec()
    workflow: Controller = FedAvg(rounds=10)  # the baseline every other algorithm is measured against
    train: TrainConfig = TrainConfig()  # one local epoch, lr 0.05: digits learns in a handful of rounds
    model: str = "auto"  # auto picks an MLP for digits, a CNN for images, SimpleNetwork for 3x32x32
    faults: Faults | None = None  # None: every client answers every round
    seed: int = 0  # seeds the split, the initial model, client sampling and training: same seed, same model
    device: str = "auto"  # the GPU when there is one
    # torch CPU threads: "auto" is one thread for a model under 1M parameters on the CPU (as fast for the small models
    # here, and faster on a busy machine; see fedkit.simulator.AUTO_ONE_THREAD_BELOW), torch's default otherwise
    threads: str | int = "auto"
    # how the clients' work runs: sequential, vectorized, auto (vectorized where it applies) or ray (fedkit[ray])
    engine: str = "sequential"

    def __post_init__(self) -> None:
        for name, kind, example in (("data", DataSpec, "DataSpec(...)"), ("workflow", Controller, "fk.FedAvg(...)"),
                                    ("train", TrainConfig, "fk.TrainConfig(...)")):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{{{name}}} must be a {example}", obj=self, field=name, value=getattr(self, name))
        _choice("Experiment", "model", self.model, MODELS)
        check_seed(self.seed, "Experiment.seed")
        check_threads(self.threads, "Experiment.threads")
        _choice("Experiment", "engine", self.engine, ENGINES)
        if self.faults is not None and not isinstance(self.faults, Faults):
            raise ConfigError("{faults} must be a fk.Faults(...) or None", obj=self, field="faults", value=self.faults)
        if self.faults is not None and self.faults.straggle > 0 and getattr(self.workflow, "task_timeout", None) is None:
            # a straggler answers after the deadline; without one it is just a slow client, and nothing is tested
            raise ConfigError("{straggle} > 0 needs a deadline: add {FedAvg.task_timeout=SECONDS} (a straggler is a "
                              "client that answers after the deadline)", obj=self.faults, field="straggle",
                              hint="give the workflow a deadline, e.g. {FedAvg.task_timeout=60}")

    @classmethod
    def preset(cls, name: str, **changes: Any) -> "Experiment":
        """The named experiment of `PRESETS`, with ``changes`` to its parts (``workflow=``, ``data=``, ...)."""
        if name not in PRESETS:
            raise ConfigError(f"no preset {name!r}; the presets are: {', '.join(PRESETS)}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise ConfigError(f"an Experiment has no {', '.join(unknown)}; it has: {', '.join(fields)}")
        return dataclasses.replace(PRESETS[name], **changes)

    def load(self) -> fkdata.Data:
        """The experiment's dataset."""
        return self.data.load()

    def simulator(self, out: str | Path | None = None, data: fkdata.Data | None = None, **options: Any) -> Simulator:
        """The `Simulator` for this experiment (``options`` go to it, e.g. ``on_round``).

        Pass ``data`` (from `load`) to build several simulators without loading the dataset again.
        """
        data = data if data is not None else self.load()
        models.for_data(data, self.model)  # fail now, not in the middle of the run, if model and data disagree
        kind = self.model
        sim = Simulator(self.workflow, model=lambda: models.for_data(data, kind),
                         clients=self.data.partition_of(data, self.seed), test=data.test, train=self.train,
                         seed=self.seed, device=self.device, out=Path(out) if out is not None else None,
                         faults=self.faults, threads=self.threads,
                         **{"engine": self.engine, **options})
        # what built it, for fk.export.nvflare(sim); not when an option changes what is trained (executors, filters,
        # val_fraction...): the experiment alone would then describe another run
        sim.experiment = self if set(options) <= SAME_RUN_OPTIONS else None
        return sim


PRESETS: dict[str, Experiment] = {
    # the README's main job (`fedkit run --partition dirichlet --alpha 0.5 --rounds 20`): label skew that
    # plain FedAvg still handles, about 0.9 accuracy on digits in a few seconds
    "quickstart": Experiment(data=DataSpec(clients=8, partition="dirichlet", alpha=0.5), workflow=FedAvg(rounds=20)),
    # the smallest run that still goes through every part (CI, the notebooks' SMOKE mode): seconds on a CPU
    "smoke": Experiment(data=DataSpec(clients=3), workflow=FedAvg(rounds=2)),
    # McMahan et al. 2017's pathological split, two digits per client: where FedProx and SCAFFOLD earn their keep
    "pathological": Experiment(data=DataSpec(clients=10, partition="shards", shards_per_client=2),
                               workflow=FedAvg(rounds=20)),
}
