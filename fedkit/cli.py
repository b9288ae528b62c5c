"""``fedkit run ...``: one federated experiment from the shell, with a progress bar, a run directory and a plot.

    fedkit run --dataset digits --clients 8 --partition dirichlet --alpha 0.5 --rounds 20 --json

With ``--json`` the last line printed is a JSON summary (status, final_accuracy, final_loss, rounds, seconds,
model_sha256, run_dir, error), for a refused or failed run too. Exit codes: 0 done, 2 refused (bad
arguments, a run directory in use or holding a run), 1 the run failed, 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM, which stops a run as Ctrl-C does: checkpointed, summed up, resumable). Every refusal is
one format, ``fedkit run: error: <what is wrong>`` and a ``hint:`` line, in the flags' words, and comes
before the first round: nothing is loaded, trained or written for a command that cannot work.

argparse lives here only. `experiment_from_args` (in `fedkit.cli_flags`, the flags' half) turns the parsed
flags into the typed objects of an `fk.Experiment`: a `DataSpec`, a workflow with its DP extension and
CKKS settings, a `TrainConfig`, `Faults`. ``--resume DIR`` reads the flags back from ``DIR/cli.json``,
through this parser again (so a damaged file is refused like a bad command line), and maps them again,
so a run directory stays resumable whatever the objects become; of the run's settings only ``--engine`` may be
given anew (a warning says the bits will differ from an uninterrupted run's).

>>> exp = experiment_from_args(parser().parse_args(["run", "--algorithm", "fedprox", "--mu", "0.1"]))
>>> exp.workflow.extensions, exp.data.partition
((Proximal(mu=0.1),), 'iid')
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import re
import shlex
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from . import checkpoint, data as fkdata, export, plots, rundir
from .checkpoint import CheckpointError
from .cli_flags import (ALGORITHMS, RULES, SERVER_OPTS, WEIGHINGS, check_sizes, data_from_args, encryption_from_args,
                        experiment_from_args, privacy_from_args, refuse_unused, workflow_from_args)
from .errors import ConfigError, MissingExtra
from .experiment import ENGINES, MODELS, PARTITIONS
from .global_model import NORM_REMEDY
from .privacy.accounting import MECHANISMS
from .privacy.ckks import MAX_COEFF_BITS, CKKS
from .simulator import RunInterrupted, write_html
from .train import TrainConfig
from .workflows import FedAvg

__all__ = ["main", "parser", "add_dp_arguments", "add_he_arguments", "resumed_args", "given_flags",
           "experiment_from_args", "workflow_from_args", "encryption_from_args", "privacy_from_args"]

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


# ------------------------------------------------------------------------------ --resume

# what a resumed run may set anew: how it reports, and where it runs; everything else is read from cli.json
RESUME_MAY_CHANGE = {"resume", "json", "no_progress", "device", "out", "command", "overwrite"}
# what a resumed run may choose anew, else kept from cli.json: another engine runs the rest, with a warning that the
# bits will differ from an uninterrupted run's (`fedkit.simulator.RESUMABLE`)
RESUME_MAY_CHOOSE = {"engine"}


def resumed_args(p: argparse.ArgumentParser, args: argparse.Namespace,
                 given: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments a run in ``args.resume`` was started with, plus this call's output options.

    ``given``: the flags typed with ``--resume`` (`given_flags`); without it, those that differ from their
    default. Each must be one a resumed run may change; ``DIR/cli.json`` is parsed as a command line.
    """
    run_dir = Path(args.resume)
    saved = run_dir / "cli.json"
    if not saved.is_file():
        raise ConfigError(f"{run_dir} has no cli.json: it is not a run directory written by `fedkit run`")
    defaults = vars(p.parse_args(["run"]))
    if given is None:
        given = [k for k, v in vars(args).items() if v != defaults.get(k)]
    changed = [k for k in given if k not in RESUME_MAY_CHANGE | RESUME_MAY_CHOOSE]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise ConfigError(f"--resume continues {run_dir} with the settings it was started with; drop {flags}")
    if "out" in given and args.out is not None and Path(args.out).resolve() != run_dir.resolve():
        raise ConfigError(f"--resume continues {run_dir} in place, so --out {args.out} would be ignored; drop --out")
    if "overwrite" in given and args.overwrite:
        raise ConfigError(f"--resume continues the run in {run_dir} and --overwrite replaces it: choose one")
    try:
        stored = json.loads(saved.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{saved} is not valid JSON ({e}); it cannot be resumed") from None
    except OSError as e:
        raise ConfigError(f"{saved} cannot be read ({e.strerror or e}); it cannot be resumed") from None
    return argparse.Namespace(**{**_stored_flags(p, stored, saved), "resume": str(run_dir), "out": str(run_dir),
                                 "json": args.json, "no_progress": args.no_progress, "device": args.device,
                                 "overwrite": False, **{k: getattr(args, k) for k in RESUME_MAY_CHOOSE if k in given}})


def _stored_flags(p: argparse.ArgumentParser, stored: Any, saved: Path) -> dict[str, Any]:
    """The flags of a ``cli.json``, checked as the command line they were: every value through its flag's type."""
    if not isinstance(stored, dict):
        raise ConfigError(f"{saved} holds a JSON {type(stored).__name__}, not the flags of a run (a JSON object); it "
                          "cannot be resumed")
    actions = {a.dest: a for a in _subparsers(p)["run"]._actions if a.option_strings and a.dest != "help"}
    stored = {k: v for k, v in stored.items() if k not in RESUME_MAY_CHANGE}  # this call's, never the file's
    unknown = sorted(k for k in stored if k not in actions)
    if unknown:
        raise ConfigError(f"{saved} holds settings this fedkit does not know ({', '.join(map(str, unknown))}); it "
                          "cannot be resumed as it was started (was it written by another version, or edited?)")
    argv = ["run"]
    for dest, value in stored.items():
        action = actions[dest]
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise ConfigError(f"{saved} holds {dest}={json.dumps(value)}, but {flag} is a switch (true or false); "
                                  "it cannot be resumed")
            argv += [flag] if value else []
        elif value is None:
            if action.default is not None:
                raise ConfigError(f"{saved} holds {dest}=null, but {flag} needs a value; it cannot be resumed")
        elif action.nargs == "+":
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{saved} holds {dest}={json.dumps(value)}, but {flag} takes a list of names; it "
                                  "cannot be resumed")
            argv += [flag, *value]
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            argv.append(f"{flag}={value}")
        else:
            raise ConfigError(f"{saved} holds {dest}={json.dumps(value)}, not a value {flag} takes; it cannot be resumed")
    try:
        return vars(p.parse_args(argv))
    except UsageError as e:
        raise ConfigError(f"{saved} holds a setting that cannot work ({e}); it cannot be resumed") from None


