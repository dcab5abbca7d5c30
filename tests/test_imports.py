"""The package's import graph, read from the source with `ast`: no cycles, and leaf kernels.

Every `import course_utils...` and `from course_utils... import ...` counts, relative imports and
imports inside functions included (a lazy import still ties two modules together).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "course_utils"
KERNELS_MAY_IMPORT = ("course_utils.kernels", "course_utils.config")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _target(name: str) -> str:
    """The module `name` lives in: `course_utils.lens.LensStats` -> `course_utils.lens`."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str) -> set[str]:
    """The `course_utils` modules that `module` imports, anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
    return {_target(n) for n in found if n.split(".")[0] == "course_utils"} - {module}


GRAPH = {module: _imports(module) for module in MODULES}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle `[a, b, ..., a]` of `graph` (depth-first search), or None."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" after

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_graph_reader_sees_lazy_and_relative_imports():
    assert "course_utils.kernels.class_moments" in GRAPH["course_utils.moments"]  # imported inside a function
    assert "course_utils.kernels.lens_readout" in GRAPH["course_utils.lens"]
    assert "course_utils.config" in GRAPH["course_utils"]


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("course_utils.kernels")))
def test_kernels_are_leaves(module):
    outside = {m for m in GRAPH[module] if not m.startswith(KERNELS_MAY_IMPORT)}
    assert not outside, f"{module} imports {sorted(outside)}: kernels take and return plain tensors"


# The layers of CONTRIBUTING.md, lowest first. A module imports only from its own layer or below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("settings", ("course_utils.config", "course_utils.colab")),
    ("assets", ("course_utils.assets", "course_utils.cache")),
    ("data and models", ("course_utils.cifar", "course_utils.text", "course_utils.models", "course_utils.train")),
    ("numerics", ("course_utils.gaussian", "course_utils.kernels")),
    ("methods", ("course_utils.gradcam", "course_utils.lens", "course_utils.moments", "course_utils.erasure",
                 "course_utils.saliency_checks", "course_utils.lens_experiment", "course_utils.erasure_cifar",
                 "course_utils.attacks", "course_utils.pruning", "course_utils.anomaly", "course_utils.label_bugs",
                 "course_utils.ablation", "course_utils.toolbox")),
    ("teaching", ("course_utils.checks", "course_utils.claims", "course_utils.exercises", "course_utils.grade",
                  "course_utils.answers", "course_utils.sandbox", "course_utils.verdict",
                  "course_utils.build", "course_utils.viz")),
]


def layer_of(module: str) -> int:
    """The index in `LAYERS` of `module` (the package's own `__init__` is teaching: it re-exports)."""
    if module == "course_utils":
        return len(LAYERS) - 1
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS here and to CONTRIBUTING.md's map")


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_runs_upward():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in GRAPH.items() for t in sorted(targets)
              if layer_of(t) > layer_of(m) and not m.startswith(t + ".")]  # a parent package always loads first
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_the_layer_rule_catches_an_upward_import():
    assert layer_of("course_utils.train") < layer_of("course_utils.moments") < layer_of("course_utils.viz.moments")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("course_utils.somewhere_new")
