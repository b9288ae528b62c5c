"""The engines measured side by side: the four parts of the [engines] issue, each a script of its own.

  (a) engines_vectorized.py  vectorized / sequential speed-up, 16, 64 and 256 clients, digits MLP and SmallCNN
                             (CPU, and CUDA when there is one)
  (b) engines_memory.py      peak memory with 1,000 vs 10,000 registered clients, 100 per round
  (c) engines_ray.py         Ray (2 local workers) vs sequential, on a model big enough for the split to pay
  (d) engines_lean.py        the sequential engine vs a bare PyTorch loop doing the same steps

Each part runs in a process of its own (so one's memory or threads cannot change another's figures) and prints
ratios measured within its own run. Parts that need a missing extra (ray) say so and are skipped.

    python benchmarks/engines.py                 # all four, with each script's defaults (about 10 min on 2 cores)
    python benchmarks/engines.py --parts a d     # some of them
    python benchmarks/engines.py --quick         # fewer repeats, for a first look
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
PARTS = {
    "a": ("vectorized vs sequential", "engines_vectorized.py", ["--repeats", "3", "--epochs", "1", "5"], ["--repeats", "1"]),
    "b": ("memory: 1,000 vs 10,000 registered clients", "engines_memory.py", [], ["--rounds", "2"]),
    "c": ("ray vs sequential", "engines_ray.py", ["--repeat", "2"], ["--repeat", "1"]),
    "d": ("sequential vs a bare PyTorch loop", "engines_lean.py", ["--repeat", "3"], ["--repeat", "1", "--rounds", "10"]),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=sorted(PARTS))
    p.add_argument("--quick", action="store_true", help="fewer repeats and rounds: a first look, noisier figures")
    args = p.parse_args()
    failed = []
    for key in args.parts:
        title, script, full, quick = PARTS[key]
        print(f"\n=== ({key}) {title}: python benchmarks/{script} {' '.join(quick if args.quick else full)}", flush=True)
        if key == "c" and importlib.util.find_spec("ray") is None:
            print("skipped: ray is not installed (pip install 'fedkit[ray]')")
            continue
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / script), *(quick if args.quick else full)])
        print(f"--- ({key}) took {time.perf_counter() - start:.0f} s" + (f", exit {rc}" if rc else ""), flush=True)
        if rc:
            failed.append(key)
    if failed:
        print(f"\nparts that failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
