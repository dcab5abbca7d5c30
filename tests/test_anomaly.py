"""Tests for course_utils.anomaly: the AUROC against scikit-learn, the Mahalanobis detector against a
hand-written one, the trigger patch and the embeddings."""
from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from course_utils import anomaly as AN


@pytest.mark.parametrize("seed, ties", [(0, False), (1, True), (2, True)])
def test_auroc_equals_sklearn(seed: int, ties: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    neg, pos = torch.randn(37, generator=g), torch.randn(23, generator=g) + 0.7
    if ties:
        neg, pos = neg.round(), pos.round()             # many equal scores on both sides
    expected = roc_auc_score([0] * len(neg) + [1] * len(pos), torch.cat([neg, pos]).numpy())
    assert AN.auroc(neg, pos) == pytest.approx(expected, abs=1e-12)


def test_auroc_extremes_and_errors() -> None:
    assert AN.auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert AN.auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert AN.auroc(torch.ones(4), torch.ones(3)) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        AN.auroc(torch.tensor([]), torch.ones(3))


def test_mahalanobis_detector_equals_a_hand_written_one() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 4, generator=g, dtype=torch.float64)
    y = torch.arange(300) % 3
    x = x + 3.0 * y[:, None]
    det = AN.MahalanobisDetector.fit(x, y, num_classes=3, ridge=0.0)
    means = torch.stack([x[y == c].mean(0) for c in range(3)])
    centred = x - means[y]
    shared = centred.T @ centred / (len(x) - 3)          # the pooled within-class covariance
    assert torch.allclose(det.means, means) and torch.allclose(det.precision, torch.linalg.inv(shared))
    q = torch.randn(5, 4, generator=g, dtype=torch.float64)
    d = torch.stack([((q - m) @ torch.linalg.inv(shared) * (q - m)).sum(1) for m in means], 1)
    assert torch.allclose(det.distances(q), d) and torch.allclose(det.score(q), d.min(1).values)
    assert det.score(means).max() < 1e-10                 # a class mean is never anomalous
    assert det.score(q + 100).min() > det.score(x).max()  # far away is


def test_add_patch() -> None:
    x = torch.full((2, 3, 8, 8), 128, dtype=torch.uint8)
    out = AN.add_patch(x, size=2)
    assert out.dtype == torch.float32 and torch.equal(out[..., :6, :], x[..., :6, :].float() / 255)
    assert torch.equal(out[0, 0, 6:, 6:], torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    assert torch.equal(x, torch.full((2, 3, 8, 8), 128, dtype=torch.uint8))   # the input is left alone
    with pytest.raises(ValueError, match="size"):
        AN.add_patch(x, size=9)


def test_embeddings_are_the_penultimate_features() -> None:
    from course_utils.train import make_cifar_net

    torch.manual_seed(0)
    model = make_cifar_net(3, (4, 8, 8)).eval()
    x = torch.rand(7, 3, 32, 32)
    e = AN.embeddings(model, x, batch_size=3)
    assert e.shape == (7, 8)
    assert torch.allclose(model.head(e) * model.scale, model(x), atol=1e-6)
    with pytest.raises(RuntimeError, match="eval"):
        AN.embeddings(model.train(), x)
