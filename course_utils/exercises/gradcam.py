"""Exercises of 01_gradcam: hooks, channel weights, the map, box mass, rank correlation, permuted
labels, deletion. Each reference calls into `course_utils.gradcam`; each mistake is a known wrong answer."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from course_utils import gradcam as G
from course_utils.checks import Case, diagnose, exercise, mistake
from course_utils.checks import generator as _gen


# --------------------------------------------------------------------------------------------
# Small CNNs for the hook exercise
# --------------------------------------------------------------------------------------------
def tiny_cnn(seed: int = 0, width: int = 6, classes: int = 5) -> nn.Sequential:
    """A small CNN with named layers, every module called once: `[B, 3, 8, 8]` -> logits `[B, classes]`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, width, 3, padding=1)), ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(width, width, 3, padding=1)), ("relu2", nn.ReLU()),
            ("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("fc", nn.Linear(width, classes)),
        ])).eval()


class ReusedActivationCNN(nn.Module):
    """Like EfficientNet-Lite: ONE activation module `act` called twice (after `conv1` and after `conv2`).

    `[B, 3, 8, 8]` -> logits `[B, classes]`. The two calls of `act` give `[B, width, 8, 8]` and `[B, width, 4, 4]`.
    """

    def __init__(self, seed: int = 0, width: int = 4, classes: int = 5) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.conv1 = nn.Conv2d(3, width, 3, padding=1)
            self.conv2 = nn.Conv2d(width, width, 3, padding=1, stride=2)
            self.act = nn.ReLU6()
            self.fc = nn.Linear(width, classes)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


# --- 1. activations and gradients -------------------------------------------------------------
def _hook_cases() -> list[Case]:
    x = torch.randn(3, 3, 8, 8, generator=_gen(11))
    m0, m1, m2 = tiny_cnn(0), tiny_cnn(1, width=4), tiny_cnn(2)
    return [
        Case("conv2 of a small CNN, batch of 3", (m0, m0.conv2, x, torch.tensor([0, 3, 1]))),
        Case("relu1, one image", (m1, m1.relu1, x[:1], torch.tensor([2]))),
        Case("relu2, batch of 2, same class", (m2, m2.relu2, x[1:], torch.tensor([4, 4]))),
    ]


def _hooks_left(model: nn.Module) -> list[str]:
    return [n or "model" for n, m in model.named_modules()
            if m._forward_hooks or m._backward_hooks or getattr(m, "_forward_pre_hooks", None)]


def _validate_hooks(answer: Any, **_: Any) -> str | None:
    """No hook left behind, and a reused module must raise a ValueError instead of picking a call."""
    model = tiny_cnn(5)
    answer(model, model.conv2, torch.randn(2, 3, 8, 8, generator=_gen(12)), torch.tensor([1, 2]))
    left = _hooks_left(model)
    if left:
        return (f"hooks are still registered on {left} after your function returned: keep the handle that "
                f"register_forward_hook returns and call handle.remove() in a finally: block")
    reused = ReusedActivationCNN(6)
    x, classes = torch.randn(2, 3, 8, 8, generator=_gen(13)), torch.tensor([0, 4])
    try:
        got = answer(reused, reused.act, x, classes)
    except ValueError:
        left = _hooks_left(reused)
        if left:
            return (f"you raised the ValueError, but left hooks registered on {left}: remove the handle in a "
                    f"finally: block, so that it goes even when your function raises")
        return None
    acts = got[0] if isinstance(got, (tuple, list)) else got
    shapes = "[2, 4, 8, 8] and [2, 4, 4, 4]"
    if isinstance(acts, torch.Tensor) and tuple(acts.shape) == (2, 4, 8, 8):
        which = "the FIRST call's (this is what pytorch-grad-cam does with EfficientNet's _swish: the stem)"
    elif isinstance(acts, torch.Tensor) and tuple(acts.shape) == (2, 4, 4, 4):
        which = "the LAST call's"
    else:
        which = "something"
    return (f"on a model whose activation module `act` runs twice (outputs {shapes}) you silently returned "
            f"{which} activations: count the calls in your hook and raise a ValueError when there is more than one")


@exercise("gradcam.activations_and_gradients", title="Capture a layer's activations and gradients with hooks",
          hints=('You need two things from one layer: its output on the way forward and the gradient '
                 'of that output on the way back.',
                 'A forward hook keeps the output A and registers a tensor hook on it for dA; the '
                 "scalar to backprop is the sum over the batch of each image's logit at its own "
                 'class; detach both, remove the hook, refuse a layer that runs twice.'),
          cases=_hook_cases, validate=_validate_hooks,
          hint="A = the layer's output, [B, K, h, w]; dA = ∂(Σ_b logits[b, class_b]) / ∂A, the same shape; both "
               "returned detached, the model left without hooks, and an error when the layer fires more than "
               "once in a forward pass.")
