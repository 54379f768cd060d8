"""The fused sequential filter (the fast path of kalman_filter when every step is observed) against the
step-by-step reference filter, in float64 and float32, with gradients checked numerically."""

import pytest
import torch

from test_kalman import F32, F64, make_system
from worldmodel.kalman import checks, fused, native, recursions, reference, types
from worldmodel.kalman import kalman_filter

ARGS = ("A", "Q", "C", "R", "m0", "P0")


pytestmark = pytest.mark.usefixtures("single_thread", "loops")


@pytest.fixture(params=["native", "python"])
def loops(request, monkeypatch):
    """Every test here runs with the native (C) loops where they build, and with the Python loops."""
    if request.param == "python":
        monkeypatch.setattr(native, "usable", lambda *xs: False)
    return request.param


FILTERS = {"fused": fused._filter_fused, "sequential": reference._filter_sequential}


def _run(path, z, sys, target=None):
    """Run the filter ``FILTERS[path]`` on prepared inputs, as kalman_filter would."""
    args = checks._prepare(z, *(sys[k] for k in ARGS), sys.get("B"), sys.get("u"), None, target)
    result, ok = FILTERS[path](*args, jitter=0.0)
    assert ok
    return result


def _assert_close(res, ref, tol):
    for got, want in ((res.filtered.mean, ref.filtered.mean), (res.filtered.cov, ref.filtered.cov),
                      (res.predicted.mean, ref.predicted.mean), (res.predicted.cov, ref.predicted.cov),
                      (res.step_log_likelihood, ref.step_log_likelihood), (res.log_likelihood, ref.log_likelihood)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want.expand_as(got), rtol=tol, atol=tol)


def _assert_close_with_grads(res, grads, ref, ref_grads, tol):
    """``_assert_close`` on the results, and every gradient to ``tol`` relative to its largest entry."""
    _assert_close(res, ref, tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max())


def _mixed(sys, batch):
    """Shared A, C, P0 with a batched Q and R: the fused filter must batch the covariance recursion."""
    sys = dict(sys)
    for k in ("Q", "R"):
        sys[k] = sys[k].expand(batch, *sys[k].shape) * torch.linspace(0.5, 1.5, batch, dtype=F64)[:, None, None]
    return sys


@pytest.mark.parametrize("layout", ["shared", "batched", "mixed"])
@pytest.mark.parametrize("controls", [0, 2])
def test_fused_equals_stepwise_float64(layout, controls):
    z, sys = make_system(batch=3, steps=7, n=4, m=3, k=controls, batched=layout == "batched", seed=11)
    if layout == "mixed":
        sys = _mixed(sys, 3)
    target = z + 0.1 * torch.randn_like(z)
    for tgt in (None, target):
        _assert_close(_run("fused", z, sys, tgt), _run("sequential", z, sys, tgt), 1e-10)


def test_fused_float32_close_to_float64_reference():
    z, sys = make_system(batch=4, steps=50, n=6, m=3, k=1, seed=12)
    ref = _run("sequential", z, sys)
    res = kalman_filter(z.float(), **{k: v.float() for k, v in sys.items()})
    assert res.log_likelihood.dtype == F32
    rel = ((res.log_likelihood.double() - ref.log_likelihood) / ref.log_likelihood).abs().max()
    assert rel < 1e-5
    torch.testing.assert_close(res.filtered.cov.double(), ref.filtered.cov.expand_as(res.filtered.cov), rtol=1e-4, atol=1e-5)


def test_kalman_filter_takes_the_fused_path_unless_R_is_per_step():
    z, sys = make_system(batch=2, steps=4, k=0, seed=13)

    def nodes(res):
        seen, todo = set(), [res.log_likelihood.grad_fn]
        while todo:
            fn = todo.pop()
            if fn is not None and fn not in seen:
                seen.add(fn)
                todo += [f for f, _ in fn.next_functions]
        return {type(f).__name__ for f in seen}

    leaves = {k: v.clone().requires_grad_() for k, v in sys.items()}
    assert "_CovarianceRecursionBackward" in nodes(kalman_filter(z, **leaves))
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 1] = False
    assert "_CovarianceRecursionBackward" in nodes(kalman_filter(z, **leaves, mask=mask))
    per_step = dict(leaves, R=leaves["R"].expand(2, 4, *leaves["R"].shape))
    assert "_CovarianceRecursionBackward" not in nodes(kalman_filter(z, **per_step, mask=mask))


