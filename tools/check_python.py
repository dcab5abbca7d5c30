"""Exit with a clear message unless this interpreter is in pyproject.toml's requires-python.

    python tools/check_python.py            # check this interpreter
    python tools/check_python.py --lowest   # print the lowest supported version (e.g. 3.10), for the lock

Runs on any Python 3 (no tomllib needed), before the virtual environment exists.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def supported_range(text: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(lowest, highest) supported (major, minor), from `requires-python = ">=3.A,<3.B"`."""
    spec = re.search(r'^requires-python\s*=\s*"([^"]+)"', text, re.M)
    low = re.search(r">=\s*3\.(\d+)", spec.group(1)) if spec else None
    high = re.search(r"<\s*3\.(\d+)", spec.group(1)) if spec else None
    if not (low and high):
        raise SystemExit('pyproject.toml: requires-python must read ">=3.A,<3.B"')
    return (3, int(low.group(1))), (3, int(high.group(1)) - 1)


if __name__ == "__main__":
    (lo, hi) = supported_range(PYPROJECT.read_text())
    if sys.argv[1:] == ["--lowest"]:
        print(f"{lo[0]}.{lo[1]}")
        sys.exit(0)
    if not lo <= sys.version_info[:2] <= hi:
        sys.exit(f"Python {sys.version.split()[0]} is not supported: the course needs Python "
                 f"3.{lo[1]} to 3.{hi[1]}. Set PYTHON, e.g. `make lab PYTHON=python3.{hi[1]}`.")
