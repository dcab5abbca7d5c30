"""Tests for course_utils.gaussian, the Gaussian numerics shared by notebooks 03 and 04: the Monge
map and W2 against POT and by hand, the roots against scipy, the singular-matrix policy, the
barycenter's fixed point, the streaming class moments against torch.cov, and the pixel vectors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from course_utils import gaussian as G
from course_utils import moments as M

F64 = torch.float64


def _spd(d: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, d + 3, generator=g, dtype=F64)
    return scale * (x @ x.T / (d + 3) + 0.05 * torch.eye(d, dtype=F64))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------
# The Monge map (moved from test_moments.py and test_erasure.py)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [2, 3, 10, 50, 128])
def test_monge_map_matches_pot(d: int) -> None:
    ot = pytest.importorskip("ot")
    S, T = _spd(d, d), _spd(d, 1000 + d, scale=3.0)
    A = G.monge_map(S, T)
    # POT: bures_wasserstein_mapping(ms, mt, Cs, Ct) -> (A, b), with x -> x A + b (row vectors)
    A_pot, b_pot = ot.gaussian.bures_wasserstein_mapping(np.zeros(d), np.zeros(d), S.numpy(), T.numpy())
    A_pot = torch.as_tensor(np.asarray(A_pot))
    assert _rel(A, A_pot) < 1e-5
    mu_s, mu_t = torch.rand(d, dtype=F64), torch.rand(d, dtype=F64)
    _, b = ot.gaussian.bures_wasserstein_mapping(mu_s.numpy(), mu_t.numpy(), S.numpy(), T.numpy())
    x = torch.randn(7, d, dtype=F64)
    ours = G.gaussian_edit(x, mu_s, mu_t, A)
    theirs = x @ A_pot + torch.as_tensor(np.asarray(b)).reshape(1, d)
    assert _rel(ours, theirs) < 1e-5
    # the affine form x' = A x + b is the same edit, and POT's offset
    A2, b2 = G.monge_affine(mu_s, S, mu_t, T)
    assert torch.equal(A2, A)
    assert _rel(b2, torch.as_tensor(np.asarray(b)).reshape(d)) < 1e-5
    assert _rel(x @ A2.T + b2, ours) < 1e-12


def test_ot_map_matches_pot_5x5() -> None:
    ot = pytest.importorskip("ot")
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(2, 5, 5, generator=g, dtype=F64)
    s, t = a @ a.T + 0.1 * torch.eye(5, dtype=F64), b @ b.T + 0.1 * torch.eye(5, dtype=F64)
    A, _ = ot.gaussian.bures_wasserstein_mapping(np.zeros(5), np.zeros(5), s.numpy(), t.numpy())
    torch.testing.assert_close(G.monge_map(s, t), torch.from_numpy(np.asarray(A)), atol=1e-8, rtol=1e-6)
    m = G.monge_map(s, t)
    torch.testing.assert_close(m @ s @ m, t, atol=1e-8, rtol=1e-8)


def test_monge_map_hand_computed_2d() -> None:
    # diagonal covariances: A = diag(sqrt(t_i / s_i))
    S = torch.diag(torch.tensor([4.0, 0.25], dtype=F64))
    T = torch.diag(torch.tensor([1.0, 9.0], dtype=F64))
    A = G.monge_map(S, T)
    assert torch.allclose(A, torch.diag(torch.tensor([0.5, 6.0], dtype=F64)), atol=1e-12)
    # a rotated pair: S = R diag(s) R^T, T = R diag(t) R^T commute, so A = R diag(sqrt(t/s)) R^T
    c, s = np.cos(0.3), np.sin(0.3)
    R = torch.tensor([[c, -s], [s, c]], dtype=F64)
    S2 = R @ torch.diag(torch.tensor([2.0, 0.5], dtype=F64)) @ R.T
    T2 = R @ torch.diag(torch.tensor([8.0, 0.125], dtype=F64)) @ R.T
    expected = R @ torch.diag(torch.tensor([2.0, 0.5], dtype=F64)) @ R.T
    assert torch.allclose(G.monge_map(S2, T2), expected, atol=1e-12)


@pytest.mark.parametrize("d", [2, 8, 40])
def test_monge_map_invariants(d: int) -> None:
    S, T = _spd(d, 7 * d, 0.5), _spd(d, 7 * d + 1, 2.0)
    A = G.monge_map(S, T)
    assert _rel(A @ S @ A, T) < 1e-10                      # pushes N(0, S) onto N(0, T)
    assert torch.equal(A, A.T)                              # symmetric
    assert torch.linalg.eigvalsh(A).min() > 0               # positive definite
    assert torch.allclose(G.monge_map(S, S), torch.eye(d, dtype=F64), atol=1e-9)  # class -> itself
    assert _rel(G.monge_map(T, S), torch.linalg.inv(A)) < 1e-8  # the reverse map is the inverse


def test_monge_map_batched_and_ridge() -> None:
    S = torch.stack([_spd(5, 1), _spd(5, 2)])
    T = torch.stack([_spd(5, 3), _spd(5, 4)])
    A = G.monge_map(S, T)
    for k in range(2):
        assert torch.allclose(A[k], G.monge_map(S[k], T[k]), atol=1e-10)
    # with a ridge, the map of a singular covariance is exact for the ridged covariances
    v = torch.randn(5, 2, dtype=F64)
    singular = v @ v.T
    A_r = G.monge_map(singular, T[0], ridge=1e-3)
    ridged = lambda m: m + 1e-3 * m.diagonal().mean() * torch.eye(5, dtype=F64)  # noqa: E731
    assert _rel(A_r @ ridged(singular) @ A_r, ridged(T[0])) < 1e-8
    with pytest.raises(ValueError, match="same d"):
        G.monge_map(_spd(3, 1), _spd(4, 2))


# --------------------------------------------------------------------------------------------
# W2 between Gaussians
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 4, 30])
def test_w2_matches_pot(d: int) -> None:
    ot = pytest.importorskip("ot")
    S, T = _spd(d, 3 * d), _spd(d, 3 * d + 1, 5.0)
    mu_s, mu_t = torch.rand(d, dtype=F64), torch.rand(d, dtype=F64) + 1
    theirs = float(ot.gaussian.bures_wasserstein_distance(mu_s.numpy(), mu_t.numpy(), S.numpy(), T.numpy()))
    assert float(G.gaussian_w2(mu_s, S, mu_t, T)) == pytest.approx(theirs, rel=1e-6)


def test_w2_by_hand_and_as_the_cost_of_the_monge_map() -> None:
    # commuting (diagonal) covariances: W2^2 = |mu_s - mu_t|^2 + sum (sqrt s_i - sqrt t_i)^2
    S = torch.diag(torch.tensor([4.0, 0.25], dtype=F64))
    T = torch.diag(torch.tensor([1.0, 9.0], dtype=F64))
    mu_s, mu_t = torch.tensor([0.0, 0.0], dtype=F64), torch.tensor([3.0, 4.0], dtype=F64)
    assert float(G.gaussian_w2(mu_s, S, mu_t, T)) == pytest.approx((25 + 1 + 6.25) ** 0.5, rel=1e-12)
    # in general W2^2 = E |x - T(x)|^2 = |mu_s - mu_t|^2 + tr((A - I) S (A - I)), A the Monge map
    d = 6
    S, T = _spd(d, 21), _spd(d, 22, 3.0)
    mu_s, mu_t = torch.rand(d, dtype=F64), torch.rand(d, dtype=F64)
    E = G.monge_map(S, T) - torch.eye(d, dtype=F64)
    cost = (mu_s - mu_t).pow(2).sum() + torch.trace(E @ S @ E)
    assert float(G.gaussian_w2(mu_s, S, mu_t, T)) ** 2 == pytest.approx(float(cost), rel=1e-10)
    # a distance: zero on itself, symmetric, batched
    assert float(G.gaussian_w2(mu_s, S, mu_s, S)) < 1e-6
    assert float(G.gaussian_w2(mu_t, T, mu_s, S)) == pytest.approx(float(G.gaussian_w2(mu_s, S, mu_t, T)), rel=1e-9)
    both = G.gaussian_w2(torch.stack([mu_s, mu_t]), torch.stack([S, T]), mu_t, T)
    assert both.shape == (2,) and float(both[1]) < 1e-6


# --------------------------------------------------------------------------------------------
# Symmetric roots and the one policy for singular matrices
# --------------------------------------------------------------------------------------------
def test_sqrtm_psd() -> None:
    S = torch.stack([_spd(6, 1), _spd(6, 2, 10.0)])
    R = G.sqrtm_psd(S)
    assert torch.allclose(R @ R, S, atol=1e-10)
    assert torch.equal(R, R.transpose(-1, -2))
    assert torch.allclose(R[0], M.sqrtm_reference(S[0]), atol=1e-12)
    inv = G.inv_sqrtm_psd(S)
    assert torch.allclose(inv @ S @ inv, torch.eye(6, dtype=F64).expand(2, 6, 6), atol=1e-9)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64))
    almost = q @ torch.diag(torch.tensor([1.0, 0.5, 0.0, -1e-14], dtype=F64)) @ q.T
    assert torch.isfinite(G.sqrtm_psd(almost)).all()       # tiny negative eigenvalues are clamped
    with pytest.raises(ValueError, match="square"):
        G.sqrtm_psd(torch.zeros(3, 4))


def test_roots_match_scipy() -> None:
    scipy_linalg = pytest.importorskip("scipy.linalg")
    S = _spd(12, 5, 4.0)
    half, inv_half = G.sqrt_inv_sqrt(S)
    theirs = torch.as_tensor(np.real(scipy_linalg.sqrtm(S.numpy())))
    assert _rel(half, theirs) < 1e-10
    assert _rel(inv_half, torch.linalg.inv(theirs)) < 1e-10
    # the ridge is a multiple of the mean eigenvalue added to the diagonal
    ridged = S + 0.1 * torch.trace(S) / 12 * torch.eye(12, dtype=F64)
    assert _rel(G.sqrtm_psd(S, ridge=0.1), torch.as_tensor(np.real(scipy_linalg.sqrtm(ridged.numpy())))) < 1e-10
    assert torch.equal(G.sqrt_inv_sqrt(S, ridge=0.1)[1], G.inv_sqrtm_psd(ridged))


def test_singular_policy_is_the_moore_penrose_pseudo_inverse() -> None:
    """The one policy (see `sqrt_inv_sqrt`): eigenvalues <= max * d * eps count as zero."""
    d, eps = 5, torch.finfo(F64).eps
    lam = torch.tensor([1.0, 0.25, 3 * d * eps, 0.3 * d * eps, 0.0], dtype=F64)  # kept, kept, kept, dropped, dropped
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=F64))
    half, inv_half = G.sqrt_inv_sqrt(torch.diag(lam))
    want = torch.tensor([1.0, 2.0, (3 * d * eps) ** -0.5, 0.0, 0.0], dtype=F64)
    assert torch.allclose(torch.diag(inv_half), want, rtol=1e-12, atol=0)
    assert torch.allclose(torch.diag(half), lam.sqrt(), rtol=1e-12, atol=0)  # the root keeps every eigenvalue
    pinv = torch.linalg.pinv(torch.diag(lam), hermitian=True)  # the same rank rule as torch.linalg.pinv
    assert torch.allclose(inv_half @ inv_half, pinv, rtol=1e-12, atol=0)
    # a rank-2 covariance: no error; M^{+1/2} = pinv(M^{1/2}), and M^{+1/2} M M^{+1/2} projects onto range(M)
    v = torch.randn(d, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    singular = q @ (v @ v.T) @ q.T
    half, inv_half = G.sqrt_inv_sqrt(singular)
    assert _rel(inv_half, torch.linalg.pinv(half, hermitian=True, rtol=1e-8)) < 1e-8
    proj = inv_half @ singular @ inv_half
    assert _rel(proj @ proj, proj) < 1e-10 and round(float(torch.trace(proj))) == 2
    assert torch.equal(G.inv_sqrtm_psd(singular), inv_half)
    assert torch.equal(G.psd_sqrt(singular, inverse=True), inv_half)
    # the Monge map of a singular source: no error; it lives on range(S) and A S A = P T P
    T = _spd(d, 9)
    A = G.monge_map(singular, T)
    assert _rel(proj @ A @ proj, A) < 1e-10
    assert _rel(A @ singular @ A, proj @ T @ proj) < 1e-8


# --------------------------------------------------------------------------------------------
# The barycenter
# --------------------------------------------------------------------------------------------
def test_barycenter_of_identical_covariances_is_that_covariance() -> None:
    g = torch.Generator().manual_seed(13)
    a = torch.randn(4, 4, generator=g, dtype=F64)
    s = a @ a.T + torch.eye(4, dtype=F64)
    torch.testing.assert_close(G.wasserstein_barycenter(torch.stack([s, s, s])), s, atol=1e-9, rtol=1e-9)


def test_barycenter_is_the_fixed_point_and_matches_pot() -> None:
    covs = torch.stack([_spd(6, 30 + c, 1.0 + c) for c in range(4)])
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    S = G.wasserstein_barycenter(covs, w)
    half = G.sqrtm_psd(S)
    fixed = ((w / w.sum())[:, None, None] * G.sqrtm_psd(half @ covs @ half)).sum(0)
    assert _rel(fixed, S) < 1e-9           # sum_c w_c (S^{1/2} K_c S^{1/2})^{1/2} = S
    # commuting (diagonal) covariances: the barycenter is (sum_c w_c K_c^{1/2})^2
    diag = torch.diag_embed(torch.rand(3, 5, dtype=F64) + 0.1)
    want = ((torch.ones(3, dtype=F64) / 3)[:, None, None] * diag.sqrt()).sum(0) ** 2
    assert _rel(G.wasserstein_barycenter(diag), want) < 1e-10
    ot = pytest.importorskip("ot")
    _, C = ot.gaussian.bures_wasserstein_barycenter(np.zeros((4, 6)), covs.numpy(), weights=(w / w.sum()).numpy(),
                                                    num_iter=1000, eps=1e-12)
    assert _rel(S, torch.as_tensor(np.asarray(C))) < 1e-6


# --------------------------------------------------------------------------------------------
# Streaming class moments (moved from test_moments.py), pixels
# --------------------------------------------------------------------------------------------
def test_streaming_moments_match_reference() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(500, 12, generator=g) + 100.0            # a large offset: float64 sums matter
    y = torch.randint(0, 4, (500,), generator=g)
    fitter = G.MomentFitter(num_classes=4, dim=12)
    for i in range(0, 500, 64):
        fitter.update(x[i:i + 64], y[i:i + 64])
    res = fitter.finalize()
    means, covs, counts = M.class_moments_reference(x, y, 4)
    assert res.means.dtype == F64 and res.covs.shape == (4, 12, 12)
    assert torch.equal(res.counts, counts)
    assert torch.allclose(res.means, means, atol=1e-10)
    assert torch.allclose(res.covs, covs, atol=1e-9)
    for c in range(4):  # against torch.cov directly
        assert torch.allclose(res.covs[c], torch.cov(x[y == c].double().T), atol=1e-9)
    assert torch.allclose(res.overall_mean, x.double().mean(0), atol=1e-10)
    # images are flattened; bad input is a clear error
    img_fitter = G.MomentFitter(2, 3 * 2 * 2).update(torch.rand(6, 3, 2, 2), torch.tensor([0, 1] * 3))
    assert img_fitter.finalize().means.shape == (2, 12)
    with pytest.raises(ValueError, match="fewer than 2"):
        G.MomentFitter(3, 2).update(torch.rand(4, 2), torch.tensor([0, 0, 1, 1])).finalize()
    with pytest.raises(ValueError, match="labels"):
        G.MomentFitter(2, 2).update(torch.rand(2, 2), torch.tensor([0, 5]))


def test_fit_class_moments_batches_equal_one_pass() -> None:
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(300, 5, generator=g), torch.randint(0, 3, (300,), generator=g)
    a = G.fit_class_moments(x, y, 3, batch_size=37, device="cpu", progress=False)
    b = G.MomentFitter(3, 5).update(x, y).finalize()
    assert torch.allclose(a.covs, b.covs, atol=1e-12) and torch.equal(a.counts, b.counts)


def test_pixels_block_average() -> None:
    g = torch.Generator().manual_seed(4)
    imgs = (torch.rand(2, 3, 8, 8, generator=g) * 255).to(torch.uint8)
    blocks = imgs.double().reshape(2, 3, 2, 4, 2, 4).mean((3, 5)) / 255
    assert torch.allclose(G.pixels(imgs, 2).double(), blocks.reshape(2, -1), atol=1e-6)
    with pytest.raises(ValueError, match="channels first"):
        G.pixels(torch.rand(2, 8, 8, 3))
