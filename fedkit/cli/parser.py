"""The parser of ``fedkit run``, ``fedkit compare`` and ``fedkit export``: its flags, their value types (a bad value is
refused by name, in fedkit's one format), and `given_flags` (which flags a command line typed)."""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from typing import Callable, NoReturn, Sequence

from .. import data as fkdata
from ..cli_flags import ALGORITHMS, RULES, SERVER_OPTS, WEIGHINGS
from ..errors import ConfigError
from ..experiment import ENGINES, MODELS, PARTITIONS
from ..privacy.accounting import MECHANISMS
from ..privacy.ckks import MAX_COEFF_BITS, CKKS
from ..train import TrainConfig
from ..workflows import FedAvg

SEED_LIMIT = 2**63  # seeds are whole numbers in [0, 2**63), as fk.Experiment and fk.Faults take them


class UsageError(ConfigError):
    """A command line that cannot work, found by the parser (``prog`` is ``fedkit run``, ``fedkit compare``...)."""

    def __init__(self, prog: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.prog, self.hint = prog, hint


class _Parser(argparse.ArgumentParser):
    """argparse, but an error raises `UsageError` (printed by `main` in fedkit's one format) instead of exiting
    with the usage text; an unknown option gets the known one it most resembles as its hint."""

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument (--[\w-]+)(/-\w)?: ", r"\1: ", message)
        hint = None
        if message.startswith("the following arguments are required: {run,compare"):
            message = ("no command: fedkit run ... runs one experiment, fedkit compare ... several algorithms, "
                       "fedkit export nvflare ... writes one as an NVIDIA FLARE job")
            hint = "`fedkit run --help` lists the options of a run, with their defaults"
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown:
            typed = unknown.group(1).split("=")[0]
            known = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            close = [o for o in known if typed.startswith(o + "-")] or difflib.get_close_matches(typed, known, n=1)
            hint = f"did you mean {close[0]}? `{self.prog} --help` lists the options" if close else None
        raise UsageError(self.prog, message, hint)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default, said once: argparse's "(default: X)", unless the help says it already or the
    option has none to say (a switch, or None, whose meaning the help gives)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


# ------------------------------------------------------------------------------ value types: refused by name

def _whole(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v
    parse.__name__ = "whole number"
    return parse


_positive_int = _whole(1)


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number in [0, 2**63), got {text!r}") from None
    if not 0 <= v < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be a whole number in [0, 2**63) (e.g. 0), got {v}")
    return v


def _threads(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number >= 1, got {text!r}") from None


def _number(low: float = -math.inf, high: float = math.inf, low_open: bool = False,
            high_open: bool = False) -> Callable[[str], float]:
    """A finite number in the interval from ``low`` to ``high`` (open at the ends asked for)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    words = f"a finite number > {low:g}" if high == math.inf and low_open else (
        f"a finite number >= {low:g}" if high == math.inf else f"in {interval}")

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if not (math.isfinite(v) and inside):
            raise argparse.ArgumentTypeError(f"must be {words}, got {text}")
        return v
    parse.__name__ = "number"
    return parse


_positive_float = _number(0.0, low_open=True)
_fraction = _number(0.0, 1.0, high_open=True)  # momentum: [0, 1)
NO_NORM_SCREEN = ("off", "none")  # what --max-norm-ratio takes for FedAvg's max_norm_ratio=None


def _norm_ratio(text: str) -> float | str:
    """--max-norm-ratio: a number > 1, or off / none (kept as "off": cli.json stores it and a resume reads it back)."""
    if text.strip().lower() in NO_NORM_SCREEN:
        return "off"
    try:
        return _number(1.0, low_open=True)(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; or off to screen no norms") from None


def _algorithm_list(text: str) -> list[str]:
    names = [a.strip().lower() for a in text.split(",") if a.strip()]
    bad = [a for a in names if a not in ALGORITHMS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown algorithm(s) {bad or text!r}; choose from {', '.join(ALGORITHMS)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"names an algorithm twice ({text!r}); each runs once")
    return names


# ------------------------------------------------------------------------------ the parser

def add_dp_arguments(group: argparse._ActionsContainer) -> None:
    """Add the differential-privacy options of ``fedkit run`` to ``group`` (a parser or argument group)."""
    group.add_argument("--dp-sgd", action="store_true", help="example-level DP-SGD on every client (Opacus)")
    group.add_argument("--dp-fedavg", action="store_true",
                       help="user-level DP-FedAvg: Poisson-sampled clients, clipped updates, noise on the sum")
    group.add_argument("--noise-multiplier", type=_number(0.0), default=None,
                       help="noise std over the clip norm (default: 1.0, or what --target-epsilon needs)")
    group.add_argument("--max-grad-norm", type=_positive_float, default=1.0, help="DP-SGD: clip norm of each example's gradient")
    group.add_argument("--clip-norm", type=_positive_float, default=1.0, help="DP-FedAvg: clip norm of each client's update")
    group.add_argument("--sample-rate", type=_number(0.0, 1.0, low_open=True), default=None,
                       help="DP-FedAvg: probability that a client joins a round (default: 1.0)")
    group.add_argument("--adaptive-clip", action="store_true", help="DP-FedAvg: adapt the clip norm to the median norm")
    group.add_argument("--target-epsilon", type=_positive_float, default=None,
                       help="privacy budget, never exceeded; alone, it sets the noise for the planned rounds "
                            "(default: no budget)")
    group.add_argument("--delta", type=_number(0.0, 1.0, True, True), default=1e-5, help="the delta of (epsilon, delta)-DP")
    group.add_argument("--dp-accountant", default="rdp", choices=MECHANISMS, help="Opacus accountant")


def add_he_arguments(group: argparse._ArgumentGroup) -> None:
    """Add ``--he`` and the CKKS options to a `fedkit run` argument group."""
    d = CKKS()
    group.add_argument("--he", action="store_true",
                       help="encrypt the clients' updates with CKKS (TenSEAL); the server aggregates ciphertexts "
                            "and the clients score the global model")
    group.add_argument("--he-poly-modulus", type=int, default=d.poly_modulus_degree, choices=tuple(MAX_COEFF_BITS),
                       metavar="N", help=f"CKKS ring dimension, one of {', '.join(map(str, MAX_COEFF_BITS))}")
    group.add_argument("--he-coeff-mod-bits", default=",".join(map(str, d.coeff_mod_bit_sizes)),
                       help="CKKS coefficient modulus prime sizes, comma-separated")
    group.add_argument("--he-scale-bits", type=_positive_int, default=d.scale_bits, help="CKKS scale, as a power of 2")
    group.add_argument("--he-layers", nargs="+", default=None, metavar="PATTERN",
                       help="names or regular expressions of the layers to encrypt (default: all)")


def _add_common(r: argparse.ArgumentParser) -> None:
    d = r.add_argument_group("data")
    d.add_argument("--dataset", default="digits", choices=fkdata.DATASETS, help="digits works offline")
    d.add_argument("--data-root", default="data", help="where mnist/cifar10 live")
    d.add_argument("--download", action="store_true", help="download mnist/cifar10 into --data-root")
    d.add_argument("--clients", type=_positive_int, default=8, help="clients in the federation")
    d.add_argument("--partition", default="iid", choices=PARTITIONS, help="how the training set is split over the clients")
    d.add_argument("--alpha", type=_positive_float, default=0.5,
                   help="Dirichlet concentration (dirichlet, quantity): small is skewed")
    d.add_argument("--shards-per-client", type=_positive_int, default=2, help="shards: label shards of each client")
    d.add_argument("--min-size", type=_positive_int, default=None,
                   help="dirichlet, quantity: samples every client gets at least (default: min(10, examples / clients))")
    f = r.add_argument_group("federation")
    f.add_argument("--rounds", type=_positive_int, default=10, help="federated rounds")
    f.add_argument("--clients-per-round", type=_positive_int, default=None, help="clients sampled each round (default: all)")
    f.add_argument("--weigh-by", default="samples", choices=tuple(WEIGHINGS), help="aggregation weight of a client")
    f.add_argument("--aggregate", default="mean", choices=tuple(RULES), help="aggregation rule")
    f.add_argument("--trim", type=_number(0.0, 0.5, high_open=True), default=0.1,
                   help="trimmed-mean: fraction trimmed at each end")
    f.add_argument("--byzantine", type=_whole(0), default=1, help="krum, multi-krum: clients assumed malicious")
    a = r.add_argument_group("algorithm options")
    a.add_argument("--mu", type=_number(0.0), default=0.01, help="FedProx proximal weight")
    a.add_argument("--server-opt", default="sgd", choices=tuple(SERVER_OPTS), help="FedOpt server optimizer")
    a.add_argument("--server-lr", type=_positive_float, default=None,
                   help="FedOpt server learning rate (default: 1.0 for sgd, 0.01 for the others)")
    a.add_argument("--server-momentum", type=_fraction, default=0.6, help="FedOpt sgd momentum, as NVFlare's FedOpt")
    a.add_argument("--order", default="fixed", choices=("fixed", "shuffled"), help="cyclic visiting order")
    t = r.add_argument_group("local training")
    t.add_argument("--model", default="auto", choices=MODELS, help="auto: an MLP for digits, a CNN for images")
    t.add_argument("--local-epochs", type=_positive_int, default=TrainConfig.epochs, help="epochs per client per round")
    t.add_argument("--lr", type=_positive_float, default=TrainConfig.lr, help="clients' SGD learning rate")
    t.add_argument("--momentum", type=_fraction, default=TrainConfig.momentum, help="clients' SGD momentum")
    t.add_argument("--batch-size", type=_positive_int, default=TrainConfig.batch_size, help="clients' batch size")
    ft = r.add_argument_group("faults and fault tolerance")
    ft.add_argument("--min-clients", type=_positive_int, default=None,
                    help="valid results a round needs (default: every sampled client)")
    ft.add_argument("--max-retries", type=_whole(0), default=2, help="retries of a round short of --min-clients")
    ft.add_argument("--task-timeout", type=_positive_float, default=None,
                    help="seconds a client may take per round (default: no deadline)")
    ft.add_argument("--max-norm-ratio", type=_norm_ratio, default=FedAvg.max_norm_ratio,
                    help="reject an update whose norm is more than this many times what is typical (the round's median, "
                         "recent accepted updates) both whole and per local step; off: no norm screen")
    ft.add_argument("--dropout", type=float, default=0.0, help="probability a client drops out of a round")
    ft.add_argument("--crash", type=float, default=0.0, help="probability a client's training raises")
    ft.add_argument("--straggle", type=float, default=0.0, help="probability a client answers after --task-timeout")
    ft.add_argument("--corrupt", type=float, default=0.0, help="probability a client sends a corrupt update")
    ft.add_argument("--fault-seed", type=_seed, default=0, help="seed of the injected faults")
    add_dp_arguments(r.add_argument_group("differential privacy"))
    add_he_arguments(r.add_argument_group("homomorphic encryption"))
    o = r.add_argument_group("run")
    o.add_argument("--seed", type=_seed, default=0, help="seeds the split, the initial model, sampling and training")
    o.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    o.add_argument("--threads", type=_threads, default="auto",
                   help="torch CPU threads: auto (1 for a model under 1M parameters on the CPU, else torch's default) "
                        "or a number; recorded in config.json, and a resumed run uses the same")
    o.add_argument("--engine", default="sequential", choices=ENGINES,
                   help="how the clients' work runs: sequential (one after another), vectorized (a round's clients "
                        "train together, stacked), auto (vectorized where it applies), ray (Ray tasks: fedkit[ray]); with --resume, "
                        "the run's own unless given (another runs the rest, with a warning that the bits differ)")
    o.add_argument("--json", action="store_true", help="print a JSON summary as the last line (on failure too)")
    o.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    o.add_argument("--overwrite", action="store_true", help="replace the run that --out holds already")


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("fedkit")
    except Exception:  # not installed (a source checkout on sys.path)
        return getattr(sys.modules.get("fedkit"), "__version__", "unknown")


def parser() -> argparse.ArgumentParser:
    """The parser of ``fedkit run`` and ``fedkit compare``; every flag's default is that of `fk.Experiment`'s parts."""
    p = _Parser(prog="fedkit", description="Federated learning experiments in one process.", formatter_class=_Help)
    p.add_argument("--version", action="version", version=f"fedkit {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{run,compare,export}")
    r = sub.add_parser("run", help="run one federated experiment", formatter_class=_Help)
    r.add_argument("--algorithm", default="fedavg", choices=tuple(ALGORITHMS), help="the workflow")
    _add_common(r)
    r.add_argument("--out", default=None, help="run directory (default: runs/<dataset>-<partition>-<time>)")
    r.add_argument("--resume", metavar="DIR", default=None,
                   help="continue the interrupted run in DIR with the settings it was started with")
    c = sub.add_parser("compare", help="run several algorithms on the same data and seed; one plot", formatter_class=_Help)
    c.add_argument("--algorithms", type=_algorithm_list, default=["fedavg", "fedprox", "fedopt", "scaffold"],
                   help="comma-separated, from: " + ", ".join(ALGORITHMS) + " (default: fedavg,fedprox,fedopt,scaffold)")
    _add_common(c)
    c.add_argument("--out", default=None, help="directory for the runs and compare.html (default: runs/compare-<time>)")
    e = sub.add_parser("export", help="write the run that the flags of `fedkit run` describe as an NVIDIA FLARE job",
                       formatter_class=_Help)
    e.add_argument("target", choices=("nvflare",), help="the framework to export to")
    e.add_argument("--algorithm", default="fedavg", choices=tuple(ALGORITHMS), help="the workflow")
    _add_common(e)
    e.add_argument("--out", required=True, help="the job folder to write, e.g. jobs/quickstart")
    return p


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a.choices for a in p._actions if isinstance(a, argparse._SubParsersAction))


def given_flags(argv: Sequence[str]) -> list[str]:
    """The dests of the flags ``argv`` (a valid command line) types, in the parser's order, whatever their value."""
    p = parser()
    for sub in _subparsers(p).values():
        for action in sub._actions:
            action.default = argparse.SUPPRESS
    typed = vars(p.parse_args(list(argv)))
    order = [a.dest for a in _subparsers(parser())[typed["command"]]._actions]
    return [d for d in order if d in typed]

