"""How many torch CPU threads should a small model's run use? Torch's default (one per core) against one.

It times the same run (FedAvg on digits with its MLP, ``--clients`` clients, ``--rounds`` rounds, the
blocking ``Simulator.run`` in the main thread, no progress bar) with ``threads=<torch's default>`` and with
``threads=1``, alternating, ``--repeats`` times each, in two conditions measured in this one process:
  * idle: nothing else started by this script, and
  * contended: with ``--competitors`` CPU-bound processes started by this script (``--competitor python``: a
    busy loop each; ``torch``: small matrix products with torch's default threads, as another notebook or
    test suite training a small model), as on a shared machine or a laptop doing something else,
and prints the median seconds and the ratio default / one thread for each, plus each setting's
``model_sha256``: the same for every repeat of one setting (deterministic), different between settings.

    python benchmarks/threads.py                   # 3 rounds, 2 repeats, 1 competitor
    python benchmarks/threads.py --rounds 5 --repeats 3 --competitors 2 --competitor torch
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

import fedkit as fk

# what a competing process does: a Python busy loop (one busy core), or small torch products with torch's default
# threads (another notebook or test suite training a small model: a second OpenMP pool on the same cores)
BUSY = {"python": "while True: pass",
        "torch": "import torch\nx = torch.randn(256, 256)\nwhile True:\n    y = x @ x"}


def timed(data: fk.data.Data, parts: fk.data.Partition, rounds: int, threads: int) -> tuple[float, str]:
    sim = fk.Simulator(fk.FedAvg(rounds=rounds), model=lambda: fk.models.for_data(data), clients=parts,
                       test=data.test, seed=0, threads=threads)
    start = time.perf_counter()
    run = sim.run(progress=False)
    return time.perf_counter() - start, run.model_sha256


def measure(data, parts, rounds: int, repeats: int, default: int) -> dict[int, tuple[list[float], set[str]]]:
    results: dict[int, tuple[list[float], set[str]]] = {default: ([], set()), 1: ([], set())}
    for _ in range(repeats):
        for threads in (default, 1):  # alternating: a drift in the machine's load hits both alike
            seconds, sha = timed(data, parts, rounds, threads)
            results[threads][0].append(seconds)
            results[threads][1].add(sha)
    return results


def report(condition: str, results, default: int) -> None:
    d, one = statistics.median(results[default][0]), statistics.median(results[1][0])
    print(f"{condition:>10}: default ({default} threads) {d:7.2f}s  one thread {one:7.2f}s  ratio default/one "
          f"{d / one:6.2f}   (runs: default {', '.join(f'{s:.2f}' for s in results[default][0])}; "
          f"one {', '.join(f'{s:.2f}' for s in results[1][0])})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--competitors", type=int, default=1, help="CPU-bound processes started for the contended case")
    p.add_argument("--competitor", choices=tuple(BUSY), default="python", help="what each competitor runs")
    a = p.parse_args()
    default = torch.get_num_threads()
    data = fk.data.load("digits")
    parts = fk.data.iid(data.train, clients=a.clients, seed=0)
    size = sum(q.numel() for q in fk.models.for_data(data).parameters())
    print(f"digits MLP ({size} parameters), FedAvg, {a.clients} clients, {a.rounds} rounds, {a.repeats} repeats; "
          f"torch {torch.__version__}, default threads {default}, {torch.get_num_interop_threads()} inter-op")
    timed(data, parts, 1, 1)  # warm-up: imports, first allocations
    idle = measure(data, parts, a.rounds, a.repeats, default)
    busy = [subprocess.Popen([sys.executable, "-c", BUSY[a.competitor]]) for _ in range(a.competitors)]
    try:
        time.sleep(3 if a.competitor == "torch" else 0.5)  # torch's import takes a while
        contended = measure(data, parts, a.rounds, a.repeats, default)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    report("idle", idle, default)
    report(f"contended ({a.competitors} busy {a.competitor} process{'es' if a.competitors > 1 else ''})", contended,
           default)
    for threads in (default, 1):
        shas = idle[threads][1] | contended[threads][1]
        print(f"threads={threads}: model_sha256 {'deterministic' if len(shas) == 1 else 'VARIES'}: "
              f"{', '.join(sorted(s[:16] for s in shas))}")


if __name__ == "__main__":
    main()
