"""Exercises of 00_orientation: tensor shapes with einops, and forward hooks."""
from __future__ import annotations

import torch
from einops import rearrange, reduce
from torch import nn

from course_utils.checks import Case, exercise, mistake
from course_utils.checks import generator as _gen


# --- 1. flatten -------------------------------------------------------------------------------
def _flatten_cases() -> list[Case]:
    g = _gen(1)
    return [
        Case("batch of 4 RGB 8x8 images", (torch.randn(4, 3, 8, 8, generator=g),)),
        Case("one grey 5x7 image", (torch.randn(1, 1, 5, 7, generator=g),)),
        Case("2 images, 3 channels, 2x4", (torch.arange(48.0).reshape(2, 3, 2, 4),)),
    ]


@exercise("orientation.flatten_images", title="Flatten images into vectors with rearrange",
          hints=('Think about which axes stay separate in the output and which are merged into one, '
                 'and in what order the merged ones must be read.',
                 'Keep b as it is and merge c, h and w into one axis, channel first: the order inside'
                 ' the merged group is the order the entries are read.'),
          cases=_flatten_cases,
          hint="out[b, i] = images[b, c, y, x] with i = (c·H + y)·W + x: shape [B, C·H·W], the channel index "
               "varying slowest and the column fastest (the order of a row-major memory layout).")
def flatten_images(images: torch.Tensor) -> torch.Tensor:
    """images: [b, c, h, w] -> [b, c*h*w], channel-major (the order `.reshape(b, -1)` gives)."""
    return rearrange(images, "b c h w -> b (c h w)")


@mistake("orientation.flatten_images", "h and w swapped inside the group",
         "Inside the merged group the order is the reading order: c, then h (rows), then w (columns).")
def _flat_wh(images):
    return rearrange(images, "b c h w -> b (c w h)")


@mistake("orientation.flatten_images", "batch and channel swapped before reshaping",
         "Moving axes and then reshaping mixes images together: keep the batch axis first and untouched.")
def _flat_bc(images):
    return images.transpose(0, 1).reshape(images.shape[0], -1)


@mistake("orientation.flatten_images", "the channel axis kept apart",
         "The output is 2-D: the channel axis must be merged with h and w, not kept separate.")
def _flat_keep_c(images):
    return images.flatten(2)


@mistake("orientation.flatten_images", "channels last in the flattened order",
         "The order inside the parentheses matters: (h w c) puts channels last. Write (c h w).")
def _flatten_channels_last(images: torch.Tensor) -> torch.Tensor:
    return rearrange(images, "b c h w -> b (h w c)")


@mistake("orientation.flatten_images", "the batch dimension was flattened too",
         "Keep the batch axis separate: 'b c h w -> b (c h w)', not '-> (b c h w)'.")
def _flatten_everything(images: torch.Tensor) -> torch.Tensor:
    return rearrange(images, "b c h w -> (b c h w)")


# --- 2. per-channel mean ----------------------------------------------------------------------
def _channel_cases() -> list[Case]:
    g = _gen(2)
    return [
        Case("batch of 4 RGB 8x8 images", (torch.rand(4, 3, 8, 8, generator=g),)),
        Case("a single 1x1 pixel", (torch.rand(1, 3, 1, 1, generator=g),)),
        Case("5 images with 2 channels", (torch.rand(5, 2, 3, 6, generator=g) * 255,)),
    ]


@exercise("orientation.channel_means", title="Per-channel mean with reduce", cases=_channel_cases,
          hints=('The output keeps only the channel axis: every other axis must be averaged away, the'
                 ' batch included.',
                 "One mean per channel over b, h and w together: reduce with 'mean' to the pattern "
                 'that keeps only c.'),
          hint="mean_c = (1 / (B·H·W)) Σ_{b, y, x} images[b, c, y, x]: shape [C], one average per channel over "
               "the batch and both image axes.")
def channel_means(images: torch.Tensor) -> torch.Tensor:
    """images: [b, c, h, w] -> [c], the mean of each channel over the batch and all pixels."""
    return reduce(images, "b c h w -> c", "mean")


@mistake("orientation.channel_means", "max instead of mean",
         "The reduction asked for is the mean; 'max' keeps only the brightest value.")
def _means_max(images):
    return reduce(images, "b c h w -> c", "max")


@mistake("orientation.channel_means", "the first image only",
         "Every image of the batch counts: average over the batch axis too, not just images[0].")
