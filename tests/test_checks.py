"""`course_utils.checks`: specific feedback, and every exercise rejects its known mistakes."""
from __future__ import annotations

import importlib.util
import json
import re

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


# --- the harness sees more than the output ------------------------------------------------------
def test_in_place_change_is_named():
    def centred(images):
        images -= images.mean()
        return images.reshape(images.shape[0], -1)

    outcome = evaluate("orientation.flatten_images", centred)
    assert outcome.status == "failed" and outcome.finding == "in place"
    assert "changed its input `images` in place" in outcome.message


def test_in_place_change_of_a_right_answer_is_rejected():
    def delete(x, saliency, k, baseline):  # returns the right values, through the caller's tensor
        b, c, h, w = x.shape
        mask = torch.zeros(b, h * w, dtype=torch.bool)
        if k:
            mask.scatter_(1, saliency.flatten(1).topk(k, dim=1).indices, True)
        x[mask.reshape(b, 1, h, w).expand(b, c, h, w)] = baseline
        return x

    outcome = evaluate("gradcam.delete_most_salient", delete)
    assert outcome.status == "failed" and "changed its input `x` in place" in outcome.message


def test_endless_loop_is_stopped(monkeypatch):
    monkeypatch.setattr(checks, "CALL_LIMIT_S", 0.5)
    monkeypatch.setattr(checks, "CALL_LIMIT_FACTOR", 1.0)

    def flatten_images(images):
        while True:
            pass

    outcome = evaluate("orientation.flatten_images", flatten_images)
    assert outcome.status == "failed" and outcome.finding == "time limit"
    assert "ran for more than 1 s" in outcome.message


def test_time_limit_outside_the_main_thread():
    import threading
    import time

    caught = {}

    def worker():
        try:
            checks.run_with_time_limit(lambda: time.sleep(5), 0.2)
        except BaseException as err:  # the harness's _Timeout is a BaseException
            caught["err"] = type(err).__name__
        caught["value"] = checks.run_with_time_limit(lambda: 42, 1.0)

    t = threading.Thread(target=worker)
    t.start()
    t.join(3)
    assert caught == {"err": "_Timeout", "value": 42}


def test_time_limit_restores_an_outer_timer():
    import signal

    if not hasattr(signal, "setitimer"):
        pytest.skip("no setitimer on this platform")
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    old = signal.getsignal(signal.SIGALRM)
    try:
        assert checks.run_with_time_limit(lambda: 7, 1.0) == 7
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 90 < left <= 100 and signal.getsignal(signal.SIGALRM) is old
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_attached_output_is_rejected_where_the_spec_says_detached():
    def capture(model, layer_names, x):
        modules, out = dict(model.named_modules()), {}
        handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o)) for n in layer_names]
        model(x)
        for h in handles:
            h.remove()
        return out

    outcome = evaluate("orientation.capture_activations", capture)
    assert outcome.status == "failed" and outcome.finding == "attached" and ".detach()" in outcome.message


def test_global_random_state_is_checked_and_restored():
    def permute(labels, seed):
        torch.manual_seed(seed)
        return labels[torch.randperm(len(labels))]

    before = torch.random.get_rng_state()
    outcome = evaluate("gradcam.permute_labels", permute)
    assert outcome.status == "failed" and outcome.finding == "global RNG"
    assert torch.equal(torch.random.get_rng_state(), before)


def test_ties_in_the_saliency_cannot_delete_more_than_k():
    ex = checks.get_exercise("gradcam.delete_most_salient")
    threshold = next(m for m in ex.mistakes if m.label.startswith("a threshold"))
    outcome = evaluate(ex.name, threshold.fn)
    assert outcome.status == "failed" and "tied" in outcome.message and outcome.mistake == threshold.label


def test_a_scaled_answer_is_named_as_such():
    outcome = evaluate("moments.psnr", lambda x, y: 3 * 10 * torch.log10(1 / ((x - y) ** 2).flatten(1).mean(1)))
    assert outcome.status == "failed" and "3 times the expected" in outcome.message


def test_a_mistake_is_recognised_within_tolerance():
    # the registered "summed instead of averaged", off by a little float noise
    outcome = evaluate("orientation.channel_means", lambda x: x.sum(dim=(0, 2, 3)) * (1 + 3e-4))
    assert outcome.mistake == "summed instead of averaged"


# --- hints that teach: a ladder -----------------------------------------------------------------
FUNCTIONS = [ex for ex in ALL if ex.kind == "function"]


