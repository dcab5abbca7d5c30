"""`course_utils.gradcam` against pytorch-grad-cam, its helpers, and the 01_gradcam checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from course_utils import gradcam as G
from course_utils.checks import evaluate, exercises_of
from tests.conftest import asset_or_skip

pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam import GradCAM as LibGradCAM  # noqa: E402  (test-only dependency)
from pytorch_grad_cam.utils.model_targets import (  # noqa: E402
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def effnet():
    from course_utils.models import load_efficientnet

    return G.add_head_activation(load_efficientnet())


@pytest.fixture(scope="module")
def plain_effnet():
    from course_utils.models import load_efficientnet

    return load_efficientnet()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Two real-looking inputs at 128x128 (EfficientNet is fully convolutional): cheaper than 224."""
    from course_utils.models import load_photo, preprocess_imagenet

    x = preprocess_imagenet(load_photo("chelsea"))
    x = torch.cat([x, x.flip(-1) * 0.8])
    return F.interpolate(x, size=(128, 128), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def cifar_net():
    from course_utils.train import make_cifar_net

    torch.manual_seed(0)
    net = make_cifar_net(10, width=(8, 16, 16)).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so the layers do something
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.2, 0.2)
    return net


def library_raw_cam(model, layer, x, targets) -> np.ndarray:
    """pytorch-grad-cam's cam BEFORE its resize and min-max scaling: `ReLU(sum_k mean(grad_k) A_k)`, `[B, h, w]`.

    `BaseCAM.forward` = hooks + forward + backward, then `compute_cam_per_layer`, which calls
    `get_cam_image`, clips at 0 and only then resizes (`scale_cam_image`). We run the same steps and
    stop before the resize.
    """
    cam = LibGradCAM(model=model, target_layers=[layer])
    try:
        outputs = cam.activations_and_grads(x)
        model.zero_grad()
        sum(t(o) for t, o in zip(targets, outputs)).backward(retain_graph=True)
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        raw = cam.get_cam_image(x, layer, targets, acts, grads)
        return np.maximum(raw, 0)
    finally:
        cam.activations_and_grads.release()


def no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


# --------------------------------------------------------------------------------------------
# Cross-check against pytorch-grad-cam, before its resize
# --------------------------------------------------------------------------------------------
EFF_CASES = [
    ("_head_act", [281, 285], None),                                   # tabby, Egyptian cat
    ("_head_act", [282, 243], None),                                   # tiger cat, bull mastiff
    ("_bn1", [281, 281], None),
    ("_blocks.15", [281, 999], None),
    ("_head_act", [281, 282], "softmax"),
    ("_blocks.12", None, "difference"),
]


def _targets(classes, kind, batch):
    """The same target for both libraries: (ours, pytorch-grad-cam's list of per-image callables)."""
    if kind == "softmax":
        return (lambda lg: lg.softmax(-1).gather(1, torch.tensor(classes)[:, None])[:, 0],
                [ClassifierOutputSoftmaxTarget(c) for c in classes])
    if kind == "difference":  # any differentiable score: cat logit minus dog logit
        return (lambda lg: lg[:, 281] - lg[:, 243], [lambda out: out[281] - out[243]] * batch)
    return torch.tensor(classes), [ClassifierOutputTarget(c) for c in classes]


@pytest.mark.parametrize("layer,classes,kind", EFF_CASES)
def test_matches_pytorch_grad_cam_on_efficientnet(effnet, images, layer, classes, kind):
    ours_target, lib_targets = _targets(classes, kind, len(images))
    cam = G.GradCAM(effnet, layer)(images, ours_target)
    expected = library_raw_cam(effnet, G.resolve_layer(effnet, layer), images, lib_targets)
    assert cam.raw.shape == expected.shape
    assert cam.raw.max() > 0
    np.testing.assert_allclose(cam.raw.numpy(), expected, atol=1e-5, rtol=1e-5)
    assert no_hooks(effnet)


@pytest.mark.parametrize("layer,classes", [("block3", [5, 3]), ("block2", [0, 4]), ("block1.conv2", [3, 8]),
                                           ("block2.norm2", [1, 6]), ("whiten", [7, 7])])
def test_matches_pytorch_grad_cam_on_cifar_net(cifar_net, layer, classes):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    cam = G.GradCAM(cifar_net, layer)(x, torch.tensor(classes))
    expected = library_raw_cam(cifar_net, G.resolve_layer(cifar_net, layer),
                               x, [ClassifierOutputTarget(c) for c in classes])
    assert cam.raw.max() > 0
    np.testing.assert_allclose(cam.raw.numpy(), expected, atol=1e-5, rtol=1e-5)
    # and the upsampled, normalised map is what cam_map gives
    assert cam.map.shape == (2, 32, 32)
    torch.testing.assert_close(cam.map, G.cam_map(cam.activations, cam.weights, (32, 32)))


