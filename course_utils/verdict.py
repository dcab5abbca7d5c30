"""Check a notebook's answers in a fresh process that the notebook never touched, and sign the verdicts.

    python -m course_utils.verdict     # reads a job (JSON) on stdin; the grader starts it in a sandbox

The grader (`course_utils.grade`) extracts each answer's source from the notebook's cells
(`course_utils.answers`), and starts this module in a sandbox with, on stdin, a one-time key, the
seed of the hidden cases and the answers. For each exercise it runs the answer's statements alone
(compiled with the cell's own file name, so a traceback shows the learner's line), calls the public
`checks.evaluate(name, answer)` on the exercise's cases, then on its hidden cases (drawn from
`HIDDEN_CASES` in `exercises/<topic>.py` with the secret seed), and writes one line per exercise,
signed with the key (HMAC-SHA256), to `verdicts.jsonl`. A line without a valid signature is ignored.

While the learner's code runs, a profiler watches for calls into the course's reference answers
and known mistakes, into the check registry, and into the interpreter's tracing and exit
machinery: any of them gives the exercise 0 points and says why. Each exercise has a time limit
(`signal.alarm`); the grader's own time limit covers the rest.
"""
from __future__ import annotations

import ast
import hashlib
import hmac
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from course_utils import checks
from course_utils.answers import REACHES_GRADER, USES_REFERENCE, load_values

VERDICTS = "verdicts.jsonl"
_EXERCISES_DIR = str(Path(checks.__file__).resolve().parent / "exercises")


def sign(key: bytes, row: dict[str, Any]) -> str:
    """`row` as one JSON line with its HMAC-SHA256 under `key` in `row["mac"]`."""
    body = json.dumps(row, sort_keys=True)
    return json.dumps({**row, "mac": hmac.new(key, body.encode(), hashlib.sha256).hexdigest()})


def read_signed(path: Path, key: bytes, limit: int = 4 << 20) -> dict[str, dict[str, Any]]:
    """{exercise: row} of the lines of `path` whose signature is valid (at most `limit` bytes read)."""
    out: dict[str, dict[str, Any]] = {}
    try:
        with open(path, "rb") as fh:
            text = fh.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            row = json.loads(line)
            mac = row.pop("mac")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
        body = json.dumps(row, sort_keys=True)
        if isinstance(mac, str) and hmac.compare_digest(mac, hmac.new(key, body.encode(), hashlib.sha256).hexdigest()):
            out.setdefault(str(row.get("name")), row)
    return out


class _Timeout(BaseException):
    pass


class _Watch:
    """A profiler that notes any call from the learner's code into what no answer may use."""

    def __init__(self, learner_files: set[str]) -> None:
        self.learner = learner_files
        self.codes: dict[Any, str] = {}
        self._seen = -1
        for fn in (checks.get_exercise, checks.exercises_of, checks.evaluate, checks._record, threading.setprofile,
                   threading.settrace):
            self.codes[fn.__code__] = USES_REFERENCE if fn.__module__ == checks.__name__ else REACHES_GRADER
        self.builtins = {id(f): REACHES_GRADER for f in (sys.setprofile, sys.settrace, os._exit, os.kill, os.killpg,
                                                         sys._getframe, signal.alarm, signal.signal)}
        self.found: str | None = None
        self._refresh()

    def _refresh(self) -> None:
        """Every reference and mistake of every exercise module imported so far (the learner may import more)."""
        topics = [m.rsplit(".", 1)[1] for m in list(sys.modules) if m.startswith("course_utils.exercises.")]
        if len(topics) == self._seen:
            return
        self._seen = len(topics)
        for topic in topics:
            for ex in checks.exercises_of(topic):
                self.codes[ex.reference.__code__] = USES_REFERENCE
                for m in ex.mistakes:
                    if hasattr(m.fn, "__code__"):
                        self.codes[m.fn.__code__] = USES_REFERENCE

    def _from_learner(self, frame: Any) -> bool:
        while frame is not None:
            if frame.f_code.co_filename in self.learner:
                return True
            frame = frame.f_back
        return False

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if self.found:
            return
        if event == "call" and frame.f_code.co_filename.startswith(_EXERCISES_DIR):
            self._refresh()
        if event == "call" and frame.f_code in self.codes and self._from_learner(frame.f_back):
            self.found = f"{self.codes[frame.f_code]} (it calls {frame.f_code.co_name})"
        elif event == "c_call" and id(arg) in self.builtins and frame.f_code.co_filename in self.learner:
            self.found = f"{REACHES_GRADER} (it calls {getattr(arg, '__name__', 'a builtin')})"

    def __enter__(self) -> _Watch:
        threading.setprofile(self)
        sys.setprofile(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]


