"""``fedkit run --resume DIR``: the flags a run was started with, read back from ``DIR/cli.json`` through the parser
again (so a damaged file is refused like a bad command line)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from ..errors import ConfigError
from .parser import UsageError, _subparsers

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

