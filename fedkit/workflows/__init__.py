"""Workflows (controllers): how tasks are scheduled over the federation."""

from .extensions import Extension, Proximal, Scaffold
from .scatter_gather import SCAFFOLD, FedAvg, FedOpt, FedProx

__all__ = ["FedAvg", "FedOpt", "FedProx", "SCAFFOLD", "Extension", "Proximal", "Scaffold"]
