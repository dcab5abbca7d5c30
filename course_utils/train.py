"""`train_classifier()`: a small CIFAR-style conv net, a fast recipe, log-spaced checkpoints.

Later notebooks need *a trained model and its training history*: Grad-CAM on a net that has
learned, the same edited images evaluated at every checkpoint, a net trained on erased or
permuted-label data. This module trains one in seconds (GPU) or about a minute (fast mode on
a laptop CPU) and keeps the weights at steps 1, 2, 4, 8, ... in memory.

    from course_utils.cifar import load_cifar10
    from course_utils.train import train_classifier, recipe

    train = load_cifar10("train", n=recipe()["n_train"])
    test = load_cifar10("test", n=recipe()["n_test"])
    result = train_classifier(train.images, train.labels, test=(test.images, test.labels))
    result.steps_list(), result.accuracies()   # [1, 2, 4, ..., last], [0.1, ..., 0.6]
    model = result.model_at(64)                # a fresh copy, eval mode

Fast mode (`COURSE_FAST=1`): widths (16, 64, 64), 10,000 training images, 6 epochs of batch 128:
about 72% test accuracy, 45% after 1.5 epochs (~20 s on one CPU core). Full mode: widths
(64, 256, 256), all 50,000 images, 15 epochs of batch 1024 (a GPU job: seconds).

The recipe follows Keller Jordan's airbench ("94% on CIFAR-10 in 3.29 seconds", 2024): a
VGG-like net with BatchNorm and GELU whose 3x3 convolutions start as identities (an implicit
residual), a frozen 2x2 "whitening" first layer initialised from the eigenvectors of the
training patches' covariance, SGD with Nesterov momentum and a triangular (one-cycle,
linear) learning-rate schedule, a 64x larger learning rate for the BatchNorm biases, label
smoothing, flip + 2-pixel reflect-padded translation done with tensor ops on the device,
a Lookahead-style weight average late in training, channels_last memory format, and on CUDA
bf16 autocast. The network normalises its own input, so any `[N, 3, 32, 32]` tensor works:
uint8 in 0..255, or floats in about [0, 1] (edited images may go slightly outside).
"""
from __future__ import annotations

import copy
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from course_utils.cifar import CIFAR10_MEAN, CIFAR10_STD
from course_utils.config import CFG

__all__ = [
    "Checkpoint",
    "CifarNet",
    "TrainResult",
    "accuracy",
    "evaluate_checkpoints",
    "log_steps",
    "make_cifar_net",
    "predict",
    "recipe",
    "train_classifier",
]

# --------------------------------------------------------------------------------------------
# Recipes: the only place the sizes branch on fast / full mode
# --------------------------------------------------------------------------------------------
_COMMON: dict[str, Any] = dict(
    momentum=0.85,  # Nesterov
    weight_decay=0.002,  # fraction of each weight decayed per 1024 examples at peak lr
    bias_lr_scale=64.0,  # BatchNorm biases learn 64x faster (airbench)
    schedule=(0.2, 0.23, 0.07),  # lr factor: 0.2 at start, 1 at 23% of the steps, 0.07 at the end
    whiten_bias_frac=0.3,  # the whitening layer's bias trains for the first 30% of the steps
    ema=True,  # Lookahead: pull the weights towards their running average every 5 steps ...
    ema_start_frac=0.3,  # ... from 30% of the steps on
    bn_momentum=0.4,
)
_FAST: dict[str, Any] = dict(
    _COMMON, epochs=6.0, batch_size=128, lr_per_1024=2.5, width=(16, 64, 64), n_train=10_000,
    n_test=2_000,
)
_FULL: dict[str, Any] = dict(
    _COMMON, epochs=15.0, batch_size=1024, lr_per_1024=1.5, width=(64, 256, 256), n_train=None,
    n_test=None,
)


