"""Tests for notebook 05's label bug (course_utils.label_bugs), the rock and loss recovered
(course_utils.ablation) and the experiment's sizes (course_utils.toolbox)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from course_utils import ablation as AB
from course_utils import label_bugs as LB
from course_utils import toolbox as TB


# --------------------------------------------------------------------------------------------
# The label bug
# --------------------------------------------------------------------------------------------
def test_plant_label_swap_swaps_only_the_batch_and_the_two_classes() -> None:
    labels = torch.tensor([0, 6, 1, 6, 0, 0, 6, 2])
    bug = LB.plant_label_swap(labels, (0, 6), start=1, size=4)
    assert torch.equal(bug.labels, torch.tensor([0, 0, 1, 0, 6, 0, 6, 2]))
    assert torch.equal(bug.planted, torch.tensor([False, True, False, True, True, False, False, False]))
    assert torch.equal(labels, torch.tensor([0, 6, 1, 6, 0, 0, 6, 2]))            # input untouched
    with pytest.raises(ValueError, match="different classes"):
        LB.plant_label_swap(labels, (3, 3), 0, 2)
    with pytest.raises(ValueError, match="start"):
        LB.plant_label_swap(labels, (0, 6), 5, 10)


def test_precision_at_k_hand_computed() -> None:
    scores = torch.tensor([0.1, 5.0, 3.0, 0.2, 4.0])
    relevant = torch.tensor([False, True, False, False, True])
    assert LB.precision_at_k(scores, relevant) == 1.0            # k = 2: scores 5 and 4
    assert LB.precision_at_k(scores, relevant, k=3) == pytest.approx(2 / 3)
    assert LB.precision_at_k(-scores, relevant) == 0.0
    with pytest.raises(ValueError, match="k must"):
        LB.precision_at_k(scores, relevant, k=0)


def test_per_example_loss_is_unsmoothed_cross_entropy() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    x, y = torch.rand(5, 3, 2, 2), torch.tensor([0, 1, 2, 1, 0])
    expected = torch.stack([F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]) for i in range(5)])
    assert torch.allclose(LB.per_example_loss(model, x, y, batch_size=2), expected.detach(), atol=1e-6)


# --------------------------------------------------------------------------------------------
# The rock, ablation, loss recovered
# --------------------------------------------------------------------------------------------
def test_rock_loss_is_the_label_entropy() -> None:
    balanced = torch.arange(100) % 10
    assert AB.rock_loss(balanced, balanced, 10) == pytest.approx(math.log(10))
    skewed = torch.tensor([0] * 3 + [1])
    assert AB.rock_loss(skewed, skewed, 2) == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert AB.rock_loss(torch.zeros(4, dtype=torch.long), torch.tensor([1]), 2) == math.inf


def test_the_rock_is_the_best_constant_model() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (200,), generator=g)
    rock = AB.rock_loss(y, y, 4)
    for _ in range(20):
        logits = torch.randn(4, generator=g).expand(200, 4)
        assert F.cross_entropy(logits, y).item() >= rock - 1e-9


def test_ablate_mean_and_resample() -> None:
    x = torch.arange(12.0).reshape(4, 3)
    keep = torch.tensor([True, False, True])
    mean = AB.ablate(x, keep, "mean")
    assert torch.equal(mean[:, [0, 2]], x[:, [0, 2]]) and torch.equal(mean[:, 1], torch.full((4,), 5.5))
    res = AB.ablate(x, keep, "resample", seed=3)
    assert torch.equal(res[:, [0, 2]], x[:, [0, 2]])
    assert sorted(res[:, 1].tolist()) == sorted(x[:, 1].tolist())           # the same values, permuted
    assert torch.equal(AB.ablate(x, torch.ones(3, dtype=torch.bool), "resample"), x)
    with pytest.raises(ValueError, match="how"):
        AB.ablate(x, keep, "zero")


def test_head_loss_scores_and_loss_recovered() -> None:
    g = torch.Generator().manual_seed(1)
    e, w, y = torch.rand(30, 5, generator=g), torch.randn(3, 5, generator=g), torch.arange(30) % 3
    assert AB.head_loss(e, w, y, scale=0.5) == pytest.approx(F.cross_entropy(0.5 * e @ w.T, y).item(), rel=1e-6)
    scores = AB.channel_scores(e, w, y)
    by_hand = torch.stack([((e[:, j] - e[:, j].mean()) * w[y, j]).abs().mean() for j in range(5)])
    assert torch.allclose(scores, by_hand.double())
    assert torch.equal(AB.top_k_mask(torch.tensor([0.3, 0.9, 0.1, 0.5]), 2), torch.tensor([False, True, False, True]))
    assert AB.loss_recovered(1.0, clean=1.0, ablated=3.0) == 1.0
    assert AB.loss_recovered(3.0, clean=1.0, ablated=3.0) == 0.0
    assert AB.loss_recovered(2.5, clean=0.5, ablated=4.5) == 0.5
    with pytest.raises(ValueError, match="undefined"):
        AB.loss_recovered(1.0, clean=2.0, ablated=2.0)


# --------------------------------------------------------------------------------------------
# The experiment's sizes
# --------------------------------------------------------------------------------------------
def test_toolbox_setup_per_tier() -> None:
    ci, laptop, full = (TB.toolbox_setup(t) for t in ("ci", "laptop", "full"))
    assert ci.bug_n_train <= laptop.bug_n_train <= full.bug_n_train
    assert ci.n_attack < laptop.n_attack and ci.sparsities[0] == 0.0
    assert ci.bug_start + ci.bug_size <= ci.bug_n_train
    with pytest.raises(ValueError, match="tier"):
        TB.toolbox_setup("huge")
