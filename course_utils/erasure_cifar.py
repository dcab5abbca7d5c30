"""Notebook 04's CIFAR-10 experiments: the sizes of each tier, and every costly step through the cache.

    from course_utils import erasure_cifar as ex

    s = ex.settings()                                   # the tier's sizes (CFG.mode)
    train, test = ex.load_data(s)
    leace, orth = ex.fit_erasers(train.images, train.labels)        # cached
    acc = ex.probe("linear", x_train, y_train, x_test, y_test)      # cached held-out accuracy
    run = ex.train_run(images, labels, test_images, test_labels, s) # train_classifier (cached)
    quad = ex.fit_quadratic_eraser(train.images, train.labels, s.resolution)  # cached

The notebook makes these calls cell by cell; `precompute` (the recipe "04_concept_erasure",
for `python -m course_utils.cache precompute --tier laptop`) makes the same calls, so that it
fills exactly the entries the notebook loads.

Why these sizes (the laptop tier, a 2-core CPU, about 3.5 minutes from an empty cache):
LEACE at full resolution (3072 pixels) on all 50,000 training images (a float64 streaming fit:
tens of seconds); three CNN trainings of half an epoch each (the bulk of the time); the quadratic
eraser at 16x16 (768 numbers per image), because its Wasserstein barycenter is a fixed-point
iteration of eigendecompositions: at 3072 dimensions each float64 `eigh` takes seconds and one
iteration needs eleven of them, minutes in all; at 768 dimensions the whole fit takes seconds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from course_utils.cache import cached, precompute_recipe
from course_utils.cifar import Cifar10, load_cifar10
from course_utils.config import CFG
from course_utils.erasure import (
    LeaceEraser,
    LeaceFitter,
    Method,
    QuadraticEraser,
    QuadraticFitter,
    linear_probe,
    mlp_probe,
)
from course_utils.gaussian import pixels
from course_utils.train import TrainResult, train_classifier

__all__ = [
    "Settings",
    "delay_threshold",
    "fit_erasers",
    "fit_leace",
    "fit_quadratic",
    "fit_quadratic_eraser",
    "load_data",
    "precompute",
    "probe",
    "probe_accuracy",
    "settings",
    "to_images",
    "train_run",
]

ERASURE_VERSION = 1  # part of the cache keys below: bump it when a fit's code changes its result
Probe = Literal["linear", "MLP"]


@dataclass(frozen=True)
class Settings:
    """The sizes of one tier.

    - `n_train`, `n_test`: CIFAR-10 images used (None: the whole split).
    - `n_curve`: test images scored at every checkpoint of the CNN runs (None: all `n_test`).
    - `epochs`, `batch_size`: each CNN run (None: the tier's `train.recipe`).
    - `resolution`: the side of the block-averaged images for the quadratic eraser.
    - `mlp_epochs`: epochs of the MLP probe.
    """

    n_train: int | None
    n_test: int | None
    n_curve: int | None
    epochs: float | None
    batch_size: int | None
    resolution: int
    mlp_epochs: int


def settings() -> Settings:
    """The current tier's `Settings` (`CFG.mode`)."""
    return Settings(
        n_train=CFG.pick(ci=10_000, laptop=None, full=None),
        n_test=CFG.pick(ci=1_000, laptop=None, full=None),
        n_curve=CFG.pick(ci=None, laptop=2_000, full=None),
        epochs=CFG.pick(ci=1.0, laptop=0.5, full=None),
        batch_size=CFG.pick(ci=128, laptop=128, full=None),
        resolution=CFG.pick(ci=8, laptop=16, full=16),
        mlp_epochs=CFG.pick(ci=4, laptop=4, full=20),
    )


def load_data(s: Settings) -> tuple[Cifar10, Cifar10]:
    """The training and test splits of the tier (uint8 images `[N, 3, 32, 32]`, labels `[N]`), on the CPU."""
    return load_cifar10("train", "cpu", n=s.n_train), load_cifar10("test", "cpu", n=s.n_test)


# --------------------------------------------------------------------------------------------
# The erasers
# --------------------------------------------------------------------------------------------
def fit_leace(images: Tensor, labels: Tensor, *, method: Method = "leace", resolution: int | None = None,
              num_classes: int = 10, batch_size: int = 2048, progress: bool = True) -> LeaceEraser:
    """A `LeaceFitter` streamed over `images` `[N, 3, 32, 32]` (uint8 or float) and `labels` `[N]`,
    batch by batch in float64, on `CFG.device`; returns its eraser (`[d]`, `d = 3 r^2`, `r` =
    `resolution`, default the full 32). `method`: "leace" or "orth" (see `LeaceFitter`)."""
    x = pixels(images, resolution)
    fitter = LeaceFitter(x.shape[1], num_classes, method, device=CFG.device)
    steps = range(0, len(x), batch_size)
    for i in tqdm(steps, desc=f"{method} statistics", disable=not progress, leave=False):
        fitter.update(x[i:i + batch_size], labels[i:i + batch_size])
    return fitter.eraser


def fit_erasers(images: Tensor, labels: Tensor, resolution: int | None = None) -> tuple[LeaceEraser, LeaceEraser]:
    """`(LEACE, orthogonal projection)` fitted on `images` `[N, 3, 32, 32]`, `labels` `[N]`, through the cache."""
    leace, orth = (cached(f"erasure_{method}", fit_leace, version=ERASURE_VERSION,
                          args=dict(images=images, labels=labels, method=method, resolution=resolution),
                          options=dict(progress=True))
                   for method in ("leace", "orth"))
    return leace, orth


def fit_quadratic(images: Tensor, labels: Tensor, *, resolution: int | None = None, num_classes: int = 10,
                  batch_size: int = 2048, progress: bool = True) -> QuadraticEraser:
    """`QuadraticFitter` over `images` `[N, 3, 32, 32]` block-averaged to `resolution` (`d = 3 r^2`):
    class moments streamed in float64, then the barycenter and one Monge map per class."""
    x = pixels(images, resolution)
    fitter = QuadraticFitter(x.shape[1], num_classes, barycenter_tol=1e-8)
    for i in tqdm(range(0, len(x), batch_size), desc="class moments", disable=not progress, leave=False):
        fitter.update(x[i:i + batch_size], labels[i:i + batch_size])
    return fitter.eraser


def fit_quadratic_eraser(images: Tensor, labels: Tensor, resolution: int) -> QuadraticEraser:
    """`fit_quadratic` through the cache."""
    return cached("erasure_quadratic", fit_quadratic, version=ERASURE_VERSION,
                  args=dict(images=images, labels=labels, resolution=resolution), options=dict(progress=True))


def to_images(x: Tensor, size: int = 32) -> Tensor:
    """Pixel vectors `[N, 3 r^2]` (as `pixels(images, r)` makes them) -> images `[N, 3, size, size]`,
    each pixel repeated over a `size/r` block (nearest-neighbour upsampling), float32."""
    r = round((x.shape[1] / 3) ** 0.5)
    if 3 * r * r != x.shape[1] or size % r:
        raise ValueError(f"x must be [N, 3*r*r] with r dividing {size}, got {list(x.shape)}")
    return F.interpolate(x.float().reshape(len(x), 3, r, r), scale_factor=size // r, mode="nearest")


# --------------------------------------------------------------------------------------------
# Probes and CNN runs
# --------------------------------------------------------------------------------------------
def probe_accuracy(kind: Probe, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
                   **kwargs) -> float:
    """Held-out accuracy of a `"linear"` (`linear_probe`) or `"MLP"` (`mlp_probe`) probe;
    `x_*` `[n, d]`, `y_*` class ids `[n]`; `kwargs` go to the probe."""
    probes = {"linear": linear_probe, "MLP": mlp_probe}
    if kind not in probes:
        raise ValueError(f'kind must be "linear" or "MLP", got {kind!r}')
    return probes[kind](x_train, y_train, x_test, y_test, **kwargs)


def probe(kind: Probe, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, **kwargs) -> float:
    """`probe_accuracy` through the cache (the data sets are part of the key)."""
    return cached(f"probe_{kind}", probe_accuracy, version=ERASURE_VERSION,
                  args=dict(kind=kind, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **kwargs))


def train_run(images: Tensor, labels: Tensor, test_images: Tensor, test_labels: Tensor,
              s: Settings) -> TrainResult:
    """The course CNN on `images` `[N, 3, 32, 32]` with the tier's epochs and batch size, log-spaced
    checkpoints scored on the first `s.n_curve` test images; cached by `train_classifier`."""
    n = s.n_curve
    test = (test_images[:n], test_labels[:n]) if n is not None else (test_images, test_labels)
    return train_classifier(images, labels, test=test, epochs=s.epochs, batch_size=s.batch_size,
                            seed=CFG.seed, checkpoints="log")


def delay_threshold(chance: float, final_erased: float) -> float:
    """The accuracy that marks "has learned": half-way from chance to the erased run's final
    accuracy, so that both runs reach it, and it is fixed before the curves are compared."""
    return chance + (final_erased - chance) / 2


# --------------------------------------------------------------------------------------------
# The recipe: what the notebook loads, in the current tier
# --------------------------------------------------------------------------------------------
@precompute_recipe("04_concept_erasure")
def precompute() -> None:
    """Fill the cache with every costly result of notebook 04 in the current tier (the same
    calls the notebook makes, so the same keys)."""
    s = settings()
    train, test = load_data(s)
    (ytr, yte), kw = (train.labels, test.labels), dict(epochs=s.mlp_epochs)
    leace, orth = fit_erasers(train.images, ytr)
    x_train, x_test = pixels(train.images), pixels(test.images)
    for eraser in (None, orth, leace):
        a, b = (x_train, x_test) if eraser is None else (eraser(x_train), eraser(x_test))
        probe("linear", a, ytr, b, yte)
    erased = leace(x_train).reshape(-1, 3, 32, 32)
    train_run(train.images, ytr, test.images, yte, s)
    train_run(erased, ytr, leace(x_test).reshape(-1, 3, 32, 32), yte, s)
    del erased, x_train, x_test
    r = s.resolution
    px_train, px_test = pixels(train.images, r), pixels(test.images, r)
    quad = fit_quadratic_eraser(train.images, ytr, r)
    small_leace = fit_erasers(train.images, ytr, r)[0]
    sets = {"original": (px_train, px_test), "LEACE": (small_leace(px_train), small_leace(px_test)),
            "quadratic": (quad(px_train, ytr), quad(px_test, yte))}
    for a, b in sets.values():
        probe("linear", a, ytr, b, yte)
        probe("MLP", a, ytr, b, yte, **kw)
    train_run(to_images(sets["quadratic"][0]), ytr, to_images(sets["quadratic"][1]), yte, s)
