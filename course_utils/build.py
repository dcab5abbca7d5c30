"""Single source: write the learner notebooks in `notebooks/` from the solutions in `solutions/`.

    python -m course_utils.build            # regenerate notebooks/
    python -m course_utils.build --check    # exit 1 and name every notebook that is out of date

In a solution's code cell:
- `### BEGIN SOLUTION` … `### END SOLUTION` becomes a stub. Inside a function (an indented
  block) the stub is `raise NotImplementedError("<function name>")`. At the top level, where the
  exercise is a value, every assigned name becomes `name = ...`.
- `### BEGIN HIDDEN TESTS` … `### END HIDDEN TESTS` is dropped.
- `# NBVAL_...` marker lines are dropped (they are for the test suite, not the learner).
In a markdown cell, `<!-- BEGIN SOLUTION -->` … `<!-- END SOLUTION -->` becomes
"*Your answer here.*". Every output and execution count is cleared.
Before the first code cell goes the Colab set-up cell (`course_utils.colab`): on Colab it installs the
course and fetches its data, elsewhere it does nothing.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path
from typing import Any, cast

import nbformat

from course_utils import colab

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
MD_BEGIN, MD_END = "<!-- BEGIN SOLUTION -->", "<!-- END SOLUTION -->"
NBVAL_LINE = re.compile(r"^\s*#\s*NBVAL_\w+\s*$")
DEF_LINE = re.compile(r"^(\s*)(?:async\s+)?def\s+(\w+)")


class BuildError(ValueError):
    """A solution notebook whose markers do not pair up; the message names the cell and line."""


def _stub(block: list[str], indent: str, preceding: list[str]) -> list[str]:
    if indent:
        name = "exercise"
        for line in reversed(preceding):
            m = DEF_LINE.match(line)
            if m and len(m.group(1)) < len(indent):
                name = m.group(2)
                break
        return [f'{indent}raise NotImplementedError("{name}")  # your code here']
    names: list[str] = []
    try:
        tree = ast.parse("\n".join(line[len(indent):] for line in block))
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else [])
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name) and n.id not in names:
                        names.append(n.id)
    except SyntaxError:
        pass
    if not names:
        return ['raise NotImplementedError("exercise")  # your code here']
    return [f"{n} = ...  # your code here" for n in names]


def strip_code(source: str, where: str = "cell") -> str:
    """The learner version of one code cell's source."""
    out: list[str] = []
    lines = source.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(BEGIN_HIDDEN):
            j = _find_end(lines, i, END_HIDDEN, where)
            i = j + 1
            continue
        if stripped.startswith(BEGIN):
            j = _find_end(lines, i, END, where)
            indent = line[: len(line) - len(line.lstrip())]
            out.extend(_stub(lines[i + 1 : j], indent, lines[:i]))
            i = j + 1
            continue
        if stripped.startswith(END) or stripped.startswith(END_HIDDEN):
            raise BuildError(f"{where}, line {i + 1}: {stripped!r} without a matching BEGIN")
        if not NBVAL_LINE.match(line):
            out.append(line)
        i += 1
    return "\n".join(out).strip("\n")


def _find_end(lines: list[str], start: int, end: str, where: str) -> int:
    for j in range(start + 1, len(lines)):
        s = lines[j].strip()
        if s.startswith(end):
            return j
        if s.startswith("### BEGIN"):
            break
    raise BuildError(f"{where}, line {start + 1}: {lines[start].strip()!r} has no matching {end!r}")


def strip_markdown(source: str) -> str:
    pattern = re.compile(re.escape(MD_BEGIN) + r".*?" + re.escape(MD_END), re.S)
    return pattern.sub("*Your answer here.*", source)


def _node(d: dict[str, Any]) -> nbformat.NotebookNode:
    """`d` (and every dict in it) as a NotebookNode. nbformat is untyped: `from_dict` of a dict is a NotebookNode."""
    return cast(nbformat.NotebookNode, nbformat.from_dict(d))


def learner_version(solution: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """The learner notebook generated from a solution notebook (a new object)."""
    nb = _node(solution)
    nb = nbformat.v4.upgrade(nb) if nb.nbformat < 4 else nb
    cells = []
    for k, cell in enumerate(nb.cells):
        cell = _node(dict(cell))
        where = f"{name}, cell {k}"
        if cell.cell_type == "code":
            cell.source = strip_code(cell.source, where)
            cell.outputs = []
            cell.execution_count = None
        elif cell.cell_type == "markdown":
            cell.source = strip_markdown(cell.source)
        cell.pop("id", None)
        cell.metadata = {key: v for key, v in cell.metadata.items() if key in ("tags", "editable", "deletable")}
        cells.append(cell)
    nb.cells = cells
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"},
                   "course": {"generated_from": f"solutions/{name}",
                              "do_not_edit": "edit solutions/ then run python -m course_utils.build"}}
    nb.nbformat, nb.nbformat_minor = 4, 4
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    # nbformat is untyped: pyright takes `version`'s type from its sentinel default, but an int is what it wants
    text = nbformat.writes(nb, version=4)  # pyright: ignore[reportArgumentType]
    return text if text.endswith("\n") else text + "\n"


