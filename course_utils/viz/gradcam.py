"""Pictures for 01_gradcam: overlay grids, the randomisation cascade, deletion curves, and an explorer."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from course_utils.viz import finish_axes, overlay, to_hwc

__all__ = ["draw_box", "overlay_grid", "saliency_image", "show_saliency", "cascade_grid", "plot_randomization",
           "plot_deletion", "explorer"]


def draw_box(ax, box: Sequence[int], color: str = "white", label: str | None = None) -> None:
    """Outline `box = (x0, y0, x1, y1)` (pixel coordinates, half-open) on `ax`, with an optional label."""
    import matplotlib.patches as patches

    x0, y0, x1, y1 = box
    ax.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec=color, lw=2))
    if label:
        ax.text(x0 + 2, y0 + 2, label, color=color, fontsize=8, va="top", fontweight="bold")


def saliency_image(m: Any, q: float = 0.99) -> np.ndarray:
    """A pixel-level saliency map `[H, W]` scaled for display: divided by its `q`-quantile and clipped to [0, 1].

    Gradient-type maps have a few extreme pixels; scaled by the maximum they look black.
    """
    a = torch.as_tensor(m).detach().float().cpu()
    top = torch.quantile(a.flatten(), q).item()
    return (a / top).clamp(0, 1).numpy() if top > 0 else np.zeros(tuple(a.shape), dtype=np.float32)


def show_saliency(maps: Sequence[Any], titles: Sequence[str] | None = None, *, size: float = 2.6):
    """Pixel-level saliency maps (`[H, W]` each) side by side in grey, scaled by `saliency_image`.
    Returns the figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(size * len(maps), size + 0.3), squeeze=False)
    for k, ax in enumerate(axes[0]):
        ax.imshow(saliency_image(maps[k]), cmap="gray", vmin=0, vmax=1)
        ax.axis("off")
        if titles is not None:
            ax.set_title(titles[k], fontsize=9)
    fig.tight_layout()
    return fig


def overlay_grid(images: Any, maps: torch.Tensor, titles: Sequence[str] | None = None, *, cols: int = 4,
                 size: float = 2.6, boxes: Mapping[str, Sequence[int]] | None = None, alpha: float = 0.5,
                 suptitle: str | None = None):
    """Each map `maps[i]` (`[B, H, W]`) over its image; `images` is one image `[3, H, W]` for all, or `[B, 3, H, W]`.

    `boxes`: `{label: (x0, y0, x1, y1)}` drawn on every panel. Returns the figure.
    """
    import matplotlib.pyplot as plt

    maps = torch.as_tensor(maps)
    if maps.dim() == 2:
        maps = maps[None]
    n = len(maps)
    per_image = hasattr(images, "dim") and images.dim() == 4 or isinstance(images, (list, tuple))
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + (0.4 if suptitle else 0)), squeeze=False)
    colors = ["white", "black", "yellow", "cyan"]
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        overlay(images[k] if per_image else images, maps[k], ax=ax, alpha=alpha,
                title=titles[k] if titles is not None else None)
        for j, (label, box) in enumerate((boxes or {}).items()):
            draw_box(ax, box, colors[j % len(colors)], label)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def cascade_grid(image: Any, rows: Mapping[str, Sequence[torch.Tensor]], steps: Sequence[str], *, size: float = 1.5):
    """The randomisation cascade as pictures: one row per method, one column per step.

    `rows`: `{method: [map [H, W] for each step]}`; `steps`: the column titles ("trained", "logits", ...).
    Gradient-type maps (no overlay) are drawn in grey; Grad-CAM maps over the image.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(steps), figsize=(size * len(steps), size * len(rows) + 0.3), squeeze=False)
    for r, (method, maps) in enumerate(rows.items()):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            m = maps[c]
            if "cam" in method.lower():
                overlay(image, m, ax=ax)
                ax.axis("on")
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                ax.imshow(saliency_image(m), cmap="gray", vmin=0, vmax=1)
            if r == 0:
                ax.set_title(steps[c], fontsize=8, rotation=30)
            if c == 0:
                ax.set_ylabel(method, fontsize=9)
    fig.tight_layout()
    return fig


def plot_randomization(steps: Sequence[str], correlations: Mapping[str, Sequence[float]], *,
                       reference: Mapping[str, float] | None = None, ax=None, title: str = ""):
    """Rank correlation with the trained model's map against randomisation depth (Adebayo et al., Fig. 2).

    `steps`: x labels (the first is "trained"); `correlations`: `{method: [rho per step]}`;
    `reference`: horizontal dashed lines, e.g. `{"Sobel edges (no model)": 1.0}`.
    """
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    if ax is None:
        _, ax = plt.subplots(figsize=(7.5, 3.6))
    x = np.arange(len(steps))
    for label, ys in correlations.items():
        ax.plot(x, list(ys), marker="o", ms=4, label=label)
    for label, y in (reference or {}).items():
        ax.axhline(y, ls="--", c="gray", lw=1)
        ax.text(len(steps) - 1, y - 0.03, label, ha="right", va="top", fontsize=8, color="gray")
    ax.axhline(0, c="black", lw=0.5)
    ax.set_xticks(x)
    ax.set_xticklabels(steps, rotation=35, ha="right", fontsize=8)
    ax.set_xlabel("randomised from the top down to ... (cumulative)")
    ax.set_ylabel("Spearman ρ with the trained map")
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    if title:
        ax.set_title(title)
    fig = ax.figure
    assert isinstance(fig, Figure), "the axes must belong to a figure, not a subfigure (tight_layout)"
    fig.tight_layout()
    return ax


def plot_deletion(curves: Mapping[str, Any], *, ax=None, title: str = "Deletion: most salient pixels first",
                  xlabel: str = "fraction of pixels deleted"):
    """Deletion (or insertion) curves: `{label: DeletionCurve}` -> mean probability against the fraction
    deleted (inserted), AUC in the legend."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, curve in curves.items():
        mean = curve.scores.mean(0)
        ax.plot(curve.fractions, mean, marker="o", ms=3, label=f"{label} (AUC {curve.auc.mean():.3f})")
    finish_axes(ax, xlabel=xlabel, ylabel="probability of the class", title=title)
    fig = ax.figure
    assert isinstance(fig, Figure), "the axes must belong to a figure, not a subfigure (tight_layout)"
    fig.tight_layout()
    return ax


