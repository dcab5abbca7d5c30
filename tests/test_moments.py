"""Tests for course_utils.moments (notebook 03): the edits, sampling, the editor, the checks' known
mistakes, and the plots. The shared Gaussian numerics (Monge map, roots, streaming moments) are
tested in test_gaussian.py."""
from __future__ import annotations

import pytest
import torch

from course_utils import moments as M


def _spd(d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, d + 3, generator=g, dtype=torch.float64)
    return scale * (x @ x.T / (d + 3) + 0.05 * torch.eye(d, dtype=torch.float64))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------
# The edits (the Monge map, roots and streaming moments are tested in test_gaussian.py)
# --------------------------------------------------------------------------------------------
def test_moments_reexports_the_shared_gaussian_numerics() -> None:
    from course_utils import gaussian as G

    for name in ["ClassMoments", "MomentFitter", "fit_class_moments", "sqrtm_psd", "inv_sqrtm_psd", "monge_map",
                 "monge_maps", "class_roots", "gaussian_edit", "pixels", "MATRIX_ROOT_METHODS", "NEWTON_TOL"]:
        assert getattr(M, name) is getattr(G, name), name
        assert name in M.__all__, name


def test_edited_samples_have_the_target_moments() -> None:
    g = torch.Generator().manual_seed(0)
    d, n = 6, 400
    xs = M.sample_gaussian(torch.rand(d, dtype=torch.float64), _spd(d, 11), n, g)
    xt = M.sample_gaussian(torch.rand(d, dtype=torch.float64) + 1, _spd(d, 12, 4.0), n, g)
    mu_s, cov_s = xs.mean(0), torch.cov(xs.T)
    mu_t, cov_t = xt.mean(0), torch.cov(xt.T)
    edited = M.gaussian_edit(xs, mu_s, mu_t, M.monge_map(cov_s, cov_t))
    assert torch.allclose(edited.mean(0), mu_t, atol=1e-10)
    assert _rel(torch.cov(edited.T), cov_t) < 1e-10
    shifted = M.mean_shift(xs, mu_s, mu_t, clamp=False)
    assert torch.allclose(shifted.mean(0), mu_t, atol=1e-10)
    assert _rel(torch.cov(shifted.T), cov_s) < 1e-10      # a mean shift keeps the source covariance


# --------------------------------------------------------------------------------------------
# Sampling, quantiles, PSNR
# --------------------------------------------------------------------------------------------
def test_sample_gaussian_moments() -> None:
    g = torch.Generator().manual_seed(2)
    mean, cov = torch.tensor([0.2, -1.0, 3.0], dtype=torch.float64), _spd(3, 5)
    x = M.sample_gaussian(mean, cov, 20000, g)
    assert x.shape == (20000, 3) and x.dtype == torch.float64
    assert torch.allclose(x.mean(0), mean, atol=0.03)
    assert _rel(torch.cov(x.T), cov) < 0.05
    assert M.sample_gaussian(mean.float(), cov.float(), 4, g).dtype == torch.float32


def test_quantile_edit_moves_marginals() -> None:
    g = torch.Generator().manual_seed(3)
    xs = torch.rand(4000, 3, generator=g)                     # uniform on [0, 1]
    xt = torch.randn(4000, 3, generator=g) * 0.1 + 0.5        # a narrow bell
    q = M.ClassQuantiles.fit(torch.cat([xs, xt]), torch.tensor([0] * 4000 + [1] * 4000), 2, q=101)
    out = M.quantile_edit(xs, q.values[0], q.values[1], q.levels)
    assert torch.allclose(out.mean(0), xt.mean(0), atol=0.01)
    assert torch.allclose(out.std(0), xt.std(0), atol=0.01)
    assert torch.all(out.argsort(0) == xs.argsort(0))         # monotone: the order of values is kept


