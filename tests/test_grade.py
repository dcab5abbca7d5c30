"""The grader: every failure a learner's notebook can have still gets graded, exercise by exercise.

The fixture notebooks are made from the orientation solution, one breakage each, so they can never
drift from the real course.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest

from course_utils.grade import grade_notebook

EX = ["orientation.flatten_images", "orientation.channel_means", "orientation.image_grid",
      "orientation.attention_scores", "orientation.capture_activations"]


def _solution(root: Path) -> nbformat.NotebookNode:
    return nbformat.read(root / "solutions" / "00_orientation.ipynb", as_version=4)


def _def_cell(nb, fn: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and f"def {fn}(" in c.source)


def _check_cell(nb, name: str) -> int:
    return next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and f'check("{name}"' in c.source)


def _with_body(nb, fn: str, body: str):
    i = _def_cell(nb, fn)
    head = nb.cells[i].source.split("### BEGIN SOLUTION")[0]
    nb.cells[i].source = head + body
    return nb


def make_fixtures(root: Path, folder: Path) -> dict[str, Path]:
    """Write one broken notebook per failure mode; returns {label: path}."""
    out: dict[str, Path] = {}

    def save(label: str, nb) -> None:
        path = folder / label / "00_orientation.ipynb"
        path.parent.mkdir(parents=True)
        nbformat.write(nb, path)
        out[label] = path

    path = folder / "invalid_json" / "00_orientation.ipynb"
    path.parent.mkdir(parents=True)
    path.write_text('{"cells": [ {"cell_type": "code", "source": "x = 1"', encoding="utf-8")
    out["invalid_json"] = path

    save("syntax_error", _with_body(_solution(root), "flatten_images",
                                    "return rearrange(images, 'b c h w -> b (c h w)'\n"))
    save("raises", _with_body(_solution(root), "channel_means", "return images.mean() / 0 + images.foo\n"))
    save("wrong", _with_body(_solution(root), "channel_means", "return reduce(images, 'b c h w -> c', 'sum')\n"))
    save("endless_loop", _with_body(_solution(root), "image_grid", "while True:\n        pass\n"))
    nb = _solution(root)
    nb.cells[_def_cell(nb, "attention_scores")].source += "\nimport os\nos._exit(3)\n"
    save("kernel_dies", nb)
    nb = _solution(root)
    nb.cells.insert(_def_cell(nb, "flatten_images"), nbformat.v4.new_code_cell(
        "for _ in range(50):\n    print('spam ' * 40_000)"))
    save("megabytes", nb)
    nb = _solution(root)
    del nb.cells[_check_cell(nb, "orientation.capture_activations")]
    save("missing_exercise", nb)
    nb = _solution(root)
    nb.cells.insert(_def_cell(nb, "image_grid"), nbformat.v4.new_code_cell("import time\ntime.sleep(300)"))
    save("too_slow", nb)
    return out


@pytest.fixture(scope="module")
def graded(root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fixtures")
    paths = make_fixtures(root, folder)
    digests = {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in paths.items()}
    reports = {}
    for label, path in paths.items():
        timeout = 60 if label == "too_slow" else 600
        reports[label] = grade_notebook(path, timeout=timeout, cell_timeout=40 if label == "endless_loop" else 100)
    return paths, digests, reports


def _status(report) -> dict[str, tuple[str, str]]:
    return {e.name: (e.status, e.reason) for e in report.exercises}


def test_originals_are_never_touched(graded):
    paths, digests, _ = graded
    for label, path in paths.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digests[label], label


def test_every_fixture_lists_every_exercise(graded):
    _, _, reports = graded
    for label, report in reports.items():
        assert [e.name for e in report.exercises] == EX, label
        assert all(e.reason for e in report.exercises if e.status != "passed"), label


def test_invalid_json(graded):
    r = graded[2]["invalid_json"]
    assert r.score == 0 and {s for s, _ in _status(r).values()} == {"error"}
    assert "not valid JSON" in r.exercises[0].reason and "line 1" in r.exercises[0].reason


def test_syntax_error_fails_only_that_exercise(graded):
    s = _status(graded[2]["syntax_error"])
    assert s[EX[0]][0] == "error" and "SyntaxError" in s[EX[0]][1] and "NameError" in s[EX[0]][1]
    assert all(s[n][0] == "passed" for n in EX[1:])


def test_exception_in_learner_code_shows_their_line(graded):
    s = _status(graded[2]["raises"])
    assert s[EX[1]][0] == "failed" and "your line" in s[EX[1]][1] and "ZeroDivisionError" not in s[EX[0]][1]
    assert s[EX[0]][0] == "passed" and s[EX[4]][0] == "passed"


def test_wrong_answer_gets_the_mistake_hint(graded):
    s = _status(graded[2]["wrong"])
    assert s[EX[1]][0] == "failed" and "summed instead of averaged" in s[EX[1]][1]
    assert graded[2]["wrong"].score == 4


def test_endless_loop_times_out_and_the_rest_is_graded(graded):
    s = _status(graded[2]["endless_loop"])
    assert s[EX[2]][0] == "failed" and "ran for more than" in s[EX[2]][1]  # the check's own time limit
    assert s[EX[0]][0] == s[EX[1]][0] == s[EX[3]][0] == s[EX[4]][0] == "passed"


def test_dead_kernel(graded):
    r = graded[2]["kernel_dies"]
    s = _status(r)
    assert [s[n][0] for n in EX[:3]] == ["passed"] * 3
    assert s[EX[3]][0] in ("not reached", "error") and "kernel died" in s[EX[3]][1]
    assert s[EX[4]][0] == "not reached" and "kernel died" in r.problem


def test_megabytes_of_output_are_cut_not_fatal(graded):
    r = graded[2]["megabytes"]
    assert r.score == 5 and "MB" in (r.problem or "")


def test_deleted_exercise_is_missing(graded):
    s = _status(graded[2]["missing_exercise"])
    assert s[EX[4]][0] == "missing" and "deleted" in s[EX[4]][1]
    assert graded[2]["missing_exercise"].score == 4


def test_notebook_time_limit(graded):
    r = graded[2]["too_slow"]
    s = _status(r)
    assert s[EX[0]][0] == s[EX[1]][0] == "passed"
    assert s[EX[4]][0] in ("not reached", "timeout") and "time limit" in (r.problem or "")
    assert r.seconds < 200


def test_cli_reports_and_exit_codes(root, tmp_path, graded):
    paths = graded[0]
    js, xml = tmp_path / "r.json", tmp_path / "r.xml"
    bad = subprocess.run([sys.executable, "-m", "course_utils.grade", "--json", str(js), "--junit", str(xml),
                          str(paths["invalid_json"])], capture_output=True, text=True)
    assert bad.returncode == 1, bad.stderr
    assert "0/5" in bad.stdout and "not valid JSON" in bad.stdout
    report = json.loads(js.read_text())
    assert report["score"] == 0 and report["max_score"] == 5 and not report["passed"]
    assert len(report["notebooks"][0]["exercises"]) == 5
    suite = ET.parse(xml).getroot().find("testsuite")
    assert suite.get("tests") == "5" and suite.get("errors") == "5"

    usage = subprocess.run([sys.executable, "-m", "course_utils.grade", str(tmp_path / "nope.ipynb")],
                           capture_output=True, text=True)
    assert usage.returncode == 2 and "no such notebook" in usage.stderr


def test_unknown_notebook_name_is_explained(tmp_path):
    path = tmp_path / "homework.ipynb"
    nbformat.write(nbformat.v4.new_notebook(), path)
    r = grade_notebook(path)
    assert not r.passed and "01_gradcam.ipynb" in r.problem


def test_cohort_scoreboard(root, tmp_path, graded):
    """A folder mixing complete, partial and broken submissions gives a correct scoreboard."""
    import csv

    paths = graded[0]
    cohort = tmp_path / "cohort"
    for learner, source in {"ada": root / "solutions" / "00_orientation.ipynb", "bob": paths["wrong"],
                            "cyd": paths["invalid_json"], "dan": root / "notebooks" / "00_orientation.ipynb"}.items():
        (cohort / learner).mkdir(parents=True)
        shutil.copy(source, cohort / learner / "00_orientation.ipynb")
    out = tmp_path / "grades"
    run = subprocess.run([sys.executable, "-m", "course_utils.grade", "--cohort", str(cohort), "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr  # not everyone passed
    rows = list(csv.DictReader((out / "scoreboard.csv").open()))
    totals = {r["learner"]: r["total"] for r in rows}
    assert totals == {"ada": "5", "bob": "4", "cyd": "0", "dan": "0"}
    bob = next(r for r in rows if r["learner"] == "bob")
    assert bob["orientation.channel_means"] == "0" and bob["orientation.flatten_images"] == "1"
    assert (out / "scoreboard.md").read_text().count("\n") == 2 + 4
    assert json.loads((out / "cyd.json").read_text())["notebooks"][0]["exercises"][0]["status"] == "error"


def test_answers_only_cohort_checks_the_code_without_running_it(root, tmp_path):
    """--answers-only: the same signed verdicts from the cells' code, no notebook run: a cell that
    would stop the run changes nothing, a forged `check` still scores nothing, every report says so."""
    import csv

    crash = _solution(root)
    crash.cells.insert(_def_cell(crash, "flatten_images"), nbformat.v4.new_code_cell("1 / 0"))
    forged = _with_body(_solution(root), "channel_means", "return reduce(images, 'b c h w -> c', 'sum')\n")
    forged.cells.append(nbformat.v4.new_code_cell("def check(*args, **kwargs):\n    print('passed')\n"
                                                  "check('orientation.channel_means', channel_means)"))
    cohort = tmp_path / "cohort"
    for learner, nb in {"ada": _solution(root), "bob": forged, "cyd": crash,
                        "dan": nbformat.read(root / "notebooks" / "00_orientation.ipynb", as_version=4)}.items():
        (cohort / learner).mkdir(parents=True)
        nbformat.write(nb, cohort / learner / "00_orientation.ipynb")
    out = tmp_path / "grades"
    run = subprocess.run([sys.executable, "-m", "course_utils.grade", "--cohort", str(cohort), "--out", str(out),
                          "--answers-only", "--jobs", "2"], capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    totals = {r["learner"]: r["total"] for r in csv.DictReader((out / "scoreboard.csv").open())}
    assert totals == {"ada": "5", "bob": "4", "cyd": "5", "dan": "0"}
    for learner in totals:
        notebook = json.loads((out / f"{learner}.json").read_text())["notebooks"][0]
        assert notebook["notebook_run"] is False and notebook["problem"].startswith("not run (--answers-only)")
    bob = json.loads((out / "bob.json").read_text())["notebooks"][0]["exercises"]
    assert next(e for e in bob if e["name"] == "orientation.channel_means")["status"] == "failed"


def test_every_cached_recipe_is_precomputed_for_its_topic():
    """The grader fills the result cache before any sandbox runs (a sandbox cannot write it): a recipe
    module missing from `grade.RECIPES` would make its notebook retrain on every graded run."""
    from course_utils import cache
    from course_utils.exercises import NOTEBOOKS
    from course_utils.grade import RECIPES

    assert set(RECIPES.values()) == set(cache.RECIPE_MODULES)
    assert set(RECIPES) <= set(NOTEBOOKS.values())