# ------------------------------------------------------------------------------ one error format

# the API's names of settings whose flag is not the name with dashes
_RENAMED = {"epochs": "local-epochs", "weigh": "weigh-by", "poly_modulus_degree": "he-poly-modulus",
            "coeff_mod_bit_sizes": "he-coeff-mod-bits", "scale_bits": "he-scale-bits", "layers": "he-layers"}
_OWNERS = r"(?<![\w-])(?:(?:FedAvg|FedProx|FedOpt|SCAFFOLD|Cyclic|DataSpec|TrainConfig|Experiment|DPSGD|UserDP)\.|CKKS: )"
_SETTINGS = (r"min_clients|clients_per_round|max_retries|sample_rate|noise_multiplier|target_epsilon|max_grad_norm|"
             r"shards_per_client|min_size|batch_size|max_norm_ratio")

# the API's words -> the flags' (for the refusals that come from the objects the flags build)
FLAG_WORDS: list[tuple[str, Any]] = [
    (r"\bFaults\.seed\b", "--fault-seed"),
    (r"\bSimulator seed\b", "--seed"),
    (r"\bFaults\.(dropout|crash|straggle|corrupt)\b", r"--\1"),
    (r"\bFedProx mu\b", "--mu"),
    (r"\bFedAvg\(he=\.\.\.\)", "--he"),
    (r"\bdrop he=", "drop --he"),
    (r"\baggregate=weighted_mean\b", "--aggregate mean"),
    (r"\boverwrite=True\b", "--overwrite"),
    (r"\bengine='([\w-]+)'", r"--engine \1"),
    (r"\bout=", "--out "),
    (r"\btask_timeout\b(?! \(--task-timeout)", "--task-timeout"),
    (r"\bmax_norm_ratio=None\b", "--max-norm-ratio off"),
    (r"\bmax_norm_ratio=(?=[\s,;)]|$)", "--max-norm-ratio"),  # the setting named, no value given
    (_OWNERS + r"(\w+)\b", lambda m: "--" + _RENAMED.get(m.group(1), m.group(1).replace("_", "-"))),
    (r"\b(poly_modulus_degree|coeff_mod_bit_sizes|scale_bits)\b(=?)",
     lambda m: "--" + _RENAMED[m.group(1)] + (" " if m.group(2) else "")),
    (r"\b(" + _SETTINGS + r")\b(=?)", lambda m: "--" + m.group(1).replace("_", "-") + (" " if m.group(2) else "")),
]


