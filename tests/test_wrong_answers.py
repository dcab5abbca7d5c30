"""Wrong answers a learner could plausibly write, at least five per exercise, and the checks' verdict on them.

Written from each exercise's name, docstring and signature only, *before* reading the mistakes the
exercises register, so that this suite measures how well the checks catch mistakes nobody planned for.
Every one must be rejected; at least 90% with a targeted message (a recognised mistake or a
specific harness finding) rather than a bare "values differ".

Print both numbers with `python tests/test_wrong_answers.py`.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, reduce

from course_utils import checks
from course_utils.erasure import gaussian_ot_map
from course_utils.models import block_output, lm_parts

WRONG: dict[str, list[tuple[str, Callable[..., Any]]]] = {}


def wrong(name: str, label: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `fn` as a wrong answer to exercise `name`."""
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        WRONG.setdefault(name, []).append((label, fn))
        return fn
    return register


# ============================================================================================
# 00 orientation
# ============================================================================================
@wrong("orientation.flatten_images", "channel-last order")
def _(images):
    return rearrange(images, "b c h w -> b (h w c)")


@wrong("orientation.flatten_images", "h and w swapped in the grouping")
def _(images):
    return rearrange(images, "b c h w -> b (c w h)")


@wrong("orientation.flatten_images", "flattens the batch too")
def _(images):
    return images.flatten()


@wrong("orientation.flatten_images", "keeps the channel axis")
def _(images):
    return images.flatten(2)


@wrong("orientation.flatten_images", "reshape after swapping batch and channel")
def _(images):
    return images.transpose(0, 1).reshape(images.shape[0], -1)


@wrong("orientation.flatten_images", "centres the input in place first")
def _(images):
    images -= images.mean()
    return images.reshape(images.shape[0], -1)


@wrong("orientation.channel_means", "mean per image, not over the batch")
def _(images):
    return images.mean(dim=(2, 3))


@wrong("orientation.channel_means", "averages over batch and channel")
def _(images):
    return images.mean(dim=(0, 1))


@wrong("orientation.channel_means", "sums the per-image means over the batch")
def _(images):
    return images.mean(dim=(2, 3)).sum(0)


@wrong("orientation.channel_means", "divides by the pixel count only")
def _(images):
    return images.sum(dim=(0, 2, 3)) / (images.shape[2] * images.shape[3])


@wrong("orientation.channel_means", "max instead of mean")
def _(images):
    return reduce(images, "b c h w -> c", "max")


@wrong("orientation.channel_means", "first image only")
def _(images):
    return images[0].mean(dim=(1, 2))


@wrong("orientation.image_grid", "rows and columns swapped in the output")
def _(images, rows):
    return rearrange(images, "(gh gw) c h w -> c (gw h) (gh w)", gh=rows)


@wrong("orientation.image_grid", "filled column by column")
def _(images, rows):
    return rearrange(images, "(gw gh) c h w -> c (gh h) (gw w)", gh=rows)


@wrong("orientation.image_grid", "interleaved pixels")
def _(images, rows):
    return rearrange(images, "(gh gw) c h w -> c (h gh) (w gw)", gh=rows)


@wrong("orientation.image_grid", "plain reshape")
def _(images, rows):
    n, c, h, w = images.shape
    return images.permute(1, 0, 2, 3).reshape(c, rows * h, (n // rows) * w)


@wrong("orientation.image_grid", "rows taken as the number of columns")
def _(images, rows):
    return rearrange(images, "(gh gw) c h w -> c (gh h) (gw w)", gw=rows)


@wrong("orientation.image_grid", "channels last")
def _(images, rows):
    return rearrange(images, "(gh gw) c h w -> (gh h) (gw w) c", gh=rows)


@wrong("orientation.attention_scores", "not scaled")
def _(q, k):
    return torch.einsum("bqd,bkd->bqk", q, k)


@wrong("orientation.attention_scores", "divided by d, not sqrt(d)")
def _(q, k):
    return torch.einsum("bqd,bkd->bqk", q, k) / q.shape[-1]


@wrong("orientation.attention_scores", "keys and queries swapped in the output")
def _(q, k):
    return torch.einsum("bqd,bkd->bkq", q, k) / q.shape[-1] ** 0.5


@wrong("orientation.attention_scores", "scaled by sqrt(n_q)")
def _(q, k):
    return torch.einsum("bqd,bkd->bqk", q, k) / q.shape[1] ** 0.5


@wrong("orientation.attention_scores", "softmax applied")
def _(q, k):
    return (torch.einsum("bqd,bkd->bqk", q, k) / q.shape[-1] ** 0.5).softmax(-1)


@wrong("orientation.attention_scores", "multiplied by sqrt(d)")
def _(q, k):
    return torch.einsum("bqd,bkd->bqk", q, k) * q.shape[-1] ** 0.5


@wrong("orientation.attention_scores", "scales q in place")
def _(q, k):
    q /= q.shape[-1] ** 0.5
    return q @ k.transpose(1, 2)


def _modules(model):
    return dict(model.named_modules())


@wrong("orientation.capture_activations", "hooks never removed")
def _(model, layer_names, x):
    out = {}
    for name in layer_names:
        _modules(model)[name].register_forward_hook(lambda m, i, o, name=name: out.__setitem__(name, o.detach()))
    model(x)
    return out


@wrong("orientation.capture_activations", "outputs kept attached to the graph")
def _(model, layer_names, x):
    out = {}
    handles = [_modules(model)[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o))
               for n in layer_names]
    model(x)
    for h in handles:
        h.remove()
    return out


@wrong("orientation.capture_activations", "stores the module's input")
def _(model, layer_names, x):
    out = {}
    handles = [_modules(model)[n].register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, i[0].detach()))
               for n in layer_names]
    model(x)
    for h in handles:
        h.remove()
    return out


@wrong("orientation.capture_activations", "late-binding closure: every output under the last name")
def _(model, layer_names, x):
    out = {}
    handles = []
    for name in layer_names:
        handles.append(_modules(model)[name].register_forward_hook(
            lambda m, i, o: out.__setitem__(name, o.detach())))  # noqa: B023 (the mistake)
    model(x)
    for h in handles:
        h.remove()
    return out


@wrong("orientation.capture_activations", "hook on the whole model")
def _(model, layer_names, x):
    out = {}
    handles = [model.register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o.detach()))
               for n in layer_names]
    model(x)
    for h in handles:
        h.remove()
    return out


@wrong("orientation.capture_activations", "a list, not a dict")
def _(model, layer_names, x):
    out = []
    handles = [_modules(model)[n].register_forward_hook(lambda m, i, o: out.append(o.detach()))
               for n in layer_names]
    model(x)
    for h in handles:
        h.remove()
    return out


# ============================================================================================
# 01 gradcam
# ============================================================================================
def _acts_grads(model, layer, x, select, detach=True, remove=True, check_twice=True):
    store: dict[str, Any] = {"n": 0}

    def hook(_m, _i, out):
        store["n"] += 1
        store["A"] = out
        out.register_hook(lambda g: store.__setitem__("G", g))

    handle = layer.register_forward_hook(hook)
    try:
        logits = model(x)
        if check_twice and store["n"] > 1:
            raise ValueError("layer ran twice")
        select(logits).backward()
    finally:
        if remove:
            handle.remove()
    a, g = store["A"], store["G"]
    return (a.detach(), g.detach()) if detach else (a, g)


@wrong("gradcam.activations_and_gradients", "backprops the predicted class")
def _(model, layer, x, classes):
    return _acts_grads(model, layer, x, lambda lg: lg.max(1).values.sum())


