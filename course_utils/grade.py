"""Grade learners' notebooks, exercise by exercise: isolated, with verdicts the notebook cannot write.

    python -m course_utils.grade [--json OUT] [--junit OUT] [--timeout S] [--cell-timeout S]
                                 [--memory GIB] [--no-isolation] [--no-precompute] [--answers-only] NOTEBOOK...
    python -m course_utils.grade --cohort DIR [--out DIR] [--jobs N] [--no-precompute] [--answers-only]

Each notebook is copied to a scratch folder and run there, in a fresh kernel, inside a sandbox
(`course_utils.sandbox`: bubblewrap's namespaces where it works, else resource limits and a
process-group kill, and every report then says it ran without isolation). That run tells which
cells ran, raised, timed out or killed the kernel. It never decides a point: the grader reads
each exercise's answer from the notebook's cells itself (`course_utils.answers`, with `ast`) and
checks it in a second, fresh sandboxed process (`course_utils.verdict`) on the exercise's cases
and hidden cases; that process signs its verdicts with a key the notebook never sees. A
`check` redefined in the notebook, lines written to a grade log, a patched `course_utils`, an
answer taken from `course_utils.exercises`: none of them changes a verdict, and the last scores 0
with the reason "uses the course's reference answer".

Every exercise of the notebook's topic gets a status and a reason, whatever happened: a file that
is not JSON, a syntax error, an exception, an endless loop, a dead kernel, gigabytes of output,
a deleted exercise, a notebook that attacks the grader. The grader itself never crashes on a
learner's notebook, and writes its reports whatever the notebook did.

`--answers-only` skips the notebook's run: every answer is still read from the cells and checked in
the fresh sandboxed process (with the statements of earlier cells it needs), which is all that ever
decides a point, but nothing says whether the learner's notebook runs from top to bottom, so a check
cell that would have raised is not reported. A cohort is graded many times faster; every report says
that the notebooks were not run.

Exit status: 0 when every exercise of every notebook passed, else 1 (2 for bad arguments).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from course_utils import answers as A
from course_utils import sandbox
from course_utils.exercises import topic_of
from course_utils.verdict import VERDICTS, read_signed

DEFAULT_TIMEOUT = 1800.0
DEFAULT_CELL_TIMEOUT = 600.0
DEFAULT_MEMORY_GIB = 8.0
OUTPUT_LIMIT = 1_000_000  # bytes of output kept per cell; the rest is dropped
READ_LIMIT = 4 << 20  # bytes of any file the notebook could write that the grader reads
# The result-cache recipes each topic's notebook uses (`cache precompute --module`), trained once per cohort.
# Every module of `cache.RECIPE_MODULES` belongs to one topic here (tests/test_grade.py checks it).
RECIPES = {"gradcam": "course_utils.saliency_checks", "lens": "course_utils.lens_experiment",
           "moments": "course_utils.moments", "erasure": "course_utils.erasure_cifar",
           "toolbox": "course_utils.toolbox"}

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
    hidden_passed: int = 0
    hidden_total: int = 0


@dataclass
class NotebookReport:
    path: str
    topic: str | None
    exercises: list[ExerciseResult] = field(default_factory=list)
    seconds: float = 0.0
    problem: str | None = None  # what went wrong with the notebook as a whole, if anything
    isolated: bool | None = None  # None: nothing ran (the notebook could not even be read)
    isolation_off: bool = False  # isolation was turned off (--no-isolation), not missing
    ran: bool = True  # False with --answers-only: answers checked, the notebook itself not run

    @property
    def score(self) -> float:
        return sum(e.points for e in self.exercises)

    @property
    def max_score(self) -> float:
        return sum(e.max_points for e in self.exercises)

    @property
    def passed(self) -> bool:
        return bool(self.exercises) and all(e.status == "passed" for e in self.exercises)

    @property
    def isolation(self) -> str:
        if self.isolated is False:
            why = "it was turned off (--no-isolation)" if self.isolation_off else sandbox.why_not_isolated()
            return f"graded WITHOUT isolation: {why}"
        return "isolated (bubblewrap)" if self.isolated else "nothing ran"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "topic": self.topic, "score": self.score, "max_score": self.max_score,
                "passed": self.passed, "seconds": round(self.seconds, 1), "problem": self.problem,
                "isolation": self.isolation, "notebook_run": self.ran,
                "exercises": [asdict(e) for e in self.exercises]}


@dataclass(frozen=True)
class Settings:
    """How to grade: time limits (s), memory (bytes), isolation (None: bubblewrap when it works),
    folders the sandbox must not see, and the secret seed of the hidden cases."""

    timeout: float = DEFAULT_TIMEOUT
    cell_timeout: float = DEFAULT_CELL_TIMEOUT
    memory: int = int(DEFAULT_MEMORY_GIB * (1 << 30))
    isolate: bool | None = None
    hide: tuple[Path, ...] = ()
    seed: int = field(default_factory=lambda: secrets.randbits(62))
    answers_only: bool = False  # check the answers without running the notebook (see the module doc)


# --------------------------------------------------------------------------------------------
# The worker: runs one notebook cell by cell, inside the sandbox, and logs its progress as JSON lines
# (which the grader reads only to say where a notebook stopped: never to give a point)
# --------------------------------------------------------------------------------------------
def _error_text(cell: Any) -> str | None:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"[:500]
    return None


def _capped_client(nb: Any, cell_timeout: float, folder: Path) -> Any:
    """An nbclient client that keeps at most OUTPUT_LIMIT bytes of each cell's output."""
    from nbclient import NotebookClient

    class CappedClient(NotebookClient):
        _sizes: dict[int, int] = {}

        def output(self, outs, msg, display_id, cell_index):  # type: ignore[override]
            size = len(json.dumps(msg.get("content", {}), default=str))
            used = self._sizes.get(cell_index, 0)
            self._sizes[cell_index] = used + size
            if used + size > OUTPUT_LIMIT:
                return None
            return super().output(outs, msg, display_id, cell_index)

    return CappedClient(nb, timeout=int(cell_timeout), kernel_name="python3", allow_errors=True,
                        interrupt_on_timeout=True,
                        error_on_timeout={"ename": "CellTimeoutError", "evalue": "time limit", "traceback": []},
                        resources={"metadata": {"path": str(folder)}})


