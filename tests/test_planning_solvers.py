"""worldmodel.planning: QuadraticCost (expectation under a Gaussian state), lqr (against the dense stacked QP built
here in numpy float64), mppi and cem (against the LQR optimum), input checks, device-agnosticism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from worldmodel.planning import QuadraticCost, cem, lqr, mppi

from test_devices import device  # noqa: F401  (the fixture: a fake non-CPU device, and CUDA when present)

pytestmark = pytest.mark.usefixtures("single_thread")
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-9, atol=1e-9)}


def random_problem(dtype, n=4, a=2, Bt=3, seed=0):
    """Stable-ish random A, B, c, h0 (Bt, n) and a convex cost with a cross term, wh (Bt, n) and c0 (Bt,)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    A = r(n, n)
    A = 0.95 * A / torch.linalg.eigvals(A).abs().max()
    L = r(n + a, n + a)
    J = L @ L.mT / (n + a) + 0.1 * torch.eye(n + a, dtype=torch.float64)  # joint weight of (h, u): PD
    cost = QuadraticCost(J[:n, :n], Wuu=J[n:, n:], Whu=J[:n, n:], wh=r(Bt, n), wu=r(a), c0=r(Bt))
    return A.to(dtype), r(n, a).to(dtype), r(n).to(dtype), cost.to(dtype), r(Bt, n).to(dtype)


def swing_problem(dtype):
    """n = 4, a = 1: a growing oscillator and a double integrator, one input, two problems (start, goal)."""
    th = 0.3
    A = torch.zeros(4, 4, dtype=torch.float64)
    A[:2, :2] = 1.06 * torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    A[2:, 2:] = torch.tensor([[1.0, 0.1], [0.0, 1.0]])
    B = torch.tensor([[0.3], [0.5], [0.0], [0.4]], dtype=torch.float64)
    c = torch.tensor([0.05, -0.02, 0.0, 0.03], dtype=torch.float64)
    goals = torch.tensor([[2.0, -1.0, 0.0, 0.0], [-2.0, 1.5, 1.0, 0.0]], dtype=torch.float64)
    cost = QuadraticCost.goal(torch.eye(4, dtype=torch.float64), goals, action_weight=0.05)
    h0 = torch.tensor([[-2.5, 3.3, 1.5, -0.8], [2.4, -1.8, -2.2, 1.5]], dtype=torch.float64)
    return A.to(dtype), B.to(dtype), c.to(dtype), cost.to(dtype), h0.to(dtype)


def rollout_cost(A, B, c, cost, h0):
    """CostFn of the candidates (Bt, N, H, a): QuadraticCost.total of the rolled-out states."""
    def total(U):
        h, states = h0[:, None].expand(-1, U.shape[1], -1), []
        for k in range(U.shape[2]):
            h = h @ A.mT + U[:, :, k] @ B.mT + c
            states.append(h)
        return cost.total(torch.stack(states, 2), U)
    return total


def dense_qp(A, B, c, cost, h0, H):
    """The LQ objective as U^T G U + g^T U + const in numpy float64, U = (u_0..u_{H-1}) flattened: states are affine
    in U, X = X0 + Gamma U, with Gamma's columns the responses to unit impulses and X0 the response to h0 and c."""
    A, B, c, h0 = (x.double().numpy() for x in (A, B, c, h0))
    n, a = B.shape
    Whh, Whu, Wuu, wh, wu = (x.double().numpy() for x in cost.blocks(a))
    wh = np.broadcast_to(wh, h0.shape)

    def rollout(h, U, drift):
        X = []
        for u in U.reshape(H, a):
            h = A @ h + B @ u + drift
            X.append(h)
        return np.concatenate(X)

    Gamma = np.stack([rollout(np.zeros(n), e, 0 * c) for e in np.eye(H * a)], 1)  # (H n, H a)
    Qb, Sb, Rb = (np.kron(np.eye(H), W) for W in (Whh, Whu, Wuu))
    G = Gamma.T @ Qb @ Gamma + Gamma.T @ Sb + Sb.T @ Gamma + Rb
    X0 = np.stack([rollout(h, np.zeros(H * a), c) for h in h0])  # (Bt, H n)
    g = X0 @ (2 * Qb @ Gamma + 2 * Sb) + np.tile(wh, H) @ Gamma + np.tile(wu, H)
    return G, g


