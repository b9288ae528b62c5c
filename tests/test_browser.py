"""The notebooks in a real browser: JupyterLab driven by Playwright with the system's Chromium.

For each notebook (a copy with ``SMOKE = True``): Run > Run All Cells, then what a person would see:
no error output, no "Error displaying widget", no browser console error, every visible plotly figure
with drawn traces; a full screenshot goes to runs/browser/<notebook>.png (git-ignored) to look at.
Then notebook 01's ExperimentPanel: Run fills the progress bar and the live dashboard, Stop ends a long
run within seconds; and Kernel > Interrupt Kernel stops a cell running several workflows (fk.compare).

Needs Chromium (Debian: ``apt-get install -y chromium``, which .ci/run does) and the ``playwright``
package (the dev extra); skips with the reason otherwise. ``playwright install`` is never needed.
Run it alone: ``.venv/bin/python -m pytest tests/test_browser.py -v``.
"""

from __future__ import annotations

import importlib
import json
import re
import time
from pathlib import Path

import pytest

from browser_support import (ERRORS_JS, FIGURES_JS, STDERR_JS, JupyterLab, find_chromium, scratch_notebook,
                             smoke_copy, wait_until_run)

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SHOTS = ROOT / "runs" / "browser"
RUN_ALL_TIMEOUT = 240  # seconds for one notebook's Run All (5-20 s each in nbclient)

# console errors that are not the notebooks' doing, each with the reason it is harmless
HARMLESS_CONSOLE = [
    # none so far: add (regex, reason) pairs here, never a blanket pattern
]

# stderr output a notebook shows on purpose (a warning it demonstrates), as (notebook, regex of the text, reason);
# anything else on stderr is drawn red in JupyterLab and read as an error: progress, notes and logs go elsewhere
EXPECTED_STDERR: list[tuple[str, str, str]] = [
    # none so far: add one entry per cell that shows a warning on purpose, never a blanket pattern
]

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium executable (/usr/bin/chromium): "
                                "apt-get install -y chromium (CI's .ci/run installs it)")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab serving a smoke-mode copy of notebooks/ plus a scratch notebook, stopped at the end."""
    root = tmp_path_factory.mktemp("notebooks")
    for nb in NOTEBOOKS:
        smoke_copy(nb, root / nb.name)
    server = JupyterLab(root, tmp_path_factory.mktemp("jupyter")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, timeout=60_000,
                              args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


class Notebook:
    """One notebook open in its own page, with the console errors the page logged."""

    def __init__(self, browser, lab: JupyterLab, name: str) -> None:
        self.lab, self.name = lab, name
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.context.set_default_timeout(30_000)
        self.page = self.context.new_page()
        self.console: list[str] = []
        self.page.on("console", lambda m: self.console.append(f"{m.text} @ {m.location.get('url', '')}")
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.console.append(f"uncaught: {e}"))
        self.page.goto(f"{lab.url}/lab/tree/{name}?reset&token={lab.token}", timeout=60_000)
        self.page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
        # the file browser closed: the notebook gets the page's width, as in the screenshots a person looks at
        current = self.page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
        if current.count():
            current.first.click()
        deadline = time.monotonic() + 60
        while (k := lab.kernel_of(name)) is None or k.get("execution_state") != "idle":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: the kernel did not start within 60 s: {k}")
            self.page.wait_for_timeout(300)

    def menu(self, top: str, item: str) -> None:
        """Click ``top`` in the menu bar, then ``item`` in its menu (as a person does)."""
        self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell .jp-InputPrompt").first.click()
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{top}$")).click()
        self.page.locator(".lm-Menu-content .lm-Menu-itemLabel", has_text=re.compile(f"^{item}$")).click()

    def run_all(self, timeout: float = RUN_ALL_TIMEOUT) -> list[str]:
        self.menu("Run", "Run All Cells")
        self.page.wait_for_timeout(1000)
        return wait_until_run(self.page, self.lab, self.name, timeout)

    def console_errors(self) -> list[str]:
        return [e for e in self.console if not any(re.search(p, e) for p, _ in HARMLESS_CONSOLE)]

    def screenshot(self, path: Path) -> None:
        """The whole notebook in one image: the viewport is made as tall as the notebook for the shot."""
        height = self.page.evaluate("""() => {
          const o = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer');
          return o ? o.scrollHeight : 1000; }""")
        self.page.set_viewport_size({"width": 1400, "height": min(int(height) + 200, 20000)})
        self.page.evaluate("""() => { for (const o of document.querySelectorAll('.jp-WindowedPanel-outer'))
                                        o.scrollTop = 0; }""")
        self.page.wait_for_timeout(1500)  # plotly figures relayout on resize
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=True, timeout=60_000)
        self.page.set_viewport_size({"width": 1400, "height": 1000})

    def close(self, shutdown: bool = True) -> None:
        try:
            self.context.close()
        finally:
            if shutdown:
                self.lab.shutdown_session(self.name)


@pytest.fixture(scope="module")
def opened(browser, lab):
    """Notebooks run in the browser so far, by name; notebook 01 stays open for the panel's test."""
    pages: dict[str, tuple[Notebook, list[str]]] = {}

    def open_and_run(name: str) -> tuple[Notebook, list[str]]:
        if name not in pages:
            nb = Notebook(browser, lab, name)
            started = time.monotonic()
            prompts = nb.run_all()
            nb.seconds = time.monotonic() - started
            pages[name] = (nb, prompts)
        return pages[name]

    yield open_and_run
    for nb, _ in pages.values():
        nb.close()