def recipe(fast: bool | None = None) -> dict[str, Any]:
    """The default hyper-parameters: fast mode (`COURSE_FAST=1`) or full mode, from `CFG`.

    `n_train` / `n_test` are the data sizes the recipe was tuned for (`None` = the whole split):
    pass them to `load_cifar10(split, n=...)`. `lr_per_1024` is the peak learning rate for a batch
    of 1024; `train_classifier` scales it linearly with the batch size.
    """
    fast = CFG.fast if fast is None else fast
    return dict(_FAST if fast else _FULL)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
class _Normalize(nn.Module):
    """uint8 `[B,3,H,W]` in 0..255 or float in ~[0,1] -> float, standardised per channel."""

    def __init__(self) -> None:
        super().__init__()
        mean = torch.as_tensor(CIFAR10_MEAN, dtype=torch.float32).reshape(1, 3, 1, 1)
        std = torch.as_tensor(CIFAR10_STD, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if not torch.is_floating_point(x) else x.float()
        return (x - self.mean) / self.std


class _Conv(nn.Conv2d):
    """3x3 'same' convolution, no bias, whose first `in_channels` filters start as identities."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        nn.init.dirac_(w[: w.size(1)])


class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a frozen scale of 1 and a learnt bias."""

    def __init__(self, channels: int, momentum: float = 0.4) -> None:
        super().__init__(channels, eps=1e-12, momentum=momentum)
        self.weight.requires_grad_(False)


class ConvBlock(nn.Module):
    """conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU.  `[B,cin,H,W] -> [B,cout,H/2,W/2]`."""

    def __init__(self, cin: int, cout: int, bn_momentum: float = 0.4) -> None:
        super().__init__()
        self.conv1 = _Conv(cin, cout)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _BatchNorm(cout, bn_momentum)
        self.conv2 = _Conv(cout, cout)
        self.norm2 = _BatchNorm(cout, bn_momentum)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class CifarNet(nn.Module):
    """The course's CIFAR classifier: `[B,3,32,32]` (uint8 or float in ~[0,1]) -> logits `[B,C]`.

    Layers, by name (hook them for Grad-CAM and friends):
    `normalize` (per-channel standardisation, no weights) -> `whiten` (2x2 conv, 3 -> 24, no
    padding: `[B,24,31,31]`) -> `act` -> `block1` `[B,w1,15,15]` -> `block2` `[B,w2,7,7]` ->
    `block3` `[B,w3,3,3]` -> `pool` (max over 3x3) -> `head` (linear, no bias) -> times `scale`.
    """

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (64, 256, 256),
                 bn_momentum: float = 0.4) -> None:
        super().__init__()
        w1, w2, w3 = (int(w) for w in widths)
        self.widths = (w1, w2, w3)
        self.num_classes = int(num_classes)
        self.normalize = _Normalize()
        self.whiten = nn.Conv2d(3, 24, kernel_size=2, padding=0, bias=True)
        self.act = nn.GELU()
        self.block1 = ConvBlock(24, w1, bn_momentum)
        self.block2 = ConvBlock(w1, w2, bn_momentum)
        self.block3 = ConvBlock(w2, w3, bn_momentum)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(w3, num_classes, bias=False)
        self.scale = 1.0 / 9.0

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B,3,32,32]` -> the last conv features `[B,w3,3,3]` (after `block3`)."""
        x = self.act(self.whiten(self.normalize(x)))
        return self.block3(self.block2(self.block1(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """`[B,3,32,32]` -> the penultimate representation `[B,w3]` (max-pooled features)."""
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x)) * self.scale


def _widths(width: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(width, int):
        if width < 1:
            raise ValueError(f"width must be a positive int (the first block's width), got {width}")
        return (width, 4 * width, 4 * width)
    widths = tuple(int(w) for w in width)
    if len(widths) != 3 or min(widths) < 1:
        raise ValueError(f"width must be an int or three positive ints (w1, w2, w3), got {width!r}")
    return widths  # type: ignore[return-value]


def make_cifar_net(num_classes: int = 10, width: int | Sequence[int] | None = None) -> CifarNet:
    """A fresh, untrained `CifarNet`: `[B,3,32,32]` -> logits `[B,num_classes]`.

    `width`: an int `w` gives block widths `(w, 4w, 4w)`; or give the three widths. Default: the
    current recipe's (`(16, 64, 64)` in fast mode, `(64, 256, 256)` in full mode). The result is
    on the CPU in float32; initialisation uses torch's global generator (seed it, or use
    `train_classifier`, which seeds its own).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return CifarNet(num_classes, _widths(recipe()["width"] if width is None else width))


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _check_images(images: Any, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        try:
            images = torch.as_tensor(images)
        except Exception as err:  # noqa: BLE001
            raise TypeError(f"{name} must be a tensor of shape [N, 3, 32, 32], got {type(images).__name__}") from err
    shape = list(images.shape)
    if images.ndim == 3 and shape == [3, 32, 32]:
        raise ValueError(f"{name} must be a batch [N, 3, 32, 32]; got one image {shape}: use {name}[None]")
    if images.ndim != 4 or shape[1:] != [3, 32, 32]:
        hint = ""
        if images.ndim == 4 and shape[1:] == [32, 32, 3]:
            hint = f" It looks channels-last: use {name}.permute(0, 3, 1, 2)."
        raise ValueError(f"{name} must have shape [N, 3, 32, 32] (channels first), got {shape}.{hint}")
    if len(images) == 0:
        raise ValueError(f"{name} is empty: shape {shape}")
    if not (images.dtype == torch.uint8 or torch.is_floating_point(images)):
        raise TypeError(f"{name} must be uint8 (0..255) or float (~0..1), got dtype {images.dtype}")
    return images


def _check_labels(labels: Any, n: int, num_classes: int | None, name: str = "labels") -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N] class indices, got shape {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must be integer class indices, got dtype {labels.dtype}: use {name}.long()")
    if len(labels) != n:
        raise ValueError(f"{name} has {len(labels)} entries but there are {n} images: they must match")
    labels = labels.long()
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        raise ValueError(f"{name} must be in 0..num_classes-1, found {lo}")
    if num_classes is not None and hi >= num_classes:
        raise ValueError(f"{name} must be in 0..{num_classes - 1} (num_classes={num_classes}), found {hi}")
    return labels


# --------------------------------------------------------------------------------------------
# Evaluation helpers
# --------------------------------------------------------------------------------------------
def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Logits `[N,C]` (float32, on `images`' device) of `model` on `images` `[N,3,32,32]`.

    Eval mode (the model's mode is restored afterwards), no gradients, in batches of
    `batch_size` moved to the model's device. `images`: uint8 in 0..255 or float in ~[0,1].
    """
    images = _check_images(images)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        out = [model(images[i:i + batch_size].to(device)).float().to(images.device)
               for i in range(0, len(images), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of `images` `[N,3,32,32]` whose argmax logit equals `labels` `[N]`."""
    images = _check_images(images)
    labels = _check_labels(labels, len(images), None)
    pred = predict(model, images, batch_size).argmax(1)
    return (pred.cpu() == labels.cpu()).float().mean().item()


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkpoint:
    """The weights after `step` optimizer steps (`epoch` = step / steps per epoch).

    `state_dict` lives on the CPU. `test_acc` is `None` when no test set was given. `seconds`:
    training time up to this step (checkpoint evaluation excluded).
    """

    step: int
    epoch: float
    test_acc: float | None
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    seconds: float = 0.0


@dataclass(frozen=True)
class TrainResult:
    """What `train_classifier` returns.

    - `model`: the final network, eval mode, on the training device.
    - `checkpoints`: `Checkpoint`s in step order.
    - `steps`: optimizer steps taken; `seconds`: training time (checkpoint evaluation and saving
      excluded); `wall_seconds`: everything.
    - `history`: the training loss of every step, `len(history) == steps`.
    - `config`: every hyper-parameter used (enough to rebuild the net).
    """

    model: nn.Module = field(repr=False)
    checkpoints: list[Checkpoint] = field(repr=False)
    steps: int
    seconds: float
    history: list[float] = field(repr=False)
    config: dict[str, Any] = field(repr=False)
    wall_seconds: float = 0.0

    def __repr__(self) -> str:
        accs = [a for a in self.accuracies() if a is not None]
        acc = f", final test_acc={accs[-1]:.3f}" if accs else ""
        return (f"TrainResult(steps={self.steps}, seconds={self.seconds:.1f}, "
                f"checkpoints={self.steps_list()}{acc})")

    def steps_list(self) -> list[int]:
        """The checkpointed steps, e.g. `[1, 2, 4, ..., 512, 780]`."""
        return [c.step for c in self.checkpoints]

    def accuracies(self) -> list[float | None]:
        """Test accuracy of each checkpoint (same order as `steps_list()`)."""
        return [c.test_acc for c in self.checkpoints]

    def checkpoint(self, step: int) -> Checkpoint:
        """The `Checkpoint` at `step`; a `KeyError` lists the available steps."""
        for c in self.checkpoints:
            if c.step == step:
                return c
        raise KeyError(f"no checkpoint at step {step}; available steps: {self.steps_list()}")

    def model_at(self, step: int, device: str | torch.device | None = None) -> nn.Module:
        """A fresh copy of the network at checkpoint `step`, eval mode, on `device`
        (default: where `model` is). `step == steps` works even without a checkpoint there."""
        device = _model_device(self.model) if device is None else torch.device(device)
        if step == self.steps and step not in self.steps_list():
            net = copy.deepcopy(self.model)
        else:
            state = self.checkpoint(step).state_dict
            net = CifarNet(self.config["num_classes"], self.config["width"], self.config["bn_momentum"])
            net.load_state_dict(state)
        return net.to(device).eval()


def evaluate_checkpoints(result: TrainResult, fn: Callable[[nn.Module], Any], *,
                         device: str | torch.device | None = None, progress: bool = True) -> list[Any]:
    """`[fn(model) for every checkpoint]`, where `model` is that checkpoint's network (eval mode).

    For example the accuracy on edited images at every step:
    `evaluate_checkpoints(result, lambda m: accuracy(m, edited, labels))`.
    """
    return [fn(result.model_at(c.step, device))
            for c in tqdm(result.checkpoints, desc="checkpoints", disable=not progress)]


def log_steps(total: int) -> list[int]:
    """`[1, 2, 4, 8, ...]` up to `total`, plus `total` itself."""
    if total < 1:
        return []
    steps = [1 << k for k in range(total.bit_length()) if (1 << k) <= total]
    return steps if steps[-1] == total else steps + [total]


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def _lr_factor(step: int, total: int, schedule: tuple[float, float, float]) -> float:
    """Triangular schedule: `start` at step 0, 1 at `peak * total`, `end` at `total`."""
    start, peak, end = schedule
    top = max(1.0, peak * total)
    if step < top:
        return start + (1.0 - start) * step / top
    return 1.0 + (end - 1.0) * (step - top) / max(1.0, total - top)


@torch.no_grad()
def _init_whitening(layer: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set the 2x2 conv to the ZCA-like basis of the image patches: filters = eigenvectors of
    the patch covariance scaled by 1/sqrt(eigenvalue), and their negatives (12 + 12 filters)."""
    c, (h, w) = images.shape[1], layer.weight.shape[2:]
    cov = torch.zeros(c * h * w, c * h * w, dtype=torch.float64)
    count = 0
    for chunk in images.float().split(256):  # [n,c,32,32] -> patches [n*31*31, c*h*w]
        patches = chunk.unfold(2, h, 1).unfold(3, w, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, c * h * w)
        cov += (patches.T @ patches).double()
        count += len(patches)
    cov /= count
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.T.flip(0)
    filters = (evecs / torch.sqrt(evals.clamp_min(0) + eps)[:, None]).reshape(-1, c, h, w)
    layer.weight.copy_(torch.cat([filters, -filters]).to(layer.weight))


def _augment(x: torch.Tensor, flip: torch.Tensor, shifts: torch.Tensor, pad: int) -> torch.Tensor:
    """Flip where `flip` `[B]` is true, then translate by `shifts` `[B,2]` in -pad..pad
    (reflect padding).  `x`: float `[B,C,H,W]` -> `[B,C,H,W]`."""
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if pad == 0:
        return x
    b, c, h, w = x.shape
    xp = F.pad(x, (pad,) * 4, mode="reflect")  # [B,C,H+2p,W+2p]
    rows = (shifts[:, 0:1] + pad + torch.arange(h, device=x.device))[:, None, :, None]
    xp = xp.gather(2, rows.expand(b, c, h, w + 2 * pad))
    cols = (shifts[:, 1:2] + pad + torch.arange(w, device=x.device))[:, None, None, :]
    return xp.gather(3, cols.expand(b, c, h, w))


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _state_to_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    epochs: float | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    width: int | Sequence[int] | None = None,
    label_smoothing: float = 0.2,
    augment: bool = True,
    seed: int = 0,
    checkpoints: str | Sequence[int] | None = "log",
    save_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    num_classes: int | None = None,
    whiten: bool = True,
    channels_last: bool | None = None,
    compile: bool = False,
) -> TrainResult:
    """Train a `CifarNet` on `images` `[N,3,32,32]` / `labels` `[N]` and keep checkpoints.

    Args:
        images: uint8 (0..255) or float (~0..1; edited images may go outside) `[N,3,32,32]`.
        labels: integer class indices `[N]` in `0..num_classes-1`.
        test: optional `(images [M,3,32,32], labels [M])`; each checkpoint gets its test accuracy.
        epochs: passes over the data (may be fractional). Default: `recipe()["epochs"]`.
        batch_size: default `recipe()["batch_size"]` (capped at N). The last partial batch of
            an epoch is dropped; an epoch is `N // batch_size` steps.
        lr: peak SGD learning rate (mean loss). Default `lr_per_1024 * batch_size / 1024`.
        width: int `w` -> block widths `(w, 4w, 4w)`, or three ints. Default `recipe()["width"]`.
        label_smoothing: cross-entropy label smoothing.
        augment: random horizontal flips (alternating each epoch) and translations by up to 2
            pixels with reflect padding, drawn from a generator seeded by `seed`.
        seed: seeds the initialisation, the shuffling and the augmentation. On the CPU the same
            seed (and the same `torch.get_num_threads()`) gives bitwise-identical weights.
        checkpoints: `"log"` for steps 1, 2, 4, ... plus the last step; a list of steps (0 = the
            initial weights); or `None` for none.
        save_dir: also write each checkpoint's state_dict to `save_dir/step_{k:06d}.pt`.
        device: default `CFG.device`. On CUDA: bf16 autocast.
        progress: show a tqdm bar over steps (loss, latest test accuracy).
        num_classes: default `labels.max() + 1` (at least 2).
        whiten: initialise the first (2x2) layer from the training patches and freeze it;
            `False` trains it from a random start.
        channels_last: train in the channels_last memory format (default on; measured 1.3-1.7x
            faster on CPU too). Checkpoints and the returned model are in the plain format.
        compile: `torch.compile` the network for training (CUDA only; off by default).

    Returns:
        A `TrainResult` (`model`, `checkpoints`, `steps`, `seconds`, `history`, `config`).
    """
    wall_start = time.perf_counter()
    images = _check_images(images)
    labels = _check_labels(labels, len(images), num_classes)
    if num_classes is None:
        num_classes = max(2, int(labels.max()) + 1)
    elif num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if torch.is_floating_point(images) and not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf: fix the edit that produced them")
    if test is not None:
        if not (isinstance(test, (tuple, list)) and len(test) == 2):
            raise TypeError("test must be a pair (images [M,3,32,32], labels [M])")
        test_images = _check_images(test[0], "test images")
        test_labels = _check_labels(test[1], len(test_images), num_classes, "test labels")

    rec = recipe()
    n = len(images)
    epochs = float(rec["epochs"] if epochs is None else epochs)
    if not epochs > 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    batch_size = int(rec["batch_size"] if batch_size is None else batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch_size = min(batch_size, n)
    lr = float(rec["lr_per_1024"] * batch_size / 1024 if lr is None else lr)
    widths = _widths(rec["width"] if width is None else width)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    device = torch.device(CFG.device if device is None else device)
    cuda = device.type == "cuda"
    channels_last = True if channels_last is None else bool(channels_last)
    if device.type == "cpu" and not CFG.fast and width is None and n > 20_000:
        warnings.warn("train_classifier: the full recipe (widths (64, 256, 256)) on the CPU takes hours; "
                      "set COURSE_FAST=1, or pass width=(16, 64, 64) and fewer images/epochs.", stacklevel=2)

    steps_per_epoch = n // batch_size
    total = max(1, math.ceil(epochs * steps_per_epoch))
    if checkpoints is None:
        ckpt_steps: list[int] = []
    elif isinstance(checkpoints, str):
        if checkpoints != "log":
            raise ValueError(f'checkpoints must be "log", a list of steps or None, got {checkpoints!r}')
        ckpt_steps = log_steps(total)
    else:
        ckpt_steps = sorted({int(s) for s in checkpoints})
        bad = [s for s in ckpt_steps if not 0 <= s <= total]
        if bad:
            raise ValueError(f"checkpoint steps must be in 0..{total} (this run's steps), got {bad}")
    save_path = Path(save_dir) if save_dir is not None else None
    if save_path is not None:
        save_path.mkdir(parents=True, exist_ok=True)

    config: dict[str, Any] = dict(
        mode="fast" if CFG.fast else "full", n_train=n, num_classes=num_classes, epochs=epochs,
        batch_size=batch_size, steps_per_epoch=steps_per_epoch, total_steps=total, lr=lr,
        lr_bias=lr * rec["bias_lr_scale"], width=widths, label_smoothing=label_smoothing,
        augment=augment, translate=2 if augment else 0, seed=seed, whiten=whiten, device=str(device),
        autocast="bf16" if cuda else None, channels_last=channels_last, compile=compile and cuda,
        checkpoint_steps=ckpt_steps,
        **{k: rec[k] for k in ("momentum", "weight_decay", "bias_lr_scale", "schedule",
                               "whiten_bias_frac", "ema", "ema_start_frac", "bn_momentum")},
    )

    # ---- data on the device, one generator for shuffling and augmentation
    x_all = images.detach().to(device)
    if not (x_all.dtype == torch.uint8 or x_all.dtype == torch.float32):
        x_all = x_all.float()
    y_all = labels.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    # ---- the network, initialised on the CPU from `seed` (same weights on every device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CifarNet(num_classes, widths, rec["bn_momentum"])
    if whiten:
        _init_whitening(model.whiten, model.normalize(_to_float(x_all[:5000].cpu())))
        model.whiten.weight.requires_grad_(False)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if (compile and cuda) else model

    # ---- optimizer: decoupled weight decay (a fixed fraction per 1024 examples), fast BN biases
    wd_step = rec["weight_decay"] * batch_size / 1024
    bn_biases = [p for name, p in model.named_parameters() if "norm" in name and p.requires_grad]
    others = [p for name, p in model.named_parameters() if "norm" not in name and p.requires_grad]
    lr_bias = lr * rec["bias_lr_scale"]
    groups = [dict(params=others, lr=lr, base_lr=lr, weight_decay=wd_step / lr)]
    if bn_biases:
        groups.append(dict(params=bn_biases, lr=lr_bias, base_lr=lr_bias, weight_decay=wd_step / lr_bias))
    opt = torch.optim.SGD(groups, lr=lr, momentum=rec["momentum"], nesterov=True)

    ema_state: dict[str, torch.Tensor] | None = None
    ema_start = int(rec["ema_start_frac"] * total)
    whiten_bias_steps = int(rec["whiten_bias_frac"] * total)
    losses = torch.zeros(total, device=device)
    saved: list[Checkpoint] = []
    train_seconds = 0.0
    last_acc: float | None = None

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def fresh_net(state: dict[str, torch.Tensor]) -> CifarNet:
        net = CifarNet(num_classes, widths, rec["bn_momentum"])
        net.load_state_dict(state)
        return net.to(device).eval()

    def take_checkpoint(step: int) -> None:
        nonlocal last_acc
        state = _state_to_cpu(model)
        # evaluate exactly the network that `model_at(step)` will rebuild
        acc = accuracy(fresh_net(state), test_images, test_labels, 1024) if test is not None else None
        if save_path is not None:
            torch.save(state, save_path / f"step_{step:06d}.pt")
        saved.append(Checkpoint(step, step / steps_per_epoch, acc, state, train_seconds))
        if acc is not None:
            last_acc = acc

    model.train()
    ckpt_set = set(ckpt_steps)
    if 0 in ckpt_set:
        take_checkpoint(0)
    bar = tqdm(total=total, desc="train", disable=not progress, unit="step")
    postfix_every = max(1, total // 100)
    arange = torch.arange(n, device=device)
    flips = order = None
    sync()
    t0 = time.perf_counter()
    for step in range(total):
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0:
            order = torch.randperm(n, device=device, generator=gen) if n > 1 else arange
            if flips is None:  # drawn once; every other epoch flips the complement (airbench)
                flips = torch.rand(n, device=device, generator=gen) < 0.5
        if step == whiten_bias_steps and model.whiten.bias.requires_grad:
            model.whiten.bias.requires_grad_(False)
        idx = order[i * batch_size:(i + 1) * batch_size]
        xb, yb = _to_float(x_all[idx]), y_all[idx]
        if augment:
            shifts = torch.randint(-2, 3, (len(idx), 2), device=device, generator=gen)
            xb = _augment(xb, flips[idx] ^ bool(epoch % 2), shifts, pad=2)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        f = _lr_factor(step, total, rec["schedule"])
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * f
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = net(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses[step] = loss.detach()

        done = step + 1
        if rec["ema"] and done >= ema_start and done % 5 == 0:  # Lookahead-style averaging
            with torch.no_grad():
                state = model.state_dict()
                if ema_state is None:
                    ema_state = {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}
                else:
                    rho = 0.95 ** 5 * (done / total) ** 3
                    for k, avg in ema_state.items():
                        avg.lerp_(state[k], 1 - rho)
                        state[k].copy_(avg)

        bar.update(1)
        if done in ckpt_set or done == total or done % postfix_every == 0:
            if done in ckpt_set:
                sync()
                train_seconds += time.perf_counter() - t0
                take_checkpoint(done)
                t0 = time.perf_counter()
            post = {"loss": f"{loss.item():.3f}"}
            if last_acc is not None:
                post["test_acc"] = f"{last_acc:.3f}"
            bar.set_postfix(post, refresh=False)
    sync()
    train_seconds += time.perf_counter() - t0
    bar.close()
    final = saved[-1].state_dict if saved and saved[-1].step == total else _state_to_cpu(model)
    model = fresh_net(final)  # plain memory format, eval mode
    return TrainResult(model=model, checkpoints=saved, steps=total, seconds=train_seconds,
                       history=losses.cpu().tolist(), config=config,
                       wall_seconds=time.perf_counter() - wall_start)