def activations_and_gradients(model: nn.Module, layer: nn.Module, x: torch.Tensor,
                              classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`A = layer(...)` and `dy/dA` for `y = sum_b logits[b, classes[b]]`: both `[B, K, h, w]`, detached.

    Raises ValueError when `layer` runs more than once in the forward pass. Leaves no hook behind.
    """
    with G.capture(model, layer) as cap:
        logits = model(x)
        acts = cap.activation  # raises AmbiguousLayerError (a ValueError) for a reused module
        grads, = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), acts)
    return acts.detach(), grads


def _hooked_run(model, layer, x, classes, keep="only", score=None, leak=False):
    """A hook-based implementation with switchable mistakes (for the registered mistakes below)."""
    acts, grads = [], []

    def hook(module, inputs, output):
        acts.append(output)
        k = len(acts) - 1  # this call's index, fixed in the closure below
        output.register_hook(lambda g: grads.append((k, g)))

    handle = layer.register_forward_hook(hook)
    logits = model(x)
    if not leak:
        handle.remove()
    if keep == "only" and len(acts) > 1:
        raise ValueError("layer ran more than once")
    k = 0 if keep in ("only", "first") else len(acts) - 1
    y = (score or (lambda lg: lg.gather(1, classes[:, None]).sum()))(logits)
    y.backward()
    g = dict(grads)[k]
    return acts[k].detach(), g


def _ag(model, layer, x, select):
    store: dict[str, Any] = {"calls": 0}

    def hook(_m, _i, out):
        store["calls"] += 1
        store["A"] = out
        out.register_hook(lambda g: store.__setitem__("G", g))

    handle = layer.register_forward_hook(hook)
    try:
        logits = model(x)
        if store["calls"] > 1:
            raise ValueError("the layer ran more than once")
        select(logits).backward()
    finally:
        handle.remove()
    return store["A"].detach(), store["G"].detach()


@mistake("gradcam.activations_and_gradients", "the predicted class instead of `classes`",
         "Backprop the logit of the class you were GIVEN for each image, not the model's top class.")
def _ag_argmax(model, layer, x, classes):
    return _ag(model, layer, x, lambda lg: lg.max(1).values.sum())


@mistake("gradcam.activations_and_gradients", "the sum of every logit",
         "Only one logit per image counts: logits[b, classes[b]], summed over b.")
def _ag_all(model, layer, x, classes):
    return _ag(model, layer, x, lambda lg: lg.sum())


@mistake("gradcam.activations_and_gradients", "logits[:, classes] (every image at every class)",
         "logits[:, classes] is a [B, B] block: each image at every image's class. Pair them up with "
         "logits[range(B), classes].")
def _ag_block(model, layer, x, classes):
    return _ag(model, layer, x, lambda lg: lg[:, classes].sum())


@mistake("gradcam.activations_and_gradients", "hook left registered",
         "Keep the handle that register_forward_hook returns and call handle.remove() (in a finally: block); "
         "a forgotten hook fires on every later forward pass and keeps tensors alive.")
def _capture_leaky(model, layer, x, classes):
    return _hooked_run(model, layer, x, classes, leak=True)


@mistake("gradcam.activations_and_gradients", "silently used the first call of a reused module",
         "A module object that forward() calls twice fires its hook twice. Keeping the first call is what "
         "pytorch-grad-cam does with EfficientNet's `_swish`: it explains the stem, not the head. Count the calls "
         "and raise a ValueError when there is more than one.")
def _capture_first_call(model, layer, x, classes):
    return _hooked_run(model, layer, x, classes, keep="first")


@mistake("gradcam.activations_and_gradients", "silently used the last call of a reused module",
         "Keeping the last call happens to be right for EfficientNet's head, but only by luck of the call order. "
         "Count the calls and raise a ValueError when there is more than one.")
def _capture_last_call(model, layer, x, classes):
    return _hooked_run(model, layer, x, classes, keep="last")


@mistake("gradcam.activations_and_gradients", "gradient of the mean score over the batch",
         "Backprop the SUM of the scores, logits[range(B), classes].sum(): images in a batch are independent, so "
         "each one gets exactly its own gradient. The mean divides every gradient by B.")
def _capture_mean(model, layer, x, classes):
    return _hooked_run(model, layer, x, classes, score=lambda lg: lg.gather(1, classes[:, None]).mean())


@mistake("gradcam.activations_and_gradients", "gradient of the softmax probability instead of the logit",
         "Grad-CAM differentiates the class score before the softmax, the logit y^c. The probability's gradient "
         "also depends on every other class.")
def _capture_softmax(model, layer, x, classes):
    return _hooked_run(model, layer, x, classes, score=lambda lg: lg.softmax(-1).gather(1, classes[:, None]).sum())


@mistake("gradcam.activations_and_gradients", "gradient with respect to the module's input (grad_input)",
         "A full backward hook gives (grad_input, grad_output): grad_input is the gradient at the module's INPUT. "
         "You want the gradient at its output, the activation A: use output.register_hook in the forward hook.")
def _capture_grad_input(model, layer, x, classes):
    acts, grads = [], []
    h1 = layer.register_forward_hook(lambda m, i, o: acts.append(o.detach()))
    h2 = layer.register_full_backward_hook(lambda m, gin, gout: grads.append(gin[0]))
    try:
        model(x).gather(1, classes[:, None]).sum().backward()
    finally:
        h1.remove()
        h2.remove()
    return acts[0], grads[0]


@mistake("gradcam.activations_and_gradients", "hook not removed when the function raises",
         "Remove the handle in a finally: block, so that it goes on every path, including the ValueError you raise.")
def _capture_leak_on_raise(model, layer, x, classes):
    acts = []
    handle = layer.register_forward_hook(lambda m, i, o: acts.append(o))
    logits = model(x)
    if len(acts) > 1:
        raise ValueError("layer ran more than once")
    handle.remove()
    grads, = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), acts[0])
    return acts[0].detach(), grads


# --- 2. channel weights -----------------------------------------------------------------------
def _weights_cases() -> list[Case]:
    g = _gen(21)
    return [
        Case("batch 2, 5 channels, 3x4 map", (torch.randn(2, 5, 3, 4, generator=g),)),
        Case("one image, 1x1 map", (torch.randn(1, 3, 1, 1, generator=g),)),
        Case("batch 3, 4 channels, 7x7 map", (torch.randn(3, 4, 7, 7, generator=g) * 0.01,)),
    ]


@exercise("gradcam.channel_weights", title="Channel weights: the spatial mean of the gradients", cases=_weights_cases,
          hints=("Each channel's weight summarises its gradient map by one number per image: which "
                 'axes should disappear?',
                 'Average over the spatial axes h and w only: [B, K, h, w] -> [B, K].'),
          hint="α[b, k] = (1 / (h·w)) Σ_{y, x} dA[b, k, y, x]: [B, K, h, w] -> [B, K].")
def channel_weights(gradients: torch.Tensor) -> torch.Tensor:
    """`alpha_k = (1/hw) sum_ij dy/dA^k_ij`: `gradients [B, K, h, w]` -> `[B, K]`."""
    return G.channel_weights(gradients)


@mistake("gradcam.channel_weights", "the spatial maximum instead of the mean",
         "Grad-CAM averages the gradient over the map (global average pooling), it does not take its maximum.")
def _weights_max(gradients):
    return gradients.amax(dim=(2, 3))


@mistake("gradcam.channel_weights", "absolute gradients averaged",
         "Keep the sign: a negative mean gradient means the channel argues AGAINST the class.")
def _weights_abs(gradients):
    return gradients.abs().mean(dim=(2, 3))


@mistake("gradcam.channel_weights", "gradients summed instead of averaged",
         "Use the mean, not the sum: a sum grows with the map's size h*w, "
         "so the weights would depend on the resolution.")
def _weights_sum(gradients):
    return gradients.sum(dim=(2, 3))


@mistake("gradcam.channel_weights", "averaged over the channels instead of space",
         "dim=1 is the channel axis K; the spatial axes are dim=(2, 3). The result is one weight per channel: [B, K].")
def _weights_channels(gradients):
    return gradients.mean(dim=1)


@mistake("gradcam.channel_weights", "negative gradients clipped before averaging",
         "Grad-CAM averages the raw gradients, negative ones included; the ReLU comes later, on the weighted sum.")
def _weights_relu(gradients):
    return gradients.clamp_min(0).mean(dim=(2, 3))


@mistake("gradcam.channel_weights", "averaged over the batch as well",
         "Keep the batch axis: every image gets its own weights, [B, K].")
def _weights_batch(gradients):
    return gradients.mean(dim=(0, 2, 3))


# --- 3. the map ----------------------------------------------------------------------------
def _map_cases() -> list[Case]:
    g = _gen(31)
    flat_acts = torch.rand(1, 3, 4, 4, generator=g)
    return [
        Case("batch 2, 4 channels, 5x5 -> 20x20",
             (torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, generator=g), (20, 20))),
        Case("a flat map: every weighted sum is negative", (flat_acts, -torch.rand(1, 3, generator=g) - 0.1, (8, 8))),
        Case("batch 3, 6 channels, 7x7 -> 28x21",
             (torch.randn(3, 6, 7, 7, generator=g), torch.randn(3, 6, generator=g), (28, 21))),
        Case("every weighted sum positive: a map whose minimum is not 0",
             (torch.rand(2, 3, 4, 6, generator=g) + 0.5, torch.rand(2, 3, generator=g) + 0.1, (8, 12))),
    ]


@exercise("gradcam.cam_map", title="The map: ReLU of the weighted sum, upsampled and normalised", cases=_map_cases,
          hints=('The order matters: combine the channels, keep only the positive evidence, resize, '
                 'and scale each map on its own.',
                 'Weighted sum over k gives [B, h, w]; ReLU; bilinear upsampling '
                 'to `size` (corners not aligned); divide each map by its own maximum, leaving an '
                 'all-zero map at zero.'),
          hint="raw[b] = ReLU(Σ_k α[b, k] · A[b, k]) : [B, h, w]; up[b] = bilinear resize of raw[b] to `size` "
               "(corners not aligned) : [B, H, W]; cam[b] = up[b] / max(up[b]), and 0 where max(up[b]) = 0.")
def cam_map(activations: torch.Tensor, weights: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`normalise(upsample(ReLU(sum_k w_k A^k)))`: `A [B, K, h, w]`, `w [B, K]` -> `[B, *size]` in [0, 1]."""
    return G.cam_map(activations, weights, size)


def _up(raw: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(raw[:, None], size=tuple(size), mode=mode, **kw)[:, 0]


def _cam_variant(activations, weights, size, *, relu=True, align=False, norm=True):
    raw = torch.einsum("bk,bkhw->bhw", weights, activations)
    raw = raw.relu() if relu else raw
    up = F.interpolate(raw[:, None], size=size, mode="bilinear", align_corners=align)[:, 0]
    if not norm:
        return up
    return up / up.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]


@mistake("gradcam.cam_map", "align_corners=True",
         "Use align_corners=False, the convention of the course's reference: True stretches the map so that "
         "corner pixels align, shifting every value.")
def _cam_align(activations, weights, size):
    return _cam_variant(activations, weights, size, align=True)


@mistake("gradcam.cam_map", "not normalised",
         "The map must lie in [0, 1]: divide each map by its own maximum.")
def _cam_unnormalised(activations, weights, size):
    return _cam_variant(activations, weights, size, norm=False)


@mistake("gradcam.cam_map", "min-max normalisation",
         "Divide by the maximum only; subtracting the minimum makes a map that is positive everywhere "
         "look as if it had zero evidence somewhere.")
def _cam_minmax(activations, weights, size):
    up = _cam_variant(activations, weights, size, norm=False)
    lo, hi = up.flatten(1).amin(1)[:, None, None], up.flatten(1).amax(1)[:, None, None]
    return (up - lo) / (hi - lo).clamp(min=1e-12)


@mistake("gradcam.cam_map", "the ReLU is missing",
         "Apply F.relu to the weighted sum: Grad-CAM keeps only the regions that push the class score UP; "
         "without it, negative evidence (often another object) shows up in the map.")
def _map_no_relu(activations, weights, size):
    return G.normalise(_up(torch.einsum("bk,bkhw->bhw", weights, activations), size))


@mistake("gradcam.cam_map", "the ReLU applied before the weighted sum",
         "ReLU the weighted SUM, not each channel's term: positive and negative channel contributions must cancel "
         "first. ReLU(sum_k w_k A^k), not sum_k ReLU(w_k A^k).")
def _map_relu_first(activations, weights, size):
    return G.normalise(_up(F.relu(weights[:, :, None, None] * activations).sum(1), size))


@mistake("gradcam.cam_map", "normalisation divides by zero on a flat map",
         "When the ReLU leaves a map all zero its maximum is 0, and 0/0 is NaN. Divide only where the maximum is "
         "positive, e.g. torch.where(peak > 0, m / peak, 0).")
def _map_nan(activations, weights, size):
    raw = _up(F.relu(torch.einsum("bk,bkhw->bhw", weights, activations)), size)
    return raw / raw.amax(dim=(1, 2), keepdim=True)


@mistake("gradcam.cam_map", "one maximum for the whole batch",
         "Normalise each map by its OWN maximum: amax(dim=(1, 2), keepdim=True), not one max over the batch.")
def _map_batch_max(activations, weights, size):
    raw = _up(F.relu(torch.einsum("bk,bkhw->bhw", weights, activations)), size)
    return raw / raw.max()


@mistake("gradcam.cam_map", "upsampled before the ReLU",
         "ReLU at the layer's resolution, then upsample: interpolating first blurs negative values into the "
         "positive regions.")
def _map_upsample_first(activations, weights, size):
    return G.normalise(F.relu(_up(torch.einsum("bk,bkhw->bhw", weights, activations), size)))


@mistake("gradcam.cam_map", "nearest-neighbour upsampling",
         "Use mode='bilinear' (align_corners=False): nearest-neighbour gives blocky maps.")
def _map_nearest(activations, weights, size):
    return G.normalise(_up(F.relu(torch.einsum("bk,bkhw->bhw", weights, activations)), size, mode="nearest"))


# --- 4. box mass ------------------------------------------------------------------------------
def _box_cases() -> list[Case]:
    g = _gen(41)
    return [
        Case("batch 2 of 12x16 maps, box x 3..10, y 2..7", (torch.rand(2, 12, 16, generator=g), (3, 2, 10, 7))),
        Case("an all-zero map", (torch.zeros(1, 5, 5), (1, 1, 3, 3))),
        Case("batch 3 of 8x10 maps, the whole image", (torch.rand(3, 8, 10, generator=g), (0, 0, 10, 8))),
    ]


@exercise("gradcam.box_mass", title="How much of the map falls inside a box", cases=_box_cases,
          hints=('A share of the mass: what is inside the box over what is in the whole map, per '
                 'image. Mind which coordinate indexes rows.',
                 'x indexes columns and y rows; the box is half-open; divide the sum inside by the '
                 "map's total, and give 0 for a map whose total is 0."),
          hint="mass[b] = Σ_{y0 ≤ row < y1, x0 ≤ col < x1} maps[b, row, col] / Σ_{row, col} maps[b, row, col]: "
               "[B], and 0 for a map whose total is 0 (x: columns, y: rows).")
def box_mass(maps: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
    """Fraction of each map's mass inside `box = (x0, y0, x1, y1)` (half-open): `[B, H, W]` -> `[B]`."""
    return G.box_mass(maps, box)


@mistake("gradcam.box_mass", "divided by the whole batch's mass",
         "Each map's share is relative to THAT map's total, one total per image.")
def _box_batch_total(maps, box):
    x0, y0, x1, y1 = box
    total = maps.sum()
    inside = maps[:, y0:y1, x0:x1].sum(dim=(1, 2))
    return inside / total if total > 0 else torch.zeros_like(inside)


@mistake("gradcam.box_mass", "rows and columns swapped",
         "Images are indexed [row, column] = [y, x]: slice maps[:, y0:y1, x0:x1].")
def _box_swapped(maps, box):
    x0, y0, x1, y1 = box
    return maps[:, x0:x1, y0:y1].sum(dim=(1, 2)) / maps.sum(dim=(1, 2)).clamp_min(1e-30)


@mistake("gradcam.box_mass", "not divided by the map's total mass",
         "A fraction: divide the mass inside the box by the whole map's mass.")
def _box_unnormalised(maps, box):
    x0, y0, x1, y1 = box
    return maps[:, y0:y1, x0:x1].sum(dim=(1, 2))


@mistake("gradcam.box_mass", "mean inside the box instead of the share of the mass",
         "The mean value inside the box does not say what share of the map is there; sum inside / sum overall does.")
def _box_mean(maps, box):
    x0, y0, x1, y1 = box
    return maps[:, y0:y1, x0:x1].mean(dim=(1, 2))


@mistake("gradcam.box_mass", "the box's end included",
         "The box is half-open, like Python slices: x0 <= x < x1. Slice [y0:y1], not [y0:y1 + 1].")
def _box_inclusive(maps, box):
    x0, y0, x1, y1 = box
    return maps[:, y0:y1 + 1, x0:x1 + 1].sum(dim=(1, 2)) / maps.sum(dim=(1, 2)).clamp_min(1e-30)


@mistake("gradcam.box_mass", "division by zero on an all-zero map",
         "An all-zero map has total mass 0: return 0 there (torch.where(total > 0, inside / total, 0)), not NaN.")
def _box_nan(maps, box):
    x0, y0, x1, y1 = box
    return maps[:, y0:y1, x0:x1].sum(dim=(1, 2)) / maps.sum(dim=(1, 2))


# --- 5. Spearman rank correlation -------------------------------------------------------------
def _spearman_cases() -> list[Case]:
    g = _gen(51)
    a = torch.randn(3, 50, generator=g)
    b = a + torch.randn(3, 50, generator=g)
    ties_a = torch.randint(0, 4, (2, 40), generator=g).float()
    ties_b = (ties_a + torch.randint(0, 3, (2, 40), generator=g)).clamp(max=3)
    c = torch.rand(2, 30, generator=g)
    return [
        Case("3 pairs of noisy maps, 50 pixels", (a, b)),
        Case("2 pairs of maps with many ties (like the zeros of a ReLU)", (ties_a, ties_b)),
        Case("a monotone transform (exp) of each map", (c, c.exp() * 3)),
    ]


def _compare_float64(expected: Any, actual: Any) -> str | None:
    if isinstance(actual, torch.Tensor) and actual.is_floating_point():
        actual = actual.double()
    return diagnose(expected, actual, rtol=1e-6, atol=1e-6)


@exercise("gradcam.spearman", title="Spearman rank correlation of two maps", cases=_spearman_cases,
          hints=("Spearman's correlation is a Pearson correlation of something other than the values "
                 'themselves; think about what, and about ties.',
                 "Replace each row's values by their ranks, tied values sharing the mean of their "
                 'positions; then centre the ranks and take the cosine of the centred ranks, row by '
                 'row.'),
          compare=_compare_float64,
          hint="For each row: ρ = Σ_i (r_i − r̄)(s_i − s̄) / (‖r − r̄‖ · ‖s − s̄‖), where r and s are the ranks "
               "of that row of a and of b, and tied values all get the mean of the ranks they occupy: [B, N], "
               "[B, N] -> [B].")
def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rank correlation of each pair of rows: `a, b: [B, N]` -> `[B]`, ties given their average rank."""
    return G.spearman(a, b)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _pearson_rows(ra, rb):
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1))


@mistake("gradcam.spearman", "argsort used as the ranks",
         "argsort gives the ORDER (which index is smallest), not each value's rank; the rank of entry i is "
         "its position in that order.")
def _spearman_argsort(a, b):
    return _pearson_rows(a.argsort(1).double(), b.argsort(1).double())


@mistake("gradcam.spearman", "covariance over n - 1 but standard deviations over n",
         "Use the same normalisation in the numerator and the denominator (or none: sums and norms).")
def _spearman_bessel(a, b):
    ra, rb = G.rank(a), G.rank(b)
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    n = a.shape[1]
    return (ra * rb).sum(1) / (n - 1) / (ra.std(1, unbiased=False) * rb.std(1, unbiased=False))


@mistake("gradcam.spearman", "Pearson correlation of the values, not of their ranks",
         "Rank first: Spearman is the Pearson correlation of the RANKS, so it only cares about the order of the "
         "pixels, not their values.")
def _spearman_pearson(a, b):
    return _pearson(a, b)


@mistake("gradcam.spearman", "ties ranked by position (argsort of argsort)",
         "argsort().argsort() gives tied values different ranks, in order of position. Maps have many ties (every "
         "zero of the ReLU): give tied values the average of their ranks.")
def _spearman_ordinal(a, b):
    def ordinal(t):
        return torch.sort(torch.sort(t, dim=-1, stable=True).indices, dim=-1, stable=True).indices.double()
    return _pearson(ordinal(a), ordinal(b))


@mistake("gradcam.spearman", "ranked across the whole batch",
         "Rank every map on its own (along the last axis), not all maps of the batch together.")
def _spearman_batch_rank(a, b):
    ra = G.rank(a.reshape(1, -1)).reshape(a.shape)
    rb = G.rank(b.reshape(1, -1)).reshape(b.shape)
    return _pearson(ra, rb)


@mistake("gradcam.spearman", "ranks not centred (cosine similarity of the ranks)",
         "Subtract each row's mean rank before the dot product: without centring you compute a cosine "
         "similarity, which is close to 1 for any two rankings.")
def _spearman_uncentred(a, b):
    ra, rb = G.rank(a), G.rank(b)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


# --- 6. permuted labels -----------------------------------------------------------------------
def _no_cases() -> list[Case]:
    return []


def _validate_permutation(answer: Any, **_: Any) -> str | None:
    labels = torch.arange(10).repeat(60)[torch.randperm(600, generator=_gen(61))]
    original = labels.clone()
    out = answer(labels, 0)
    if not isinstance(out, torch.Tensor) or out.shape != labels.shape or out.dtype != torch.long:
        return f"expected a LongTensor of shape [600] (like the labels), got {type(out).__name__} " \
               f"{list(getattr(out, 'shape', []))} {getattr(out, 'dtype', '')}"
    if not torch.equal(labels, original):
        return "your function changed the labels you passed in (an in-place shuffle): return a new tensor"
    again = answer(labels.clone(), 0)
    if not torch.equal(out, again):
        return ("two calls with the same seed gave different labels: draw the permutation from "
                "torch.Generator().manual_seed(seed), not from the global random state")
    if not torch.equal(out.bincount(minlength=10), original.bincount(minlength=10)):
        return ("the class counts changed: a permutation keeps every label and only moves it to another image. "
                "New random labels would also change the class balance")
    if (out == original).float().mean() > 0.3:
        return "most labels are unchanged: shuffle the labels' order, so that image i gets the label of image perm[i]"
    if all(out[original == c].unique().numel() == 1 for c in range(10)):
        return ("every class was mapped to one other class: a fixed relabelling is still a function of the image, "
                "so the network learns it just as well. Permute the labels across images instead")
    if torch.equal(out, answer(labels.clone(), 1)):
        return "seeds 0 and 1 gave the same labels: use the seed"
    return None


@exercise("gradcam.permute_labels", title="Data randomisation: permute the training labels", cases=_no_cases,
          hints=('Shuffle which image gets which label, reproducibly from the seed, without touching '
                 'any other random numbers in the notebook.',
                 'Draw a random permutation of the indices from a local generator seeded with `seed`,'
                 ' and index a new tensor with it.'),
          validate=_validate_permutation,
          hint="out[i] = labels[π(i)] with π a uniformly random permutation of 0..N−1 that depends only on "
               "`seed` (a generator of its own, the global one untouched): [N] -> [N], the same multiset of "
               "labels.")
def permute_labels(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """The labels shuffled across images by a seeded random permutation: `[N]` -> `[N]` (a new tensor)."""
    return G.permute_labels(labels, seed)


@mistake("gradcam.permute_labels", "labels returned unchanged",
         "Shuffling images and labels together changes nothing; shuffle the labels ALONE.")
def _perm_identity(labels, seed):
    return labels.clone()


@mistake("gradcam.permute_labels", "new uniformly random labels",
         "Fresh random labels change the class balance; a permutation keeps it, so that the only thing that changes "
         "is the link between an image and its label.")
def _perm_uniform(labels, seed):
    return torch.randint(0, 10, labels.shape, generator=torch.Generator().manual_seed(seed))


@mistake("gradcam.permute_labels", "a fixed relabelling (class c -> c + 1)",
         "Mapping every class to another class is still learnable: the label remains a function of the image. "
         "Permute the labels across images.")
def _perm_shift(labels, seed):
    return (labels + 1) % 10


@mistake("gradcam.permute_labels", "the seed is ignored",
         "Use torch.Generator().manual_seed(seed) and pass generator= to torch.randperm, "
         "so that a run can be repeated.")
def _perm_unseeded(labels, seed):
    return labels[torch.randperm(len(labels))]


@mistake("gradcam.permute_labels", "shuffled in place",
         "Return a new tensor; do not write into the labels you were given (labels[:] = ...).")
def _perm_inplace(labels, seed):
    labels[:] = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]
    return labels


# --- 7. deletion ------------------------------------------------------------------------------
def _delete_cases() -> list[Case]:
    g = _gen(71)
    return [
        Case("batch 2, 3 channels, 4x5, delete 6 pixels",
             (torch.randn(2, 3, 4, 5, generator=g), torch.rand(2, 4, 5, generator=g), 6, 0.0)),
        Case("delete nothing (k = 0)",
             (torch.randn(1, 1, 3, 3, generator=g), torch.rand(1, 3, 3, generator=g), 0, 0.0)),
        Case("batch 3, 2 channels, 5x4, delete 7 with baseline -1",
             (torch.randn(3, 2, 5, 4, generator=g), torch.rand(3, 5, 4, generator=g), 7, -1.0)),
        Case("delete every pixel, baseline 0.5",
             (torch.randn(2, 3, 2, 2, generator=g), torch.rand(2, 2, 2, generator=g), 4, 0.5)),
    ]


def _validate_ties(answer: Any, **_: Any) -> str | None:
    """Tied saliency at the k-th value (Grad-CAM maps have many tied zeros): exactly k pixels go."""
    g = _gen(72)
    saliency = torch.rand(2, 4, 6, generator=g).round(decimals=1) * (torch.rand(2, 4, 6, generator=g) > 0.6)
    x = torch.rand(2, 3, 4, 6, generator=g) + 1.0
    k = int((saliency.flatten(1) > 0).sum(1).min()) + 2  # the k-th largest value is a tied 0
    out = answer(x.clone(), saliency.clone(), k, 0.0)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return None  # the cases already report this
    deleted = (out != x).all(dim=1).flatten(1)
    kth = saliency.flatten(1).topk(k, dim=1).values[:, -1:]
    for b in range(len(x)):
        n = int(deleted[b].sum())
        if n != k:
            return (f"with tied saliency values (Grad-CAM maps have many tied zeros) you deleted {n} pixels of "
                    f"image {b}, not k = {k}")
        if (saliency.flatten(1)[b][deleted[b]] < kth[b]).any():
            return f"with tied saliency values you deleted a pixel of image {b} below the k-th largest saliency"
    return None


@exercise("gradcam.delete_most_salient", title="Delete the most salient pixels", cases=_delete_cases,
          validate=_validate_ties,
          hints=('Pick exactly k pixels per image, by saliency, and set every channel of those pixels'
                 ' to the baseline, leaving x itself untouched.',
                 'Per image, take the indices of the k largest saliency values (topk over the '
                 'flattened map, so that ties cannot add pixels); build a [B, H*W] mask from them; '
                 'put the baseline wherever the mask is set, in every channel.'),
          hint="For each image b, S_b = the k pixel positions with the largest saliency (exactly k, even where "
               "values tie); out[b, c, y, x] = baseline[...] if (y, x) ∈ S_b else x[b, c, y, x], for every "
               "channel c: [B, C, H, W], x itself unchanged.")
def delete_most_salient(x: torch.Tensor, saliency: torch.Tensor, k: int, baseline: float) -> torch.Tensor:
    """Each image's `k` most salient pixels (all channels) set to `baseline`: `x [B, C, H, W]`, `saliency [B, H, W]`."""
    return G.delete_most_salient(x, saliency, k, baseline)


def _delete_with(x, idx, baseline, channels=None):
    b, c, h, w = x.shape
    mask = torch.zeros(b, h * w, dtype=torch.bool).scatter_(1, idx, True).reshape(b, 1, h, w)
    if channels is not None:
        mask = mask & (torch.arange(c) == channels).reshape(1, c, 1, 1)
    return torch.where(mask, torch.full_like(x, baseline), x)


@mistake("gradcam.delete_most_salient", "a threshold at the k-th largest value (ties delete more than k)",
         "A threshold `saliency >= kth` deletes every pixel tied with the k-th value: pick exactly k indices "
         "instead.")
def _delete_threshold(x, saliency, k, baseline):
    b, _, h, w = x.shape
    flat = saliency.flatten(1)
    if k == 0:
        return x.clone()
    mask = (flat >= flat.topk(k, dim=1).values[:, -1:]).reshape(b, 1, h, w)
    return torch.where(mask, torch.as_tensor(baseline, dtype=x.dtype), x)


@mistake("gradcam.delete_most_salient", "H and W swapped when flattening",
         "Flatten the saliency map and reshape the mask the same way, [B, H*W] <-> [B, 1, H, W], so that each "
         "index names the same pixel.")
def _delete_hw(x, saliency, k, baseline):
    b, _, h, w = x.shape
    mask = torch.zeros(b, h * w, dtype=torch.bool)
    if k:
        mask.scatter_(1, saliency.transpose(1, 2).flatten(1).topk(k, dim=1).indices, True)
    return torch.where(mask.reshape(b, 1, h, w), torch.as_tensor(baseline, dtype=x.dtype), x)


@mistake("gradcam.delete_most_salient", "x written in place",
         "Build a new tensor (torch.where or x.clone()): the caller's images must stay as they were.")
def _delete_in_place(x, saliency, k, baseline):
    b, c, h, w = x.shape
    mask = torch.zeros(b, h * w, dtype=torch.bool)
    if k:
        mask.scatter_(1, saliency.flatten(1).topk(k, dim=1).indices, True)
    x[mask.reshape(b, 1, h, w).expand(b, c, h, w)] = baseline
    return x


@mistake("gradcam.delete_most_salient", "least salient pixels deleted first",
         "Delete the MOST salient pixels: topk picks the largest values (or sort with descending=True).")
def _delete_least(x, saliency, k, baseline):
    return _delete_with(x, saliency.flatten(1).topk(k, dim=1, largest=False).indices, baseline)


@mistake("gradcam.delete_most_salient", "top-k over the whole batch instead of per image",
         "Pick k pixels in EACH image: topk along dim=1 of saliency.flatten(1), not over saliency.flatten().")
def _delete_batchwise(x, saliency, k, baseline):
    b, c, h, w = x.shape
    flat = torch.zeros(b * h * w, dtype=torch.bool)
    flat[saliency.flatten().topk(k).indices] = True
    return torch.where(flat.reshape(b, 1, h, w), torch.full_like(x, baseline), x)


@mistake("gradcam.delete_most_salient", "only the first channel deleted",
         "A pixel is all of its channels: the mask is [B, 1, H, W] and broadcasts over C.")
def _delete_one_channel(x, saliency, k, baseline):
    return _delete_with(x, saliency.flatten(1).topk(k, dim=1).indices, baseline, channels=0)


@mistake("gradcam.delete_most_salient", "the baseline is ignored (always 0)",
         "Set deleted pixels to `baseline`, which is not always 0.")
def _delete_zero(x, saliency, k, baseline):
    return _delete_with(x, saliency.flatten(1).topk(k, dim=1).indices, 0.0)


# --- hidden cases (the grader's only) -----------------------------------------------------------
# Drawn by `python -m course_utils.grade` from a seed it keeps secret, with the generator `g`: the
# learner's notebook never sees these inputs, so an answer cannot be fitted to the public cases.
# `permute_labels` has none: any seeded permutation is a right answer, so there is no single output
# to compare with; its `validate` checks the properties (counts kept, seeded, a new tensor) instead.
def _hidden_int(g: torch.Generator, low: int, high: int) -> int:
    """A random int in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=g))


def _hidden_hooks(g: torch.Generator) -> list[Case]:
    width, classes, b = _hidden_int(g, 2, 8), _hidden_int(g, 3, 8), _hidden_int(g, 2, 5)
    h, w = _hidden_int(g, 4, 11), _hidden_int(g, 4, 11)
    model = tiny_cnn(_hidden_int(g, 0, 10_000), width=width, classes=classes)
    name = ("conv1", "relu1", "conv2", "relu2")[_hidden_int(g, 0, 4)]
    x, labels = torch.randn(b, 3, h, w, generator=g), torch.randint(0, classes, (b,), generator=g)
    return [Case(f"hidden: a random small CNN, its layer {name}", (model, getattr(model, name), x, labels))]


def _hidden_weights(g: torch.Generator) -> list[Case]:
    b, k, h, w = (_hidden_int(g, 1, 6) for _ in range(4))
    scale = 0.1 + float(torch.rand(1, generator=g))
    return [Case("hidden: random gradients", (torch.randn(b, k, h, w, generator=g) * scale,))]


def _hidden_map(g: torch.Generator) -> list[Case]:
    b, k, h, w = _hidden_int(g, 2, 5), _hidden_int(g, 1, 7), _hidden_int(g, 2, 8), _hidden_int(g, 2, 8)
    size = (h * _hidden_int(g, 2, 5), w * _hidden_int(g, 2, 5) + _hidden_int(g, 0, 3))  # upsampled
    flat_b, flat_k = _hidden_int(g, 1, 4), _hidden_int(g, 1, 5)
    return [
        Case("hidden: random activations and weights",
             (torch.randn(b, k, h, w, generator=g), torch.randn(b, k, generator=g), size)),
        Case("hidden: every weighted sum negative (a flat map)",
             (torch.rand(flat_b, flat_k, h, w, generator=g), -torch.rand(flat_b, flat_k, generator=g) - 0.1, size)),
        Case("hidden: every weighted sum positive",
             (torch.rand(b, k, h, w, generator=g) + 0.5, torch.rand(b, k, generator=g) + 0.1, size)),
    ]


def _hidden_box(g: torch.Generator) -> list[Case]:
    b, h = _hidden_int(g, 3, 6), _hidden_int(g, 3, 13)
    w = h + _hidden_int(g, 1, 6)  # not square, so that rows and columns cannot be swapped unnoticed
    x0, y0 = _hidden_int(g, 0, w - 1), _hidden_int(g, 0, h - 1)
    box = (x0, y0, _hidden_int(g, x0 + 1, w + 1), _hidden_int(g, y0 + 1, h + 1))
    maps = torch.rand(b, h, w, generator=g)
    maps[_hidden_int(g, 0, b)] = 0.0  # one all-zero map in the batch
    return [Case("hidden: random maps (one all zero) and a random box", (maps, box))]


def _hidden_spearman(g: torch.Generator) -> list[Case]:
    b, n = _hidden_int(g, 2, 5), _hidden_int(g, 8, 60)
    a = torch.randn(b, n, generator=g)
    ties_a = torch.randint(0, 4, (b, n), generator=g).float()
    ties_a[:, :2] = torch.tensor([0.0, 3.0])  # no constant row (its correlation would be NaN)
    ties_b = (ties_a + torch.randint(0, 3, (b, n), generator=g)).clamp(max=3)
    return [
        Case("hidden: random noisy maps", (a, a + torch.rand(1, generator=g) * 2 * torch.randn(b, n, generator=g))),
        Case("hidden: maps with many ties", (ties_a, ties_b)),
    ]


def _hidden_delete(g: torch.Generator) -> list[Case]:
    b, c, h = _hidden_int(g, 2, 5), _hidden_int(g, 2, 4), _hidden_int(g, 2, 7)
    w = h + _hidden_int(g, 1, 4)  # not square, so that H and W cannot be swapped unnoticed
    k = _hidden_int(g, 1, h * w)
    baseline = round((0.2 + float(torch.rand(1, generator=g))) * (1 - 2 * _hidden_int(g, 0, 2)), 3)  # never 0
    return [Case(f"hidden: delete {k} of {h}x{w} pixels, baseline {baseline}",
                 (torch.randn(b, c, h, w, generator=g), torch.rand(b, h, w, generator=g), k, baseline))]


HIDDEN_CASES = {
    "gradcam.activations_and_gradients": _hidden_hooks,
    "gradcam.channel_weights": _hidden_weights,
    "gradcam.cam_map": _hidden_map,
    "gradcam.box_mass": _hidden_box,
    "gradcam.spearman": _hidden_spearman,
    "gradcam.delete_most_salient": _hidden_delete,
}
