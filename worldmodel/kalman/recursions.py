"""The recursions of the fused filter, as plain loops (the autograd Functions of ``fused.py`` call them).

The covariance recursion in three forms (standard, Joseph, and one Cholesky factorisation per step of
the joint covariance of (z_t, h_t)), with the stop at its steady state (``_steady``, ``_SteadyStop``),
in C (``native``) where usable; the linear recursions with one matrix for every step (the means and
their adjoint after the steady state, ``_constant_recursion``; the covariance adjoint,
``_sandwich_recursion``), run in chunks of about sqrt(T) steps. Stacks are over time on dim -3
(matrices) or dim 1 (``(B, T, n)`` vectors).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

from . import native
from .types import _cholesky_ex, _new_empty, symmetrize

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


def _mm_add(bias: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``bias + alpha * a @ b`` for matrices or stacks of matrices (one fused BLAS call)."""
    if a.dim() == 2:
        return torch.addmm(bias, a, b, alpha=alpha)
    return torch.baddbmm(bias, a, b, alpha=alpha)


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
    every later step would repeat the last one (``_repeat_last`` and ``_steady_tail`` restore them).
    ``first``: the step after the last missing one; the recursion from there on is time-invariant, so
    only steps t with t - 1 >= first are compared (a missing step is no sign of convergence)."""

    def __init__(self, steps: int, first: int = 0):
        self.steps, self.first, self.change, self.prev = steps, first, None, None

    def __call__(self, t: int, L: Tensor) -> bool:
        done = False
        due = t > self.first and (t + 1) % _STEADY_EVERY == 0 and t + 1 + _STEADY_MIN_LEFT <= self.steps
        if _STEADY_ULPS and due and self.prev is not None:
            done, self.change = _steady(L, self.prev, self.change)
        self.prev = L
        return done


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


def _covariance_recursion(A, Q, C, R, P0, steps: int, joseph: bool, observed: Tensor | None = None, first: int = 0):
    """P_{t|t-1} = A P A^T + Q, S = C P_{t|t-1} C^T + R = L L^T, W = L^{-1} C P_{t|t-1} and
    P_{t|t} = P_{t|t-1} - W^T W (``joseph``: (I - K C) P_{t|t-1} (I - K C)^T + K R K^T), symmetrised.
    Returns the stacks (dim -3) P_{t|t-1}, P_{t|t}, X = S^{-1} C P_{t|t-1} (= K^T), S, L and the info,
    up to the step where the recursion reached its steady state (``_SteadyStop``): later steps repeat it.
    The returned P_{t|t-1} are not symmetrised (the caller does that as it extends them to all steps).
    ``observed``: 0/1 per step, ``(T,)`` or ``(B, T)`` (batched parameters), in the dtype of ``A``; a missing
    step is a pure predict: W = 0, hence gain X = 0 and P_{t|t} = P_{t|t-1} (S and L are still those of
    P_{t|t-1}); ``first``: the step after the last missing one (``_SteadyStop``)."""
    At, Ct = A.mT, C.mT
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    P = P0
    Pps, Pfs, WTs, Ls, Ss, infos = [], [], [], [], [], []
    stop = _SteadyStop(steps, first)
    for t in range(steps):
        Pp = _mm_add(Q, A @ P, At)
        U = C @ Pp
        S = _mm_add(R, U, Ct)
        L, info = _cholesky_ex(S)
        WT = torch.linalg.solve_triangular(L.mT, U.mT, upper=True, left=False)  # (L^{-1} U)^T
        if observed is not None:
            WT = WT * observed[..., t, None, None]
        if joseph:
            KT = torch.linalg.solve_triangular(L.mT, WT.mT, upper=True)
            M = eye - KT.mT @ C
            P = _mm_add(M @ Pp @ M.mT, KT.mT @ R, KT)
        else:
            P = _mm_add(Pp, WT, WT.mT, alpha=-1.0)
        P = symmetrize(P)
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


def _filter_covariances(A, Q, C, R, P0, steps: int, form: str, observed: Tensor | None = None, first: int = 0):
    """The covariance recursion in ``form`` (``joint``: ``_joint_recursion``; ``standard`` or ``joseph``:
    ``_covariance_recursion``), in C for shared parameters where the native loops are usable (the
    standard form with a Cholesky factorisation of P_{t|t}, for all but ``joseph``). Returns P_{t|t-1} and
    P_{t|t} for all ``steps`` (symmetrised; repeated after the steady state), and X, S, L and the info up
    to the steady state, as ``_covariance_recursion`` does (``standard``: the info is also > 0 where
    P_{t|t} is not positive definite). ``observed``, ``first``: missing steps, as ``_covariance_recursion``
    takes them (the joint form has none: the standard form runs instead)."""
    if form != "joseph" and native.usable(A):
        if A.dim() == 2:
            return native.covariance_recursion(A, Q, C, R, P0, steps, _STEADY_ULPS, _STEADY_EVERY, _STEADY_MIN_LEFT,
                                               observed, first)
        return _rows_natively(A, Q, C, R, P0, steps, observed)
    if form == "joint" and observed is None:
        Pp, Pf, X, S, L, info = _joint_recursion(A, Q, C, R, P0, steps)
    else:
        Pp, Pf, X, S, L, info = _covariance_recursion(A, Q, C, R, P0, steps, form == "joseph", observed, first)
        if form != "joseph":  # P - W^T W can lose definiteness: flag it (the caller uses Joseph then)
            info = info + (_cholesky_ex(Pf)[1] > 0)
    Pp, Pf = (_repeat_last(P, steps, -3, sym=True) for P in (Pp, Pf))
    return Pp, Pf, X, S, L, info


def _rows_natively(A, Q, C, R, P0, steps: int, observed: Tensor | None):
    """``_filter_covariances`` for batched parameters ``(B, ., .)`` in C, one recursion per row, each with
    its own steady-state stop (after its own last missing step); a row that stopped earlier than the last
    is extended by repeating its last step, as the stop does."""
    rows = []
    for b in range(A.shape[0]):
        obs = None if observed is None else observed[b]
        missing = [] if obs is None else (obs == 0).nonzero()
        first = int(missing[-1]) + 1 if len(missing) else 0
        rows.append(native.covariance_recursion(A[b], Q[b], C[b], R[b], P0[b], steps, _STEADY_ULPS, _STEADY_EVERY,
                                                _STEADY_MIN_LEFT, obs, first))
    k = max(row[2].shape[0] for row in rows)
    return tuple(torch.stack([x if i < 2 else _repeat_last(x, k, 0) for x in parts])
                 for i, parts in enumerate(zip(*rows)))


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
