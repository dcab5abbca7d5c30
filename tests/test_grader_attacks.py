"""The grader against a hostile learner: every attack scores 0 and leaves everything else intact.

A cohort of hostile learners (each a blank learner notebook plus one attack) and one honest learner
is graded through the command line, with bubblewrap where it works here and without isolation
always. Each attack must give zero forged points, a report, untouched originals and scoreboard,
no process left behind, and the grader's normal exit code (1: not everyone passed). The fast unit
tests below prove each layer alone: the answer screen, the signed verdicts, the sandbox.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from course_utils import answers, sandbox, verdict
from course_utils.checks import exercises_of

EX = [ex.name for ex in exercises_of("orientation")]
FUNCS = {name: name.split(".")[1] for name in EX}
ROOT = Path(__file__).resolve().parent.parent
BWRAP = pytest.mark.skipif(sandbox.bubblewrap() is None,
                           reason=f"isolation cannot be tested here: {sandbox.why_not_isolated()}")


# --------------------------------------------------------------------------------------------
# The hostile notebooks
# --------------------------------------------------------------------------------------------
def _blank() -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "notebooks" / "00_orientation.ipynb", as_version=4)


def _after_setup(nb, code: str):
    setup = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "seed_everything()" in c.source)
    nb.cells.insert(setup + 1, nbformat.v4.new_code_cell(code))
    return nb


def _replace_def(nb, fn: str, code: str):
    i = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code" and f"def {fn}(" in c.source)
    nb.cells[i].source = code
    return nb


FORGE_LOG = f"""
import glob, json, os
names = {EX!r}
targets = [os.environ.get("COURSE_GRADE_LOG"), "checks.jsonl", "progress.jsonl", "verdicts.jsonl",
           "../check/verdicts.jsonl", *glob.glob("*.jsonl")]
for t in filter(None, targets):
    try:
        with open(t, "a") as fh:
            for n in names:
                fh.write(json.dumps({{"name": n, "status": "passed", "message": "forged"}}) + "\\n")
                fh.write(json.dumps({{"cell": 99, "status": "ok", "name": n}}) + "\\n")
    except OSError:
        pass
"""

RECORD = f"""
from course_utils import checks as _c
for n in {EX!r}:
    _c._record(_c.Outcome(n, "passed", "forged"))
"""

PATCH = """
import course_utils.checks as _c
_c.evaluate = lambda name, answer, **k: _c.Outcome(name, "passed", "patched")
_c.check = lambda name, answer, **k: print("✓", name)
check = _c.check
"""

REFERENCE = {  # five ways to hand in the course's own answer
    "flatten_images": "from course_utils.exercises.orientation import flatten_images",
    "channel_means": "from course_utils.checks import get_exercise\n"
                     "channel_means = get_exercise('orientation.channel_means').reference",
    "image_grid": "from course_utils.exercises import orientation as _o\n\n"
                  "def image_grid(images, rows):\n    return _o.image_grid(images, rows)",
    "attention_scores": "def attention_scores(q, k):\n"
                        "    m = __import__('course_utils.exercises.orientation', fromlist=['x'])\n"
                        "    return m.attention_scores(q, k)",
    "capture_activations": "import importlib\n\ndef capture_activations(model, layer_names, x):\n"
                           "    m = importlib.import_module('course_utils.exercises.orientation')\n"
                           "    return m.capture_activations(model, layer_names, x)",
}

FORGE_VERDICT = f"""
def flatten_images(images):
    import json, os
    if os.path.basename(os.getcwd()) != "check":  # behave in the notebook, attack in the grader's check
        raise NotImplementedError("later")
    with open("verdicts.jsonl", "a") as fh:
        for n in {EX!r}:
            fh.write(json.dumps({{"name": n, "status": "passed", "message": "", "case": None, "mistake": None,
                                 "hidden_passed": 1, "hidden_total": 1, "mac": "0" * 64}}) + "\\n")
    os.abort()
"""

KILL = """
import os, signal
for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        continue
    if pid != os.getpid() and (b"course_utils" in cmd or pid == os.getppid()):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""


def _outside(targets: list[Path]) -> str:
    return f"""
import os
for t in {[str(t) for t in targets]!r}:
    try:
        os.makedirs(os.path.dirname(t), exist_ok=True)
        with open(t, "w") as fh:
            fh.write("overwritten by a learner")
    except OSError as err:
        print("refused:", err)
"""


def _daemon(tag: int) -> str:
    return f"""
import os, subprocess
subprocess.Popen(["sleep", "{tag}"], start_new_session=True)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execve("/bin/sleep", ["sleep", "{tag + 1}"], {{}})
    os._exit(0)
"""


