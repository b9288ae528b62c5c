"""What does DP-SGD cost over plain local training, and what accuracy does privacy leave?

By default, on one device and the same data (the digits training set as one client's data), it times
one round of local training (``--epochs`` epochs, batch ``--batch-size``) two ways, alternating runs:
  * non-private: the standard trainer's SGD loop (`fedkit.train.sgd_epochs`), and
  * DP-SGD: the same loop with `fedkit.privacy.dp.DPSGD` (Poisson batches, per-example gradients and
    clipping by Opacus, noise), including the accounting after the round,
and prints the ratio of the median times, DP-SGD / non-private. Per-example gradients are the cost.

With ``--levels`` it instead trains on digits at three privacy levels, with the noise chosen for each
target epsilon, and prints the final accuracy of DP-SGD (8 clients) and DP-FedAvg (200 clients):

    python benchmarks/dp.py                    # the time ratio
    python benchmarks/dp.py --levels           # accuracy at three privacy levels
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fedkit as fk
from fedkit.exchange import ClientContext
from fedkit.privacy.dp import DPSGD, DPFedAvg
from fedkit.train import LocalTraining, sgd_epochs


def local_round(data: fk.Dataset, cfg: fk.TrainConfig, model_kind: str, device: torch.device, state: dict,
                seed: int, dp: DPSGD | None = None) -> tuple[float, int]:
    """Seconds and steps of one round of local training from a fresh model (DP-SGD's client half with ``dp``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = fk.models.for_data(DATA, model_kind).to(device)
    started = time.perf_counter()
    task = fk.Task("train", fk.DXO(fk.DataKind.WEIGHTS, {}))
    t = LocalTraining(task, ClientContext("bench", None, state, device, seed), model, {}, data, cfg)
    if dp is not None:
        dp.client_begin(t)  # what the standard trainer does: Poisson batches, Opacus' DPOptimizer
    t.stats = sgd_epochs(model, data, cfg, seed, fk.Signal(), private=t.private)
    if dp is not None:
        dp.client_end(t)  # the accounting
    return time.perf_counter() - started, t.stats["steps"]


def timing(args: argparse.Namespace, device: torch.device) -> None:
    data = fk.Dataset(DATA.train.x.to(device), DATA.train.y.to(device), DATA.train.num_classes)
    plain = fk.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, validate=False)
    dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)
    print(f"{len(data)} examples, {args.epochs} epoch(s), batch {args.batch_size}, device {device}, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeat}")
    for kind in args.models.split(","):
        state: dict = {}
        local_round(data, plain, kind, device, state, 0)  # warm-up: first-call costs of kernels and hooks
        local_round(data, plain, kind, device, state, 0, dp)
        p, d = [], []
        for r in range(args.repeat):  # alternate, so that drifts in machine speed hit both alike
            p.append(local_round(data, plain, kind, device, state, r + 1))
            d.append(local_round(data, plain, kind, device, state, r + 1, dp))
        tp, td = statistics.median(s for s, _ in p), statistics.median(s for s, _ in d)
        per_step = (td / d[0][1]) / (tp / p[0][1])
        print(f"[{kind}] non-private {tp:.3f}s ({p[0][1]} steps), DP-SGD {td:.3f}s ({d[0][1]} Poisson steps)")
        print(f"[{kind}] ratio DP-SGD/non-private: {td / tp:.2f}   (per step {per_step:.2f})")


def levels(args: argparse.Namespace, device: torch.device) -> None:
    model = lambda: fk.models.for_data(DATA)  # noqa: E731
    parts = fk.data.iid(DATA.train, clients=8, seed=0)
    print(f"DP-SGD: 8 clients, {args.rounds} rounds, batch 16, lr 0.1, max_grad_norm 1.0, delta 1e-5 (noise from the target)")
    base = dict(lr=0.1, validate=False)
    for target in (None, 8.0, 3.0, 1.0):
        private = () if target is None else (DPSGD(target_epsilon=target),)  # the noise for the workflow's rounds
        run = fk.Simulator(fk.FedAvg(rounds=args.rounds, extensions=private), model=model, clients=parts, test=DATA.test,
                           seed=0, device=device, train=fk.TrainConfig(**base)).run(progress=False)
        eps = run.summary()["client_epsilon"]
        print(f"  target epsilon {target if target else 'none':>4}: accuracy {run.summary()['final_accuracy']:.3f}, "
              f"epsilon spent {eps if eps is not None else float('inf'):.2f}")
    parts = fk.data.iid(DATA.train, clients=200, seed=0)
    rounds = 2 * args.rounds
    print(f"DP-FedAvg: 200 clients, sample rate 0.25, {rounds} rounds, clip 1.0, delta 1e-3 (noise from the target)")
    for target in (None, 10.0, 5.0, 2.0):
        wf = (fk.FedAvg(rounds=rounds, sample_rate=0.25, weigh=fk.aggregate.uniform) if target is None else
              DPFedAvg(rounds=rounds, clip=1.0, noise_multiplier=None, target_epsilon=target, sample_rate=0.25, delta=1e-3))
        run = fk.Simulator(wf, model=model, clients=parts, test=DATA.test, seed=0, val_fraction=0.0, device=device,
                           train=fk.TrainConfig(epochs=2, validate=False)).run(progress=False)
        eps = run.summary()["epsilon"]
        print(f"  target epsilon {target if target else 'none':>4}: accuracy {run.summary()['final_accuracy']:.3f}, "
              f"epsilon spent {eps if eps is not None else float('inf'):.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5, help="alternate runs; the median of each is compared")
    p.add_argument("--levels", action="store_true", help="accuracy at three privacy levels instead of timing")
    p.add_argument("--rounds", type=int, default=10, help="--levels: DP-SGD rounds (DP-FedAvg runs twice as many)")
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    device = fk.train.resolve_device(args.device)
    (levels if args.levels else timing)(args, device)


DATA = fk.data.load("digits")

if __name__ == "__main__":
    main()
