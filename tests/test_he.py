"""Homomorphic encryption (fedkit.privacy.he): encrypted FedAvg equals plaintext FedAvg, the server cannot
decrypt, damaged or foreign ciphertexts are refused, costs are recorded, and resume keeps the keys."""

import argparse
import functools
import json
import math
import re
from collections import deque

import numpy as np
import pytest
import tenseal as ts
import torch

import fedkit as fk
from fedkit import checkpoint
from fedkit.aggregate import by_samples, weighted_mean
from fedkit.data import ClientData
from fedkit.faults import CORRUPTIONS, corrupt
from fedkit.privacy.he import (CIPHERTEXTS, CKKS, META_KEY, STATE_KEY, ClientKeys, Layout, PublicContext, add_he_arguments,
                               digest, he_from_args, layout_for, new_keys, pack, to_bytes, unpack)
from fedkit.privacy.he_fedavg import EncryptedGlobal, screen_encrypted
from fedkit.privacy.he_filters import DecryptGlobal, EncryptUpdate, client_keys, global_plaintext, provision
from fedkit.server import Reply, Server

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------ helpers

class Keep(fk.Controller):
    """Runs a workflow and keeps its ServerContext, to inspect the server and clients after the run."""

    def __init__(self, inner):
        self.inner, self.rounds, self.fl = inner, inner.rounds, None

    def control_flow(self, fl):
        self.fl = fl
        self.inner.control_flow(fl)


@pytest.fixture(scope="module")
def small(digits):
    """480 digits over 4 clients: a round takes a fraction of a second."""
    return fk.data.iid(digits.train.subset(np.arange(480)), clients=4, seed=0)


def simulate(digits, parts, workflow, **kw):
    return fk.Simulator(workflow, model=lambda: fk.models.for_data(digits), clients=parts, test=digits.test, seed=0, **kw)


def relative_errors(a, b):
    return {k: float((a[k].double() - b[k].double()).norm() / b[k].double().norm()) for k in b}


@pytest.fixture(scope="module")
def plain_and_he(digits, small):
    plain = simulate(digits, small, fk.FedAvg(rounds=3)).run(progress=False)
    keep = Keep(fk.FedAvg(rounds=3, he=CKKS()))
    he = simulate(digits, small, keep).run(progress=False)
    return plain, he, keep.fl


def fixed_diff(values, samples):
    """An executor that answers the WEIGHT_DIFF ``values`` for ``samples`` samples."""
    def execute(task, ctx, abort):
        return fk.DXO(fk.DataKind.WEIGHT_DIFF, {k: v.clone() for k, v in values.items()}, {fk.MetaKey.NUM_SAMPLES: samples})
    return execute


def federation(weights, diffs, ckks=CKKS()):
    """Clients answering fixed diffs, provisioned for HE, and a server holding ``weights`` partly encrypted."""
    d = fk.Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 2)
    clients = {f"c{i}": fk.Client(f"c{i}", ClientData(d, d), {"train": fixed_diff(diff, n)})
               for i, (diff, n) in enumerate(diffs)}
    public, _ = provision(ckks, clients, by_samples)
    server = Server({k: v.clone() for k, v in weights.items()})
    return clients, server, EncryptedGlobal.start(ckks, server, public)


def replies_for(clients, model, damage=None):
    """Each client's encrypted answer to a train task, as the server receives it (optionally damaged)."""
    task = fk.Task("train", model.task_data({}), round=0)
    out = {}
    for name, c in clients.items():
        result = c.handle(task, CPU, fk.Signal())
        if damage is not None and name == "c1":
            result = damage(result)
        out[name] = Reply(name, task, result, status="ok")
    return out


WEIGHTS = {"w": torch.linspace(-1, 1, 5000), "b": torch.tensor([0.5, -0.5, 2.0])}
DIFFS = [({"w": torch.full((5000,), 0.1), "b": torch.tensor([1.0, 2.0, 3.0])}, 10),
         ({"w": torch.linspace(0, 1, 5000), "b": torch.tensor([-1.0, 0.0, 1.0])}, 30),
         ({"w": torch.full((5000,), -0.2), "b": torch.tensor([0.0, 0.0, 0.0])}, 60)]


# ------------------------------------------------------------------------------------ settings

