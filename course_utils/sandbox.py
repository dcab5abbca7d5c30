"""Run an untrusted command (a learner's notebook, or the check of its answers) in a sandbox.

With bubblewrap (`bwrap`, Debian's `bubblewrap`) the command gets a new PID namespace (it cannot see
or signal the grader or another learner, and every process it started dies with it), no network,
the whole file system read-only except its own scratch folder, a private `/tmp`, the folders in
`hide` replaced by empty ones (the cohort's other submissions, the grades), and `--die-with-parent`.
Without bubblewrap (or with `isolate=False`) it falls back to resource limits, a new session whose
process group is killed at the end, and a hunt for every process it left behind (by an
environment tag, and as the orphans' subreaper); it can then see and signal the grader, and write
wherever the grader's user can, so `Finished.isolated` is False and the grader says so in every
report. Both ways, resource limits apply: address space (`Limits.memory`, 8 GiB by default), file
size and (for a user other than root, whom the kernel does not limit) the number of processes.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import resource
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TAG = "GRADER_SANDBOX_TAG"
_LIVE: set[int] = set()  # pids of the sandboxes running now (the fallback's orphan hunt spares them)
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed command: bytes of address space, bytes per file, processes."""

    memory: int = 8 << 30
    file_size: int = 1 << 30
    processes: int = 1024


@dataclass(frozen=True)
class Finished:
    """How a sandboxed command ended. `returncode` is negative for a signal (as in subprocess)."""

    returncode: int | None
    timed_out: bool
    isolated: bool
    seconds: float


@functools.lru_cache(maxsize=1)
def bubblewrap() -> str | None:
    """The path of a `bwrap` that can create the namespaces here, or None (then the fallback runs)."""
    path = shutil.which("bwrap")
    if path is None:
        return None
    probe = [path, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-pid", "--unshare-net",
             "--die-with-parent", "true"]
    try:
        return path if subprocess.run(probe, capture_output=True, timeout=30).returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def why_not_isolated() -> str:
    """One sentence for reports: why grading runs without isolation here."""
    if shutil.which("bwrap") is None:
        return "bubblewrap (`bwrap`) is not installed; install Debian's `bubblewrap` package"
    return "bubblewrap cannot create namespaces on this machine (a container without user namespaces?)"


def _bwrap_argv(bwrap: str, writable: Path, hide: Sequence[Path], read_only: Sequence[Path]) -> list[str]:
    argv = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--new-session", "--die-with-parent"]
    for folder in hide:
        if folder.is_dir():
            argv += ["--tmpfs", str(folder)]
    for folder in read_only:
        if folder.exists():
            argv += ["--ro-bind", str(folder), str(folder)]
    return argv + ["--bind", str(writable), str(writable), "--chdir", str(writable), "--"]


def _limit(kind: int, value: int) -> None:
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(kind, (value, value))


def _preexec(limits: Limits, processes_now: int) -> None:
    """In the child, before exec: the resource limits."""
    _limit(resource.RLIMIT_AS, limits.memory)
    _limit(resource.RLIMIT_FSIZE, limits.file_size)
    _limit(resource.RLIMIT_CORE, 0)
    if os.geteuid() != 0:  # counted per user, so on top of what the user runs already
        _limit(resource.RLIMIT_NPROC, limits.processes + processes_now)


def _processes_now() -> int:
    uid = os.getuid()
    return sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _owner(p) == uid)


def _owner(proc: Path) -> int | None:
    try:
        return proc.stat().st_uid
    except OSError:
        return None


def _become_subreaper() -> None:
    """Orphans of a sandbox (a daemon that left its session) become our children, so we can end them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _tagged(tag: str) -> list[int]:
    found = []
    needle = f"{TAG}={tag}".encode()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (p / "environ").read_bytes().split(b"\0"):
                    found.append(int(p.name))
    return found


def _orphans() -> list[int]:
    me, found = os.getpid(), []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) not in _LIVE:
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                    found.append(int(p.name))
    return found


def end_everything(tag: str, pgid: int, orphans: bool = True) -> int:
    """Kill the process group `pgid`, every process carrying `tag`, and (`orphans`) every orphan we
    adopted; returns how many were still there. Repeats until none is left (a fork bomb included)."""
    left = 0
    for _ in range(50):
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
        with _LOCK:
            pids = set(_tagged(tag)) | set(_orphans() if orphans else [])
        pids.discard(os.getpid())
        if not pids:
            break
        left += len(pids)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    return left


def _exited(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` s for `pid` to exit, WITHOUT reaping it: while it is a zombie its pid
    (and so its process group's id) cannot be reused, so killing the group later is safe."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
        time.sleep(0.05)
    return False


def _start(argv: list[str], scratch: Path, env: dict[str, str], limits: Limits, streams: dict[str, Any],
           pass_fds: Sequence[int]) -> subprocess.Popen:
    preexec = functools.partial(_preexec, limits, _processes_now() if os.geteuid() else 0)
    with _LOCK:
        proc = subprocess.Popen(argv, cwd=scratch, env=env, start_new_session=True, pass_fds=tuple(pass_fds),
                                preexec_fn=preexec, **streams)
        _LIVE.add(proc.pid)
    return proc


def run(argv: Sequence[str], *, scratch: Path, env: dict[str, str], timeout: float, limits: Limits = Limits(),
        hide: Sequence[Path] = (), read_only: Sequence[Path] = (), isolate: bool | None = None,
        stdout: int | None = subprocess.DEVNULL, stderr: int | None = subprocess.DEVNULL,
        input_bytes: bytes | None = None, pass_fds: Sequence[int] = ()) -> Finished:
    """Run `argv` in a sandbox whose only writable folder is `scratch` (also its working folder), with
    `input_bytes` on its stdin. `isolate=None` uses bubblewrap when it works here; False forces the
    fallback. Never raises for what the command does; when it ends (or after `timeout` seconds),
    nothing it started survives."""
    bwrap = bubblewrap() if isolate in (None, True) else None
    if isolate and bwrap is None:
        raise RuntimeError(f"isolation was asked for, but {why_not_isolated()}")
    tag = uuid.uuid4().hex
    if bwrap is None:
        _become_subreaper()
    full = [*(_bwrap_argv(bwrap, scratch, hide, read_only) if bwrap else []), *argv]
    began = time.time()
    streams = {"stdin": subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL,
               "stdout": stdout, "stderr": stderr}
    proc = _start(full, scratch, {**env, TAG: tag}, limits, streams, pass_fds)
    try:
        if input_bytes is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.write(input_bytes)
                proc.stdin.close()
        timed_out = not _exited(proc.pid, timeout)
    finally:
        end_everything(tag, proc.pid, orphans=bwrap is None)
        proc.wait()
        with _LOCK:
            _LIVE.discard(proc.pid)
    return Finished(None if timed_out else proc.returncode, timed_out, bwrap is not None, time.time() - began)
