"""Gaussian numerics: class moments, symmetric matrix roots, the Monge map, W2 and barycenters.

The closed forms that notebooks 03 (moment editing) and 04 (concept erasure) share, written once:

- `MomentFitter` -> `ClassMoments`: streaming per-class mean and covariance in float64
  (`update(x, y)` batch by batch, then `finalize()`); `fit_class_moments` runs it with a progress bar.
- `sqrt_inv_sqrt(M)`, `sqrtm_psd(M)`, `inv_sqrtm_psd(M)`: the symmetric square root and the
  (pseudo-)inverse square root through one `eigh`, batched. The policy for singular matrices is
  stated once, in `sqrt_inv_sqrt`.
- `monge_map(S, T) -> A = S^{-1/2} (S^{1/2} T S^{1/2})^{1/2} S^{-1/2}`, the optimal transport map
  between centred Gaussians; `monge_affine` adds the offset of the full edit
  `x' = mu_t + A (x - mu_s)`, which `gaussian_edit` applies; `monge_maps` / `class_roots` compute
  many class pairs batched (optionally by Newton–Schulz, `kernels.spd`).
- `gaussian_w2`: the 2-Wasserstein distance between two Gaussians;
  `wasserstein_barycenter`: the covariance of the W2 barycenter of centred Gaussians.
- `pixels(images, r)`: images -> pixel vectors in [0, 1], optionally block-averaged to `r x r`.

Everything is batched over leading dimensions `[..., d, d]` and runs on the tensors' device.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from course_utils.config import CFG

__all__ = [
    "ClassMoments",
    "MATRIX_ROOT_METHODS",
    "MomentFitter",
    "NEWTON_TOL",
    "add_ridge",
    "as_float_images",
    "class_roots",
    "fit_class_moments",
    "gaussian_edit",
    "gaussian_w2",
    "inv_sqrtm_psd",
    "monge_affine",
    "monge_map",
    "monge_maps",
    "pixels",
    "psd_sqrt",
    "sqrt_inv_sqrt",
    "sqrtm_psd",
    "wasserstein_barycenter",
]


# --------------------------------------------------------------------------------------------
# Images -> pixel vectors
# --------------------------------------------------------------------------------------------
def as_float_images(images: torch.Tensor) -> torch.Tensor:
    """Colour images as float32 in [0, 1]: uint8 (0..255) or float (0..1) `[N, 3, H, W]` -> float32
    `[N, 3, H, W]`. Anything else is a `ValueError` / `TypeError` saying what was expected."""
    if not isinstance(images, torch.Tensor):
        images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W] (channels first), got shape {list(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not torch.is_floating_point(images):
        raise TypeError(f"images must be uint8 (0..255) or float (0..1), got {images.dtype}")
    return images.float()


def pixels(images: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
    """Images as pixel vectors in [0, 1].

    `images`: uint8 (0..255) or float (0..1) `[N, 3, H, W]` -> float32 `[N, 3*r*r]`, channel-major
    (`reshape(N, -1)` order), where `r = resolution` (default `H`). When `r < H`, each `H/r x H/r`
    block is averaged first (`r` must divide `H`).
    """
    x = as_float_images(images)
    h = x.shape[-1]
    r = h if resolution is None else int(resolution)
    if x.shape[-2] != h:
        raise ValueError(f"images must be square, got {list(x.shape[-2:])}")
    if r < 1 or h % r:
        raise ValueError(f"resolution must divide the image size {h} (e.g. {h} or {h // 2}), got {resolution}")
    if r != h:
        x = F.avg_pool2d(x, h // r)
    return x.reshape(len(x), -1)


# --------------------------------------------------------------------------------------------
# Streaming class-conditional moments
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ClassMoments:
    """Per-class first and second moments (the frozen result of `MomentFitter`).

    - `means`: float64 `[C, d]`
    - `covs`: float64 `[C, d, d]`, unbiased (divided by `n_c - 1`)
    - `counts`: int64 `[C]`, the number of samples of each class
    """

    means: torch.Tensor
    covs: torch.Tensor
    counts: torch.Tensor

    @property
    def num_classes(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def overall_mean(self) -> torch.Tensor:
        """The mean of all the data `[d]`: the class means weighted by their counts."""
        n = self.counts.to(self.means)
        return (n[:, None] * self.means).sum(0) / n.sum()

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ClassMoments:
        """The same moments on `device` / in `dtype` (counts stay int64)."""
        return ClassMoments(self.means.to(device=device, dtype=dtype), self.covs.to(device=device, dtype=dtype),
                            self.counts.to(device=device))

    def __repr__(self) -> str:
        return (f"ClassMoments(classes={self.num_classes}, dim={self.dim}, "
                f"counts={self.counts.tolist()}, dtype={self.means.dtype})")


@dataclass(eq=False)
class MomentFitter:
    """Streaming per-class mean and covariance, accumulated in float64 (or `dtype`).

        fitter = MomentFitter(num_classes=10, dim=3072)
        for x, y in batches:          # x: [b, d] (or images [b, 3, H, W]), y: int [b]
            fitter.update(x, y)
        moments = fitter.finalize()   # ClassMoments(means [C, d], covs [C, d, d], counts [C])

    Keeps `n_c`, `sum_c x` and `sum_c x x^T` per class; `finalize` returns
    `mu_c = sum x / n_c` and `Sigma_c = (sum x x^T - n_c mu_c mu_c^T) / (n_c - 1)`.
    """

    num_classes: int
    dim: int
    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float64
    counts: torch.Tensor = field(init=False, repr=False)
    sums: torch.Tensor = field(init=False, repr=False)
    outer: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.dim < 1:
            raise ValueError(f"num_classes and dim must be positive, got {self.num_classes}, {self.dim}")
        device, dtype = self.device, self.dtype
        self.counts = torch.zeros(self.num_classes, device=device, dtype=torch.int64)
        self.sums = torch.zeros(self.num_classes, self.dim, device=device, dtype=dtype)
        self.outer = torch.zeros(self.num_classes, self.dim, self.dim, device=device, dtype=dtype)

    def _check(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim > 2:
            x = x.reshape(len(x), -1)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must be [batch, {self.dim}], got shape {list(x.shape)}")
        y = torch.as_tensor(y, device=x.device)
        if y.shape != (len(x),) or y.is_floating_point():
            raise ValueError(f"y must be integer class indices of shape [{len(x)}], got {y.dtype} {list(y.shape)}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"labels must be in 0..{self.num_classes - 1}, got {int(y.min())}..{int(y.max())}")
        return x.to(self.device, self.dtype), y.to(self.device).long()

    def update(self, x: torch.Tensor, y: torch.Tensor) -> MomentFitter:
        """Add a batch: `x` `[b, d]` (images `[b, 3, H, W]` are flattened), `y` int `[b]`."""
        x, y = self._check(x, y)
        self.counts += torch.bincount(y, minlength=self.num_classes)
        self.sums.index_add_(0, y, x)
        for c in torch.unique(y).tolist():
            xc = x[y == c]
            self.outer[c] += xc.T @ xc
        return self

    def finalize(self) -> ClassMoments:
        """The means and unbiased covariances so far. Every class needs at least 2 samples."""
        few = [c for c, n in enumerate(self.counts.tolist()) if n < 2]
        if few:
            raise ValueError(f"classes {few} have fewer than 2 samples: a covariance needs at least 2. "
                             f"Feed more data (or fewer classes) before finalize().")
        n = self.counts.to(self.dtype)
        means = self.sums / n[:, None]
        covs = (self.outer - n[:, None, None] * means[:, :, None] * means[:, None, :]) / (n - 1)[:, None, None]
        return ClassMoments(means, _sym(covs), self.counts.clone())


def fit_class_moments(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, batch_size: int = 2048,
                      device: str | torch.device | None = None, progress: bool = True) -> ClassMoments:
    """`MomentFitter` over `x` `[N, d]` (labels `y` `[N]`) in batches of `batch_size`, with a
    progress bar. `device`: where the float64 sums live (default `CFG.device`)."""
    fitter = MomentFitter(num_classes, x.shape[1], CFG.device if device is None else device)
    for i in tqdm(range(0, len(x), batch_size), desc="class moments", disable=not progress):
        fitter.update(x[i:i + batch_size], y[i:i + batch_size])
    return fitter.finalize()


# --------------------------------------------------------------------------------------------
# Symmetric matrix roots
# --------------------------------------------------------------------------------------------
def _sym(mat: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mat + mat.transpose(-1, -2))


def _check_square(mat: torch.Tensor, name: str = "mat") -> None:
    if mat.ndim < 2 or mat.shape[-1] != mat.shape[-2]:
        raise ValueError(f"{name} must be a (batch of) square matrices [..., d, d], got {list(mat.shape)}")


def add_ridge(mat: torch.Tensor, ridge: float) -> torch.Tensor:
    """`mat + ridge * (tr(mat) / d) * I` `[..., d, d]`: a ridge relative to the mean eigenvalue
    (`mat` itself when `ridge <= 0`)."""
    if ridge <= 0:
        return mat
    d = mat.shape[-1]
    scale = torch.diagonal(mat, dim1=-2, dim2=-1).mean(-1)[..., None, None]
    return mat + ridge * scale * torch.eye(d, dtype=mat.dtype, device=mat.device)


def sqrt_inv_sqrt(mat: torch.Tensor, *, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(M^{1/2}, M^{+1/2})`: the symmetric square root and the pseudo-inverse square root of a
    symmetric PSD `M = mat + ridge * (tr/d) I`, from one `eigh`. `mat` `[..., d, d]` (batched) ->
    two symmetric `[..., d, d]`.

    With `M = V diag(lambda) V^T`:  `M^{1/2} = V diag(sqrt(max(lambda, 0))) V^T`  and
    `M^{+1/2} = V diag(lambda^{-1/2} where lambda > tol, else 0) V^T`.

    **Singular matrices** (the one policy of the course): the Moore–Penrose convention, with
    `torch.linalg.pinv`'s rank rule. Eigenvalues at or below `tol = max(lambda) * d * eps`
    (`eps` of `mat`'s dtype) count as zero, so the inverse root of a singular matrix is the
    pseudo-inverse root, `M^{+1/2} M M^{+1/2}` is the projection onto `range(M)`, and nothing is
    raised. This is the `W = Sigma^{+1/2}` of LEACE. Callers that want a strictly positive definite
    matrix (the Monge maps of notebook 03 on sample covariances) pass `ridge > 0` (e.g. `1e-3`).
    Round-off negative eigenvalues are clamped to 0 in the square root.
    """
    _check_square(mat)
    evals, evecs = torch.linalg.eigh(_sym(add_ridge(mat, ridge)))
    evals = evals.clamp_min(0)
    root = evals.sqrt()
    tol = evals.amax(-1, keepdim=True) * mat.shape[-1] * torch.finfo(evals.dtype).eps
    kept = torch.where(evals > tol, root, torch.full_like(root, float("inf")))  # 1 / inf = 0
    half = (evecs * root[..., None, :]) @ evecs.transpose(-1, -2)
    inv_half = (evecs / kept[..., None, :]) @ evecs.transpose(-1, -2)
    return _sym(half), _sym(inv_half)


