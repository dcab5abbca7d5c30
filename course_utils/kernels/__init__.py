"""GPU kernels (Triton) for the course's costly numerics, each with a PyTorch reference beside it.

Every kernel module is a leaf: plain tensors in, plain tensors (a tuple or a NamedTuple) out, and
it imports nothing from `course_utils` outside this package. Each holds three functions,
`<name>_reference` (PyTorch), `<name>_triton` (the kernel) and `<name>` (which of the two runs),
and every `<name>` chooses with the ONE rule below, `dispatch`:

- `backend="reference"`: the PyTorch reference.
- `backend="triton"`: the kernel, or a clear error (`require_triton`) where it cannot run.
- `backend="auto"`: the kernel for CUDA tensors when Triton is installed (`use_triton`), else the
  reference; if the kernel fails (a GPU whose compiler chokes), a warning and the reference.

The kernels are tested on the CPU under `TRITON_INTERPRET=1` (set before Triton is imported;
`conftest.py` does it on machines without a GPU) against those references.

- `lens_readout`: the fused logit-lens read-out behind `course_utils.lens.lens_stats`.
- `class_moments`: one-pass per-class coordinate moments (sums of x, x^2, x^3, x^4).
- `spd`: Newton–Schulz SPD square roots (PyTorch matmuls; no Triton, no dispatch).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["BACKENDS", "triton_available", "interpreting", "use_triton", "require_triton", "pick_backend",
           "dispatch"]

BACKENDS = ("auto", "reference", "triton")
T = TypeVar("T")


def triton_available() -> bool:
    """Whether the `triton` package can be imported (it ships with PyTorch's Linux CUDA wheels)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(x: torch.Tensor) -> bool:
    """What "auto" chooses: the kernel for CUDA tensors when Triton is installed."""
    return x.is_cuda and triton_available()


def require_triton(x: torch.Tensor, what: str) -> None:
    """Raise a clear error when `what` cannot run a Triton kernel on `x`."""
    if not triton_available():
        raise RuntimeError(f"{what}: the Triton backend needs the `triton` package (pip install triton); "
                           "use backend='reference' instead")
    if not (x.is_cuda or interpreting()):
        raise RuntimeError(f"{what}: the Triton backend runs on CUDA tensors (got a {x.device.type} tensor). "
                           "Move the inputs to the GPU, use backend='reference', or, for testing on a CPU, "
                           "set TRITON_INTERPRET=1 before importing triton")


def pick_backend(x: torch.Tensor, backend: str, what: str) -> str:
    """`"triton"` or `"reference"`: what `backend` ("auto", "reference" or "triton") means for `x`.

    An explicit "triton" that cannot run on `x` raises `require_triton`'s error.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{what}: unknown backend {backend!r}; use 'auto' (the Triton kernel for CUDA "
                         "tensors, else PyTorch), 'reference' (PyTorch) or 'triton'")
    if backend == "triton":
        require_triton(x, what)
    if backend == "auto":
        return "triton" if use_triton(x) else "reference"
    return backend


def dispatch(x: torch.Tensor, backend: str, *, reference: Callable[[], T], triton: Callable[[], T], what: str) -> T:
    """Run `triton()` or `reference()` (no-argument calls, e.g. lambdas) as `pick_backend(x, backend)` says.

    When "auto" chose the kernel and it fails, warn and return `reference()`: a learner's GPU
    keeps working. An explicit `backend="triton"` never falls back: its error propagates.
    """
    if pick_backend(x, backend, what) == "reference":
        return reference()
    if backend == "triton":
        return triton()
    try:
        return triton()
    except Exception as err:  # a kernel that fails to compile must not stop the notebook
        warnings.warn(f"{what}: the 'triton' backend failed ({type(err).__name__}: {err}); using the PyTorch "
                      "reference instead (the same statistics, slower). Pass backend='reference' to skip it.",
                      RuntimeWarning, stacklevel=3)
        return reference()
