"""Every solution notebook once in the laptop tier, with no laptop-tier result in the cache but those of the
notebooks it builds on (05 runs after 03, whose sweep it reuses, as in the course).

The laptop tier is what `make lab` gives a learner without a GPU, and the tier whose experiments
show each paper's claim. Each notebook states those claims with `course_utils.claims.claim`, one
line each: `claim: <statement>: True (figures)`. Here a notebook passes when it runs without an
error and every claim it prints holds, except those its text says this tier does not reproduce
(`claim (not reproduced in the laptop tier, see the text): ...`, from `claim(..., not_reproduced_in=)`).
The run times are written to `artifacts/laptop-tier-times.json` (a record, not a timed assertion:
the machine is shared).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
CLAIM = re.compile(r"^claim(?P<known> \(not reproduced in the \w+ tier, see the text\))?: (?P<statement>.*): "
                   r"(?P<holds>True|False)(?: \((?P<figures>.*)\))?$")
CELL_TIMEOUT = 1200


def claim_lines(nb: nbformat.NotebookNode) -> list[re.Match[str]]:
    """Every `claim: ...: True|False (...)` line the executed notebook printed on stdout."""
    found = []
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "stream" and out.get("name") == "stdout":
                found += [m for line in out["text"].splitlines() if (m := CLAIM.match(line))]
    return found


def errors(nb: nbformat.NotebookNode) -> list[str]:
    return [f"cell {i}: {o.get('ename')}: {o.get('evalue')}" for i, c in enumerate(nb.cells)
            if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]


def test_claim_lines_are_read_exactly():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[nbformat.v4.new_output(
        "stream", name="stdout", text="x\nclaim: the curve falls: True (peak=0.25, final=0.14)\n"
                                      "claim: a: b: False (r=0.5)\nnot a claim: True\n"
                                      "claim (not reproduced in the laptop tier, see the text): c: False\n")])])
    got = [(m["statement"], m["holds"], bool(m["known"])) for m in claim_lines(nb)]
    assert got == [("the curve falls", "True", False), ("a: b", "False", False), ("c", "False", True)]


def _record(name: str, seconds: float, claims: list[str]) -> None:
    out = ROOT / "artifacts" / "laptop-tier-times.json"
    out.parent.mkdir(exist_ok=True)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[name] = {"seconds": round(seconds, 1), "load_average": os.getloadavg(), "claims": claims}
    out.write_text(json.dumps(data, indent=1))


def _run_in_laptop_tier(notebook: str, tmp_path, monkeypatch):
    copy = tmp_path / notebook
    shutil.copyfile(ROOT / "solutions" / notebook, copy)
    monkeypatch.setenv("COURSE_MODE", "laptop")
    monkeypatch.delenv("COURSE_FAST", raising=False)
    nb = nbformat.read(copy, as_version=4)
    start = time.time()
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.time() - start
    claims = claim_lines(nb)
    _record(notebook, seconds, [m.group(0) for m in claims])
    assert not errors(nb), errors(nb)
    assert any("course tier: laptop" in json.dumps(c.get("outputs", [])) for c in nb.cells), \
        "the notebook did not print that it runs in the laptop tier (print(CFG.describe()) in its first cell)"
    false = [m.group(0) for m in claims if m["holds"] == "False" and not m["known"]]
    assert not false, "claims that did not hold in the laptop tier:\n" + "\n".join(false)


# One class per notebook, so that `--dist loadscope` spreads them over the xdist workers; except that a
# notebook that reuses another's cached experiment (05 reuses 03's checkpoint sweep) runs after it, in the same
# class and so on the same worker, as a learner meets them: its run then loads that sweep instead of training it
# again at the same time on the other worker (about 400 s of the suite's time).
AFTER = {"05_toolbox": "03_moment_editing"}


def _runner(notebook: str):
    def run(self, tmp_path, monkeypatch):
        _run_in_laptop_tier(notebook, tmp_path, monkeypatch)
    return run


for _path in SOLUTIONS:
    if _path.stem in AFTER:
        continue
    _name = "TestLaptopTier_" + _path.stem
    _tests = {"test_runs_and_every_claim_holds": _runner(_path.name)}
    for _later, _first in AFTER.items():
        if _first == _path.stem and (ROOT / "solutions" / f"{_later}.ipynb").exists():
            _tests[f"test_then_{_later}_runs_and_every_claim_holds"] = _runner(f"{_later}.ipynb")
    globals()[_name] = pytest.mark.slow(type(_name, (), _tests))
