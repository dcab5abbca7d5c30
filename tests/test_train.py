"""Tests for `course_utils.train`: determinism, checkpoints, learning, inputs, errors.

Everything runs on the CPU on small synthetic data with a tiny network, so the file takes
seconds, not minutes.
"""
from __future__ import annotations

import math

import pytest
import torch

from course_utils.train import (
    Checkpoint,
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


def test_bench_registers_sections_and_rejects_unknown_ones(capsys):
    from course_utils import bench

    assert "train" in bench.SECTIONS
    with pytest.raises(SystemExit):
        bench.main(["no-such-section"])
    assert "unknown section" in capsys.readouterr().err