@pytest.mark.parametrize("kwargs, match", [
    (dict(poly_modulus_degree=1000), "poly_modulus_degree must be one of 4096, 8192"),
    (dict(poly_modulus_degree=4096), "allows at most 109 bits.*sum to 200"),
    (dict(coeff_mod_bit_sizes=(60, 60)), "at least 3 prime sizes"),
    (dict(coeff_mod_bit_sizes=(60, 40, 70)), "each an integer from 20 to 60"),
    (dict(scale_bits=50), "smallest middle prime \\(40 bits\\)"),
    (dict(coeff_mod_bit_sizes=(40, 40, 40, 60), scale_bits=40), "below the first prime \\(40 bits"),
    (dict(layers=("fc(",)), "not a valid regular expression"),
    (dict(layers=()), "layers must be None"),
])
def test_bad_ckks_settings_are_explained(kwargs, match):
    with pytest.raises(fk.ConfigError, match=match):
        CKKS(**kwargs)


def test_ckks_defaults_and_normalization():
    c = CKKS()
    assert (c.poly_modulus_degree, c.coeff_mod_bit_sizes, c.scale_bits, c.layers, c.slots) == (8192, (60, 40, 40, 60), 40, None, 4096)
    assert CKKS(coeff_mod_bit_sizes=[60, 40, 60], layers="fc1.*").coeff_mod_bit_sizes == (60, 40, 60)
    assert CKKS(layers="fc1.*").layers == ("fc1.*",)


@pytest.mark.parametrize("kwargs, match", [
    (dict(server_opt=fk.server_opt.Adam(lr=0.01)), "server optimizer Adam.*needs the update in plaintext"),
    (dict(aggregate=fk.aggregate.coordinate_median), "rule 'coordinate_median'.*compares, sorts"),
    (dict(aggregate=functools.partial(fk.aggregate.krum, f=1)), "rule 'krum\\(f=1\\)'"),
    (dict(extensions=(fk.workflows.Scaffold(),)), "cannot run SCAFFOLD.*plaintext"),
])
def test_combinations_that_need_plaintext_are_refused(kwargs, match):
    with pytest.raises(fk.ConfigError, match=match):
        fk.FedAvg(rounds=1, he=CKKS(), **kwargs)
    with pytest.raises(fk.ConfigError, match="FedAvg.he must be"):
        fk.FedAvg(rounds=1, he="ckks")
    assert fk.FedProx(rounds=1, mu=0.1, he=CKKS()).he == CKKS()  # FedProx works with HE


# ------------------------------------------------------------------------------------ packing

def test_layers_are_packed_into_as_few_ciphertexts_as_possible():
    weights = {"a": torch.randn(3000), "b": torch.randn(20, 60), "c": torch.randn(10), "n": torch.tensor(3)}
    layout = layout_for(weights, CKKS())
    assert layout.names == ("a", "b", "c")  # the integer buffer stays plaintext
    assert layout.chunk_sizes == [4096, 3000 + 1200 + 10 - 4096]  # 3 layers, 2 ciphertexts
    assert layout.plain_nbytes == 4210 * 4
    back = unpack(pack(weights, layout), layout)
    assert all(torch.equal(back[k], weights[k]) and back[k].dtype == weights[k].dtype for k in layout.names)
    assert Layout.from_meta(json.loads(json.dumps(layout.to_meta()))) == layout


def test_layer_selection_by_name_and_regex():
    weights = fk.models.MLP(64, 10).state_dict()
    assert layout_for(weights, CKKS(layers=r"fc2\..*")).names == ("fc2.weight", "fc2.bias")
    assert layout_for(weights, CKKS(layers=("fc1.bias", "fc2.weight"))).names == ("fc1.bias", "fc2.weight")
    with pytest.raises(fk.ConfigError, match="pattern 'conv.*' matches no floating-point layer.*fc1.weight"):
        layout_for(weights, CKKS(layers="conv.*"))


# ------------------------------------------------------------------------------------ aggregation

def test_encrypted_aggregation_equals_the_plaintext_weighted_mean():
    clients, server, model = federation(WEIGHTS, DIFFS)
    assert set(server.weights) == set()  # every layer is held encrypted
    replies = replies_for(clients, model)
    results, vectors = screen_encrypted(replies, model, by_samples, max_norm_ratio=10.0)
    assert sorted(results) == ["c0", "c1", "c2"]
    model.update(results, vectors, {n: by_samples(r) for n, r in results.items()})
    got = global_plaintext(server.weights, server.state, clients["c2"].state)
    mean = weighted_mean([(d, float(n)) for d, n in DIFFS])
    for k in WEIGHTS:
        assert torch.allclose(got[k], WEIGHTS[k] + mean[k], rtol=0, atol=1e-6), k
    assert list(got) == ["w", "b"]  # the model's own key order


