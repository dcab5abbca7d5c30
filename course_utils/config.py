"""Every course setting, in one object: `CFG`. No other module reads a `COURSE_*` variable.

Settings come from environment variables. The tier and the seed are read once, when
`course_utils` is imported; the folders, the offline switch and the grade log are read each
time they are used, so that tests (and a notebook cell) can change them on the fly.

| Variable | `CFG.` | Default | Read | What it does |
|---|---|---|---|---|
| `COURSE_MODE` | `mode` | `full` with a GPU, else `laptop` | at import | The tier: `ci` (tests, grading, the stored outputs: small data, short training), `laptop` (a CPU in minutes), `full` (the real experiments, for a GPU). |
| `COURSE_FAST` | `fast` | off | at import | `1` is the old name of `COURSE_MODE=ci`. Ignored (with a warning) when `COURSE_MODE` is set and says otherwise. |
| `COURSE_SEED` | `seed` | `0` | at import | The seed of `seed_everything()` and of every notebook. |
| `COURSE_DEVICE` | `device` | `cuda` with a GPU, else `cpu` | at import | Where models and data go when a function is given `device=None`. |
| `COURSE_THREADS` | `threads` | 1 in `ci`, else torch's own | at `seed_everything()` | torch's thread count. Training is bitwise reproducible only for a fixed count. |
| `COURSE_DATA_DIR` | `data_dirs` | none | at use | Folders (separated by `os.pathsep`) searched first for the course's files; never written to. |
| `COURSE_CACHE_DIR` | `cache_dir` | the user cache (`~/.cache/course_utils` on Linux) | at use | Where downloads and derived data (decoded CIFAR-10, the dequantized LM) are kept. |
| `COURSE_OFFLINE` | `offline` | off | at use | `1`: never use the network; only files already present and installed packages. |
| `COURSE_ASSET_REGISTRY` | `asset_registry` | the built-in `assets/registry.json` | at import of `assets` | A JSON file that replaces the list of course files (tests, mirrors). |
| `COURSE_ASSET_MIRROR` | `asset_mirror` | none | at use | The address (`http://`, `https://` or `file://`) of a folder laid out like `COURSE_DATA_DIR`, tried before each file's official source: a workshop's local server, or a copy of the offline bundle. |
| `COURSE_GRADE_LOG` | `grade_log` | none | at use | A file that every exercise check appends its outcome to (the grader sets it). |
| `COURSE_RESULT_CACHE` | `result_cache` | on | at use | `0`: compute every costly result again instead of loading it from the result cache (`course_utils.cache`), and store nothing. |
| `COURSE_RESULTS_DIR` | `results_dir` | `cache_dir/results` | at use | Where the result cache keeps its entries (the test suite points it at a fresh folder, so that CI runs from an empty cache). |

Booleans accept `1/true/yes/on` and `0/false/no/off` (any case); anything else is an error.
If both `COURSE_MODE` and `COURSE_FAST` are set, `COURSE_MODE` wins (the explicit tier beats
the old alias), with a warning when they disagree.

    from course_utils import CFG
    n = CFG.pick(ci=2_000, laptop=10_000, full=50_000)   # one size per tier
    print(CFG.describe())                                # tier, device, seed, how to change
"""  # noqa: E501 -- the table's rows stay one line each: tests/test_config.py matches them against README.md
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")
Mode = Literal["ci", "laptop", "full"]
MODES: tuple[str, ...] = ("ci", "laptop", "full")
APP_NAME = "course_utils"
CHANGE_TIER = "COURSE_MODE=ci|laptop|full before starting Jupyter, or `make lab MODE=ci`"

#: setting name -> environment variable: the only place the variable names are spelled out.
VARIABLES: dict[str, str] = {
    "mode": "COURSE_MODE", "fast": "COURSE_FAST", "seed": "COURSE_SEED",
    "device": "COURSE_DEVICE", "threads": "COURSE_THREADS", "data_dir": "COURSE_DATA_DIR",
    "cache_dir": "COURSE_CACHE_DIR", "offline": "COURSE_OFFLINE",
    "asset_registry": "COURSE_ASSET_REGISTRY", "asset_mirror": "COURSE_ASSET_MIRROR", "grade_log": "COURSE_GRADE_LOG",
    "result_cache": "COURSE_RESULT_CACHE", "results_dir": "COURSE_RESULTS_DIR",
}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}
_MISSING: Any = object()


def parse_bool(value: str | None, name: str = "value") -> bool:
    """`1/true/yes/on` -> True, `0/false/no/off` or unset -> False (any case); else ValueError."""
    text = (value or "").strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"{name}={value!r} is not a yes/no value: use 1 (or true/yes/on) or 0 (or false/no/off)")


