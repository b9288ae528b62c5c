"""Homomorphic encryption of model updates with CKKS (TenSEAL): the server sums numbers it cannot read.

Turn it on in one line, ``FedAvg(rounds=20, he=CKKS())`` (FedProx and ``Cyclic(he=CKKS())`` too). Each
client encrypts its update; the server scales each ciphertext by the client's share of the total
aggregation weight (public numbers: sample counts), adds them to the global model, which it holds
encrypted as well, and relays it; clients decrypt the global model they receive, and score it for
the server, which cannot. The simulator provisions the keys before the run, as FLARE's provisioning
does: the secret context goes to the clients only.

CKKS (Cheon, Kim, Kim, Song 2017, "Homomorphic Encryption for Arithmetic of Approximate Numbers")
computes on real numbers approximately. Each layer is packed into ciphertexts of its own (`Layout`), so
its error is relative to its own values: after a round every number of a layer is off by at most about
2e-7 of the layer's largest value, plus about 1e-8 absolute at the default scale 2^40 (2^k times more
at ``scale_bits=40-k``); an encrypted FedAvg ends about 1e-7 (relative) from the plaintext one. SEAL draws its
encryption noise from the operating system (TenSEAL cannot seed it), so an HE run repeats to that
precision, not bit for bit; everything fedkit draws is seeded as usual. Use HE when the server must
not see any single client's update; it costs time and 20-30x the bytes (see ``benchmarks/he.py``), and
it rules out whatever needs plaintext on the server (FedOpt, median, Krum, norm screening of the
encrypted layers).

Keys, as in a FLARE deployment: the clients share one secret context; the server gets the public
context only, as bytes (``serialize(save_secret_key=False)``), and wraps them in `PublicContext`, which
refuses a context that holds a secret key. Nothing on the server side can decrypt.

This module gathers the names a notebook uses: the settings (`CKKS`, in `fedkit.privacy.ckks`), the
packing of layers into ciphertexts (`Layout`, `fedkit.privacy.he_layout`) and the key material
(`new_keys`, `ClientKeys`, `PublicContext`, `fedkit.privacy.he_keys`). The clients' filters are in
`fedkit.privacy.he_filters`, the server's encrypted model in `fedkit.privacy.he_model`.

>>> CKKS().slots
4096
>>> CKKS(layers="fc2.*").layers
('fc2.*',)
"""

from __future__ import annotations

from .ckks import CIPHERTEXTS, MAX_COEFF_BITS, META_KEY, STATE_KEY, CKKS
from .he_keys import ClientKeys, PublicContext, digest, key_id, new_keys, to_bytes, to_tensor
from .he_layout import Layout, layout_for, pack, unpack

__all__ = ["CIPHERTEXTS", "MAX_COEFF_BITS", "META_KEY", "STATE_KEY", "CKKS", "ClientKeys", "PublicContext", "digest",
           "key_id", "new_keys", "to_bytes", "to_tensor", "Layout", "layout_for", "pack", "unpack"]
