"""Tests for KalmanLatentModel (worldmodel/priors/linear_gaussian.py), the state-space prior of the kalman presets."""

import math

import pytest
import torch
from torch.func import functional_call

from worldmodel.kalman import Gaussian, kalman_filter
from worldmodel.priors import CholeskyCovariance, spectral_radius_upper_bound
from worldmodel.priors import KalmanLatentModel

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(L=2, S=3, k=1, dtype=F64, seed=0, **kw):
    """A model with every parameter moved away from its (zero / identity) initial value."""
    torch.manual_seed(seed)
    model = KalmanLatentModel(L, S, k, **kw).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "A_raw":
                p.add_(0.3 * torch.randn_like(p))
    return model


def inputs(B=3, T=5, L=2, k=1, dtype=F64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(B, T, L, dtype=dtype, generator=gen)
    u = torch.randn(B, T, k, dtype=dtype, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2] = False
    z[1, T - 2, 0] = float("nan")
    return z, u, mask


def test_registered_as_a_state_space_prior():
    from worldmodel.priors import PRIORS, StateSpacePrior, build_prior

    assert PRIORS["kalman"] is KalmanLatentModel
    prior = build_prior("kalman", 4, action_dim=2)
    assert isinstance(prior, StateSpacePrior) and (prior.obs_dim, prior.state_dim, prior.action_dim) == (4, 8, 2)
    assert prior.lr_multiplier == 100.0 and KalmanLatentModel(4, lr_multiplier=5.0).lr_multiplier == 5.0


def test_defaults_and_initialisation():
    torch.manual_seed(0)
    model = KalmanLatentModel(8)
    assert model.state_dim == 16 and model.action_dim == 0
    radius = torch.linalg.eigvals(model.A_raw.detach()).abs().max()
    assert radius.item() == pytest.approx(0.91, abs=1e-5)
    torch.testing.assert_close(model.A, model.A_raw)  # bound inactive at init
    # near the identity: A_raw / 0.91-rescaling of I + 0.1 N(0, 1)
    assert (model.A_raw.detach() / model.A_raw.detach().diagonal().mean() - torch.eye(16)).abs().mean() < 0.2
    torch.testing.assert_close(model.C, torch.eye(8, 16))
    assert "C_param" not in dict(model.named_parameters())
    torch.testing.assert_close(model.P0, torch.eye(16))
    belief = model.init_belief(5)
    assert belief.mean.shape == (5, 16) and belief.cov.shape == (5, 16, 16)
    assert (belief.mean == 0).all()
    learned = KalmanLatentModel(3, learn_C=True, full_cov=True)
    names = dict(learned.named_parameters())
    assert "C_param" in names and names["Q_cov.lower"].shape == (6, 6)


def test_spectral_radius_upper_bound():
    gen = torch.Generator().manual_seed(2)
    A = torch.randn(20, 6, 6, dtype=F64, generator=gen)
    rho = torch.linalg.eigvals(A).abs().amax(-1)
    est = spectral_radius_upper_bound(A)
    assert (est >= rho * (1 - 1e-12)).all() and (est <= 1.5 * rho).all()
    sym = A + A.mT  # normal matrices: the bound is exact
    torch.testing.assert_close(spectral_radius_upper_bound(sym), torch.linalg.eigvalsh(sym).abs().amax(-1))


@pytest.mark.parametrize("bound", [1.02, 0.5])
def test_spectral_bound_holds_after_forward(bound):
    model = KalmanLatentModel(3, spectral_bound=bound)
    with torch.no_grad():
        model.A_raw.mul_(3.0).add_(torch.randn(6, 6))
    assert torch.linalg.eigvals(model.A_raw.detach()).abs().max() > bound
    A = model.A
    assert torch.linalg.eigvals(A.detach()).abs().max() <= bound + 1e-6
    A.sum().backward()
    assert torch.isfinite(model.A_raw.grad).all()
    assert KalmanLatentModel(3, spectral_bound=None).A is not None


def _textbook(model, z, u):
    """Independent route for the bias: h' = h - b gives h'_t = A h'_{t-1} + G u + w, z_t = C h'_t + C b + v."""
    return dict(
        z=z - model.C @ model.b, A=model.A, Q=model.Q, C=model.C, R=model.R, m0=model.m0 - model.b,
        P0=model.P0, B=model.G, u=u,
    )  # fmt: skip


@pytest.mark.parametrize("kw", [{}, {"learn_C": True, "full_cov": True}])
def test_log_prob_equals_change_of_variables_filter(kw):
    model = make_model(**kw)
    z, u, mask = inputs()
    expected = kalman_filter(**_textbook(model, z, u), mask=mask).log_likelihood
    torch.testing.assert_close(model.log_prob(z, u, mask), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.log_prob(z, u, mask, parallel=True), expected, rtol=1e-10, atol=1e-10)
    assert model.filter(z, u, mask).filtered.mean.shape == (3, 5, 3)


def test_stop_gradient_target_detaches_only_the_innovation_target():
    model = make_model()
    z, u, mask = inputs()
    z.requires_grad_()
    full = model.log_prob(z, u, mask)
    sg = model.log_prob(z, u, mask, stop_gradient_target=True)
    torch.testing.assert_close(sg, full)
    (g_sg,) = torch.autograd.grad(sg.sum(), z)
    (g_full,) = torch.autograd.grad(full.sum(), z)
    # reference: the same filter with a constant target equal to z
    target = z.detach().clone()
    (g_ref,) = torch.autograd.grad(model.log_prob(z, u, mask, target=target).sum(), z)
    torch.testing.assert_close(g_sg, g_ref)
    assert not torch.allclose(g_sg, g_full)
    assert g_sg[:, -1].abs().max() == 0  # the last latent is only ever a target
    assert g_sg[:, 0].abs().max() > 0  # earlier latents shape the filter history


@pytest.mark.parametrize("stop_gradient_target", [False, True])
def test_gradcheck_every_parameter_and_z(stop_gradient_target):
    model = make_model(learn_C=True, full_cov=True)
    with torch.no_grad():
        model.A_raw.mul_(1.3)  # make the spectral-bound rescaling active
    assert spectral_radius_upper_bound(model.A_raw.detach()) > model.spectral_bound
    z, u, mask = inputs(B=2, T=3)
    params = dict(model.named_parameters())
    assert set(params) == {"A_raw", "b", "G", "C_param", "Q_cov.log_diag", "Q_cov.lower", "R_cov.log_diag",
                           "R_cov.lower", "m0", "P0_cov.log_diag", "P0_cov.lower"}  # fmt: skip
    target = z.detach().clone() if stop_gradient_target else None

    def log_prob(z, *values):  # forward() is log_prob
        return functional_call(model, dict(zip(params, values)), (z, u, mask), {"target": target})

    leaves = [p.detach().clone().requires_grad_() for p in params.values()]
    assert torch.autograd.gradcheck(log_prob, (z.clone().requires_grad_(), *leaves), atol=1e-6, rtol=1e-5)


def test_step_T_times_equals_filter():
    model = make_model()
    z, u, mask = inputs(T=6)
    R = torch.rand(3, 6, 2, dtype=F64, generator=torch.Generator().manual_seed(3)) + 0.1
    res = model.filter(z, u, mask, R=R)
    belief = model.init_belief(3)
    for t in range(6):
        belief = model.step(belief, z[:, t], u[:, t], mask[:, t], R[:, t])
        torch.testing.assert_close(belief.mean, res.filtered.mean[:, t], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(belief.cov, res.filtered.cov[:, t], rtol=1e-12, atol=1e-12)
    predicted_only = model.step(belief, None, u[:, 0])
    torch.testing.assert_close(predicted_only, model.step(belief, torch.full_like(z[:, 0], float("nan")), u[:, 0]))


def test_rollout_equals_dense_k_step_prediction():
    model = make_model()
    belief = Gaussian(torch.randn(2, 3, dtype=F64), torch.eye(3, dtype=F64) * 0.5 + 0.1)
    H = 4
    actions = torch.randn(2, H, 1, dtype=F64)
    out = model.rollout(belief, actions)
    assert out.mean.shape == (2, H, 3) and out.cov.shape == (2, H, 3, 3)
    A, Q, b, G = (x.detach() for x in (model.A, model.Q, model.b, model.G))
    Apow = [torch.linalg.matrix_power(A, p) for p in range(H + 1)]
    for h in range(1, H + 1):
        # h_{t+h} - b = A^h (h_t - b) + sum_{j<h} A^{h-1-j} G a_j + noise
        mean = (belief.mean - b) @ Apow[h].mT + b + sum(actions[:, j] @ G.mT @ Apow[h - 1 - j].mT for j in range(h))
        cov = Apow[h] @ belief.cov @ Apow[h].mT + sum(Apow[j] @ Q @ Apow[j].mT for j in range(h))
        torch.testing.assert_close(out.mean[:, h - 1], mean, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.cov[:, h - 1], cov.expand(2, 3, 3), rtol=1e-10, atol=1e-10)
    uncontrolled = make_model(k=0).rollout(belief, 3)
    assert uncontrolled.mean.shape == (2, 3, 3)


def test_observe_and_noise_overrides():
    model = make_model()
    belief = model.rollout(model.init_belief(2), torch.zeros(2, 3, 1, dtype=F64))
    obs = model.predict_observation(belief)
    C, R = model.C.detach(), model.R.detach()
    torch.testing.assert_close(obs.mean, belief.mean @ C.mT)
    torch.testing.assert_close(obs.cov, C @ belief.cov @ C.mT + R)
    variances = torch.rand(2, 3, 2, dtype=F64) + 0.1
    torch.testing.assert_close(model.predict_observation(belief, variances).cov, C @ belief.cov @ C.mT + torch.diag_embed(variances))
    z, u, mask = inputs()
    var = torch.rand(3, 5, 2, dtype=F64) + 0.1
    torch.testing.assert_close(model.log_prob(z, u, mask, R=var), model.log_prob(z, u, mask, R=torch.diag_embed(var)))
    with pytest.raises(ValueError, match=r"\bR\b"):
        model.log_prob(z, u, mask, R=torch.eye(2, dtype=F64))
    with pytest.raises(ValueError, match=r"\bu\b"):
        model.log_prob(z, u[..., :0], mask)
    with pytest.raises(ValueError, match=r"\bz\b"):
        model.log_prob(z[..., :1], u, mask)


def test_precision_handling():
    model = make_model(dtype=torch.float32)
    z, u, mask = inputs(dtype=torch.float32)
    lp32 = model.log_prob(z, u, mask)
    assert lp32.dtype == torch.float32
    lp16 = model.log_prob(z.half(), u, mask)
    assert lp16.dtype == torch.float32
    torch.testing.assert_close(lp16, model.log_prob(z.half().float(), u, mask))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.log_prob(z, u, mask).dtype == torch.float32
    lp64 = model.to(F64).log_prob(z.double(), u.double(), mask)
    torch.testing.assert_close(lp64.float(), lp32, rtol=1e-5, atol=1e-4)


def test_cholesky_covariance():
    cov = CholeskyCovariance(3, init_std=2.0, full=True, min_std=0.1)
    torch.testing.assert_close(cov(), 4.0 * torch.eye(3))
    with torch.no_grad():
        cov.lower.normal_()
        cov.log_diag.fill_(-30.0)
    L = cov.factor()
    assert (L.diagonal() >= 0.1).all() and (L.triu(1) == 0).all()
    assert torch.linalg.eigvalsh(cov()).min() > 0
    with pytest.raises(ValueError):
        CholeskyCovariance(3, init_std=0.1, min_std=0.1)


@pytest.mark.slow
def test_learns_known_system():
    """Maximum likelihood on data from a known 1-D AR(1)-plus-noise system recovers its parameters."""
    torch.manual_seed(0)
    a, q, r, T = 0.8, 0.5, 0.3, 128
    h = torch.zeros(32)
    zs = []
    for _ in range(T):
        h = a * h + math.sqrt(q) * torch.randn(32)
        zs.append(h + math.sqrt(r) * torch.randn(32))
    z = torch.stack(zs, 1)[..., None].double()
    model = KalmanLatentModel(1, 1, min_noise_std=0.0).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        loss = -model.log_prob(z, parallel=True).mean() / T
        loss.backward()
        opt.step()
    assert model.A.item() == pytest.approx(a, abs=0.05)
    assert model.Q.item() == pytest.approx(q, abs=0.1)
    assert model.R.item() == pytest.approx(r, abs=0.1)
