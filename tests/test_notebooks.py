"""Every notebook runs top to bottom in smoke mode, with its parameters injected as papermill does."""

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found: the tutorials are part of the product"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_clean(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert "parameters" in code[0].get("metadata", {}).get("tags", []), "first code cell must be tagged 'parameters'"
    assert "SMOKE" in "".join(code[0]["source"]), "the parameters cell needs a SMOKE switch for CI"
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), "strip outputs before committing"
    assert path.stem[:2].isdigit() and " " not in path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nbformat.v4.new_code_cell("# injected by the test suite\nSMOKE = True")
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(at + 1, injected)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # JupyterLab draws stderr in red: a student reads it as an error (progress is a widget, notes go to stdout)
    stderr = [(i, o.text[:200]) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, f"stderr output (cell index, text): {stderr}"


def test_every_notebook_is_in_the_readme_table():
    """A notebook the README does not list is one nobody finds: its table has a row for each."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [p.name for p in NOTEBOOKS if f"| `{p.name}` |" not in readme]
    assert not missing, f"add a row to README's notebook table for: {missing}"
