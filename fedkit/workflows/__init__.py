"""Workflows (controllers): how tasks are scheduled over the federation."""

from .scatter_gather import FedAvg, FedOpt

__all__ = ["FedAvg", "FedOpt"]
