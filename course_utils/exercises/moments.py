"""Exercises of 03_moment_editing: class moments, the mean shift, the symmetric square root, the
Gaussian Monge map, the OT edit and PSNR."""
from __future__ import annotations

import torch

from course_utils import moments as M
from course_utils.checks import Case, diagnose, exercise, mistake
from course_utils.checks import generator as _gen


def _nan_aware(expected, actual, loose: bool) -> str | None:
    """`diagnose` (which already counts NaN in both as equal), and with `loose` any floating dtype of
    the answer is accepted."""
    def fix(e, a):
        if not (isinstance(e, torch.Tensor) and isinstance(a, torch.Tensor)):
            return e, a
        if loose and e.is_floating_point() and a.is_floating_point():
            a = a.to(e.dtype)
        return e, a
    if isinstance(expected, tuple) and isinstance(actual, (tuple, list)) and len(expected) == len(actual):
        pairs = [fix(e, a) for e, a in zip(expected, actual)]
        expected, actual = tuple(e for e, _ in pairs), tuple(a for _, a in pairs)
    else:
        expected, actual = fix(expected, actual)
    return diagnose(expected, actual, rtol=1e-4, atol=1e-6 if loose else 1e-5)


def _loose_dtype(expected, actual) -> str | None:
    """Like `diagnose`, but any floating dtype of the answer (float32 or float64) is accepted."""
    return _nan_aware(expected, actual, loose=True)


def _strict_dtype(expected, actual) -> str | None:
    """Like `diagnose` (dtypes must match)."""
    return _nan_aware(expected, actual, loose=False)