def test_unselected_layers_are_aggregated_in_plaintext():
    clients, server, model = federation(WEIGHTS, DIFFS, CKKS(layers="w"))
    assert list(server.weights) == ["b"] and server.state[STATE_KEY]["layout"]["names"] == ["w"]
    replies = replies_for(clients, model)
    assert torch.equal(replies["c0"].result.data["b"], DIFFS[0][0]["b"])  # travels in plaintext, unweighted
    results, vectors = screen_encrypted(replies, model, by_samples, max_norm_ratio=None)
    model.update(results, vectors, {n: by_samples(r) for n, r in results.items()})
    mean = weighted_mean([(d, float(n)) for d, n in DIFFS])
    assert torch.allclose(server.weights["b"], WEIGHTS["b"] + mean["b"], atol=1e-6)
    got = global_plaintext(server.weights, server.state, clients["c0"].state)
    assert torch.allclose(got["w"], WEIGHTS["w"] + mean["w"], atol=1e-6)


# ------------------------------------------------------------------------------------ key boundaries

def test_the_server_context_has_no_secret_key_and_cannot_decrypt():
    secret, public = new_keys(CKKS())
    server_ctx = PublicContext(public)
    assert server_ctx.is_private() is False and not ts.context_from(public).has_secret_key()
    client = ClientKeys(secret, server_ctx.key_id)
    layout = Layout(("x",), ((10,),), ("float32",), 4096)
    chunks = client.encrypt(np.arange(10.0), layout)
    vector = server_ctx.load(chunks[0], "test")
    doubled = (vector + vector).serialize()  # the server computes on it...
    with pytest.raises(ValueError, match="secret_key"):
        vector.decrypt()  # ...but cannot read it
    assert np.allclose(client.decrypt([doubled], layout), 2 * np.arange(10.0), atol=1e-6)  # a client can
    with pytest.raises(fk.ConfigError, match="holds a secret key.*can never decrypt"):
        PublicContext(secret)  # the server-side class refuses secret material outright


def reachable(root):
    """Every object reachable from ``root`` through attributes and containers."""
    seen, stack = set(), deque([root])
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, type(reachable), type(torch))):
            continue
        seen.add(id(obj))
        yield obj
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, deque)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())


def test_nothing_the_server_holds_can_decrypt(plain_and_he):
    _, run, fl = plain_and_he
    server = fl.server
    secret = to_bytes(next(iter(fl.clients.values())).state[STATE_KEY]["secret_context"])
    contexts = vectors = 0
    for obj in reachable(server):
        if isinstance(obj, ts.Context):
            contexts += 1
            assert not obj.is_private() and not obj.has_secret_key()
        elif isinstance(obj, ts.CKKSVector):
            vectors += 1
            assert not obj.context().is_private()
        elif isinstance(obj, torch.Tensor) and obj.dtype == torch.uint8:
            assert obj.numel() != len(secret) or to_bytes(obj) != secret
        elif isinstance(obj, (bytes, bytearray)):
            assert bytes(obj) != secret
    assert contexts >= 1 and vectors >= 2  # the walk did reach the server's HE objects
    assert set(server.weights) == set()  # no plaintext of the encrypted layers on the server
    vector = server.state["_he"].context.load(to_bytes(server.state[STATE_KEY]["global"][0]), "test")
    with pytest.raises(ValueError, match="secret_key"):
        vector.decrypt()
    # every client holds the same secret, and any of them recovers the same model the run reports
    other = global_plaintext(server.weights, server.state, fl.clients["site-3"].state)
    assert all(torch.allclose(other[k], run.weights[k], atol=1e-7) for k in run.weights)


# ------------------------------------------------------------------------------------ damaged ciphertexts