def _means_first(images):
    return images[0].mean(dim=(1, 2))


@mistake("orientation.channel_means", "averaged over the batch only",
         "Drop h and w from the output too: the pattern is 'b c h w -> c'.")
def _channel_means_batch_only(images: torch.Tensor) -> torch.Tensor:
    return reduce(images, "b c h w -> c h w", "mean")


@mistake("orientation.channel_means", "summed instead of averaged",
         "The reduction should be 'mean', not 'sum'.")
def _channel_means_sum(images: torch.Tensor) -> torch.Tensor:
    return reduce(images, "b c h w -> c", "sum")


@mistake("orientation.channel_means", "one mean over everything",
         "Keep the channel axis: 'b c h w -> c', not '-> ()'.")
def _channel_means_scalar(images: torch.Tensor) -> torch.Tensor:
    return images.mean()


# --- 3. image grid ----------------------------------------------------------------------------
def _grid_cases() -> list[Case]:
    g = _gen(3)
    return [
        Case("6 images in 2 rows", (torch.rand(6, 3, 4, 5, generator=g), 2)),
        Case("4 images in 1 row", (torch.rand(4, 1, 3, 3, generator=g), 1)),
        Case("6 images in 3 rows", (torch.arange(6 * 2 * 2.0).reshape(6, 1, 2, 2), 3)),
    ]


@exercise("orientation.image_grid", title="Tile a batch into a grid with rearrange", cases=_grid_cases,
          hints=('The batch axis has to be split into two grid axes; each must end up next to the '
                 'image axis it tiles.',
                 'Split b into (rows, cols), row index first; put the row index just before h and the'
                 ' column index just before w, channels first.'),
          hint="With b = r·cols + s (row r, column s of the grid): out[ch, r·H + y, s·W + x] = images[b, ch, y, "
               "x]; shape [C, rows·H, cols·W].")
def image_grid(images: torch.Tensor, rows: int) -> torch.Tensor:
    """images: [rows*cols, c, h, w] -> [c, rows*h, cols*w], filled row by row."""
    return rearrange(images, "(gh gw) c h w -> c (gh h) (gw w)", gh=rows)


@mistake("orientation.image_grid", "a plain reshape without moving axes",
         "A reshape cannot put images side by side: the grid axes must first be moved next to h and w.")
