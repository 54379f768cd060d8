"""The step-by-step reference filter: the public single steps :func:`predict` and :func:`update`, and
``_filter_sequential``, a loop over those steps (the path for per-step R and jittered retries).

One Cholesky factorisation ``S = L L^T`` of the innovation covariance per update gives the gain
(triangular solves), the Mahalanobis term and ``log|S|``; the covariance update is the Joseph form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import _as_tensor, _dtype
from .types import (_JITTERS, FilterResult, Gaussian, _add_jitter, _cholesky_ex, _mv, _sum_steps,
                    log_prob_from_cholesky, symmetrize)


def _innovation_cholesky(CP: Tensor, C: Tensor, R: Tensor, jitter: float | Tensor) -> tuple[Tensor, Tensor]:
    """``cholesky_ex`` of the innovation covariance ``S = C P C^T + R`` (symmetrised, optional jitter),
    given ``CP = C P``."""
    S = symmetrize(CP @ C.mT + R)
    if jitter:
        S = _add_jitter(S, jitter)
    return _cholesky_ex(S)


def _predict(mean: Tensor, cov: Tensor, A: Tensor, Q: Tensor, bu: Tensor | None) -> tuple[Tensor, Tensor]:
    """m' = A m + B u,  P' = A P A^T + Q (symmetrised)."""
    mean = _mv(A, mean)
    if bu is not None:
        mean = mean + bu
    return mean, symmetrize(A @ cov @ A.mT + Q)


def _update(
    mean: Tensor,
    cov: Tensor,
    z: Tensor,
    C: Tensor,
    R: Tensor,
    observed: Tensor | None,
    target: Tensor | None,
    jitter: float,
    eye: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One measurement update with a single Cholesky factorisation of S = C P C^T + R.

    With ``S = L L^T``, ``W = L^{-1} C P`` and ``v = L^{-1} e`` (e = z - C m): ``K = W^T L^{-1}``,
    ``m+ = m + W^T v``, ``P+ = (I - K C) P (I - K C)^T + K R K^T`` (Joseph form),
    ``log N(z) = -1/2 (|v|^2 + 2 sum log diag L + m log 2 pi)``.  Unobserved entries (``observed``
    0, a float 0/1 tensor) keep the prior and get log-likelihood 0.  ``target`` replaces ``z`` in the
    likelihood only; ``eye`` is the n x n identity.  Returns ``(mean, cov, log_lik, cholesky_info)``.
    """
    CP = C @ cov
    L, info = _innovation_cholesky(CP, C, R, jitter)
    W = torch.linalg.solve_triangular(L, CP, upper=False)
    z_pred = _mv(C, mean)
    v = torch.linalg.solve_triangular(L, (z - z_pred).unsqueeze(-1), upper=False).squeeze(-1)
    v_ll = v
    if target is not None:
        v_ll = torch.linalg.solve_triangular(L, (target - z_pred).unsqueeze(-1), upper=False).squeeze(-1)
    log_lik = log_prob_from_cholesky(v_ll, L)
    if observed is not None:
        W = W * observed[..., None, None]
        v = v * observed[..., None]
        log_lik = log_lik * observed
    K = torch.linalg.solve_triangular(L.mT, W, upper=True).mT  # (.., n, m) = P C^T S^{-1}
    mean = mean + (W.mT @ v.unsqueeze(-1)).squeeze(-1)
    M = eye - K @ C
    cov = symmetrize(M @ cov @ M.mT + K @ R @ K.mT)
    return mean, cov, log_lik, info


def _stack_batch(xs: list[Tensor], batch: int, event: tuple[int, ...]) -> Tensor:
    """Stack per-step tensors along time (dim 1) as ``(batch, T, *event)``; shared ones stay a view."""
    if all(x.dim() == len(event) for x in xs):
        return torch.stack(xs, 0).expand(batch, len(xs), *event)
    return torch.stack([x.expand(batch, *event) for x in xs], 1)


