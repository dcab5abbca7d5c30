"""Grade learners' notebooks, exercise by exercise, without ever touching the originals.

    python -m course_utils.grade [--json OUT] [--junit OUT] [--timeout S] [--cell-timeout S] NOTEBOOK...
    python -m course_utils.grade --cohort DIR [--out DIR]

Each notebook is copied to a scratch folder and run there, in a fresh kernel, by a worker
process that the grader can kill. Every `check(...)` call in the notebook appends its outcome to
a log (`COURSE_GRADE_LOG`); the grader reads that log and the worker's per-cell progress, and
gives every exercise of the notebook's topic a status and a reason, whatever happened: a file that
is not JSON, a syntax error, an exception, an endless loop, a dead kernel, megabytes of output, a
deleted exercise. The grader itself never crashes on a learner's notebook.

Exit status: 0 when every exercise of every notebook passed, else 1 (2 for bad arguments).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from course_utils.config import env_vars
from course_utils.exercises import topic_of

DEFAULT_TIMEOUT = 1800.0
DEFAULT_CELL_TIMEOUT = 600.0
OUTPUT_LIMIT = 1_000_000  # bytes of output kept per cell; the rest is dropped

STATUS_MARK = {"passed": "✓", "failed": "✗", "not done": "…", "error": "!", "missing": "?",
               "not reached": "-", "timeout": "⏱"}


@dataclass
class ExerciseResult:
    name: str
    title: str
    status: str  # passed | failed | not done | error | missing | not reached | timeout
    reason: str
    points: float
    max_points: float


@dataclass
class NotebookReport:
    path: str
    topic: str | None
    exercises: list[ExerciseResult] = field(default_factory=list)
    seconds: float = 0.0
    problem: str | None = None  # what went wrong with the notebook as a whole, if anything

    @property
    def score(self) -> float:
        return sum(e.points for e in self.exercises)

    @property
    def max_score(self) -> float:
        return sum(e.max_points for e in self.exercises)

    @property
    def passed(self) -> bool:
        return bool(self.exercises) and all(e.status == "passed" for e in self.exercises)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "topic": self.topic, "score": self.score, "max_score": self.max_score,
                "passed": self.passed, "seconds": round(self.seconds, 1), "problem": self.problem,
                "exercises": [asdict(e) for e in self.exercises]}


# --------------------------------------------------------------------------------------------
# The worker: runs one notebook cell by cell and logs its progress as JSON lines
# --------------------------------------------------------------------------------------------
def _error_text(cell: Any) -> str | None:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"[:500]
    return None


def _run_worker(nb_path: Path, progress_path: Path, cell_timeout: float, deadline: float) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    class CappedClient(NotebookClient):
        """A client that keeps at most OUTPUT_LIMIT bytes of each cell's output."""

        _sizes: dict[int, int] = {}

        def output(self, outs, msg, display_id, cell_index):  # type: ignore[override]
            size = len(json.dumps(msg.get("content", {}), default=str))
            used = self._sizes.get(cell_index, 0)
            self._sizes[cell_index] = used + size
            if used + size > OUTPUT_LIMIT:
                return None
            return super().output(outs, msg, display_id, cell_index)

    def log(**entry: Any) -> None:
        with open(progress_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    nb = nbformat.read(nb_path, as_version=4)
    client = CappedClient(nb, timeout=int(cell_timeout), kernel_name="python3", allow_errors=True,
                          interrupt_on_timeout=True,
                          error_on_timeout={"ename": "CellTimeoutError", "evalue": "time limit", "traceback": []},
                          resources={"metadata": {"path": str(nb_path.parent)}})
    with client.setup_kernel():
        for idx, cell in enumerate(nb.cells):
            if cell.cell_type != "code" or not cell.source.strip():
                continue
            left = deadline - time.time()
            if left <= 1:
                log(stop=f"the notebook ran past its time limit before cell {idx}")
                return 0
            client.timeout = int(max(1, min(cell_timeout, left)))
            code = (ln.strip() for ln in cell.source.splitlines())
            first = next((ln for ln in code if ln and not ln.startswith("#")), "")
            here = f"cell {idx} (`{first[:50]}`)"
            log(start=idx)
            began = time.time()
            try:
                client.execute_cell(cell, idx)
            except CellTimeoutError:  # only if the interrupt itself failed
                log(cell=idx, status="timeout", error=f"{here} ran past its time limit of {client.timeout} s")
                continue
            except DeadKernelError:
                log(cell=idx, status="dead", error=f"the kernel died in {here} (os._exit, a crash, or out of memory)")
                log(stop=f"the kernel died in {here}")
                return 0
            if time.time() - began >= client.timeout:  # interrupted by nbclient at the limit
                log(cell=idx, status="timeout", error=f"{here} ran past its time limit of {client.timeout} s")
                continue
            err = _error_text(cell)
            log(cell=idx, status="error" if err else "ok", error=f"{here} raised {err}" if err else None,
                truncated=client._sizes.get(idx, 0) > OUTPUT_LIMIT)
    log(stop=None)
    return 0


# --------------------------------------------------------------------------------------------
# The parent: copy, run the worker under a hard limit, then read what happened
# --------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _check_cells(sources: list[str], name: str) -> list[int]:
    pattern = re.compile(r"""\bcheck\(\s*['"]""" + re.escape(name) + r"""['"]""")
    return [i for i, src in enumerate(sources) if pattern.search(src)]


def _expected_exercises(topic: str | None) -> list[Any]:
    if topic is None:
        return []
    from course_utils.checks import exercises_of

    return exercises_of(topic)


def _all(report: NotebookReport, status: str, reason: str) -> NotebookReport:
    for ex in _expected_exercises(report.topic):
        report.exercises.append(ExerciseResult(ex.name, ex.title, status, reason, 0, ex.points))
    report.problem = reason
    return report


def _load_notebook(path: Path) -> tuple[Any | None, str | None]:
    import nbformat

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return None, f"the notebook could not be read: {err}"
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return None, (f"the notebook is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                      "fix it or re-download it")
    try:
        return nbformat.reads(text, as_version=4), None
    except Exception as err:  # nbformat is strict about the schema
        return None, f"the notebook is JSON but not a valid notebook: {str(err).splitlines()[0][:200]}"


def _summarise(report: NotebookReport, sources: list[str], progress: list[dict[str, Any]],
               log: list[dict[str, Any]]) -> None:
    cells = {p["cell"]: p for p in progress if "cell" in p}
    started = [p["start"] for p in progress if "start" in p]
    stops = [p["stop"] for p in progress if "stop" in p]
    stop = stops[-1] if stops else "the grader stopped the notebook at its time limit"
    outcomes = {row["name"]: row for row in log if "name" in row}
    first_error = {i: c for i, c in sorted(cells.items()) if c["status"] in ("error", "timeout", "dead")}
    truncated = [i for i, c in cells.items() if c.get("truncated")]
    if truncated:
        report.problem = f"output of cell(s) {truncated} was over {OUTPUT_LIMIT // 1_000_000} MB and was cut"
    if stop:
        report.problem = stop if not report.problem else f"{report.problem}; {stop}"
    status_of = {"passed": "passed", "failed": "failed", "todo": "not done", "error": "error"}
    for ex in _expected_exercises(report.topic):
        where = _check_cells(sources, ex.name)
        o = outcomes.get(ex.name)
        if o is not None:
            status = status_of.get(o["status"], "error")
            reason = o.get("message") or status
            if o.get("case"):
                reason = f"[case: {o['case']}] {reason}"
        elif not where:
            status, reason = "missing", f"no `check(\"{ex.name}\", ...)` cell in the notebook (was it deleted?)"
        elif where[0] in cells and cells[where[0]]["status"] == "timeout":
            status, reason = "timeout", cells[where[0]]["error"]
        elif where[0] in cells:
            earlier = [c["error"] for i, c in first_error.items() if i < where[0]]
            own = cells[where[0]].get("error") or "the check did not report"
            cause = f" (earlier, {earlier[-1]})" if earlier else ""
            status, reason = "error", f"the check cell failed: {own}{cause}"
        elif where[0] in started:
            status, reason = "error", f"cell {where[0]} never finished: {stop or 'the kernel stopped'}"
        else:
            status, reason = "not reached", stop or "the notebook stopped before this exercise"
        points = ex.points if status == "passed" else 0
        report.exercises.append(ExerciseResult(ex.name, ex.title, status, " ".join(reason.split()), points, ex.points))


def grade_notebook(path: str | Path, *, timeout: float = DEFAULT_TIMEOUT,
                   cell_timeout: float = DEFAULT_CELL_TIMEOUT) -> NotebookReport:
    """Run a copy of one notebook and grade every exercise of its topic."""
    path = Path(path)
    started = time.time()
    report = NotebookReport(path=str(path), topic=topic_of(path.name))
    try:
        if report.topic is None:
            report.problem = (f"cannot tell which notebook {path.name!r} is: its name must start with the "
                              f"course's number, like 01_gradcam.ipynb")
            return report
        nb, problem = _load_notebook(path)
        if nb is None:
            return _all(report, "error", problem or "unreadable")
        sources = [c.source if c.cell_type == "code" else "" for c in nb.cells]
        with tempfile.TemporaryDirectory(prefix="course-grade-") as tmp:
            work = Path(tmp)
            copy = work / path.name
            shutil.copyfile(path, copy)
            progress, log = work / "progress.jsonl", work / "checks.jsonl"
            env = {**os.environ, **env_vars(grade_log=log), "PYTHONUNBUFFERED": "1"}
            cmd = [sys.executable, "-m", "course_utils.grade", "--worker", str(copy), str(progress),
                   str(cell_timeout), str(started + timeout)]
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True)
            try:
                _, err = proc.communicate(timeout=timeout + 60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                err = b""
                with open(progress, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"stop": f"the notebook ran past its time limit of {timeout:.0f} s"}) + "\n")
            rows = _read_jsonl(progress)
            if proc.returncode not in (0, None) and not any("stop" in r for r in rows):
                tail = (err or b"").decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
                rows.append({"stop": f"the notebook could not be run: {tail[0][:300]}"})
            _summarise(report, sources, rows, _read_jsonl(log))
    except Exception as err:  # never crash on a learner's notebook
        report.exercises.clear()
        _all(report, "error", f"grader error: {type(err).__name__}: {err}")
    finally:
        report.seconds = time.time() - started
    return report


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------
def format_table(reports: list[NotebookReport]) -> str:
    lines = []
    for r in reports:
        lines.append(f"{r.path}  —  {r.score:g}/{r.max_score:g}  ({r.seconds:.0f} s)")
        if r.problem:
            lines.append(f"  note: {r.problem}")
        width = max([len(e.name) for e in r.exercises] + [8])
        lines.append(f"  {'exercise':<{width}}  {'status':<11}  reason")
        for e in r.exercises:
            mark = STATUS_MARK.get(e.status, "?")
            reason = e.reason if len(e.reason) <= 160 else e.reason[:157] + "..."
            shown = reason if e.status != "passed" else ""
            lines.append(f"  {e.name:<{width}}  {mark} {e.status:<9}  {shown}".rstrip())
    total = sum(r.score for r in reports)
    most = sum(r.max_score for r in reports)
    lines.append(f"TOTAL {total:g}/{most:g}")
    return "\n".join(lines)