def test_pytorch_grad_cam_on_swish_silently_explains_the_stem(plain_effnet, images):
    """The trap: `_swish` runs twice; pytorch-grad-cam keeps both calls and uses the FIRST, the stem."""
    layer = plain_effnet._swish
    cam = LibGradCAM(model=plain_effnet, target_layers=[layer])
    try:
        out = cam(images, [ClassifierOutputTarget(281)] * len(images))  # no error, no warning
        shapes = [tuple(a.shape) for a in cam.activations_and_grads.activations]
    finally:
        cam.activations_and_grads.release()
    assert shapes == [(2, 32, 64, 64), (2, 1280, 4, 4)]  # stem call, head call
    assert out.shape == (2, 128, 128)
    lib_raw = library_raw_cam(plain_effnet, layer, images, [ClassifierOutputTarget(281)] * 2)
    assert lib_raw.shape == (2, 64, 64)  # the stem's resolution: not the head it was meant to explain
    stem = G.GradCAM(plain_effnet, layer, call=0)(images, 281).raw
    head = G.GradCAM(plain_effnet, layer, call=-1)(images, 281).raw
    np.testing.assert_allclose(stem.numpy(), lib_raw, atol=1e-5, rtol=1e-5)
    assert head.shape == (2, 4, 4)
    # ours refuses to guess
    with pytest.raises(G.AmbiguousLayerError, match="ran 2 times"):
        G.GradCAM(plain_effnet, layer)(images, 281)
    assert no_hooks(plain_effnet)


def test_head_activation_module_is_the_last_swish_call(plain_effnet, effnet, images):
    with torch.no_grad():
        torch.testing.assert_close(effnet(images), plain_effnet(images))
    assert set(effnet.state_dict()) == set(plain_effnet.state_dict())
    via_swish = G.GradCAM(plain_effnet, "_swish", call=-1)(images, 281)
    via_head = G.GradCAM(effnet, effnet._head_act)(images, 281)
    torch.testing.assert_close(via_head.raw, via_swish.raw)
    calls = []
    h = effnet._swish.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    try:
        with torch.no_grad():
            effnet(images)
    finally:
        h.remove()
    assert len(calls) == 1  # only the stem now
    assert G.add_head_activation(effnet) is effnet  # idempotent


# --------------------------------------------------------------------------------------------
# Hooks and targets
# --------------------------------------------------------------------------------------------
def test_no_hook_left_even_when_it_fails(cifar_net):
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="target"):
        G.GradCAM(cifar_net, "block3")(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="classes must be in"):
        G.GradCAM(cifar_net, "block3")(x, 10)
    assert no_hooks(cifar_net)
    with pytest.raises(KeyError, match="no module named"):
        G.GradCAM(cifar_net, "block9")


def test_targets_and_training_mode(cifar_net):
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    top = G.GradCAM(cifar_net, "block2")(x)
    assert torch.equal(top.classes, top.logits.argmax(-1))
    same = G.GradCAM(cifar_net, "block2")(x, top.classes.tolist())
    torch.testing.assert_close(same.map, top.map)
    cifar_net.train()
    try:
        with pytest.raises(RuntimeError, match="eval"):
            G.GradCAM(cifar_net, "block2")(x)
    finally:
        cifar_net.eval()


