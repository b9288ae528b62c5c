"""A client: a named site with its data, executors by task name, filters, and state that survives rounds."""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .data import ClientData
from .exchange import (DXO, Aborted, ClientContext, ExecutorLike, Filter, FilterContext, Signal, Task,
                       apply_filters, run_executor)

if TYPE_CHECKING:
    from .server import Server


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (run seed, round, client index, ...) and nothing else."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclass(eq=False)
class Client:
    """One site of the federation. It pulls tasks from the server and answers each with a DXO.

    ``executors`` maps task names (``"train"``, ``"validate"``, ...) to executors; ``state`` is the
    client's private memory across rounds (its model instance, optimizer or DP accountant, SCAFFOLD
    control variates, HE secret key...). Nothing in ``state`` is ever sent unless an executor puts
    it in a result.
    """

    name: str
    data: ClientData
    executors: dict[str, ExecutorLike]
    task_data_filters: list[Filter] = field(default_factory=list)
    result_filters: list[Filter] = field(default_factory=list)
    seed: int = 0
    state: dict[str, Any] = field(default_factory=dict)

    def fresh(self, seed: int) -> "Client":
        """A copy with empty state, for a new run."""
        return replace(self, seed=seed, state={})

    def handle(self, task: Task, device: torch.device, abort: Signal) -> DXO:
        """Filter the task's data, run the executor for ``task.name``, filter the result."""
        executor = self.executors.get(task.name)
        if executor is None:
            raise LookupError(f"client {self.name!r} has no executor for task {task.name!r}; "
                              f"it has: {', '.join(self.executors) or 'none'}")
        task = replace(task, data=apply_filters(self.task_data_filters, task.data,
                                                FilterContext("client", "task", self.name, task)))
        # a preprocessing executor (e.g. Standardize) may replace the data for later tasks via state["data"]
        data = self.state.get("data", self.data)
        ctx = ClientContext(self.name, data, self.state, device, derive_seed(self.seed, task.round))
        result = run_executor(executor, task, ctx, abort)
        return apply_filters(self.result_filters, result, FilterContext("client", "result", self.name, task))

    def work(self, server: "Server", device: torch.device, abort: Signal) -> None:
        """Pull tasks until the server has none for this client; answer each, or report its failure."""
        while (task := server.pull(self.name)) is not None:
            try:
                result = self.handle(task, device, abort)
            except Aborted:
                raise
            except Exception as e:  # a failing client must not take the server down: report it
                server.fail(self.name, task, f"{type(e).__name__}: {e}", traceback.format_exc())
                continue
            server.submit(self.name, task, result)
