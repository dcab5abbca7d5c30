"""Every solution notebook once in the laptop tier, from an empty result cache.

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


def _run_in_laptop_tier(self, tmp_path, monkeypatch):
    copy = tmp_path / self.notebook
    shutil.copyfile(ROOT / "solutions" / self.notebook, copy)
    monkeypatch.setenv("COURSE_MODE", "laptop")
    monkeypatch.delenv("COURSE_FAST", raising=False)
    nb = nbformat.read(copy, as_version=4)
    start = time.time()
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.time() - start
    claims = claim_lines(nb)
    _record(self.notebook, seconds, [m.group(0) for m in claims])
    assert not errors(nb), errors(nb)
    assert any("course tier: laptop" in json.dumps(c.get("outputs", [])) for c in nb.cells), \
        "the notebook did not print that it runs in the laptop tier (print(CFG.describe()) in its first cell)"
    false = [m.group(0) for m in claims if m["holds"] == "False" and not m["known"]]
    assert not false, "claims that did not hold in the laptop tier:\n" + "\n".join(false)


# One class per notebook, so that `--dist loadscope` spreads them over the xdist workers.
for _path in SOLUTIONS:
    _name = "TestLaptopTier_" + _path.stem
    globals()[_name] = pytest.mark.slow(type(_name, (), {
        "notebook": _path.name,
        "test_runs_and_every_claim_holds": _run_in_laptop_tier,
    }))
