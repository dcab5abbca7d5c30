"""`make test-pythons`: the test suite on the lowest and the highest Python that pyproject.toml supports.

For each of the two versions: find its interpreter (`python3.X` on PATH, else pyenv's
$PYENV_ROOT/versions/3.X.*), make a virtual environment in .venv/pythons/3.X, install the course from
requirements.lock (with uv, as `make setup` does; skipped when the lock has not changed since), then run
the suite without the notebook runs (`-m "not slow"`) plus the ci tier of 00_orientation through nbval.
A version whose interpreter is missing is reported and skipped. Extra arguments go to pytest.
Exits 1 when any tested version fails.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_python import supported_range  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PYTEST = ["-p", "no:cacheprovider", "-n", "2", "--dist", "loadscope", "-m", "not slow",
          "tests", "solutions/00_orientation.ipynb"]


def _version_of(exe: str) -> tuple[int, int] | None:
    try:
        out = subprocess.run([exe, "-c", "import sys; print(*sys.version_info[:2])"],
                             capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    parts = out.stdout.split()
    return (int(parts[0]), int(parts[1])) if out.returncode == 0 and len(parts) == 2 else None


def find_interpreter(version: tuple[int, int]) -> str | None:
    """A working `python3.X` for `version`: on PATH (pyenv shims included), else in pyenv's versions."""
    name = f"python{version[0]}.{version[1]}"
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [shutil.which(name)] + sorted(str(p) for p in pyenv.glob(f"{version[0]}.{version[1]}.*/bin/{name}"))
    return next((c for c in candidates if c and _version_of(c) == version), None)


def install(interpreter: str, venv: Path) -> None:
    """A venv at `venv` with the course installed from the lock (reused while the lock is unchanged)."""
    stamp = venv / ".installed"
    digest = hashlib.sha256(LOCK.read_bytes() + (ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest:
        return
    subprocess.run([interpreter, "-m", "venv", "--clear", str(venv)], check=True)
    uv = [sys.executable, str(ROOT / "tools" / "uv_pip.py"), "pip", "install", "--python", str(venv / "bin" / "python")]
    subprocess.run([*uv, "--require-hashes", "-r", str(LOCK)], check=True, cwd=ROOT)
    subprocess.run([*uv, "--no-deps", "-e", str(ROOT)], check=True, cwd=ROOT)
    stamp.write_text(digest)


def run_suite(venv: Path, extra: list[str]) -> int:
    env = dict(os.environ, COURSE_FAST="1")
    return subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", *PYTEST, *extra], cwd=ROOT, env=env).returncode


def test_version(version: tuple[int, int], extra: list[str]) -> str:
    """Install and test one version; a one-line outcome with the minutes each step took."""
    label = f"{version[0]}.{version[1]}"
    interpreter = find_interpreter(version)
    if interpreter is None:
        return f"Python {label}: not found (no python{label} on PATH or in pyenv); skipped"
    venv = ROOT / ".venv" / "pythons" / label
    print(f"== Python {label} ({interpreter}) in {venv.relative_to(ROOT)}", flush=True)
    t0 = time.monotonic()
    install(interpreter, venv)
    t1 = time.monotonic()
    rc = run_suite(venv, extra)
    t2 = time.monotonic()
    outcome = "passed" if rc == 0 else f"FAILED (pytest exit {rc})"
    load = os.getloadavg()[1]
    return (f"Python {label}: {outcome}; install {(t1 - t0) / 60:.1f} min, tests {(t2 - t1) / 60:.1f} min "
            f"(load average {load:.1f} over the last 5 min)")


def main(extra: list[str]) -> int:
    low, high = supported_range((ROOT / "pyproject.toml").read_text())
    results = [test_version(v, extra) for v in (low, high)]
    print("\ntest-pythons:")
    for line in results:
        print("  " + line)
    return 1 if any("FAILED" in line for line in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