@pytest.mark.parametrize("dtype", DTYPES)
def test_lqr_unbounded_equals_the_closed_form_optimum(dtype):
    A, B, c, cost, h0 = random_problem(dtype)
    H = 8
    G, g = dense_qp(A, B, c, cost, h0, H)
    want = np.linalg.solve(2 * G, -g.T).T.reshape(3, H, 2)  # normal equations 2 G U = -g
    got = lqr(A, B, cost, h0, H, c=c)
    assert got.shape == (3, H, 2) and got.dtype == dtype
    torch.testing.assert_close(got.double(), torch.from_numpy(want), **TOL[dtype])
    assert not np.allclose(want[0], want[1])  # different starts and goals: different plans


def kkt_residual(G, g, U, low, high):
    """Largest violation of the KKT conditions of min U^T G U + g^T U, low <= U <= high (relative to |g|):
    gradient 2 G U + g zero at free variables, >= 0 at the lower and <= 0 at the upper bound."""
    grad = U @ (2 * G) + g
    at_low, at_high = U <= low + 1e-12, U >= high - 1e-12
    viol = np.where(at_low, np.maximum(-grad, 0), np.where(at_high, np.maximum(grad, 0), np.abs(grad)))
    return viol.max() / np.abs(g).max(), at_low | at_high


