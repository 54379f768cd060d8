"""LDMLoss: MI identity, the Kalman stop-gradient loss against a dense filter, masks, windows, errors."""

import math

import numpy as np
import pytest
import torch

from worldmodel.objective import entropy as E
from worldmodel.priors import factorized, plane, sphere
from worldmodel.objective import LDMLoss, multistep_log_likelihood
from worldmodel.methods import make

DTYPES = [torch.float32, torch.float64]


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mi_identity_on_gaussian_pairs(dtype):
    """F_MI - F_LDM = I[z; z'] (per step and dimension: I / (T d)), Gaussian closed form."""
    g = torch.Generator().manual_seed(0)
    n, d = 20000, 3
    L = torch.randn(d, d, generator=g, dtype=torch.float64) / 2 + torch.eye(d, dtype=torch.float64)
    M = torch.randn(d, d, generator=g, dtype=torch.float64) / 2
    z = torch.randn(n, d, generator=g, dtype=torch.float64) @ L.T
    z2 = z @ M.T + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64)
    # population covariances: Sz = L L^T, Szz' = Sz M^T, Sz' = M Sz M^T + 0.49 I
    Sz = (L @ L.T).numpy()
    C = Sz @ M.T.numpy()
    Sz2 = M.numpy() @ Sz @ M.T.numpy() + 0.49 * np.eye(d)
    true_mi = -0.5 * np.linalg.slogdet(np.eye(d) - np.linalg.solve(Sz, C) @ np.linalg.solve(Sz2, C.T))[1]
    pairs = torch.stack([z, z2], 1).to(dtype)
    ldm, mi = make("vicreg_ldm", d, eps=0.0)(pairs), make("vicreg", d, eps=0.0)(pairs)
    assert torch.equal(ldm.alignment, mi.alignment)
    estimate = ((ldm.loss - mi.loss) * 2 * d).item()
    assert estimate == pytest.approx(true_mi, abs=0.03)  # sampling error at N = 20000
    # and exactly the plug-in MI of the sample covariance
    cov = np.cov(pairs.double().flatten(1).numpy(), rowvar=False)
    plug_in = 0.5 * (np.linalg.slogdet(cov[:d, :d])[1] + np.linalg.slogdet(cov[d:, d:])[1] - np.linalg.slogdet(cov)[1])
    assert estimate == pytest.approx(plug_in, abs=1e-4 if dtype == torch.float32 else 1e-9)


def dense_kalman_nll(model, z, target):
    """Reference: textbook Kalman filter in float64, one step at a time (explicit inverse is fine here)."""
    A, Q, C, R = (x.detach().double() for x in (model.A, model.Q, model.C, model.R))
    b, m0, P0 = model.b.detach().double(), model.m0.detach().double(), model.P0.detach().double()
    total = 0.0
    for i in range(z.shape[0]):
        m, P = m0, P0
        for t in range(z.shape[1]):
            m, P = A @ (m - b) + b, A @ P @ A.T + Q
            S = C @ P @ C.T + R
            total = total - torch.distributions.MultivariateNormal(C @ m, S).log_prob(target[i, t].double())
            K = P @ C.T @ torch.linalg.inv(S)
            m, P = m + K @ (z[i, t].double() - C @ m), (torch.eye(len(m), dtype=torch.float64) - K @ C) @ P
    return total


@pytest.mark.parametrize("dtype", DTYPES)
def test_kalman_loss_is_stop_gradient_predictive_nll(dtype):
    """kalman: loss = -sum_t log N(SG[z_t]; C m_t|t-1, S_t) / (B T d); kalman_knn: no stop-gradient."""
    torch.manual_seed(0)
    B, T, d = 5, 4, 2  # kNN (k = 3) needs B >= 4
    loss = make("kalman", d, latent_norm="none", multistep_horizon=0).to(dtype)
    z = torch.randn(B, T, d, dtype=dtype, requires_grad=True)
    out = loss(z)
    z64 = z.detach().double().requires_grad_()
    ref = dense_kalman_nll(loss.prior, z64, z64.detach()) / (B * T * d)
    torch.testing.assert_close(out.loss.double(), ref, **tol(dtype))
    (grad,) = torch.autograd.grad(out.loss, z)
    (ref_grad,) = torch.autograd.grad(ref, z64)
    torch.testing.assert_close(grad.double(), ref_grad, **tol(dtype))
    assert grad[:, -1].abs().max() == 0  # the last latent is only a (stopped) target

    knn = make("kalman_knn", d, multistep_horizon=0).to(dtype)
    knn.prior.load_state_dict(loss.prior.state_dict())
    full = knn(z)
    ref_full = dense_kalman_nll(loss.prior, z64, z64) / (B * T * d)
    torch.testing.assert_close(-full.alignment.double(), ref_full, **tol(dtype))
    assert torch.autograd.grad(full.loss, z)[0][:, -1].abs().max() > 0


