"""``fedkit run ...``: one federated experiment from the shell, with a progress bar, a run directory and a plot.

    fedkit run --dataset digits --clients 8 --partition dirichlet --alpha 0.5 --rounds 20 --json

With ``--json`` the last line printed is a JSON summary (status, final_accuracy, final_loss, rounds, seconds,
model_sha256, run_dir, error), for a refused or failed run too. Exit codes: 0 done, 2 refused (bad
arguments, a run directory in use or holding a run), 1 the run failed, 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM, which stops a run as Ctrl-C does: checkpointed, summed up, resumable). Every refusal is
one format, ``fedkit run: error: <what is wrong>`` and a ``hint:`` line, in the flags' words, and comes
before the first round: nothing is loaded, trained or written for a command that cannot work.

argparse lives in this package only, one concern a module: `parser` (the flags and their value types),
`commands` (run, compare, export), `resume` (``--resume``), `say` (fedkit's one format, in the flags' words).
`experiment_from_args` (in `fedkit.cli_flags`, the flags' half) turns the parsed flags into the typed objects
of an `fk.Experiment`: a `DataSpec`, a workflow with its DP extension and CKKS settings, a `TrainConfig`,
`Faults`. A refusal is the API's own `ConfigError`, its settings said as the flags that set them. ``--resume DIR`` reads the flags back from ``DIR/cli.json``,
through this parser again (so a damaged file is refused like a bad command line), and maps them again,
so a run directory stays resumable whatever the objects become; of the run's settings only ``--engine`` may be
given anew (a warning says the bits will differ from an uninterrupted run's).

>>> exp = experiment_from_args(parser().parse_args(["run", "--algorithm", "fedprox", "--mu", "0.1"]))
>>> exp.workflow.extensions, exp.data.partition
((Proximal(mu=0.1),), 'iid')
"""

from __future__ import annotations

import sys
from typing import Sequence

from ..cli_flags import encryption_from_args, experiment_from_args, privacy_from_args, workflow_from_args
from .commands import INTERRUPTED, TERMINATED, compare_main, export_main, run_main, sigterm_as_interrupt
from .parser import UsageError, _subparsers, add_dp_arguments, add_he_arguments, given_flags, parser
from .resume import resumed_args
from .say import _refuse, _typed_out

__all__ = ["main", "parser", "add_dp_arguments", "add_he_arguments", "resumed_args", "given_flags",
           "experiment_from_args", "workflow_from_args", "encryption_from_args", "privacy_from_args"]


def main(argv: Sequence[str] | None = None) -> int:
    """``fedkit ...``: 0 when the run is done, 2 for bad arguments, 1 when the run fails, 130 when interrupted
    (Ctrl-C), 143 when terminated (SIGTERM: stopped as Ctrl-C stops it).

    A command line refused before the run raises ``SystemExit(2)`` (as argparse does); a refusal that comes
    when the run starts (a checkpoint that cannot be resumed) returns 2.
    """
    with sigterm_as_interrupt() as terminated:
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




if __name__ == "__main__":
    sys.exit(main())
