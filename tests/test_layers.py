"""The architecture holds by tool, not by memory: layers, no import cycles, no imports hidden in functions."""

import re
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "fedkit"


def test_the_layer_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout and "3 kept" in out.stdout


def test_no_module_of_fedkit_is_in_an_import_cycle():
    graph = grimp.build_graph("fedkit", exclude_type_checking_imports=False)  # annotations count too
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module and graph.chain_exists(importer=imported, imported=module):
                cycles.append(" -> ".join(graph.find_shortest_chain(importer=imported, imported=module)) + f" -> {imported}")
    # a package's __init__ imports its own modules, which import each other through it: not a cycle of code
    real = [c for c in cycles if not any(c.split(" -> ")[0] == p or c.endswith(f"-> {p}")
                                         for p in ("fedkit", "fedkit.privacy", "fedkit.workflows", "fedkit.engine"))]
    assert not real, "\n".join(real)


def test_no_import_is_hidden_inside_a_function_to_dodge_a_cycle():
    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"^\s+from \.", line) and "TYPE_CHECKING" not in line:
                hidden.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    # imports guarded by `if TYPE_CHECKING:` are for annotations only; find and allow exactly those blocks
    allowed = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines):
            if line.startswith("if TYPE_CHECKING:"):
                m = n + 1
                while m < len(lines) and (lines[m].startswith("    ") or not lines[m].strip()):
                    allowed.add(f"{path.relative_to(ROOT)}:{m + 1}: {lines[m].strip()}")
                    m += 1
    assert [h for h in hidden if h not in allowed] == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "privacy").glob("*.py")), ids=lambda p: p.name)
def test_privacy_files_are_small(path):
    assert len(path.read_text().splitlines()) <= 260, f"{path.name}: split it by what it holds"


def test_argparse_lives_only_in_the_cli():
    users = sorted(p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py")
                   if re.search(r"^import argparse|^from argparse", p.read_text(), re.M))
    assert set(users) == {"cli"} and "parser.py" in {p.name for p in (PACKAGE / "cli").glob("*.py")}