def _spd(d: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    x = torch.randn(d, d + 2, generator=g, dtype=torch.float64)
    return scale * (x @ x.T / (d + 2) + 0.1 * torch.eye(d, dtype=torch.float64))


# --- 1. streaming class moments -------------------------------------------------------------
def _batches(g: torch.Generator, sizes: list[int], d: int, c: int, offset: float, spread: float):
    out = []
    for k, b in enumerate(sizes):
        y = torch.arange(b) % c if k == 0 else torch.randint(0, c, (b,), generator=g)
        x = offset + spread * torch.randn(b, d, generator=g) + 0.3 * y[:, None].float()
        out.append((x.float(), y))
    return out


def _moment_cases() -> list[Case]:
    g = _gen(31)
    return [
        Case("3 batches, 3 classes, d=4, pixels near 0.5", (_batches(g, [12, 9, 7], 4, 3, 0.5, 0.1), 3)),
        Case("one batch, 2 classes, d=1", (_batches(g, [6], 1, 2, 0.2, 0.05), 2)),
        Case("values near 1000 with spread 1 (needs float64 sums)",
             (_batches(g, [200, 200, 200], 3, 2, 1000.0, 1.0), 2)),
    ]


@exercise("moments.class_moments", title="Streaming class-conditional means and covariances",
          hints=('Stream the data: keep running per-class sums you can combine at the end, in enough '
                 'precision for values near 1000.',
                 'Per class keep the count, the sum of x and the sum of outer products, in float64; '
                 'at the end form the mean and the unbiased (n_c - 1) covariance.'),
          cases=_moment_cases, compare=_strict_dtype,
          hint="μ_c = (1/n_c) Σ_{i: y_i = c} x_i ∈ ℝ^d and Σ_c = (Σ_{i: y_i = c} x_i x_iᵀ − n_c μ_c μ_cᵀ) / (n_c"
               " − 1) ∈ ℝ^{d×d}, accumulated batch by batch in float64: [C, d] and [C, d, d].")
def class_moments(batches, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """batches: iterable of (x [b, d], y int [b]) -> (means float64 [C, d], covs float64 [C, d, d]),
    covariances unbiased (divided by n_c - 1)."""
    fitter = None
    for x, y in batches:
        if fitter is None:
            fitter = M.MomentFitter(num_classes, x.shape[1])
        fitter.update(x, y)
    assert fitter is not None, "class_moments needs at least one batch"
    result = fitter.finalize()
    return result.means, result.covs


def _streaming(batches, num_classes, *, center=True, ddof=1, dtype=torch.float64, last_only=False):
    n = s = ss = None
    for x, y in batches:
        d = x.shape[1]
        if n is None or last_only:
            n = torch.zeros(num_classes, dtype=dtype)
            s = torch.zeros(num_classes, d, dtype=dtype)
            ss = torch.zeros(num_classes, d, d, dtype=dtype)
        assert s is not None and ss is not None, "the sums are set together with the counts"
        x = x.to(dtype)
        for c in range(num_classes):
            xc = x[y == c]
            n[c] += len(xc)
            s[c] += xc.sum(0)
            ss[c] += xc.T @ xc
    assert n is not None and s is not None and ss is not None, "_streaming needs at least one batch"
    mu = s / n[:, None]
    if center:
        cov = (ss - n[:, None, None] * mu[:, :, None] * mu[:, None, :]) / (n - ddof)[:, None, None]
    else:
        cov = ss / (n - ddof)[:, None, None]
    return mu.double(), cov.double()


def _moments_variant(batches, num_classes, *, first_only=False, global_centre=False, batch_means=False):
    batches = list(batches)[:1] if first_only else list(batches)
    xs = torch.cat([x for x, _ in batches]).double()
    ys = torch.cat([y for _, y in batches])
    means, covs = [], []
    centre_all = xs.mean(0)
    for c in range(num_classes):
        xc = xs[ys == c]
        mu = xc.mean(0)
        d = xc - (centre_all if global_centre else mu)
        covs.append(d.T @ d / (len(xc) - 1))
        if batch_means:
            mu = torch.stack([x.double()[y == c].mean(0) for x, y in batches if (y == c).any()]).mean(0)
        means.append(mu)
    return torch.stack(means), torch.stack(covs)


@mistake("moments.class_moments", "the mean of the per-batch means",
         "Batches have different sizes and class counts: accumulate sums and counts, and divide once at the end.")
def _moments_batch_means(batches, num_classes):
    return _moments_variant(batches, num_classes, batch_means=True)


@mistake("moments.class_moments", "covariance around the overall mean",
         "Each class's covariance is around ITS OWN mean mu_c.")
def _moments_global_centre(batches, num_classes):
    return _moments_variant(batches, num_classes, global_centre=True)


@mistake("moments.class_moments", "only the first batch counted",
         "Accumulate over EVERY batch of the iterable before finishing.")
def _moments_first_batch(batches, num_classes):
    return _moments_variant(batches, num_classes, first_only=True)


@mistake("moments.class_moments", "centring forgotten (the second moment E[x x^T], not the covariance)",
         "Subtract the mean: Sigma = (sum x x^T - n mu mu^T) / (n - 1). Without it you get E[x x^T], "
         "which mixes the mean into the covariance.")
def _moments_uncentred(batches, num_classes):
    return _streaming(batches, num_classes, center=False)


@mistake("moments.class_moments", "divided by n instead of n - 1",
         "Use the unbiased covariance, divided by n_c - 1 (as torch.cov does), not by n_c.")
def _moments_biased(batches, num_classes):
    return _streaming(batches, num_classes, ddof=0)


@mistake("moments.class_moments", "only the last batch counted",
         "Create the accumulators once, BEFORE the loop over batches; inside the loop only add to them.")
def _moments_last_batch(batches, num_classes):
    return _streaming(batches, num_classes, last_only=True)


@mistake("moments.class_moments", "sums accumulated in float32",
         "Accumulate in float64 (x.double()): sum x x^T - n mu mu^T subtracts two large, nearly equal numbers, "
         "and float32 keeps only about 7 digits.")
def _moments_float32(batches, num_classes):
    return _streaming(batches, num_classes, dtype=torch.float32)


@mistake("moments.class_moments", "one mean and covariance for all classes",
         "Select each class's rows (x[y == c]) and keep separate sums for every class.")
def _moments_pooled(batches, num_classes):
    xs = torch.cat([x for x, _ in batches]).double()
    mu, cov = xs.mean(0), torch.cov(xs.T).reshape(xs.shape[1], xs.shape[1])
    return mu.expand(num_classes, -1).clone(), cov.expand(num_classes, -1, -1).clone()


# --- 2. mean shift ----------------------------------------------------------------------------
def _shift_cases() -> list[Case]:
    g = _gen(32)
    return [
        Case("5 pixel vectors of d=6, some edits leave [0, 1]",
             (torch.rand(5, 6, generator=g), torch.rand(6, generator=g) * 0.6, torch.rand(6, generator=g) * 0.6)),
        Case("one vector of d=3", (torch.tensor([[0.0, 0.5, 1.0]]), torch.tensor([0.5, 0.5, 0.5]),
                                   torch.tensor([0.4, 0.9, 0.2]))),
        Case("8 vectors of d=12", (torch.rand(8, 12, generator=g), torch.rand(12, generator=g),
                                   torch.rand(12, generator=g))),
    ]


@exercise("moments.mean_shift", title="First-order edit: shift the class mean", cases=_shift_cases,
          hints=('Move the source mean onto the target mean, and keep the result a valid image.',
                 'Add the difference target mean minus source mean to every vector, then clamp to [0,'
                 ' 1].'),
          compare=_loose_dtype,
          hint="x' = clip_[0,1](x + μ_t − μ_s): [N, d] -> [N, d].")
def mean_shift(x: torch.Tensor, mu_s: torch.Tensor, mu_t: torch.Tensor) -> torch.Tensor:
    """x: [N, d] in [0, 1]; mu_s, mu_t: [d] -> [N, d], x + mu_t - mu_s clamped to [0, 1]."""
    return M.mean_shift(x, mu_s, mu_t)


@mistake("moments.mean_shift", "rescaled to [0, 1] instead of clamped",
         "Rescaling changes every pixel; clamp only the values that left [0, 1].")
def _shift_rescaled(x, mu_s, mu_t):
    y = x + mu_t - mu_s
    return (y - y.min()) / (y.max() - y.min())


@mistake("moments.mean_shift", "clamped below only",
         "Clamp on both sides: pixel values above 1 are invalid too.")
def _shift_clamp_min(x, mu_s, mu_t):
    return (x + mu_t - mu_s).clamp(min=0)


@mistake("moments.mean_shift", "sources and targets swapped",
         "The edit moves the SOURCE class's mean onto the TARGET's: add mu_t and subtract mu_s.")
def _shift_swapped(x, mu_s, mu_t):
    return (x + mu_s - mu_t).clamp(0, 1)


@mistake("moments.mean_shift", "not clamped to [0, 1]",
         "Pixels live in [0, 1]: clamp the edited vector with .clamp(0, 1).")
def _shift_unclamped(x, mu_s, mu_t):
    return x + mu_t - mu_s


@mistake("moments.mean_shift", "the source mean removed but the target mean not added",
         "Subtracting mu_s centres x; then add mu_t: x - mu_s + mu_t.")
def _shift_centred_only(x, mu_s, mu_t):
    return (x - mu_s).clamp(0, 1)


@mistake("moments.mean_shift", "every vector replaced by the target mean",
         "Keep the image: add the DIFFERENCE of the means to x, do not replace x by mu_t.")
def _shift_replaced(x, mu_s, mu_t):
    return mu_t.expand_as(x).clamp(0, 1).clone()


# --- 3. symmetric square root ---------------------------------------------------------------
def _sqrt_cases() -> list[Case]:
    g = _gen(33)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    singular = q @ torch.diag(torch.tensor([2.0, 1.0, 0.5, -1e-13, -1e-12], dtype=torch.float64)) @ q.T
    return [
        Case("an SPD 4x4 matrix", (_spd(4, g),)),
        Case("a diagonal 3x3 matrix", (torch.diag(torch.tensor([4.0, 9.0, 0.25], dtype=torch.float64)),)),
        Case("a singular 5x5 covariance whose zero eigenvalues came out slightly negative (round-off)",
             (singular,)),
        Case("a batch of two SPD 3x3 matrices", (torch.stack([_spd(3, g), _spd(3, g, 4.0)]),)),
    ]


@exercise("moments.sqrtm_psd", title="The symmetric square root of a covariance", cases=_sqrt_cases,
          hints=('The symmetric square root acts on the eigenvalues, not on the entries.',
                 'Diagonalise with eigh, take square roots of the eigenvalues (clamped at 0 against '
                 'round-off), and rebuild with the same eigenvectors on both sides; it must work for '
                 'a batch.'),
          compare=_loose_dtype,
          hint="M = V diag(λ) Vᵀ (eigendecomposition) ⇒ M^{1/2} = V diag(√max(λ, 0)) Vᵀ: [..., d, d] -> [..., d,"
               " d], symmetric.")
def sqrtm_psd(mat: torch.Tensor) -> torch.Tensor:
    """mat: symmetric PSD [..., d, d] -> its symmetric square root [..., d, d]."""
    return M.sqrtm_psd(mat)


@mistake("moments.sqrtm_psd", "eigenvectors on both sides without a transpose (V diag V)",
         "Rebuild as V diag(root) V^T: the second factor is the TRANSPOSE of V.")
def _sqrt_no_transpose(mat):
    evals, vecs = torch.linalg.eigh(mat)
    return (vecs * evals.clamp(min=0).sqrt()[..., None, :]) @ vecs


@mistake("moments.sqrtm_psd", "the square roots of the eigenvalues only",
         "The eigenvalues' roots must be put back in the eigenvector basis: V diag(root) V^T.")
def _sqrt_evals_only(mat):
    return torch.diag_embed(torch.linalg.eigvalsh(mat).clamp(min=0).sqrt())


@mistake("moments.sqrtm_psd", "a Cholesky factor (a square root, but not the symmetric one)",
         "A Cholesky factor L has L L^T = mat but is lower-triangular, not symmetric, and it is not the "
         "square root the Monge formula needs. Use eigh: V diag(sqrt(lambda)) V^T.")
def _sqrt_cholesky(mat):
    return torch.linalg.cholesky(mat)


@mistake("moments.sqrtm_psd", "the square root of every entry",
         "mat.sqrt() takes the root entry by entry. The MATRIX square root R satisfies R @ R = mat: take the root "
         "of the eigenvalues, V diag(sqrt(lambda)) V^T.")
def _sqrt_entrywise(mat):
    return mat.sqrt()


@mistake("moments.sqrtm_psd", "eigenvalues not square-rooted",
         "V diag(lambda) V^T rebuilds the matrix itself: take sqrt of the eigenvalues.")
def _sqrt_no_root(mat):
    evals, evecs = torch.linalg.eigh(mat)
    return (evecs * evals[..., None, :]) @ evecs.transpose(-1, -2)


@mistake("moments.sqrtm_psd", "eigenvectors on the wrong side (V^T diag V)",
         "torch.linalg.eigh returns the eigenvectors as COLUMNS of V: the root is V diag(sqrt(lambda)) V^T.")
def _sqrt_wrong_side(mat):
    evals, evecs = torch.linalg.eigh(mat)
    return evecs.transpose(-1, -2) @ torch.diag_embed(evals.clamp_min(0).sqrt()) @ evecs


@mistake("moments.sqrtm_psd", "tiny negative eigenvalues not clamped (NaN)",
         "Round-off makes the zero eigenvalues of a singular covariance slightly negative, and sqrt gives NaN: "
         "use evals.clamp(min=0) before the square root.")
def _sqrt_unclamped(mat):
    evals, evecs = torch.linalg.eigh(mat)
    return (evecs * evals.sqrt()[..., None, :]) @ evecs.transpose(-1, -2)


# --- 4. the Gaussian Monge map --------------------------------------------------------------
def _monge_cases() -> list[Case]:
    g = _gen(34)
    return [
        Case("random SPD 3x3 source and target", (_spd(3, g), _spd(3, g, 2.0))),
        Case("diagonal 2x2: A = sqrt(Sigma_t / Sigma_s)",
             (torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)),
              torch.diag(torch.tensor([1.0, 9.0], dtype=torch.float64)))),
        Case("random SPD 6x6, different scales", (_spd(6, g, 0.01), _spd(6, g, 3.0))),
        Case("a class to itself: the identity", (_spd(4, g),) * 2),
    ]


