"""Homomorphic encryption of model updates with CKKS (TenSEAL): the server sums numbers it cannot read.

Turn it on in one line, ``FedAvg(rounds=20, he=CKKS())`` (FedProx too). Each client multiplies its
update by its aggregation weight and encrypts it; the server adds the ciphertexts, scales the sum by
1/total weight (a public number) and adds it to the global model, which it holds encrypted as well;
clients decrypt the global model they receive, and score it for the server, which cannot.

CKKS (Cheon, Kim, Kim, Song 2017, "Homomorphic Encryption for Arithmetic of Approximate Numbers")
computes on real numbers approximately: with the default scale of 2^40 a decrypted number is off by
about 1e-8, and an encrypted FedAvg ends about 1e-7 (relative) from the plaintext one. SEAL draws its
encryption noise from the operating system (TenSEAL cannot seed it), so an HE run repeats to that
precision, not bit for bit; everything fedkit draws is seeded as usual. Use HE when the server must
not see any single client's update; it costs time and 15-20x the bytes (see ``benchmarks/he.py``), and
it rules out whatever needs plaintext on the server (FedOpt, median, Krum, norm screening of the
encrypted layers).

Keys, as in a FLARE deployment: the clients share one secret context; the server gets the public
context only, as bytes (``serialize(save_secret_key=False)``), and wraps them in `PublicContext`, which
refuses a context that holds a secret key. Nothing on the server side can decrypt.

This module holds the settings (`CKKS`), the packing of layers into ciphertexts (`Layout`), the key
material (`new_keys`, `ClientKeys`, `PublicContext`) and the command-line options; the client filters
are in `fedkit.privacy.he_filters`, the server's loop in `fedkit.privacy.he_fedavg`.

>>> CKKS().slots
4096
>>> CKKS(layers="fc2.*").layers
('fc2.*',)
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, UpdateError
from ..exchange import Weights

STATE_KEY = "he"  # under this key: the server's encrypted global model, and each client's secret context
CIPHERTEXTS = "__ckks__"  # the DXO data entry that holds the ciphertexts (bytes) of the packed layers
META_KEY = "he"  # the DXO meta entry that describes them: key id, layout, digest (and the client's weight)

# The most coefficient-modulus bits SEAL allows per ring dimension for 128-bit security
# (HomomorphicEncryption.org standard); more bits would be faster to break.
MAX_COEFF_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


def _tenseal():
    try:
        import tenseal
    except ImportError:
        raise ConfigError("homomorphic encryption needs TenSEAL, which is not installed; "
                          "pip install 'fedkit[privacy]' (or: pip install tenseal)") from None
    return tenseal


@dataclass(frozen=True)
class CKKS:
    """The federation's CKKS settings, and which layers to encrypt.

    The defaults are TenSEAL's and NVFlare's: enough precision that an encrypted FedAvg ends within
    1e-6 (relative) of the plaintext one, and one multiplicative level (the server's 1/total weight).

    >>> CKKS(poly_modulus_degree=4096)
    Traceback (most recent call last):
    fedkit.errors.ConfigError: CKKS: poly_modulus_degree 4096 allows at most 109 bits of coefficient modulus at 128-bit security, but coeff_mod_bit_sizes (60, 40, 40, 60) sum to 200; use fewer or smaller primes, e.g. (40, 20, 40) with scale_bits=20, or a larger poly_modulus_degree
    """

    poly_modulus_degree: int = 8192  # ring dimension N: a ciphertext holds N/2 numbers; 8192 fits the primes below at 128-bit security
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)  # primes; each middle one allows one multiplication (HE FedAvg needs one)
    scale_bits: int = 40  # numbers are encoded times 2**40; the first prime's 60 bits leave 20 for the integer part
    layers: tuple[str, ...] | str | None = None  # None: every floating-point layer; else names or regexes (matched whole)

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if isinstance(n, bool) or n not in MAX_COEFF_BITS:
            raise ConfigError(f"CKKS: poly_modulus_degree must be one of {', '.join(map(str, MAX_COEFF_BITS))}, got {n!r}")
        bits = self.coeff_mod_bit_sizes
        if isinstance(bits, list):
            bits = tuple(bits)
            object.__setattr__(self, "coeff_mod_bit_sizes", bits)
        if (not isinstance(bits, tuple) or len(bits) < 3
                or not all(isinstance(b, int) and not isinstance(b, bool) and 20 <= b <= 60 for b in bits)):
            raise ConfigError(f"CKKS: coeff_mod_bit_sizes must be at least 3 prime sizes, each an integer from 20 to 60 "
                              f"bits (the middle ones give the multiplicative levels; HE FedAvg needs one), got {bits!r}")
        if sum(bits) > MAX_COEFF_BITS[n]:
            raise ConfigError(f"CKKS: poly_modulus_degree {n} allows at most {MAX_COEFF_BITS[n]} bits of coefficient "
                              f"modulus at 128-bit security, but coeff_mod_bit_sizes {bits} sum to {sum(bits)}; use fewer "
                              "or smaller primes, e.g. (40, 20, 40) with scale_bits=20, or a larger poly_modulus_degree")
        s = self.scale_bits
        if isinstance(s, bool) or not isinstance(s, int) or not 20 <= s <= min(bits[1:-1]) or s >= bits[0]:
            raise ConfigError(f"CKKS: scale_bits must be an integer from 20 to the smallest middle prime ({min(bits[1:-1])} "
                              f"bits) and below the first prime ({bits[0]} bits, whose extra bits hold the integer part), "
                              f"got {s!r}")
        layers = self.layers
        if isinstance(layers, str):
            layers = (layers,)
        if isinstance(layers, list):
            layers = tuple(layers)
        if layers is not None:
            if not isinstance(layers, tuple) or not layers or not all(isinstance(p, str) and p for p in layers):
                raise ConfigError(f"CKKS: layers must be None (all floating-point layers), a layer name or regular "
                                  f"expression, or a tuple of them, got {self.layers!r}")
            for p in layers:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ConfigError(f"CKKS: layers pattern {p!r} is not a valid regular expression ({e})") from None
        object.__setattr__(self, "layers", layers)

    @property
    def slots(self) -> int:
        """Numbers per ciphertext: half the ring dimension."""
        return self.poly_modulus_degree // 2


# ----------------------------------------------------------------------------------------- packing

@dataclass(frozen=True)
class Layout:
    """Where each encrypted layer sits in the packed vector: layers are flattened and concatenated in
    order, and the vector is cut into ciphertexts of ``slots`` numbers (the last one shorter), so that
    small layers share a ciphertext instead of each filling one."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    slots: int

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @property
    def chunk_sizes(self) -> list[int]:
        """How many numbers each ciphertext holds."""
        full, rest = divmod(self.size, self.slots)
        return [self.slots] * full + ([rest] if rest else [])

    @property
    def plain_nbytes(self) -> int:
        """Bytes these layers take in plaintext, in their own dtypes."""
        return sum(n * torch.empty((), dtype=_dtype(d)).element_size() for n, d in zip(self.sizes, self.dtypes))

    def to_meta(self) -> dict[str, Any]:
        """Plain lists and strings: travels in DXO meta and lives in checkpoints."""
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes], "dtypes": list(self.dtypes),
                "slots": self.slots}

    @classmethod
    def from_meta(cls, meta: Any) -> "Layout":
        try:
            layout = cls(tuple(meta["names"]), tuple(tuple(int(d) for d in s) for s in meta["shapes"]),
                         tuple(meta["dtypes"]), int(meta["slots"]))
            if not len(layout.names) == len(layout.shapes) == len(layout.dtypes) or layout.slots < 1:
                raise ValueError("names, shapes and dtypes differ in length")
            for d in layout.dtypes:
                _dtype(d)
        except (KeyError, TypeError, ValueError) as e:
            raise UpdateError(f"an HE layout must hold names, shapes, dtypes and slots; got {meta!r} ({e})") from None
        return layout


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name!r} is not a floating-point torch dtype")
    return dtype


