"""Pictures for 04_concept_erasure: 2-D erasure scatter plots, probe bar charts, learning curves."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from course_utils.viz import curves, finish_axes


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)


def scatter_erasure(x, labels, erased: Mapping[str, object], *, size: float = 3.0, title: str | None = None):
    """Side-by-side 2-D scatter plots: the data `x` `[n, 2]`, then each `erased[name]` `[n, 2]`,
    coloured by `labels` `[n]`, with each class mean marked by a black-edged dot. Returns the figure."""
    import matplotlib.pyplot as plt

    panels = {"original": x, **erased}
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), sharex=True, sharey=True)
    axes = np.atleast_1d(axes)
    y = _np(labels).astype(int)
    for ax, (name, pts) in zip(axes, panels.items()):
        p = _np(pts)
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"scatter_erasure needs [n, 2] points; {name!r} has shape {list(p.shape)}")
        for c in np.unique(y):
            ax.scatter(p[y == c, 0], p[y == c, 1], s=6, alpha=0.4, color=f"C{c}")
            ax.scatter(*p[y == c].mean(0), s=60, color=f"C{c}", edgecolor="k", zorder=3)
        ax.set_title(name, fontsize=9)
        ax.set_aspect("equal", adjustable="box")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def probe_bars(results: Mapping[str, Mapping[str, float]], *, chance: float | None = None,
               title: str = "held-out probe accuracy", ax=None):
    """Grouped bar chart: `results[data_name][probe_name] = accuracy`, one group per data set
    (e.g. original / orthogonal / LEACE), one bar per probe, a dashed chance line. Returns the axes."""
    import matplotlib.pyplot as plt

    groups = list(results)
    probes = list(dict.fromkeys(p for g in groups for p in results[g]))
    if ax is None:
        _, ax = plt.subplots(figsize=(1.6 + 1.3 * len(groups), 3.2))
    width = 0.8 / max(1, len(probes))
    for j, probe in enumerate(probes):
        vals = [results[g].get(probe, np.nan) for g in groups]
        pos = np.arange(len(groups)) + (j - (len(probes) - 1) / 2) * width
        bars = ax.bar(pos, vals, width, label=probe, color=f"C{j}")
        for b, v in zip(bars, vals):
            if np.isfinite(v):
                ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
    if chance is not None:
        ax.axhline(chance, ls="--", c="gray", lw=1, label="chance")
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05 * max([1e-3] + [v for g in groups for v in results[g].values() if np.isfinite(v)]) + 0.05)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return ax


def learning_curves(runs: Mapping[str, tuple[Sequence[int], Sequence[float]]], *, chance: float | None = None,
                    threshold: float | None = None, title: str = "test accuracy during training", ax=None):
    """Test accuracy against the training step (log x-axis) for several runs:
    `runs[name] = (steps, accuracies)`; optional chance line and threshold line. Returns the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.6))
    for j, (name, (steps, accs)) in enumerate(runs.items()):
        s = [max(1, int(v)) for v in steps]
        ax.plot(s, accs, marker="o", ms=3, label=name, color=f"C{j}")
    if threshold is not None:
        ax.axhline(threshold, ls=":", c="k", lw=1, label=f"threshold {threshold:.2f}")
    if chance is not None:
        ax.axhline(chance, ls="--", c="gray", lw=1, label="chance")
    return finish_axes(ax, xlabel="training step", ylabel="test accuracy", title=title, title_size=10, logx=True)


def show_erased(images, erased, labels=None, classes: Sequence[str] | None = None, *, n: int = 8,
                stretch: bool = True, size: float = 1.4):
    """Two rows: original images and their erased versions (`[N, 3, H, W]`, uint8 or float).

    Erased images leave [0, 1]; `stretch=True` rescales each to its own min..max so you can see
    what changed. Returns the figure."""
    import matplotlib.pyplot as plt

    from course_utils.viz import to_hwc

    n = min(n, len(images))
    fig, axes = plt.subplots(2, n, figsize=(size * n, size * 2 + 0.3), squeeze=False)
    for i in range(n):
        e = _np(erased[i]).astype(np.float32)
        if e.ndim == 3 and e.shape[0] in (1, 3):
            e = e.transpose(1, 2, 0)
        e = (e - e.min()) / max(float(e.max() - e.min()), 1e-8) if stretch else np.clip(e, 0, 1)
        axes[0, i].imshow(to_hwc(images[i]))
        axes[1, i].imshow(e)
        if labels is not None and classes is not None:
            axes[0, i].set_title(classes[int(labels[i])], fontsize=8)
        for ax in axes[:, i]:
            ax.axis("off")
    for row, label in enumerate(("original", "erased")):
        axes[row, 0].text(-0.1, 0.5, label, transform=axes[row, 0].transAxes, rotation=90, va="center", ha="right",
                          fontsize=8)
    fig.tight_layout()
    return fig


__all__ = ["curves", "learning_curves", "probe_bars", "scatter_erasure", "show_erased"]
