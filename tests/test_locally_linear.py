"""Tests for LocallyLinearPrior (worldmodel/priors/locally_linear.py), the prior of the kalman_ll preset: with equal
bases it is KalmanLatentModel; with K > 1 its filter is the assumed-density filter written out step by step here."""

from __future__ import annotations

import math

import pytest
import torch

from worldmodel.kalman import Gaussian
from worldmodel.methods import make
from worldmodel.model import ModelConfig, WorldModel
from worldmodel.planning import MPC
from worldmodel.priors import (PRIORS, KalmanLatentModel, LocallyLinearPrior, StateSpacePrior, build_prior,
                               prior_options, spectral_radius_upper_bound)

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("single_thread")
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def perturbed(model, seed=0, scale=0.3, skip=("A_raw",)):
    """Move every parameter (but `skip`) away from its initial value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in skip:
                p.add_(scale * torch.randn(p.shape, generator=gen).to(p))
    return model


def inputs(B=3, T=7, L=2, a=2, dtype=F64, seed=1):
    """z, u, a mask (one step masked, one NaN latent) and a target."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, L, generator=gen).to(dtype)
    u = torch.randn(B, T, a, generator=gen).to(dtype)
    target = torch.randn(B, T, L, generator=gen).to(dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2] = False
    z[1, T - 2, 0] = float("nan")
    return z, u, mask, target


def models(K, dtype, L=2, S=3, a=2):
    torch.manual_seed(0)
    kalman = perturbed(KalmanLatentModel(L, S, a)).to(dtype)
    return kalman, LocallyLinearPrior(L, S, a, num_bases=K).to(dtype).copy_kalman(kalman)


def test_registry_preset_and_options():
    assert PRIORS["locally_linear"] is LocallyLinearPrior
    prior = build_prior("locally_linear", 4, action_dim=1, num_bases=3)
    assert isinstance(prior, StateSpacePrior) and (prior.obs_dim, prior.state_dim, prior.num_bases) == (4, 8, 3)
    assert prior_options("locally_linear") >= {"state_dim", "action_dim", "num_bases", "hidden", "detach_alpha",
                                               "planning_cov", "lr_multiplier"}
    loss = make("kalman_ll", 4, action_dim=1)
    assert isinstance(loss.prior, LocallyLinearPrior) and loss.prior.lr_multiplier == 100.0
    assert (loss.multistep_horizon, loss.entropy, loss.latent_norm.kind) == (10, "plugin", "whiten")
    overrides = ModelConfig(method="kalman_ll", state_dim=6, action_dim=2).objective_overrides()
    assert overrides["state_dim"] == 6 and overrides["action_dim"] == 2
    assert not hasattr(prior, "transition")  # not linear: no lqr
    for bad in (dict(num_bases=0), dict(hidden=-1), dict(planning_cov="all"), dict(spectral_bound=0.0)):
        with pytest.raises(ValueError):
            LocallyLinearPrior(2, **bad)