def _grid_reshape(images, rows):
    n, c, h, w = images.shape
    return images.permute(1, 0, 2, 3).reshape(c, rows * h, (n // rows) * w)


@mistake("orientation.image_grid", "rows used as the number of columns",
         "`rows` is the number of grid ROWS, the first factor of the batch split.")
def _grid_rows_cols(images, rows):
    return rearrange(images, "(gh gw) c h w -> c (gh h) (gw w)", gw=rows)


@mistake("orientation.image_grid", "channels last",
         "The grid is channel-first, [c, rows*h, cols*w], like the images themselves.")
def _grid_channels_last(images, rows):
    return rearrange(images, "(gh gw) c h w -> (gh h) (gw w) c", gh=rows)


@mistake("orientation.image_grid", "pixels interleaved between images",
         "(h gh) interleaves rows of different images; the grid index goes first: (gh h) and (gw w).")
def _grid_interleaved(images: torch.Tensor, rows: int) -> torch.Tensor:
    return rearrange(images, "(gh gw) c h w -> c (h gh) (w gw)", gh=rows)


@mistake("orientation.image_grid", "filled column by column",
         "The batch index is (gh gw): row-major. Writing (gw gh) fills the grid column by column.")
def _grid_column_major(images: torch.Tensor, rows: int) -> torch.Tensor:
    return rearrange(images, "(gw gh) c h w -> c (gh h) (gw w)", gh=rows)


# --- 4. attention scores ----------------------------------------------------------------------
def _score_cases() -> list[Case]:
    g = _gen(4)
    return [
        Case("batch 2, 5 queries, 7 keys, d=4", (torch.randn(2, 5, 4, generator=g), torch.randn(2, 7, 4, generator=g))),
        Case("one query, one key, d=1", (torch.randn(1, 1, 1, generator=g), torch.randn(1, 1, 1, generator=g))),
        Case("batch 3, 4 queries, 4 keys, d=16",
             (torch.randn(3, 4, 16, generator=g), torch.randn(3, 4, 16, generator=g))),
    ]


@exercise("orientation.attention_scores", title="Scaled dot-product scores with einsum", cases=_score_cases,
          hints=('Each score is a dot product between one query and one key of the same batch item, '
                 'then scaled.',
                 'Contract the shared feature axis d, keep b, the query axis and the key axis in that'
                 ' order, and divide by the square root of d.'),
          hint="scores[b, i, j] = (Σ_d q[b, i, d] · k[b, j, d]) / √D: shape [B, N_q, N_k], from q [B, N_q, D] "
               "and k [B, N_k, D].")
def attention_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q: [b, n_q, d], k: [b, n_k, d] -> [b, n_q, n_k], each dot product divided by sqrt(d)."""
    from einops import einsum

    return einsum(q, k, "b q d, b k d -> b q k") / q.shape[-1] ** 0.5


@mistake("orientation.attention_scores", "softmax applied",
         "Scores are the scaled dot products BEFORE any softmax; the attention weights come later.")
def _scores_softmax(q, k):
    return (torch.einsum("bqd,bkd->bqk", q, k) / q.shape[-1] ** 0.5).softmax(-1)


@mistake("orientation.attention_scores", "multiplied by sqrt(d)",
         "The scale shrinks the dot products: divide by sqrt(d), do not multiply.")
def _scores_times(q, k):
    return torch.einsum("bqd,bkd->bqk", q, k) * q.shape[-1] ** 0.5


@mistake("orientation.attention_scores", "the 1/sqrt(d) scale is missing",
         "Divide the dot products by sqrt(d), where d = q.shape[-1].")
def _scores_unscaled(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bqd,bkd->bqk", q, k)


@mistake("orientation.attention_scores", "divided by d instead of sqrt(d)",
         "The scale is 1/sqrt(d), not 1/d.")
def _scores_over_d(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bqd,bkd->bqk", q, k) / q.shape[-1]


@mistake("orientation.attention_scores", "keys first, queries second",
         "The output is [b, n_q, n_k]: queries index the rows. Swap the output pattern to 'b q k'.")
def _scores_transposed(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bqd,bkd->bkq", q, k) / q.shape[-1] ** 0.5


# --- 5. forward hooks -------------------------------------------------------------------------
def tiny_cnn(seed: int = 0) -> nn.Sequential:
    """A small CNN with named layers, for the hook exercise: input [b, 3, 8, 8] -> logits [b, 4].
    Its weights depend only on `seed`; the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _named_cnn()


def _named_cnn() -> nn.Sequential:
    from collections import OrderedDict

    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 8, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 8, 3, padding=1)), ("relu2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("fc", nn.Linear(8, 4)),
    ])).eval()


def _hook_cases() -> list[Case]:
    x = torch.randn(2, 3, 8, 8, generator=_gen(5))
    return [
        Case("two layers of a small CNN", (tiny_cnn(0), ["relu1", "fc"], x)),
        Case("one layer", (tiny_cnn(1), ["conv2"], x[:1])),
        Case("three layers, batch of 2", (tiny_cnn(2), ["conv1", "pool", "relu2"], x)),
    ]


def _no_hooks_left(answer, **_: object) -> str | None:
    model = tiny_cnn(3)
    answer(model, ["relu1", "conv2"], torch.randn(1, 3, 8, 8, generator=_gen(6)))
    left = [n for n, m in model.named_modules() if m._forward_hooks]
    if left:
        return (f"hooks are still registered on {left} after your function returned; keep the handle that "
                f"register_forward_hook returns and call handle.remove() (in a finally: block)")
    return None


@exercise("orientation.capture_activations", title="Capture activations with forward hooks",
          hints=("A forward hook sees each module's output as the model runs; collect those, then "
                 'clean up every hook.',
                 "One hook per requested name, each storing the module's output (detached) under its "
                 'OWN name; run the model once; remove every handle, even on an error.'),
          cases=_hook_cases, validate=_no_hooks_left,
          hint="Result: {name: output of that module for x, detached}, one entry per requested name, each with "
               "the shape the module returns; exactly one forward pass; the model carries no hooks afterwards, "
               "whatever happened.")