@pytest.mark.parametrize("ex", ALL, ids=lambda ex: ex.name)
def test_every_exercise_has_a_three_rung_ladder_and_five_mistakes(ex):
    assert len(ex.ladder) == 3 and len(set(ex.ladder)) == 3, ex.name
    assert len(ex.mistakes) >= 5, ex.name
    assert len({m.hint for m in ex.mistakes}) == len(ex.mistakes), "each mistake has its own hint"


# What solution code looks like in a hint: a method call (`x.mean(`), a library call (`torch.`, `F.`,
# `einsum(`, `rearrange(`), a keyword argument (`(dim=`), slicing (`[:, `), `@`, `**`, `return x`, `def`.
CODE = re.compile(r"\w\.\w+\(|\b(torch|F|np|einops)\.|\b(einsum|rearrange|reduce|topk|gather|scatter_?)\(|"
                  r"\(\w+=|\[:, |\s@\s|\*\*|\breturn \w+[\[(.;]|\bdef\b|\blambda\b")


def test_code_pattern_recognises_code():
    assert all(CODE.search(s) for s in ["gradients.mean(dim=(2, 3))", "torch.topk(scores, k)", "xc.T @ zc",
                                        "einsum('bk,bkhw->bhw', w, a)", "maps[:, y0:y1]", "return None;"])
    assert not CODE.search("α[b, k] = (1 / (h·w)) Σ_{y, x} dA[b, k, y, x]: [B, K, h, w] -> [B, K].")


@pytest.mark.parametrize("ex", ALL, ids=lambda ex: ex.name)
def test_no_rung_of_the_ladder_is_solution_code(ex):
    """The ladder ends with the formula and the shapes, never the code that solves the exercise."""
    for rung, text in enumerate(ex.ladder):
        found = CODE.search(text)
        assert not found, f"rung {rung + 1} of {ex.name} reads like code: {found[0]!r} in {text}"


def _boom(*args, **kwargs):
    raise ValueError("wrong")


@pytest.mark.parametrize("ex", FUNCTIONS, ids=lambda ex: ex.name)
def test_no_first_failure_gives_the_recipe_away(ex):
    """Operationally: the ladder's last rung (the formula) appears in no first-failure message,
    whatever the wrong answer: each registered mistake, or code that raises."""
    recipe = ex.ladder[-1]
    for answer in [m.fn for m in ex.mistakes] + [_boom]:
        outcome = evaluate(ex.name, answer)
        assert outcome.status == "failed"
        assert recipe not in outcome.message, outcome.line()
        assert outcome.message == f"{outcome.diagnosis} Hint: {outcome.hint}"
    assert all(recipe not in m.hint for m in ex.mistakes)


def test_the_ladder_climbs_with_each_failure_and_on_demand(capsys, monkeypatch):
    monkeypatch.setattr(checks, "_SEEN", {})
    ex = checks.get_exercise("gradcam.box_mass")
    for rung in range(3):
        check(ex.name, _boom)
        assert ex.ladder[rung] in capsys.readouterr().out
    check(ex.name, _boom)  # stays on the last rung
    assert ex.ladder[-1] in capsys.readouterr().out

    monkeypatch.setattr(checks, "_SEEN", {})
    for rung in range(3):
        checks.hint(ex.name)
        out = capsys.readouterr().out
        assert ex.ladder[rung] in out and f"Hint {rung + 1}/3" in out
    check(ex.name, _boom)  # a failure after three hints shows the formula
    assert ex.ladder[-1] in capsys.readouterr().out


def test_a_known_mistake_keeps_its_hint_and_later_failures_add_the_ladder(capsys, monkeypatch):
    monkeypatch.setattr(checks, "_SEEN", {})
    ex = checks.get_exercise("orientation.channel_means")
    summed = next(m for m in ex.mistakes if m.label == "summed instead of averaged")
    check(ex.name, summed.fn)
    first = capsys.readouterr().out
    assert summed.hint in first and ex.ladder[1] not in first and ex.ladder[2] not in first
    check(ex.name, summed.fn)
    second = capsys.readouterr().out
    assert summed.hint in second and ex.ladder[1] in second


def test_evaluate_is_pure_the_grader_sees_the_first_rung(monkeypatch):
    monkeypatch.setattr(checks, "_SEEN", {})
    for _ in range(3):
        outcome = evaluate("gradcam.box_mass", _boom)
    assert checks._SEEN == {}
    assert outcome.hint == checks.get_exercise("gradcam.box_mass").ladder[0]
    assert outcome.diagnosis.startswith("your code raised ValueError") and "Hint" not in outcome.diagnosis


def test_hint_is_importable_like_check():
    from course_utils.checks import hint as h

    assert callable(h) and h is checks.hint
