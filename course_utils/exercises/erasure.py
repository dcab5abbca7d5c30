"""Exercises of 04_concept_erasure: guardedness, the orthogonal projection, LEACE, the step at
which a network learns, and quadratic erasure with the Gaussian optimal-transport map.

Every case is float64 (so that a rank cut-off or a pseudo-inverse cannot flip on rounding) and
small (a check takes milliseconds).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from course_utils.checks import Case, exercise, mistake
from course_utils.checks import generator as _gen
from course_utils.erasure import gaussian_ot_map, psd_sqrt

F64 = torch.float64


def _labelled(seed: int, n: int, d: int, k: int, *, shift: float = 1.5, balanced: bool = False,
              duplicate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Correlated Gaussian features whose class means differ; `x` `[n, d]`, one-hot `z` `[n, k]`.

    `duplicate=True` makes the last feature the sum of the first two (a singular covariance)."""
    g = _gen(seed)
    y = torch.arange(n) % k if balanced else torch.cat([torch.arange(k), torch.randint(0, k, (n - k,), generator=g)])
    mix = torch.randn(d, d, generator=g, dtype=F64) / d ** 0.5 + torch.eye(d, dtype=F64)
    x = torch.randn(n, d, generator=g, dtype=F64) @ mix + shift * torch.randn(k, d, generator=g, dtype=F64)[y]
    x = x + 2.0  # a non-zero mean, so that forgetting to centre shows
    if duplicate:
        x[:, -1] = x[:, 0] + x[:, 1]
    return x, torch.nn.functional.one_hot(y, k).to(F64)


def _centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(0)


