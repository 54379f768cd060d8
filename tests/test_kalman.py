"""Tests for worldmodel.kalman against an independent dense joint-Gaussian reference."""

import math
import re

import pytest
import torch

from worldmodel.kalman import (FilterResult, Gaussian, gaussian_log_prob, kalman_filter, predict, rts_smoother,
                               symmetrize, update)

F64, F32 = torch.float64, torch.float32


pytestmark = pytest.mark.usefixtures("single_thread")


def _spd(*shape, n, gen, scale=1.0):
    X = torch.randn(*shape, n, n, dtype=F64, generator=gen)
    return scale * (X @ X.mT / n + 0.2 * torch.eye(n, dtype=F64))


def make_system(batch=3, steps=6, n=4, m=2, k=2, *, batched=False, per_step_R=False, seed=0):
    """Random stable system; batched=True gives A, Q, C, m0, P0, B a leading batch dimension."""
    gen = torch.Generator().manual_seed(seed)
    lead = (batch,) if batched else ()
    A = 0.5 * torch.randn(*lead, n, n, dtype=F64, generator=gen) / math.sqrt(n)
    sys = dict(
        A=A,
        Q=_spd(*lead, n=n, gen=gen, scale=0.5),
        C=torch.randn(*lead, m, n, dtype=F64, generator=gen),
        R=_spd(*((batch, steps) if per_step_R else lead), n=m, gen=gen, scale=0.3),
        m0=torch.randn(*lead, n, dtype=F64, generator=gen),
        P0=_spd(*lead, n=n, gen=gen),
    )
    if k:
        sys["B"] = torch.randn(*lead, n, k, dtype=F64, generator=gen)
        sys["u"] = torch.randn(batch, steps, k, dtype=F64, generator=gen)
    z = torch.randn(batch, steps, m, dtype=F64, generator=gen)
    return z, sys


def _pick(x, b, event_dims):
    return x[b] if x.dim() > event_dims else x


def dense_joint(sys, b, steps):
    """Mean and covariance of the stacked (h_1..h_T, z_1..z_T) of sequence b, built from the model
    h_t = A h_{t-1} + B u_t + w_t, z_t = C h_t + v_t as a linear map of independent (h_0, w, v)."""
    A, Q, C, m0, P0 = (_pick(sys[k], b, d) for k, d in (("A", 2), ("Q", 2), ("C", 2), ("m0", 1), ("P0", 2)))
    R = sys["R"]
    Rs = [R[b, t] if R.dim() == 4 else _pick(R, b, 2) for t in range(steps)]
    n, m = A.shape[-1], C.shape[-2]
    bu = [torch.zeros(n, dtype=F64)] * steps
    if "B" in sys:
        bu = [_pick(sys["B"], b, 2) @ sys["u"][b, t] for t in range(steps)]
    power = [torch.linalg.matrix_power(A, p) for p in range(steps + 1)]
    # h_t = A^t h_0 + sum_{s<=t} A^{t-s} (B u_s + w_s)
    H = torch.zeros(steps * n, n + steps * n, dtype=F64)
    h_mean = torch.zeros(steps, n, dtype=F64)
    for t in range(steps):
        H[t * n : (t + 1) * n, :n] = power[t + 1]
        h_mean[t] = power[t + 1] @ m0 + sum(power[t - s] @ bu[s] for s in range(t + 1))
        for s in range(t + 1):
            H[t * n : (t + 1) * n, n + s * n : n + (s + 1) * n] = power[t - s]
    noise = torch.block_diag(P0, *([Q] * steps))
    cov_h = H @ noise @ H.mT
    Cbig = torch.block_diag(*([C] * steps))
    cov_hz = cov_h @ Cbig.mT
    cov_z = Cbig @ cov_h @ Cbig.mT + torch.block_diag(*Rs)
    return h_mean.reshape(-1), (Cbig @ h_mean.reshape(-1)), cov_h, cov_hz, cov_z


def dense_log_prob(x, mean, cov):
    sign, logdet = torch.linalg.slogdet(cov)
    assert sign > 0
    r = x - mean
    return -0.5 * (r @ torch.linalg.solve(cov, r) + logdet + x.numel() * math.log(2 * math.pi))