@pytest.mark.parametrize("dtype", DTYPES)
def test_lqr_bounded_satisfies_the_kkt_conditions_of_the_box_qp(dtype):
    A, B, c, cost, h0 = random_problem(dtype)
    H, low, high = 8, torch.tensor([-0.3, -0.5], dtype=dtype), torch.tensor([0.4, 0.2], dtype=dtype)
    got = lqr(A, B, cost, h0, H, c=c, low=low, high=high)
    assert got.dtype == dtype and bool(((got >= low) & (got <= high)).all())
    G, g = dense_qp(A, B, c, cost, h0, H)
    residual, active = kkt_residual(G, g, got.double().flatten(1).numpy(), np.tile(low.double().numpy(), H),
                                    np.tile(high.double().numpy(), H))
    assert 0 < active.sum() < active.size  # some bounds active, some not
    assert residual < (1e-4 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lqr_bounded_matches_bvls(dtype):
    optimize = pytest.importorskip("scipy.optimize")
    A, B, c, cost, h0 = swing_problem(dtype)
    H, low, high = 15, -torch.ones(1, dtype=dtype), torch.ones(1, dtype=dtype)
    got = lqr(A, B, cost, h0, H, c=c, low=low, high=high)
    G, g = dense_qp(A, B, c, cost, h0, H)
    L = np.linalg.cholesky(G)  # U^T G U + g^T U = ||L^T U + L^-1 g / 2||^2 + const
    for b in range(2):
        want = optimize.lsq_linear(L.T, -np.linalg.solve(L, g[b]) / 2, bounds=(-1, 1), method="bvls", tol=1e-14).x
        assert (np.abs(want) > 1 - 1e-9).sum() >= 3  # the bounds bind
        tol = dict(rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-9)
        torch.testing.assert_close(got[b, :, 0].double(), torch.from_numpy(want), **tol)


def plan_costs(dtype, solver, iterations, seed=1, which=slice(None), **kw):
    """Costs (Bt,) of the solver's plan from a zero warm start, of the bounded LQR optimum and of the zero plan."""
    A, B, c, cost, h0 = swing_problem(dtype)
    if which != slice(None):
        cost = QuadraticCost.goal(torch.eye(4, dtype=dtype), -cost.wh[which] / 2, action_weight=0.05)
        h0 = h0[which]
    H, low, high = 15, -torch.ones(1, dtype=dtype), torch.ones(1, dtype=dtype)
    total = rollout_cost(A, B, c, cost, h0)
    gen = torch.Generator().manual_seed(seed)
    plan = solver(total, h0.new_zeros(len(h0), H, 1), low, high, iterations=iterations, generator=gen, **kw)
    assert plan.dtype == dtype and bool(((plan >= low) & (plan <= high)).all())
    optimum = lqr(A, B, cost, h0, H, c=c, low=low, high=high)
    return [total(U[:, None])[:, 0].double() for U in (plan, optimum, torch.zeros_like(plan))]


@pytest.mark.parametrize("solver", [mppi, cem])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sampling_solvers_reach_the_lqr_optimum(solver, dtype):
    cost, optimum, zero = plan_costs(dtype, solver, iterations=40)
    assert bool((zero > 1.8 * optimum).all())  # the plan matters
    assert bool((cost < 1.02 * optimum).all()), (cost / optimum - 1).tolist()
    assert bool((cost >= optimum * (1 - 1e-6)).all())  # the LQR optimum is optimal


@pytest.mark.parametrize("solver", [mppi, cem])
def test_sampling_solvers_batch_equals_separate_and_is_deterministic(solver):
    both, optimum, _ = plan_costs(torch.float64, solver, iterations=40)
    alone = torch.cat([plan_costs(torch.float64, solver, 40, seed=2, which=slice(b, b + 1))[0] for b in range(2)])
    torch.testing.assert_close(both / optimum, alone / optimum, rtol=0, atol=0.02)
    first = plan_costs(torch.float64, solver, iterations=3, seed=5)[0]
    assert torch.equal(first, plan_costs(torch.float64, solver, iterations=3, seed=5)[0])
    assert not torch.equal(first, plan_costs(torch.float64, solver, iterations=3, seed=6)[0])


@pytest.mark.parametrize("solver", [mppi, cem])
def test_sampling_solvers_treat_nan_costs_as_infinite(solver):
    """||U - 0.3||^2, +inf where u_0 > 0.32 and NaN where another action is (most candidates at first): the plan is
    the target; scalar bounds, a per-step std."""
    def cost(U):
        over = U.flatten(2) > 0.32
        return torch.where(over[..., 0], math.inf, torch.where(over.any(-1), math.nan, (U - 0.3).square().sum((2, 3))))

    std = torch.linspace(0.5, 2.0, 5, dtype=torch.float64).view(1, 5, 1)
    plan = solver(cost, torch.zeros(1, 5, 1, dtype=torch.float64), -1.0, 1.0, std=std, iterations=20,
                  generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(plan, torch.full_like(plan, 0.3), rtol=0, atol=0.05)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quadratic_cost_is_the_exact_expectation(dtype):
    A, B, c, cost, h0 = random_problem(torch.float64, n=3, a=2, Bt=2, seed=3)
    g = torch.Generator().manual_seed(4)
    m, u = torch.randn(2, 5, 6, 3, generator=g, dtype=torch.float64), torch.randn(2, 5, 6, 2, generator=g,
                                                                                 dtype=torch.float64)
    L = torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64)
    P = L @ L.mT  # (B, H, n, n): shared by the N = 5 candidates
    Whh, Whu, Wuu, wh, wu = (x.numpy() for x in cost.blocks(2))
    mn, un, Pn = m.numpy(), u.numpy(), P.numpy()
    explicit = (np.einsum("bkhi,ij,bkhj->bkh", mn, Whh, mn) + 2 * np.einsum("bkhi,ij,bkhj->bkh", mn, Whu, un)
                + np.einsum("bkhi,ij,bkhj->bkh", un, Wuu, un) + np.einsum("bkhi,bi->bkh", mn, wh) + un @ wu
                + cost.c0.numpy()[:, None, None] + np.einsum("bhij,ji->bh", Pn, Whh)[:, None])
    cost, args = cost.to(dtype), [x.to(dtype) for x in (m, u, P)]
    got = cost.stage(*args)
    assert got.shape == (2, 5, 6) and got.dtype == dtype
    torch.testing.assert_close(got.double(), torch.from_numpy(explicit), **TOL[dtype])
    torch.testing.assert_close(cost.total(*args), got.sum(-1))
    torch.testing.assert_close(cost.stage(args[0][:, 0], args[1][:, 0], args[2]), got[:, 0])  # (B, H, n)
    torch.testing.assert_close(cost.stage(args[0], args[1]), got - torch.from_numpy(  # cov None
        np.einsum("bhij,ji->bh", Pn, Whh)[:, None]).to(dtype))


def test_quadratic_cost_expectation_matches_monte_carlo():
    *_, cost, _ = random_problem(torch.float64, n=3, a=2, Bt=1, seed=5)
    g = torch.Generator().manual_seed(6)
    m, u, L = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((3,), (2,), (3, 3)))
    h = m + torch.randn(200_000, 3, generator=g, dtype=torch.float64) @ L.mT  # h ~ N(m, L L^T)
    Whh, Whu, Wuu, wh, wu = cost.blocks(2)
    samples = ((h @ Whh) * h).sum(-1) + 2 * h @ Whu @ u + u @ Wuu @ u + h @ wh[0] + wu @ u + cost.c0[0]
    want = cost.stage(m.view(1, 1, 3), u.view(1, 1, 2), (L @ L.mT).view(1, 1, 3, 3)).item()
    assert abs(samples.mean().item() - want) < 3 * samples.std().item() / math.sqrt(len(samples))
    assert abs(samples.mean().item() - want) > 1e-6  # a real sample average, not the formula again