@wrong("gradcam.activations_and_gradients", "backprops the sum of all logits")
def _(model, layer, x, classes):
    return _acts_grads(model, layer, x, lambda lg: lg.sum())


@wrong("gradcam.activations_and_gradients", "logits[:, classes] picks every image at every class")
def _(model, layer, x, classes):
    return _acts_grads(model, layer, x, lambda lg: lg[:, classes].sum())


@wrong("gradcam.activations_and_gradients", "backprops the softmax probability")
def _(model, layer, x, classes):
    return _acts_grads(model, layer, x,
                       lambda lg: lg.softmax(-1)[torch.arange(len(classes)), classes].sum())


@wrong("gradcam.activations_and_gradients", "activations left attached")
def _(model, layer, x, classes):
    return _acts_grads(model, layer, x, lambda lg: lg[torch.arange(len(classes)), classes].sum(),
                       detach=False)


@wrong("gradcam.activations_and_gradients", "hook left registered")
def _(model, layer, x, classes):
    return _acts_grads(model, layer, x, lambda lg: lg[torch.arange(len(classes)), classes].sum(),
                       remove=False)


@wrong("gradcam.activations_and_gradients", "no error when the layer runs twice")
def _(model, layer, x, classes):
    return _acts_grads(model, layer, x, lambda lg: lg[torch.arange(len(classes)), classes].sum(),
                       check_twice=False)


@wrong("gradcam.channel_weights", "sum, not mean")
def _(gradients):
    return gradients.sum(dim=(2, 3))


@wrong("gradcam.channel_weights", "averaged over the batch too")
def _(gradients):
    return gradients.mean(dim=(0, 2, 3))


@wrong("gradcam.channel_weights", "max pooling")
def _(gradients):
    return gradients.amax(dim=(2, 3))


@wrong("gradcam.channel_weights", "absolute gradients")
def _(gradients):
    return gradients.abs().mean(dim=(2, 3))


@wrong("gradcam.channel_weights", "positive gradients only")
def _(gradients):
    return gradients.clamp(min=0).mean(dim=(2, 3))


@wrong("gradcam.channel_weights", "averaged over channel and height")
def _(gradients):
    return gradients.mean(dim=(1, 2))


def _cam(activations, weights, size, *, relu=True, relu_after=False, norm="max", mode="bilinear",
         align=False):
    raw = torch.einsum("bk,bkhw->bhw", weights, activations)
    if relu and not relu_after:
        raw = raw.relu()
    kw = {} if mode == "nearest" else {"align_corners": align}
    up = F.interpolate(raw[:, None], size=size, mode=mode, **kw)[:, 0]
    if relu_after:
        up = up.relu()
    if norm == "max":
        m = up.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
        return up / m
    if norm == "global":
        return up / up.max().clamp(min=1e-12)
    if norm == "minmax":
        lo = up.flatten(1).amin(1)[:, None, None]
        hi = up.flatten(1).amax(1)[:, None, None]
        return (up - lo) / (hi - lo).clamp(min=1e-12)
    if norm == "unguarded":
        return up / up.flatten(1).amax(1)[:, None, None]
    return up


@wrong("gradcam.cam_map", "no ReLU")
def _(activations, weights, size):
    return _cam(activations, weights, size, relu=False, norm="minmax")


@wrong("gradcam.cam_map", "ReLU after upsampling")
def _(activations, weights, size):
    return _cam(activations, weights, size, relu_after=True)


@wrong("gradcam.cam_map", "one max for the whole batch")
def _(activations, weights, size):
    return _cam(activations, weights, size, norm="global")


@wrong("gradcam.cam_map", "min-max normalisation")
def _(activations, weights, size):
    return _cam(activations, weights, size, norm="minmax")


@wrong("gradcam.cam_map", "nearest-neighbour upsampling")
def _(activations, weights, size):
    return _cam(activations, weights, size, mode="nearest")


@wrong("gradcam.cam_map", "align_corners=True")
def _(activations, weights, size):
    return _cam(activations, weights, size, align=True)


@wrong("gradcam.cam_map", "not normalised")
def _(activations, weights, size):
    return _cam(activations, weights, size, norm=None)


@wrong("gradcam.cam_map", "divides by zero on a flat map")
def _(activations, weights, size):
    return _cam(activations, weights, size, norm="unguarded")


@wrong("gradcam.cam_map", "size read as (width, height)")
def _(activations, weights, size):
    return _cam(activations, weights, (size[1], size[0]))


@wrong("gradcam.box_mass", "x and y swapped")
def _(maps, box):
    x0, y0, x1, y1 = box
    total = maps.sum(dim=(1, 2))
    inside = maps[:, x0:x1, y0:y1].sum(dim=(1, 2))
    return torch.where(total > 0, inside / total.clamp(min=1e-12), torch.zeros_like(total))


@wrong("gradcam.box_mass", "inclusive box")
def _(maps, box):
    x0, y0, x1, y1 = box
    total = maps.sum(dim=(1, 2))
    inside = maps[:, y0:y1 + 1, x0:x1 + 1].sum(dim=(1, 2))
    return torch.where(total > 0, inside / total.clamp(min=1e-12), torch.zeros_like(total))


@wrong("gradcam.box_mass", "mass, not fraction")
def _(maps, box):
    x0, y0, x1, y1 = box
    return maps[:, y0:y1, x0:x1].sum(dim=(1, 2))


@wrong("gradcam.box_mass", "NaN on an all-zero map")
def _(maps, box):
    x0, y0, x1, y1 = box
    return maps[:, y0:y1, x0:x1].sum(dim=(1, 2)) / maps.sum(dim=(1, 2))


@wrong("gradcam.box_mass", "mean inside the box")
def _(maps, box):
    x0, y0, x1, y1 = box
    return maps[:, y0:y1, x0:x1].mean(dim=(1, 2))


@wrong("gradcam.box_mass", "divides by the whole batch's mass")
def _(maps, box):
    x0, y0, x1, y1 = box
    total = maps.sum()
    inside = maps[:, y0:y1, x0:x1].sum(dim=(1, 2))
    return inside / total if total > 0 else torch.zeros_like(inside)


def _pearson(ra, rb, ddof_mismatch=False, centre=True):
    if centre:
        ra = ra - ra.mean(1, keepdim=True)
        rb = rb - rb.mean(1, keepdim=True)
    num = (ra * rb).sum(1)
    if ddof_mismatch:
        n = ra.shape[1]
        return (num / (n - 1)) / (ra.std(1, unbiased=False) * rb.std(1, unbiased=False))
    return num / (ra.norm(dim=1) * rb.norm(dim=1))


def _avg_rank(row):
    order = row.argsort()
    ranks = torch.empty_like(row)
    ranks[order] = torch.arange(len(row), dtype=row.dtype)
    uniq, inv = torch.unique(row, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=row.dtype).index_add_(0, inv, ranks)
    counts = torch.zeros(len(uniq), dtype=row.dtype).index_add_(0, inv, torch.ones_like(row))
    return (sums / counts)[inv]


@wrong("gradcam.spearman", "argsort taken as the ranks")
def _(a, b):
    return _pearson(a.argsort(1).to(a.dtype), b.argsort(1).to(b.dtype))


@wrong("gradcam.spearman", "ties broken arbitrarily (argsort of argsort)")
def _(a, b):
    return _pearson(a.argsort(1).argsort(1).to(a.dtype), b.argsort(1).argsort(1).to(b.dtype))


