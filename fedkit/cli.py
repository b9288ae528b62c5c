"""``fedkit run ...``: one federated experiment from the shell, with a progress bar, a run directory and a plot.

    fedkit run --dataset digits --clients 8 --partition dirichlet --alpha 0.5 --rounds 20 --json

With ``--json`` the last line printed is a JSON summary (final_accuracy, final_loss, rounds, seconds,
model_sha256, run_dir). Bad arguments exit with code 2 and a message that says what to change.

argparse lives here only. `experiment_from_args` (in `fedkit.cli_flags`, the flags' half) turns the parsed
flags into the typed objects of an `fk.Experiment`: a `DataSpec`, a workflow with its DP extension and
CKKS settings, a `TrainConfig`, `Faults`. ``--resume DIR`` reads the flags back from ``DIR/cli.json``
and maps them again, so a run directory stays resumable whatever the objects become.

>>> exp = experiment_from_args(parser().parse_args(["run", "--algorithm", "fedprox", "--mu", "0.1"]))
>>> exp.workflow.extensions, exp.data.partition
((Proximal(mu=0.1),), 'iid')
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from . import data as fkdata, plots
from .checkpoint import CheckpointError
from .cli_flags import (ALGORITHMS, RULES, SERVER_OPTS, WEIGHINGS, data_from_args, encryption_from_args,
                        experiment_from_args, privacy_from_args, workflow_from_args)
from .errors import ConfigError
from .experiment import MODELS, PARTITIONS
from .privacy.accounting import MECHANISMS
from .privacy.ckks import MAX_COEFF_BITS, CKKS
from .train import TrainConfig

__all__ = ["main", "parser", "add_dp_arguments", "add_he_arguments", "resumed_args", "experiment_from_args",
           "workflow_from_args", "encryption_from_args", "privacy_from_args"]


def add_dp_arguments(group: argparse._ActionsContainer) -> None:
    """Add the differential-privacy options of ``fedkit run`` to ``group`` (a parser or argument group)."""
    group.add_argument("--dp-sgd", action="store_true", help="example-level DP-SGD on every client (Opacus)")
    group.add_argument("--dp-fedavg", action="store_true",
                       help="user-level DP-FedAvg: Poisson-sampled clients, clipped updates, noise on the sum")
    group.add_argument("--noise-multiplier", type=float, default=None,
                       help="noise std over the clip norm (DP-SGD: default 1.0 unless --target-epsilon; DP-FedAvg: 1.0)")
    group.add_argument("--max-grad-norm", type=float, default=1.0, help="DP-SGD: clip norm of each example's gradient")
    group.add_argument("--clip-norm", type=float, default=1.0, help="DP-FedAvg: clip norm of each client's update")
    group.add_argument("--sample-rate", type=float, default=None,
                       help="DP-FedAvg: probability that a client joins a round (default 1.0)")
    group.add_argument("--adaptive-clip", action="store_true", help="DP-FedAvg: adapt the clip norm to the median norm")
    group.add_argument("--target-epsilon", type=float, default=None,
                       help="privacy budget: never exceeded; alone, it sets the noise for the planned rounds")
    group.add_argument("--delta", type=float, default=1e-5, help="the delta of (epsilon, delta)-DP")
    group.add_argument("--dp-accountant", default="rdp", choices=MECHANISMS, help="Opacus accountant")


def add_he_arguments(group: argparse._ArgumentGroup) -> None:
    """Add ``--he`` and the CKKS options to a `fedkit run` argument group."""
    d = CKKS()
    group.add_argument("--he", action="store_true",
                       help="encrypt the clients' updates with CKKS (TenSEAL); the server aggregates ciphertexts "
                            "and the clients score the global model")
    group.add_argument("--he-poly-modulus", type=int, default=d.poly_modulus_degree,
                       help=f"CKKS ring dimension, one of {', '.join(map(str, MAX_COEFF_BITS))}")
    group.add_argument("--he-coeff-mod-bits", default=",".join(map(str, d.coeff_mod_bit_sizes)),
                       help="CKKS coefficient modulus prime sizes, comma-separated")
    group.add_argument("--he-scale-bits", type=int, default=d.scale_bits, help="CKKS scale, as a power of 2")
    group.add_argument("--he-layers", nargs="+", default=None, metavar="PATTERN",
                       help="names or regular expressions of the layers to encrypt (default: all)")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def _algorithm_list(text: str) -> list[str]:
    names = [a.strip().lower() for a in text.split(",") if a.strip()]
    bad = [a for a in names if a not in ALGORITHMS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown algorithm(s) {bad or text!r}; choose from {', '.join(ALGORITHMS)}")
    return names


def _add_common(r: argparse.ArgumentParser) -> None:
    d = r.add_argument_group("data")
    d.add_argument("--dataset", default="digits", choices=fkdata.DATASETS, help="digits works offline")
    d.add_argument("--data-root", default="data", help="where mnist/cifar10 live")
    d.add_argument("--download", action="store_true", help="download mnist/cifar10 into --data-root")
    d.add_argument("--clients", type=_positive_int, default=8)
    d.add_argument("--partition", default="iid", choices=PARTITIONS)
    d.add_argument("--alpha", type=_positive_float, default=0.5, help="Dirichlet concentration (dirichlet, quantity)")
    d.add_argument("--shards-per-client", type=_positive_int, default=2)
    f = r.add_argument_group("federation")
    f.add_argument("--rounds", type=_positive_int, default=10)
    f.add_argument("--clients-per-round", type=_positive_int, default=None, help="default: all")
    f.add_argument("--weigh-by", default="samples", choices=tuple(WEIGHINGS), help="aggregation weight of a client")
    f.add_argument("--aggregate", default="mean", choices=tuple(RULES), help="aggregation rule")
    f.add_argument("--trim", type=float, default=0.1, help="fraction trimmed at each end (trimmed-mean)")
    f.add_argument("--byzantine", type=int, default=1, help="clients Krum assumes malicious (krum, multi-krum)")
    a = r.add_argument_group("algorithm options")
    a.add_argument("--mu", type=float, default=0.01, help="FedProx proximal weight")
    a.add_argument("--server-opt", default="sgd", choices=tuple(SERVER_OPTS), help="FedOpt server optimizer")
    a.add_argument("--server-lr", type=_positive_float, default=None, help="FedOpt server lr (default: 1.0 for sgd, 0.01 else)")
    a.add_argument("--server-momentum", type=float, default=0.6, help="FedOpt sgd momentum (NVFlare's default)")
    a.add_argument("--order", default="fixed", choices=("fixed", "shuffled"), help="cyclic visiting order")
    t = r.add_argument_group("local training")
    t.add_argument("--model", default="auto", choices=MODELS)
    t.add_argument("--local-epochs", type=_positive_int, default=TrainConfig.epochs)
    t.add_argument("--lr", type=_positive_float, default=TrainConfig.lr)
    t.add_argument("--momentum", type=float, default=TrainConfig.momentum)
    t.add_argument("--batch-size", type=_positive_int, default=TrainConfig.batch_size)
    ft = r.add_argument_group("faults and fault tolerance")
    ft.add_argument("--min-clients", type=_positive_int, default=None, help="valid results a round needs (default: all sampled)")
    ft.add_argument("--max-retries", type=int, default=2, help="retries of a round short of --min-clients")
    ft.add_argument("--task-timeout", type=_positive_float, default=None, help="seconds a client may take per round")
    ft.add_argument("--dropout", type=float, default=0.0, help="probability a client drops out of a round")
    ft.add_argument("--crash", type=float, default=0.0, help="probability a client's training raises")
    ft.add_argument("--straggle", type=float, default=0.0, help="probability a client answers after --task-timeout")
    ft.add_argument("--corrupt", type=float, default=0.0, help="probability a client sends a corrupt update")
    ft.add_argument("--fault-seed", type=int, default=0)
    add_dp_arguments(r.add_argument_group("differential privacy"))
    add_he_arguments(r.add_argument_group("homomorphic encryption"))
    o = r.add_argument_group("run")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    o.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    o.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def parser() -> argparse.ArgumentParser:
    """The parser of ``fedkit run`` and ``fedkit compare``; every flag's default is that of `fk.Experiment`'s parts."""
    p = argparse.ArgumentParser(prog="fedkit", description="Federated learning experiments in one process.")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    r = sub.add_parser("run", help="run one federated experiment", formatter_class=fmt)
    r.add_argument("--algorithm", default="fedavg", choices=tuple(ALGORITHMS))
    _add_common(r)
    r.add_argument("--out", default=None, help="run directory (default: runs/<dataset>-<partition>-<time>)")
    r.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the interrupted run in DIR with the settings it was started with")
    c = sub.add_parser("compare", help="run several algorithms on the same data and seed; one plot", formatter_class=fmt)
    c.add_argument("--algorithms", type=_algorithm_list, default=["fedavg", "fedprox", "fedopt", "scaffold"],
                   help="comma-separated, from: " + ", ".join(ALGORITHMS))
    _add_common(c)
    c.add_argument("--out", default=None, help="directory for the runs and compare.html (default: runs/compare-<time>)")
    return p


# what a resumed run may set anew: how it reports, and where it runs; everything else is read from cli.json
RESUME_MAY_CHANGE = {"resume", "json", "no_progress", "device", "out", "command"}


def resumed_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """The arguments a run in ``args.resume`` was started with, plus this call's output options."""
    run_dir = Path(args.resume)
    saved = run_dir / "cli.json"
    if not saved.exists():
        raise ConfigError(f"{run_dir} has no cli.json: it is not a run directory written by `fedkit run`")
    defaults = vars(p.parse_args(["run"]))
    changed = [k for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE and v != defaults.get(k)]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise ConfigError(f"--resume continues {run_dir} with the settings it was started with; drop {flags}")
    try:
        stored = json.loads(saved.read_text())
    except ValueError as e:
        raise ConfigError(f"{saved} is not valid JSON ({e}); it cannot be resumed") from None
    return argparse.Namespace(**{**defaults, **stored, "resume": str(run_dir), "out": str(run_dir), "json": args.json,
                                 "no_progress": args.no_progress, "device": args.device})


