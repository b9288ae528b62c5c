"""Workflows (controllers): how tasks are scheduled over the federation."""

from .chain import Chain
from .cross_site_eval import CrossSiteEval, cross_site_dataframe
from .cyclic import Cyclic
from .extensions import Extension, Proximal, Scaffold
from .gather import gather
from .scatter_gather import SCAFFOLD, FedAvg, FedOpt, FedProx
from .statistics import FederatedScaling, FedStats, statistics_arrays

__all__ = ["FedAvg", "FedOpt", "FedProx", "SCAFFOLD", "Extension", "Proximal", "Scaffold", "gather", "Cyclic", "CrossSiteEval",
           "cross_site_dataframe", "Chain", "FedStats", "FederatedScaling", "statistics_arrays"]
