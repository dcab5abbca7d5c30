"""Take a learner's answers out of a notebook's source, with `ast`, never by running the notebook.

The grader never trusts what a notebook's kernel says: it reads each exercise's answer from the
cells and checks it itself, in a fresh process. For `check("topic.name", fn)` the answer is the
function `fn` as the cells define it just before that check: the last top-level statement that
binds `fn`, plus, recursively, every statement that binds a global name it uses (imports, other
functions, classes, constants), in notebook order. That is a small Python module, `Answer.source`,
that the grader runs alone.

The same reading says when an answer is not the learner's own: an import of a reference answer
from `course_utils.exercises`, a reach into the check registry (`get_exercise`, `.reference`), or
into the interpreter's machinery (frames, `gc`, `sys.modules`, `__import__`, tracing hooks) that
only code wanting to forge a verdict needs. Such an answer is never run.

Values (`kind="value"` exercises, and any context a check is given) cross from the notebook's
kernel to the grader as data only: `dump_values` / `load_values` write and read a safetensors file
of the tensors and a JSON file of everything else. Never pickle.
"""
from __future__ import annotations

import ast
import builtins
import json
import re
import symtable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from course_utils.config import VARIABLES

USES_REFERENCE = "uses the course's reference answer"
REACHES_GRADER = "reaches into the grader's machinery"

# Names in an answer that only code reaching for the references or the grader needs.
_REFERENCE_NAMES = frozenset({"get_exercise", "exercises_of", "_REGISTRY", "reference", "mistakes", "RESULTS",
                              "_record", "evaluate", "course_utils.exercises", "course_utils.checks",
                              "course_utils.grade", "course_utils.answers", "course_utils.sandbox"})
_GRADER_NAMES = frozenset({
    "_getframe", "f_back", "f_locals", "f_globals", "f_code", "gi_frame", "tb_frame", "cr_frame", "gc", "inspect",
    "importlib", "__import__", "sys.modules", "__builtins__", "builtins", "eval", "exec", "compile", "globals", "vars",
    "__dict__", "__code__", "__globals__", "__closure__", "__subclasses__", "__class__", "__bases__", "__mro__",
    "ctypes", "setprofile", "settrace", "_exit", "kill", "killpg", "fork", "system", "popen", "subprocess",
    "signal", "pty", "multiprocessing", "os.write", "fdopen", "dup2", "environ", "sys.stdout", "socket",
    VARIABLES["grade_log"], "grade_log",
})
_ALLOWED_FROM_CHECKS = frozenset({"check", "progress", "diagnose", "describe_exception", "generator"})
_CHECK_CALL = re.compile(r"""\bcheck\(\s*['"]([\w.]+)['"]""")


@dataclass
class Answer:
    """One exercise's answer as the notebook defines it.

    `source` is the module to run (empty when there is no answer); `target` the expression the
    check is given (a name, for a function); `cells` the notebook cells the source comes from;
    `problem` says why the answer cannot be used (a deleted check, an import of the reference);
    `context` the check's keyword arguments, as source text."""

    name: str
    check_cell: int | None
    target: str = ""
    source: str = ""
    cells: list[int] = field(default_factory=list)
    parts: list[tuple[int, str, list[int]]] = field(default_factory=list)  # (cell, its Python, statement lines)
    context: dict[str, str] = field(default_factory=dict)
    problem: str | None = None
    cheat: str | None = None  # USES_REFERENCE or REACHES_GRADER, with what gave it away


