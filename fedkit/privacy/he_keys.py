"""The federation's CKKS key material: the clients' secret context and the server's public one.

As in a FLARE deployment, the clients share one secret context; the server gets the public context
only, as bytes, and wraps them in `PublicContext`, which refuses a context that holds a secret key, so
nothing on the server side can decrypt. `ClientKeys` is a client's copy of the secret context.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, UpdateError
from .he_params import CKKSParams, tenseal_module
from .he_layout import Layout

def new_keys(ckks: CKKSParams) -> tuple[bytes, bytes]:
    """A fresh key pair for a federation: (secret context bytes for the clients, public context bytes for the server).

    Neither holds relinearization or Galois keys: HE FedAvg never multiplies two ciphertexts nor rotates
    one, and leaving them out makes the public context 4x smaller.
    """
    ts = tenseal_module()
    try:
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, ckks.poly_modulus_degree, coeff_mod_bit_sizes=list(ckks.coeff_mod_bit_sizes))
    except ValueError as e:
        raise ConfigError(f"TenSEAL refused {ckks}: {e}") from None
    ctx.global_scale = 2.0 ** ckks.scale_bits
    secret = ctx.serialize(save_secret_key=True, save_relin_keys=False, save_galois_keys=False)
    public = ctx.serialize(save_secret_key=False, save_relin_keys=False, save_galois_keys=False)
    return secret, public


def key_id(public: bytes) -> str:
    """A short name for a federation's keys: the start of the SHA-256 of its public context."""
    return hashlib.sha256(public).hexdigest()[:16]


def digest(kid: str, chunks: Sequence[bytes]) -> str:
    """The SHA-256 of a key id and ciphertexts: shows whether the bytes changed after encryption."""
    h = hashlib.sha256(kid.encode())
    for c in chunks:
        h.update(len(c).to_bytes(8, "little"))
        h.update(c)
    return h.hexdigest()


class ClientKeys:
    """A client's copy of the federation's secret context: it encrypts updates and decrypts the global model."""

    def __init__(self, secret: bytes, kid: str) -> None:
        self.context = tenseal_module().context_from(bytes(secret))
        if not self.context.is_private():
            raise ConfigError("the client key material holds no secret key; it cannot decrypt the global model")
        self.key_id = kid

    def encrypt(self, flat: np.ndarray, layout: Layout) -> list[bytes]:
        return [v.serialize() for v in _encrypt(self.context, flat, layout)]

    def decrypt(self, chunks: Sequence[bytes], layout: Layout) -> np.ndarray:
        ts = tenseal_module()
        return np.concatenate([np.asarray(ts.ckks_vector_from(self.context, bytes(c)).decrypt(), dtype=np.float64)
                               for c in chunks])[:layout.size]


class PublicContext:
    """The server's view of the federation's keys: it encrypts, adds and scales ciphertexts, and cannot decrypt.

    Built only from serialized bytes, and refuses bytes that hold a secret key: no code on the server
    side can come to hold one, by mistake or otherwise. Vectors it loads have no secret key either, so
    their ``decrypt()`` raises.
    """

    def __init__(self, public: bytes) -> None:
        ctx = tenseal_module().context_from(bytes(public))
        if ctx.is_private() or ctx.has_secret_key():
            raise ConfigError("the server was handed a context that holds a secret key; it must get the public "
                              "context only (serialize(save_secret_key=False)), so that it can never decrypt")
        self._context = ctx
        self.key_id = key_id(bytes(public))

    def is_private(self) -> bool:
        return self._context.is_private()

    @property
    def scale(self) -> float:
        """The scale a fresh ciphertext is encoded at (2 ** scale_bits)."""
        return self._context.global_scale

    def encrypt(self, flat: np.ndarray, layout: Layout) -> list:
        """Encrypt with the public key (the server does so once, for the initial model, which is public)."""
        return _encrypt(self._context, flat, layout)

    def load(self, data: bytes, source: str) -> Any:
        """Deserialize one ciphertext under the federation's public context; `UpdateError` if it does not fit."""
        try:
            return tenseal_module().ckks_vector_from(self._context, bytes(data))
        except Exception as e:  # TenSEAL raises several types for bytes that are not a ciphertext of these parameters
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UpdateError(f"{source} does not deserialize under the federation's public context ({first}); it "
                              "was damaged, or built under other CKKS parameters") from None


def _encrypt(context: Any, flat: np.ndarray, layout: Layout) -> list:
    ts = tenseal_module()
    edges = np.cumsum([0, *layout.chunk_sizes])
    return [ts.ckks_vector(context, flat[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def to_tensor(data: bytes) -> torch.Tensor:
    """Bytes as a uint8 tensor: how ciphertexts and contexts live in checkpointed state."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def to_bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()