def layout_for(weights: Weights, ckks: CKKS) -> Layout:
    """The layout of the layers of ``weights`` that ``ckks.layers`` selects (floating-point ones only:
    integer buffers such as BatchNorm's counters stay plaintext)."""
    if CIPHERTEXTS in weights:
        raise ConfigError(f"the model has a layer named {CIPHERTEXTS!r}, the name HE uses for its ciphertexts; rename it")
    floating = [k for k, v in weights.items() if v.is_floating_point()]
    if ckks.layers is None:
        names = floating
    else:
        for p in ckks.layers:
            if not any(re.fullmatch(p, k) for k in floating):
                raise ConfigError(f"CKKS: layers pattern {p!r} matches no floating-point layer of the model (patterns "
                                  f"match whole names); the model has: {', '.join(floating)}")
        names = [k for k in floating if any(re.fullmatch(p, k) for p in ckks.layers)]
    if not names:
        raise ConfigError("the model has no floating-point layer to encrypt")
    return Layout(tuple(names), tuple(tuple(weights[k].shape) for k in names),
                  tuple(str(weights[k].dtype).removeprefix("torch.") for k in names), ckks.slots)


def pack(weights: Weights, layout: Layout, source: str = "the update") -> np.ndarray:
    """The layout's layers of ``weights``, flattened into one float64 vector."""
    missing = [k for k in layout.names if k not in weights]
    if missing:
        raise UpdateError(f"{source} lacks the encrypted layer(s) {missing}")
    parts = []
    for k, shape in zip(layout.names, layout.shapes):
        v = weights[k]
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise UpdateError(f"{source} gave {k!r} as {got}; the HE layout expects shape {shape}")
        parts.append(v.detach().reshape(-1).to("cpu", torch.float64).numpy())
    return np.concatenate(parts)


