"""Tests of course_utils.models: EfficientNet-Lite0, the language models and `lm_parts`.

No test needs the internet or a GPU. Tests that need an offline asset (both.png, dog.jpg, the
SmolLM2 GGUF) skip unless `$COURSE_DATA_DIR` holds it. The real language model is loaded once
per module (the first load ever dequantizes the GGUF, ~25 s; later ones read the cache).
"""
from __future__ import annotations

import dataclasses
import time
import types

import numpy as np
import pytest
import torch
from torch import nn

from course_utils import assets, models
from course_utils.config import Config
from course_utils.models import (
    LMParts,
    LMUnavailableError,
    block_output,
    classify,
    crop_imagenet,
    imagenet_classes,
    lm_parts,
    load_efficientnet,
    load_lm,
    load_photo,
    preprocess_imagenet,
    tiny_lm,
    unpreprocess,
)

FAMILIES = ["gpt2", "llama"]


@pytest.fixture(scope="module", autouse=True)
def cpu_defaults():
    """These tests compare with CPU tensors: pin the loaders' default device (`CFG.device`) to
    the CPU, so that they pass on a GPU machine too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models, "CFG", Config(requested_mode="ci", requested_device="cpu"))
        yield


def test_loaders_default_to_cfg_device(monkeypatch):
    monkeypatch.setattr(models, "CFG", Config(requested_mode="ci", requested_device="meta"))
    assert {p.device.type for p in load_efficientnet().parameters()} == {"meta"}
    assert {p.device.type for p in load_efficientnet("cpu").parameters()} == {"cpu"}
    x = preprocess_imagenet(np.zeros((40, 50, 3), dtype=np.uint8))
    assert x.device.type == "meta" and x.shape == (1, 3, 224, 224)
    assert preprocess_imagenet(np.zeros((40, 50, 3), dtype=np.uint8), "cpu").device.type == "cpu"
    monkeypatch.setattr(models, "_load_smollm2", lambda dtype: (tiny_lm("llama"), "tokenizer"))
    model, tok = load_lm("smollm2")
    assert {p.device.type for p in model.parameters()} == {"meta"} and tok == "tokenizer"
CAT_CLASSES = {"tiger cat", "tabby", "Egyptian cat"}


def require_asset(key: str) -> None:
    """Skip (with the reason) unless `$COURSE_DATA_DIR` holds the asset `key`."""
    if not any((d / key).is_file() for d in assets.data_dirs()):
        pytest.skip(f"needs the offline asset {key!r}: set COURSE_DATA_DIR to a folder that holds it")


def ids_for(model: nn.Module, batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)


# ---------------------------------------------------------------------------------------------
# tiny models and the accessor
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_lm_is_small_eager_eval_and_seeded(family):
    state = torch.random.get_rng_state()
    model = tiny_lm(family, n_layers=2, d_model=32, vocab=101, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state), "tiny_lm must not move the global RNG"
    assert not model.training
    assert model.config._attn_implementation == "eager"
    parts = lm_parts(model)
    assert isinstance(parts, LMParts)
    assert (parts.family, parts.n_layers, parts.d_model, parts.vocab_size) == (family, 2, 32, 101)
    same = tiny_lm(family, n_layers=2, d_model=32, vocab=101, seed=3)
    other = tiny_lm(family, n_layers=2, d_model=32, vocab=101, seed=4)
    ids = ids_for(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, same(ids).logits)
        assert not torch.allclose(model(ids).logits, other(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_parts_fields(family):
    model = tiny_lm(family)
    parts = lm_parts(model)
    base = model.transformer if family == "gpt2" else model.model
    assert parts.model is model
    assert parts.unembed is model.lm_head
    assert parts.blocks == list(base.h if family == "gpt2" else base.layers)
    assert parts.final_norm is (base.ln_f if family == "gpt2" else base.norm)
    assert parts.embed is (base.wte if family == "gpt2" else base.embed_tokens)
    # positions: GPT-2 learns them (wpe, added by embed_fn); Llama rotates q/k inside attention
    assert parts.pos_embed is (base.wpe if family == "gpt2" else None)
    assert (parts.n_layers, parts.d_model, parts.vocab_size) == (3, 64, 257)
    with pytest.raises(dataclasses.FrozenInstanceError):
        parts.family = "other"


@pytest.mark.parametrize("family", FAMILIES)
def test_manual_forward_through_parts_reproduces_logits(family):
    model = tiny_lm(family)
    parts = lm_parts(model)
    ids = ids_for(model, batch=3, seq=9)
    with torch.no_grad():
        expected = model(ids).logits
        h = parts.embed_fn(ids)
        kwargs = parts.block_kwargs(h)
        for block in parts.blocks:
            h = block_output(block(h, **kwargs))
        logits = parts.unembed(parts.final_norm(h))
        assert logits.shape == (3, 9, 257)
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(parts.logits_from(parts.run_blocks(parts.embed_fn(ids))), expected,
                                   atol=1e-5, rtol=0)
        # splitting the stack anywhere gives the same result
        mid = parts.run_blocks(parts.embed_fn(ids), 0, 1)
        torch.testing.assert_close(parts.logits_from(parts.run_blocks(mid, 1)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_need_the_causal_mask(family):
    """The trap block_kwargs avoids: without the mask, eager attention looks at future tokens."""
    model = tiny_lm(family)
    parts = lm_parts(model)
    ids = ids_for(model, batch=1, seq=8)
    with torch.no_grad():
        expected = model(ids).logits
        h = parts.embed_fn(ids)
        kwargs = parts.block_kwargs(h)
        kwargs["attention_mask"] = None
        for block in parts.blocks:
            h = block_output(block(h, **kwargs))
        leaky = parts.logits_from(h)
    assert not torch.allclose(leaky[:, :-1], expected[:, :-1], atol=1e-4)


def test_gpt2_positions_are_part_of_the_embedding():
    model = tiny_lm("gpt2")
    parts = lm_parts(model)
    ids = ids_for(model)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(hs[0], parts.embed_fn(ids), atol=1e-6, rtol=0)
        assert not torch.allclose(hs[0], parts.embed(ids), atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_are_block_outputs_and_the_last_is_normed(family):
    model = tiny_lm(family)
    parts = lm_parts(model)
    ids = ids_for(model)
    seen: list[torch.Tensor] = []
    handles = [b.register_forward_hook(lambda mod, args, out: seen.append(block_output(out))) for b in parts.blocks]
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        for handle in handles:
            handle.remove()
    hs = out.hidden_states
    assert len(hs) == parts.n_layers + 1 and len(seen) == parts.n_layers
    torch.testing.assert_close(hs[0], parts.embed_fn(ids), atol=1e-5, rtol=0)
    for i in range(parts.n_layers - 1):  # hidden_states[i + 1] is block i's output...
        torch.testing.assert_close(hs[i + 1], seen[i], atol=1e-5, rtol=0)
    # ...except the last one: HF applies the final norm to it. Do not apply it twice in a lens.
    with torch.no_grad():
        torch.testing.assert_close(hs[-1], parts.final_norm(seen[-1]), atol=1e-5, rtol=0)
        assert not torch.allclose(hs[-1], seen[-1], atol=1e-3)
        torch.testing.assert_close(parts.unembed(hs[-1]), out.logits, atol=1e-5, rtol=0)


def test_block_output_accepts_tensors_and_tuples():
    x = torch.randn(2, 3, 4)
    assert block_output(x) is x
    assert block_output((x, None)) is x
    assert block_output([x, torch.zeros(1)]) is x
    with pytest.raises(TypeError):
        block_output("not an output")
    with pytest.raises(TypeError):
        block_output(())


def test_lm_parts_rejects_unknown_architectures():
    with pytest.raises(TypeError, match="gpt2.*llama"):
        lm_parts(nn.Linear(2, 2))
    fake = nn.Module()
    fake.config = types.SimpleNamespace(model_type="bert")
    with pytest.raises(TypeError, match="supported families: gpt2, llama"):
        lm_parts(fake)
    with pytest.raises(TypeError, match="lm_head"):  # the base model, not the *ForCausalLM
        lm_parts(tiny_lm("gpt2").transformer)


def test_tiny_lm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="gpt2, llama"):
        tiny_lm("bert")
    with pytest.raises(ValueError, match="multiple of 8"):
        tiny_lm("llama", d_model=60)


# ---------------------------------------------------------------------------------------------
# load_lm without the real model
# ---------------------------------------------------------------------------------------------
def test_load_lm_rejects_unknown_names():
    with pytest.raises(ValueError, match="'smollm2', 'gpt2', 'auto'"):
        load_lm("gpt-5")


def _offline_hub(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise OSError("simulated: no internet")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(models, "_hub_reachable", refuse)


def test_gpt2_offline_says_to_use_smollm2(monkeypatch):
    _offline_hub(monkeypatch)
    with pytest.raises(LMUnavailableError, match='load_lm\\("smollm2"\\)') as info:
        load_lm("gpt2")
    assert isinstance(info.value, OSError)
    assert "simulated: no internet" in str(info.value)


def test_auto_falls_back_to_smollm2_with_a_note(monkeypatch, capsys):
    _offline_hub(monkeypatch)
    stand_in = tiny_lm("llama")
    stand_in.train()
    monkeypatch.setattr(models, "_load_smollm2", lambda dtype: (stand_in, "tokenizer"))
    model, tok = load_lm("auto")
    assert model is stand_in and tok == "tokenizer"
    assert not model.training, "load_lm must return eval-mode models"
    assert "SmolLM2" in capsys.readouterr().out


def test_cache_is_written_atomically(monkeypatch, tmp_path):
    """`_dequantize_gguf` writes into a temporary folder and renames; a failure leaves nothing."""
    import transformers

    class FakeTokenizer:
        def save_pretrained(self, folder):
            (folder / "tokenizer.json").write_text("{}")

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: FakeTokenizer())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_lm("llama"))
    dest = tmp_path / "derived" / "abc"
    models._dequantize_gguf(gguf, dest, "abc")
    assert models._cache_is_complete(dest)
    assert [p.name for p in dest.parent.iterdir()] == ["abc"], "no temporary folder may remain"

    class Broken(FakeTokenizer):
        def save_pretrained(self, folder):
            raise RuntimeError("disk full")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Broken())
    with pytest.raises(RuntimeError, match="disk full"):
        models._dequantize_gguf(gguf, tmp_path / "derived" / "def", "def")
    assert [p.name for p in dest.parent.iterdir()] == ["abc"]


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def effnet():
    t0 = time.perf_counter()
    model = load_efficientnet()
    print(f"\nEfficientNet-Lite0 load: {time.perf_counter() - t0:.2f} s")
    return model


def test_imagenet_classes():
    classes = imagenet_classes()
    assert len(classes) == 1000 and len(set(classes)) == 1000
    assert classes[281] == "tabby" and classes[282] == "tiger cat" and classes[285] == "Egyptian cat"
    assert classes[243] == "bull mastiff" and classes[967] == "espresso" and classes[258] == "Samoyed"
    classes.append("mutating the returned list")
    assert len(imagenet_classes()) == 1000


def test_efficientnet_is_eval_and_offline(effnet):
    assert not effnet.training
    state = effnet.state_dict()  # as shipped: 296 tensors, 4,694,073 numbers (BN statistics included)
    assert len(state) == 296 and sum(t.numel() for t in state.values()) == 4_694_073
    with torch.no_grad():
        assert effnet(torch.zeros(2, 3, 224, 224)).shape == (2, 1000)


def test_swish_is_one_relu6_called_twice(effnet):
    """The trap: `_swish` runs after the stem AND after the head; a hook on it fires twice."""
    assert isinstance(effnet._swish, nn.ReLU6)
    shapes = []
    handle = effnet._swish.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            effnet(torch.zeros(1, 3, 224, 224))
    finally:
        handle.remove()
    assert shapes == [(1, 32, 112, 112), (1, 1280, 7, 7)]


def test_preprocess_is_the_tflite_convention_and_accepts_every_input_kind():
    img = load_photo("chelsea")
    assert img.mode == "RGB" and img.size == (451, 300)
    crop = crop_imagenet(img)
    assert crop.dtype == torch.uint8 and crop.shape == (3, 224, 224)
    x = preprocess_imagenet(img)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 224, 224)
    torch.testing.assert_close(x[0], (crop.float() - 127) / 128)
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(unpreprocess(x)[0], crop)
    arr = np.asarray(img)
    chw = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    for same in (arr, chw, [img, arr], chw[None].repeat(2, 1, 1, 1), arr[None]):
        y = preprocess_imagenet(same)
        assert torch.equal(y[0], x[0]), type(same)
    assert preprocess_imagenet([img, load_photo("coffee")]).shape == (2, 3, 224, 224)
    assert crop_imagenet([img, img]).shape == (2, 3, 224, 224)


def test_preprocess_misuse_errors():
    with pytest.raises(TypeError, match="already preprocessed"):
        preprocess_imagenet(torch.rand(1, 3, 224, 224))
    with pytest.raises(TypeError, match="uint8"):
        preprocess_imagenet(np.random.rand(32, 32, 3))
    with pytest.raises(ValueError, match="channels first"):
        preprocess_imagenet(torch.zeros(32, 32, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="PIL image"):
        preprocess_imagenet("chelsea.png")


def test_load_photo_rejects_unknown_names():
    with pytest.raises(ValueError, match="chelsea, coffee, both, dog"):
        load_photo("astronaut")


def test_classify_cat_and_coffee(effnet):
    cat, coffee = classify(effnet, [load_photo("chelsea"), load_photo("coffee")], topk=5)
    assert len(cat) == 5 and all(isinstance(n, str) and isinstance(p, float) for n, p in cat)
    probs = [p for _, p in cat]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
    assert cat[0][0] in CAT_CLASSES
    assert CAT_CLASSES <= {name for name, _ in cat}
    assert coffee[0][0] == "espresso" and coffee[0][1] > 0.9
    # a preprocessed batch gives the same answer
    again = classify(effnet, preprocess_imagenet(load_photo("coffee")), topk=1)
    assert again[0][0][0] == "espresso" and abs(again[0][0][1] - coffee[0][1]) < 1e-6


def test_classify_both(effnet):
    require_asset("images/both.png")
    img = load_photo("both")
    assert img.size == (224, 224)
    top = classify(effnet, img, topk=5)[0]
    assert top[0][0] == "bull mastiff"
    assert "tiger cat" in {name for name, _ in top}


def test_classify_dog(effnet):
    require_asset("images/dog.jpg")
    assert classify(effnet, load_photo("dog"), topk=1)[0][0][0] == "Samoyed"


def test_tflite_scaling_beats_torchvision_mean_std(effnet):
    """Why preprocess_imagenet uses (x - 127) / 128: the right classes get more probability."""
    classes = imagenet_classes()
    photos = {"chelsea": CAT_CLASSES, "coffee": {"espresso"}}
    if any((d / "images/dog.jpg").is_file() for d in assets.data_dirs()):
        photos["dog"] = {"Samoyed"}
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for name, right in photos.items():
        crop = crop_imagenet(load_photo(name)).float()
        idx = [classes.index(c) for c in right]
        with torch.no_grad():
            p_tflite = effnet(preprocess_imagenet(load_photo(name))).softmax(-1)[0, idx].sum()
            p_torchvision = effnet(((crop / 255 - mean) / std)[None]).softmax(-1)[0, idx].sum()
        assert p_tflite > p_torchvision, name


# ---------------------------------------------------------------------------------------------
# The real language model (SmolLM2-135M-Instruct from the GGUF asset)
# ---------------------------------------------------------------------------------------------
EIFFEL = "The Eiffel Tower is located in the city of"


@pytest.fixture(scope="module")
def smollm2():
    require_asset(models.SMOLLM2_ASSET)
    t0 = time.perf_counter()
    model, tok = load_lm("smollm2")
    print(f"\nSmolLM2 load: {time.perf_counter() - t0:.1f} s")
    return model, tok


def test_smollm2_predicts_paris(smollm2):
    model, tok = smollm2
    assert not model.training and model.config._attn_implementation == "eager"
    ids = tok(EIFFEL, return_tensors="pt").input_ids
    with torch.no_grad():
        probs = model(ids).logits[0, -1].softmax(-1)
    top = int(probs.argmax())
    assert tok.decode([top]) == " Paris"
    assert probs[top] > 0.5


def test_smollm2_parts(smollm2):
    model, tok = smollm2
    parts = lm_parts(model)
    assert (parts.family, parts.n_layers, parts.d_model, parts.vocab_size) == ("llama", 30, 576, 49152)
    assert parts.pos_embed is None
    ids = tok(EIFFEL, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
        logits = parts.logits_from(parts.run_blocks(parts.embed_fn(ids)))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_smollm2_second_load_is_served_from_the_cache(smollm2, monkeypatch):
    model, tok = smollm2
    sha = models._smollm2_expected_sha256()
    folder = models._smollm2_cache_path(sha)
    assert folder.is_dir() and models._cache_is_complete(folder)
    assert folder.is_relative_to(assets.cache_dir() / "derived")
    assert (folder / "model.safetensors").is_file()

    def no_gguf(*args, **kwargs):
        raise AssertionError("a cached load must not touch the GGUF")

    monkeypatch.setattr(models, "_dequantize_gguf", no_gguf)
    monkeypatch.setattr(assets, "path", no_gguf)
    t0 = time.perf_counter()
    again, tok2 = load_lm("smollm2")
    print(f"\nSmolLM2 cached load: {time.perf_counter() - t0:.1f} s")
    ids = tok(EIFFEL, return_tensors="pt").input_ids
    assert torch.equal(tok2(EIFFEL, return_tensors="pt").input_ids, ids)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