MEMORY = """
try:
    big = bytearray(64 << 30)
except MemoryError:
    print("64 GiB refused")
chunks = []
while True:
    chunks.append(bytearray(256 << 20))
"""

PRINT = """
import sys
for _ in range(500):
    sys.stdout.write("x" * 1_000_000)
"""


def hostile_cohort(folder: Path, out: Path, tag: int, *, kill: bool) -> dict[str, Path]:
    """{learner: notebook} for the honest `ada` and one learner per attack."""
    nbs = {"ada": nbformat.read(ROOT / "solutions" / "00_orientation.ipynb", as_version=4),
           "forged_log": _after_setup(_blank(), FORGE_LOG), "record": _after_setup(_blank(), RECORD),
           "patched": _after_setup(_blank(), PATCH), "daemon": _after_setup(_blank(), _daemon(tag)),
           "memory": _after_setup(_blank(), MEMORY), "gigabytes": _after_setup(_blank(), PRINT),
           "verdict_forger": _replace_def(_blank(), "flatten_images", FORGE_VERDICT)}
    nb = _blank()
    for fn, code in REFERENCE.items():
        _replace_def(nb, fn, code)
    nbs["reference"] = nb
    if kill:
        nbs["kill_parent"] = _after_setup(_blank(), KILL)
    paths = {who: folder / who / "00_orientation.ipynb" for who in [*nbs, "outside"]}
    nbs["outside"] = _after_setup(_blank(), _outside([paths["outside"], paths["ada"], out / "scoreboard.csv",
                                                      out / "ada.json", folder / "zed" / "00_orientation.ipynb"]))
    for who, nb in nbs.items():
        paths[who].parent.mkdir(parents=True)
        nbformat.write(nb, paths[who])
    return paths


def _procs(word: str) -> list[str]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if word in cmd:
                found.append(cmd)
    return found


def _grade_hostile(tmp: Path, isolate: bool) -> tuple[subprocess.CompletedProcess, dict, Path, dict, int]:
    folder, out = tmp / "cohort", tmp / "grades"
    out.mkdir()
    tag = random.randint(400_000, 800_000) * 2
    paths = hostile_cohort(folder, out, tag, kill=isolate)
    digests = {who: hashlib.sha256(p.read_bytes()).hexdigest() for who, p in paths.items()}
    argv = [sys.executable, "-m", "course_utils.grade", "--cohort", str(folder), "--out", str(out), "--jobs", "2",
            "--no-precompute", "--cell-timeout", "60", "--timeout", "400", "--memory", "5"]
    run = subprocess.run(argv + ([] if isolate else ["--no-isolation"]), capture_output=True, text=True,
                         timeout=1500, cwd=ROOT)
    time.sleep(1)
    return run, {"paths": paths, "digests": digests}, out, {"tag": tag}, tag


@pytest.fixture(scope="module", params=[pytest.param(True, marks=BWRAP, id="bubblewrap"),
                                        pytest.param(False, id="without-isolation")])
def hostile(request, tmp_path_factory):
    return (request.param, *_grade_hostile(tmp_path_factory.mktemp("hostile"), request.param))


def test_the_grader_survives_and_exits_normally(hostile):
    isolate, run, _, out, _, _ = hostile
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]  # not everyone passed; nobody crashed it
    assert (out / "scoreboard.csv").is_file() and (out / "scoreboard.md").is_file()


def test_every_attack_scores_zero_and_the_honest_learner_full_marks(hostile):
    _, run, files, out, _, _ = hostile
    rows = {r["learner"]: r for r in csv.DictReader((out / "scoreboard.csv").open())}
    assert set(rows) == set(files["paths"]), rows.keys()  # no learner added, none lost
    assert rows["ada"]["total"] == "5", run.stdout[-3000:]
    forged = {who: r["total"] for who, r in rows.items() if who != "ada" and r["total"] != "0"}
    assert not forged, f"forged points: {forged}\n{run.stdout[-3000:]}"


def test_every_learner_has_a_report_and_no_report_claims_isolation_it_lacked(hostile):
    isolate, _, files, out, _, _ = hostile
    for who in files["paths"]:
        report = json.loads((out / f"{who}.json").read_text())
        assert len(report["notebooks"][0]["exercises"]) == 5, who
        iso = report["notebooks"][0]["isolation"]
        assert ("WITHOUT isolation" in iso) is (not isolate), (who, iso)


def test_answers_from_the_package_say_so(hostile):
    out = hostile[3]
    reasons = [e["reason"] for e in json.loads((out / "reference.json").read_text())["notebooks"][0]["exercises"]]
    assert all(answers.USES_REFERENCE in r or answers.REACHES_GRADER in r for r in reasons), reasons
    assert sum(answers.USES_REFERENCE in r for r in reasons) >= 3, reasons