def _load_answer(job: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """Run the answer's statements alone, each compiled with its cell's file; returns their namespace."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    for cell, text, lines in job["parts"]:
        path = scratch / f"cell_{cell}.py"
        path.write_text(text, encoding="utf-8")
        tree = ast.parse(text)
        for node in tree.body:
            if node.lineno in lines:
                exec(compile(ast.Module([node], []), str(path), "exec"), namespace)  # noqa: S102
    return namespace


def _answer_of(job: dict[str, Any], namespace: dict[str, Any], values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    mine = values.get(job["name"], {})
    if "answer" in mine:
        return mine["answer"], mine.get("context", {})
    answer = eval(compile(job["target"], "<check>", "eval"), namespace)  # noqa: S307
    return answer, mine.get("context", {})


def _hidden(name: str, seed: int) -> list[checks.Case] | None:
    import importlib

    module = importlib.import_module(f"course_utils.exercises.{name.split('.', 1)[0]}")
    builder = getattr(module, "HIDDEN_CASES", {}).get(name)
    return None if builder is None else builder(checks.generator(seed))


def _evaluate(name: str, answer: Any, context: dict[str, Any], cases: list[checks.Case] | None) -> checks.Outcome:
    ex = checks.get_exercise(name)
    if cases is None:
        return checks.evaluate(name, answer, **context)
    public = ex.cases
    ex.cases = lambda: cases  # the hidden cases, through the same public evaluate
    try:
        return checks.evaluate(name, answer, **context)
    finally:
        ex.cases = public


def check_one(job: dict[str, Any], scratch: Path, seed: int, values: dict[str, Any]) -> dict[str, Any]:
    """The verdict on one answer: {name, status, message, case, mistake, hidden_passed, hidden_total}."""
    name = job["name"]
    row: dict[str, Any] = {"name": name, "hidden_passed": 0, "hidden_total": 0}
    try:
        files = {str(scratch / f"cell_{cell}.py") for cell, _, _ in job["parts"]}
        with _Watch(files) as watch:
            namespace = _load_answer(job, scratch)
            answer, context = _answer_of(job, namespace, values)
            outcome = _evaluate(name, answer, context, None)
            hidden = _hidden(name, seed) if outcome.passed else None
            extra = _evaluate(name, answer, context, hidden) if hidden else None
        if watch.found:
            return {**row, "status": "failed", "message": watch.found}
    except _Timeout:
        return {**row, "status": "timeout", "message": f"checking your answer ran past its time limit of "
                                                       f"{job['timeout']:.0f} s"}
    except BaseException as err:  # a learner's module-level code that raises, or exits
        return {**row, "status": "error", "message": f"your answer's cells raised {checks.describe_exception(err)}"}
    row.update(outcome.to_json())
    row["message"] = outcome.diagnosis or outcome.message  # the report keeps the diagnosis, not the hints
    if hidden:
        row["hidden_total"] = len(hidden)
        row["hidden_passed"] = len(hidden) if extra and extra.passed else 0
        if extra and not extra.passed:
            row.update(status="failed", message=f"passes the notebook's cases but not the {len(hidden)} hidden "
                                                f"case(s): {extra.diagnosis or extra.message}", case=extra.case)
    return row


def _preload(jobs: list[dict[str, Any]]) -> None:
    """Import torch and every exercise module the answers name before any time limit or watch: an
    import cut by the alarm would break every later check, and a module's own registrations must
    not read as the learner's calls."""
    import importlib
    import re

    import torch  # noqa: F401

    from course_utils.exercises import NOTEBOOKS

    text = "\n".join(t for job in jobs for _, t, _ in job["parts"])
    topics = {job["name"].split(".", 1)[0] for job in jobs}
    topics |= set(re.findall(r"course_utils\.exercises\.(\w+)", text)) & set(NOTEBOOKS.values())
    for topic in sorted(topics):
        importlib.import_module(f"course_utils.exercises.{topic}")


def main() -> int:
    job = json.loads(sys.stdin.buffer.read(64 << 20))
    key, seed, scratch = bytes.fromhex(job["key"]), int(job["seed"]), Path.cwd()
    _preload(job["answers"])
    values = {}
    for name in job.get("values", []):
        values[name] = load_values(scratch / "values" / name.replace("/", "_"))
    out = open(scratch / VERDICTS, "a", encoding="utf-8")  # noqa: SIM115

    def alarm(*_: Any) -> None:
        raise _Timeout

    signal.signal(signal.SIGALRM, alarm)
    for answer in job["answers"]:
        signal.alarm(max(1, int(answer["timeout"])))
        try:
            row = check_one(answer, scratch, seed, values)
        except _Timeout:
            row = {"name": answer["name"], "status": "timeout", "message": "time limit"}
        signal.alarm(0)
        out.write(sign(key, row) + "\n")
        out.flush()
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
