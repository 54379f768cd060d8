"""The parallel-in-time filter and the smoother's combine operator: the associative-scan formulation
of Särkkä & García-Fernández, "Temporal parallelization of Bayesian smoothers", IEEE TAC 66(1), 2021,
O(log T) depth. Same results as the sequential filter up to round-off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .reference import _innovation_cholesky, _predict
from .types import FilterResult, Gaussian, _mv, _per_step, _sum_steps, log_prob_from_cholesky, symmetrize


def _filtering_combine(i, j):
    """Associative operator of Särkkä & García-Fernández (2021), eq. (14)-(15), on elements
    (A, b, C, eta, J), with M = I + C_i J_j:
    A_ij = A_j M^{-1} A_i,  b_ij = A_j M^{-1} (b_i + C_i eta_j) + b_j,  C_ij = A_j M^{-1} C_i A_j^T + C_j,
    eta_ij = A_i^T M^{-T} (eta_j - J_j b_i) + eta_i,  J_ij = A_i^T M^{-T} J_j A_i + J_i."""
    Ai, bi, Ci, ei, Ji = i
    Aj, bj, Cj, ej, Jj = j
    eye = torch.eye(Ai.shape[-1], dtype=Ai.dtype, device=Ai.device)
    # unchecked (a check is a host sync): with C_i, J_j positive semi-definite, M's eigenvalues are >= 1
    LU, piv, _ = torch.linalg.lu_factor_ex(eye + Ci @ Jj)
    AjMinv = torch.linalg.lu_solve(LU, piv, Aj.mT, adjoint=True).mT  # A_j M^{-1}
    MinvAi = torch.linalg.lu_solve(LU, piv, Ai)  # M^{-1} A_i, so A_i^T M^{-T} = (M^{-1} A_i)^T
    A = AjMinv @ Ai
    b = _mv(AjMinv, bi + _mv(Ci, ej)) + bj
    C = symmetrize(AjMinv @ Ci @ Aj.mT) + Cj
    eta = _mv(MinvAi.mT, ej - _mv(Jj, bi)) + ei
    J = symmetrize(MinvAi.mT @ Jj @ Ai) + Ji
    return A, b, C, eta, J


def _associative_scan(fn: Callable, elems: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Inclusive prefix scan along dim 1 of a tuple of tensors with an associative ``fn(earlier, later)``.

    Work-efficient odd/even recursion (as jax.lax.associative_scan): O(T) applications of ``fn``,
    each level vectorised over time, 2 log2(T) levels in all.
    """
    steps = elems[0].shape[1]
    if steps < 2:
        return elems
    reduced = fn(tuple(x[:, 0:-1:2] for x in elems), tuple(x[:, 1::2] for x in elems))
    odd = _associative_scan(fn, reduced)  # prefixes ending at 1, 3, 5, ...
    prev = odd if steps % 2 else tuple(x[:, :-1] for x in odd)
    even = fn(prev, tuple(x[:, 2::2] for x in elems))  # prefixes ending at 2, 4, ...
    out = []
    for first, e, o in zip(elems, even, odd):
        e = torch.cat([first[:, :1], e], 1)
        pairs = torch.stack([e[:, : o.shape[1]], o], 2).flatten(1, 2)
        out.append(torch.cat([pairs, e[:, o.shape[1] :]], 1))
    return tuple(out)


def _filter_parallel(z, A, Q, C, R, m0, P0, bu, observed, target, jitter):
    """Parallel-in-time filter: element t is p(h_t | h_{t-1}, z_t) = N(A_t h_{t-1} + b_t, C_t) together
    with the likelihood of z_t as a function of h_{t-1}, exp(-1/2 h^T J_t h + eta_t^T h); element 1
    absorbs the prior N(m0, P0).  Elements come from one batched Kalman update of the prior
    N(B u_t, Q) (t > 1) or N(A m0 + B u_1, A P0 A^T + Q) (t = 1)."""
    batch, steps, m = z.shape
    n = A.shape[-1]
    A_t, Q_t, C_t = _per_step(A, 2), _per_step(Q, 2), _per_step(C, 2)
    R_t = R if R.dim() == 4 else _per_step(R, 2)
    mean1, cov1 = _predict(m0, P0, A, Q, None if bu is None else bu[:, 0])
    prior_mean = torch.zeros(batch, steps, n, dtype=z.dtype, device=z.device)
    if bu is not None:
        prior_mean = prior_mean + bu
    prior_mean = torch.cat([mean1.expand(batch, n)[:, None], prior_mean[:, 1:]], 1)
    prior_cov = torch.cat([cov1.expand(batch, n, n)[:, None], Q_t.expand(batch, steps - 1, n, n)], 1)

    CP = C_t @ prior_cov
    L, info = _innovation_cholesky(CP, C_t, R_t, jitter)
    W = torch.linalg.solve_triangular(L, CP, upper=False)
    v = torch.linalg.solve_triangular(L, (z - _mv(C_t, prior_mean)).unsqueeze(-1), upper=False).squeeze(-1)
    GA = torch.linalg.solve_triangular(L, (C_t @ A_t).expand(batch, steps, m, n), upper=False)  # L^{-1} C A
    first = torch.zeros(steps, dtype=z.dtype, device=z.device)
    first[0] = 1.0
    keep = (1.0 - first)[None, :, None, None]
    GA = GA * keep  # element 1 does not depend on h_0
    if observed is not None:
        obs = observed.to(z.dtype)
        W, v, GA = W * obs[..., None, None], v * obs[..., None], GA * obs[..., None, None]
    K = torch.linalg.solve_triangular(L.mT, W, upper=True).mT
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    M = eye - K @ C_t
    elems = (
        (M @ A_t) * keep,
        prior_mean + (W.mT @ v.unsqueeze(-1)).squeeze(-1),
        symmetrize(M @ prior_cov @ M.mT + K @ R_t @ K.mT),
        (GA.mT @ v.unsqueeze(-1)).squeeze(-1),
        GA.mT @ GA,
    )
    _, f_mean, f_cov, _, _ = _associative_scan(_filtering_combine, elems)

    p_mean, p_cov = _predict(f_mean[:, :-1], f_cov[:, :-1], A_t, Q_t, None if bu is None else bu[:, 1:])
    p_mean = torch.cat([mean1.expand(batch, n)[:, None], p_mean], 1)
    p_cov = torch.cat([cov1.expand(batch, n, n)[:, None], p_cov], 1)
    Lp, info_p = _innovation_cholesky(C_t @ p_cov, C_t, R_t, jitter)
    resid = (z if target is None else target) - _mv(C_t, p_mean)
    white = torch.linalg.solve_triangular(Lp, resid.unsqueeze(-1), upper=False).squeeze(-1)
    step_ll = log_prob_from_cholesky(white, Lp)
    if observed is not None:
        step_ll = step_ll * observed.to(z.dtype)
    ok = not bool((info > 0).any() | (info_p > 0).any())  # one host sync
    return FilterResult(Gaussian(f_mean, f_cov), Gaussian(p_mean, p_cov), *_sum_steps(step_ll)), ok


def _smoothing_combine(later, earlier):
    """Backward associative operator (Särkkä & García-Fernández 2021, eq. (22)) on (E, g, L):
    the element of an earlier step applied after the (already combined) later ones."""
    El, gl, Ll = later
    Ee, ge, Le = earlier
    return Ee @ El, _mv(Ee, gl) + ge, symmetrize(Ee @ Ll @ Ee.mT) + Le