def test_a_forged_verdict_file_is_ignored(hostile):
    out = hostile[3]
    report = json.loads((out / "verdict_forger.json").read_text())["notebooks"][0]
    assert report["score"] == 0 and report["exercises"][0]["status"] == "error", report["exercises"][0]
    assert "did not finish" in report["exercises"][0]["reason"]


def test_originals_and_other_learners_are_untouched(hostile):
    _, _, files, out, _, _ = hostile
    for who, path in files["paths"].items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == files["digests"][who], who
    assert "overwritten" not in (out / "scoreboard.csv").read_text()
    assert "overwritten" not in (out / "ada.json").read_text()


def test_no_process_is_left_behind(hostile):
    tag = hostile[-1]
    assert not _procs(f"sleep {tag}") and not _procs(f"sleep {tag + 1}")


def test_a_killer_notebook_cannot_reach_the_grader(hostile):
    isolate, _, _, out, _, _ = hostile
    if not isolate:
        pytest.skip("without isolation a notebook can signal the grader (so this learner is not graded here): "
                    "bubblewrap's PID namespace is what stops it")
    report = json.loads((out / "kill_parent.json").read_text())
    assert report["score"] == 0 and len(report["notebooks"][0]["exercises"]) == 5


# --------------------------------------------------------------------------------------------
# Each layer alone (fast)
# --------------------------------------------------------------------------------------------
def _extract(cells: list[str]) -> dict[str, answers.Answer]:
    refs = {ex.reference.__name__ for ex in exercises_of("orientation")}
    return answers.extract(cells, EX[:1], refs)


def test_the_answer_is_the_function_the_check_saw():
    cells = ["import torch\nfrom einops import rearrange", "def flatten_images(x):\n    return 1",
             "def flatten_images(x):\n    return rearrange(x, 'b c h w -> b (c h w)')", "x = train_for_an_hour()",
             'check("orientation.flatten_images", flatten_images)', "def flatten_images(x):\n    return 2"]
    ans = _extract(cells)[EX[0]]
    assert ans.cells == [0, 2] and "rearrange" in ans.source and "return 1" not in ans.source
    assert "train_for_an_hour" not in ans.source and ans.cheat is None and ans.check_cell == 4


@pytest.mark.parametrize("cell,word", [
    ("from course_utils.exercises.orientation import flatten_images", answers.USES_REFERENCE),
    ("from course_utils.checks import get_exercise\nflatten_images = get_exercise('x').reference",
     answers.USES_REFERENCE),
    ("import sys\ndef flatten_images(x):\n    return sys._getframe(1).f_locals['expected']", answers.REACHES_GRADER),
    ("def flatten_images(x):\n    return getattr(__builtins__, 'ev' + 'al')('1')", answers.REACHES_GRADER),
    ("import os\ndef flatten_images(x):\n    os._exit(0)", answers.REACHES_GRADER),
])
def test_the_screen_refuses_what_is_not_the_learners_own(cell, word):
    ans = _extract([cell, 'check("orientation.flatten_images", flatten_images)'])[EX[0]]
    assert ans.cheat is not None and word in ans.cheat


def test_a_deleted_check_is_missing():
    ans = _extract(["def flatten_images(x):\n    return x"])[EX[0]]
    assert ans.check_cell is None and "deleted" in ans.problem


def test_verdicts_need_the_key():
    key, path = os.urandom(32), Path(os.environ.get("TMPDIR", "/tmp")) / f"v{os.getpid()}.jsonl"
    good = {"name": "a", "status": "failed"}
    path.write_text("\n".join([verdict.sign(key, good), verdict.sign(b"guess", {"name": "b", "status": "passed"}),
                               json.dumps({"name": "c", "status": "passed", "mac": "0" * 64}), "not json"]) + "\n")
    try:
        assert verdict.read_signed(path, key) == {"a": good}
        tampered = json.loads(verdict.sign(key, good)) | {"status": "passed"}
        path.write_text(json.dumps(tampered) + "\n")
        assert verdict.read_signed(path, key) == {}
    finally:
        path.unlink()


def test_the_runtime_watch_catches_a_reference_the_screen_missed(tmp_path):
    job = {"name": "orientation.image_grid", "target": "image_grid", "timeout": 60,
           "parts": [[0, "from course_utils.exercises import orientation as _o\n\ndef image_grid(images, rows):\n"
                         "    return _o.image_grid(images, rows)\n", [1, 3]]]}
    row = verdict.check_one(job, tmp_path, seed=1, values={})
    assert row["status"] == "failed" and answers.USES_REFERENCE in row["message"], row


