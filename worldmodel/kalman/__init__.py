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

Speed: when R is one matrix per sequence (the world-model case),
``kalman_filter`` runs a fused sequential filter (``fused._filter_fused``). Its covariance recursion does not
depend on z, so with shared parameters it runs once for the whole batch; for small n + m each step is a
single Cholesky factorisation of the joint covariance of (z_t, h_t), which yields S's factor, the gain
and a Cholesky factor of P_{t|t} at once; the covariance recursion, the mean recursion and the
innovation likelihood are single autograd nodes with hand-written reverse passes (checked against
autograd on the step-wise filter by gradcheck). The covariance recursion of a time-invariant system
converges to a fixed point (the steady-state Kalman filter); once its estimated distance to that point
is within a few ulps (``recursions._steady``, typically 10-40 steps) it stops and later steps repeat the last one,
which is what the recursion would compute up to round-off, and the reverse pass still runs the
adjoint recursion over every step. After the stop the gain and the innovation covariance are constant,
so their consumers apply them to all later steps at once (one matrix product, one triangular solve), and
the linear recursions with constant coefficients (the means, their adjoint and the covariance adjoint)
run in chunks of about sqrt(T) steps (``recursions._constant_recursion``, ``_sandwich_recursion``).
Fresh memory is kept to a minimum (a page fault costs more than the arithmetic at these sizes): outputs
are written once, the reverse pass takes views of its per-step inputs, and outputs of 32 MiB or more get
huge pages (``types._new_empty``). Missing steps run one covariance recursion per distinct mask row
(``masked``: a missing step is a pure predict, gain 0); per-step R uses the step-wise filter.

With parameters shared by the batch, on CPU, the sequential loops of the fused filter run in C
(``worldmodel.kalman.native``: the covariance recursion, the means, the innovation likelihood, and the
sequential parts of their reverse passes), calling the BLAS/LAPACK that torch links once per matrix
op instead of dispatching a tensor op (a 2x faster forward at T=64, d=32). The native covariance
recursion is the standard form with a Cholesky factorisation of P_{t|t} per step (to flag a lost
definiteness, as the joint form does) and the same steady-state stop on the joint factor. Where the
native loops cannot be built, the Python loops run, with the same results up to round-off. The library
is built in a private per-user directory (mode 0700, owner and mode checked before every load) and only
a library whose sha256 this user recorded after it passed the self-test (float64 and float32) is loaded
(``native_build``).

The parallel-in-time filter and smoother use the associative-scan formulation of Särkkä & García-Fernández,
"Temporal parallelization of Bayesian smoothers", IEEE TAC 66(1), 2021: O(log T) depth.

Layout: ``types`` (Gaussian, FilterResult, symmetrize, the Gaussian log-density and shared helpers),
``checks`` (input checks, once at entry), ``reference`` (predict, update and the step-by-step filter),
``recursions`` and ``fused`` (the fused fast path and its autograd Functions), ``parallel`` (the
associative scan), ``smoother`` (rts_smoother), ``native`` + ``native_kalman.c`` (the loops in C), ``native_build`` (where they are built and what may be loaded);
:func:`kalman_filter`, here, picks the path. :func:`gaussian_log_prob` (also :meth:`Gaussian.log_prob`)
is the project's one Gaussian log-density.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .checks import _prepare
from .fused import _calling_thread_only, _filter_fused
from .parallel import _filter_parallel
from .reference import _filter_sequential, predict, update
from .smoother import rts_smoother
from .types import _JITTERS, FilterResult, Gaussian, gaussian_log_prob, symmetrize

__all__ = ["Gaussian", "FilterResult", "predict", "update", "kalman_filter", "rts_smoother", "symmetrize",
           "gaussian_log_prob"]


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
        fused = not parallel and args[4].dim() < 4  # one R per sequence (missing steps or not)
        for jitter in _JITTERS:
            run = _filter_parallel if parallel else _filter_fused if fused and not jitter else _filter_sequential
            result, ok = run(*args, jitter=jitter)
            if ok:
                if jitter:
                    warnings.warn(f"kalman_filter: Cholesky failed, used relative jitter {jitter:g}", RuntimeWarning)
                return result
    raise FloatingPointError("kalman_filter: innovation covariance not positive definite even with jitter")
