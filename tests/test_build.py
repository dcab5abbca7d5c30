"""`python -m course_utils.build`: learner notebooks are generated from the solutions, and checked."""
from __future__ import annotations

import shutil
import subprocess
import sys

import nbformat
import pytest

from course_utils.build import BuildError, learner_version, out_of_date, strip_code, strip_markdown


def test_function_body_becomes_raise_with_the_function_name():
    src = "def f(x):\n    y = 1\n    ### BEGIN SOLUTION\n    return x + y\n    ### END SOLUTION\n"
    assert strip_code(src) == 'def f(x):\n    y = 1\n    raise NotImplementedError("f")  # your code here'


def test_nested_block_uses_the_innermost_function():
    src = ("def outer():\n    def inner(a):\n        ### BEGIN SOLUTION\n        return a\n"
           "        ### END SOLUTION\n    return inner\n")
    assert 'raise NotImplementedError("inner")' in strip_code(src)
    assert "return inner" in strip_code(src)


def test_top_level_value_becomes_ellipsis_per_name():
    src = "### BEGIN SOLUTION\nmass_cat, mass_dog = 0.7, 0.2\nrank: int = 3\n### END SOLUTION\ncheck('x', rank)"
    assert strip_code(src) == ("mass_cat = ...  # your code here\nmass_dog = ...  # your code here\n"
                               "rank = ...  # your code here\ncheck('x', rank)")


def test_hidden_tests_and_nbval_markers_are_dropped():
    src = "# NBVAL_CHECK_OUTPUT\nx = 1\n### BEGIN HIDDEN TESTS\nassert x == 1\n### END HIDDEN TESTS\nprint(x)"
    assert strip_code(src) == "x = 1\nprint(x)"


@pytest.mark.parametrize("src", [
    "### BEGIN SOLUTION\nx = 1\n",
    "x = 1\n### END SOLUTION\n",
    "### BEGIN SOLUTION\n### BEGIN HIDDEN TESTS\n### END HIDDEN TESTS\n### END SOLUTION\n",
])
def test_unpaired_markers_are_an_error_naming_the_line(src):
    with pytest.raises(BuildError, match="line"):
        strip_code(src, "nb, cell 3")


def test_markdown_answers_are_replaced():
    md = "Discuss.\n<!-- BEGIN SOLUTION -->\nBecause gradients.\n<!-- END SOLUTION -->\nNext."
    assert strip_markdown(md) == "Discuss.\n*Your answer here.*\nNext."


def test_learner_version_clears_outputs_and_keeps_the_solution_untouched():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("def f():\n    ### BEGIN SOLUTION\n    return 1\n    ### END SOLUTION")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    cell.execution_count = 3
    nb.cells.append(cell)
    out = learner_version(nb, "99_x.ipynb")
    assert out.cells[0].outputs == [] and out.cells[0].execution_count is None
    assert "NotImplementedError" in out.cells[0].source
    assert "return 1" in nb.cells[0].source and nb.cells[0].outputs


def test_repo_notebooks_are_up_to_date(root):
    result = subprocess.run([sys.executable, "-m", "course_utils.build", "--check"], cwd=root,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_names_every_stale_notebook(root, tmp_path):
    for sub in ("solutions", "notebooks"):
        shutil.copytree(root / sub, tmp_path / sub)
    sols = sorted((tmp_path / "solutions").glob("*.ipynb"))
    assert sols, "no solution notebooks"
    nb = nbformat.read(sols[0], as_version=4)
    nb.cells.append(nbformat.v4.new_markdown_cell("a new cell"))
    nbformat.write(nb, sols[0])
    (tmp_path / "notebooks" / "77_orphan.ipynb").write_text("{}")
    result = subprocess.run([sys.executable, "-m", "course_utils.build", "--check", "--root", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert sols[0].name in result.stdout and "77_orphan.ipynb" in result.stdout
    assert set(out_of_date(tmp_path)) == {sols[0].name, "77_orphan.ipynb (no solution)"}
    # building fixes it, and a second build changes nothing
    subprocess.run([sys.executable, "-m", "course_utils.build", "--root", str(tmp_path)], check=True,
                   capture_output=True)
    assert out_of_date(tmp_path) == ["77_orphan.ipynb (no solution)"]


def test_every_solution_exercise_becomes_a_stub(root):
    for sol in sorted((root / "solutions").glob("*.ipynb")):
        learner = nbformat.read(root / "notebooks" / sol.name, as_version=4)
        text = "\n".join(c.source for c in learner.cells)
        assert "### BEGIN SOLUTION" not in text and "### BEGIN HIDDEN TESTS" not in text, sol.name
        assert "NBVAL_" not in text, sol.name
        assert all(not c.get("outputs") for c in learner.cells if c.cell_type == "code"), sol.name
