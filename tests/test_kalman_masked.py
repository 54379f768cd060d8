"""Missing steps through the fused filter (``masked``: one covariance recursion per mask pattern) against
the step-by-step filter and the dense joint-Gaussian reference, in float64 and float32, with gradients."""

import pytest
import torch

from test_kalman import F32, F64, _observed, dense_conditional, dense_joint, dense_log_prob, make_system
from test_kalman_speed_options import ARGS, _assert_close_with_grads, _mixed, loops  # noqa: F401 (fixture)
from worldmodel.kalman import checks, fused, kalman_filter, masked, recursions, reference

pytestmark = pytest.mark.usefixtures("single_thread", "loops")

FILTERS = {"fused": fused._filter_fused, "sequential": reference._filter_sequential}


def _pattern(name: str, batch: int, steps: int) -> torch.Tensor:
    """A ``(batch, steps)`` mask, True = observed."""
    gen = torch.Generator().manual_seed(len(name))
    mask = torch.ones(batch, steps, dtype=torch.bool)
    if name == "all_missing_sequence":
        mask[1] = False
    elif name == "missing_first_step":
        mask[:, 0] = False
    elif name == "missing_last_steps":
        mask[0, -2:] = False
        mask[2, -1] = False
    elif name == "leading_and_trailing_runs":
        mask[0, :3] = False
        mask[1, -4:] = False
        mask[2, :2] = mask[2, -2:] = False
    elif name == "repeated_rows":  # two sequences share a pattern, one is fully observed
        mask[0, 2] = mask[1, 2] = False
    elif name == "one_pattern":  # the same pattern for every sequence: one shared recursion
        mask[:, 1] = mask[:, 4] = False
    elif name.startswith("random"):
        mask = torch.rand(batch, steps, generator=gen) >= int(name[6:]) / 100
    return mask


PATTERNS = ["all_missing_sequence", "missing_first_step", "missing_last_steps", "leading_and_trailing_runs",
            "repeated_rows", "one_pattern", "random10", "random50"]


def _run(path, z, sys, mask, target=None):
    """``FILTERS[path]`` on the inputs as kalman_filter prepares them; the result and the gradients of a loss
    through every output w.r.t. every parameter."""
    leaves = {k: v.clone().requires_grad_() for k, v in sys.items()}
    args = checks._prepare(z, *(leaves[k] for k in ARGS), leaves.get("B"), leaves.get("u"), mask, target)
    result, ok = FILTERS[path](*args, jitter=0.0)
    assert ok
    loss = (result.step_log_likelihood.sum() + result.filtered.mean.square().sum() + result.filtered.cov.sum()
            + (result.predicted.mean.sin().sum() + result.predicted.cov.square().sum()))
    return result, torch.autograd.grad(loss, list(leaves.values()))


