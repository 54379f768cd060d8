"""Exact, differentiable, batched Kalman filtering and Rauch-Tung-Striebel smoothing.

Model (textbook names; DESIGN section 1 calls C = D, Q = Sigma_A, R = Sigma_D)::

    h_t = A h_{t-1} + B u_t + w_t,   w_t ~ N(0, Q),      h_0 ~ N(m0, P0)
    z_t = C h_t + v_t,               v_t ~ N(0, R),      t = 1..T

Conventions (shared with the rest of the project):

* ``z`` is ``(B, T, m)``; the state dimension is ``n``.  ``(m0, P0)`` is the belief of ``h_0`` *before*
  the first observation, so there are ``T`` predict steps:
  ``predicted[:, t] = predict(filtered[:, t-1], u[:, t])`` with ``filtered[:, -1] := N(m0, P0)``.
* ``u`` is ``(B, T, k)``; ``u[:, t]`` drives the transition *into* step ``t``.
* ``mask`` is ``(B, T)`` bool, True = observed.  A NaN anywhere in ``z[b, t]`` also marks the step as
  missing.  Missing steps skip the update (filtered = predicted) and add nothing to the likelihood;
  their NaNs never reach the outputs or the gradients.
* Parameters are shared (``A: (n, n)``) or batched (``A: (B, n, n)``); ``R`` may also be per step,
  ``(B, T, m, m)`` (heteroscedastic observation noise).
* Computation runs in float32 or float64 (the promoted dtype of the inputs).  Half-precision inputs
  (float16/bfloat16) are upcast to float32 and autocast is disabled inside the filter.

Numerics: one Cholesky factorisation ``S = L L^T`` of the innovation covariance per step gives the
gain (triangular solves), the Mahalanobis term and ``log|S| = 2 sum log diag L``; the covariance update
uses the Joseph form ``(I - K C) P (I - K C)^T + K R K^T`` and every covariance is symmetrised.  No
explicit inverse is formed.  Should a Cholesky factorisation fail (float32 round-off on an
ill-conditioned system), the computation is repeated with a small relative diagonal jitter.

Speed: when every step is observed and R is one matrix per sequence (the world-model case),
``kalman_filter`` runs a fused sequential filter (``_filter_fused``). Its covariance recursion does not
depend on z, so with shared parameters it runs once for the whole batch; for small n + m each step is a
single Cholesky factorisation of the joint covariance of (z_t, h_t), which yields S's factor, the gain
and a Cholesky factor of P_{t|t} at once; the covariance recursion, the mean recursion and the
innovation likelihood are single autograd nodes with hand-written reverse passes (checked against
autograd on the step-wise filter by gradcheck). The covariance recursion of a time-invariant system
converges to a fixed point (the steady-state Kalman filter); once its estimated distance to that point
is within a few ulps (``_steady``, typically 10-40 steps) it stops and later steps repeat the last one,
which is what the recursion would compute up to round-off, and the reverse pass still runs the
adjoint recursion over every step. After the stop the gain and the innovation covariance are constant,
so their consumers apply them to all later steps at once (one matrix product, one triangular solve), and
the linear recursions with constant coefficients (the means, their adjoint and the covariance adjoint)
run in chunks of about sqrt(T) steps (``_constant_recursion``, ``_sandwich_recursion``). Fresh memory
is kept to a minimum (a page fault costs more than the arithmetic at these sizes): outputs are written
once, the reverse pass takes views of its per-step inputs, and outputs of 32 MiB or more get huge pages
(``_new_empty``). Missing steps or per-step R use the step-wise filter.

With parameters shared by the batch, on CPU, the sequential loops of the fused filter run in C
(``worldmodel.native``: the covariance recursion, the means, the innovation likelihood, and the
sequential parts of their reverse passes), calling the BLAS/LAPACK that torch links once per matrix
op instead of dispatching a tensor op (a 2x faster forward at T=64, d=32). The native covariance
recursion is the standard form with a Cholesky factorisation of P_{t|t} per step (to flag a lost
definiteness, as the joint form does) and the same steady-state stop on the joint factor. Where the
native loops cannot be built, the Python loops run, with the same results up to round-off.

The parallel-in-time filter and smoother use the associative-scan formulation of Särkkä & García-Fernández,
"Temporal parallelization of Bayesian smoothers", IEEE TAC 66(1), 2021: O(log T) depth.
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor

from . import native

__all__ = ["Gaussian", "FilterResult", "predict", "update", "kalman_filter", "rts_smoother"]

_LOG_2PI = math.log(2.0 * math.pi)
# the fused filter factorises the joint (z_t, h_t) covariance up to this n + m (a quarter of it for a
# batch of recursions; see _joint_recursion and _filter_fused)
_JOINT_MAX_DIM = 64
# relative diagonal jitters tried, in order, when a Cholesky factorisation fails
_JITTERS = (0.0, 1e-6, 1e-4, 1e-2)
# the fused filter's covariance recursion stops at its steady state, once it is this many ulps from its
# fixed point (0: never), checked every _STEADY_EVERY steps while at least _STEADY_MIN_LEFT steps remain
# (stopping later saves less than the checks and the reverse pass's handling of the repeated steps cost)
_STEADY_ULPS = 4.0
_STEADY_EVERY = 4
_STEADY_MIN_LEFT = 16
# a linear recursion with one matrix for every step (the means after the steady state) runs in chunks of
# ~sqrt(T) steps when a step is this small (B n^2 multiply-adds) and chunks have at least this many steps
_CHUNKED_MAX_WORK = 2**17
_CHUNKED_MIN_LEN = 4
# the same for the covariance adjoint's recursion G <- D + N G N^T after the steady state (2 B n^3 per step)
_CHUNKED_MAX_SANDWICH = 2**20
# buffers from this size on get a mapping of their own with huge pages (``_new_empty``): glibc's largest
# mmap threshold, above which it maps every buffer afresh (below it, a reused heap block is faster)
_HUGE_PAGE_MIN_BYTES = 32 << 20


class Gaussian(NamedTuple):
    """A Gaussian belief N(mean, cov): ``mean (..., n)``, ``cov (..., n, n)``."""

    mean: Tensor
    cov: Tensor


class FilterResult(NamedTuple):
    """Output of :func:`kalman_filter`.

    ``filtered``: N(m_{t|t}, P_{t|t}) ``(B, T, n)``; ``predicted``: N(m_{t|t-1}, P_{t|t-1}) ``(B, T, n)``;
    ``log_likelihood``: ``(B,)`` = sum_t log N(z_t; C m_{t|t-1}, C P_{t|t-1} C^T + R);
    ``step_log_likelihood``: the per-step terms ``(B, T)`` (0 at missing steps).
    """

    filtered: Gaussian
    predicted: Gaussian
    log_likelihood: Tensor
    step_log_likelihood: Tensor


# ----------------------------------------------------------------------------------------------------
# small numerical helpers (no validation; broadcasting over leading dimensions)


def _sym(P: Tensor) -> Tensor:
    return 0.5 * (P + P.mT)


def _mv(M: Tensor, x: Tensor) -> Tensor:
    """Matrix-vector product ``M x`` broadcasting over leading dimensions."""
    if M.dim() == 2:
        return x @ M.mT
    return (M @ x.unsqueeze(-1)).squeeze(-1)


def _add_jitter(S: Tensor, jitter: float | Tensor) -> Tensor:
    """``S + jitter * diag(diag(S) + mean(diag(S)))``: a scale-aware diagonal jitter (also lifts zero
    diagonal entries)."""
    d = S.diagonal(dim1=-2, dim2=-1)
    return S + torch.diag_embed(jitter * (d + d.mean(-1, keepdim=True)))


def _cholesky_ex(S: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.linalg.cholesky_ex(S)`` (lower factor, info), computed as the upper factor and transposed:
    MKL factorises that 1.2-1.45x faster at n >= 64, and the transposed view is row-major contiguous."""
    U, info = torch.linalg.cholesky_ex(S, upper=True)
    return U.mT, info


def _innovation_cholesky(CP: Tensor, C: Tensor, R: Tensor, jitter: float | Tensor) -> tuple[Tensor, Tensor]:
    """``cholesky_ex`` of the innovation covariance ``S = C P C^T + R`` (symmetrised, optional jitter),
    given ``CP = C P``."""
    S = _sym(CP @ C.mT + R)
    if jitter:
        S = _add_jitter(S, jitter)
    return _cholesky_ex(S)