def unpack(flat: np.ndarray, layout: Layout) -> Weights:
    """The inverse of `pack`: named tensors in the layout's shapes and dtypes."""
    out, at = {}, 0
    for k, shape, dtype, n in zip(layout.names, layout.shapes, layout.dtypes, layout.sizes):
        out[k] = torch.from_numpy(np.ascontiguousarray(flat[at:at + n])).reshape(shape).to(_dtype(dtype))
        at += n
    return out


# ------------------------------------------------------------------------------------------ keys

def new_keys(ckks: CKKS) -> tuple[bytes, bytes]:
    """A fresh key pair for a federation: (secret context bytes for the clients, public context bytes for the server).

    Neither holds relinearization or Galois keys: HE FedAvg never multiplies two ciphertexts nor rotates
    one, and leaving them out makes the public context 4x smaller.
    """
    ts = _tenseal()
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
        self.context = _tenseal().context_from(bytes(secret))
        if not self.context.is_private():
            raise ConfigError("the client key material holds no secret key; it cannot decrypt the global model")
        self.key_id = kid

    def encrypt(self, flat: np.ndarray, layout: Layout) -> list[bytes]:
        return [v.serialize() for v in _encrypt(self.context, flat, layout)]

    def decrypt(self, chunks: Sequence[bytes], layout: Layout) -> np.ndarray:
        ts = _tenseal()
        return np.concatenate([np.asarray(ts.ckks_vector_from(self.context, bytes(c)).decrypt(), dtype=np.float64)
                               for c in chunks])[:layout.size]


class PublicContext:
    """The server's view of the federation's keys: it encrypts, adds and scales ciphertexts, and cannot decrypt.

    Built only from serialized bytes, and refuses bytes that hold a secret key: no code on the server
    side can come to hold one, by mistake or otherwise. Vectors it loads have no secret key either, so
    their ``decrypt()`` raises.
    """

    def __init__(self, public: bytes) -> None:
        ctx = _tenseal().context_from(bytes(public))
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
            return _tenseal().ckks_vector_from(self._context, bytes(data))
        except Exception as e:  # TenSEAL raises several types for bytes that are not a ciphertext of these parameters
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UpdateError(f"{source} does not deserialize under the federation's public context ({first}); it "
                              "was damaged, or built under other CKKS parameters") from None


def _encrypt(context: Any, flat: np.ndarray, layout: Layout) -> list:
    ts = _tenseal()
    edges = np.cumsum([0, *layout.chunk_sizes])
    return [ts.ckks_vector(context, flat[a:b]) for a, b in zip(edges[:-1], edges[1:])]


def to_tensor(data: bytes) -> torch.Tensor:
    """Bytes as a uint8 tensor: how ciphertexts and contexts live in checkpointed state."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def to_bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


# ---------------------------------------------------------------------------------- command line

def add_he_arguments(group: argparse._ArgumentGroup) -> None:
    """Add ``--he`` and the CKKS options to a `fedkit run` argument group."""
    d = CKKS()
    group.add_argument("--he", action="store_true",
                       help="encrypt the clients' updates with CKKS (TenSEAL); the server aggregates ciphertexts "
                            "and the clients score the global model")
    group.add_argument("--he-poly-modulus", type=int, default=d.poly_modulus_degree,
                       help=f"CKKS ring dimension, one of {', '.join(map(str, MAX_COEFF_BITS))}")
    group.add_argument("--he-coeff-mod-bits", default=",".join(map(str, d.coeff_mod_bit_sizes)),
                       help="CKKS coefficient modulus prime sizes, comma-separated")
    group.add_argument("--he-scale-bits", type=int, default=d.scale_bits, help="CKKS scale, as a power of 2")
    group.add_argument("--he-layers", nargs="+", default=None, metavar="PATTERN",
                       help="names or regular expressions of the layers to encrypt (default: all)")


def he_from_args(args: argparse.Namespace) -> CKKS | None:
    """The `CKKS` settings that ``--he`` and its options describe, or None without ``--he``.

    `ConfigError` (which ``fedkit run`` turns into exit code 2) for bad values, or for CKKS options given without ``--he``.
    """
    d = CKKS()
    if not args.he:
        given = [flag for flag, value, default in (
            ("--he-poly-modulus", args.he_poly_modulus, d.poly_modulus_degree),
            ("--he-coeff-mod-bits", args.he_coeff_mod_bits, ",".join(map(str, d.coeff_mod_bit_sizes))),
            ("--he-scale-bits", args.he_scale_bits, d.scale_bits),
            ("--he-layers", args.he_layers, None)) if value != default]
        if given:
            raise ConfigError(f"{', '.join(given)} only mean something with --he; add --he or drop them")
        return None
    try:
        bits = tuple(int(b) for b in str(args.he_coeff_mod_bits).split(","))
    except ValueError:
        raise ConfigError(f"--he-coeff-mod-bits must be comma-separated whole numbers such as 60,40,40,60, "
                          f"got {args.he_coeff_mod_bits!r}") from None
    return CKKS(poly_modulus_degree=args.he_poly_modulus, coeff_mod_bit_sizes=bits, scale_bits=args.he_scale_bits,
                layers=tuple(args.he_layers) if args.he_layers else None)
