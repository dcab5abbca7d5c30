"""Drive JupyterLab in headless Chromium (Playwright) for tests/test_browser.py.

- `jupyter_lab(root, env)`: a JupyterLab server on 127.0.0.1 with a token, stopped afterwards.
- `run_all_cells(page, limit_s)`: Run > Run All Cells, then wait until every code cell has run or one raised.
- `PROGRESS_RECORDER`: a page script that keeps every ipywidgets progress bar ever added to the page
  (tqdm.auto's bars with `leave=False` are removed when they finish, so counting at the end would miss them);
  `progress_bars(page)` reads their text ("desc: 100% 10/10 [...]").
- `Widget`: one control of a notebook's widget, how to move it, and what must change when it moves;
  `exercise(page, widget, shot)` moves it, waits until its output changed, checks it and saves a screenshot.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# JupyterLab user settings for the tests: no news pop-up, and every cell kept in the DOM (the default
# windowing mode leaves off-screen cells unrendered, so their outputs could not be counted).
LAB_SETTINGS = {
    "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "notebook-extension/tracker": {"windowingMode": "none"},
}
ERROR = ".jp-OutputArea-output:has-text('Traceback (most recent call last)')"
PENDING = ("[ ]:", "[*]:", "")
# A tqdm bar printed as text ("train:  40%|████      | 4/10 [00:01<00:02, ...]") instead of a widget.
TEXT_BAR = re.compile(r"\d+%\|[^|\n]*\|\s*\d+(\.\d+)?[kMG]?/")

PROGRESS_RECORDER = """
window.__progressBars = [];
new MutationObserver(records => {
  for (const record of records) {
    for (const node of record.addedNodes) {
      if (!(node instanceof Element)) continue;
      const bars = node.matches('.widget-hprogress') ? [node] : [...node.querySelectorAll('.widget-hprogress')];
      for (const bar of bars) {
        if (!window.__progressBars.includes(bar)) window.__progressBars.push(bar);
      }
    }
  }
}).observe(document, {childList: true, subtree: true});
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_settings(folder: Path) -> None:
    """JupyterLab's user settings (`LAB_SETTINGS`) under `folder` (JUPYTERLAB_SETTINGS_DIR)."""
    for name, values in LAB_SETTINGS.items():
        plugin, file = name.split("/")
        path = folder / "@jupyterlab" / plugin / f"{file}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def _wait_until_up(base: str, token: str, log: Path, proc: subprocess.Popen) -> None:
    for _ in range(240):
        if proc.poll() is not None:
            break
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail("JupyterLab did not start within 2 minutes; its log ends:\n" + log.read_text()[-3000:])


@dataclass(frozen=True)
class Lab:
    """A running JupyterLab: its address, token and root folder."""

    base: str
    token: str
    root: Path

    def url(self, path: str) -> str:
        return f"{self.base}/{path}?token={self.token}"

    def api(self, path: str, method: str = "GET"):
        request = urllib.request.Request(self.url(f"api/{path}"), method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shut_down_kernels(self, notebook: str) -> None:
        """Ends the sessions (and kernels) of `notebook` (a path under `root`), freeing their memory."""
        for session in self.api("sessions"):
            if session.get("path") == notebook:
                self.api(f"sessions/{session['id']}", method="DELETE")


@contextlib.contextmanager
def jupyter_lab(root: Path, work: Path, env: dict[str, str]) -> Iterator[Lab]:
    """JupyterLab serving `root` (settings and log in `work`), kernels started with `env`."""
    settings = work / "settings"
    write_settings(settings)
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}"]
    if hasattr(os, "getuid") and os.getuid() == 0:
        cmd.append("--allow-root")  # CI runs as root; JupyterLab refuses to start as root without it
    log_path = work / "lab.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env={**env, "JUPYTERLAB_SETTINGS_DIR": str(settings)}, stdout=log,
                                stderr=subprocess.STDOUT, cwd=root)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_until_up(base, token, log_path, proc)
            yield Lab(base, token, root)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


# ---- running a notebook ------------------------------------------------------------------------
def dismiss_news(page) -> None:
    for label in ("No", "Dismiss"):
        button = page.locator(f".jp-Notification-Toast button:has-text('{label}')")
        if button.count():
            button.first.click()


def prompts(page) -> list[str]:
    return [p.strip() for p in page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()]


def errors(page) -> int:
    """Error outputs on the page (Run All stops at the first, so waiting on would be pointless)."""
    return page.locator(ERROR).count()


def first_error(page) -> str:
    return page.locator(ERROR).first.inner_text()[-1500:]


def _all_cells_ran(page) -> bool:
    seen = prompts(page)
    return bool(seen) and all(p not in PENDING for p in seen)


def run_all_cells(page, limit_s: float) -> list[str]:
    """Run > Run All Cells; waits until every code cell ran, one raised, or `limit_s` passed.

    Returns the prompts of the cells that had not run (empty when all ran)."""
    page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=120_000)
    page.wait_for_selector("#jp-main-statusbar >> text=Idle", timeout=180_000)  # the kernel is up
    dismiss_news(page)
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()
    deadline = time.time() + limit_s
    while time.time() < deadline and not _all_cells_ran(page) and not errors(page):
        dismiss_news(page)
        page.wait_for_timeout(2000)
    return [p for p in prompts(page) if p in PENDING]