def test_psnr() -> None:
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.1
    y[1] += 0.01
    assert torch.allclose(M.psnr(x, y), torch.tensor([20.0, 40.0]), atol=1e-4)


def test_pixels_and_apply_delta() -> None:
    g = torch.Generator().manual_seed(4)
    imgs = (torch.rand(3, 3, 8, 8, generator=g) * 255).to(torch.uint8)
    full = M.pixels(imgs)
    assert full.shape == (3, 192) and torch.allclose(full, imgs.float().reshape(3, -1) / 255)
    low = M.pixels(imgs, 4)
    assert low.shape == (3, 48)
    after = low + 0.05 * torch.randn(3, 48, generator=g)
    out = M.apply_delta(imgs, low, after, clamp=False)
    assert torch.allclose(M.pixels(out, 4), after, atol=1e-6)     # the low-res moments are set exactly
    assert torch.allclose(out - imgs.float() / 255, M.to_images(after - low, 8, clamp=False), atol=1e-6)
    with pytest.raises(ValueError, match="resolution"):
        M.pixels(imgs, 3)


# --------------------------------------------------------------------------------------------
# The editor
# --------------------------------------------------------------------------------------------
def _toy_images(n_per_class: int = 120, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c in range(3):
        base = 0.3 + 0.2 * c + 0.05 * torch.randn(1, 3, 8, 8, generator=g)
        images.append((base + (0.02 + 0.02 * c) * torch.randn(n_per_class, 3, 8, 8, generator=g)).clamp(0, 1))
        labels.append(torch.full((n_per_class,), c))
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("resolution", [8, 4])
def test_gaussian_editor(resolution: int) -> None:
    images, labels = _toy_images()
    ed = M.GaussianEditor.fit(images, labels, num_classes=3, resolution=resolution, ridge=1e-6,
                              device="cpu", progress=False)
    assert len(ed.pairs) == 6 and ed.maps.shape == (6, 3 * resolution ** 2, 3 * resolution ** 2)
    assert torch.equal(ed.map(1, 1), torch.eye(3 * resolution ** 2))
    src = images[labels == 0]
    edited = ed.edit(src, 0, 2)
    assert edited.shape == src.shape and edited.min() >= 0 and edited.max() <= 1
    v = M.pixels(edited, resolution).double()
    assert torch.allclose(v.mean(0), ed.moments.means[2], atol=1e-3)
    assert _rel(torch.cov(v.T), ed.moments.covs[2]) < 1e-2
    shifted = ed.mean_shift(src, 0, torch.full((len(src),), 1))
    assert torch.allclose(M.pixels(shifted, resolution).double().mean(0), ed.moments.means[1], atol=1e-3)
    assert torch.allclose(ed.edit(src, 0, 0), src, atol=1e-5)  # a class to itself: unchanged
    synth, y = ed.sample_all(5, torch.Generator().manual_seed(0), size=8)
    assert synth.shape == (15, 3, 8, 8) and y.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    mixed = ed.edit(images[:4], labels[:4], torch.tensor([1, 2, 1, 2]))
    assert mixed.shape == (4, 3, 8, 8)


def test_gaussian_editor_subset_of_pairs() -> None:
    images, labels = _toy_images(40)
    ed = M.GaussianEditor.fit(images, labels, num_classes=3, pairs=[(0, 1)], ridge=1e-2,
                              device="cpu", progress=False)
    with pytest.raises(KeyError, match="pairs"):
        ed.map(1, 0)
    direct = M.monge_map(ed.moments.covs[0], ed.moments.covs[1], ridge=1e-2).float()
    assert torch.allclose(ed.map(0, 1), direct, atol=1e-4)


def test_random_targets_never_the_source() -> None:
    y = torch.arange(10).repeat(50)
    t = M.random_targets(y, 10, torch.Generator().manual_seed(0))
    assert (t != y).all() and t.min() >= 0 and t.max() <= 9
    assert len(torch.unique(t[y == 2])) == 9


# --------------------------------------------------------------------------------------------
# The checks reject the typical mistakes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, label", [
    ("moments.sqrtm_psd", "a Cholesky factor (a square root, but not the symmetric one)"),
    ("moments.monge_map", "a Cholesky factor used as the square root"),
    ("moments.monge_map", "the inverse square roots are missing"),
    ("moments.monge_map", "sources and targets swapped (the map from target to source)"),
    ("moments.mean_shift", "sources and targets swapped"),
    ("moments.gaussian_edit", "sources and targets swapped"),
    ("moments.gaussian_edit", "centring forgotten (A applied to x, not to x - mu_s)"),
    ("moments.class_moments", "centring forgotten (the second moment E[x x^T], not the covariance)"),
])
def test_checks_reject_typical_mistakes(name: str, label: str) -> None:
    from course_utils.checks import evaluate, get_exercise

    ex = get_exercise(name)
    wrong = next(m for m in ex.mistakes if m.label == label)
    outcome = evaluate(name, wrong.fn)
    assert outcome.status == "failed" and outcome.mistake == label


