"""Anomaly detection from activations: a Mahalanobis score, a trigger patch, and the AUROC.

Lee et al. (2018), "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
Adversarial Attacks": fit one Gaussian per class to a network's penultimate activations, with a
covariance shared by all classes, and score a new input by its squared Mahalanobis distance to the
nearest class mean,

    score(x) = min_c (h(x) - mu_c)^T Sigma^{-1} (h(x) - mu_c).

A high score says the network represents this input unlike anything it saw in training: a
question of *why* it answers, not what. The class moments come from the shared Gaussian code
(`gaussian.fit_class_moments`); the shared covariance is the count-weighted average of the class
covariances.

    detector = MahalanobisDetector.fit(train_features, train_labels, num_classes=10)
    auroc(detector.score(clean_features), detector.score(odd_features))   # 0.5: blind, 1: perfect

`auroc(negatives, positives)` is the probability that a random positive scores above a random
negative (ties count one half), the Mann-Whitney statistic; the tests compare it with scikit-learn.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from course_utils.gaussian import add_ridge, as_float_images, fit_class_moments

__all__ = ["MahalanobisDetector", "add_patch", "auroc", "embeddings"]


def auroc(negatives: torch.Tensor, positives: torch.Tensor) -> float:
    """Area under the ROC curve of scores where higher means "positive": `negatives` `[n]`,
    `positives` `[m]` -> `P(s_pos > s_neg) + P(s_pos == s_neg) / 2`, from the average ranks of the
    pooled scores (Mann-Whitney U / (n m))."""
    neg, pos = negatives.double().flatten().cpu(), positives.double().flatten().cpu()
    if not len(neg) or not len(pos):
        raise ValueError(f"need at least one negative and one positive score, got {len(neg)} and {len(pos)}")
    pooled = torch.cat([neg, pos])
    values, inverse, counts = torch.unique(pooled, return_inverse=True, return_counts=True)
    upper = counts.cumsum(0).double()                     # rank of the last copy of each value
    ranks = (upper - (counts.double() - 1) / 2)[inverse]   # average ranks, 1-based
    u = ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(neg) * len(pos)))


@dataclass(frozen=True, eq=False)
class MahalanobisDetector:
    """Class means `[C, D]` and the precision (inverse) of the shared covariance `[D, D]`, float64."""

    means: torch.Tensor
    precision: torch.Tensor

    @classmethod
    def fit(cls, features: torch.Tensor, labels: torch.Tensor, *, num_classes: int,
            ridge: float = 1e-6) -> MahalanobisDetector:
        """Fit on `features` `[N, D]` with `labels` `[N]`: the class means and the count-weighted
        average of the class covariances, plus `ridge * tr/D * I` so that it can be inverted."""
        moments = fit_class_moments(features.detach().double().cpu(), labels.cpu(), num_classes,
                                    device="cpu", progress=False)
        n = (moments.counts - 1).clamp_min(0).double()
        shared = (n[:, None, None] * moments.covs).sum(0) / n.sum()
        return cls(moments.means, torch.linalg.inv(add_ridge(shared, ridge)))

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distances to every class mean: `[N, D]` -> `[N, C]`."""
        diff = features.detach().double().cpu()[:, None, :] - self.means[None]     # [N, C, D]
        return torch.einsum("ncd,de,nce->nc", diff, self.precision, diff)

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """The anomaly score, the distance to the nearest class mean: `[N, D]` -> float64 `[N]`."""
        return self.distances(features).min(1).values


@torch.no_grad()
def embeddings(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """The penultimate activations `model.embed(x)` of `images` `[N, 3, H, W]` -> float `[N, D]` on
    the CPU (the course's `CifarNet`: the max-pooled last conv features)."""
    if model.training:
        raise RuntimeError("the model is in training mode: call model.eval() first")
    embed = getattr(model, "embed", None)
    if embed is None:
        raise TypeError("the model has no .embed(x) (the penultimate features); use the course's CifarNet")
    with torch.no_grad():  # channels_last batches: about 1.5x faster on a CPU
        return torch.cat([embed(images[i:i + batch_size].contiguous(memory_format=torch.channels_last)).float().cpu()
                          for i in range(0, len(images), batch_size)])


def add_patch(images: torch.Tensor, size: int = 4) -> torch.Tensor:
    """A small trigger: a black-and-white checkerboard of `size x size` pixels pasted into the
    bottom-right corner. `images` `[N, 3, H, W]` (uint8 or float) -> float `[N, 3, H, W]` in [0, 1]."""
    x = as_float_images(images).clone()
    if not 1 <= size <= min(x.shape[-2:]):
        raise ValueError(f"size must be between 1 and the image side {min(x.shape[-2:])}, got {size}")
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x[..., -size:, -size:] = ((ii + jj) % 2).float().to(x)
    return x
