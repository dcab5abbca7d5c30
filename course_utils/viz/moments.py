"""Pictures for notebook 03 (moment editing): originals against edits, the sweep, an edit slider."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from course_utils.viz import curves, to_hwc


def edit_grid(rows: dict[str, Sequence], titles: Sequence[str] | None = None, *, size: float = 1.5,
              diff_gain: float | None = None, suptitle: str | None = None):
    """A grid with one row per named image set (e.g. `{"original": x, "Gaussian OT": x_ot}`),
    each a sequence of `[3, H, W]` images (uint8 or float in [0, 1]); `titles` label the columns.

    With `diff_gain`, a last row shows `0.5 + diff_gain * (last row - first row)`: the edit made
    visible. Returns the figure.
    """
    import matplotlib.pyplot as plt

    names = list(rows)
    sets = [[to_hwc(im) for im in rows[k]] for k in names]
    n = len(sets[0])
    if any(len(s) != n for s in sets):
        raise ValueError(f"every row needs the same number of images, got {[len(s) for s in sets]}")
    if diff_gain is not None:
        names.append(f"edit x{diff_gain:g}")
        sets.append([np.clip(0.5 + diff_gain * (b - a), 0, 1) for a, b in zip(sets[0], sets[-1])])
    fig, axes = plt.subplots(len(sets), n, figsize=(size * n + 0.8, size * len(sets) + 0.3), squeeze=False)
    for r, (name, imgs) in enumerate(zip(names, sets)):
        for c, im in enumerate(imgs):
            ax = axes[r, c]
            ax.imshow(im, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and titles is not None:
                ax.set_title(titles[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def sweep_plot(steps: Sequence[int], series: dict[str, Sequence[float]], *, chance: float = 0.1,
               title: str = "", ax=None):
    """The checkpoint sweep: each series against the training step on a log x-axis, with the chance
    line. A step 0 (if any) is drawn at 0.5 so that the log axis can show it. Returns the axes."""
    x = [s if s > 0 else 0.5 for s in steps]
    ax = curves(x, series, logx=True, chance=chance, xlabel="training step (log scale)",
                ylabel="fraction", title=title, ax=ax)
    ax.set_ylim(0, 1)
    return ax


def edit_slider(model, original, edited, classes: Sequence[str], *, source: int | None = None,
                target: int | None = None, steps: int = 20):
    """An ipywidgets slider from `original` (0) to its `edited` version (1), both `[3, H, W]`.

    Shows the interpolated image `(1 - a) * original + a * edited` and `model`'s top-5 class
    probabilities for it; `source` / `target` classes are highlighted. Returns the widget box.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    import torch

    from course_utils.train import predict

    x0 = original.float() / 255.0 if original.dtype == torch.uint8 else original.float()
    x1 = edited.float() / 255.0 if edited.dtype == torch.uint8 else edited.float()
    out = widgets.Output()
    slider = widgets.FloatSlider(value=1.0, min=0.0, max=1.0, step=1.0 / steps, description="edit",
                                 continuous_update=False, readout_format=".2f")

    def draw(alpha: float) -> None:
        x = ((1 - alpha) * x0 + alpha * x1).clamp(0, 1)
        probs = predict(model, x[None]).softmax(-1)[0]
        top = probs.topk(min(5, len(classes)))
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(6.5, 2.6), gridspec_kw=dict(width_ratios=[1, 1.6]))
        a1.imshow(to_hwc(x), interpolation="nearest")
        a1.axis("off")
        a1.set_title(f"edit strength {alpha:.2f}", fontsize=9)
        idx = top.indices.tolist()[::-1]
        colors = ["tab:red" if i == target else "tab:blue" if i == source else "gray" for i in idx]
        a2.barh([classes[i] for i in idx], top.values.tolist()[::-1], color=colors)
        a2.set_xlim(0, 1)
        a2.set_title(f"prediction: {classes[int(probs.argmax())]}", fontsize=9)
        fig.tight_layout()
        with out:
            out.clear_output(wait=True)
            plt.show()
        plt.close(fig)

    slider.observe(lambda change: draw(change["new"]), names="value")
    draw(slider.value)
    legend = widgets.HTML("<small>blue: the image's class · red: the edit's target</small>")
    return widgets.VBox([slider, out, legend])