def to_json(reports: list[NotebookReport]) -> dict[str, Any]:
    return {"score": sum(r.score for r in reports), "max_score": sum(r.max_score for r in reports),
            "passed": bool(reports) and all(r.passed for r in reports),
            "notebooks": [r.to_json() for r in reports]}


def to_junit(reports: list[NotebookReport]) -> str:
    suites = ET.Element("testsuites", name="course grading")
    for r in reports:
        failures = sum(e.status in ("failed", "not done", "missing", "not reached", "timeout") for e in r.exercises)
        errors = sum(e.status == "error" for e in r.exercises)
        suite = ET.SubElement(suites, "testsuite", name=Path(r.path).stem, tests=str(len(r.exercises)),
                              failures=str(failures), errors=str(errors), time=f"{r.seconds:.1f}")
        for e in r.exercises:
            case = ET.SubElement(suite, "testcase", classname=Path(r.path).stem, name=e.name)
            if e.status == "error":
                ET.SubElement(case, "error", message=e.reason, type=e.status).text = e.reason
            elif e.status != "passed":
                ET.SubElement(case, "failure", message=e.reason, type=e.status).text = e.reason
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def grade_cohort(
    folder: Path, out: Path, *, timeout: float, cell_timeout: float
) -> list[tuple[str, list[NotebookReport]]]:
    """Grade every learner's folder under `folder`; write a scoreboard (CSV, Markdown) and per-learner JSON."""
    learners = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for learner in learners:
        notebooks = sorted(learner.rglob("*.ipynb"))
        notebooks = [n for n in notebooks if ".ipynb_checkpoints" not in n.parts]
        reports = [grade_notebook(n, timeout=timeout, cell_timeout=cell_timeout) for n in notebooks]
        (out / f"{learner.name}.json").write_text(json.dumps(to_json(reports), indent=1) + "\n", encoding="utf-8")
        results.append((learner.name, reports))
        print(f"{learner.name}: {sum(r.score for r in reports):g}/{sum(r.max_score for r in reports):g}", flush=True)
    _write_scoreboard(results, out)
    return results


