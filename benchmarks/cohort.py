"""A synthetic cohort for timing the grader: `learners` folders of notebooks, a mix of the three kinds
of submission a grader meets.

    python -m benchmarks.cohort DIR [--learners 30] [--notebooks 01 02 03 04 05]
    time python -m course_utils.grade --cohort DIR --out GRADES --jobs 2 [--answers-only]

Learner i hands in, for every notebook: the solution (i % 3 == 0), the blank learner version
(i % 3 == 1), or a broken solution (i % 3 == 2: its last exercise answers None, and a cell that
raises sits before that exercise; the last, because later answers may call earlier ones, as 04's
erasers call the learner's `cross_covariance`). The expected totals are printed, so that a timing run
also shows the scoreboard is right: full marks, zero, and full marks minus one per notebook.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import nbformat

from course_utils.build import BEGIN
from course_utils.checks import exercises_of
from course_utils.exercises import NOTEBOOKS

ROOT = Path(__file__).resolve().parent.parent


def _notebook(folder: str, prefix: str) -> Path:
    found = sorted((ROOT / folder).glob(f"{prefix}_*.ipynb"))
    if not found:
        raise FileNotFoundError(f"no {folder}/{prefix}_*.ipynb: name notebooks by their number, like 01")
    return found[0]


def broken(prefix: str) -> nbformat.NotebookNode:
    """The solution of notebook `prefix` with its last exercise answering None and a crash before it."""
    nb = nbformat.read(_notebook("solutions", prefix), as_version=4)
    last = max(i for i, c in enumerate(nb.cells)
               if c.cell_type == "code" and BEGIN in c.source and "def " in c.source.split(BEGIN)[0])
    head = nb.cells[last].source.split(BEGIN)[0]
    nb.cells[last].source = head + "return None\n"
    nb.cells.insert(last, nbformat.v4.new_code_cell("raise RuntimeError('a bug left in on purpose')"))
    return nb


def make_cohort(folder: Path, learners: int, prefixes: list[str]) -> dict[str, int]:
    """Write the cohort under `folder` (replacing it); returns {learner: expected total}."""
    shutil.rmtree(folder, ignore_errors=True)
    expected = {}
    for i in range(learners):
        name = f"learner{i:02d}"
        (folder / name).mkdir(parents=True)
        total = 0
        for prefix in prefixes:
            points = len(exercises_of(NOTEBOOKS[prefix]))
            target = folder / name / _notebook("solutions", prefix).name
            if i % 3 == 0:
                shutil.copy(_notebook("solutions", prefix), target)
                total += points
            elif i % 3 == 1:
                shutil.copy(_notebook("notebooks", prefix), target)
            else:
                nbformat.write(broken(prefix), target)
                total += points - 1
        expected[name] = total
    return expected


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cohort", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--learners", type=int, default=30)
    ap.add_argument("--notebooks", nargs="+", default=["01", "02", "03", "04", "05"])
    args = ap.parse_args(argv)
    unknown = [p for p in args.notebooks if p not in NOTEBOOKS]
    if unknown or args.learners < 1:
        ap.error(f"--notebooks must be among {sorted(NOTEBOOKS)} and --learners at least 1 (got {unknown})")
    expected = make_cohort(args.folder, args.learners, args.notebooks)
    print(f"{len(expected)} learners x {len(args.notebooks)} notebooks in {args.folder}; expected totals:")
    print(", ".join(f"{k} {v}" for k, v in expected.items()))


if __name__ == "__main__":
    main()