def capture_code(folder: Path, name: str, target: str, context: dict[str, str]) -> str:
    """Kernel code that saves a check's answer and context as data (`answers.dump_values`)."""
    ctx = "{" + ", ".join(f"{k!r}: ({v})" for k, v in context.items()) + "}"
    return (f"from course_utils.answers import dump_values as _grader_dump\nimport pathlib as _grader_p\n"
            f"_grader_p.Path({str(folder / name)!r}).mkdir(parents=True, exist_ok=True)\n"
            f"_grader_dump(_grader_p.Path({str(folder / name)!r}), {{'answer': ({target}), 'context': {ctx}}})\n")


def _run_cell(client: Any, cell: Any, idx: int, log: Any) -> str:
    """Run one cell; log what happened; returns "ok", "error", "timeout" or "dead"."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    code = (ln.strip() for ln in cell.source.splitlines())
    first = next((ln for ln in code if ln and not ln.startswith("#")), "")
    here = f"cell {idx} (`{first[:50]}`)"
    log(start=idx)
    began = time.time()
    try:
        client.execute_cell(cell, idx)
    except CellTimeoutError:  # only if the interrupt itself failed
        log(cell=idx, status="timeout", error=f"{here} ran past its time limit of {client.timeout} s")
        return "timeout"
    except DeadKernelError:
        log(cell=idx, status="dead", error=f"the kernel died in {here} (os._exit, a crash, or out of memory)")
        log(stop=f"the kernel died in {here}")
        return "dead"
    if time.time() - began >= client.timeout:  # interrupted by nbclient at the limit
        log(cell=idx, status="timeout", error=f"{here} ran past its time limit of {client.timeout} s")
        return "timeout"
    err = _error_text(cell)
    log(cell=idx, status="error" if err else "ok", error=f"{here} raised {err}" if err else None,
        truncated=client._sizes.get(idx, 0) > OUTPUT_LIMIT)
    return "error" if err else "ok"


def _run_worker(nb_path: Path, progress_path: Path, cell_timeout: float, deadline: float,
                captures: dict[str, list[str]] | None = None) -> int:
    """Run every code cell of `nb_path`; after a check cell in `captures` ({cell: code}), save its values."""
    import nbformat

    def log(**entry: Any) -> None:
        with open(progress_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    nb = nbformat.read(nb_path, as_version=4)
    client = _capped_client(nb, cell_timeout, nb_path.parent)
    with client.setup_kernel():
        for idx, cell in enumerate(nb.cells):
            if cell.cell_type != "code" or not cell.source.strip():
                continue
            left = deadline - time.time()
            if left <= 1:
                log(stop=f"the notebook ran past its time limit before cell {idx}")
                return 0
            client.timeout = int(max(1, min(cell_timeout, left)))
            state = _run_cell(client, cell, idx, log)
            if state == "dead":
                return 0
            for code in (captures or {}).get(str(idx), []) if state == "ok" else []:
                client.execute_cell(nbformat.v4.new_code_cell(code), idx)
    log(stop=None)
    return 0


# --------------------------------------------------------------------------------------------
# The parent: read the notebook, run it in a sandbox, check its answers in another, summarise
# --------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a file the notebook could have written: at most READ_LIMIT bytes, bad lines skipped."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(READ_LIMIT).decode("utf-8", errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


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


def _load_notebook(path: Path, raw: bytes | None = None) -> tuple[Any | None, bytes, str | None]:
    """(notebook, its bytes, problem): read once, so that what is graded is what was handed in."""
    import nbformat

    try:
        raw = path.read_bytes() if raw is None else raw
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return None, b"", f"the notebook could not be read: {err}"
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        return None, raw, (f"the notebook is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}); "
                           "fix it or re-download it")
    try:
        return nbformat.reads(text, as_version=4), raw, None
    except Exception as err:  # nbformat is strict about the schema
        return None, raw, f"the notebook is JSON but not a valid notebook: {str(err).splitlines()[0][:200]}"


def reference_names(topic: str, sources: list[str]) -> set[str]:
    """The names of every reference answer and known mistake of `topic` and of any exercise module
    the notebook names: what an answer may not import."""
    from course_utils.checks import exercises_of
    from course_utils.exercises import NOTEBOOKS

    named = set(re.findall(r"course_utils\.exercises\.(\w+)", "\n".join(sources)))
    topics = {topic} | (named & set(NOTEBOOKS.values()))
    names: set[str] = set()
    for t in sorted(topics):
        for ex in exercises_of(t):
            names.add(ex.reference.__name__)
            names |= {getattr(m.fn, "__name__", "") for m in ex.mistakes}
    return names


def _farm(shared: Path, private: Path, depth: int, skip: tuple[str, ...] = ()) -> None:
    """Mirror `shared`'s folders `depth` levels deep in `private`, with links to the entries below:
    the sandbox reads every shared entry, and what it writes stays in `private` (and is dropped)."""
    private.mkdir(parents=True, exist_ok=True)
    if not shared.is_dir():
        return
    for item in shared.iterdir():
        if item.name in skip or item.name.startswith(".tmp"):
            continue
        if depth > 0 and item.is_dir() and not item.is_symlink():
            _farm(item, private / item.name, depth - 1)
        elif not (private / item.name).exists():
            (private / item.name).symlink_to(item)


def _shared_readable() -> tuple[Path, ...]:
    """What the sandbox reads through `_farm`'s links (the result cache, the download cache, the data folders)
    and what it runs (this interpreter's environment, this package). Bound read-only, because the sandbox's
    own /tmp hides any of them that lives there."""
    from course_utils.config import CFG

    interpreter = (Path(sys.prefix), Path(sys.base_prefix), Path(__file__).resolve().parent.parent)
    return (CFG.results_dir, CFG.cache_dir, *CFG.data_dirs, *interpreter)


def _sandbox_env(home: Path) -> dict[str, str]:
    """The sandbox's environment: the grader's own, without the grade log, with a private home and
    result cache, and this package first on the path."""
    from course_utils.config import CFG, VARIABLES, env_vars

    env = {k: v for k, v in os.environ.items() if k != VARIABLES["grade_log"]}
    _farm(CFG.cache_dir, home / "cache", 8, skip=("results",))
    _farm(CFG.results_dir, home / "results", 2)
    package_root = str(Path(__file__).resolve().parent.parent)
    env.update(HOME=str(home), JUPYTER_RUNTIME_DIR=str(home / "jupyter"), IPYTHONDIR=str(home / "ipython"),
               MPLCONFIGDIR=str(home / "mpl"), PYTHONUNBUFFERED="1", TMPDIR=str(home / "tmp"),
               PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p),
               **env_vars(cache_dir=home / "cache", results_dir=home / "results"))
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    return env


def _captures(found: dict[str, A.Answer], folder: Path) -> dict[str, list[str]]:
    """{check cell: kernel code}: the values the grader needs from the run (value exercises, contexts)."""
    from course_utils.checks import get_exercise

    out: dict[str, list[str]] = {}
    for ans in found.values():
        if ans.problem or ans.cheat or ans.check_cell is None:
            continue
        if get_exercise(ans.name).kind == "value" or ans.context:
            out.setdefault(str(ans.check_cell), []).append(capture_code(folder, ans.name, ans.target, ans.context))
    return out


def _run_notebook(raw: bytes, name: str, work: Path, s: Settings, started: float,
                  captures: dict[str, list[str]]) -> tuple[list[dict[str, Any]], bool]:
    """Run a copy of the notebook in a sandbox; (its progress lines, whether it was isolated)."""
    run_dir = work / "run"
    run_dir.mkdir()
    copy = run_dir / name
    copy.write_bytes(raw)
    progress = run_dir / "progress.jsonl"
    (run_dir / "captures.json").write_text(json.dumps(captures), encoding="utf-8")
    argv = [sys.executable, "-m", "course_utils.grade", "--worker", str(copy), str(progress),
            str(s.cell_timeout), str(started + s.timeout), str(run_dir / "captures.json")]
    with open(work / "worker-stderr.txt", "wb") as fh:
        done = sandbox.run(argv, scratch=run_dir, env=_sandbox_env(run_dir / ".home"), timeout=s.timeout + 60,
                           limits=sandbox.Limits(memory=s.memory), hide=s.hide, read_only=_shared_readable(),
                           isolate=s.isolate, stderr=fh.fileno())
    rows = _read_jsonl(progress)
    if done.timed_out:
        rows.append({"stop": f"the notebook ran past its time limit of {s.timeout:.0f} s"})
    elif done.returncode not in (0, None) and not any("stop" in r for r in rows):
        with open(work / "worker-stderr.txt", "rb") as fh:
            tail = fh.read(READ_LIMIT).decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        rows.append({"stop": f"the notebook could not be run: {tail[0][:300]}"})
    return rows, done.isolated


def _jobs(found: dict[str, A.Answer], s: Settings) -> list[dict[str, Any]]:
    jobs = []
    for ans in found.values():
        if ans.problem or ans.cheat:
            continue
        jobs.append({"name": ans.name, "target": ans.target, "parts": ans.parts, "timeout": 2 * s.cell_timeout})
    return jobs


def _copy_values(src: Path, dst: Path) -> list[str]:
    """Copy the values the notebook saved (data only, capped in size) for the check process."""
    names = []
    if not src.is_dir():
        return names
    for folder in list(src.iterdir())[:200]:
        files = [folder / "values.json", folder / "values.safetensors"]
        if folder.is_dir() and not folder.is_symlink() and all(f.is_file() and not f.is_symlink() for f in files):
            if sum(f.stat().st_size for f in files) < (1 << 30):
                (dst / folder.name).mkdir(parents=True)
                for f in files:
                    shutil.copyfile(f, dst / folder.name / f.name)
                names.append(folder.name)
    return names


def _run_checks(found: dict[str, A.Answer], work: Path, s: Settings
                ) -> tuple[dict[str, dict[str, Any]], bool | None]:
    """Check every extracted answer in a fresh sandboxed process; ({exercise: signed verdict},
    whether that process was isolated: None when there was nothing to check)."""
    jobs = _jobs(found, s)
    if not jobs:
        return {}, None
    check_dir = work / "check"
    check_dir.mkdir()
    values = _copy_values(work / "run" / "values", check_dir / "values")
    key = secrets.token_bytes(32)
    job = {"key": key.hex(), "seed": s.seed, "answers": jobs, "values": values}
    argv = [sys.executable, "-m", "course_utils.verdict"]
    with open(work / "check-stderr.txt", "wb") as fh:
        done = sandbox.run(argv, scratch=check_dir, env=_sandbox_env(check_dir / ".home"),
                    timeout=120 + 2 * s.cell_timeout * len(jobs), limits=sandbox.Limits(memory=s.memory), hide=s.hide,
                    read_only=_shared_readable(), isolate=s.isolate, input_bytes=json.dumps(job).encode(),
                    stderr=fh.fileno())
    return read_signed(check_dir / VERDICTS, key), done.isolated


def _run_status(where: int | None, cells: dict[int, dict[str, Any]], started: list[int], stop: str | None
                ) -> tuple[str, str] | None:
    """What the notebook's own run says about the check cell `where`; None when it ran without error."""
    if where is None:
        return None
    first_error = {i: c for i, c in sorted(cells.items()) if c.get("status") in ("error", "timeout", "dead")}
    c = cells.get(where)
    if c is not None and c.get("status") == "ok":
        return None
    if c is not None and c.get("status") == "timeout":
        return "timeout", str(c.get("error"))
    if c is not None:
        earlier = [str(e.get("error")) for i, e in first_error.items() if i < where]
        own = c.get("error") or "the check did not report"
        cause = f" (earlier, {earlier[-1]})" if earlier else ""
        return "error", f"the check cell failed: {own}{cause}"
    if where in started:
        return "error", f"cell {where} never finished: {stop or 'the kernel stopped'}"
    return "not reached", stop or "the notebook stopped before this exercise"


_VERDICT_STATUS = {"passed": "passed", "failed": "failed", "todo": "not done", "error": "error", "timeout": "timeout"}


def _verdict_status(v: dict[str, Any] | None) -> tuple[str, str]:
    if v is None:
        return "error", ("the grader's own check of your answer did not finish (your code ended or broke the "
                         "checking process)")
    status = _VERDICT_STATUS.get(str(v.get("status")), "error")
    reason = str(v.get("message") or status)
    if v.get("case"):
        reason = f"[case: {v['case']}] {reason}"
    if v.get("hidden_total"):
        reason = f"{reason} (hidden cases: {v.get('hidden_passed', 0)} of {v['hidden_total']} passed)"
    return status, reason


NOT_RUN = ("not run (--answers-only): every answer was checked from its code; whether the notebook runs "
           "from top to bottom was not")


def _unrun_progress(found: dict[str, A.Answer]) -> list[dict[str, Any]]:
    """The progress lines of a notebook that was not run (--answers-only): every check cell counts as run,
    so that its signed verdict decides, except a check that needs values only the run can give."""
    needs_run = {"status": "error", "error": "this check needs values from the notebook's run: grade without "
                 "--answers-only"}
    return [{"cell": ans.check_cell, **(needs_run if ans.context else {"status": "ok"})}
            for ans in found.values() if ans.check_cell is not None]


def _summarise(report: NotebookReport, found: dict[str, A.Answer], progress: list[dict[str, Any]],
               verdicts: dict[str, dict[str, Any]]) -> None:
    """Every exercise's status: a deleted check, a cheat, where the run stopped, else the signed verdict."""
    cells = {int(p["cell"]): p for p in progress if isinstance(p.get("cell"), int)}
    started = [p["start"] for p in progress if "start" in p]
    stops = [p["stop"] for p in progress if "stop" in p]
    stop = stops[-1] if stops else ("the grader stopped the notebook at its time limit" if report.ran else None)
    truncated = [i for i, c in cells.items() if c.get("truncated")]
    if truncated:
        report.problem = f"output of cell(s) {truncated[:10]} was over {OUTPUT_LIMIT // 1_000_000} MB and was cut"
    if stop:
        report.problem = str(stop)[:500] if not report.problem else f"{report.problem}; {str(stop)[:500]}"
    for ex in _expected_exercises(report.topic):
        ans = found[ex.name]
        v = verdicts.get(ex.name)
        if ans.problem and ans.check_cell is None:
            status, reason = "missing", ans.problem
        elif ans.cheat:
            status, reason = "failed", ans.cheat
        else:
            status, reason = _run_status(ans.check_cell, cells, started, stop) or _verdict_status(v)
        points = ex.points if status == "passed" else 0
        hidden = (int(v.get("hidden_passed", 0)), int(v.get("hidden_total", 0))) if v and status == "passed" else (0, 0)
        report.exercises.append(ExerciseResult(ex.name, ex.title, status, " ".join(reason.split()), points,
                                               ex.points, *hidden))


def grade_notebook(path: str | Path, *, timeout: float = DEFAULT_TIMEOUT, cell_timeout: float = DEFAULT_CELL_TIMEOUT,
                   memory_gib: float = DEFAULT_MEMORY_GIB, isolate: bool | None = None,
                   settings: Settings | None = None, content: bytes | None = None) -> NotebookReport:
    """Run a copy of one notebook in a sandbox and grade every exercise of its topic (see the module doc).

    `settings` (a `Settings`) replaces the keyword arguments when given; `content` is the notebook's
    bytes as handed in (a cohort reads them all before any notebook runs), else `path` is read."""
    s = settings or Settings(timeout=timeout, cell_timeout=cell_timeout, memory=int(memory_gib * (1 << 30)),
                             isolate=isolate)
    path = Path(path)
    started = time.time()
    report = NotebookReport(path=str(path), topic=topic_of(path.name), isolation_off=s.isolate is False)
    try:
        if report.topic is None:
            report.problem = (f"cannot tell which notebook {path.name!r} is: its name must start with the "
                              f"course's number, like 01_gradcam.ipynb")
            return report
        nb, raw, problem = _load_notebook(path, content)
        if nb is None:
            return _all(report, "error", problem or "unreadable")
        sources = [c.source if c.cell_type == "code" else "" for c in nb.cells]
        names = [ex.name for ex in _expected_exercises(report.topic)]
        found = A.extract(sources, names, reference_names(report.topic, sources))
        with tempfile.TemporaryDirectory(prefix="course-grade-") as tmp:
            work = Path(tmp)
            os.chmod(work, 0o711)
            if s.answers_only:
                report.ran, report.problem, progress = False, NOT_RUN, _unrun_progress(found)
                verdicts, report.isolated = _run_checks(found, work, s)
            else:
                captures = _captures(found, work / "run" / "values")
                progress, report.isolated = _run_notebook(raw, path.name, work, s, started, captures)
                verdicts, _ = _run_checks(found, work, s)
            _summarise(report, found, progress, verdicts)
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
        if r.isolated is False:
            lines.append(f"  note: {r.isolation}")
        width = max([len(e.name) for e in r.exercises] + [8])
        lines.append(f"  {'exercise':<{width}}  {'status':<11}  reason")
        for e in r.exercises:
            mark = STATUS_MARK.get(e.status, "?")
            reason = e.reason if len(e.reason) <= 160 else e.reason[:157] + "..."
            shown = reason if e.status != "passed" else (
                f"hidden cases: {e.hidden_passed} of {e.hidden_total} passed" if e.hidden_total else "")
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
        props = ET.SubElement(suite, "properties")
        ET.SubElement(props, "property", name="isolation", value=r.isolation)
        for e in r.exercises:
            case = ET.SubElement(suite, "testcase", classname=Path(r.path).stem, name=e.name)
            if e.status == "error":
                ET.SubElement(case, "error", message=e.reason, type=e.status).text = e.reason
            elif e.status != "passed":
                ET.SubElement(case, "failure", message=e.reason, type=e.status).text = e.reason
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Write `path` in one step (a temporary file renamed over it): never half-written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _submissions(folder: Path) -> list[tuple[str, Path]]:
    learners = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = []
    for learner in learners:
        notebooks = sorted(n for n in learner.rglob("*.ipynb") if ".ipynb_checkpoints" not in n.parts)
        found += [(learner.name, n) for n in notebooks]
    return found


def precompute_for(topics: set[str | None]) -> None:
    """Train and evaluate, once and in a trusted process, what the topics' notebooks load from the result
    cache; each sandbox then reads it (and cannot write it)."""
    from course_utils.config import CFG

    modules = sorted({RECIPES[t] for t in topics if t in RECIPES})
    if not modules:
        return
    argv = [sys.executable, "-m", "course_utils.cache", "precompute", "--tier", CFG.mode, "--only-modules"]
    # its progress goes to stderr: stdout is the grader's report table
    subprocess.run(argv + [a for m in modules for a in ("--module", m)], check=False, stdout=sys.stderr)


def _restore(originals: dict[Path, bytes]) -> list[str]:
    """Put back any submission that changed while the cohort was graded (only possible without isolation)."""
    changed = []
    for path, raw in originals.items():
        try:
            same = path.read_bytes() == raw
        except OSError:
            same = False
        if not same:
            changed.append(str(path))
            path.write_bytes(raw)
    return changed


def grade_cohort(folder: Path, out: Path, *, timeout: float = DEFAULT_TIMEOUT,
                 cell_timeout: float = DEFAULT_CELL_TIMEOUT, jobs: int | None = None,
                 memory_gib: float = DEFAULT_MEMORY_GIB, isolate: bool | None = None,
                 precompute: bool = True, answers_only: bool = False) -> list[tuple[str, list[NotebookReport]]]:
    """Grade every learner's folder under `folder`, `jobs` notebooks at a time (default: the cores);
    write per-learner JSON and a scoreboard (CSV, Markdown) into `out`, each in one step, at the end.
    `answers_only`: check every answer without running the notebooks (see the module doc)."""
    from tqdm.auto import tqdm

    subs = _submissions(folder)
    out.mkdir(parents=True, exist_ok=True)
    originals = {p: p.read_bytes() for _, p in subs}
    s = Settings(timeout=timeout, cell_timeout=cell_timeout, memory=int(memory_gib * (1 << 30)), isolate=isolate,
                 hide=(folder.resolve(), out.resolve()), answers_only=answers_only)
    if precompute and not answers_only:
        precompute_for({topic_of(p.name) for _, p in subs})
    reports: dict[Path, NotebookReport] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        futures = {pool.submit(grade_notebook, p, settings=s, content=originals[p]): p for _, p in subs}
        for fut in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="grading", unit="notebook"):
            reports[futures[fut]] = fut.result()
    for path in _restore(originals):
        print(f"warning: {path} was changed while grading (without isolation) and has been put back", flush=True)
    results = [(learner, [reports[p] for who, p in subs if who == learner])
               for learner in dict.fromkeys(who for who, _ in subs)]
    for learner, rs in results:
        write_atomically(out / f"{learner}.json", json.dumps(to_json(rs), indent=1) + "\n")
        print(f"{learner}: {sum(r.score for r in rs):g}/{sum(r.max_score for r in rs):g}", flush=True)
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
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header] + rows)
    write_atomically(out / "scoreboard.csv", buf.getvalue())
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    write_atomically(out / "scoreboard.md", "\n".join(md) + "\n")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m course_utils.grade", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", type=Path, help="notebooks to grade")
    ap.add_argument("--json", type=Path, help="write a JSON report here")
    ap.add_argument("--junit", type=Path, help="write a JUnit XML report here (for CI pages)")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per notebook (default 1800)")
    ap.add_argument("--cell-timeout", type=float, default=DEFAULT_CELL_TIMEOUT, help="seconds per cell (default 600)")
    ap.add_argument("--memory", type=float, default=DEFAULT_MEMORY_GIB,
                    help="GiB of address space per notebook (default 8)")
    ap.add_argument("--no-isolation", action="store_true",
                    help="do not use bubblewrap (resource limits and a process-group kill only)")
    ap.add_argument("--cohort", type=Path, help="a folder with one sub-folder of notebooks per learner")
    ap.add_argument("--out", type=Path, default=Path("grades"), help="with --cohort: where the scoreboard goes")
    ap.add_argument("--jobs", type=int, default=None, help="notebooks graded at once (default: the number of cores)")
    ap.add_argument("--no-precompute", action="store_true",
                    help="do not fill the result cache first (the sandbox cannot write it, so each notebook then "
                         "trains its own networks, on every run)")
    ap.add_argument("--answers-only", action="store_true",
                    help="check every answer from the notebook's code without running the notebook (much faster; "
                         "the reports say the notebooks were not run)")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _, nb, progress, cell_timeout, deadline, captures = argv
        todo = json.loads(Path(captures).read_text(encoding="utf-8"))
        return _run_worker(Path(nb), Path(progress), float(cell_timeout), float(deadline), todo)
    ap = _parser()
    args = ap.parse_args(argv)
    isolate = False if args.no_isolation else None
    if args.jobs is not None and args.jobs < 1:
        ap.error("--jobs must be at least 1")
    if args.cohort:
        if not args.cohort.is_dir():
            ap.error(f"--cohort {args.cohort}: not a folder")
        results = grade_cohort(args.cohort, args.out, timeout=args.timeout, cell_timeout=args.cell_timeout,
                               jobs=args.jobs, memory_gib=args.memory, isolate=isolate,
                               precompute=not args.no_precompute, answers_only=args.answers_only)
        print(f"scoreboard: {args.out / 'scoreboard.md'} and {args.out / 'scoreboard.csv'}")
        return 0 if results and all(r.passed for _, rs in results for r in rs) else 1
    if not args.notebooks:
        ap.error("name at least one notebook (or --cohort DIR)")
    missing = [str(p) for p in args.notebooks if not p.is_file()]
    if missing:
        ap.error(f"no such notebook: {', '.join(missing)}")
    s = Settings(timeout=args.timeout, cell_timeout=args.cell_timeout, memory=int(args.memory * (1 << 30)),
                 isolate=isolate, hide=tuple(p.resolve() for p in (args.json, args.junit) if p and p.is_dir()),
                 answers_only=args.answers_only)
    if not (args.no_precompute or args.answers_only):
        precompute_for({topic_of(p.name) for p in args.notebooks})
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs or os.cpu_count() or 1) as pool:
        reports = list(pool.map(lambda nb: grade_notebook(nb, settings=s), args.notebooks))
    print(format_table(reports))
    if args.json:
        write_atomically(args.json, json.dumps(to_json(reports), indent=1) + "\n")
    if args.junit:
        write_atomically(args.junit, to_junit(reports))
    return 0 if reports and all(r.passed for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
