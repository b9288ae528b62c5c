"""The clients' half of homomorphic encryption: provisioning of the keys, and the two client filters.

`DecryptGlobal` (a task-data filter) decrypts the encrypted layers of the global model a task carries,
before any executor sees it; `EncryptUpdate` (a result filter) multiplies a WEIGHT_DIFF by the
client's aggregation weight and encrypts it, after any other filter (e.g. DP clipping and noise).

Where the secret lives: each client keeps the federation's secret context in its own state, under
``state["he"]`` (as bytes, so that it survives a checkpoint in the clients' part, ``clients.pt``; the
server's files hold the public context only) and, deserialized, under the cache key ``"_he_keys"``.
TenSEAL cannot derive keys from a seed, so they are created once per run and stored, not re-derived.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..errors import ConfigError, UpdateError
from ..exchange import DXO, DataKind, FilterContext, MetaKey, Weights
from .he import (CIPHERTEXTS, META_KEY, STATE_KEY, CKKS, ClientKeys, Layout, digest, key_id, new_keys, pack, to_bytes,
                 to_tensor, unpack)

if TYPE_CHECKING:
    from ..client import Client

DECRYPT_S = "he_decrypt_s"  # seconds the client spent decrypting a task's model: task meta, then result metrics
ENCRYPT_S = "he_encrypt_s"  # seconds the client spent weighing, packing and encrypting its update: result metrics


def client_keys(state: dict[str, Any]) -> ClientKeys:
    """The secret context a client keeps in ``state``, deserialized once and cached under ``"_he_keys"``."""
    keys = state.get("_he_keys")
    if keys is None:
        held = state.get(STATE_KEY)
        if held is None:
            raise ConfigError("this client holds no HE key; the federation was not provisioned for encryption")
        keys = state["_he_keys"] = ClientKeys(to_bytes(held["secret_context"]), held["key_id"])
    return keys


def provision(ckks: CKKS, clients: Mapping[str, "Client"], weigh: Callable[[DXO], float]) -> tuple[bytes, str]:
    """Give every client the federation's secret context and the HE filters; return what the server gets:
    the public context bytes and the key id.

    This is FLARE's provisioning step (in a deployment, run offline by the project admin); the simulator
    runs it when an encrypted FedAvg starts. The secret context goes into the clients' state only. A
    resumed run finds the keys in the clients' restored state and keeps them, so that they still
    decrypt the global model the checkpoint holds encrypted.
    """
    held = {name: c.state.get(STATE_KEY) for name, c in clients.items()}
    if all(h is None for h in held.values()):
        secret, public = new_keys(ckks)
        kid = key_id(public)
        for c in clients.values():
            c.state[STATE_KEY] = {"secret_context": to_tensor(secret), "key_id": kid}
            c.state.pop("_he_keys", None)
    else:
        ids = {h["key_id"] if h else None for h in held.values()}
        if len(ids) != 1:
            missing = sorted(n for n, h in held.items() if h is None)
            raise ConfigError(f"the clients hold different HE keys (key ids {sorted(map(str, ids))}"
                              + (f"; none at all: {missing}" if missing else "")
                              + "); all clients of a federation must share one secret context")
        kid = ids.pop()
        public = client_keys(next(iter(clients.values())).state).context.serialize(
            save_secret_key=False, save_relin_keys=False, save_galois_keys=False)
    for c in clients.values():
        keys = client_keys(c.state)
        # decrypt before any other filter reads the model; encrypt after every other filter (DP noise...) has run
        c.task_data_filters = [DecryptGlobal(keys), *(f for f in c.task_data_filters if not isinstance(f, DecryptGlobal))]
        c.result_filters = [*(f for f in c.result_filters if not isinstance(f, EncryptUpdate)), EncryptUpdate(keys, weigh)]
    return public, kid


class DecryptGlobal:
    """Client task-data filter: decrypt the encrypted layers of the global model that a task carries.

    Tasks without HE meta pass unchanged. The task's meta keeps the layout (for `EncryptUpdate`) and
    gains ``he_decrypt_s``. The last model decrypted is kept, by the digest of its ciphertexts: the
    model a client validates at the end of a round is the one it trains next round, decrypted once.
    """

    def __init__(self, keys: ClientKeys) -> None:
        self.keys = keys
        self._last: tuple[str, Weights] = ("", {})

    def __call__(self, dxo: DXO, ctx: FilterContext) -> DXO:
        spec = dxo.meta.get(META_KEY)
        if spec is None:
            return dxo
        started = time.perf_counter()
        layout = Layout.from_meta(spec["layout"])
        chunks = dxo.data.get(CIPHERTEXTS)
        source = f"the {ctx.task.name!r} task of round {ctx.task.round} sent to {ctx.client!r}"
        if spec.get("key_id") != self.keys.key_id:
            raise UpdateError(f"{source} carries a model encrypted under key {spec.get('key_id')!r}, but this client "
                              f"holds key {self.keys.key_id!r}; it cannot decrypt it")
        seal = digest(self.keys.key_id, chunks) if isinstance(chunks, list) else ""
        if not seal or seal != spec.get("digest"):
            raise UpdateError(f"{source} carries ciphertexts that were altered after encryption (their digest does "
                              "not match); it will not be decrypted")
        if self._last[0] != seal:
            self._last = (seal, unpack(self.keys.decrypt(chunks, layout), layout))
        data = {k: v for k, v in dxo.data.items() if k != CIPHERTEXTS}
        data.update({k: v.clone() for k, v in self._last[1].items()})
        return dxo.with_data(data, **{DECRYPT_S: time.perf_counter() - started})


class EncryptUpdate:
    """Client result filter: weigh the update by the client's aggregation weight and encrypt its selected layers.

    Only the WEIGHT_DIFF answers to tasks that carried an encrypted model are encrypted, with the
    task's layout; every answer to such a task reports the client's HE seconds in its metrics. The
    encrypted DXO holds the plaintext layers, the ciphertexts under ``"__ckks__"``, and in
    ``meta["he"]`` the key id, the layout, the weight used and a digest of the ciphertexts.
    """

    def __init__(self, keys: ClientKeys, weigh: Callable[[DXO], float]) -> None:
        self.keys = keys
        self.weigh = weigh

    def __call__(self, dxo: DXO, ctx: FilterContext) -> DXO:
        spec = ctx.task.data.meta.get(META_KEY)
        if spec is None:
            return dxo
        metrics = dict(dxo.meta.get(MetaKey.METRICS, {}))
        if DECRYPT_S in ctx.task.data.meta:
            metrics[DECRYPT_S] = ctx.task.data.meta[DECRYPT_S]
        if dxo.kind != DataKind.WEIGHT_DIFF:
            return dxo.with_data(dxo.data, **{MetaKey.METRICS: metrics})
        started = time.perf_counter()
        layout = Layout.from_meta(spec["layout"])
        weight = float(self.weigh(dxo))
        chunks = self.keys.encrypt(pack(dxo.data, layout, f"client {ctx.client!r}'s update") * weight, layout)
        names = set(layout.names)
        plain = {k: v for k, v in dxo.data.items() if k not in names}
        he = {"key_id": self.keys.key_id, "layout": spec["layout"], "weight": weight,
              "digest": digest(self.keys.key_id, chunks)}
        metrics[ENCRYPT_S] = time.perf_counter() - started
        return DXO(dxo.kind, {**plain, CIPHERTEXTS: chunks}, {**dxo.meta, MetaKey.METRICS: metrics, META_KEY: he})


def global_plaintext(weights: Weights, server_state: dict[str, Any], client_state: dict[str, Any]) -> Weights:
    """The global model in plaintext, as a client sees it: ``weights`` (the server's) with the layers the
    server holds only as ciphertexts decrypted by the client whose state is ``client_state``.

    This is how a run's owner gets the final model with HE on: from a client, never from the server.
    Without HE, ``weights`` as they are.
    """
    held = server_state.get(STATE_KEY)
    if held is None:
        return weights
    layout = Layout.from_meta(held["layout"])
    decrypted = unpack(client_keys(client_state).decrypt([to_bytes(c) for c in held["global"]], layout), layout)
    merged = {**weights, **decrypted}
    return {k: merged[k] for k in held["keys"]}


def server_layers(weights: Weights, server_state: dict[str, Any]) -> Weights:
    """The layers of ``weights`` the server holds in plaintext: with HE, all but the encrypted ones."""
    held = server_state.get(STATE_KEY)
    if held is None:
        return weights
    encrypted = set(held["layout"]["names"])
    return {k: v for k, v in weights.items() if k not in encrypted}
