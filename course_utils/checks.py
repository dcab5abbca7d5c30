"""Exercise checks: instant, specific feedback on a learner's answer, and a record for the grader.

A notebook cell defines the learner's function (or value); the cell after it calls

    check("gradcam.channel_weights", channel_weights)

which runs the answer on several generated cases (edge cases included), compares each result
with the reference implementation and prints ONE line: a tick, or a diagnosis that names the
failing case, the expected against the actual shape / dtype / device, NaNs, the largest error
and where it is, and the hint written for that exercise. When the wrong answer matches a known
mistake (say, gradients summed instead of averaged), the hint for that mistake is given.

Exercise specs live in `course_utils/exercises/<topic>.py`, registered with `@exercise`, and
known wrong answers with `@mistake`. The test suite proves, for every exercise, that the
reference passes and that every registered mistake is rejected with its own hint.

Every outcome is kept in `RESULTS` and, when `COURSE_GRADE_LOG` names a file, appended to it as a
JSON line; that is how `python -m course_utils.grade` learns which exercises passed.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from course_utils.config import CFG

if TYPE_CHECKING:
    import torch

Status = Literal["passed", "failed", "todo", "error"]

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_REGISTRY: dict[str, Exercise] = {}
RESULTS: dict[str, Outcome] = {}
_SEEN: dict[str, int] = {}  # hint rungs shown per exercise this session (failed checks and `hint` calls)

CALL_LIMIT_S = 10.0  # the least time a learner's call may take before it counts as an endless loop
CALL_LIMIT_FACTOR = 50.0  # ... or this many times the reference's time on the same case, if longer


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One generated input for a function exercise: `fn(*args, **kwargs)`."""

    label: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Mistake:
    """A known wrong answer and the hint that fits it."""

    label: str
    fn: Callable[..., Any]
    hint: str