def output_texts(page) -> list[str]:
    """The text of every output on the page."""
    return page.locator(".jp-OutputArea-output").all_inner_texts()


def text_progress_bars(page) -> list[str]:
    """Outputs holding a tqdm bar drawn as text (what a console, not JupyterLab, should show)."""
    return [t[:200] for t in output_texts(page) if TEXT_BAR.search(t)]


def progress_bars(page) -> list[str]:
    """The text of every ipywidgets progress bar added to the page since it loaded (PROGRESS_RECORDER),
    including those already removed: tqdm.auto's bar is an HBox of description, bar and counts."""
    return page.evaluate("""() => window.__progressBars.map(
        bar => (bar.parentElement ? bar.parentElement.innerText : '').replace(/\\s+/g, ' ').trim())""")


# ---- moving widgets ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Widget:
    """One control of a notebook's widget and what moving it must change.

    name: the screenshot's name (`<notebook>-<name>.png`).
    cell: text of the code cell that displays the widget (its source).
    move: moves the control, given the cell's output area (a Playwright locator) and the page; may return
        what it picked (an option's label), for `expect`.
    watch: selector, inside the output area, of the output that must change.
    expect: text the watched output must then contain, or a function of what `move` returned giving it
        (None: only that it changed).
    """

    name: str
    cell: str
    move: Callable
    watch: str
    expect: str | Callable[[str], str] | None = None


def widget_area(page, cell: str):
    """The output area of the code cell whose source contains `cell`, once its widget has rendered."""
    code = page.locator(".jp-CodeCell").filter(has=page.locator(".jp-InputArea-editor", has_text=cell))
    assert code.count() == 1, f"{code.count()} code cells contain {cell!r}; the widget table needs one"
    area = code.locator(".jp-Cell-outputArea")  # the cell's own, not the Output widgets nested in it
    area.locator(".jupyter-widgets").first.wait_for(timeout=120_000)
    return area


def _snapshot(area, watch: str) -> str:
    return "\n".join(area.locator(watch).evaluate_all("els => els.map(e => e.innerHTML)"))


def exercise(page, widget: Widget, shot: Path, limit_s: float = 180) -> str:
    """Moves `widget`, waits until its watched output changed and holds `expect`, screenshots the widget
    to `shot`. Returns the watched output's text after the move."""
    area = widget_area(page, widget.cell)
    area.scroll_into_view_if_needed()
    area.locator(widget.watch).first.wait_for(timeout=120_000)
    before = _snapshot(area, widget.watch)
    picked = widget.move(area, page)
    expect = widget.expect(picked) if callable(widget.expect) else widget.expect
    deadline = time.time() + limit_s
    after = _snapshot(area, widget.watch)
    while time.time() < deadline and (after == before or (expect and expect not in _text(area, widget))):
        page.wait_for_timeout(500)
        after = _snapshot(area, widget.watch)
    page.wait_for_timeout(500)  # let the new output finish drawing before the screenshot
    shot.parent.mkdir(parents=True, exist_ok=True)
    area.screenshot(path=str(shot))
    assert after != before, f"{widget.name}: moving it left {widget.watch} unchanged after {limit_s} s"
    text = _text(area, widget)
    assert expect is None or expect in text, f"{widget.name}: {expect!r} not in {text!r}"
    return text


def _text(area, widget: Widget) -> str:
    return "\n".join(area.locator(widget.watch).all_inner_texts())


def slide(label: str, key: str) -> Callable:
    """Moves the slider described `label` with the keyboard (`key`: "Home", "End", "ArrowLeft", ...)."""
    def move(area, page) -> None:
        handle = area.locator(".widget-slider", has=page.locator(".widget-label", has_text=label))
        handle = handle.locator(".noUi-handle").first
        handle.focus()
        page.keyboard.press(key)
    return move


def choose(nth: int = 0) -> Callable:
    """Picks the option after the selected one (wrapping) in the `nth` dropdown (a <select>) of the widget.

    Returns the picked option's label."""
    def move(area, page) -> str:
        select = area.locator(".widget-dropdown select").nth(nth)
        labels = [t.replace("\xa0", " ") for t in select.locator("option").all_inner_texts()]  # nbsp in labels
        index = (select.evaluate("s => s.selectedIndex") + 1) % len(labels)
        assert len(labels) > 1, f"dropdown {nth} has {len(labels)} option(s): nothing to move to"
        select.select_option(index=index)
        return labels[index]
    return move


def type_in(placeholder_or_label: str, text: str) -> Callable:
    """Types `text` into the text box (or combobox) with that placeholder or label, then presses Enter."""
    def move(area, page) -> None:
        box = area.locator(f"input[placeholder='{placeholder_or_label}']")
        if not box.count():
            box = area.locator(".widget-text", has=page.locator(".widget-label", has_text=placeholder_or_label))
            box = box.locator("input")
        box.first.fill(text)
        box.first.press("Enter")
    return move