@pytest.mark.parametrize("layout", ["shared", "batched", "mixed"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_masked_fused_equals_stepwise_float64(layout, pattern):
    z, sys = make_system(batch=4, steps=9, n=4, m=3, k=2, batched=layout == "batched", seed=21)
    if layout == "mixed":
        sys = _mixed(sys, 4)
    mask = _pattern(pattern, 4, 9)
    target = z + 0.1 * torch.randn_like(z)
    for tgt in (None, target):
        res, grads = _run("fused", z, sys, mask, tgt)
        ref, ref_grads = _run("sequential", z, sys, mask, tgt)
        _assert_close_with_grads(res, grads, ref, ref_grads, 1e-10)
        assert (res.step_log_likelihood[~mask] == 0).all()


def test_nan_frames_are_missing_steps_on_the_fused_path():
    z, sys = make_system(batch=3, steps=8, n=3, m=2, k=1, seed=22)
    mask = _pattern("random50", 3, 8)
    with_nan = z.masked_fill(~mask[..., None], float("nan"))
    res, grads = _run("fused", with_nan, sys, None)
    ref, ref_grads = _run("fused", z, sys, mask)
    _assert_close_with_grads(res, grads, ref, ref_grads, 0.0)


@pytest.mark.parametrize("pattern", ["repeated_rows", "random50"])
def test_masked_fused_equals_dense_joint(pattern):
    z, sys = make_system(batch=4, steps=7, n=3, m=2, k=2, seed=23)
    mask = _pattern(pattern, 4, 7)
    res = kalman_filter(z, **sys, mask=mask)
    n, observed = 3, _observed(z, mask)
    for b in range(4):
        joint = dense_joint(sys, b, 7)
        idx = torch.tensor([t * 2 + i for t in range(7) if observed[b, t] for i in range(2)], dtype=torch.long)
        ll = dense_log_prob(z[b].reshape(-1)[idx], joint[1][idx], joint[4][idx][:, idx]) if len(idx) else 0.0
        assert res.log_likelihood[b].item() == pytest.approx(float(ll), rel=1e-9)
        for t in range(7):
            sl = slice(t * n, (t + 1) * n)
            for got, upto in ((res.filtered, t + 1), (res.predicted, t)):
                mean, cov = dense_conditional(z[b], observed[b], joint, upto=upto)
                torch.testing.assert_close(got.mean[b, t], mean[sl], rtol=1e-9, atol=1e-10)
                torch.testing.assert_close(got.cov[b, t], cov[sl, sl], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("pattern", ["random50", "leading_and_trailing_runs"])  # repeated_rows: values and grads in the float64 test
@pytest.mark.parametrize("batched", [False, True])
def test_masked_fused_gradcheck(pattern, batched):
    z, sys = make_system(batch=3, steps=6, n=3, m=2, k=1, batched=batched, seed=24)
    mask = _pattern(pattern, 3, 6)
    factors = {k: torch.linalg.cholesky(sys[k]) for k in ("Q", "R", "P0")}
    inputs = [x.clone().requires_grad_() for x in (z, sys["A"], factors["Q"], sys["C"], factors["R"], sys["m0"],
                                                    factors["P0"], sys["B"], sys["u"])]

    def fn(z, A, Lq, C, Lr, m0, Lp, B, u):
        args = checks._prepare(z, A, Lq @ Lq.mT, C, Lr @ Lr.mT, m0, Lp @ Lp.mT, B, u, mask, None)
        res, _ = fused._filter_fused(*args, jitter=0.0)
        return res.step_log_likelihood, res.filtered.mean, res.filtered.cov, res.predicted.mean, res.predicted.cov

    assert torch.autograd.gradcheck(fn, inputs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("pattern", ["early", "late", "trailing", "random10"])
def test_steady_state_stop_with_missing_steps(monkeypatch, dtype, pattern):
    """The covariance recursion looks for its steady state only after the last missing step: the result
    equals the full recursion (no stop) and the step-wise filter, wherever the missing steps are."""
    z, sys = make_system(batch=3, steps=120, n=4, m=3, k=1, seed=25)
    z, sys = z.to(dtype), {k: v.to(dtype) for k, v in sys.items()}
    mask = torch.ones(3, 120, dtype=torch.bool)
    if pattern == "early":
        mask[0, 3] = mask[2, 5:7] = False
    elif pattern == "late":
        mask[0, 90] = mask[1, 100] = False
    elif pattern == "trailing":
        mask[1, -30:] = False
    else:
        mask = _pattern("random10", 3, 120)
    res, grads = _run("fused", z, sys, mask)
    ref, ref_grads = _run("sequential", z, sys, mask)
    tol = 1e-10 if dtype == F64 else 2e-4
    _assert_close_with_grads(res, grads, ref, ref_grads, tol)
    monkeypatch.setattr(recursions, "_STEADY_ULPS", 0.0)
    full, full_grads = _run("fused", z, sys, mask)
    _assert_close_with_grads(res, grads, full, full_grads, 1e-12 if dtype == F64 else 2e-5)


def test_mask_patterns_group_equal_rows():
    mask = _pattern("repeated_rows", 4, 6)
    rows = masked.mask_patterns(mask, shared=True, dtype=F64)
    assert rows.recursions == 2 and (rows.observed[rows.group] == mask.to(F64)).all() and rows.first == 3
    assert masked.mask_patterns(mask, shared=False, dtype=F64).group is None  # batched: one per sequence
    one = masked.mask_patterns(_pattern("one_pattern", 4, 6), shared=True, dtype=F64)
    assert one.recursions == 1 and one.observed.shape == (6,) and one.first == 5
    assert masked.mask_patterns(None, shared=True, dtype=F64) == (None, None, 0)


def test_long_masked_float32_stays_finite_and_close_to_float64():
    steps = 2000
    z, sys = make_system(batch=3, steps=steps, n=4, m=3, k=1, seed=26)
    mask = _pattern("random10", 3, steps)
    mask[1, 500:800] = False  # a long gap
    ref = kalman_filter(z, **sys, mask=mask)
    leaves = {k: v.float().requires_grad_() for k, v in sys.items()}
    res = kalman_filter(z.float(), **leaves, mask=mask)
    grads = torch.autograd.grad(res.log_likelihood.sum(), list(leaves.values()))
    for x in (res.log_likelihood, res.filtered.mean, res.filtered.cov, *grads):
        assert torch.isfinite(x).all()
    rel = ((res.log_likelihood.double() - ref.log_likelihood) / ref.log_likelihood).abs().max()
    assert rel < 1e-5
    torch.testing.assert_close(res.filtered.mean.double(), ref.filtered.mean, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(res.filtered.cov.double(), ref.filtered.cov, rtol=1e-3, atol=1e-4)