@wrong("gradcam.spearman", "Pearson on the raw values")
def _(a, b):
    return _pearson(a, b)


@wrong("gradcam.spearman", "one correlation for the whole batch")
def _(a, b):
    ra = _avg_rank(a.flatten())[None]
    rb = _avg_rank(b.flatten())[None]
    return _pearson(ra, rb)[0]


@wrong("gradcam.spearman", "ranks not centred")
def _(a, b):
    ra = torch.stack([_avg_rank(r) for r in a])
    rb = torch.stack([_avg_rank(r) for r in b])
    return _pearson(ra, rb, centre=False)


@wrong("gradcam.spearman", "dense ranks for ties")
def _(a, b):
    ra = torch.stack([torch.unique(r, return_inverse=True)[1].to(a.dtype) for r in a])
    rb = torch.stack([torch.unique(r, return_inverse=True)[1].to(b.dtype) for r in b])
    return _pearson(ra, rb)


@wrong("gradcam.spearman", "covariance 1/(n-1) over population standard deviations")
def _(a, b):
    ra = torch.stack([_avg_rank(r) for r in a])
    rb = torch.stack([_avg_rank(r) for r in b])
    return _pearson(ra, rb, ddof_mismatch=True)


@wrong("gradcam.permute_labels", "seeds the global generator")
def _(labels, seed):
    torch.manual_seed(seed)
    return labels[torch.randperm(len(labels))]


@wrong("gradcam.permute_labels", "returns the labels unchanged")
def _(labels, seed):
    return labels


@wrong("gradcam.permute_labels", "sorts the labels")
def _(labels, seed):
    return labels.sort().values


@wrong("gradcam.permute_labels", "shuffles in place")
def _(labels, seed):
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    labels[:] = labels[perm].clone()
    return labels


@wrong("gradcam.permute_labels", "ignores the seed")
def _(labels, seed):
    return labels[torch.randperm(len(labels))]


@wrong("gradcam.permute_labels", "random labels, not a permutation")
def _(labels, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(labels.max()) + 1, labels.shape, generator=g)


@wrong("gradcam.permute_labels", "a roll: the same for every seed")
def _(labels, seed):
    return torch.roll(labels, 1)


def _delete(x, saliency, k, baseline, *, mask_fn):
    b, _, h, w = x.shape
    mask = mask_fn(saliency.flatten(1), k).reshape(b, 1, h, w)
    return torch.where(mask, torch.as_tensor(baseline, dtype=x.dtype), x)


def _topk_mask(flat, k, largest=True):
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k:
        mask.scatter_(1, flat.topk(k, dim=1, largest=largest).indices, True)
    return mask


@wrong("gradcam.delete_most_salient", "threshold at the k-th largest value (ties delete more)")
def _(x, saliency, k, baseline):
    def thresh(flat, k):
        if k == 0:
            return torch.zeros_like(flat, dtype=torch.bool)
        kth = flat.topk(k, dim=1).values[:, -1:]
        return flat >= kth
    return _delete(x, saliency, k, baseline, mask_fn=thresh)


@wrong("gradcam.delete_most_salient", "deletes the least salient")
def _(x, saliency, k, baseline):
    return _delete(x, saliency, k, baseline, mask_fn=lambda f, k: _topk_mask(f, k, largest=False))


@wrong("gradcam.delete_most_salient", "top k over the whole batch")
def _(x, saliency, k, baseline):
    def glob(flat, k):
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        if k:
            mask[flat.flatten().topk(k).indices] = True
        return mask.reshape(flat.shape)
    return _delete(x, saliency, k, baseline, mask_fn=glob)


@wrong("gradcam.delete_most_salient", "writes into x")
def _(x, saliency, k, baseline):
    b, c, h, w = x.shape
    mask = _topk_mask(saliency.flatten(1), k).reshape(b, 1, h, w).expand(b, c, h, w)
    x[mask] = baseline
    return x


@wrong("gradcam.delete_most_salient", "first channel only")
def _(x, saliency, k, baseline):
    b, c, h, w = x.shape
    out = x.clone()
    mask = _topk_mask(saliency.flatten(1), k).reshape(b, h, w)
    out[:, 0][mask] = baseline
    return out


@wrong("gradcam.delete_most_salient", "sets pixels to zero, not the baseline")
def _(x, saliency, k, baseline):
    return _delete(x, saliency, k, 0.0, mask_fn=_topk_mask)


@wrong("gradcam.delete_most_salient", "mask reshaped with H and W swapped")
def _(x, saliency, k, baseline):
    b, _, h, w = x.shape
    mask = _topk_mask(saliency.transpose(1, 2).flatten(1), k).reshape(b, 1, h, w)
    return torch.where(mask, torch.as_tensor(baseline, dtype=x.dtype), x)