def explorer(model: torch.nn.Module, layer: Any = None, photos: Sequence[str] | None = None, topk: int = 10):
    """An ipywidgets explorer: pick a photo and one of its top-`topk` classes (or type any class), see the overlay.

    `model`: EfficientNet-Lite0 (`add_head_activation` is applied if needed); `layer`: default `model._head_act`.
    Returns the widget (display it, or leave it as a cell's last expression).
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from course_utils import gradcam as G
    from course_utils.models import PHOTOS, classify, crop_imagenet, imagenet_classes, load_photo, preprocess_imagenet

    model = G.add_head_activation(model)
    layer = model._head_act if layer is None else layer
    photos = list(photos or PHOTOS)
    classes = imagenet_classes()
    cache: dict[str, Any] = {}

    def photo(name: str):
        if name not in cache:
            img = load_photo(name)
            x = preprocess_imagenet(img)
            cache[name] = (crop_imagenet(img), x, classify(model, x, topk)[0])
        return cache[name]

    pick = widgets.Dropdown(options=photos, value="both" if "both" in photos else photos[0], description="photo")
    cls = widgets.Dropdown(description="class", layout=widgets.Layout(width="360px"))
    typed = widgets.Combobox(placeholder="or type any ImageNet class", options=classes, ensure_option=True,
                             layout=widgets.Layout(width="300px"))
    picture = widgets.Image(format="png")  # a PNG, not an Output widget: headless runs (nbclient) never wait on it
    status = widgets.Label()

    def set_classes(*_: Any) -> None:
        assert pick.value is not None, "the photo dropdown always holds one of `photos`"
        top = photo(pick.value)[2]
        cls.options = [(f"{name} ({p:.2f})", name) for name, p in top]
        cls.value = top[0][0]

    def draw(*_: Any) -> None:
        import io

        assert pick.value is not None, "the photo dropdown always holds one of `photos`"
        crop, x, _ = photo(pick.value)
        name = typed.value if typed.value in classes else cls.value
        if name is None:
            return
        cam = G.GradCAM(model, layer)(x, target=name)
        fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.3))
        axes[0].imshow(to_hwc(crop))
        axes[0].axis("off")
        axes[0].set_title(pick.value, fontsize=9)
        overlay(crop, cam.map[0], ax=axes[1], title=f"Grad-CAM: {name}")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        plt.close(fig)
        picture.value = buf.getvalue()
        status.value = f"{name}: logit {cam.scores[0]:.2f}"

    def on_pick(*_: Any) -> None:
        cls.unobserve(on_class, names="value")  # changing the class list must not draw twice
        set_classes()
        cls.observe(on_class, names="value")
        draw()

    def on_class(*_: Any) -> None:
        if typed.value:  # a class picked from the list replaces a typed one
            typed.unobserve(draw, names="value")
            typed.value = ""
            typed.observe(draw, names="value")
        draw()

    pick.observe(on_pick, names="value")
    cls.observe(on_class, names="value")
    typed.observe(draw, names="value")
    on_pick()
    return widgets.VBox([widgets.HBox([pick, cls, typed]), picture, status])
