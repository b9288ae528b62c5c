"""fedkit's models as FLARE's server builds them: the same classes, initialised under the experiment's seed.

FLARE's job config names a model by class path and constructor arguments, and the server builds it
more than once (the persistor's model; FedOpt's server optimizer keeps a model of its own, which
never reads the initial checkpoint). Built under the seed, each is fedkit's initial global model, so
every FLARE component starts where ``fedkit run`` starts. The state_dict keys are the plain model's.
"""

from __future__ import annotations

import contextlib

import torch

from .. import models


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class SeededMLP(models.MLP):
    def __init__(self, in_features: int, num_classes: int, hidden: int = 64, seed: int = 0) -> None:
        with _seeded(seed):
            super().__init__(in_features, num_classes, hidden)
        self.seed = seed


class SeededSmallCNN(models.SmallCNN):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, side: int | tuple[int, int] | list[int] = 8,
                 width: int = 16, seed: int = 0) -> None:
        with _seeded(seed):
            super().__init__(in_channels, num_classes, side if isinstance(side, int) else tuple(side), width)
        self.seed = seed


class SeededSimpleNetwork(models.SimpleNetwork):
    def __init__(self, num_classes: int = 10, seed: int = 0) -> None:
        with _seeded(seed):
            super().__init__(num_classes)
        self.seed = seed


SEEDED = {models.MLP: SeededMLP, models.SmallCNN: SeededSmallCNN, models.SimpleNetwork: SeededSimpleNetwork}