def flag_words(message: str) -> str:
    """``message`` (a refusal from the API) with the API's names of the settings replaced by the flags'."""
    for pattern, words in FLAG_WORDS:
        message = re.sub(pattern, words, message)
    return message


HELP_HINT = "`{prog} --help` lists every option with its default"


def _failure_hint(e: BaseException, where: str | Path) -> str:
    """The line after a failed run: where its record is, and, when the norm screen rejected a client, the flag."""
    record = f"{where} holds what the run did (history.json, events)"
    if NORM_REMEDY in str(e):
        return ("the norm screen rejected an update (the reason is above): if that client is honest, raise "
                f"--max-norm-ratio or turn the screen off with --max-norm-ratio off; {record}")
    return record


def _hint(prog: str, e: BaseException) -> str:
    """The line after a refusal: what to do about it."""
    if isinstance(e, UsageError) and e.hint:
        return e.hint
    if isinstance(e, rundir.RunExists):
        return (f"continue it with `{_resume_command(e.directory)}` if it was interrupted, add --overwrite to "
                "replace it, or choose another --out")
    if isinstance(e, rundir.RunDirBusy):
        pid = e.holder.get("pid")
        return f"wait for {f'process {pid}' if pid else 'that run'} to end, or choose another --out"
    if isinstance(e, MissingExtra):
        return f"install it into the Python that runs fedkit: {sys.executable} -m pip install 'fedkit[{e.extra}]'"
    if isinstance(e, export.FolderRefused):
        return "choose another --out: a new or empty folder, or (with --overwrite) one an earlier export wrote"
    if isinstance(e, CheckpointError):
        return f"check the path given to --resume, or start a new run with --out (`{prog} --help`)"
    if "run directory" in str(e):
        return "choose another --out"
    return HELP_HINT.format(prog=prog)


def _say(prog: str, e: BaseException | str, run_dir: str | None = None, as_json: bool = False,
         status: str = "refused", hint: str | None = None) -> None:
    """Print a refusal or a failure in fedkit's one format (and, with --json, as the JSON summary's last line)."""
    if hint is None:
        hint = _hint(prog, e) if isinstance(e, BaseException) else HELP_HINT.format(prog=prog)
    if isinstance(e, rundir.RunExists):
        e = f"--out {e.directory} holds {e.found}, and a new run there would replace it"
    message = flag_words(str(e)).replace("the run directory ", "the run directory (--out) ")
    print(f"{prog}: error: {message}", file=sys.stderr)
    print(f"hint: {hint}", file=sys.stderr)
    if as_json:
        summary = _saved_summary(run_dir) if status == "failed" else {}
        print(_json({**summary, "status": status, "error": message, "run_dir": run_dir}))


