"""The course in a real browser: JupyterLab + Debian's Chromium, driven by Playwright.

Starts JupyterLab on 127.0.0.1 with a token, opens a copy of the GradCAM solution, runs every cell
from the Run menu, and asserts: no error output, at least one image, and a rendered ipywidget.
Saves screenshots to `artifacts/` (or `$COURSE_ARTIFACTS`), also when the test fails.
Skipped, with the reason, only where Chromium is not installed (`.ci/run` installs it).
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NOTEBOOK = "01_gradcam.ipynb"
RUN_LIMIT_S = 900
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
# JupyterLab user settings for the test: no news pop-up, and every cell kept in the DOM (the default
# windowing mode leaves off-screen cells unrendered, so their outputs could not be counted).
LAB_SETTINGS = {
    "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "notebook-extension/tracker": {"windowingMode": "none"},
}

ERROR = ".jp-OutputArea-output:has-text('Traceback (most recent call last)')"

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(folder: Path) -> None:
    for name, values in LAB_SETTINGS.items():
        plugin, file = name.split("/")
        path = folder / "@jupyterlab" / plugin / f"{file}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))


def _wait_until_up(base: str, token: str, log: Path) -> None:
    for _ in range(240):
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail("JupyterLab did not start within 2 minutes; its log ends:\n" + log.read_text()[-3000:])


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed here (apt-get install -y chromium); .ci/run installs it")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is part of the test extra")
    work = tmp_path_factory.mktemp("lab")
    notebooks, settings = work / "notebooks", work / "settings"
    notebooks.mkdir()
    shutil.copy(ROOT / "solutions" / NOTEBOOK, notebooks / NOTEBOOK)
    _write_settings(settings)
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "COURSE_FAST": "1", "JUPYTERLAB_SETTINGS_DIR": str(settings)}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={notebooks}"]
    if hasattr(os, "getuid") and os.getuid() == 0:
        cmd.append("--allow-root")  # CI runs as root; JupyterLab refuses to start as root without it
    log_path = work / "lab.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=notebooks)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_until_up(base, token, log_path)
            yield base, token, notebooks
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_lab_requires_its_token(lab):
    base, token, _ = lab
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{base}/api/contents", timeout=5)
    assert refused.value.code in (401, 403)
    assert urllib.request.urlopen(f"{base}/api/contents?token={token}", timeout=5).status == 200


def _dismiss_news(page) -> None:
    for label in ("No", "Dismiss"):
        button = page.locator(f".jp-Notification-Toast button:has-text('{label}')")
        if button.count():
            button.first.click()


def _prompts(page) -> list[str]:
    return [p.strip() for p in page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()]


def _errors(page) -> int:
    """Error outputs on the page (Run All stops at the first, so waiting on would be pointless)."""
    return page.locator(ERROR).count()


def _all_cells_ran(page) -> bool:
    prompts = _prompts(page)
    return bool(prompts) and all(p not in ("[ ]:", "[*]:", "") for p in prompts)


def _run_all_cells(page, shots: Path) -> None:
    page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=120_000)
    page.wait_for_selector("#jp-main-statusbar >> text=Idle", timeout=120_000)  # the kernel is up
    _dismiss_news(page)
    page.locator(".lm-MenuBar-item", has_text="Run").first.click()
    page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()
    deadline = time.time() + RUN_LIMIT_S
    while time.time() < deadline and not _all_cells_ran(page) and not _errors(page):
        _dismiss_news(page)
        page.wait_for_timeout(2000)
    page.screenshot(path=str(shots / "browser-gradcam-end.png"))
    assert not _errors(page), "a cell raised: " + page.locator(ERROR).first.inner_text()[-1500:]
    pending = [p for p in _prompts(page) if p in ("[ ]:", "[*]:", "")]
    assert not pending, f"{len(pending)} cells had not run after {RUN_LIMIT_S} s"


def test_gradcam_solution_runs_in_chromium(lab):
    from playwright.sync_api import sync_playwright

    base, token, notebooks = lab
    shots = Path(os.environ.get("COURSE_ARTIFACTS", ROOT / "artifacts"))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}", timeout=120_000)
            _run_all_cells(page, shots)
            errors = _errors(page)
            images = page.locator(".jp-OutputArea-output img").count()
            widgets = page.locator(".jp-OutputArea-output .jupyter-widgets")
            if widgets.count():
                widgets.first.scroll_into_view_if_needed()
                page.screenshot(path=str(shots / "browser-gradcam-widget.png"))
            n_widgets = widgets.count()
            page.keyboard.press("Control+s")
            page.wait_for_timeout(2000)
        except Exception:
            page.screenshot(path=str(shots / "browser-gradcam-failure.png"))
            raise
        finally:
            browser.close()
    saved = json.loads((notebooks / NOTEBOOK).read_text())
    saved_errors = [o for c in saved["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == 0 and not saved_errors, [f"{o['ename']}: {o['evalue']}" for o in saved_errors]
    assert images >= 1, "no image output was rendered"
    assert n_widgets >= 1, "no ipywidget was rendered (is jupyterlab_widgets installed in the lab's env?)"
