"""`course_utils.checks`: specific feedback, and every exercise rejects its known mistakes."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from course_utils import checks
from course_utils.checks import check, diagnose, evaluate, exercises_of
from course_utils.exercises import NOTEBOOKS

TOPICS = [t for t in NOTEBOOKS.values() if importlib.util.find_spec(f"course_utils.exercises.{t}")]
ALL = [ex for topic in TOPICS for ex in exercises_of(topic)]


def test_every_notebook_topic_has_exercises():
    assert TOPICS[0] == "orientation"
    for topic in TOPICS:
        assert exercises_of(topic), topic


@pytest.mark.parametrize("ex", ALL, ids=lambda ex: ex.name)
def test_reference_passes(ex):
    if ex.kind == "value":
        pytest.skip("value exercises are checked in their notebook, against its context")
    outcome = evaluate(ex.name, ex.reference)
    assert outcome.status == "passed", outcome.line()


MISTAKES = [(ex, m) for ex in ALL for m in ex.mistakes]


@pytest.mark.parametrize("ex,m", MISTAKES, ids=[f"{ex.name}:{m.label}" for ex, m in MISTAKES])
def test_known_mistake_is_rejected_with_its_hint(ex, m):
    if ex.kind == "value":
        pytest.skip("value mistakes are tested in the topic's own tests, with a context")
    outcome = evaluate(ex.name, m.fn)
    assert outcome.status == "failed", outcome.line()
    assert outcome.mistake == m.label, outcome.line()
    assert m.hint in outcome.message


def test_function_exercises_have_enough_mistakes():
    thin = [ex.name for ex in ALL if ex.kind == "function" and len(ex.mistakes) < 2]
    assert not thin, f"exercises with fewer than two known mistakes: {thin}"


# --- the wording of a diagnosis -----------------------------------------------------------------
def test_shape_mismatch_names_both_shapes():
    msg = diagnose(torch.zeros(2, 3), torch.zeros(3, 2))
    assert "expected [2, 3], got [3, 2]" in msg and "transpose" in msg


def test_dtype_mismatch():
    msg = diagnose(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert "dtype: expected torch.float32, got torch.float64" in msg


def test_nan_is_reported_with_its_place():
    actual = torch.zeros(2, 3)
    actual[1, 2] = float("nan")
    msg = diagnose(torch.zeros(2, 3), actual)
    assert "NaN" in msg and "[1, 2]" in msg


def test_largest_error_and_where():
    actual = torch.zeros(3, 4)
    actual[2, 1] = 0.5
    actual[0, 0] = 0.1
    msg = diagnose(torch.zeros(3, 4), actual)
    assert "largest error 0.5 at [2, 1]" in msg and "2 of 12" in msg


def test_numpy_instead_of_tensor_says_how_to_fix():
    assert "torch.as_tensor" in diagnose(torch.zeros(2), torch.zeros(2).numpy())


def test_nested_containers_name_the_path():
    msg = diagnose({"a": (torch.zeros(2), torch.ones(2))}, {"a": (torch.zeros(2), torch.zeros(2))})
    assert msg.startswith("output['a'][1]")


def test_equal_things_pass():
    assert diagnose((torch.ones(2, 2), 3.0, "x"), (torch.ones(2, 2), 3.0 + 1e-9, "x")) is None


# --- what the learner sees ----------------------------------------------------------------------
def test_learner_exception_shows_their_line_not_a_traceback(capsys):
    def flatten_images(images):
        flat = images.reshape(images.shape[0], -1)
        return flat.nonexistent_method()

    check("orientation.flatten_images", flatten_images)
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    assert out.startswith("✗ orientation.flatten_images")
    assert "AttributeError" in out and "return flat.nonexistent_method()" in out
    assert "Traceback" not in out


def test_stub_is_not_done(capsys):
    def flatten_images(images):
        raise NotImplementedError("flatten_images")

    check("orientation.flatten_images", flatten_images)
    assert capsys.readouterr().out.startswith("… orientation.flatten_images: not done yet")


def test_value_given_instead_of_function(capsys):
    check("orientation.flatten_images", torch.zeros(3))
    assert "expected a function" in capsys.readouterr().out


def test_unknown_exercise_is_reported_not_raised(capsys):
    check("orientation.flaten_images", lambda x: x)
    out = capsys.readouterr().out
    assert "no exercise called 'orientation.flaten_images'" in out and "orientation.flatten_images" in out


def test_mutating_the_input_does_not_fool_the_check():
    def sneaky(images):  # edits its argument in place, then returns the right answer for the new values
        images.mul_(0)
        return images.reshape(images.shape[0], -1)

    assert evaluate("orientation.flatten_images", sneaky).status == "failed"


def test_outcomes_are_logged_for_the_grader(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("COURSE_GRADE_LOG", str(log))
    check("orientation.channel_means", lambda x: x.mean(dim=(0, 2, 3)))
    check("orientation.channel_means", lambda x: x.sum(dim=(0, 2, 3)))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["passed", "failed"]
    assert rows[1]["mistake"] == "summed instead of averaged"
    assert checks.RESULTS["orientation.channel_means"].status == "failed"
