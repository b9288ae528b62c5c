"""The server's half of homomorphic encryption: the global model held as ciphertexts it cannot read.

`EncryptedModel` is a `fedkit.global_model.GlobalModel`, so FedAvg's and cyclic weight transfer's
loops run on it unchanged. It differs from the plaintext model in four places:

* ``task_data`` sends the plaintext layers (if any) and the ciphertexts, with the layout and a digest;
* ``screen`` checks each result's structure (key id, layout, digest, ciphertexts that load under the
  federation's public context), since the norm of an encrypted update cannot be seen; plaintext
  layers are screened as usual. This catches damage in transit and ciphertexts built under another
  context; it cannot stop a client that encrypts garbage under the federation's own key: HE hides
  updates, it does not vouch for them;
* ``update`` computes the weighted mean on ciphertexts: each client's ciphertext times its public
  share of the total weight, summed and added to the global ciphertexts (one multiplicative level);
* ``weights`` raises `fedkit.errors.Unreadable`: the server cannot score the model, so each round is
  scored by the clients (`fedkit.server.ServerContext.score_on_clients`).

Each round also reports what HE costs: ``he_encrypt_s`` and ``he_decrypt_s`` (summed over clients),
``he_aggregate_s`` (the server's screening and aggregation), and ``bytes_cipher_up`` /
``bytes_cipher_down`` next to ``bytes_plain_up`` / ``bytes_plain_down``, what the same layers take in
plaintext (all attempts and the validation task included).
"""

from __future__ import annotations

import math
import numbers
import time
from typing import Any

from .. import metrics as M
from ..aggregate import Rule, by_samples, rule_name, weigh_result, weighted_mean
from ..errors import ConfigError, UpdateError, Unreadable
from ..exchange import DXO, DataKind, MetaKey, Weights
from ..global_model import HE_RULE, GlobalModel, Step, Weigh, aggregate, check_callable, check_results, screen
from ..weights import add
from ..server import Reply
from ..status import Status
from .he_params import CIPHERTEXTS, META_KEY, STATE_KEY, CKKSParams
from .he_filters import DECRYPT_S, ENCRYPT_S
from .he_keys import PublicContext, digest, to_bytes, to_tensor
from .he_layout import Layout, layout_for, pack


