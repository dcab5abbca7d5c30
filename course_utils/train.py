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
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from course_utils.cache import cached
from course_utils.cifar import CIFAR10_MEAN, CIFAR10_STD
from course_utils.config import CFG

__all__ = [
    "Checkpoint",
    "CifarNet",
    "TrainConfig",
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
# The laptop tier: the fast net's widths on every training image, a few epochs (about a minute
# per epoch on a 2-core CPU), evaluated on every test image.
_LAPTOP: dict[str, Any] = dict(
    _COMMON, epochs=4.0, batch_size=128, lr_per_1024=2.5, width=(16, 64, 64), n_train=None,
    n_test=None,
)
TRAINER_VERSION = 1  # part of the result cache's key: bump it when a change here changes what a seed trains
_RECIPES: dict[str, dict[str, Any]] = {"ci": _FAST, "laptop": _LAPTOP, "full": _FULL}


def _tier(fast: bool | None, tier: str | None) -> str:
    """The tier a recipe is for: `tier`, else "ci" / "full" from a legacy `fast` flag, else `CFG.mode`."""
    if tier is not None:
        if tier not in _RECIPES:
            raise ValueError(f"tier must be one of {sorted(_RECIPES)}, got {tier!r}")
        return tier
    if fast is not None:
        return "ci" if fast else "full"
    return CFG.mode


def recipe(fast: bool | None = None, *, tier: str | None = None) -> dict[str, Any]:
    """The default hyper-parameters of a tier ("ci", "laptop" or "full"; default `CFG.mode`).

    `fast=True` / `fast=False` are the legacy names of the "ci" / "full" recipes. `n_train` /
    `n_test` are the data sizes the recipe was tuned for (`None` = the whole split): pass them to
    `load_cifar10(split, n=...)`. `lr_per_1024` is the peak learning rate for a batch of 1024;
    `train_classifier` scales it linearly with the batch size.
    """
    return dict(_RECIPES[_tier(fast, tier)])


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
class _Normalize(nn.Module):
    """uint8 `[B,3,H,W]` in 0..255 or float in ~[0,1] -> float, standardised per channel."""

    mean: torch.Tensor  # buffers `[1,3,1,1]`, registered in __init__
    std: torch.Tensor

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
# The configuration of one run
# --------------------------------------------------------------------------------------------
def _checkpoint_steps(spec: str | Sequence[int] | None, total: int) -> tuple[int, ...]:
    """`"log"` -> `log_steps(total)`, `None` -> `()`, a list of steps -> those steps."""
    if spec is None:
        return ()
    if isinstance(spec, str):
        if spec != "log":
            raise ValueError(f'checkpoints must be "log", a list of steps or None, got {spec!r}')
        return tuple(log_steps(total))
    return tuple(int(s) for s in spec)


_CONFIG_KEYS = (
    "mode", "n_train", "num_classes", "epochs", "batch_size", "steps_per_epoch", "total_steps", "lr",
    "lr_bias", "width", "label_smoothing", "augment", "translate", "seed", "whiten", "device", "autocast",
    "channels_last", "compile", "checkpoint_steps", "momentum", "weight_decay", "bias_lr_scale", "schedule",
    "whiten_bias_frac", "ema", "ema_start_frac", "bn_momentum",
)


@dataclass(frozen=True)
class TrainConfig(Mapping):
    """Every hyper-parameter of one `train_classifier` run: enough to rebuild its network.

    Build it with `TrainConfig.from_recipe(n_train, num_classes, ...)` (the recipe's defaults, the
    arguments of `train_classifier`), or directly. Construction normalises and checks every value
    in one place (`__post_init__`); `compile` is on only on CUDA.

    It reads like the dict it replaces: `config["width"]`, `dict(config)`, `config.keys()`; the
    derived values (`steps_per_epoch`, `total_steps`, `lr_bias`, `translate`, `autocast`) are
    properties and keys.
    """

    n_train: int
    num_classes: int
    epochs: float
    batch_size: int
    lr: float
    width: tuple[int, int, int]
    checkpoint_steps: tuple[int, ...] = ()
    label_smoothing: float = 0.2
    augment: bool = True
    seed: int = 0
    whiten: bool = True
    device: str = "cpu"
    channels_last: bool = True
    compile: bool = False
    mode: str = "fast"
    momentum: float = _COMMON["momentum"]
    weight_decay: float = _COMMON["weight_decay"]
    bias_lr_scale: float = _COMMON["bias_lr_scale"]
    schedule: tuple[float, float, float] = _COMMON["schedule"]
    whiten_bias_frac: float = _COMMON["whiten_bias_frac"]
    ema: bool = _COMMON["ema"]
    ema_start_frac: float = _COMMON["ema_start_frac"]
    bn_momentum: float = _COMMON["bn_momentum"]

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if not self.num_classes >= 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        put("epochs", float(self.epochs))
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        put("batch_size", int(self.batch_size))
        if not 1 <= self.batch_size <= self.n_train:
            raise ValueError(f"batch_size must be in 1..{self.n_train} (the number of images), got {self.batch_size}")
        put("lr", float(self.lr))
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        put("width", _widths(self.width))  # three positive ints
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        put("checkpoint_steps", tuple(sorted({int(s) for s in self.checkpoint_steps})))
        bad = [s for s in self.checkpoint_steps if not 0 <= s <= self.total_steps]
        if bad:
            raise ValueError(f"checkpoint steps must be in 0..{self.total_steps} (this run's steps), got {bad}")
        put("schedule", tuple(self.schedule))
        put("compile", bool(self.compile) and torch.device(self.device).type == "cuda")

    @classmethod
    def from_recipe(cls, n_train: int, num_classes: int, *, epochs: float | None = None,
                    batch_size: int | None = None, lr: float | None = None,
                    width: int | Sequence[int] | None = None, checkpoints: str | Sequence[int] | None = "log",
                    device: str | torch.device | None = None, channels_last: bool | None = None,
                    fast: bool | None = None, **options: Any) -> TrainConfig:
        """`recipe(fast)`'s hyper-parameters for `n_train` images, overridden by the arguments
        (those of `train_classifier`; `options`: `label_smoothing`, `augment`, `seed`, `whiten`,
        `compile`). `batch_size` is capped at `n_train`; `lr` defaults to the recipe's
        `lr_per_1024 * batch_size / 1024`; `device` to `CFG.device`. `width`: an int `w` gives
        `(w, 4w, 4w)`. `checkpoints`: `"log"` (steps 1, 2, 4, ... plus the last), a list of steps
        (0 = the initial weights) or `None`."""
        tier = _tier(fast, None)
        rec = recipe(tier=tier)
        dev = torch.device(CFG.device if device is None else device)
        if dev.type == "cpu" and tier == "full" and width is None and n_train > 20_000:
            warnings.warn("train_classifier: the full recipe (widths (64, 256, 256)) on the CPU takes hours; "
                          "set COURSE_MODE=laptop, or pass width=(16, 64, 64) and fewer images/epochs.", stacklevel=3)
        batch_size = min(int(rec["batch_size"] if batch_size is None else batch_size), n_train)
        cfg = cls(
            n_train=n_train, num_classes=num_classes, epochs=rec["epochs"] if epochs is None else epochs,
            batch_size=batch_size, lr=rec["lr_per_1024"] * batch_size / 1024 if lr is None else lr,
            width=_widths(rec["width"] if width is None else width), device=str(dev),
            channels_last=True if channels_last is None else bool(channels_last), mode="fast" if tier == "ci" else tier,
            **{k: rec[k] for k in ("momentum", "weight_decay", "bias_lr_scale", "schedule",
                                   "whiten_bias_frac", "ema", "ema_start_frac", "bn_momentum")},
            **options,
        )
        return dataclasses.replace(cfg, checkpoint_steps=_checkpoint_steps(checkpoints, cfg.total_steps))

    # ---- derived values
    @property
    def steps_per_epoch(self) -> int:
        """`n_train // batch_size`: the last partial batch of an epoch is dropped."""
        return self.n_train // self.batch_size

    @property
    def total_steps(self) -> int:
        """`ceil(epochs * steps_per_epoch)`, at least 1."""
        return max(1, math.ceil(self.epochs * self.steps_per_epoch))

    @property
    def lr_bias(self) -> float:
        """The BatchNorm biases' peak learning rate."""
        return self.lr * self.bias_lr_scale

    @property
    def translate(self) -> int:
        """The largest random translation, in pixels (0 without augmentation)."""
        return 2 if self.augment else 0

    @property
    def autocast(self) -> str | None:
        """`"bf16"` on CUDA, else `None` (float32)."""
        return "bf16" if torch.device(self.device).type == "cuda" else None

    def make_net(self) -> CifarNet:
        """A fresh `CifarNet` of this run's shape, on the CPU, initialised from torch's global generator."""
        return CifarNet(self.num_classes, self.width, self.bn_momentum)

    # ---- the read-only mapping it replaces
    def __getitem__(self, key: str) -> Any:
        if key not in _CONFIG_KEYS:
            raise KeyError(f"TrainConfig has no {key!r}; keys: {', '.join(_CONFIG_KEYS)}")
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_CONFIG_KEYS)

    def __len__(self) -> int:
        return len(_CONFIG_KEYS)


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
    - `config`: the run's `TrainConfig`, every hyper-parameter used (enough to rebuild the net);
      it reads like a dict: `config["width"]`.
    """

    model: nn.Module = field(repr=False)
    checkpoints: list[Checkpoint] = field(repr=False)
    steps: int
    seconds: float
    history: list[float] = field(repr=False)
    config: TrainConfig = field(repr=False)
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _init_model(cfg: TrainConfig, x_all: torch.Tensor) -> CifarNet:
    """The network, initialised on the CPU from `cfg.seed` (the same weights on every device),
    its whitening layer set from the first 5000 images `x_all [N,3,32,32]` and frozen (`cfg.whiten`),
    moved to `cfg.device` (channels_last if `cfg.channels_last`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = cfg.make_net()
    if cfg.whiten:
        _init_whitening(model.whiten, model.normalize(_to_float(x_all[:5000].cpu())))
        model.whiten.weight.requires_grad_(False)
    model = model.to(cfg.device)
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def _make_optimizer(model: CifarNet, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with Nesterov momentum; decoupled weight decay (a fixed fraction of each weight per 1024
    examples at peak lr); the BatchNorm biases in their own group at `cfg.lr_bias`. Each group keeps
    its peak rate as `base_lr` for the schedule."""
    wd_step = cfg.weight_decay * cfg.batch_size / 1024
    bn_biases = [p for name, p in model.named_parameters() if "norm" in name and p.requires_grad]
    others = [p for name, p in model.named_parameters() if "norm" not in name and p.requires_grad]
    groups = [dict(params=others, lr=cfg.lr, base_lr=cfg.lr, weight_decay=wd_step / cfg.lr)]
    if bn_biases:
        groups.append(dict(params=bn_biases, lr=cfg.lr_bias, base_lr=cfg.lr_bias, weight_decay=wd_step / cfg.lr_bias))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)


def _batches(x_all: torch.Tensor, y_all: torch.Tensor, cfg: TrainConfig,
             gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`(images [B,3,32,32] float, labels [B])` for each of the `cfg.total_steps` steps: a new
    shuffle every epoch, and with `cfg.augment` flips (drawn once; every other epoch flips the
    complement, as airbench does) and random translations, all drawn from `gen`."""
    n, bs = len(x_all), cfg.batch_size
    arange = torch.arange(n, device=x_all.device)

    def shuffle() -> torch.Tensor:
        return torch.randperm(n, device=x_all.device, generator=gen) if n > 1 else arange

    order = shuffle()
    flips = torch.rand(n, device=x_all.device, generator=gen) < 0.5
    for step in range(cfg.total_steps):
        epoch, i = divmod(step, cfg.steps_per_epoch)
        if i == 0 and step > 0:
            order = shuffle()
        idx = order[i * bs:(i + 1) * bs]
        xb = _to_float(x_all[idx])
        if cfg.augment:
            shifts = torch.randint(-2, 3, (len(idx), 2), device=x_all.device, generator=gen)
            xb = _augment(xb, flips[idx] ^ bool(epoch % 2), shifts, pad=cfg.translate)
        if cfg.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        yield xb, y_all[idx]


def _sgd_step(net: Callable[[torch.Tensor], torch.Tensor], opt: torch.optim.Optimizer, xb: torch.Tensor,
              yb: torch.Tensor, lr_factor: float, cfg: TrainConfig) -> torch.Tensor:
    """One optimizer step at `lr_factor` times each group's peak rate; returns the (detached) loss."""
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * lr_factor
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.autocast == "bf16"):
        logits = net(xb)
    loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


class _Lookahead:
    """Lookahead-style weight averaging (airbench): every `every` steps from step `start` on, move
    the running average of the float weights and buffers towards the current ones, by `1 - rho`
    with `rho = decay**every * (step / total)**3`, and reset the weights to that average."""

    def __init__(self, model: nn.Module, start: int, total: int, every: int = 5, decay: float = 0.95) -> None:
        self.model, self.start, self.total, self.every, self.decay = model, start, total, every, decay
        self.average: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def step(self, done: int) -> None:
        """Call after optimizer step number `done` (1-based)."""
        if done < self.start or done % self.every:
            return
        state = self.model.state_dict()
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in state.items() if v.is_floating_point()}
            return
        rho = self.decay ** self.every * (done / self.total) ** 3
        for k, avg in self.average.items():
            avg.lerp_(state[k], 1 - rho)
            state[k].copy_(avg)


