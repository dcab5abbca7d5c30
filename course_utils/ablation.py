"""Is an explanation better than a rock? Channel ablation, loss recovered, and the constant model.

An "explanation" of a network's last layer here is a set of channels of its penultimate
representation `h(x)` `[D]`, the rest declared irrelevant. Test it by *ablating* the rest (replace
them by their mean over the data, or, as causal scrubbing does, by their values on another random
input) and measuring the loss `L_expl`. Loss recovered compares it with the clean model (`L_clean`,
nothing ablated) and the fully ablated one (`L_abl`, every channel ablated):

    recovered = (L_abl - L_expl) / (L_abl - L_clean)        # 1: as good as the model, 0: nothing

The number hides a baseline: a *rock*, the constant model that predicts the class frequencies,
has loss `H(p) = -sum_c p_c log p_c` without looking at the input at all. An explanation can
recover most of the loss and still do worse than the rock when `L_abl` is far above it (resampled
channels keep their variance, so the ablated model stays confident and is confidently wrong).

    E = embeddings(model, images)                              # anomaly.embeddings: [N, D]
    scores = channel_scores(E, model.head.weight, labels)     # [D], gradient x activation
    keep = top_k_mask(scores, 8)
    loss = head_loss(ablate(E, keep, "resample"), model.head.weight, labels, scale=model.scale)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ABLATIONS", "ablate", "channel_scores", "head_loss", "loss_recovered", "rock_loss", "top_k_mask"]

ABLATIONS = ("mean", "resample")


def channel_scores(features: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How much each channel moves the true class's logit, gradient times activation relative to
    the mean (Grad-CAM's weighting at a pooled layer): `mean_n |(h_nj - mean_j h_j) * W[y_n, j]|`.
    `features` `[N, D]`, `head_weight` `[C, D]` (the gradient of the logits), `labels` `[N]` -> `[D]`."""
    centred = features.double() - features.double().mean(0)
    return (centred * head_weight.detach().double().cpu()[labels.long()]).abs().mean(0)


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool `[D]`: True at the `k` highest `scores` `[D]`."""
    if not 0 <= k <= len(scores):
        raise ValueError(f"k must be between 0 and {len(scores)}, got {k}")
    keep = torch.zeros(len(scores), dtype=torch.bool)
    keep[torch.topk(scores, k).indices] = True
    return keep


def ablate(features: torch.Tensor, keep: torch.Tensor, how: str = "mean", seed: int = 0) -> torch.Tensor:
    """`features` `[N, D]` with the channels where `keep` `[D]` is False ablated: replaced by their
    mean over the `N` rows (`how="mean"`), or by the same channels of another row, one random
    permutation of the rows (seeded by `seed`) for all ablated channels (`how="resample"`)."""
    if how not in ABLATIONS:
        raise ValueError(f"how must be one of {ABLATIONS}, got {how!r}")
    if how == "mean":
        other = features.mean(0, keepdim=True).expand_as(features)
    else:
        other = features[torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))]
    return torch.where(keep.to(features.device)[None], features, other)


def head_loss(features: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, *,
              scale: float = 1.0) -> float:
    """The mean cross-entropy of the last layer `logits = scale * features @ W^T` (the course's
    `CifarNet` multiplies by `model.scale`). `features` `[N, D]`, `head_weight` `[C, D]`, `labels` `[N]`."""
    logits = scale * features.double() @ head_weight.detach().double().cpu().T
    return float(F.cross_entropy(logits, labels.long().cpu()))


def loss_recovered(loss: float | torch.Tensor, clean: float, ablated: float) -> float | torch.Tensor:
    """`(ablated - loss) / (ablated - clean)`: the fraction of the gap between the fully ablated
    model and the clean one that the explanation closes (`loss` a float, or a tensor `[K]` of the
    losses of K explanations -> `[K]`)."""
    if ablated == clean:
        raise ValueError("the clean and the fully ablated losses are equal: loss recovered is undefined")
    return (ablated - loss) / (ablated - clean)


def rock_loss(train_labels: torch.Tensor, test_labels: torch.Tensor, num_classes: int) -> float:
    """The loss of the constant model that predicts the training set's class frequencies `p`:
    `-mean_n log p[y_n]` over `test_labels` (the entropy `H(p)` when both sets are balanced alike)."""
    freq = torch.bincount(train_labels.long().cpu(), minlength=num_classes).double()
    freq = freq / freq.sum()
    p = freq[test_labels.long().cpu()]
    if bool((p == 0).any()):
        return math.inf
    return float(-p.log().mean())
