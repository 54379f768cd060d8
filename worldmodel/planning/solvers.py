"""Trajectory optimisers, model-agnostic: MPPI and CEM for any batched cost, LQR for linear dynamics with a
quadratic cost (DESIGN section 4b).

Batch-first: B problems, horizon H, action dimension a; plans (B, H, a), candidates (B, N, H, a). Every routine
runs on the device and in the dtype of its inputs; the input checks synchronise with the device once per call,
the iterations of mppi and cem not at all (lqr with bounds: once per projected-Newton step, to stop).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .costs import QuadraticCost

CostFn = Callable[[Tensor], Tensor]  # actions (B, N, H, a) -> total cost (B, N)

STD_RANGE = (0.05, 2.0)  # the sampling std, in units of the half range, stays in here (TD-MPC2's min/max std)


def _raise_failed(checks: dict[str, Tensor]) -> None:
    """Raise ValueError naming every check (message -> 0-d bool tensor) that is False; one host sync."""
    failed = [message for message, ok in zip(checks, torch.stack(list(checks.values())).tolist()) if not ok]
    if failed:
        raise ValueError("; ".join(failed))


def _as(x: Tensor | float, like: Tensor) -> Tensor:
    """x as a tensor of like's dtype and device (a Python scalar is filled in there: no host-to-device copy)."""
    return x.to(like) if isinstance(x, Tensor) else like.new_full((), x)


def _bound(x, like: Tensor, a: int, name: str, default: float | None = None) -> Tensor:
    """The bound ``x`` (scalar or (a,); None: ``default``, required when that is None) as (a,) like ``like``."""
    if x is None and default is None:
        raise ValueError(f"{name} is required")
    x = like.new_full((a,), default) if x is None else _as(x, like)
    if x.shape not in ((), (a,)):
        raise ValueError(f"{name} must be a scalar or (a,) = ({a},), got {tuple(x.shape)}")
    return x.expand(a)


def _sampling_planner(cost: CostFn, mean: Tensor, low, high, std, samples: int, iterations: int, elites: int,
                      momentum: float, generator: torch.Generator | None, update) -> Tensor:
    """The loop MPPI and CEM share; ``update(elite_costs (B, k), elites (B, k, H, a)) -> (mean, std)``."""
    if not isinstance(mean, Tensor) or mean.dim() != 3 or not mean.is_floating_point():
        raise ValueError(f"mean must be a floating (B, H, a) tensor, got {getattr(mean, 'shape', type(mean))}")
    B, H, a = mean.shape
    low, high = _bound(low, mean, a, "low"), _bound(high, mean, a, "high")
    std = _as(std, mean)
    if torch.broadcast_shapes(std.shape, mean.shape) != mean.shape:
        raise ValueError(f"std must be a scalar or (B, H, a) = {tuple(mean.shape)}, got {tuple(std.shape)}")
    if samples < 2 or iterations < 0 or elites < 1 or not 0 <= momentum < 1:
        raise ValueError(f"need samples >= 2, iterations >= 0, elites >= 1 and 0 <= momentum < 1, got "
                         f"samples={samples}, iterations={iterations}, elites={elites}, momentum={momentum}")
    _raise_failed({"mean must be finite": mean.isfinite().all(),
                   "low and high must be finite with low <= high": (low.isfinite() & high.isfinite()
                                                                    & (low <= high)).all(),
                   "std must be finite and > 0": (std.isfinite() & (std > 0)).all()})
    half = (high - low) / 2
    std = (std * half).expand(B, H, a)  # absolute
    mean = mean.clamp(low, high)
    for _ in range(iterations):
        candidates = torch.empty((B, samples, H, a), dtype=mean.dtype, device=mean.device)
        candidates[:, 0] = mean
        noise = torch.randn((B, samples - 1, H, a), generator=generator, dtype=mean.dtype, device=mean.device)
        torch.clamp(torch.addcmul(mean[:, None], std[:, None], noise), low, high, out=candidates[:, 1:])
        costs = cost(candidates)
        if not isinstance(costs, Tensor) or costs.shape != (B, samples):
            raise ValueError(f"cost must return the (B, N) = {(B, samples)} costs of the candidates (B, N, H, a), "
                             f"got {getattr(costs, 'shape', type(costs))}")
        elite_costs, index = costs.nan_to_num(nan=math.inf, posinf=math.inf).topk(min(elites, samples), dim=1,
                                                                                  largest=False)
        new_mean, new_std = update(elite_costs, candidates.take_along_dim(index[:, :, None, None], dim=1))
        mean = momentum * mean + (1 - momentum) * new_mean
        std = new_std.clamp(STD_RANGE[0] * half, STD_RANGE[1] * half)
    return mean.clamp(low, high)  # a convex combination of candidates inside the box: clamps only round-off