def with_setup_cell(nb: nbformat.NotebookNode, source: str) -> nbformat.NotebookNode:
    """`nb` with a code cell `source` (the Colab set-up cell) before its first code cell."""
    first = next((k for k, cell in enumerate(nb.cells) if cell.cell_type == "code"), len(nb.cells))
    cell = nbformat.v4.new_code_cell(source)
    cell.pop("id", None)
    nb.cells.insert(first, cell)
    return nb


def plan(root: Path = ROOT) -> dict[Path, str]:
    """Every learner notebook path and the text it should have (with the Colab set-up cell)."""
    wanted: dict[Path, str] = {}
    setup = colab.setup_cell_source(root)
    for sol in sorted((root / "solutions").glob("*.ipynb")):
        nb = nbformat.read(sol, as_version=4)
        wanted[root / "notebooks" / sol.name] = render(with_setup_cell(learner_version(nb, sol.name), setup))
    return wanted


def out_of_date(root: Path = ROOT) -> list[str]:
    """Names of learner notebooks that are missing, stale, or have no solution."""
    wanted = plan(root)
    stale = [p.name for p, text in wanted.items() if not p.exists() or p.read_text(encoding="utf-8") != text]
    extra = [p.name + " (no solution)" for p in sorted((root / "notebooks").glob("*.ipynb")) if p not in wanted]
    return stale + extra


def build(root: Path = ROOT) -> list[Path]:
    """Write `notebooks/` from `solutions/`; returns the files it changed."""
    changed = []
    (root / "notebooks").mkdir(exist_ok=True)
    for path, text in plan(root).items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed.append(path)
    return changed


def _keep_output(out: Any) -> bool:
    if out.get("output_type") == "stream":
        return out.get("name") == "stdout"
    if out.get("output_type") in ("execute_result", "display_data"):
        return "text/plain" in out.get("data", {}) and not any(k.startswith("image/") or "widget" in k
                                                                  for k in out.get("data", {}))
    return out.get("output_type") == "error"


def execute_solutions(paths: list[Path], *, timeout: int = 1200) -> None:
    """Run solution notebooks in the ci tier and store their text outputs (what nbval compares).

    Images, widgets and stderr (progress bars) are dropped, so that the stored solutions stay small
    and stable. Run this after editing a solution whose `# NBVAL_CHECK_OUTPUT` numbers changed.
    """
    import os

    from nbclient import NotebookClient

    from course_utils.config import env_vars

    os.environ.update(env_vars(mode="ci"))  # the kernels inherit it
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs = [o for o in cell.outputs if _keep_output(o)]
                for o in cell.outputs:
                    if o.get("output_type") in ("execute_result", "display_data"):
                        o["data"] = {"text/plain": o["data"]["text/plain"]}
                        o["metadata"] = {}
                cell.metadata.pop("execution", None)
        for cell in nb.cells:
            cell.pop("id", None)
        nb.nbformat_minor = 4
        nbformat.write(nb, path)
        print(f"executed {path.name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m course_utils.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if notebooks/ is out of date")
    ap.add_argument("--root", type=Path, default=ROOT, help="the course checkout (default: this one)")
    ap.add_argument("--execute", nargs="*", type=Path, metavar="SOLUTION",
                    help="first run these solution notebooks in fast mode and store their outputs "
                         "(no names: every solution)")
    args = ap.parse_args(argv)
    if args.execute is not None and not args.check:
        execute_solutions(args.execute or sorted((args.root / "solutions").glob("*.ipynb")))
    try:
        if args.check:
            stale = out_of_date(args.root)
            if stale:
                print("notebooks/ is out of date with solutions/; run `python -m course_utils.build`:")
                for name in stale:
                    print(f"  notebooks/{name}")
                return 1
            print("notebooks/ is up to date.")
            return 0
        changed = build(args.root)
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for p in changed:
        print(f"wrote {p.relative_to(args.root)}")
    print(f"{len(changed)} notebook(s) written." if changed else "notebooks/ already up to date.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
