"""Batched square roots and inverse square roots of SPD matrices by Newton–Schulz iterations.

The coupled iteration (Higham, *Functions of Matrices*, 2008, eq. 6.35), for `A` scaled by its
Frobenius norm `c` so that every eigenvalue lies in (0, 1]:

    Y_0 = A / c,  Z_0 = I,   T_k = (3 I - Z_k Y_k) / 2,   Y_{k+1} = Y_k T_k,   Z_{k+1} = T_k Z_k
    Y_k -> (A/c)^{1/2},  Z_k -> (A/c)^{-1/2},  so  A^{1/2} = sqrt(c) Y,  A^{-1/2} = Z / sqrt(c).

Each step is three batched matrix products, which the GPU's matmul units (cuBLAS) run far faster
than `torch.linalg.eigh` runs its eigendecompositions; a Triton matmul would not beat cuBLAS, so
this "kernel" is PyTorch. The first phase runs in float32 (TF32 on a CUDA GPU); the last steps run
in the input's dtype. The coupled steps keep `Z Y = I` but do not see `A` again, so the fast
phase's rounding stays in `Y Y - A` at about float32's precision times the condition number: the
residual reports it. An eigenvalue `lambda` of `A/c` needs about `log_1.5(1/sqrt(lambda))` steps to be
reached, so badly conditioned matrices need a ridge or many steps; `sqrt_inv_sqrt_newton` reports
its residual, and callers fall back to `eigh` where it is too large.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["sqrt_inv_sqrt_newton", "newton_residual"]


@contextmanager
def _fast_matmuls(device: torch.device) -> Iterator[None]:
    """TF32 matmuls on CUDA for the duration (no effect on the CPU)."""
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def newton_residual(A: torch.Tensor, Y: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """`max(||Y Y - A||_F / ||A||_F, ||Z Y - I||_F / sqrt(d))` per matrix `[...]`: 0 when `Y` is
    exactly `A`'s square root and `Z` exactly its inverse."""
    d = Y.shape[-1]
    eye = torch.eye(d, dtype=Y.dtype, device=Y.device)
    root_err = torch.linalg.matrix_norm(Y @ Y - A) / torch.linalg.matrix_norm(A)
    return torch.maximum(root_err, torch.linalg.matrix_norm(Z @ Y - eye) / d ** 0.5)


def _diverged(worst: float) -> bool:
    return worst != worst or worst > 1e3  # NaN, or blown up


def _iterate(A: torch.Tensor, Y: torch.Tensor, Z: torch.Tensor, steps: int, tol: float
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The coupled Newton–Schulz steps, checked every 4 steps."""
    eye = torch.eye(Y.shape[-1], dtype=Y.dtype, device=Y.device)
    for step in range(1, steps + 1):
        T = 1.5 * eye - 0.5 * (Z @ Y)
        Y, Z = Y @ T, T @ Z
        if step % 4 == 0:
            worst = float(newton_residual(A, Y, Z).max())
            if worst < tol or _diverged(worst):
                break
    return Y, Z


@torch.no_grad()
def sqrt_inv_sqrt_newton(mat: torch.Tensor, *, max_steps: int = 60, fast_tol: float = 1e-3, tol: float = 1e-6,
                         refine_steps: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(mat^{1/2}, mat^{-1/2}, residual)` of SPD `mat` `[..., d, d]` (batched) by Newton–Schulz.

    Runs up to `max_steps` float32 (TF32 on CUDA) steps until `newton_residual < fast_tol`, then
    up to `refine_steps` more steps in `mat`'s dtype until it is below `tol`.
    `residual` `[...]` is the final `newton_residual` of the scaled matrix: check it; eigenvalues far
    below `fast_tol * largest` converge slowly, and a residual above `tol` means "use eigh".
    """
    if mat.ndim < 2 or mat.shape[-1] != mat.shape[-2]:
        raise ValueError(f"mat must be a (batch of) square matrices [..., d, d], got {list(mat.shape)}")
    c = torch.linalg.matrix_norm(mat).clamp_min(torch.finfo(mat.dtype).tiny)[..., None, None]
    A = mat / c
    eye = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device).expand_as(mat)
    with _fast_matmuls(mat.device):
        Y, Z = _iterate(A.float(), A.float(), eye.float(), max_steps, fast_tol)
    Y, Z = _iterate(A, Y.to(mat.dtype), Z.to(mat.dtype), refine_steps, tol)
    Y, Z = 0.5 * (Y + Y.transpose(-1, -2)), 0.5 * (Z + Z.transpose(-1, -2))
    return Y * c.sqrt(), Z / c.sqrt(), newton_residual(A, Y, Z)