def main(argv: Sequence[str] | None = None) -> int:
    """``fedkit ...``: 0 when the run is done, 2 for bad arguments, 1 when the run fails, 130 when interrupted."""
    p = parser()
    args = p.parse_args(argv)
    if args.command == "compare":
        return compare_main(p, args)
    try:
        if args.resume:
            args = resumed_args(p, args)
        else:
            args.out = args.out or f"runs/{args.dataset}-{args.partition}-{time.strftime('%Y%m%d-%H%M%S')}"
        sim = experiment_from_args(args).simulator(out=args.out)
        if not args.resume:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            saved = {k: v for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE - {"device"}}
            (Path(args.out) / "cli.json").write_text(json.dumps(saved, indent=1))
    except ConfigError as e:
        p.error(str(e))  # exits with code 2
    progress = not args.no_progress
    try:
        run = sim.resume(args.out, progress=progress) if args.resume else sim.run(progress=progress)
    except (ConfigError, CheckpointError) as e:
        print(f"fedkit: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"fedkit: the run failed: {type(e).__name__}: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps({"status": "failed", "error": f"{type(e).__name__}: {e}", "run_dir": str(args.out)}))
        return 1
    summary = run.summary()
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['status']}: {summary['rounds']} rounds in {summary['seconds']:.1f}s, "
              f"accuracy {summary['final_accuracy']:.4f}, loss {summary['final_loss']:.4f}, "
              f"{summary['failures']} client failure(s)")
        print(f"run directory: {summary['run_dir']} (plot.html, history.json, rounds.csv, clients.csv, model.pt)")
    if run.status == "aborted":
        print(f"fedkit: interrupted after {summary['rounds']} round(s); continue with: fedkit run --resume {args.out}",
              file=sys.stderr)
        return 130
    return 0


