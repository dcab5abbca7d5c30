"""course_utils.cache: keys, hits and misses, corruption, concurrent writers, the package-code
rule, no pickle on disk, and the command line (status, clear, precompute)."""
from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import struct
import subprocess
import sys
import textwrap
import time
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from course_utils import cache
from course_utils.claims import Claim

PACKAGE_MODULE = "course_utils._test_recipes"  # the tests' stand-ins for package recipes

CALLS: list[str] = []


def _double(x: torch.Tensor, scale: float = 2.0) -> dict:
    CALLS.append("double")
    return {"y": x * scale, "meta": ("doubled", scale, None, [True, 3])}


def _random(n: int) -> torch.Tensor:
    CALLS.append("random")
    return torch.rand(n)


def _slow_arange(n: int, delay: float) -> torch.Tensor:
    CALLS.append("slow_arange")
    time.sleep(delay)
    return torch.arange(n, dtype=torch.float32) / 7


def _not_storable() -> set:
    return {1, 2}


def _claim_result() -> Claim:
    return Claim("moments match", True, {"err": 0.25}, "claim: moments match: True (err=0.25)")


def _learner_answer(x: torch.Tensor) -> torch.Tensor:  # stays in this test module
    return x * 2


for _fn in (_double, _random, _slow_arange, _not_storable, _claim_result):
    _fn.__module__ = PACKAGE_MODULE  # pretend: these play the package's reference functions


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty results cache under tmp_path, no recipes registered, no calls counted."""
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("COURSE_RESULTS_DIR", raising=False)  # the default: the user cache's results/
    monkeypatch.delenv("COURSE_RESULT_CACHE", raising=False)
    monkeypatch.setattr(cache, "_RECIPES", {})
    monkeypatch.setattr(cache, "RECIPE_MODULES", ())  # only the recipes a test registers
    CALLS.clear()
    return tmp_path / "cache" / "results"


def _entry_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*/*") if p.is_dir())


# --------------------------------------------------------------------------------------------
# Fingerprints and keys
# --------------------------------------------------------------------------------------------
def test_fingerprint_tells_values_apart() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    fp = cache.fingerprint
    assert fp(x) == fp(x.clone()) == fp(x.t().contiguous().t())  # content, not memory layout
    different = [x, x.double(), x.reshape(4, 3), x + (torch.arange(12).reshape(3, 4) == 5),
                 x.numpy(), 1, 1.0, True, "1", None, (1,), [1], {"a": 1}, {"a": 1.0},
                 b"1", torch.float32, 0.1, math.nextafter(0.1, 1.0)]
    assert len({fp(v) for v in different}) == len(different)
    assert fp({"a": 1, "b": 2}) == fp({"b": 2, "a": 1})
    assert fp(torch.nn.Linear(2, 2)) != fp(torch.nn.Linear(2, 2))  # different random weights
    with pytest.raises(TypeError, match="does not know"):
        fp(object())


def test_fingerprint_of_cifar_sized_tensor_is_fast() -> None:
    x = torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8)
    start = time.perf_counter()
    a = cache.fingerprint(x)
    assert time.perf_counter() - start < 5.0
    x[-1, -1, -1, -1] ^= 1  # one bit of the last byte
    assert cache.fingerprint(x) != a


def test_key_changes_with_each_part() -> None:
    x = torch.arange(6, dtype=torch.float32)
    base = dict(version=1, args={"x": x, "scale": 2.0}, seed=0, tier="ci")

    def key(name: str = "demo", fn=_double, **changes) -> str:
        return cache.cache_key(name, fn, **{**base, **changes})

    y = x.clone()
    y[3] += 1
    keys = [
        key(), key(name="demo2"), key(version=2), key(tier="laptop"), key(tier="full"),
        key(seed=1), key(fn=_random),
        key(args={"x": x, "scale": 3.0}), key(args={"x": x, "scale": 2}),  # value, type
        key(args={"x": y, "scale": 2.0}), key(args={"x": x.double(), "scale": 2.0}),  # data
        key(args={"x": x.reshape(2, 3), "scale": 2.0}), key(args={"x": x}),
    ]
    assert len(set(keys)) == len(keys)
    assert key(args={"x": x.clone(), "scale": 2.0}) == keys[0]  # same content, same key


# --------------------------------------------------------------------------------------------
# Hits and misses
# --------------------------------------------------------------------------------------------
def test_second_call_loads_without_computing(store: Path, capsys: pytest.CaptureFixture) -> None:
    x = torch.randn(5, 3)
    first = cache.cached("demo", _double, args=dict(x=x, scale=2.0))
    assert CALLS == ["double"]
    assert "computing demo (not cached yet)" in capsys.readouterr().err
    second = cache.cached("demo", _double, args=dict(x=x, scale=2.0))
    assert CALLS == ["double"]
    assert "loaded demo from the cache (" in capsys.readouterr().err
    assert torch.equal(second["y"], x * 2) and second["meta"] == ("doubled", 2.0, None, [True, 3])
    assert type(second["meta"]) is tuple and torch.equal(first["y"], second["y"])


def test_changed_argument_tier_or_seed_recomputes(store: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4)
    cache.cached("demo", _double, args=dict(x=x, scale=2.0))
    cache.cached("demo", _double, args=dict(x=x, scale=3.0))
    cache.cached("demo", _double, args=dict(x=x + 1, scale=3.0))
    cache.cached("demo", _double, args=dict(x=x, scale=2.0), seed=7)
    cache.cached("demo", _double, args=dict(x=x, scale=2.0), version=2)
    assert len(CALLS) == 5
    with monkeypatch.context() as patch:
        patch.setattr(cache, "current_tier", lambda: "laptop")
        out = cache.cached("demo", _double, args=dict(x=x, scale=2.0))
    assert len(CALLS) == 6 and torch.equal(out["y"], x * 2)
    assert (store / "laptop" / "demo").is_dir()
    cache.cached("demo", _double, args=dict(x=x, scale=3.0))  # back in ci: a hit
    assert len(CALLS) == 6


def test_compute_is_seeded_and_leaves_callers_rng_alone(store: Path) -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    miss = cache.cached("rand", _random, args=dict(n=4), seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    hit = cache.cached("rand", _random, args=dict(n=4), seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert CALLS == ["random"]
    assert torch.equal(miss, hit)
    assert torch.equal(hit, torch.rand(4, generator=torch.Generator().manual_seed(5)))


def test_cache_can_be_turned_off(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COURSE_RESULT_CACHE", "off")
    for _ in range(2):
        cache.cached("demo", _double, args=dict(x=torch.ones(2)))
    assert CALLS == ["double", "double"] and not store.exists()


# --------------------------------------------------------------------------------------------
# Corruption
# --------------------------------------------------------------------------------------------
def _flip(path: Path, where: float) -> None:
    data = bytearray(path.read_bytes())
    data[int(where * (len(data) - 1))] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "flip a tensor byte": lambda e: _flip(e / "data.safetensors", 0.9),
    "flip a header byte": lambda e: _flip(e / "data.safetensors", 0.02),
    "truncate the data": lambda e: _truncate(e / "data.safetensors"),
    "delete the data": lambda e: (e / "data.safetensors").unlink(),
    "flip a manifest byte": lambda e: _flip(e / "manifest.json", 0.5),
    "truncate the manifest": lambda e: _truncate(e / "manifest.json"),
    "edit a value in the manifest": lambda e: (e / "manifest.json").write_text(
        (e / "manifest.json").read_text().replace('"doubled"', '"tripled"')),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_corrupt_entry_is_recomputed_never_loaded(store: Path, damage: str) -> None:
    x = torch.randn(1000)
    cache.cached("demo", _double, args=dict(x=x))
    (entry,) = _entry_dirs(store)
    DAMAGE[damage](entry)
    with pytest.warns(cache.CacheWarning, match="corrupt or partial"):
        out = cache.cached("demo", _double, args=dict(x=x))
    assert CALLS == ["double", "double"]
    assert torch.equal(out["y"], x * 2) and out["meta"][0] == "doubled"
    again = cache.cached("demo", _double, args=dict(x=x))  # repaired: a hit
    assert CALLS == ["double", "double"] and torch.equal(again["y"], x * 2)


def test_publish_keeps_a_valid_entry_and_replaces_a_corrupt_one(store: Path) -> None:
    x = torch.randn(10)
    cache.cached("demo", _double, args=dict(x=x))
    (entry,) = _entry_dirs(store)
    key = json.loads((entry / "manifest.json").read_text())["manifest"]["key"]
    body = {"format": cache.FORMAT, "key": key, "skeleton": None}
    late = entry.with_name(".tmp-late")
    cache._write_entry(late, dict(body), {})
    before = (entry / "data.safetensors").read_bytes()
    cache._publish(late, entry, key)  # a second writer finishing later: the first entry stays
    assert not late.exists() and (entry / "data.safetensors").read_bytes() == before
    _flip(entry / "data.safetensors", 0.9)
    fresh = entry.with_name(".tmp-fresh")
    cache._write_entry(fresh, dict(body), {})
    cache._publish(fresh, entry, key)  # over a corrupt entry: replaced
    assert cache._is_valid(entry, key) and [p.name for p in entry.parent.iterdir()] == [entry.name]


def _fill_concurrently(root: str, barrier, n: int) -> None:
    os.environ["COURSE_CACHE_DIR"] = root
    os.environ.pop("COURSE_RESULTS_DIR", None)
    barrier.wait()
    out = cache.cached("race", _slow_arange, args=dict(n=n, delay=0.5), verbose=False)
    assert torch.equal(out, torch.arange(n, dtype=torch.float32) / 7)


def test_concurrent_writers_leave_one_valid_entry(store: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    n = 300_000
    procs = [ctx.Process(target=_fill_concurrently, args=(str(store.parent), barrier, n))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    (entry,) = _entry_dirs(store)
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # no temporary left
    out = cache.cached("race", _slow_arange, args=dict(n=n, delay=0.5))
    assert torch.equal(out, torch.arange(n, dtype=torch.float32) / 7) and CALLS == []


# --------------------------------------------------------------------------------------------
# The package-code rule and what may be stored
# --------------------------------------------------------------------------------------------
def test_refuses_compute_from_outside_the_package(store: Path) -> None:
    notebook_fn = types.FunctionType(_learner_answer.__code__, {}, "answer")
    notebook_fn.__module__ = "__main__"
    refused = [_learner_answer, notebook_fn, lambda x: x, functools.partial(_double, scale=2.0),
               torch.sin]
    for fn in refused:
        with pytest.raises(cache.CacheRefusedError, match="course_utils|args="):
            cache.cached("mine", fn, args=dict(x=torch.ones(2)))
    with pytest.raises(cache.CacheRefusedError, match="encode"):
        cache.cached("mine", _double, args=dict(x=torch.ones(2)), encode=_learner_answer,
                     decode=_double)
    assert CALLS == [] and not store.exists()


def test_refuses_unstorable_results_with_advice(store: Path) -> None:
    with pytest.raises(TypeError, match="encode="):
        cache.cached("set", _not_storable)


def test_dataclass_results_round_trip(store: Path) -> None:
    first = cache.cached("claim", _claim_result)
    again = cache.cached("claim", _claim_result)
    assert again == first and type(again) is Claim


@dataclass(frozen=True)
class _Pair:
    a: torch.Tensor
    b: torch.Tensor

    def to_state(self) -> dict:
        return {"ab": torch.stack([self.a, self.b])}

    @classmethod
    def from_state(cls, state: dict) -> _Pair:
        return cls(state["ab"][0], state["ab"][1])


def _pair() -> _Pair:
    CALLS.append("pair")
    return _Pair(torch.zeros(3), torch.ones(3))


def _model(width: int) -> torch.nn.Module:
    CALLS.append("model")
    torch.manual_seed(width)
    return torch.nn.Linear(width, 2)


def _model_state(model: torch.nn.Module) -> dict:
    return {"width": model.in_features, "state": model.state_dict()}


def _model_from_state(saved: dict) -> torch.nn.Module:
    model = torch.nn.Linear(saved["width"], 2)
    model.load_state_dict(saved["state"])
    return model


def test_to_state_hooks_and_encode_decode(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType(PACKAGE_MODULE)
    monkeypatch.setitem(sys.modules, PACKAGE_MODULE, fake)
    for obj in (_Pair, _pair, _model, _model_state, _model_from_state):
        monkeypatch.setattr(obj, "__module__", PACKAGE_MODULE)
        setattr(fake, obj.__name__, obj)
    pairs = [cache.cached("pair", _pair) for _ in range(2)]
    assert type(pairs[1]) is _Pair and torch.equal(pairs[1].b, torch.ones(3))
    kw = dict(args=dict(width=4), encode=_model_state, decode=_model_from_state)
    models = [cache.cached("model", _model, **kw) for _ in range(2)]
    assert CALLS == ["pair", "model"]
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))


def _is_safetensors(path: Path) -> bool:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    tensors = [v for k, v in header.items() if k != "__metadata__"]
    return all("dtype" in v and "data_offsets" in v for v in tensors)


def test_nothing_on_disk_is_pickle(store: Path) -> None:
    cache.cached("demo", _double, args=dict(x=torch.randn(3, 3)))
    cache.cached("claim", _claim_result)
    files = [p for p in store.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["data.safetensors", "data.safetensors",
                                             "manifest.json", "manifest.json"]
    for p in files:
        assert not p.read_bytes().startswith((b"\x80", b"PK"))  # pickle protocol 2+, torch zip
        if p.suffix == ".json":
            json.loads(p.read_text())
        else:
            assert _is_safetensors(p)


# --------------------------------------------------------------------------------------------
# Command line and precompute recipes
# --------------------------------------------------------------------------------------------
def test_cli_status_and_clear(store: Path, capsys: pytest.CaptureFixture,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache.main(["status"]) == 0
    assert "0 entries" in capsys.readouterr().out
    cache.cached("alpha", _double, args=dict(x=torch.randn(1000)))
    monkeypatch.setattr(cache, "current_tier", lambda: "laptop")
    cache.cached("beta", _double, args=dict(x=torch.randn(10)))
    cache.cached("alpha", _double, args=dict(x=torch.randn(10)))
    capsys.readouterr()
    cache.main(["status"])
    out = capsys.readouterr().out
    assert "3 entries" in out and " MiB in all" in out
    rows = [line.split()[:2] for line in out.splitlines()[2:-1]]
    assert rows == [["alpha", "ci"], ["alpha", "laptop"], ["beta", "laptop"]]
    assert cache.main(["clear", "--tier", "laptop", "--name", "alpha"]) == 0
    assert "removed 1 entry" in capsys.readouterr().out
    assert [(e.name, e.tier) for e in cache.entries()] == [("alpha", "ci"), ("beta", "laptop")]
    cache.main(["clear", "--name", "beta"])
    cache.main(["clear"])
    assert cache.entries() == [] and _entry_dirs(store) == []


def test_precompute_runs_registered_recipes_in_order(store: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "current_tier", lambda: "laptop")
    ran: list[str] = []

    @cache.precompute_recipe("first")
    def _first() -> None:
        ran.append("first")
        cache.cached("first", _double, args=dict(x=torch.ones(3)))

    @cache.precompute_recipe("broken")
    def _broken() -> None:
        ran.append("broken")
        raise RuntimeError("recipe bug")

    @cache.precompute_recipe("second")
    def _second() -> None:
        ran.append("second")
        cache.cached("second", _random, args=dict(n=3))

    assert [r.name for r in cache.recipes()] == ["first", "broken", "second"]
    assert cache.main(["precompute", "--tier", "laptop"]) == 1  # one recipe failed
    assert ran == ["first", "broken", "second"]
    out = capsys.readouterr().out
    assert "[1/3] first: done in" in out and "[2/3] broken: FAILED" in out
    assert [(e.name, e.tier) for e in cache.entries()] == [("first", "laptop"),
                                                           ("second", "laptop")]
    monkeypatch.setattr(cache, "_RECIPES", {k: v for k, v in cache._RECIPES.items()
                                            if k != "broken"})
    assert cache.precompute("laptop") == 0 and CALLS == ["double", "random"]  # all hits now
    with pytest.raises(ValueError, match="already registered"):
        cache.precompute_recipe("first")(_second)
    with pytest.raises(ValueError, match="unknown tier"):
        cache.precompute("huge")


def test_only_modules_runs_just_the_recipes_those_modules_define(store: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`precompute --only-modules --module B` runs B's recipe, not that of a module A that B imports
    (notebook 05's module imports notebook 03's: grading 05 alone must not run 03's whole sweep)."""
    (tmp_path / "recipes_a.py").write_text(textwrap.dedent("""
        from course_utils import cache
        RAN = []

        @cache.precompute_recipe("recipe_a")
        def _a():
            RAN.append("a")
    """))
    (tmp_path / "recipes_b.py").write_text(textwrap.dedent("""
        from course_utils import cache
        from recipes_a import RAN

        @cache.precompute_recipe("recipe_b")
        def _b():
            RAN.append("b")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cache.precompute(cache.current_tier(), modules=["recipes_b"], course=False) == 0
    import recipes_a
    assert recipes_a.RAN == ["b"]
    assert [r.name for r in cache.recipes()] == ["recipe_a", "recipe_b"]   # both registered, one ran
    assert cache._run_recipes(["recipes_b"]) == 0 and recipes_a.RAN == ["b", "a", "b"]   # without only: all


def test_precompute_for_another_tier_runs_in_a_child(store: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    other = "full" if cache.current_tier() != "full" else "ci"
    (tmp_path / "my_recipes.py").write_text(textwrap.dedent(f"""
        import torch
        from course_utils import cache

        def arange(n):
            return torch.arange(n)
        arange.__module__ = "{PACKAGE_MODULE}"

        @cache.precompute_recipe("tiny")
        def _tiny():
            assert cache.current_tier() == "{other}"
            cache.cached("tiny", arange, args=dict(n=5))
    """))
    monkeypatch.setenv("PYTHONPATH",
                       os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert cache.precompute(other, modules=["my_recipes"], course=False) == 0
    assert [(e.name, e.tier, e.ok) for e in cache.entries()] == [("tiny", other, True)]


def test_every_course_recipe_module_registers_a_recipe() -> None:
    """`precompute --tier T` fills the cache for every notebook: each module named in
    `RECIPE_MODULES` imports and registers at least one recipe (in a fresh process; not run here:
    that is the notebooks' own work, which the laptop-tier test does)."""
    code = ("import importlib, json\nfrom course_utils import cache\nout = {}\n"
            "for m in cache.RECIPE_MODULES:\n    before = len(cache.recipes())\n"
            "    importlib.import_module(m)\n    out[m] = len(cache.recipes()) - before\nprint(json.dumps(out))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts and all(n >= 1 for n in counts.values()), counts
