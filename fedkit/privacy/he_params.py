"""The parameters of CKKS (TenSEAL), checked, and the names under which HE data travels and is kept.

`CKKSParams` holds the scheme's parameters and which layers to encrypt: what the rest of HE reads
(`fedkit.privacy.he_layout`, `he_keys`, `he_filters`, `he_model`). The scheme a workflow holds,
`fedkit.privacy.ckks.CKKS`, is these parameters with the provisioning hooks on top.

>>> CKKSParams().slots
4096
>>> CKKSParams(layers="fc2.*").layers
('fc2.*',)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError
from ..extras import require

STATE_KEY = "he"  # under this key: the server's encrypted global model, and each client's secret context
CIPHERTEXTS = "__ckks__"  # the DXO data entry that holds the ciphertexts (bytes) of the packed layers
META_KEY = "he"  # the DXO meta entry that describes them: key id, layout, digest (and the client's weight)

# The most coefficient-modulus bits SEAL allows per ring dimension for 128-bit security
# (HomomorphicEncryption.org standard); more bits would be faster to break.
MAX_COEFF_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


def tenseal_module():
    """The tenseal package, or `MissingExtra` naming fedkit's privacy extra."""
    return require("tenseal", "homomorphic encryption (CKKS)")


@dataclass(frozen=True)
class CKKSParams:
    """The federation's CKKS settings, and which layers to encrypt (`fedkit.privacy.ckks.CKKS` is the scheme).

    The defaults are TenSEAL's and NVFlare's: enough precision that an encrypted FedAvg ends within
    1e-6 (relative) of the plaintext one, and one multiplicative level (the server's 1/total weight).

    >>> CKKSParams(poly_modulus_degree=4096)
    Traceback (most recent call last):
    fedkit.errors.ConfigError: CKKS: poly_modulus_degree 4096 allows at most 109 bits of coefficient modulus at 128-bit security, but coeff_mod_bit_sizes (60, 40, 40, 60) sum to 200; use fewer or smaller primes, e.g. (40, 20, 40) with scale_bits=20, or a larger poly_modulus_degree
    """

    poly_modulus_degree: int = 8192  # ring dimension N: a ciphertext holds N/2 numbers; 8192 fits the primes below at 128-bit security
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)  # primes; each middle one allows one multiplication (HE FedAvg needs one)
    scale_bits: int = 40  # numbers are encoded times 2**40; the first prime's 60 bits leave 20 for the integer part
    layers: tuple[str, ...] | str | None = None  # None: every floating-point layer; else names or regexes (matched whole)

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if isinstance(n, bool) or not isinstance(n, int) or n not in MAX_COEFF_BITS:
            raise ConfigError(f"{{poly_modulus_degree}} must be one of {', '.join(map(str, MAX_COEFF_BITS))}",
                              obj=self, field="poly_modulus_degree", value=n)
        bits = self.coeff_mod_bit_sizes
        if isinstance(bits, list):
            bits = tuple(bits)
            object.__setattr__(self, "coeff_mod_bit_sizes", bits)
        if (not isinstance(bits, tuple) or len(bits) < 3
                or not all(isinstance(b, int) and not isinstance(b, bool) and 20 <= b <= 60 for b in bits)):
            raise ConfigError("{coeff_mod_bit_sizes} must be at least 3 prime sizes, each an integer from 20 to 60 "
                              "bits (the middle ones give the multiplicative levels; HE FedAvg needs one)", obj=self,
                              field="coeff_mod_bit_sizes", value=bits)
        if sum(bits) > MAX_COEFF_BITS[n]:
            raise ConfigError(f"{{poly_modulus_degree=}} allows at most {MAX_COEFF_BITS[n]} bits of coefficient modulus "
                              f"at 128-bit security, but {{coeff_mod_bit_sizes=}} sum to {sum(bits)}",
                              obj=self, field="coeff_mod_bit_sizes", hint="use fewer or smaller primes, e.g. (40, 20, 40) "
                              "with {scale_bits=20}, or a larger {poly_modulus_degree}")
        s = self.scale_bits
        if isinstance(s, bool) or not isinstance(s, int) or not 20 <= s <= min(bits[1:-1]) or s >= bits[0]:
            raise ConfigError(f"{{scale_bits}} must be an integer from 20 to the smallest middle prime "
                              f"({min(bits[1:-1])} bits) and below the first prime ({bits[0]} bits, whose extra bits hold "
                              "the integer part)", obj=self, field="scale_bits", value=s)
        layers = self.layers
        if isinstance(layers, str):
            layers = (layers,)
        if isinstance(layers, list):
            layers = tuple(layers)
        if layers is not None:
            if not isinstance(layers, tuple) or not layers or not all(isinstance(p, str) and p for p in layers):
                raise ConfigError("{layers} must be None (all floating-point layers), a layer name or regular "
                                  "expression, or a tuple of them", obj=self, field="layers", value=self.layers)
            for p in layers:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ConfigError(f"{{layers}} pattern {p!r} is not a valid regular expression ({e})", obj=self,
                                      field="layers") from None
        object.__setattr__(self, "layers", layers)

    @property
    def slots(self) -> int:
        """Numbers per ciphertext: half the ring dimension."""
        return self.poly_modulus_degree // 2
