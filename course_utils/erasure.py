"""Concept erasure: LEACE in closed form, the orthogonal projection, a quadratic eraser, probes.

Belrose et al. (2023), "LEACE: Perfect linear concept erasure in closed form" (NeurIPS,
arXiv:2306.03819). A representation `x` is *linearly guarded* against a concept `z` when no
linear classifier predicts `z` from `x` better than a constant does; for one-hot `z` that holds
exactly when the cross-covariance `Cov(x, z)` is zero (every class has the same mean). LEACE is
the affine map with the smallest mean squared change that achieves it:

    W = Sigma_xx^{-1/2}                       (pseudo-inverse where Sigma_xx is singular)
    P = orthogonal projection onto colspan(W Sigma_xz)
    r(x) = x - W^+ P W (x - mu)

    from course_utils.erasure import LeaceFitter

    fitter = LeaceFitter(d, k)                 # statistics in float64
    for x, z in batches:                       # z: class ids [n] or one-hot [n, k]
        fitter.update(x, z)
    eraser = fitter.eraser                     # frozen LeaceEraser
    x_erased = eraser(x)                       # [n, d] (or [n, 3, 32, 32]: flattened and back)

The shapes follow EleutherAI's `concept-erasure` package (`LeaceFitter`, `LeaceEraser` with
`proj_left` `[d, r]`, `proj_right` `[r, d]`, `bias` = the mean), which the tests cross-check
against. Two differences, both deliberate: no covariance shrinkage and no trace constraint
by default (the textbook estimator, so that erasure is exact on the fitting data), and a
Cholesky route for large `d` (same result, several times faster than `eigh` on a CPU).

Also here:
- `orth_eraser` / `LeaceFitter(..., method="orth")`: the naive eraser, which projects out the
  class-mean-difference directions orthogonally (no whitening).
- `QuadraticFitter` -> `QuadraticEraser`: match every class's mean AND covariance to a common
  Gaussian (the Wasserstein barycenter) with the Gaussian optimal-transport (Monge) map, as
  concept-erasure's QLEACE does. It needs the labels at erasure time (an "oracle" eraser).
  The Gaussian numerics (`psd_sqrt`, `gaussian_ot_map` = `gaussian.monge_map`,
  `wasserstein_barycenter`, the streaming class moments, `flatten_images` = `gaussian.pixels`)
  come from `course_utils.gaussian`.
- `linear_probe`, `mlp_probe`, `chance_accuracy`: held-out accuracy of a logistic regression
  (full-batch L-BFGS over mini-batch chunks, so the answer is the unique optimum) and of a small
  MLP (Adam, mini-batches), on the GPU when present.
- `cross_covariance`, `distortion`, `flatten_images`, `first_step_above`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from course_utils.config import CFG
from course_utils.gaussian import (
    MomentFitter,
    gaussian_edit,
    monge_map,
    pixels,
    psd_sqrt,
    sqrt_inv_sqrt,
    wasserstein_barycenter,
)

gaussian_ot_map = monge_map  # notebook 04's name for the Monge map between centred Gaussians
flatten_images = pixels      # notebook 04's name for images -> pixel vectors in [0, 1]

__all__ = [
    "LeaceEraser",
    "LeaceFitter",
    "QuadraticEraser",
    "QuadraticFitter",
    "chance_accuracy",
    "cross_covariance",
    "distortion",
    "first_step_above",
    "flatten_images",
    "toy_data",
    "gaussian_ot_map",
    "leace_eraser",
    "linear_probe",
    "mlp_probe",
    "one_hot",
    "orth_eraser",
    "psd_sqrt",
    "wasserstein_barycenter",
]

Method = Literal["leace", "orth"]
Solver = Literal["auto", "eigh", "cholesky"]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def one_hot(z: Tensor, num_classes: int | None = None) -> Tensor:
    """Concept labels as a float matrix: class ids `[n]` -> one-hot `[n, k]`; `[n, k]` passes through.

    `num_classes` defaults to `z.max() + 1` (at least 2) for class ids.
    """
    if z.dim() == 2:
        if num_classes is not None and z.shape[1] != num_classes:
            raise ValueError(f"z has {z.shape[1]} columns but num_classes={num_classes}")
        return z
    if z.dim() != 1:
        raise ValueError(f"z must be class ids [n] or one-hot [n, k], got shape {list(z.shape)}")
    if z.is_floating_point():
        if not torch.equal(z, z.round()):
            raise ValueError("z is a float vector that is not integral: pass class ids (int64) or a "
                             "one-hot matrix [n, k]")
        z = z.long()
    if len(z) and int(z.min()) < 0:
        raise ValueError("class ids must be >= 0")
    k = num_classes if num_classes is not None else max(2, int(z.max()) + 1 if len(z) else 2)
    return F.one_hot(z.long(), k)


def cross_covariance(x: Tensor, z: Tensor) -> Tensor:
    """`Sigma_xz = 1/(n-1) sum_i (x_i - mean x)(z_i - mean z)^T`: `x` `[n, d]`, `z` one-hot `[n, k]`
    (or class ids `[n]`) -> `[d, k]`. Zero exactly when every class has the same mean."""
    z = one_hot(z).to(x.dtype)
    xc, zc = x - x.mean(0), z - z.mean(0)
    return xc.T @ zc / (len(x) - 1)


def distortion(x: Tensor, x_erased: Tensor) -> float:
    """Mean squared change `E ||x - r(x)||^2` (summed over features, averaged over samples).

    `x`, `x_erased`: `[n, ...]` with the same shape."""
    if x.shape != x_erased.shape:
        raise ValueError(f"shapes differ: {list(x.shape)} vs {list(x_erased.shape)}")
    diff = (x.double() - x_erased.double()).flatten(1) if x.dim() > 1 else (x.double() - x_erased.double())[:, None]
    return float(diff.pow(2).sum(1).mean())


def first_step_above(steps: Sequence[int], accuracies: Sequence[float], threshold: float) -> int | None:
    """The first step whose accuracy is >= `threshold`, or None if none reaches it."""
    for step, acc in zip(steps, accuracies):
        if acc is not None and acc >= threshold:
            return int(step)
    return None


def toy_data(n: int = 500, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A 2-D, two-class toy concept: `x` float64 `[n, 2]`, labels int64 `[n]` (60% class 0).

    Both classes share an elongated covariance (long axis along (1, 1)); their means differ along
    the first axis. A linear probe separates them well; the orthogonal projection and LEACE
    erase the difference in different ways."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 5 >= 3).long()
    cov_half = torch.tensor([[1.0, 0.7], [0.7, 1.0]], dtype=torch.float64)
    means = torch.tensor([[-0.8, 0.0], [0.8, 0.0]], dtype=torch.float64)
    offset = torch.tensor([1.0, 0.5], dtype=torch.float64)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) @ cov_half + means[y] + offset
    return x, y


# --------------------------------------------------------------------------------------------
# LEACE
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LeaceEraser:
    """A fitted affine eraser `r(x) = x - proj_left @ proj_right @ (x - bias)`.

    - `proj_left`: `[d, r]`, `proj_right`: `[r, d]` with `r <= k - 1`: the update
      `W^+ P W = proj_left @ proj_right` has rank `r` (stored in factored form, as in concept-erasure).
    - `bias`: `[d]`, the mean of the fitting data (None: erase `x` itself, no centring).
    The erased data keeps its mean, and its cross-covariance with the concept is zero.
    """

    proj_left: Tensor
    proj_right: Tensor
    bias: Tensor | None

    @classmethod
    def fit(cls, x: Tensor, z: Tensor, **kwargs) -> LeaceEraser:
        """Fit on `x` `[n, d]` and `z` (class ids `[n]` or one-hot `[n, k]`) in one go."""
        return LeaceFitter.fit(x, z, **kwargs).eraser

    @property
    def dim(self) -> int:
        return self.proj_left.shape[0]

    @property
    def rank(self) -> int:
        """The rank of the update (the number of directions erased)."""
        return self.proj_left.shape[1]

    @property
    def P(self) -> Tensor:
        """The linear part `I - W^+ P W` as a `[d, d]` matrix (an oblique projection)."""
        eye = torch.eye(self.dim, device=self.proj_left.device, dtype=self.proj_left.dtype)
        return eye - self.proj_left @ self.proj_right

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> LeaceEraser:
        """The same eraser with its tensors moved / cast."""
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)
        return LeaceEraser(move(self.proj_left), move(self.proj_right), None if self.bias is None else move(self.bias))

    def __call__(self, x: Tensor) -> Tensor:
        """Erase: `x` `[..., d]`, or `[n, *shape]` with `prod(shape) == d` (e.g. images
        `[n, 3, 32, 32]`, uint8 read as 0..1 floats). Returns the same shape, on x's device, in x's
        float dtype (float32 for uint8 input); computed on the eraser's device, in its dtype."""
        shape = x.shape
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        flat = x if shape[-1] == self.dim else self._flatten(x)
        h = flat.to(self.proj_left.device, self.proj_left.dtype)
        delta = h - self.bias if self.bias is not None else h
        out = h - (delta @ self.proj_right.mT) @ self.proj_left.mT
        return out.to(x.device, x.dtype).reshape(shape)

    def _flatten(self, x: Tensor) -> Tensor:
        if x.dim() >= 2 and x[0].numel() == self.dim:
            return x.flatten(1)
        raise ValueError(f"this eraser works on {self.dim} features; got shape {list(x.shape)}. Pass "
                         f"[n, {self.dim}] or [n, *shape] with {self.dim} numbers per sample.")