def _refuse(prog: str, e: BaseException | str, run_dir: str | None = None, as_json: bool = False) -> NoReturn:
    """Refuse the command line before the run: the message, a hint, exit code 2."""
    _say(prog, e, run_dir, as_json)
    raise SystemExit(2)


def _json(obj: Any, indent: int | None = None) -> str:
    """Strict JSON: a number never measured (NaN, an infinity) is null, as a JSON reader expects."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(obj), indent=indent, default=str, allow_nan=False)


def _typed_out(argv: Sequence[str]) -> str | None:
    """The --out of a command line argparse could not parse (for the JSON summary of its refusal)."""
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--out="):
            return a[len("--out="):]
    return None


def _context(args: argparse.Namespace, algorithm: str | None = None) -> str:
    """What a plot's title says of a run: algorithm, data, partition, clients."""
    split = args.partition + (f" alpha={args.alpha}" if args.partition in ("dirichlet", "quantity") else "")
    return (f"{algorithm}: " if algorithm else "") + f"{args.dataset}, {split}, {args.clients} clients"


def _written(run_dir: str | Path) -> list[str]:
    """The files and folders (``checkpoints/``) the run directory holds, as the run wrote them; and the shared
    plotly.min.js its plot.html loads from the folder above."""
    d = Path(run_dir)
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in d.iterdir()
                   if not p.name.startswith(".") and p.name != rundir.LOCK)
    if (d / "plot.html").is_file() and (d.parent / "plotly.min.js").is_file():
        names.append("../plotly.min.js (shared, for plot.html)")
    return names


def _saved_summary(run_dir: str | None) -> dict[str, Any]:
    """The summary a failed run saved in its directory (rounds, accuracy so far...), or {}."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text()) if run_dir else {}
        return summary if isinstance(summary, dict) else {}
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------ fedkit run / compare

INTERRUPTED, TERMINATED = 130, 128 + signal.SIGTERM  # exit codes: Ctrl-C, SIGTERM (143), as a shell reports them


def _resume_command(run_dir: str | Path) -> str:
    """The command that continues the run in ``run_dir``, quoted for a shell (a path with a space, a quote...)."""
    return f"fedkit run --resume {shlex.quote(str(run_dir))}"


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """While the block runs, SIGTERM (``kill``, a scheduler or a container stopping the job) stops the command as Ctrl-C
    does: a KeyboardInterrupt in the main thread, so the run is checkpointed, summed up and resumable. Yields a list
    that holds the signal once it came (the exit code is then `TERMINATED`). Only the first SIGTERM interrupts: the
    run is stopping already. The previous handler comes back after the block; the library never touches signals
    (a notebook's kernel keeps its own)."""
    got: list[int] = []

    def interrupt(signum: int, frame: Any) -> None:
        if not got:
            got.append(signum)
            raise KeyboardInterrupt(f"terminated by signal {signal.Signals(signum).name}")

    try:
        before = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (main() called from a thread): signals cannot be handled here
        yield got
        return
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, before)


def main(argv: Sequence[str] | None = None) -> int:
    """``fedkit ...``: 0 when the run is done, 2 for bad arguments, 1 when the run fails, 130 when interrupted
    (Ctrl-C), 143 when terminated (SIGTERM: stopped as Ctrl-C stops it).

    A command line refused before the run raises ``SystemExit(2)`` (as argparse does); a refusal that comes
    when the run starts (a checkpoint that cannot be resumed) returns 2.
    """
    with _sigterm_as_interrupt() as terminated:
        try:
            code = _main(argv)
        except SystemExit as e:
            if terminated and e.code == INTERRUPTED:
                raise SystemExit(TERMINATED) from None
            raise
    return TERMINATED if terminated and code == INTERRUPTED else code


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    try:
        args, extra = p.parse_known_args(argv)
        command = _subparsers(p)[args.command]
        if extra:  # said by the command's own parser, which knows the options to suggest
            command.error(f"unrecognized arguments: {' '.join(extra)}")
        for action in command._actions:  # argparse reads "--flag=--" as no value at all, and skips the type
            if action.option_strings and action.nargs is None and getattr(args, action.dest, None) == []:
                command.error(f"argument {action.option_strings[0]}: expected a value, got '--'")
    except UsageError as e:
        _refuse(e.prog, e, _typed_out(argv), as_json="--json" in argv)
    if args.command == "compare":
        return compare_main(p, args, argv)
    if args.command == "export":
        return export_main(args, argv)
    return run_main(p, args, argv)


