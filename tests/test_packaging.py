"""fedkit as a user installs it: the wheel, a fresh venv, no extras, run from another folder; and every optional
import in fedkit/ names the extra that holds it.

The installed test (about a minute) builds the sdist and wheel as ``python -m build`` does, makes a fresh venv
(``--without-pip``, no system or dev site-packages), and makes visible in it exactly the distributions that
the wheel's requirements pull in, read from the wheel's own metadata: each is a symlink, in a folder of
this test's, to the package already installed in the dev venv, and a ``.pth`` file puts that folder on the
fresh venv's path. Nothing is copied or downloaded (torch alone is ~750 MB), and the fresh venv sees
nothing the requirements do not name: an undeclared import fails there as it would for a user. pip
installs the wheel with ``--no-index`` and no configuration, so a requirement the folder cannot satisfy
fails the install instead of being fetched. (A symlinked folder shared by several distributions, such as
a namespace package, shows all of theirs; fedkit's requirements have none that matter.)
"""

from __future__ import annotations

import ast
import email
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import venv
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import fedkit as fk
from fedkit.cli import main
from fedkit.errors import MissingExtra
from fedkit.extras import OPTIONAL, require

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# run only by NVIDIA FLARE on its sites, where nvflare is there by definition: copied into the exported job
RUNS_WHERE_INSTALLED = {"fedkit/export/flare_client_script.py": "nvflare"}
TIMEOUT = 240  # seconds for any one command; the whole installed test takes about a minute


# ------------------------------------------------------------------------------ the source: every optional import

@functools.cache
def _providers() -> dict[str, list[str]]:
    """Top-level module -> the installed distributions that provide it (a scan of every one: once)."""
    return metadata.packages_distributions()


def core_distributions() -> set[str]:
    return {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}