class LeaceFitter:
    """Streaming statistics for LEACE: means, `Sigma_xx` and `Sigma_xz`, accumulated in float64.

        fitter = LeaceFitter(x_dim, z_dim)        # z_dim = number of classes for one-hot z
        fitter.update(x, z)                       # as many batches as you like
        eraser = fitter.eraser                    # recomputed lazily after each update

    Args:
        x_dim: features `d`.
        z_dim: concept dimension `k` (classes for one-hot `z`; `update` also takes class ids).
        method: `"leace"` (whiten first: the least-squares optimal eraser) or `"orth"` (the
            orthogonal projection onto the complement of colspan(Sigma_xz), no whitening).
        affine: centre on the mean (the bias); `False` erases `x` itself.
        svd_tol: singular values of `W Sigma_xz` at or below this are not erased. `None` (default):
            `s_max * sqrt(eps)` (1.5e-8 relative in float64): erase every direction that is
            really there (exact guardedness), but not rounding noise, such as the k-th direction
            of one-hot labels, whose columns sum to zero. concept-erasure's default is 0.01.
        solver: how to whiten. `"eigh"`: `W = Sigma^{-1/2}` from an eigendecomposition (the
            paper's formula; pseudo-inverse where singular). `"cholesky"`: `W = L^{-1}` with
            `Sigma = L L^T`, which gives the same eraser when Sigma is positive definite
            (W^+ P W does not depend on which whitening you pick) and is much faster for large d.
            `"auto"`: Cholesky for d > 512 when Sigma is clearly positive definite, else eigh.
        device, dtype: where the statistics live (default CPU, float64).
    """

    def __init__(self, x_dim: int, z_dim: int, method: Method = "leace", *, affine: bool = True,
                 svd_tol: float | None = None, solver: Solver = "auto",
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float64) -> None:
        if method not in ("leace", "orth"):
            raise ValueError(f'method must be "leace" or "orth", got {method!r}')
        if solver not in ("auto", "eigh", "cholesky"):
            raise ValueError(f'solver must be "auto", "eigh" or "cholesky", got {solver!r}')
        if x_dim < 1 or z_dim < 1:
            raise ValueError(f"x_dim and z_dim must be >= 1, got {x_dim}, {z_dim}")
        self.x_dim, self.z_dim = int(x_dim), int(z_dim)
        self.method, self.affine, self.svd_tol, self.solver = method, affine, svd_tol, solver
        self.n = 0
        self.mean_x = torch.zeros(x_dim, device=device, dtype=dtype)
        self.mean_z = torch.zeros(z_dim, device=device, dtype=dtype)
        self.sigma_xz_ = torch.zeros(x_dim, z_dim, device=device, dtype=dtype)
        self.sigma_xx_ = torch.zeros(x_dim, x_dim, device=device, dtype=dtype) if method == "leace" else None
        self._eraser: LeaceEraser | None = None

    @classmethod
    def fit(cls, x: Tensor, z: Tensor, num_classes: int | None = None, **kwargs) -> LeaceFitter:
        """A fitter updated once with `x` `[n, d]` (or `[n, *shape]`) and `z` (ids `[n]` or one-hot)."""
        z = one_hot(z, num_classes)
        kwargs.setdefault("device", x.device)
        return cls(x[0].numel(), z.shape[1], **kwargs).update(x, z)

    @torch.no_grad()
    def update(self, x: Tensor, z: Tensor) -> LeaceFitter:
        """Add a batch: `x` `[n, d]` (or `[n, *shape]`, flattened; uint8 images read as 0..1),
        `z` class ids `[n]` or one-hot / real-valued `[n, k]`. Welford's update, in float64."""
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = x.reshape(len(x), -1).to(self.mean_x)
        if x.shape[1] != self.x_dim:
            raise ValueError(f"x has {x.shape[1]} features per sample, the fitter expects {self.x_dim}")
        z = one_hot(z.to(self.mean_x.device), self.z_dim if z.dim() == 1 else None).to(self.mean_x)
        if z.shape != (len(x), self.z_dim):
            raise ValueError(f"z must be [n={len(x)}, k={self.z_dim}] (or class ids [n]), got {list(z.shape)}")
        self.n += len(x)
        dx = x - self.mean_x
        self.mean_x += dx.sum(0) / self.n
        dx2 = x - self.mean_x
        if self.sigma_xx_ is not None:
            self.sigma_xx_.addmm_(dx.T, dx2)
        dz = z - self.mean_z
        self.mean_z += dz.sum(0) / self.n
        self.sigma_xz_.addmm_(dx.T, z - self.mean_z)
        self._eraser = None
        return self

    @property
    def sigma_xx(self) -> Tensor:
        """`Cov(x)` `[d, d]` (Bessel-corrected, symmetrised)."""
        if self.sigma_xx_ is None:
            raise RuntimeError('method="orth" does not track Sigma_xx')
        self._need_data()
        return (self.sigma_xx_ + self.sigma_xx_.T) / 2 / (self.n - 1)

    @property
    def sigma_xz(self) -> Tensor:
        """`Cov(x, z)` `[d, k]` (Bessel-corrected)."""
        self._need_data()
        return self.sigma_xz_ / (self.n - 1)

    def _need_data(self) -> None:
        if self.n < 2:
            raise RuntimeError(f"call update() with at least 2 samples first (seen {self.n})")

    @property
    def eraser(self) -> LeaceEraser:
        """The frozen `LeaceEraser` for the statistics so far (cached until the next update)."""
        if self._eraser is None:
            self._eraser = self._compute()
        return self._eraser

    def _keep(self, u: Tensor, s: Tensor) -> Tensor:
        tol = self.svd_tol
        if tol is None:  # relative: sqrt(eps) of the statistics' dtype (1.5e-8 for float64)
            tol = float(s.max()) * torch.finfo(s.dtype).eps ** 0.5 if len(s) else 0.0
        return u[:, s > tol]

    @torch.no_grad()
    def _compute(self) -> LeaceEraser:
        sigma_xz = self.sigma_xz
        bias = self.mean_x.clone() if self.affine else None
        if self.method == "orth":
            u, s, _ = torch.linalg.svd(sigma_xz, full_matrices=False)
            u = self._keep(u, s)
            return LeaceEraser(u, u.T.contiguous(), bias)
        sigma = self.sigma_xx
        chol = self._cholesky(sigma)
        if chol is not None:  # W = L^{-1}, W^+ = L
            a = torch.linalg.solve_triangular(chol, sigma_xz, upper=False)
            u, s, _ = torch.linalg.svd(a, full_matrices=False)
            u = self._keep(u, s)
            left = chol @ u
            right = torch.linalg.solve_triangular(chol.T, u, upper=True).T
            return LeaceEraser(left, right.contiguous(), bias)
        w_inv, w = sqrt_inv_sqrt(sigma)  # W = Sigma^{+1/2} (pseudo-inverse where singular), W^+
        u, s, _ = torch.linalg.svd(w @ sigma_xz, full_matrices=False)
        u = self._keep(u, s)
        return LeaceEraser(w_inv @ u, (u.T @ w).contiguous(), bias)

    def _cholesky(self, sigma: Tensor) -> Tensor | None:
        if self.solver == "eigh" or (self.solver == "auto" and self.x_dim <= 512):
            return None
        chol, info = torch.linalg.cholesky_ex(sigma)
        if int(info) == 0:
            pivots = torch.diagonal(chol).pow(2)
            if self.solver == "cholesky" or pivots.min() > torch.trace(sigma) * 1e-10:
                return chol
        if self.solver == "cholesky":
            raise RuntimeError("Sigma_xx is not positive definite (fewer samples than features, or "
                               "constant features): use solver='eigh', which takes the pseudo-inverse")
        return None


