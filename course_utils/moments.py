"""Moment editing: class-conditional means and covariances, and the edits that move them.

Belrose et al. (2024), "Neural Networks Learn Statistics of Increasing Complexity" (ICML,
arXiv:2402.04362): early in training a network's predictions depend on the class means, later
on the covariances, later still on higher-order statistics. The probe is an *edit*: move an
image's first moment (a mean shift) or its first two moments (the Gaussian optimal-transport,
or Monge, map) from its class onto another class's, and ask the network what it sees.

    from course_utils.moments import GaussianEditor, pixels

    editor = GaussianEditor.fit(train_images, train_labels, num_classes=10)   # moments + maps
    edited = editor.edit(test_images, source=test_labels, target=targets)     # [N, 3, 32, 32]

The Gaussian numerics live in `course_utils.gaussian` and are re-exported here under the names
notebook 03 uses: `MomentFitter` -> `ClassMoments` (streaming class moments), `fit_class_moments`,
`sqrtm_psd`, `inv_sqrtm_psd` (symmetric roots; singular input: see `gaussian.sqrt_inv_sqrt`),
`monge_map(cov_s, cov_t) -> A = S^{-1/2} (S^{1/2} T S^{1/2})^{1/2} S^{-1/2}`, `gaussian_edit`
(`x' = mu_t + A (x - mu_s)`), the batched `monge_maps` / `class_roots`, and `pixels(images, r)`.

Here, the edits and what surrounds them:

- `GaussianEditor`: every class's moments, the pairwise Monge maps, batched edits and samples.
- `mean_shift`, `sample_gaussian`, `quantile_edit` (coordinatewise quantiles: a higher-order
  edit), `psnr`, `random_targets`, `relative_error`.
- `coordinate_moments`: every class's per-coordinate mean, variance, skewness and kurtosis in one
  pass (a Triton kernel on CUDA, `kernels.class_moments`).
- `class_moments_reference`, `sqrtm_reference`: plain one-shot PyTorch versions, the ground
  truth that faster kernels can be tested against.

Notebook 03's experiment, every costly part through the result cache (`course_utils.cache`):

- `sweep_setup()`: the sizes per tier (ci, laptop, full); `fit_editor(...)`: the cached editor;
  `edit_sets(...)`: the OT-edited, mean-shifted and sampled sets with the class that counts as a hit;
  `edit_sweep(result, sets)`: every checkpoint's prediction for every image of every set
  (`EditSweep`: `fractions()`, `curve(name)` -> peak, peak step, final; `turned(name, step)`).
- `run_experiment()`: all of it, as the notebook runs it; the precompute recipe "moment_editing"
  (`python -m course_utils.cache precompute --tier laptop --module course_utils.moments`).

Images are handled as vectors of pixels in [0, 1]: `pixels(images, resolution)` flattens
`[N, 3, 32, 32]` into `[N, 3*r*r]`, optionally average-pooled to `r x r` (fast mode works at
16 x 16 = 768 dimensions, where a full eigendecomposition takes a fraction of a second), and
`apply_delta` puts a low-resolution edit back onto the full-resolution image.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import permutations

import torch
from tqdm.auto import tqdm

from course_utils.cache import cached, precompute_recipe
from course_utils.cifar import load_cifar10
from course_utils.config import CFG, seed_everything
from course_utils.gaussian import (
    MATRIX_ROOT_METHODS,
    NEWTON_TOL,
    ClassMoments,
    MomentFitter,
    as_float_images,
    class_roots,
    fit_class_moments,
    gaussian_edit,
    inv_sqrtm_psd,
    monge_map,
    monge_maps,
    pixels,
    sqrtm_psd,
)
from course_utils.train import CifarNet, TrainResult, recipe, train_classifier

__all__ = [
    "OT",
    "SAMPLES",
    "SHIFT",
    "Curve",
    "EditSweep",
    "SweepSetup",
    "edit_sets",
    "edit_sweep",
    "edit_targets",
    "fit_editor",
    "run_experiment",
    "sweep_setup",
    "ClassMoments",
    "ClassQuantiles",
    "GaussianEditor",
    "MATRIX_ROOT_METHODS",
    "MomentFitter",
    "NEWTON_TOL",
    "apply_delta",
    "CoordinateMoments",
    "class_roots",
    "coordinate_moments",
    "class_moments_reference",
    "fit_class_moments",
    "gaussian_edit",
    "inv_sqrtm_psd",
    "mean_shift",
    "monge_map",
    "monge_maps",
    "pixels",
    "psnr",
    "quantile_edit",
    "random_targets",
    "relative_error",
    "sample_gaussian",
    "sqrtm_psd",
    "sqrtm_reference",
    "to_images",
]


# --------------------------------------------------------------------------------------------
# Pixel vectors -> images
# --------------------------------------------------------------------------------------------
def to_images(vectors: torch.Tensor, size: int = 32, clamp: bool = True) -> torch.Tensor:
    """Pixel vectors `[N, 3*r*r]` -> float images `[N, 3, size, size]` (nearest upsampling when
    `r < size`), clamped to [0, 1] unless `clamp=False`."""
    n, d = vectors.shape
    r = int(round((d / 3) ** 0.5))
    if 3 * r * r != d:
        raise ValueError(f"vectors must have 3*r*r entries per row, got {d}")
    x = vectors.float().reshape(n, 3, r, r)
    if r != size:
        if size % r:
            raise ValueError(f"size {size} must be a multiple of the vectors' resolution {r}")
        x = x.repeat_interleave(size // r, dim=2).repeat_interleave(size // r, dim=3)
    return x.clamp(0, 1) if clamp else x


def apply_delta(images: torch.Tensor, before: torch.Tensor, after: torch.Tensor,
                clamp: bool = True) -> torch.Tensor:
    """Add an edit made on pixel vectors back onto the images.

    `images` `[N, 3, H, W]`; `before`, `after` `[N, 3*r*r]` (`before = pixels(images, r)`).
    Returns float `[N, 3, H, W]`: `images + upsample(after - before)`, so that
    `pixels(result, r) == after` exactly (before clamping) while the detail finer than `r x r`
    is left as it was. Clamped to [0, 1] unless `clamp=False`.
    """
    x = as_float_images(images)
    if before.shape != after.shape or before.shape[0] != x.shape[0]:
        raise ValueError(f"before {list(before.shape)} and after {list(after.shape)} must both be "
                         f"[N, 3*r*r] with N = {x.shape[0]} images")
    out = x + to_images((after - before).to(x), size=x.shape[-1], clamp=False)
    return out.clamp(0, 1) if clamp else out


# --------------------------------------------------------------------------------------------
# Per-coordinate moments, and the plain references
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CoordinateMoments:
    """Per-class, per-coordinate moments `[C, d]` (population, i.e. divided by `n_c`), from
    `coordinate_moments`: `mean`, `var`, `skew` (`m3 / m2^1.5`) and `kurtosis` (`m4 / m2^2`, 3 for a
    Gaussian), with `counts` `[C]`."""

    counts: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    skew: torch.Tensor
    kurtosis: torch.Tensor


def coordinate_moments(x: torch.Tensor, y: torch.Tensor, num_classes: int, *, backend: str = "auto"
                       ) -> CoordinateMoments:
    """Every class's per-coordinate mean, variance, skewness and kurtosis of `x` `[N, d]` (labels
    `y` `[N]`), from one pass of `kernels.class_moments.class_power_sums` (a Triton kernel on CUDA),
    with `x` shifted by its overall mean so that the power sums stay well conditioned."""
    from course_utils.kernels.class_moments import class_power_sums

    shift = x.float().mean(0)
    sums, counts = class_power_sums(x, y, num_classes, shift, backend=backend)
    n = counts.to(sums.dtype).clamp_min(1)[:, None]
    e1, e2, e3, e4 = (sums[p] / n for p in range(4))
    m2 = (e2 - e1 ** 2).clamp_min(0)
    m3 = e3 - 3 * e1 * e2 + 2 * e1 ** 3
    m4 = e4 - 4 * e1 * e3 + 6 * e1 ** 2 * e2 - 3 * e1 ** 4
    safe = m2.clamp_min(torch.finfo(m2.dtype).tiny)
    return CoordinateMoments(counts, e1 + shift.to(e1), m2, m3 / safe ** 1.5, m4 / safe ** 2)


def class_moments_reference(x: torch.Tensor, y: torch.Tensor, num_classes: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-shot per-class moments, the plain reference: `x` `[N, d]`, `y` int `[N]` ->
    `(means float64 [C, d], covs float64 [C, d, d] (unbiased), counts int64 [C])`."""
    x = x.reshape(len(x), -1).double()
    means, covs, counts = [], [], []
    for c in range(num_classes):
        xc = x[y == c]
        means.append(xc.mean(0))
        covs.append(torch.cov(xc.T).reshape(x.shape[1], x.shape[1]))
        counts.append(len(xc))
    return torch.stack(means), torch.stack(covs), torch.tensor(counts, dtype=torch.int64)


