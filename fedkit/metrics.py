"""The names of a run's metrics, in one place, and which one to read when.

A round's ``metrics`` are scored on the server's test set (``accuracy``, ``loss``) unless the server
cannot read its model (HE): then the clients score it (``client_accuracy``, ``client_loss``); use
`scored` rather than guessing. Epsilon comes in two kinds that must not be mixed up: ``epsilon`` is
DP-FedAvg's user-level guarantee, ``client_epsilon`` DP-SGD's example-level one; `epsilons` lists those
a run has. Each client's row (``RoundRecord.clients``) has its own names, below the round's.
Imports nothing from fedkit, so anything in fedkit may import it.

>>> scored({"client_accuracy": 0.9, "client_loss": 0.3})
('client_accuracy', 'client_loss', "clients' validation splits")
"""

from __future__ import annotations

from typing import Any, Container, Iterable, Mapping

# -- round metrics (RoundRecord.metrics)
ACCURACY = "accuracy"  # the global model on the server's test set
LOSS = "loss"  # the global model on the server's test set
# the clients' scores of the global model on their validation splits, weighted by samples: for when the server
# cannot read its model (HE), so cannot score it
CLIENT_ACCURACY = "client_accuracy"
CLIENT_LOSS = "client_loss"
CLIENTS_VALIDATED = "clients_validated"  # how many clients scored the model for CLIENT_ACCURACY
EPSILON = "epsilon"  # user-level, spent so far (DP-FedAvg: the server adds noise); in a DP-SGD client row, its own
CLIENT_EPSILON = "client_epsilon"  # example-level epsilon (DP-SGD): the worst client so far, it only grows
DELTA = "delta"  # the delta of whichever epsilon the run has
NOISE_MULTIPLIER = "noise_multiplier"  # noise std / clip (DP-FedAvg round; DP-SGD client row)
CLIP = "clip"  # DP-FedAvg's clip this round (it moves with adaptive clipping)
BYTES_DOWN = "bytes_down"  # task data sent to clients, as sent (after filters); also per client
BYTES_UP = "bytes_up"  # results sent back, as sent; also per client
CLIENTS_OK = "clients_ok"
CLIENTS_FAILED = "clients_failed"
ATTEMPTS = "attempts"  # tasks sent to reach enough valid results (failed ones are retried)
HE_ENCRYPT_S = "he_encrypt_s"  # seconds, summed over clients
HE_DECRYPT_S = "he_decrypt_s"  # seconds, summed over clients
HE_AGGREGATE_S = "he_aggregate_s"  # the server's screening and aggregation of ciphertexts
HE_SETUP_S = "he_setup_s"  # key generation: the first round only, hence not in HE_COSTS
BYTES_CIPHER_UP = "bytes_cipher_up"
BYTES_CIPHER_DOWN = "bytes_cipher_down"
BYTES_PLAIN_UP = "bytes_plain_up"  # what the same layers take in plaintext: the price of HE is the ratio
BYTES_PLAIN_DOWN = "bytes_plain_down"
HE_COSTS = (HE_ENCRYPT_S, HE_DECRYPT_S, HE_AGGREGATE_S, BYTES_CIPHER_UP, BYTES_CIPHER_DOWN, BYTES_PLAIN_UP,
            BYTES_PLAIN_DOWN)  # every HE round has these

# -- client rows (RoundRecord.clients[name]); DP-SGD rows add EPSILON, EPSILON_NEXT, DELTA, NOISE_MULTIPLIER
TRAIN_LOSS = "train_loss"
TRAIN_ACCURACY = "train_accuracy"
VAL_LOSS = "val_loss"  # the received global model on the client's validation split, before training
VAL_ACCURACY = "val_accuracy"
SAMPLES = "samples"
STEPS = "steps"
EPSILON_NEXT = "epsilon_next"  # what the client's epsilon would be after one more round: budgets stop on it

SERVER, CLIENTS, NOWHERE = "server test set", "clients' validation splits", "none"  # where `scored` found scores

LABELS = {  # for axes and legends: the bare names of the scores on clients and of the two epsilons mislead
    CLIENT_ACCURACY: "accuracy (clients' validation splits)",
    CLIENT_LOSS: "loss (clients' validation splits)",
    EPSILON: "epsilon, user-level (DP-FedAvg)",
    CLIENT_EPSILON: "epsilon, example-level (DP-SGD, worst client)",
}


def label(name: str) -> str:
    """What to call ``name`` on a plot: its `LABELS` entry, else the name itself.

    >>> label(CLIENT_EPSILON), label(ACCURACY)
    ('epsilon, example-level (DP-SGD, worst client)', 'accuracy')
    """
    return LABELS.get(name, name)


def reported(rounds: Iterable[Mapping[str, Any]]) -> set[str]:
    """Every name that any of ``rounds`` (metrics dicts) reported: what a whole run can be asked for.

    >>> sorted(reported([{"loss": 1.0}, {"loss": 0.5, "epsilon": 0.3}]))
    ['epsilon', 'loss']
    """
    return {k for r in rounds for k in r}


def scored(metrics: Container[str]) -> tuple[str, str, str]:
    """(accuracy key, loss key, where) of a round's ``metrics`` (or the names a whole run reported).

    The server's test set wins when it was used; else the clients' scores; else ``(ACCURACY, LOSS, "none")``.

    >>> scored({"accuracy": 0.9, "loss": 0.2, "client_accuracy": 0.8})
    ('accuracy', 'loss', 'server test set')
    >>> scored({})
    ('accuracy', 'loss', 'none')
    """
    if ACCURACY in metrics:
        return ACCURACY, LOSS, SERVER
    if CLIENT_ACCURACY in metrics:
        return CLIENT_ACCURACY, CLIENT_LOSS, CLIENTS
    return ACCURACY, LOSS, NOWHERE


def resolve(metric: str, metrics: Container[str]) -> str:
    """The key that carries ``metric`` in ``metrics``: for ACCURACY or LOSS the one `scored` picks, else ``metric``.

    >>> he_run = {"client_accuracy", "client_loss", "bytes_up"}
    >>> resolve("loss", he_run), resolve("bytes_up", he_run)
    ('client_loss', 'bytes_up')
    """
    acc, loss, _ = scored(metrics)
    return {ACCURACY: acc, LOSS: loss}.get(metric, metric)


def epsilons(keys: Iterable[str]) -> list[str]:
    """Which round epsilons ``keys`` has: EPSILON (user-level) and CLIENT_EPSILON (example-level), in that order.

    >>> epsilons(["client_epsilon", "accuracy", "epsilon"])
    ['epsilon', 'client_epsilon']
    """
    present = set(keys)
    return [k for k in (EPSILON, CLIENT_EPSILON) if k in present]