PANEL = "01_quickstart.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_clean_in_jupyterlab(path, opened):
    nb, prompts = opened(path.name)
    try:
        SHOTS.mkdir(parents=True, exist_ok=True)
        nb.screenshot(SHOTS / f"{path.stem}.png")
        # "[ ]:" is a cell Run All did not reach; a cell with its input hidden shows no prompt: it ran when a
        # later cell ran (Run All stops at the first error)
        last = max((i for i, p in enumerate(prompts) if re.search(r"\[\d+\]", p)), default=-1)
        not_run = [i for i, p in enumerate(prompts) if re.search(r"\[\s*\]", p) or (not p.strip() and i > last)]
        errors = nb.page.evaluate(ERRORS_JS)
        stderr = [o for o in nb.page.evaluate(STDERR_JS) if not _expected_stderr(path.name, o["text"])]
        figures = nb.page.evaluate(FIGURES_JS)
        # the panel's live figures are empty until its Run is clicked (test_panel_run_and_stop); figures in
        # a hidden tab or box are not drawn at all: only the figures a person sees after Run All must have traces
        panel_cells = nb.page.evaluate("""() => {
          const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell')];
          return cells.map((c, i) => [...c.querySelectorAll('button')].some(b => b.textContent.trim() === 'Stop') ? i : -1)
                      .filter(i => i >= 0); }""")
        empty = [f for f in figures if f["traces"] == 0 and f["width"] > 0 and f["cell"] not in panel_cells]
        problems = []
        if not_run:
            problems.append(f"code cells that did not run (0-based among code cells): {not_run}; prompts {prompts}")
        problems += errors
        if stderr:
            problems.append("stderr output (red in JupyterLab: a student reads it as an error), by cell:\n  "
                            + "\n  ".join(f"cell {o['cell']}: {o['text'][:200]!r}" for o in stderr[:10]))
        if empty:
            problems.append(f"plotly figures drawn without traces: {empty}")
        console = nb.console_errors()
        (SHOTS / f"{path.stem}.json").write_text(json.dumps(  # what was seen, next to the screenshot
            {"run_all_seconds": round(nb.seconds, 1), "prompts": prompts, "errors": errors, "stderr": stderr,
             "figures": figures,
             "console_errors": nb.console}, indent=1))
        if console:
            problems.append("browser console errors:\n  " + "\n  ".join(console[:20]))
        assert not problems, f"{path.name} in JupyterLab:\n" + "\n".join(problems)
    finally:
        if path.name != PANEL:
            nb.close()


def _expected_stderr(notebook: str, text: str) -> bool:
    return any(name == notebook and re.search(pattern, text) for name, pattern, _ in EXPECTED_STDERR)


def _panel(nb: Notebook):
    page = nb.page
    out = page.locator(".jp-OutputArea-output").filter(has=_button(page, "Stop"))
    return out.first


def _button(where, text: str):
    return where.locator("button.widget-button", has_text=re.compile(rf"^\s*{text}\s*$"))


def _progress(panel) -> float:
    style = panel.locator(".widget-hprogress .progress-bar").first.get_attribute("style") or ""
    m = re.search(r"width:\s*([\d.]+)%", style)
    return float(m.group(1)) if m else 0.0


def _status(panel) -> str:
    return panel.locator(".widget-html-content").first.inner_text().strip()


