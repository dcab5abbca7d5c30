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
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
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
    """

    name: str
    title: str
    reference: Callable[..., Any]
    hint: str
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
    kind: Literal["function", "value"] = "function",
    cases: Callable[[], list[Case]] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    compare: Callable[[Any, Any], str | None] | None = None,
    validate: Callable[..., str | None] | None = None,
    points: int = 1,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register the decorated function as the reference answer of exercise `name`."""
    if kind == "function" and cases is None:
        raise ValueError(f"exercise {name!r}: a function exercise needs `cases`")

    def register(reference: Callable[..., Any]) -> Callable[..., Any]:
        previous = _REGISTRY.get(name)
        _REGISTRY[name] = Exercise(
            name=name, title=title, reference=reference, hint=hint, kind=kind, cases=cases,
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
    """What a check found. `line()` is the one line the learner sees."""

    name: str
    status: Status
    message: str = ""
    case: str | None = None
    mistake: str | None = None

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


def _call(fn: Callable[..., Any], case: Case) -> Any:
    try:
        return fn(*copy.deepcopy(case.args), **copy.deepcopy(case.kwargs))
    except NotImplementedError as err:
        raise _Todo(str(err)) from err


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
    return None


def _fail(ex: Exercise, message: str, case: str | None, actual: Any = None,
          run: Callable[[Callable[..., Any]], Any] | None = None,
          matches: Callable[[Callable[..., Any]], bool] | None = None) -> Outcome:
    """A failed Outcome; the hint is the matching known mistake's, if the answer behaves like one."""
    if matches is None and run is not None:
        matches = lambda fn: _compare(ex, run(fn), actual) is None  # noqa: E731
    m = _matching_mistake(ex, matches) if matches is not None else None
    hint = m.hint if m else ex.hint
    label = f" This looks like a known mistake: {m.label}." if m else ""
    return Outcome(ex.name, "failed", f"{message}.{label} Hint: {hint}", case=case,
                   mistake=m.label if m else None)


def _has_ellipsis(x: Any) -> bool:
    if x is Ellipsis:
        return True
    if isinstance(x, (tuple, list)):
        return any(_has_ellipsis(v) for v in x)
    if isinstance(x, dict):
        return any(_has_ellipsis(v) for v in x.values())
    return False


def _evaluate_function(ex: Exercise, answer: Any, context: dict[str, Any]) -> Outcome:
    if not callable(answer):
        return Outcome(ex.name, "failed", f"expected a function, got {type(answer).__name__}. "
                       f"Pass the function itself, without calling it.")
    cases = ex.cases() if ex.cases else []
    for case in cases:
        expected = _call(ex.reference, case)
        try:
            actual = _call(answer, case)
        except _Todo:
            return Outcome(ex.name, "todo", "Replace `raise NotImplementedError(...)` with your code.")
        except Exception as err:  # the learner's bug: show their line, not a traceback
            return _fail(ex, f"your code raised {describe_exception(err)}", case.label)
        problem = _compare(ex, expected, actual)
        if problem:
            return _fail(ex, problem, case.label, actual, lambda fn, c=case: _call(fn, c))
    validate = ex.validate
    if validate is not None:
        try:
            problem = validate(answer, **context)
        except _Todo:
            return Outcome(ex.name, "todo", "Replace `raise NotImplementedError(...)` with your code.")
        except NotImplementedError:
            return Outcome(ex.name, "todo", "Replace `raise NotImplementedError(...)` with your code.")
        except Exception as err:
            return _fail(ex, f"your code raised {describe_exception(err)}", None)
        if problem:
            return _fail(ex, problem, None, matches=lambda fn: validate(fn, **context) == problem)
    return Outcome(ex.name, "passed", f"all {len(cases)} cases pass" if cases else "passed")


def _evaluate_value(ex: Exercise, answer: Any, context: dict[str, Any]) -> Outcome:
    if _has_ellipsis(answer):
        return Outcome(ex.name, "todo", "Replace the `...` with your answer.")
    expected = ex.reference(**context)
    problem = _compare(ex, expected, answer)
    if problem is None and ex.validate is not None:
        problem = ex.validate(answer, **context)
    if problem:
        return _fail(ex, problem, None, answer, lambda fn: fn(**context))
    return Outcome(ex.name, "passed", "correct")


def evaluate(name: str, answer: Any, **context: Any) -> Outcome:
    """Check `answer` against exercise `name` and return the Outcome, printing nothing."""
    ex = get_exercise(name)
    try:
        if ex.kind == "function":
            return _evaluate_function(ex, answer, context)
        return _evaluate_value(ex, answer, context)
    except _Todo:
        return Outcome(ex.name, "todo", "Replace `raise NotImplementedError(...)` with your code.")
    except Exception as err:  # a bug in the context the learner passed, or in the checker
        return Outcome(ex.name, "error", f"the check could not run: {describe_exception(err)}")


def check(name: str, answer: Any, **context: Any) -> None:
    """Check a learner's answer: prints one line (✓, not done, or a diagnosis) and records it."""
    try:
        outcome = evaluate(name, answer, **context)
    except KeyError as err:
        outcome = Outcome(name, "error", str(err.args[0]))
    _record(outcome)
    print(outcome.line())


def progress(topic: str) -> None:
    """Print which exercises of a topic have passed in this session."""
    for ex in exercises_of(topic):
        o = RESULTS.get(ex.name)
        mark = {"passed": "✓", "failed": "✗", "todo": "…", "error": "!"}.get(o.status, "?") if o else "·"
        print(f"{mark} {ex.name:<36} {ex.title}")