class EncryptedModel(GlobalModel):
    """The global model as the server holds it with HE: plaintext layers as tensors, the others as ciphertexts.

    The server can send it, screen and add the clients' encrypted updates and save it; it cannot read it.
    """

    readable = False

    def __init__(self, ckks: CKKSParams, public: bytes, layout: Layout, keys: list[str], plain: Weights,
                 chunks: list[bytes], setup_s: float = 0.0) -> None:
        self.encryption = ckks
        self.public = public
        self.context = PublicContext(public)
        self.layout, self.keys, self.plain = layout, list(keys), dict(plain)
        self.chunks = list(chunks)
        self.vectors = [self.context.load(c, "the server's encrypted global model") for c in self.chunks]
        self.digest = digest(self.context.key_id, self.chunks)
        self._costs = dict.fromkeys(M.HE_COSTS, 0.0)
        self._setup_s = setup_s  # reported once, with the first round
        self._loaded: dict[str, list] = {}  # the ciphertexts of this round's valid results (all attempts), for `update`

    @classmethod
    def start(cls, ckks: CKKSParams, weights: Weights, public: bytes, setup_s: float = 0.0) -> "EncryptedModel":
        """Encrypt the selected layers of ``weights`` (the initial model, which is public) with the public key."""
        layout = layout_for(weights, ckks)
        chunks = [v.serialize() for v in PublicContext(public).encrypt(pack(weights, layout), layout)]
        encrypted = set(layout.names)
        plain = {k: v for k, v in weights.items() if k not in encrypted}
        return cls(ckks, public, layout, list(weights), plain, chunks, setup_s)

    @classmethod
    def restore(cls, ckks: CKKSParams, state: dict[str, Any], plain: Weights) -> "EncryptedModel":
        """The model a checkpoint holds: ``state`` is what `checkpoint` returned under ``"he"``."""
        return cls(ckks, to_bytes(state["public_context"]), Layout.from_meta(state["layout"]), state["keys"], plain,
                   [to_bytes(c) for c in state["global"]])

    @property
    def key_id(self) -> str:
        return self.context.key_id

    @property
    def weights(self) -> Weights:
        raise Unreadable("the server holds the global model encrypted (HE) and cannot read it; its clients can: "
                         "score it with fl.score_on_clients, and read the final model from run.weights")

    def checkpoint(self) -> tuple[Weights, dict[str, Any]]:
        return self.plain, {STATE_KEY: {"public_context": to_tensor(self.public), "key_id": self.key_id,
                                        "layout": self.layout.to_meta(), "keys": list(self.keys),
                                        "global": [to_tensor(c) for c in self.chunks]}}

    def describe(self) -> dict[str, Any]:
        """What a run's history records about its encryption (``history.results["he"]``)."""
        return {"scheme": "CKKS", **{k: v for k, v in vars(self.encryption).items()}, "key_id": self.key_id,
                "encrypted_layers": list(self.layout.names), "plaintext_layers": list(self.plain),
                "ciphertexts": len(self.layout.chunk_sizes), "evaluation": "clients: a validate task each round"}

    def task_data(self, meta: dict[str, Any]) -> DXO:
        """The global model as sent: plaintext layers and ciphertexts, with what a client needs to decrypt them."""
        he = {"key_id": self.key_id, "layout": self.layout.to_meta(), "digest": self.digest}
        return DXO(DataKind.WEIGHTS, {**self.plain, CIPHERTEXTS: list(self.chunks)}, {**meta, META_KEY: he})

    def copy(self) -> "EncryptedModel":
        other = object.__new__(EncryptedModel)
        other.__dict__.update(self.__dict__)  # ciphertexts are replaced, never changed in place: sharing is safe
        other.plain, other.chunks, other.vectors = dict(self.plain), list(self.chunks), list(self.vectors)
        # the copy replaces the original at the end of a cycle: it reports the key setup if that is still due
        other._costs, other._loaded = dict.fromkeys(M.HE_COSTS, 0.0), {}
        return other

    def check(self, result: DXO, source: str) -> list:
        """The ciphertexts of ``result``, loaded under the public context; `UpdateError` if anything does not fit."""
        he = result.meta.get(META_KEY)
        chunks = result.data.get(CIPHERTEXTS)
        if not isinstance(he, dict):
            raise UpdateError(f"{source} sent its update without encryption, but this federation encrypts updates "
                              "(he=...); is the client's EncryptUpdate result filter missing?")
        if chunks is None:
            raise UpdateError(f"{source} sent no ciphertexts (no {CIPHERTEXTS!r} entry; its data has: "
                              f"{', '.join(map(str, result.data)) or 'nothing'})")
        if he.get("key_id") != self.key_id:
            raise UpdateError(f"{source} sent ciphertexts built under another context (key id {he.get('key_id')!r}; "
                              f"the federation's is {self.key_id!r}); they would decrypt to garbage")
        if he.get("layout") != self.layout.to_meta():
            raise UpdateError(f"{source} packed its layers in another layout than the federation's "
                              f"({len(self.layout.names)} layers, {self.layout.size} numbers in "
                              f"{len(self.layout.chunk_sizes)} ciphertexts)")
        if not isinstance(chunks, list) or not all(isinstance(c, (bytes, bytearray)) for c in chunks):
            raise UpdateError(f"{source} sent {type(chunks).__name__} under {CIPHERTEXTS!r}; expected a list of "
                              "ciphertexts (bytes)")
        sizes = self.layout.chunk_sizes
        if len(chunks) != len(sizes):
            raise UpdateError(f"{source} sent {len(chunks)} ciphertext(s); the layout needs {len(sizes)}")
        if digest(self.key_id, chunks) != he.get("digest"):
            raise UpdateError(f"{source} sent ciphertexts that were tampered with after encryption (their SHA-256 "
                              "digest does not match the one the client computed)")
        vectors = [self.context.load(c, f"{source}: ciphertext {i}") for i, c in enumerate(chunks)]
        scale = self.context.scale  # a fresh encryption's
        for i, (v, n) in enumerate(zip(vectors, sizes)):
            (c,) = v.ciphertext()
            if v.size() != n or c.size() != 2 or c.is_transparent() or not math.isclose(c.scale, scale, rel_tol=1e-6):
                raise UpdateError(f"{source}: ciphertext {i} holds {v.size()} numbers in {c.size()} polynomials at scale "
                                  f"2^{math.log2(max(c.scale, 1)):.1f}; the layout needs {n} numbers in a fresh "
                                  f"ciphertext (2 polynomials) at scale 2^{math.log2(scale):.1f}")
        return vectors

    def screen(self, replies: dict[str, Reply], max_norm_ratio: float | None) -> dict[str, DXO]:
        """Count what ``replies`` cost, check each result's ciphertexts, keep them for `update`, then screen its
        plaintext layers.

        The norm screen sees only plaintext layers: an encrypted update's norm is hidden from the
        server, as is any other property of it.
        """
        self.observe(replies)  # what they cost, as they arrived
        started = time.perf_counter()
        loaded = {}
        for name, reply in replies.items():
            if not reply.ok or reply.result.kind != DataKind.WEIGHT_DIFF:
                continue  # `screen` rejects a wrong kind with its own message
            result = reply.result
            try:
                loaded[name] = self.check(result, f"client {name!r}")
            except UpdateError as e:
                reply.reject(Status.REJECTED, str(e))
                continue
            reply.result = result.with_data({k: v for k, v in result.data.items() if k != CIPHERTEXTS})
        floating = any(v.is_floating_point() for v in self.plain.values())
        valid = screen(replies, self.plain, max_norm_ratio if floating else None)
        self._loaded.update({n: loaded[n] for n in valid})  # a retry screens only the clients asked again
        self._costs[M.HE_AGGREGATE_S] += time.perf_counter() - started
        return valid

    def update(self, results: dict[str, DXO], *, rule: Rule = weighted_mean, weigh: Weigh = by_samples,
               step: Step | None = None) -> None:
        """FedAvg's step on ciphertexts: global += sum_i ciphertext_i * (w_i / total weight), w_i = ``weigh(result_i)``.

        The plaintext layers move by the same weighted mean. Another ``rule``, or a ``step``, is refused: they
        need the weights in plaintext, and so are results that are not training results (WEIGHT_DIFFs). Nothing
        changes if anything fails.
        """
        check_results(results)
        check_callable("weigh", weigh, "a function of a result such as fedkit.aggregate.by_samples")
        if rule is not weighted_mean:
            raise ConfigError(f"the encrypted global model cannot apply the aggregation rule {rule_name(rule)!r}: "
                              f"{HE_RULE}. Call fl.model.update(results) with the default rule, or run without he=")
        if step is not None:
            raise ConfigError(f"the encrypted global model cannot run the server step {rule_name(step)!r}: a step reads "
                              "and moves the weights in plaintext, and the server holds them encrypted. Call "
                              "fl.model.update(results) without step= (the weighted mean), or run without he=")
        if not results:
            return
        weights = {n: weigh_result(weigh, r, n) for n, r in results.items()}
        started = time.perf_counter()
        total = float(sum(weights[n] for n in results))
        if not (math.isfinite(total) and total > 0):
            raise UpdateError(f"aggregation weights must sum to a finite positive number, got {total}; did every "
                              "client train on zero samples?")
        sums = None
        for name in results:
            share = weights[name] / total
            scaled = [v * share for v in self._loaded[name]]  # the one multiplicative level HE FedAvg needs
            sums = scaled if sums is None else [s + v for s, v in zip(sums, scaled)]
        new = [g + s for g, s in zip(self.vectors, sums)]
        plain = add(self.plain, aggregate(results, rule, weigh, self.plain)) if self.plain else self.plain
        chunks = [v.serialize() for v in new]
        self.vectors, self.chunks, self.digest, self.plain = new, chunks, digest(self.key_id, chunks), plain
        self._loaded = {}
        self._costs[M.HE_AGGREGATE_S] += time.perf_counter() - started

    def observe(self, replies: dict[str, Reply]) -> None:
        """Add what ``replies`` (as they arrived, before screening) cost in HE seconds and bytes."""
        down = sum(len(c) for c in self.chunks)
        plain = self.layout.plain_nbytes
        costs = self._costs
        for r in replies.values():
            costs[M.BYTES_CIPHER_DOWN] += down
            costs[M.BYTES_PLAIN_DOWN] += plain
            if r.result is None:
                continue
            metrics = r.result.meta.get(MetaKey.METRICS, {})
            for key in (ENCRYPT_S, DECRYPT_S):
                if isinstance(metrics, dict) and _finite(metrics.get(key)):
                    costs[key] += metrics[key]
            chunks = r.result.data.get(CIPHERTEXTS)
            if isinstance(chunks, list):
                costs[M.BYTES_CIPHER_UP] += sum(len(c) for c in chunks if isinstance(c, (bytes, bytearray)))
                costs[M.BYTES_PLAIN_UP] += plain

    def round_metrics(self) -> dict[str, float]:
        out = dict(self._costs)
        if self._setup_s:
            out[M.HE_SETUP_S], self._setup_s = self._setup_s, 0.0
        self._costs = dict.fromkeys(M.HE_COSTS, 0.0)
        return out


def _finite(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