def _map_is_symmetric(answer, **_: object) -> str | None:
    g = _gen(35)
    A = answer(_spd(5, g), _spd(5, g, 2.0))
    if not torch.allclose(A, A.transpose(-1, -2), rtol=1e-6, atol=1e-8):
        return "your map is not symmetric; the optimal map between Gaussians always is"
    return None


@exercise("moments.monge_map", title="The Gaussian Monge map", cases=_monge_cases, compare=_loose_dtype,
          hints=('The optimal map between centred Gaussians is symmetric and sends the source '
                 "covariance to the target's; it is built from symmetric square roots.",
                 'Sandwich the target covariance between symmetric square roots of the source, take '
                 'the square root of that, and sandwich the result between inverse square roots of '
                 'the source.'),
          validate=_map_is_symmetric,
          hint="A = S^{-1/2} (S^{1/2} T S^{1/2})^{1/2} S^{-1/2} with S = Σ_s, T = Σ_t and every root the "
               "symmetric one: [d, d], [d, d] -> [d, d].")
def monge_map(cov_s: torch.Tensor, cov_t: torch.Tensor) -> torch.Tensor:
    """cov_s, cov_t: SPD [d, d] -> A [d, d], the optimal map N(0, cov_s) -> N(0, cov_t)."""
    return M.monge_map(cov_s, cov_t)


