"""Tests for course_utils.pruning: global magnitude masks against a hand-computed case and against
torch.nn.utils.prune.global_unstructured, and the cached accuracy curve."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from course_utils import pruning as P


def test_hand_computed_masks() -> None:
    a = torch.tensor([[0.5, -0.1], [2.0, -3.0]])
    b = torch.tensor([0.2, -0.05, 1.0])
    ma, mb = P.magnitude_masks([a, b], 3 / 7)     # the 3 smallest |w| of all 7: 0.05, 0.1, 0.2
    assert torch.equal(ma, torch.tensor([[True, False], [True, True]]))
    assert torch.equal(mb, torch.tensor([False, False, True]))
    assert all(m.all() for m in P.magnitude_masks([a, b], 0.0))
    assert not any(m.any() for m in P.magnitude_masks([a, b], 1.0))
    with pytest.raises(ValueError, match="fraction"):
        P.magnitude_masks([a], 1.5)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 4))


@pytest.mark.parametrize("sparsity", [0.3, 0.77, 0.9])
def test_prune_global_equals_torch_global_unstructured(sparsity: float) -> None:
    ours = P.prune_global(_net(0), sparsity)
    theirs = _net(0)
    params = [(m, "weight") for m in theirs if isinstance(m, (nn.Conv2d, nn.Linear))]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=sparsity)
    for (name, w), (m, _) in zip(P.prunable_weights(ours), params):
        assert torch.equal(w, m.weight), name
    assert torch.equal(ours[1].weight, theirs[1].weight)            # BatchNorm is not pruned
    total = sum(w.numel() for _, w in P.prunable_weights(ours))
    assert P.sparsity_of(ours) == pytest.approx(round(sparsity * total) / total)


def test_prune_global_leaves_the_model_alone() -> None:
    net = _net(1)
    before = [w.clone() for _, w in P.prunable_weights(net)]
    P.prune_global(net, 0.5)
    assert all(torch.equal(a, w) for a, (_, w) in zip(before, P.prunable_weights(net)))
    assert P.sparsity_of(net) == 0.0


def test_pruning_curve_is_cached_and_matches_accuracy(tmp_path, monkeypatch) -> None:
    from course_utils.train import accuracy, make_cifar_net

    monkeypatch.setenv("COURSE_RESULTS_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = make_cifar_net(3, (4, 8, 8)).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(20, 3, 32, 32, generator=g), torch.arange(20) % 3
    curve = P.pruning_curve(model, x, y, [0.0, 0.6, 1.0], progress=False)
    assert curve == P.pruning_curve(model, x, y, [0.0, 0.6, 1.0], progress=False)
    assert curve[0] == accuracy(model, x, y)
    assert curve[1] == accuracy(P.prune_global(model, 0.6), x, y)
