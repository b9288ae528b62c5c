"""fedkit's one format for what the command line says: ``<prog>: error: <what is wrong>`` and a ``hint:`` line, in
the flags' words. A `ConfigError` from the API names its settings structurally (object, field); `flag_namer` says
each one as the flag that sets it, found through the parser (`fedkit.cli_flags.dest_of` maps a setting to its
flag's dest), so an API message reworded is a CLI message reworded, with no copy to drift.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import shlex
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn, Sequence

from .. import export, rundir
from ..checkpoint import CheckpointError
from ..cli_flags import dest_of
from ..errors import NO_VALUE, ConfigWarning, MissingExtra, Namer, Worded
from ..status import RunStatus
from ..global_model import NORM_LIMIT
from .parser import UsageError, _subparsers, parser


def flag_namer(command: str = "run", args: argparse.Namespace | None = None) -> Namer:
    """How ``fedkit <command>`` says a setting of the API: the flag that sets it (``--local-epochs`` for
    TrainConfig.epochs), with a value as typed (``args``' own where given), or None where no flag sets it."""
    actions = {a.dest: a for a in _subparsers(parser())[command]._actions if a.option_strings}

    def name(owner: str | None, field: str, value: Any, example: bool) -> str | None:
        flags = [actions[d] for d in dest_of(owner, field) if d in actions]
        if len(flags) != 1:  # no flag sets it, or several together (said without a value)
            return ", ".join(a.option_strings[0] for a in flags) or None
        action = flags[0]
        flag = action.option_strings[0]
        if value is NO_VALUE or action.nargs == 0:  # a switch says its value by being there
            return flag
        typed = getattr(args, action.dest, None) if args is not None and not example else None
        return f"{flag} {_as_typed(value if typed is None else typed)}"
    return name


def _as_typed(value: Any) -> str:
    """A value as a shell user types it: ``vectorized``, not ``'vectorized'``."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError, SyntaxError):
            value = ast.literal_eval(value)
    return shlex.quote(value) if isinstance(value, str) else "off" if value is None else str(value)


def in_flag_words(e: BaseException | str, namer: Namer) -> str:
    """What ``e`` says, its settings named by ``namer`` (a `ConfigError`'s hint goes on the hint line)."""
    if isinstance(e, Worded):
        return e.worded(namer, hint=False)
    return str(e)


HELP_HINT = "`{prog} --help` lists every option with its default"


def _resume_command(run_dir: str | Path) -> str:
    """The command that continues the run in ``run_dir``, quoted for a shell (a path with a space, a quote...)."""
    return f"fedkit run --resume {shlex.quote(str(run_dir))}"


def failure_words(e: BaseException, namer: Namer, max_norm_ratio: float | None = None) -> str:
    """What a failed run's error says in the flags' words, and the norm screen's limit (`NORM_LIMIT`) in the
    clients' reasons it quotes (``max_norm_ratio``: the screen's)."""
    said = e.worded(namer) if isinstance(e, Worded) else str(e)
    if max_norm_ratio is None:
        return said
    limit = Worded(NORM_LIMIT % max_norm_ratio)
    return said.replace(str(limit), limit.worded(namer))


def _failure_hint(e: BaseException, where: str | Path) -> str:
    """The line after a failed run: where its record is, and, when the norm screen rejected a client, the flag."""
    record = f"{where} holds what the run did (history.json, events)"
    if NORM_LIMIT.split("{")[0] in str(e):  # a norm rejection's reason
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
         status: RunStatus = RunStatus.REFUSED, hint: str | None = None, args: argparse.Namespace | None = None,
         about: str | None = None) -> None:
    """Print a refusal or a failure in fedkit's one format (and, with --json, as the JSON summary's last line);
    ``args``: the flags parsed, whose values a message quotes as typed; ``about``: what the message is about (the
    algorithm of a comparison)."""
    namer = flag_namer(_command(prog), args)
    if hint is None and isinstance(e, Worded) and e.hint:
        hint = e.worded_hint(namer)
    if hint is None:
        hint = _hint(prog, e) if isinstance(e, BaseException) else HELP_HINT.format(prog=prog)
    if isinstance(e, rundir.RunExists):
        e = f"--out {e.directory} holds {e.found}, and a new run there would replace it"
    message = (f"{about}: " if about else "") + in_flag_words(e, namer)
    print(f"{prog}: error: {message}", file=sys.stderr)
    print(f"hint: {hint}", file=sys.stderr)
    if as_json:
        summary = _saved_summary(run_dir) if status == RunStatus.FAILED else {}
        print(_json({**summary, "status": status, "error": message, "run_dir": run_dir}))


def _command(prog: str) -> str:
    """``run`` for ``fedkit run``, ``export`` for ``fedkit export nvflare`` (``fedkit`` alone: run's flags)."""
    words = prog.split()
    return words[1] if len(words) > 1 else "run"


def _refuse(prog: str, e: BaseException | str, run_dir: str | None = None, as_json: bool = False,
            args: argparse.Namespace | None = None) -> NoReturn:
    """Refuse the command line before the run: the message, a hint, exit code 2."""
    _say(prog, e, run_dir, as_json, args=args)
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


def _saved_summary(run_dir: str | None) -> dict[str, Any]:
    """The summary a failed run saved in its directory (rounds, accuracy so far...), or {}."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text()) if run_dir else {}
        return summary if isinstance(summary, dict) else {}
    except (OSError, ValueError):
        return {}



@contextlib.contextmanager
def warnings_said(prog: str):
    """Python warnings said as the CLI says things, one line in the flags' words (``fedkit run: warning: ...``),
    not as Python shows them (a file, a line number and a line of source)."""
    namer = flag_namer(_command(prog))

    def say(message: Warning | str, *_: Any, **__: Any) -> None:
        words = message.error.worded(namer) if isinstance(message, ConfigWarning) else str(message)
        print(f"{prog}: warning: {words}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = say
        yield