def _flip(result):
    chunks = list(result.data[CIPHERTEXTS])
    first = bytearray(chunks[0])
    first[len(first) // 2] ^= 0x01
    return result.with_data({**result.data, CIPHERTEXTS: [bytes(first), *chunks[1:]]})


def _foreign(ckks):
    """The same update encrypted under another federation's keys, posing as it can."""
    def damage(result):
        secret, public = new_keys(ckks)
        keys = ClientKeys(secret, PublicContext(public).key_id)
        forged = EncryptUpdate(keys, by_samples)
        task = fk.Task("train", fk.DXO("WEIGHTS", {}, {META_KEY: {"layout": result.meta[META_KEY]["layout"]}}))
        return forged(fk.DXO("WEIGHT_DIFF", DIFFS[1][0], {"num_samples": 30}), fk.FilterContext("client", "result", "c1", task))
    return damage


def _posing(result):
    """A ciphertext under other CKKS parameters, with the federation's key id and a matching digest."""
    forged = _foreign(CKKS(poly_modulus_degree=16384))(result)
    he = {**forged.meta[META_KEY], "key_id": result.meta[META_KEY]["key_id"]}
    he["digest"] = digest(he["key_id"], forged.data[CIPHERTEXTS])
    return fk.DXO("WEIGHT_DIFF", forged.data, {**forged.meta, META_KEY: he})


def _truncated(result):
    chunks = [c[: len(c) // 2] for c in result.data[CIPHERTEXTS]]
    he = {**result.meta[META_KEY], "digest": digest(result.meta[META_KEY]["key_id"], chunks)}
    return fk.DXO("WEIGHT_DIFF", {**result.data, CIPHERTEXTS: chunks}, {**result.meta, META_KEY: he})


def _reweighted(result):
    return result.with_data(result.data, num_samples=999)


DAMAGES = {
    "flipped byte": (_flip, "tampered with after encryption"),
    "another context": (_foreign(CKKS()), "built under another context \\(key id '[0-9a-f]{16}'; the federation's is"),
    "other parameters": (_posing, "does not deserialize under the federation's public context"),
    "truncated": (_truncated, "ciphertext 0 does not deserialize"),
    "plaintext": (lambda r: fk.DXO("WEIGHT_DIFF", DIFFS[1][0], {"num_samples": 30}), "without encryption"),
    "weight": (_reweighted, "weighted its encrypted update by 30.0, but its result gives an aggregation weight of 999"),
    **{f"fault {how}": (functools.partial(corrupt, how=how), reason) for how, reason in zip(CORRUPTIONS, (
        "tampered with", "tampered with", "sent no ciphertexts", "sent 1 ciphertext\\(s\\); the layout needs 2",
        "tampered with"))},
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_damaged_or_foreign_ciphertexts_are_rejected_with_a_reason(name):
    damage, reason = DAMAGES[name]
    clients, server, model = federation(WEIGHTS, DIFFS)
    replies = replies_for(clients, model, damage)
    results, _ = screen_encrypted(replies, model, by_samples, max_norm_ratio=10.0)
    assert sorted(results) == ["c0", "c2"]
    assert replies["c1"].status == "rejected"
    assert replies["c1"].error.startswith("client 'c1'")
    assert re.search(reason, replies["c1"].error), replies["c1"].error


def test_a_client_decrypts_each_model_once_and_refuses_one_it_cannot_trust(monkeypatch):
    clients, server, model = federation(WEIGHTS, DIFFS)
    task = fk.Task("train", model.task_data({}), round=2)
    decrypt = clients["c0"].task_data_filters[0]
    assert isinstance(decrypt, DecryptGlobal)
    calls = []
    monkeypatch.setattr(decrypt.keys, "decrypt", lambda chunks, layout, f=decrypt.keys.decrypt: calls.append(1) or f(chunks, layout))
    ctx = fk.FilterContext("client", "task", "c0", task)
    first = decrypt(task.data, ctx)
    assert torch.allclose(first.data["w"], WEIGHTS["w"], atol=1e-6) and first.meta["he_decrypt_s"] > 0
    first.data["w"].add_(1.0)  # an executor scribbling on what it received...
    assert torch.allclose(decrypt(task.data, ctx).data["w"], WEIGHTS["w"], atol=1e-6)  # ...does not touch the kept copy
    assert len(calls) == 1  # the same ciphertexts (same digest) are decrypted once
    with pytest.raises(fk.UpdateError, match="altered after encryption"):
        decrypt(_flip(task.data), ctx)
    other = task.data.with_data(task.data.data, **{META_KEY: {**task.data.meta[META_KEY], "key_id": "0" * 16}})
    with pytest.raises(fk.UpdateError, match="encrypted under key '0000000000000000', but this client holds key"):
        decrypt(other, ctx)
    plain = fk.DXO("WEIGHTS", {"w": torch.zeros(1)})
    assert decrypt(plain, ctx) is plain  # tasks without HE pass untouched


# ------------------------------------------------------------------------------------ whole runs

def test_he_run_ends_where_the_plaintext_run_ends(plain_and_he):
    plain, he, _ = plain_and_he
    assert he.status == "done" and len(he.history) == 3
    errors = relative_errors(he.weights, plain.weights)
    assert max(errors.values()) < 1e-4, errors
    assert max(errors.values()) > 0  # CKKS is approximate: it is a different computation
    assert {k: v.dtype for k, v in he.weights.items()} == {k: v.dtype for k, v in plain.weights.items()}


def test_costs_and_client_side_evaluation_are_in_the_history(plain_and_he):
    plain, he, _ = plain_and_he
    rounds = he.history.to_dataframe()
    assert "accuracy" not in rounds  # the server cannot score what it cannot read...
    acc = he.history.series("client_accuracy")  # ...the clients do, each round
    assert all(0 < a <= 1 for a in acc) and acc[-1] > acc[0] + 0.2, acc
    loss = he.history.series("client_loss")
    assert loss == sorted(loss, reverse=True), loss
    assert (rounds["clients_validated"] == 4).all()
    for col in ("he_encrypt_s", "he_decrypt_s", "he_aggregate_s"):
        assert (rounds[col] > 0).all(), col
    assert rounds["he_setup_s"].notna().sum() == 1
    layout_bytes = 4810 * 4  # the MLP for digits, float32
    assert (rounds["bytes_plain_up"] == 4 * layout_bytes).all() and (rounds["bytes_plain_down"] == 8 * layout_bytes).all()
    assert (rounds["bytes_cipher_up"] > 10 * rounds["bytes_plain_up"]).all()
    assert (rounds["bytes_cipher_down"] > 10 * rounds["bytes_plain_down"]).all()
    clients = he.history.client_dataframe()
    assert (clients["he_encrypt_s"] > 0).all() and (clients["he_decrypt_s"] > 0).all()
    assert (clients["bytes_up"] > 10 * layout_bytes).all()
    info = he.history.results["he"]
    assert info["evaluation"].startswith("clients") and info["ciphertexts"] == 2 and info["plaintext_layers"] == []


def test_fedprox_with_he_matches_plaintext_fedprox(digits, small):
    plain = simulate(digits, small, fk.FedProx(rounds=2, mu=0.1)).run(progress=False)
    he = simulate(digits, small, fk.FedProx(rounds=2, mu=0.1, he=CKKS())).run(progress=False)
    errors = relative_errors(he.weights, plain.weights)
    assert max(errors.values()) < 1e-4, errors
    fedavg = simulate(digits, small, fk.FedAvg(rounds=2)).run(progress=False)
    assert max(relative_errors(he.weights, fedavg.weights).values()) > 1e-3  # the proximal term did act


def test_regex_selection_keeps_other_layers_plaintext_end_to_end(digits, small):
    keep = Keep(fk.FedAvg(rounds=1, he=CKKS(layers=r"fc2\..*")))
    he = simulate(digits, small, keep).run(progress=False)
    server = keep.fl.server
    assert sorted(server.weights) == ["fc1.bias", "fc1.weight"]
    assert server.state[STATE_KEY]["layout"]["names"] == ["fc2.weight", "fc2.bias"]
    assert he.history.results["he"]["plaintext_layers"] == ["fc1.weight", "fc1.bias"]
    plain = simulate(digits, small, fk.FedAvg(rounds=1)).run(progress=False)
    errors = relative_errors(he.weights, plain.weights)
    assert errors["fc1.weight"] < 1e-6 and errors["fc2.weight"] < 1e-4, errors
    assert he.history.to_dataframe()["bytes_plain_up"][0] == 4 * (64 * 10 + 10) * 4


def test_client_sampling_and_faults_with_he(digits):
    parts = fk.data.iid(digits.train.subset(np.arange(600)), clients=6, seed=0)
    faults = fk.Faults(dropout=0.1, crash=0.1, corrupt=0.25, corruptions=("nan", "keys", "shape"), seed=2)
    settings = dict(rounds=3, clients_per_round=4, min_clients=2)
    plain = simulate(digits, parts, fk.FedAvg(**settings), faults=faults).run(progress=False)
    he = simulate(digits, parts, fk.FedAvg(**settings, he=CKKS()), faults=faults).run(progress=False)
    assert he.status == "done"
    rejected = [e for e in he.history.events if e["what"] == "rejected" and e.get("task") != "validate"]
    assert any("tampered" in e["reason"] or "ciphertext" in e["reason"] for e in rejected), rejected
    assert [sorted(r.clients) for r in he.history] == [sorted(r.clients) for r in plain.history]  # same sampling
    statuses = [{c: row["status"] for c, row in r.clients.items()} for r in he.history]
    assert statuses == [{c: row["status"] for c, row in r.clients.items()} for r in plain.history]  # same screening
    assert max(relative_errors(he.weights, plain.weights).values()) < 1e-4


def test_checkpoint_holds_ciphertexts_and_resume_keeps_the_keys(digits, small, tmp_path):
    def sim(out, on_round=()):
        return simulate(digits, small, fk.FedAvg(rounds=3, he=CKKS()), out=out, on_round=list(on_round))

    def stop_after_first(record):
        if record.round == 0:
            raise KeyboardInterrupt

    whole = sim(tmp_path / "whole").run(progress=False)
    cut = sim(tmp_path / "cut", [stop_after_first]).run(progress=False)
    assert cut.status == "aborted" and len(cut.history) == 1
    ckpt = checkpoint.load(tmp_path / "cut")
    assert ckpt.weights == {}  # the server's model file holds no plaintext of the encrypted layers
    held = ckpt.server_state[STATE_KEY]
    assert len(held["global"]) == 2 and not ts.context_from(to_bytes(held["public_context"])).has_secret_key()
    secrets = {to_bytes(s[STATE_KEY]["secret_context"]) for s in ckpt.client_states.values()}
    assert len(secrets) == 1 and ts.context_from(secrets.pop()).has_secret_key()  # the clients' part of the checkpoint
    resumed = sim(tmp_path / "cut").resume(progress=False)
    assert resumed.status == "done" and len(resumed.history) == 3
    assert resumed.history.results["he"]["key_id"] == cut.history.results["he"]["key_id"] == held["key_id"]
    assert max(relative_errors(resumed.weights, whole.weights).values()) < 1e-5  # equal up to CKKS noise (~1e-7)
    saved = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert fk.weights.sha256(saved) == resumed.model_sha256  # the run's model file: decrypted by a client


# ------------------------------------------------------------------------------------ command line

def _args(*argv):
    p = argparse.ArgumentParser()
    add_he_arguments(p.add_argument_group("homomorphic encryption"))
    return p.parse_args(list(argv))


def test_cli_options_build_the_ckks_settings():
    assert he_from_args(_args()) is None
    assert he_from_args(_args("--he")) == CKKS()
    got = he_from_args(_args("--he", "--he-poly-modulus", "16384", "--he-coeff-mod-bits", "60,40,40,40,60",
                             "--he-scale-bits", "40", "--he-layers", "fc2.*", "conv1.weight"))
    assert got == CKKS(16384, (60, 40, 40, 40, 60), 40, ("fc2.*", "conv1.weight"))
    # as `fedkit run --resume` reads them back from cli.json
    saved = argparse.Namespace(**json.loads(json.dumps(vars(_args("--he", "--he-layers", "fc2.*")))))
    assert he_from_args(saved) == CKKS(layers="fc2.*")


@pytest.mark.parametrize("argv, match", [
    (["--he-layers", "fc2.*"], "--he-layers only mean something with --he"),
    (["--he", "--he-coeff-mod-bits", "60,forty,60"], "comma-separated whole numbers"),
    (["--he", "--he-poly-modulus", "4096"], "allows at most 109 bits"),
    (["--he", "--he-layers", "fc("], "not a valid regular expression"),
])
def test_bad_cli_options_are_explained(argv, match):
    with pytest.raises(fk.ConfigError, match=match):
        he_from_args(_args(*argv))


def test_client_keys_are_cached_and_missing_keys_explained():
    with pytest.raises(fk.ConfigError, match="holds no HE key"):
        client_keys({})
    clients, _, _ = federation(WEIGHTS, DIFFS)
    state = clients["c0"].state
    assert client_keys(state) is client_keys(state) is state["_he_keys"]
    assert math.isclose(state["_he_keys"].context.global_scale, 2.0 ** 40)


def test_fedkit_imports_without_loading_tenseal():
    """TenSEAL is an optional extra (fedkit[privacy]): it is imported only when a run encrypts."""
    import subprocess
    import sys
    code = "import sys, fedkit, fedkit.privacy.he; print('tenseal' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