@pytest.mark.parametrize("layout", ["shared", "batched", "mixed"])
def test_fused_gradcheck_through_every_output(layout):
    """Gradients of the hand-written reverse passes w.r.t. every input, through the log-likelihood and
    through the filtered and predicted beliefs (covariances included)."""
    z, sys = make_system(batch=2, steps=4, n=3, m=2, k=2, batched=layout == "batched", seed=14)
    if layout == "mixed":
        sys = _mixed(sys, 2)
    # covariances enter through Cholesky factors, so every perturbation keeps them symmetric
    factors = {k: torch.linalg.cholesky(sys[k]) for k in ("Q", "R", "P0")}
    inputs = [x.clone().requires_grad_() for x in (z, sys["A"], factors["Q"], sys["C"], factors["R"], sys["m0"],
                                                    factors["P0"], sys["B"], sys["u"], z + 0.3)]

    def fn(z, A, Lq, C, Lr, m0, Lp, B, u, target):
        cov = dict(Q=Lq @ Lq.mT, R=Lr @ Lr.mT, P0=Lp @ Lp.mT)
        res = _run("fused", z, dict(A=A, C=C, m0=m0, B=B, u=u, **cov), target)
        return res.step_log_likelihood, res.filtered.mean, res.filtered.cov, res.predicted.mean, res.predicted.cov

    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("form", ["joint", "standard", "joseph"])
def test_covariance_recursion_forms_agree_and_differentiate(form):
    """The joint factorisation, the standard update P - W^T W and the Joseph form give the same
    recursion, and the shared reverse pass is the derivative of each."""
    _, sys = make_system(batch=1, steps=5, n=4, m=3, k=0, seed=15)
    sym = {k: 0.5 * (sys[k] + sys[k].mT) for k in ("Q", "R", "P0")}
    args = (sys["A"], sym["Q"], sys["C"], sym["R"], sym["P0"])

    def recursion(A, Q, C, R, P0, form=form):  # P_{t|t-1}, P_{t|t}, K_t^T, S_t and L_t (5 steps: no stop)
        outs = fused._CovarianceRecursion.apply(A, Q, C, R, P0, 5, form, {})
        return [outs[i] for i in (0, 1, 2, 4, 6)]

    ref = recursion(*args, form="standard" if form == "joint" else "joint")
    for got, want in zip(recursion(*args), ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)

    def fn(A, Q, C, R, P0):  # the recursion takes symmetric Q, R, P0, as kalman_filter passes them
        sym_Q, sym_R, sym_P0 = (0.5 * (x + x.mT) for x in (Q, R, P0))
        return recursion(A, sym_Q, C, sym_R, sym_P0)[:4]

    inputs = [x.clone().requires_grad_() for x in args]
    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("joint_max_dim", [0, 1000])
@pytest.mark.parametrize("batched", [False, True])
def test_fused_forms_through_kalman_filter(monkeypatch, joint_max_dim, batched):
    """kalman_filter gives the step-wise result whichever covariance form the fused path picks."""
    monkeypatch.setattr(fused, "_JOINT_MAX_DIM", joint_max_dim)
    z, sys = make_system(batch=3, steps=6, n=5, m=3, k=1, batched=batched, seed=16)
    _assert_close(kalman_filter(z, **sys), _run("sequential", z, sys), 1e-10)


def test_singular_filtered_covariance_falls_back_to_joseph_form():
    """A state with zero variance makes P_{t|t} singular: the joint factorisation cannot factor it, the
    fused filter switches to the Joseph form and still matches the step-wise filter."""
    z, sys = make_system(batch=2, steps=5, n=3, m=2, k=0, seed=17)
    keep = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    sys.update(A=keep @ sys["A"] @ keep, Q=keep @ sys["Q"] @ keep, P0=keep @ sys["P0"] @ keep)
    res = kalman_filter(z, **sys)
    assert torch.isfinite(res.log_likelihood).all()
    _assert_close(res, _run("sequential", z, sys), 1e-10)