def leace_eraser(x: Tensor, z: Tensor, **kwargs) -> LeaceEraser:
    """Fit LEACE on `x` `[n, d]`, `z` (ids or one-hot) and return the eraser (float64)."""
    return LeaceFitter.fit(x, z, **kwargs).eraser


def orth_eraser(x: Tensor, z: Tensor, **kwargs) -> LeaceEraser:
    """The naive eraser: project `x - mean` orthogonally off colspan(Sigma_xz), the
    class-mean-difference directions. Same `LeaceEraser` shape (here `proj_left = proj_right^T = U`)."""
    return LeaceFitter.fit(x, z, method="orth", **kwargs).eraser


# --------------------------------------------------------------------------------------------
# Quadratic erasure: match every class's mean and covariance (Gaussian optimal transport)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class QuadraticEraser:
    """Oracle quadratic eraser: `x -> mean + A_z (x - mean_z)` for a sample of class `z`.

    - `class_means` `[k, d]`, `mean` `[d]` (the overall mean), `ot_maps` `[k, d, d]`: each class's
      Monge map onto the common covariance `target_cov` `[d, d]` (the Wasserstein barycenter).
    After erasure every class has the same mean and the same covariance, so no linear AND no
    quadratic classifier beats a constant one (on the fitting data). It needs the labels.
    """

    class_means: Tensor
    mean: Tensor
    ot_maps: Tensor
    target_cov: Tensor

    def __call__(self, x: Tensor, z: Tensor) -> Tensor:
        """`x` `[n, d]` (or `[n, *shape]`), `z` class ids `[n]` -> erased, same shape and float dtype."""
        shape = x.shape
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        h = x.reshape(len(x), -1).to(self.mean.device, self.mean.dtype)
        if h.shape[1] != self.mean.shape[0]:
            raise ValueError(f"this eraser works on {self.mean.shape[0]} features; got shape {list(shape)}")
        if z.dim() != 1 or len(z) != len(x):
            raise ValueError("z must be class ids [n] (the quadratic eraser needs each sample's class)")
        z = z.to(self.mean.device)
        out = torch.empty_like(h)
        for c in torch.unique(z).tolist():
            idx = z == c
            out[idx] = gaussian_edit(h[idx], self.class_means[c], self.mean, self.ot_maps[c])
        return out.to(x.device, x.dtype).reshape(shape)


