"""The simplest engine: clients work one after another in the calling thread."""

from __future__ import annotations

from typing import Sequence

import torch

from ..client import Client
from ..exchange import Signal
from ..server import Server


def sequential(clients: Sequence[Client], server: Server, device: torch.device, abort: Signal) -> None:
    for client in clients:
        abort.check()
        client.work(server, device, abort)
