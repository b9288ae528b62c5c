"""``fedkit run``, ``fedkit compare`` and ``fedkit export``: every check before the first round (the workflow's own,
asked with the flags' values), then the run in its locked directory, said in fedkit's one format (`fedkit.cli.say`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .. import checkpoint, export, plots, rundir
from ..checkpoint import CheckpointError
from ..cli_flags import check_federation, data_from_args, experiment_from_args, refuse_unused
from ..errors import ConfigError
from ..status import RunStatus
from ..simulator import RunInterrupted, write_html
from .parser import given_flags
from .resume import RESUME_MAY_CHANGE, resumed_args
from .say import (_failure_hint, _json, _refuse, _resume_command, _say, failure_words, flag_namer,
                  warnings_said)

INTERRUPTED, TERMINATED = 130, 128 + signal.SIGTERM  # exit codes: Ctrl-C, SIGTERM (143), as a shell reports them


@contextlib.contextmanager
def sigterm_as_interrupt():
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




def export_main(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """``fedkit export nvflare --out DIR <run flags>``: the FLARE job folder, and the line that runs it."""
    prog = f"fedkit export {args.target}"
    try:
        job = export.job_from_args(args, given_flags(argv) if argv else None)
    except (ConfigError, OSError) as e:
        _refuse(prog, e, None, args.json, args)
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
            args.out = args.out or f"runs/{args.dataset}-{args.partition}-{time.strftime('%Y%m%d-%H%M%S')}"
        exp = experiment_from_args(args)
        check_federation(exp)  # before the data loads
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
        _refuse(prog, e, getattr(args, "out", None), as_json, args)
    except KeyboardInterrupt:  # while the data loads: nothing ran
        if lock is not None:
            lock.release(undo=True)
        raise SystemExit(130)
    progress = not args.no_progress
    try:
        try:
            with warnings_said(prog):
                run = sim.resume(args.out, progress=progress) if args.resume else sim.run(progress=progress)
        except RunInterrupted as e:  # Ctrl-C: the run is aborted and checkpointed; said below, exit 130
            run = e.run
    except (ConfigError, CheckpointError) as e:  # refused as the run started (e.g. HE provisioning): no round done
        if not args.resume and not checkpoint.exists(args.out):
            (Path(args.out) / "cli.json").unlink(missing_ok=True)
            lock.release(undo=True)  # and a run directory this command made goes again
        _say(prog, e, args.out, as_json, args=args)
        return 2
    except Exception as e:
        said = failure_words(e, flag_namer("run", args), getattr(sim.workflow, "max_norm_ratio", None))
        _say(prog, f"the run failed: {type(e).__name__}: {said}", args.out, as_json, status=RunStatus.FAILED,
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
    if run.status == RunStatus.ABORTED:
        print(f"{prog}: interrupted after {summary['rounds']} round(s); continue with: {_resume_command(args.out)}",
              file=sys.stderr)
        return 130
    return 0




def compare_main(p: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """``fedkit compare``: each algorithm on the same partition, seed and initial model; one plot."""
    prog = "fedkit compare"
    out = Path(args.out or f"runs/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    lock = None
    try:
        if argv:
            refuse_unused(args, given_flags(argv), args.algorithms, compare=True)
        experiments = {name: experiment_from_args(args, name) for name in args.algorithms}  # refusals before the load
        for exp in experiments.values():
            check_federation(exp)
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
        _refuse(prog, e, str(out), args.json, args)
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
                _say(prog, e, str(out), args.json, args=args, about=name)
                return 2
            except Exception as e:
                said = failure_words(e, flag_namer("compare", args), getattr(sim.workflow, "max_norm_ratio", None))
                _say(prog, f"{name} failed: {type(e).__name__}: {said}", str(out), args.json, status=RunStatus.FAILED,
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


