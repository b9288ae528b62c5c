"""Time the partitioners on digits with many clients (the hardening issue's item 8).

    .venv/bin/python benchmarks/partitions.py                       # this checkout's fedkit.data
    git show HEAD:fedkit/data.py > /tmp/data_old.py
    .venv/bin/python benchmarks/partitions.py --module /tmp/data_old.py --timeout 700   # another version

Each call runs in a child process with a time limit; it prints seconds per call, the outcome (ok, or
the error's first words) and the smallest client.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import sys
import time


def _load(module: str | None):
    if module is None:
        from fedkit import data
        return data
    importlib.import_module("fedkit")  # the package the copy's relative imports resolve in
    spec = importlib.util.spec_from_file_location("fedkit._bench_data", module, submodule_search_locations=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "fedkit"
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _call(module, scheme, clients, alpha, seed, out):
    D = _load(module)
    train = D.load("digits").train
    fn = {"dirichlet": D.dirichlet, "quantity": D.quantity_skew}[scheme]
    t0 = time.perf_counter()
    try:
        parts = fn(train, clients=clients, alpha=alpha, seed=seed)
        out.put((time.perf_counter() - t0, "ok", min(len(i) for i in parts.indices)))
    except Exception as e:  # noqa: BLE001
        out.put((time.perf_counter() - t0, f"{type(e).__name__}: {str(e)[:60]}", None))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--module", help="a data.py to time instead of fedkit.data (e.g. the old one)")
    p.add_argument("--clients", default="100,200,500")
    p.add_argument("--alphas", default="0.5,0.1")
    p.add_argument("--seeds", default="0")
    p.add_argument("--schemes", default="dirichlet,quantity")
    p.add_argument("--timeout", type=float, default=700.0)
    a = p.parse_args()
    ctx = mp.get_context("spawn")
    print(f"{'scheme':10} {'clients':>7} {'alpha':>5} {'seed':>4} {'seconds':>8}  min  outcome")
    for scheme in a.schemes.split(","):
        for clients in map(int, a.clients.split(",")):
            for alpha in map(float, a.alphas.split(",")):
                for seed in map(int, a.seeds.split(",")):
                    q = ctx.Queue()
                    proc = ctx.Process(target=_call, args=(a.module, scheme, clients, alpha, seed, q))
                    proc.start()
                    proc.join(a.timeout)
                    if proc.is_alive():
                        proc.terminate()
                        proc.join()
                        secs, what, smallest = a.timeout, f"still running after {a.timeout:g} s", None
                    elif proc.exitcode != 0:
                        secs, what, smallest = float("nan"), f"crashed (exit {proc.exitcode})", None
                    else:
                        secs, what, smallest = q.get(timeout=10)
                    print(f"{scheme:10} {clients:7d} {alpha:5g} {seed:4d} {secs:8.3f} {smallest!s:>4}  {what}", flush=True)


if __name__ == "__main__":
    main()
