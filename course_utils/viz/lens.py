"""Pictures for notebook 02: the logit-lens table, per-layer curves, attention patterns, and an explorer."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from course_utils.viz import finish_axes

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

    from course_utils.lens import LensStats

__all__ = ["token_strings", "layer_names", "lens_heatmap", "plot_per_layer", "plot_training_curve", "plot_attention",
           "plot_induction_scores", "lens_explorer"]


def token_strings(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int] | torch.Tensor) -> list[str]:
    """Each token id as readable text (`" Paris"`), newlines shown as `\\n`, pure whitespace as `␣`."""
    ids = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else list(ids)
    words = [cast(str, tokenizer.decode([i])).replace("\n", "\\n") for i in ids]  # one sequence: one str
    return [w if w.strip() else "␣" * max(1, len(w)) for w in words]


def layer_names(n_read: int) -> list[str]:
    """`["emb", "1", ..., "L"]` for the `L+1` read-outs of the residual stream."""
    return ["emb"] + [str(k) for k in range(1, n_read)]


def lens_heatmap(values: torch.Tensor | np.ndarray, labels: Sequence[Sequence[str]], *, input_tokens: Sequence[str],
                 next_tokens: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                 title: str = "", cbar_label: str = "", cmap: str = "cividis_r", ax=None):
    """The logit-lens table (nostalgebraist 2020): layers x positions, each cell's top token written in it.

    values: `[L+1, T]` colours (e.g. the top token's probability, or the entropy), labels:
    `[L+1][T]` strings (the top token per cell), input_tokens: `[T]` (x axis, bottom),
    next_tokens: `[T]` (the true next tokens, top axis; matching cells get a box),
    layers: which rows to show (default: all). Layer 0 (the embedding) is at the bottom.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    vals = values.detach().cpu().float().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    rows = list(range(vals.shape[0])) if layers is None else list(layers)
    T = vals.shape[1]
    if ax is None:
        _, ax = plt.subplots(figsize=(1.0 + 0.95 * T, 0.8 + 0.32 * len(rows)))
    im = ax.imshow(vals[rows], aspect="auto", cmap=cmap, origin="lower")
    names = layer_names(vals.shape[0])
    for r, layer in enumerate(rows):
        for t in range(T):
            text = labels[layer][t]
            text = text if len(text) <= 9 else text[:8] + "…"
            hit = next_tokens is not None and labels[layer][t] == next_tokens[t]
            red, green, blue, _ = im.cmap(im.norm(vals[layer, t]))
            ax.text(t, r, text, ha="center", va="center", fontsize=7,
                    color="white" if 0.299 * red + 0.587 * green + 0.114 * blue < 0.5 else "black",
                    fontweight="bold" if hit else "normal")
            if hit:
                ax.add_patch(Rectangle((t - 0.5, r - 0.5), 1, 1, fill=False, ec="crimson", lw=1.2))
    ax.set_yticks(range(len(rows)), [names[k] for k in rows], fontsize=7)
    ax.set_xticks(range(T), list(input_tokens), rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("layer")
    if next_tokens is not None:
        top = ax.secondary_xaxis("top")
        top.set_xticks(range(T), list(next_tokens), rotation=45, ha="left", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10, pad=28 if next_tokens is not None else 6)
    plt.colorbar(im, ax=ax, fraction=0.025, pad=0.01, label=cbar_label)
    return ax


def plot_per_layer(curves: Mapping[str, Sequence[float] | torch.Tensor], *, rock: float | None = None,
                   ylabel: str = "", title: str = "", logy: bool = False, ax=None):
    """One line per named series over the read-outs `emb, 1, ..., L`; `rock`: the constant model's level."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.4))
    n = 0
    for label, y in curves.items():
        y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y, float)
        n = max(n, len(y))
        ax.plot(range(len(y)), y, marker="o", ms=3, label=label)
    if rock is not None:
        ax.axhline(rock, ls="--", c="dimgray", lw=1.2, label=f"rock (unigram): {rock:.2f}")
    step = max(1, n // 15)
    ax.set_xticks(range(0, n, step), layer_names(n)[::step])
    if logy:  # log scale that still shows the zero KL of the last layer
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(bottom=0)
    return finish_axes(ax, xlabel="layer", ylabel=ylabel, title=title, title_size=10)


def plot_training_curve(losses: Sequence[float] | torch.Tensor, eval_steps: Sequence[int] | torch.Tensor,
                        eval_kl: Sequence[float] | torch.Tensor, *, title: str = "tuned lens training", ax=None):
    """The training loss per step (the cached, approximate KL) and the exact held-out mean KL at `eval_steps`."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.4))
    loss = np.asarray(losses, float)
    ax.plot(np.arange(1, len(loss) + 1), loss, lw=0.8, alpha=0.6, label="training loss (top-k + tail, sampled)")
    ax.plot(np.asarray(eval_steps), np.asarray(eval_kl, float), marker="o", label="held-out mean KL (exact)")
    if len(eval_steps):
        ax.axvline(0.8 * float(np.asarray(eval_steps)[-1]), ls=":", c="dimgray", lw=1, label="last fifth")
    ax.set_yscale("log")
    return finish_axes(ax, xlabel="step", ylabel="mean KL over layers 0..L-1 (nats)", title=title, title_size=10)


def plot_attention(patterns: torch.Tensor, titles: Sequence[str], *, size: float = 2.6):
    """Attention patterns side by side. patterns: `[n, T, T]` (query rows, key columns). Returns the figure."""
    import matplotlib.pyplot as plt

    n = patterns.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(size * n, size), squeeze=False)
    for ax, pat, title in zip(axes[0], patterns, titles):
        ax.imshow(pat.detach().cpu().float().numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


def plot_induction_scores(scores: torch.Tensor, *, ax=None):
    """Heatmap of induction scores `[L, H]` (layers x heads)."""
    import matplotlib.pyplot as plt

    s = scores.detach().cpu().float().numpy()
    if ax is None:
        _, ax = plt.subplots(figsize=(0.45 * s.shape[1] + 1.5, 0.16 * s.shape[0] + 1.0))
    im = ax.imshow(s, aspect="auto", cmap="magma", origin="lower", vmin=0, vmax=max(1e-6, float(s.max())))
    ax.set_xlabel("head")
    ax.set_ylabel("layer (block)")
    ax.set_yticks(range(0, s.shape[0], 2), [str(k + 1) for k in range(0, s.shape[0], 2)], fontsize=7)
    ax.set_title("induction score", fontsize=10)
    plt.colorbar(im, ax=ax, fraction=0.05)
    return ax


def _explorer_table(stats: LensStats, layer: int, tokens: list[str], tokenizer, k: int) -> str:
    import html

    ids, probs = stats.topk_ids[layer], stats.topk_probs[layer]
    head = "".join(f"<th style='padding:2px 6px'>{html.escape(t)}</th>" for t in tokens)
    rows = []
    for j in range(k):
        words = token_strings(tokenizer, ids[:, j])
        cells = "".join(
            f"<td style='padding:2px 6px;background:rgba(31,119,180,{float(probs[t, j]):.2f})'>"
            f"{html.escape(words[t])}<br><small>{float(probs[t, j]):.2f}</small></td>" for t in range(len(tokens)))
        rows.append(f"<tr><td><b>#{j + 1}</b></td>{cells}</tr>")
    return (f"<table style='border-collapse:collapse;font-size:12px'><tr><th></th>{head}</tr>"
            + "".join(rows) + "</table>")


def lens_explorer(model, tokenizer: PreTrainedTokenizerBase, *, lens=None,
                  prompt: str = "The Eiffel Tower is located in the city of", k: int = 5):
    """An ipywidgets explorer: type a prompt, slide through the layers, see each position's top-k tokens.

    `lens`: a `LogitLens` (default) or a trained `TunedLens`. The model runs once per prompt
    (press Enter); the slider only re-reads the cached statistics. Returns the widget.
    """
    import ipywidgets as widgets
    from IPython.display import HTML, display

    from course_utils.lens import LogitLens, residual_stream

    lens = lens if lens is not None else LogitLens(model)
    n_layers = lens.n_layers
    text = widgets.Text(value=prompt, description="prompt", continuous_update=False,
                        layout=widgets.Layout(width="90%"))
    slider = widgets.IntSlider(value=n_layers, min=0, max=n_layers, description="layer",
                               continuous_update=True)
    out = widgets.Output()
    state: dict = {}

    def analyse(_=None) -> None:
        ids = tokenizer(text.value, return_tensors="pt", add_special_tokens=False).input_ids[:, -24:]
        device = next(model.parameters()).device
        res = residual_stream(model, ids.to(device))[:, 0]
        state.update(stats=lens.stats(res, k=k), tokens=token_strings(tokenizer, ids[0]))
        render()

    def render(_=None) -> None:
        out.clear_output(wait=True)
        with out:
            name = "embedding" if slider.value == 0 else f"after block {slider.value}"
            display(HTML(f"<b>layer {slider.value}</b> ({name}): top-{k} next tokens at each position"))
            display(HTML(_explorer_table(state["stats"], slider.value, state["tokens"], tokenizer, k)))

    text.observe(analyse, names="value")
    slider.observe(render, names="value")
    analyse()
    return widgets.VBox([text, slider, out])
