"""Notebook 05's experiment, "the engineer's toolbox": its sizes per tier and its cached parts.

Notebook 05 puts five tools side by side on the course's CIFAR network: a planted label bug found
by sorting losses (`label_bugs`), adversarial examples against notebook 03's checkpoint sweep
(`attacks`), global magnitude pruning (`pruning`), an explanation scored against a rock
(`ablation`) and a Mahalanobis anomaly detector (`anomaly`). This module holds what they share:

- `toolbox_setup(tier)`: the sizes, chosen once per tier from the time budget;
- `label_bug_run(setup)`: the training set with its planted bug, and the network trained on it;
- `matched_eps(sets, images)`: the L-inf budget whose PSNR matches notebook 03's Gaussian-OT edit;
- `run_toolbox()`: every costly part, through the result cache, with the same calls as the notebook;
  the precompute recipe "toolbox" runs it. Notebook 03's sweep is reused as it is
  (`moments.run_experiment`, sweeping only the OT edits), so when notebook 03 has run, its
  training and sweep cost nothing here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from course_utils import moments
from course_utils.attacks import attack_checkpoints, eps_for_psnr
from course_utils.cache import precompute_recipe
from course_utils.cifar import Cifar10, load_cifar10
from course_utils.config import CFG
from course_utils.label_bugs import LabelBug, plant_label_swap
from course_utils.pruning import pruning_curve
from course_utils.train import TrainResult, train_classifier

__all__ = ["ToolboxSetup", "label_bug_run", "matched_eps", "run_toolbox", "toolbox_setup"]


@dataclass(frozen=True)
class ToolboxSetup:
    """Notebook 05's sizes in one tier (`toolbox_setup()`).

    - `bug_n_train`, `bug_epochs`: the training images and epochs of the label-bug run
    - `bug_classes`, `bug_start`, `bug_size`: the two classes swapped, in `labels[start:start + size]`
    - `n_attack`, `pgd_steps`: test images attacked at every checkpoint, PGD steps
    - `sparsities`: the pruning curve's sparsities; `n_eval`: test images for pruning and the rock
    - `n_fit`: training images whose penultimate features fit the anomaly detector
    - `patch`: the side of the trigger patch, in pixels
    """

    bug_n_train: int
    bug_epochs: float
    n_attack: int
    n_eval: int
    n_fit: int
    bug_classes: tuple[int, int] = (0, 6)  # airplane <-> frog: classes a person never confuses
    bug_start: int = 0
    bug_size: int = 1000
    pgd_steps: int = 10
    sparsities: tuple[float, ...] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
    patch: int = 4


def toolbox_setup(tier: str | None = None) -> ToolboxSetup:
    """Notebook 05's sizes in `tier` (default `CFG.mode`), chosen once from its time budget:

    - ci: a label-bug run on the ci recipe's 10,000 images for 3 epochs; 200 test images attacked;
      1,000 evaluated; the detector fitted on 10,000 training images;
    - laptop: a label-bug run on 15,000 images for 4 epochs (468 steps, about 50 s on 2 cores;
      20,000 images put a cold run, notebook 03's training included, at 272 to 304 s);
      500 attacked, 2,000 evaluated, the detector fitted on 10,000 training images;
    - full: 50,000 images for the recipe's epochs; 2,000 attacked; the whole test set evaluated.
    The planted batch is the first 1,000 training images in every tier.
    """
    tier = CFG.mode if tier is None else tier
    table = {
        "ci": ToolboxSetup(10_000, 3.0, 200, 1000, 10_000),
        "laptop": ToolboxSetup(15_000, 4.0, 500, 2000, 10_000),
        "full": ToolboxSetup(50_000, 15.0, 2000, 10_000, 50_000),
    }
    if tier not in table:
        raise ValueError(f"tier must be one of {sorted(table)}, got {tier!r}")
    return table[tier]


def label_bug_run(setup: ToolboxSetup, *, progress: bool = True) -> tuple[Cifar10, LabelBug, TrainResult]:
    """The first `setup.bug_n_train` training images, their labels with the planted swap, and a
    network trained on them (cached by `train_classifier`, no checkpoints kept)."""
    train = load_cifar10("train", n=setup.bug_n_train)
    bug = plant_label_swap(train.labels, setup.bug_classes, setup.bug_start, setup.bug_size)
    result = train_classifier(train.images, bug.labels, epochs=setup.bug_epochs, checkpoints=None,
                              progress=progress)
    return train, bug, result


def matched_eps(sets: dict, images: torch.Tensor) -> float:
    """The L-inf budget whose PSNR equals the mean PSNR of notebook 03's Gaussian-OT edits of
    `images` `[N, 3, 32, 32]` (`sets[moments.OT]`, the edits of those same images)."""
    edited = sets[moments.OT][0]
    original = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return eps_for_psnr(float(moments.psnr(edited, original).mean()))


def run_toolbox(*, progress: bool = True) -> dict:
    """Every costly part of notebook 05 in the current tier, with the notebook's calls: notebook 03's
    experiment, the label-bug run, PGD against every checkpoint, the pruning curve."""
    setup = toolbox_setup()
    sweep_setup, _editor, sets, result, _sweep = moments.run_experiment(swept=[moments.OT], progress=progress)
    test = load_cifar10("test", n=sweep_setup.n_test)
    _, _, bug_result = label_bug_run(setup, progress=progress)
    eps = matched_eps(sets, test.images)
    n = setup.n_attack
    attack = attack_checkpoints(result, test.images[:n], sets[moments.OT][1][:n], eps=eps,
                                steps=setup.pgd_steps, progress=progress)
    curve = pruning_curve(result.model.cpu().eval(), test.images[:setup.n_eval], test.labels[:setup.n_eval],
                          setup.sparsities, progress=progress)
    return dict(setup=setup, bug_result=bug_result, eps=eps, attack=attack, pruning=curve)


@precompute_recipe("toolbox")
def _precompute() -> None:
    """Fill the cache with notebook 05's costly parts (and notebook 03's, which it reuses)."""
    run_toolbox()
