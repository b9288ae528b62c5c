"""Workflows (controllers): how tasks are scheduled over the federation."""

from .extensions import Extension, Proximal, Scaffold
from .scatter_gather import SCAFFOLD, FedAvg, FedProx

__all__ = ["FedAvg", "FedProx", "SCAFFOLD", "Extension", "Proximal", "Scaffold"]
