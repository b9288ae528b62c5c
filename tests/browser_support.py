"""Helpers of tests/test_browser.py: a JupyterLab server on localhost and a few waits on its notebook page.

Nothing here downloads anything: the browser is the system's Chromium (Debian's `chromium` package, see
.ci/run), driven by Playwright for Python through ``executable_path`` (never ``playwright install``).
Every wait is bounded, and the server is always stopped (its whole process group) by `JupyterLab.stop`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def find_chromium() -> str | None:
    """The system Chromium to drive ($FEDKIT_CHROMIUM first), or None when there is none."""
    env = os.environ.get("FEDKIT_CHROMIUM")
    for path in ([env] if env else []) + list(CHROMIUM_CANDIDATES) + [shutil.which("chromium") or ""]:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smoke_copy(src: Path, dst: Path) -> None:
    """Copy a notebook with ``SMOKE = True`` in its parameters cell (a text edit of the copy only)."""
    nb = json.loads(src.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    source = "".join(code[0]["source"])
    edited, n = re.subn(r"^SMOKE = False", "SMOKE = True ", source, count=1, flags=re.M)
    if n != 1:
        raise AssertionError(f"{src.name}: no 'SMOKE = False' line in the first code cell")
    code[0]["source"] = edited.splitlines(keepends=True)
    dst.write_text(json.dumps(nb, indent=1))


def scratch_notebook(path: Path, cells: list[str]) -> None:
    """Write a notebook of code ``cells`` (no outputs) to ``path``."""
    nb = {"nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
          "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [],
                     "source": src} for i, src in enumerate(cells)]}
    path.write_text(json.dumps(nb, indent=1))


# settings of the browser session: every cell in the DOM (no windowing, so that the DOM checks see all
# outputs), and no news/update toast over the notebook (the server is offline anyway)
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                       "checkForUpdates": False},
}


class JupyterLab:
    """``jupyter lab`` serving ``root`` on a free localhost port with a random token, in its own process group."""

    def __init__(self, root: Path, work: Path) -> None:
        self.root, self.work = root, work
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = work / "jupyterlab.log"

    def start(self, timeout: float = 90) -> "JupyterLab":
        settings = self.work / "lab-settings"
        for name, value in LAB_SETTINGS.items():
            f = settings / name
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(value))
        jupyter = Path(sys.executable).parent / "jupyter"
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(self.work / "runtime"), "PYTHONUNBUFFERED": "1",
               # the notebooks' kernels: few threads each, the machine is small and shared
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cmd = [str(jupyter), "lab", "--allow-root", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               "--port-retries=0", f"--ServerApp.token={self.token}", f"--ServerApp.root_dir={self.root}",
               f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={self.work / 'workspaces'}"]
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                self.api("GET", "/api/status", timeout=2)
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"jupyter lab did not answer within {timeout:.0f}s:\n{self.log.read_text()[-3000:]}")

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 10):
        req = urllib.request.Request(self.url + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"token {self.token}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
        return json.loads(data) if data else None

    def kernel_of(self, notebook: str) -> dict | None:
        """The kernel model (``execution_state``...) of the session of ``notebook`` (a path under root)."""
        for s in self.api("GET", "/api/sessions"):
            if s.get("path") == notebook and s.get("kernel"):
                return s["kernel"]
        return None

    def shutdown_session(self, notebook: str) -> None:
        """Stop the kernel of ``notebook`` (the CPUs are few: one kernel at a time)."""
        for s in self.api("GET", "/api/sessions"):
            if s.get("path") == notebook:
                try:
                    self.api("DELETE", f"/api/sessions/{s['id']}", timeout=20)
                except (OSError, urllib.error.URLError):
                    pass

    def stop(self) -> None:
        """Stop the server and everything it started (kernels included): SIGTERM, then SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            for s in self.api("GET", "/api/sessions", timeout=3):
                self.api("DELETE", f"/api/sessions/{s['id']}", timeout=10)
        except (OSError, urllib.error.URLError):
            pass
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # kernels live in the server's process group: make sure none is left
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# JavaScript run in the page: the state of the notebook's code cells, from the DOM
CELLS_STATE_JS = """() => {
  const cells = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell')];
  return cells.map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent || '');
}"""


def wait_until_run(page, lab: JupyterLab, notebook: str, timeout: float) -> list[str]:
    """Wait until ``notebook``'s kernel is idle and no code cell is running or queued ([*]), steadily for 1.5 s.

    Returns the cells' input prompts ("[3]:", or "[ ]:" for a cell that did not run)."""
    deadline = time.monotonic() + timeout
    steady_since = None
    prompts: list[str] = []
    while time.monotonic() < deadline:
        prompts = page.evaluate(CELLS_STATE_JS)
        kernel = lab.kernel_of(notebook)
        busy = kernel is None or kernel.get("execution_state") != "idle" or any("*" in p for p in prompts)
        if busy:
            steady_since = None
        elif steady_since is None:
            steady_since = time.monotonic()
        elif time.monotonic() - steady_since > 1.5:
            return prompts
        page.wait_for_timeout(300)
    raise TimeoutError(f"{notebook}: still running after {timeout:.0f}s; prompts: {prompts}")


# JavaScript: what a person would see as failures in the notebook's outputs
ERRORS_JS = """() => {
  const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
  const out = [];
  for (const e of nb.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.error"], '
                                      + '.jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]'))
    out.push('error output: ' + e.textContent.slice(0, 1500));
  for (const e of nb.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'))
    if (/Traceback|Error\\b/.test(e.textContent)) out.push('stderr: ' + e.textContent.slice(0, 1500));
  for (const e of nb.querySelectorAll('.jp-OutputArea-output'))
    if (e.textContent.includes('Error displaying widget')) out.push('widget: ' + e.textContent.slice(0, 500));
  return out;
}"""

# JavaScript: the text of every stderr output (JupyterLab tints it red: a person reads it as an error), with its
# cell's index among the notebook's cells
STDERR_JS = """() => {
  const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
  const cells = [...nb.querySelectorAll('.jp-Cell')];
  return [...nb.querySelectorAll('.jp-RenderedText[data-mime-type="application/vnd.jupyter.stderr"]')].map(e => ({
    cell: cells.indexOf(e.closest('.jp-Cell')), text: e.textContent.slice(0, 500)}));
}"""

# JavaScript: every plotly figure of the notebook, with its number of drawn traces
# (heatmaps draw as g.hm, images as g.im, in their own layers; lines, bars... as g.trace)
FIGURES_JS = """() => {
  const TRACES = '.trace, .heatmaplayer .hm, .imagelayer .im';
  const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook');
  return [...nb.querySelectorAll('.js-plotly-plot')].map(f => ({
    title: (f.querySelector('.gtitle') || {}).textContent || '',
    traces: f.querySelectorAll(TRACES).length,
    width: f.getBoundingClientRect().width,
    cell: [...nb.querySelectorAll('.jp-Cell')].indexOf(f.closest('.jp-Cell')),
  }));
}"""