def test_kalman_mask_skips_missing_frames():
    torch.manual_seed(0)
    loss = make("kalman", 2, action_dim=1, latent_norm="none", multistep_horizon=0)
    z = torch.randn(4, 6, 2)
    u = torch.randn(4, 6, 1)
    mask = torch.rand(4, 6) > 0.3
    z_nan = z.masked_fill(~mask[..., None], float("nan"))
    out = loss(z_nan, u, mask)
    ll = loss.prior.log_prob(z, u, mask, stop_gradient_target=True)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, -ll.sum() / (mask.sum() * 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_logdet_and_joint_kde(dtype):
    torch.manual_seed(0)
    B, T, d = 40, 4, 2
    z = torch.randn(B, T, d, dtype=dtype)
    out = make("kalman_logdet", d).to(dtype)(z)
    windows = torch.cat([torch.cat([z[:, t], z[:, t + 1]], 1) for t in range(T - 1)])
    torch.testing.assert_close(out.entropy, E.logdet(windows) / 2 / d, **tol(dtype))

    beta = 3.0
    pairs = z[:, :2]
    x = torch.nn.functional.normalize(pairs, dim=-1)
    log_k = beta * (x[:, 0] @ x[:, 0].T + x[:, 1] @ x[:, 1].T)
    log_k = log_k.masked_fill(torch.eye(B, dtype=torch.bool), -math.inf)
    ref = -(torch.logsumexp(log_k, 1) - math.log(B - 1)).mean() / 2 / d
    torch.testing.assert_close(LDMLoss(sphere(beta), "kde")(pairs).entropy, ref, **tol(dtype))


def test_pair_mask_equals_dropping_rows():
    torch.manual_seed(0)
    z = torch.randn(30, 2, 3)
    mask = torch.ones(30, 2, dtype=torch.bool)
    mask[:5] = False
    z_nan = z.clone()
    z_nan[:5] = float("nan")
    for name in ("vicreg", "vicreg_ldm", "simclr"):
        loss = make(name, 3)
        torch.testing.assert_close(loss(z_nan, mask=mask).loss, loss(z[5:]).loss)


def test_plugin_target_branch():
    torch.manual_seed(0)
    loss = make("jepa", 3)
    z = torch.randn(8, 2, 3, requires_grad=True)
    target = torch.randn(8, 2, 3, requires_grad=True)
    out = loss(z, target=target)
    ref = loss.prior.log_prob(z[:, 0], target[:, 1].detach()).mean() / 3
    torch.testing.assert_close(out.alignment, ref)
    out.loss.backward()
    assert target.grad is None and z.grad[:, 1].abs().max() == 0 and out.entropy == 0


def test_bad_input_raises_clear_errors():
    vicreg = make("vicreg", 3)
    with pytest.raises(ValueError, match=r"z must be a float tensor \(B, T, d\)"):
        vicreg(torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"z must be a float tensor"):
        vicreg(torch.ones(8, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="latent dimension 4 does not match"):
        make("byol", 3)(torch.randn(8, 2, 4))
    with pytest.raises(ValueError, match="T >= 2"):
        vicreg(torch.randn(8, 1, 3))
    with pytest.raises(ValueError, match="T >= 3"):
        make("cpc", 3, steps=2)(torch.randn(8, 2, 3))
    bad = torch.randn(8, 2, 3)
    bad[1, 0, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        vicreg(bad)
    bad[1, 0, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        make("kalman", 3)(bad)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        vicreg(torch.randn(8, 2, 3), mask=torch.ones(8, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="u must be"):
        make("kalman", 3)(torch.randn(8, 2, 3), u=torch.randn(8, 3, 1))
    with pytest.raises(ValueError, match="target must have"):
        make("byol", 3)(torch.randn(8, 2, 3), target=torch.randn(8, 3, 3))
    with pytest.raises(ValueError, match="target is only used"):
        vicreg(torch.randn(8, 2, 3), target=torch.randn(8, 2, 3))
    with pytest.raises(ValueError, match="window=3 is longer"):
        make("kalman_logdet", 3, window=3)(torch.randn(8, 2, 3))
    with pytest.raises(ValueError, match="encoder"):
        make("ica", 3)(torch.randn(8, 1, 3))
    with pytest.raises(ValueError, match="entropy must be one of"):
        LDMLoss(plane(), "entropy_of_everything")
    with pytest.raises(ValueError, match="mi=True needs a batch estimator"):
        LDMLoss(plane(), "plugin", mi=True)
    with pytest.raises(ValueError, match="kde.*kernel prior"):
        LDMLoss(factorized(), "kde", mi=True)
    with pytest.raises(ValueError, match="entropy_kwargs"):
        LDMLoss(plane(), "logdet", entropy_kwargs={"k": 3})


def test_sphere_entropies_are_measured_on_the_sphere():
    z = torch.randn(50, 2, 3, generator=torch.Generator().manual_seed(0))
    out = make("simclr", 3, entropy="logdet", mi=True)(z)
    x = torch.nn.functional.normalize(z, dim=-1)
    ref = (E.logdet(x[:, 0]) + E.logdet(x[:, 1])) / 2 / 3
    torch.testing.assert_close(out.entropy, ref)
    torch.testing.assert_close(make("simclr", 3, entropy="logdet", mi=True)(10 * z).loss, out.loss)  # scale-free


@pytest.mark.parametrize("name", ["kalman", "kalman_ll"])
def test_multistep_term_reuses_the_alignment_filter(name, monkeypatch):
    """With the k-step term the loss filters z once; value and gradients equal the alignment plus the k-step term
    of a separate filter (float64), with a mask."""
    torch.manual_seed(0)
    loss = make(name, 3, action_dim=1, latent_norm="none", multistep_horizon=4).double()
    z = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 9, 1, dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 4] = False
    prior = loss.prior
    calls = []
    filter_ = prior.filter
    monkeypatch.setattr(prior, "filter", lambda *a, **k: calls.append(1) or filter_(*a, **k))
    out = loss(z, u, mask)
    assert len(calls) == 1
    grads = torch.autograd.grad(out.loss, [z, *prior.parameters()], allow_unused=True)
    zero = torch.where(mask[..., None], z, 0.0)
    alignment = prior.alignment(zero, u, mask, zero.detach()) / 3
    ref = -alignment - loss.multistep_weight * multistep_log_likelihood(prior, zero, zero.detach(), 4, u, mask)
    assert len(calls) == 3
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(ref, [z, *prior.parameters()], allow_unused=True)):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
