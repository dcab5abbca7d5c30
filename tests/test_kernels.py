"""The GPU kernels against their PyTorch references.

Without a GPU, conftest.py sets TRITON_INTERPRET=1, so the Triton kernels run in Triton's CPU
interpreter on small shapes; on a machine with a GPU the same tests run the compiled kernels.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from course_utils import kernels
from course_utils import lens as L
from course_utils import moments as M
from course_utils.gaussian import sqrt_inv_sqrt
from course_utils.kernels import class_moments, lens_readout
from course_utils.kernels.spd import sqrt_inv_sqrt_newton

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="the triton package is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL_BLOCKS = (16, 32, 16)  # (tokens, vocab, width) tiles: shapes below are not multiples of them


def _lens_inputs(R: int, N: int, D: int, V: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    normed = torch.randn(R, N, D, generator=g)
    W = torch.randn(V, D, generator=g) / D ** 0.25
    targets = torch.randint(0, V, (N,), generator=g)
    return normed.to(DEVICE), W.to(DEVICE), targets.to(DEVICE)


def _assert_same_stats(got, want, with_targets: bool) -> None:
    """`got`, `want`: `LensStats` or the kernels' `LensReadout` (the same fields)."""
    for name in ("entropy", "topk_probs", "kl_to_final"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape, name
        assert torch.allclose(a, b, atol=2e-4, rtol=1e-4), (name, float((a - b).abs().max()))
    assert torch.equal(got.topk_ids, want.topk_ids)
    assert got.kl_to_final[-1].abs().max() == 0
    if with_targets:
        assert torch.allclose(got.target_logprob, want.target_logprob, atol=2e-4)
        assert torch.equal(got.target_rank, want.target_rank)
    else:
        assert got.target_logprob is None and got.target_rank is None


@needs_triton
@pytest.mark.parametrize("R,N,D,V,k,with_targets", [
    (3, 37, 40, 301, 5, True),     # ragged in every tile dimension
    (2, 16, 16, 32, 1, True),      # exactly one tile
    (4, 5, 24, 97, 3, False),      # fewer tokens than a tile, no targets
])
def test_fused_lens_matches_the_reference(R, N, D, V, k, with_targets):
    normed, W, targets = _lens_inputs(R, N, D, V)
    t = targets if with_targets else None
    want = lens_readout.lens_readout_reference(normed, W, targets=t, k=k)
    got = lens_readout.lens_readout_triton(normed, W, targets=t, k=k, blocks=SMALL_BLOCKS)
    assert isinstance(got, lens_readout.LensReadout) and got.entropy.device == normed.device
    _assert_same_stats(got, want, with_targets)
    _assert_same_stats(L.LensStats.of(got), L.lens_stats_reference(normed, W, targets=t, k=k), with_targets)


@needs_triton
def test_fused_lens_on_peaked_logits_and_through_lens_stats():
    """Large logits (a confident model) stress the online log-sum-exp; dispatch by name works."""
    normed, W, targets = _lens_inputs(3, 20, 32, 200, seed=1)
    normed = normed * 30
    want = L.lens_stats_reference(normed, W, targets=targets, k=4)
    got = L.lens_stats(normed, W, targets=targets, k=4, backend="triton", blocks=SMALL_BLOCKS)
    assert torch.isfinite(got.entropy).all() and torch.isfinite(got.kl_to_final).all()
    _assert_same_stats(got, want, True)


def test_auto_dispatch_uses_the_kernel_only_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(lens_readout, "lens_readout_triton", lambda *a, **kw: calls.append(1))
    monkeypatch.setattr(class_moments, "class_power_sums_triton", lambda *a, **kw: calls.append(2))
    normed, W = torch.randn(2, 3, 8), torch.randn(11, 8)
    L.lens_stats(normed, W, k=2)  # CPU tensor: the reference
    class_moments.class_power_sums(torch.rand(5, 3), torch.tensor([0, 1, 0, 1, 1]), 2)
    assert calls == []
    assert kernels.use_triton(normed) is False
    assert kernels.pick_backend(normed, "auto", "test") == "reference"
    assert kernels.pick_backend(normed, "reference", "test") == "reference"
    monkeypatch.setattr(kernels, "use_triton", lambda x: True)  # as on a GPU with Triton
    assert kernels.pick_backend(normed, "auto", "test") == "triton"
    lens_readout.lens_readout(normed, W, k=2)
    class_moments.class_power_sums(torch.rand(5, 3), torch.tensor([0, 1, 0, 1, 1]), 2)
    assert calls == [1, 2]


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA tensors.*backend='reference'"):
        kernels.require_triton(torch.zeros(2), "lens_stats")


# ------------------------------------------------------------------------------------------------
# Newton–Schulz square roots
# ------------------------------------------------------------------------------------------------
def _spd(b: int, d: int, cond: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(b, d, d, generator=g, dtype=torch.float64))
    evals = torch.logspace(0, -np.log10(cond), d, dtype=torch.float64)
    return (q * evals[None, None, :]) @ q.transpose(-1, -2)


def test_newton_schulz_matches_eigh_on_conditioned_matrices():
    A = _spd(3, 24, cond=1e4)
    root, inv_root, residual = sqrt_inv_sqrt_newton(A)
    assert residual.max() < 1e-5
    want_root, want_inv = sqrt_inv_sqrt(A)

    def rel(a, b):
        return float(((a - b).norm(dim=(-2, -1)) / b.norm(dim=(-2, -1))).max())

    assert rel(root, want_root) < 1e-5
    assert rel(inv_root, want_inv) < 1e-4
    assert rel(root @ root, A) < 1e-5
    assert torch.equal(root, root.transpose(-1, -2))


def test_newton_schulz_reports_when_it_has_not_converged():
    A = _spd(2, 16, cond=1e14)
    _, _, residual = sqrt_inv_sqrt_newton(A, max_steps=8, refine_steps=0)
    assert not bool((residual < 1e-5).all())
    _, _, residual = sqrt_inv_sqrt_newton(_spd(1, 16, cond=1e12))  # diverges in float32: reported
    assert not bool(residual < 1e-5)


def test_newton_monge_maps_match_pot_and_fall_back_where_needed():
    ot = pytest.importorskip("ot")
    d = 12
    covs = torch.cat([_spd(2, d, cond=1e2, seed=1), _spd(1, d, cond=1e11, seed=2)])  # class 2: too hard
    moments = M.ClassMoments(torch.zeros(3, d, dtype=torch.float64), covs, torch.tensor([100, 100, 100]))
    pairs = [(0, 1), (1, 0), (2, 0), (0, 2)]
    kw = dict(ridge=0.0, dtype=torch.float64, progress=False)
    got = M.monge_maps(moments, pairs, method="newton", **kw)
    for i, (s, t) in enumerate(pairs[:2]):  # Newton–Schulz converged: the maps are POT's
        A_pot, _ = ot.gaussian.bures_wasserstein_mapping(np.zeros(d), np.zeros(d), covs[s].numpy(), covs[t].numpy())
        err = np.linalg.norm(got[i].numpy() - A_pot) / np.linalg.norm(A_pot)
        assert err < 1e-5, (s, t, err)
    with_eigh = M.monge_maps(moments, pairs[2:], method="eigh", **kw)  # diverged: eigh took over
    rel = (got[2:] - with_eigh).norm(dim=(-2, -1)) / with_eigh.norm(dim=(-2, -1))
    assert rel.max() < 1e-6, rel
    _, _, residual = sqrt_inv_sqrt_newton(covs[2])
    assert not bool(residual < M.NEWTON_TOL)


def test_unknown_root_method_is_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        M.class_roots(_spd(1, 4, 10.0), method="svd")


# ------------------------------------------------------------------------------------------------
# Streaming class-conditional coordinate moments
# ------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("N,d,C", [(203, 37, 3), (64, 64, 10), (5, 3, 2)])
def test_power_sums_kernel_matches_the_reference(N, d, C):
    from course_utils.kernels.class_moments import class_power_sums, class_power_sums_reference

    g = torch.Generator().manual_seed(N)
    x = torch.rand(N, d, generator=g).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=g).to(DEVICE)
    shift = torch.full((d,), 0.5, device=DEVICE)
    want, want_n = class_power_sums_reference(x, y, C, shift)
    got, got_n = class_power_sums(x, y, C, shift, backend="triton", blocks=(16, 16))
    assert torch.equal(got_n, want_n)
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-5), float((got.double() - want).abs().max())


