"""The two asset errors, and their messages: which file, which folders to put it in, why the
download failed, and the command that fetches it on a machine with internet."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from course_utils.assets.registry import Asset, Group
from course_utils.assets.store import cache_dir, data_dirs

FETCH_COMMAND = "python -m course_utils.assets fetch"


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


def _fetch_hint(target: str = "") -> str:
    command = f"{FETCH_COMMAND} {target}".rstrip()
    return (f"Or, on a machine with internet, run\n    {command}\nwhich prints where it "
            "put the files; copy them into one of the folders above.")


def corrupt_error(asset: Asset, path: Path, detail: str) -> AssetCorruptError:
    """The data-dir copy `path` of `asset` does not verify (`detail` says how)."""
    head = f"Course asset {asset.key!r} in your data dir is corrupt: {path}: {detail}."
    if asset.size is None:
        return AssetCorruptError(f"{head} Replace it, or delete it to use the cache.")
    return AssetCorruptError(
        f"{head} It was left untouched. Replace it with a good copy (size {asset.size:,} bytes, "
        f"sha256 {asset.sha256}) or delete it so that the course uses/downloads a copy in the "
        f"cache ({cache_dir() / asset.key}).")


def missing_error(asset: Asset, reasons: list[str], in_group: bool) -> AssetMissingError:
    """`asset` is nowhere and could not be fetched, for `reasons`. `in_group`: the asset is one
    way to provide its (known) group."""
    lines, folders = _folder_lines(asset.folder)
    sha = f", sha256 {asset.sha256}" if asset.sha256 else ""
    size = f"{asset.size:,} bytes" if asset.size is not None else "size unknown"
    msg = [f"Course asset {asset.key!r} is missing: {asset.description}.",
           *[f"  - {r}" for r in reasons],
           f"To fix it, put the file\n    {asset.filename}   ({size}{sha})",
           "into one of these folders:", *lines]
    if in_group:
        msg.append(f"(It is one way to provide '{asset.group}'; see "
                   f"python -m course_utils.assets status for the alternatives.)")
    if asset.offline_only:
        msg.append("This file has no public download: it ships with the course's offline asset "
                   "bundle (see its PROVENANCE.md).")
    else:
        msg.append(_fetch_hint())
    return AssetMissingError("\n".join(msg), key=asset.key, files=[asset.filename],
                             folders=folders)


def _describe_file(a: Asset) -> str:
    src = f" from {a.sources[0].describe()}" if a.sources else " (offline bundle)"
    if a.size is not None and a.sha256:
        return f"{a.filename} ({a.size:,} bytes, sha256 {a.sha256}){src}"
    return f"{a.filename}{src}"


def group_missing_error(group: Group, reasons: list[str],
                        registry: Mapping[str, Asset]) -> AssetMissingError:
    """No alternative of `group` is present (nor could be fetched, for `reasons`)."""
    msg = [f"Course data {group.name!r} is missing: {group.description}.",
           *[f"  - {r}" for r in reasons], "Provide ONE of the following:"]
    files: list[str] = []
    folders: list[Path] = []
    for letter, alt in zip("abcdefghij", group.alternatives):
        if alt.folder:
            lines, fs = _folder_lines(alt.folder)
            msg.append(f"  ({letter}) {alt.description}, holding {', '.join(alt.folder_files)}, "
                       f"as one of these folders:")
            files.append(alt.folder.rsplit("/", 1)[-1] + "/")
        else:
            known = [registry[k] for k in alt.keys if k in registry]
            files += [a.filename for a in known]
            lines, fs = _folder_lines(known[0].folder if known else "")
            msg.append(f"  ({letter}) {alt.description}:\n        "
                       + "\n        + ".join(map(_describe_file, known))
                       + "\n      into one of these folders:")
        msg.extend("  " + line for line in lines)
        folders.extend(fs)
    msg.append(_fetch_hint(group.name))
    return AssetMissingError("\n".join(msg), key=group.name, files=files, folders=folders)