def _write_scoreboard(results: list[tuple[str, list[NotebookReport]]], out: Path) -> None:
    columns: list[str] = []
    for _, reports in results:
        for r in reports:
            for e in r.exercises:
                if e.name not in columns:
                    columns.append(e.name)
    rows = []
    for learner, reports in results:
        got = {e.name: e.points for r in reports for e in r.exercises}
        total = sum(got.values())
        rows.append([learner] + [f"{got[c]:g}" if c in got else "" for c in columns] + [f"{total:g}"])
    header = ["learner"] + columns + ["total"]
    with open(out / "scoreboard.csv", "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header] + rows)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    (out / "scoreboard.md").write_text("\n".join(md) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _, nb, progress, cell_timeout, deadline = argv
        return _run_worker(Path(nb), Path(progress), float(cell_timeout), float(deadline))
    ap = argparse.ArgumentParser(prog="python -m course_utils.grade", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", type=Path, help="notebooks to grade")
    ap.add_argument("--json", type=Path, help="write a JSON report here")
    ap.add_argument("--junit", type=Path, help="write a JUnit XML report here (for CI pages)")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per notebook (default 1800)")
    ap.add_argument("--cell-timeout", type=float, default=DEFAULT_CELL_TIMEOUT, help="seconds per cell (default 600)")
    ap.add_argument("--cohort", type=Path, help="a folder with one sub-folder of notebooks per learner")
    ap.add_argument("--out", type=Path, default=Path("grades"), help="with --cohort: where the scoreboard goes")
    args = ap.parse_args(argv)
    if args.cohort:
        if not args.cohort.is_dir():
            ap.error(f"--cohort {args.cohort}: not a folder")
        results = grade_cohort(args.cohort, args.out, timeout=args.timeout, cell_timeout=args.cell_timeout)
        print(f"scoreboard: {args.out / 'scoreboard.md'} and {args.out / 'scoreboard.csv'}")
        return 0 if results and all(r.passed for _, rs in results for r in rs) else 1
    if not args.notebooks:
        ap.error("name at least one notebook (or --cohort DIR)")
    missing = [str(p) for p in args.notebooks if not p.is_file()]
    if missing:
        ap.error(f"no such notebook: {', '.join(missing)}")
    reports = []
    for nb in args.notebooks:
        reports.append(grade_notebook(nb, timeout=args.timeout, cell_timeout=args.cell_timeout))
    print(format_table(reports))
    if args.json:
        args.json.write_text(json.dumps(to_json(reports), indent=1) + "\n", encoding="utf-8")
    if args.junit:
        args.junit.write_text(to_junit(reports), encoding="utf-8")
    return 0 if reports and all(r.passed for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
