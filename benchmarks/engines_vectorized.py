"""The vectorized engine against the sequential one: wall-time speed-up of whole runs, measured side by side.

For each model (the digits MLP and SmallCNN, ``fk.models.for_data(data, "mlp" / "cnn")``) and each number
of clients (an IID split of digits' training set), it times the same FedAvg run (``--rounds`` rounds,
``--epochs`` local epochs, the blocking ``Simulator.run``, no progress bar) with ``engine=fk.engine.sequential``
and with ``engine=fk.engine.vectorized``, alternating, ``--repeats`` times each, and prints the median seconds
of the whole run and of the time spent inside the engine (the clients' side; the rest is the server's
screening, aggregation and test scoring, the same for both), the speed-ups sequential / vectorized and whether
both ended with the same weights (max abs difference). On CPU, and on CUDA too when it is available.

    python benchmarks/engines_vectorized.py                       # 16 64 256 clients, mlp and cnn, 2 rounds
    python benchmarks/engines_vectorized.py --clients 64 --models mlp --rounds 3 --repeats 3 --epochs 1 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fedkit as fk


def timed(data, parts, kind: str, rounds: int, epochs: int, engine, device: str,
          threads: int) -> tuple[float, float, dict]:
    """Seconds of the whole run, seconds inside the engine (the clients' side), final weights."""
    inside = [0.0]

    def clocked(clients, server, dev, abort):
        start = time.perf_counter()
        try:
            engine(clients, server, dev, abort)
        finally:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            inside[0] += time.perf_counter() - start

    sim = fk.Simulator(fk.FedAvg(rounds=rounds), model=lambda: fk.models.for_data(data, kind), clients=parts,
                       test=data.test, train=fk.TrainConfig(epochs=epochs), seed=0, engine=clocked, device=device,
                       threads=threads)
    start = time.perf_counter()
    run = sim.run(progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, inside[0], run.weights


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    data = fk.data.load("digits")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and not args.cpu_only else [])
    engines = {"sequential": fk.engine.sequential, "vectorized": fk.engine.vectorized}
    print(f"digits, FedAvg {args.rounds} rounds, batch 16, torch threads {args.threads}, median of {args.repeats}; "
          "whole run (server included) and, in brackets, the engine alone (the clients' side)")
    print(f"{'device':>6} {'model':>5} {'epochs':>6} {'clients':>7} {'sequential':>17} {'vectorized':>17} "
          f"{'speed-up':>16} {'max |dw|':>9}")
    for device in devices:
        for kind in args.models:
            warm = fk.data.iid(data.train, clients=4, seed=0)
            for engine in engines.values():  # first runs pay one-off set-up (threads, allocator, vmap)
                timed(data, warm, kind, 1, 1, engine, device, args.threads)
            for epochs in args.epochs:
                for clients in args.clients:
                    parts = fk.data.iid(data.train, clients=clients, seed=0)
                    times: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
                    weights = {}
                    for _ in range(args.repeats):  # alternating: a drift in the machine's load hits both alike
                        for name, engine in engines.items():
                            whole, inside, weights[name] = timed(data, parts, kind, args.rounds, epochs, engine,
                                                                 device, args.threads)
                            times[name].append((whole, inside))
                    (seq, seq_in), (vec, vec_in) = ([statistics.median(x) for x in zip(*times[name])]
                                                    for name in ("sequential", "vectorized"))
                    diff = max((weights["sequential"][k] - weights["vectorized"][k]).abs().max().item()
                               for k in weights["sequential"])
                    print(f"{device:>6} {kind:>5} {epochs:>6} {clients:>7} {seq:7.2f}s ({seq_in:5.2f}s) "
                          f"{vec:7.2f}s ({vec_in:5.2f}s) {seq / vec:6.1f}x ({seq_in / vec_in:5.1f}x) {diff:9.1e}",
                          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, nargs="+", default=[1], help="local epochs per round (TrainConfig)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpu-only", action="store_true", help="skip CUDA even when it is available")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
