"""The set-up promises: two README commands, CI runs the same one, conda and pip agree."""
from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


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
    assert re.search(r"^\s*- python>=3\.10", text, re.M) and re.search(r"^\s*- pip$", text, re.M)
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
