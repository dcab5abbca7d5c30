"""The set-up promises: two README commands, CI runs the same one, conda, pip and the lock agree, and every
place that names the supported Python versions says what pyproject's requires-python says."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the test extra installs tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str):
    """A module from tools/ (the maintainers' scripts, which are not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _pyproject_packages() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = list(project["dependencies"]) + [d for extra in project["optional-dependencies"].values() for d in extra]
    return {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower() for d in names}


def _environment_packages() -> set[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    pip = [line.strip()[2:].strip() for line in lines[start + 1:] if line.strip().startswith("- ")]
    return {re.split(r"[<>=!~\[; ]", p, maxsplit=1)[0].lower() for p in pip if not p.startswith("-e")}


def test_environment_yml_lists_the_same_packages_as_pyproject():
    assert _environment_packages() == _pyproject_packages()
    text = (ROOT / "environment.yml").read_text()
    assert re.search(r"^\s*- python>=3\.\d+", text, re.M) and re.search(r"^\s*- pip$", text, re.M)
    assert "- -e ." in text


def test_torch_is_not_pinned_to_a_local_wheel():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch" in deps and "torchvision" in deps, "let pip resolve torch and torchvision together"


def test_readme_opens_with_exactly_two_commands():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    first = [line.split("#")[0].strip() for line in blocks[0].splitlines() if line.split("#")[0].strip()]
    assert first == ["make lab", "make test"]
    assert text.startswith("```"), "the README begins with the two commands"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test\b", ci, re.M)
    assert "COURSE_DATA_DIR" in ci and "../shared/assets" in ci
    assert "set -euo pipefail" in ci


def test_lab_binds_to_localhost_and_keeps_its_token():
    make = (ROOT / "Makefile").read_text()
    lab = make.split("\nlab:")[1].split("\n\n")[0]
    assert "--ServerApp.ip=127.0.0.1" in lab and "token" not in lab.lower()
    assert "COURSE_FAST=1" in make.split("\ntest:")[1].split("\n\n")[0]


def test_every_place_states_pyprojects_python_range():
    spec = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    (low, high) = _tool("check_python").supported_range((ROOT / "pyproject.toml").read_text())
    assert re.search(rf"^\s*- python{re.escape(spec)}$", (ROOT / "environment.yml").read_text(), re.M)
    assert f"Python 3.{low[1]} to 3.{high[1]}" in (ROOT / "README.md").read_text()
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    assert tool["ruff"]["target-version"] == f"py3{low[1]}" and tool["pyright"]["pythonVersion"] == f"3.{low[1]}"


def test_check_python_refuses_versions_outside_the_range():
    check = _tool("check_python")
    assert check.supported_range('requires-python = ">=3.10,<3.14"') == ((3, 10), (3, 13))
    with pytest.raises(SystemExit, match="requires-python"):
        check.supported_range('requires-python = ">=3.10"')


# --- the lock ------------------------------------------------------------------------------------
def test_lock_matches_pyproject_and_pins_everything_with_hashes():
    lock = _tool("lock")
    text = (ROOT / "requirements.lock").read_text()
    assert lock.problems(text, lock.project()) == [], "run `make update-lock`"
    pins = lock.pins(text)
    assert len(pins) > 100, "the whole environment, transitive packages included"
    assert len(pins["torch"]) == 1, "one torch for every supported Python: the stored outputs come from it"
    assert "tomli" in pins, "Python 3.10 reads pyproject.toml with tomli"


def test_lock_check_rejects_an_edited_pyproject():
    lock = _tool("lock")
    text = (ROOT / "requirements.lock").read_text()
    proj = lock.project()
    edited = dict(proj, dependencies=[*proj["dependencies"], "no-such-package-for-the-test>=1"])
    found = lock.problems(text, edited)
    assert any("changed since the lock" in p for p in found)
    assert any("no-such-package-for-the-test is in pyproject.toml but not pinned" in p for p in found)
    unhashed = text.replace("--hash=sha256:", "# hash dropped:")
    assert any("no --hash" in p for p in lock.problems(unhashed, proj))


def test_make_installs_from_the_lock_and_ci_checks_it():
    make = (ROOT / "Makefile").read_text()
    stamp = make.split("\n$(STAMP):")[1].split("\n\n")[0]
    assert "pyproject.toml $(LOCK)" in stamp.splitlines()[0], "a changed lock reinstalls"
    assert stamp.count("--require-hashes -r $(LOCK)") == 2, "uv and pip both install exactly the lock"
    assert "\nupdate-lock:" in make and "\ncheck-lock:" in make and "\ntest-pythons:" in make
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make check-lock\b", ci, re.M) and re.search(r"make test-pythons\b", ci)


def test_uv_is_configured_only_from_pips_settings(monkeypatch):
    uv_pip = _tool("uv_pip")
    monkeypatch.setenv("PIP_INDEX_URL", "https://mirror.invalid/simple")
    monkeypatch.delenv("UV_INDEX_URL", raising=False)
    assert uv_pip.pip_settings()["index-url"] == "https://mirror.invalid/simple"
    env = uv_pip.uv_environment()
    assert env["UV_INDEX_URL"] == "https://mirror.invalid/simple"
    assert env["UV_INDEX_STRATEGY"] == "unsafe-best-match", "pip's rule: the best match over all indexes"


def test_no_package_index_address_is_written_in_the_repository():
    tracked = [ROOT / "Makefile", ROOT / ".ci" / "run", ROOT / "pyproject.toml", ROOT / "environment.yml",
               ROOT / "requirements.lock", *(ROOT / "tools").glob("*.py")]
    for path in tracked:
        text = path.read_text()
        assert not re.search(r"(?:pypi\.org|files\.pythonhosted|/simple\b|file://|--index-url\s+\S)", text), path