def python_of(cell_source: str) -> str:
    """A code cell as plain Python: IPython's `%magic` and `!shell` lines become calls."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager
    except ImportError:  # pragma: no cover - IPython comes with the kernel
        return cell_source
    try:
        return TransformerManager().transform_cell(cell_source)
    except Exception:
        return cell_source


@dataclass
class _Stmt:
    cell: int
    node: ast.stmt
    text: str
    binds: set[str]


def _binds(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"}
    names: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            names.add(sub.id)
    return names if not isinstance(node, (ast.Expr, ast.Assert, ast.Delete)) else set()


def _uses(text: str) -> set[str]:
    """Global names a statement needs when it runs (or when the function it defines is called)."""
    try:
        table = symtable.symtable(text, "<cell>", "exec")
    except SyntaxError:
        return set()
    found: set[str] = set()

    def visit(t: symtable.SymbolTable, top: bool) -> None:
        for s in t.get_symbols():
            if (top and s.is_referenced()) or (not top and s.is_global() and s.is_referenced()):
                found.add(s.get_name())
        for child in t.get_children():
            visit(child, False)

    visit(table, True)
    return found - set(dir(builtins))


def _statements(cells: list[str], upto: int) -> tuple[list[_Stmt], list[int]]:
    """Top-level statements of code cells 0..upto-1 (cells that do not parse define nothing)."""
    out, broken = [], []
    for i, src in enumerate(cells[:upto]):
        if not src.strip():
            continue
        text = python_of(src)
        try:
            tree = ast.parse(text)
        except SyntaxError:
            broken.append(i)
            continue
        for node in tree.body:
            out.append(_Stmt(i, node, ast.get_source_segment(text, node) or ast.unparse(node), _binds(node)))
    return out, broken


def _closure(stmts: list[_Stmt], wanted: set[str]) -> list[_Stmt]:
    """The statements that bind `wanted`, and what they need, recursively, in notebook order."""
    chosen: list[_Stmt] = []
    need = set(wanted)
    for st in reversed(stmts):
        hit = st.binds & need
        if not hit:
            continue
        chosen.append(st)
        need -= hit
        need |= _uses(st.text) - st.binds
    return list(reversed(chosen))


def _reached_names(node: ast.AST) -> set[str]:
    names: set[str] = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name):
            names.add(sub.id)
        elif isinstance(sub, ast.Attribute):
            names.add(sub.attr)
            if isinstance(sub.value, ast.Name):
                names.add(f"{sub.value.id}.{sub.attr}")
        elif isinstance(sub, ast.Constant) and isinstance(sub.value, str) and len(sub.value) < 80:
            names.add(sub.value)
        elif isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id in ("getattr", "setattr"):
            if len(sub.args) > 1 and not isinstance(sub.args[1], ast.Constant):
                names.add("getattr with a computed name")
    return names


def screen(stmts: list[_Stmt], reference_names: set[str]) -> str | None:
    """Why these statements are not the learner's own answer, or None. `reference_names` are the
    names of every reference and known-mistake function in `course_utils.exercises`."""
    for st in stmts:
        node = st.node
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("course_utils"):
            mod = node.module or ""
            names = {a.name for a in node.names}
            if mod.startswith("course_utils.exercises") and (names & reference_names or "*" in names):
                return f"{USES_REFERENCE} (cell {st.cell}: `{st.text.strip()[:120]}`)"
            if mod == "course_utils.checks" and names - _ALLOWED_FROM_CHECKS:
                return f"{USES_REFERENCE} (cell {st.cell}: `{st.text.strip()[:120]}`)"
            if mod in ("course_utils.grade", "course_utils.answers", "course_utils.sandbox"):
                return f"{REACHES_GRADER} (cell {st.cell}: `{st.text.strip()[:120]}`)"
        if isinstance(node, ast.Import) and any(a.name.startswith(("course_utils.exercises", "course_utils.checks"))
                                                for a in node.names):
            return f"{USES_REFERENCE} (cell {st.cell}: `{st.text.strip()[:120]}`)"
        reached = _reached_names(node)
        if reached & _REFERENCE_NAMES:
            return f"{USES_REFERENCE} (cell {st.cell} uses `{sorted(reached & _REFERENCE_NAMES)[0]}`)"
        bad = reached & (_GRADER_NAMES | {"getattr with a computed name"})
        if bad:
            return f"{REACHES_GRADER} (cell {st.cell} uses `{sorted(bad)[0]}`)"
    return None


def _check_calls(cells: list[str]) -> dict[str, tuple[int, ast.Call]]:
    """{exercise name: (cell, the check call)}: the first `check("name", ...)` call of each name."""
    found: dict[str, tuple[int, ast.Call]] = {}
    for i, src in enumerate(cells):
        if "check(" not in src:
            continue
        try:
            tree = ast.parse(python_of(src))
        except SyntaxError:
            for name in _CHECK_CALL.findall(src):
                found.setdefault(name, (i, ast.Call(func=ast.Name("check"), args=[], keywords=[])))
            continue
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "check"
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                found.setdefault(node.args[0].value, (i, node))
    return found


def extract(cells: list[str], names: list[str], reference_names: set[str]) -> dict[str, Answer]:
    """Every exercise's `Answer`, read from the code cells' sources (`""` for a markdown cell).

    `names` are the exercises the notebook must contain; `reference_names` what `screen` refuses."""
    calls = _check_calls(cells)
    answers: dict[str, Answer] = {}
    for name in names:
        if name not in calls:
            answers[name] = Answer(name, None, problem=f"no `check(\"{name}\", ...)` cell in the notebook "
                                                       "(was it deleted?)")
            continue
        cell, call = calls[name]
        ans = Answer(name, cell)
        answers[name] = ans
        if len(call.args) < 2:
            ans.problem = f"the check cell {cell} does not parse, or passes no answer"
            continue
        ans.target = ast.unparse(call.args[1])
        ans.context = {k.arg: ast.unparse(k.value) for k in call.keywords if k.arg}
        stmts, _ = _statements(cells, cell)
        wanted = _uses(ans.target + "\n" + "\n".join(ans.context.values()))
        chosen = _closure(stmts, wanted)
        ans.cells = sorted({s.cell for s in chosen})
        ans.source = "\n\n".join(s.text for s in chosen)
        ans.parts = [(c, python_of(cells[c]), [s.node.lineno for s in chosen if s.cell == c]) for c in ans.cells]
        ans.cheat = screen(chosen, reference_names) or screen_expr(ans, reference_names)
    return answers


def screen_expr(ans: Answer, reference_names: set[str]) -> str | None:
    """The check call's own arguments go through the same screen as the cells."""
    try:
        tree = ast.parse(ans.target + "\n" + "\n".join(ans.context.values()))
    except SyntaxError:
        return None
    return screen([_Stmt(ans.check_cell or 0, n, ast.unparse(n), set()) for n in tree.body], reference_names)