def _covariance_steps(monkeypatch) -> list:
    """Record how many steps each covariance recursion computed before its steady-state stop."""
    steps, forward = [], fused._CovarianceRecursion.forward

    def spy(ctx, *args):
        out = forward(ctx, *args)
        steps.append(out[2].shape[-3])
        return out

    monkeypatch.setattr(fused._CovarianceRecursion, "forward", staticmethod(spy))
    return steps


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_steady_state_stop_gives_the_full_recursion(monkeypatch, batched, dtype):
    """Once the covariance recursion has converged the fused filter stops it and repeats the last step:
    beliefs, likelihoods and every gradient equal those of the full recursion to round-off."""
    z, sys = make_system(batch=3, steps=80, n=5, m=3, k=2, batched=batched, seed=18)
    z, sys = z.to(dtype), {k: v.to(dtype) for k, v in sys.items()}
    steps = _covariance_steps(monkeypatch)

    def run():
        leaves = {k: v.clone().requires_grad_() for k, v in sys.items()}
        zz = z.clone().requires_grad_()
        res = kalman_filter(zz, **leaves)
        # every output carries a gradient, so every reverse-pass term is exercised
        loss = (res.log_likelihood.sum() + res.filtered.mean.square().sum() + res.filtered.cov.sum()
                + res.predicted.cov.square().sum() + res.predicted.mean.sum())
        return res, torch.autograd.grad(loss, [zz, *leaves.values()])

    res, grads = run()
    assert steps[-1] <= 40, "the recursion did not stop at its steady state within the first 40 of 80 steps"
    monkeypatch.setattr(recursions, "_STEADY_ULPS", 0.0)
    full, full_grads = run()
    assert steps[-1] == 80
    _assert_close_with_grads(res, grads, full, full_grads, 1e-12 if dtype == F64 else 2e-6)
    if dtype == F64:
        _assert_close(res, _run("sequential", z, sys), 1e-10)


