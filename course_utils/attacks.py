"""Adversarial examples: FGSM and PGD under an L-infinity budget, and a checkpoint sweep of them.

Goodfellow et al. (2015), "Explaining and Harnessing Adversarial Examples": one step along the sign
of the loss gradient, `x' = clamp(x + eps * sign(grad_x L(f(x), y)))`, the fast gradient sign
method (FGSM). Madry et al. (2018), "Towards Deep Learning Models Resistant to Adversarial
Attacks": repeat smaller steps and project back into the ball `||x' - x||_inf <= eps` after each,
projected gradient descent (PGD). Both are *optimised against one network*: they need its gradient.

    from course_utils.attacks import fgsm, pgd, eps_for_psnr

    adv = pgd(model, images, targets, eps=eps_for_psnr(20.0), steps=10, targeted=True)

`targeted=True` descends the loss of the given (target) class instead of ascending the loss of the
true class. Images are float in [0, 1] (uint8 is converted), `[N, 3, H, W]`; the model must be in
eval mode. `attack_checkpoints` runs PGD against every checkpoint of a training run, through the
result cache, as notebook 05 does with notebook 03's sweep.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from course_utils.cache import cached
from course_utils.gaussian import as_float_images
from course_utils.train import CifarNet, TrainResult

__all__ = ["attack_checkpoints", "eps_for_psnr", "fgsm", "loss_gradient", "pgd"]


def _check_model(model: nn.Module) -> None:
    if model.training:
        raise RuntimeError("the model is in training mode: call model.eval() first (BatchNorm mixes a batch)")


def loss_gradient(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`grad_x` of the summed cross-entropy of `model(x)` `[N, C]` against `labels` `[N]`;
    `x` float `[N, 3, H, W]` -> `[N, 3, H, W]` (the images are independent in eval mode, so each
    row is that image's own gradient)."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), labels.to(x.device).long(), reduction="sum")
        grad, = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *,
         targeted: bool = False) -> torch.Tensor:
    """One signed-gradient step of size `eps`: `images` `[N, 3, H, W]` in [0, 1], `labels` `[N]`
    (the true classes, or the target classes when `targeted`) -> float `[N, 3, H, W]` in [0, 1]."""
    _check_model(model)
    x = as_float_images(images)
    direction = -1.0 if targeted else 1.0
    return (x + direction * eps * loss_gradient(model, x, labels).sign()).clamp(0, 1)


def pgd(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, *, steps: int = 10,
        step_size: float | None = None, targeted: bool = False) -> torch.Tensor:
    """`steps` signed-gradient steps of `step_size` (default `2.5 eps / steps`), each followed by the
    projection onto `{x' : ||x' - x||_inf <= eps, 0 <= x' <= 1}`. No random start: the result is
    deterministic. `images` `[N, 3, H, W]`, `labels` `[N]` -> float `[N, 3, H, W]`."""
    _check_model(model)
    if eps < 0 or steps < 1:
        raise ValueError(f"need eps >= 0 and steps >= 1, got eps={eps}, steps={steps}")
    x0 = as_float_images(images)
    alpha = 2.5 * eps / steps if step_size is None else step_size
    direction = -1.0 if targeted else 1.0
    x = x0.clone()
    for _ in range(steps):
        x = x + direction * alpha * loss_gradient(model, x, labels).sign()
        x = torch.maximum(torch.minimum(x, x0 + eps), x0 - eps).clamp(0, 1)
    return x


def eps_for_psnr(psnr_db: float) -> float:
    """The L-inf budget whose *largest* change, every pixel moved by `eps`, has PSNR `psnr_db`
    (images in [0, 1]): `MSE = eps^2`, so `eps = 10^(-PSNR / 20)`. Any attack inside the ball
    changes the image at most this much, so its PSNR is at least `psnr_db`."""
    if not math.isfinite(psnr_db):
        raise ValueError(f"psnr_db must be a finite number of dB, got {psnr_db}")
    return 10.0 ** (-psnr_db / 20.0)


def attack_checkpoints(result: TrainResult, images: torch.Tensor, targets: torch.Tensor, *, eps: float,
                       steps: int = 10, batch_size: int = 100, progress: bool = True) -> dict:
    """Targeted PGD (`targets` `[M]`) against every checkpoint of `result`, through the result cache.

    Returns a dict: `steps` (the checkpoints' steps, list), `fooled` float `[K]` (the fraction of the
    `M` images each checkpoint assigns to its target), `psnr` float `[K]` (the mean PSNR of each
    checkpoint's adversarial images against the originals), `adversarial` float `[M, 3, H, W]` (the
    images made against the *last* checkpoint)."""
    if not result.checkpoints:
        raise ValueError("the training run kept no checkpoints: train with checkpoints='log'")
    net = dict(num_classes=result.config["num_classes"], widths=tuple(result.config["width"]),
               bn_momentum=result.config["bn_momentum"])
    return cached("pgd_checkpoints", _attack_states, version=2,
                  args=dict(states=[c.state_dict for c in result.checkpoints], steps_list=result.steps_list(),
                            net=net, images=images, targets=targets, eps=float(eps), steps=int(steps)),
                  options=dict(batch_size=batch_size, progress=progress))


def _attack_states(states: list[dict], steps_list: list[int], net: dict, images: torch.Tensor,
                   targets: torch.Tensor, *, eps: float, steps: int, batch_size: int, progress: bool) -> dict:
    x0 = as_float_images(images).cpu().contiguous(memory_format=torch.channels_last)
    fooled, quality, adv = [], [], x0
    for state in tqdm(states, desc="PGD against each checkpoint", disable=not progress):
        model = CifarNet(**net)
        model.load_state_dict(state)
        # channels_last: about 1.3x faster on a CPU; no weight gradients: only the images' are needed
        model = model.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        adv = torch.cat([pgd(model, x0[i:i + batch_size], targets[i:i + batch_size], eps, steps=steps,
                             targeted=True) for i in range(0, len(x0), batch_size)])
        with torch.inference_mode():
            pred = torch.cat([model(adv[i:i + batch_size]).argmax(1) for i in range(0, len(adv), batch_size)])
        fooled.append((pred == targets.cpu()).double().mean())
        mse = ((adv - x0) ** 2).flatten(1).mean(1).double()
        quality.append((10 * torch.log10(1 / mse)).mean())
    return dict(steps=list(steps_list), fooled=torch.stack(fooled), psnr=torch.stack(quality),
                adversarial=adv.contiguous())