class QuadraticFitter:
    """Per-class means and covariances (float64, streaming: a `gaussian.MomentFitter`) ->
    `QuadraticEraser`.

        eraser = QuadraticFitter(d, k).update(x, labels).eraser
        x_erased = eraser(x, labels)

    `barycenter_tol`: the relative change at which the barycenter's fixed-point iteration stops.
    Every class is mapped onto the same target whatever it is, so a looser tolerance (1e-8) only
    makes the target slightly less than the cheapest one, and saves iterations at large `d`.
    """

    def __init__(self, x_dim: int, num_classes: int, *, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float64, barycenter_tol: float = 1e-10) -> None:
        self.x_dim, self.num_classes = int(x_dim), int(num_classes)
        self.barycenter_tol = float(barycenter_tol)
        self.moment_fitter = MomentFitter(self.num_classes, self.x_dim, "cpu" if device is None else device, dtype)
        self._eraser: QuadraticEraser | None = None

    @classmethod
    def fit(cls, x: Tensor, z: Tensor, num_classes: int | None = None, **kwargs) -> QuadraticFitter:
        """A fitter updated once with `x` `[n, d]` (or `[n, *shape]`) and class ids `z` `[n]`."""
        k = num_classes if num_classes is not None else int(z.max()) + 1
        kwargs.setdefault("device", x.device)
        return cls(x[0].numel(), k, **kwargs).update(x, z)

    @torch.no_grad()
    def update(self, x: Tensor, z: Tensor) -> QuadraticFitter:
        """Add a batch: `x` `[n, d]` (or `[n, *shape]`; uint8 images read as 0..1), `z` class ids `[n]`."""
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        if z.dim() != 1 or len(z) != len(x):
            raise ValueError("z must be class ids [n]")
        self.moment_fitter.update(x.reshape(len(x), -1), z)
        self._eraser = None
        return self

    @property
    def covs(self) -> Tensor:
        """Per-class covariances `[k, d, d]` (Bessel-corrected)."""
        return self.moment_fitter.finalize().covs

    @property
    def eraser(self) -> QuadraticEraser:
        """The frozen `QuadraticEraser` for the statistics so far (cached until the next update)."""
        if self._eraser is None:
            m = self.moment_fitter.finalize()
            target = wasserstein_barycenter(m.covs, m.counts.to(m.covs), tol=self.barycenter_tol)
            maps = gaussian_ot_map(m.covs, target)
            self._eraser = QuadraticEraser(m.means, m.overall_mean, maps, target)
        return self._eraser


