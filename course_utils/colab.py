"""Colab (and other hosted notebooks): the learner notebooks' set-up cell and the README's badges.

The repository's address is written once, in pyproject.toml's `[project.urls] Repository`; everything
here is derived from it: the archive the set-up cell installs the course from, and each notebook's
"Open in Colab" link. `course_utils.build` puts `setup_cell_source()` before the first code cell of
every learner notebook. On Colab the cell installs the course and fetches its data
(`python -m course_utils.assets fetch`); anywhere else it does nothing.
"""
from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BRANCH = "main"
MARKER = "# Colab only:"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"


def repository_url(root: Path = ROOT) -> str:
    """`[project.urls] Repository` of `root`'s (else this checkout's) pyproject.toml, else of the installed
    package's metadata (a wheel has no pyproject.toml)."""
    for pyproject in (root / "pyproject.toml", ROOT / "pyproject.toml"):
        if pyproject.is_file():
            m = re.search(r'^\[project\.urls\][^\[]*?^Repository\s*=\s*"([^"]+)"', pyproject.read_text(), re.M | re.S)
            if m:
                return m.group(1).rstrip("/")
    try:
        urls = metadata.metadata("course-utils").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        urls = []
    for entry in urls:
        label, _, url = entry.partition(",")
        if label.strip() == "Repository":
            return url.strip().rstrip("/")
    raise LookupError("no [project.urls] Repository in pyproject.toml: add the course repository's address")


def archive_url(root: Path = ROOT) -> str:
    """The zip of the repository's main branch, which pip installs as the course package."""
    return f"{repository_url(root)}/archive/refs/heads/{BRANCH}.zip"


def badge_url(notebook: str, root: Path = ROOT) -> str:
    """The Colab address that opens learner notebook `notebook` (e.g. "00_orientation.ipynb")."""
    path = repository_url(root).split("://", 1)[-1].removeprefix("github.com/")
    return f"https://colab.research.google.com/github/{path}/blob/{BRANCH}/notebooks/{notebook}"


def badge_markdown(notebook: str, root: Path = ROOT) -> str:
    """The README's "Open in Colab" badge for `notebook`."""
    return f"[![Open in Colab]({BADGE_IMAGE})]({badge_url(notebook, root)})"


def setup_cell_source(root: Path = ROOT) -> str:
    """The source of the set-up cell: on Colab, install the course and fetch its data; elsewhere nothing."""
    return "\n".join([
        f"{MARKER} install the course and fetch its data (a few minutes). Elsewhere this cell does nothing.",
        "import sys",
        "",
        'if "google.colab" in sys.modules:',
        "    import subprocess",
        "",
        '    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",',
        f'                    "course-utils @ {archive_url(root)}"], check=True)',
        '    subprocess.run([sys.executable, "-m", "course_utils.assets", "fetch"], check=True)',
    ])
