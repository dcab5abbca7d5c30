"""Where course files live on disk, and their hashes: the one place for cache folders and sha256.

- `data_dirs()` (`$COURSE_DATA_DIR`, read-only), `cache_dir()` (`$COURSE_CACHE_DIR`, else the
  user cache from `platformdirs`), `derived_dir(*parts)` (`cache_dir()/derived/...`, for data
  that modules compute from assets: decoded CIFAR-10 tensors, the dequantized language model).
- `sha256_file(path)`: a file's sha256, remembered in `cache_dir()/verified.json` keyed by
  (path, size, mtime), so a big file is hashed once.
- `fingerprint(*parts, files=...)`: a short key that changes when any of `files` changes.
- `atomic_file(dest)`: write a temporary sibling, move it into place only when all went well.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from course_utils.config import CFG

CHUNK = 1 << 20
HASH_BAR_MIN_BYTES = 32 << 20  # show a progress bar when hashing files bigger than this
VERIFY_CACHE = "verified.json"


def cache_dir() -> Path:
    """The per-user cache root: `$COURSE_CACHE_DIR`, else the platform's user cache folder
    (`~/.cache/course_utils` on Linux, `~/Library/Caches/course_utils` on macOS,
    `%LOCALAPPDATA%\\course_utils\\Cache` on Windows). Downloads land at `cache_dir()/<key>`,
    derived data under `cache_dir()/"derived"` (see `derived_dir`). It may not exist yet."""
    return CFG.cache_dir


def derived_dir(*parts: str, create: bool = True) -> Path:
    """`cache_dir()/"derived"/<parts...>`, where modules cache derived data; created unless
    `create=False` (for a reader that must not fail on a read-only cache)."""
    d = cache_dir().joinpath("derived", *parts)
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


def data_dirs() -> list[Path]:
    """The folders named by `$COURSE_DATA_DIR` (several separated by `os.pathsep`), in order.
    They are searched before the cache and are never written to."""
    return CFG.data_dirs


def search_dirs() -> list[tuple[str, Path]]:
    """Every folder searched, in order, labelled: `[("data dir", ...), ..., ("cache", ...)]`."""
    return [("data dir", d) for d in data_dirs()] + [("cache", cache_dir())]


@contextlib.contextmanager
def atomic_file(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to `dest`; on success it replaces `dest` in one step, on
    any error it is removed, so `dest` is never half-written. Creates `dest`'s folder."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Hashing, with a json cache keyed by path, size and mtime
# --------------------------------------------------------------------------------------------
def _read_verify_cache() -> dict[str, Any]:
    try:
        data = json.loads((cache_dir() / VERIFY_CACHE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def remember(p: Path, digest: str, st: os.stat_result | None = None) -> None:
    """Record that `p`, as it is now (or as `st` says: size, mtime), has sha256 `digest`."""
    st = p.stat() if st is None else st
    entries = _read_verify_cache()
    entries[str(p.resolve())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        with atomic_file(cache_dir() / VERIFY_CACHE) as tmp:
            tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
    except OSError:  # a read-only cache only costs a re-hash next time
        pass


def _digest(p: Path) -> str:
    """sha256 of a file, read in chunks, with a progress bar for big files."""
    h = hashlib.sha256()
    size = p.stat().st_size
    bar = None
    if size >= HASH_BAR_MIN_BYTES:
        from tqdm.auto import tqdm

        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"verifying {p.name}", leave=False)
    with open(p, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return h.hexdigest()


def sha256_file(p: Path) -> str:
    """The sha256 (hex) of file `p`, hashed only when its size or mtime changed since the last
    time (the digests live in `cache_dir()/verified.json`)."""
    p = Path(p)
    st = p.stat()
    entry = _read_verify_cache().get(str(p.resolve()))
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        return str(entry["sha256"])
    digest = _digest(p)
    remember(p, digest, st)
    return digest


def fingerprint(*parts: object, files: Iterable[Path] = ()) -> str:
    """16 hex digits naming `parts` and the current state (path, size, mtime) of `files`: a
    cache key for data derived from those files, which changes when any of them changes."""
    ident: list[Any] = list(parts)
    for p in files:
        st = p.stat()
        ident.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
