"""Every random stream of a run, named once: what a run's numbers are drawn from, given its one seed.

A stream is a number mixed into a seed with the run seed and whatever it depends on (a client's index, a round,
an attempt), so streams never share draws and a run is the same for the same seed. Two places that must agree
(the simulator and an exported FLARE job seed a client alike, or FLARE trains other clients than fedkit) use the
same name here, never a retyped number. A new stream takes a number unused in its group.

>>> client_seed(0, 1) == derive_seed(0, 1, CLIENT)
True
"""

from __future__ import annotations

import numpy as np

# ---- per client: derive_seed(run seed, client index, stream)
CLIENT = 1  # the client's own seed, from which each task's seed derives (`task_seed`)
VAL_SPLIT = 2  # the split of a client's data into training and validation

# ---- per round on the server: ServerContext.rng(round, stream)
SAMPLE_CLIENTS = 1  # clients_per_round drawn without replacement
CYCLIC_ORDER = 3  # Cyclic's order of visits
SAMPLE_POISSON = 4  # Poisson sampling (each client joins with probability q: DP-FedAvg)

# ---- per task on a client: derive_seed(task seed, ..., stream)
DP_SGD_NOISE = 11  # DP-SGD's optimizer noise: derive_seed(task seed, DP_SGD_NOISE)
LOCAL_DP_NOISE = 12  # local DP's noise on an update: derive_seed(task seed, attempt, LOCAL_DP_NOISE)

# ---- on the server, per accounted step: derive_seed(run seed, stream, draws so far)
DP_FEDAVG_NOISE = 11  # DP-FedAvg's noise on the sum of clipped updates
# A known overlap, kept because renumbering would change every DP-FedAvg result: the noise seed with one draw so
# far, derive_seed(run seed, 11, 1), equals client_seed(run seed, 11), the seed of the client at index 11.
DP_FEDAVG_COUNT_NOISE = 13  # and on the count of clipped updates (adaptive clipping)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (run seed, round, client index, ...) and nothing else."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def client_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th client (from 0) of a run seeded with ``seed``."""
    return derive_seed(seed, index, CLIENT)


def task_seed(client: int, round: int) -> int:
    """The seed of a client's task in ``round`` (rounds as sent), from the client's seed (`client_seed`)."""
    return derive_seed(client, round)