def _type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Is ``node`` inside an ``if TYPE_CHECKING:`` block (never run)?"""
    while node in parents:
        node, child = parents[node], node
        if isinstance(node, ast.If) and child in node.body and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def bare_optional_imports(source: str, where: str, core: set[str]) -> list[str]:
    """The ``import``/``from ... import`` statements in ``source`` of a module that no core dependency provides and
    that would run: each must go through `fedkit.extras.require` instead, which names the extra."""
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    providers = _providers()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules = [node.module]
        else:
            continue
        for module in modules:
            top = module.partition(".")[0]
            if top in sys.stdlib_module_names or top == "fedkit":
                continue
            if {canonicalize_name(d) for d in providers.get(top, [top])} & core:
                continue
            if not _type_checking(node, parents) and RUNS_WHERE_INSTALLED.get(where) != top:
                found.append(f"{where}:{node.lineno} imports {module}")
    return found


def test_every_optional_import_in_fedkit_names_its_extra():
    core = core_distributions()
    bare = [hit for path in sorted((ROOT / "fedkit").rglob("*.py"))
            for hit in bare_optional_imports(path.read_text(), str(path.relative_to(ROOT)), core)]
    assert not bare, ("optional packages imported without the named-extra error; import them with "
                      "fedkit.extras.require(module, feature) (and list the package in OPTIONAL):\n" + "\n".join(bare))
    required = {node.args[0].value.partition(".")[0] for path in (ROOT / "fedkit").rglob("*.py")
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require" and node.args
                and isinstance(node.args[0], ast.Constant)}
    assert required <= set(OPTIONAL) and required >= {"tenseal", "ray", "torchvision"}


def test_the_import_check_finds_a_new_bare_optional_import():
    core = core_distributions()
    assert bare_optional_imports("def f():\n    import tenseal\n", "fedkit/x.py", core) == [
        "fedkit/x.py:2 imports tenseal"]
    assert bare_optional_imports("from opacus.optimizers import DPOptimizer\n", "fedkit/x.py", core)
    assert not bare_optional_imports("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ray\n"
                                     "import torch, plotly.graph_objects, sklearn, ipywidgets, json\n", "fedkit/x.py", core)


def test_each_optional_package_is_in_the_extra_its_error_names_and_not_in_the_core():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for top, (package, extra) in OPTIONAL.items():
        assert canonicalize_name(package) not in core_distributions(), top
        assert canonicalize_name(package) in {canonicalize_name(Requirement(r).name) for r in extras[extra]}, \
            f"{package} is not in fedkit[{extra}], which its error tells users to install"


# ------------------------------------------------------------------------------ make demo, make test

def _make_installs(target: str, tmp: Path) -> tuple[list[str], list[str]]:
    """What ``make TARGET`` would give pip to install into a fresh .venv, and the stamp files it would touch
    (``make -n``: nothing is run)."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp / name)
    p = subprocess.run(["make", "-n", target], cwd=tmp, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = [line for line in p.stdout.splitlines() if not line.startswith("echo")]
    return ([line.split(" install ", 1)[1] for line in lines if "/pip install" in line],
            [line.split()[1] for line in lines if line.startswith("touch ")])


@pytest.mark.skipif(shutil.which("make") is None, reason="reads the Makefile with `make -n`: make is not installed")
def test_make_demo_installs_fedkit_alone_and_make_test_the_dev_extra(tmp_path):
    (demo, demo_stamps), (test, test_stamps) = _make_installs("demo", tmp_path), _make_installs("test", tmp_path)
    # torch first where .venv has none (the TORCH line), then fedkit: the demo with no extra, the tests with [dev]
    assert [d.split()[-1] for d in demo] == ["torch==2.13.0", "."], demo
    assert [t.split()[-1] for t in test] == ["torch==2.13.0", '".[dev]"'], test
    # one stamp per install, so that `make test` after `make demo` still installs the dev extra
    assert demo_stamps == [".venv/.installed-torch", ".venv/.installed-demo"], demo_stamps
    assert test_stamps == [".venv/.installed-torch", ".venv/.installed-dev"], test_stamps


# ------------------------------------------------------------------------------ missing extras, in this process

# each optional package: a command line and an API call that need it (the installed test runs the same ones)
NEEDS = {
    "opacus": (["run", "--no-progress", "--dp-sgd"], "fk.DPFedAvg(rounds=1)"),
    "tenseal": (["run", "--no-progress", "--he"], "fk.Experiment.preset('smoke', workflow=fk.FedAvg(rounds=1, he=fk.he.CKKS()))"
                                 ".simulator().run(progress=False)"),
    "torchvision": (["run", "--no-progress", "--dataset", "mnist"], "fk.data.load('mnist')"),
    "ray": (["run", "--no-progress", "--engine", "ray"], "fk.engine.ray()"),
    "nvflare": (["export", "nvflare", "--out", "job"], "fk.export.nvflare(fk.Experiment.preset('smoke'), 'job')"),
}
SMALL = ["--rounds", "1", "--clients", "2"]


def test_every_optional_package_has_a_feature_checked_without_it():
    assert set(NEEDS) == set(OPTIONAL)


@pytest.mark.parametrize("top", sorted(NEEDS))
def test_a_feature_without_its_extra_names_the_extra_in_the_api_and_the_cli(top, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, top, None)  # `import top` now fails as if it were not installed
    package, extra = OPTIONAL[top]
    with pytest.raises(MissingExtra, match=re.escape(f"needs {package}, which is not installed: "
                                                     f"pip install 'fedkit[{extra}]'")) as e:
        eval(NEEDS[top][1], {"fk": fk})  # noqa: S307 - the fixed calls above
    assert e.value.extra == extra and isinstance(e.value, fk.ConfigError)
    with pytest.raises(SystemExit) as e:
        code = main([*NEEDS[top][0], *SMALL])
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 2, err
    assert f"pip install 'fedkit[{extra}]'" in err.splitlines()[0] and err.splitlines()[1].startswith("hint: install")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no run directory left behind


def test_require_says_when_an_installed_package_fails_to_load(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(MissingExtra, match="not installed"):
        require("torchvision", "dataset 'mnist'")
    with pytest.raises(ValueError, match="not an optional package"):
        require("json", "settings")


# ------------------------------------------------------------------------------ the wheel in a fresh venv

def _clean_env() -> dict[str, str]:
    """The environment a user's shell would give: no PYTHONPATH (this checkout), no pip configuration, no user site;
    and no bytecode written (the fresh venv reads the dev venv's packages through symlinks: nothing written there)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1"}


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return _run_all({"": cmd}, cwd)[""]


def _run_all(cmds: dict[str, list[str]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run the commands at once (each mostly waits on torch's import); their results by key."""
    procs = {k: subprocess.Popen(c, cwd=cwd, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k, c in cmds.items()}
    done = {}
    for k, p in procs.items():
        try:
            out, err = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            raise AssertionError(f"{' '.join(cmds[k])} did not finish in {TIMEOUT} s") from None
        done[k] = subprocess.CompletedProcess(cmds[k], p.returncode, out, err)
    return done


def _build(tmp: Path) -> tuple[Path, str]:
    """The wheel ``python -m build`` makes (from the sdist, as a user's pip would) and what the build said."""
    src = tmp / "src"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "fedkit", src / "fedkit", ignore=shutil.ignore_patterns("__pycache__"))
    # --no-isolation: setuptools and build come from the dev extra, so the build needs no network
    p = _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp / "dist"), str(src)], tmp)
    assert p.returncode == 0, p.stdout + p.stderr
    return next((tmp / "dist").glob("fedkit-*.whl")), p.stdout + p.stderr