def _parse_int(value: str, name: str, minimum: int) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise ValueError(f"{name}={value!r}: expected a whole number >= {minimum}")
    return number


def _check_mode(mode: str | None, name: str = "COURSE_MODE") -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"{name}={mode!r} is not a course tier: choose one of "
                         f"{', '.join(MODES)} (ci: tests and grading, laptop: a CPU, full: a GPU)")


def _requested_mode(env: Mapping[str, str]) -> str | None:
    """The tier asked for by `COURSE_MODE`, else by the alias `COURSE_FAST`, else None."""
    mode = (env.get(VARIABLES["mode"]) or "").strip().lower() or None
    fast = parse_bool(env.get(VARIABLES["fast"]), VARIABLES["fast"])
    _check_mode(mode)
    if mode is not None and fast and mode != "ci":
        warnings.warn(f"COURSE_MODE={mode} and COURSE_FAST=1 disagree: COURSE_MODE wins, the tier "
                      f"is {mode!r}. Unset one of them.", stacklevel=3)
    return mode or ("ci" if fast else None)


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass(frozen=True)
class Config:
    """Course-wide settings (see the module docstring for every variable).

    `requested_mode`/`requested_device` are None for the hardware defaults. `env` is where the
    settings read at use time come from: `os.environ` itself for `CFG`, a plain dict in tests.
    """

    requested_mode: str | None = None
    seed: int = 0
    requested_device: str | None = None
    env: Mapping[str, str] = field(default_factory=lambda: os.environ, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_mode(self.requested_mode, "requested_mode")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Settings from `env` (default `os.environ`, kept live for the settings read at use)."""
        env = os.environ if env is None else env
        seed = env.get(VARIABLES["seed"], "").strip()
        return cls(
            requested_mode=_requested_mode(env),
            seed=_parse_int(seed, VARIABLES["seed"], 0) if seed else 0,
            requested_device=(env.get(VARIABLES["device"]) or "").strip() or None,
            env=env,
        )

    # ---- the tier ------------------------------------------------------------------------
    @cached_property
    def device(self) -> str:
        """`COURSE_DEVICE` if set, else "cuda" when a GPU is present, else "cpu"."""
        return self.requested_device or ("cuda" if _gpu_available() else "cpu")

    @cached_property
    def mode(self) -> str:
        """The tier: `COURSE_MODE` (or `COURSE_FAST=1`), else "full" on a GPU, else "laptop"."""
        if self.requested_mode is not None:
            return self.requested_mode
        return "laptop" if self.device.split(":")[0] == "cpu" else "full"

    @property
    def fast(self) -> bool:
        """True exactly in the `ci` tier (small data, short training)."""
        return self.mode == "ci"

    def pick(self, *, ci: T = _MISSING, laptop: T = _MISSING, full: T = _MISSING,
             fast: T = _MISSING) -> T:
        """The value for the current tier: `CFG.pick(ci=2_000, laptop=10_000, full=50_000)`.

        `fast=` is the old name of `ci=` (`CFG.pick(fast=a, full=b)` still works). Without
        `laptop=`, the laptop tier gets the `full` value.
        """
        if fast is not _MISSING:
            if ci is not _MISSING:
                raise TypeError("CFG.pick: give ci= or its old name fast=, not both")
            ci = fast
        if ci is _MISSING or full is _MISSING:
            raise TypeError("CFG.pick needs ci= (or fast=) and full=; laptop= is optional "
                            "(it defaults to the full value)")
        values = {"ci": ci, "laptop": full if laptop is _MISSING else laptop, "full": full}
        return values[self.mode]

    def describe(self, notebook: str | None = None, *, hint: bool = True) -> str:
        """One line: tier, device, seed. With `notebook` ("03_moment_editing"), a line with its
        measured run time in this tier on this kind of machine (`expected_run_time`); with `hint`,
        a line saying how to change tier."""
        what = {"ci": "small data, short training: tests and grading",
                "laptop": "sized for a CPU", "full": "the full experiments, for a GPU"}[self.mode]
        lines = [f"course tier: {self.mode} ({what}) · device: {self.device} · seed: {self.seed}"]
        if notebook is not None:
            lines.append(expected_run_time(notebook, self.mode, self.device))
        if hint:
            lines.append(f"change the tier with {CHANGE_TIER}")
        return "\n".join(lines)

    # ---- settings read each time they are used -------------------------------------------
    def _get(self, name: str) -> str:
        return (self.env.get(VARIABLES[name]) or "").strip()

    @property
    def threads(self) -> int | None:
        """`COURSE_THREADS` as a positive int, or None."""
        value = self._get("threads")
        return _parse_int(value, VARIABLES["threads"], 1) if value else None

    @property
    def data_dirs(self) -> list[Path]:
        """The folders in `COURSE_DATA_DIR` (separated by `os.pathsep`), in order."""
        return [Path(p).expanduser() for p in self._get("data_dir").split(os.pathsep) if p.strip()]

    @property
    def cache_dir(self) -> Path:
        """`COURSE_CACHE_DIR`, else the platform's user cache folder for course_utils."""
        value = self._get("cache_dir")
        if value:
            return Path(value).expanduser()
        import platformdirs

        return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))

    @property
    def offline(self) -> bool:
        """`COURSE_OFFLINE`: never use the network."""
        return parse_bool(self._get("offline"), VARIABLES["offline"])

    @property
    def asset_registry(self) -> Path | None:
        """`COURSE_ASSET_REGISTRY`: a JSON file replacing the built-in asset registry, or None."""
        value = self._get("asset_registry")
        return Path(value).expanduser() if value else None

    @property
    def asset_mirror(self) -> str | None:
        """`COURSE_ASSET_MIRROR`: the base address of a mirror of the course's files, or None."""
        value = (self._get("asset_mirror") or "").strip()
        if value and not value.startswith(("http://", "https://", "file://")):
            raise ValueError(f"{VARIABLES['asset_mirror']}={value!r}: give an http://, https:// or file:// "
                             "address of a folder laid out like COURSE_DATA_DIR")
        return value.rstrip("/") or None

    @property
    def result_cache(self) -> bool:
        """`COURSE_RESULT_CACHE`: keep costly results in the result cache (default on)."""
        value = self._get("result_cache")
        return parse_bool(value, VARIABLES["result_cache"]) if value else True

    @property
    def results_dir(self) -> Path:
        """`COURSE_RESULTS_DIR`, else `cache_dir/"results"`: the root of the result cache."""
        value = self._get("results_dir")
        return Path(value).expanduser() if value else self.cache_dir / "results"

    @property
    def grade_log(self) -> Path | None:
        """`COURSE_GRADE_LOG`: the file exercise checks append their outcomes to, or None."""
        value = self._get("grade_log")
        return Path(value) if value else None


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def expected_run_time(notebook: str, mode: str, device: str, table: Mapping[str, Any] | None = None) -> str:
    """What `run_times.json` (the measured table, or `table`) says about `notebook` in tier `mode`
    on a machine like this one (`device` "cpu", else a GPU): one line, or that it was not measured."""
    if table is None:
        measured: dict[str, Any] = json.loads((Path(__file__).with_name("run_times.json")).read_text(encoding="utf-8"))
        table = measured
    machine = "cpu" if device.split(":")[0] == "cpu" else "gpu"
    entry = table["notebooks"].get(notebook.removesuffix(".ipynb"), {}).get(mode, {}).get(machine) or {}
    where = table["machines"][machine]
    if not entry.get("cold") and not entry.get("warm"):
        return f"run time of this notebook in the {mode} tier on {where}: not measured yet"
    if not entry.get("cold"):
        return (f"run time of this notebook in the {mode} tier on {where}: about {_minutes(entry['warm'])} with a "
                f"warm result cache (measured {entry.get('date', '')})")
    warm = f", {_minutes(entry['warm'])} with a warm result cache" if entry.get("warm") else ""
    return (f"run time of this notebook in the {mode} tier on {where}: about {_minutes(entry['cold'])}"
            f" from an empty result cache{warm} (measured {entry.get('date', '')})")


def env_vars(**settings: object) -> dict[str, str]:
    """Environment variables for child processes: `env_vars(grade_log=log)` ->
    `{"COURSE_GRADE_LOG": str(log)}`. Names are the `VARIABLES` keys; the mode is checked."""
    unknown = sorted(set(settings) - set(VARIABLES))
    if unknown:
        raise ValueError(f"unknown course setting(s) {unknown}; known: {', '.join(VARIABLES)}")
    if "mode" in settings:
        _check_mode(str(settings["mode"]))
    return {VARIABLES[name]: str(value) for name, value in settings.items()}


CFG = Config.from_env()


def seed_everything(seed: int | None = None) -> int:
    """Seed python, numpy and torch; make torch deterministic where it allows. Returns the seed.

    In the ci tier torch also runs on one thread (or `COURSE_THREADS`), because float sums, and
    so training runs, are only reproducible bit for bit for a fixed number of threads.
    """
    import random

    import numpy as np
    import torch

    seed = CFG.seed if seed is None else seed
    threads = CFG.threads
    if threads or CFG.fast:
        # The stored solution outputs were made in the ci tier on one thread: keep it that way.
        torch.set_num_threads(threads or 1)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
    return seed