def sqrtm_psd(mat: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """The symmetric PSD square root `V diag(sqrt(max(lambda, 0))) V^T` of `mat + ridge*(tr/d) I`.

    `mat`: symmetric PSD `[..., d, d]` (batched) -> `[..., d, d]`, symmetric, with
    `root @ root == mat`. See `sqrt_inv_sqrt`."""
    _check_square(mat)
    evals, evecs = torch.linalg.eigh(_sym(add_ridge(mat, ridge)))
    return _sym((evecs * evals.clamp_min(0).sqrt()[..., None, :]) @ evecs.transpose(-1, -2))


def inv_sqrtm_psd(mat: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """The symmetric (pseudo-)inverse square root of `mat + ridge * (tr/d) I`, batched `[..., d, d]`.
    Singular input: see `sqrt_inv_sqrt` (the pseudo-inverse root; pass `ridge > 0` to avoid it)."""
    return sqrt_inv_sqrt(mat, ridge=ridge)[1]


def psd_sqrt(a: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """`sqrtm_psd(a)`, or `inv_sqrtm_psd(a)` (the pseudo-inverse root) when `inverse=True`;
    `a` `[..., d, d]`. The name notebook 04 uses."""
    return inv_sqrtm_psd(a) if inverse else sqrtm_psd(a)


# --------------------------------------------------------------------------------------------
# The Monge map, W2, the barycenter
# --------------------------------------------------------------------------------------------
def _check_pair(cov_s: torch.Tensor, cov_t: torch.Tensor) -> None:
    _check_square(cov_s, "cov_s")
    _check_square(cov_t, "cov_t")
    if cov_s.shape[-1] != cov_t.shape[-1]:
        raise ValueError(f"cov_s {list(cov_s.shape)} and cov_t {list(cov_t.shape)} must have the same d")


def monge_map(cov_s: torch.Tensor, cov_t: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """The optimal transport map between centred Gaussians `N(0, cov_s) -> N(0, cov_t)`.

        A = S^{-1/2} (S^{1/2} T S^{1/2})^{1/2} S^{-1/2},   S = cov_s, T = cov_t

    `cov_s`, `cov_t`: PSD `[..., d, d]` (batched; they broadcast) -> `A` `[..., d, d]`, symmetric
    positive semi-definite, with `A S A = T` when `S` is positive definite. Same convention as POT's
    `ot.gaussian.bures_wasserstein_mapping`. `ridge > 0` first adds `ridge * (tr/d) * I` to both
    covariances (for ill-conditioned sample covariances); then `A` maps the ridged ones exactly.
    A singular `S` (without ridge) gets the pseudo-inverse root (see `sqrt_inv_sqrt`).
    """
    _check_pair(cov_s, cov_t)
    s_half, s_inv_half = sqrt_inv_sqrt(cov_s, ridge=ridge)
    middle = sqrtm_psd(s_half @ add_ridge(_sym(cov_t), ridge) @ s_half)
    return _sym(s_inv_half @ middle @ s_inv_half)


def monge_affine(mu_s: torch.Tensor, cov_s: torch.Tensor, mu_t: torch.Tensor, cov_t: torch.Tensor, *,
                 ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The optimal transport map `N(mu_s, S) -> N(mu_t, T)` as `(A, b)`: `x' = A x + b`, i.e.
    `x' = mu_t + A (x - mu_s)` with `A = monge_map(S, T, ridge)` and `b = mu_t - A mu_s`.

    `mu_*` `[..., d]`, `cov_*` `[..., d, d]` -> `A` `[..., d, d]`, `b` `[..., d]`. For row vectors
    `x` `[N, d]`: `x @ A.T + b` (`A` is symmetric), which is `gaussian_edit(x, mu_s, mu_t, A)`."""
    A = monge_map(cov_s, cov_t, ridge)
    return A, mu_t - (A @ mu_s[..., None])[..., 0]


def gaussian_edit(x: torch.Tensor, mu_s: torch.Tensor, mu_t: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Second-order edit `x' = mu_t + A (x - mu_s)` for row vectors: `x` `[N, d]`, `mu_*` `[d]`,
    `A` symmetric `[d, d]` -> `[N, d]` in `x`'s dtype (not clamped, so that its moments are exact)."""
    A = A.to(x.dtype)
    return mu_t.to(x.dtype) + (x - mu_s.to(x.dtype)) @ A.T


def gaussian_w2(mu_s: torch.Tensor, cov_s: torch.Tensor, mu_t: torch.Tensor, cov_t: torch.Tensor) -> torch.Tensor:
    """The 2-Wasserstein distance between `N(mu_s, S)` and `N(mu_t, T)`:

        W2^2 = |mu_s - mu_t|^2 + tr S + tr T - 2 tr (S^{1/2} T S^{1/2})^{1/2}

    `mu_*` `[..., d]`, `cov_*` PSD `[..., d, d]` (batched) -> `W2` `[...]` (the distance, not its
    square; the same as POT's `ot.gaussian.bures_wasserstein_distance`)."""
    _check_pair(cov_s, cov_t)
    s_half = sqrtm_psd(cov_s)
    cross = sqrtm_psd(s_half @ cov_t @ s_half)
    trace = lambda m: torch.diagonal(m, dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    w2sq = (mu_s - mu_t).pow(2).sum(-1) + trace(cov_s) + trace(cov_t) - 2 * trace(cross)
    return w2sq.clamp_min(0).sqrt()


def wasserstein_barycenter(covs: torch.Tensor, weights: torch.Tensor | None = None, *, max_iter: int = 100,
                           tol: float = 1e-10) -> torch.Tensor:
    """Covariance of the 2-Wasserstein barycenter of centred Gaussians `N(0, covs[c])`.

    `covs` `[k, d, d]`, `weights` `[k]` (default uniform) -> `[d, d]`. Fixed-point iteration of
    Alvarez-Esteban et al. (2016): `S <- S^{-1/2} (sum_c w_c (S^{1/2} K_c S^{1/2})^{1/2})^2 S^{-1/2}`,
    until the relative change is at most `tol` (or `max_iter` steps). At the barycenter,
    `sum_c w_c (S^{1/2} K_c S^{1/2})^{1/2} = S`.
    """
    k = len(covs)
    w = covs.new_full((k,), 1.0 / k) if weights is None else (weights / weights.sum()).to(covs)
    s = (w[:, None, None] * covs).sum(0)
    for _ in range(max_iter):
        half, inv_half = sqrt_inv_sqrt(s)
        inner = (w[:, None, None] * sqrtm_psd(half @ covs @ half)).sum(0)
        new = _sym(inv_half @ inner @ inner @ inv_half)
        done = (new - s).norm() <= tol * s.norm()
        s = new
        if done:
            break
    return s


# --------------------------------------------------------------------------------------------
# Many class pairs at once (eigh, or Newton–Schulz on the GPU)
# --------------------------------------------------------------------------------------------
MATRIX_ROOT_METHODS = ("eigh", "newton")
NEWTON_TOL = 1e-5


def _powers(mats: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(M^{1/2}, M^{-1/2})` of SPD `mats` `[b, d, d]` (already ridged). `method="newton"` uses
    Newton–Schulz iterations (`kernels.spd`) and falls back to `eigh` for every matrix whose
    residual is above `NEWTON_TOL` (or not finite): accuracy first."""
    if method not in MATRIX_ROOT_METHODS:
        raise ValueError(f"method must be one of {MATRIX_ROOT_METHODS}, got {method!r}")
    if method == "eigh":
        return sqrt_inv_sqrt(mats)
    from course_utils.kernels.spd import sqrt_inv_sqrt_newton

    half, inv_half, residual = sqrt_inv_sqrt_newton(mats, tol=NEWTON_TOL)
    bad = ~(residual < NEWTON_TOL)
    if bool(bad.any()):
        half[bad], inv_half[bad] = sqrt_inv_sqrt(mats[bad])
    return half, inv_half


def class_roots(covs: torch.Tensor, classes: Sequence[int] | None = None, *, ridge: float = 1e-3,
                chunk: int = 8, method: str = "eigh") -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """`{c: (Sigma_c^{1/2}, Sigma_c^{-1/2})}` of the ridged covariances `covs` `[C, d, d]`, one batched
    `eigh` (or Newton–Schulz run, `method="newton"`) per chunk of classes (default: every class)."""
    classes = list(range(len(covs))) if classes is None else sorted(set(classes))
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for k in range(0, len(classes), chunk):
        group = classes[k:k + chunk]
        h, ih = _powers(add_ridge(covs[group], ridge), method)
        out.update({c: (h[i], ih[i]) for i, c in enumerate(group)})
    return out


def monge_maps(moments: ClassMoments, pairs: Sequence[tuple[int, int]], *, ridge: float = 1e-3,
               chunk: int = 8, dtype: torch.dtype = torch.float32, progress: bool = True,
               roots: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
               method: str = "eigh") -> torch.Tensor:
    """The Monge maps of many class pairs, batched: `[len(pairs), d, d]` in `dtype`.

    One `eigh` per source class for `Sigma_s^{+-1/2}` (or pass them as `roots`, from
    `class_roots`), then one batched `eigh` per chunk of pairs for the middle square root, all on
    the moments' device (the GPU, when they are there). `method="newton"` replaces each `eigh` by
    Newton–Schulz matrix products where they converge (see `kernels.spd`).
    """
    covs = moments.covs
    if roots is None:
        roots = class_roots(covs, [s for s, _ in pairs], ridge=ridge, chunk=chunk, method=method)
    out = torch.empty(len(pairs), moments.dim, moments.dim, dtype=dtype, device=covs.device)
    for k in tqdm(range(0, len(pairs), chunk), desc="Monge maps", disable=not progress):
        part = pairs[k:k + chunk]
        h = torch.stack([roots[s][0] for s, _ in part])
        ih = torch.stack([roots[s][1] for s, _ in part])
        t = add_ridge(covs[[t for _, t in part]], ridge)
        middle = sqrtm_psd(h @ t @ h) if method == "eigh" else _powers(_sym(h @ t @ h), method)[0]
        out[k:k + len(part)] = _sym(ih @ middle @ ih).to(dtype)
    return out