def compare_main(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``fedkit compare``: each algorithm on the same partition, seed and initial model; one plot."""
    out = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        experiments = {name: experiment_from_args(args, name) for name in args.algorithms}  # refusals before the load
        data = data_from_args(args).load()  # once for all algorithms (CIFAR-10 is 600 MB)
        sims = {name: exp.simulator(out / name, data) for name, exp in experiments.items()}
    except ConfigError as e:
        p.error(str(e))
    runs = {}
    for name, sim in sims.items():
        try:
            runs[name] = sim.run(progress=not args.no_progress, desc=name)
        except Exception as e:
            print(f"fedkit: {name} failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
    figure = plots.curves(runs, title=f"global model accuracy per round: {args.dataset}, {args.clients} clients, "
                                      f"{args.partition}" + (f" alpha={args.alpha}" if args.partition != "iid" else ""))
    figure.write_html(out / "compare.html", include_plotlyjs="directory")
    summary = {"runs": {n: r.summary() for n, r in runs.items()}, "plot": str(out / "compare.html")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary))
    else:
        for n, r in runs.items():
            print(f"{n:>10}: accuracy {r.history.last('accuracy'):.4f} after {len(r.history)} rounds ({r.seconds:.1f}s)")
        print(f"plot: {out / 'compare.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
