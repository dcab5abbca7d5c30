"""The grader's hidden cases (`HIDDEN_CASES` in `course_utils/exercises/<topic>.py`).

`python -m course_utils.verdict` draws them from a secret seed with `checks.generator(seed)` and runs
them, in place of an exercise's public cases, on every answer that passed the public ones. For every
builder and a few seeds: it names an exercise of its own topic, the reference passes its cases, they
really are drawn (another seed gives other cases, the same seed the same ones), and known mistakes
fail on them. Every exercise of the topics below either has a builder or is exempt, with the reason.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from course_utils import checks, verdict
from course_utils.exercises import NOTEBOOKS

SEEDS = range(5)

# Topics whose every exercise must have a hidden builder unless it is listed in EXEMPT.
COVERED_TOPICS = ("gradcam", "lens", "erasure", "toolbox")

EXEMPT = {
    # Any permutation drawn from a generator seeded with `seed` is a right answer, so there is no single
    # expected output to compare with (its public cases are empty too); its `validate` checks the
    # properties instead (class counts kept, seeded, a new tensor, not a fixed relabelling), and it
    # still runs, unchanged, in the grader's hidden pass of every other exercise.
    "gradcam.permute_labels",
}


def _topic_modules() -> dict[str, Any]:
    return {topic: importlib.import_module(f"course_utils.exercises.{topic}") for topic in NOTEBOOKS.values()}


MODULES = _topic_modules()
BUILDERS = [(topic, name, builder) for topic, module in MODULES.items()
            for name, builder in getattr(module, "HIDDEN_CASES", {}).items()]
BUILDER_IDS = [name for _, name, _ in BUILDERS]


def _cases(builder: Callable[[torch.Generator], list[checks.Case]], seed: int) -> list[checks.Case]:
    return builder(checks.generator(seed))


def _context(ex: checks.Exercise) -> dict[str, Any]:
    """What `check(name, answer, **context)` passes: nothing, for the function exercises that have hidden
    cases (the notebooks call `check("topic.name", fn)`); a value exercise would need its notebook's context."""
    assert ex.kind == "function", f"{ex.name}: hidden cases replace a FUNCTION exercise's cases"
    return {}


def _fingerprint(x: Any) -> Any:
    """A comparable summary of a case's arguments: tensors by dtype, shape and values, modules by their state."""
    if isinstance(x, torch.Tensor):
        return ("tensor", str(x.dtype), tuple(x.shape), tuple(x.detach().flatten().double().tolist()))
    if isinstance(x, nn.Module):
        return ("module", type(x).__name__, tuple((k, _fingerprint(v)) for k, v in x.state_dict().items()))
    if isinstance(x, checks.Case):
        return ("case", x.label, _fingerprint(x.args), _fingerprint(x.kwargs))
    if isinstance(x, dict):
        return ("dict", tuple((k, _fingerprint(v)) for k, v in sorted(x.items())))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_fingerprint(v) for v in x))
    return ("value", repr(x))


def test_every_exercise_of_the_covered_topics_has_hidden_cases_or_is_exempt():
    for topic in COVERED_TOPICS:
        hidden = getattr(MODULES[topic], "HIDDEN_CASES", {})
        names = {ex.name for ex in checks.exercises_of(topic)}
        missing = sorted(names - set(hidden) - EXEMPT)
        assert not missing, f"{topic}: exercises with neither hidden cases nor an EXEMPT entry: {missing}"
        both = sorted(set(hidden) & EXEMPT)
        assert not both, f"{topic}: exempt exercises that do have hidden cases (drop them from EXEMPT): {both}"
    known = {ex.name for topic in COVERED_TOPICS for ex in checks.exercises_of(topic)}
    assert EXEMPT <= known, f"EXEMPT names no exercise: {sorted(EXEMPT - known)}"


@pytest.mark.parametrize(("topic", "name", "builder"), BUILDERS, ids=BUILDER_IDS)
def test_a_builder_belongs_to_an_exercise_of_its_topic(topic, name, builder):
    assert name in {ex.name for ex in checks.exercises_of(topic)}, f"{name} is no exercise of {topic}"
    assert checks.get_exercise(name).topic == topic


@pytest.mark.parametrize(("topic", "name", "builder"), BUILDERS, ids=BUILDER_IDS)
def test_the_reference_passes_the_hidden_cases(topic, name, builder):
    ex = checks.get_exercise(name)
    for seed in SEEDS:
        cases = _cases(builder, seed)
        assert cases and all(isinstance(c, checks.Case) for c in cases), f"{name}, seed {seed}: no cases"
        assert all(c.label.startswith("hidden: ") for c in cases), [c.label for c in cases]
        outcome = verdict._evaluate(name, ex.reference, _context(ex), cases)
        assert outcome.passed, f"seed {seed}: {outcome.line()}"


@pytest.mark.parametrize(("topic", "name", "builder"), BUILDERS, ids=BUILDER_IDS)
def test_the_hidden_cases_are_drawn_from_the_seed(topic, name, builder):
    prints = [_fingerprint(_cases(builder, seed)) for seed in SEEDS]
    for seed in SEEDS:
        assert _fingerprint(_cases(builder, seed)) == prints[seed], f"{name}: seed {seed} gave other cases twice"
    for seed in SEEDS:
        other = (seed + 1) % len(prints)
        assert prints[seed] != prints[other], f"{name}: seeds {seed} and {other} gave the same cases"


@pytest.mark.parametrize(("topic", "name", "builder"), BUILDERS, ids=BUILDER_IDS)
def test_building_the_hidden_cases_leaves_the_global_rng_alone(topic, name, builder):
    before = torch.get_rng_state()
    _cases(builder, 0)
    assert torch.equal(torch.get_rng_state(), before), f"{name}: the builder drew from the global RNG"


def _rejected_by_a_hidden_case(name: str, mistake: checks.Mistake, cases: list[checks.Case]) -> bool:
    """Whether a hidden CASE fails the mistake (not only the public `validate`, whose outcome has no case)."""
    outcome = verdict._evaluate(name, mistake.fn, _context(checks.get_exercise(name)), cases)
    return not outcome.passed and (outcome.case or "").startswith("hidden: ")


@pytest.mark.parametrize(("topic", "name", "builder"), BUILDERS, ids=BUILDER_IDS)
def test_the_hidden_cases_reject_known_mistakes(topic, name, builder):
    """Every exercise's hidden cases reject at least one of its registered mistakes, on every seed."""
    ex = checks.get_exercise(name)
    assert ex.mistakes, f"{name} has no registered mistake to test its hidden cases with"
    for seed in SEEDS:
        cases = _cases(builder, seed)
        assert any(_rejected_by_a_hidden_case(name, m, cases) for m in ex.mistakes), \
            f"{name}, seed {seed}: no registered mistake fails a hidden case"


@pytest.mark.parametrize("topic", sorted({t for t, _, _ in BUILDERS}))
def test_each_topic_rejects_a_mistake_on_its_hidden_cases(topic):
    """At least one registered mistake of the topic fails the hidden cases of EVERY seed."""
    found = any(all(_rejected_by_a_hidden_case(name, m, _cases(builder, seed)) for seed in SEEDS)
                for t, name, builder in BUILDERS if t == topic for m in checks.get_exercise(name).mistakes)
    assert found, f"{topic}: no registered mistake fails the hidden cases of every seed"
