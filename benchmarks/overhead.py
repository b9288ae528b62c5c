"""What does federation cost over centralized training of the same work?

Runs, in one process and on the same device:
  * FedAvg over N clients for R rounds of E local epochs (no client validation, server test
    evaluation each round), and
  * centralized SGD over the union of the clients' data with the same model, batch size and
    number of sample-gradients (R * E epochs), evaluating on the same test set R times.
and prints the ratio of wall times, federated / centralized. FL does the same arithmetic, so the
ideal is 1.0; what is above it is fedkit's overhead (task plumbing, weight copies, aggregation),
plus the cost of N smaller last batches.

    python benchmarks/overhead.py                  # digits, 8 clients, 20 rounds
    python benchmarks/overhead.py --models cnn --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fedkit as fk
from fedkit.train import evaluate, sgd_epochs


def federated(data, parts, args, device, model) -> tuple[float, int]:
    sim = fk.Simulator(fk.FedAvg(rounds=args.rounds), model=lambda: fk.models.for_data(data, model), clients=parts,
                       test=data.test, train=fk.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, validate=False),
                       val_fraction=0.0, seed=0, device=device)
    t = time.perf_counter()
    run = sim.run(progress=False)
    seconds = time.perf_counter() - t
    assert run.status == "done"
    return seconds, int(run.history.client_dataframe()["steps"].sum())


def centralized(data, parts, args, device, model_kind) -> tuple[float, int]:
    union = data.train.subset(sorted(i for idx in parts.indices for i in idx))
    t = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = fk.models.for_data(data, model_kind).to(device)
    train = fk.Dataset(union.x.to(device), union.y.to(device), union.num_classes)
    test = fk.Dataset(data.test.x.to(device), data.test.y.to(device), union.num_classes)
    cfg = fk.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, validate=False)
    steps = 0
    for r in range(args.rounds):
        steps += sgd_epochs(model, train, cfg, seed=r, abort=fk.Signal())["steps"]
        evaluate(model, test, device)
    return time.perf_counter() - t, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn, simple (cifar10), auto")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3, help="alternate runs; the median of each is compared")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); "
                   "1 gives steadier timings on a busy machine")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = fk.train.resolve_device(args.device)
    data = fk.data.load(args.dataset)
    parts = fk.data.iid(data.train, args.clients, seed=0)
    print(f"{args.dataset}, {args.clients} clients x {args.rounds} rounds x {args.epochs} epoch(s), batch "
          f"{args.batch_size}, device {device}, torch threads {torch.get_num_threads()}, median of {args.repeat}")
    for model in args.models.split(","):
        federated(data, parts, args, device, model)  # warm-up: first-call costs of torch kernels
        fed, cen = [], []
        for _ in range(args.repeat):  # alternate, so that drifts in machine speed hit both alike
            fed.append(federated(data, parts, args, device, model))
            cen.append(centralized(data, parts, args, device, model))
        f, c = statistics.median(s for s, _ in fed), statistics.median(s for s, _ in cen)
        steps_ratio = fed[0][1] / cen[0][1]
        print(f"[{model}] federated {f:.3f}s ({fed[0][1]} SGD steps), centralized {c:.3f}s ({cen[0][1]} steps)")
        print(f"[{model}] ratio federated/centralized: {f / c:.3f}   (steps ratio {steps_ratio:.3f}: each client's "
              f"last, partial batch; time per step ratio {f / c / steps_ratio:.3f})")

if __name__ == "__main__":
    main()
