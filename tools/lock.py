"""The lock file (requirements.lock) and the pyproject.toml it was resolved from.

    python tools/lock.py stamp requirements.lock   # record pyproject's fingerprint in the lock's header
    python tools/lock.py check requirements.lock   # offline: the fingerprint matches, every dependency is pinned

The fingerprint is the sha256 of pyproject's requires-python, dependencies and optional dependencies, so
any edit to them without `make update-lock` is caught without a network (tests/test_setup.py runs `check`).
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
STAMP = "# pyproject.toml fingerprint (requires-python, dependencies, extras): "
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def _name(requirement: str) -> str:
    """The normalised project name of a requirement string ("Foo_Bar[x]>=1; ..." -> "foo-bar")."""
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]).lower()


def project(pyproject: Path = ROOT / "pyproject.toml") -> dict:
    """pyproject.toml's [project] table."""
    return tomllib.loads(pyproject.read_text())["project"]


def fingerprint(proj: dict) -> str:
    """sha256 of what the lock is resolved from."""
    spec = {"requires-python": proj["requires-python"], "dependencies": proj["dependencies"],
            "optional-dependencies": proj.get("optional-dependencies", {})}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def pins(lock_text: str) -> dict[str, set[str]]:
    """name -> the versions the lock pins it to (several when they differ by Python version)."""
    found: dict[str, set[str]] = {}
    for line in lock_text.splitlines():
        m = PIN.match(line)
        if m:
            found.setdefault(_name(m.group(1)), set()).add(m.group(2))
    return found


def stamp(lock: Path, proj: dict) -> None:
    """Write the fingerprint of `proj` into the header of `lock` (replacing an older one)."""
    lines = [line for line in lock.read_text().splitlines() if not line.startswith(STAMP)]
    header = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    lines.insert(header, STAMP + fingerprint(proj))
    lock.write_text("\n".join(lines) + "\n")


def problems(lock_text: str, proj: dict) -> list[str]:
    """Why `lock_text` does not match `proj` (empty when it does)."""
    out = []
    recorded = [line[len(STAMP):].strip() for line in lock_text.splitlines() if line.startswith(STAMP)]
    if recorded != [fingerprint(proj)]:
        out.append("pyproject.toml's dependencies or requires-python changed since the lock was made")
    wanted = list(proj["dependencies"]) + [d for extra in proj.get("optional-dependencies", {}).values()
                                           for d in extra]
    pinned = pins(lock_text)
    out += [f"{_name(d)} is in pyproject.toml but not pinned in the lock" for d in wanted if _name(d) not in pinned]
    if any("--hash=sha256:" not in block for block in re.split(r"\n(?=\S)", lock_text) if PIN.match(block)):
        out.append("a pinned package has no --hash")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("stamp", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    lock = Path(argv[1])
    if argv[0] == "stamp":
        stamp(lock, project())
        return 0
    found = problems(lock.read_text(), project())
    for p in found:
        print(f"{lock}: {p}; run `make update-lock`", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
