"""CKKS homomorphic encryption of the global model and the clients' updates (TenSEAL): the scheme a workflow holds.

`CKKS` is its parameters (`fedkit.privacy.he_params.CKKSParams`: the scheme's numbers and which layers to
encrypt) and the hooks of `fedkit.global_model.Encryption` that the simulator calls: `CKKS.provision`
(keys for the clients, an encrypted model for the server), `CKKS.check_saved` and `CKKS.decrypt`. The rest
of HE is in `fedkit.privacy.he_layout` (packing layers into ciphertexts), `fedkit.privacy.he_keys` (key
material), `fedkit.privacy.he_filters` (the clients' half) and `fedkit.privacy.he_model` (the server's half).

>>> CKKS().slots
4096
>>> CKKS(layers="fc2.*").layers
('fc2.*',)
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import torch

from ..client import Client
from ..errors import ConfigError
from ..exchange import Weights
from ..global_model import Encryption, GlobalModel
from ..weights import check_update
from . import he_filters
from .he_model import EncryptedModel
from .he_params import CIPHERTEXTS, MAX_COEFF_BITS, META_KEY, STATE_KEY, CKKSParams, tenseal_module

__all__ = ["CIPHERTEXTS", "MAX_COEFF_BITS", "META_KEY", "STATE_KEY", "CKKS", "tenseal_module"]

SAVED = {"public_context", "key_id", "layout", "keys", "global"}  # what a checkpoint keeps of the encrypted model


class CKKS(CKKSParams, Encryption):
    """The federation's CKKS settings, and which layers to encrypt; a workflow holds it as ``he=CKKS()``.

    The defaults are TenSEAL's and NVFlare's: enough precision that an encrypted FedAvg ends within
    1e-6 (relative) of the plaintext one, and one multiplicative level (the server's 1/total weight).

    >>> CKKS(poly_modulus_degree=4096)
    Traceback (most recent call last):
    fedkit.errors.ConfigError: poly_modulus_degree=4096 allows at most 109 bits of coefficient modulus at 128-bit security, but coeff_mod_bit_sizes=(60, 40, 40, 60) sum to 200; use fewer or smaller primes, e.g. (40, 20, 40) with scale_bits=20, or a larger CKKS.poly_modulus_degree
    """

    state_key = STATE_KEY

    def provision(self, clients: Mapping[str, Client], initial: Weights,
                  saved: tuple[Weights, dict[str, Any]] | None = None) -> GlobalModel:
        """FLARE's provisioning: the clients get the secret context (a resumed run finds it in their restored
        state, `fedkit.privacy.he_filters.provision`), the server a model built from the public context only."""
        started = time.perf_counter()
        public, kid = he_filters.provision(self, clients)
        if saved is not None and STATE_KEY in saved[1]:
            weights, state = saved
            model = EncryptedModel.restore(self, state[STATE_KEY], weights)
            check_update(weights, {k: v for k, v in initial.items() if k in model.plain}, "the checkpoint's model")
        else:
            model = EncryptedModel.start(self, initial, public, setup_s=time.perf_counter() - started)
        if model.key_id != kid:
            raise ConfigError(f"the server's global model is encrypted under key {model.key_id!r}, but the clients hold "
                              f"key {kid!r}; they could not decrypt it (was the clients' state lost?)")
        return model

    def check_saved(self, server_state: dict[str, Any]) -> None:
        he = server_state.get(STATE_KEY)
        if not isinstance(he, dict) or not SAVED <= set(he):
            raise ValueError(f"its server state has no encrypted model under {STATE_KEY!r} (public_context, key_id, "
                             "layout, keys, global)")
        if not (isinstance(he["global"], list) and all(isinstance(c, torch.Tensor) for c in he["global"])
                and isinstance(he["keys"], list) and isinstance(he["key_id"], str)):
            raise ValueError("its encrypted model is malformed (global must be a list of tensors, keys a list)")

    def decrypt(self, model: GlobalModel, client_state: dict[str, Any]) -> Weights:
        """How a run's owner gets the final model with HE on: through a client, never from the server."""
        return he_filters.decrypt_global(model.task_data({}), client_state, model.keys)
