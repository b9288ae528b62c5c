"""What does homomorphic encryption cost a FedAvg round, and how much of that is fedkit's own doing?

Runs, in one process, FedAvg with SimpleNetwork (62k parameters, CIFAR-10's classic net) over 8
clients holding random CIFAR-shaped data (no download), in plaintext and with CKKS (TenSEAL,
defaults: N=8192, primes 60,40,40,60, scale 2^40), and prints two ratios:

  1. HE round time / plaintext round time (median seconds of a round, as the history records it).
     The plaintext run scores the global model on a server test set as large as the clients'
     validation splits together; the HE run has the clients score it (a validate task), as its
     server cannot.
  2. fedkit's HE seconds per round (clients' encryption and decryption, server's screening and
     aggregation: he_encrypt_s + he_decrypt_s + he_aggregate_s) / the seconds TenSEAL alone needs to
     encrypt and decrypt the same vectors (every client encrypts its update and decrypts the new
     global model, which it validates and then trains on). 1.0 is the floor: what is above it is
     aggregation, serialization, packing and checks. A breakdown compares like with like.

    python benchmarks/he.py                     # 8 clients x 256 samples, 3 rounds, median of 3
    python benchmarks/he.py --samples 1000 --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import tenseal as ts
import torch

import fedkit as fk
from fedkit.privacy.he import CKKS, layout_for, pack

HE_COLUMNS = ("he_encrypt_s", "he_decrypt_s", "he_aggregate_s")


def random_cifar(n: int, seed: int) -> fk.Dataset:
    g = torch.Generator().manual_seed(seed)
    return fk.Dataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(10, (n,), generator=g), 10, "random-cifar")


def federated(parts, test, args, he: CKKS | None):
    sim = fk.Simulator(fk.FedAvg(rounds=args.rounds, he=he), model=fk.models.SimpleNetwork, clients=parts, test=test,
                       train=fk.TrainConfig(epochs=1, batch_size=16), seed=0, device="cpu")
    run = sim.run(progress=False)
    assert run.status == "done"
    return run.history.to_dataframe()


def tenseal_alone(ckks: CKKS, flat: np.ndarray, sizes: list[int], clients: int) -> dict[str, float]:
    """Seconds bare TenSEAL needs for one round's HE work on ``flat`` (the packed model) in ciphertexts of ``sizes``
    numbers (the layout's: each layer in ciphertexts of its own)."""
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, ckks.poly_modulus_degree, coeff_mod_bit_sizes=list(ckks.coeff_mod_bit_sizes))
    ctx.global_scale = 2.0 ** ckks.scale_bits
    edges = np.cumsum([0, *sizes])
    chunks = [flat[a:b] for a, b in zip(edges[:-1], edges[1:])]
    t = time.perf_counter()
    encrypted = [[ts.ckks_vector(ctx, c) for c in chunks] for _ in range(clients)]
    encrypt = time.perf_counter() - t
    t = time.perf_counter()
    share = 1.0 / clients  # fedkit scales each client's ciphertext by its public share of the weight, then adds
    total = [sum((v * share for v in vs[1:]), vs[0] * share) for vs in zip(*encrypted)]
    aggregate = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(clients):  # each client decrypts each new global model once (to validate it, then train on it)
        for v in total:
            v.decrypt()
    decrypt = time.perf_counter() - t
    return {"encrypt": encrypt, "decrypt": decrypt, "aggregate": aggregate, "chunks": len(chunks)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--samples", type=int, default=256, help="samples per client (10%% of them validate)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3, help="alternate runs; the medians are compared")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's); 1 is steadier on a "
                                                             "machine that others share")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train = random_cifar(args.clients * args.samples, seed=0)
    parts = fk.data.iid(train, args.clients, seed=0)
    test = random_cifar(round(0.1 * args.samples) * args.clients, seed=1)
    ckks = CKKS()
    model = fk.models.SimpleNetwork()
    layout = layout_for(model.state_dict(), ckks)
    flat = pack(model.state_dict(), layout)
    print(f"SimpleNetwork ({len(flat)} parameters), {args.clients} clients x {args.samples} samples, {args.rounds} "
          f"rounds, CKKS N={ckks.poly_modulus_degree} {list(ckks.coeff_mod_bit_sizes)} 2^{ckks.scale_bits}, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeat}")

    federated(parts, test, args, None)  # warm-up: first-call costs of torch kernels and TenSEAL
    plain_s, he_s, fedkit_he, bare, rows = [], [], [], [], []
    for _ in range(args.repeat):  # alternate, so that drifts in machine speed hit all alike
        plain = federated(parts, test, args, None)
        he = federated(parts, test, args, ckks)
        plain_s.append(plain["seconds"].median())
        he_s.append(he["seconds"].median())
        fedkit_he.append(he[list(HE_COLUMNS)].sum(axis=1).median())
        rows.append(he[list(HE_COLUMNS)].median())
        bare.append(tenseal_alone(ckks, flat, layout.chunk_sizes, args.clients))
    plain_round, he_round, fk_he = statistics.median(plain_s), statistics.median(he_s), statistics.median(fedkit_he)
    enc, dec, agg = (statistics.median(b[k] for b in bare) for k in ("encrypt", "decrypt", "aggregate"))
    col = {c: statistics.median(r[c] for r in rows) for c in HE_COLUMNS}
    last = he.iloc[-1]
    print(f"round: plaintext {plain_round:.3f}s, HE {he_round:.3f}s")
    print(f"ratio HE round / plaintext round: {he_round / plain_round:.3f}")
    print(f"HE per round: fedkit {fk_he:.3f}s (encrypt {col['he_encrypt_s']:.3f}, decrypt {col['he_decrypt_s']:.3f}, "
          f"aggregate {col['he_aggregate_s']:.3f}); TenSEAL alone {enc + dec:.3f}s (encrypt {enc:.3f}, decrypt {dec:.3f}) "
          f"for {bare[0]['chunks']} ciphertexts per model")
    print(f"ratio fedkit HE / TenSEAL encrypt+decrypt: {fk_he / (enc + dec):.3f}   (floor 1.0; like for like: encrypt "
          f"{col['he_encrypt_s'] / enc:.2f}, decrypt {col['he_decrypt_s'] / dec:.2f}, aggregate "
          f"{col['he_aggregate_s'] / agg:.2f} vs TenSEAL's {agg:.3f}s; all HE work {fk_he / (enc + dec + agg):.3f})")
    print(f"bytes per round: up {last['bytes_cipher_up'] / 1e6:.1f} MB ciphertext vs {last['bytes_plain_up'] / 1e6:.2f} MB "
          f"plaintext ({last['bytes_cipher_up'] / last['bytes_plain_up']:.0f}x), down {last['bytes_cipher_down'] / 1e6:.1f} "
          f"MB vs {last['bytes_plain_down'] / 1e6:.2f} MB ({last['bytes_cipher_down'] / last['bytes_plain_down']:.0f}x)")


if __name__ == "__main__":
    main()
