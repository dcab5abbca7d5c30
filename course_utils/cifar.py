"""CIFAR-10 from any accepted source, as uint8 tensors, with a decoded-tensor cache.

    from course_utils.cifar import load_cifar10
    x, y, classes = load_cifar10("test")          # x: uint8 [10000, 3, 32, 32], y: int64 [10000]

Accepted sources, in order of preference (files are resolved by `course_utils.assets`, so they
may sit in `$COURSE_DATA_DIR` or in the user cache):

1. the official unpacked folder `cifar10/cifar-10-batches-py/` (data_batch_1..5, test_batch);
2. the official archive `cifar10/cifar-10-python.tar.gz` (sha256-verified);
3. the offline bundle `cifar10/cifar10_jpeg_yoongikim.zip` + `cifar10_labels_and_exact_subset.npz`:
   JPEG images put back in the official order, with the 6,102 images that the npz holds
   exactly restored. JPEG is lossy: the other images differ from the official pixels by
   about 6/255 on average;
4. any other image-folder zip `cifar10/*.zip` laid out as `train|test/<class>/<file>.jpg|png`,
   ordered by (class, file name);
5. otherwise the official archive is downloaded into the cache (when online); if that fails,
   `AssetMissingError` says which files to put where.

`load_cifar10(..., source=PATH)` reads a given folder, tarball or zip instead.

Decoded tensors are cached under `assets.derived_dir("cifar10")`, keyed by the
source files' path, size and mtime, so only the first load decodes (about 15 s for the JPEG
zip on 2 cores; the next ones take well under a second).
"""
from __future__ import annotations

import io
import pickle
import re
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from course_utils import assets
from course_utils.config import CFG

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Cifar10",
    "cifar10_source",
    "load_cifar10",
    "load_cifar10_subset",
    "normalize",
]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
#: Per-channel mean/std of the training set, in [0, 1] units (RGB).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")
_SPLIT_BATCHES = {
    "train": ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
    "test": ("test_batch",),
}
_CACHE_VERSION = 1
_DECODE_CHUNK = 2048
_ZIP_ENTRY = re.compile(r"(?:^|/)(train|test)/([^/]+)/([^/]+)\.(jpe?g|png)$", re.IGNORECASE)


