"""Root pytest set-up, shared by tests/ and the nbval run over solutions/.

- The ci tier (`COURSE_FAST=1`, the old name of `COURSE_MODE=ci`) is on for the whole suite, unless
  `COURSE_MODE` is set (it wins; see course_utils/config.py).
- The result cache (`course_utils.cache`) starts empty: `COURSE_RESULTS_DIR` is a fresh folder.
- `make test` runs pytest-xdist with `--dist loadscope`: every cell of a notebook (they share one
  kernel) and every test class stays in one worker; tests/test_notebooks.py makes a class per notebook.
- The two workers share two cores, so each process and kernel gets one thread.
- Without a GPU, Triton kernels run in Triton's CPU interpreter (`TRITON_INTERPRET=1`, which must be
  set before Triton is imported), so that tests/test_kernels.py checks them against their references.
"""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("COURSE_FAST", "1")
# One fresh result cache for the whole run (set here, in the controller, so that every xdist
# worker, grader and notebook kernel inherits it): CI measures and tests from an empty cache, and
# nothing a test computes lands in the user's cache.
os.environ.setdefault("COURSE_RESULTS_DIR", tempfile.mkdtemp(prefix="course-results-"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402  (after the thread settings above)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
