"""Tests for course_utils.attacks: FGSM and PGD against a plain autograd loop, the L-inf ball, the
PSNR budget, and the cached checkpoint sweep."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from course_utils import attacks as A


def _toy(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    g = torch.Generator().manual_seed(seed)
    return model, torch.rand(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)


def _plain_step(model, x, y, eps, targeted):
    """One FGSM step written the textbook way: backward() on the mean loss, x.grad."""
    x = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(x), y).backward()
    step = eps * x.grad.sign()
    return (x - step if targeted else x + step).detach().clamp(0, 1)


@pytest.mark.parametrize("targeted", [False, True])
def test_fgsm_equals_a_plain_autograd_step(targeted: bool) -> None:
    model, x, y = _toy()
    assert torch.equal(A.fgsm(model, x, y, 0.03, targeted=targeted), _plain_step(model, x, y, 0.03, targeted))


@pytest.mark.parametrize("targeted", [False, True])
def test_pgd_equals_a_plain_loop(targeted: bool) -> None:
    model, x, y = _toy(1)
    eps, alpha, steps = 0.05, 0.02, 4
    ref = x.clone()
    for _ in range(steps):
        ref = _plain_step(model, ref, y, alpha, targeted)
        ref = torch.clamp(ref, x - eps, x + eps).clamp(0, 1)
    out = A.pgd(model, x, y, eps, steps=steps, step_size=alpha, targeted=targeted)
    assert torch.allclose(out, ref, atol=1e-7)
    assert (out - x).abs().max() <= eps + 1e-7 and out.min() >= 0 and out.max() <= 1


def test_pgd_raises_the_loss_and_a_single_full_step_is_fgsm() -> None:
    model, x, y = _toy(2)
    loss = lambda z: nn.functional.cross_entropy(model(z), y).item()  # noqa: E731
    adv = A.pgd(model, x, y, 0.05, steps=5)
    assert loss(adv) > loss(A.fgsm(model, x, y, 0.01)) > loss(x)
    assert torch.equal(A.pgd(model, x, y, 0.05, steps=1, step_size=0.05), A.fgsm(model, x, y, 0.05))
    target = (y + 1) % 5
    assert nn.functional.cross_entropy(model(A.pgd(model, x, target, 0.05, targeted=True)), target) < \
        nn.functional.cross_entropy(model(x), target)


def test_uint8_images_are_scaled() -> None:
    model, x, y = _toy(3)
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(A.fgsm(model, u8, y, 0.02), A.fgsm(model, u8.float() / 255, y, 0.02))


def test_eps_for_psnr_is_the_psnr_of_a_full_sign_perturbation() -> None:
    from course_utils.moments import psnr

    eps = A.eps_for_psnr(20.0)
    assert eps == pytest.approx(0.1)
    x = 0.5 * torch.ones(2, 3, 4, 4)
    sign = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert psnr(x + eps * sign, x).double() == pytest.approx([20.0, 20.0], abs=1e-4)
    with pytest.raises(ValueError, match="finite"):
        A.eps_for_psnr(float("inf"))


def test_training_mode_and_bad_arguments_are_refused() -> None:
    model, x, y = _toy()
    with pytest.raises(RuntimeError, match="eval"):
        A.fgsm(model.train(), x, y, 0.1)
    with pytest.raises(ValueError, match="steps"):
        A.pgd(model.eval(), x, y, 0.1, steps=0)


def test_attack_checkpoints_matches_pgd_per_checkpoint(tmp_path, monkeypatch) -> None:
    from course_utils.train import train_classifier

    monkeypatch.setenv("COURSE_RESULTS_DIR", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    images, labels = torch.rand(32, 3, 32, 32, generator=g), torch.arange(32) % 3
    result = train_classifier(images, labels, epochs=1, batch_size=16, width=(4, 8, 8), num_classes=3,
                              device="cpu", progress=False, cache=False)
    targets = (labels[:6] + 1) % 3
    out = A.attack_checkpoints(result, images[:6], targets, eps=0.05, steps=2, batch_size=4, progress=False)
    again = A.attack_checkpoints(result, images[:6], targets, eps=0.05, steps=2, batch_size=4, progress=False)
    assert out["steps"] == result.steps_list() and torch.equal(out["fooled"], again["fooled"])
    last = result.model_at(result.steps_list()[-1], "cpu")
    adv = A.pgd(last, images[:6], targets, 0.05, steps=2, targeted=True)
    assert torch.allclose(out["adversarial"], adv, atol=1e-6)
    fooled = (last(adv).argmax(1) == targets).double().mean()
    assert float(out["fooled"][-1]) == pytest.approx(float(fooled))
    assert (out["psnr"] >= 20 * 0.99 * -torch.log10(torch.tensor(0.05))).all()
