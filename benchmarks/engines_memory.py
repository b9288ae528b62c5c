"""Does the number of registered clients change a run's memory beyond the clients' data?

For each count in ``--counts`` (default 1,000 and 10,000 registered clients) a fresh subprocess (so the runs
share no peak) generates ``--samples`` random 64-feature samples per client (plus a few for validation),
then runs FedAvg with ``--per-round`` clients sampled per round for ``--rounds`` rounds (the MLP, the sequential
engine, one torch thread, a small test set scored each round), and prints:
  * data: the bytes of the clients' tensors (which may scale with the clients), and the RSS after making them;
  * peak RSS of the process (``resource.getrusage``), and peak minus the RSS with the data made: what the
    federation and the run cost on top of the data;
  * (in a second, traced process) the peak of Python allocations while building the simulator and running (``tracemalloc``; torch's tensor
    memory is not in it, the Python objects per client are);
  * the most nn.Module instances alive, and entries in all clients' ``state``, at the end of a round (in the
    traced process). The seconds are the plain run's.
The per-client data overhead (one Dataset and a few tensor headers per client) is part of "data".

    python benchmarks/engines_memory.py                      # 1000 vs 10000 clients, 100 per round, 3 rounds
    python benchmarks/engines_memory.py --counts 1000,10000,20000 --rounds 5
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(count: int, args, probe: bool) -> dict:
    """One run; with ``probe``, traced (tracemalloc) and counted each round, else plain, for its peak RSS (the
    tracing and the census of objects cost memory of their own, which grows with the objects)."""
    import tracemalloc

    import torch
    from torch import nn

    torch.set_num_threads(1)
    import fedkit as fk
    from fedkit.data import ClientData

    g = torch.Generator().manual_seed(0)
    gen = lambda n: fk.Dataset(torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g), 10)  # noqa: E731
    test = gen(200)
    # warm-up: a tiny run first, so that lazy imports (torch's optimizer imports torch._dynamo: ~100 MB) and
    # first-call allocations are in the baseline, not in the figures
    fk.Simulator(fk.FedAvg(rounds=1), model=lambda: fk.models.MLP(64, 10), clients=[gen(20), gen(20)], test=test,
                 device="cpu", threads=1).run(progress=False)
    gc.collect()
    rss_start = rss_mb()
    clients = [ClientData(gen(args.samples), gen(max(1, args.samples // 10))) for _ in range(count)]
    data_bytes = sum(t.numel() * t.element_size() for c in clients for d in (c.train, c.val) for t in (d.x, d.y))
    gc.collect()
    rss_data = rss_mb()
    held = {"models": 0, "state_entries": 0}

    def census(record) -> None:  # at the end of each round: what the federation holds while it runs
        gc.collect()
        with warnings.catch_warnings():  # isinstance on some of torch's deprecated objects warns
            warnings.simplefilter("ignore")
            held["models"] = max(held["models"], sum(isinstance(o, nn.Module) for o in gc.get_objects()))
            states = [o for o in gc.get_objects() if isinstance(o, fk.Client) and o.state]
        held["state_entries"] = max(held["state_entries"], sum(len(c.state) for c in states))

    if probe:
        tracemalloc.start()
    sim = fk.Simulator(fk.FedAvg(rounds=args.rounds, clients_per_round=args.per_round),
                       model=lambda: fk.models.MLP(64, 10), clients=clients, test=test, seed=0, device="cpu", threads=1,
                       on_round=[census] if probe else [])
    built = time.perf_counter()
    run = sim.run(progress=False)
    seconds = time.perf_counter() - built
    _, py_peak = tracemalloc.get_traced_memory() if probe else (0, 0)
    tracemalloc.stop()
    assert run.status == "done", run.status
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"clients": count, "data_mb": data_bytes / 2**20, "rss_start_mb": rss_start, "rss_with_data_mb": rss_data,
            "peak_rss_mb": peak, "peak_minus_data_mb": peak - rss_data, "python_peak_mb": py_peak / 2**20,
            "models_alive": held["models"], "run_seconds": seconds, "state_entries": held["state_entries"]}


def run(args) -> list[dict]:
    rows = []
    for count in [int(c) for c in str(args.counts).split(",")]:
        row = {}
        for probe in (False, True):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(count), "--rounds", str(args.rounds),
                   "--per-round", str(args.per_round), "--samples", str(args.samples)] + (["--probe"] if probe else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
            got = json.loads(done.stdout.strip().splitlines()[-1])
            keep = ("python_peak_mb", "models_alive", "state_entries") if probe else tuple(got)
            row.update({k: got[k] for k in keep})
        rows.append(row)
    print(f"FedAvg, {args.per_round} clients per round, {args.rounds} rounds, {args.samples} samples per client "
          f"(64 features), MLP, one torch thread; each count in its own process")
    print(f"{'clients':>8} {'data MB':>8} {'RSS+data':>9} {'peak RSS':>9} {'peak-data':>10} {'py peak':>8} "
          f"{'models':>7} {'state':>6} {'seconds':>8}")
    for r in rows:
        print(f"{r['clients']:>8} {r['data_mb']:>8.1f} {r['rss_with_data_mb']:>9.1f} {r['peak_rss_mb']:>9.1f} "
              f"{r['peak_minus_data_mb']:>10.1f} {r['python_peak_mb']:>8.1f} {r['models_alive']:>7} "
              f"{r['state_entries']:>6} {r['run_seconds']:>8.2f}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="1000,10000", help="registered clients, comma-separated")
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=20, help="training samples per client")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args, args.probe)))
    else:
        run(args)


if __name__ == "__main__":
    main()
