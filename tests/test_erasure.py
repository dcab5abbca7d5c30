"""`course_utils.erasure`: LEACE against EleutherAI's concept-erasure, its invariants, the quadratic
eraser, the probes, the exercise checks, and notebook 04's structure. CPU only, a few seconds."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from course_utils.checks import evaluate, exercises_of
from course_utils.erasure import (
    LeaceEraser,
    LeaceFitter,
    QuadraticFitter,
    chance_accuracy,
    cross_covariance,
    distortion,
    first_step_above,
    leace_eraser,
    linear_probe,
    mlp_probe,
    one_hot,
    orth_eraser,
)

F64 = torch.float64


def _data(seed: int = 0, n: int = 600, d: int = 16, k: int = 4, dtype=F64) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated Gaussian features with class-dependent means: `x` `[n, d]`, class ids `[n]`."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    mix = torch.randn(d, d, generator=g, dtype=F64)
    x = torch.randn(n, d, generator=g, dtype=F64) @ mix + 2 * torch.randn(k, d, generator=g, dtype=F64)[y] + 3.0
    return x.to(dtype), y


# --------------------------------------------------------------------------------------------
# Cross-check against concept-erasure
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver", ["eigh", "cholesky"])
@pytest.mark.parametrize("k", [2, 5])
def test_leace_matches_concept_erasure(solver, k):
    ce = pytest.importorskip("concept_erasure")
    x, y = _data(1, n=800, d=24, k=k, dtype=torch.float32)
    z = torch.nn.functional.one_hot(y, k)  # concept-erasure's fitter wants one-hot labels
    theirs = ce.LeaceFitter(24, k, dtype=F64, shrinkage=False, constrain_cov_trace=False, svd_tol=0.01)
    theirs.update(x.double(), z.double())
    ours = LeaceFitter(24, k, solver=solver, svd_tol=0.01).update(x, y).eraser
    torch.testing.assert_close(ours(x.double()), theirs.eraser(x.double()), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours(x), theirs.eraser(x.double()).float(), atol=1e-4, rtol=1e-4)


def test_default_tolerance_matches_concept_erasure_when_no_direction_is_weak():
    ce = pytest.importorskip("concept_erasure")
    x, y = _data(2, k=3)
    theirs = ce.LeaceFitter.fit(x, torch.nn.functional.one_hot(y, 3).double(), shrinkage=False,
                                constrain_cov_trace=False).eraser
    torch.testing.assert_close(leace_eraser(x, y)(x), theirs(x), atol=1e-4, rtol=1e-4)


def test_orth_matches_concept_erasure():
    ce = pytest.importorskip("concept_erasure")
    x, y = _data(3, k=4)
    theirs = ce.LeaceFitter(16, 4, method="orth", dtype=F64, shrinkage=False).update(x, one_hot(y).double()).eraser
    torch.testing.assert_close(orth_eraser(x, y)(x), theirs(x), atol=1e-4, rtol=1e-4)


def test_streaming_equals_one_batch():
    x, y = _data(4)
    fitter = LeaceFitter(16, 4)
    for xb, yb in zip(x.split(97), y.split(97)):
        fitter.update(xb, yb)
    torch.testing.assert_close(fitter.eraser(x), LeaceFitter.fit(x, y).eraser(x), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(fitter.sigma_xx, torch.cov(x.T), atol=1e-9, rtol=1e-9)


def test_eigh_and_cholesky_solvers_agree_and_auto_uses_cholesky_for_large_d():
    x, y = _data(5, n=1100, d=520, k=3)
    a = LeaceFitter.fit(x, y, solver="eigh").eraser(x)
    b = LeaceFitter.fit(x, y, solver="cholesky").eraser(x)
    c = LeaceFitter.fit(x, y).eraser(x)
    torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(a, c, atol=1e-7, rtol=1e-7)


def test_quadratic_matches_concept_erasure():
    ce = pytest.importorskip("concept_erasure")
    x, _ = _data(6, n=400, d=6, k=4)
    y = torch.arange(400) % 4  # balanced: concept-erasure centres on the unweighted mean of class means
    theirs = ce.QuadraticFitter(6, 4, dtype=F64, shrinkage=False).update(x, y).eraser
    ours = QuadraticFitter(6, 4).update(x, y).eraser
    torch.testing.assert_close(ours(x, y), theirs(x, y), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted():
    x, y = _data(8, n=700, d=20, k=5)
    return x, y, leace_eraser(x, y)


def test_cross_covariance_is_zero_after_erasure(fitted):
    x, y, eraser = fitted
    assert cross_covariance(x, y).abs().max() > 0.1
    assert cross_covariance(eraser(x), y).abs().max() < 1e-10


def test_class_means_are_equal_after_erasure(fitted):
    x, y, eraser = fitted
    xe = eraser(x)
    means = torch.stack([xe[y == c].mean(0) for c in range(5)])
    torch.testing.assert_close(means, xe.mean(0).expand_as(means), atol=1e-9, rtol=0)


def test_erasure_is_idempotent(fitted):
    x, _, eraser = fitted
    torch.testing.assert_close(eraser(eraser(x)), eraser(x), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(eraser.P @ eraser.P, eraser.P, atol=1e-9, rtol=1e-9)


def test_update_rank_is_at_most_k_minus_1(fitted):
    x, _, eraser = fitted
    update = eraser.proj_left @ eraser.proj_right
    assert eraser.rank == 4
    assert int(torch.linalg.matrix_rank(update)) == 4
    assert int(torch.linalg.matrix_rank(x - eraser(x))) <= 4


def test_mean_is_unchanged(fitted):
    x, _, eraser = fitted
    torch.testing.assert_close(eraser(x).mean(0), x.mean(0), atol=1e-9, rtol=1e-9)


def test_leace_moves_the_data_less_than_the_orthogonal_projection(fitted):
    x, y, eraser = fitted
    orth = orth_eraser(x, y)
    assert cross_covariance(orth(x), y).abs().max() < 1e-10
    assert distortion(x, eraser(x)) < distortion(x, orth(x))


def test_logistic_regression_learns_nothing_after_erasure():
    sk = pytest.importorskip("sklearn")
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    for k in (2, 3):
        X, Y = make_classification(n_samples=1024, n_features=32, n_informative=8, n_classes=k, random_state=42)
        assert np.abs(LogisticRegression(max_iter=1000).fit(X, Y).coef_).max() > 0.1
        X_ = leace_eraser(torch.from_numpy(X), torch.from_numpy(Y))(torch.from_numpy(X)).numpy()
        beta = LogisticRegression(max_iter=1000, tol=0.0).fit(X_, Y).coef_
        assert np.abs(beta).max() < 1e-4, (k, np.abs(beta).max(), sk.__version__)


def test_singular_covariance_uses_the_pseudo_inverse():
    x, y = _data(9, n=300, d=8, k=3)
    x = torch.cat([x, x[:, :2].sum(1, keepdim=True)], 1)  # a duplicate direction: Sigma is singular
    eraser = LeaceFitter.fit(x, y, solver="auto").eraser
    xe = eraser(x)
    assert torch.isfinite(xe).all()
    assert cross_covariance(xe, y).abs().max() < 1e-9
    with pytest.raises(RuntimeError, match="eigh"):
        _ = LeaceFitter.fit(x[:5], y[:5], solver="cholesky").eraser


def test_eraser_accepts_images_and_uint8():
    g = torch.Generator().manual_seed(10)
    images = torch.randint(0, 256, (300, 3, 4, 4), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (300,), generator=g)
    images[y == 1, 0] //= 2
    fitter = LeaceFitter(48, 3, device="cpu").update(images, y)
    out = fitter.eraser(images)
    assert out.shape == (300, 3, 4, 4) and out.dtype == torch.float32
    assert cross_covariance(out.flatten(1).double(), y).abs().max() < 1e-5
    with pytest.raises(ValueError, match="48 features"):
        fitter.eraser(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="z must be"):
        fitter.update(images[:4], torch.zeros(4, 2))
    with pytest.raises(RuntimeError, match="update"):
        _ = LeaceFitter(3, 2).eraser


def test_frozen_eraser_fields():
    x, y = _data(11, n=200, d=6, k=3)
    eraser = LeaceEraser.fit(x, y)
    assert eraser.proj_left.shape == (6, 2) and eraser.proj_right.shape == (2, 6)
    torch.testing.assert_close(eraser.bias, x.mean(0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        eraser.bias = None  # type: ignore[misc]  # frozen


def test_quadratic_fitter_streams_the_shared_class_moments():
    x, y = _data(17, n=500, d=7, k=3)
    fitter = QuadraticFitter(7, 3)
    for xb, yb in zip(x.split(61), y.split(61)):
        fitter.update(xb, yb)
    for c in range(3):
        torch.testing.assert_close(fitter.covs[c], torch.cov(x[y == c].T), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fitter.eraser(x, y), QuadraticFitter.fit(x, y).eraser(x, y), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(fitter.eraser.mean, x.mean(0), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="class ids"):
        fitter.update(x[:4], torch.zeros(4, 2))


def test_erasure_uses_the_shared_gaussian_numerics():
    from course_utils import erasure as E
    from course_utils import gaussian as G

    assert E.gaussian_ot_map is G.monge_map and E.psd_sqrt is G.psd_sqrt and E.flatten_images is G.pixels
    assert E.wasserstein_barycenter is G.wasserstein_barycenter


def test_quadratic_eraser_matches_class_means_and_covariances():
    x, y = _data(12, n=900, d=5, k=3)
    eraser = QuadraticFitter.fit(x, y).eraser
    xe = eraser(x, y)
    for c in range(3):
        torch.testing.assert_close(xe[y == c].mean(0), eraser.mean, atol=1e-9, rtol=0)
        torch.testing.assert_close(torch.cov(xe[y == c].T), eraser.target_cov, atol=1e-8, rtol=1e-8)
    assert cross_covariance(xe, y).abs().max() < 1e-9


# --------------------------------------------------------------------------------------------
# Probes and helpers
# --------------------------------------------------------------------------------------------
def test_linear_probe_beats_chance_before_and_sits_at_chance_after():
    x, y = _data(14, n=1200, d=10, k=3, dtype=torch.float32)
    tr, te = slice(0, 800), slice(800, None)
    chance = chance_accuracy(y[tr], y[te])
    assert linear_probe(x[tr], y[tr], x[te], y[te], device="cpu") > chance + 0.3
    eraser = leace_eraser(x[tr].double(), y[tr])
    acc = linear_probe(eraser(x[tr].double()), y[tr], eraser(x[te].double()), y[te], device="cpu")
    assert acc == pytest.approx(chance, abs=1e-9)  # the optimum is the constant predictor


def test_mlp_probe_finds_what_leace_cannot_remove():
    g = torch.Generator().manual_seed(15)
    x = torch.randn(1200, 6, generator=g)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()  # XOR: (almost) no linear information at all
    eraser = leace_eraser(x[:900].double(), y[:900])
    xe = eraser(x.double()).float()
    chance = chance_accuracy(y[:900], y[900:])
    assert linear_probe(xe[:900], y[:900], xe[900:], y[900:], device="cpu") < chance + 0.08
    assert mlp_probe(xe[:900], y[:900], xe[900:], y[900:], hidden=64, epochs=40, batch_size=128,
                     device="cpu") > 0.75


def test_chance_accuracy_is_the_majority_training_class():
    assert chance_accuracy(torch.tensor([0, 1, 1, 2]), torch.tensor([1, 0, 0, 1, 2])) == pytest.approx(0.4)


def test_first_step_above_and_distortion():
    assert first_step_above([1, 2, 4, 8], [0.1, 0.3, 0.2, 0.5], 0.3) == 2
    assert first_step_above([1, 2], [0.1, 0.2], 0.3) is None
    assert distortion(torch.zeros(4, 3), torch.ones(4, 3)) == pytest.approx(3.0)


def test_one_hot_validation():
    assert one_hot(torch.tensor([0, 2])).shape == (2, 3)
    with pytest.raises(ValueError, match="class ids"):
        one_hot(torch.tensor([0.5, 1.0]))


# --------------------------------------------------------------------------------------------
# The exercise checks
# --------------------------------------------------------------------------------------------
REQUIRED_MISTAKES = {
    "erasure.leace_erase": ["whitening forgotten", "projected in the wrong space", "Sigma used instead of Sigma^{-1/2}",
                            "the mean was not subtracted"],
}


def test_every_exercise_has_three_mistakes_that_are_identified():
    exs = exercises_of("erasure")
    assert [e.name.split(".")[1] for e in exs] == ["cross_covariance", "orth_erase", "leace_erase",
                                                  "first_step_above", "quadratic_erase"]
    for ex in exs:
        assert len(ex.mistakes) >= 3, ex.name
        assert evaluate(ex.name, ex.reference).passed, ex.name
        for m in ex.mistakes:
            assert evaluate(ex.name, m.fn).mistake == m.label, (ex.name, m.label)


def test_leace_checks_reject_the_typical_mistakes():
    labels = [m.label for m in exercises_of("erasure")[2].mistakes]
    for wanted in REQUIRED_MISTAKES["erasure.leace_erase"]:
        assert any(label.startswith(wanted) for label in labels), wanted


def _pinv_leace(x, z):
    """A learner's correct LEACE written differently: torch.cov, pinv, an SVD with a fixed cut."""
    sigma = torch.cov(x.T)
    evals, evecs = torch.linalg.eigh(sigma)
    keep = evals > 1e-10 * evals.max()
    w = evecs[:, keep] @ torch.diag(evals[keep].rsqrt()) @ evecs[:, keep].T
    sxz = (x - x.mean(0)).T @ (z - z.mean(0)) / (len(x) - 1)
    a = w @ sxz
    p = a @ torch.linalg.pinv(a)
    return x - (x - x.mean(0)) @ (torch.linalg.pinv(w) @ p @ w).T