@dataclass
class Exercise:
    """The spec of one exercise.

    - `kind="function"`: the answer is a function; it is run on `cases()` and compared with
      `reference` case by case.
    - `kind="value"`: the answer is a value; `reference(**context)` computes the expected one
      from what the notebook passes to `check(name, answer, **context)`.
    - `validate(answer, **context) -> str | None`: an extra test run after the cases (for
      example, that no hook was left registered); it returns a diagnosis or None.
    - `compare(expected, actual) -> str | None` replaces the default tensor comparison.
    - Hints are a ladder, `ladder = (*hints, hint)`: a failed check shows the diagnosis and the
      rung reached so far; `hints` are the nudges (the first must not give the recipe away) and
      `hint`, the last rung, is the formula with shapes.
    """

    name: str
    title: str
    reference: Callable[..., Any]
    hint: str
    hints: tuple[str, ...] = ()
    kind: Literal["function", "value"] = "function"
    cases: Callable[[], list[Case]] | None = None
    rtol: float = 1e-4
    atol: float = 1e-5
    compare: Callable[[Any, Any], str | None] | None = None
    validate: Callable[..., str | None] | None = None
    points: int = 1
    mistakes: list[Mistake] = field(default_factory=list)

    @property
    def topic(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def ladder(self) -> tuple[str, ...]:
        """The hints from the gentlest nudge to the formula with shapes."""
        return (*self.hints, self.hint)



def generator(seed: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded with `seed`: how every exercise spec draws its cases, so that
    a case is the same on every machine and never touches the global random state."""
    import torch

    return torch.Generator().manual_seed(seed)


def exercise(
    name: str,
    *,
    title: str,
    hint: str,
    hints: tuple[str, ...] = (),
    kind: Literal["function", "value"] = "function",
    cases: Callable[[], list[Case]] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    compare: Callable[[Any, Any], str | None] | None = None,
    validate: Callable[..., str | None] | None = None,
    points: int = 1,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register the decorated function as the reference answer of exercise `name`.

    `hints` are the rungs of the hint ladder below `hint` (see `Exercise`)."""
    if kind == "function" and cases is None:
        raise ValueError(f"exercise {name!r}: a function exercise needs `cases`")

    def register(reference: Callable[..., Any]) -> Callable[..., Any]:
        previous = _REGISTRY.get(name)
        _REGISTRY[name] = Exercise(
            name=name, title=title, reference=reference, hint=hint, hints=tuple(hints), kind=kind, cases=cases,
            rtol=rtol, atol=atol, compare=compare, validate=validate, points=points,
            mistakes=list(previous.mistakes) if previous else [],
        )
        return reference

    return register


def mistake(name: str, label: str, hint: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a known wrong answer of exercise `name` (declared after it)."""

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        get_exercise(name).mistakes.append(Mistake(label=label, fn=fn, hint=hint))
        return fn

    return register


def get_exercise(name: str) -> Exercise:
    """The spec of `name`, importing `course_utils.exercises.<topic>` on first use."""
    if name not in _REGISTRY:
        topic = name.split(".", 1)[0]
        try:
            importlib.import_module(f"course_utils.exercises.{topic}")
        except ModuleNotFoundError as err:
            if err.name != f"course_utils.exercises.{topic}":
                raise
    if name not in _REGISTRY:
        known = ", ".join(sorted(n for n in _REGISTRY if n.startswith(name.split(".")[0]))) or "none"
        raise KeyError(f"no exercise called {name!r} (exercises of that topic: {known}). Check the spelling.")
    return _REGISTRY[name]


def exercises_of(topic: str) -> list[Exercise]:
    """Every exercise of a topic, in the order the notebook meets them."""
    importlib.import_module(f"course_utils.exercises.{topic}")
    return [ex for ex in _REGISTRY.values() if ex.topic == topic]


# --------------------------------------------------------------------------------------------
# Outcomes
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    """What a check found. `line()` is the one line the learner sees.

    A failure's `message` is `diagnosis` followed by `hint`; the grader reports the diagnosis only.
    `finding` names what the harness itself caught (an input changed in place, an endless loop, an
    output left attached, the global random state changed, a scaled or reordered result).
    """

    name: str
    status: Status
    message: str = ""
    case: str | None = None
    mistake: str | None = None
    diagnosis: str = ""
    hint: str = ""
    finding: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def line(self) -> str:
        if self.status == "passed":
            return f"✓ {self.name}: {self.message or 'all cases pass'}"
        if self.status == "todo":
            return f"… {self.name}: not done yet. {self.message}".rstrip()
        where = f" [case: {self.case}]" if self.case else ""
        return f"✗ {self.name}{where}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "message": self.message,
                "case": self.case, "mistake": self.mistake}


def _record(outcome: Outcome) -> None:
    RESULTS[outcome.name] = outcome
    log = CFG.grade_log
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(outcome.to_json()) + "\n")


# --------------------------------------------------------------------------------------------
# Comparison: say exactly what differs
# --------------------------------------------------------------------------------------------
def _shape(t: Any) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _index(flat: int, shape: tuple[int, ...]) -> str:
    if not shape:
        return "the scalar"
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat, shape)) + "]"


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _diagnose_tensor(expected: Any, actual: Any, rtol: float, atol: float, what: str) -> str | None:
    import torch

    if isinstance(expected, torch.Tensor) and not isinstance(actual, torch.Tensor):
        got = type(actual).__name__
        fix = " (wrap it with torch.as_tensor)" if isinstance(actual, np.ndarray) else ""
        return f"{what}: expected a torch.Tensor of shape {_shape(expected)}, got {got}{fix}"
    if tuple(expected.shape) != tuple(actual.shape):
        extra = ""
        if expected.numel() == actual.numel():
            extra = " (same number of elements: a reshape, a transpose or a missing squeeze?)"
        elif actual.dim() > expected.dim():
            extra = " (did you forget to reduce over a dimension?)"
        elif actual.dim() < expected.dim():
            extra = " (did you reduce over a dimension you should keep, or drop keepdim?)"
        return f"{what}: shape: expected {_shape(expected)}, got {_shape(actual)}{extra}"
    if isinstance(expected, torch.Tensor):
        if expected.dtype != actual.dtype:
            return f"{what}: dtype: expected {expected.dtype}, got {actual.dtype}"
        if expected.device.type != actual.device.type:
            return f"{what}: device: expected {expected.device}, got {actual.device}"
    e, a = _as_numpy(expected), _as_numpy(actual)
    if e.dtype == bool or a.dtype == bool or not np.issubdtype(e.dtype, np.number):
        bad = np.flatnonzero(e != a)
        if bad.size:
            i = int(bad[0])
            return (f"{what}: {bad.size} of {e.size} entries differ; first at {_index(i, e.shape)}: "
                    f"expected {e.flat[i]}, got {a.flat[i]}")
        return None
    e64, a64 = np.atleast_1d(e.astype(np.float64)), np.atleast_1d(a.astype(np.float64))
    nan_a = ~np.isfinite(a64) & np.isfinite(e64)
    if nan_a.any():
        i = int(np.flatnonzero(nan_a)[0])
        return (f"{what}: {int(nan_a.sum())} NaN/inf entries where finite values were expected, first at "
                f"{_index(i, e.shape)} (a division by zero, or log of 0?)")
    if e.size == 0:
        return None
    both_nan = np.isnan(e64) & np.isnan(a64)
    one_nan = np.isnan(e64) ^ np.isnan(a64)
    err = np.where(both_nan, 0.0, np.where(one_nan, np.inf, np.abs(a64 - e64)))
    tol = np.where(both_nan | one_nan, 0.0, atol + rtol * np.abs(e64))
    if np.all(err <= tol):
        return None
    i = int(np.nanargmax(err - tol))
    n_bad = int((err > tol).sum())
    where = f" at {_index(i, e.shape)}" if e.ndim else ""
    return (f"{what}: values differ at {n_bad} of {e.size} entries; largest error {err.flat[i]:.3g}{where} "
            f"(expected {e64.flat[i]:.6g}, got {a64.flat[i]:.6g})")


def diagnose(expected: Any, actual: Any, *, rtol: float = 1e-4, atol: float = 1e-5,
             what: str = "output") -> str | None:
    """None when `actual` matches `expected`, else one sentence saying what differs and where.

    Handles tensors, arrays, numbers, strings and (nested) tuples, lists and dicts.
    """
    import torch

    if actual is Ellipsis:
        return f"{what} is still `...`"
    if isinstance(expected, (torch.Tensor, np.ndarray)):
        if not isinstance(actual, (torch.Tensor, np.ndarray)):
            if isinstance(actual, (int, float)) and np.ndim(expected) == 0:
                actual = np.asarray(actual)
            else:
                return (f"{what}: expected a {type(expected).__name__} of shape "
                        f"{_shape(expected)}, got {type(actual).__name__}")
        return _diagnose_tensor(expected, actual, rtol, atol, what)
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{what}: expected a dict, got {type(actual).__name__}"
        if set(expected) != set(actual):
            return f"{what}: keys: expected {sorted(map(str, expected))}, got {sorted(map(str, actual))}"
        for k in expected:
            d = diagnose(expected[k], actual[k], rtol=rtol, atol=atol, what=f"{what}[{k!r}]")
            if d:
                return d
        return None
    if isinstance(expected, (tuple, list)):
        if not isinstance(actual, (tuple, list)):
            return f"{what}: expected a {type(expected).__name__} of {len(expected)} items, got {type(actual).__name__}"
        if len(expected) != len(actual):
            return f"{what}: expected {len(expected)} items, got {len(actual)}"
        for k, (e, a) in enumerate(zip(expected, actual)):
            d = diagnose(e, a, rtol=rtol, atol=atol, what=f"{what}[{k}]")
            if d:
                return d
        return None
    if isinstance(expected, bool) or expected is None or isinstance(expected, str):
        return None if actual == expected else f"{what}: expected {expected!r}, got {actual!r}"
    if isinstance(expected, (int, float, np.number)):
        if isinstance(actual, torch.Tensor) and actual.numel() == 1:
            actual = actual.item()
        if not isinstance(actual, (int, float, np.number)) or isinstance(actual, bool):
            return f"{what}: expected a number, got {type(actual).__name__}"
        if math.isnan(float(actual)) and not math.isnan(float(expected)):
            return f"{what}: expected {expected:.6g}, got NaN"
        if abs(float(actual) - float(expected)) <= atol + rtol * abs(float(expected)):
            return None
        return f"{what}: expected {float(expected):.6g}, got {float(actual):.6g}"
    return None if actual == expected else f"{what}: expected {expected!r}, got {actual!r}"


# --------------------------------------------------------------------------------------------
# Running the learner's code
# --------------------------------------------------------------------------------------------
def _is_learner_frame(filename: str) -> bool:
    if filename.startswith(_PACKAGE_DIR):
        return False
    if filename.startswith("<") and "ipython-input" not in filename:
        return False
    libs = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    real = os.path.realpath(filename)
    return "site-packages" not in real and not any(real.startswith(os.path.join(p, "lib")) for p in libs)


def describe_exception(err: BaseException) -> str:
    """`TypeError: msg (your line 3: `return x.mean(2)`)`: the learner's own line, not a traceback."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if _is_learner_frame(f.filename)]
    msg = f"{type(err).__name__}: {err}".strip()
    if len(msg) > 300:
        msg = msg[:300] + " …"
    if frames:
        f = frames[-1]
        where = f"in {f.name}()" if f.name not in ("<module>", "<lambda>") else ""
        code = (f.line or "").strip()
        return f"{msg} (your line {f.lineno} {where}: `{code}`)".replace("  ", " ")
    return msg


class _Todo(Exception):
    pass


class _Timeout(BaseException):
    """Raised inside a learner's call that ran past its time limit. A BaseException, so that a
    bare `except Exception:` in their code does not swallow it."""


@contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise `_Timeout` in the main thread after `seconds` (SIGALRM); an outer timer is restored."""
    def ring(_signum: int, _frame: Any) -> None:
        raise _Timeout()

    old_handler = signal.signal(signal.SIGALRM, ring)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            left = max(old_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, old_interval)


def run_with_time_limit(thunk: Callable[[], Any], seconds: float) -> Any:
    """`thunk()`, or `_Timeout` once it has run for `seconds`.

    In the main thread of a Unix process (where a Jupyter kernel runs its cells) SIGALRM interrupts
    the call; elsewhere it runs in a daemon thread, which is abandoned if it overruns."""
    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        with _alarm(seconds):
            return thunk()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = thunk()
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise _Timeout()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _call(fn: Callable[..., Any], case: Case, limit: float | None = None) -> Any:
    args, kwargs = copy.deepcopy(case.args), copy.deepcopy(case.kwargs)
    try:
        if limit is None:
            return fn(*args, **kwargs)
        return run_with_time_limit(lambda: fn(*args, **kwargs), limit)
    except NotImplementedError as err:
        raise _Todo(str(err)) from err


# --------------------------------------------------------------------------------------------
# What the harness watches besides the output: inputs, the autograd graph, the random state
# --------------------------------------------------------------------------------------------
def _tensor_leaves(x: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    import torch

    if isinstance(x, torch.Tensor):
        yield path, x
    elif isinstance(x, (tuple, list)):
        for i, v in enumerate(x):
            yield from _tensor_leaves(v, f"{path}[{i}]")
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _tensor_leaves(v, f"{path}[{k!r}]")


def _named_args(fn: Callable[..., Any], args: tuple, kwargs: dict) -> list[tuple[str, Any]]:
    """(parameter name, value) for every argument of a call `fn(*args, **kwargs)`."""
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    named = [(params[i] if i < len(params) else f"argument {i + 1}", a) for i, a in enumerate(args)]
    return named + list(kwargs.items())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (a.isnan() & b.isnan())).all())
    return bool((a == b).all())


@dataclass
class _Watch:
    """Snapshots taken before a learner's call, compared after it: inputs and the global RNGs."""

    inputs: list[tuple[str, Any, Any]]
    rng: tuple[Any, Any, Any]

    @classmethod
    def before(cls, named: list[tuple[str, Any]]) -> _Watch:
        import random

        import torch

        inputs = [(p, t, t.detach().clone()) for name, a in named for p, t in _tensor_leaves(a, name)]
        return cls(inputs, (torch.random.get_rng_state(), np.random.get_state(), random.getstate()))

    def changed_input(self) -> str | None:
        """The first input (by parameter name) whose contents changed, or None."""
        return next((p for p, t, before in self.inputs if not _same(t.detach(), before)), None)

    def rng_after(self) -> tuple[Any, Any, Any]:
        """The global random state now; the state from before is put back."""
        import random

        import torch

        now = (torch.random.get_rng_state(), np.random.get_state(), random.getstate())
        torch.random.set_rng_state(self.rng[0])
        np.random.set_state(self.rng[1])
        random.setstate(self.rng[2])
        return now

    def rng_changed(self) -> bool:
        """Whether the global random state moved; it is put back either way."""
        return not _same_rng(self.rng_after(), self.rng)


def _same_rng(a: tuple[Any, Any, Any], b: tuple[Any, Any, Any]) -> bool:
    import torch

    return (torch.equal(a[0], b[0]) and a[2] == b[2]
            and np.array_equal(a[1][1], b[1][1]) and a[1][2] == b[1][2])


def _attached(expected: Any, actual: Any, what: str = "output") -> str | None:
    """The first output tensor that still has a graph where the reference's has none (checked where
    the spec, the reference's docstring, says "detached")."""
    import torch

    if isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor):
        return what if actual.requires_grad and not expected.requires_grad else None
    if isinstance(expected, dict) and isinstance(actual, dict):
        pairs = [(f"{what}[{k!r}]", expected[k], actual[k]) for k in expected if k in actual]
    elif isinstance(expected, (tuple, list)) and isinstance(actual, (tuple, list)):
        pairs = [(f"{what}[{i}]", e, a) for i, (e, a) in enumerate(zip(expected, actual))]
    else:
        return None
    return next((w for w, e, a in pairs if _attached(e, a, w)), None)


IN_PLACE = ("your function changed its input `{path}` in place (an in-place operation such as `+=`, "
            "`x[...] = ...`, `.clamp_()`, or a write into a view of it), which would corrupt the caller's "
            "data: compute a new tensor instead (work on `{path}.clone()` if you must write)")
TIMED_OUT = ("your function ran for more than {limit:.0f} s on this case (the reference takes {ref:.2g} s): "
             "an endless loop? Check that every `while` loop's condition eventually changes")
ATTACHED = ("{what} is still attached to the autograd graph (requires_grad=True): the spec asks for a "
            "detached tensor, so call `.detach()` on what you return")
GLOBAL_RNG = ("your function changed the global random state (torch.manual_seed, or torch.rand / randperm / "
              "numpy / random without a generator of your own): draw from a local "
              "`torch.Generator().manual_seed(seed)` so that the rest of the notebook is unaffected")


# --------------------------------------------------------------------------------------------
# Recognising a wrong answer: registered mistakes, then the shape of the error
# --------------------------------------------------------------------------------------------
def _compare(ex: Exercise, expected: Any, actual: Any) -> str | None:
    if ex.compare is not None:
        return ex.compare(expected, actual)
    return diagnose(expected, actual, rtol=ex.rtol, atol=ex.atol)


def _matching_mistake(ex: Exercise, matches: Callable[[Callable[..., Any]], bool]) -> Mistake | None:
    for m in ex.mistakes:
        try:
            if matches(m.fn):
                return m
        except Exception:  # a mistake that cannot even run on this case does not match
            continue
        except _Timeout:
            continue
    return None


def _loosely_equal(ex: Exercise, mistaken: Any, actual: Any) -> bool:
    """Whether `actual` is the mistake's output within a tolerance ten times the exercise's."""
    if ex.compare is not None:
        return ex.compare(mistaken, actual) is None
    return diagnose(mistaken, actual, rtol=max(10 * ex.rtol, 1e-3), atol=max(10 * ex.atol, 1e-4)) is None


def _first_differing(expected: Any, actual: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """The first pair of same-shape float arrays that differ, walking tuples, lists and dicts."""
    import torch

    if isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor):
        if expected.shape != actual.shape or not expected.is_floating_point() or expected.numel() < 2:
            return None
        e, a = _as_numpy(expected).astype(np.float64), _as_numpy(actual).astype(np.float64)
        if not (np.isfinite(e).all() and np.isfinite(a).all()) or np.allclose(a, e, rtol=1e-4, atol=1e-6):
            return None
        return e, a
    if isinstance(expected, dict) and isinstance(actual, dict):
        pairs = [(expected[k], actual[k]) for k in expected if k in actual]
    elif isinstance(expected, (tuple, list)) and isinstance(actual, (tuple, list)):
        pairs = list(zip(expected, actual))
    else:
        return None
    return next((found for e, a in pairs if (found := _first_differing(e, a)) is not None), None)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    scale = max(float(np.abs(b).max()), 1e-12)
    return bool(np.allclose(a, b, rtol=1e-3, atol=1e-4 * scale))


def _error_pattern(expected: Any, actual: Any) -> str | None:
    """What a wrong output has in common with the right one: a sign, a factor, an offset, an order."""
    pair = _first_differing(expected, actual)
    if pair is None:
        return None
    e, a = pair
    ee = float((e * e).sum())
    if ee > 0:
        c = float((a * e).sum()) / ee
        if _close(a, c * e):
            if abs(c + 1) < 1e-3:
                return "every entry has the wrong sign: check the sign of your formula"
            return (f"every entry is {c:.4g} times the expected one: a missing or extra constant factor "
                    f"(a sum for a mean, a wrong normalisation, scale or base)")
    shift = a - e
    if _close(shift, np.full_like(shift, shift.mean())) and abs(shift.mean()) > 1e-6:
        return (f"every entry is off by the same constant {shift.mean():.4g}: a missing or extra additive term "
                f"(a mean, a bias, a constant inside a log)")
    if e.ndim >= 2 and e.shape[0] > 1:
        rows_e, rows_a = e.reshape(e.shape[0], -1), a.reshape(a.shape[0], -1)
        norms = (rows_e * rows_e).sum(1)
        if (norms > 0).all():
            cs = (rows_a * rows_e).sum(1) / norms
            if _close(rows_a, cs[:, None] * rows_e):
                return ("each item along the first axis is a scaled copy of the expected one, with its own "
                        "factor: a per-item normalisation is missing or wrong")
    if _close(np.sort(a, axis=None), np.sort(e, axis=None)):
        return ("the right values, in the wrong places: your output rearranges the expected entries (an axis "
                "order, a transpose, a reshape of permuted axes or an indexing mix-up)")
    return None


# --------------------------------------------------------------------------------------------
# Failing with a hint from the ladder
# --------------------------------------------------------------------------------------------
def _hint_for(ex: Exercise, m: Mistake | None, rung: int) -> str:
    """The mistake's own hint on a first failure; later failures add the ladder's next rungs."""
    ladder = ex.ladder
    step = ladder[min(rung, len(ladder) - 1)]
    if m is None:
        return step
    return m.hint if rung == 0 else f"{m.hint} More: {step}"


def _fail(ex: Exercise, message: str, case: str | None, actual: Any = None,
          run: Callable[[Callable[..., Any]], Any] | None = None,
          matches: Callable[[Callable[..., Any]], bool] | None = None,
          finding: str | None = None, rung: int = 0, expected: Any = None) -> Outcome:
    """A failed Outcome; the hint is the matching known mistake's, if the answer behaves like one."""
    m = None
    if matches is None and run is not None:
        m = (_matching_mistake(ex, lambda fn: _compare(ex, run(fn), actual) is None)
             or _matching_mistake(ex, lambda fn: _loosely_equal(ex, run(fn), actual)))
    elif matches is not None:
        m = _matching_mistake(ex, matches)
    if m is None and finding is None and expected is not None:
        pattern = _error_pattern(expected, actual)
        if pattern:
            message, finding = f"{message}: {pattern}", "error pattern"
    label = f" This looks like a known mistake: {m.label}." if m else ""
    diagnosis = f"{message}.{label}"
    hint = _hint_for(ex, m, rung)
    return Outcome(ex.name, "failed", f"{diagnosis} Hint: {hint}", case=case,
                   mistake=m.label if m else None, diagnosis=diagnosis, hint=hint, finding=finding)


def _has_ellipsis(x: Any) -> bool:
    if x is Ellipsis:
        return True
    if isinstance(x, (tuple, list)):
        return any(_has_ellipsis(v) for v in x)
    if isinstance(x, dict):
        return any(_has_ellipsis(v) for v in x.values())
    return False


_TODO = "Replace `raise NotImplementedError(...)` with your code."


def _run_case(ex: Exercise, answer: Callable[..., Any], case: Case, rung: int) -> Outcome | None:
    """Run one case under watch; a failed Outcome, or None when the answer passes it."""
    started = time.perf_counter()
    expected = _call(ex.reference, case)
    ref_s = time.perf_counter() - started
    limit = max(CALL_LIMIT_S, CALL_LIMIT_FACTOR * ref_s)
    args, kwargs = copy.deepcopy(case.args), copy.deepcopy(case.kwargs)
    watch = _Watch.before(_named_args(answer, args, kwargs))
    run = lambda fn, c=case: _call(fn, c, limit)  # noqa: E731
    try:
        actual = run_with_time_limit(lambda: answer(*args, **kwargs), limit)
    except NotImplementedError:
        return Outcome(ex.name, "todo", _TODO)
    except _Timeout:
        watch.rng_changed()
        message = TIMED_OUT.format(limit=math.ceil(limit), ref=ref_s)
        return _fail(ex, message, case.label, finding="time limit", rung=rung)
    except Exception as err:  # the learner's bug: show their line, not a traceback
        watch.rng_changed()
        return _fail(ex, f"your code raised {describe_exception(err)}", case.label, rung=rung)
    rng_moved = watch.rng_changed()
    changed = watch.changed_input()
    if changed:
        return _fail(ex, IN_PLACE.format(path=changed), case.label, finding="in place", rung=rung,
                     matches=lambda fn: _mutates_like(ex, fn, case, actual, limit))
    problem = _compare(ex, expected, actual)
    if problem:
        return _fail(ex, problem, case.label, actual, run, rung=rung, expected=expected)
    attached = _attached(expected, actual) if "detached" in (ex.reference.__doc__ or "") else None
    if attached:
        return _fail(ex, ATTACHED.format(what=attached), case.label, finding="attached", rung=rung)
    if rng_moved:
        return _fail(ex, GLOBAL_RNG, case.label, finding="global RNG", rung=rung)
    return None


def _mutates_like(ex: Exercise, fn: Callable[..., Any], case: Case, actual: Any, limit: float) -> bool:
    """Whether the mistake `fn` also writes into its input, and returns what the answer returned."""
    args, kwargs = copy.deepcopy(case.args), copy.deepcopy(case.kwargs)
    watch = _Watch.before(_named_args(fn, args, kwargs))
    out = run_with_time_limit(lambda: fn(*args, **kwargs), limit)
    watch.rng_after()
    return watch.changed_input() is not None and _compare(ex, out, actual) is None


def _run_validate(ex: Exercise, answer: Any, context: dict[str, Any], rung: int) -> Outcome | None:
    validate = ex.validate
    assert validate is not None
    watch = _Watch.before([])
    limit = 12 * CALL_LIMIT_S
    try:
        problem = run_with_time_limit(lambda: validate(answer, **context), limit)
    except (_Todo, NotImplementedError):
        return Outcome(ex.name, "todo", _TODO)
    except _Timeout:
        watch.rng_after()
        return _fail(ex, f"your function ran for more than {math.ceil(limit)} s: an endless loop? Check that every "
                     f"`while` loop's condition eventually changes", None, finding="time limit", rung=rung)
    except Exception as err:
        watch.rng_after()
        return _fail(ex, f"your code raised {describe_exception(err)}", None, rung=rung)
    if problem:
        watch.rng_after()
        return _fail(ex, problem, None, matches=lambda fn: validate(fn, **context) == problem, rung=rung)
    if _validate_moved_rng(watch, lambda: validate(ex.reference, **context)):
        return _fail(ex, GLOBAL_RNG, None, finding="global RNG", rung=rung)
    return None


def _validate_moved_rng(watch: _Watch, validate_reference: Callable[[], Any]) -> bool:
    """Whether the answer left the global random state other than the reference does (the
    validation itself may draw from it, say to build a model)."""
    after_answer = watch.rng_after()
    if _same_rng(after_answer, watch.rng):
        return False
    validate_reference()
    return not _same_rng(after_answer, watch.rng_after())


def _evaluate_function(ex: Exercise, answer: Any, context: dict[str, Any], rung: int = 0) -> Outcome:
    if not callable(answer):
        return Outcome(ex.name, "failed", f"expected a function, got {type(answer).__name__}. "
                       f"Pass the function itself, without calling it.")
    cases = ex.cases() if ex.cases else []
    for case in cases:
        failed = _run_case(ex, answer, case, rung)
        if failed is not None:
            return failed
    if ex.validate is not None:
        failed = _run_validate(ex, answer, context, rung)
        if failed is not None:
            return failed
    return Outcome(ex.name, "passed", f"all {len(cases)} cases pass" if cases else "passed")


def _evaluate_value(ex: Exercise, answer: Any, context: dict[str, Any], rung: int = 0) -> Outcome:
    if _has_ellipsis(answer):
        return Outcome(ex.name, "todo", "Replace the `...` with your answer.")
    expected = ex.reference(**context)
    problem = _compare(ex, expected, answer)
    if problem is None and ex.validate is not None:
        problem = ex.validate(answer, **context)
    if problem:
        return _fail(ex, problem, None, answer, lambda fn: fn(**context), rung=rung)
    return Outcome(ex.name, "passed", "correct")


def _evaluate(name: str, answer: Any, context: dict[str, Any], rung: int) -> Outcome:
    ex = get_exercise(name)
    try:
        if ex.kind == "function":
            return _evaluate_function(ex, answer, context, rung)
        return _evaluate_value(ex, answer, context, rung)
    except _Todo:
        return Outcome(ex.name, "todo", _TODO)
    except Exception as err:  # a bug in the context the learner passed, or in the checker
        return Outcome(ex.name, "error", f"the check could not run: {describe_exception(err)}")


def evaluate(name: str, answer: Any, **context: Any) -> Outcome:
    """Check `answer` against exercise `name` and return the Outcome, printing nothing.

    Pure: it neither records the outcome nor climbs the hint ladder, so a failure carries the first
    rung (see `check` and `hint`)."""
    return _evaluate(name, answer, context, rung=0)


def check(name: str, answer: Any, **context: Any) -> None:
    """Check a learner's answer: prints one line (✓, not done, or a diagnosis) and records it.

    Each failure of the same exercise climbs its hint ladder one rung: a nudge first, then a more
    specific hint, then the formula with shapes."""
    try:
        outcome = _evaluate(name, answer, context, rung=_SEEN.get(name, 0))
    except KeyError as err:
        outcome = Outcome(name, "error", str(err.args[0]))
    if outcome.status == "failed":
        _SEEN[name] = _SEEN.get(name, 0) + 1
    _record(outcome)
    print(outcome.line())


def hint(name: str) -> None:
    """Print the next hint of exercise `name` (for example `hint("gradcam.cam_map")`), one rung at a time."""
    ladder = get_exercise(name).ladder
    seen = _SEEN.get(name, 0)
    rung = min(seen, len(ladder) - 1)
    _SEEN[name] = seen + 1
    last = " (the last hint: the formula itself)" if rung == len(ladder) - 1 else ""
    print(f"Hint {rung + 1}/{len(ladder)} for {name}{last}: {ladder[rung]}")


def progress(topic: str) -> None:
    """Print which exercises of a topic have passed in this session."""
    for ex in exercises_of(topic):
        o = RESULTS.get(ex.name)
        mark = {"passed": "✓", "failed": "✗", "todo": "…", "error": "!"}.get(o.status, "?") if o else "·"
        print(f"{mark} {ex.name:<36} {ex.title}")