def test_every_exercise_reference_passes_and_mistakes_are_identified() -> None:
    from course_utils.checks import evaluate, exercises_of

    exs = exercises_of("moments")
    assert [e.name.split(".")[1] for e in exs] == ["class_moments", "mean_shift", "sqrtm_psd", "monge_map",
                                                   "gaussian_edit", "psnr"]
    for ex in exs:
        assert evaluate(ex.name, ex.reference).passed
        assert len(ex.mistakes) >= 3
        for m in ex.mistakes:
            assert evaluate(ex.name, m.fn).mistake == m.label, (ex.name, m.label)


def test_a_stub_is_todo() -> None:
    from course_utils.checks import evaluate

    def monge_map(cov_s, cov_t):
        raise NotImplementedError("monge_map")

    assert evaluate("moments.monge_map", monge_map).status == "todo"


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------
def test_plots_and_slider_smoke() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from course_utils.train import make_cifar_net
    from course_utils.viz.moments import edit_grid, edit_slider, sweep_plot

    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    fig = edit_grid({"original": a, "edited": b}, titles=["x", "y", "z"], diff_gain=5)
    assert len(fig.axes) == 9
    ax = sweep_plot([1, 2, 4, 8], {"OT": [0.1, 0.3, 0.2, 0.1]}, chance=0.1)
    assert ax.get_xscale() == "log"
    torch.manual_seed(0)
    box = edit_slider(make_cifar_net(10, 4), a[0], b[0], [str(i) for i in range(10)], source=1, target=2)
    box.children[0].value = 0.5      # moving the slider redraws without error
    plt.close("all")


# --------------------------------------------------------------------------------------------
# The experiment: tiers, targets, the edited sets, the cached editor and sweep
# --------------------------------------------------------------------------------------------
def test_sweep_setup_per_tier() -> None:
    ci, laptop, full = (M.sweep_setup(t) for t in ("ci", "laptop", "full"))
    assert (ci.resolution, laptop.resolution, full.resolution) == (16, 16, 32)
    assert laptop.n_train is None and full.n_test is None and full.pairs is None   # all the data
    assert laptop.n_test == 5000  # half the test set: the sweep's cost, chosen from the 5-minute budget
    assert ci.pairs == laptop.pairs and (2, 0) in ci.pairs                              # bird -> airplane
    with pytest.raises(ValueError, match="tier"):
        M.sweep_setup("huge")


def test_edit_targets() -> None:
    y = torch.arange(10).repeat(3)
    pairs = [(s, (s - 2) % 10) for s in range(10)]
    assert torch.equal(M.edit_targets(y, pairs), (y - 2) % 10)
    t = M.edit_targets(y, None, generator=torch.Generator().manual_seed(0))
    assert (t != y).all()
    with pytest.raises(ValueError, match="one target"):
        M.edit_targets(y, [(0, 1)])