# ============================================================================================
# 02 lens
# ============================================================================================
def _stream(model, ids, *, embed=True, remove=True, keep_input=False, token_only=False, dim=0):
    parts = lm_parts(model)
    caught: list[torch.Tensor] = []
    if keep_input:
        handles = [b.register_forward_pre_hook(
            lambda m, args, kwargs: caught.append(args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True) for b in parts.blocks]
    else:
        handles = [b.register_forward_hook(lambda m, i, o: caught.append(block_output(o)))
                   for b in parts.blocks]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        if remove:
            for h in handles:
                h.remove()
    first = parts.embed(ids) if token_only else parts.embed_fn(ids)
    return torch.stack(([first] if embed else []) + caught, dim=dim).detach()


@wrong("lens.residual_stream", "no embedding entry")
def _(model, ids):
    return _stream(model, ids, embed=False)


@wrong("lens.residual_stream", "hidden_states: the last one is after the final norm")
def _(model, ids):
    with torch.no_grad():
        return torch.stack(model(ids, output_hidden_states=True).hidden_states)


@wrong("lens.residual_stream", "hooks left behind")
def _(model, ids):
    return _stream(model, ids, remove=False)


@wrong("lens.residual_stream", "each block's input, not its output")
def _(model, ids):
    return _stream(model, ids, keep_input=True)


@wrong("lens.residual_stream", "token embedding without positions")
def _(model, ids):
    return _stream(model, ids, token_only=True)


@wrong("lens.residual_stream", "stacked on the batch axis")
def _(model, ids):
    return _stream(model, ids, dim=1)


def _rms(h, eps, dim=-1):
    return h / torch.sqrt(h.pow(2).mean(dim, keepdim=True) + eps)


@wrong("lens.logit_lens", "no normalisation")
def _(residuals, gamma, W_U, eps):
    return residuals @ W_U.T


@wrong("lens.logit_lens", "eps outside the square root")
def _(residuals, gamma, W_U, eps):
    return residuals / (residuals.pow(2).mean(-1, keepdim=True).sqrt() + eps) * gamma @ W_U.T


@wrong("lens.logit_lens", "the final layer's scale for every layer")
def _(residuals, gamma, W_U, eps):
    scale = torch.sqrt(residuals[-1].pow(2).mean(-1, keepdim=True) + eps)
    return residuals / scale * gamma @ W_U.T


@wrong("lens.logit_lens", "LayerNorm (subtracts the mean)")
def _(residuals, gamma, W_U, eps):
    c = residuals - residuals.mean(-1, keepdim=True)
    return _rms(c, eps) * gamma @ W_U.T


@wrong("lens.logit_lens", "forgets gamma")
def _(residuals, gamma, W_U, eps):
    return _rms(residuals, eps) @ W_U.T


@wrong("lens.logit_lens", "normalises over the layers")
def _(residuals, gamma, W_U, eps):
    return _rms(residuals, eps, dim=0) * gamma @ W_U.T


@wrong("lens.logit_lens", "W_U not transposed")
def _(residuals, gamma, W_U, eps):
    return _rms(residuals, eps) * gamma @ W_U


@wrong("lens.top_tokens", "top logits, not probabilities")
def _(logits, k):
    v, i = logits.topk(k, dim=-1)
    return v, i


@wrong("lens.top_tokens", "softmax over the first axis")
def _(logits, k):
    v, i = logits.softmax(0).topk(k, dim=-1)
    return v, i


@wrong("lens.top_tokens", "returns (ids, probs)")
def _(logits, k):
    v, i = logits.softmax(-1).topk(k, dim=-1)
    return i, v


@wrong("lens.top_tokens", "least likely first")
def _(logits, k):
    v, i = logits.softmax(-1).topk(k, dim=-1)
    return v.flip(-1), i.flip(-1)


@wrong("lens.top_tokens", "log-probabilities")
def _(logits, k):
    v, i = logits.log_softmax(-1).topk(k, dim=-1)
    return v, i


@wrong("lens.top_tokens", "softmax over the top k only")
def _(logits, k):
    v, i = logits.topk(k, dim=-1)
    return v.softmax(-1), i


@wrong("lens.kl_to_final", "reversed KL(p_l || p_L)")
def _(logits):
    logp = logits.log_softmax(-1)
    return (logp.exp() * (logp - logp[-1])).sum(-1).mean(-1)


@wrong("lens.kl_to_final", "sum over positions")
def _(logits):
    logp = logits.log_softmax(-1)
    return (logp[-1].exp() * (logp[-1] - logp)).sum(-1).sum(-1)


@wrong("lens.kl_to_final", "log of softmax")
def _(logits):
    p = logits.softmax(-1)
    return (p[-1] * (torch.log(p[-1]) - torch.log(p))).sum(-1).mean(-1)


@wrong("lens.kl_to_final", "compared with the first layer")
def _(logits):
    logp = logits.log_softmax(-1)
    return (logp[0].exp() * (logp[0] - logp)).sum(-1).mean(-1)


@wrong("lens.kl_to_final", "mean over the vocabulary")
def _(logits):
    logp = logits.log_softmax(-1)
    return (logp[-1].exp() * (logp[-1] - logp)).mean(-1).mean(-1)


@wrong("lens.kl_to_final", "F.kl_div with reduction='mean'")
def _(logits):
    logp = logits.log_softmax(-1)
    return torch.stack([F.kl_div(logp[i], logp[-1].exp(), reduction="mean") for i in range(len(logp))])


@wrong("lens.answer_rank", "counts the answer itself (>=)")
def _(logits, target):
    return (logits >= logits[:, target:target + 1]).sum(-1)


@wrong("lens.answer_rank", "position in a descending argsort")
def _(logits, target):
    return (logits.argsort(-1, descending=True) == target).nonzero()[:, 1]


@wrong("lens.answer_rank", "float counts")
def _(logits, target):
    return (logits > logits[:, target:target + 1]).float().sum(-1)


@wrong("lens.answer_rank", "counts the tokens below")
def _(logits, target):
    return (logits < logits[:, target:target + 1]).sum(-1)


@wrong("lens.answer_rank", "the final layer's logit as the bar")
def _(logits, target):
    return (logits > logits[-1, target]).sum(-1)


@wrong("lens.answer_rank", "ranks by probability after a softmax over layers")
def _(logits, target):
    p = logits.softmax(0)
    return (p > p[:, target:target + 1]).sum(-1)


@wrong("lens.answer_rank", "endless loop while counting")
def _(logits, target):
    out = []
    for row in logits:
        count, j = 0, 0
        while j < len(row):
            if row[j] > row[target]:
                count += 1
            # forgot j += 1
        out.append(count)
    return torch.tensor(out)


def _ce(logits, ids, shift=1):
    logp = logits.log_softmax(-1)
    if shift == 1:
        lp, tgt = logp[:, :-1], ids[1:]
    elif shift == 0:
        lp, tgt = logp, ids
    else:
        lp, tgt = logp[:, 1:], ids[:-1]
    return lp.gather(-1, tgt.expand(lp.shape[0], -1)[..., None])[..., 0]


@wrong("lens.cross_entropy", "no shift: position t predicts token t")
def _(logits, ids):
    return -_ce(logits, ids, shift=0).mean(-1)


@wrong("lens.cross_entropy", "sum over positions")
def _(logits, ids):
    return -_ce(logits, ids).sum(-1)


@wrong("lens.cross_entropy", "missing minus sign")
def _(logits, ids):
    return _ce(logits, ids).mean(-1)


@wrong("lens.cross_entropy", "shifted the wrong way")
def _(logits, ids):
    return -_ce(logits, ids, shift=-1).mean(-1)


@wrong("lens.cross_entropy", "one number for all layers")
def _(logits, ids):
    L = logits.shape[0]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[1:].repeat(L))


@wrong("lens.cross_entropy", "in bits")
def _(logits, ids):
    return -_ce(logits, ids).mean(-1) / math.log(2)


@wrong("lens.cross_entropy", "softmax over the layers")
def _(logits, ids):
    logp = logits.log_softmax(0)[:, :-1]
    return -logp.gather(-1, ids[1:].expand(logp.shape[0], -1)[..., None])[..., 0].mean(-1)


def _kurt(h, *, dim=-1, unbiased=False, centre=True, minus=3.0, power=2, global_mean=False):
    mean = h.mean() if global_mean else h.mean(dim, keepdim=True)
    c = h - mean if centre else h
    n = h.shape[dim]
    m2 = (c ** 2).sum(dim) / (n - 1 if unbiased else n)
    m4 = (c ** 4).mean(dim)
    return m4 / m2 ** power - minus


@wrong("lens.excess_kurtosis", "forgets the -3")
def _(residuals):
    return _kurt(residuals, minus=0.0)


@wrong("lens.excess_kurtosis", "unbiased variance")
def _(residuals):
    return _kurt(residuals, unbiased=True)


@wrong("lens.excess_kurtosis", "not centred")
def _(residuals):
    return _kurt(residuals, centre=False)


@wrong("lens.excess_kurtosis", "over the first axis")
def _(residuals):
    return _kurt(residuals, dim=0)


@wrong("lens.excess_kurtosis", "divides by Var, not Var^2")
def _(residuals):
    return _kurt(residuals, power=1)


@wrong("lens.excess_kurtosis", "centred on the mean of the whole tensor")
def _(residuals):
    return _kurt(residuals, global_mean=True)


@wrong("lens.translate", "no residual: A h + b")
def _(h, weight, bias):
    return h @ weight.T + bias


@wrong("lens.translate", "weight not transposed")
def _(h, weight, bias):
    return h + h @ weight + bias


@wrong("lens.translate", "forgets the bias")
def _(h, weight, bias):
    return h + h @ weight.T


@wrong("lens.translate", "bias added before the matrix")
def _(h, weight, bias):
    return h + (h + bias) @ weight.T


@wrong("lens.translate", "updates h in place")
def _(h, weight, bias):
    h += h @ weight.T + bias
    return h


@wrong("lens.translate", "2-D matmul only")
def _(h, weight, bias):
    return h + torch.mm(h, weight.T) + bias