def test_batched_equals_one_by_one(cifar_net):
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    classes = torch.tensor([4, 0, 4])
    batch = G.gradcam(cifar_net, x, "block2", classes)
    single = torch.cat([G.gradcam(cifar_net, x[i:i + 1], "block2", classes[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------
def test_normalise_and_box_mass():
    maps = torch.zeros(2, 4, 6)
    maps[0, 1, 2] = 3.0
    maps[0, 3, 5] = 1.0
    out = G.normalise(maps)
    assert not out.isnan().any() and out[0].max() == 1 and out[1].abs().sum() == 0
    mass = G.box_mass(maps, G.Box(x0=2, y0=0, x1=4, y1=2))
    torch.testing.assert_close(mass, torch.tensor([0.75, 0.0]))
    with pytest.raises(ValueError, match="does not fit"):
        G.box_mass(maps, (0, 0, 7, 2))


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(4)
    a = torch.randint(0, 5, (3, 60), generator=g).float()
    b = a + torch.randint(0, 3, (3, 60), generator=g)
    ours = G.spearman(a, b)
    for i in range(3):
        assert ours[i].item() == pytest.approx(stats.spearmanr(a[i], b[i]).statistic, abs=1e-12)
    torch.testing.assert_close(G.spearman(a, a.exp()), torch.ones(3, dtype=torch.float64))


def test_sobel_sees_an_edge():
    img = torch.zeros(1, 3, 8, 8)
    img[..., 4:] = 1.0
    edges = G.sobel(img)[0]
    assert edges.shape == (8, 8)
    assert edges[:, 3:5].min() == 1 and edges[:, :2].max() == 0


def test_cascade_leaves_the_model_alone(cifar_net):
    before = {k: v.clone() for k, v in cifar_net.state_dict().items()}
    groups = [("head", [cifar_net.head]), ("block3", [cifar_net.block3]), ("block2", [cifar_net.block2])]
    seen = []
    for name, net in G.cascading_randomization(cifar_net, groups, progress=False):
        seen.append((name, net.block2.conv1.weight.detach().clone()))
    assert [s for s, _ in seen] == ["trained", "head", "block3", "block2"]
    assert torch.equal(seen[0][1], seen[2][1]) and not torch.equal(seen[2][1], seen[3][1])
    for k, v in cifar_net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # seeded: the same cascade twice gives the same weights
    again = [net.block2.conv1.weight.detach().clone()
             for _, net in G.cascading_randomization(cifar_net, groups, progress=False)]
    assert torch.equal(again[-1], seen[-1][1])


def test_efficientnet_stages_cover_every_block(effnet):
    groups = G.efficientnet_stages(effnet)
    names = [n for n, _ in groups]
    assert names[:2] == ["logits", "head"] and names[-1] == "stem" and len(names) == 10
    blocks = [m for _, mods in groups for m in mods if type(m).__name__ == "MBConvBlock"]
    assert len(blocks) == len(effnet._blocks) == 16
    assert len(G.efficientnet_stages(effnet, "block")) == 19
    coarse = G.efficientnet_stages(effnet, "coarse")
    assert [n for n, _ in coarse] == ["logits", "head", "stage 7", "stages 6-5", "stages 4-3", "stages 2-1", "stem"]
    assert sum(len(m) for _, m in coarse) == sum(len(m) for _, m in groups)


def test_guided_backprop_restores_the_model(effnet, images):
    x = images[:1]
    with torch.no_grad():
        before = effnet(x)
    gb = G.guided_backprop(effnet, x, 281)
    grad = G.input_gradient(effnet, x, 281)
    assert gb.shape == grad.shape == (1, 128, 128)
    assert not torch.allclose(gb, grad)
    assert all("forward" not in m.__dict__ for m in effnet.modules())
    with torch.no_grad():
        torch.testing.assert_close(effnet(x), before)


def test_deletion_curve(cifar_net):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    sal = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(6))
    out = G.delete_most_salient(x, sal, 10, baseline=-3.0)
    assert ((out == -3.0).all(1).flatten(1).sum(1) == 10).all()
    curve = G.deletion_curve(cifar_net, x, sal, steps=4, baseline=0.0, progress=False)
    assert curve.scores.shape == (2, 5) and curve.auc.shape == (2,)
    probs = cifar_net(x).softmax(-1).max(-1).values
    torch.testing.assert_close(curve.scores[:, 0], probs.detach())
    torch.testing.assert_close(curve.auc, torch.trapezoid(curve.scores, curve.fractions, dim=-1))


def test_insertion_is_the_complement_of_deletion(cifar_net):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    sal = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(6))
    deleted, inserted = G.delete_most_salient(x, sal, 100, baseline=-3.0), G.insert_most_salient(x, sal, 100, -3.0)
    torch.testing.assert_close(deleted + inserted, x - 3.0)  # every pixel is in exactly one of the two
    assert ((inserted != -3.0).any(1).flatten(1).sum(1) == 100).all()
    curve = G.insertion_curve(cifar_net, x, sal, steps=4, baseline=0.0, progress=False)
    with torch.no_grad():
        intact = cifar_net(x).softmax(-1)
        blank = cifar_net(torch.zeros_like(x)).softmax(-1)
    cls = intact.argmax(-1)  # target=None follows the INTACT image's class, also at fraction 0
    torch.testing.assert_close(curve.scores[:, -1], intact.gather(1, cls[:, None])[:, 0])
    torch.testing.assert_close(curve.scores[:, 0], blank.gather(1, cls[:, None])[:, 0])
    with pytest.raises(ValueError, match="saliency must be"):
        G.insert_most_salient(x, sal[:1], 3)


def test_guided_backprop_through_gelu_matches_the_closed_form():
    torch.manual_seed(0)
    conv, lin = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(4 * 8 * 8, 5)
    net = torch.nn.Sequential(conv, torch.nn.GELU(), torch.nn.Flatten(), lin).eval()
    x = torch.randn(2, 3, 8, 8)
    gb = G.guided_backprop(net, x, 3)
    # by hand: dy/da = W_3 (the linear layer's row), guided: max(dy/da, 0) * GELU'(z), then through the conv
    xr = x.clone().requires_grad_(True)
    z = conv(xr)
    slope = 0.5 * (1 + torch.erf(z / 2 ** 0.5)) + z * torch.exp(-z ** 2 / 2) / (2 * torch.pi) ** 0.5
    upstream = lin.weight[3].reshape(1, 4, 8, 8).clamp_min(0) * slope
    grad, = torch.autograd.grad(z, xr, grad_outputs=upstream.detach())
    torch.testing.assert_close(gb, G.normalise(grad.abs().amax(1)))
    assert not torch.allclose(gb, G.input_gradient(net, x, 3))  # the guided rule changes the map
    assert all("forward" not in m.__dict__ for m in net.modules())


# --------------------------------------------------------------------------------------------
# The exercises: every reference passes, every known mistake is caught AND named, stubs are "todo"
# --------------------------------------------------------------------------------------------
EXERCISES = exercises_of("gradcam")


def test_seven_exercises_with_at_least_three_mistakes_each():
    assert [ex.name.split(".")[1] for ex in EXERCISES] == [
        "activations_and_gradients", "channel_weights", "cam_map", "box_mass", "spearman",
        "permute_labels", "delete_most_salient"]
    for ex in EXERCISES:
        assert len(ex.mistakes) >= 3, ex.name


@pytest.mark.parametrize("ex", EXERCISES, ids=lambda ex: ex.name)
def test_reference_passes_and_stub_is_todo(ex):
    assert evaluate(ex.name, ex.reference).passed

    def stub(*args, **kwargs):
        raise NotImplementedError("stub")

    assert evaluate(ex.name, stub).status == "todo"


MISTAKES = [(ex, m) for ex in EXERCISES for m in ex.mistakes]


@pytest.mark.parametrize("ex,m", MISTAKES, ids=[f"{ex.name}:{m.label}" for ex, m in MISTAKES])
def test_mistake_is_rejected_and_identified(ex, m):
    outcome = evaluate(ex.name, m.fn)
    assert outcome.status == "failed", outcome.line()
    assert outcome.mistake == m.label, outcome.line()
    assert m.hint in outcome.message


@pytest.mark.parametrize("label", [
    "gradients summed instead of averaged",          # channel_weights
    "the ReLU is missing",                           # cam_map
    "the ReLU applied before the weighted sum",      # cam_map
    "normalisation divides by zero on a flat map",   # cam_map
    "hook left registered",                          # activations_and_gradients
])
def test_the_issue_s_typical_mistakes_are_registered(label):
    assert label in {m.label for _, m in MISTAKES}


def test_hook_exercise_catches_a_leaky_hook_written_by_hand():
    def leaky(model, layer, x, classes):
        store = {}
        layer.register_forward_hook(lambda m, i, o: store.update(a=o))
        logits = model(x)
        grads, = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), store["a"])
        return store["a"].detach(), grads

    outcome = evaluate("gradcam.activations_and_gradients", leaky)
    assert outcome.status == "failed" and "still registered" in outcome.message


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------
def test_plots_and_explorer_run(effnet):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from course_utils.viz import gradcam as V

    img = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    maps = torch.rand(2, 16, 16)
    V.overlay_grid(img, maps, ["a", "b"], boxes={"box": (2, 2, 8, 8)})
    V.cascade_grid(img, {"Grad-CAM": list(maps), "Guided Backprop": list(maps)}, ["trained", "logits"])
    V.show_saliency([maps[0], torch.zeros(16, 16)], ["one", "flat"])
    V.plot_randomization(["trained", "logits"], {"Grad-CAM": [1.0, 0.1]}, reference={"edges": 1.0})
    fr = torch.linspace(0, 1, 3)
    V.plot_deletion({"x": G.DeletionCurve(fr, torch.rand(2, 3), torch.rand(2))})
    plt.close("all")
    asset_or_skip("images/both.png")
    widget = V.explorer(effnet, photos=["both"], topk=3)
    pick, cls, typed = widget.children[0].children
    assert widget.children[2].value.startswith("bull mastiff")
    typed.value = "tiger cat"
    assert widget.children[2].value.startswith("tiger cat")
    assert no_hooks(effnet)
