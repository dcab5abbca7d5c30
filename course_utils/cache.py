"""A cache for the package's own costly, deterministic results.

Trained checkpoints and checkpoint sweeps, fitted lenses, class moments and Monge maps, erased
data sets, the converted language model: each is computed once per machine and loaded from disk
afterwards.

    from course_utils import cache, train

    model_state = cache.cached(
        "cifar_model", train.train_state,             # a function of course_utils, never your own
        version=1,                                    # bump when the recipe's code changes
        args=dict(images=x_train, labels=y_train, epochs=CFG.pick(fast=1, full=30)),
    )
    # first call:  "computing cifar_model (not cached yet)", then train_state's own progress bar
    # later calls: "loaded cifar_model from the cache (1.2 MiB)", in seconds

`cached(name, compute, version=..., args=...)` returns `compute(**args)`. The result is stored
under a key that covers everything that decides it: the recipe `name` and `version`, the
function's qualified name, every argument (tensors by `fingerprint`: sha256 of dtype, shape and
bytes), the tier (`CFG.mode`: "ci", "laptop" or "full") and the seed. Change any of them and the
result is computed again; nothing is ever looked up by name alone.

Only the package's reference code is cached, never a learner's own answer: `cached` refuses a
`compute` whose `__module__` is not inside `course_utils` (a function defined in a notebook has
`__module__ == "__main__"`), and so also lambdas and `functools.partial` objects defined there.
Pass the arguments through `args=` instead.

`compute` runs with python's, numpy's and torch's random generators seeded from `seed` (default
`CFG.seed`), and the caller's generator states are restored afterwards, so a cache hit and a cache
miss leave a notebook in the same state.

Storage: `CFG.results_dir/<tier>/<name>/<key>/` (`COURSE_RESULTS_DIR`, default the user cache's `results/`), one
folder per entry holding `data.safetensors` (every tensor of the result) and `manifest.json` (the
result's structure as JSON, the sha256 of the data file, and a sha256 of the manifest itself).
Never pickle: a result may be a tensor, or any nesting of dict/list/tuple of tensors, ints,
floats, strings, bools and None; a dataclass of `course_utils` with `to_state()`/`from_state()`
(or plain fields of those types); anything else through an `encode`/`decode` pair. Both files are
verified on every load: a corrupt or partial entry is reported (`CacheWarning`) and recomputed,
never loaded. An entry is written into a temporary folder next to its place, fsynced, and renamed
into place in one step, so two kernels filling the same entry never leave a half-written one.
`COURSE_RESULT_CACHE=0` turns the cache off (compute every time, write nothing).

Command line:

    python -m course_utils.cache status                 # entries: name, tier, size, created; total
    python -m course_utils.cache clear [--name N] [--tier T]
    python -m course_utils.cache precompute --tier laptop [--module M ...]

`precompute` imports the recipe modules (`RECIPE_MODULES`, plus any `--module`), and runs every
function registered with `@precompute_recipe(name)`, in order, in the requested tier (in a child
process with `COURSE_MODE`/`COURSE_FAST` set when it differs from the current one). With
`--only-modules`, only the recipes the `--module` modules define themselves run (notebook 05's
module imports notebook 03's, whose recipe then stays out).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import functools
import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch

from course_utils import config

__all__ = [
    "RECIPE_MODULES",
    "TIERS",
    "CacheRefusedError",
    "CacheWarning",
    "Entry",
    "Recipe",
    "cache_key",
    "cached",
    "clear",
    "current_tier",
    "entries",
    "fingerprint",
    "precompute",
    "precompute_recipe",
    "recipes",
    "results_dir",
]

T = TypeVar("T")

TIERS = ("ci", "laptop", "full")
PACKAGE = "course_utils"
# Modules whose import registers the notebooks' recipes (`precompute` imports them in this order).
RECIPE_MODULES: tuple[str, ...] = (  # named, not imported: each registers its notebook's recipe
    "course_utils.saliency_checks", "course_utils.lens_experiment", "course_utils.moments",
    "course_utils.erasure_cifar", "course_utils.toolbox",
)
FORMAT = 1
DATA_FILE = "data.safetensors"
MANIFEST_FILE = "manifest.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CHUNK = 1 << 20


class CacheRefusedError(ValueError):
    """`cached` was asked to store something it must not (a learner's function, a bad name)."""


class CacheWarning(UserWarning):
    """A cache entry was corrupt or partial and is being recomputed."""


class _Corrupt(Exception):
    """Internal: an entry failed verification (the message says how)."""


# --------------------------------------------------------------------------------------------
# Tier and location
# --------------------------------------------------------------------------------------------
def current_tier() -> str:
    """The tier results are computed for: `CFG.mode` ("ci", "laptop" or "full")."""
    return config.CFG.mode


def results_dir() -> Path:
    """`CFG.results_dir` (`COURSE_RESULTS_DIR`, default the user cache's `results/`): the root
    of every cached result (may not exist yet)."""
    return config.CFG.results_dir


def _enabled() -> bool:
    return config.CFG.result_cache


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------
def _sha(*parts: str | bytes | memoryview) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()


def _tensor_fingerprint(t: torch.Tensor) -> str:
    if t.layout != torch.strided:
        raise TypeError(f"fingerprint() takes dense tensors, not {t.layout}: call .to_dense()")
    flat = t.detach().resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy()  # no copy for a contiguous CPU tensor
    return _sha(f"tensor:{t.dtype}:{tuple(t.shape)}:", raw.data)


def _array_fingerprint(a: Any) -> str:
    import numpy as np

    if a.dtype == object:
        raise TypeError("fingerprint() cannot hash a numpy array of Python objects")
    return _sha(f"ndarray:{a.dtype.str}:{a.shape}:", np.ascontiguousarray(a).data.cast("B"))


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _container_fingerprint(obj: Any) -> str:
    if isinstance(obj, (list, tuple)):
        return _sha(f"{type(obj).__name__}[", ",".join(fingerprint(x) for x in obj), "]")
    items = sorted((fingerprint(k), fingerprint(v)) for k, v in obj.items())
    return _sha("dict{", ",".join(f"{k}:{v}" for k, v in items), "}")


def fingerprint(obj: Any) -> str:
    """sha256 (hex) of a value, for cache keys: equal values, equal fingerprints.

    Tensors hash their dtype, shape and bytes (a 50,000x3x32x32 uint8 tensor takes a fraction of
    a second); numpy arrays likewise. Numbers keep their type (`1`, `1.0` and `True` differ;
    floats are hashed exactly). Strings, bytes, None, `torch.dtype`/`torch.device`, enums,
    tuples/lists/dicts of those, dataclasses (class name and fields) and `nn.Module`s (class name
    and `state_dict`, so hyper-parameters that live outside it must be passed separately).

        >>> fingerprint(torch.zeros(3)) == fingerprint(torch.zeros(3))
        True
        >>> fingerprint(torch.zeros(3)) == fingerprint(torch.zeros(3, dtype=torch.float64))
        False
        >>> fingerprint({"lr": 0.1, "width": 16}) == fingerprint({"width": 16, "lr": 0.1})
        True
    """
    import numpy as np

    if obj is None or isinstance(obj, (bool, int, str)):
        return _sha(f"{type(obj).__name__}:{obj}")
    if isinstance(obj, float):
        return _sha(f"float:{obj.hex()}")
    if isinstance(obj, bytes):
        return _sha("bytes:", obj)
    if isinstance(obj, torch.Tensor):
        return _tensor_fingerprint(obj)
    if isinstance(obj, (np.ndarray, np.generic)):
        return _array_fingerprint(np.asarray(obj))
    if isinstance(obj, (torch.dtype, torch.device)):
        return _sha(f"{type(obj).__name__}:{obj}")
    if isinstance(obj, enum.Enum):
        return _sha(f"enum:{_class_path(type(obj))}:{obj.name}")
    if isinstance(obj, (list, tuple, dict)):
        return _container_fingerprint(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return _sha(f"dataclass:{_class_path(type(obj))}:", fingerprint(fields))
    if isinstance(obj, torch.nn.Module):
        return _sha(f"module:{_class_path(type(obj))}:", fingerprint(dict(obj.state_dict())))
    raise TypeError(
        f"fingerprint() does not know how to hash a {_class_path(type(obj))}. Pass the values "
        "that decide it (tensors, numbers, strings, dataclasses) instead."
    )


def _describe(value: Any) -> str:
    """A short human description of an argument, for the manifest."""
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"tensor {dtype}{list(value.shape)} sha256:{fingerprint(value)[:12]}"
    if value is None or isinstance(value, (bool, int, float)) or (
            isinstance(value, str) and len(value) <= 80):
        return repr(value)
    return f"{type(value).__name__} sha256:{fingerprint(value)[:12]}"


# --------------------------------------------------------------------------------------------
# Keys and the package-code rule
# --------------------------------------------------------------------------------------------
def _in_package(module: str | None) -> bool:
    return bool(module) and (module == PACKAGE or module.startswith(PACKAGE + "."))


def _check_package_code(fn: Callable[..., Any], role: str) -> None:
    """Refuse a callable that is not the package's own code (see the module docstring)."""
    if isinstance(fn, functools.partial):
        raise CacheRefusedError(
            f"cached() got a functools.partial as {role}: pass the function itself and its "
            "arguments through args=, so that every argument is part of the cache key.")
    module = getattr(fn, "__module__", None)
    if not callable(fn) or not _in_package(module):
        raise CacheRefusedError(
            f"cached() only stores results of the course's own reference code, but {role} "
            f"{getattr(fn, '__qualname__', fn)!r} comes from module {module!r}. Your own answers "
            "are never cached: call your function directly. (Recipes that may be cached are "
            f"functions of the {PACKAGE} package.)")


def _function_path(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}:{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def cache_key(name: str, compute: Callable[..., Any], *, version: int = 1,
              args: Mapping[str, Any] | None = None, seed: int | None = None,
              tier: str | None = None) -> str:
    """The hex sha256 key `cached` stores `compute(**args)` under (same arguments as `cached`).

    It covers `name`, `version`, the function's qualified name (and, for a bound method, its
    object's fingerprint), the fingerprint of every argument, `tier` (default `current_tier()`)
    and `seed` (default `CFG.seed`).
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise CacheRefusedError(f"entry name {name!r} must be letters, digits, '_', '-' or '.'")
    parts = {
        "format": FORMAT, "name": name, "version": version,
        "tier": current_tier() if tier is None else tier,
        "seed": config.CFG.seed if seed is None else seed,
        "function": _function_path(compute),
        "args": {k: fingerprint(v) for k, v in sorted((args or {}).items())},
    }
    if inspect.ismethod(compute):
        parts["self"] = fingerprint(compute.__self__)
    return _sha(json.dumps(parts, sort_keys=True))


# --------------------------------------------------------------------------------------------
# Encoding a result: a JSON skeleton plus a flat dict of tensors
# --------------------------------------------------------------------------------------------
def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON primitives stay as they are; everything else becomes a one-key object."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": key, "device": str(value.device), "grad": value.requires_grad}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_encode(v, tensors) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[_encode_key(k), _encode(v, tensors)] for k, v in value.items()]}
    return _encode_object(value, tensors)


def _encode_key(key: Any) -> Any:
    if key is None or isinstance(key, (bool, int, float, str)):
        return key
    raise TypeError(f"cached() stores dicts keyed by str/int/float/bool/None, not {type(key)}")


def _encode_object(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    cls = type(value)
    if _in_package(cls.__module__) and hasattr(value, "to_state") and hasattr(cls, "from_state"):
        return {"object": _class_path(cls), "state": _encode(value.to_state(), tensors)}
    if _in_package(cls.__module__) and dataclasses.is_dataclass(value):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
        return {"object": _class_path(cls), "fields": _encode(fields, tensors)}
    raise TypeError(
        f"cached() cannot store a {cls.__module__}.{cls.__qualname__}: results must be tensors, "
        "numbers, strings, bools, None, dicts/lists/tuples of those, or course_utils dataclasses "
        "(give the class to_state()/from_state() if its fields are not). Otherwise pass "
        "encode=/decode= to cached() (e.g. a model's state_dict and a function that rebuilds it).")


def _decode(skel: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if not isinstance(skel, dict):
        return skel
    if "tensor" in skel:
        return _decode_tensor(skel, tensors)
    if "list" in skel:
        return [_decode(v, tensors) for v in skel["list"]]
    if "tuple" in skel:
        return tuple(_decode(v, tensors) for v in skel["tuple"])
    if "dict" in skel:
        return {k: _decode(v, tensors) for k, v in skel["dict"]}
    if "object" in skel:
        return _decode_object(skel, tensors)
    raise _Corrupt(f"unknown entry {sorted(skel)} in the manifest")


def _decode_tensor(skel: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    t = tensors[skel["tensor"]]
    device = skel.get("device", "cpu")
    if device != "cpu":
        with contextlib.suppress(RuntimeError, AssertionError):
            t = t.to(device)  # stays on the CPU when that device is absent
    if skel.get("grad") and (t.is_floating_point() or t.is_complex()):
        t.requires_grad_(True)
    return t


def _decode_object(skel: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
    module, _, qualname = skel["object"].partition(":")
    if not _in_package(module):
        raise _Corrupt(f"the manifest names a class outside {PACKAGE}: {skel['object']}")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    if "state" in skel:
        return cls.from_state(_decode(skel["state"], tensors))
    return cls(**_decode(skel["fields"], tensors))


# --------------------------------------------------------------------------------------------
# Entries on disk
# --------------------------------------------------------------------------------------------
def _entry_dir(name: str, tier: str, key: str) -> Path:
    if not _NAME.match(tier):
        raise CacheRefusedError(f"tier {tier!r} must be letters, digits, '_', '-' or '.'")
    return results_dir() / tier / name / key[:32]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(body: Mapping[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def _read_manifest(entry: Path) -> dict[str, Any]:
    """The manifest body of `entry`, after checking its own sha256; raises `_Corrupt`."""
    try:
        wrapped = json.loads((entry / MANIFEST_FILE).read_text(encoding="utf-8"))
        body = wrapped["manifest"]
        ok = _sha(_canonical(body)) == wrapped["sha256"]
    except FileNotFoundError as e:
        raise _Corrupt(f"{MANIFEST_FILE} is missing") from e
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, bad bytes, wrong shape
        raise _Corrupt(f"{MANIFEST_FILE} is unreadable ({type(e).__name__})") from e
    if not ok:
        raise _Corrupt(f"{MANIFEST_FILE} does not match its sha256")
    if not isinstance(body, dict) or not {"format", "key", "data", "skeleton"} <= body.keys():
        raise _Corrupt(f"{MANIFEST_FILE} lacks fields")
    return body


def _load_entry(entry: Path, key: str) -> tuple[Any, dict[str, torch.Tensor], int]:
    """(skeleton, tensors, bytes on disk) of a verified entry; raises `_Corrupt`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    body = _read_manifest(entry)
    if body.get("key") != key or body.get("format") != FORMAT:
        raise _Corrupt("its manifest belongs to another key or format")
    data = entry / DATA_FILE
    try:
        size = data.stat().st_size
        if size != body["data"]["bytes"] or _file_sha256(data) != body["data"]["sha256"]:
            raise _Corrupt(f"{DATA_FILE} does not match the size and sha256 in the manifest")
        tensors = load_file(str(data))
    except (FileNotFoundError, SafetensorError) as e:
        raise _Corrupt(f"{DATA_FILE} is missing or unreadable") from e
    return body["skeleton"], tensors, size + (entry / MANIFEST_FILE).stat().st_size


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _write_entry(tmp: Path, body: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Fill the folder `tmp` with the data file and the manifest, both fsynced."""
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / DATA_FILE))
    _fsync_file(tmp / DATA_FILE)
    body["data"] = {"file": DATA_FILE, "bytes": (tmp / DATA_FILE).stat().st_size,
                    "sha256": _file_sha256(tmp / DATA_FILE)}
    _write_json(tmp / MANIFEST_FILE, {"manifest": body, "sha256": _sha(_canonical(body))})


def _is_valid(entry: Path, key: str) -> bool:
    try:
        _load_entry(entry, key)
        return True
    except _Corrupt:
        return False


def _publish(tmp: Path, entry: Path, key: str) -> None:
    """Move the complete folder `tmp` to `entry` in one rename. If another process published a
    valid entry first, keep theirs; a corrupt one is moved aside and replaced."""
    try:
        os.rename(tmp, entry)
        return
    except OSError:
        if _is_valid(entry, key):
            shutil.rmtree(tmp, ignore_errors=True)
            return
    trash = entry.with_name(f".trash-{uuid.uuid4().hex}")
    with contextlib.suppress(OSError):
        os.rename(entry, trash)
    try:
        os.rename(tmp, entry)
    except OSError:  # a third writer got there in between: theirs is complete too
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(trash, ignore_errors=True)


def _store(entry: Path, body: dict[str, Any], value: Any) -> int:
    """Write `value` as the entry `entry` atomically; returns its size in bytes."""
    tensors: dict[str, torch.Tensor] = {}
    body["skeleton"] = _encode(value, tensors)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".tmp-{entry.name}-{uuid.uuid4().hex}")
    try:
        _write_entry(tmp, body, tensors)
        _publish(tmp, entry, body["key"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return body["data"]["bytes"]


# --------------------------------------------------------------------------------------------
# cached()
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch with `seed`; restore the caller's states afterwards."""
    import random

    import numpy as np

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng():
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _note(verbose: bool, text: str) -> None:
    if verbose:
        print(text, file=sys.stderr, flush=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB"


def _try_load(entry: Path, key: str, name: str, verbose: bool) -> tuple[bool, Any]:
    """(True, value) from a verified entry; (False, None) when absent or corrupt (warned)."""
    if not entry.exists():
        return False, None
    try:
        skeleton, tensors, size = _load_entry(entry, key)
        value = _decode(skeleton, tensors)
    except _Corrupt as e:
        warnings.warn(f"cache entry {name} at {entry} is corrupt or partial ({e}); "
                      "computing it again", CacheWarning, stacklevel=3)
        return False, None
    except (KeyError, TypeError, ValueError, AttributeError, ImportError) as e:
        warnings.warn(f"cache entry {name} at {entry} cannot be rebuilt ({type(e).__name__}: {e}); "
                      "computing it again", CacheWarning, stacklevel=3)
        return False, None
    _note(verbose, f"loaded {name} from the cache ({_mib(size)})")
    return True, value


def _check_callables(compute: Callable[..., Any], encode: Callable[..., Any] | None,
                     decode: Callable[..., Any] | None) -> None:
    for fn, role in ((compute, "compute"), (encode, "encode"), (decode, "decode")):
        if fn is not None:
            _check_package_code(fn, role)
    if (encode is None) != (decode is None):
        raise CacheRefusedError("cached() needs both encode= and decode=, or neither")


def _describe_call(body: dict[str, Any], compute: Callable[..., Any],
                   args: Mapping[str, Any]) -> dict[str, Any]:
    """`body` plus what a person reading the manifest wants: function, arguments, date."""
    return {**body, "function": _function_path(compute),
            "args": {k: _describe(v) for k, v in sorted(args.items())},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def cached(name: str, compute: Callable[..., T], *, version: int = 1,
           args: Mapping[str, Any] | None = None, seed: int | None = None,
           encode: Callable[[T], Any] | None = None, decode: Callable[[Any], T] | None = None,
           options: Mapping[str, Any] | None = None, verbose: bool = True) -> T:
    """`compute(**args)`, computed once and loaded from the cache afterwards.

    - `name`: the recipe's name, also the entry's folder ("cifar_model", "lens_layer6").
    - `compute`: a function of `course_utils` (anything else is refused: a learner's answer is
      never cached). It must be deterministic given `args` and `seed`: it runs with python's,
      numpy's and torch's generators seeded from `seed`, and the caller's states are restored.
    - `version`: bump it when the recipe's code changes, so old entries stop matching.
    - `args`: keyword arguments of `compute`; each is part of the key via `fingerprint`
      (tensors by content: pass the input data here, not through a global).
    - `seed`: default `CFG.seed`. The tier (`current_tier()`) is part of the key too.
    - `encode`/`decode` (both `course_utils` functions): turn the result into a storable
      structure and back, e.g. a model into its `state_dict` and a state dict into a model.
    - `options`: keyword arguments of `compute` that do not change its result (a progress
      bar, say); they are passed on but are not part of the key.
    - `verbose`: print "computing NAME (not cached yet)" / "loaded NAME from the cache (N MiB)"
      on stderr.

    Tensors come back on the device they were computed on when it exists here (else the CPU).

        >>> from course_utils import cache, moments
        >>> m = cache.cached("cifar_class_moments", moments.fit_class_moments,
        ...                  args=dict(x=pixels, y=labels, num_classes=10))  # doctest: +SKIP
    """
    _check_callables(compute, encode, decode)
    args = dict(args or {})
    both = {**args, **dict(options or {})}
    seed = config.CFG.seed if seed is None else seed
    if not _enabled():
        with _seeded(seed):
            return compute(**both)
    key = cache_key(name, compute, version=version, args=args, seed=seed)
    tier = current_tier()
    entry = _entry_dir(name, tier, key)
    hit, stored = _try_load(entry, key, name, verbose)
    if hit:
        return decode(stored) if decode else stored
    _note(verbose, f"computing {name} (not cached yet)")
    start = time.perf_counter()
    with _seeded(seed):
        value = compute(**both)
    body = {"format": FORMAT, "key": key, "name": name, "version": version, "tier": tier,
            "seed": seed, "compute_seconds": round(time.perf_counter() - start, 3)}
    _store(entry, _describe_call(body, compute, args), encode(value) if encode else value)
    return value


# --------------------------------------------------------------------------------------------
# Listing and clearing
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One stored result: where it is, what it is, how big (`size` in bytes, both files)."""

    name: str
    tier: str
    path: Path
    size: int
    created: str
    version: int | None
    ok: bool


def _entry_info(path: Path) -> Entry:
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    tier, name = path.parent.parent.name, path.parent.name
    try:
        body = _read_manifest(path)
        return Entry(name, tier, path, size, body.get("created", "?"), body.get("version"), True)
    except _Corrupt:
        return Entry(name, tier, path, size, "?", None, False)


def entries(*, name: str | None = None, tier: str | None = None) -> list[Entry]:
    """Every stored entry (optionally only those of `name` and/or `tier`), sorted by tier, name
    and date. `ok` is False when the manifest is unreadable (the data file is checked on load)."""
    root = results_dir()
    if not root.is_dir():
        return []
    found = [_entry_info(p) for p in root.glob("*/*/*")
             if p.is_dir() and not p.name.startswith(".")]
    found = [e for e in found
             if (name is None or e.name == name) and (tier is None or e.tier == tier)]
    return sorted(found, key=lambda e: (e.tier, e.name, e.created))


def clear(*, name: str | None = None, tier: str | None = None) -> list[Entry]:
    """Remove the entries of `name` and/or `tier` (all when both are None); returns them."""
    removed = entries(name=name, tier=tier)
    for e in removed:
        trash = e.path.with_name(f".trash-{uuid.uuid4().hex}")
        with contextlib.suppress(OSError):
            os.rename(e.path, trash)  # vanish at once for readers, then delete
            shutil.rmtree(trash, ignore_errors=True)
    return removed


# --------------------------------------------------------------------------------------------
# Precompute recipes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """A zero-argument function that fills the cache (through `cached`) for one notebook."""

    name: str
    function: Callable[[], Any]


_RECIPES: dict[str, Recipe] = {}


def precompute_recipe(name: str) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Register a zero-argument function that computes, through `cached`, what one notebook
    needs in the current tier. `python -m course_utils.cache precompute --tier T` runs them all.

        @precompute_recipe("cifar_sweep")
        def _cifar_sweep() -> None:
            cached("cifar_sweep", train.checkpoint_sweep, args=dict(epochs=CFG.pick(2, 30)))
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"recipe name {name!r} must be letters, digits, '_', '-' or '.'")

    def register(fn: Callable[[], Any]) -> Callable[[], Any]:
        old = _RECIPES.get(name)
        if old is not None and _function_path(old.function) != _function_path(fn):
            raise ValueError(f"recipe {name!r} is already registered by "
                             f"{_function_path(old.function)}")
        _RECIPES[name] = Recipe(name, fn)
        return fn

    return register


def recipes() -> list[Recipe]:
    """The registered recipes, in registration order."""
    return list(_RECIPES.values())


def _tier_env(tier: str) -> dict[str, str]:
    """The environment of a child process that runs in `tier`, importing this same package."""
    env = dict(os.environ, **config.env_vars(mode=tier, fast=int(tier == "ci")))
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _run_recipes(modules: list[str], *, only: bool = False) -> int:
    """Import `modules`, run every registered recipe in order (with `only`, just those that
    `modules` themselves define, not those of the modules they import); returns the number that failed."""
    for module in modules:
        importlib.import_module(module)
    todo, failed = recipes(), 0
    if only:
        todo = [r for r in todo if r.function.__module__ in modules]
    print(f"precompute: {len(todo)} recipe(s) for tier {current_tier()} into {results_dir()}")
    for i, recipe in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {recipe.name} ...", flush=True)
        start = time.perf_counter()
        try:
            recipe.function()
            print(f"[{i}/{len(todo)}] {recipe.name}: done in {time.perf_counter() - start:.1f} s")
        except Exception:  # report every failure, keep going with the other recipes
            failed += 1
            traceback.print_exc()
            print(f"[{i}/{len(todo)}] {recipe.name}: FAILED")
    return failed


def precompute(tier: str, modules: list[str] | None = None, *, course: bool = True) -> int:
    """Fill the cache for `tier` by running every recipe registered in `RECIPE_MODULES` (the
    course's notebooks; `course=False` leaves them out) and `modules`. Runs here when `tier` is
    the current tier, else in a child process with the tier set in its environment. Returns the
    number of failed recipes (0 is success)."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    wanted = [*(RECIPE_MODULES if course else ()), *(modules or [])]
    if tier == current_tier():
        return _run_recipes(wanted, only=not course)
    argv = [sys.executable, "-m", "course_utils.cache", "precompute", "--tier", tier]
    argv += [a for m in (modules or []) for a in ("--module", m)] + ([] if course else ["--only-modules"])
    done = subprocess.run(argv, env=_tier_env(tier), check=False)
    if done.returncode == 2:
        raise RuntimeError(f"the child process for tier {tier!r} stopped with an error (see above)")
    return done.returncode


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------
def _print_entries(found: list[Entry]) -> None:
    print(f"results cache: {results_dir()}")
    rows = [(e.name, e.tier, _mib(e.size), e.created + ("" if e.ok else "  CORRUPT"))
            for e in found]
    header = ("name", "tier", "size", "created")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[3])
    print(f"{len(found)} entr{'y' if len(found) == 1 else 'ies'}, "
          f"{_mib(sum(e.size for e in found))} in all")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m course_utils.cache",
                                     description="The cache of the course's computed results.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_status = sub.add_parser("status", help="list the entries: name, tier, size, created")
    p_clear = sub.add_parser("clear", help="remove entries (all, or those of --name/--tier)")
    for p in (p_status, p_clear):
        p.add_argument("--name", help="only entries of this recipe name")
        p.add_argument("--tier", help="only entries of this tier")
    p_pre = sub.add_parser("precompute", help="fill the cache for a tier by running every recipe")
    p_pre.add_argument("--tier", required=True, choices=TIERS)
    p_pre.add_argument("--module", action="append", default=[],
                       help="also import this module for its recipes (repeatable)")
    p_pre.add_argument("--only-modules", action="store_true",
                       help="run only the recipes of the --module modules, not the course's notebooks'")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "status":
        _print_entries(entries(name=args.name, tier=args.tier))
        return 0
    if args.command == "clear":
        removed = clear(name=args.name, tier=args.tier)
        print(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, "
              f"{_mib(sum(e.size for e in removed))}")
        return 0
    if args.tier != current_tier() and config.CFG.env.get(config.VARIABLES["mode"]) == args.tier:
        print(f"error: this course_utils cannot run tier {args.tier!r} (its config gives "
              f"{current_tier()!r} for COURSE_MODE={args.tier})", file=sys.stderr)
        return 2
    try:
        return 1 if precompute(args.tier, args.module, course=not args.only_modules) else 0
    except (RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy's: recipes register there.
    from course_utils import cache as _cache

    sys.exit(_cache.main())