def _ind(pattern, half, *, offset=1, queries="second", reduce_fn="mean", transpose=False):
    T = pattern.shape[-1]
    qs = range(half, 2 * half) if queries == "second" else range(T)
    vals = []
    for t in qs:
        key = t - half + offset
        if not 0 <= key < T:
            continue
        vals.append(pattern[..., key, t] if transpose else pattern[..., t, key])
    stacked = torch.stack(vals, -1)
    return stacked.mean(-1) if reduce_fn == "mean" else stacked.sum(-1)


@wrong("lens.induction_score", "attends to the first occurrence itself")
def _(pattern, half):
    return _ind(pattern, half, offset=0)


@wrong("lens.induction_score", "every query, both copies")
def _(pattern, half):
    return _ind(pattern, half, queries="all")


@wrong("lens.induction_score", "previous-token attention")
def _(pattern, half):
    T = pattern.shape[-1]
    return torch.stack([pattern[..., t, t - 1] for t in range(half, T)], -1).mean(-1)


@wrong("lens.induction_score", "sum, not mean")
def _(pattern, half):
    return _ind(pattern, half, reduce_fn="sum")


@wrong("lens.induction_score", "rows and columns swapped")
def _(pattern, half):
    return _ind(pattern, half, transpose=True)


@wrong("lens.induction_score", "a diagonal one entry too long")
def _(pattern, half):
    return torch.diagonal(pattern, offset=-(half - 1), dim1=-2, dim2=-1).mean(-1)


# ============================================================================================
# 03 moments
# ============================================================================================
def _moments(batches, num_classes, *, ddof=1, dtype=torch.float64, late_double=False, first_only=False,
             global_mean=False, mean_of_means=False):
    batches = list(batches)
    if first_only:
        batches = batches[:1]
    acc = torch.float32 if late_double else dtype
    d = batches[0][0].shape[1]
    n = torch.zeros(num_classes, dtype=acc)
    s = torch.zeros(num_classes, d, dtype=acc)
    ss = torch.zeros(num_classes, d, d, dtype=acc)
    per_batch_means = []
    for x, y in batches:
        x = x.to(acc)
        bm = torch.zeros(num_classes, d, dtype=acc)
        for c in range(num_classes):
            xc = x[y == c]
            n[c] += len(xc)
            s[c] += xc.sum(0)
            ss[c] += xc.T @ xc
            if len(xc):
                bm[c] = xc.mean(0)
        per_batch_means.append(bm)
    mu = s / n[:, None]
    centre = (s.sum(0) / n.sum()).expand_as(mu) if global_mean else mu
    cov = (ss - n[:, None, None] * (centre[:, :, None] * mu[:, None, :] + mu[:, :, None] * centre[:, None, :]
                                     - centre[:, :, None] * centre[:, None, :])) / (n - ddof)[:, None, None]
    if mean_of_means:
        mu = torch.stack(per_batch_means).mean(0)
    out = torch.float64 if late_double else dtype
    return mu.to(out), cov.to(out)


@wrong("moments.class_moments", "biased covariance (1/n)")
def _(batches, num_classes):
    return _moments(batches, num_classes, ddof=0)


@wrong("moments.class_moments", "float32 throughout")
def _(batches, num_classes):
    return _moments(batches, num_classes, dtype=torch.float32)


@wrong("moments.class_moments", "float32 sums, converted at the end")
def _(batches, num_classes):
    return _moments(batches, num_classes, late_double=True)


@wrong("moments.class_moments", "mean of the per-batch means")
def _(batches, num_classes):
    return _moments(batches, num_classes, mean_of_means=True)


@wrong("moments.class_moments", "covariance around the global mean")
def _(batches, num_classes):
    return _moments(batches, num_classes, global_mean=True)


@wrong("moments.class_moments", "first batch only")
def _(batches, num_classes):
    return _moments(batches, num_classes, first_only=True)


@wrong("moments.mean_shift", "no clamp")
def _(x, mu_s, mu_t):
    return x + mu_t - mu_s


@wrong("moments.mean_shift", "wrong direction")
def _(x, mu_s, mu_t):
    return (x + mu_s - mu_t).clamp(0, 1)


@wrong("moments.mean_shift", "clamps before shifting")
def _(x, mu_s, mu_t):
    return x.clamp(0, 1) + mu_t - mu_s


@wrong("moments.mean_shift", "rescales to [0, 1] instead of clamping")
def _(x, mu_s, mu_t):
    y = x + mu_t - mu_s
    return (y - y.min()) / (y.max() - y.min())


@wrong("moments.mean_shift", "edits x in place")
def _(x, mu_s, mu_t):
    x += mu_t - mu_s
    return x.clamp_(0, 1)


@wrong("moments.mean_shift", "clamps below only")
def _(x, mu_s, mu_t):
    return (x + mu_t - mu_s).clamp(min=0)


def _eig_root(mat, *, clamp=True, transpose=True):
    evals, vecs = torch.linalg.eigh(mat)
    root = (evals.clamp(min=0) if clamp else evals).sqrt()
    right = vecs.transpose(-1, -2) if transpose else vecs
    return (vecs * root[..., None, :]) @ right


@wrong("moments.sqrtm_psd", "element-wise square root")
def _(mat):
    return mat.sqrt()


@wrong("moments.sqrtm_psd", "Cholesky factor")
def _(mat):
    return torch.linalg.cholesky(mat)


@wrong("moments.sqrtm_psd", "negative eigenvalues not clamped")
def _(mat):
    return _eig_root(mat, clamp=False)


@wrong("moments.sqrtm_psd", "V diag V without the transpose")
def _(mat):
    return _eig_root(mat, transpose=False)


@wrong("moments.sqrtm_psd", "square roots of the eigenvalues only")
def _(mat):
    return torch.diag_embed(torch.linalg.eigvalsh(mat).clamp(min=0).sqrt())


@wrong("moments.sqrtm_psd", "torch.diag: one matrix only")
def _(mat):
    evals, vecs = torch.linalg.eigh(mat)
    return vecs @ torch.diag(evals.clamp(min=0).sqrt()) @ vecs.T


def _inv_root(mat):
    evals, vecs = torch.linalg.eigh(mat)
    return (vecs * evals.rsqrt()[..., None, :]) @ vecs.transpose(-1, -2)


def _monge(S, T):
    rs, irs = _eig_root(S), _inv_root(S)
    return irs @ _eig_root(rs @ T @ rs) @ irs


@wrong("moments.monge_map", "source and target swapped")
def _(cov_s, cov_t):
    return _monge(cov_t, cov_s)


@wrong("moments.monge_map", "sqrt(T) S^-1/2: colours but is not symmetric")
def _(cov_s, cov_t):
    return _eig_root(cov_t) @ _inv_root(cov_s)


@wrong("moments.monge_map", "element-wise ratio")
def _(cov_s, cov_t):
    return (cov_t / cov_s).abs().sqrt()


@wrong("moments.monge_map", "missing the outer S^-1/2")
def _(cov_s, cov_t):
    rs = _eig_root(cov_s)
    return _eig_root(rs @ cov_t @ rs)


@wrong("moments.monge_map", "S^1/2 outside instead of S^-1/2")
def _(cov_s, cov_t):
    rs = _eig_root(cov_s)
    return rs @ _eig_root(rs @ cov_t @ rs) @ rs


@wrong("moments.monge_map", "S^-1 on one side only")
def _(cov_s, cov_t):
    rs = _eig_root(cov_s)
    return torch.linalg.inv(cov_s) @ _eig_root(rs @ cov_t @ rs)


@wrong("moments.gaussian_edit", "not centred")
def _(x, mu_s, mu_t, A):
    return mu_t + x @ A


