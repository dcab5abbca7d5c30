"""GPU kernels (Triton) for the course's costly numerics, each with a PyTorch reference beside it.

Dispatch is on the device: a CUDA tensor with Triton installed uses the kernel, everything else
uses the reference. The kernels are tested on the CPU under `TRITON_INTERPRET=1` (set before
Triton is imported; `conftest.py` does it on machines without a GPU) against those references.

- `lens_readout`: the fused logit-lens read-out behind `course_utils.lens.lens_stats`.
- `class_moments`: one-pass per-class coordinate moments (sums of x, x^2, x^3, x^4).
"""
from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["triton_available", "interpreting", "use_triton", "require_triton"]


def triton_available() -> bool:
    """Whether the `triton` package can be imported (it ships with PyTorch's Linux CUDA wheels)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(x: torch.Tensor) -> bool:
    """The dispatch rule: a kernel runs for CUDA tensors when Triton is installed."""
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
