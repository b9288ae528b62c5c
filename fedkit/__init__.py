"""fedkit: federated learning in a notebook, with the vocabulary of NVIDIA FLARE.

>>> import fedkit as fk
>>> data = fk.data.load("digits")
>>> parts = fk.data.iid(data.train, clients=4, seed=0)
>>> run = fk.Simulator(fk.FedAvg(rounds=1), model=lambda: fk.models.for_data(data),
...                    clients=parts, test=data.test).run(progress=False)
>>> run.status
'done'
"""

from . import aggregate, data, metrics, models, plots, server_opt, weights
from .privacy import dp, he
from .client import Client
from .compare import compare
from .experiment import DataSpec, Experiment
from .data import ClientData, Dataset, Partition
from .checkpoint import CheckpointError
from .errors import ConfigError, RoundFailed, Unreadable, UpdateError
from .faults import Faults
from .exchange import DXO, Aborted, ClientContext, DataKind, Executor, FilterContext, MetaKey, Signal, Task, Weights
from .history import History, RoundRecord
from .server import Controller, Reply, Server, ServerContext
from .simulator import Run, RunInterrupted, Simulator
from .status import Event, RunStatus, Status
from .train import Evaluator, TrainConfig, TrainHook, Trainer, evaluate
from .global_model import GlobalModel, PlainModel, screen
from .privacy.dp import DPSGD, DPFedAvg, UserDP
from .workflows import SCAFFOLD, Chain, Cyclic, Extension, FedAvg, FedOpt, FedProx, gather

__version__ = "0.1.0"


def __getattr__(name: str):
    """``fk.widgets`` on first use: ipywidgets is imported only by code that asks for the panels."""
    if name in ("widgets", "export"):  # fk.export: NVIDIA FLARE jobs (nvflare itself only when a job is made)
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "aggregate", "data", "dp", "he", "metrics", "models", "plots", "server_opt", "weights",
    "Client", "compare", "DataSpec", "Experiment", "ClientData", "Dataset", "Partition", "CheckpointError", "ConfigError", "RoundFailed", "Unreadable", "UpdateError", "Faults",
    "DXO", "Aborted", "ClientContext", "DataKind", "Executor", "FilterContext", "MetaKey", "Signal", "Task", "Weights",
    "History", "RoundRecord", "Controller", "Reply", "Server", "ServerContext", "Run", "RunInterrupted", "Simulator",
    "Evaluator", "TrainConfig", "Trainer", "evaluate", "FedAvg", "FedOpt", "FedProx", "SCAFFOLD", "DPSGD", "DPFedAvg",
    "UserDP", "GlobalModel", "PlainModel", "screen", "Chain", "Cyclic", "Extension", "gather", "TrainHook",
    "Status", "RunStatus", "Event",
]
