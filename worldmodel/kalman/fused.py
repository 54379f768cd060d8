"""The fused sequential filter: every step observed, one R per sequence (the world-model case).

The covariance recursion does not depend on z, so with shared parameters it runs once for the whole
batch; the means then follow the linear recursion m_t = (I - K_t C) (A m_{t-1} + B u_t) + K_t z_t.
The covariance recursion, the mean recursion and the innovation likelihood are single autograd nodes
with hand-written reverse passes (``_CovarianceRecursion``, ``_MeanRecursion``, ``_InnovationLogLik``),
so the time loop issues a handful of matrix ops per step instead of ~40 recorded ones. After the
steady state of the covariance recursion (step k) the gain and S are constant: their consumers take
stacks of k steps plus a *steady tail*, and apply the last step's coefficients to all later steps at once.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor

from . import native
from .masked import mask_patterns
from .recursions import _constant_recursion, _filter_covariances, _repeat_last, _sandwich_recursion
from .types import _LOG_2PI, FilterResult, Gaussian, _sum_steps, symmetrize

# the fused filter factorises the joint (z_t, h_t) covariance up to this n + m (a quarter of it for a
# batch of recursions; see recursions._joint_recursion and _filter_fused)
_JOINT_MAX_DIM = 64


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


class _CovarianceRecursion(torch.autograd.Function):
    """P_{t-1|t-1} -> P_{t|t-1} = A P A^T + Q -> P_{t|t} for t = 1..T, one Cholesky factorisation per step.

    ``form`` (see ``recursions._filter_covariances``): ``joint`` (``_joint_recursion``), ``standard``
    (P_{t|t} = P_{t|t-1} - W^T W) or ``joseph`` (Joseph form, for singular or hard cases). Inputs are 2-D
    (shared) or all batched ``(B, ., .)``; Q, R and P0 are symmetrised on entry. The recursion stops at
    its steady state (step k, see ``_steady``); later steps repeat step k. Returns, stacked over time (dim -3): P_{t|t-1} and P_{t|t} for all T steps;
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
    def forward(ctx, A, Q, C, R, P0, steps: int, form: str, cache: dict, observed: Tensor | None = None,
                first: int = 0):
        ctx.set_materialize_grads(False)
        Q, R, P0 = symmetrize(Q), symmetrize(R), symmetrize(P0)  # the reverse pass returns symmetric gradients to match
        Pp, Pf, X, S, L, info = _filter_covariances(A, Q, C, R, P0, steps, form, observed, first)
        k = X.shape[-3]
        ctx.save_for_backward(A, C, P0, Pf[..., :k, :, :], Pp[..., :k, :, :], X)
        ctx.steps, ctx.cache, ctx.observed = steps, cache, observed
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
        if ctx.observed is not None and gX_head is not None:  # a missing step's X is 0, whatever P is
            gX_head = gX_head * ctx.observed[..., :k, None, None]
        gPp_head, gPp_tail = _split_steps(gPp_out, k)
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        M_T = eye - _rmul(X.mT, C)  # (I - K C)^T
        N_T = _rmul(M_T, A)  # (A^T (I - K C))^T

        def inputs(gS: Tensor | None, gX: Tensor | None, gPp: Tensor | None, X: Tensor, S_inv: Tensor):
            """g_S', V and c for a run of steps: output gradients and coefficients stacked over time (dim -3;
            coefficients with a time axis of 1 broadcast)."""
            gS_pre = symmetrize(gS) if gS is not None else X.new_zeros(*X.shape[:-1], X.shape[-2])
            V = X.new_zeros(X.shape)
            if gX is not None:
                V = S_inv @ gX  # S^{-1} g_X
                gS_pre = symmetrize(gS_pre - V @ X.mT)
            c = _lmul(C.mT, _rmul(gS_pre, C) + V)  # C^T g_S C + C^T V, symmetrised below
            return gS_pre, V, symmetrize(c) if gPp is None else symmetrize(c + gPp)

        gS_pre, V, c = inputs(gS_head, gX_head, gPp_head, X, S_inv)
        d = _lmul(A.mT, _rmul(c, A))  # A^T c A
        # the sequential part, on G_t = the gradient reaching P_{t|t}: G_{t-1} = g_{P_{t-1|t-1}} + N_t G_t N_t^T + d_t
        gPf_head, gPf_tail = _split_steps(None if gPf_out is None else symmetrize(gPf_out), k)
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
            G_tail, G_k = (symmetrize(x) for x in _sandwich_recursion(N_ss, D, reverse=True))
            carried = symmetrize(d_tail[..., 0, :, :]) + N_ss @ G_k @ N_ss.mT
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
        return gA, gQ, gC, gR, carried, None, None, None, None, None


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
    """Sequential filter for one R per sequence (see above); missing steps (``observed`` ``(B, T)`` bool, or
    None) run one covariance recursion per mask pattern (``masked``)."""
    if R.dim() == 4 or jitter:
        raise ValueError("_filter_fused needs one R per sequence and no jitter")
    batch, steps, m = z.shape
    n = A.shape[-1]
    batched = any(x.dim() == 3 for x in (A, Q, C, R, P0))
    patterns = mask_patterns(observed, not batched, z.dtype)
    if batched or patterns.recursions > 1:  # batched: one covariance recursion per sequence or mask row
        A, Q, C, R, P0 = (x if x.dim() == 3 else x.expand(patterns.recursions if patterns.recursions > 1 else batch,
                                                          *x.shape) for x in (A, Q, C, R, P0))
    shared = A.dim() == 2
    # for the Python loops (the native ones take the standard form): the joint factorisation issues fewer,
    # larger ops, faster while dispatch dominates (n + m <= 64 on CPU for one recursion; batched LAPACK
    # factorises matrix by matrix, so a batch of recursions gains less)
    form = "joint" if n + m <= (_JOINT_MAX_DIM if shared else _JOINT_MAX_DIM // 4) else "standard"
    cache: dict = {}
    for form in (form, "joseph"):  # a singular or indefinite P_{t|t}: the Joseph form copes with it
        covariances = _CovarianceRecursion.apply(A, Q, C, R, P0, steps, form, cache, patterns.observed,
                                                 patterns.first)
        if not bool((covariances[-1] > 0).any()):
            break
    else:
        return None, False
    P_pred, P_filt, X, X_tail, S, S_tail, L, _ = covariances
    if patterns.group is not None:  # one recursion per mask row: each sequence takes its row's
        P_pred, P_filt, X, X_tail, S, S_tail, L, A, C = (x[patterns.group] for x in (
            P_pred, P_filt, X, X_tail, S, S_tail, L, A, C))
        cache = {"L": L}  # the likelihood's S^{-1} per sequence (the recursion's cache holds it per row)
    # m_t = (A - K_t C A) m_{t-1} + K_t (z_t - C B u_t) + B u_t; (B, T, n) @ (n, m) or (B, n, m) broadcasts
    m0 = m0.expand(batch, n)
    f_mean = _MeanRecursion.apply(X, X_tail, A, C @ A, z if bu is None else z - bu @ C.mT, bu, m0)
    p_mean = torch.cat([m0[:, None], f_mean[:, :-1]], 1) @ A.mT
    if bu is not None:
        p_mean = p_mean + bu
    step_ll = _InnovationLogLik.apply((z if target is None else target) - p_mean @ C.mT, S, S_tail, L, cache)
    if observed is not None:  # a missing step adds nothing (its residual is finite: z is 0 there)
        step_ll = step_ll * observed.to(step_ll.dtype)
    if shared:  # one covariance per step for the whole batch: a view, no copies
        P_filt, P_pred = P_filt.expand(batch, *P_filt.shape), P_pred.expand(batch, *P_pred.shape)
    result = FilterResult(Gaussian(f_mean, P_filt), Gaussian(p_mean, P_pred), *_sum_steps(step_ll))
    return result, True