@mistake("moments.monge_map", "element-wise ratio of the covariances",
         "Only diagonal covariances allow an entry-by-entry formula; in general you need matrix square roots.")
def _monge_ratio(cov_s, cov_t):
    return (cov_t / cov_s).abs().sqrt()


@mistake("moments.monge_map", "S^{-1} on one side only",
         "The formula is symmetric: S^{-1/2} on BOTH sides of the middle square root.")
def _monge_one_side(cov_s, cov_t):
    rs = M.sqrtm_psd(cov_s)
    return torch.linalg.inv(cov_s) @ M.sqrtm_psd(rs @ cov_t @ rs)


@mistake("moments.monge_map", "a Cholesky factor used as the square root",
         "Every square root in the formula must be the SYMMETRIC one (eigh), not a Cholesky factor; "
         "otherwise A is not symmetric and not the optimal map.")
def _monge_cholesky(cov_s, cov_t):
    L = torch.linalg.cholesky(cov_s)
    L_inv = torch.linalg.inv(L)
    return L_inv @ torch.linalg.cholesky(L.T @ cov_t @ L) @ L_inv


@mistake("moments.monge_map", "the inverse square roots are missing",
         "(S^{1/2} T S^{1/2})^{1/2} is only the middle of the formula: sandwich it between S^{-1/2} on both sides.")