def test_initialisation_is_the_kalman_model():
    torch.manual_seed(0)
    kalman = KalmanLatentModel(3, 5, 1)
    torch.manual_seed(0)
    prior = LocallyLinearPrior(3, 5, 1, num_bases=4)
    for k in range(4):  # one draw for all bases, the Kalman model's
        torch.testing.assert_close(prior.A_raw[k], kalman.A_raw, rtol=0, atol=0)
    z, u, mask, _ = inputs(L=3, a=1, dtype=torch.float32)
    with torch.no_grad():
        a, b = kalman.filter(z, u, mask), prior.filter(z, u, mask)
    torch.testing.assert_close(b.log_likelihood, a.log_likelihood, **TOL[torch.float32])
    torch.testing.assert_close(b.filtered.cov, a.filtered.cov, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("K", [1, 4])
def test_equal_bases_are_the_kalman_model(K, dtype):
    """copy_kalman: filter (with actions, with a mask and NaN, with a target, with per-frame R), rollout, step and
    predict_observation equal KalmanLatentModel's to round-off."""
    kalman, prior = models(K, dtype)
    z, u, mask, target = inputs(dtype=dtype)
    R = torch.rand(*z.shape, dtype=dtype) + 0.1
    with torch.no_grad():
        for kwargs in (dict(u=u), dict(u=u, mask=mask), dict(u=u, mask=mask, target=target), dict(mask=mask, R=R)):
            a, b = kalman.filter(z, **kwargs), prior.filter(z, **kwargs)
            for x, y in zip((a.log_likelihood, a.step_log_likelihood, *a.filtered, *a.predicted),
                            (b.log_likelihood, b.step_log_likelihood, *b.filtered, *b.predicted)):
                torch.testing.assert_close(y, x, **TOL[dtype])
        belief = Gaussian(a.filtered.mean[:, -1], a.filtered.cov[:, -1])
        x, y = kalman.rollout(belief, u[:, :5]), prior.rollout(belief, u[:, :5])
        torch.testing.assert_close(y.mean, x.mean, **TOL[dtype])
        torch.testing.assert_close(y.cov, x.cov, **TOL[dtype])
        uncontrolled = perturbed(KalmanLatentModel(2, 3, 0)).to(dtype)  # a horizon instead of actions
        x = uncontrolled.rollout(belief, 5)
        y = LocallyLinearPrior(2, 3, 0, num_bases=K).to(dtype).copy_kalman(uncontrolled).rollout(belief, 5)
        torch.testing.assert_close(y.mean, x.mean, **TOL[dtype])
        torch.testing.assert_close(y.cov, x.cov, **TOL[dtype])
        x, y = kalman.step(belief, z[:, 0], u[:, 0], mask[:, 0]), prior.step(belief, z[:, 0], u[:, 0], mask[:, 0])
        torch.testing.assert_close(y.mean, x.mean, **TOL[dtype])
        torch.testing.assert_close(y.cov, x.cov, **TOL[dtype])
        x, y = kalman.predict_observation(belief), prior.predict_observation(belief)
        torch.testing.assert_close(y.cov, x.cov, **TOL[dtype])


@pytest.mark.parametrize("case", ["plain", "mask", "mask_R", "target"])
def test_equal_bases_give_the_kalman_model_gradients(case):
    """Gradients (float64) of a loss of every filter output w.r.t. z, Q, R, m0 and P0 equal those of
    KalmanLatentModel (its fused filter's hand-written reverse pass), with masks, per-frame R and a target."""
    kalman, prior = models(3, F64)
    z, u, mask, target = inputs(dtype=F64)
    z = torch.nan_to_num(z).requires_grad_()
    kwargs = {"plain": {}, "mask": dict(mask=mask), "mask_R": dict(mask=mask, R=torch.rand(*z.shape, dtype=F64) + 0.1),
              "target": dict(target=target)}[case]
    grads = []
    for model in (kalman, prior):
        out = model.filter(z, u, **kwargs)
        loss = (out.log_likelihood.sum() + out.filtered.mean.square().sum() + out.filtered.cov.sum()
                + out.predicted.cov.sum())
        params = [*model.Q_cov.parameters(), *model.R_cov.parameters(), *model.P0_cov.parameters(), model.m0]
        grads.append(torch.autograd.grad(loss, [z, *params], allow_unused=True))  # per-frame R: R_cov unused
    for got, want in zip(grads[1], grads[0]):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def reference_filter(prior, z, u, mask, target):
    """The assumed-density filter in float64, step by step, from the prior's parameters only: alpha from the gate's
    weights written out, the Kalman predict and update in their textbook (non-Joseph) form, and the log-densities
    of the innovations from slogdet and a linear solve."""
    A, G, c = prior.A.double(), prior.G.double(), prior.c.double()
    Q, C, R, m, P = (x.double() for x in (prior.Q, prior.C, prior.R, prior.m0, prior.P0))
    W1, b1 = prior.gate.hidden.weight.double(), prior.gate.hidden.bias.double()
    W2, b2 = prior.gate.out.weight.double(), prior.gate.out.bias.double()
    batch, steps, L = z.shape
    lls, means, covs = torch.zeros(batch, steps, dtype=F64), [], []
    for b in range(batch):
        mean, cov = m.clone(), P.clone()
        for t in range(steps):
            logits = W2 @ torch.relu(W1 @ mean + b1) + b2
            alpha = torch.exp(logits - logits.max())
            alpha = alpha / alpha.sum()
            A_t = sum(alpha[k] * A[k] for k in range(len(alpha)))
            drive = sum(alpha[k] * (G[k] @ u[b, t] + c[k]) for k in range(len(alpha)))
            mean, cov = A_t @ mean + drive, A_t @ cov @ A_t.T + Q
            if mask[b, t] and not torch.isnan(z[b, t]).any():
                S = C @ cov @ C.T + R
                e = target[b, t] - C @ mean
                lls[b, t] = -0.5 * (L * math.log(2 * math.pi) + torch.linalg.slogdet(S)[1]
                                    + e @ torch.linalg.solve(S, e))
                gain = torch.linalg.solve(S, C @ cov).T
                mean = mean + gain @ (z[b, t] - C @ mean)
                cov = (torch.eye(len(mean), dtype=F64) - gain @ C) @ cov
            means.append(mean), covs.append(cov)
    shape = (batch, steps)
    return lls, torch.stack(means).unflatten(0, shape), torch.stack(covs).unflatten(0, shape)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_filter_equals_a_step_by_step_reference(dtype):
    torch.manual_seed(0)
    prior = perturbed(LocallyLinearPrior(2, 3, 2, num_bases=3, hidden=5), skip=()).to(dtype)
    z, u, mask, target = inputs(T=9, dtype=dtype)
    with torch.no_grad():
        out = prior.filter(z, u, mask, target=target)
        lls, means, covs = reference_filter(prior, z.double(), u.double(), mask, target.double())
        alpha = prior.alpha(out.filtered.mean)
    assert float(alpha.std(-1).mean()) > 0.05  # the bases are mixed differently from step to step
    tol = TOL[dtype] if dtype == F64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(out.step_log_likelihood.double(), lls, **tol)
    torch.testing.assert_close(out.log_likelihood.double(), lls.sum(1), **tol)
    torch.testing.assert_close(out.filtered.mean.double(), means, **tol)
    torch.testing.assert_close(out.filtered.cov.double(), covs, **tol)
    assert out.step_log_likelihood[0, 2] == 0 and out.step_log_likelihood[1, -2] == 0  # missing steps


def test_exact_observations_take_the_jitter_retry():
    """R = 0 per frame: the joint covariance of (z_t, h_t) is singular, so the filter retries with a small jitter on
    S_t (and warns); its beliefs stay close to the textbook filter's."""
    torch.manual_seed(0)
    prior = perturbed(LocallyLinearPrior(2, 3, 2, num_bases=3), skip=()).double()
    z, u, _, _ = inputs(dtype=F64)
    z = torch.nan_to_num(z)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="jitter"):
        out = prior.filter(z, u, R=torch.zeros_like(z))
    assert torch.isfinite(out.log_likelihood).all()
    # the exact observations pin C h_t = z_t
    torch.testing.assert_close(out.filtered.mean[..., :2], z, rtol=1e-4, atol=1e-4)


