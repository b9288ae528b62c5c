"""How lean is the sequential engine? fedkit's FedAvg against a bare PyTorch loop doing the same steps.

Both sides run, in this one process, the same work on digits with its MLP:
  * fedkit: ``fk.Simulator(fk.FedAvg(rounds=R))`` over ``--clients`` iid clients (their splits given as
    ClientData: by default all for training and ``TrainConfig(validate=False)``, no client-side validation on
    either side; ``--validate``: 10% held out and scored by both sides before training), the sequential
    engine, the server scoring the global model on the test set after each round;
  * bare: for each round, for each client: load the global weights into a model, one epoch of SGD with
    momentum (lr 0.05, momentum 0.9, batch 16) over its shuffled batches; then the weights averaged by sample
    counts, and the global model evaluated on the test set. No framework, no threads, no checks.
The order alternates between repeats; the ratio printed is min(fedkit) / min(bare) of the wall times, and of the
process CPU times (all threads; steadier than wall time on a busy shared machine, and fedkit's waiting threads
use none). The issue's target is <= 1.3
with one torch thread.

    python benchmarks/engines_lean.py                          # 20 rounds, 8 clients, 1 thread, 3 repeats
    python benchmarks/engines_lean.py --rounds 10 --repeat 5 --profile   # and where fedkit's time goes

On a busy shared machine wall (and even CPU) times swing by 2x; instructions do not. Count them with valgrind
(every thread; about 3 minutes a run) and take (side - none) for each side:

    for s in none fedkit bare; do valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$s \
        python benchmarks/engines_lean.py --only $s 2>&1 | grep "I   refs"; done
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import fedkit as fk
from fedkit.data import ClientData


def fedkit_run(data, parts, rounds: int, threads: int, validate: bool = False) -> tuple[tuple[float, float], str]:
    sim = fk.Simulator(fk.FedAvg(rounds=rounds), model=lambda: fk.models.for_data(data), clients=parts,
                       test=data.test, train=fk.TrainConfig(validate=validate), seed=0, device="cpu", threads=threads)
    t, cpu = time.perf_counter(), time.process_time()
    run = sim.run(progress=False)
    seconds = time.perf_counter() - t, time.process_time() - cpu
    assert run.status == "done", run.status
    return seconds, run.model_sha256


def bare_run(data, parts, rounds: int, threads: int, validate: bool = False) -> tuple[float, float]:
    """The same steps as plain PyTorch: one model instance reused, one optimizer per client and round; with
    ``validate``, each client first scores the global model it received on its validation split."""
    torch.set_num_threads(threads)
    t, cpu = time.perf_counter(), time.process_time()
    torch.manual_seed(0)
    model = fk.models.for_data(data)
    glob = {k: v.clone() for k, v in model.state_dict().items()}
    clients = [(p.train.x, p.train.y) for p in parts]
    vals = [(p.val.x, p.val.y) for p in parts]
    test_x, test_y = data.test.x, data.test.y
    for r in range(rounds):
        total = sum(len(y) for _, y in clients)
        acc = {k: torch.zeros_like(v) for k, v in glob.items()}
        for i, (x, y) in enumerate(clients):
            model.load_state_dict(glob)
            if validate:
                model.eval()
                with torch.no_grad():
                    out = model(vals[i][0])
                    F.cross_entropy(out, vals[i][1]).item(), (out.argmax(1) == vals[i][1]).float().mean().item()
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            gen = torch.Generator().manual_seed(r * 1000 + i)
            model.train()
            for idx in torch.randperm(len(y), generator=gen).split(16):
                out = model(x[idx])
                loss = F.cross_entropy(out, y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    acc[k] += v * (len(y) / total)
        glob = acc
        model.load_state_dict(glob)
        model.eval()
        with torch.no_grad():
            out = model(test_x)
            F.cross_entropy(out, test_y).item(), (out.argmax(1) == test_y).float().mean().item()
    return time.perf_counter() - t, time.process_time() - cpu


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    data = fk.data.load("digits")
    # the clients' splits, given to both sides: all for training, or 10% held out to validate the global model
    fraction = 0.1 if args.validate else 0.0
    parts = [ClientData(*p.split(fraction, seed=i)) for i, p in enumerate(fk.data.iid(data.train, args.clients, seed=0))]
    fedkit_run(data, parts, 1, args.threads, args.validate)  # warm-up: imports, first calls of torch kernels
    bare_run(data, parts, 1, args.threads, args.validate)
    if args.only is not None:  # one side once (or nothing: the baseline), for an instruction count (see the docstring)
        if args.only == "fedkit":
            fedkit_run(data, parts, args.rounds, args.threads, args.validate)
        elif args.only == "bare":
            bare_run(data, parts, args.rounds, args.threads, args.validate)
        return {}
    fed, bare, shas = [], [], set()
    for i in range(args.repeat):  # alternate the order, so that drifts in machine speed hit both alike
        for side in (("fedkit", "bare") if i % 2 == 0 else ("bare", "fedkit")):
            if side == "fedkit":
                s, sha = fedkit_run(data, parts, args.rounds, args.threads, args.validate)
                fed.append(s)
                shas.add(sha)
            else:
                bare.append(bare_run(data, parts, args.rounds, args.threads, args.validate))
    wall = lambda runs: min(w for w, _ in runs)  # noqa: E731
    cpu = lambda runs: min(c for _, c in runs)  # noqa: E731
    ratio = wall(fed) / wall(bare)
    print(f"digits MLP, FedAvg {args.clients} clients x {args.rounds} rounds, batch 16, validate={args.validate}, test "
          f"evaluation each round; torch threads {args.threads}, min of {args.repeat}")
    for name, runs in (("fedkit", fed), ("bare", bare)):
        print(f"{name:>6} wall {wall(runs):.3f}s cpu {cpu(runs):.3f}s (wall of runs "
              f"{', '.join(f'{w:.3f}' for w, _ in runs)})")
    print(f"ratio fedkit/bare: wall {ratio:.3f}, process CPU time {cpu(fed) / cpu(bare):.3f}   "
          f"model_sha256 {'/'.join(sorted(s[:16] for s in shas))}")
    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        fedkit_run(data, parts, args.rounds, args.threads, args.validate)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return {"fedkit": wall(fed), "bare": wall(bare), "ratio": ratio, "cpu_ratio": cpu(fed) / cpu(bare),
            "model_sha256": sorted(shas)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--validate", action="store_true", help="both sides: each client scores the global model on a "
                   "10%% validation split before training (fedkit's default TrainConfig(validate=True))")
    p.add_argument("--only", choices=("fedkit", "bare", "none"), default=None,
                   help="after the warm-up, run only this side once (none: nothing), for counting instructions")
    p.add_argument("--profile", action="store_true", help="also profile one fedkit run (cProfile, by own time)")
    run(p.parse_args())


if __name__ == "__main__":
    main()