def test_steady_state_stop_on_a_slowly_converging_system():
    """A constant-velocity model observed in position converges over hundreds of steps: the stop waits
    for it (the estimated distance to the fixed point, not the last step's change, decides), so float32
    stays within 1e-5 of the float64 step-wise filter over 1500 steps."""
    A = torch.tensor([[1.0, 0.1], [0.0, 1.0]], dtype=F64)
    sys = dict(A=A, Q=1e-4 * torch.eye(2, dtype=F64), C=torch.tensor([[1.0, 0.0]], dtype=F64),
               R=torch.eye(1, dtype=F64), m0=torch.zeros(2, dtype=F64), P0=torch.eye(2, dtype=F64))
    z = 0.1 * torch.randn(2, 1500, 1, dtype=F64, generator=torch.Generator().manual_seed(19)).cumsum(1)
    ref = _run("sequential", z, sys)
    res = kalman_filter(z.float(), **{k: v.float() for k, v in sys.items()})
    rel = ((res.log_likelihood.double() - ref.log_likelihood) / ref.log_likelihood).abs().max()
    assert rel < 1e-5
    torch.testing.assert_close(res.filtered.cov.double(), ref.filtered.cov.expand_as(res.filtered.cov),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(res.filtered.mean.double(), ref.filtered.mean, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("steps", [1, 15, 16, 17, 103])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("max_work", [2**17, 0])
def test_constant_recursion_equals_the_step_loop(monkeypatch, batched, dtype, steps, reverse, max_work):
    """x_t = x_{t-1} F + c_t (``reverse``: x_t = x_{t+1} F + c_t), run in chunks of ~sqrt(T) steps (padding
    the last chunk) or step by step (``max_work`` 0), equals the plain loop."""
    monkeypatch.setattr(recursions, "_CHUNKED_MAX_WORK", max_work)
    gen = torch.Generator().manual_seed(20)
    batch, n = 3, 4
    F = torch.randn((batch, n, n) if batched else (n, n), generator=gen, dtype=F64)
    F = 0.95 * F / torch.linalg.matrix_norm(F, 2)[..., None, None]  # stable, as a steady-state filter is
    c, x0 = torch.randn(batch, steps, n, generator=gen, dtype=F64), torch.randn(batch, n, generator=gen, dtype=F64)
    x, want = x0, []
    for c_t in (c.flip(1) if reverse else c).unbind(1):
        x = (x[:, None] @ F)[:, 0] + c_t
        want.append(x)
    want = torch.stack(want[::-1] if reverse else want, 1)
    got = recursions._constant_recursion(F.to(dtype), c.to(dtype), x0.to(dtype), reverse)
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    from_zero = recursions._constant_recursion(F.to(dtype), c.to(dtype), None, reverse)
    from_x0 = recursions._constant_recursion(F.to(dtype), 0 * c.to(dtype), x0.to(dtype), reverse)
    torch.testing.assert_close(from_zero + from_x0, got, rtol=tol, atol=tol)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("steps", [0, 1, 15, 16, 17, 103])
@pytest.mark.parametrize("reverse", [False, True])
def test_sandwich_recursion_in_chunks_equals_the_step_loop(batched, dtype, steps, reverse):
    """G_s = D_s + N G_{s-1} N^T (the covariance adjoint after the steady state), forwards or backwards in
    time, run in chunks gives the plain loop's sum over steps and last state (zeros for no steps)."""
    gen = torch.Generator().manual_seed(21)
    N = torch.randn((3, 4, 4) if batched else (4, 4), generator=gen, dtype=F64)
    N = 0.95 * N / torch.linalg.matrix_norm(N, 2)[..., None, None]
    D = torch.randn(*N.shape[:-2], steps, 4, 4, generator=gen, dtype=F64)
    G = total = torch.zeros_like(N)
    for D_s in D.unbind(-3)[:: -1 if reverse else 1]:
        G = D_s + N @ G @ N.mT
        total = total + G
    got_total, got_last = recursions._sandwich_recursion(N.to(dtype), D.to(dtype), reverse)
    tol = 1e-12 if dtype == F64 else 2e-5
    torch.testing.assert_close(got_total.double(), total, rtol=tol, atol=tol * max(steps, 1))
    torch.testing.assert_close(got_last.double(), G, rtol=tol, atol=tol)


@pytest.mark.skipif(not hasattr(types.mmap, "MADV_HUGEPAGE"), reason="needs madvise(MADV_HUGEPAGE) (Linux)")
def test_huge_page_output_buffers_hold_the_same_results(monkeypatch):
    """Covariance outputs in buffers of their own (``_new_empty``, used from 32 MiB on; here from 1 byte)
    give the step-wise filter's beliefs and the usual gradients; the mappings outlive the call."""
    z, sys = make_system(batch=3, steps=40, n=4, m=3, k=1, seed=23)

    def run():
        leaves = {k: v.clone().requires_grad_() for k, v in sys.items()}
        res = kalman_filter(z, **leaves)
        loss = res.filtered.cov.square().sum() + res.predicted.cov.sum() + res.log_likelihood.sum()
        return res, torch.autograd.grad(loss, list(leaves.values()))

    ref, ref_grads = run()
    mappings = []
    real_mmap = types.mmap.mmap

    def counting_mmap(*args, **kwargs):
        mappings.append(real_mmap(*args, **kwargs))
        return mappings[-1]

    monkeypatch.setattr(types, "_HUGE_PAGE_MIN_BYTES", 1)
    monkeypatch.setattr(types.mmap, "mmap", counting_mmap)
    res, grads = run()
    assert len(mappings) == 2  # P_{t|t-1} and P_{t|t}
    mappings.clear()  # only the tensors hold the mappings now
    _assert_close(res, _run("sequential", z, sys), 1e-10)
    _assert_close(res, ref, 0.0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
