"""Streaming class-conditional coordinate moments: one pass over the data, every class at once.

For data `x` `[N, d]`, labels `y` `[N]` in `0..C-1` and a shift `a` `[d]` (e.g. a rough mean, to
keep the sums well conditioned), returns the power sums

    S_p[c, j] = sum_{n : y_n = c} (x[n, j] - a[j])^p,   p = 1..4,   as `[4, C, d]`, and counts `[C]`,

from which every class's per-coordinate mean, variance, skewness and kurtosis follow
(`moments.coordinate_moments`). The Triton kernel gives each program a block of coordinates and
sweeps all rows once, accumulating `onehot(y)^T @ (x - a)^p` for the four powers with `tl.dot`, so
`x` is read once and no `[N, d]` temporaries (`x^2`, `x^3`, ...) are made, unlike the reference.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from course_utils.kernels import dispatch, require_triton

__all__ = ["PowerSums", "class_power_sums", "class_power_sums_reference", "class_power_sums_triton"]


class PowerSums(NamedTuple):
    """`sums [4, C, d]`: `S_p[c, j]` for p = 1..4 (see the module docstring); `counts [C]` int64."""

    sums: torch.Tensor
    counts: torch.Tensor

_kernel = None


def _build_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def power_sums_kernel(x_ptr, y_ptr, a_ptr, out_ptr, N, D, C, CP: tl.constexpr, BN: tl.constexpr,
                          BD: tl.constexpr):
        cols = tl.program_id(0) * BD + tl.arange(0, BD)
        col_ok = cols < D
        classes = tl.arange(0, CP)
        shift = tl.load(a_ptr + cols, mask=col_ok, other=0.0)
        s1 = tl.zeros([CP, BD], tl.float32)
        s2 = tl.zeros([CP, BD], tl.float32)
        s3 = tl.zeros([CP, BD], tl.float32)
        s4 = tl.zeros([CP, BD], tl.float32)
        for n0 in range(0, N, BN):
            rows = n0 + tl.arange(0, BN)
            row_ok = rows < N
            y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            x = tl.where(row_ok[:, None], x - shift[None, :], 0.0)
            onehot_t = (classes[:, None] == y[None, :]).to(tl.float32)  # [CP, BN]
            x2 = x * x
            s1 += tl.dot(onehot_t, x, input_precision="ieee")
            s2 += tl.dot(onehot_t, x2, input_precision="ieee")
            s3 += tl.dot(onehot_t, x2 * x, input_precision="ieee")
            s4 += tl.dot(onehot_t, x2 * x2, input_precision="ieee")
        at = classes[:, None] * D + cols[None, :]
        ok = (classes[:, None] < C) & col_ok[None, :]
        plane = C * D
        tl.store(out_ptr + at, s1, mask=ok)
        tl.store(out_ptr + plane + at, s2, mask=ok)
        tl.store(out_ptr + 2 * plane + at, s3, mask=ok)
        tl.store(out_ptr + 3 * plane + at, s4, mask=ok)

    return power_sums_kernel


def _check(x: torch.Tensor, y: torch.Tensor, num_classes: int, shift: torch.Tensor | None) -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"x must be [N, d], got {list(x.shape)}; flatten images first (moments.pixels)")
    if y.shape != (x.shape[0],) or y.is_floating_point():
        raise ValueError(f"y must be integer labels of shape [{x.shape[0]}], got {y.dtype} {list(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")
    if shift is None:
        return torch.zeros(x.shape[1], device=x.device, dtype=torch.float32)
    if shift.shape != (x.shape[1],):
        raise ValueError(f"shift must be [{x.shape[1]}], got {list(shift.shape)}")
    return shift.to(x.device)


def class_power_sums_reference(x: torch.Tensor, y: torch.Tensor, num_classes: int,
                               shift: torch.Tensor | None = None) -> PowerSums:
    """Plain PyTorch, float64: `(S [4, C, d], counts int64 [C])` (see the module docstring)."""
    shift = _check(x, y, num_classes, shift)
    xc = x.double() - shift.double()
    sums = torch.zeros(4, num_classes, x.shape[1], dtype=torch.float64, device=x.device)
    for p in range(4):
        sums[p].index_add_(0, y.long(), xc ** (p + 1))
    return PowerSums(sums, torch.bincount(y.long(), minlength=num_classes))


@torch.no_grad()
def class_power_sums_triton(x: torch.Tensor, y: torch.Tensor, num_classes: int, shift: torch.Tensor | None = None,
                            *, blocks: tuple[int, int] = (64, 64)) -> PowerSums:
    """The kernel: `(S [4, C, d] float32, counts int64 [C])`. `blocks = (rows, coordinates)` tiles."""
    shift = _check(x, y, num_classes, shift).float().contiguous()
    require_triton(x, "class_power_sums")
    global _kernel
    if _kernel is None:
        _kernel = _build_kernel()
    x, y = x.contiguous(), y.to(x.device, torch.int64).contiguous()
    N, D = x.shape
    out = torch.empty(4, num_classes, D, device=x.device, dtype=torch.float32)
    bn, bd = blocks
    # Triton takes plain ints for `tl.constexpr` parameters; pyright reads the annotation literally
    _kernel[(math.ceil(D / bd),)](x, y, shift, out, N, D, num_classes,
                                  CP=max(16, 1 << (num_classes - 1).bit_length()), BN=bn, BD=bd)  # pyright: ignore[reportArgumentType]
    return PowerSums(out, torch.bincount(y, minlength=num_classes))


@torch.no_grad()
def class_power_sums(x: torch.Tensor, y: torch.Tensor, num_classes: int, shift: torch.Tensor | None = None, *,
                     backend: str = "auto", blocks: tuple[int, int] = (64, 64)) -> PowerSums:
    """`(S [4, C, d], counts [C])`: the kernel (float32 sums) or the reference (float64), chosen by
    `kernels.dispatch`: `backend` is "auto", "triton" or "reference". `blocks`: the kernel's tiles."""
    _check(x, y, num_classes, shift)  # bad input is an error, never a reason to fall back
    return dispatch(x, backend, what="class_power_sums",
                    reference=lambda: class_power_sums_reference(x, y, num_classes, shift),
                    triton=lambda: class_power_sums_triton(x, y, num_classes, shift, blocks=blocks))
