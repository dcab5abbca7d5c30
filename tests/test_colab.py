"""The hosted-notebook path: the Colab set-up cell, the README's badges, and the course installed as a wheel.

The slow test walks the Colab path offline: build the wheel, install it into a fresh virtual environment,
serve a copy of the offline assets from http://127.0.0.1:PORT as a mirror (COURSE_ASSET_MIRROR), fetch them
with `python -m course_utils.assets fetch` (the real download path: every file's size and sha256 checked),
then grade 00_orientation from a folder outside the repository.
"""
from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import types
import zipfile
from pathlib import Path

import nbformat
import pytest

from course_utils import colab

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LEARNER = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _repository() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def test_the_repository_address_is_written_once_and_everything_derives_from_it():
    repo = _repository()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repo), repo
    assert colab.archive_url() == f"{repo}/archive/refs/heads/main.zip"
    assert colab.badge_url("00_orientation.ipynb") == \
        f"https://colab.research.google.com/github/{repo[len('https://github.com/'):]}/blob/main/notebooks/00_orientation.ipynb"


def test_every_learner_notebook_starts_its_code_with_the_setup_cell():
    assert LEARNER
    for path in LEARNER:
        code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert code[0].source == colab.setup_cell_source(), f"{path.name}: run python -m course_utils.build"
        assert sum(colab.MARKER in c.source for c in code) == 1, path.name
    for path in sorted((ROOT / "solutions").glob("*.ipynb")):
        assert colab.MARKER not in path.read_text(), "the set-up cell is added by the build, not kept in solutions/"


def _run_setup_cell(monkeypatch, on_colab: bool) -> list[list[str]]:
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(list(cmd)))
    if on_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(compile(colab.setup_cell_source(), "setup-cell", "exec"), {})
    return calls


def test_setup_cell_does_nothing_off_colab(monkeypatch):
    assert _run_setup_cell(monkeypatch, on_colab=False) == []


def test_setup_cell_on_colab_installs_the_archive_then_fetches_the_assets(monkeypatch):
    install, fetch = _run_setup_cell(monkeypatch, on_colab=True)
    assert install[1:4] == ["-m", "pip", "install"]
    assert install[-1] == f"course-utils @ {_repository()}/archive/refs/heads/main.zip"
    assert fetch[1:] == ["-m", "course_utils.assets", "fetch"]


def test_readme_has_an_open_in_colab_badge_per_notebook():
    readme = (ROOT / "README.md").read_text()
    rows = [line for line in readme.splitlines() if re.match(r"\| `\d\d_\w+` \|", line)]
    assert [row.split("`")[1] + ".ipynb" for row in rows] == [p.name for p in LEARNER]
    for row in rows:
        assert row.rstrip(" |").endswith(colab.badge_markdown(row.split("`")[1] + ".ipynb")), row


# --- the wheel -----------------------------------------------------------------------------------
def _build_wheel(tmp: Path) -> Path:
    """The course's wheel, built offline (no build isolation) from a copy of the sources."""
    src = tmp / "src"
    shutil.copytree(ROOT / "course_utils", src / "course_utils", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp / "dist"), str(src)], check=True)
    return next((tmp / "dist").glob("course_utils-*.whl"))


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A new virtual environment with the wheel installed. Its dependencies (torch, jupyter, ...) are taken
    from this interpreter's site-packages (a path in a .pth file, so that its editable course_utils is not)."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "course_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
                   check=True)
    return python


class _Mirror:
    """A static web server on 127.0.0.1 (a random free port) over `folder`; `requested` lists the paths."""

    def __init__(self, folder: Path):
        self.requested: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, format, *args):  # noqa: A002 - the base class's name
                outer.requested.append(self.path)

        handler = functools.partial(Handler, directory=str(folder))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _copy_tree(src: Path, dst: Path) -> None:
    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link_or_copy)


@pytest.mark.slow
def test_wheel_fetches_from_a_local_mirror_and_runs_orientation_outside_the_repo(tmp_path):
    data = os.environ.get("COURSE_DATA_DIR", "").split(os.pathsep)[0]
    if not data or not (Path(data) / "images" / "both.png").is_file():
        pytest.skip("needs the offline assets to serve as the mirror: set COURSE_DATA_DIR (CI: ../shared/assets)")
    wheel = _build_wheel(tmp_path)
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("course_utils/")}
    in_repo = {p.relative_to(ROOT).as_posix() for p in (ROOT / "course_utils").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert in_repo <= shipped, f"not in the wheel: {sorted(in_repo - shipped)}"

    python = _fresh_venv(tmp_path, wheel)
    outside = tmp_path / "learner"
    outside.mkdir()
    _copy_tree(Path(data), tmp_path / "mirror")
    mirror = _Mirror(tmp_path / "mirror")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COURSE_", "PYTHON"))}
    env.update(COURSE_ASSET_MIRROR=mirror.url, COURSE_CACHE_DIR=str(tmp_path / "cache"),
               COURSE_RESULTS_DIR=str(tmp_path / "results"), COURSE_MODE="ci")
    try:
        where = subprocess.run([str(python), "-c", "import course_utils; print(course_utils.__file__)"],
                               cwd=outside, env=env, capture_output=True, text=True, check=True).stdout
        assert Path(where).resolve().is_relative_to((tmp_path / "venv").resolve()), where
        fetch = subprocess.run([str(python), "-m", "course_utils.assets", "fetch"], cwd=outside, env=env,
                               capture_output=True, text=True, timeout=900)
    finally:
        mirror.close()
    assert fetch.returncode == 0, fetch.stdout[-3000:] + fetch.stderr[-3000:]
    assert "/images/both.png" in mirror.requested and "/lm/SmolLM2-135M-Instruct.Q4_1.gguf" in mirror.requested
    fetched = (tmp_path / "cache" / "images" / "both.png").read_bytes()
    assert fetched == (Path(data) / "images" / "both.png").read_bytes()
    assert "MISSING" not in fetch.stdout and "downloaded" in fetch.stdout, fetch.stdout

    for folder in ("solutions", "notebooks"):
        (outside / folder).mkdir()
        shutil.copy2(ROOT / folder / "00_orientation.ipynb", outside / folder / "00_orientation.ipynb")
    solution = subprocess.run([str(python), "-m", "course_utils.grade", "solutions/00_orientation.ipynb"],
                              cwd=outside, env=env, capture_output=True, text=True, timeout=900)
    assert solution.returncode == 0 and "TOTAL 5/5" in solution.stdout, solution.stdout + solution.stderr
    learner = subprocess.run([str(python), "-m", "course_utils.grade", "notebooks/00_orientation.ipynb"],
                             cwd=outside, env=env, capture_output=True, text=True, timeout=900)
    assert learner.returncode == 1 and learner.stdout.count("not done") == 5, learner.stdout + learner.stderr
