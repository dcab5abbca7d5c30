"""Tests of `course_utils.cifar`: tiny fabricated archives in every accepted format (exact
round-trips), and the real offline assets when COURSE_DATA_DIR holds them."""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import tarfile
import time
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from course_utils import assets, cifar
from course_utils.assets import AssetMissingError
from course_utils.cifar import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    load_cifar10,
    load_cifar10_subset,
    normalize,
)
from course_utils.config import Config

REAL_DATA_DIR = os.environ.get("COURSE_DATA_DIR")


@pytest.fixture(scope="module", autouse=True)
def cpu_defaults():
    """These tests compare with CPU tensors: pin the loaders' default device (`CFG.device`) to
    the CPU, so that they pass on a GPU machine too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cifar, "CFG", Config(requested_mode="ci", requested_device="cpu"))
        yield
PER_BATCH = 20  # images per fake batch: 100 train, 20 test
TARBALL = "cifar10/cifar-10-python.tar.gz"
ZIP = "cifar10/cifar10_jpeg_yoongikim.zip"
NPZ = "cifar10/cifar10_labels_and_exact_subset.npz"


# --------------------------------------------------------------------------------------------
# fabricated CIFAR-10 in the official formats
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Fake:
    train_x: np.ndarray  # uint8 [100, 3, 32, 32]
    train_y: np.ndarray  # int64 [100]
    test_x: np.ndarray
    test_y: np.ndarray

    def split(self, split):
        return (self.train_x, self.train_y) if split == "train" else (self.test_x, self.test_y)


def make_fake(seed: int = 0) -> Fake:
    rng = np.random.default_rng(seed)

    def labels(n):  # every class present, in a shuffled (non-sorted) order
        return rng.permutation(np.arange(n) % 10).astype(np.int64)

    return Fake(rng.integers(0, 256, (5 * PER_BATCH, 3, 32, 32), dtype=np.uint8),
                labels(5 * PER_BATCH),
                rng.integers(0, 256, (PER_BATCH, 3, 32, 32), dtype=np.uint8), labels(PER_BATCH))


def write_official_folder(fake: Fake, folder: Path) -> Path:
    """The exact layout of cifar-10-batches-py: python-2 style pickles with bytes keys."""
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i + 1}": (fake.train_x[i * PER_BATCH:(i + 1) * PER_BATCH],
                                       fake.train_y[i * PER_BATCH:(i + 1) * PER_BATCH])
               for i in range(5)}
    batches["test_batch"] = (fake.test_x, fake.test_y)
    for name, (x, y) in batches.items():
        d = {b"batch_label": name.encode(), b"labels": [int(v) for v in y],
             b"data": x.reshape(len(x), 3072), b"filenames": [b"x.png"] * len(x)}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    meta = {b"num_cases_per_batch": PER_BATCH, b"num_vis": 3072,
            b"label_names": [c.encode() for c in CIFAR10_CLASSES]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def write_official_tarball(fake: Fake, path: Path, tmp: Path) -> Path:
    folder = write_official_folder(fake, tmp / "tar_src" / "cifar-10-batches-py")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        tf.add(folder, arcname="cifar-10-batches-py")
    return path


def png_bytes(chw: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(chw.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def class_ranks(y: np.ndarray) -> np.ndarray:
    """Rank of each image within its class, in the official order."""
    ranks = np.zeros(len(y), dtype=np.uint16)
    seen: dict[int, int] = {}
    for i, c in enumerate(y):
        ranks[i] = seen.get(int(c), 0)
        seen[int(c)] = ranks[i] + 1
    return ranks


def write_image_zip(fake: Fake, path: Path, *, shift: int = 0, prefix: str = "") -> Path:
    """train|test/<class>/<rank>.png; `shift` adds a constant to every pixel (mod 256)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "test"):
            x, y = fake.split(split)
            for img, c, r in zip(x, y, class_ranks(y)):
                img = ((img.astype(np.int64) + shift) % 256).astype(np.uint8)
                zf.writestr(f"{prefix}{split}/{CIFAR10_CLASSES[c]}/{r:04d}.png", png_bytes(img))
    return path


