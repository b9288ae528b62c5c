"""Progress of a run: a widget in a notebook, a bar on a terminal, lines elsewhere; never stderr in a notebook."""

from __future__ import annotations

import io

import nbformat
import pytest
from nbclient import NotebookClient

from fedkit import progress
from fedkit.history import RoundRecord

WIDGET = "application/vnd.jupyter.widget-view+json"

# a run with progress in a notebook: what every tutorial does (digits, 2 clients, 2 rounds: a few seconds)
RUN_CELL = """import fedkit as fk
data = fk.data.load("digits")
run = fk.Simulator(fk.FedAvg(rounds=2), model=lambda: fk.models.for_data(data),
                   clients=fk.data.iid(data.train, 2, seed=0), test=data.test).run()
print("done", len(run.history))"""


def _records(n: int) -> list[RoundRecord]:
    return [RoundRecord(i, 0.1, {"accuracy": 0.5 + i / 10}) for i in range(n)]


def _show(bar: progress.Bar, n: int) -> None:
    for record in _records(n):
        bar.update_record(record)
    bar.close()


def test_progress_in_a_notebook_is_a_widget_and_never_stderr(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(RUN_CELL)])
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = nb.cells[0].outputs
    assert not [o for o in outputs if o.output_type == "stream" and o.name == "stderr"], outputs
    widgets = [o for o in outputs if o.output_type == "display_data" and WIDGET in o.data]
    assert len(widgets) == 1, outputs  # tqdm's widget; its text fallback (as displayed, at round 0) for viewers
    assert widgets[0].data["text/plain"].startswith("rounds:") and "/2" in widgets[0].data["text/plain"]
    assert [o.text for o in outputs if o.output_type == "stream"] == ["done 2\n"]


def test_progress_in_a_kernel_without_widgets_is_lines_on_stdout(monkeypatch, capsys):
    # a kernel whose front-end shows no widgets (here: no ipykernel shell, so tqdm picks its text bar)
    monkeypatch.setattr(progress, "in_kernel", lambda: True)
    _show(progress.Bar(3, desc="toy"), 3)
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines() == ["toy: round 1/3, accuracy 0.500", "toy: round 2/3, accuracy 0.600",
                                "toy: round 3/3, accuracy 0.700"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_a_bar_on_stderr(monkeypatch, capsys):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    _show(progress.Bar(3, done=1, desc="toy"), 2)  # a resumed run: round 1 was done before
    shown = terminal.getvalue()
    assert "\r" in shown and "toy: 100%" in shown and "3/3" in shown and "accuracy=0.600" in shown
    assert capsys.readouterr().out == ""


def test_progress_elsewhere_is_a_line_per_round_on_stderr(capsys):
    # a CLI in a pipe or CI: stdout is left to the results (`fedkit run --json` prints its summary last)
    _show(progress.Bar(None, desc="toy"), 2)
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == ["toy: round 1, accuracy 0.500", "toy: round 2, accuracy 0.600"]


@pytest.mark.parametrize("enabled", [True, False])
def test_bar_is_none_when_progress_is_off(enabled):
    assert (progress.bar(3, enabled) is not None) == enabled