def _colspan(a: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis `[d, r]` of the column space of `a` (singular values above pinv's cut)."""
    u, s, _ = torch.linalg.svd(a, full_matrices=False)
    return u[:, s > s.max() * max(a.shape) * torch.finfo(a.dtype).eps]


# --- 1. cross-covariance ------------------------------------------------------------------------
def _xcov_cases() -> list[Case]:
    return [
        Case("n=12, d=3, k=2", _labelled(11, 12, 3, 2)),
        Case("n=40, d=5, k=4", _labelled(12, 40, 5, 4)),
        Case("two samples, two classes", _labelled(13, 2, 3, 2)),
        Case("n=30, d=4, k=4 (square)", _labelled(14, 30, 4, 4)),
    ]


@exercise("erasure.cross_covariance", title="Linear guardedness: the cross-covariance Cov(x, z)",
          hints=('A covariance is an average of products of deviations from the means; mind the '
                 "normalisation and the output's orientation.",
                 'Centre x and z on their column means, multiply to get [d, k], and divide by n - 1.'),
          cases=_xcov_cases,
          hint="Σ_xz = (1/(n−1)) Σ_i (x_i − x̄)(z_i − z̄)ᵀ: [n, d], [n, k] -> [d, k].")
def cross_covariance(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """`x` `[n, d]`, one-hot `z` `[n, k]` -> `Sigma_xz` `[d, k]`, with Bessel's 1/(n-1)."""
    return _centre(x).T @ _centre(z) / (len(x) - 1)


@mistake("erasure.cross_covariance", "mu_x mu_z^T subtracted without the factor n",
         "x^T z sums n products, so its mean correction is n mu_x mu_z^T; centring x and z first avoids the slip.")
def _cross_no_n(x, z):
    return (x.T @ z - torch.outer(x.mean(0), z.mean(0))) / (len(x) - 1)


@mistake("erasure.cross_covariance", "the means were not subtracted",
         "A covariance is about deviations from the mean: subtract x.mean(0) (and z.mean(0)) before "
         "multiplying. Without it you get E[x z^T], which is not zero even for a guarded x.")
def _xcov_uncentred(x, z):
    return x.T @ z / (len(x) - 1)


@mistake("erasure.cross_covariance", "divided by n instead of n - 1",
         "Use Bessel's correction, 1/(n - 1), as torch.cov does.")
def _xcov_over_n(x, z):
    return _centre(x).T @ _centre(z) / len(x)


@mistake("erasure.cross_covariance", "transposed: [k, d] instead of [d, k]",
         "Rows are features, columns are classes: xc.T @ zc has shape [d, k].")
def _xcov_transposed(x, z):
    return _centre(z).T @ _centre(x) / (len(x) - 1)


@mistake("erasure.cross_covariance", "a correlation instead of a covariance",
         "Do not divide by the standard deviations: the formula is the plain covariance.")
def _xcov_correlation(x, z):
    xc, zc = _centre(x), _centre(z)
    return (xc / xc.std(0)).T @ (zc / zc.std(0).clamp_min(1e-12)) / (len(x) - 1)


# --- 2. orthogonal projection -------------------------------------------------------------------
def _orth_cases() -> list[Case]:
    return [
        Case("n=40, d=4, k=2", _labelled(21, 40, 4, 2)),
        Case("n=60, d=6, k=3", _labelled(22, 60, 6, 3)),
        Case("n=50, d=5, k=5 (rank k-1 = 4)", _labelled(23, 50, 5, 5)),
    ]


@exercise("erasure.orth_erase", title="Naive erasure: project out the class-mean differences",
          hints=('Remove, around the mean, the directions along which the class means differ; keep '
                 'everything else.',
                 'Get an orthonormal basis of the column span of Sigma_xz (only directions with '
                 'non-zero singular values), project the centred x on it, and subtract that '
                 'projection from x.'),
          cases=_orth_cases, atol=1e-8, rtol=1e-6,
          hint="With U [d, r] an orthonormal basis of colspan(Σ_xz) (r = the number of non-negligible singular "
               "values): x' = x − U Uᵀ (x − μ) for each row: [n, d] -> [n, d].")
def orth_erase(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """`x` `[n, d]`, one-hot `z` `[n, k]` -> `x - (x - mu) P` with `P` the orthogonal projection onto
    colspan(Sigma_xz), the class-mean-difference directions."""
    u = _colspan(cross_covariance(x, z))
    mu = x.mean(0)
    return x - (x - mu) @ u @ u.T


@mistake("erasure.orth_erase", "QR of Sigma_xz keeps a spurious direction",
         "For one-hot z, Sigma_xz has rank k - 1: QR returns k columns anyway, one of them noise. Keep only "
         "the directions with non-zero singular values (SVD) or use P = S S^+.")
def _orth_qr(x, z):
    xc, zc = x - x.mean(0), z - z.mean(0)
    Q = torch.linalg.qr(xc.T @ zc / (len(x) - 1)).Q
    return x - xc @ Q @ Q.T


@mistake("erasure.orth_erase", "the mean not added back",
         "Only the deviation from the mean is projected: x - (x - mu) P keeps the mean; (x - mu)(I - P) loses it.")
def _orth_centred(x, z):
    xc, zc = x - x.mean(0), z - z.mean(0)
    S = xc.T @ zc / (len(x) - 1)
    P = S @ torch.linalg.pinv(S)
    return xc - xc @ P


@mistake("erasure.orth_erase", "the mean was not subtracted",
         "Project the deviations from the mean, x - mu, and keep the mean: x - (x - mu) @ P. "
         "Projecting x itself moves the whole cloud.")
def _orth_no_mean(x, z):
    u = _colspan(cross_covariance(x, z))
    return x - x @ u @ u.T


@mistake("erasure.orth_erase", "kept the concept directions instead of removing them",
         "(x - mu) @ P is the part to REMOVE; the erased data is x minus it.")
def _orth_kept(x, z):
    u = _colspan(cross_covariance(x, z))
    mu = x.mean(0)
    return mu + (x - mu) @ u @ u.T


@mistake("erasure.orth_erase", "projected onto the class means instead of their differences",
         "Use the cross-COVARIANCE (centred), whose columns are the class-mean differences (rank k - 1). "
         "The uncentred x.T @ z also contains the overall mean direction.")
def _orth_class_means(x, z):
    u = _colspan(x.T @ z)
    mu = x.mean(0)
    return x - (x - mu) @ u @ u.T


@mistake("erasure.orth_erase", "Sigma_xz used as if its columns were orthonormal",
         "S @ S.T is not a projection. Orthonormalise the columns first (SVD) or use P = S @ pinv(S).")
def _orth_unnormalised(x, z):
    s = cross_covariance(x, z)
    mu = x.mean(0)
    return x - (x - mu) @ s @ s.T


# --- 3. LEACE -----------------------------------------------------------------------------------
def _leace_cases() -> list[Case]:
    return [
        Case("n=80, d=4, k=2", _labelled(31, 80, 4, 2)),
        Case("n=100, d=6, k=3", _labelled(32, 100, 6, 3)),
        Case("n=60, d=5, k=4", _labelled(33, 60, 5, 4)),
        Case("singular covariance (last feature = sum of the first two)", _labelled(34, 80, 6, 3, duplicate=True)),
    ]


def _leace_with(x: torch.Tensor, z: torch.Tensor, w: torch.Tensor, w_back: torch.Tensor,
                *, centre: bool = True, whiten_sxz: bool = True) -> torch.Tensor:
    sxz = cross_covariance(x, z)
    u = _colspan(w @ sxz if whiten_sxz else sxz)
    delta = x - x.mean(0) if centre else x
    return x - delta @ (w_back @ u @ u.T @ w).T


def _sigma(x: torch.Tensor) -> torch.Tensor:
    xc = _centre(x)
    return xc.T @ xc / (len(x) - 1)


@exercise("erasure.leace_erase", title="LEACE in closed form", cases=_leace_cases, atol=1e-7, rtol=1e-6,
          hints=('LEACE is an oblique projection: whiten, project out the concept directions there, '
                 'and map back.',
                 'W is the (pseudo-)inverse square root of Sigma_xx and W^+ its square root; P '
                 'projects onto colspan(W Sigma_xz); apply W^+ P W to the centred rows (mind the '
                 'transpose for row vectors) and subtract.'),
          hint="W = (Σ_xx^{1/2})⁺ (symmetric), P = the orthogonal projection onto colspan(W Σ_xz), x' = x − W⁺ P"
               " W (x − μ) for each row: [n, d] -> [n, d].")
def leace_erase(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """`x` `[n, d]`, one-hot `z` `[n, k]` -> `r(x) = x - W^+ P W (x - mu)` for every row:
    `W = Sigma_xx^{-1/2}` (pseudo-inverse), `P` the orthogonal projection onto colspan(W Sigma_xz)."""
    sigma = _sigma(x)
    return _leace_with(x, z, psd_sqrt(sigma, inverse=True), psd_sqrt(sigma))


def _leace_variant(x, z, *, w_inv=True, pinv=True, transpose=True):
    xc, zc = x - x.mean(0), z - z.mean(0)
    n, d = x.shape
    evals, V = torch.linalg.eigh(xc.T @ xc / (n - 1))
    keep = evals > 1e-10 * evals.max() if pinv else torch.ones_like(evals, dtype=torch.bool)
    safe = torch.where(keep, evals, torch.ones_like(evals))
    W = (V * torch.where(keep, safe.rsqrt(), 0.0)) @ V.T
    W_inv = (V * torch.where(keep, safe.sqrt(), 0.0)) @ V.T if w_inv else torch.eye(d, dtype=x.dtype)
    S = W @ (xc.T @ zc / (n - 1))
    P = S @ torch.linalg.pinv(S)
    M_ = W_inv @ P @ W
    return x - xc @ (M_.T if transpose else M_)


@mistake("erasure.leace_erase", "W^+ forgotten (left in the whitened space)",
         "After projecting in the whitened space, map back with W^+ = Sigma_xx^{1/2}.")
def _leace_no_winv(x, z):
    return _leace_variant(x, z, w_inv=False)


@mistake("erasure.leace_erase", "1/sqrt of the ~0 eigenvalues (no pseudo-inverse)",
         "A singular covariance has eigenvalues ~0: set their inverse roots to 0 (pseudo-inverse) "
         "instead of dividing by them.")
def _leace_no_pinv(x, z):
    return _leace_variant(x, z, pinv=False)


@mistake("erasure.leace_erase", "the map applied to row vectors without its transpose",
         "Rows are vectors on the left: r(x)^T = x^T - (x - mu)^T (W^+ P W)^T, so multiply by the TRANSPOSE.")
def _leace_no_transpose(x, z):
    return _leace_variant(x, z, transpose=False)


@mistake("erasure.leace_erase", "whitening forgotten (that is the orthogonal projection)",
         "Whiten first: W = Sigma_xx^{-1/2}. With W = I you get exercise 2's orthogonal projection, which "
         "erases too, but moves the data more than necessary.")
def _leace_no_whitening(x, z):
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    return _leace_with(x, z, eye, eye)


@mistake("erasure.leace_erase", "projected in the wrong space (P applied without W and W^+)",
         "P is a projection in WHITENED coordinates: map in with W, project, map back with W^+: "
         "the update is W^+ P W (x - mu), not P (x - mu).")
def _leace_wrong_space(x, z):
    sigma = _sigma(x)
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    w = psd_sqrt(sigma, inverse=True)
    u = _colspan(w @ cross_covariance(x, z))
    return x - (x - x.mean(0)) @ (eye @ u @ u.T @ eye).T


@mistake("erasure.leace_erase", "Sigma used instead of Sigma^{-1/2}",
         "The whitening matrix is the inverse square root Sigma_xx^{-1/2} (eigenvalues l -> 1/sqrt(l)), "
         "not Sigma_xx itself.")
def _leace_sigma(x, z):
    sigma = _sigma(x)
    return _leace_with(x, z, sigma, torch.linalg.pinv(sigma))


@mistake("erasure.leace_erase", "Sigma^{-1} used instead of Sigma^{-1/2}",
         "Whitening takes the inverse SQUARE ROOT: 1/sqrt(l) on the eigenvalues, not 1/l.")
def _leace_inverse(x, z):
    sigma = _sigma(x)
    return _leace_with(x, z, torch.linalg.pinv(sigma), sigma)


@mistake("erasure.leace_erase", "the mean was not subtracted",
         "r(x) = x - W^+ P W (x - mu): the update acts on x - mu, so that the mean stays where it is.")
def _leace_no_mean(x, z):
    sigma = _sigma(x)
    return _leace_with(x, z, psd_sqrt(sigma, inverse=True), psd_sqrt(sigma), centre=False)


@mistake("erasure.leace_erase", "mapped back with W instead of W^+",
         "After projecting in whitened space, UNwhiten with W^+ = Sigma_xx^{1/2}, not W again.")
def _leace_w_twice(x, z):
    w = psd_sqrt(_sigma(x), inverse=True)
    return _leace_with(x, z, w, w)


@mistake("erasure.leace_erase", "P projects onto colspan(Sigma_xz) instead of colspan(W Sigma_xz)",
         "In whitened coordinates the cross-covariance is W Sigma_xz: take P onto ITS column space.")
def _leace_unwhitened_p(x, z):
    sigma = _sigma(x)
    return _leace_with(x, z, psd_sqrt(sigma, inverse=True), psd_sqrt(sigma), whiten_sxz=False)


# --- 4. when does a network learn? ---------------------------------------------------------------
def _step_cases() -> list[Case]:
    steps = [1, 2, 4, 8, 16, 32]
    return [
        Case("crosses at the third checkpoint", (steps, [0.10, 0.12, 0.31, 0.45, 0.52, 0.60], 0.3)),
        Case("exactly at the threshold", (steps, [0.10, 0.20, 0.25, 0.30, 0.41, 0.50], 0.3)),
        Case("dips below again", ([1, 2, 4, 8, 16], [0.1, 0.45, 0.35, 0.5, 0.6], 0.4)),
        Case("never reaches it", (steps, [0.1, 0.1, 0.2, 0.2, 0.25, 0.28], 0.3)),
        Case("already there at step 1", ([1, 2, 4], [0.5, 0.6, 0.7], 0.3)),
    ]


@exercise("erasure.first_step_above", title="The step at which accuracy first reaches a threshold",
          hints=('You need the step (not the position, not the accuracy) of the first checkpoint that'
                 ' reaches the threshold.',
                 'Walk the pairs in order, return the first step whose accuracy is >= threshold, and '
                 'None if none is.'),
          cases=_step_cases,
          hint="The smallest index i with accuracies[i] ≥ threshold gives steps[i]; if there is no such i, None.")
def first_step_above(steps: Sequence[int], accuracies: Sequence[float], threshold: float) -> int | None:
    """The first step with accuracy >= threshold, or None."""
    for step, acc in zip(steps, accuracies):
        if acc >= threshold:
            return step
    return None


@mistake("erasure.first_step_above", "returned the index instead of the step",
         "Return steps[i], not i: checkpoints are log-spaced, so the index is not the step.")
def _step_index(steps, accuracies, threshold):
    for i, acc in enumerate(accuracies):
        if acc >= threshold:
            return i
    return None


@mistake("erasure.first_step_above", "the step of the best accuracy",
         "The question is when the accuracy FIRST reaches the threshold, not when it is highest.")
def _step_argmax(steps, accuracies, threshold):
    best = max(range(len(accuracies)), key=lambda i: accuracies[i])
    return steps[best] if accuracies[best] >= threshold else None


@mistake("erasure.first_step_above", "> instead of >=",
         "Reaching the threshold counts: compare with >=.")
def _step_strict(steps, accuracies, threshold):
    for step, acc in zip(steps, accuracies):
        if acc > threshold:
            return step
    return None


@mistake("erasure.first_step_above", "the step after which it stays above (the last crossing)",
         "Return the FIRST step at or above the threshold, even if the accuracy dips again later.")
def _step_last_crossing(steps, accuracies, threshold):
    found = None
    for step, acc in zip(steps, accuracies):
        if acc >= threshold and found is None:
            found = step
        elif acc < threshold:
            found = None
    return found


@mistake("erasure.first_step_above", "the last step when the threshold is never reached",
         "When no checkpoint reaches the threshold, return None: the run never got there.")
def _step_never_last(steps, accuracies, threshold):
    for step, acc in zip(steps, accuracies):
        if acc >= threshold:
            return step
    return steps[-1]


# --- 5. quadratic erasure -----------------------------------------------------------------------
def _quad_cases() -> list[Case]:
    def make(seed: int, n: int, d: int, k: int) -> tuple:
        x, z = _labelled(seed, n, d, k)
        g = _gen(seed + 100)
        a = torch.randn(d, d, generator=g, dtype=F64)
        return (x, z.argmax(1), torch.randn(d, generator=g, dtype=F64), a @ a.T / d + torch.eye(d, dtype=F64))
    return [
        Case("n=40, d=3, k=2", make(51, 40, 3, 2)),
        Case("n=90, d=4, k=3", make(52, 90, 4, 3)),
        Case("n=60, d=2, k=4", make(53, 60, 2, 4)),
    ]


def _class_stats(x: torch.Tensor, labels: torch.Tensor, c: int, ddof: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    xc = x[labels == c]
    dev = xc - xc.mean(0)
    return xc.mean(0), dev.T @ dev / (len(xc) - ddof)


@exercise("erasure.quadratic_erase", title="Quadratic erasure: match every class's mean and covariance",
          hints=('Each class gets its own Gaussian map onto the target distribution, built from that '
                 "class's own moments.",
                 'For each class: its mean and unbiased covariance, the OT map from that covariance '
                 "to the target's, applied to the centred rows, plus the target mean."),
          cases=_quad_cases, atol=1e-7, rtol=1e-6,
          hint="For each class c: x'_i = μ_t + A_c (x_i − μ_c) for every row with label c, where μ_c, Σ_c are "
               "that class's mean and unbiased covariance and A_c the Gaussian OT map from Σ_c to Σ_t: [n, d] ->"
               " [n, d].")
def quadratic_erase(x: torch.Tensor, labels: torch.Tensor, target_mean: torch.Tensor,
                    target_cov: torch.Tensor) -> torch.Tensor:
    """`x` `[n, d]`, class ids `labels` `[n]`, `target_mean` `[d]`, `target_cov` `[d, d]` -> `[n, d]`:
    each class moved onto N(target_mean, target_cov) by its Gaussian optimal-transport map."""
    out = torch.empty_like(x)
    for c in labels.unique().tolist():
        idx = labels == c
        mu, sigma = _class_stats(x, labels, c)
        out[idx] = target_mean + (x[idx] - mu) @ gaussian_ot_map(sigma, target_cov).T
    return out


def _quad_variant(x, labels, target_mean, target_cov, *, shift_only=False, pooled=False, cholesky=False):
    out = torch.empty_like(x)
    for c in labels.unique():
        sel = labels == c
        xs = x if pooled else x[sel]
        mu = xs.mean(0)
        cov = (xs - mu).T @ (xs - mu) / (len(xs) - 1)
        if shift_only:
            A = torch.eye(x.shape[1], dtype=x.dtype)
        elif cholesky:
            A = torch.linalg.cholesky(target_cov) @ torch.linalg.inv(torch.linalg.cholesky(cov))
        else:
            A = gaussian_ot_map(cov, target_cov)
        out[sel] = target_mean + (x[sel] - mu) @ A.T
    return out


@mistake("erasure.quadratic_erase", "a mean shift only",
         "Matching the means is not enough: each class's covariance must be mapped onto target_cov too.")
def _quad_shift_only(x, labels, target_mean, target_cov):
    return _quad_variant(x, labels, target_mean, target_cov, shift_only=True)


@mistake("erasure.quadratic_erase", "the pooled mean and covariance for every class",
         "Each class is moved with ITS OWN mean and covariance, computed from x[labels == c].")
def _quad_pooled_moments(x, labels, target_mean, target_cov):
    return _quad_variant(x, labels, target_mean, target_cov, pooled=True)


@mistake("erasure.quadratic_erase", "whiten and re-colour with Cholesky factors",
         "L_t L_c^{-1} matches the covariance but is not the optimal-transport map: use the symmetric "
         "Gaussian OT map, which moves each point least.")
def _quad_cholesky(x, labels, target_mean, target_cov):
    return _quad_variant(x, labels, target_mean, target_cov, cholesky=True)


@mistake("erasure.quadratic_erase", "the overall mean instead of each class's mean",
         "Subtract the CLASS mean mu_c: the classes must end up with the same mean, so each is centred on its own.")
def _quad_global_mean(x, labels, target_mean, target_cov):
    out = torch.empty_like(x)
    for c in labels.unique().tolist():
        idx = labels == c
        _, sigma = _class_stats(x, labels, c)
        out[idx] = target_mean + (x[idx] - x.mean(0)) @ gaussian_ot_map(sigma, target_cov).T
    return out


@mistake("erasure.quadratic_erase", "transported the wrong way (target -> class)",
         "gaussian_ot_map(S, T) moves N(0, S) onto N(0, T): the class covariance is the SOURCE, "
         "gaussian_ot_map(Sigma_c, target_cov).")
def _quad_backwards(x, labels, target_mean, target_cov):
    out = torch.empty_like(x)
    for c in labels.unique().tolist():
        idx = labels == c
        mu, sigma = _class_stats(x, labels, c)
        out[idx] = target_mean + (x[idx] - mu) @ gaussian_ot_map(target_cov, sigma).T
    return out


@mistake("erasure.quadratic_erase", "one covariance for every class",
         "Each class needs its own map, from its own covariance Sigma_c; the pooled covariance leaves the "
         "differences between classes in place.")
def _quad_pooled(x, labels, target_mean, target_cov):
    dev = x - x.mean(0)
    a = gaussian_ot_map(dev.T @ dev / (len(x) - 1), target_cov)
    out = torch.empty_like(x)
    for c in labels.unique().tolist():
        idx = labels == c
        mu, _ = _class_stats(x, labels, c)
        out[idx] = target_mean + (x[idx] - mu) @ a.T
    return out


@mistake("erasure.quadratic_erase", "the target mean was not added back",
         "The map is x' = target_mean + A (x - mu_c): without target_mean every class ends up centred on 0.")
def _quad_no_target_mean(x, labels, target_mean, target_cov):
    out = torch.empty_like(x)
    for c in labels.unique().tolist():
        idx = labels == c
        mu, sigma = _class_stats(x, labels, c)
        out[idx] = (x[idx] - mu) @ gaussian_ot_map(sigma, target_cov).T
    return out


@mistake("erasure.quadratic_erase", "class covariances divided by n_c instead of n_c - 1",
         "Use Bessel's correction, 1/(n_c - 1), for each class covariance (as torch.cov does).")
def _quad_over_n(x, labels, target_mean, target_cov):
    out = torch.empty_like(x)
    for c in labels.unique().tolist():
        idx = labels == c
        mu, sigma = _class_stats(x, labels, c, ddof=0)
        out[idx] = target_mean + (x[idx] - mu) @ gaussian_ot_map(sigma, target_cov).T
    return out


# --- hidden cases (the grader's only) -----------------------------------------------------------
# Drawn by `python -m course_utils.grade` from a seed it keeps secret, with the generator `g`: the
# learner's notebook never sees these inputs, so an answer cannot be fitted to the public cases.
def _hidden_int(g: torch.Generator, low: int, high: int) -> int:
    """A random int in [low, high)."""
    return int(torch.randint(low, high, (1,), generator=g))


def _hidden_labelled(g: torch.Generator, n: int, d: int, k: int, **kw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`_labelled` with a seed drawn from `g` and a random class shift."""
    shift = 0.5 + 2 * float(torch.rand(1, generator=g))
    return _labelled(_hidden_int(g, 0, 2**31 - 1), n, d, k, shift=shift, **kw)


def _hidden_xcov(g: torch.Generator) -> list[Case]:
    d, k = _hidden_int(g, 2, 7), _hidden_int(g, 2, 6)
    n = _hidden_int(g, k + 1, 60)
    return [Case(f"hidden: random n={n}, d={d}, k={k}", _hidden_labelled(g, n, d, k))]


def _hidden_orth(g: torch.Generator) -> list[Case]:
    d = _hidden_int(g, 2, 8)
    k = _hidden_int(g, 2, d + 1)  # k - 1 < d directions to remove: some remain
    n = _hidden_int(g, 4 * d + 2 * k, 100)
    return [Case(f"hidden: random n={n}, d={d}, k={k}", _hidden_labelled(g, n, d, k))]


def _hidden_leace(g: torch.Generator) -> list[Case]:
    d = _hidden_int(g, 3, 8)
    k = _hidden_int(g, 2, d + 1)
    n, n_dup = _hidden_int(g, 6 * d, 120), _hidden_int(g, 6 * d, 120)
    return [Case(f"hidden: random n={n}, d={d}, k={k}", _hidden_labelled(g, n, d, k)),
            Case(f"hidden: singular covariance, n={n_dup}, d={d}, k={k}", _hidden_labelled(g, n_dup, d, k,
                                                                                          duplicate=True))]


def _hidden_steps(g: torch.Generator) -> list[Case]:
    def curve(n: int) -> tuple[list[int], list[float]]:
        steps = sorted(int(s) + 1 for s in torch.randperm(2000, generator=g)[:n])  # steps[i] > i
        return steps, [round(float(a), 3) for a in torch.rand(n, generator=g) * 0.8 + 0.1]

    n = _hidden_int(g, 4, 10)
    steps, acc = curve(n)
    j = _hidden_int(g, 1, n - 1)
    threshold = acc[j] = round(0.5 + 0.3 * float(torch.rand(1, generator=g)), 3)  # reached exactly at step j
    acc[:j] = [min(a, threshold - 0.05) for a in acc[:j]]
    acc[j + 1] = threshold - 0.01  # then dips below
    if j + 2 < n:
        acc[-1] = threshold + 0.1  # and ends higher, so that the first crossing is not the best accuracy
    never_steps, never_acc = curve(n)
    return [Case("hidden: first reached exactly at a random checkpoint, then dips", (steps, acc, threshold)),
            Case("hidden: never reached", (never_steps, never_acc, 0.95))]


def _hidden_quad(g: torch.Generator) -> list[Case]:
    d, k = _hidden_int(g, 2, 5), _hidden_int(g, 2, 5)
    n = k * _hidden_int(g, 3 * d + 3, 30) + _hidden_int(g, 0, k)  # every class well above d samples
    x, z = _hidden_labelled(g, n, d, k, balanced=True)
    a = torch.randn(d, d, generator=g, dtype=F64)
    target_cov = a @ a.T / d + torch.eye(d, dtype=F64)
    return [Case(f"hidden: random n={n}, d={d}, k={k}", (x, z.argmax(1), torch.randn(d, generator=g, dtype=F64),
                                                         target_cov))]


HIDDEN_CASES = {
    "erasure.cross_covariance": _hidden_xcov,
    "erasure.orth_erase": _hidden_orth,
    "erasure.leace_erase": _hidden_leace,
    "erasure.first_step_above": _hidden_steps,
    "erasure.quadratic_erase": _hidden_quad,
}