def test_step_T_times_reproduces_filter():
    torch.manual_seed(0)
    prior = perturbed(LocallyLinearPrior(2, 3, 2, num_bases=3), skip=()).double()
    z, u, mask, _ = inputs(dtype=F64)
    R = torch.rand(*z.shape, dtype=F64) + 0.1
    with torch.no_grad():
        out = prior.filter(z, u, mask, R)
        belief = prior.init_belief(z.shape[0])
        for t in range(z.shape[1]):
            belief = prior.step(belief, z[:, t], u[:, t], mask[:, t], R[:, t])
            torch.testing.assert_close(belief.mean, out.filtered.mean[:, t], **TOL[F64])
            torch.testing.assert_close(belief.cov, out.filtered.cov[:, t], **TOL[F64])
        predicted = prior.step(belief, None, u[:, 0])  # z_t None: predict only
        torch.testing.assert_close(predicted.mean, prior.rollout(belief, u[:, :1]).mean[:, 0])


@pytest.mark.parametrize("planning_cov", ["each", "mean"])
@pytest.mark.parametrize("hidden,a", [(6, 2), (0, 1), (6, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_candidate_rollout_equals_rollout_per_candidate(planning_cov, hidden, a, dtype):
    torch.manual_seed(0)
    prior = perturbed(LocallyLinearPrior(2, 4, a, num_bases=3, hidden=hidden, planning_cov=planning_cov),
                      skip=()).to(dtype)
    B, N, H = 2, 5, 6
    belief = Gaussian(torch.randn(B, 4, dtype=dtype), torch.eye(4, dtype=dtype).expand(B, 4, 4) * 0.5)
    fn = prior.candidate_rollout(belief, H)
    actions = torch.randn(B, N, H, a, dtype=dtype)
    out = fn(actions)
    flat = Gaussian(belief.mean.repeat_interleave(N, 0), belief.cov.repeat_interleave(N, 0))
    with torch.no_grad():
        ref = prior.rollout(flat, actions.flatten(0, 1))
        ref_mean_candidate = prior.rollout(belief, actions[:, 0])
    torch.testing.assert_close(out.mean, ref.mean.unflatten(0, (B, N)), **TOL[dtype])
    if planning_cov == "each":
        torch.testing.assert_close(out.cov, ref.cov.unflatten(0, (B, N)), **TOL[dtype])
    else:  # the first call's candidate 0 (the warm start), for every later call too
        assert out.cov.shape == (B, 1, H, 4, 4)
        torch.testing.assert_close(out.cov[:, 0], ref_mean_candidate.cov, **TOL[dtype])
        torch.testing.assert_close(fn(torch.randn(B, 3, H, a, dtype=dtype)).cov, out.cov, rtol=0, atol=0)
    assert not out.mean.requires_grad
    with pytest.raises(ValueError, match="actions must have shape"):
        fn(torch.randn(B, N, H + 1, a, dtype=dtype))


def test_gradients_reach_every_basis_the_gate_and_the_latents():
    torch.manual_seed(0)
    prior = perturbed(LocallyLinearPrior(2, 3, 2, num_bases=3), skip=()).double()
    z, u, mask, _ = inputs(dtype=F64)
    z = torch.nan_to_num(z).requires_grad_()
    ll = prior.filter(z, u, mask, target=z.detach()).log_likelihood.sum()
    grads = torch.autograd.grad(ll, [z, prior.A_raw, prior.G, prior.c, *prior.gate.parameters()])
    assert all(g.abs().amax(tuple(range(1, g.dim()))).min() > 0 for g in grads[1:4])  # every basis
    assert all(g.abs().sum() > 0 for g in grads)
    # detach_alpha: the same likelihood; only the latents' gradient through the linearisation points changes
    detached = LocallyLinearPrior(2, 3, 2, num_bases=3, detach_alpha=True).double()
    detached.load_state_dict(prior.state_dict())
    ll_d = detached.filter(z, u, mask, target=z.detach()).log_likelihood.sum()
    grads_d = torch.autograd.grad(ll_d, [z, *detached.gate.parameters()])
    torch.testing.assert_close(ll_d, ll)
    assert not torch.allclose(grads_d[0], grads[0]) and all(g.abs().sum() > 0 for g in grads_d[1:])
    small = perturbed(LocallyLinearPrior(2, 3, 1, num_bases=2, hidden=3), skip=()).double()
    zs, us = torch.randn(2, 4, 2, dtype=F64, requires_grad=True), torch.randn(2, 4, 1, dtype=F64)
    assert torch.autograd.gradcheck(lambda x: small.filter(x, us).log_likelihood, (zs,))


def test_spectral_bound_per_basis():
    prior = LocallyLinearPrior(2, 3, 0, num_bases=3)
    with torch.no_grad():
        prior.A_raw[1] *= 3.0
    radius = spectral_radius_upper_bound(prior.A.detach())
    assert radius[1] <= 1.02 + 1e-5 and radius[0] == pytest.approx(float(radius[2]))
    torch.testing.assert_close(prior.A[0], prior.A_raw[0])


def test_float32_long_sequences_stay_finite():
    torch.manual_seed(0)
    prior = perturbed(LocallyLinearPrior(4, 8, 1, num_bases=4), skip=())
    gen = torch.Generator().manual_seed(3)
    z = 3.0 * torch.randn(4, 300, 4, generator=gen)
    u = torch.randn(4, 300, 1, generator=gen)
    mask = torch.rand(4, 300, generator=gen) > 0.2
    z.requires_grad_()
    out = prior.filter(z, u, mask, target=z.detach())
    out.log_likelihood.sum().backward()
    for x in (out.log_likelihood, *out.filtered, *out.predicted, z.grad, prior.A_raw.grad):
        assert torch.isfinite(x).all()
    with torch.no_grad():
        ref = prior.double().filter(z.double(), u.double(), mask)
    torch.testing.assert_close(out.log_likelihood.double(), ref.log_likelihood, rtol=1e-4, atol=0.05)


def test_world_model_trains_filters_and_plans(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(method="kalman_ll", image_size=16, depth=4, latent_dim=3, action_dim=1,
                         method_kwargs={"num_bases": 3, "hidden": 8},
                         planner={"horizon": 4, "samples": 16, "elites": 4, "iterations": 2,
                                  "action_low": [-2.0], "action_high": [2.0]})
    model = WorldModel.from_config(config)
    assert model.can_filter and isinstance(model.prior, LocallyLinearPrior) and model.prior.num_bases == 3
    frames = torch.randint(0, 256, (4, 8, 16, 16, 3), dtype=torch.uint8)
    actions = torch.randn(4, 8, 1)
    opt = torch.optim.Adam(model.param_groups(1e-3))
    for _ in range(3):
        out = model.loss(frames, actions)
        opt.zero_grad()
        out.loss.backward()
        assert torch.isfinite(out.loss) and "multistep" in out.logs
        encoder_grad = sum(p.grad.abs().sum() for p in model.encoder.parameters() if p.grad is not None)
        assert encoder_grad > 0 and (model.prior.A_raw.grad.abs().amax((1, 2)) > 0).all()
        opt.step()
    model.eval()
    with torch.no_grad():
        filtered = model.filter(frames, actions).filtered
        belief = model.init_belief(4)
        for t in range(8):
            belief = model.step(belief, frames[:, t], None if t == 0 else actions[:, t - 1])
        torch.testing.assert_close(belief.mean, filtered.mean[:, -1], rtol=1e-4, atol=1e-4)
        assert model.imagine(belief, actions[:, :3], observe=True).mean.shape == (4, 3, 3)
        assert torch.isfinite(model.surprise(belief, frames[:, 0])).all()
    model.save(tmp_path / "ll.pt")
    loaded = WorldModel.load(tmp_path / "ll.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.filter(frames, actions).filtered.mean, filtered.mean)
    one = Gaussian(belief.mean[:1], belief.cov[:1])
    assert MPC(model, goal=frames[0, -1]).act(one).shape == (1,)
    with pytest.raises(ValueError, match="lqr"):
        MPC(model, goal=frames[0, -1], solver="lqr")
