"""The clients' half of homomorphic encryption: provisioning of the keys, and the two client filters.

`DecryptGlobal` (a task-data filter) decrypts the encrypted layers of the global model a task carries,
before any executor sees it; `EncryptUpdate` (a result filter) encrypts a WEIGHT_DIFF after any other
filter (e.g. DP clipping and noise). The server weighs the ciphertexts itself: aggregation weights
(sample counts) are public, the updates are not.

Where the secret lives: each client keeps the federation's secret context in its own state, under
``state["he"]`` (as bytes, so that it survives a checkpoint in the client's own file,
``checkpoints/round-N/clients/<client>.pt``; the server's files, ``checkpoints/round-N/server/``, hold
the public context only) and, deserialized, under the cache key ``"_he_keys"``.
TenSEAL cannot derive keys from a seed, so they are created once per run and stored, not re-derived.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

from ..client import Client
from ..errors import ConfigError, UpdateError
from ..exchange import DXO, DataKind, FilterContext, MetaKey, Task, Weights
from .he_params import CIPHERTEXTS, META_KEY, STATE_KEY, CKKSParams
from .he_keys import ClientKeys, digest, key_id, new_keys, to_bytes, to_tensor
from .he_layout import Layout, pack, unpack

DECRYPT_S = "he_decrypt_s"  # seconds the client spent decrypting a task's model: task meta, then result metrics
ENCRYPT_S = "he_encrypt_s"  # seconds the client spent packing and encrypting its update: result metrics


def client_keys(state: dict[str, Any]) -> ClientKeys:
    """The secret context a client keeps in ``state``, deserialized once and cached under ``"_he_keys"``."""
    keys = state.get("_he_keys")
    if keys is None:
        held = state.get(STATE_KEY)
        if held is None:
            raise ConfigError("this client holds no HE key; the federation was not provisioned for encryption")
        keys = state["_he_keys"] = ClientKeys(to_bytes(held["secret_context"]), held["key_id"])
    return keys


def provision(ckks: CKKSParams, clients: Mapping[str, Client]) -> tuple[bytes, str]:
    """Give every client the federation's secret context and the HE filters; return what the server gets:
    the public context bytes and the key id.

    This is FLARE's provisioning step (in a deployment, run offline by the project admin); `CKKS.provision`
    runs it before a run whose workflow asks for HE, and hands the server the public part only. The secret context goes into the clients' state only. A
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
        c.result_filters = [*(f for f in c.result_filters if not isinstance(f, EncryptUpdate)), EncryptUpdate(keys)]
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
    """Client result filter: encrypt the selected layers of a WEIGHT_DIFF.

    Only the WEIGHT_DIFF answers to tasks that carried an encrypted model are encrypted, with the
    task's layout; every answer to such a task reports the client's HE seconds in its metrics. The
    encrypted DXO holds the plaintext layers, the ciphertexts under ``"__ckks__"``, and in
    ``meta["he"]`` the key id, the layout and a digest of the ciphertexts.
    """

    def __init__(self, keys: ClientKeys) -> None:
        self.keys = keys

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
        chunks = self.keys.encrypt(pack(dxo.data, layout, f"client {ctx.client!r}'s update"), layout)
        names = set(layout.names)
        plain = {k: v for k, v in dxo.data.items() if k not in names}
        he = {"key_id": self.keys.key_id, "layout": spec["layout"], "digest": digest(self.keys.key_id, chunks)}
        metrics[ENCRYPT_S] = time.perf_counter() - started
        return DXO(dxo.kind, {**plain, CIPHERTEXTS: chunks}, {**dxo.meta, MetaKey.METRICS: metrics, META_KEY: he})


def decrypt_global(task_data: DXO, client_state: dict[str, Any], keys: list[str]) -> Weights:
    """The global model in plaintext as the client whose state is ``client_state`` reads it from a task's
    data (``fl.model.task_data({})``), in the order of ``keys``.

    This is how a run's owner gets the final model with HE on: through a client, never from the server.
    """
    if task_data.meta.get(META_KEY) is None:
        return dict(task_data.data)
    task = Task("read_model", task_data)
    data = DecryptGlobal(client_keys(client_state))(task_data, FilterContext("client", "task", "owner", task)).data
    return {k: data[k] for k in keys}