class _Checkpointer:
    """Snapshots the model at `cfg.checkpoint_steps`: a `Checkpoint` with the CPU state_dict and the
    test accuracy of exactly the network that `TrainResult.model_at(step)` rebuilds; also
    `save_dir/step_{k:06d}.pt` when `save_dir` is given."""

    def __init__(self, cfg: TrainConfig, test: tuple[torch.Tensor, torch.Tensor] | None,
                 save_dir: str | os.PathLike | None) -> None:
        self.cfg, self.test = cfg, test
        self.steps = set(cfg.checkpoint_steps)
        self.save_path = Path(save_dir) if save_dir is not None else None
        if self.save_path is not None:
            self.save_path.mkdir(parents=True, exist_ok=True)
        self.saved: list[Checkpoint] = []
        self.last_acc: float | None = None

    def due(self, step: int) -> bool:
        return step in self.steps

    def take(self, model: nn.Module, step: int, seconds: float) -> None:
        """Store the checkpoint of `model` after `step` steps and `seconds` of training."""
        state = _state_to_cpu(model)
        acc = None
        if self.test is not None:
            acc = self.last_acc = accuracy(self.rebuild(state), *self.test, batch_size=1024)
        if self.save_path is not None:
            torch.save(state, self.save_path / f"step_{step:06d}.pt")
        self.saved.append(Checkpoint(step, step / self.cfg.steps_per_epoch, acc, state, seconds))

    def rebuild(self, state: dict[str, torch.Tensor]) -> CifarNet:
        """A fresh network holding `state`, plain memory format, eval mode, on the training device."""
        net = self.cfg.make_net()
        net.load_state_dict(state)
        return net.to(self.cfg.device).eval()

    def final_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The last checkpoint's state when it is the final step's, else `model`'s."""
        last = self.saved[-1] if self.saved else None
        return last.state_dict if last is not None and last.step == self.cfg.total_steps else _state_to_cpu(model)