def sqrtm_reference(mat: torch.Tensor) -> torch.Tensor:
    """Plain reference for `sqrtm_psd` (one matrix `[d, d]`, float64 eigh)."""
    evals, evecs = torch.linalg.eigh(0.5 * (mat.double() + mat.double().T))
    return (evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T).to(mat.dtype)


# --------------------------------------------------------------------------------------------
# The edits, sampling, scores
# --------------------------------------------------------------------------------------------
def mean_shift(x: torch.Tensor, mu_s: torch.Tensor, mu_t: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """First-order edit `x + mu_t - mu_s`, clamped to [0, 1]. `x` `[N, d]`, `mu_*` `[d]` or `[N, d]`."""
    out = x + (mu_t - mu_s).to(x.dtype)
    return out.clamp(0, 1) if clamp else out


def sample_gaussian(mean: torch.Tensor, cov: torch.Tensor, n: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """`n` samples of `N(mean, cov)`: `mean` `[d]`, `cov` PSD `[d, d]` -> `[n, d]` (float32 unless the
    inputs are float64). Uses the symmetric square root, so singular covariances are fine."""
    mean64, cov64 = mean.double(), cov.double()
    z = torch.randn(n, mean.shape[-1], generator=generator, dtype=torch.float64,
                    device=generator.device if generator is not None else mean.device).to(mean.device)
    out = mean64 + z @ sqrtm_psd(cov64)
    return out if mean.dtype == torch.float64 else out.float()


def random_targets(labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """For each label, a target class drawn uniformly from the OTHER classes. `labels` `[N]` -> `[N]`."""
    offset = torch.randint(1, num_classes, labels.shape, generator=generator).to(labels.device)
    return (labels + offset) % num_classes


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """`||actual - expected||_F / ||expected||_F` (float64)."""
    return float((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-300))


def psnr(x: torch.Tensor, y: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB: `10 log10(peak^2 / mean((x - y)^2))`.

    `x`, `y`: `[N, ...]` in the same units as `peak` -> `[N]`.
    """
    mse = ((x.double() - y.double()) ** 2).reshape(len(x), -1).mean(1)
    return (10 * torch.log10(peak ** 2 / mse)).to(torch.float32 if x.dtype != torch.float64 else x.dtype)


# --------------------------------------------------------------------------------------------
# Coordinatewise quantiles (an edit that also moves higher-order marginal statistics)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class ClassQuantiles:
    """`levels` `[q]` in [0, 1] and `values` `[C, q, d]`: each coordinate's quantiles per class."""

    levels: torch.Tensor
    values: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, num_classes: int, q: int = 65) -> ClassQuantiles:
        """Quantiles of every coordinate of `x` `[N, d]` within each class of `y` `[N]`."""
        levels = torch.linspace(0, 1, q, dtype=torch.float32)
        vals = [torch.quantile(x[y == c].float(), levels.to(x.device), dim=0) for c in range(num_classes)]
        return cls(levels, torch.stack(vals))


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation per column: `x` `[N, d]`, `xp`/`fp` `[q, d]` increasing in q."""
    xpt, fpt = xp.T.contiguous(), fp.T.contiguous()  # [d, q]
    xt = x.T.contiguous()  # [d, N]
    idx = torch.searchsorted(xpt, xt).clamp(1, xpt.shape[1] - 1)
    x0, x1 = xpt.gather(1, idx - 1), xpt.gather(1, idx)
    f0, f1 = fpt.gather(1, idx - 1), fpt.gather(1, idx)
    w = ((xt - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0, 1)
    return (f0 + w * (f1 - f0)).T


def quantile_edit(x: torch.Tensor, q_s: torch.Tensor, q_t: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Coordinatewise quantile matching `x'_i = F_t,i^{-1}(F_s,i(x_i))`: every pixel's marginal
    distribution moves from the source class's to the target's. `x` `[N, d]`, `q_s`, `q_t`
    `[q, d]` quantile values at `levels` `[q]` -> `[N, d]`."""
    ranks = _interp(x.float(), q_s.float(), levels.float()[:, None].expand_as(q_s).contiguous())
    return _interp(ranks, levels.float()[:, None].expand_as(q_t).contiguous(), q_t.float())


@dataclass(frozen=True, eq=False)
class GaussianEditor:
    """Every class's Gaussian moments and the Monge maps between pairs of classes.

    Build it with `GaussianEditor.fit(images, labels, num_classes=10, resolution=16)`. Then
    `edit(images, source, target)` moves each image's first two moments from class `source[i]`
    to class `target[i]`; `mean_shift(...)` moves only the first; `sample(c, n)` draws synthetic
    images from `N(mu_c, Sigma_c)`. Edits are made on `resolution x resolution` pixel vectors
    and added back onto the full-size images (`apply_delta`), then clamped to [0, 1].

    - `moments`: `ClassMoments` (float64, on `device`)
    - `pairs`: the `(source, target)` pairs whose maps were computed; `maps`: `[P, d, d]` float32
    - `roots`: every class's `Sigma_c^{1/2}` `[C, d, d]` float32 (for sampling)
    """

    moments: ClassMoments
    pairs: tuple[tuple[int, int], ...]
    maps: torch.Tensor = field(repr=False)
    roots: torch.Tensor = field(repr=False)
    resolution: int = 32
    ridge: float = 1e-3

    @classmethod
    def fit(cls, images: torch.Tensor, labels: torch.Tensor, *, num_classes: int = 10,
            resolution: int | None = None, pairs: Iterable[tuple[int, int]] | None = None, ridge: float = 1e-3,
            device: str | torch.device | None = None, batch_size: int = 2048,
            progress: bool = True) -> GaussianEditor:
        """Fit per-class moments of `images` `[N, 3, H, W]` (labels `[N]`) at `resolution` and the
        Monge maps of `pairs` (default: all `C*(C-1)` ordered pairs of different classes).
        `resolution`: the side of the pixel grid the moments live on (default: the image size).

        `device`: where the linear algebra runs (default `CFG.device`).
        """
        device = CFG.device if device is None else device
        resolution = int(images.shape[-1]) if resolution is None else int(resolution)
        fitter = MomentFitter(num_classes, 3 * resolution * resolution, device)
        for i in tqdm(range(0, len(images), batch_size), desc="class moments", disable=not progress):
            fitter.update(pixels(images[i:i + batch_size].to(device), resolution), labels[i:i + batch_size])
        return cls.from_moments(fitter.finalize(), resolution=resolution, pairs=pairs, ridge=ridge,
                                progress=progress)

    @classmethod
    def from_moments(cls, moments: ClassMoments, *, resolution: int,
                     pairs: Iterable[tuple[int, int]] | None = None, ridge: float = 1e-3,
                     progress: bool = True) -> GaussianEditor:
        """An editor from moments already fitted on `pixels(images, resolution)`: computes every
        class's `Sigma_c^{1/2}` and the Monge maps of `pairs` (default: all ordered pairs), with
        `ridge * (tr/d) * I` added to every covariance."""
        c = moments.num_classes
        if moments.dim != 3 * resolution * resolution:
            raise ValueError(f"the moments have dim {moments.dim}, but resolution {resolution} means "
                             f"3*{resolution}*{resolution} = {3 * resolution * resolution}")
        pairs = tuple(permutations(range(c), 2)) if pairs is None else tuple((int(s), int(t)) for s, t in pairs)
        bad = [p for p in pairs if not (0 <= p[0] < c and 0 <= p[1] < c)]
        if bad:
            raise ValueError(f"pairs must be (source, target) classes in 0..{c - 1}, got {bad[:3]}")
        roots = class_roots(moments.covs, ridge=ridge)
        maps = monge_maps(moments, list(pairs), ridge=ridge, progress=progress, roots=roots)
        halves = torch.stack([roots[k][0] for k in range(c)]).float()
        return cls(moments, pairs, maps, halves, resolution, ridge)

    def map(self, source: int, target: int) -> torch.Tensor:
        """The Monge map `A` `[d, d]` from class `source` to class `target` (identity if equal)."""
        if source == target:
            return torch.eye(self.moments.dim, dtype=self.maps.dtype, device=self.maps.device)
        try:
            return self.maps[self.pairs.index((int(source), int(target)))]
        except ValueError:
            raise KeyError(f"no map for the pair ({source}, {target}); fit the editor with it in `pairs` "
                           f"(fitted pairs: {list(self.pairs)[:6]}...)") from None

    def _by_pair(self, images: torch.Tensor, source, target, edit_fn) -> torch.Tensor:
        n = len(images)
        source = torch.as_tensor(source).long().expand(n).cpu() if torch.as_tensor(source).ndim == 0 \
            else torch.as_tensor(source).long().cpu()
        target = torch.as_tensor(target).long().expand(n).cpu() if torch.as_tensor(target).ndim == 0 \
            else torch.as_tensor(target).long().cpu()
        if len(source) != n or len(target) != n:
            raise ValueError(f"source and target must be ints or [N] class tensors with N = {n}")
        dev = self.moments.means.device
        before = pixels(images, self.resolution).to(dev)
        after = before.clone()
        for s, t in torch.unique(torch.stack([source, target], 1), dim=0).tolist():
            rows = ((source == s) & (target == t)).nonzero().flatten().to(dev)
            after[rows] = edit_fn(before[rows], s, t)
        return apply_delta(images.to(dev), before, after).to(images.device)

    def edit(self, images: torch.Tensor, source, target) -> torch.Tensor:
        """Gaussian OT edit `x' = mu_t + A_{s->t} (x - mu_s)` of `images` `[N, 3, H, W]`;
        `source`, `target`: ints or `[N]` classes -> float `[N, 3, H, W]` in [0, 1]."""
        m = self.moments.means.float()
        return self._by_pair(images, source, target,
                             lambda x, s, t: gaussian_edit(x, m[s], m[t], self.map(s, t)))

    def mean_shift(self, images: torch.Tensor, source, target) -> torch.Tensor:
        """First-order edit `x + mu_t - mu_s` of `images` `[N, 3, H, W]` -> float, clamped to [0, 1]."""
        m = self.moments.means.float()
        return self._by_pair(images, source, target, lambda x, s, t: mean_shift(x, m[s], m[t], clamp=False))

    def sample(self, c: int, n: int, generator: torch.Generator | None = None, size: int = 32) -> torch.Tensor:
        """`n` synthetic images `[n, 3, size, size]` in [0, 1] drawn from `N(mu_c, Sigma_c)` (the
        ridged covariance: `mu_c + z Sigma_c^{1/2}`, `z ~ N(0, I)`)."""
        mean, root = self.moments.means[c].float(), self.roots[c]
        z = torch.randn(n, len(mean), generator=generator,
                        device=generator.device if generator is not None else mean.device).to(mean.device)
        return to_images(mean + z @ root, size=size)

    def sample_all(self, per_class: int, generator: torch.Generator | None = None,
                   size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """`per_class` synthetic images of every class:
        `(images [C*per_class, 3, size, size], labels [C*per_class])`."""
        imgs = [self.sample(c, per_class, generator, size) for c in range(self.moments.num_classes)]
        labels = torch.arange(self.moments.num_classes).repeat_interleave(per_class)
        return torch.cat(imgs).cpu(), labels


# --------------------------------------------------------------------------------------------
# The experiment of notebook 03: sizes per tier, the cached editor, the edited sets, the sweep
# --------------------------------------------------------------------------------------------
OT, SHIFT, SAMPLES = "Gaussian OT edit → target", "mean shift → target", "N(μ_c, Σ_c) samples → c"


@dataclass(frozen=True)
class SweepSetup:
    """The sizes of notebook 03's experiment in one tier (`sweep_setup()`).

    - `resolution`: side of the pixel grid the statistics live on (`d = 3 r^2`)
    - `n_train` / `n_test`: training images (None: all 50,000) / test images edited (None: all 10,000)
    - `epochs`: training epochs (None: the tier's recipe)
    - `pairs`: the edited `(source, target)` pairs (None: all 90, each test image to a random class)
    - `per_class`: synthetic samples of each class's Gaussian
    - `n_clean`: test images whose clean accuracy every checkpoint reports during training
    """

    resolution: int
    n_train: int | None
    n_test: int | None
    epochs: float | None
    pairs: tuple[tuple[int, int], ...] | None
    per_class: int
    n_clean: int | None


def sweep_setup(tier: str | None = None) -> SweepSetup:
    """Notebook 03's sizes in `tier` (default `CFG.mode`), chosen once from its time budget:

    - ci: the ci recipe's 10,000 training images, 16 x 16 statistics, 1,000 test images;
    - laptop: all 50,000 training images for 3 epochs (the laptop recipe's widths), 16 x 16
      statistics, 5,000 test images edited (a standard error of about 0.006 on a fraction near
      0.25; all 10,000 put the sweep over the 5-minute budget: each checkpoint sees every image of
      the three sets, ~120 s for 25,000 images at 12 checkpoints on 2 cores); clean accuracy on
      2,000 (it is context only);
    - full: the paper's setting, 32 x 32 statistics, all 90 pairs, the full recipe (a GPU job).
    Pairs `s -> s - 2` (bird -> airplane) in ci and laptop.
    """
    tier = CFG.mode if tier is None else tier
    two_back = tuple((s, (s - 2) % 10) for s in range(10))
    n_train = recipe(tier=tier)["n_train"]
    table = {
        "ci": SweepSetup(16, n_train, 1000, None, two_back, 100, 1000),
        "laptop": SweepSetup(16, n_train, 5000, 3.0, two_back, 500, 2000),
        "full": SweepSetup(32, n_train, None, None, None, 1000, None),
    }
    if tier not in table:
        raise ValueError(f"tier must be one of {sorted(table)}, got {tier!r}")
    return table[tier]


def fit_editor(images: torch.Tensor, labels: torch.Tensor, *, resolution: int,
               pairs: Iterable[tuple[int, int]] | None, ridge: float = 1e-3, num_classes: int = 10,
               progress: bool = True) -> GaussianEditor:
    """`GaussianEditor.fit(...)` on `images` `[N, 3, 32, 32]` / `labels` `[N]`, through the
    result cache: the class moments and Monge maps are computed once per machine and tier."""
    pairs = None if pairs is None else tuple((int(s), int(t)) for s, t in pairs)
    return cached("moment_editor", _fit_editor, version=1,
                  args=dict(images=images, labels=labels, resolution=int(resolution), pairs=pairs,
                            ridge=float(ridge), num_classes=int(num_classes), device=str(CFG.device)),
                  options=dict(progress=progress))


def _fit_editor(images: torch.Tensor, labels: torch.Tensor, *, device: str, progress: bool,
                **kwargs) -> GaussianEditor:
    return GaussianEditor.fit(images, labels, device=device, progress=progress, **kwargs)


def edit_targets(labels: torch.Tensor, pairs: Iterable[tuple[int, int]] | None, num_classes: int = 10,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Each test image's target class `[N]`: its pair's target when `pairs` map every class to
    one target (bird -> airplane), else (`pairs=None`) a random other class (`random_targets`)."""
    if pairs is None:
        return random_targets(labels, num_classes, generator)
    table = dict((int(s), int(t)) for s, t in pairs)
    if sorted(table) != list(range(num_classes)):
        raise ValueError(f"pairs must give one target to each of the {num_classes} classes, got {sorted(table)}")
    return torch.tensor([table[c] for c in range(num_classes)], device=labels.device)[labels.long()]


def edit_sets(editor: GaussianEditor, images: torch.Tensor, labels: torch.Tensor, *,
              pairs: Iterable[tuple[int, int]] | None, per_class: int,
              seed: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The three image sets every checkpoint of the sweep sees, each `(images [M, 3, 32, 32] float
    in [0, 1], the class counted as a hit [M])`:

    - `OT`: `images` moved by the Gaussian OT edit from `labels` to `edit_targets(labels, pairs)`,
      and those targets;
    - `SHIFT`: the same images mean-shifted to the same targets;
    - `SAMPLES`: `per_class` draws of every class's `N(mu_c, Sigma_c)`, and their class.

    One generator seeded with `seed` (default `CFG.seed`) draws the random targets (all pairs) and
    then the samples, so the sets are the same on every run.
    """
    gen = torch.Generator().manual_seed(CFG.seed if seed is None else seed)
    targets = edit_targets(labels, pairs, editor.moments.num_classes, gen)
    synth, synth_labels = editor.sample_all(per_class, gen)
    return {OT: (editor.edit(images, labels, targets), targets),
            SHIFT: (editor.mean_shift(images, labels, targets), targets),
            SAMPLES: (synth, synth_labels)}


@dataclass(frozen=True)
class Curve:
    """One curve of the sweep: its `peak` value, the step of the peak (`peak_step`, the first
    one on a tie) and its position in the checkpoints (`peak_index`), and the `final` value."""

    peak: float
    peak_step: int
    peak_index: int
    final: float


@dataclass(frozen=True, eq=False)
class EditSweep:
    """What every checkpoint predicts for every image of every set (from `edit_sweep`).

    - `steps`: the checkpointed training steps `[K]`
    - `predictions`: set name -> predicted classes, int64 `[K, M]`
    - `labels`: set name -> the class counted as a hit `[M]`
    """

    steps: list[int]
    predictions: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]

    def hits(self, name: str) -> torch.Tensor:
        """bool `[K, M]`: checkpoint k assigns image m of set `name` to its hit class."""
        if name not in self.predictions:
            raise KeyError(f"no set {name!r} in the sweep; it has {list(self.predictions)}")
        return self.predictions[name] == self.labels[name][None]

    def fractions(self) -> dict[str, list[float]]:
        """set name -> the fraction of hits at each checkpoint `[K]`."""
        return {name: self.hits(name).double().mean(1).tolist() for name in self.predictions}

    def curve(self, name: str) -> Curve:
        """The peak, the step of the peak and the final value of set `name`'s curve."""
        ys = self.hits(name).double().mean(1)
        k = int(ys.argmax())
        return Curve(float(ys[k]), int(self.steps[k]), k, float(ys[-1]))

    def turned(self, name: str, step: int) -> torch.Tensor:
        """bool `[M]`: images of set `name` that the checkpoint at `step` assigns to their hit
        class and the final network does not (fooled at `step`, no longer at the end)."""
        if step not in self.steps:
            raise KeyError(f"no checkpoint at step {step}; the sweep has {self.steps}")
        hits = self.hits(name)
        return hits[self.steps.index(step)] & ~hits[-1]


def edit_sweep(result: TrainResult, sets: dict[str, tuple[torch.Tensor, torch.Tensor]], *, batch_size: int = 1000,
               progress: bool = True) -> EditSweep:
    """Show the same image sets (`edit_sets`) to every checkpoint of `result` (a
    `train.TrainResult`), through the result cache. `sets`: name -> `(images [M, 3, 32, 32], hit
    classes [M])`. Returns an `EditSweep` of every checkpoint's predicted class for every image.

    Each set is its own cache entry, keyed by the checkpoints and that set's images: a later
    sweep of some of the sets (notebook 05 needs only the OT edits) loads them from notebook 03's."""
    if not result.checkpoints:
        raise ValueError("the training run kept no checkpoints: train with checkpoints='log'")
    bad = [k for k, (x, y) in sets.items() if x.ndim != 4 or len(x) != len(y)]
    if bad:
        raise ValueError(f"each set must be (images [M, 3, H, W], labels [M]); not so for {bad}")
    net = dict(num_classes=result.config["num_classes"], widths=tuple(result.config["width"]),
               bn_momentum=result.config["bn_momentum"])
    states = [c.state_dict for c in result.checkpoints]
    predictions = {name: cached("moment_edit_sweep", _sweep_set, version=2,
                                args=dict(states=states, net=net, images=x),
                                options=dict(batch_size=batch_size, progress=progress, desc=f"checkpoints ({name})"))
                   for name, (x, _) in sets.items()}
    return EditSweep(result.steps_list(), predictions, {k: y.long().cpu() for k, (_, y) in sets.items()})


def _sweep_set(states: list[dict[str, torch.Tensor]], net: dict, images: torch.Tensor, *,
               batch_size: int, progress: bool, desc: str) -> torch.Tensor:
    """Each checkpoint's predicted class of each of `images` `[M, 3, H, W]` -> int64 `[K, M]`."""
    preds = []
    for state in tqdm(states, desc=desc, disable=not progress):
        model = CifarNet(**net)
        model.load_state_dict(state)
        model = model.eval().to(memory_format=torch.channels_last)  # about 1.5x faster on a CPU
        preds.append(_predicted_classes(model, images, batch_size))
    return torch.stack(preds)


@torch.inference_mode()
def _predicted_classes(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`model`'s argmax class of each of `images` `[M, 3, H, W]` -> int64 `[M]` on the CPU."""
    out = [model(images[i:i + batch_size].contiguous(memory_format=torch.channels_last)).argmax(1).cpu()
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def run_experiment(*, swept: Iterable[str] | None = None, progress: bool = True) -> tuple:
    """Notebook 03's whole experiment in the current tier, through the cache, with the same calls as
    the notebook: `(setup, editor, sets, result, sweep)`. The precompute recipe runs it.
    `swept`: the names of the sets the sweep covers (default all three; notebook 05 needs only
    `OT`, and loads it from notebook 03's sweep when that has run)."""
    swept = None if swept is None else list(swept)
    unknown = [name for name in swept or () if name not in (OT, SHIFT, SAMPLES)]
    if unknown:  # checked before anything is trained
        raise ValueError(f"swept: no set named {unknown}; the sets are moments.OT, moments.SHIFT, moments.SAMPLES")
    seed_everything()  # as the notebook's first cell: the seed, and one thread in the ci tier (part of the key)
    setup = sweep_setup()
    train = load_cifar10("train", n=setup.n_train)
    test = load_cifar10("test", n=setup.n_test)
    editor = fit_editor(train.images, train.labels, resolution=setup.resolution, pairs=setup.pairs,
                        progress=progress)
    sets = edit_sets(editor, test.images, test.labels, pairs=setup.pairs, per_class=setup.per_class)
    clean = (test.images[:setup.n_clean], test.labels[:setup.n_clean])
    result = train_classifier(train.images, train.labels, test=clean, epochs=setup.epochs, progress=progress)
    chosen = sets if swept is None else {name: sets[name] for name in swept}
    return setup, editor, sets, result, edit_sweep(result, chosen, progress=progress)


@precompute_recipe("moment_editing")
def _precompute() -> None:
    """Fill the cache with notebook 03's editor, training run and sweep in the current tier."""
    run_experiment()