def dense_conditional(z_b, observed_b, joint, upto=None):
    """E[h | observed z_{1..upto}], Cov[h | ...] for the stacked states."""
    h_mean, z_mean, cov_h, cov_hz, cov_z = joint
    steps, m = z_b.shape
    keep = [t for t in range(steps if upto is None else upto) if observed_b[t]]
    idx = torch.tensor([t * m + i for t in keep for i in range(m)], dtype=torch.long)
    if len(idx) == 0:
        return h_mean, cov_h
    gain = torch.linalg.solve(cov_z[idx][:, idx], cov_hz[:, idx].mT).mT
    mean = h_mean + gain @ (z_b.reshape(-1)[idx] - z_mean[idx])
    return mean, cov_h - gain @ cov_hz[:, idx].mT


def _observed(z, mask):
    obs = ~torch.isnan(z).any(-1)
    return obs if mask is None else obs & mask


CASES = {
    "shared": dict(k=0),
    "batched+actions": dict(batched=True),
    "per_step_R+actions": dict(per_step_R=True),
}


def _masked_inputs(case, steps=6):
    z, sys = make_system(steps=steps, **CASES[case])
    mask = torch.ones(z.shape[:2], dtype=torch.bool)
    mask[0, 2] = mask[1, 0] = mask[2, 3:5] = False
    z[1, 4, 0] = float("nan")  # NaN also marks a missing step
    return z, sys, mask


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_log_likelihood_and_filtered_beliefs_equal_dense_joint(case, parallel):
    z, sys, mask = _masked_inputs(case)
    steps, n = z.shape[1], sys["A"].shape[-1]
    res = kalman_filter(z, **sys, mask=mask, parallel=parallel)
    assert isinstance(res, FilterResult) and res.log_likelihood.dtype == F64
    observed = _observed(z, mask)
    for b in range(z.shape[0]):
        joint = dense_joint(sys, b, steps)
        idx = torch.tensor([t * z.shape[2] + i for t in range(steps) if observed[b, t] for i in range(z.shape[2])])
        ll = dense_log_prob(z[b].reshape(-1)[idx], joint[1][idx], joint[4][idx][:, idx])
        assert res.log_likelihood[b].item() == pytest.approx(ll.item(), rel=1e-9)
        assert res.step_log_likelihood[b].sum().item() == pytest.approx(ll.item(), rel=1e-9)
        assert (res.step_log_likelihood[b][~observed[b]] == 0).all()
        for t in range(steps):
            mean, cov = dense_conditional(z[b], observed[b], joint, upto=t + 1)
            sl = slice(t * n, (t + 1) * n)
            torch.testing.assert_close(res.filtered.mean[b, t], mean[sl], rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(res.filtered.cov[b, t], cov[sl, sl], rtol=1e-9, atol=1e-10)
            mean, cov = dense_conditional(z[b], observed[b], joint, upto=t)
            torch.testing.assert_close(res.predicted.mean[b, t], mean[sl], rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(res.predicted.cov[b, t], cov[sl, sl], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("parallel", [False, True])
def test_float32_matches_dense_float64(parallel):
    z, sys, mask = _masked_inputs("batched+actions")
    res = kalman_filter(z.float(), **{k: v.float() for k, v in sys.items()}, mask=mask, parallel=parallel)
    assert res.log_likelihood.dtype == F32
    ref = kalman_filter(z, **sys, mask=mask)
    torch.testing.assert_close(res.log_likelihood.double(), ref.log_likelihood, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.filtered.cov.double(), ref.filtered.cov, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-9), (F32, 2e-4)])
@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("case", ["shared", "per_step_R+actions"])
def test_smoother_equals_dense_conditional(case, parallel, dtype, tol):
    z, sys, mask = _masked_inputs(case)
    steps, n = z.shape[1], sys["A"].shape[-1]
    res = kalman_filter(z.to(dtype), **{k: v.to(dtype) for k, v in sys.items()}, mask=mask)
    smoothed = rts_smoother(res, sys["A"].to(dtype), sys["Q"].to(dtype), parallel=parallel)
    assert smoothed.mean.shape == (z.shape[0], steps, n) and smoothed.cov.shape == (z.shape[0], steps, n, n)
    observed = _observed(z, mask)
    for b in range(z.shape[0]):
        mean, cov = dense_conditional(z[b], observed[b], dense_joint(sys, b, steps))
        blocks = torch.stack([cov[t * n : (t + 1) * n, t * n : (t + 1) * n] for t in range(steps)])
        torch.testing.assert_close(smoothed.mean[b].double(), mean.reshape(steps, n), rtol=tol, atol=tol)
        torch.testing.assert_close(smoothed.cov[b].double(), blocks, rtol=tol, atol=tol)


@pytest.mark.parametrize("steps", [1, 2, 33])
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-10), (F32, 2e-4)])
def test_parallel_equals_sequential(steps, dtype, tol):
    z, sys = make_system(batch=4, steps=steps, n=5, m=3, batched=True, seed=1)
    z, sys = z.to(dtype), {k: v.to(dtype) for k, v in sys.items()}
    mask = torch.rand(z.shape[:2], generator=torch.Generator().manual_seed(2)) > 0.25
    seq = kalman_filter(z, **sys, mask=mask)
    par = kalman_filter(z, **sys, mask=mask, parallel=True)
    for a, b in zip(torch.utils._pytree.tree_leaves(seq), torch.utils._pytree.tree_leaves(par)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    s_seq, s_par = rts_smoother(seq, sys["A"], sys["Q"]), rts_smoother(seq, sys["A"], sys["Q"], parallel=True)
    torch.testing.assert_close(s_seq.mean, s_par.mean, rtol=tol, atol=tol)
    torch.testing.assert_close(s_seq.cov, s_par.cov, rtol=tol, atol=tol)


def test_shared_parameters_equal_batched_copies():
    z, sys = make_system(k=2)
    batch = z.shape[0]
    copies = {k: (v if k == "u" else v.expand(batch, *v.shape).clone()) for k, v in sys.items()}
    for parallel in (False, True):
        a = kalman_filter(z, **sys, parallel=parallel)
        b = kalman_filter(z, **copies, parallel=parallel)
        torch.testing.assert_close(a.log_likelihood, b.log_likelihood, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.filtered.cov, b.filtered.cov, rtol=1e-12, atol=1e-12)


def test_predict_update_T_times_equals_filter():
    z, sys, mask = _masked_inputs("per_step_R+actions")
    res = kalman_filter(z, **sys, mask=mask)
    belief = Gaussian(sys["m0"].expand(z.shape[0], -1), sys["P0"])
    total = torch.zeros(z.shape[0], dtype=F64)
    for t in range(z.shape[1]):
        belief = predict(belief, sys["A"], sys["Q"], sys["B"], sys["u"][:, t])
        torch.testing.assert_close(belief.mean, res.predicted.mean[:, t], rtol=1e-12, atol=1e-12)
        belief, ll = update(belief, z[:, t], sys["C"], sys["R"][:, t], mask[:, t])
        total = total + ll
        torch.testing.assert_close(belief.mean, res.filtered.mean[:, t], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(belief.cov, res.filtered.cov[:, t], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total, res.log_likelihood, rtol=1e-12, atol=1e-12)


# ---- gradients --------------------------------------------------------------------------------------


def _factor(n, gen, batch=()):
    return torch.linalg.cholesky(_spd(*batch, n=n, gen=gen)).requires_grad_()


@pytest.mark.parametrize("with_target", [False, True])
@pytest.mark.parametrize("parallel", [False, True])
def test_gradcheck_every_input(parallel, with_target):
    """gradcheck in float64 w.r.t. z, A, C, B, u, m0 and the Cholesky factors of Q, R, P0, with a
    masked step and a NaN observation; ``with_target`` passes a constant likelihood target (the
    stop-gradient path: z then enters only through the filter history)."""
    gen = torch.Generator().manual_seed(3)
    batch, steps, n, m, k = 2, 3, 3, 2, 1
    z = torch.randn(batch, steps, m, dtype=F64, generator=gen)
    z[1, 1, 0] = float("nan")
    z.requires_grad_()
    mask = torch.tensor([[True, False, True], [True, True, True]])
    A = (0.5 * torch.randn(batch, n, n, dtype=F64, generator=gen)).requires_grad_()
    C = torch.randn(m, n, dtype=F64, generator=gen).requires_grad_()
    B = torch.randn(n, k, dtype=F64, generator=gen).requires_grad_()
    u = torch.randn(batch, steps, k, dtype=F64, generator=gen).requires_grad_()
    m0 = torch.randn(n, dtype=F64, generator=gen).requires_grad_()
    Lq, Lr, Lp = _factor(n, gen), _factor(m, gen, (batch, steps)), _factor(n, gen)
    target = torch.randn(batch, steps, m, dtype=F64, generator=gen) if with_target else None

    def fn(z, A, C, B, u, m0, Lq, Lr, Lp):
        res = kalman_filter(
            z, A, Lq @ Lq.mT, C, Lr @ Lr.mT, m0, Lp @ Lp.mT, B, u, mask,
            parallel=parallel, target=target,
        )  # fmt: skip
        return res.log_likelihood, res.filtered.mean, res.predicted.cov

    assert torch.autograd.gradcheck(fn, (z, A, C, B, u, m0, Lq, Lr, Lp), atol=1e-6, rtol=1e-5)


def test_smoother_gradcheck():
    z, sys = make_system(batch=2, steps=3, n=3, m=2, k=0, seed=4)
    z.requires_grad_()
    A = sys["A"].clone().requires_grad_()

    def fn(z, A):
        res = kalman_filter(z, A, sys["Q"], sys["C"], sys["R"], sys["m0"], sys["P0"])
        seq, par = rts_smoother(res, A, sys["Q"]), rts_smoother(res, A, sys["Q"], parallel=True)
        return seq.mean, seq.cov, par.mean

    assert torch.autograd.gradcheck(fn, (z, A), atol=1e-6, rtol=1e-5)


# ---- numerics ---------------------------------------------------------------------------------------


def _long_system(steps, batch=2):
    """n=4, m=2 system with R = 1e-6 I and a near-singular Q (eigenvalues 1e-1 .. 1e-9)."""
    gen = torch.Generator().manual_seed(5)
    c, s = math.cos(0.3), math.sin(0.3)
    rot = torch.tensor([[c, -s], [s, c]], dtype=F64)
    A = torch.zeros(4, 4, dtype=F64)
    A[:2, :2], A[2:, 2:], A[:2, 2:] = 0.98 * rot, 0.9 * rot.T, 0.3 * torch.eye(2, dtype=F64)
    V = torch.linalg.qr(torch.randn(4, 4, dtype=F64, generator=gen))[0]
    Q = V @ torch.diag(torch.tensor([1e-1, 1e-2, 1e-3, 1e-9], dtype=F64)) @ V.mT
    C = torch.randn(2, 4, dtype=F64, generator=gen)
    sys = dict(A=A, Q=Q, C=C, R=1e-6 * torch.eye(2, dtype=F64), m0=torch.zeros(4, dtype=F64), P0=torch.eye(4, dtype=F64))
    noise = torch.randn(batch, steps, 4, dtype=F64, generator=gen) @ (V * torch.tensor([1e-1, 1e-2, 1e-3, 1e-9]).sqrt()).mT
    h, zs = torch.zeros(batch, 4, dtype=F64), []
    for t in range(steps):
        h = h @ A.mT + noise[:, t]
        zs.append(h @ C.mT)
    z = torch.stack(zs, 1) + 1e-3 * torch.randn(batch, steps, 2, dtype=F64, generator=gen)
    return z, sys


@pytest.mark.parametrize("parallel", [False, True])
def test_float32_long_sequence_stays_finite_symmetric_pd(parallel):
    z, sys = _long_system(10_000)
    ref = kalman_filter(z, **sys, parallel=parallel)
    res = kalman_filter(z.float(), **{k: v.float() for k, v in sys.items()}, parallel=parallel)
    rel = ((res.log_likelihood.double() - ref.log_likelihood) / ref.log_likelihood).abs().max()
    assert rel < 1e-4
    smoothed = rts_smoother(res, sys["A"].float(), sys["Q"].float(), parallel=parallel)
    for belief in (res.filtered, res.predicted, smoothed):
        assert torch.isfinite(belief.mean).all() and torch.isfinite(belief.cov).all()
        assert (belief.cov - belief.cov.mT).abs().max() <= 1e-6 * belief.cov.abs().max()
        assert (torch.linalg.cholesky_ex(belief.cov).info == 0).all()
        assert torch.linalg.eigvalsh(belief.cov).min() > 0


def test_singular_innovation_uses_jitter_not_nan():
    """R = 0 and a rank-deficient Q make S singular: the filter retries with jitter and warns."""
    z = torch.randn(1, 4, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    eye = torch.eye(2, dtype=F64)
    with pytest.warns(RuntimeWarning, match="jitter"):
        res = kalman_filter(z, eye, torch.diag(torch.tensor([1.0, 0.0], dtype=F64)), eye, 0 * eye, torch.zeros(2, dtype=F64), 0 * eye)
    assert torch.isfinite(res.log_likelihood).all() and torch.isfinite(res.filtered.cov).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_upcast_to_float32(dtype):
    z, sys = make_system(k=0)
    zh = z.to(dtype)
    ref = kalman_filter(zh.float(), **{k: v.float() for k, v in sys.items()})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = kalman_filter(zh, **{k: v.to(dtype) for k, v in sys.items()})
    assert res.log_likelihood.dtype == F32 and res.filtered.cov.dtype == F32
    # the parameters themselves were rounded to half precision, so only agreement to that precision
    torch.testing.assert_close(res.log_likelihood, ref.log_likelihood, rtol=2e-2, atol=2e-2)


# ---- missing data and bad input ---------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [False, True])
def test_nan_observation_is_missing_and_never_propagates(parallel):
    z, sys = make_system(k=2, seed=7)
    mask = torch.ones(z.shape[:2], dtype=torch.bool)
    mask[0, 1] = mask[2, 0] = False
    z_nan = z.clone()
    z_nan[0, 1] = float("nan")
    z_nan[2, 0, 1] = float("nan")
    z_nan.requires_grad_()
    A = sys["A"].clone().requires_grad_()
    with_nan = kalman_filter(z_nan, A, *(sys[k] for k in ("Q", "C", "R", "m0", "P0", "B", "u")), parallel=parallel)
    with_mask = kalman_filter(z, **sys, mask=mask, parallel=parallel)
    for a, b in zip(torch.utils._pytree.tree_leaves(with_nan), torch.utils._pytree.tree_leaves(with_mask)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(with_nan.filtered.mean[0, 1], with_nan.predicted.mean[0, 1])
    (with_nan.log_likelihood.sum() + with_nan.filtered.mean.sum()).backward()
    assert torch.isfinite(z_nan.grad).all() and torch.isfinite(A.grad).all()
    assert (z_nan.grad[0, 1] == 0).all() and (z_nan.grad[2, 0] == 0).all()


def test_all_missing_gives_prior_predictions():
    z, sys = make_system(k=0)
    res = kalman_filter(torch.full_like(z, float("nan")), **sys)
    assert (res.log_likelihood == 0).all()
    mean, cov = sys["m0"], sys["P0"]
    for t in range(z.shape[1]):
        mean, cov = sys["A"] @ mean, sys["A"] @ cov @ sys["A"].mT + sys["Q"]
        torch.testing.assert_close(res.filtered.mean[:, t], mean.expand(z.shape[0], -1))
        torch.testing.assert_close(res.filtered.cov[:, t], cov.expand(z.shape[0], -1, -1))


def _bad(name, value, m=2):
    z, sys = make_system(m=m, k=2)
    args = dict(z=z, **sys, mask=torch.ones(z.shape[:2], dtype=torch.bool))
    args[name] = value(args[name])
    return args


def _not_pd(X):
    X = X.clone()
    X[..., 0, 0] = -1.0
    return X


def _nan_at_0(X):
    X = X.clone()
    X.view(-1)[0] = float("nan")
    return X


BAD_INPUTS = [
    ("z", lambda z: z[0], "z"),
    ("z", lambda z: z.masked_fill(torch.zeros_like(z, dtype=torch.bool).index_fill(1, torch.tensor([0]), True), float("inf")), "z"),
    ("A", lambda A: A[:, :3], "A"),
    ("Q", lambda Q: Q[:3, :3], "Q"),
    ("C", lambda C: C.mT, "C"),
    ("R", lambda R: torch.eye(3, dtype=F64), "R"),
    ("m0", lambda m0: m0[:2], "m0"),
    ("P0", lambda P0: P0.expand(5, 4, 4), "P0"),
    ("B", lambda B: B[:, :1], "B"),
    ("u", lambda u: u[:, :2], "u"),
    ("mask", lambda mask: mask[:, :2], "mask"),
    ("u", lambda u: None, "u"),
    ("A", _nan_at_0, "A"),
    ("C", lambda C: C * float("inf"), "C"),
    ("m0", _nan_at_0, "m0"),
    ("B", _nan_at_0, "B"),
    ("u", _nan_at_0, "u"),
    ("Q", _nan_at_0, "Q"),
    ("Q", _not_pd, "Q"),
    ("R", _not_pd, "R"),
    ("P0", _not_pd, "P0"),
    ("Q", lambda Q: Q + torch.triu(torch.ones_like(Q), 1), "Q"),
    ("A", lambda A: A.tolist(), "A"),
]


@pytest.mark.parametrize("name,corrupt,mentions", BAD_INPUTS)
@pytest.mark.parametrize("parallel", [False, True])
def test_bad_input_raises_value_error_naming_argument(name, corrupt, mentions, parallel):
    args = _bad(name, corrupt)
    with pytest.raises(ValueError, match=rf"\b{mentions}\b"):
        kalman_filter(**args, parallel=parallel)


@pytest.mark.parametrize("name", ["Q", "R", "P0"])
@pytest.mark.parametrize("corrupt,problem", [(_nan_at_0, "non-finite"), (_not_pd, "definite"),
                                             (lambda X: X + torch.triu(torch.ones_like(X), 1), "symmetric")])
@pytest.mark.parametrize("m", [2, 4])  # m = n = 4: Q, R and P0 are checked as one stack
def test_bad_covariance_error_says_what_is_wrong(name, corrupt, problem, m):
    with pytest.raises(ValueError, match=rf"^{name} .*{problem}"):
        kalman_filter(**_bad(name, corrupt, m))


def _rounded_covariance(name, dtype, seed=0):
    """The system of ``_bad`` with covariance ``name`` recomputed in ``dtype`` as a propagated covariance
    M (X X^T) M^T, as a filter or a learned factor yields it: symmetric only to the round-off of ``dtype``."""
    args = _bad(name, lambda X: X, m=4)
    gen = torch.Generator().manual_seed(seed)
    M, X = (torch.randn(4, 4, dtype=dtype, generator=gen) for _ in range(2))
    args[name] = M @ (X @ X.mT) @ M.mT + torch.eye(4, dtype=dtype)
    return args


def _relative_asymmetry(X):
    return ((X - X.mT).abs().max() / X.abs().max()).item()


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("name", ["Q", "R", "P0"])
def test_float32_covariance_with_float64_data_is_checked_at_float32_precision(name, parallel):
    """Issue 16: a covariance computed in float32 is symmetric to float32's round-off only, which is far
    above float64's; with float64 z it was rejected as not symmetric. Now it filters in float64 like its
    float64 symmetrisation, to float32 precision."""
    args = _rounded_covariance(name, F32)
    assert 1e3 * torch.finfo(F64).eps < _relative_asymmetry(args[name]) < 1e3 * torch.finfo(F32).eps
    res = kalman_filter(**args, parallel=parallel)
    ref = kalman_filter(**(args | {name: symmetrize(args[name].double())}), parallel=parallel)
    assert res.log_likelihood.dtype == F64
    for got, want in zip(res, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_covariance_tolerance_follows_the_given_dtype_and_the_error_gives_the_numbers(dtype):
    """Q given in ``dtype`` (z is float64): an asymmetry of 0.1 of ``1e3 eps(dtype) max |Q|`` passes, one of
    10 times it is rejected with the measured and the allowed asymmetry; an indefinite Q with its
    smallest eigenvalue."""
    args = _rounded_covariance("Q", dtype)
    Q = symmetrize(args["Q"])
    allowed = 1e3 * torch.finfo(dtype).eps * Q.abs().max().item()
    skew = torch.triu(torch.ones_like(Q), 1)
    kalman_filter(**(args | dict(Q=Q + 0.1 * allowed * skew)))
    with pytest.raises(ValueError, match="^Q must be a symmetric covariance matrix") as err:
        kalman_filter(**(args | dict(Q=Q + 10 * allowed * skew)))
    measured, limit = (float(x) for x in re.search(r"= (\S+), allowed at most (\S+) ", str(err.value)).groups())
    assert measured == pytest.approx(10 * allowed, rel=1e-2) and limit == pytest.approx(allowed, rel=1e-2)
    indefinite = Q - 2 * Q.diagonal().max() * torch.eye(4, dtype=dtype)
    with pytest.raises(ValueError, match="^Q must be positive") as err:
        kalman_filter(**(args | dict(Q=indefinite)))
    lowest, limit = (float(x) for x in re.search(r"eigenvalue (\S+), allowed at least (\S+) ", str(err.value)).groups())
    assert lowest == pytest.approx(torch.linalg.eigvalsh(indefinite.double())[0].item(), rel=1e-2)
    assert limit == pytest.approx(-1e3 * torch.finfo(dtype).eps * indefinite.abs().max().item(), rel=1e-2)


def test_predict_update_reject_mismatched_shapes():
    belief = Gaussian(torch.zeros(2, 3), torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match=r"\bA\b"):
        predict(belief, torch.eye(2), torch.eye(3))
    with pytest.raises(ValueError, match=r"\bC\b"):
        update(belief, torch.zeros(2, 2), torch.eye(3), torch.eye(2))
    with pytest.raises(ValueError, match=r"\bR\b"):
        update(belief, torch.zeros(2, 2), torch.eye(2, 3), torch.eye(3))


# ---- the Gaussian log-density -----------------------------------------------------------------------


def _mvn_inputs(seed=0, n=4):
    """x (2, 5, 3, n) against means (5, 3, n) and covariances (5, 3, n, n): the leading 2 broadcasts."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(5, 3, n, dtype=F64, generator=gen)
    cov = _spd(5, 3, n=n, gen=gen)
    return torch.randn(2, 5, 3, n, dtype=F64, generator=gen), mean, cov


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (F32, 1e-5)])
def test_gaussian_log_prob_equals_torch_multivariate_normal(dtype, tol):
    x, mean, cov = _mvn_inputs()
    want = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)  # float64
    got = gaussian_log_prob(x.to(dtype), mean.to(dtype), cov.to(dtype))
    assert got.dtype == dtype and got.shape == (2, 5, 3)
    torch.testing.assert_close(got, want.to(dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(Gaussian(mean.to(dtype), cov.to(dtype)).log_prob(x.to(dtype)), got, rtol=0, atol=0)


def test_gaussian_log_prob_gradients_and_shared_covariance_equal_multivariate_normal():
    x, mean, cov = _mvn_inputs(seed=1)
    cov = cov[0, 0]  # one (n, n) covariance for every mean
    got_inputs = [t.clone().requires_grad_() for t in (x, mean, cov)]
    want_inputs = [t.clone().requires_grad_() for t in (x, mean, cov)]
    got = gaussian_log_prob(*got_inputs)
    want = torch.distributions.MultivariateNormal(want_inputs[1], covariance_matrix=want_inputs[2]).log_prob(
        want_inputs[0])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got.sum(), got_inputs), torch.autograd.grad(want.sum(), want_inputs)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_gaussian_log_prob_promotes_dtypes_and_rejects_non_pd():
    x, mean, cov = _mvn_inputs()
    assert gaussian_log_prob(x.float(), mean.float(), cov).dtype == F64
    assert gaussian_log_prob(x.half(), mean.half(), cov.half()).dtype == F32
    with pytest.raises(FloatingPointError, match="not positive definite"):
        gaussian_log_prob(x, mean, -cov)
