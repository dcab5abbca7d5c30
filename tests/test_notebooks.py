"""Whole notebooks: solutions get full marks, learner versions get zero (their stubs raise).

nbval runs the solutions too (`pytest --nbval-lax solutions/`, via testpaths), comparing the
printed headline numbers of every `# NBVAL_CHECK_OUTPUT` cell.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from course_utils.grade import format_table, grade_notebook

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
LEARNER = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_is_a_learner_notebook_per_solution():
    assert [p.name for p in SOLUTIONS] == [p.name for p in LEARNER]
    assert SOLUTIONS[0].name == "00_orientation.ipynb"


def _solution_gets_full_marks(self):
    report = grade_notebook(ROOT / "solutions" / self.notebook)
    assert report.passed and report.score == report.max_score > 0, format_table([report])


def _learner_notebook_gets_zero(self):
    report = grade_notebook(ROOT / "notebooks" / self.notebook)
    assert report.score == 0 and report.exercises, format_table([report])
    bad = [(e.name, e.status, e.reason) for e in report.exercises if e.status not in ("not done", "not reached")]
    assert not bad, f"a stub should read as 'not done', not crash the notebook: {bad}"


# One class per notebook, so that `--dist loadscope` spreads notebooks over the xdist workers.
for _path in SOLUTIONS:
    _name = "TestNotebook_" + _path.stem
    globals()[_name] = pytest.mark.slow(type(_name, (), {
        "notebook": _path.name,
        "test_solution_gets_full_marks": _solution_gets_full_marks,
        "test_learner_notebook_gets_zero": _learner_notebook_gets_zero,
    }))


def test_orientation_cli_exit_codes():
    learner = subprocess.run([sys.executable, "-m", "course_utils.grade", "notebooks/00_orientation.ipynb"],
                             cwd=ROOT, capture_output=True, text=True)
    assert learner.returncode == 1 and learner.stdout.count("not done") == 5, learner.stdout
    solution = subprocess.run([sys.executable, "-m", "course_utils.grade", "solutions/00_orientation.ipynb"],
                              cwd=ROOT, capture_output=True, text=True)
    assert solution.returncode == 0 and "TOTAL 5/5" in solution.stdout, solution.stdout