def _requirements(name: str, extras: set[str], wheel_meta: email.message.Message) -> list[Requirement]:
    """What distribution ``name`` with ``extras`` requires: fedkit's from the wheel, the others' as installed here."""
    meta = wheel_meta if canonicalize_name(name) == "fedkit" else metadata.metadata(name)
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras | {""})]


def _closure(extras: set[str], wheel_meta: email.message.Message) -> set[str]:
    """The installed distributions that ``fedkit[extras]`` needs, all the way down (fedkit itself not included)."""
    todo, seen = [("fedkit", frozenset(extras))], set()
    names: set[str] = set()
    while todo:
        name, ex = todo.pop()
        if (canonicalize_name(name), ex) in seen:
            continue
        seen.add((canonicalize_name(name), ex))
        for r in _requirements(name, set(ex), wheel_meta):
            if canonicalize_name(r.name) != "fedkit":
                names.add(canonicalize_name(r.name))
            todo.append((r.name, frozenset(r.extras)))
    return names


def _expose(names: set[str], shared: Path) -> None:
    """Symlinks in ``shared`` to the installed files (packages, modules, .dist-info) of the distributions ``names``."""
    for name in names:
        dist = metadata.distribution(name)
        assert dist.files is not None, f"{name} has no RECORD: cannot tell its files"
        site = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files if f.parts and f.parts[0] != ".."}:
            link = shared / top
            if not link.exists() and (site / top).exists():
                link.symlink_to(site / top)


def _fresh_venv(tmp: Path, shared: Path) -> Path:
    """A venv with no pip and no site-packages but its own, and ``shared`` on its path; its python."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(tmp / "venv")
    python = tmp / "venv" / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp)
                .stdout.strip())
    (site / "fedkit-test-shared.pth").write_text(f"{shared}\n")
    return python


def _pip_install(python: Path, target: str, tmp: Path) -> None:
    p = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--no-cache-dir",
              "--progress-bar", "off", target], tmp)
    assert p.returncode == 0, f"pip install {target} without an index:\n{p.stdout}\n{p.stderr}"


def _printed_json(p: subprocess.CompletedProcess) -> dict:
    """The JSON a command printed last (its output, if it failed)."""
    assert p.returncode == 0, f"{' '.join(p.args)[:300]}\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def _readme_first_cell() -> str:
    block = re.search(r"## In a notebook\n.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return block.replace("rounds=20", "rounds=1")  # as tests/test_readme.py shrinks it


API_WITHOUT_EXTRAS = f"""
import json, fedkit as fk
out = {{"file": fk.__file__}}
for top, call in {({k: v[1] for k, v in NEEDS.items()})!r}.items():
    try:
        eval(call)
        out[top] = None
    except fk.ConfigError as e:
        out[top] = [type(e).__name__, getattr(e, "extra", None), str(e)]