def mppi(cost: CostFn, mean: Tensor, low: Tensor, high: Tensor, *, std: float | Tensor = 0.5, samples: int = 256,
         iterations: int = 6, temperature: float = 0.1, elites: int | None = 32, momentum: float = 0.0,
         generator: torch.Generator | None = None) -> Tensor:
    """Model-predictive path integral control (Williams et al. 2017), with TD-MPC2's elites and std update.

    Minimises cost over action sequences (B, H, a) from the warm start ``mean`` (B, H, a); low/high (a,) bounds.
    Each iteration samples ``samples`` candidates U_i = clamp(mean + sigma eps_i, low, high), eps_i ~ N(0, I),
    U_0 = mean (the current mean is always a candidate), evaluates ``cost`` once on all (B, N, H, a), keeps the
    ``elites`` cheapest (all with None or elites >= samples) and updates
        w_i = softmax_i(-(c_i - c_min) / (temperature * s)),  s = c_max - c_min over the finite elite costs,
        mean <- momentum mean + (1 - momentum) sum_i w_i U_i,  sigma <- sqrt(sum_i w_i (U_i - sum_j w_j U_j)^2).
    s makes the temperature unit-free (the same temperature for costs of any scale): the worst elite weighs
    exp(-1/temperature) of the best. sigma starts at std * (high - low)/2 (std scalar or (B, H, a)) and is clamped to
    [0.05, 2] * (high - low)/2 after each update (TD-MPC2's bounds with actions in [-1, 1]). NaN costs count as
    +inf; at least one candidate per problem must have a finite cost. Returns the final mean (B, H, a), inside the
    bounds.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def update(elite_costs: Tensor, elite: Tensor) -> tuple[Tensor, Tensor]:
        best = elite_costs[:, :1]
        spread = torch.where(elite_costs.isfinite(), elite_costs, best).amax(1, keepdim=True) - best
        w = torch.softmax(-(elite_costs - best) / (temperature * spread.clamp_min(torch.finfo(spread.dtype).tiny)), 1)
        flat = elite.flatten(2)  # (B, k, H a): the weighted sums as batched (1, k) @ (k, H a) products
        new_mean = torch.bmm(w[:, None], flat)
        return (new_mean.view_as(elite[:, 0]),
                torch.bmm(w[:, None], (flat - new_mean).square_()).sqrt_().view_as(elite[:, 0]))

    return _sampling_planner(cost, mean, low, high, std, samples, iterations, samples if elites is None else elites,
                             momentum, generator, update)


def cem(cost: CostFn, mean: Tensor, low: Tensor, high: Tensor, *, std: float | Tensor = 0.5, samples: int = 256,
        iterations: int = 6, elites: int = 32, momentum: float = 0.1,
        generator: torch.Generator | None = None) -> Tensor:
    """Cross-entropy method (Rubinstein 1997; PlaNet's planner): the sampling of :func:`mppi` (mean always a
    candidate, sigma clamped to [0.05, 2] * (high - low)/2), then with the ``elites`` cheapest candidates E (all
    with elites >= samples):
        mean <- momentum mean + (1 - momentum) mean(E),  sigma <- std(E) (unweighted, population std).
    Returns the final mean (B, H, a), inside the bounds."""

    def update(elite_costs: Tensor, elite: Tensor) -> tuple[Tensor, Tensor]:
        return elite.mean(1), elite.std(1, correction=0)

    return _sampling_planner(cost, mean, low, high, std, samples, iterations, elites, momentum, generator, update)


def lqr(A: Tensor, B: Tensor, cost: QuadraticCost, h0: Tensor, horizon: int, c: Tensor | None = None,
        low: Tensor | None = None, high: Tensor | None = None, iterations: int = 50) -> Tensor:
    """Open-loop optimal actions (Bt, H, a) of the finite-horizon linear-quadratic problem

        min_U sum_{k=0}^{H-1} cost(h_{k+1}, u_k),  h_{k+1} = A h_k + B u_k + c,  low <= u_k <= high,

    A (n, n), B (n, a), c (n,) or None, h0 (Bt, n); the stage cost's wh may be (Bt, n) (a goal per problem).
    Unbounded: the backward Riccati recursion on Q_k(h, u) = cost(h', u) + V_{k+1}(h'), h' = A h + B u + c, exact.
    With bounds low/high ((a,), scalars, None = unbounded; infinities allowed): the box-constrained QP over the
    stacked U (H a variables) is solved by projected Newton (Bertsekas 1982: Newton on the variables not held at a
    bound by the gradient, a step-size search along the projection arc) from the clamped Riccati solution, until no
    step lowers the cost (at most ``iterations`` steps); it is exact once the active set is found (a few steps).
    ValueError when the cost is not convex in (h', u) ([[Whh, Whu], [Whu^T, Wuu]] not PSD, up to float32 round-off)
    or not strictly convex in the actions (a singular Riccati Hessian Huu; Wuu = 0 is fine when B^T Whh B > 0).
    """
    if A.dim() != 2 or A.shape[0] != A.shape[1] or B.dim() != 2 or B.shape[0] != A.shape[0]:
        raise ValueError(f"A must be (n, n) and B (n, a), got {tuple(A.shape)} and {tuple(B.shape)}")
    n, a = B.shape
    if h0.dim() != 2 or h0.shape[1] != n or c is not None and c.shape != (n,) or cost.state_dim != n:
        raise ValueError(f"need h0 (Bt, n), c (n,) and a cost on n = {n} states, got h0 {tuple(h0.shape)}, c "
                         f"{None if c is None else tuple(c.shape)}, cost on {cost.state_dim}")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if cost.wh is not None and cost.wh.dim() == 2 and cost.wh.shape[0] not in (1, h0.shape[0]):
        raise ValueError(f"the cost's wh must be (n,) or (Bt, n) with Bt = {h0.shape[0]}, got {tuple(cost.wh.shape)}")
    Q, S, R, q, r = cost.blocks(a)
    c = h0.new_zeros(n) if c is None else c
    # PSD: PD after a shift for float32 round-off (also in float64: weights such as C^T W C are often built in float32)
    joint = torch.cat([torch.cat([Q, S], 1), torch.cat([S.mT, R], 1)], 0)
    shift = 100 * (n + a) * torch.finfo(torch.float32).eps * joint.diagonal().abs().amax()
    psd = torch.linalg.cholesky_ex(joint + shift * torch.eye(n + a, dtype=joint.dtype, device=joint.device)).info == 0
    gains, singular = _riccati(A, B, c, Q, S, R, q, r, horizon)
    checks = {"lqr: the cost is not convex in (h, u): [[Whh, Whu], [Whu^T, Wuu]] is not PSD": psd,
              "lqr: the cost is not strictly convex in the actions (singular B^T Whh B + Wuu + ...)": ~singular}
    if low is not None or high is not None:
        low, high = _bound(low, h0, a, "low", -math.inf), _bound(high, h0, a, "high", math.inf)
        checks["lqr: need low <= high (no NaN)"] = (low <= high).all()
    _raise_failed(checks)
    h, actions = h0, []
    for K, k in gains:
        actions.append(h @ K.mT + k)
        h = h @ A.mT + actions[-1] @ B.mT + c
    U = torch.stack(actions, 1)
    if low is None:
        return U
    G, g = _stacked_qp(A, B, c, Q, S, R, q, r, h0, horizon)
    return _box_qp(G, g, U.clamp(low, high).flatten(1), low.repeat(horizon), high.repeat(horizon),
                   iterations).view_as(U)


def _riccati(A, B, c, Q, S, R, q, r, horizon: int) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Backward recursion of V_k(h) = h^T P_k h + p_k^T h + const (V_H = 0). The Q-function of x = (h, u), with
    Z = [A B], Qt = Whh + P_{k+1}, y = 2 Qt c + wh + p_{k+1}, is x^T Hk x + gk^T x + const with
        Hk = Z^T Qt Z + [[0, A^T Whu], [Whu^T A, B^T Whu + Whu^T B + Wuu]],  gk = Z^T y + (0, 2 Whu^T c + wu);
    u_k = K h + k with K = -Huu^-1 Hux, k = -Huu^-1 gu / 2; P_k = Hxx + Hux^T K, p_k = gx + 2 Hux^T k.
    Returns [(K_k (a, n), k_k (a,) or (Bt, a))] for k = 0..H-1 and whether some Huu was not positive definite."""
    n, a = B.shape
    Z = torch.cat([A, B], 1)
    E = Z.mT @ S @ torch.cat([Z.new_zeros(a, n), torch.eye(a, dtype=Z.dtype, device=Z.device)], 1)
    E = E + E.mT + torch.block_diag(Q.new_zeros(n, n), R)
    e = torch.cat([c.new_zeros(n), 2 * c @ S + r])
    P, p, gains, infos = Q.new_zeros(n, n), q.new_zeros(q.shape), [], []
    for _ in range(horizon):
        Qt = Q + P
        Hk, y = Z.mT @ Qt @ Z + E, 2 * c @ Qt + q + p
        gk = y @ Z + e
        L, info = torch.linalg.cholesky_ex(Hk[n:, n:])
        solution = -torch.cholesky_solve(torch.cat([Hk[n:, :n], gk[..., n:].reshape(-1, a).mT / 2], 1), L)
        K, k = solution[:, :n], solution[:, n:].mT.reshape(gk[..., n:].shape)
        P = Hk[:n, :n] + Hk[n:, :n].mT @ K
        P, p = (P + P.mT) / 2, gk[..., :n] + 2 * k @ Hk[n:, :n]
        gains.append((K, k))
        infos.append(info)
    return gains[::-1], torch.stack(infos).ne(0).any()


def _stacked_qp(A, B, c, Q, S, R, q, r, h0: Tensor, horizon: int) -> tuple[Tensor, Tensor]:
    """The cost as U^T G U + g^T U + const over U = (u_0, ..., u_{H-1}) (Bt, H a): the states are
    X = X0 + Gamma U with X0 the rollout of U = 0 and Gamma_{kj} = A^{k-j} B (k >= j), so
    G = Gamma^T Qbar Gamma + Gamma^T Sbar + Sbar^T Gamma + Rbar and g = Gamma^T (2 Qbar X0 + qbar) + 2 Sbar^T X0 + rbar
    (bars: block diagonal / stacked). Returns G (H a, H a), g (Bt, H a)."""
    powers, free, h = [B], [], h0
    for _ in range(horizon - 1):
        powers.append(A @ powers[-1])
    for _ in range(horizon):
        h = h @ A.mT + c
        free.append(h)
    X0 = torch.stack(free, 1)  # (Bt, H, n)
    step = torch.arange(horizon, device=A.device)
    lag = step[:, None] - step[None, :]
    Gamma = torch.stack(powers)[lag.clamp(min=0)] * (lag >= 0)[:, :, None, None].to(A.dtype)  # (H, H, n, a)
    cross = torch.einsum("ijna,nb->jaib", Gamma, S)
    G = torch.einsum("kjna,kinb->jaib", Gamma, Q @ Gamma) + cross + cross.permute(2, 3, 0, 1)
    G = G.reshape(horizon * B.shape[1], -1) + torch.block_diag(*[R] * horizon)
    g = torch.einsum("kjna,bkn->bja", Gamma, 2 * X0 @ Q + q[..., None, :]) + 2 * X0 @ S + r
    return G, g.flatten(1)


def _box_qp(G: Tensor, g: Tensor, U: Tensor, low: Tensor, high: Tensor, iterations: int) -> Tensor:
    """argmin U^T G U + g^T U s.t. low <= U <= high (G (m, m) positive definite, g (Bt, m), U (Bt, m) feasible) by
    projected Newton: the free variables F exclude those at a bound with the gradient 2 G U + g pushing outward;
    d_F = -(2 G_FF)^-1 grad_F, d elsewhere 0; U <- the best of clamp(U + s d) over s in {0, 1, 1/2, ..., 2^-19}
    (ties keep U). Stops when no step lowers the objective (one host sync per iteration) or after ``iterations``."""
    steps = torch.cat([U.new_zeros(1), 2.0 ** -torch.arange(20, dtype=U.dtype, device=U.device)])[:, None]
    for _ in range(iterations):
        grad = 2 * U @ G + g
        free = (~((U <= low) & (grad > 0) | (U >= high) & (grad < 0))).to(U.dtype)
        L, _ = torch.linalg.cholesky_ex(G * free[:, :, None] * free[:, None, :] + torch.diag_embed(1 - free))
        d = -torch.cholesky_solve((grad * free / 2)[..., None], L)[..., 0]
        trial = (U[:, None] + steps * d[:, None]).clamp(low, high)  # (Bt, S, m)
        best = ((trial @ G * trial).sum(-1) + (trial * g[:, None]).sum(-1)).argmin(1)
        if not best.any():
            break
        U = trial.take_along_dim(best[:, None, None], 1)[:, 0]
    return U