def test_an_honest_answer_passes_the_hidden_cases(tmp_path):
    job = {"name": "orientation.image_grid", "target": "image_grid", "timeout": 60,
           "parts": [[0, "from einops import rearrange\n\ndef image_grid(images, rows):\n"
                         "    return rearrange(images, '(gh gw) c h w -> c (gh h) (gw w)', gh=rows)\n", [1, 3]]]}
    row = verdict.check_one(job, tmp_path, seed=7, values={})
    assert row["status"] == "passed" and row["hidden_total"] >= 1 and row["hidden_passed"] == row["hidden_total"]


def test_an_answer_fitted_to_the_public_cases_fails_the_hidden_ones(tmp_path):
    fitted = ("import torch\nfrom einops import rearrange\n\ndef image_grid(images, rows):\n"
              "    if images.shape[1:] in [(3, 4, 5), (1, 3, 3), (1, 2, 2)]:\n"
              "        return rearrange(images, '(gh gw) c h w -> c (gh h) (gw w)', gh=rows)\n"
              "    return torch.zeros(1)\n")
    job = {"name": "orientation.image_grid", "target": "image_grid", "timeout": 60, "parts": [[0, fitted, [1, 2, 4]]]}
    row = verdict.check_one(job, tmp_path, seed=7, values={})
    assert row["status"] == "failed" and "hidden" in row["message"] and row["hidden_passed"] == 0, row


def test_values_cross_as_data_only(tmp_path):
    import torch

    value = {"a": torch.arange(3.0), "b": [1, 2.5, "x", None, (True,)]}
    answers.dump_values(tmp_path, {"answer": value})
    assert answers.load_values(tmp_path)["answer"]["b"] == [1, 2.5, "x", None, (True,)]
    assert torch.equal(answers.load_values(tmp_path)["answer"]["a"], value["a"])
    with pytest.raises(TypeError, match="cannot be graded as a value"):
        answers.dump_values(tmp_path, {"answer": object()})
    (tmp_path / "values.json").write_text("{not json")
    assert answers.load_values(tmp_path) == {}


def _sandboxed(tmp_path: Path, code: str, isolate: bool, **kw) -> sandbox.Finished:
    return sandbox.run([sys.executable, "-c", code], scratch=tmp_path, env=dict(os.environ), timeout=60,
                       isolate=isolate, **kw)


@pytest.mark.parametrize("isolate", [pytest.param(True, marks=BWRAP, id="bubblewrap"),
                                     pytest.param(False, id="without-isolation")])
def test_the_sandbox_ends_every_process_it_started(tmp_path, isolate):
    tag = random.randint(400_000, 800_000) * 2 + 1
    code = (f"import os, subprocess\nsubprocess.Popen(['sleep', '{tag}'], start_new_session=True)\n"
            f"if os.fork() == 0:\n    os.setsid()\n    os.execve('/bin/sleep', ['sleep', '{tag}'], {{}})\n")
    done = _sandboxed(tmp_path, code, isolate)
    assert done.returncode == 0 and done.isolated is isolate
    time.sleep(0.5)
    assert not _procs(f"sleep {tag}")


@pytest.mark.parametrize("isolate", [pytest.param(True, marks=BWRAP, id="bubblewrap"),
                                     pytest.param(False, id="without-isolation")])
def test_the_sandbox_limits_memory_and_time(tmp_path, isolate):
    done = _sandboxed(tmp_path, "bytearray(3 << 30)", isolate, limits=sandbox.Limits(memory=2 << 30))
    assert done.returncode == 1  # MemoryError
    began = time.time()
    done = sandbox.run([sys.executable, "-c", "while True: pass"], scratch=tmp_path, env=dict(os.environ),
                       timeout=2, isolate=isolate)
    assert done.timed_out and time.time() - began < 30


@BWRAP
def test_bubblewrap_hides_folders_and_keeps_everything_else_read_only(tmp_path):
    secret, scratch = tmp_path / "secret", tmp_path / "scratch"
    secret.mkdir()
    scratch.mkdir()
    (secret / "a.txt").write_text("classmate")
    code = (f"import os\nassert os.listdir({str(secret)!r}) == []\nopen('mine.txt', 'w').write('ok')\n"
            f"try:\n    open({str(ROOT / 'README.md')!r}, 'a')\nexcept OSError:\n    pass\n"
            f"else:\n    raise SystemExit(5)\n"
            f"assert os.getpid() < 10\n")
    done = sandbox.run([sys.executable, "-c", code], scratch=scratch, env=dict(os.environ), timeout=60,
                       hide=[secret], isolate=True)
    assert done.returncode == 0 and (scratch / "mine.txt").read_text() == "ok"
    assert (secret / "a.txt").read_text() == "classmate"