@pytest.mark.parametrize("dtype", DTYPES)
def test_goal_cost_is_the_expected_squared_distance(dtype):
    g = torch.Generator().manual_seed(7)
    C, z, m, u, L = (torch.randn(*s, generator=g, dtype=torch.float64)
                     for s in ((2, 3), (4, 2), (4, 3), (4, 5), (4, 3, 3)))
    P, W, aw = L @ L.mT, torch.tensor([0.5, 2.0], dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64)
    e = m @ C.mT - z  # E ||C h - z||^2_W = e^T W e + tr(W C P C^T), h ~ N(m, P)
    want = (e * W * e).sum(-1) + torch.einsum("ij,bjk,ik->b", C * W[:, None], P, C) + (aw * u * u).sum(-1)
    C, z, m, u, P, W, aw = (x.to(dtype) for x in (C, z, m, u, P, W, aw))
    got = QuadraticCost.goal(C, z, weight=W, action_weight=aw).stage(m[:, None], u[:, None], P[:, None])[:, 0]
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **TOL[dtype])
    scalar = QuadraticCost.goal(C, z[0], weight=2.0, action_weight=0.1)  # scalar weights; the action one fits any a
    want = 2 * (m[:1] @ C.mT - z[:1]).square().sum(-1) + 0.1 * u[:1].square().sum(-1)
    torch.testing.assert_close(scalar.stage(m[:1, None], u[:1, None]), want[:, None])


