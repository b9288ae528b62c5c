"""How many bytes does keeping a run's history on disk cost over a long run?

Runs FedAvg on the offline digits data (8 clients by default) with a run directory and a checkpoint
every round, and measures the bytes written for the history:

  * ``measured``: what this fedkit wrote: every version of every history file, read as they appear
    after each round (the round folders' ``history.json`` of older fedkit, which rewrote the whole
    history into every checkpoint, or the growth of ``history.jsonl``), plus the end-of-run
    ``history.json``, ``rounds.csv`` and ``clients.csv``;
  * ``rewrite-every-round``: what rewriting the whole history into every checkpoint costs for the same
    records (older fedkit's scheme), computed from the final history;

and prints their ratio, with all the bytes the process wrote during the run (``/proc/self/io``,
Linux only: models, checkpoints, plot included) for scale.

    python benchmarks/history_io.py                 # 200 rounds
    python benchmarks/history_io.py --rounds 50 --clients 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import fedkit as fk


def proc_written() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(1)
    data = fk.data.load("digits")
    parts = fk.data.dirichlet(data.train, clients=args.clients, alpha=0.5, seed=0)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        written = {"history": 0}
        log_size = {"bytes": 0}

        def count(record) -> None:  # after each round's checkpoint (listeners run after it)
            folder = out / "checkpoints" / f"round-{record.round:05d}"
            if (folder / "history.json").exists():  # older fedkit: the whole history, in every checkpoint
                written["history"] += (folder / "history.json").stat().st_size
            log = out / "history.jsonl"
            if log.exists():
                size = log.stat().st_size
                written["history"] += size - log_size["bytes"]
                log_size["bytes"] = size

        sim = fk.Simulator(fk.FedAvg(rounds=args.rounds), model=lambda: fk.models.for_data(data), clients=parts,
                           test=data.test, train=fk.TrainConfig(lr=0.05), seed=0, out=out, on_round=[count])
        before, t = proc_written(), time.perf_counter()
        run = sim.run(progress=False)
        seconds, after = time.perf_counter() - t, proc_written()
        assert run.status == "done", run.error
        log = out / "history.jsonl"
        if log.exists():
            written["history"] += log.stat().st_size - log_size["bytes"]  # the last events, at the end
        end_files = sum((out / f).stat().st_size for f in ("history.json", "rounds.csv", "clients.csv"))
        measured = written["history"] + end_files

        h = run.history.to_dict()
        rewrite = 0
        for k in range(len(h["rounds"])):  # what a whole history.json per checkpoint writes for these records
            rnd = h["rounds"][k]["round"]
            part = {"rounds": h["rounds"][:k + 1], "events": [e for e in h["events"] if e.get("round", 0) <= rnd],
                    "results": h["results"]}
            rewrite += len(json.dumps(part, default=str))
        rewrite += end_files

    print(f"{args.rounds} rounds, {args.clients} clients, checkpoint every round ({seconds:.1f}s)")
    print(f"  history bytes written, measured:            {measured:>12,}")
    print(f"  history bytes, rewrite-every-round scheme:  {rewrite:>12,}")
    print(f"  ratio rewrite / measured:                   {rewrite / measured:>12.1f}x")
    if before is not None and after is not None:
        print(f"  all bytes the process wrote during the run: {after - before:>12,}")
    print(json.dumps({"rounds": args.rounds, "clients": args.clients, "history_bytes": measured,
                      "rewrite_every_round_bytes": rewrite, "ratio": round(rewrite / measured, 2),
                      "process_bytes": None if before is None or after is None else after - before}))


if __name__ == "__main__":
    main()