def _cholesky(S: Tensor, name: str = "covariance") -> Tensor:
    """Batched Cholesky factor with jitter retry, only for the matrices that fail (outside recursions)."""
    L, info = _cholesky_ex(S)
    for jitter in _JITTERS[1:]:
        failed = info > 0
        if not bool(failed.any()):
            return L
        L, info = _cholesky_ex(_add_jitter(S, failed[..., None] * jitter))
    if bool((info > 0).any()):
        raise FloatingPointError(f"{name} is not positive definite even after jitter")
    return L


def _gauss_log_prob(v: Tensor, L: Tensor) -> Tensor:
    """log N(x; mu, L L^T) given the whitened residual ``v = L^{-1} (x - mu)``."""
    log_det = 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * (v.square().sum(-1) + log_det + v.shape[-1] * _LOG_2PI)


def _predict(mean: Tensor, cov: Tensor, A: Tensor, Q: Tensor, bu: Tensor | None) -> tuple[Tensor, Tensor]:
    """m' = A m + B u,  P' = A P A^T + Q (symmetrised)."""
    mean = _mv(A, mean)
    if bu is not None:
        mean = mean + bu
    return mean, _sym(A @ cov @ A.mT + Q)


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
    log_lik = _gauss_log_prob(v_ll, L)
    if observed is not None:
        W = W * observed[..., None, None]
        v = v * observed[..., None]
        log_lik = log_lik * observed
    K = torch.linalg.solve_triangular(L.mT, W, upper=True).mT  # (.., n, m) = P C^T S^{-1}
    mean = mean + (W.mT @ v.unsqueeze(-1)).squeeze(-1)
    M = eye - K @ C
    cov = _sym(M @ cov @ M.mT + K @ R @ K.mT)
    return mean, cov, log_lik, info


# ----------------------------------------------------------------------------------------------------
# input validation (once, at entry)


