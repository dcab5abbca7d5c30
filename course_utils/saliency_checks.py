"""Notebook 01's costly experiments: Adebayo et al.'s two sanity checks and Petsiuk et al.'s
faithfulness curves, run at the tier's size and kept in the result cache.

    from course_utils import saliency_checks as SC

    b = SC.budget()                                  # the tier's sizes, one table (SIZES)
    cas = SC.model_randomization(b["photos"], b["granularity"])   # cached: the cascade on every photo
    faith = SC.faithfulness(b["photos"], b["fractions"])          # cached: deletion and insertion curves
    true_res, perm_res, shuffled = SC.train_true_and_permuted(images, labels, epochs=b["epochs"],
                                                              augment=b["augment"])
    maps = SC.data_randomization_maps(true_res.model, perm_res.model, xs, ys)

The photos are EfficientNet-Lite0's course photos (`models.PHOTOS`); the cat-and-dog photo is
explained twice, for the tiger cat and for the bull mastiff, every other photo for its top class.
`precompute_01` (a `cache.precompute_recipe`) fills the cache for the current tier.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from course_utils import cache
from course_utils.config import CFG
from course_utils.gradcam import (
    add_head_activation,
    cascading_randomization,
    deletion_curve,
    efficientnet_stages,
    gradcam,
    guided_backprop,
    insertion_curve,
    permute_labels,
    random_saliency,
    spearman,
)

__all__ = ["SIZES", "budget", "data_randomization_maps", "faithfulness", "model_randomization", "photo_batch",
           "precompute_01", "train_true_and_permuted"]

_COARSE_FRACTIONS = [0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1]  # denser near 0: the deletion fall is fast
_FINE_FRACTIONS = [0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1]
_ALL_PHOTOS = ("both", "chelsea", "coffee", "dog")

#: The sizes of notebook 01 per tier. `n_train` / `epochs` / `augment`: the CIFAR-10 training set and
#: budget shared by the true-label and the permuted-label network; `n_maps`: test images whose maps
#: are compared; `n_test`: test images for the accuracy. The laptop tier's training set is small
#: enough for the permuted network to memorise it without augmentation inside the 5-minute budget.
SIZES: dict[str, dict[str, Any]] = {
    "ci": dict(photos=("both",), granularity="coarse", fractions=_COARSE_FRACTIONS,
               n_train=2000, epochs=3, augment=True, n_test=500, n_maps=64),
    "laptop": dict(photos=_ALL_PHOTOS, granularity="stage", fractions=_FINE_FRACTIONS,
                   n_train=1000, epochs=60, augment=False, n_test=2000, n_maps=256),
    "full": dict(photos=_ALL_PHOTOS, granularity="stage", fractions=_FINE_FRACTIONS,
                 n_train=10000, epochs=40, augment=False, n_test=2000, n_maps=500),
}


def budget(tier: str | None = None) -> dict[str, Any]:
    """The sizes of notebook 01 for `tier` (default `CFG.mode`): a copy of `SIZES[tier]`."""
    tier = CFG.mode if tier is None else tier
    if tier not in SIZES:
        raise ValueError(f"tier must be one of {sorted(SIZES)}, got {tier!r}")
    return dict(SIZES[tier])


def _efficientnet() -> nn.Module:
    from course_utils.models import load_efficientnet

    return add_head_activation(load_efficientnet())


def photo_batch(model: nn.Module, photos: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The photos as one batch with the class each row explains: `(x [B, 3, 224, 224], targets [B], labels)`.

    `"both"` gives two rows (tiger cat, then bull mastiff); every other photo one row, for the
    model's top class. `labels[i]` is `"photo: class"`.
    """
    from course_utils.models import imagenet_classes, load_photo, preprocess_imagenet

    classes = imagenet_classes()
    xs, targets = [], []
    for name in photos:
        x = preprocess_imagenet(load_photo(name))
        with torch.no_grad():
            top = [int(model(x).argmax())]
        chosen = [classes.index("tiger cat"), classes.index("bull mastiff")] if name == "both" else top
        xs += [x] * len(chosen)
        targets += chosen
    labels = [f"{name}: {classes[t]}" for name, t in zip(_row_photos(photos), targets)]
    return torch.cat(xs), torch.tensor(targets), labels


def _row_photos(photos: Sequence[str]) -> list[str]:
    return [p for name in photos for p in ([name, name] if name == "both" else [name])]


def _model_randomization(photos: list[str], granularity: str, seed: int, progress: bool = True) -> dict[str, Any]:
    model = _efficientnet()
    x, targets, labels = photo_batch(model, photos)
    show = labels.index("both: bull mastiff") if "both" in photos else 0
    out: dict[str, Any] = dict(steps=[], labels=labels, targets=targets, rho_cam=[], rho_gb=[], cam=[], gb=[])
    for step, net in cascading_randomization(model, efficientnet_stages(model, granularity), seed=seed,
                                             progress=progress):
        m_cam, m_gb = gradcam(net, x, net.get_submodule("_head_act"), targets), guided_backprop(net, x, targets)
        if step == "trained":
            out["cam0"], out["gb0"] = m_cam, m_gb
        out["steps"].append(step)
        out["rho_cam"].append(spearman(out["cam0"], m_cam))
        out["rho_gb"].append(spearman(out["gb0"], m_gb))
        out["cam"].append(m_cam[show])
        out["gb"].append(m_gb[show])
    for key in ("rho_cam", "rho_gb", "cam", "gb"):
        out[key] = torch.stack(out[key])
    return out