def capture_activations(model: nn.Module, layer_names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run `model(x)` once and return {name: that module's output, detached} for every name in `layer_names`.

    No hook may stay registered afterwards.
    """
    modules = dict(model.named_modules())
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for name in layer_names:
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor, name: str = name) -> None:
            acts[name] = output.detach()
        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return acts


@mistake("orientation.capture_activations", "a list instead of a dict",
         "Return a dict keyed by the layer NAMES, so that the caller can look each one up.")
def _capture_list(model, layer_names, x):
    out = []
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, o: out.append(o.detach())) for n in layer_names]
    model(x)
    for h in handles:
        h.remove()
    return out


@mistake("orientation.capture_activations", "hooked the whole model",
         "Hook the named submodule (dict(model.named_modules())[name]), not the model itself.")
def _capture_model(model, layer_names, x):
    out = {}
    handles = [model.register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o.detach())) for n in layer_names]
    model(x)
    for h in handles:
        h.remove()
    return out


@mistake("orientation.capture_activations", "stored the module's input instead of its output",
         "A forward hook receives (module, inputs, output): store `output`, not `inputs[0]`.")
def _capture_inputs(model, layer_names, x):
    modules = dict(model.named_modules())
    acts, handles = {}, []
    for name in layer_names:
        handles.append(modules[name].register_forward_hook(
            lambda m, i, o, name=name: acts.__setitem__(name, i[0].detach())))
    model(x)
    for h in handles:
        h.remove()
    return acts


@mistake("orientation.capture_activations", "hooks left registered",
         "Keep the handles that register_forward_hook returns and remove them after the forward pass.")
def _capture_leaky(model, layer_names, x):
    modules = dict(model.named_modules())
    acts = {}
    for name in layer_names:
        modules[name].register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o.detach()))
    model(x)
    return acts


@mistake("orientation.capture_activations", "every hook writes to the same name (late-binding closure)",
         "A lambda or inner function defined in a loop sees the loop variable's LAST value. Bind it as a "
         "default argument: def hook(m, i, o, name=name).")
def _capture_late_binding(model, layer_names, x):
    modules = dict(model.named_modules())
    acts, handles = {}, []
    for name in layer_names:
        # the bug this mistake teaches: the lambda reads `name` late (hence the noqa)
        handles.append(modules[name].register_forward_hook(
            lambda m, i, o: acts.__setitem__(name, o.detach())))  # noqa: B023
    model(x)
    for h in handles:
        h.remove()
    return acts


# --- hidden cases (the grader's only) -----------------------------------------------------------
# Drawn by `python -m course_utils.grade` from a seed it keeps secret, with the generator `g`: the
# learner's notebook never sees these inputs, so an answer cannot be fitted to the public cases.
def _hidden_sizes(g: torch.Generator, low: int = 1, high: int = 6, n: int = 4) -> list[int]:
    return [int(v) for v in torch.randint(low, high, (n,), generator=g)]


def _hidden_flatten(g: torch.Generator) -> list[Case]:
    b, c, h, w = _hidden_sizes(g)
    return [Case("hidden: a random batch", (torch.randn(b, c, h, w, generator=g),))]


def _hidden_channel_means(g: torch.Generator) -> list[Case]:
    b, c, h, w = _hidden_sizes(g)
    return [Case("hidden: a random batch", (torch.rand(b, c, h, w, generator=g) * 10,))]


def _hidden_grid(g: torch.Generator) -> list[Case]:
    rows, cols, h, w = _hidden_sizes(g)
    return [Case("hidden: a random grid", (torch.rand(rows * cols, 2, h, w, generator=g), rows))]


def _hidden_scores(g: torch.Generator) -> list[Case]:
    b, n_q, n_k, d = _hidden_sizes(g, high=7)
    return [Case("hidden: random queries and keys", (torch.randn(b, n_q, d, generator=g),
                                                      torch.randn(b, n_k, d, generator=g)))]


def _hidden_hooks(g: torch.Generator) -> list[Case]:
    names = ["conv1", "relu1", "conv2", "relu2", "pool", "flat", "fc"]
    pick = [names[int(i)] for i in torch.randperm(len(names), generator=g)[:3]]
    seed = int(torch.randint(0, 1000, (1,), generator=g))
    return [Case("hidden: three random layers", (tiny_cnn(seed), pick, torch.randn(2, 3, 8, 8, generator=g)))]


HIDDEN_CASES = {
    "orientation.flatten_images": _hidden_flatten,
    "orientation.channel_means": _hidden_channel_means,
    "orientation.image_grid": _hidden_grid,
    "orientation.attention_scores": _hidden_scores,
    "orientation.capture_activations": _hidden_hooks,
}