def _dtype(*xs: Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for x in xs:
        if x is not None and x.is_floating_point():
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _as_tensor(name: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _problems(named: dict[str, Tensor], covariances: tuple[str, ...]) -> tuple[list[tuple[str, bool]], Tensor]:
    """Checks of the inputs ``named``: ``(message, whether only finiteness counts)`` pairs and their values,
    one 1-D tensor not yet synchronised (see ``_raise_first``). Non-finite values in each tensor (its sum,
    where NaN and inf propagate); for the ``covariances`` among them also asymmetry and a failed Cholesky
    factorisation beyond round-off (not positive semi-definite): invalid where the value is > 0.
    Covariances of one shape are checked together, as one stack."""
    checks, sums, groups = [], [], {}
    for name, x in named.items():
        if name in covariances:
            groups.setdefault(tuple(x.shape), []).append(name)
        else:
            checks.append((f"{name} contains non-finite values (NaN or inf)", True))
            sums.append(x.sum())
    values = [torch.stack(sums)]
    for names in groups.values():
        X = torch.stack([named[name] for name in names])  # a fresh copy, lifted in place below
        scale = X.abs().amax((-2, -1), keepdim=True)
        tol = (1e3 * torch.finfo(X.dtype).eps) * scale.clamp_min(torch.finfo(X.dtype).tiny)
        asymmetry = ((X - X.mT).abs() - tol).flatten(1).amax(1)
        X.diagonal(dim1=-2, dim2=-1).add_(tol[..., 0])
        failed = torch.linalg.cholesky_ex(X, upper=True).info.reshape(len(names), -1).amax(1)  # upper: faster
        values.append(torch.stack([scale.flatten(1).sum(1), asymmetry, failed.to(X.dtype)], 1).flatten())
        for name in names:
            checks += [(f"{name} contains non-finite values (NaN or inf)", True),
                       (f"{name} must be a symmetric covariance matrix", False),
                       (f"{name} must be positive (semi-)definite", False)]
    return checks, torch.cat(values)


def _raise_first(problems: tuple[list[tuple[str, bool]], Tensor], *fetch: Tensor) -> list[float]:
    """Raise ValueError with the message of the first failed check of ``_problems``: a value that is not
    finite, or one > 0 unless only finiteness counts. One host sync, which also fetches the 0-d tensors
    ``fetch`` (returned as floats)."""
    checks, values = problems
    values = torch.cat([values, *(x.reshape(1) for x in fetch)]).tolist()  # one dtype: inputs are cast to it
    for (message, finite_only), value in zip(checks, values):
        if not math.isfinite(value) or (value > 0 and not finite_only):
            raise ValueError(message)
    return values[len(checks):]


def _param(name: str, x, shape: tuple[int, ...], batch: int, steps: int | None = None) -> Tensor:
    """Check that ``x`` has ``shape`` (shared), ``(batch, *shape)`` (batched) or, if ``steps`` is given,
    ``(batch, steps, *shape)`` (per step); a leading batch dimension of 1 is accepted and dropped."""
    x = _as_tensor(name, x)
    allowed = [shape, (batch, *shape), (1, *shape)]
    if steps is not None:
        allowed += [(batch, steps, *shape), (1, steps, *shape)]
    if tuple(x.shape) not in allowed:
        opts = " or ".join(str(s) for s in allowed[:2] + allowed[3:4])
        raise ValueError(f"{name} must have shape {opts}, got {tuple(x.shape)}")
    if x.dim() > len(shape) and x.shape[0] == 1 and batch != 1:
        x = x.expand(batch, *x.shape[1:])
    return x


def _prepare(z, A, Q, C, R, m0, P0, B, u, mask, target):
    """Validate all inputs once and return them cast to the compute dtype, plus ``(bu, observed)``."""
    z = _as_tensor("z", z)
    if z.dim() != 3 or z.shape[1] == 0:
        raise ValueError(f"z must have shape (B, T, m) with T >= 1, got {tuple(z.shape)}")
    batch, steps, m = z.shape
    A = _as_tensor("A", A)
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must have shape (n, n) or (B, n, n), got {tuple(A.shape)}")
    n = A.shape[-1]
    A = _param("A", A, (n, n), batch)
    Q = _param("Q", Q, (n, n), batch)
    C = _param("C", C, (m, n), batch)
    R = _param("R", R, (m, m), batch, steps)
    m0 = _param("m0", m0, (n,), batch)
    P0 = _param("P0", P0, (n, n), batch)
    if (B is None) != (u is None):
        raise ValueError("B and u must be given together (got only " + ("B)" if u is None else "u)"))
    if u is not None:
        u = _as_tensor("u", u)
        if u.dim() != 3 or u.shape[:2] != (batch, steps):
            raise ValueError(f"u must have shape (B, T, k) = ({batch}, {steps}, k), got {tuple(u.shape)}")
        B = _param("B", B, (n, u.shape[-1]), batch)
    if target is not None:
        target = _as_tensor("target", target)
        if target.shape != z.shape:
            raise ValueError(f"target must have the shape of z {tuple(z.shape)}, got {tuple(target.shape)}")

    dtype = _dtype(z, A, Q, C, R, m0, P0, B, u, target)
    A, Q, C, R, m0, P0, z = (x.to(dtype) for x in (A, Q, C, R, m0, P0, z))
    if target is not None:
        target = target.to(dtype)
    if u is not None:
        B, u = B.to(dtype), u.to(dtype)
    named = dict(A=A, C=C, m0=m0, Q=Q, R=R, P0=P0) | ({} if u is None else dict(B=B, u=u))
    # NaN in z or target marks a missing step; their sums are finite when there is none (the common case)
    with torch.no_grad():  # checks only: nothing for autograd to record
        sums = _raise_first(_problems(named, ("Q", "R", "P0")), *(x.sum() for x in (z, target) if x is not None))
    observed = None
    if mask is not None or not all(math.isfinite(x) for x in sums):
        missing = torch.isnan(z).any(-1)
        if target is not None:
            missing = missing | torch.isnan(target).any(-1)
        if mask is not None:
            mask = _as_tensor("mask", mask)
            if tuple(mask.shape) != (batch, steps):
                raise ValueError(f"mask must have shape (B, T) = ({batch}, {steps}), got {tuple(mask.shape)}")
            missing = missing | ~mask.to(torch.bool)
        if bool(missing.any()):
            observed = ~missing
            z = torch.where(observed[..., None], z, 0.0)
            if target is not None:
                target = torch.where(observed[..., None], target, 0.0)
        if bool(torch.isinf(z).any()) or (target is not None and bool(torch.isinf(target).any())):
            raise ValueError("z contains inf (NaN marks a missing observation, inf is an error)")
    bu = None
    if u is not None:
        bu = u @ B.mT if B.dim() == 2 else torch.einsum("bnk,btk->btn", B, u)
    return z, A, Q, C, R, m0, P0, bu, observed, target


def _stack_batch(xs: list[Tensor], batch: int, event: tuple[int, ...]) -> Tensor:
    """Stack per-step tensors along time (dim 1) as ``(batch, T, *event)``; shared ones stay a view."""
    if all(x.dim() == len(event) for x in xs):
        return torch.stack(xs, 0).expand(batch, len(xs), *event)
    return torch.stack([x.expand(batch, *event) for x in xs], 1)


def _per_step(x: Tensor, event_dims: int) -> Tensor:
    """Give a shared or batched parameter a broadcastable time axis: ``(B, ...)`` -> ``(B, 1, ...)``."""
    return x.unsqueeze(1) if x.dim() > event_dims else x


# ----------------------------------------------------------------------------------------------------
# public single-step API


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
    observed = None
    if bool(missing.any()):
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


# ----------------------------------------------------------------------------------------------------
# filters


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


def _sum_steps(step_ll: Tensor) -> tuple[Tensor, Tensor]:
    return step_ll.sum(1), step_ll


# ----------------------------------------------------------------------------------------------------
# fused sequential filter: every step observed, one R per sequence (the world-model case)
#
# The covariance recursion does not depend on z, so with shared parameters it runs once for the whole
# batch; the means then follow the linear recursion m_t = (I - K_t C) (A m_{t-1} + B u_t) + K_t z_t.
# Both recursions are single autograd nodes with hand-written reverse passes, so the time loop issues
# a handful of matrix ops per step instead of ~40 recorded ones.


@contextlib.contextmanager
def _calling_thread_only(device: torch.device):
    """Run CPU work on the calling thread. The filter is a chain of small matrix ops that intra-op
    threads do not speed up, and on a busy machine every parallel region waits for its slowest thread
    (10x slower end to end with 2 threads on a loaded 2-core machine); the count is restored after."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _on_calling_thread(backward):
    """Decorate an autograd.Function backward to run under ``_calling_thread_only``."""

    @functools.wraps(backward)
    def wrapped(ctx, *grads):
        with _calling_thread_only(ctx.saved_tensors[0].device):
            return backward(ctx, *grads)

    return wrapped


def _mm_add(bias: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``bias + alpha * a @ b`` for matrices or stacks of matrices (one fused BLAS call)."""
    if a.dim() == 2:
        return torch.addmm(bias, a, b, alpha=alpha)
    return torch.baddbmm(bias, a, b, alpha=alpha)


def _rmul(Y: Tensor, M: Tensor) -> Tensor:
    """``Y_t @ M`` for a stack ``Y`` (..., T, a, b) and a matrix ``M`` (b, c) or (B, b, c) constant in time;
    a shared ``M`` folds the time axis into one matrix product."""
    return Y @ M if M.dim() == 2 else Y @ M.unsqueeze(-3)


def _lmul(M: Tensor, Y: Tensor) -> Tensor:
    """``M @ Y_t`` for a matrix ``M`` constant in time (see ``_rmul``)."""
    return M @ Y if M.dim() == 2 else M.unsqueeze(-3) @ Y


def _tsum(X: Tensor, Y: Tensor) -> Tensor:
    """``sum_t X_t @ Y_t`` over the time axis (dim -3) as one matrix product [X_1 .. X_T] [Y_1; ..; Y_T]."""
    if X.dim() > 3:
        return (X @ Y).sum(-3)
    steps, a, k = X.shape
    return X.permute(1, 0, 2).reshape(a, steps * k) @ Y.reshape(steps * k, Y.shape[-1])


def _steady(L: Tensor, L_prev: Tensor, change_before: float | None) -> tuple[bool, float]:
    """Whether a covariance recursion has reached its fixed point to within rounding.

    ``L``, ``L_prev``: the Cholesky factors of two consecutive steps; ``change_before``: the change this
    returned ``_STEADY_EVERY`` steps earlier. The Riccati recursion of a time-invariant, detectable
    system contracts at a linear rate r, so with the relative change delta = max|L - L_prev| / max|L|
    the distance left to the fixed point is about delta r / (1 - r), r = (delta / change_before)^(1/k).
    Steady when delta and that distance are both below ``_STEADY_ULPS`` ulps (one host sync)."""
    diff, scale = torch.stack([(L - L_prev).abs().amax(), L.abs().amax()]).tolist()
    change = diff / scale if scale > 0 else 0.0
    if change == 0:
        return True, change
    if not change_before:
        return False, change
    tol = _STEADY_ULPS * torch.finfo(L.dtype).eps
    rate = (change / change_before) ** (1.0 / _STEADY_EVERY)
    return change <= tol and rate < 1 and change * rate <= tol * (1.0 - rate), change


class _SteadyStop:
    """Decides, step by step, when a covariance recursion of ``steps`` steps may stop (see ``_steady``):
    every later step would repeat the last one (``_repeat_last`` and ``_steady_tail`` restore them)."""

    def __init__(self, steps: int):
        self.steps, self.change, self.prev = steps, None, None

    def __call__(self, t: int, L: Tensor) -> bool:
        done = False
        due = (t + 1) % _STEADY_EVERY == 0 and t + 1 + _STEADY_MIN_LEFT <= self.steps
        if _STEADY_ULPS and due and self.prev is not None:
            done, self.change = _steady(L, self.prev, self.change)
        self.prev = L
        return done


def _new_empty(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``x.new_empty(shape)``. On CPU (Linux), a buffer of ``_HUGE_PAGE_MIN_BYTES`` or more gets a mapping of
    its own with transparent huge pages requested: glibc maps buffers this large afresh on every call,
    and writing one then takes a page fault every 4 KiB (about 3 us each on the benchmark machine). A
    fresh 64 MiB buffer is written in 9 ms this way against 29 ms. The mapping lives as long as the
    tensor."""
    nbytes = math.prod(shape) * x.element_size()
    if x.device.type != "cpu" or nbytes < _HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return x.new_empty(shape)
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # a kernel without transparent huge pages: plain pages, still one mapping
        buffer.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buffer, dtype=x.dtype).view(shape)


def _repeat_last(x: Tensor, steps: int, dim: int, sym: bool = False) -> Tensor:
    """Extend ``x`` along ``dim`` to ``steps`` entries by repeating its last entry, written once into a new
    tensor (``x`` itself if complete and not ``sym``); ``sym``: also symmetrise (matrices on the last two
    dims) on the way, instead of in a copy of its own (at these sizes fresh pages cost more than the
    arithmetic)."""
    dim, have = dim % x.dim(), x.shape[dim]
    last = x.narrow(dim, have - 1, 1).expand(*x.shape[:dim], steps - have, *x.shape[dim + 1 :])
    if not sym:
        return torch.cat([x, last], dim) if steps > have else x
    out = _new_empty(x, (*x.shape[:dim], steps, *x.shape[dim + 1 :]))
    head = torch.add(x, x.mT, out=out.narrow(dim, 0, have)).mul_(0.5)
    out.narrow(dim, have, steps - have).copy_(head.narrow(dim, have - 1, 1).expand_as(last))
    return out


def _covariance_recursion(A, Q, C, R, P0, steps: int, joseph: bool):
    """P_{t|t-1} = A P A^T + Q, S = C P_{t|t-1} C^T + R = L L^T, W = L^{-1} C P_{t|t-1} and
    P_{t|t} = P_{t|t-1} - W^T W (``joseph``: (I - K C) P_{t|t-1} (I - K C)^T + K R K^T), symmetrised.
    Returns the stacks (dim -3) P_{t|t-1}, P_{t|t}, X = S^{-1} C P_{t|t-1} (= K^T), S, L and the info,
    up to the step where the recursion reached its steady state (``_SteadyStop``): later steps repeat it.
    The returned P_{t|t-1} are not symmetrised (the caller does that as it extends them to all steps)."""
    At, Ct = A.mT, C.mT
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    P = P0
    Pps, Pfs, WTs, Ls, Ss, infos = [], [], [], [], [], []
    stop = _SteadyStop(steps)
    for t in range(steps):
        Pp = _mm_add(Q, A @ P, At)
        U = C @ Pp
        S = _mm_add(R, U, Ct)
        L, info = _cholesky_ex(S)
        WT = torch.linalg.solve_triangular(L.mT, U.mT, upper=True, left=False)  # (L^{-1} U)^T
        if joseph:
            KT = torch.linalg.solve_triangular(L.mT, WT.mT, upper=True)
            M = eye - KT.mT @ C
            P = _mm_add(M @ Pp @ M.mT, KT.mT @ R, KT)
        else:
            P = _mm_add(Pp, WT, WT.mT, alpha=-1.0)
        P = _sym(P)
        Pps.append(Pp), Pfs.append(P), WTs.append(WT), Ls.append(L), Ss.append(S), infos.append(info)
        if stop(t, L):
            break
    Pp, Pf, WT, L, S = (torch.stack(x, -3) for x in (Pps, Pfs, WTs, Ls, Ss))
    X = torch.linalg.solve_triangular(L, WT, upper=False, left=False).mT  # (W^T L^{-1})^T
    return Pp, Pf, X, S, L, torch.stack(infos, -1)


def _joint_recursion(A, Q, C, R, P0, steps: int):
    """The same recursion with one Cholesky factorisation per step, of the joint covariance of (z_t, h_t):

        J = G P_{t-1|t-1} G^T + J0 = [[S, C P_{t|t-1}], [P_{t|t-1} C^T, P_{t|t-1}]],  G = [C A; A],
        J0 = [[C Q C^T + R, C Q], [Q C^T, Q]],   chol(J) = [[L, 0], [W^T, L_f]],

    where L L^T = S, W = L^{-1} C P_{t|t-1} and L_f L_f^T = P_{t|t-1} - W^T W = P_{t|t} (the Schur
    complement): the filtered covariance comes out as a Cholesky factor, positive definite by
    construction, and the step carries that factor (P G^T = L_f (G L_f)^T): 3 matrix ops per step.
    Info i in 1..m: S is not positive definite; i > m: P_{t|t} is singular (use ``_covariance_recursion``).
    Returns what ``_covariance_recursion`` does; here neither covariance stack is symmetrised."""
    m = C.shape[-2]
    G = torch.cat([C @ A, A], -2)
    CQ = C @ Q
    J0 = torch.cat([torch.cat([_mm_add(R, CQ, C.mT), CQ], -1), torch.cat([CQ.mT, Q], -1)], -2)
    Y = G @ P0
    Gt = G.mT
    mm = torch.mm if G.dim() == 2 else torch.bmm
    Js, Ljs, infos = [], [], []
    stop = _SteadyStop(steps)
    for t in range(steps):
        J = _mm_add(J0, Y, Gt if t == 0 else Y.mT)
        Lj, info = _cholesky_ex(J)
        Js.append(J), Ljs.append(Lj), infos.append(info)
        if stop(t, Lj):
            break
        Y = mm(G, Lj[..., m:, m:])
    J, Lj = torch.stack(Js, -3), torch.stack(Ljs, -3)
    L, WT, Lf = Lj[..., :m, :m], Lj[..., m:, :m], Lj[..., m:, m:]
    X = torch.linalg.solve_triangular(L, WT, upper=False, left=False).mT  # (W^T L^{-1})^T
    return J[..., m:, m:], Lf @ Lf.mT, X, J[..., :m, :m], L, torch.stack(infos, -1)


def _cholesky_inverse(cache: dict) -> Tensor:
    """S_t^{-1} for the steps up to the steady state, from the factors ``L`` the covariance recursion left
    in ``cache``; computed once per filter call for the reverse passes (not in the recursion)."""
    if "S_inv" not in cache:
        cache["S_inv"] = torch.cholesky_inverse(cache["L"]).mT  # symmetric; the transpose is contiguous
    return cache["S_inv"]


def _split_steps(x: Tensor | None, k: int, dim: int = -3) -> tuple[Tensor | None, Tensor | None]:
    """``x`` split along its time axis ``dim`` into the first ``k`` steps and the rest (None: None, None)."""
    if x is None:
        return None, None
    return x.narrow(dim, 0, k), x.narrow(dim, k, x.shape[dim] - k)


def _steady_tail(x: Tensor, steps: int) -> Tensor:
    """The last entry of a stack ``(..., k, a, b)`` repeated for the ``steps - k`` steps after the steady
    state, as a stride-0 view ``(..., steps - k, a, b)``."""
    return x[..., -1:, :, :].expand(*x.shape[:-3], steps - x.shape[-3], *x.shape[-2:])


def _step_matvec(M: Tensor, x: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``M_t x_t`` for every step: ``M`` ``(k, a, b)`` (shared) or ``(B, k, a, b)``, one matrix per step up
    to the steady state and its last one after it; ``x``: ``(B, T, b)`` split into its first k steps and
    the rest (``_split_steps``) -> ``(B, T, a)``, split alike. The steps after the steady state are one
    matrix product."""
    head, tail = x
    head = torch.bmm(M, head.permute(1, 2, 0)).permute(2, 0, 1) if M.dim() == 3 else (M @ head[..., None])[..., 0]
    return head, tail @ M[..., -1, :, :].mT


def _step_solve(L: Tensor, x: tuple[Tensor, Tensor], upper: bool) -> tuple[Tensor, Tensor]:
    """``L_t^{-1} x_t`` for every step, with triangular ``L`` and ``x`` laid out as in ``_step_matvec``.
    Solved from the right on rows, x_t^T L_t^{-T} (2-3x faster than from the left for a long stack of
    right sides); the results are made contiguous (LAPACK returns them column-major, which slows every
    later product down several times)."""
    (head, tail), Lt = x, L.mT
    if L.dim() == 3:
        head = torch.linalg.solve_triangular(Lt, head.transpose(0, 1), upper=not upper, left=False).transpose(0, 1)
    else:
        head = torch.linalg.solve_triangular(Lt, head[..., None, :], upper=not upper, left=False)[..., 0, :]
    tail = torch.linalg.solve_triangular(Lt[..., -1, :, :], tail, upper=not upper, left=False)
    return head.contiguous(), tail.contiguous()


def _step_outer(a: Tensor, b: Tensor, shared: bool) -> Tensor:
    """``sum_b a_bt b_bt^T`` per step ``(T, i, j)`` (``shared``) or ``a_bt b_bt^T`` ``(B, T, i, j)``."""
    return torch.bmm(a.permute(1, 2, 0), b.transpose(0, 1)) if shared else a[..., :, None] * b[..., None, :]


def _outer_sum(a: Tensor, b: Tensor, shared: bool) -> Tensor:
    """``sum_{b,t} a_bt b_bt^T`` ``(i, j)`` (``shared``) or ``sum_t a_bt b_bt^T`` ``(B, i, j)``; ``a`` and ``b``
    ``(B, T, .)`` may be views into longer stacks (one product per sequence, no copies)."""
    products = a.mT @ b
    return products.sum(0) if shared else products


def _sandwich_recursion(N: Tensor, D: Tensor, reverse: bool = False) -> tuple[Tensor, Tensor]:
    """G_s = D_s + N G_{s-1} N^T for s = 1..L from G_0 = 0 (``reverse``: G_s = D_s + N G_{s+1} N^T for
    s = L..1), with one ``N`` ``(n, n)`` or ``(B, n, n)``: ``D`` ``(L, n, n)`` or ``(B, L, n, n)`` -> (sum_s G_s,
    the last state), each ``(n, n)`` or ``(B, n, n)``; zeros for L = 0.

    Runs in chunks of about sqrt(L) steps as ``_constant_recursion`` does, without copying ``D``: the
    L mod size steps processed first run one by one; the chunks then start from their state, and the
    states before the chunks enter the sum through sum_{j=1..size} N^j (sum of those states) N^jT."""
    steps = D.shape[-3]
    if not steps:
        zero = D.new_zeros(*D.shape[:-3], *D.shape[-2:])
        return zero, zero
    if reverse and N.dim() == 2 and D.dim() == 3 and native.usable(N):
        return native.sandwich_recursion(N, D, states=False)[1:]
    size = math.isqrt(steps)
    one_by_one = size < _CHUNKED_MIN_LEN or 2 * N.numel() * N.shape[-1] > _CHUNKED_MAX_SANDWICH
    first = steps if one_by_one else steps % size  # steps run one by one, before any chunk
    G = total = None
    for s in range(steps - 1, steps - 1 - first, -1) if reverse else range(first):
        G = D[..., s, :, :] if G is None else D[..., s, :, :] + N @ G @ N.mT
        total = G if total is None else total + G
    if one_by_one:
        return total, G
    rest = D.narrow(-3, 0 if reverse else first, steps - first)
    chunks = rearrange(rest, "... (k j) n m -> ... j k n m", j=size).unbind(-4)
    N_k, Y, Y_sum = N.unsqueeze(-3), None, None  # Y: the recursion within each chunk, from 0
    for D_j in chunks[::-1] if reverse else chunks:
        Y = D_j if Y is None else D_j + N_k @ Y @ N_k.mT
        Y_sum = Y if Y_sum is None else Y_sum + Y
    powers = [N]  # N^1 .. N^size
    for _ in range(size - 1):
        powers.append(powers[-1] @ N)
    starts = None  # the sum of the states before each chunk
    for Y_end in Y.unbind(-3)[::-1] if reverse else Y.unbind(-3):
        if G is not None:
            starts = G if starts is None else starts + G
        G = Y_end if G is None else Y_end + powers[-1] @ G @ powers[-1].mT
    total = Y_sum.sum(-3) if total is None else total + Y_sum.sum(-3)
    if starts is not None:
        P = torch.stack(powers, -3)
        total = total + (P @ starts.unsqueeze(-3) @ P.mT).sum(-3)
    return total, G


class _CovarianceRecursion(torch.autograd.Function):
    """P_{t-1|t-1} -> P_{t|t-1} = A P A^T + Q -> P_{t|t} for t = 1..T, one Cholesky factorisation per step.

    ``form``: ``joint`` (``_joint_recursion``), ``standard`` (P_{t|t} = P_{t|t-1} - W^T W) or ``joseph``
    (Joseph form, for singular or hard cases). Inputs are 2-D (shared) or all batched ``(B, ., .)``; Q, R
    and P0 are symmetrised on entry. The recursion stops at its steady state (step k, see ``_steady``);
    later steps repeat step k. Returns, stacked over time (dim -3): P_{t|t-1} and P_{t|t} for all T steps;
    X_t = S_t^{-1} U_t (= K_t^T, U = C P_{t|t-1}) and S_t for the first k steps, each followed by its
    *steady tail*, step k repeated for the T - k later steps as a stride-0 view (consumers compute with
    it once and return a gradient per step); the Cholesky factor L_t of S_t (k steps, no gradient: the
    gradient goes through S_t) and the Cholesky info ``(..., k)`` (``standard``: also > 0 where P_{t|t}
    is not positive definite).

    Reverse pass (one derivative for every form, since the gain is optimal): with G_t the gradient
    reaching P_{t|t}, P_{t|t} = P_{t|t-1} - U^T S^{-1} U and X = S^{-1} U give g_S = X G X^T + g_S',
    g_U = g_S C + V - 2 X G with V = S^{-1} g_X and g_S' = sym(g_S(out) - V X^T), hence
    g_{P_{t|t-1}} = M G M^T + c, M = I - K C, c = sym(C^T (g_S' C + V)) (+ its own output gradient).
    The only sequential part is G_{t-1} = g_{P_{t-1|t-1}}(out) + A^T g_{P_{t|t-1}} A, two products per
    step; then g_Q = sum g_{P_{t|t-1}}, g_R = sum g_S, g_A = 2 sum g_{P_{t|t-1}} A P_{t-1|t-1},
    g_C = sum g_S U + g_U P_{t|t-1}, all batched over time. After the steady state the coefficients
    (X, M, S, P) are constant, so those sums over the repeated steps take the summed G_t, g_S', V, c.
    """

    @staticmethod
    def forward(ctx, A, Q, C, R, P0, steps: int, form: str, cache: dict):
        ctx.set_materialize_grads(False)
        Q, R, P0 = _sym(Q), _sym(R), _sym(P0)  # the reverse pass returns symmetric gradients to match
        if form != "joseph" and A.dim() == 2 and native.usable(A):
            stop = (_STEADY_ULPS, _STEADY_EVERY, _STEADY_MIN_LEFT)
            Pp, Pf, X, S, L, info = native.covariance_recursion(A, Q, C, R, P0, steps, *stop)
        else:
            if form == "joint":
                Pp, Pf, X, S, L, info = _joint_recursion(A, Q, C, R, P0, steps)
            else:
                Pp, Pf, X, S, L, info = _covariance_recursion(A, Q, C, R, P0, steps, form == "joseph")
                if form == "standard":  # P - W^T W can lose definiteness: flag it (the caller uses Joseph then)
                    info = info + (_cholesky_ex(Pf)[1] > 0)
            Pp, Pf = (_repeat_last(P, steps, -3, sym=True) for P in (Pp, Pf))
        k = X.shape[-3]
        ctx.save_for_backward(A, C, P0, Pf[..., :k, :, :], Pp[..., :k, :, :], X)
        ctx.steps, ctx.cache = steps, cache
        cache.clear()
        cache.update(L=L)  # S^{-1}, shared with the likelihood's reverse pass
        ctx.mark_non_differentiable(L, info)
        return Pp, Pf, X, _steady_tail(X, steps), S, _steady_tail(S, steps), L, info

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_on_calling_thread
    def backward(ctx, gPp_out, gPf_out, gX_head, gX_tail, gS_head, gS_tail, _L, _info):
        A, C, P0, Pf, Pp, X = ctx.saved_tensors  # per step up to the steady state: k steps
        steps, k = ctx.steps, X.shape[-3]
        S_inv = _cholesky_inverse(ctx.cache)
        gPp_head, gPp_tail = _split_steps(gPp_out, k)
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        M_T = eye - _rmul(X.mT, C)  # (I - K C)^T
        N_T = _rmul(M_T, A)  # (A^T (I - K C))^T

        def inputs(gS: Tensor | None, gX: Tensor | None, gPp: Tensor | None, X: Tensor, S_inv: Tensor):
            """g_S', V and c for a run of steps: output gradients and coefficients stacked over time (dim -3;
            coefficients with a time axis of 1 broadcast)."""
            gS_pre = _sym(gS) if gS is not None else X.new_zeros(*X.shape[:-1], X.shape[-2])
            V = X.new_zeros(X.shape)
            if gX is not None:
                V = S_inv @ gX  # S^{-1} g_X
                gS_pre = _sym(gS_pre - V @ X.mT)
            c = _lmul(C.mT, _rmul(gS_pre, C) + V)  # C^T g_S C + C^T V, symmetrised below
            return gS_pre, V, _sym(c) if gPp is None else _sym(c + gPp)

        gS_pre, V, c = inputs(gS_head, gX_head, gPp_head, X, S_inv)
        d = _lmul(A.mT, _rmul(c, A))  # A^T c A
        # the sequential part, on G_t = the gradient reaching P_{t|t}: G_{t-1} = g_{P_{t-1|t-1}} + N_t G_t N_t^T + d_t
        gPf_head, gPf_tail = _split_steps(None if gPf_out is None else _sym(gPf_out), k)
        N = N_T.mT
        tail = (gS_tail, gX_tail, gPp_tail)
        carried = G_tail = None
        if steps > k:  # the repeated steps, with the steady coefficients (2-D: products fold over time)
            gS, gX, gPp = tail
            N_ss = N[..., -1, :, :]
            # d_t = A^T c_t A = H^T g_S H + F g_X N^T + A^T g_Pp A, H = C A, F = A^T C^T S^{-1}; not
            # symmetrised: the sandwich recursion is linear and keeps transposes, so its results are instead
            d_tail = None
            if gS is not None:
                H = C @ A
                d_tail = _lmul(H.mT, _rmul(gS, H))
            if gX is not None:
                F = A.mT @ C.mT @ S_inv[..., -1, :, :]
                term = _rmul(_lmul(F, gX), N_T[..., -1, :, :])
                d_tail = term if d_tail is None else d_tail.add_(term)
            if gPp is not None:
                term = _lmul(A.mT, _rmul(gPp, A))
                d_tail = term if d_tail is None else d_tail.add_(term)
            if d_tail is None:
                d_tail = torch.zeros_like(d[..., -1:, :, :])
            d_tail = d_tail.expand(*d.shape[:-3], steps - k, *d.shape[-2:])
            # G_t = D_t + N G_{t+1} N^T for t = T-1 .. k with D_t = g_{P_{t|t}} + d_{t+1} (d_T = 0): backwards
            D = d_tail[..., 1:, :, :]  # without g_{P_{t|t}}, the zero last step adds nothing
            if gPf_tail is not None:
                D = torch.cat([D, torch.zeros_like(D[..., :1, :, :])], -3) + gPf_tail
            G_tail, G_k = (_sym(x) for x in _sandwich_recursion(N_ss, D, reverse=True))
            carried = _sym(d_tail[..., 0, :, :]) + N_ss @ G_k @ N_ss.mT
        if A.dim() == 2 and native.usable(A):
            # the same recursion on states_j = G_{j-1} (j = k .. 1) and states_0 = the gradient reaching P0:
            # states_j = d_j + g_{P_{j-1|j-1}} + N_j states_{j+1} N_j^T, states_k = g_{P_{k-1|k-1}} + carried
            last = carried if gPf_head is None else (gPf_head[-1] if carried is None else gPf_head[-1] + carried)
            D = torch.cat([d, (torch.zeros_like(d[-1]) if last is None else last)[None]])
            if gPf_head is not None:
                D[1:k] += gPf_head[: k - 1]
            states, _, carried = native.sandwich_recursion(N, D, states=True)
            G = states[1:]
        else:
            gPf = gPf_head.unbind(-3) if gPf_head is not None else (None,) * k
            add_mm, mm = (torch.addmm, torch.mm) if A.dim() == 2 else (torch.baddbmm, torch.bmm)
            Ns, N_Ts, ds = N.unbind(-3), N_T.unbind(-3), d.unbind(-3)
            Gs = []
            for t in range(k - 1, -1, -1):
                G = gPf[t] if carried is None else (carried if gPf[t] is None else gPf[t] + carried)
                Gs.append(torch.zeros_like(ds[t]) if G is None else G)
                carried = add_mm(ds[t], mm(Ns[t], Gs[-1]), N_Ts[t])
            G = torch.stack(Gs[::-1], -3)
        need = ctx.needs_input_grad

        def sums(G, gS_pre, V, c, X, M_T, Pp, before):
            """g_A, g_Q, g_C, g_R summed over a run of steps (stacked on dim -3, like their coefficients);
            ``before``: P_{t-1|t-1} of each step."""
            XG = X @ G
            gS = XG @ X.mT + gS_pre
            gPp = (M_T.mT @ G) @ M_T + c
            gA = 2.0 * _tsum(_rmul(gPp, A), before) if need[0] else None  # 2 sum_t g_Pp_t A P_{t-1|t-1}
            # sum_t g_S U + g_U P_{t|t-1} = sum_t (g_S C + g_U)_t P_{t|t-1}
            gC = _tsum(2.0 * _rmul(gS, C) + V - 2.0 * XG, Pp) if need[2] else None
            return gA, gPp.sum(-3) if need[1] else None, gC, gS.sum(-3) if need[3] else None

        grads = sums(G, gS_pre, V, c, X, M_T, Pp, torch.cat([P0.unsqueeze(-3), Pf[..., : k - 1, :, :]], -3))
        if steps > k:  # the repeated steps enter only through sums: one more step with summed inputs
            summed = [None if g is None else g.sum(-3, keepdim=True) for g in tail]
            steady = [x[..., -1:, :, :] for x in (X, S_inv, M_T, Pp, Pf)]
            tail_grads = sums(G_tail.unsqueeze(-3), *inputs(*summed, *steady[:2]), steady[0], *steady[2:])
            grads = [None if x is None else x + y for x, y in zip(grads, tail_grads)]
        gA, gQ, gC, gR = grads
        return gA, gQ, gC, gR, carried, None, None, None


class _InnovationLogLik(torch.autograd.Function):
    """log N(e_t; 0, S_t) per sequence and step, ``(B, T)``, from the residuals ``e`` ``(B, T, m)`` and the
    factors ``L`` of ``S = L L^T`` up to the steady state (``(k, m, m)`` shared or ``(B, k, m, m)``; later
    steps use the last). ``S`` and its steady tail ``S_tail`` (see ``_CovarianceRecursion``) are passed only
    to carry the gradient: g_S = -1/2 g (S^{-1} - nu nu^T) and g_e = -g nu, with nu = S^{-1} e."""

    @staticmethod
    def forward(ctx, e, S, S_tail, L, cache: dict):
        k = L.shape[-3]
        ctx.cache = cache
        if L.dim() == 3 and native.usable(L):
            w, ll = native.innovation_loglik(L, e)
            ctx.save_for_backward(L, *_split_steps(w, k, 1))
            return ll
        w = _step_solve(L, _split_steps(e, k, 1), upper=False)
        log_det = _repeat_last(2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1), e.shape[1], -1)
        ctx.save_for_backward(L, *w)
        return -0.5 * (torch.cat([x.square().sum(-1) for x in w], 1) + log_det + e.shape[-1] * _LOG_2PI)

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_on_calling_thread
    def backward(ctx, g):
        L, *w = ctx.saved_tensors
        shared, k = L.dim() == 3, L.shape[-3]
        S_inv = _cholesky_inverse(ctx.cache)
        nus = _step_solve(L.mT, w, upper=True)  # S^{-1} e
        g_nus = [nu * g_part[..., None] for nu, g_part in zip(nus, _split_steps(g, k, 1))]
        g_sums = _split_steps(g.sum(0) if shared else g, k, -1)
        # in place on the outer products: one (T, m, m) buffer each, not four
        gS_head, gS_tail = (_step_outer(g_nu, nu, shared).addcmul_(g_sum[..., None, None], inv, value=-1.0).mul_(0.5)
                            for g_nu, nu, g_sum, inv in zip(g_nus, nus, g_sums, (S_inv, S_inv[..., -1:, :, :])))
        return -torch.cat(g_nus, 1), gS_head, gS_tail, None, None


def _constant_recursion(F: Tensor, c: Tensor, x0: Tensor | None, reverse: bool = False) -> Tensor:
    """x_t = x_{t-1} F + c_t for t = 1..L with one ``F`` ``(n, n)`` or ``(B, n, n)`` for every step: ``c``
    ``(B, L, n)``, ``x0`` ``(B, n)`` (None: 0) -> ``(B, L, n)``. ``reverse``: backwards in time,
    x_t = x_{t+1} F + c_t from x_{L+1} = x0, returned in time order.

    While one step is too small to keep the CPU busy (B n^2 <= _CHUNKED_MAX_WORK), it runs in chunks of
    about sqrt(L) steps, in O(sqrt L) ops instead of L at twice the flops: the recursion within every
    chunk from 0, all chunks at once; then the chunk boundaries in sequence (with F^len); then each step
    adds its boundary state times F^j, as one matrix product."""
    batch, steps, n = c.shape

    def step(bias: Tensor, x: Tensor, M: Tensor) -> Tensor:  # bias + x M for x (B, r, n)
        if M.dim() == 3:
            return torch.baddbmm(bias, x, M)
        return torch.addmm(bias.flatten(0, 1), x.flatten(0, 1), M).view(x.shape)

    if not steps:
        return c
    size = math.isqrt(steps)
    state = (x0 if x0 is not None else c.new_zeros(batch, n))[:, None]
    if size < _CHUNKED_MIN_LEN or batch * n * n > _CHUNKED_MAX_WORK:
        xs = []
        for c_t in c.split(1, 1)[:: -1 if reverse else 1]:
            state = step(c_t, state, F)
            xs.append(state)
        return torch.cat(xs[:: -1 if reverse else 1], 1)
    if reverse:  # small steps here: the two copies cost little
        return _constant_recursion(F, c.flip(1), x0).flip(1)
    chunks = -(-steps // size)
    c = rearrange(torch.cat([c, c.new_zeros(batch, chunks * size - steps, n)], 1), "b (k j) n -> b k j n", j=size)
    y, ys = None, []  # the recursion within each chunk, from 0: (B, chunks, n) per step
    for c_j in c.unbind(2):
        y = c_j if y is None else step(c_j, y, F)
        ys.append(y)
    powers = [F]  # F^1 .. F^size
    for _ in range(size - 1):
        powers.append(powers[-1] @ F)
    starts = [state]  # the state before each chunk, (B, 1, n)
    for y_last in ys[-1].split(1, 1)[:-1]:
        starts.append(step(y_last, starts[-1], powers[-1]))
    carried = torch.cat(starts, 1) @ rearrange(torch.stack(powers, -3), "... j n m -> ... n (j m)")
    x = torch.stack(ys, 2).add_(rearrange(carried, "b k (j n) -> b k j n", n=n))
    return rearrange(x, "b k j n -> b (k j) n")[:, :steps]


class _MeanRecursion(torch.autograd.Function):
    """The filtered means x_t = F_t x_{t-1} + c_t, F_t = A - X_t^T CA, c_t = X_t^T y_t + b_t, t = 1..T.

    ``X``: the gains K_t^T up to the steady state, ``(k, m, n)`` shared or ``(B, k, m, n)``, and ``X_tail``
    their steady tail (see ``_CovarianceRecursion``); ``A`` ``(n, n)`` and ``CA`` = C A ``(m, n)`` (or
    batched); ``y`` ``(B, T, m)``; ``b`` ``(B, T, n)`` or None; ``x0`` ``(B, n)`` -> ``(B, T, n)``. Only k
    transition matrices are formed. Reverse pass: the adjoint recursion lam_t = g_t + F_{t+1}^T lam_{t+1};
    then with e_t = y_t - CA x_{t-1}: g_X_t = e_t lam_t^T, g_y = X_t lam_t, g_b = lam,
    g_A = sum_t lam_t x_{t-1}^T, g_CA = -sum_t g_y_t x_{t-1}^T, g_x0 = F_1^T lam_1."""

    @staticmethod
    def forward(ctx, X, X_tail, A, CA, y, b, x0):
        shared, k = A.dim() == 2, X.shape[-3]
        if shared and native.usable(A):
            F, out = native.mean_recursion(X, A, CA, y, b, x0)
        else:
            F = A - X.mT @ CA if shared else A[:, None] - X.mT @ CA[:, None]
            c_head, c_tail = _step_matvec(X.mT, _split_steps(y, k, 1))
            if b is not None:
                c_head, c_tail = c_head + b[:, :k], c_tail + b[:, k:]
            x, xs = x0, []
            for c_t, F_t in zip(c_head.unbind(1), F.unbind(-3)):
                x = torch.addmm(c_t, x, F_t.mT) if shared else torch.baddbmm(c_t[..., None], F_t, x[..., None])[..., 0]
                xs.append(x)
            out = torch.cat([torch.stack(xs, 1), _constant_recursion(F[..., -1, :, :].mT, c_tail, x)], 1)
        ctx.save_for_backward(X, CA, F, y, x0, out)
        ctx.has_b = b is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    @_on_calling_thread
    def backward(ctx, g):
        X, CA, F, y, x0, out = ctx.saved_tensors
        shared, k = F.dim() == 3, F.shape[-3]
        if shared and native.usable(F):
            lam = native.adjoint_mean_recursion(F, g)
        else:
            # steps k-1 .. T-1 take the steady F_{t+1}, as one constant recursion backwards in time; then the rest
            lam_tail = _constant_recursion(F[..., -1, :, :], g[:, k - 1 :], None, reverse=True)
            lam, lams, Fs = lam_tail[:, 0], [], F.unbind(-3)
            for t in range(k - 2, -1, -1):
                g_t = g[:, t]
                lam = torch.addmm(g_t, lam, Fs[t + 1]) if shared else torch.baddbmm(
                    g_t[..., None], Fs[t + 1].mT, lam[..., None])[..., 0]
                lams.append(lam)
            lam = torch.cat([torch.stack(lams[::-1], 1), lam_tail], 1) if lams else lam_tail
        lam_parts = _split_steps(lam, k, 1)
        # x_{t-1} for the first k steps and, as a view, for the rest
        before = (torch.cat([x0[:, None], out[:, : k - 1]], 1), out[:, k - 1 : -1])
        g_ys = _step_matvec(X, lam_parts)
        gX_head, gX_tail = (_step_outer(y_part - x_prev @ CA.mT, lam_part, shared)
                            for y_part, x_prev, lam_part in zip(_split_steps(y, k, 1), before, lam_parts))
        gA_head, gA_tail = (_outer_sum(lam_part, x_prev, shared) for lam_part, x_prev in zip(lam_parts, before))
        # after the steady state g_y_t = X_k lam_t, so sum_t g_y_t x_{t-1}^T = X_k (sum_t lam_t x_{t-1}^T)
        gCA = -(_outer_sum(g_ys[0], before[0], shared) + X[..., -1, :, :] @ gA_tail)
        gA = gA_head + gA_tail
        g_x0 = lam[:, 0] @ F[0] if shared else (F[:, 0].mT @ lam[:, 0, :, None])[..., 0]
        return gX_head, gX_tail, gA, gCA, torch.cat(g_ys, 1), lam if ctx.has_b else None, g_x0


def _filter_fused(z, A, Q, C, R, m0, P0, bu, observed, target, jitter):
    """Sequential filter for the case without missing steps and without per-step R (see above)."""
    if observed is not None or R.dim() == 4 or jitter:
        raise ValueError("_filter_fused needs every step observed, one R per sequence and no jitter")
    batch, steps, m = z.shape
    n = A.shape[-1]
    if any(x.dim() == 3 for x in (A, Q, C, R, P0)):  # batched: one covariance recursion per sequence
        A, Q, C, R, P0 = (x if x.dim() == 3 else x.expand(batch, *x.shape) for x in (A, Q, C, R, P0))
    shared = A.dim() == 2
    # for the Python loops (the native ones take the standard form): the joint factorisation issues fewer,
    # larger ops, faster while dispatch dominates (n + m <= 64 on CPU for one recursion; batched LAPACK
    # factorises matrix by matrix, so a batch of recursions gains less)
    form = "joint" if n + m <= (_JOINT_MAX_DIM if shared else _JOINT_MAX_DIM // 4) else "standard"
    cache: dict = {}
    covariances = _CovarianceRecursion.apply(A, Q, C, R, P0, steps, form, cache)
    if bool((covariances[-1] > 0).any()):  # a singular or indefinite P_{t|t}: the Joseph form copes with it
        covariances = _CovarianceRecursion.apply(A, Q, C, R, P0, steps, "joseph", cache)
        if bool((covariances[-1] > 0).any()):
            return None, False
    P_pred, P_filt, X, X_tail, S, S_tail, L, _ = covariances
    # m_t = (A - K_t C A) m_{t-1} + K_t (z_t - C B u_t) + B u_t; (B, T, n) @ (n, m) or (B, n, m) broadcasts
    m0 = m0.expand(batch, n)
    f_mean = _MeanRecursion.apply(X, X_tail, A, C @ A, z if bu is None else z - bu @ C.mT, bu, m0)
    p_mean = torch.cat([m0[:, None], f_mean[:, :-1]], 1) @ A.mT
    if bu is not None:
        p_mean = p_mean + bu
    step_ll = _InnovationLogLik.apply((z if target is None else target) - p_mean @ C.mT, S, S_tail, L, cache)
    if shared:  # one covariance per step for the whole batch: a view, no copies
        P_filt, P_pred = P_filt.expand(batch, *P_filt.shape), P_pred.expand(batch, *P_pred.shape)
    result = FilterResult(Gaussian(f_mean, P_filt), Gaussian(p_mean, P_pred), *_sum_steps(step_ll))
    return result, True


def _filtering_combine(i, j):
    """Associative operator of Särkkä & García-Fernández (2021), eq. (14)-(15), on elements
    (A, b, C, eta, J), with M = I + C_i J_j:
    A_ij = A_j M^{-1} A_i,  b_ij = A_j M^{-1} (b_i + C_i eta_j) + b_j,  C_ij = A_j M^{-1} C_i A_j^T + C_j,
    eta_ij = A_i^T M^{-T} (eta_j - J_j b_i) + eta_i,  J_ij = A_i^T M^{-T} J_j A_i + J_i."""
    Ai, bi, Ci, ei, Ji = i
    Aj, bj, Cj, ej, Jj = j
    eye = torch.eye(Ai.shape[-1], dtype=Ai.dtype, device=Ai.device)
    LU, piv = torch.linalg.lu_factor(eye + Ci @ Jj)
    AjMinv = torch.linalg.lu_solve(LU, piv, Aj.mT, adjoint=True).mT  # A_j M^{-1}
    MinvAi = torch.linalg.lu_solve(LU, piv, Ai)  # M^{-1} A_i, so A_i^T M^{-T} = (M^{-1} A_i)^T
    A = AjMinv @ Ai
    b = _mv(AjMinv, bi + _mv(Ci, ej)) + bj
    C = _sym(AjMinv @ Ci @ Aj.mT) + Cj
    eta = _mv(MinvAi.mT, ej - _mv(Jj, bi)) + ei
    J = _sym(MinvAi.mT @ Jj @ Ai) + Ji
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
        _sym(M @ prior_cov @ M.mT + K @ R_t @ K.mT),
        (GA.mT @ v.unsqueeze(-1)).squeeze(-1),
        GA.mT @ GA,
    )
    _, f_mean, f_cov, _, _ = _associative_scan(_filtering_combine, elems)

    p_mean, p_cov = _predict(f_mean[:, :-1], f_cov[:, :-1], A_t, Q_t, None if bu is None else bu[:, 1:])
    p_mean = torch.cat([mean1.expand(batch, n)[:, None], p_mean], 1)
    p_cov = torch.cat([cov1.expand(batch, n, n)[:, None], p_cov], 1)
    Lp, info_p = _innovation_cholesky(C_t @ p_cov, C_t, R_t, jitter)
    resid = (z if target is None else target) - _mv(C_t, p_mean)
    step_ll = _gauss_log_prob(torch.linalg.solve_triangular(Lp, resid.unsqueeze(-1), upper=False).squeeze(-1), Lp)
    if observed is not None:
        step_ll = step_ll * observed.to(z.dtype)
    ok = not bool((info > 0).any() or (info_p > 0).any())
    return FilterResult(Gaussian(f_mean, f_cov), Gaussian(p_mean, p_cov), *_sum_steps(step_ll)), ok


def kalman_filter(
    z: Tensor,
    A: Tensor,
    Q: Tensor,
    C: Tensor,
    R: Tensor,
    m0: Tensor,
    P0: Tensor,
    B: Tensor | None = None,
    u: Tensor | None = None,
    mask: Tensor | None = None,
    parallel: bool = False,
    *,
    target: Tensor | None = None,
) -> FilterResult:
    """Exact Kalman filter over a batch of sequences, differentiable in every input.

    Args:
        z: observations ``(B, T, m)``; NaN entries mark the step as missing.
        A, Q: transition matrix and process noise, ``(n, n)`` or ``(B, n, n)``.
        C: observation matrix ``(m, n)`` or ``(B, m, n)``.
        R: observation noise ``(m, m)``, ``(B, m, m)`` or per step ``(B, T, m, m)``.
        m0, P0: belief of h_0 before the first observation, ``(n,)``/``(B, n)`` and ``(n, n)``/``(B, n, n)``.
        B, u: control matrix ``(n, k)``/``(B, n, k)`` and controls ``(B, T, k)``; ``u[:, t]`` drives the
            transition into step t.
        mask: ``(B, T)`` bool, True = observed.
        parallel: use the O(log T)-depth associative-scan filter (same result up to round-off).
        target: optional ``(B, T, m)`` values that replace ``z`` in the likelihood term only (the state
            update still uses ``z``).  ``target=z.detach()`` gives the stop-gradient plug-in of DESIGN
            section 1: the innovation's target carries no gradient, the filter history does.

    Returns:
        :class:`FilterResult` (filtered, predicted, log_likelihood ``(B,)``, step_log_likelihood ``(B, T)``),
        in float32 or float64 (half-precision inputs are upcast to float32).

    Raises:
        ValueError naming the argument for wrong shapes, non-finite parameters (NaN in ``z`` is allowed)
        or covariances (Q, R, P0) that are not symmetric positive semi-definite.
    """
    device = z.device if isinstance(z, Tensor) else torch.device("cpu")
    with torch.autocast(device.type, enabled=False), _calling_thread_only(device):
        args = _prepare(z, A, Q, C, R, m0, P0, B, u, mask, target)
        fused = not parallel and args[8] is None and args[4].dim() < 4  # all observed, one R per sequence
        for jitter in _JITTERS:
            run = _filter_parallel if parallel else _filter_fused if fused and not jitter else _filter_sequential
            result, ok = run(*args, jitter=jitter)
            if ok:
                if jitter:
                    warnings.warn(f"kalman_filter: Cholesky failed, used relative jitter {jitter:g}", RuntimeWarning)
                return result
    raise FloatingPointError("kalman_filter: innovation covariance not positive definite even with jitter")


# ----------------------------------------------------------------------------------------------------
# smoother


def _smoothing_combine(later, earlier):
    """Backward associative operator (Särkkä & García-Fernández 2021, eq. (22)) on (E, g, L):
    the element of an earlier step applied after the (already combined) later ones."""
    El, gl, Ll = later
    Ee, ge, Le = earlier
    return Ee @ El, _mv(Ee, gl) + ge, _sym(Ee @ Ll @ Ee.mT) + Le


def rts_smoother(result: FilterResult, A: Tensor, Q: Tensor, parallel: bool = False) -> Gaussian:
    """Rauch-Tung-Striebel smoother: N(m_{t|T}, P_{t|T}) ``(B, T, n)`` from a :class:`FilterResult`.

    ``A``, ``Q``: the transition matrix and process noise the filter used (``(n, n)`` or ``(B, n, n)``);
    the controls enter through ``result.predicted``.  With ``G_t = P_{t|t} A^T P_{t+1|t}^{-1}``
    (Cholesky solve), ``m_{t|T} = m_{t|t} + G_t (m_{t+1|T} - m_{t+1|t})`` and
    ``P_{t|T} = G_t P_{t+1|T} G_t^T + (I - G_t A) P_{t|t} (I - G_t A)^T + G_t Q G_t^T`` (Joseph-type form).
    ``parallel=True`` evaluates the same recursion by an associative scan (Särkkä & García-Fernández 2021).
    """
    f_mean, f_cov = result.filtered
    p_mean, p_cov = result.predicted
    batch, steps, n = f_mean.shape
    A = _param("A", A, (n, n), batch).to(f_mean.dtype)
    Q = _param("Q", Q, (n, n), batch).to(f_mean.dtype)
    with torch.autocast(f_mean.device.type, enabled=False):
        A_t, Q_t = _per_step(A, 2), _per_step(Q, 2)
        Lp = _cholesky(p_cov[:, 1:], "predicted covariance")
        G = torch.cholesky_solve(A_t @ f_cov[:, :-1], Lp).mT  # P_{t|t} A^T P_{t+1|t}^{-1}
        M = torch.eye(n, dtype=f_mean.dtype, device=f_mean.device) - G @ A_t
        E = torch.cat([G, torch.zeros_like(G[:, :1])], 1)
        g = torch.cat([f_mean[:, :-1] - _mv(G, p_mean[:, 1:]), f_mean[:, -1:]], 1)
        Lc = torch.cat([_sym(M @ f_cov[:, :-1] @ M.mT + G @ Q_t @ G.mT), f_cov[:, -1:]], 1)
        if parallel:
            flipped = _associative_scan(_smoothing_combine, tuple(x.flip(1) for x in (E, g, Lc)))
            return Gaussian(flipped[1].flip(1), flipped[2].flip(1))
        means, covs = [g[:, -1]], [Lc[:, -1]]
        for t in range(steps - 2, -1, -1):
            means.append(_mv(E[:, t], means[-1]) + g[:, t])
            covs.append(_sym(E[:, t] @ covs[-1] @ E[:, t].mT) + Lc[:, t])
        return Gaussian(torch.stack(means[::-1], 1), torch.stack(covs[::-1], 1))
