"""The server's half of homomorphic encryption: FedAvg over ciphertexts.

``FedAvg(he=CKKS())`` runs this loop instead of the plaintext one. It is FedAvg's loop (sample, send,
screen, aggregate, retry a short round), with three differences:

* the global model's selected layers are ciphertexts the server cannot read (`EncryptedGlobal`): it
  encrypts the initial model with the public key, then only adds the clients' weighted sums to it;
* a result is screened by its structure (key, layout, digest, ciphertexts that load under the
  federation's public context), since the norm of an encrypted update cannot be seen; the
  plaintext layers, if any, are screened as in FedAvg. This catches damage in transit and
  ciphertexts built under another context; it cannot stop a client that encrypts garbage under
  the federation's own key: HE hides updates, it does not vouch for them;
* the server cannot score a model it cannot read: each round ends with a ``validate`` task, and the
  round's ``client_accuracy`` / ``client_loss`` are the clients' scores of the new global model on
  their validation splits (weighted by their sizes).

Each round also records what HE costs: ``he_encrypt_s`` and ``he_decrypt_s`` (summed over clients),
``he_aggregate_s`` (the server's screening and aggregation), and ``bytes_cipher_up`` /
``bytes_cipher_down`` next to ``bytes_plain_up`` / ``bytes_plain_down``, what the same layers take in
plaintext (all attempts and the validation task included).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from typing import TYPE_CHECKING, Any, Callable

from ..aggregate import weighted_mean
from ..errors import ConfigError, UpdateError
from ..exchange import DXO, DataKind, MetaKey, Task
from ..server import Reply, Server, ServerContext
from ..weights import add, check_update
from .he import (CIPHERTEXTS, META_KEY, STATE_KEY, CKKS, Layout, PublicContext, digest, layout_for, pack, to_bytes,
                 to_tensor)
from .he_filters import DECRYPT_S, ENCRYPT_S, provision

if TYPE_CHECKING:
    from ..workflows.scatter_gather import FedAvg

COSTS = ("he_encrypt_s", "he_decrypt_s", "he_aggregate_s", "bytes_cipher_up", "bytes_cipher_down", "bytes_plain_up",
         "bytes_plain_down")


def check_workflow(workflow: "FedAvg") -> None:
    """Refuse what cannot work on ciphertexts, saying why; `FedAvg.__post_init__` calls it when ``he`` is set."""
    from ..workflows.extensions import Scaffold

    if not isinstance(workflow.he, CKKS):
        raise ConfigError(f"FedAvg.he must be fedkit.privacy.he.CKKS(...) or None, got {workflow.he!r}")
    if workflow.server_opt is not None:
        raise ConfigError(f"FedAvg(he=...) cannot use the server optimizer {workflow.server_opt!r}: it keeps moments of "
                          "the aggregated update and scales them element by element, which needs the update in "
                          "plaintext, and with HE the server only ever holds ciphertexts. Use FedAvg or FedProx with HE, "
                          "or drop he= to use FedOpt")
    if workflow.aggregate is not weighted_mean:
        from ..aggregate import rule_name
        raise ConfigError(f"FedAvg(he=...) cannot use the aggregation rule {rule_name(workflow.aggregate)!r}: with HE "
                          "the server only adds ciphertexts and scales the sum by 1/total weight, so it can compute "
                          "the weighted mean and nothing that compares, sorts or measures values (median, trimmed mean, "
                          "Krum, clipping). Use the default aggregate=weighted_mean with HE, or drop he=")
    from .dp import ServerDP

    if any(isinstance(e, ServerDP) for e in workflow.extensions):
        raise ConfigError("FedAvg(he=...) cannot run DP-FedAvg's server step: it clips each client's update and adds "
                          "noise to their sum in plaintext, and with HE the server only holds ciphertexts. Put DP on the "
                          "clients instead (DP-SGD, or a ClipUpdate filter with noise_multiplier > 0: local DP), which "
                          "runs before encryption")
    scaffold = [e for e in workflow.extensions if isinstance(e, Scaffold)]
    if scaffold:
        raise ConfigError("FedAvg(he=...) cannot run SCAFFOLD: its control variates (scaffold_c, scaffold_dc) travel "
                          "and are aggregated in plaintext, which would show the server what HE hides. Use FedAvg or "
                          "FedProx with HE")


class EncryptedGlobal:
    """The global model as the server holds it with HE: its plaintext layers in ``server.weights``, the
    encrypted ones as ciphertexts in ``server.state["he"]`` (checkpointed with the server's state).

    The server can send it, add the clients' weighted sums to it and save it; it cannot read it.
    """

    def __init__(self, server: Server) -> None:
        held = server.state[STATE_KEY]
        self.server = server
        self.context = PublicContext(to_bytes(held["public_context"]))
        self.layout_meta = held["layout"]
        self.layout = Layout.from_meta(held["layout"])
        self.chunks = [to_bytes(c) for c in held["global"]]
        self.vectors = [self.context.load(c, "the server's encrypted global model") for c in self.chunks]
        self.digest = digest(self.context.key_id, self.chunks)

    @classmethod
    def start(cls, ckks: CKKS, server: Server, public: bytes) -> "EncryptedGlobal":
        """Encrypt the selected layers of the server's weights (the initial model, which is public) with the
        public key, and keep no plaintext of them."""
        weights = server.weights
        layout = layout_for(weights, ckks)
        context = PublicContext(public)
        chunks = [v.serialize() for v in context.encrypt(pack(weights, layout), layout)]
        server.state[STATE_KEY] = {"public_context": to_tensor(public), "key_id": context.key_id,
                                   "layout": layout.to_meta(), "keys": list(weights),
                                   "global": [to_tensor(c) for c in chunks]}
        encrypted = set(layout.names)
        server.weights = {k: v for k, v in weights.items() if k not in encrypted}
        return cls(server)

    @property
    def key_id(self) -> str:
        return self.context.key_id

    def task_data(self, meta: dict[str, Any]) -> DXO:
        """The global model as sent: plaintext layers and ciphertexts, with what a client needs to decrypt them."""
        he = {"key_id": self.key_id, "layout": self.layout_meta, "digest": self.digest}
        return DXO(DataKind.WEIGHTS, {**self.server.weights, CIPHERTEXTS: list(self.chunks)}, {**meta, META_KEY: he})

    def check(self, result: DXO, weight: float, source: str) -> list:
        """The ciphertexts of ``result``, loaded under the public context; `UpdateError` if anything does not fit."""
        he = result.meta.get(META_KEY)
        chunks = result.data.get(CIPHERTEXTS)
        if not isinstance(he, dict):
            raise UpdateError(f"{source} sent its update without encryption, but this federation encrypts updates "
                              "(FedAvg(he=...)); is the client's EncryptUpdate result filter missing?")
        if chunks is None:
            raise UpdateError(f"{source} sent no ciphertexts (no {CIPHERTEXTS!r} entry; its data has: "
                              f"{', '.join(map(str, result.data)) or 'nothing'})")
        if he.get("key_id") != self.key_id:
            raise UpdateError(f"{source} sent ciphertexts built under another context (key id {he.get('key_id')!r}; "
                              f"the federation's is {self.key_id!r}); they would decrypt to garbage")
        if he.get("layout") != self.layout_meta:
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
        declared = he.get("weight")
        if not _finite(declared) or not math.isclose(declared, weight, rel_tol=1e-9, abs_tol=1e-12):
            raise UpdateError(f"{source} weighted its encrypted update by {declared!r}, but its result gives an "
                              f"aggregation weight of {weight!r}; the weighted mean would be wrong")
        vectors = [self.context.load(c, f"{source}: ciphertext {i}") for i, c in enumerate(chunks)]
        scale = self.context.scale  # a fresh encryption's
        for i, (v, n) in enumerate(zip(vectors, sizes)):
            (c,) = v.ciphertext()
            if v.size() != n or c.size() != 2 or c.is_transparent() or not math.isclose(c.scale, scale, rel_tol=1e-6):
                raise UpdateError(f"{source}: ciphertext {i} holds {v.size()} numbers in {c.size()} polynomials at scale "
                                  f"2^{math.log2(max(c.scale, 1)):.1f}; the layout needs {n} numbers in a fresh "
                                  f"ciphertext (2 polynomials) at scale 2^{math.log2(scale):.1f}")
        return vectors

    def update(self, results: dict[str, DXO], vectors: dict[str, list], weights: dict[str, float]) -> None:
        """FedAvg's step on ciphertexts: global += (sum of the clients' weighted updates) * (1 / total weight).

        The plaintext layers take FedAvg's weighted mean. Nothing changes if anything fails.
        """
        total = float(sum(weights.values()))
        if not (math.isfinite(total) and total > 0):
            raise UpdateError(f"aggregation weights must sum to a finite positive number, got {total}; did every "
                              "client train on zero samples?")
        names = list(results)
        sums = vectors[names[0]]  # loaded for this round only, so summed into in place (TenSEAL's copy() is slow)
        for name in names[1:]:
            for s, v in zip(sums, vectors[name]):
                s.add_(v)
        new = [g + s * (1.0 / total) for g, s in zip(self.vectors, sums)]  # the one multiplicative level it needs
        plain = self.server.weights
        if plain:
            diff = weighted_mean([(results[n].data, weights[n]) for n in names])
            check_update(diff, plain, "aggregation rule 'weighted_mean'")
            plain = add(plain, diff)
        chunks = [v.serialize() for v in new]
        self.vectors, self.chunks, self.digest = new, chunks, digest(self.key_id, chunks)
        self.server.weights = plain
        self.server.state[STATE_KEY]["global"] = [to_tensor(c) for c in chunks]


def screen_encrypted(replies: dict[str, Reply], model: EncryptedGlobal, weigh: Callable[[DXO], float],
                     max_norm_ratio: float | None) -> tuple[dict[str, DXO], dict[str, list]]:
    """FedAvg's `screen` for encrypted results: check each one's structure, then screen its plaintext layers.

    Returns the valid results (their plaintext layers only) and their ciphertexts loaded under the
    public context; rejects the rest in place, with the reason. The norm screen sees only plaintext
    layers: an encrypted update's norm is hidden from the server, as is any other property of it.
    """
    from ..workflows.scatter_gather import screen

    vectors = {}
    for name, reply in replies.items():
        if not reply.ok or reply.result.kind != DataKind.WEIGHT_DIFF:
            continue  # `screen` rejects a wrong kind with its own message
        result = reply.result
        try:
            vectors[name] = model.check(result, weigh(result), f"client {name!r}")
        except UpdateError as e:
            reply.reject("rejected", str(e))
            continue
        reply.result = result.with_data({k: v for k, v in result.data.items() if k != CIPHERTEXTS})
    plain = model.server.weights
    floating = any(v.is_floating_point() for v in plain.values())
    valid = screen(replies, plain, max_norm_ratio if floating else None)
    return valid, {n: vectors[n] for n in valid}


def validate(fl: ServerContext, model: EncryptedGlobal, targets: list[str], rnd: int,
             costs: dict[str, float]) -> dict[str, float]:
    """Send the new global model to ``targets`` to score on their validation splits; their weighted mean.

    Clients need a ``validate`` executor (the Simulator's dataset clients have the standard `Evaluator`).
    Failed or implausible answers are left out, and recorded as events of the ``validate`` task.
    """
    replies = fl.broadcast_and_wait(Task("validate", model.task_data({}), round=rnd), targets)
    _count(costs, replies, model)
    samples = loss = correct = 0.0
    scored = 0
    for name, r in replies.items():
        if r.ok:
            acc, lo, n = r.result.data.get("accuracy"), r.result.data.get("loss"), r.result.meta.get(MetaKey.NUM_SAMPLES)
            if n == 0:
                continue  # an empty validation split scores nothing
            if not (_finite(acc) and 0 <= acc <= 1 and _finite(lo) and lo >= 0 and _finite(n) and n > 0):
                r.reject("rejected", f"client {name!r} answered the validation with accuracy {acc!r}, loss {lo!r} on "
                                     f"{n!r} samples; expected an accuracy in [0, 1], a loss >= 0 and a sample count")
            else:
                samples, loss, correct, scored = samples + n, loss + lo * n, correct + acc * n, scored + 1
        if not r.ok:
            fl.history.events.append({"round": rnd, "attempt": 0, "client": name, "task": "validate", "what": r.status,
                                      "reason": f"validate task: {r.error}"})
    if not samples:
        return {"client_accuracy": math.nan, "client_loss": math.nan, "clients_validated": 0}
    return {"client_accuracy": correct / samples, "client_loss": loss / samples, "clients_validated": scored}


def encrypted_fedavg(workflow: "FedAvg", fl: ServerContext) -> None:
    """Run ``workflow`` (a `FedAvg` with ``he`` set) with encrypted updates and an encrypted global model."""
    from ..workflows.scatter_gather import gather

    wf = workflow
    if wf.min_clients is not None and wf.min_clients > len(fl.clients):
        raise ConfigError(f"min_clients={wf.min_clients} but the federation has only {len(fl.clients)} clients")
    fl = dataclasses.replace(fl, evaluate=None)  # the server cannot score a model it cannot read; the clients do
    started = time.perf_counter()
    public, kid = provision(wf.he, fl.clients, wf.weigh)  # the clients' side: keys and filters
    if STATE_KEY in fl.server.state:  # resumed: the checkpoint holds the encrypted global model
        model = EncryptedGlobal(fl.server)
    else:
        model = EncryptedGlobal.start(wf.he, fl.server, public)
    if model.key_id != kid:
        raise ConfigError(f"the server's global model is encrypted under key {model.key_id!r}, but the clients hold "
                          f"key {kid!r}; they could not decrypt it (was the clients' state lost?)")
    fl.server.state["_he"] = model  # a cache: rebuilt from the checkpointed state on resume
    fl.history.results.setdefault("he", {
        "scheme": "CKKS", **{f.name: getattr(wf.he, f.name) for f in dataclasses.fields(wf.he)}, "key_id": kid,
        "encrypted_layers": list(model.layout.names), "plaintext_layers": list(fl.server.weights),
        "ciphertexts": len(model.layout.chunk_sizes), "evaluation": "clients: a validate task each round",
    })
    setup = time.perf_counter() - started
    for rnd in range(fl.start_round, wf.rounds):
        reason = wf.stop_reason(fl, rnd)
        if reason is not None:  # e.g. a DP-SGD client budget
            fl.history.events.append({"round": rnd, "what": "stopped", "reason": reason})
            return
        started = time.perf_counter()
        costs = dict.fromkeys(COSTS, 0.0)
        vectors: dict = {}

        def screen_round(replies: dict[str, Reply]) -> dict[str, DXO]:
            _count(costs, replies, model)
            t = time.perf_counter()
            results, found = screen_encrypted(replies, model, wf.weigh, wf.max_norm_ratio)
            costs["he_aggregate_s"] += time.perf_counter() - t
            vectors.clear()
            vectors.update(found)
            return results

        replies, results, attempts = gather(fl, wf, rnd, model.task_data, screen_round)
        t = time.perf_counter()
        model.update(results, vectors, {n: wf.weigh(r) for n, r in results.items()})
        costs["he_aggregate_s"] += time.perf_counter() - t
        for ext in wf.extensions:
            ext.after_aggregate(fl, results)
        scores = validate(fl, model, list(replies), rnd, costs)
        extra = {"he_setup_s": setup} if setup else {}
        setup = 0.0
        fl.end_round(rnd, replies, started, attempts=attempts, **scores, **costs, **extra, **wf.extension_metrics(fl))


def _count(costs: dict[str, float], replies: dict[str, Reply], model: EncryptedGlobal) -> None:
    """Add what ``replies`` (as they arrived, before screening) cost in HE seconds and bytes."""
    down = sum(len(c) for c in model.chunks)
    plain = model.layout.plain_nbytes
    for r in replies.values():
        costs["bytes_cipher_down"] += down
        costs["bytes_plain_down"] += plain
        if r.result is None:
            continue
        metrics = r.result.meta.get(MetaKey.METRICS, {})
        for key in (ENCRYPT_S, DECRYPT_S):
            if isinstance(metrics, dict) and _finite(metrics.get(key)):
                costs[key] += metrics[key]
        chunks = r.result.data.get(CIPHERTEXTS)
        if isinstance(chunks, list):
            costs["bytes_cipher_up"] += sum(len(c) for c in chunks if isinstance(c, (bytes, bytearray)))
            costs["bytes_plain_up"] += plain


def _finite(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