def test_checks_accept_other_correct_answers():
    assert evaluate("erasure.leace_erase", _pinv_leace).passed
    assert evaluate("erasure.leace_erase", lambda x, z: LeaceFitter.fit(x, z, solver="cholesky").eraser(x)
                    if torch.linalg.matrix_rank(x - x.mean(0)) == x.shape[1] else _pinv_leace(x, z)).passed
    assert evaluate("erasure.orth_erase", lambda x, z: orth_eraser(x, z)(x)).passed
    assert evaluate("erasure.cross_covariance",
                    lambda x, z: torch.cov(torch.cat([x, z], 1).T)[: x.shape[1], x.shape[1]:]).passed


def test_unfinished_exercise_is_todo():
    def stub(*args):
        raise NotImplementedError("leace_erase")
    assert evaluate("erasure.leace_erase", stub).status == "todo"


# --------------------------------------------------------------------------------------------
# Notebook structure (no execution)
# --------------------------------------------------------------------------------------------
def test_solution_notebook_checks_every_exercise_and_learner_version_has_no_solutions(root):
    sol = root / "solutions" / "04_concept_erasure.ipynb"
    if not sol.exists():
        pytest.skip("solutions/04_concept_erasure.ipynb not written yet")
    cells = json.loads(sol.read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells)
    for ex in exercises_of("erasure"):
        assert f'check("{ex.name}"' in source, ex.name
    learner = json.loads((root / "notebooks" / "04_concept_erasure.ipynb").read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in learner)
    assert "BEGIN SOLUTION" not in text and "NotImplementedError" in text


