"""Run uv with the package indexes pip already uses, so that no index address lives in the repository.

    python tools/uv_pip.py pip compile ...      # any uv command line

uv reads its own settings (UV_INDEX_URL, ...), not pip's. This reads pip's (`pip config list`, which covers the
config files and the PIP_* environment variables) and passes each one on under uv's name. uv's index strategy
is set to pip's (take the best match across all indexes). uv itself is taken from beside this interpreter
or from PATH, or installed with pip into this virtual environment when it is missing.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

# pip's setting -> uv's environment variable (both take space-separated lists where pip does).
PIP_TO_UV = {
    "index-url": "UV_INDEX_URL",
    "extra-index-url": "UV_EXTRA_INDEX_URL",
    "find-links": "UV_FIND_LINKS",
    "constraint": "UV_CONSTRAINT",
    "cert": "SSL_CERT_FILE",
    "trusted-host": "UV_INSECURE_HOST",
    "default-timeout": "UV_HTTP_TIMEOUT",
    "timeout": "UV_HTTP_TIMEOUT",
}


def pip_settings() -> dict[str, str]:
    """pip's effective settings, `name -> value`; later sources (environment variables) win over files."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    found: dict[str, str] = {}
    order = sorted(out.splitlines(), key=lambda line: line.startswith(":env:"))
    for line in order:
        key, sep, value = line.partition("=")
        if sep:
            found[key.split(".", 1)[-1]] = ast.literal_eval(value)
    return found


def uv_environment(args: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    """The current environment plus pip's index settings under uv's names (ones already set are kept).

    When `args` install a lock (`--require-hashes`), pip's constraint files are left out: the lock pins
    every version already, and uv's hash mode refuses a constraint that is not an exact pin.
    """
    env = dict(os.environ)
    for name, value in pip_settings().items():
        if name in PIP_TO_UV and not (name == "constraint" and "--require-hashes" in args):
            env.setdefault(PIP_TO_UV[name], value)
    env.setdefault("UV_INDEX_STRATEGY", "unsafe-best-match")
    return env


def uv_executable() -> str:
    """uv beside this interpreter or on PATH, else installed with pip into this interpreter's virtual
    environment (never into a system Python)."""
    here = os.path.join(os.path.dirname(sys.executable), "uv")
    found = (here if os.path.exists(here) else None) or shutil.which("uv")
    if found is None:
        if sys.prefix == sys.base_prefix:
            sys.exit("uv is missing: run this with a virtual environment's Python (make does), "
                     "or install uv (`pip install uv`)")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "uv"], check=True)
        found = here
    return found


if __name__ == "__main__":
    env = uv_environment(sys.argv[1:])
    sys.exit(subprocess.run([uv_executable(), *sys.argv[1:]], env=env).returncode)