panel = fk.widgets.ExperimentPanel()
out["panel"] = type(panel).__name__
print(json.dumps(out))
"""


@pytest.mark.timeout(600)
def test_the_wheel_installed_without_extras_runs_and_names_each_missing_extra(tmp_path):
    pytest.importorskip("build", reason="builds the wheel with `python -m build`: pip install -e '.[dev]'")
    started = time.perf_counter()
    wheel, said = _build(tmp_path)
    # `python -m build` clean: no warning about the metadata (setuptools' own notes on byte-compiling aside)
    warnings = [line for line in said.splitlines() if re.search(r"warn", line, re.I) and "byte-compil" not in line]
    assert not warnings, "\n".join(warnings)
    with zipfile.ZipFile(wheel) as z:
        meta = email.message_from_bytes(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))))
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in z.namelist())
    assert meta["License-Expression"] == "Apache-2.0" and meta["License-File"] == "LICENSE"
    assert len(meta.get_all("Classifier")) >= 5 and {u.split(",")[0] for u in meta.get_all("Project-URL")} >= \
        {"Homepage", "Source", "Issues"}

    shared = tmp_path / "shared"
    shared.mkdir()
    _expose(_closure(set(), meta), shared)
    python = _fresh_venv(tmp_path, shared)
    _pip_install(python, str(wheel), tmp_path)
    fedkit = python.parent / "fedkit"
    work = tmp_path / "work"  # a folder of the user's, away from the checkout
    work.mkdir()

    # a run, each optional feature's command line without its extra, and the API's calls, all at once
    ran = _run_all({"run": [str(fedkit), "run", "--no-progress", *SMALL, "--json", "--out", "runs/first"],
                    "api": [str(python), "-c", API_WITHOUT_EXTRAS],
                    **{top: [str(fedkit), *argv, *SMALL, *(["--out", f"runs/{top}"] if argv[0] == "run" else [])]
                       for top, (argv, _) in NEEDS.items()}}, work)
    summary = _printed_json(ran["run"])
    assert summary["status"] == "done" and summary["rounds"] == 1 and summary["final_accuracy"] > 0.2
    assert (work / "runs" / "first" / "plot.html").is_file()
    for top, (argv, _) in NEEDS.items():
        package, extra = OPTIONAL[top]
        p = ran[top]
        where = f"fedkit {' '.join(argv)}:\n{p.stderr}"
        assert p.returncode == 2 and "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 2, where
        assert f"needs {package}, which is not installed: pip install 'fedkit[{extra}]'" in p.stderr, where
    api = _printed_json(ran["api"])
    assert api["file"].startswith(str(tmp_path / "venv")), api["file"]  # the wheel's fedkit, not the checkout's
    for top in NEEDS:
        package, extra = OPTIONAL[top]
        assert api[top] is not None and api[top][:2] == ["MissingExtra", extra], (top, api[top])
        assert f"pip install 'fedkit[{extra}]'" in api[top][2], api[top]
    assert api["panel"] == "ExperimentPanel"  # ipywidgets and anywidget are core: the panels need no extra
    assert sorted(p.name for p in work.iterdir()) == ["runs"]  # the refusals wrote nothing
    assert not {p.name for p in (work / "runs").iterdir()} & set(NEEDS), "a refused run left its directory"

    # with [all] (notebooks, privacy): the README's first cell, the panel, DP-SGD and HE
    _expose(_closure({"all"}, meta), shared)
    _pip_install(python, f"fedkit[all] @ {wheel.as_uri()}", tmp_path)
    code = _readme_first_cell() + """
import json, jupyterlab, ipykernel
panel = fk.widgets.ExperimentPanel()
dp = fk.Experiment.preset("smoke", workflow=fk.DPFedAvg(rounds=1)).simulator().run(progress=False)
he = fk.Experiment.preset("smoke", workflow=fk.FedAvg(rounds=1, he=fk.he.CKKS())).simulator().run(progress=False)
print(json.dumps({"run": run.status, "live": live.status, "dp": dp.status, "he": he.status,
                  "epsilon": dp.history.last("epsilon")}))
"""
    done = _printed_json(_run([str(python), "-c", code], work))
    assert (done["run"], done["dp"], done["he"]) == ("done", "done", "done") and done["live"] in ("aborted", "done")
    assert done["epsilon"] > 0
    print(f"\npackaging test: {time.perf_counter() - started:.0f} s")
