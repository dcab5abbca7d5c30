"""`python -m course_utils.assets status|fetch|path`: what is where, and prefetching.

`status()` and `fetch()` are also plain functions (`assets.status()`, `assets.fetch()`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

from course_utils import assets
from course_utils.assets.errors import (
    FETCH_COMMAND,
    AssetCorruptError,
    AssetMissingError,
)
from course_utils.assets.registry import Asset, Group


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------
def _asset_status(asset: Asset) -> dict[str, Any]:
    row: dict[str, Any] = {
        "key": asset.key, "description": asset.description, "required": asset.required,
        "group": asset.group, "offline_only": asset.offline_only,
        "expected_size": asset.size, "sha256": asset.sha256,
        "where": "MISSING", "path": None, "size": None, "verified": None, "detail": "",
    }
    for loc in assets._candidates(asset):
        row.update(where=loc.where, path=str(loc.path), size=loc.path.stat().st_size,
                   verified=loc.verification.ok, detail=loc.verification.detail)
        if loc.verification.ok or loc.where == "data dir":
            break
    return row


def _group_status(group: Group) -> dict[str, Any]:
    row: dict[str, Any] = {"group": group.name, "description": group.description,
                           "satisfied_by": None, "error": None}
    try:
        m = assets.resolve_group(group.name, download=False)
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
    rows = [_asset_status(a) for a in assets.REGISTRY.values()]
    groups = [_group_status(g) for g in assets.GROUPS.values()]
    ok = all(r["verified"] for r in rows if r["required"]) and \
        all(r["verified"] is not False for r in rows if r["where"] == "data dir") and \
        all(g["satisfied_by"] for g in groups)
    return {
        "data_dirs": [str(d) for d in assets.data_dirs()],
        "cache_dir": str(assets.cache_dir()),
        "assets": rows,
        "groups": groups,
        "ok": ok,
    }


def _size_str(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size}"


def _needed(row: dict[str, Any]) -> str:
    if row["required"]:
        return "required"
    group = assets.GROUPS.get(row["group"] or "")
    if group and any(row["key"] in alt.keys for alt in group.alternatives):
        return f"{group.name}: one of"
    return "optional"


def _table_row(r: dict[str, Any]) -> tuple[str, ...]:
    what = r["description"] if len(r["description"]) <= 48 else r["description"][:47] + "…"
    if r["where"] == "MISSING":
        where = "MISSING" + (" (offline-only)" if r["offline_only"] else "")
        size, ver = f"({_size_str(r['expected_size'])})", "-"
    else:
        where, size = r["where"], _size_str(r["size"])
        ver = "ok" if r["verified"] else f"BAD: {r['detail']}"
    return (r["key"], what, _needed(r), where, size, ver)


def _print_status(st: dict[str, Any]) -> None:
    dd = st["data_dirs"]
    print(f"data dir(s): {os.pathsep.join(dd) if dd else '(COURSE_DATA_DIR not set)'}")
    print(f"cache:       {st['cache_dir']}")
    print()
    header = ("key", "what", "needed", "where", "size", "verified")
    rows = [_table_row(r) for r in st["assets"]]
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


# --------------------------------------------------------------------------------------------
# Fetch
# --------------------------------------------------------------------------------------------
def _fetch_targets(keys: Iterable[str], include_all: bool) -> tuple[list[str], list[str]]:
    """(asset keys, group names) to fetch."""
    keys = list(keys)
    if keys:
        asset_keys, group_names = [], []
        for k in keys:
            if k in assets.GROUPS:
                group_names.append(k)
            else:
                assets.get(k)
                asset_keys.append(k)
        return asset_keys, group_names
    registry = assets.REGISTRY.values()
    asset_keys = [a.key for a in registry
                  if a.required or (include_all and not a.group and assets.sources_of(a))]
    if include_all:  # every downloadable member of a group too (e.g. the official tarball)
        asset_keys += [a.key for a in registry if a.group and assets.sources_of(a)]
    return asset_keys, list(assets.GROUPS)


def _why(e: Exception) -> str:
    """The reasons listed in an asset error ("  - ..." lines), else its first line."""
    lines = str(e).splitlines()
    reasons = [line.strip()[2:] for line in lines if line.startswith("  - ")]
    return " | ".join(reasons) if reasons else lines[0]


def _fetch_asset(key: str) -> tuple[str, str, str]:
    before = assets.find_quietly(key)
    try:
        p = assets.path(key)
        return key, "present" if before else "downloaded", str(p)
    except (AssetMissingError, AssetCorruptError) as e:
        return key, "MISSING" if isinstance(e, AssetMissingError) else "CORRUPT", _why(e)


def _fetch_group(name: str) -> tuple[str, str, str]:
    try:
        m = assets.resolve_group(name)
        where = str(m.folder) if m.folder else ", ".join(str(p) for p in m.paths.values())
        return name, "present", f"{m.alternative.description}: {where}"
    except (AssetMissingError, AssetCorruptError) as e:
        return name, "MISSING", _why(e)


def fetch(keys: Iterable[str] = (), *, include_all: bool = False) -> bool:
    """Prefetch assets (default: everything the course needs; `include_all`: optional ones
    too) and groups, printing where each one is. Returns True when nothing is missing."""
    asset_keys, group_names = _fetch_targets(keys, include_all)
    results = [_fetch_asset(k) for k in asset_keys] + [_fetch_group(g) for g in group_names]
    for name, outcome, detail in results:
        print(f"{outcome:<10}  {name}  {detail}")
    counts: dict[str, int] = {}
    for _, outcome, _ in results:
        counts[outcome] = counts.get(outcome, 0) + 1
    bad = counts.get("MISSING", 0) + counts.get("CORRUPT", 0)
    print()
    print("summary: " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(counts.items()))
          + f" — cache: {assets.cache_dir()}")
    if bad:
        print(f"{bad} item(s) missing: see the messages above; files without a public download "
              "ship with the offline asset bundle.")
    return bad == 0


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 something missing, 2 an error)."""
    args = _parser().parse_args(argv)
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
        print(assets.path(args.key))
        return 0
    except (ValueError, AssetMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
