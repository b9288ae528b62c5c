"""Does the Ray engine pay? The same FedAvg run with the sequential engine and with Ray's local workers, side by side.

The run: ``fk.FedAvg(rounds=R)`` over ``--clients`` iid clients of generated 3x32x32 images (10 classes,
``--samples`` per client), a `fk.models.SmallCNN` of ``--width`` (or ``--model simple``: SimpleNetwork), batch 32,
one epoch, no client-side validation. Measured in this one process, alternating, ``--repeat`` times each:
  * sequential, torch at 1 thread (what each Ray worker uses), and at ``--workers`` threads (the same cores);
  * ray: a local Ray with ``--workers`` CPUs, one task per client, one torch thread per worker.
Ray's startup (``ray.init`` and warming its workers: each imports torch) is timed separately, once: it is paid
once per process (per notebook kernel), not per run. Prints the best wall time of each, the ratios, and each
one's ``model_sha256`` (ray and sequential at 1 thread must agree: the same bits).

    python benchmarks/engines_ray.py                               # 4 clients, 2 rounds, 2 workers
    python benchmarks/engines_ray.py --samples 1024 --width 64 --repeat 3
"""

from __future__ import annotations

import argparse
import time

import torch

import fedkit as fk


def federation(args: argparse.Namespace) -> tuple[list[fk.Dataset], fk.Dataset]:
    g = torch.Generator().manual_seed(0)
    n = args.clients * args.samples
    x = torch.randn(n + 256, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n + 256,), generator=g)
    data = fk.Dataset(x[:n], y[:n], 10)
    return fk.data.iid(data, clients=args.clients, seed=0), fk.Dataset(x[n:], y[n:], 10)


def model_fn(args: argparse.Namespace):
    if args.model == "simple":
        return fk.models.SimpleNetwork
    return lambda: fk.models.SmallCNN(in_channels=3, side=32, width=args.width)


def timed(args: argparse.Namespace, parts, test, engine, threads: int) -> tuple[float, str]:
    sim = fk.Simulator(fk.FedAvg(rounds=args.rounds), model=model_fn(args), clients=parts, test=test, seed=0,
                       train=fk.TrainConfig(batch_size=32, validate=False), val_fraction=0.0, engine=engine,
                       threads=threads)
    t0 = time.perf_counter()
    run = sim.run(progress=False)
    assert run.status == "done", run.status
    return time.perf_counter() - t0, run.model_sha256


def run(args: argparse.Namespace) -> dict:
    parts, test = federation(args)
    params = sum(p.numel() for p in model_fn(args)().parameters())
    print(f"{args.clients} clients x {args.samples} samples (3x32x32), {args.rounds} rounds, batch 32, "
          f"{args.model} ({params:,} parameters), {args.workers} workers; {torch.get_num_threads()} torch threads "
          "by default here")
    with fk.engine.ray(num_cpus=args.workers, threads=1) as engine:
        t0 = time.perf_counter()
        engine.start()
        startup = time.perf_counter() - t0
        print(f"ray startup (init + warming {args.workers} workers): {startup:.2f} s")
        times: dict[str, list[float]] = {"sequential-1": [], f"sequential-{args.workers}": [], "ray": []}
        hashes: dict[str, str] = {}
        for i in range(args.repeat):
            order = list(times) if i % 2 == 0 else list(reversed(times))
            for name in order:
                eng, threads = ("sequential", int(name.split("-")[1])) if name != "ray" else (engine, 1)
                seconds, sha = timed(args, parts, test, eng, threads)
                times[name].append(seconds)
                hashes[name] = sha
                print(f"  {name:>14}: {seconds:7.2f} s  {sha[:12]}", flush=True)
    best = {k: min(v) for k, v in times.items()}
    print("best wall time: " + ", ".join(f"{k} {v:.2f} s" for k, v in best.items()))
    print(f"ratio sequential-1 / ray: {best['sequential-1'] / best['ray']:.2f}x; "
          f"sequential-{args.workers} / ray: {best[f'sequential-{args.workers}'] / best['ray']:.2f}x "
          f"(> 1: ray is faster); ray startup {startup:.2f} s, once per process")
    same = hashes["ray"] == hashes["sequential-1"]
    print(f"model_sha256 ray == sequential at 1 thread: {same}")
    return {"startup_s": startup, "best_s": best, "same_bits": same, "hashes": hashes}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--samples", type=int, default=512, help="per client")
    p.add_argument("--model", choices=("cnn", "simple"), default="cnn")
    p.add_argument("--width", type=int, default=32, help="SmallCNN's width")
    p.add_argument("--workers", type=int, default=2, help="Ray's local CPUs (and the threads of the 2nd sequential)")
    p.add_argument("--repeat", type=int, default=1)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
