"""Client-side preprocessing: executors that change a client's data for the tasks that follow.

A preprocessing executor records its parameters in the client's state (``state["standardize"]``:
plain tensors, so they are checkpointed); `current_data` applies them to the raw data once and
caches the result, and the client hands that to every later task (``ctx.data``). The raw data is
untouched: a new run starts from it again, and a resumed run rebuilds the scaled data from the
checkpointed parameters. The workflow that drives this is `fedkit.workflows.FederatedScaling`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .data import ClientData, Dataset
from .exchange import DXO, ClientContext, DataKind, MetaKey, Signal, Task

CACHES = ("_data", "_train_on_device", "_val_on_device", "_stats_features")  # rebuilt from the new data


def standardize(data: Dataset, mean: Any, std: Any) -> Dataset:
    """``(x - mean) / std`` per flattened feature, in float32, with ``x``'s shape kept.

    Use it on a held-out test set with the global statistics a `FederatedScaling` run recorded:
    ``standardize(test, **fk.workflows.statistics_arrays(run, "scaling"))``.
    """
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    std = np.asarray(std, dtype=np.float64).reshape(-1)
    features = int(np.prod(data.x.shape[1:]))
    if mean.shape != (features,) or std.shape != (features,):
        raise ValueError(f"dataset {data.name!r} has {features} features per sample but the scaling has "
                         f"mean of {mean.size} and std of {std.size} values; they must match")
    if not (np.isfinite(std).all() and (std > 0).all()):
        raise ValueError("every std must be a finite number > 0 (use 1 for a constant feature)")
    flat = data.x.detach().cpu().reshape(len(data), features).to(torch.float64)
    x = (flat - torch.from_numpy(mean)) / torch.from_numpy(std)
    return Dataset(x.to(torch.float32).reshape(data.x.shape), data.y, data.num_classes, data.name)


class Standardize:
    """Executor for the ``standardize`` task: scales the client's train and validation splits.

    The task carries the global per-feature ``mean`` and ``std`` (DXO STATISTICS); the answer is an
    acknowledgement with the number of training samples.
    """

    def execute(self, task: Task, ctx: ClientContext, abort: Signal) -> DXO:
        mean, std = task.data.data.get("mean"), task.data.data.get("std")
        if mean is None or std is None:
            got = ", ".join(task.data.data) or "nothing"
            raise ValueError(f"the standardize task needs 'mean' and 'std', got: {got}")
        ctx.state["standardize"] = {"mean": torch.as_tensor(np.asarray(mean, dtype=np.float64)),
                                    "std": torch.as_tensor(np.asarray(std, dtype=np.float64))}
        for key in CACHES:
            ctx.state.pop(key, None)
        return DXO(DataKind.COLLECTION, {}, {MetaKey.NUM_SAMPLES: len(ctx.data.train)})


def current_data(raw: ClientData, state: dict[str, Any]) -> ClientData:
    """A client's data after the preprocessing recorded in its ``state`` (built once, cached as ``_data``)."""
    scaling = state.get("standardize")
    if scaling is None:
        return raw
    if "_data" not in state:
        mean, std = scaling["mean"].numpy(), scaling["std"].numpy()
        state["_data"] = ClientData(standardize(raw.train, mean, std), standardize(raw.val, mean, std))
    return state["_data"]