def test_viz_functions_draw():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from course_utils.viz.erasure import learning_curves, probe_bars, scatter_erasure, show_erased

    x, y = _data(16, n=60, d=2, k=2)
    scatter_erasure(x, y, {"LEACE": leace_eraser(x, y)(x)})
    probe_bars({"original": {"linear": 0.6, "MLP": 0.7}, "LEACE": {"linear": 0.1}}, chance=0.1)
    learning_curves({"a": ([1, 2, 4], [0.1, 0.2, 0.3])}, chance=0.1, threshold=0.2)
    show_erased(torch.rand(3, 3, 8, 8), torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 0]), ["a", "b"])
    plt.close("all")


# --------------------------------------------------------------------------------------------
# Notebook 04's CIFAR-10 experiment module (small synthetic images, an isolated cache)
# --------------------------------------------------------------------------------------------
def _images(seed: int = 0, n: int = 240, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images `[n, 3, 8, 8]` whose brightness depends on the class, and their labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = torch.rand(n, 3, 8, 8, generator=g) * 0.6 + 0.15 * y[:, None, None, None]
    return (x * 255).round().to(torch.uint8), y


@pytest.fixture
def result_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("COURSE_RESULT_CACHE", raising=False)
    return tmp_path / "cache"


def test_fit_leace_streams_images_like_one_fit():
    from course_utils.erasure_cifar import fit_leace
    from course_utils.gaussian import pixels

    images, y = _images(20)
    streamed = fit_leace(images, y, num_classes=3, batch_size=37, progress=False)
    once = LeaceFitter.fit(pixels(images), y, num_classes=3).eraser
    torch.testing.assert_close(streamed(pixels(images).double()), once(pixels(images).double()), atol=1e-9, rtol=1e-9)
    small = fit_leace(images, y, method="orth", resolution=4, num_classes=3, progress=False)
    assert small.dim == 48 and small.rank == 2
    assert cross_covariance(small(pixels(images, 4).double()), y).abs().max() < 1e-10


def test_fit_quadratic_matches_every_class_moment_with_a_looser_barycenter():
    from course_utils.erasure_cifar import fit_quadratic
    from course_utils.gaussian import pixels

    images, y = _images(21, n=600)
    eraser = fit_quadratic(images, y, resolution=2, num_classes=3, batch_size=101, progress=False)
    x = pixels(images, 2).double()
    xe = eraser(x, y)
    for c in range(3):
        torch.testing.assert_close(xe[y == c].mean(0), eraser.mean, atol=1e-9, rtol=0)
        torch.testing.assert_close(torch.cov(xe[y == c].T), eraser.target_cov, atol=1e-9, rtol=1e-7)
    exact = QuadraticFitter.fit(x, y).eraser  # barycenter to 1e-10: the same target to within ~1e-8
    torch.testing.assert_close(eraser.target_cov, exact.target_cov, atol=1e-7, rtol=1e-6)


def test_to_images_repeats_each_pixel_and_pooling_undoes_it():
    from course_utils.erasure_cifar import to_images
    from course_utils.gaussian import pixels

    x = torch.rand(5, 3 * 16 * 16)
    up = to_images(x)
    block = x.reshape(5, 3, 16, 16)[:, :, 1:2, 3:4].expand(5, 3, 2, 2)
    assert up.shape == (5, 3, 32, 32) and torch.equal(up[:, :, 2:4, 6:8], block)
    torch.testing.assert_close(pixels(up, 16), x)
    with pytest.raises(ValueError, match="3\\*r\\*r"):
        to_images(torch.rand(2, 100))


def test_delay_threshold_is_half_way_and_probe_kinds():
    from course_utils.erasure_cifar import delay_threshold, probe_accuracy

    assert delay_threshold(0.1, 0.5) == pytest.approx(0.3)
    x, y = _data(22, n=300, d=4, k=2, dtype=torch.float32)
    assert probe_accuracy("linear", x, y, x, y) == linear_probe(x, y, x, y)
    with pytest.raises(ValueError, match="linear"):
        probe_accuracy("svm", x, y, x, y)


def test_settings_per_tier(monkeypatch):
    from course_utils import erasure_cifar
    from course_utils.config import Config

    sizes = {}
    for tier in ("ci", "laptop", "full"):
        monkeypatch.setattr(erasure_cifar, "CFG", Config(requested_mode=tier))
        sizes[tier] = erasure_cifar.settings()
    assert sizes["ci"].n_train == 10_000 and sizes["ci"].resolution == 8
    assert sizes["laptop"].n_train is None and sizes["laptop"].n_test is None  # all of CIFAR-10
    assert sizes["laptop"].resolution == 16 and sizes["laptop"].n_curve == 2_000


def test_erasers_go_through_the_cache_and_the_recipe_is_registered(result_cache):
    from course_utils import cache
    from course_utils.erasure_cifar import fit_erasers, fit_quadratic_eraser

    images, y = _images(23, n=600, k=10)  # the notebook's ten classes
    leace, orth = fit_erasers(images, y, resolution=4)
    assert isinstance(leace, LeaceEraser) and leace.rank == orth.rank == 9
    again = fit_erasers(images, y, resolution=4)[0]
    assert torch.equal(again.proj_left, leace.proj_left) and again.bias is not None
    quad = fit_quadratic_eraser(images, y, 2)
    assert torch.equal(fit_quadratic_eraser(images, y, 2).ot_maps, quad.ot_maps)
    names = {e.name for e in cache.entries()}
    assert {"erasure_leace", "erasure_orth", "erasure_quadratic"} <= names
    assert "04_concept_erasure" in [r.name for r in cache.recipes()]