def test_bad_inputs_raise_clear_errors():
    A, B, c, cost, h0 = swing_problem(torch.float64)
    total, zeros, one = rollout_cost(A, B, c, cost, h0), torch.zeros(2, 5, 1, dtype=torch.float64), torch.ones(1)
    for solver in (mppi, cem):
        with pytest.raises(ValueError, match="low <= high"):
            solver(total, zeros, one, -one)
        with pytest.raises(ValueError, match="finite"):
            solver(total, zeros, -one, one * math.inf)
        with pytest.raises(ValueError, match="mean must be finite"):
            solver(total, torch.full_like(zeros, math.nan), -one, one)
        with pytest.raises(ValueError, match=r"mean must be a floating \(B, H, a\)"):
            solver(total, zeros[0], -one, one)
        with pytest.raises(ValueError, match=r"std must be a scalar or \(B, H, a\)"):
            solver(total, zeros, -one, one, std=torch.ones(3))
        with pytest.raises(ValueError, match=r"low must be a scalar or \(a,\)"):
            solver(total, zeros, -torch.ones(2), one)
        with pytest.raises(ValueError, match=r"cost must return the \(B, N\) = \(2, 16\)"):
            solver(lambda U: total(U).sum(1), zeros, -one, one, samples=16)
    with pytest.raises(ValueError, match="temperature"):
        mppi(total, zeros, -one, one, temperature=0)
    with pytest.raises(ValueError, match="elites"):
        cem(total, zeros, -one, one, elites=0)
    with pytest.raises(ValueError, match="not convex"):
        lqr(A, B, QuadraticCost(-torch.eye(4, dtype=torch.float64), Wuu=1.0), h0, 5)
    lqr(A, B, QuadraticCost(torch.eye(4, dtype=torch.float64)), h0, 5, c=c)  # Wuu = 0 but B^T Whh B > 0: fine
    with pytest.raises(ValueError, match="not strictly convex in the actions"):  # the last u_k changes no cost
        lqr(A, B, QuadraticCost(torch.diag(torch.tensor([0, 0, 1.0, 0], dtype=torch.float64))), h0, 5, c=c)
    with pytest.raises(ValueError, match="not strictly convex in the actions"):
        lqr(A, 0 * B, QuadraticCost(torch.eye(4, dtype=torch.float64)), h0, 5)  # free actions that do nothing
    with pytest.raises(ValueError, match="low <= high"):
        lqr(A, B, cost, h0, 5, c=c, low=one.double(), high=-one.double())
    with pytest.raises(ValueError, match=r"h0 \(Bt, n\)"):
        lqr(A, B, cost, h0[0], 5)


def test_solvers_and_costs_are_device_agnostic(device):  # noqa: F811
    """On another device (test_devices' fake device, or CUDA): no CPU tensor is mixed in, the results are those of
    the CPU (the same CPU generator on the fake device; on CUDA only the deterministic ones), float64 stays
    float64, and each call synchronises with the host once (its input checks; lqr with bounds also once per step)."""
    A, B, c, cost, h0 = swing_problem(torch.float64)
    H, low, high = 15, -torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    on_cpu = device.mode is not None  # the fake device computes on the CPU: the CPU generator serves it

    def solve(A, B, c, cost, h0, low, high, generator_device):
        total, zeros = rollout_cost(A, B, c, cost, h0), h0.new_zeros(2, H, 1)
        gen = lambda: torch.Generator(generator_device).manual_seed(0)  # noqa: E731
        return {"mppi": (mppi, (total, zeros, low, high), dict(samples=32, iterations=3, generator=gen())),
                "cem": (cem, (total, zeros, low, high), dict(samples=32, iterations=3, elites=8, generator=gen())),
                "lqr": (lqr, (A, B, cost, h0, H), dict(c=c)),
                "lqr_box": (lqr, (A, B, cost, h0, H), dict(c=c, low=low, high=high, iterations=10)),
                "stage": (cost.stage, (h0[:, None, None].expand(2, 3, H, 4), zeros[:, None].expand(2, 3, H, 1),
                                       torch.eye(4, dtype=h0.dtype, device=h0.device).expand(2, H, 4, 4)), {})}

    inputs = dict(A=A, B=B, c=c, h0=h0, low=low, high=high)
    want = {k: fn(*args, **kw) for k, (fn, args, kw) in solve(**inputs, cost=cost, generator_device="cpu").items()}
    moved = {k: device.put(v) for k, v in inputs.items()}
    calls = solve(**moved, cost=cost.to(device.torch_device), generator_device="cpu" if on_cpu else "cuda")
    for name, (fn, args, kw) in calls.items():
        got, syncs = device.count_syncs(fn, *args, **kw)
        assert got.device.type == device.torch_device.type and got.dtype == torch.float64, name
        assert syncs == (name != "stage") or name == "lqr_box" and syncs <= 1 + 10, (name, syncs)  # + 1 per step
        if on_cpu or name not in ("mppi", "cem"):
            torch.testing.assert_close(device.host(got), want[name], rtol=1e-9, atol=1e-9, msg=name)