class _Stopwatch:
    """Training time: runs between `start()` and `stop()` (which syncs CUDA first), and adds up."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self._t0 = device, 0.0, 0.0

    def start(self) -> None:
        _sync(self.device)
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        _sync(self.device)
        self.seconds += time.perf_counter() - self._t0
        return self.seconds


def _check_inputs(images: Any, labels: Any, test: Any,
                  num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor, tuple | None, int]:
    """Checked `(images, labels, test, num_classes)`; `num_classes` defaults to `labels.max() + 1`
    (at least 2)."""
    images = _check_images(images)
    labels = _check_labels(labels, len(images), num_classes)
    if num_classes is None:
        num_classes = max(2, int(labels.max()) + 1)
    if torch.is_floating_point(images) and not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf: fix the edit that produced them")
    if test is not None:
        if not (isinstance(test, (tuple, list)) and len(test) == 2):
            raise TypeError("test must be a pair (images [M,3,32,32], labels [M])")
        test_images = _check_images(test[0], "test images")
        test = (test_images, _check_labels(test[1], len(test_images), num_classes, "test labels"))
    return images, labels, test, num_classes


def _on_device(images: torch.Tensor, labels: torch.Tensor,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The training data on `device`: images uint8 or float32 `[N,3,32,32]`, labels `[N]`."""
    x_all = images.detach().to(device)
    if not (x_all.dtype == torch.uint8 or x_all.dtype == torch.float32):
        x_all = x_all.float()
    return x_all, labels.to(device)


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
    cache: bool = True,
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
        cache: keep the result in the course's result cache (`course_utils.cache`): the same
            call again (same data, arguments, seed, tier, device and thread count) loads it in
            seconds instead of training. Never with `save_dir` or `compile`.

    Returns:
        A `TrainResult` (`model`, `checkpoints`, `steps`, `seconds`, `history`, `config`: the
        run's `TrainConfig`).
    """
    kwargs: dict[str, Any] = dict(test=test, epochs=epochs, batch_size=batch_size, lr=lr, width=width,
                                  label_smoothing=label_smoothing, augment=augment, seed=seed,
                                  checkpoints=checkpoints, num_classes=num_classes, whiten=whiten,
                                  channels_last=channels_last)
    if not cache or save_dir is not None or compile:
        return _train(images, labels, **kwargs, save_dir=save_dir, device=device, progress=progress,
                      compile=compile)
    return cached("train_classifier", _train_for_cache, version=TRAINER_VERSION, seed=seed,
                  args=dict(images=images, labels=labels, **kwargs,
                            device=str(torch.device(CFG.device if device is None else device)),
                            threads=torch.get_num_threads()),
                  options=dict(progress=progress), encode=_encode_result, decode=_decode_result)


def _train_for_cache(images: torch.Tensor, labels: torch.Tensor, *, threads: int, **kwargs: Any) -> TrainResult:
    """`_train` as the cache calls it: `threads` is only part of the key (float sums, and so the
    trained weights, depend on the number of CPU threads)."""
    del threads
    return _train(images, labels, save_dir=None, **kwargs)


def _encode_result(result: TrainResult) -> dict[str, Any]:
    """A `TrainResult` as tensors and plain values, for the result cache."""
    return {"model": _state_to_cpu(result.model),
            "checkpoints": [dataclasses.asdict(c) for c in result.checkpoints],
            "steps": result.steps, "seconds": result.seconds, "history": result.history,
            "config": {f.name: getattr(result.config, f.name) for f in dataclasses.fields(result.config)},
            "wall_seconds": result.wall_seconds}


def _decode_result(state: dict[str, Any]) -> TrainResult:
    """The inverse of `_encode_result`: the final network is rebuilt on the run's device."""
    cfg = TrainConfig(**state["config"])
    model = cfg.make_net()
    model.load_state_dict(state["model"])
    return TrainResult(model=model.to(cfg.device).eval(), checkpoints=[Checkpoint(**c) for c in state["checkpoints"]],
                       steps=state["steps"], seconds=state["seconds"], history=list(state["history"]),
                       config=cfg, wall_seconds=state["wall_seconds"])


def _train(images: torch.Tensor, labels: torch.Tensor, *, test: tuple[torch.Tensor, torch.Tensor] | None,
           epochs: float | None, batch_size: int | None, lr: float | None, width: int | Sequence[int] | None,
           label_smoothing: float, augment: bool, seed: int, checkpoints: str | Sequence[int] | None,
           save_dir: str | os.PathLike | None, device: str | torch.device | None, progress: bool,
           num_classes: int | None, whiten: bool, channels_last: bool | None, compile: bool = False) -> TrainResult:
    """`train_classifier` itself, without the cache."""
    wall_start = time.perf_counter()
    images, labels, test, num_classes = _check_inputs(images, labels, test, num_classes)
    cfg = TrainConfig.from_recipe(
        len(images), num_classes, epochs=epochs, batch_size=batch_size, lr=lr, width=width,
        checkpoints=checkpoints, device=device, channels_last=channels_last, label_smoothing=label_smoothing,
        augment=augment, seed=seed, whiten=whiten, compile=compile)
    device, total = torch.device(cfg.device), cfg.total_steps
    x_all, y_all = _on_device(images, labels, device)
    model = _init_model(cfg, x_all)
    net = torch.compile(model) if cfg.compile else model
    opt = _make_optimizer(model, cfg)
    lookahead = _Lookahead(model, int(cfg.ema_start_frac * total), total) if cfg.ema else None
    ckpt = _Checkpointer(cfg, test, save_dir)
    batches = _batches(x_all, y_all, cfg, torch.Generator(device=device).manual_seed(cfg.seed))
    losses = torch.zeros(total, device=device)
    clock = _Stopwatch(device)

    model.train()
    if ckpt.due(0):
        ckpt.take(model, 0, clock.seconds)
    bar = tqdm(total=total, desc="train", disable=not progress, unit="step")
    postfix_every = max(1, total // 100)
    clock.start()
    for step, (xb, yb) in enumerate(batches):
        if step == int(cfg.whiten_bias_frac * total):  # the whitening bias trains only early on
            bias = model.whiten.bias
            assert bias is not None, "CifarNet's whitening layer is built with a bias"
            bias.requires_grad_(False)
        losses[step] = _sgd_step(net, opt, xb, yb, _lr_factor(step, total, cfg.schedule), cfg)
        done = step + 1
        if lookahead is not None:
            lookahead.step(done)
        bar.update(1)
        if ckpt.due(done):
            ckpt.take(model, done, clock.stop())  # checkpoint evaluation is not training time
            clock.start()
        if ckpt.due(done) or done == total or done % postfix_every == 0:
            bar.set_postfix(_progress_note(losses[step], ckpt.last_acc), refresh=False)
    clock.stop()
    bar.close()
    return TrainResult(model=ckpt.rebuild(ckpt.final_state(model)), checkpoints=ckpt.saved, steps=total,
                       seconds=clock.seconds, history=losses.cpu().tolist(), config=cfg,
                       wall_seconds=time.perf_counter() - wall_start)


def _progress_note(loss: torch.Tensor, test_acc: float | None) -> dict[str, str]:
    """The progress bar's postfix: the step's loss and the latest test accuracy."""
    post = {"loss": f"{loss.item():.3f}"}
    if test_acc is not None:
        post["test_acc"] = f"{test_acc:.3f}"
    return post