def _monge_no_inverse(cov_s, cov_t):
    s = M.sqrtm_psd(cov_s)
    return M.sqrtm_psd(s @ cov_t @ s)


@mistake("moments.monge_map", "sources and targets swapped (the map from target to source)",
         "The outer roots are of the SOURCE covariance: A = S^{-1/2} (S^{1/2} T S^{1/2})^{1/2} S^{-1/2} with "
         "S = cov_s. Swapping them gives the inverse map.")
def _monge_swapped(cov_s, cov_t):
    return M.monge_map(cov_t, cov_s)


@mistake("moments.monge_map", "whiten then re-colour (T^{1/2} S^{-1/2})",
         "T^{1/2} S^{-1/2} also turns N(0, S) into N(0, T), but it is not symmetric and moves points further "
         "than needed; the optimal map is S^{-1/2} (S^{1/2} T S^{1/2})^{1/2} S^{-1/2}.")
def _monge_whiten_colour(cov_s, cov_t):
    return M.sqrtm_psd(cov_t) @ M.inv_sqrtm_psd(cov_s)


@mistake("moments.monge_map", "square roots where the inverse square roots belong",
         "The outer factors are S^{-1/2} (inverse square roots), not S^{1/2}.")
def _monge_no_inv(cov_s, cov_t):
    s = M.sqrtm_psd(cov_s)
    return s @ M.sqrtm_psd(s @ cov_t @ s) @ s


# --- 5. the OT edit -------------------------------------------------------------------------
def _edit_cases() -> list[Case]:
    out = []
    for label, seed, n, d in [("6 vectors, d=4", 36, 6, 4), ("one vector, d=2", 37, 1, 2),
                              ("10 vectors, d=8", 38, 10, 8)]:
        g = _gen(seed)
        A = M.monge_map(_spd(d, g), _spd(d, g, 2.0)).float()
        out.append(Case(label, (torch.rand(n, d, generator=g), 0.3 + 0.4 * torch.rand(d, generator=g),
                                0.3 + 0.4 * torch.rand(d, generator=g), A)))
    return out