@wrong("moments.gaussian_edit", "means swapped")
def _(x, mu_s, mu_t, A):
    return mu_s + (x - mu_t) @ A


@wrong("moments.gaussian_edit", "centred after mapping")
def _(x, mu_s, mu_t, A):
    return mu_t + x @ A - mu_s


@wrong("moments.gaussian_edit", "target mean not added")
def _(x, mu_s, mu_t, A):
    return (x - mu_s) @ A


@wrong("moments.gaussian_edit", "back to the source mean")
def _(x, mu_s, mu_t, A):
    return mu_s + (x - mu_s) @ A


@wrong("moments.gaussian_edit", "clamped to [0, 1]")
def _(x, mu_s, mu_t, A):
    return (mu_t + (x - mu_s) @ A).clamp(0, 1)


def _mse(x, y):
    return ((x - y) ** 2).flatten(1).mean(1)


@wrong("moments.psnr", "one number for the batch")
def _(x, y):
    return 10 * torch.log10(1 / ((x - y) ** 2).mean())


@wrong("moments.psnr", "20 log10")
def _(x, y):
    return 20 * torch.log10(1 / _mse(x, y))


@wrong("moments.psnr", "natural log")
def _(x, y):
    return 10 * torch.log(1 / _mse(x, y))


@wrong("moments.psnr", "RMSE inside 10 log10")
def _(x, y):
    return 10 * torch.log10(1 / _mse(x, y).sqrt())


@wrong("moments.psnr", "peak 255")
def _(x, y):
    return 10 * torch.log10(255 ** 2 / _mse(x, y))


@wrong("moments.psnr", "sum of squares, not the mean")
def _(x, y):
    return 10 * torch.log10(1 / ((x - y) ** 2).flatten(1).sum(1))


@wrong("moments.psnr", "per channel, not per image")
def _(x, y):
    return 10 * torch.log10(1 / ((x - y) ** 2).mean(dim=(0, 2, 3)))


# ============================================================================================
# 04 erasure
# ============================================================================================
@wrong("erasure.cross_covariance", "biased 1/n")
def _(x, z):
    return (x - x.mean(0)).T @ (z - z.mean(0)) / len(x)


@wrong("erasure.cross_covariance", "not centred")
def _(x, z):
    return x.T @ z / (len(x) - 1)


@wrong("erasure.cross_covariance", "transposed [k, d]")
def _(x, z):
    return (z - z.mean(0)).T @ (x - x.mean(0)) / (len(x) - 1)


@wrong("erasure.cross_covariance", "correlation, not covariance")
def _(x, z):
    d = x.shape[1]
    return torch.corrcoef(torch.cat([x, z], 1).T)[:d, d:]


@wrong("erasure.cross_covariance", "subtracts mu_x mu_z^T without the factor n")
def _(x, z):
    return (x.T @ z - torch.outer(x.mean(0), z.mean(0))) / (len(x) - 1)


@wrong("erasure.cross_covariance", "[n, n] Gram matrix")
def _(x, z):
    return (x - x.mean(0)) @ (z - z.mean(0)).T / (len(x) - 1)


def _sxz(x, z):
    return (x - x.mean(0)).T @ (z - z.mean(0)) / (len(x) - 1)


def _basis(S, tol=1e-8):
    U, s, _ = torch.linalg.svd(S, full_matrices=False)
    return U[:, s > tol * s.max()]


@wrong("erasure.orth_erase", "not centred")
def _(x, z):
    U = _basis(_sxz(x, z))
    return x - x @ U @ U.T


@wrong("erasure.orth_erase", "S S^T is not a projection")
def _(x, z):
    S = _sxz(x, z)
    return x - (x - x.mean(0)) @ S @ S.T


@wrong("erasure.orth_erase", "QR keeps a spurious k-th direction")
def _(x, z):
    Q = torch.linalg.qr(_sxz(x, z)).Q
    return x - (x - x.mean(0)) @ Q @ Q.T


@wrong("erasure.orth_erase", "projects out the class means, not their differences")
def _(x, z):
    means = (z.T @ x) / z.sum(0)[:, None]
    U = _basis(means.T)
    return x - (x - x.mean(0)) @ U @ U.T


@wrong("erasure.orth_erase", "returns the removed part")
def _(x, z):
    U = _basis(_sxz(x, z))
    return (x - x.mean(0)) @ U @ U.T


@wrong("erasure.orth_erase", "mean not added back")
def _(x, z):
    U = _basis(_sxz(x, z))
    c = x - x.mean(0)
    return c - c @ U @ U.T


def _leace(x, z, *, whiten=True, power=-0.5, w_inv=True, transpose=True, centre=True, pinv=True):
    mu = x.mean(0)
    xc = x - mu
    sxx = xc.T @ xc / (len(x) - 1)
    evals, V = torch.linalg.eigh(sxx)
    keep = evals > 1e-10 * evals.max() if pinv else torch.ones_like(evals, dtype=torch.bool)
    safe = torch.where(keep, evals, torch.ones_like(evals))
    W = (V * torch.where(keep, safe ** power, 0.0)) @ V.T if whiten else torch.eye(x.shape[1], dtype=x.dtype)
    Winv = (V * torch.where(keep, safe ** -power, 0.0)) @ V.T if whiten and w_inv else torch.eye(
        x.shape[1], dtype=x.dtype)
    U = _basis(W @ _sxz(x, z))
    M = Winv @ U @ U.T @ W
    base = xc if centre else x
    return x - base @ (M.T if transpose else M)


@wrong("erasure.leace_erase", "no whitening (orthogonal projection)")
def _(x, z):
    return _leace(x, z, whiten=False)


@wrong("erasure.leace_erase", "W = Sigma^-1")
def _(x, z):
    return _leace(x, z, power=-1.0)


@wrong("erasure.leace_erase", "forgets W^+")
def _(x, z):
    return _leace(x, z, w_inv=False)


@wrong("erasure.leace_erase", "no pseudo-inverse: 1/sqrt of ~0 eigenvalues")
def _(x, z):
    return _leace(x, z, pinv=False)


@wrong("erasure.leace_erase", "composition not transposed for row vectors")
def _(x, z):
    return _leace(x, z, transpose=False)


@wrong("erasure.leace_erase", "not centred")
def _(x, z):
    return _leace(x, z, centre=False)


@wrong("erasure.first_step_above", "strictly above")
def _(steps, accuracies, threshold):
    return next((s for s, a in zip(steps, accuracies) if a > threshold), None)


@wrong("erasure.first_step_above", "returns the index")
def _(steps, accuracies, threshold):
    return next((i for i, a in enumerate(accuracies) if a >= threshold), None)


@wrong("erasure.first_step_above", "the last step above")
def _(steps, accuracies, threshold):
    found = None
    for s, a in zip(steps, accuracies):
        if a >= threshold:
            found = s
    return found


@wrong("erasure.first_step_above", "-1 when never reached")
def _(steps, accuracies, threshold):
    return next((s for s, a in zip(steps, accuracies) if a >= threshold), -1)


@wrong("erasure.first_step_above", "returns the accuracy")
def _(steps, accuracies, threshold):
    return next((a for a in accuracies if a >= threshold), None)


@wrong("erasure.first_step_above", "step of the best accuracy")
def _(steps, accuracies, threshold):
    best = max(range(len(steps)), key=lambda i: accuracies[i])
    return steps[best] if accuracies[best] >= threshold else None


