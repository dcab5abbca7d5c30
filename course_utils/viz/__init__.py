"""Pictures: shared plotting primitives here, one module per topic for its own plots and widgets."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def to_hwc(img) -> np.ndarray:
    """An image as an HWC float array in [0, 1], from a uint8/float tensor or array, CHW or HWC."""
    a = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    a = a.astype(np.float32)
    if a.max() > 1.5:
        a = a / 255.0
    return np.clip(a, 0, 1).squeeze()


def show_images(images: Sequence, titles: Sequence[str] | None = None, *, cols: int = 8,
                size: float = 1.6, suptitle: str | None = None):
    """A grid of images (each CHW or HWC, uint8 or float) with optional titles. Returns the figure."""
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows + (0.4 if suptitle else 0)), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(to_hwc(images[k]), cmap="gray" if to_hwc(images[k]).ndim == 2 else None)
            if titles is not None:
                ax.set_title(titles[k], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def overlay(image, heatmap, *, alpha: float = 0.5, cmap: str = "jet", ax=None, title: str | None = None):
    """Draw `heatmap` ([H, W], any range, resized to the image if needed) over `image`."""
    import matplotlib.pyplot as plt
    import torch
    import torch.nn.functional as F

    img = to_hwc(image)
    if hasattr(heatmap, "detach"):
        h = heatmap.detach().float().cpu()
    else:
        h = torch.as_tensor(np.asarray(heatmap), dtype=torch.float32)
    if tuple(h.shape[-2:]) != img.shape[:2]:
        h = F.interpolate(h.reshape(1, 1, *h.shape[-2:]), size=img.shape[:2], mode="bilinear",
                          align_corners=False)[0, 0]
    h = h.reshape(img.shape[:2]).numpy()
    rng = h.max() - h.min()
    h = (h - h.min()) / rng if rng > 0 else np.zeros_like(h)
    if ax is None:
        _, ax = plt.subplots(figsize=(3.2, 3.2))
    ax.imshow(img)
    ax.imshow(h, cmap=cmap, alpha=alpha)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def finish_axes(ax, *, xlabel: str = "", ylabel: str = "", title: str = "", title_size: float | None = None,
                logx: bool = False):
    """The house style of a line plot's axes: labels, an optional title and log x-axis, a light grid and
    a small legend. Returns `ax`."""
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=title_size)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def curves(x, ys: dict[str, Sequence[float]], *, logx: bool = False, chance: float | None = None,
           xlabel: str = "", ylabel: str = "", title: str = "", ax=None):
    """Line plot of several named series against `x`, with an optional dashed chance line."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for label, y in ys.items():
        ax.plot(x, y, marker="o", ms=3, label=label)
    if chance is not None:
        ax.axhline(chance, ls="--", c="gray", lw=1, label="chance")
    return finish_axes(ax, xlabel=xlabel, ylabel=ylabel, title=title, logx=logx)