# --------------------------------------------------------------------------------------------
# Values as data: safetensors for tensors, JSON for the rest
# --------------------------------------------------------------------------------------------
def _encode(value: Any, tensors: dict[str, Any]) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"__float__": repr(value)}
    if isinstance(value, (list, tuple)):
        return {"__list__" if isinstance(value, list) else "__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _encode(v, tensors) for k, v in value.items()}}
    if hasattr(value, "dtype") and hasattr(value, "shape"):  # numpy
        return _encode(torch.as_tensor(value), tensors)
    raise TypeError(f"a {type(value).__name__} cannot be graded as a value: use tensors, numbers, strings, "
                    "and lists, tuples or dicts of them")


def _decode(obj: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__list__" in obj:
            return [_decode(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__dict__"].items()}
    if isinstance(obj, list):
        raise ValueError("malformed value file")
    return obj


def dump_values(folder: Path, values: dict[str, Any]) -> None:
    """Write `values` ({name: value}) as `folder/values.json` and `folder/values.safetensors`."""
    from safetensors.torch import save_file

    tensors: dict[str, Any] = {}
    skeleton = {k: _encode(v, tensors) for k, v in values.items()}
    save_file(tensors, str(folder / "values.safetensors"))
    (folder / "values.json").write_text(json.dumps(skeleton), encoding="utf-8")


def load_values(folder: Path, limit: int = 1 << 30) -> dict[str, Any]:
    """What `dump_values` wrote (nothing but data); {} when absent, larger than `limit`, or malformed."""
    from safetensors.torch import load_file

    skel, data = folder / "values.json", folder / "values.safetensors"
    try:
        if not skel.is_file() or skel.stat().st_size > limit or data.stat().st_size > limit:
            return {}
        tensors = load_file(str(data))
        return {k: _decode(v, tensors) for k, v in json.loads(skel.read_text(encoding="utf-8")).items()}
    except Exception:
        return {}