# --------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------
def chance_accuracy(y_train: Tensor, y_test: Tensor) -> float:
    """Held-out accuracy of the best constant predictor: always say the most frequent TRAINING
    class. `y_train` `[n]`, `y_test` `[m]` class ids -> a float in [0, 1]."""
    majority = int(torch.bincount(y_train.long().cpu()).argmax())
    return float((y_test.long().cpu() == majority).float().mean())


def _standardize(x_train: Tensor, x_test: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    xtr = x_train.reshape(len(x_train), -1).to(device, torch.float64)
    xte = x_test.reshape(len(x_test), -1).to(device, torch.float64)
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    return ((xtr - mean) / std).float(), ((xte - mean) / std).float()


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 4096) -> float:
    with torch.no_grad():
        pred = torch.cat([model(xb).argmax(1) for xb in x.split(batch)])
    return float((pred == y).float().mean())


def _check_probe_data(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor) -> None:
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise ValueError("x and y must have the same number of samples (train and test)")
    if x_train[0].numel() != x_test[0].numel():
        raise ValueError(f"train and test features differ: {list(x_train.shape)} vs {list(x_test.shape)}")
    if y_train.dim() != 1 or y_train.is_floating_point():
        raise ValueError("labels must be class ids: an integer tensor [n]")