def _wait(predicate, timeout: float, page, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        page.wait_for_timeout(200)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


def test_panel_run_and_stop(opened):
    nb, _ = opened(PANEL)
    page, panel = nb.page, _panel(nb)
    page.set_viewport_size({"width": 1400, "height": 1600})  # the whole panel in its screenshots
    panel.scroll_into_view_if_needed()
    assert _status(panel) == "ready"
    run, stop = _button(panel, "Run"), _button(panel, "Stop")

    # Run: the progress bar fills, the live dashboard draws, the status says it is done
    run.click()
    _wait(lambda: _progress(panel) > 0, 120, page, "the progress bar moves after Run")
    _wait(lambda: _status(panel).startswith("done"), 180, page, f"the run ends: status {_status(panel)!r}")
    assert _progress(panel) == pytest.approx(100), "the progress bar is full when the run is done"
    live = panel.locator(".js-plotly-plot").first
    _wait(lambda: live.locator(".trace").count() > 0, 20, page, "the dashboard's first figure has traces")
    page.wait_for_timeout(500)
    panel.screenshot(path=str(SHOTS / "01_panel_after_run.png"))

    # a long run (the rounds slider's readout set to its maximum, by typing), then Stop
    readout = panel.locator(".jupyter-widgets.widget-slider", has=page.locator(".widget-label", has_text=re.compile("^rounds$")))
    field = readout.locator(".widget-readout").first
    field.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("200")
    page.keyboard.press("Enter")
    page.wait_for_timeout(500)
    run.click()
    _wait(lambda: _status(panel).startswith("running"), 30, page, f"a second run starts: {_status(panel)!r}")
    _wait(lambda: 0 < _progress(panel) < 100, 120, page, "the long run completes a round")
    at_click = _progress(panel)
    stop.click()
    clicked = time.monotonic()
    seen: dict[str, float] = {}  # status -> seconds after the click it was first shown

    def stopped():
        s = _status(panel)
        seen.setdefault(s.split(":")[0], round(time.monotonic() - clicked, 1))
        return s.startswith(("aborted", "stopped", "failed")) and s

    status = _wait(stopped, 60, page, f"the run stops after Stop: status {_status(panel)!r}")
    took = time.monotonic() - clicked
    panel.screenshot(path=str(SHOTS / "01_panel_after_stop.png"))
    timeline = (f"Stop clicked at {at_click:.0f}% of 200 rounds; statuses shown (s after the click): {seen}; "
                f"ended at {_progress(panel):.0f}%")
    (SHOTS / "01_panel_stop.txt").write_text(timeline + "\n")
    assert status.startswith("aborted"), status
    assert _progress(panel) < 100
    assert nb.console_errors() == [], nb.console_errors()
    if took > STOP_WITHIN:
        # Known: during a fast run the click reaches the kernel late (the status shows "stopping..." only then;
        # the abort itself is quick): the dashboard is redrawn, and sent to the browser, every round.
        pytest.xfail(f"Stop took {took:.1f}s (more than {STOP_WITHIN}s) to end the panel's run: {timeline}")


STOP_WITHIN = 5  # seconds: "Stop ends the run within a few seconds"


INTERRUPT = "interrupt_scratch.ipynb"
SETUP = """import fedkit as fk
data = fk.data.load("digits")
parts = fk.data.iid(data.train, 4, seed=0)"""
MULTI_RUN = """runs = fk.compare({"FedAvg": fk.FedAvg(rounds=500), "FedProx": fk.FedProx(rounds=500, mu=0.01),
                   "FedOpt": fk.FedOpt(rounds=500)},
                  model=lambda: fk.models.for_data(data), clients=parts, test=data.test, progress=False)"""


def test_kernel_interrupt_stops_multi_run_cell(browser, lab):
    scratch_notebook(lab.root / INTERRUPT, [SETUP, MULTI_RUN, 'print("after the runs")'])
    nb = Notebook(browser, lab, INTERRUPT)
    try:
        page = nb.page
        nb.menu("Run", "Run All Cells")
        prompts = lambda: page.evaluate("""() => [...document.querySelectorAll(
            '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')].map(p => p.textContent)""")
        _wait(lambda: re.search(r"\[\d+\]", prompts()[0]) and "*" in prompts()[1], 60, page,
              f"the compare cell starts: {prompts()}")
        page.wait_for_timeout(2000)  # inside the first run
        nb.menu("Kernel", "Interrupt Kernel")
        interrupted = time.monotonic()
        # Until Ctrl-C propagates out of Simulator.run, an interrupt ends only the run in progress and compare
        # starts the next one: a person presses Interrupt again. What must hold today: the kernel is not wedged,
        # and a few interrupts stop the cell.
        first_took = None
        for _ in range(4):
            try:
                wait_until_run(page, lab, INTERRUPT, 6)
                first_took = first_took if first_took is not None else time.monotonic() - interrupted
                break
            except TimeoutError:
                nb.menu("Kernel", "Interrupt Kernel")
        else:
            wait_until_run(page, lab, INTERRUPT, 10)
        page.screenshot(path=str(SHOTS / "interrupt_scratch.png"))
        outputs = page.evaluate("""() => [...document.querySelectorAll(
            '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell')].map(c => c.querySelector('.jp-OutputArea').textContent)""")
        # KeyboardInterrupt, or fedkit's subclass of it that says which run it stopped (RunInterrupted)
        names = set(re.findall(r"^(\w+)(?::|$)", outputs[1], flags=re.M))  # the traceback's last line: "Name: ..."
        known = vars(importlib.import_module("fedkit.simulator"))
        stopped = any(n == "KeyboardInterrupt" or (isinstance(known.get(n), type)
                                                   and issubclass(known[n], KeyboardInterrupt)) for n in names)
        if not stopped or first_took is None or first_took > 10:
            pytest.xfail("Kernel > Interrupt does not yet end a multi-run cell with KeyboardInterrupt "
                         "(Ctrl-C propagating from Simulator.run is in progress): "
                         f"one interrupt stopped the cell: {first_took is not None} ({first_took} s), "
                         f"exceptions shown: {sorted(names)}, "
                         f"output of the cell: {outputs[1][-300:]!r}")
        assert "after the runs" not in outputs[2], "Run All went on after the interrupt"
        assert nb.console_errors() == [], nb.console_errors()
    finally:
        nb.close()