@wrong("erasure.first_step_above", "endless while loop (index never advanced)")
def _(steps, accuracies, threshold):
    i = 0
    while i < len(steps):
        if accuracies[i] >= threshold:
            return steps[i]
    return None


def _quad(x, labels, target_mean, target_cov, *, ddof=1, shift_only=False, pooled=False, swap=False,
          add_mean=True, cholesky=False):
    out = torch.empty_like(x)
    for c in labels.unique():
        sel = labels == c
        xs = x if pooled else x[sel]
        mu = xs.mean(0)
        xc = xs - mu
        cov = xc.T @ xc / (len(xs) - ddof)
        if cholesky:
            A = (torch.linalg.cholesky(target_cov) @ torch.linalg.inv(torch.linalg.cholesky(cov))).T
        elif shift_only:
            A = torch.eye(x.shape[1], dtype=x.dtype)
        else:
            A = gaussian_ot_map(target_cov, cov) if swap else gaussian_ot_map(cov, target_cov)
            A = A.T
        out[sel] = (target_mean if add_mean else 0) + (x[sel] - mu) @ A
    return out


@wrong("erasure.quadratic_erase", "biased class covariance")
def _(x, labels, target_mean, target_cov):
    return _quad(x, labels, target_mean, target_cov, ddof=0)


@wrong("erasure.quadratic_erase", "mean shift only")
def _(x, labels, target_mean, target_cov):
    return _quad(x, labels, target_mean, target_cov, shift_only=True)


@wrong("erasure.quadratic_erase", "the pooled moments for every class")
def _(x, labels, target_mean, target_cov):
    return _quad(x, labels, target_mean, target_cov, pooled=True)


@wrong("erasure.quadratic_erase", "map from the target to the class")
def _(x, labels, target_mean, target_cov):
    return _quad(x, labels, target_mean, target_cov, swap=True)


@wrong("erasure.quadratic_erase", "target mean not added")
def _(x, labels, target_mean, target_cov):
    return _quad(x, labels, target_mean, target_cov, add_mean=False)


@wrong("erasure.quadratic_erase", "whiten-recolour with Cholesky factors (not the OT map)")
def _(x, labels, target_mean, target_cov):
    return _quad(x, labels, target_mean, target_cov, cholesky=True)


# ============================================================================================
# 05 toolbox
# ============================================================================================
@wrong("toolbox.precision_at_k", "ascending sort: the k lowest scores")
def _(scores, relevant, k):
    top = torch.argsort(scores)[:k]
    return relevant[top].float().mean().item()


@wrong("toolbox.precision_at_k", "off by one: skips the top score")
def _(scores, relevant, k):
    top = torch.argsort(scores, descending=True)[1:k + 1]
    return relevant[top].float().mean().item()


@wrong("toolbox.precision_at_k", "recall at k, divided by the number relevant")
def _(scores, relevant, k):
    top = torch.topk(scores, k).indices
    return (relevant[top].sum() / relevant.sum()).item()


@wrong("toolbox.precision_at_k", "divided by N, not k")
def _(scores, relevant, k):
    top = torch.topk(scores, k).indices
    return (relevant[top].sum() / len(scores)).item()


@wrong("toolbox.precision_at_k", "first k examples, never ranked")
def _(scores, relevant, k):
    return relevant[:k].float().mean().item()


@wrong("toolbox.precision_at_k", "strictly above the k-th score, so k-1 counted")
def _(scores, relevant, k):
    kth = torch.topk(scores, k).values[-1]
    return (relevant[scores > kth].sum() / k).item()


@wrong("toolbox.precision_at_k", "the count, not the fraction")
def _(scores, relevant, k):
    top = torch.topk(scores, k).indices
    return float(relevant[top].sum().item())


def _fgsm_grad(model, images, labels, *, targets=None, softmax_first=False):
    x = images.clone().requires_grad_(True)
    out = model(x)
    if softmax_first:
        out = out.softmax(1)
    loss = F.cross_entropy(out, labels if targets is None else targets)
    grad, = torch.autograd.grad(loss, x)
    return grad


@wrong("toolbox.fgsm", "the adversarial images returned attached to the graph")
def _(model, images, labels, eps):
    x = images.clone().requires_grad_(True)
    F.cross_entropy(model(x), labels).backward()
    return (x + eps * x.grad.sign()).clamp(0, 1)


@wrong("toolbox.fgsm", "minus the sign: descends the loss")
def _(model, images, labels, eps):
    return (images - eps * _fgsm_grad(model, images, labels).sign()).clamp(0, 1)


@wrong("toolbox.fgsm", "no clamp to [0, 1]")
def _(model, images, labels, eps):
    return images + eps * _fgsm_grad(model, images, labels).sign()


@wrong("toolbox.fgsm", "the model's predicted labels, not the given ones")
def _(model, images, labels, eps):
    with torch.no_grad():
        pred = model(images).argmax(1)
    return (images + eps * _fgsm_grad(model, images, labels, targets=pred).sign()).clamp(0, 1)


@wrong("toolbox.fgsm", "steps the input images in place")
def _(model, images, labels, eps):
    images.requires_grad_(True)
    F.cross_entropy(model(images), labels).backward()
    with torch.no_grad():
        images += eps * images.grad.sign()
        images.clamp_(0, 1)
    images.requires_grad_(False)
    return images


@wrong("toolbox.fgsm", "L2-normalised gradient per image (FGM, not FGSM)")
def _(model, images, labels, eps):
    grad = _fgsm_grad(model, images, labels)
    norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]
    return (images + eps * grad / norm).clamp(0, 1)


@wrong("toolbox.fgsm", "eps read as 0-255 pixel units")
def _(model, images, labels, eps):
    return (images + eps / 255 * _fgsm_grad(model, images, labels).sign()).clamp(0, 1)


@wrong("toolbox.fgsm", "softmax before cross_entropy (double softmax)")
def _(model, images, labels, eps):
    return (images + eps * _fgsm_grad(model, images, labels, softmax_first=True).sign()).clamp(0, 1)


def _split_mask(flat_keep, weights):
    return [m.reshape(w.shape) for m, w in zip(flat_keep.split([w.numel() for w in weights]), weights)]


def _prune_flat(flat, k, largest=False):
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep[torch.topk(flat, k, largest=largest).indices] = False
    return keep


@wrong("toolbox.magnitude_masks", "one threshold per layer")
def _(weights, sparsity):
    return [_prune_flat(w.abs().flatten(), round(sparsity * w.numel())).reshape(w.shape) for w in weights]


@wrong("toolbox.magnitude_masks", "prunes the largest |w|")
def _(weights, sparsity):
    flat = torch.cat([w.abs().flatten() for w in weights])
    return _split_mask(_prune_flat(flat, round(sparsity * len(flat)), largest=True), weights)


@wrong("toolbox.magnitude_masks", "ranks signed w, not |w|")
def _(weights, sparsity):
    flat = torch.cat([w.flatten() for w in weights])
    return _split_mask(_prune_flat(flat, round(sparsity * len(flat))), weights)


@wrong("toolbox.magnitude_masks", "int() truncates the pruned count")
def _(weights, sparsity):
    flat = torch.cat([w.abs().flatten() for w in weights])
    return _split_mask(_prune_flat(flat, int(sparsity * len(flat))), weights)


@wrong("toolbox.magnitude_masks", "sparsity read as the fraction kept")
def _(weights, sparsity):
    flat = torch.cat([w.abs().flatten() for w in weights])
    return _split_mask(_prune_flat(flat, round((1 - sparsity) * len(flat))), weights)