def test_coordinate_moments_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, 4, generator=g) * 2 + 5, torch.rand(200, 4, generator=g) ** 3])
    y = torch.cat([torch.zeros(300, dtype=torch.long), torch.ones(200, dtype=torch.long)])
    got = M.coordinate_moments(x, y, 2, backend="reference")
    for c in range(2):
        xc = x[y == c].double().numpy()
        assert np.allclose(got.mean[c], xc.mean(0), atol=1e-10)
        assert np.allclose(got.var[c], xc.var(0), atol=1e-10)
        assert np.allclose(got.skew[c], stats.skew(xc, axis=0), atol=1e-8)
        assert np.allclose(got.kurtosis[c], stats.kurtosis(xc, axis=0, fisher=False), atol=1e-8)
    assert got.skew[1].min() > 0.5  # cubed uniforms are right-skewed; Gaussians are not
    assert got.skew[0].abs().max() < 0.5


def test_power_sums_refuse_bad_labels():
    from course_utils.kernels.class_moments import class_power_sums

    with pytest.raises(ValueError, match=r"labels must be in 0\.\.2"):
        class_power_sums(torch.zeros(4, 2), torch.tensor([0, 1, 2, 3]), 3)
    with pytest.raises(ValueError, match="flatten images first"):
        class_power_sums(torch.zeros(4, 3, 2, 2), torch.zeros(4, dtype=torch.long), 3)


