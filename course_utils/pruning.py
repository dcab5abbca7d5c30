"""Global magnitude pruning: zero the smallest weights of a whole network, then measure accuracy.

Han et al. (2015), "Learning both Weights and Connections for Efficient Neural Networks": many
weights of a trained network can be set to zero with little loss. *Global* magnitude pruning ranks
the absolute values of the weights of every layer together and zeroes the `k = round(s * n)`
smallest, `s` the sparsity (the same rule as `torch.nn.utils.prune.global_unstructured` with
`L1Unstructured`, which the tests compare against).

    from course_utils.pruning import prune_global, pruning_curve

    sparse = prune_global(model, 0.9)              # a pruned copy: 90% of the weights are 0

The weights pruned are those of every `nn.Conv2d` and `nn.Linear` (`prunable_weights`); biases and
normalisation parameters are left alone.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from course_utils.cache import cached
from course_utils.train import CifarNet, accuracy

__all__ = ["magnitude_masks", "prunable_weights", "prune_global", "pruning_curve", "sparsity_of"]


def prunable_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """`(name, weight)` of every `nn.Conv2d` and `nn.Linear` of `model`, in module order."""
    return [(f"{name}.weight" if name else "weight", m.weight) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))]


def magnitude_masks(weights: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Global magnitude masks: `weights` (tensors of any shapes) -> bool masks of the same shapes,
    False at the `round(sparsity * n)` entries of smallest `|w|` over all the tensors together
    (`n` their total size), True elsewhere."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be a fraction in [0, 1], got {sparsity}")
    flat = torch.cat([w.detach().abs().flatten() for w in weights])
    keep = torch.ones_like(flat, dtype=torch.bool)
    k = round(sparsity * flat.numel())
    if k:
        keep[torch.topk(flat, k, largest=False).indices] = False
    return [m.reshape(w.shape) for m, w in zip(keep.split([w.numel() for w in weights]), weights)]


def prune_global(model: nn.Module, sparsity: float) -> nn.Module:
    """A copy of `model` with the global-magnitude fraction `sparsity` of its conv and linear
    weights set to zero (`magnitude_masks`); `model` itself is unchanged."""
    pruned = copy.deepcopy(model)
    named = prunable_weights(pruned)
    masks = magnitude_masks([w for _, w in named], sparsity)
    with torch.no_grad():
        for (_, w), mask in zip(named, masks):
            w.mul_(mask)
    return pruned


def sparsity_of(model: nn.Module) -> float:
    """The fraction of exact zeros among `model`'s conv and linear weights."""
    weights = [w for _, w in prunable_weights(model)]
    return float(sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))


def pruning_curve(model: CifarNet, images: torch.Tensor, labels: torch.Tensor, sparsities: Sequence[float], *,
                  progress: bool = True) -> list[float]:
    """Test accuracy of `prune_global(model, s)` on `images` `[N, 3, 32, 32]` / `labels` `[N]` for each
    `s` in `sparsities`, through the result cache (the course's `CifarNet`)."""
    net = dict(num_classes=model.num_classes, widths=tuple(model.widths))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return cached("pruning_curve", _curve, version=2,
                  args=dict(state=state, net=net, images=images, labels=labels,
                            sparsities=[float(s) for s in sparsities]),
                  options=dict(progress=progress))


def _curve(state: dict, net: dict, images: torch.Tensor, labels: torch.Tensor, sparsities: list[float], *,
           progress: bool) -> list[float]:
    model = CifarNet(**net)
    model.load_state_dict(state)
    model = model.eval().to(memory_format=torch.channels_last)  # about 1.5x faster on a CPU
    return [accuracy(prune_global(model, s), images, labels)
            for s in tqdm(sparsities, desc="sparsities", disable=not progress)]