def linear_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, *,
                 weight_decay: float = 3e-2, max_iter: int = 30, chunk: int = 8192,
                 num_classes: int | None = None, device: str | torch.device | None = None,
                 progress: bool = False) -> float:
    """Held-out accuracy of a multinomial logistic regression (a linear probe).

    `x_*` `[n, d]` (or `[n, *shape]`, flattened), `y_*` class ids `[n]`. Features are standardised
    with the training statistics (an invertible affine map: it changes nothing a linear probe can
    or cannot do). The loss `mean CE + weight_decay/2 ||W||^2` is strictly convex; full-batch
    L-BFGS from W = 0 (loss and gradient summed over chunks of `chunk` rows, `max_iter`
    iterations) heads for its unique minimum, with no learning rate or seed to tune. On linearly
    guarded data the gradient at W = 0 vanishes (every class has the mean of the whole), so the
    probe stays a constant predictor and scores exactly `chance_accuracy`.
    """
    _check_probe_data(x_train, y_train, x_test, y_test)
    device = torch.device(CFG.device if device is None else device)
    xtr, xte = _standardize(x_train, x_test, device)
    ytr, yte = y_train.to(device).long(), y_test.to(device).long()
    k = num_classes or int(max(ytr.max(), yte.max())) + 1
    model = nn.Linear(xtr.shape[1], k).to(device)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")
    n = len(xtr)
    bar = tqdm(total=max_iter, desc="linear probe (L-BFGS)", disable=not progress, leave=False)

    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), device=device)
        for xb, yb in zip(xtr.split(chunk), ytr.split(chunk)):
            loss = F.cross_entropy(model(xb), yb, reduction="sum") / n
            loss.backward()
            total += loss.detach()
        reg = weight_decay / 2 * model.weight.pow(2).sum()
        reg.backward()
        bar.update(1)
        return total + reg.detach()

    opt.step(closure)
    bar.close()
    return _accuracy(model, xte, yte)


def mlp_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, *,
              hidden: int = 256, epochs: int = 10, batch_size: int = 512, lr: float = 3e-3,
              weight_decay: float = 1e-4, seed: int = 0, num_classes: int | None = None,
              device: str | torch.device | None = None, progress: bool = False) -> float:
    """Held-out accuracy of a one-hidden-layer MLP probe (ReLU, Adam, mini-batches).

    `x_*` `[n, d]` (or `[n, *shape]`), `y_*` class ids `[n]`; features standardised as in
    `linear_probe`. Seeded: the same inputs give the same accuracy on the CPU."""
    _check_probe_data(x_train, y_train, x_test, y_test)
    device = torch.device(CFG.device if device is None else device)
    xtr, xte = _standardize(x_train, x_test, device)
    ytr, yte = y_train.to(device).long(), y_test.to(device).long()
    k = num_classes or int(max(ytr.max(), yte.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(xtr.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, k)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = len(xtr)
    for _ in tqdm(range(epochs), desc="MLP probe", disable=not progress, leave=False):
        order = torch.randperm(n, generator=gen).to(device)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return _accuracy(model, xte, yte)