@exercise("moments.gaussian_edit", title="Second-order edit: apply the Monge map", cases=_edit_cases,
          hints=('Three steps, in this order: relative to the source, transform, then relative to the'
                 ' target.',
                 'Subtract the source mean, apply A (row vectors), add the target mean; no clamping.'),
          compare=_loose_dtype,
          hint="x' = μ_t + A (x − μ_s) for each vector x (rows: x' = μ_t + (x − μ_s) Aᵀ): [N, d] -> [N, d], no "
               "clamping.")
def gaussian_edit(x: torch.Tensor, mu_s: torch.Tensor, mu_t: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """x: [N, d]; mu_s, mu_t: [d]; A: symmetric [d, d] -> [N, d], mu_t + A (x - mu_s) for each row."""
    return M.gaussian_edit(x, mu_s, mu_t, A)


@mistake("moments.gaussian_edit", "centred after mapping",
         "Subtract mu_s BEFORE applying A: A acts on the deviation from the source mean.")
def _edit_centre_after(x, mu_s, mu_t, A):
    return mu_t + x @ A - mu_s


@mistake("moments.gaussian_edit", "moved back to the source mean",
         "After the map, add the TARGET mean mu_t.")
def _edit_source_mean(x, mu_s, mu_t, A):
    return mu_s + (x - mu_s) @ A


@mistake("moments.gaussian_edit", "clamped to [0, 1]",
         "This edit works on features, not on pixels: do not clamp.")
def _edit_clamped(x, mu_s, mu_t, A):
    return (mu_t + (x - mu_s) @ A).clamp(0, 1)


@mistake("moments.gaussian_edit", "centring forgotten (A applied to x, not to x - mu_s)",
         "The map acts on the CENTRED image: subtract mu_s before multiplying by A.")
def _edit_uncentred(x, mu_s, mu_t, A):
    return mu_t + x @ A


@mistake("moments.gaussian_edit", "the target mean not added back",
         "After mapping the centred image, add the target's mean mu_t.")
def _edit_no_target(x, mu_s, mu_t, A):
    return (x - mu_s) @ A


@mistake("moments.gaussian_edit", "sources and targets swapped",
         "Centre on the SOURCE mean and add the TARGET mean: mu_t + (x - mu_s) A.")
def _edit_swapped(x, mu_s, mu_t, A):
    return mu_s + (x - mu_t) @ A


@mistake("moments.gaussian_edit", "the map A left out (a mean shift)",
         "That is the first-order edit. Multiply the centred image by A: mu_t + (x - mu_s) @ A.")
def _edit_mean_only(x, mu_s, mu_t, A):
    return x + mu_t - mu_s


# --- 6. PSNR --------------------------------------------------------------------------------
def _psnr_cases() -> list[Case]:
    g = _gen(39)
    x = torch.rand(4, 3, 8, 8, generator=g)
    y = (x + 0.05 * torch.randn(4, 3, 8, 8, generator=g)).clamp(0, 1)
    x2 = torch.rand(1, 3, 4, 4, generator=g)
    x3 = torch.rand(3, 3, 5, 5, generator=g)
    return [
        Case("4 images with a little noise", (x, y)),
        Case("one image, large change", (x2, 1 - x2)),
        Case("3 images, differences of different sizes",
             (x3, (x3 + torch.tensor([0.01, 0.1, 0.3])[:, None, None, None]).clamp(0, 1))),
    ]


@exercise("moments.psnr", title="How big is an edit? PSNR", cases=_psnr_cases, compare=_loose_dtype,
          hints=('PSNR is a log of the ratio of the peak power to the error power, one number per '
                 'image.',
                 "Mean squared difference over each image's channels and pixels; peak 1 for images in"
                 ' [0, 1]; 10 times the base-10 log of peak^2 / mse.'),
          hint="PSNR_n = 10 · log₁₀(1 / MSE_n), MSE_n = the mean of (x_n − y_n)² over image n's channels and "
               "pixels (peak 1): [N, C, H, W] ×2 -> [N].")
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x, y: images [N, 3, H, W] in [0, 1] -> [N], 10 log10(1 / mean squared difference) per image, in dB."""
    return M.psnr(x, y)


@mistake("moments.psnr", "20 log10 of a power ratio",
         "20 log10 is for amplitude ratios; 1 / MSE is a POWER ratio, which takes 10 log10.")
def _psnr_20(x, y):
    return 20 * torch.log10(1 / ((x - y) ** 2).flatten(1).mean(1))


@mistake("moments.psnr", "sum of squared differences, not the mean",
         "Use the MEAN squared error over each image's entries, so that PSNR does not depend on the image size.")
def _psnr_sum(x, y):
    return 10 * torch.log10(1 / ((x - y) ** 2).flatten(1).sum(1))


@mistake("moments.psnr", "peak 255 for images in [0, 1]",
         "These images are in [0, 1], so the peak value is 1: 10 log10(1 / mse), not 10 log10(255^2 / mse).")
def _psnr_255(x, y):
    return M.psnr(x, y, peak=255.0)


@mistake("moments.psnr", "natural log instead of log10",
         "Decibels use log base 10: torch.log10.")
def _psnr_ln(x, y):
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return 10 * torch.log(1 / mse)


@mistake("moments.psnr", "one number for the whole batch",
         "Average the squared difference over each image's pixels only (flatten(1).mean(1)), "
         "giving one PSNR per image.")
def _psnr_batch(x, y):
    return 10 * torch.log10(1 / ((x - y) ** 2).mean())


@mistake("moments.psnr", "RMSE in place of MSE",
         "PSNR is 10 log10(peak^2 / MSE): the mean of the SQUARED differences, without a square root "
         "(or equivalently 20 log10(peak / RMSE)).")
def _psnr_rmse(x, y):
    rmse = ((x - y) ** 2).flatten(1).mean(1).sqrt()
    return 10 * torch.log10(1 / rmse)


# --- hidden cases (the grader's only) -----------------------------------------------------------
# Drawn by `python -m course_utils.grade` from a seed it keeps secret, with the generator `g`: the
# learner's notebook never sees these inputs, so an answer cannot be fitted to the public cases.
def _hidden_int(g: torch.Generator, low: int, high: int) -> int:
    return int(torch.randint(low, high, (1,), generator=g))


def _hidden_moments(g: torch.Generator) -> list[Case]:
    c, d = _hidden_int(g, 2, 5), _hidden_int(g, 1, 6)
    sizes = [3 * c + _hidden_int(g, 0, 5), _hidden_int(g, 4, 16), _hidden_int(g, 4, 16)]
    return [Case("hidden: random batches", (_batches(g, sizes, d, c, 0.5, 0.1), c))]


def _hidden_shift(g: torch.Generator) -> list[Case]:
    n, d = _hidden_int(g, 1, 9), _hidden_int(g, 1, 9)
    return [Case("hidden: random vectors", (torch.rand(n, d, generator=g), torch.rand(d, generator=g) * 0.6,
                                            torch.rand(d, generator=g) * 0.6))]


def _hidden_sqrt(g: torch.Generator) -> list[Case]:
    return [Case("hidden: a random SPD matrix", (_spd(_hidden_int(g, 2, 7), g),))]


def _hidden_monge(g: torch.Generator) -> list[Case]:
    d = _hidden_int(g, 2, 7)
    return [Case("hidden: random SPD source and target", (_spd(d, g), _spd(d, g, 2.0)))]


def _hidden_edit(g: torch.Generator) -> list[Case]:
    n, d = _hidden_int(g, 1, 9), _hidden_int(g, 2, 7)
    A = M.monge_map(_spd(d, g), _spd(d, g, 2.0)).float()
    mu_s, mu_t = 0.3 + 0.4 * torch.rand(d, generator=g), 0.3 + 0.4 * torch.rand(d, generator=g)
    return [Case("hidden: random vectors and map", (torch.rand(n, d, generator=g), mu_s, mu_t, A))]


def _hidden_psnr(g: torch.Generator) -> list[Case]:
    n, h = _hidden_int(g, 1, 5), _hidden_int(g, 2, 9)
    x = torch.rand(n, 3, h, h, generator=g)
    return [Case("hidden: random images and noise", (x, (x + 0.1 * torch.randn(n, 3, h, h, generator=g)).clamp(0, 1)))]


HIDDEN_CASES = {
    "moments.class_moments": _hidden_moments,
    "moments.mean_shift": _hidden_shift,
    "moments.sqrtm_psd": _hidden_sqrt,
    "moments.monge_map": _hidden_monge,
    "moments.gaussian_edit": _hidden_edit,
    "moments.psnr": _hidden_psnr,
}