@wrong("toolbox.magnitude_masks", "one flat mask, never split back")
def _(weights, sparsity):
    flat = torch.cat([w.abs().flatten() for w in weights])
    return _prune_flat(flat, round(sparsity * len(flat)))


@wrong("toolbox.magnitude_masks", "abs_() overwrites the weights")
def _(weights, sparsity):
    flat = torch.cat([w.abs_().flatten() for w in weights])
    return _split_mask(_prune_flat(flat, round(sparsity * len(flat))), weights)


@wrong("toolbox.loss_recovered", "measured from the clean end: 1 minus the answer")
def _(loss, clean, ablated):
    return (loss - clean) / (ablated - clean)


@wrong("toolbox.loss_recovered", "divided by the ablated loss")
def _(loss, clean, ablated):
    return (ablated - loss) / ablated


@wrong("toolbox.loss_recovered", "denominator reversed: clean - ablated")
def _(loss, clean, ablated):
    return (ablated - loss) / (clean - ablated)


@wrong("toolbox.loss_recovered", "clamped to [0, 1]")
def _(loss, clean, ablated):
    return ((ablated - loss) / (ablated - clean)).clamp(0, 1)


@wrong("toolbox.loss_recovered", "a ratio of losses, clean / loss")
def _(loss, clean, ablated):
    return clean / loss


@wrong("toolbox.loss_recovered", "missing brackets: ablated - loss / gap")
def _(loss, clean, ablated):
    return ablated - loss / (ablated - clean)


@wrong("toolbox.loss_recovered", "absolute gap to the ablated loss")
def _(loss, clean, ablated):
    return (ablated - loss).abs() / (ablated - clean)


@wrong("toolbox.loss_recovered", "subtracts in place from the input")
def _(loss, clean, ablated):
    loss -= ablated
    return -loss / (ablated - clean)


def _train_freq(labels, num_classes):
    return torch.bincount(labels, minlength=num_classes).double() / len(labels)


@wrong("toolbox.rock_loss", "uniform prediction: log C")
def _(train_labels, test_labels, num_classes):
    return math.log(num_classes)


@wrong("toolbox.rock_loss", "frequencies counted on the test labels")
def _(train_labels, test_labels, num_classes):
    p = _train_freq(test_labels, num_classes)
    return -p[test_labels].log().mean().item()


@wrong("toolbox.rock_loss", "log2: bits, not nats")
def _(train_labels, test_labels, num_classes):
    p = _train_freq(train_labels, num_classes)
    return -p[test_labels].log2().mean().item()


@wrong("toolbox.rock_loss", "entropy of the training frequencies, test labels unused")
def _(train_labels, test_labels, num_classes):
    p = _train_freq(train_labels, num_classes)
    return -(p * p.log()).sum().item()


@wrong("toolbox.rock_loss", "summed over the test set, not averaged")
def _(train_labels, test_labels, num_classes):
    p = _train_freq(train_labels, num_classes)
    return -p[test_labels].log().sum().item()


@wrong("toolbox.rock_loss", "frequencies fed to F.cross_entropy as logits")
def _(train_labels, test_labels, num_classes):
    p = _train_freq(train_labels, num_classes)
    return F.cross_entropy(p.expand(len(test_labels), num_classes), test_labels).item()


@wrong("toolbox.rock_loss", "add-one smoothing of the counts")
def _(train_labels, test_labels, num_classes):
    p = (torch.bincount(train_labels, minlength=num_classes).double() + 1) / (len(train_labels) + num_classes)
    return -p[test_labels].log().mean().item()


@wrong("toolbox.auroc", "integer division of the tie count (odd tie counts lose half a tie)")
def _(negatives, positives):
    gt, eq = positives[:, None] > negatives[None, :], positives[:, None] == negatives[None, :]
    return ((gt.sum() + eq.sum() // 2) / gt.numel()).item()


@wrong("toolbox.auroc", "negatives above positives")
def _(negatives, positives):
    gt, eq = negatives[:, None] > positives[None, :], negatives[:, None] == positives[None, :]
    return (gt.double() + eq.double() / 2).mean().item()


@wrong("toolbox.auroc", "ties count as wins (>=)")
def _(negatives, positives):
    return (positives[:, None] >= negatives[None, :]).double().mean().item()


@wrong("toolbox.auroc", "ties count for nothing (>)")
def _(negatives, positives):
    return (positives[:, None] > negatives[None, :]).double().mean().item()


@wrong("toolbox.auroc", "positives against the mean negative")
def _(negatives, positives):
    return (positives > negatives.mean()).double().mean().item()


@wrong("toolbox.auroc", "rank-sum without midranks for ties")
def _(negatives, positives):
    n, m = len(negatives), len(positives)
    ranks = torch.cat([negatives, positives]).argsort().argsort().double() + 1
    return ((ranks[n:].sum() - m * (m + 1) / 2) / (n * m)).item()


@wrong("toolbox.auroc", "paired element by element, not all pairs")
def _(negatives, positives):
    j = min(len(negatives), len(positives))
    neg, pos = negatives[:j], positives[:j]
    return ((pos > neg).double() + (pos == neg).double() / 2).mean().item()


# ============================================================================================
# The verdicts
# ============================================================================================
CASES = [(name, label, fn) for name, items in WRONG.items() for label, fn in items]


@functools.cache
def verdict(name: str, label: str) -> checks.Outcome:
    fn = dict(WRONG[name])[label]
    return checks.evaluate(name, fn)


def targeted(outcome: checks.Outcome) -> bool:
    """A recognised mistake, a harness finding (input changed in place, endless loop, output attached,
    global RNG moved, a sign / factor / offset / reordering of the right answer), or any diagnosis
    more specific than "values differ" with the exercise's general hint."""
    return outcome.mistake is not None or outcome.finding is not None or "values differ" not in outcome.message


def all_exercises() -> list[checks.Exercise]:
    from course_utils.exercises import NOTEBOOKS
    return [ex for topic in NOTEBOOKS.values() for ex in checks.exercises_of(topic)]


def test_at_least_five_wrong_answers_per_exercise():
    thin = {ex.name: len(WRONG.get(ex.name, [])) for ex in all_exercises() if len(WRONG.get(ex.name, [])) < 5}
    assert not thin, thin


@pytest.mark.parametrize("name,label", [(n, lab) for n, lab, _ in CASES], ids=[f"{n}:{lab}" for n, lab, _ in CASES])
def test_wrong_answer_is_rejected(name, label):
    outcome = verdict(name, label)
    assert outcome.status == "failed", outcome.line()


def test_most_rejections_are_targeted():
    bare = [f"{n}:{lab}: {verdict(n, lab).line()}" for n, lab, _ in CASES if not targeted(verdict(n, lab))]
    share = 1 - len(bare) / len(CASES)
    assert share >= 0.9, f"{share:.0%} targeted; bare:\n" + "\n".join(bare)


if __name__ == "__main__":
    rejected = sum(verdict(n, lab).status == "failed" for n, lab, _ in CASES)
    aimed = sum(verdict(n, lab).status == "failed" and targeted(verdict(n, lab)) for n, lab, _ in CASES)
    for n, lab, _ in CASES:
        o = verdict(n, lab)
        flag = "PASS!" if o.status != "failed" else ("ok   " if targeted(o) else "bare ")
        print(flag, f"{n}:{lab}", "|", o.line()[:300])
    print(f"{len(CASES)} wrong answers: {rejected / len(CASES):.1%} rejected, "
          f"{aimed / len(CASES):.1%} with a targeted message")
