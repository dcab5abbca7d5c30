"""Grad-CAM (Selvaraju et al. 2017) and the tools to doubt it (Adebayo et al. 2018).

    from course_utils.gradcam import GradCAM, add_head_activation

    model = add_head_activation(load_efficientnet())       # the head ReLU6 gets its own module
    cam = GradCAM(model, model._head_act)(x, target="tiger cat")
    cam.map          # [B, 224, 224] in [0, 1]
    cam.raw          # [B, 7, 7]: ReLU(sum_k alpha_k A^k), before upsampling

Grad-CAM in three formulas, for a layer's activations `A: [B, K, h, w]` and a score `y^c`:

    alpha_k^c = mean_{i,j} dy^c / dA^k_ij           (channel weights, `channel_weights`)
    L^c       = ReLU(sum_k alpha_k^c A^k)            (the map, `cam_map`)
    map       = upsample(L^c) / max(upsample(L^c))   (`cam_map`, then `normalise`)

Hooks never leak: `capture` is a context manager that removes them on exit, exceptions included.

The EfficientNet-Lite trap. `model._swish` is ONE `nn.ReLU6` that `extract_features` calls twice,
after the stem (`[B, 32, 112, 112]`) and after the head (`[B, 1280, 7, 7]`). A hook on it by name
fires twice per forward pass; a library that keeps the first call silently explains the stem.
`capture` counts the calls and refuses to guess (pass `call=` to choose one), and
`add_head_activation(model)` gives the head its own ReLU6 module, `model._head_act`, so that
the layer Grad-CAM wants is one module called once.

Sanity checks and faithfulness: `spearman`, `cascading_randomization`, `efficientnet_stages`,
`sobel`, `guided_backprop`, `input_gradient`, `delete_most_salient`, `deletion_curve`,
`insert_most_salient`, `insertion_curve`.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "AmbiguousLayerError",
    "Box",
    "CAM",
    "CAT_BOX",
    "Capture",
    "DOG_BOX",
    "DeletionCurve",
    "GradCAM",
    "add_head_activation",
    "auc",
    "box_mass",
    "cam_map",
    "capture",
    "cascading_randomization",
    "channel_weights",
    "delete_most_salient",
    "deletion_curve",
    "efficientnet_stages",
    "gradcam",
    "guided_backprop",
    "input_gradient",
    "insert_most_salient",
    "insertion_curve",
    "normalise",
    "permute_labels",
    "random_saliency",
    "rank",
    "reinitialize",
    "resolve_layer",
    "sobel",
    "spearman",
    "target_scores",
]

Target = None | int | str | Sequence[int] | torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
"""What to explain: None (each image's top class), a class index or ImageNet class name, one class
per image (`[B]`), or a callable `logits [B, K] -> scores [B]` (any differentiable target)."""


# --------------------------------------------------------------------------------------------
# Layers and hooks
# --------------------------------------------------------------------------------------------
class AmbiguousLayerError(ValueError):
    """The hooked module ran more than once in one forward pass, so 'its activation' is ambiguous."""


def resolve_layer(model: nn.Module, layer: nn.Module | str) -> nn.Module:
    """`layer` as a module of `model`: a module, or its name in `model.named_modules()` (`"_blocks.15"`)."""
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError(f"the layer {type(layer).__name__} is not a submodule of this model; "
                             "pass one of model.modules(), or its name")
        return layer
    if isinstance(layer, str):
        modules = dict(model.named_modules())
        if layer not in modules:
            close = [n for n in modules if layer.split(".")[-1] in n][:8]
            raise KeyError(f"no module named {layer!r} in the model; names look like "
                           f"{close or list(modules)[1:6]} (see model.named_modules())")
        return modules[layer]
    raise TypeError(f"layer must be an nn.Module or a module name, got {type(layer).__name__}")


@dataclass
class Capture:
    """What `capture` saw: `outputs[i]` is the module's output at its i-th call in the forward pass.

    Each output is a leaf tensor that requires grad and replaces the module's real output for the
    rest of the forward pass, so `torch.autograd.grad(score, capture.activation)` is exactly
    `d score / d A`, and the backward pass stops there (nothing below the layer is differentiated).
    """

    module_name: str
    call: int | None = None
    outputs: list[torch.Tensor] = field(default_factory=list)

    def reset(self) -> None:
        """Forget the previous forward pass (call before running the model again)."""
        self.outputs.clear()

    @property
    def activation(self) -> torch.Tensor:
        """`A: [B, K, h, w]`, the output of the chosen call. Raises if it is ambiguous or missing."""
        if not self.outputs:
            raise RuntimeError(f"{self.module_name} did not run: run the model inside the `with capture(...)` block")
        if self.call is None:
            if len(self.outputs) > 1:
                shapes = ", ".join(str(list(o.shape)) for o in self.outputs)
                raise AmbiguousLayerError(
                    f"{self.module_name} ran {len(self.outputs)} times in one forward pass (outputs {shapes}): "
                    "the same module object is reused, so a hook on it sees every call. Hook a module that runs "
                    "once (for EfficientNet's head: add_head_activation(model) then model._head_act), or pass "
                    "call=i to choose the i-th call (call=-1 for the last).")
            return self.outputs[0]
        try:
            return self.outputs[self.call]
        except IndexError:
            raise IndexError(f"call={self.call} but {self.module_name} ran {len(self.outputs)} time(s)") from None


@contextmanager
def capture(model: nn.Module, layer: nn.Module | str, call: int | None = None) -> Iterator[Capture]:
    """Context manager: hook `layer`'s output for activations AND gradients; removes the hook on exit.

        with capture(model, model._head_act) as cap:
            logits = model(x)
            grads, = torch.autograd.grad(logits[:, c].sum(), cap.activation)

    `call`: which call of a reused module to keep (None: insist that it runs exactly once).
    The hook is a forward hook that swaps the output for a detached copy that requires grad (a
    new leaf), so gradients reach it even in a frozen model, and only the layers above it are
    differentiated. Why not `register_full_backward_hook`? It wraps the module's inputs and
    outputs in a `BackwardHookFunction`, which breaks on in-place operations after the module
    (`ReLU(inplace=True)`) and fires only when the module's *inputs* need grad;
    `tensor.register_hook` or `autograd.grad` on the output has neither problem.
    """
    module = resolve_layer(model, layer)
    name = next((n for n, m in model.named_modules() if m is module), type(module).__name__) or "the model"
    cap = Capture(name, call)

    if call is not None and call < -1:
        raise ValueError(f"call must be None, -1 (the last call) or a call index 0, 1, ..., got {call}")

    def hook(mod: nn.Module, inputs: tuple, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"{name} returns {type(output).__name__}, not a tensor: hook a module that outputs "
                            "a feature map [B, K, h, w]")
        k = len(cap.outputs)
        # Swap in a leaf only for the call we explain (for call=-1: every call; the last one stays
        # connected to the logits). A leaf cuts the graph below it, so no other call may get one.
        chosen = cap.call == -1 or k == (cap.call or 0)
        out = output.detach().requires_grad_(True) if chosen else output
        cap.outputs.append(out)
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield cap
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite: give the head its own activation module
# --------------------------------------------------------------------------------------------
_HEAD_CLASSES: dict[type, type] = {}


def _with_head_class(base: type) -> type:
    if base not in _HEAD_CLASSES:
        # `self: Any`: the method lives on a class built at run time from any EfficientNet-like base,
        # whose submodules (`_swish`, `_blocks`, `_head_act`, ...) pyright cannot see.
        def extract_features(self: Any, inputs: torch.Tensor) -> torch.Tensor:
            """As `EfficientNet.extract_features`, but the head calls `self._head_act`, not `self._swish`."""
            x = self._swish(self._bn0(self._conv_stem(inputs)))
            for idx, block in enumerate(self._blocks):
                rate = self._global_params.drop_connect_rate
                if rate:
                    rate *= float(idx) / len(self._blocks)
                x = block(x, drop_connect_rate=rate)
            return self._head_act(self._bn1(self._conv_head(x)))

        _HEAD_CLASSES[base] = type(f"{base.__name__}WithHeadAct", (base,), {
            "extract_features": extract_features, "__module__": __name__,
            "__doc__": f"{base.__name__} whose head activation is its own module `_head_act`."})
    return _HEAD_CLASSES[base]


def add_head_activation(model: nn.Module) -> nn.Module:
    """Give EfficientNet-Lite's head activation its own module, `model._head_act` (in place; returns `model`).

    The original calls the single module `model._swish` twice (stem and head), so a hook on it is
    ambiguous. Afterwards `model._swish` runs once (stem) and `model._head_act` (a new `ReLU6`, no
    weights) once: its output is the `[B, 1280, 7, 7]` feature map that Grad-CAM explains.
    Logits and `state_dict` keys are unchanged. Idempotent.
    """
    if hasattr(model, "_head_act"):
        return model
    for attr in ("_conv_stem", "_blocks", "_conv_head", "_bn1", "_swish", "_global_params"):
        if not hasattr(model, attr):
            raise TypeError(f"add_head_activation expects an efficientnet_lite_pytorch EfficientNet "
                            f"(from course_utils.models.load_efficientnet); this model has no {attr}")
    model._head_act = copy.deepcopy(model._swish)  # the same activation (ReLU6), a separate module
    model.__class__ = _with_head_class(type(model))
    return model


def efficientnet_stages(model: nn.Module, granularity: str = "stage") -> list[tuple[str, list[nn.Module]]]:
    """EfficientNet's layers grouped from the TOP (logits) down to the stem, for cascading randomisation.

    Returns `[("logits", [_fc]), ("head", [_conv_head, _bn1]), ..., ("stem", [_conv_stem, _bn0])]`, where the
    16 MBConv blocks in between are grouped by `granularity`: `"block"` (one group each), `"stage"` (the
    network's 7 stages: blocks that share a resolution and width) or `"coarse"` (stage 7, then stages 6-5,
    4-3 and 2-1: fewer steps, for fast mode).
    """
    if granularity not in ("block", "stage", "coarse"):
        raise ValueError(f"granularity must be 'block', 'stage' or 'coarse', got {granularity!r}")
    sub = model.get_submodule  # the registered submodule by name: `model._fc` typed as a module
    blocks = list(sub("_blocks").children())
    groups: list[tuple[str, list[nn.Module]]] = [("logits", [sub("_fc")]), ("head", [sub("_conv_head"), sub("_bn1")])]
    if granularity == "block":
        groups += [(f"block {i}", [blocks[i]]) for i in reversed(range(len(blocks)))]
    else:
        stages: list[list[nn.Module]] = []
        for b in blocks:  # a block that changes width or resolution starts a new stage
            a: Any = b._block_args  # the library's untyped BlockArgs namedtuple
            if stages and a.input_filters == a.output_filters and a.stride == 1:
                stages[-1].append(b)
            else:
                stages.append([b])
        named = [(f"stage {i + 1}", s) for i, s in reversed(list(enumerate(stages)))]
        if granularity == "coarse":
            top, rest = named[0], named[1:]
            named = [top] + [(f"stages {rest[i][0][6:]}-{rest[i + 1][0][6:]}", rest[i][1] + rest[i + 1][1])
                             if i + 1 < len(rest) else rest[i] for i in range(0, len(rest), 2)]
        groups += named
    groups.append(("stem", [sub("_conv_stem"), sub("_bn0")]))
    return groups


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------
def _class_index(name: str) -> int:
    from course_utils.models import imagenet_classes

    classes = imagenet_classes()
    if name not in classes:
        close = [c for c in classes if name.lower() in c.lower()][:6]
        raise ValueError(f"{name!r} is not an ImageNet class name"
                         + (f"; did you mean one of {close}?" if close else ""))
    return classes.index(name)


def target_scores(logits: torch.Tensor, target: Target) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The score to explain for each image, and the class index used (None for callables).

    `logits: [B, K]` -> `(scores [B], classes [B] or None)`. See `Target`.
    """
    b = logits.shape[0]
    if callable(target) and not isinstance(target, torch.Tensor):
        scores = target(logits)
        if not isinstance(scores, torch.Tensor) or scores.shape != (b,):
            raise ValueError(f"a callable target must map logits [B, K] to scores [B] = [{b}], "
                             f"got {getattr(scores, 'shape', type(scores).__name__)}")
        return scores, None
    if target is None:
        classes = logits.detach().argmax(-1)
    elif isinstance(target, str):
        classes = torch.full((b,), _class_index(target), dtype=torch.long)
    elif isinstance(target, int):
        classes = torch.full((b,), target, dtype=torch.long)
    else:
        classes = torch.as_tensor(target, dtype=torch.long).reshape(-1)
        if classes.numel() == 1:
            classes = classes.expand(b)
        if classes.shape != (b,):
            raise ValueError(f"target gives {classes.numel()} classes for a batch of {b}: "
                             "give one per image, or one for all")
    classes = classes.to(logits.device)
    if (classes < 0).any() or (classes >= logits.shape[1]).any():
        raise ValueError(f"target classes must be in 0..{logits.shape[1] - 1}, got {classes.tolist()}")
    return logits.gather(1, classes[:, None])[:, 0], classes


# --------------------------------------------------------------------------------------------
# Grad-CAM, formula by formula
# --------------------------------------------------------------------------------------------
def channel_weights(gradients: torch.Tensor) -> torch.Tensor:
    """`alpha_k = mean_{i,j} dy/dA^k_ij`: `gradients [B, K, h, w]` -> `[B, K]` (global average pooling)."""
    if gradients.dim() != 4:
        raise ValueError(f"gradients must be [B, K, h, w], got shape {list(gradients.shape)}")
    return gradients.mean(dim=(2, 3))


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Each map divided by its maximum: `[B, H, W]` -> `[B, H, W]` in [0, 1]; an all-zero map stays 0 (no NaN)."""
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))


def cam_map(activations: torch.Tensor, weights: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """The Grad-CAM map: `normalise(upsample(ReLU(sum_k weights_k A^k)))`.

    `activations: [B, K, h, w]`, `weights: [B, K]`, `size: (H, W)` (None: keep `h, w`) -> `[B, H, W]`.
    Upsampling is bilinear with `align_corners=False` (pixel centres, as in cv2.resize).
    """
    raw = F.relu(torch.einsum("bk,bkhw->bhw", weights, activations))
    if size is not None and tuple(size) != tuple(raw.shape[-2:]):
        raw = F.interpolate(raw[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return normalise(raw)


@dataclass(frozen=True)
class CAM:
    """One Grad-CAM computation. Tensors are detached, on the CPU.

    - `map: [B, H, W]`: normalised to [0, 1], at the input's size.
    - `raw: [B, h, w]`: `ReLU(sum_k alpha_k A^k)` at the layer's resolution (what pytorch-grad-cam
      computes before its resize and min-max scaling).
    - `weights: [B, K]` (alpha), `activations` / `gradients: [B, K, h, w]`, `logits: [B, classes]`,
      `scores: [B]` (the explained score), `classes: [B]` (None for a callable target).
    """

    map: torch.Tensor
    raw: torch.Tensor
    weights: torch.Tensor = field(repr=False)
    activations: torch.Tensor = field(repr=False)
    gradients: torch.Tensor = field(repr=False)
    logits: torch.Tensor = field(repr=False)
    scores: torch.Tensor = field(repr=False)
    classes: torch.Tensor | None = None


class GradCAM:
    """Grad-CAM on any layer of any model, for any target. Batched; leaves no hook behind.

        cam = GradCAM(model, "_head_act")(x, target="tiger cat")     # x: [B, 3, H, W]

    `layer`: a module or its name; it must output a feature map `[B, K, h, w]`. `call`: for a module
    that runs several times per forward pass, which call to explain (None: it must run once).
    The model must be in eval mode (BatchNorm in training mode mixes the images of a batch).
    """

    def __init__(self, model: nn.Module, layer: nn.Module | str, call: int | None = None) -> None:
        self.model = model
        self.layer = resolve_layer(model, layer)
        self.call = call

    def __call__(self, x: torch.Tensor, target: Target = None, size: tuple[int, int] | None = None) -> CAM:
        """`x: [B, C, H, W]` -> `CAM` with `map: [B, *size]` (default: the input's `H, W`)."""
        if x.dim() != 4:
            raise ValueError(f"x must be a batch [B, C, H, W], got shape {list(x.shape)}; add one with x[None]")
        if self.model.training:
            raise RuntimeError("the model is in training mode: call model.eval() first (BatchNorm and dropout)")
        with capture(self.model, self.layer, self.call) as cap, torch.enable_grad():
            logits = self.model(x)
            acts = cap.activation
            if acts.dim() != 4:
                raise ValueError(f"the layer outputs shape {list(acts.shape)}; "
                                 "Grad-CAM needs a feature map [B, K, h, w]")
            scores, classes = target_scores(logits, target)
            grads, = torch.autograd.grad(scores.sum(), acts)  # images are independent: the sum's grad is per image
        weights = channel_weights(grads)
        raw = F.relu(torch.einsum("bk,bkhw->bhw", weights, acts.detach()))
        out = cam_map(acts.detach(), weights, size or (x.shape[-2], x.shape[-1]))
        cpu = lambda t: t.detach().cpu()  # noqa: E731
        return CAM(map=cpu(out), raw=cpu(raw), weights=cpu(weights), activations=cpu(acts), gradients=cpu(grads),
                   logits=cpu(logits), scores=cpu(scores), classes=None if classes is None else cpu(classes))


def gradcam(model: nn.Module, x: torch.Tensor, layer: nn.Module | str, target: Target = None, *,
            call: int | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Grad-CAM maps in one call: `x: [B, C, H, W]` -> `[B, H, W]` in [0, 1]. See `GradCAM`."""
    return GradCAM(model, layer, call)(x, target, size).map


# --------------------------------------------------------------------------------------------
# Measuring maps: box mass, rank correlation
# --------------------------------------------------------------------------------------------
class Box(NamedTuple):
    """A rectangle in pixel coordinates, half-open: columns `x0 <= x < x1`, rows `y0 <= y < y1`."""

    x0: int
    y0: int
    x1: int
    y1: int


CAT_BOX = Box(40, 122, 200, 224)
"""The tiger cat in the 224x224 crop of `both.png` (bottom centre)."""
DOG_BOX = Box(68, 0, 172, 132)
"""The bull mastiff's head and body in the 224x224 crop of `both.png` (upper centre)."""


def box_mass(maps: torch.Tensor, box: Box | Sequence[int]) -> torch.Tensor:
    """Fraction of each map's total mass inside `box`: `maps [B, H, W]` (non-negative) -> `[B]`.

    `sum_{y0<=i<y1, x0<=j<x1} m_ij / sum_ij m_ij`; 0 for an all-zero map.
    """
    x0, y0, x1, y1 = (int(v) for v in box)
    if maps.dim() == 2:
        maps = maps[None]
    if not (0 <= x0 < x1 <= maps.shape[-1] and 0 <= y0 < y1 <= maps.shape[-2]):
        raise ValueError(f"box {tuple(box)} (x0, y0, x1, y1) does not fit maps of size "
                         f"H={maps.shape[-2]}, W={maps.shape[-1]}")
    inside = maps[:, y0:y1, x0:x1].sum(dim=(-2, -1))
    total = maps.sum(dim=(-2, -1))
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(total))


def rank(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last axis, ties given their average rank (1-based): `[..., N]` -> float64 `[..., N]`."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape, dtype=torch.float64, device=x.device)
    for r, row in enumerate(flat):
        _, inverse, counts = torch.unique(row, sorted=True, return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        out[r] = (ends - (counts.double() - 1) / 2)[inverse]  # average of ranks start..end
    return out.reshape(x.shape)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of maps: `a, b: [B, ...]` -> float64 `[B]`.

    The Pearson correlation of the ranks (ties averaged), over all entries of each map. NaN when a
    map is constant (its ranks have no variance).
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {list(a.shape)} and {list(b.shape)}")
    ra, rb = rank(a.reshape(a.shape[0], -1)), rank(b.reshape(b.shape[0], -1))
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


# --------------------------------------------------------------------------------------------
# Sanity check 1: cascading model randomisation
# --------------------------------------------------------------------------------------------
def reinitialize(module: nn.Module, seed: int) -> None:
    """Re-initialise every weight of `module` in place, at random. Seeded; the global RNG is left untouched.

    Convolutions and linear layers: He (Kaiming) normal, `N(0, 2 / fan_in)`, biases 0. BatchNorm: weight 1,
    bias 0, running mean 0, running variance 1 (the identity). He initialisation keeps the activations'
    scale through the ReLUs, so that a deeply randomised network still gives non-trivial maps. PyTorch's
    default (Kaiming-uniform with a = sqrt(5)) shrinks them about threefold per layer, and after a few
    stages every map is flat and every rank correlation undefined.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_parameters()  # weight 1, bias 0, and the running statistics


def cascading_randomization(model: nn.Module, groups: Sequence[tuple[str, Sequence[nn.Module]]], *,
                            seed: int = 0, progress: bool = True) -> Iterator[tuple[str, nn.Module]]:
    """Adebayo et al.'s cascade: yield `("trained", copy)`, then after re-initialising each group in turn
    (top first), `(group name, copy with that group and every group above it random)`.

    `groups` are modules of `model` (e.g. `efficientnet_stages(model)`); `model` itself is never
    changed: one deep copy is randomised step by step, and the SAME object is yielded each time
    (use it before the next step).
    """
    names = {id(m): n for n, m in model.named_modules()}
    missing = [g for g, mods in groups for m in mods if id(m) not in names]
    if missing:
        raise ValueError(f"groups {sorted(set(missing))} hold modules that are not in the model")
    clone = copy.deepcopy(model).eval()
    cloned = dict(clone.named_modules())
    yield "trained", clone
    for k, (group, mods) in enumerate(tqdm(groups, desc="randomising", disable=not progress)):
        for j, m in enumerate(mods):
            reinitialize(cloned[names[id(m)]], seed=seed * 1000 + k * 10 + j)
        yield group, clone


# --------------------------------------------------------------------------------------------
# Other saliency maps, for comparison
# --------------------------------------------------------------------------------------------
def sobel(images: torch.Tensor) -> torch.Tensor:
    """An edge detector that knows nothing about any model: Sobel gradient magnitude of the grey image.

    `images: [B, 3, H, W]` (any scaling) -> `[B, H, W]` normalised to [0, 1].
    """
    grey = images.float().mean(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([kx, kx.T])[:, None]  # [2, 1, 3, 3]
    g = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels.to(grey))
    return normalise(g.pow(2).sum(1).sqrt())


class _GuidedReLU(torch.autograd.Function):
    """ReLU / ReLU6 forward; backward passes only positive gradients where the input was in range."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, upper: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.upper = upper
        return x.clamp(0, upper) if upper != float("inf") else x.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, = ctx.saved_tensors
        return grad.clamp_min(0) * ((x > 0) & (x < ctx.upper)), None


class _GuidedGELU(torch.autograd.Function):
    """GELU forward; backward `GELU'(x) * max(grad, 0)`: the guided rule for a smooth activation
    (the local derivative, as for ReLU its mask, times only the positive incoming gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, approximate: str) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.approximate = approximate
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, = ctx.saved_tensors
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            slope, = torch.autograd.grad(F.gelu(xg, approximate=ctx.approximate).sum(), xg)
        return grad.clamp_min(0) * slope, None


def _guided_forward(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(m, nn.GELU):
        return lambda x: _GuidedGELU.apply(x, m.approximate)
    upper = 6.0 if isinstance(m, nn.ReLU6) else float("inf")
    return lambda x: _GuidedReLU.apply(x, upper)


@contextmanager
def _guided(model: nn.Module) -> Iterator[None]:
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6, nn.GELU))]
    if not acts:
        raise ValueError("guided backprop needs ReLU / ReLU6 / GELU modules; this model has none (swish ...)")
    for m in acts:
        # ignored: an instance attribute shadows the method on purpose; Module.__call__ passes x positionally
        m.forward = _guided_forward(m)  # pyright: ignore[reportAttributeAccessIssue]
    try:
        yield
    finally:
        for m in acts:
            del m.forward


def _input_saliency(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        scores, _ = target_scores(model(x), target)
        grad, = torch.autograd.grad(scores.sum(), x)
    return normalise(grad.abs().amax(1))


def input_gradient(model: nn.Module, x: torch.Tensor, target: Target = None) -> torch.Tensor:
    """Plain gradient saliency (Simonyan et al. 2014): `max_c |dy/dx_c|`, `x: [B, 3, H, W]` -> `[B, H, W]` in [0, 1]."""
    return _input_saliency(model, x, target)


def guided_backprop(model: nn.Module, x: torch.Tensor, target: Target = None) -> torch.Tensor:
    """Guided Backprop (Springenberg et al. 2015): the input gradient with every ReLU's backward pass
    also zeroing negative gradients. `x: [B, 3, H, W]` -> `max_c |g|`, `[B, H, W]` in [0, 1].

    The ReLU / ReLU6 modules are patched for the call and restored afterwards. Reused activation
    modules (EfficientNet's `_swish`) are covered: patching the module covers every call. GELU
    modules (the course's CIFAR net) get the same rule: their derivative times the positive part
    of the incoming gradient.
    """
    with _guided(model):
        return _input_saliency(model, x, target)


# --------------------------------------------------------------------------------------------
# Faithfulness: the deletion and insertion curves
# --------------------------------------------------------------------------------------------
def _top_k_mask(saliency: torch.Tensor, k: int) -> torch.Tensor:
    """True at each map's `k` most salient pixels (ties by position, a stable sort):
    `[B, H, W]` -> bool `[B, 1, H, W]`."""
    b, h, w = saliency.shape
    order = saliency.reshape(b, -1).argsort(dim=-1, descending=True, stable=True)
    top = torch.zeros(b, h * w, dtype=torch.bool, device=saliency.device)
    top.scatter_(1, order[:, :k], True)
    return top.reshape(b, 1, h, w)


def _check_saliency(x: torch.Tensor, saliency: torch.Tensor) -> None:
    b, _, h, w = x.shape
    if saliency.shape != (b, h, w):
        raise ValueError(f"saliency must be [B, H, W] = {[b, h, w]}, got {list(saliency.shape)}")


def delete_most_salient(x: torch.Tensor, saliency: torch.Tensor, k: int, baseline: float = 0.0) -> torch.Tensor:
    """Replace each image's `k` most salient pixels (all channels) by `baseline`.

    `x: [B, C, H, W]`, `saliency: [B, H, W]` -> `[B, C, H, W]` (a new tensor). Ties are broken
    by position (a stable sort), so the result is deterministic.
    """
    _check_saliency(x, saliency)
    return torch.where(_top_k_mask(saliency, k), torch.full_like(x, baseline), x)


def insert_most_salient(x: torch.Tensor, saliency: torch.Tensor, k: int, baseline: float = 0.0) -> torch.Tensor:
    """The opposite of `delete_most_salient`: a `baseline` image with only the `k` most salient pixels of `x`.

    `x: [B, C, H, W]`, `saliency: [B, H, W]` -> `[B, C, H, W]` (a new tensor); ties by position.
    """
    _check_saliency(x, saliency)
    return torch.where(_top_k_mask(saliency, k), x, torch.full_like(x, baseline))


def auc(fractions: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Area under a curve by the trapezoid rule: `fractions [F]`, `scores [..., F]` -> `[...]`."""
    return torch.trapezoid(scores, fractions, dim=-1)


@dataclass(frozen=True)
class DeletionCurve:
    """`scores [B, F]`: the target's probability after deleting (or, for an insertion curve,
    inserting) `fractions [F]` of the pixels; `auc [B]`."""

    fractions: torch.Tensor
    scores: torch.Tensor
    auc: torch.Tensor


def _fractions(steps: int, fractions: Sequence[float] | None) -> torch.Tensor:
    out = torch.linspace(0, 1, steps + 1) if fractions is None else torch.as_tensor(fractions, dtype=torch.float32)
    if out.dim() != 1 or (out.diff() <= 0).any() or out.min() < 0 or out.max() > 1:
        raise ValueError(f"fractions must increase strictly within [0, 1], got {out.tolist()}")
    return out


def _curve_classes(model: nn.Module, x: torch.Tensor, target: Target) -> torch.Tensor:
    """The class each curve follows: `target` per image, or each intact image's top class. `[B]`."""
    if callable(target) and not isinstance(target, torch.Tensor):
        raise ValueError("deletion and insertion curves need class targets (an int, a name, one per image or None), "
                         "not a callable")
    logits = torch.cat([model(x[i:i + 1]) for i in range(len(x))])  # the intact images, one at a time
    classes = target_scores(logits, target)[1]
    assert classes is not None, "a class target (not a callable) always gives classes"
    return classes.cpu()


@torch.no_grad()
def _perturbation_curve(model: nn.Module, x: torch.Tensor, saliency: torch.Tensor, target: Target, steps: int,
                        fractions: Sequence[float] | None, baseline: float, progress: bool,
                        perturb: Callable[..., torch.Tensor], desc: str) -> DeletionCurve:
    _check_saliency(x, saliency)
    b, _, h, w = x.shape
    fracs = _fractions(steps, fractions)
    classes = _curve_classes(model, x, target)
    jitter = torch.rand(b, h, w, generator=torch.Generator().manual_seed(0)) * 1e-6  # below any real difference
    sal = saliency.detach().cpu().double() + jitter.double()
    scores = torch.zeros(b, len(fracs))
    for i in tqdm(range(b), desc=desc, disable=not progress or b == 1):
        batch = torch.cat([perturb(x[i:i + 1], sal[i:i + 1].to(x.device), int(round(f * h * w)), baseline)
                           for f in fracs.tolist()])
        scores[i] = model(batch).softmax(-1)[:, int(classes[i])].cpu()
    return DeletionCurve(fracs, scores, auc(fracs, scores))


def deletion_curve(model: nn.Module, x: torch.Tensor, saliency: torch.Tensor, target: Target = None, *,
                   steps: int = 10, fractions: Sequence[float] | None = None, baseline: float = 0.0,
                   progress: bool = True) -> DeletionCurve:
    """Petsiuk et al.'s deletion metric: delete the most salient pixels first and watch the class probability fall.

    `x: [B, C, H, W]`, `saliency: [B, H, W]`; `steps + 1` evenly spaced fractions from 0 to 1, or the given
    increasing `fractions` (denser near 0 shows the fast early fall; the AUC uses the trapezoid rule on
    them either way). `target`: a class per
    image, one for all, or None (each intact image's top class). Lower area = the saliency found the pixels
    the model needs. `baseline` is the value of a deleted pixel (0 = mid-grey for TF-Lite inputs). Ties in
    `saliency` are broken at random (seeded) so that flat regions are not deleted top-left first.
    """
    return _perturbation_curve(model, x, saliency, target, steps, fractions, baseline, progress,
                               delete_most_salient, "deletion")


def insertion_curve(model: nn.Module, x: torch.Tensor, saliency: torch.Tensor, target: Target = None, *,
                    steps: int = 10, fractions: Sequence[float] | None = None, baseline: float = 0.0,
                    progress: bool = True) -> DeletionCurve:
    """Petsiuk et al.'s insertion metric: start from a `baseline` image, put the most salient pixels back
    first and watch the class probability rise. Higher area = the saliency found the pixels the model needs.

    Arguments as `deletion_curve` (the class followed is the intact image's, for `target=None`).
    Petsiuk et al. start from a blurred image; a flat `baseline` (0 = mid-grey for TF-Lite inputs)
    keeps the two curves symmetric.
    """
    return _perturbation_curve(model, x, saliency, target, steps, fractions, baseline, progress,
                               insert_most_salient, "insertion")


def permute_labels(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Adebayo et al.'s data randomisation: the labels shuffled across images by a seeded permutation.

    `labels: [N]` -> `[N]` (a new tensor): same class counts, no link left between an image and its label.
    """
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return labels[perm.to(labels.device)]


def random_saliency(like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A saliency map of uniform noise, shaped like `like` `[B, H, W]`: the deletion curve's control."""
    return torch.rand(like.shape, generator=torch.Generator().manual_seed(seed))
