"""The course in a real browser: JupyterLab + Debian's Chromium, driven by Playwright.

Opens a copy of the GradCAM solution, runs every cell, and asserts: no error output, at least one
image, and a rendered ipywidget. Saves a screenshot to `artifacts/` (or `$COURSE_ARTIFACTS`).
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
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
NOTEBOOK = "01_gradcam.ipynb"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (apt-get install chromium); .ci/run installs it")
    pytest.importorskip("playwright.sync_api", reason="the playwright package is part of the test extra")
    if not (ROOT / "solutions" / NOTEBOOK).exists():
        pytest.skip(f"solutions/{NOTEBOOK} does not exist yet")
    work = tmp_path_factory.mktemp("lab")
    shutil.copy(ROOT / "solutions" / NOTEBOOK, work / NOTEBOOK)
    port, token = _free_port(), secrets.token_hex(16)
    settings = work / "settings"
    # Switch off JupyterLab's news pop-up (the test also dismisses it if it shows anyway).
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = {**os.environ, "COURSE_FAST": "1", "JUPYTERLAB_SETTINGS_DIR": str(settings)}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}"]
    log = open(work / "lab.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start: " + (work / "lab.log").read_text()[-2000:])
        # without the token the server refuses: the token really is on
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{base}/api/contents", timeout=5)
        yield base, token, work
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _dismiss_news(page) -> None:
    for label in ("No", "Dismiss"):
        button = page.locator(f".jp-Notification-Toast button:has-text('{label}')")
        if button.count():
            button.first.click()


def _all_cells_ran(page) -> bool:
    prompts = page.locator(".jp-CodeCell .jp-InputPrompt").all_inner_texts()
    return bool(prompts) and all(p.strip() not in ("[ ]:", "[*]:", "") for p in prompts)


def test_gradcam_solution_runs_in_chromium(lab):
    from playwright.sync_api import sync_playwright

    base, token, work = lab
    artifacts = Path(os.environ.get("COURSE_ARTIFACTS", ROOT / "artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}", timeout=120_000)
            page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=120_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            _dismiss_news(page)
            page.locator(".lm-MenuBar-item", has_text="Run").first.click()
            page.locator(".lm-Menu-item", has_text="Run All Cells").first.click()
            deadline = time.time() + 900
            while time.time() < deadline and not _all_cells_ran(page):
                _dismiss_news(page)
                page.wait_for_timeout(2000)
            page.screenshot(path=str(artifacts / "browser-gradcam.png"), full_page=False)
            assert _all_cells_ran(page), "not every cell finished within 15 minutes"
            errors = page.locator(".jp-OutputArea-output", has_text="Traceback (most recent call last)").count()
            images = page.locator(".jp-OutputArea-output img").count()
            widgets = page.locator(".jp-OutputArea-output .widget-box, .jp-OutputArea-output .jupyter-widgets").count()
            page.keyboard.press("Control+s")
            page.wait_for_timeout(2000)
        finally:
            browser.close()
    saved = json.loads((work / NOTEBOOK).read_text())
    saved_errors = [o for c in saved["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert errors == 0 and not saved_errors, [f"{o['ename']}: {o['evalue']}" for o in saved_errors]
    assert images >= 1, "no image output was rendered"
    assert widgets >= 1, "no ipywidget was rendered"