@dataclass(frozen=True, eq=False)
class Cifar10:
    """One split of CIFAR-10.

    - `images`: uint8 `[N, 3, 32, 32]` (RGB, 0..255)
    - `labels`: int64 `[N]`, indices into `classes`
    - `classes`: the 10 class names, `classes[labels[i]]`
    - `split`, `source` (where the pixels came from), `lossless` (False for JPEG sources)

    Unpacks as a triple: `x, y, classes = load_cifar10("test")`.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    split: str = ""
    source: str = ""
    lossless: bool = True

    def __iter__(self) -> Iterator:
        return iter((self.images, self.labels, self.classes))

    def to(self, device: str | torch.device) -> Cifar10:
        """The same data on `device`."""
        return Cifar10(self.images.to(device), self.labels.to(device), list(self.classes),
                       self.split, self.source, self.lossless)

    def normalized(self) -> torch.Tensor:
        """`images` as float32 `[N, 3, 32, 32]`, standardized with `CIFAR10_MEAN/STD`."""
        return normalize(self.images)

    def __repr__(self) -> str:
        im, lb = self.images, self.labels
        return (f"Cifar10(split={self.split!r}, images={str(im.dtype).replace('torch.', '')}"
                f"{list(im.shape)} on {im.device}, labels={str(lb.dtype).replace('torch.', '')}"
                f"{list(lb.shape)}, classes={len(self.classes)}, lossless={self.lossless}, "
                f"source={self.source!r})")


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Standardize CIFAR images: `images` uint8 (0..255) or float (0..1) `[..., 3, H, W]` ->
    float32 `[..., 3, H, W]` with `(x - CIFAR10_MEAN) / CIFAR10_STD` per channel."""
    if images.shape[-3] != 3:
        raise ValueError(f"normalize expects [..., 3, H, W] images, got shape {list(images.shape)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(CIFAR10_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=x.device).view(3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    kind: Literal["folder", "tarball", "zip"]
    path: Path
    npz: Path | None = None
    description: str = ""
    files: tuple[Path, ...] = field(default_factory=tuple)  # what the cache key depends on

    @property
    def lossless(self) -> bool:
        return self.kind != "zip" or all(
            m.lower().endswith(".png") for m in _zip_members_sample(self.path))


def _zip_members_sample(p: Path) -> list[str]:
    with zipfile.ZipFile(p) as zf:
        return [n for n in zf.namelist() if _ZIP_ENTRY.search(n)][:100]


def _folder_source(d: Path) -> _Source:
    if (d / "cifar-10-batches-py").is_dir():
        d = d / "cifar-10-batches-py"
    missing = [f for f in assets.CIFAR10_BATCH_FILES if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{d} is not an unpacked CIFAR-10 folder: it lacks {', '.join(missing)} "
            "(expected data_batch_1..5 and test_batch from cifar-10-python.tar.gz)")
    files = tuple(d / f for f in (*assets.CIFAR10_BATCH_FILES, "batches.meta") if (d / f).exists())
    return _Source("folder", d, description=f"official folder {d}", files=files)


def _source_from_path(p: Path) -> _Source:
    p = Path(p).expanduser()
    if p.is_dir():
        return _folder_source(p)
    if not p.is_file():
        raise FileNotFoundError(f"CIFAR-10 source {p} does not exist")
    name = p.name.lower()
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return _Source("tarball", p, description=f"official tarball {p}", files=(p,))
    if name.endswith(".zip"):
        return _Source("zip", p, description=f"image-folder zip {p}", files=(p,))
    raise ValueError(f"CIFAR-10 source {p}: expected a cifar-10-batches-py folder, a .tar.gz "
                     "archive or an image-folder .zip")


def cifar10_source(source: str | Path | None = None) -> str:
    """Describe the source `load_cifar10` would read (resolving, maybe downloading, it)."""
    return _find_source(source).description


def _find_source(source: str | Path | None = None) -> _Source:
    if source is not None:
        return _source_from_path(Path(source))
    try:
        match = assets.resolve_group("cifar10", download=False)
    except assets.AssetMissingError:
        match = None
    if match is None:
        generic = _find_generic_zip()
        if generic is not None:
            return generic
        match = assets.resolve_group("cifar10", download=True)  # downloads or raises
    alt = match.alternative
    if match.folder is not None:
        return _folder_source(match.folder)
    paths = list(match.paths.values())
    if len(paths) == 1 and paths[0].name.lower().endswith((".tar.gz", ".tgz", ".tar")):
        return _Source("tarball", paths[0], description=f"official tarball {paths[0]}",
                       files=(paths[0],))
    zips = [p for p in paths if p.suffix.lower() == ".zip"]
    npzs = [p for p in paths if p.suffix.lower() == ".npz"]
    if len(zips) == 1:
        npz = npzs[0] if npzs else None
        desc = (f"{alt.description}: {zips[0]}" + (f" + {npz.name}" if npz else ""))
        return _Source("zip", zips[0], npz, description=desc, files=tuple(paths))
    raise ValueError(f"cifar10 alternative {alt.name!r} has files this loader does not know: "
                     f"{', '.join(map(str, paths))}")


def _find_generic_zip() -> _Source | None:
    registered = {a.filename for a in assets.REGISTRY.values() if a.group == "cifar10"}
    for _, root in assets.search_dirs():
        for z in sorted((root / "cifar10").glob("*.zip")):
            if z.name in registered:
                npz_name = "cifar10_labels_and_exact_subset.npz"
                warnings.warn(
                    f"course_utils.cifar: using {z} without {npz_name} (missing or unverified): "
                    "images are ordered by (class, file name), not in the official order, and "
                    f"none is exact. Put {npz_name} next to it for the official order.",
                    stacklevel=3)
            return _Source("zip", z, description=f"image-folder zip {z}", files=(z,))
    return None


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------
def _unpickle(data: bytes) -> dict[str, object]:
    d = pickle.loads(data, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _classes_from_meta(meta: bytes | None) -> list[str]:
    if meta is None:
        return list(CIFAR10_CLASSES)
    names = _unpickle(meta).get("label_names")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]  # type: ignore[union-attr]


def _batches_to_arrays(blobs: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for blob in blobs:
        d = _unpickle(blob)
        data = np.asarray(d["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"CIFAR-10 batch has data of shape {data.shape}, expected [N, 3072]")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(d["labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _decode_pickles(src: _Source, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from tqdm.auto import tqdm

    wanted = _SPLIT_BATCHES[split]
    blobs: dict[str, bytes] = {}
    meta: bytes | None = None
    if src.kind == "folder":
        for name in tqdm(wanted, desc=f"reading CIFAR-10 {split}", unit="batch"):
            blobs[name] = (src.path / name).read_bytes()
        if (src.path / "batches.meta").is_file():
            meta = (src.path / "batches.meta").read_bytes()
    else:
        bar = tqdm(total=len(wanted), desc=f"reading CIFAR-10 {split} from {src.path.name}",
                   unit="batch")
        with tarfile.open(src.path, "r:*") as tf:
            for member in tf:
                base = member.name.rsplit("/", 1)[-1]
                if not member.isfile() or (base not in wanted and base != "batches.meta"):
                    continue
                f = tf.extractfile(member)
                assert f is not None
                if base == "batches.meta":
                    meta = f.read()
                else:
                    blobs[base] = f.read()
                    bar.update(1)
        bar.close()
        missing = [b for b in wanted if b not in blobs]
        if missing:
            raise ValueError(f"{src.path} lacks {', '.join(missing)}: not a CIFAR-10 "
                             "python-version archive (cifar-10-python.tar.gz)")
    images, labels = _batches_to_arrays([blobs[b] for b in wanted])
    return images, labels, _classes_from_meta(meta)


def _decode_blobs(blobs: list[bytes]) -> list[torch.Tensor]:
    """Encoded JPEG/PNG images -> list of uint8 [3, H, W] RGB tensors."""
    try:
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        if all(b[:2] == b"\xff\xd8" for b in blobs):
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB))
        return [decode_image(t, mode=ImageReadMode.RGB) for t in tensors]
    except Exception:  # noqa: BLE001 - no/old torchvision or an odd file: PIL reads anything
        from PIL import Image

        return [torch.from_numpy(np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
                                 .transpose(2, 0, 1).copy()) for b in blobs]


class _MemberReader:
    """Reads many small members of a zip fast: one read of the whole archive, then slices
    (CRC-checked). `ZipFile.read` per member costs ~50 us of Python each, too slow for 60k."""

    def __init__(self, zf: zipfile.ZipFile, path: Path):
        self._zf = zf
        self._buf = path.read_bytes() if path.stat().st_size < (2 << 30) else None

    def read(self, name: str) -> bytes:
        info = self._zf.getinfo(name)
        buf = self._buf
        if buf is None or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            return self._zf.read(name)
        off = info.header_offset
        if buf[off:off + 4] != b"PK\x03\x04":
            return self._zf.read(name)
        start = off + 30 + int.from_bytes(buf[off + 26:off + 28], "little") \
            + int.from_bytes(buf[off + 28:off + 30], "little")
        data = buf[start:start + info.compress_size]
        if info.compress_type == zipfile.ZIP_DEFLATED:
            data = zlib.decompress(data, -15)
        if zlib.crc32(data) != info.CRC:
            raise ValueError(f"{name}: CRC mismatch, the zip archive is corrupt")
        return data


def _decode_members(zf: zipfile.ZipFile, path: Path, members: Sequence[str],
                    desc: str) -> np.ndarray:
    from tqdm.auto import tqdm

    try:  # import the fast decoder before the progress bar starts (it takes seconds)
        import torchvision.io  # noqa: F401
    except ImportError:  # pragma: no cover - PIL fallback in _decode_blobs
        pass
    reader = _MemberReader(zf, path)
    out = np.empty((len(members), 3, 32, 32), dtype=np.uint8)
    with tqdm(total=len(members), desc=desc, unit="img") as bar:
        for start in range(0, len(members), _DECODE_CHUNK):
            chunk = members[start:start + _DECODE_CHUNK]
            imgs = _decode_blobs([reader.read(m) for m in chunk])
            for name, img in zip(chunk, imgs):
                if tuple(img.shape) != (3, 32, 32):
                    raise ValueError(f"{name} is {img.shape[1]}x{img.shape[2]} pixels; CIFAR-10 "
                                     "images are 32x32")
            out[start:start + len(chunk)] = torch.stack(imgs).numpy()
            bar.update(len(chunk))
    return out


def _natural_key(s: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _index_zip(names: Sequence[str]) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """split -> class folder -> [(member, file stem)] for image members."""
    index: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for n in names:
        if n.startswith("__MACOSX/") or n.rsplit("/", 1)[-1].startswith("._"):
            continue
        m = _ZIP_ENTRY.search(n)
        if m:
            index.setdefault(m.group(1).lower(), {}).setdefault(m.group(2), []).append(
                (n, m.group(3)))
    return index


def _decode_zip(src: _Source, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with zipfile.ZipFile(src.path) as zf:
        index = _index_zip(zf.namelist())
        if split not in index:
            raise ValueError(f"{src.path} has no '{split}/<class>/<image>.jpg|png' members; an "
                             "image-folder zip needs train/<class>/... and test/<class>/...")
        desc = f"decoding CIFAR-10 {split} ({src.path.name})"
        if src.npz is not None:
            with np.load(src.npz) as m:
                classes = [str(c) for c in m["label_names"]]
                labels = m[f"{split}_labels"].astype(np.int64)
                ranks = m[f"{split}_jpeg_rank"]
                exact = m[f"{split}_images_exact"]
                exact_index = m[f"{split}_exact_index"].astype(np.int64)
            lookup = {(cls, stem): member for cls, items in index[split].items()
                      for member, stem in items}
            try:
                members = [lookup[(classes[y], f"{r:04d}")] for y, r in zip(labels, ranks)]
            except KeyError as e:
                raise ValueError(f"{src.path} lacks image {split}/{e.args[0][0]}/"
                                 f"{e.args[0][1]}.jpg that {src.npz.name} refers to") from e
            images = _decode_members(zf, src.path, members, desc)
            images[exact_index] = exact.transpose(0, 3, 1, 2)  # stored HWC
            return images, labels, classes
        folders = sorted(index[split])
        classes = list(CIFAR10_CLASSES) if set(folders) <= set(CIFAR10_CLASSES) else folders
        items = [(classes.index(cls), _natural_key(stem), member)
                 for cls, entries in index[split].items() for member, stem in entries]
        items.sort()
        images = _decode_members(zf, src.path, [m for _, _, m in items], desc)
        labels = np.array([c for c, _, _ in items], dtype=np.int64)
        return images, labels, classes


def _decode_source(src: _Source, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode one split: (images uint8 [N,3,32,32], labels int64 [N], classes)."""
    if src.kind == "zip":
        return _decode_zip(src, split)
    return _decode_pickles(src, split)


# --------------------------------------------------------------------------------------------
# Decoded-tensor cache
# --------------------------------------------------------------------------------------------
def _cache_file(src: _Source, split: str) -> Path:
    """`derived/cifar10/<split>-<kind>-<key>.pt`; the key changes when a source file changes."""
    key = assets.fingerprint(_CACHE_VERSION, src.kind, split, files=src.files)
    return assets.derived_dir("cifar10", create=False) / f"{split}-{src.kind}-{key}.pt"


def _read_cache(file: Path) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    try:
        z = torch.load(file, map_location="cpu", weights_only=True)
        return z["images"].numpy(), z["labels"].numpy(), [str(c) for c in z["classes"]]
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt
        warnings.warn(f"course_utils.cifar: ignoring unreadable cache {file} ({e}); decoding "
                      "again.", stacklevel=3)
        return None


def _write_cache(file: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    try:
        with assets.atomic_file(file) as tmp:
            torch.save({"images": torch.from_numpy(np.ascontiguousarray(images)),
                        "labels": torch.from_numpy(labels), "classes": list(classes)}, tmp)
        prefix = file.name.rsplit("-", 1)[0] + "-"
        for old in file.parent.glob(prefix + "*.pt"):  # an older state of the same source
            if old != file:
                old.unlink(missing_ok=True)
    except OSError as e:
        warnings.warn(f"course_utils.cifar: could not write the cache {file} ({e}); the next "
                      "load will decode again.", stacklevel=3)


def _load_split(split: str, source: str | Path | None) -> tuple[np.ndarray, np.ndarray,
                                                                   list[str], _Source]:
    src = _find_source(source)
    file = _cache_file(src, split)
    cached = _read_cache(file)
    if cached is not None:
        return (*cached, src)
    images, labels, classes = _decode_source(src, split)
    if len(classes) != 10 and src.kind != "zip":
        raise ValueError(f"{src.description}: expected 10 classes, got {classes}")
    _write_cache(file, images, labels, classes)
    return images, labels, classes, src


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def load_cifar10(
    split: Split,
    device: str | torch.device | None = None,
    *,
    n: int | None = None,
    source: str | Path | None = None,
) -> Cifar10:
    """Load one CIFAR-10 split in the official order.

    - `split`: `"train"` (50,000 images) or `"test"` (10,000).
    - `device`: where the tensors go (default `CFG.device`).
    - `n`: keep only the first `n` images (official order).
    - `source`: read this cifar-10-batches-py folder, .tar.gz or image-folder .zip instead of
      resolving one through `course_utils.assets`.

    Returns `Cifar10(images uint8 [N,3,32,32], labels int64 [N], classes)`; unpack it as
    `x, y, classes = load_cifar10("test")`. Raises `ValueError` for a bad split or `n`, and
    `assets.AssetMissingError` naming the official tarball and the offline zip+npz (and where
    to put them) when no source is available.
    """
    _check_split(split)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
        raise ValueError(f"n must be a non-negative int or None, got {n!r}")
    images, labels, classes, src = _load_split(split, source)
    if n is not None:
        if n > len(images):
            raise ValueError(f"n={n} but the CIFAR-10 {split} split has {len(images)} images")
        images, labels = images[:n].copy(), labels[:n].copy()
    device = CFG.device if device is None else device
    return Cifar10(
        torch.from_numpy(images).to(device),
        torch.from_numpy(labels.astype(np.int64, copy=False)).to(device),
        list(classes),
        split,
        src.description,
        src.lossless if src.npz is None else False,
    )


def load_cifar10_subset(
    split: Split,
    per_class: int,
    device: str | torch.device | None = None,
    *,
    source: str | Path | None = None,
) -> Cifar10:
    """A class-balanced subset: the first `per_class` images of every class (official order),
    kept in the official order. `images: uint8 [per_class * 10, 3, 32, 32]` on `device`
    (default `CFG.device`)."""
    _check_split(split)
    full = load_cifar10(split, "cpu", source=source)
    counts = torch.bincount(full.labels, minlength=len(full.classes))
    if not isinstance(per_class, int) or per_class < 1 or per_class > int(counts.min()):
        raise ValueError(f"per_class must be an int in 1..{int(counts.min())} for the {split} "
                         f"split, got {per_class!r}")
    keep = torch.cat([torch.nonzero(full.labels == c).flatten()[:per_class]
                      for c in range(len(full.classes))]).sort().values
    device = CFG.device if device is None else device
    return Cifar10(full.images[keep].to(device), full.labels[keep].to(device), full.classes,
                   split, full.source, full.lossless)