def write_npz(fake: Fake, path: Path, exact: dict[str, np.ndarray]) -> Path:
    """The layout of cifar10_labels_and_exact_subset.npz; `exact[split]` = indices stored
    exactly (HWC)."""
    arrays = {"label_names": np.array(CIFAR10_CLASSES)}
    for split in ("train", "test"):
        x, y = fake.split(split)
        arrays[f"{split}_labels"] = y.astype(np.uint8)
        arrays[f"{split}_jpeg_rank"] = class_ranks(y)
        arrays[f"{split}_images_exact"] = x[exact[split]].transpose(0, 2, 3, 1).copy()
        arrays[f"{split}_exact_index"] = exact[split].astype(np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def register_file(monkeypatch, key: str, file: Path) -> None:
    """Make the registry accept a fabricated file as `key` (its sha256 and size)."""
    data = file.read_bytes()
    new = dataclasses.replace(assets.REGISTRY[key], sha256=hashlib.sha256(data).hexdigest(),
                              size=len(data))
    monkeypatch.setitem(assets.REGISTRY, key, new)


@pytest.fixture
def env(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    monkeypatch.setenv("COURSE_DATA_DIR", str(data))
    monkeypatch.setenv("COURSE_CACHE_DIR", str(cache))
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    monkeypatch.delenv("COURSE_ASSET_REGISTRY", raising=False)
    monkeypatch.setattr(assets, "REGISTRY", {a.key: a for a in assets._BUILTIN_ASSETS})
    monkeypatch.setattr(assets, "GROUPS", {g.name: g for g in assets._BUILTIN_GROUPS})

    def no_network(asset, source, out):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(assets, "fetcher", no_network)
    return data, cache


@pytest.fixture(scope="module")
def fake() -> Fake:
    return make_fake()


def assert_split(ds, x: np.ndarray, y: np.ndarray):
    assert ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    assert tuple(ds.images.shape) == (len(x), 3, 32, 32) and tuple(ds.labels.shape) == (len(y),)
    assert ds.classes == list(CIFAR10_CLASSES)
    assert torch.equal(ds.images, torch.from_numpy(x))
    assert torch.equal(ds.labels, torch.from_numpy(y))


# --------------------------------------------------------------------------------------------
# each accepted format, round-tripped exactly
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["train", "test"])
def test_unpacked_official_folder_round_trips(env, fake, tmp_path, split):
    folder = write_official_folder(fake, tmp_path / "src" / "cifar-10-batches-py")
    ds = load_cifar10(split, source=folder)
    assert_split(ds, *fake.split(split))
    assert ds.lossless


def test_official_folder_in_data_dir_is_found_and_preferred(env, fake, tmp_path, monkeypatch):
    data, _ = env
    write_official_folder(fake, data / "cifar10" / "cifar-10-batches-py")
    other = make_fake(seed=1)  # a different tarball, also present: the folder must win
    tar = write_official_tarball(other, data / TARBALL, tmp_path)
    register_file(monkeypatch, TARBALL, tar)
    ds = load_cifar10("train")
    assert_split(ds, fake.train_x, fake.train_y)
    assert "cifar-10-batches-py" in ds.source


def test_official_tarball_through_the_resolver(env, fake, tmp_path, monkeypatch):
    data, _ = env
    tar = write_official_tarball(fake, data / TARBALL, tmp_path)
    register_file(monkeypatch, TARBALL, tar)
    x, y, classes = load_cifar10("test")  # tuple unpacking
    assert torch.equal(x, torch.from_numpy(fake.test_x))
    assert torch.equal(y, torch.from_numpy(fake.test_y))
    assert classes == list(CIFAR10_CLASSES)
    assert_split(load_cifar10("train"), fake.train_x, fake.train_y)


def test_tarball_is_downloaded_through_the_resolver_when_online(env, fake, tmp_path, monkeypatch):
    _, cache = env
    tar = write_official_tarball(fake, tmp_path / "served" / "cifar-10-python.tar.gz", tmp_path)
    register_file(monkeypatch, TARBALL, tar)
    served = []

    def fetch(asset, source, out):
        served.append(source.url)
        out.write(tar.read_bytes())

    monkeypatch.setattr(assets, "fetcher", fetch)
    ds = load_cifar10("test")
    assert_split(ds, fake.test_x, fake.test_y)
    assert served == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert (cache / TARBALL).read_bytes() == tar.read_bytes()


@pytest.mark.parametrize("prefix", ["", "CIFAR-10-images/"])
def test_generic_png_zip_is_ordered_by_class_then_filename(env, fake, tmp_path, prefix):
    z = write_image_zip(fake, tmp_path / "imgs.zip", prefix=prefix)
    for split in ("train", "test"):
        x, y = fake.split(split)
        order = np.lexsort((class_ranks(y), y))  # by class, then by rank (= file name)
        ds = load_cifar10(split, source=z)
        assert_split(ds, x[order], y[order])
        assert ds.lossless  # PNG


def test_generic_zip_in_data_dir_is_found(env, fake, tmp_path):
    data, _ = env
    write_image_zip(fake, data / "cifar10" / "my_cifar_pngs.zip")
    y = fake.test_y
    ds = load_cifar10("test")
    assert torch.equal(ds.labels, torch.from_numpy(np.sort(y, kind="stable")))
    assert "my_cifar_pngs.zip" in ds.source


def test_offline_zip_and_npz_restore_official_order_and_exact_images(env, fake, monkeypatch):
    data, _ = env
    # the zip's pixels are all off by +1, so we can tell zip pixels from npz-exact pixels
    z = write_image_zip(fake, data / ZIP, shift=1)
    exact = {"train": np.array([0, 3, 57, 99]), "test": np.arange(5)}
    npz = write_npz(fake, data / NPZ, exact)
    register_file(monkeypatch, ZIP, z)
    register_file(monkeypatch, NPZ, npz)
    for split in ("train", "test"):
        x, y = fake.split(split)
        expected = ((x.astype(np.int64) + 1) % 256).astype(np.uint8)
        expected[exact[split]] = x[exact[split]]
        ds = load_cifar10(split)
        assert_split(ds, expected, y)  # official order, exact subset restored
        assert not ds.lossless and "offline bundle" in ds.source


# --------------------------------------------------------------------------------------------
# options, errors, cache
# --------------------------------------------------------------------------------------------
def test_n_device_and_subset(env, fake, tmp_path):
    folder = write_official_folder(fake, tmp_path / "cifar-10-batches-py")
    ds = load_cifar10("train", "cpu", n=7, source=folder)
    assert torch.equal(ds.images, torch.from_numpy(fake.train_x[:7]))
    assert torch.equal(ds.labels, torch.from_numpy(fake.train_y[:7]))
    assert ds.images.device.type == "cpu" and ds.to("cpu").images.shape == (7, 3, 32, 32)
    with pytest.raises(ValueError, match="n=101"):
        load_cifar10("train", n=101, source=folder)
    with pytest.raises(ValueError, match="non-negative"):
        load_cifar10("train", n=-1, source=folder)

    sub = load_cifar10_subset("train", 3, source=folder)
    assert torch.bincount(sub.labels, minlength=10).tolist() == [3] * 10
    y = fake.train_y
    keep = np.sort(np.concatenate([np.flatnonzero(y == c)[:3] for c in range(10)]))
    assert torch.equal(sub.images, torch.from_numpy(fake.train_x[keep]))
    with pytest.raises(ValueError, match="per_class"):
        load_cifar10_subset("train", 11, source=folder)


def test_loaders_default_to_cfg_device(env, fake, tmp_path, monkeypatch):
    folder = write_official_folder(fake, tmp_path / "cifar-10-batches-py")
    monkeypatch.setattr(cifar, "CFG", Config(requested_mode="ci", requested_device="meta"))
    ds = load_cifar10("train", n=7, source=folder)
    assert ds.images.device.type == ds.labels.device.type == "meta"
    assert ds.images.shape == (7, 3, 32, 32)
    sub = load_cifar10_subset("train", 2, source=folder)
    assert sub.images.device.type == sub.labels.device.type == "meta" and len(sub.labels) == 20
    assert load_cifar10("test", "cpu", n=3, source=folder).images.device.type == "cpu"


@pytest.mark.parametrize("bad", ["val", "Train", "", None])
def test_bad_split_says_what_is_allowed(bad):
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_cifar10(bad)  # type: ignore[arg-type]


def test_no_source_names_both_options_and_folders(env):
    data, cache = env
    with pytest.raises(AssetMissingError) as e:
        load_cifar10("test")
    msg = str(e.value)
    for piece in ("cifar-10-python.tar.gz", "cifar10_jpeg_yoongikim.zip",
                  "cifar10_labels_and_exact_subset.npz", "cifar-10-batches-py",
                  str(data / "cifar10"), str(cache / "cifar10"),
                  "python -m course_utils.assets fetch", "no network in tests"):
        assert piece in msg, piece
    assert isinstance(e.value, FileNotFoundError)


def test_second_load_comes_from_the_cache_without_decoding(env, fake, tmp_path, monkeypatch):
    _, cache = env
    folder = write_official_folder(fake, tmp_path / "cifar-10-batches-py")
    first = load_cifar10("train", source=folder)
    cached = list((cache / "derived" / "cifar10").glob("train-*"))
    assert len(cached) == 1

    def must_not_decode(*args, **kw):
        raise AssertionError("decoded again although a cache exists")

    monkeypatch.setattr(cifar, "_decode_source", must_not_decode)
    second = load_cifar10("train", source=folder)
    assert torch.equal(second.images, first.images) and torch.equal(second.labels, first.labels)

    # a changed source invalidates the cache; the stale file is replaced
    st = (folder / "data_batch_1").stat()
    os.utime(folder / "data_batch_1", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    with pytest.raises(AssertionError, match="decoded again"):
        load_cifar10("train", source=folder)


def test_cache_file_names_keep_their_layout(env, fake, tmp_path):
    """Caches written before `assets.fingerprint` existed (same formula) are still found."""
    _, cache = env
    folder = write_official_folder(fake, tmp_path / "cifar-10-batches-py")
    src = cifar._find_source(folder)
    ident = [cifar._CACHE_VERSION, "folder", "train"] + [
        [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in src.files]
    digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]
    assert cifar._cache_file(src, "train") == cache / "derived" / "cifar10" / f"train-folder-{digest}.pt"


def test_unreadable_cache_is_rebuilt(env, fake, tmp_path):
    _, cache = env
    folder = write_official_folder(fake, tmp_path / "cifar-10-batches-py")
    load_cifar10("test", source=folder)
    (file,) = (cache / "derived" / "cifar10").glob("test-*")
    file.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache"):
        ds = load_cifar10("test", source=folder)
    assert_split(ds, fake.test_x, fake.test_y)


def test_constants_and_normalize():
    assert CIFAR10_CLASSES[0] == "airplane" and CIFAR10_CLASSES[-1] == "truck"
    assert len(CIFAR10_CLASSES) == 10
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR10_STD == (0.2470, 0.2435, 0.2616)
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    x[:, 1] = 255
    z = normalize(x)
    assert z.dtype == torch.float32 and z.shape == x.shape
    assert torch.allclose(z[0, 0], torch.full((32, 32), -0.4914 / 0.2470))
    assert torch.allclose(z[0, 1], torch.full((32, 32), (1 - 0.4822) / 0.2435))
    assert torch.allclose(normalize(x.float() / 255), z)
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        normalize(torch.zeros(2, 32, 32, 3))


# --------------------------------------------------------------------------------------------
# the real offline assets (decoded once per session into a temporary cache)
# --------------------------------------------------------------------------------------------
def _real_cifar_dir() -> Path:
    if not REAL_DATA_DIR:
        pytest.skip("COURSE_DATA_DIR is not set: the offline CIFAR-10 assets are not available")
    real = Path(REAL_DATA_DIR.split(os.pathsep)[0])
    for key in (ZIP, NPZ):
        if not (real / key).is_file():
            pytest.skip(f"COURSE_DATA_DIR={real} lacks {key}")
    return real


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    """Real data dir + a session cache; train and test decoded once (timed)."""
    data = _real_cifar_dir()
    cache = tmp_path_factory.mktemp("course_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COURSE_DATA_DIR", str(data))
        mp.setenv("COURSE_CACHE_DIR", str(cache))
        mp.delenv("COURSE_OFFLINE", raising=False)
        mp.setattr(assets, "REGISTRY", {a.key: a for a in assets._BUILTIN_ASSETS})
        mp.setattr(assets, "GROUPS", {g.name: g for g in assets._BUILTIN_GROUPS})
        t0 = time.perf_counter()
        train = load_cifar10("train")
        first_s = time.perf_counter() - t0
        test = load_cifar10("test")
    return {"data": data, "cache": cache, "train": train, "test": test, "first_s": first_s}


@pytest.fixture
def real_env(real, monkeypatch):
    monkeypatch.setenv("COURSE_DATA_DIR", str(real["data"]))
    monkeypatch.setenv("COURSE_CACHE_DIR", str(real["cache"]))
    monkeypatch.setattr(assets, "REGISTRY", {a.key: a for a in assets._BUILTIN_ASSETS})
    monkeypatch.setattr(assets, "GROUPS", {g.name: g for g in assets._BUILTIN_GROUPS})
    return real


def test_real_sizes_counts_and_first_labels(real_env):
    train, test = real_env["train"], real_env["test"]
    assert tuple(train.images.shape) == (50_000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert tuple(test.images.shape) == (10_000, 3, 32, 32) and test.labels.dtype == torch.int64
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert train.labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert train.classes == list(CIFAR10_CLASSES) == test.classes
    # the per-channel mean of the (mostly JPEG) train set is close to the official constant
    mean = train.images[:10_000].float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor(CIFAR10_MEAN), atol=0.01)


def decode_with_pil(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")).transpose(2, 0, 1)


def test_real_exact_images_equal_the_npz_and_jpeg_is_close(real_env):
    with np.load(real_env["data"] / NPZ) as m:
        npz = {k: m[k] for k in ("train_images_exact", "train_exact_index",
                                 "test_images_exact", "test_exact_index", "test_jpeg_rank")}
    for split in ("train", "test"):
        ds = real_env[split]
        idx = torch.from_numpy(npz[f"{split}_exact_index"].astype(np.int64))
        exact = torch.from_numpy(npz[f"{split}_images_exact"]).permute(0, 3, 1, 2)
        assert torch.equal(ds.images[idx], exact)
    # the JPEG of an exact test image is close to it (the loader replaced it by the exact one)
    test = real_env["test"]
    with zipfile.ZipFile(real_env["data"] / ZIP) as zf:
        diffs = []
        for i in range(0, 1017, 10):
            name = f"test/{test.classes[test.labels[i]]}/{npz['test_jpeg_rank'][i]:04d}.jpg"
            jpeg = decode_with_pil(zf.read(name))
            diffs.append(np.abs(jpeg.astype(np.int16) - test.images[i].numpy()).mean())
        assert np.mean(diffs) < 8, np.mean(diffs)
        # a non-exact image is the decoded JPEG itself
        j = 5000
        name = f"test/{test.classes[test.labels[j]]}/{npz['test_jpeg_rank'][j]:04d}.jpg"
        jpeg = decode_with_pil(zf.read(name))
        assert np.abs(jpeg.astype(np.int16) - test.images[j].numpy()).max() <= 1


def test_real_second_load_uses_the_cache(real_env, monkeypatch):
    cached = sorted(p.name for p in (real_env["cache"] / "derived" / "cifar10").iterdir())
    assert any(n.startswith("train-zip-") for n in cached) and any(n.startswith("test-zip-")
                                                                    for n in cached)

    def must_not_decode(*args, **kw):
        raise AssertionError("decoded again although a cache exists")

    monkeypatch.setattr(cifar, "_decode_source", must_not_decode)
    t0 = time.perf_counter()
    again = load_cifar10("train")
    second_s = time.perf_counter() - t0
    assert torch.equal(again.images, real_env["train"].images)
    assert torch.equal(again.labels, real_env["train"].labels)
    print(f"\nload_cifar10('train'): first {real_env['first_s']:.1f} s, second {second_s:.2f} s")