def _tiny_run(images: torch.Tensor, labels: torch.Tensor):
    from course_utils.train import train_classifier

    return train_classifier(images, labels, epochs=2, batch_size=16, width=(4, 8, 8), num_classes=3,
                            device="cpu", progress=False, cache=False)


def test_edit_sweep_matches_predict_at_every_checkpoint(tmp_path, monkeypatch) -> None:
    from course_utils.train import predict

    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path))
    images, labels = _toy_images(40)
    x32 = torch.nn.functional.interpolate(images, size=32)
    result = _tiny_run(x32, labels)
    ed = M.GaussianEditor.fit(x32, labels, num_classes=3, resolution=4, device="cpu", progress=False)
    pairs = [(0, 1), (1, 2), (2, 0)]
    sets = M.edit_sets(ed, x32[::4], labels[::4], pairs=pairs, per_class=3)
    assert torch.equal(sets[M.OT][1], torch.tensor([1, 2, 0])[labels[::4]])
    assert torch.equal(sets[M.SAMPLES][1], torch.arange(3).repeat_interleave(3))
    sweep = M.edit_sweep(result, sets, batch_size=7, progress=False)
    again = M.edit_sweep(result, sets, batch_size=7, progress=False)      # from the cache
    assert sweep.steps == result.steps_list()
    for k, step in enumerate(sweep.steps):
        model = result.model_at(step)
        for name, (x, y) in sets.items():
            expected = predict(model, x).argmax(1)
            assert torch.equal(sweep.predictions[name][k], expected), (name, step)
            assert torch.equal(again.predictions[name][k], expected)
            assert sweep.fractions()[name][k] == pytest.approx((expected == y).double().mean().item())
    from course_utils import cache

    assert len(cache.entries(name="moment_edit_sweep")) == len(sets)       # one entry per set
    only_ot = M.edit_sweep(result, {M.OT: sets[M.OT]}, batch_size=7, progress=False)
    assert list(only_ot.predictions) == [M.OT] and torch.equal(only_ot.predictions[M.OT], sweep.predictions[M.OT])
    assert len(cache.entries(name="moment_edit_sweep")) == len(sets)       # loaded, not computed again
    hits = sweep.hits(M.OT)
    curve = sweep.curve(M.OT)
    assert curve.peak == max(sweep.fractions()[M.OT]) and curve.final == sweep.fractions()[M.OT][-1]
    assert torch.equal(sweep.turned(M.OT, curve.peak_step), hits[curve.peak_index] & ~hits[-1])
    with pytest.raises(KeyError, match="checkpoint"):
        sweep.turned(M.OT, 10 ** 6)


def test_fit_editor_is_cached_and_equals_the_fit(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path))
    images, labels = _toy_images(30)
    kw = dict(resolution=4, pairs=[(0, 1), (2, 0)], ridge=1e-3, num_classes=3, progress=False)
    first = M.fit_editor(images, labels, **kw)
    second = M.fit_editor(images, labels, **kw)
    direct = M.GaussianEditor.fit(images, labels, num_classes=3, resolution=4, pairs=[(0, 1), (2, 0)],
                                  progress=False)
    for ed in (first, second):
        assert ed.pairs == ((0, 1), (2, 0)) and ed.resolution == 4
        assert torch.allclose(ed.maps.cpu(), direct.maps.cpu()) and torch.allclose(ed.moments.covs.cpu(),
                                                                                   direct.moments.covs.cpu())


def test_run_experiment_refuses_an_unknown_set_before_training(monkeypatch) -> None:
    """A misspelt `swept` name is an error at once, not after minutes of training."""
    monkeypatch.setattr(M, "load_cifar10", lambda *a, **k: pytest.fail("loaded data before checking swept"))
    with pytest.raises(ValueError, match="no set named"):
        M.run_experiment(swept=["OT"], progress=False)