def model_randomization(photos: Sequence[str], granularity: str, *, seed: int = 0,
                        progress: bool = True) -> dict[str, Any]:
    """Adebayo et al.'s cascading randomisation of EfficientNet-Lite0 on `photos`, with Grad-CAM and
    Guided Backprop at every step. Cached.

    Returns a dict: `steps` (S names, "trained" first), `labels` (B rows, see `photo_batch`),
    `targets [B]`, `rho_cam`, `rho_gb` (`[S, B]` float64: each row's Spearman rho with the trained
    map; NaN for a constant map), `cam0`, `gb0` (`[B, 224, 224]`, the trained maps), and `cam`, `gb`
    (`[S, 224, 224]`: the maps of one row at every step, the bull mastiff when `"both"` is there).
    """
    return cache.cached("gradcam_model_randomization", _model_randomization, version=1,
                        args=dict(photos=list(photos), granularity=granularity, seed=seed),
                        options=dict(progress=progress))


def _faithfulness(photos: list[str], fractions: list[float], baseline: float,
                  progress: bool = True) -> dict[str, Any]:
    model = _efficientnet()
    x, targets, labels = photo_batch(model, photos)
    keep = [i for i, label in enumerate(labels) if label != "both: tiger cat"]  # each photo's top class
    x, targets = x[keep], targets[keep]
    cam = gradcam(model, x, model.get_submodule("_head_act"), targets)
    saliency = {"Grad-CAM": cam, "Guided Backprop": guided_backprop(model, x, targets),
                "random order": random_saliency(cam, seed=0)}
    out: dict[str, Any] = dict(labels=[labels[i] for i in keep], deletion={}, insertion={})
    for name, s in tqdm(saliency.items(), desc="faithfulness curves", disable=not progress):
        kw: dict[str, Any] = dict(fractions=fractions, baseline=baseline, progress=False)
        out["deletion"][name] = deletion_curve(model, x, s, targets, **kw)
        out["insertion"][name] = insertion_curve(model, x, s, targets, **kw)
    return out


def faithfulness(photos: Sequence[str], fractions: Sequence[float], *, baseline: float = 0.0,
                 progress: bool = True) -> dict[str, Any]:
    """Deletion and insertion curves (Petsiuk et al. 2018) of EfficientNet-Lite0 on `photos`, each for
    its top class, for Grad-CAM, Guided Backprop and a random order. Cached.

    Returns `{"labels": [B], "deletion": {method: DeletionCurve}, "insertion": {method: DeletionCurve}}`
    (`scores [B, F]`, `auc [B]`). `baseline`: the value of a removed pixel (0 = mid-grey).
    """
    return cache.cached("gradcam_faithfulness", _faithfulness, version=1,
                        args=dict(photos=list(photos), fractions=[float(f) for f in fractions],
                                  baseline=float(baseline)),
                        options=dict(progress=progress))


def train_true_and_permuted(images: torch.Tensor, labels: torch.Tensor, *, epochs: float, augment: bool,
                            seed: int = 0) -> tuple[Any, Any, torch.Tensor]:
    """Adebayo et al.'s data randomisation: the same network trained on `labels` and on `permute_labels(labels)`.

    `images [N, 3, 32, 32]`, `labels [N]` -> `(true TrainResult, permuted TrainResult, permuted labels [N])`.
    Same images, budget and seed; only the labels differ. Both trainings are cached by `train_classifier`.
    """
    from course_utils.train import train_classifier

    shuffled = permute_labels(labels, seed=seed)
    run: dict[str, Any] = dict(epochs=epochs, augment=augment, checkpoints=None, seed=seed)
    return train_classifier(images, labels, **run), train_classifier(images, shuffled, **run), shuffled


def data_randomization_maps(true_net: nn.Module, perm_net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                            layer: str = "block2") -> dict[str, torch.Tensor]:
    """Grad-CAM (at `layer`) and Guided Backprop maps of both networks for `labels`, and their rank correlation.

    `images [B, 3, 32, 32]` (uint8 or float in [0, 1]), `labels [B]`
    -> `{"cam_true", "cam_perm", "gb_true", "gb_perm"}` (`[B, 32, 32]`)
    and `"rho_cam"`, `"rho_gb"` (`[B]` float64; NaN where a map is flat).
    """
    if not torch.is_floating_point(images):
        images = images.float() / 255.0  # the nets take uint8 or float in [0, 1]; input gradients need a float
    out = {"cam_true": gradcam(true_net, images, layer, labels), "cam_perm": gradcam(perm_net, images, layer, labels),
           "gb_true": guided_backprop(true_net, images, labels), "gb_perm": guided_backprop(perm_net, images, labels)}
    out["rho_cam"] = spearman(out["cam_true"], out["cam_perm"])
    out["rho_gb"] = spearman(out["gb_true"], out["gb_perm"])
    return out


@cache.precompute_recipe("01_gradcam")
def precompute_01() -> None:
    """Fill the cache with notebook 01's results for the current tier: the cascade, the curves, both networks."""
    from course_utils.cifar import load_cifar10
    from course_utils.config import seed_everything

    seed_everything()  # as the notebook's first cell: the thread count is part of the training's cache key
    b = budget()
    model_randomization(b["photos"], b["granularity"])
    faithfulness(b["photos"], b["fractions"])
    train = load_cifar10("train", n=b["n_train"])
    train_true_and_permuted(train.images, train.labels, epochs=b["epochs"], augment=b["augment"])