def predict(belief: Gaussian, A: Tensor, Q: Tensor, B: Tensor | None = None, u: Tensor | None = None) -> Gaussian:
    """Time update: N(A m + B u, A P A^T + Q).

    ``belief``: mean ``(..., n)``, cov ``(..., n, n)``; ``A``, ``Q``: ``(n, n)`` or ``(..., n, n)``;
    ``B``: ``(n, k)`` or ``(..., n, k)``; ``u``: ``(..., k)``.
    """
    mean, cov = belief
    n = mean.shape[-1]
    for name, x in (("A", A), ("Q", Q)):
        if _as_tensor(name, x).shape[-2:] != (n, n):
            raise ValueError(f"{name} must have shape (..., {n}, {n}), got {tuple(x.shape)}")
    if cov.shape[-2:] != (n, n):
        raise ValueError(f"belief.cov must have shape (..., {n}, {n}), got {tuple(cov.shape)}")
    if (B is None) != (u is None):
        raise ValueError("B and u must be given together")
    dtype = _dtype(mean, cov, A, Q, B, u)
    bu = None
    if u is not None:
        if B.shape[-2] != n or u.shape[-1] != B.shape[-1]:
            raise ValueError(f"B (..., {n}, k) and u (..., k) do not match: {tuple(B.shape)}, {tuple(u.shape)}")
        bu = _mv(B.to(dtype), u.to(dtype))
    with torch.autocast(mean.device.type, enabled=False):
        return Gaussian(*_predict(mean.to(dtype), cov.to(dtype), A.to(dtype), Q.to(dtype), bu))


def update(
    belief: Gaussian, z: Tensor, C: Tensor, R: Tensor, mask: Tensor | None = None
) -> tuple[Gaussian, Tensor]:
    """Measurement update of ``belief`` (mean ``(B, n)``) with one observation ``z`` ``(B, m)``.

    ``C``: ``(m, n)`` or ``(B, m, n)``; ``R``: ``(m, m)`` or ``(B, m, m)``; ``mask``: ``(B,)`` bool, True =
    observed (a NaN in ``z[b]`` also means missing).  Returns the posterior and the log-likelihood
    ``(B,)`` of ``z`` under the predictive N(C m, C P C^T + R) (0 where missing).
    """
    mean, cov = belief
    z = _as_tensor("z", z)
    n, m = mean.shape[-1], z.shape[-1]
    if _as_tensor("C", C).shape[-2:] != (m, n):
        raise ValueError(f"C must have shape (..., {m}, {n}), got {tuple(C.shape)}")
    if _as_tensor("R", R).shape[-2:] != (m, m):
        raise ValueError(f"R must have shape (..., {m}, {m}), got {tuple(R.shape)}")
    dtype = _dtype(mean, cov, z, C, R)
    z, C, R = z.to(dtype), C.to(dtype), R.to(dtype)
    missing = torch.isnan(z).any(-1)
    if mask is not None:
        missing = missing | ~_as_tensor("mask", mask).to(torch.bool)
    # applied whether or not a row is missing: no host sync to find out (multiplying by 1 changes nothing)
    observed = ~missing
    z = torch.where(observed[..., None], z, 0.0)
    observed = observed.to(dtype)
    eye = torch.eye(n, dtype=dtype, device=z.device)
    with torch.autocast(z.device.type, enabled=False):
        for jitter in _JITTERS:
            out = _update(mean.to(dtype), cov.to(dtype), z, C, R, observed, None, jitter, eye)
            if not bool((out[3] > 0).any()):
                break
        else:
            raise FloatingPointError("innovation covariance C P C^T + R is not positive definite")
    return Gaussian(out[0], out[1]), out[2]


def _filter_sequential(z, A, Q, C, R, m0, P0, bu, observed, target, jitter):
    batch, steps, m = z.shape
    n = A.shape[-1]
    per_step_R = R.dim() == 4
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    if observed is not None:
        observed = observed.to(z.dtype)
    mean, cov = m0, P0
    pm, pc, fm, fc, lls, infos = [], [], [], [], [], []
    for t in range(steps):
        mean, cov = _predict(mean, cov, A, Q, None if bu is None else bu[:, t])
        pm.append(mean)
        pc.append(cov)
        mean, cov, ll, info = _update(
            mean,
            cov,
            z[:, t],
            C,
            R[:, t] if per_step_R else R,
            None if observed is None else observed[:, t],
            None if target is None else target[:, t],
            jitter,
            eye,
        )
        fm.append(mean)
        fc.append(cov)
        lls.append(ll.expand(batch))
        infos.append(info.reshape(-1))
    ok = not bool((torch.cat(infos) > 0).any())
    result = FilterResult(
        Gaussian(_stack_batch(fm, batch, (n,)), _stack_batch(fc, batch, (n, n))),
        Gaussian(_stack_batch(pm, batch, (n,)), _stack_batch(pc, batch, (n, n))),
        *_sum_steps(torch.stack(lls, 1)),
    )
    return result, ok
