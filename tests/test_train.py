"""Tests for `course_utils.train`: determinism, checkpoints, learning, inputs, errors.

Everything runs on the CPU on small synthetic data with a tiny network, so the file takes
seconds, not minutes.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from course_utils.train import (
    Checkpoint,
    CifarNet,
    TrainConfig,
    TrainResult,
    _augment,
    accuracy,
    evaluate_checkpoints,
    log_steps,
    make_cifar_net,
    predict,
    recipe,
    train_classifier,
)

TINY = (8, 16, 16)  # block widths of the test network
FAST = dict(width=TINY, batch_size=32, lr=0.4, device="cpu", progress=False)


@pytest.fixture(autouse=True)
def no_result_cache(monkeypatch):
    """These tests train for real: a cache hit would make a determinism test pass by itself."""
    monkeypatch.setenv("COURSE_RESULT_CACHE", "0")

# Ten well-separated colours (RGB in 0..1), one per class.
PALETTE = torch.tensor([
    [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0],
    [0.0, 1.0, 1.0], [1.0, 0.5, 0.0], [0.5, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0],
])


def blobs(n: int, num_classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey noisy images `[n,3,32,32]` (float, 0..1) with a square blob whose colour is the class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    images = 0.5 + 0.1 * torch.randn(n, 3, 32, 32, generator=g)
    corner = torch.randint(2, 20, (n, 2), generator=g)
    for i in range(n):
        r, c = corner[i].tolist()
        images[i, :, r:r + 10, c:c + 10] = PALETTE[labels[i]][:, None, None]
    return images.clamp(0, 1), labels


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared, oversubscribed CPU two OpenMP threads spin-wait on each
    other and run these tiny networks several times slower (measured: 6x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"train": blobs(320, seed=0), "test": blobs(200, seed=1)}


@pytest.fixture(scope="module")
def trained(data) -> TrainResult:
    x, y = data["train"]
    return train_classifier(x, y, test=data["test"], epochs=6, **FAST)  # 10 steps/epoch, 60 steps


# --------------------------------------------------------------------------------------------
def _weights_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_same_seed_same_weights_different_seed_different(data):
    x, y = data["train"]
    kw = dict(FAST, epochs=0.5, checkpoints=None)  # 5 steps
    a = train_classifier(x, y, seed=3, **kw)
    b = train_classifier(x, y, seed=3, **kw)
    c = train_classifier(x, y, seed=4, **kw)
    assert a.steps == b.steps == 5
    assert _weights_equal(a.model, b.model)
    assert a.history == b.history
    assert not _weights_equal(a.model, c.model)
    # the seed does not leak into / depend on torch's global generator
    torch.manual_seed(123)
    d = train_classifier(x, y, seed=3, **kw)
    assert _weights_equal(a.model, d.model)


def test_log_steps():
    assert log_steps(1) == [1]
    assert log_steps(8) == [1, 2, 4, 8]
    assert log_steps(60) == [1, 2, 4, 8, 16, 32, 60]
    assert log_steps(0) == []


def test_checkpoints_are_log_spaced_and_reproducible(trained, data):
    assert trained.steps == 60
    assert trained.steps_list() == [1, 2, 4, 8, 16, 32, 60]
    assert all(isinstance(c, Checkpoint) for c in trained.checkpoints)
    assert [c.epoch for c in trained.checkpoints] == [s / 10 for s in trained.steps_list()]
    secs = [c.seconds for c in trained.checkpoints]
    assert secs == sorted(secs) and secs[-1] <= trained.seconds + 1e-6
    assert len(trained.history) == 60 and all(math.isfinite(v) for v in trained.history)
    for c in trained.checkpoints:
        assert all(t.device.type == "cpu" for t in c.state_dict.values())
        m = trained.model_at(c.step)
        assert not m.training
        assert accuracy(m, *data["test"]) == c.test_acc
    # the last checkpoint is the final model; model_at hands out fresh copies
    assert _weights_equal(trained.model_at(60), trained.model)
    assert trained.model_at(4) is not trained.model_at(4)
    assert trained.accuracies() == [c.test_acc for c in trained.checkpoints]
    with pytest.raises(KeyError, match="available steps"):
        trained.model_at(3)


def test_learns_separable_data(trained):
    assert not trained.model.training
    assert trained.accuracies()[-1] >= 0.9, trained.accuracies()
    assert trained.accuracies()[0] < 0.5  # it did start out untrained
    first, last = sum(trained.history[:5]) / 5, sum(trained.history[-5:]) / 5
    assert last < first - 0.5


def test_permuted_labels_stay_at_chance_on_held_out(data):
    x, y = data["train"]
    y_perm = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    r = train_classifier(x, y_perm, test=data["test"], epochs=6, **FAST)
    assert r.accuracies()[-1] < 0.25, r.accuracies()  # chance is 0.1


def test_explicit_checkpoints_and_save_dir(data, tmp_path):
    x, y = data["train"]
    r = train_classifier(x, y, epochs=1, checkpoints=[0, 3, 7], save_dir=tmp_path, **FAST)
    assert r.steps_list() == [0, 3, 7]
    assert r.accuracies() == [None, None, None]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["step_000000.pt", "step_000003.pt", "step_000007.pt"]
    saved = torch.load(tmp_path / "step_000003.pt")
    assert all(torch.equal(saved[k], v) for k, v in r.checkpoint(3).state_dict.items())
    # step 0 is the initial network: untrained, but its whitening layer is set and frozen
    m0 = r.model_at(0)
    assert not _weights_equal(m0, r.model)
    assert torch.equal(m0.whiten.weight, r.model.whiten.weight)
    # no checkpoints at all; model_at(last) still works
    r2 = train_classifier(x, y, epochs=1, checkpoints=None, **FAST)
    assert r2.checkpoints == [] and _weights_equal(r2.model_at(r2.steps), r2.model)
    with pytest.raises(ValueError, match="checkpoint steps must be in 0..10"):
        train_classifier(x, y, epochs=1, checkpoints=[5, 11], **FAST)


@pytest.mark.parametrize("kind,num_classes", [("uint8", 10), ("float", 2), ("float_outside", 10),
                                               ("uint8", 2)])
def test_input_kinds_and_class_counts(kind, num_classes):
    x, y = blobs(320, num_classes=num_classes, seed=5)
    xt, yt = blobs(100, num_classes=num_classes, seed=6)
    if kind == "uint8":
        x, xt = (x * 255).round().to(torch.uint8), (xt * 255).round().to(torch.uint8)
    elif kind == "float_outside":  # edited images may leave [0, 1] a little
        x, xt = x * 1.2 - 0.1, xt * 1.2 - 0.1
    r = train_classifier(x, y, test=(xt, yt), epochs=4, **FAST)
    assert r.config["num_classes"] == num_classes
    logits = predict(r.model, xt)
    assert logits.shape == (100, num_classes) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert r.accuracies()[-1] >= 0.8, (kind, num_classes, r.accuracies())


def test_predict_and_helpers(trained, data):
    xt, yt = data["test"]
    m = trained.model
    m.train()
    logits = predict(m, xt, batch_size=64)
    assert m.training  # mode restored
    m.eval()
    assert torch.allclose(logits, predict(m, xt, batch_size=1000), atol=1e-5)
    u8 = (xt * 255).round().to(torch.uint8)
    assert torch.allclose(predict(m, u8), predict(m, u8.float() / 255), atol=1e-5)
    accs = evaluate_checkpoints(trained, lambda net: accuracy(net, xt, yt), progress=False)
    assert accs == trained.accuracies()
    assert "steps=60" in repr(trained)


def test_make_cifar_net_shapes():
    torch.manual_seed(0)
    net = make_cifar_net(num_classes=7, width=4).eval()  # widths (4, 16, 16)
    x = torch.rand(5, 3, 32, 32)
    assert net(x).shape == (5, 7)
    assert net.features(x).shape == (5, 16, 3, 3)
    assert net.embed(x).shape == (5, 16)
    assert set(recipe(fast=True)) >= {"epochs", "batch_size", "width", "n_train", "n_test"}


def test_augment_is_flip_and_reflect_translate():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    none = _augment(x, torch.tensor([False, False]), torch.zeros(2, 2, dtype=torch.long), pad=2)
    assert torch.equal(none, x)
    flip = _augment(x, torch.tensor([True, False]), torch.zeros(2, 2, dtype=torch.long), pad=2)
    assert torch.equal(flip[0], x[0].flip(-1)) and torch.equal(flip[1], x[1])
    moved = _augment(x, torch.tensor([False, False]), torch.tensor([[1, -2], [0, 0]]), pad=2)
    # out[r, c] = x[r + 1, c - 2]: content moves up one row and right two columns ...
    assert torch.equal(moved[0, :, :31, 2:], x[0, :, 1:, :30])
    assert torch.equal(moved[1], x[1])
    # ... and what comes in from outside is reflected: row 32 -> 30, columns -2, -1 -> 2, 1
    assert torch.equal(moved[0, :, 31, 2:], x[0, :, 30, :30])
    assert torch.equal(moved[0, :, :31, 0], x[0, :, 1:, 2])
    assert torch.equal(moved[0, :, :31, 1], x[0, :, 1:, 1])


# --------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    x, y = blobs(64, seed=0)
    kw = dict(FAST, epochs=0.1)  # one step, were any of these to train
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\].*permute"):
        train_classifier(x.permute(0, 2, 3, 1), y, **kw)
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        train_classifier(x[:, :, :28, :28], y, **kw)
    with pytest.raises(ValueError, match=r"images\[None\]"):
        predict(make_cifar_net(10, TINY), x[0])
    with pytest.raises(ValueError, match="64 images"):
        train_classifier(x, y[:50], **kw)
    with pytest.raises(ValueError, match=r"0\.\.8 \(num_classes=9\), found 9"):
        train_classifier(x, y, num_classes=9, **kw)
    with pytest.raises(ValueError, match="found -1"):
        train_classifier(x, torch.where(y == 0, -1, y), **kw)
    with pytest.raises(TypeError, match="integer class indices"):
        train_classifier(x, y.float(), **kw)
    with pytest.raises(TypeError, match="uint8.*float"):
        train_classifier(x.long(), y, **kw)
    with pytest.raises(ValueError, match="test labels"):
        train_classifier(x, y, test=(x, torch.full_like(y, 12)), **kw)
    with pytest.raises(ValueError, match="checkpoints"):
        train_classifier(x, y, checkpoints="linear", **kw)



# --------------------------------------------------------------------------------------------
# The recipe, written out as a plain loop: train_classifier must give the same weights bit for bit
# --------------------------------------------------------------------------------------------
def reference_loop(x: torch.Tensor, y: torch.Tensor, *, epochs: float, batch_size: int, lr: float,
                   width: tuple[int, int, int], num_classes: int, seed: int,
                   keep: set[int]) -> tuple[dict[str, torch.Tensor], list[float], dict[int, dict]]:
    """What `train_classifier(augment=False, whiten=False, channels_last=False, label_smoothing=0,
    device="cpu")` does, in one function from torch and `recipe()` only: seeded init, SGD with
    Nesterov momentum and decoupled weight decay (BatchNorm biases 64x faster), the triangular
    schedule, the whitening bias frozen at 30% of the steps, a reshuffle every epoch, Lookahead
    averaging every 5 steps from 30% on. Returns the final state, the losses and the states at `keep`."""
    rec = recipe()
    n = len(x)
    per_epoch = n // batch_size
    total = math.ceil(epochs * per_epoch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CifarNet(num_classes, width, rec["bn_momentum"])
    net.train()
    decay = rec["weight_decay"] * batch_size / 1024  # per step, decoupled from the lr
    lr_bias = lr * rec["bias_lr_scale"]
    params = [(name, p) for name, p in net.named_parameters() if p.requires_grad]
    groups = [dict(params=[p for name, p in params if "norm" not in name], lr=lr, weight_decay=decay / lr),
              dict(params=[p for name, p in params if "norm" in name], lr=lr_bias, weight_decay=decay / lr_bias)]
    opt = torch.optim.SGD(groups, lr=lr, momentum=rec["momentum"], nesterov=True)
    gen = torch.Generator().manual_seed(seed)
    start, peak, end = rec["schedule"]
    top = max(1.0, peak * total)
    average, losses, states = None, [], {}
    for step in range(total):
        i = step % per_epoch
        if i == 0:
            order = torch.randperm(n, generator=gen)
            if step == 0:
                torch.rand(n, generator=gen)  # the flips: drawn even without augmentation
        if step == int(rec["whiten_bias_frac"] * total):
            net.whiten.bias.requires_grad_(False)
        f = start + (1 - start) * step / top if step < top else 1 + (end - 1) * (step - top) / max(1.0, total - top)
        for g, base in zip(opt.param_groups, (lr, lr_bias)):
            g["lr"] = base * f
        idx = order[i * batch_size:(i + 1) * batch_size]
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        done = step + 1
        if done >= int(rec["ema_start_frac"] * total) and done % 5 == 0:
            with torch.no_grad():
                state = net.state_dict()
                if average is None:
                    average = {k: v.clone() for k, v in state.items() if v.is_floating_point()}
                else:
                    rho = 0.95 ** 5 * (done / total) ** 3
                    for k, avg in average.items():
                        avg.lerp_(state[k], 1 - rho)
                        state[k].copy_(avg)
        if done in keep:
            states[done] = {k: v.clone() for k, v in net.state_dict().items()}
    return net.state_dict(), losses, states


def test_trainer_equals_the_plain_reference_loop_bitwise(data):
    x, y = data["train"]
    kw = dict(epochs=2.5, batch_size=32, lr=0.4, width=TINY, seed=7)  # 25 steps, Lookahead at 10, 15, 20, 25
    r = train_classifier(x, y, augment=False, whiten=False, channels_last=False, label_smoothing=0.0,
                         device="cpu", progress=False, checkpoints=[3, 12, 25], **kw)
    final, losses, states = reference_loop(x, y, num_classes=10, keep={3, 12, 25}, **kw)
    assert r.steps == 25 and r.steps_list() == [3, 12, 25]
    assert r.history == losses
    got = r.model.state_dict()
    assert got.keys() == final.keys()
    assert all(torch.equal(got[k], final[k]) for k in final), [k for k in final if not torch.equal(got[k], final[k])]
    for c in r.checkpoints:
        assert all(torch.equal(c.state_dict[k], v) for k, v in states[c.step].items()), c.step
    # and the reference is not trivially equal to anything: another seed differs
    other, _, _ = reference_loop(x, y, num_classes=10, keep=set(), **dict(kw, seed=8))
    assert not all(torch.equal(other[k], final[k]) for k in final)


# --------------------------------------------------------------------------------------------
# TrainConfig
# --------------------------------------------------------------------------------------------
OLD_CONFIG_KEYS = [  # the keys of the dict that TrainResult.config used to be, in order
    "mode", "n_train", "num_classes", "epochs", "batch_size", "steps_per_epoch", "total_steps", "lr",
    "lr_bias", "width", "label_smoothing", "augment", "translate", "seed", "whiten", "device", "autocast",
    "channels_last", "compile", "checkpoint_steps", "momentum", "weight_decay", "bias_lr_scale", "schedule",
    "whiten_bias_frac", "ema", "ema_start_frac", "bn_momentum",
]


def test_train_config_reads_like_the_old_dict(trained):
    cfg = trained.config
    assert isinstance(cfg, TrainConfig)
    assert list(cfg) == list(cfg.keys()) == OLD_CONFIG_KEYS and len(cfg) == len(OLD_CONFIG_KEYS)
    d = dict(cfg)
    assert d["n_train"] == 320 and d["batch_size"] == 32 and d["steps_per_epoch"] == 10 and d["total_steps"] == 60
    assert d["width"] == TINY and d["lr"] == 0.4 and d["lr_bias"] == 0.4 * d["bias_lr_scale"]
    assert d["checkpoint_steps"] == (1, 2, 4, 8, 16, 32, 60) and d["device"] == "cpu" and d["autocast"] is None
    assert d["translate"] == 2 and d["compile"] is False
    assert "width" in cfg and "nope" not in cfg and cfg.get("nope") is None
    with pytest.raises(KeyError, match="keys: mode, n_train"):
        cfg["nope"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


def test_train_config_from_recipe_defaults_and_validation():
    rec = recipe(fast=True)
    cfg = TrainConfig.from_recipe(1000, 10, fast=True, device="cpu")
    assert cfg.epochs == rec["epochs"] and cfg.batch_size == rec["batch_size"] and cfg.width == rec["width"]
    assert cfg.lr == rec["lr_per_1024"] * rec["batch_size"] / 1024 and cfg.mode == "fast"
    assert cfg.steps_per_epoch == 1000 // rec["batch_size"] and cfg.checkpoint_steps[-1] == cfg.total_steps
    assert TrainConfig.from_recipe(50, 3, batch_size=4096, width=4, checkpoints=None).batch_size == 50
    assert TrainConfig.from_recipe(50, 3, width=4, checkpoints=None).width == (4, 16, 16)
    assert TrainConfig.from_recipe(50, 3, width=4, checkpoints=[5, 0, 5], epochs=1, batch_size=10
                                   ).checkpoint_steps == (0, 5)
    assert TrainConfig.from_recipe(50, 3, device="cpu", compile=True).compile is False  # CUDA only
    bad = [
        (dict(epochs=0), "epochs must be > 0"),
        (dict(batch_size=0), r"batch_size must be in 1\.\.50"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(width=(4, 8)), "three positive ints"),
        (dict(width=0), "positive int"),
        (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
        (dict(checkpoints="linear"), 'checkpoints must be "log"'),
        (dict(checkpoints=[-1], epochs=1, batch_size=10), r"checkpoint steps must be in 0\.\.5"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            TrainConfig.from_recipe(50, 3, **kwargs)
    with pytest.raises(ValueError, match="num_classes must be >= 2, got 1"):
        TrainConfig.from_recipe(50, 1)
    # built directly, it checks the same way
    direct = dict(n_train=100, num_classes=10, epochs=1, batch_size=10, lr=0.1, width=(4, 16, 16))
    assert TrainConfig(**direct, checkpoint_steps=(10, 1, 1)).checkpoint_steps == (1, 10)
    with pytest.raises(ValueError, match=r"checkpoint steps must be in 0\.\.10 .*got \[11\]"):
        TrainConfig(**direct, checkpoint_steps=(11,))
    with pytest.raises(ValueError, match=r"batch_size must be in 1\.\.100"):
        TrainConfig(**dict(direct, batch_size=101))
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        train_classifier(*blobs(20, num_classes=1), num_classes=1, **dict(FAST, epochs=0.1))


def test_cached_training_round_trips_exactly_and_is_not_retrained(monkeypatch, tmp_path):
    """With the result cache on, the second identical call loads what the first trained: the same
    weights, checkpoints, history and config; a changed argument trains again."""
    import course_utils.train as T

    monkeypatch.setenv("COURSE_RESULT_CACHE", "1")
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path))
    calls = []
    real = T._train
    monkeypatch.setattr(T, "_train", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = blobs(128)
    first = train_classifier(x, y, epochs=1, checkpoints=[0, 2, 4], test=(x, y), **FAST)
    again = train_classifier(x, y, epochs=1, checkpoints=[0, 2, 4], test=(x, y), **FAST)
    assert len(calls) == 1
    assert again.steps_list() == first.steps_list() and again.accuracies() == first.accuracies()
    assert again.history == first.history and dict(again.config) == dict(first.config)
    for a, b in zip(first.checkpoints, again.checkpoints):
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert all(torch.equal(u, v) for u, v in zip(first.model.state_dict().values(), again.model.state_dict().values()))
    assert torch.equal(predict(first.model, x), predict(again.model, x))
    train_classifier(x, y, epochs=1, checkpoints=[0, 2, 4], test=(x, y), **{**FAST, "lr": 0.3})
    assert len(calls) == 2
    train_classifier(x, y, epochs=1, checkpoints=[0, 2, 4], test=(x, y), cache=False, **FAST)
    assert len(calls) == 3


def test_recipe_tiers():
    assert recipe(tier="ci") == recipe(fast=True) and recipe(tier="full") == recipe(fast=False)
    laptop = recipe(tier="laptop")
    assert laptop["n_train"] is None and laptop["width"] == recipe(tier="ci")["width"]
    with pytest.raises(ValueError, match="tier must be one of"):
        recipe(tier="huge")