@needs_triton
def test_coordinate_moments_through_the_kernel():
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(150, 6, generator=g).to(DEVICE), torch.randint(0, 3, (150,), generator=g).to(DEVICE)
    want = M.coordinate_moments(x, y, 3, backend="reference")
    got = M.coordinate_moments(x, y, 3, backend="triton")
    for name in ("mean", "var", "skew", "kurtosis"):
        assert torch.allclose(getattr(got, name).double(), getattr(want, name), atol=1e-4), name


def _kernels_fail(monkeypatch) -> None:
    """A machine where the kernels should run (CUDA + Triton) but fail to compile."""
    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(kernels, "use_triton", lambda x: True)
    monkeypatch.setattr(kernels, "require_triton", lambda x, what: None)
    monkeypatch.setattr(lens_readout, "lens_readout_triton", broken)
    monkeypatch.setattr(class_moments, "class_power_sums_triton", broken)


def test_auto_dispatch_falls_back_with_a_warning_when_a_kernel_fails(monkeypatch):
    _kernels_fail(monkeypatch)
    normed, W = torch.randn(2, 3, 8), torch.randn(11, 8)
    with pytest.warns(RuntimeWarning, match="'triton' backend failed.*PTX assembly failed"):
        got = L.lens_stats(normed, W, k=2)
    assert torch.equal(got.topk_ids, L.lens_stats_reference(normed, W, k=2).topk_ids)
    with pytest.raises(RuntimeError, match="PTX"):  # asked for by name: no silent fallback
        L.lens_stats(normed, W, k=2, backend="triton")


def test_every_kernel_falls_back_through_the_one_dispatch_rule(monkeypatch):
    _kernels_fail(monkeypatch)
    x, y = torch.rand(7, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2, 2])
    with pytest.warns(RuntimeWarning, match="class_power_sums: the 'triton' backend failed.*PTX"):
        sums, counts = class_moments.class_power_sums(x, y, 3)
    want = class_moments.class_power_sums_reference(x, y, 3)
    assert torch.equal(sums, want.sums) and torch.equal(counts, want.counts)
    with pytest.raises(RuntimeError, match="PTX"):
        class_moments.class_power_sums(x, y, 3, backend="triton")
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.1"):  # bad input: an error, no fallback
        class_moments.class_power_sums(x, y, 2)


def test_dispatch_refuses_unknown_backends_and_impossible_triton(monkeypatch):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*'auto'.*'reference'.*'triton'"):
        kernels.dispatch(x, "cuda", reference=lambda: 0, triton=lambda: 1, what="test")
    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    with pytest.raises(RuntimeError, match="test: the Triton backend runs on CUDA tensors"):
        kernels.dispatch(x, "triton", reference=lambda: 0, triton=lambda: 1, what="test")
    assert kernels.dispatch(x, "auto", reference=lambda: 0, triton=lambda: 1, what="test") == 0
