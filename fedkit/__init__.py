"""fedkit: federated learning in a notebook, with the vocabulary of NVIDIA FLARE.

>>> import fedkit as fk
>>> data = fk.data.load("digits")
>>> parts = fk.data.iid(data.train, clients=4, seed=0)
>>> run = fk.Simulator(fk.FedAvg(rounds=1), model=lambda: fk.models.for_data(data),
...                    clients=parts, test=data.test).run(progress=False)
>>> run.status
'done'
"""

from . import aggregate, data, models, plots, server_opt, weights
from .privacy import dp, he
from .client import Client
from .compare import compare
from .experiment import Experiment
from .data import ClientData, Dataset, Partition
from .checkpoint import CheckpointError
from .errors import ConfigError, RoundFailed, UpdateError
from .faults import Faults
from .exchange import DXO, Aborted, ClientContext, DataKind, Executor, FilterContext, MetaKey, Signal, Task, Weights
from .history import History, RoundRecord
from .server import Controller, Reply, Server, ServerContext
from .simulator import Run, Simulator
from .train import Evaluator, TrainConfig, Trainer, evaluate
from .privacy.dp import DPSGD, DPFedAvg
from .workflows import SCAFFOLD, FedAvg, FedOpt, FedProx

__version__ = "0.1.0"

__all__ = [
    "aggregate", "data", "dp", "he", "models", "plots", "server_opt", "weights",
    "Client", "compare", "Experiment", "ClientData", "Dataset", "Partition", "CheckpointError", "ConfigError", "RoundFailed", "UpdateError", "Faults",
    "DXO", "Aborted", "ClientContext", "DataKind", "Executor", "FilterContext", "MetaKey", "Signal", "Task", "Weights",
    "History", "RoundRecord", "Controller", "Reply", "Server", "ServerContext", "Run", "Simulator",
    "Evaluator", "TrainConfig", "Trainer", "evaluate", "FedAvg", "FedOpt", "FedProx", "SCAFFOLD", "DPSGD", "DPFedAvg",
]