def export_main(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """``fedkit export nvflare --out DIR <run flags>``: the FLARE job folder, and the line that runs it."""
    prog = f"fedkit export {args.target}"
    try:
        job = export.job_from_args(args, given_flags(argv) if argv else None)
    except export.NotExportable as e:  # in the flags' words already; FLARE's names must stay as FLARE spells them
        print(f"{prog}: error: {e.cli}\nhint: {HELP_HINT.format(prog=prog)}", file=sys.stderr)
        if args.json:
            print(_json({"status": "refused", "error": e.cli}))
        raise SystemExit(2)
    except (ConfigError, OSError) as e:
        _refuse(prog, e, None, args.json)
    if args.json:
        print(_json({"status": "exported", "job": str(job.path), "files": job.files(), "run": job.simulator_command()}))
    else:
        print(f"exported: {job.path} ({', '.join(job.files())})")
        print(f"run it in FLARE's simulator: {job.simulator_command()}")
    return 0


def run_main(p: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """``fedkit run``: every check before the first round, then the run in its locked directory."""
    prog, as_json, lock = "fedkit run", args.json, None
    try:
        given = given_flags(argv) if argv else None
        if args.resume:
            args = resumed_args(p, args, given)
        else:
            if given is not None:
                refuse_unused(args, given, [args.algorithm])
            check_sizes(args, [args.algorithm])
            args.out = args.out or f"runs/{args.dataset}-{args.partition}-{time.strftime('%Y%m%d-%H%M%S')}"
        exp = experiment_from_args(args)
        lock = rundir.claim(args.out, fresh=not args.resume, overwrite=args.overwrite, reentrant=True)
        sim = exp.simulator(out=args.out, overwrite=args.overwrite)
        sim.title = _context(args, args.algorithm)
        sim.workflow.check_federation([c.name for c in sim.clients])
        if not args.resume:
            saved = {k: v for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE - {"device"}}
            (Path(args.out) / "cli.json").write_text(json.dumps(saved, indent=1))
    except (ConfigError, CheckpointError, OSError) as e:
        if lock is not None:
            lock.release(undo=True)  # refused: a run directory made for it goes again
        _refuse(prog, e, getattr(args, "out", None), as_json)
    except KeyboardInterrupt:  # while the data loads: nothing ran
        if lock is not None:
            lock.release(undo=True)
        raise SystemExit(130)
    progress = not args.no_progress
    try:
        try:
            with _warnings_said(prog):
                run = sim.resume(args.out, progress=progress) if args.resume else sim.run(progress=progress)
        except RunInterrupted as e:  # Ctrl-C: the run is aborted and checkpointed; said below, exit 130
            run = e.run
    except (ConfigError, CheckpointError) as e:  # refused as the run started (e.g. HE provisioning): no round done
        if not args.resume and not checkpoint.exists(args.out):
            (Path(args.out) / "cli.json").unlink(missing_ok=True)
            lock.release(undo=True)  # and a run directory this command made goes again
        _say(prog, e, args.out, as_json)
        return 2
    except Exception as e:
        _say(prog, f"the run failed: {type(e).__name__}: {e}", args.out, as_json, status="failed",
             hint=_failure_hint(e, f"the run directory {args.out}"))
        return 1
    finally:
        lock.release()
    summary = run.summary()
    if args.json:
        print(_json(summary))
    else:
        planned = f" of {summary['rounds_planned']}" if summary["rounds_planned"] else ""
        rounds = f"{summary['rounds']}" + ("" if summary["complete"] else f"{planned} (INCOMPLETE)")
        print(f"{summary['status']}: {rounds} rounds in {summary['seconds']:.1f}s, "
              f"accuracy {summary['final_accuracy']:.4f}, loss {summary['final_loss']:.4f}, "
              f"{summary['failures']} client failure(s)")
        print(f"run directory: {summary['run_dir']} ({', '.join(_written(summary['run_dir']))})")
    if run.status == "aborted":
        print(f"{prog}: interrupted after {summary['rounds']} round(s); continue with: {_resume_command(args.out)}",
              file=sys.stderr)
        return 130
    return 0


@contextlib.contextmanager
def _warnings_said(prog: str):
    """Python warnings said as the CLI says things, one line in the flags' words (``fedkit run: warning: ...``),
    not as Python shows them (a file, a line number and a line of source)."""
    def say(message: Warning | str, *_: Any, **__: Any) -> None:
        print(f"{prog}: warning: {flag_words(str(message))}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = say
        yield


def compare_main(p: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """``fedkit compare``: each algorithm on the same partition, seed and initial model; one plot."""
    prog = "fedkit compare"
    out = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    lock = None
    try:
        if argv:
            refuse_unused(args, given_flags(argv), args.algorithms, compare=True)
        check_sizes(args, args.algorithms)
        experiments = {name: experiment_from_args(args, name) for name in args.algorithms}  # refusals before the load
        lock = rundir.claim(out, fresh=False, reentrant=True)
        for name in args.algorithms:
            found = rundir.existing_run(out / name)
            if found is not None and not args.overwrite:
                raise rundir.RunExists(f"{str(out / name)!r} holds {found}; a new comparison there would replace it",
                                       out / name, found)
        data = data_from_args(args).load()  # once for all algorithms (CIFAR-10 is 600 MB)
        sims = {name: exp.simulator(out / name, data, overwrite=args.overwrite) for name, exp in experiments.items()}
        for name, sim in sims.items():
            sim.title = _context(args, name)
            sim.workflow.check_federation([c.name for c in sim.clients])
    except (ConfigError, OSError) as e:
        if lock is not None:
            lock.release(undo=True)
        if isinstance(e, rundir.RunExists):
            _say(prog, e, str(out), args.json, hint="add --overwrite to replace the runs, or choose another --out")
            raise SystemExit(2)
        _refuse(prog, e, str(out), args.json)
    except KeyboardInterrupt:
        if lock is not None:
            lock.release(undo=True)
        raise SystemExit(130)
    runs = {}
    try:
        for name, sim in sims.items():
            try:
                runs[name] = sim.run(progress=not args.no_progress, desc=name)
            except RunInterrupted as e:  # Ctrl-C: this run is aborted (checkpointed), the next ones never start
                runs[name] = e.run
                summary = {"runs": {n: r.summary() for n, r in runs.items()}, "interrupted": name,
                           "not_run": [n for n in sims if n not in runs], "plot": None}
                (out / "summary.json").write_text(_json(summary, indent=1))
                if args.json:
                    print(_json(summary))
                print(f"{prog}: interrupted during {name} after {len(e.run.history)} round(s); {out / name} holds its "
                      f"checkpoint; not run: {', '.join(summary['not_run']) or 'none'}", file=sys.stderr)
                return 130
            except ConfigError as e:
                _say(prog, f"{name}: {e}", str(out), args.json)
                return 2
            except Exception as e:
                _say(prog, f"{name} failed: {type(e).__name__}: {e}", str(out), args.json, status="failed",
                     hint=_failure_hint(e, out / name))
                return 1
        figure = plots.curves(runs, title=f"global model accuracy per round: {_context(args)}")
        write_html(figure, out / "compare.html", js_folder=out)  # one plotly.min.js for the comparison's plots
        summary = {"runs": {n: r.summary() for n, r in runs.items()}, "plot": str(out / "compare.html")}
        (out / "summary.json").write_text(_json(summary, indent=1))
    finally:
        lock.release()
    if args.json:
        print(_json(summary))
    else:
        for n, r in runs.items():
            print(f"{n:>10}: accuracy {r.history.last('accuracy'):.4f} after {len(r.history)} rounds ({r.seconds:.1f}s)")
        print(f"plot: {out / 'compare.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
