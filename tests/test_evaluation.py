"""Tests for worldmodel.evaluation against known ground truth."""

import itertools
import math

import numpy as np
import pytest
import torch

from worldmodel.evaluation import (
    fit_readout,
    knn_accuracy,
    linear_probe_accuracy,
    linear_r2,
    mcc,
    optimal_assignment,
    predictive_metrics,
    r2_score,
)
from worldmodel.kalman import kalman_filter
from worldmodel.priors import KalmanLatentModel

DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_r2_exact_affine_map_is_one(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 30, 5, generator=g, dtype=dtype)  # (episodes, steps, features)
    w, c = torch.randn(5, 3, generator=g, dtype=dtype), torch.randn(3, generator=g, dtype=dtype)
    y = x @ w + c
    r2 = linear_r2(x[:15], y[:15], x[15:], y[15:])
    assert r2.shape == (3,)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(r2, torch.ones(3, dtype=torch.float64), atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_r2_known_fraction_and_independent_noise(dtype):
    g = torch.Generator().manual_seed(1)
    n = 40_000
    x = torch.randn(n, 4, generator=g, dtype=dtype)
    noise = torch.randn(n, generator=g, dtype=dtype)
    # y0 = 2 x0 + noise: R^2 = 4 / 5; y1 is independent of x: R^2 ~ 0 (slightly negative out of sample)
    y = torch.stack([2 * x[:, 0] + noise, torch.randn(n, generator=g, dtype=dtype)], -1)
    r2 = linear_r2(x[: n // 2], y[: n // 2], x[n // 2:], y[n // 2:])
    assert abs(r2[0] - 0.8) < 0.01
    assert abs(r2[1]) < 0.005


def test_linear_r2_ridge_and_nan_rows():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 3.0
    x_nan = x.clone()
    x_nan[:10] = float("nan")  # dropped frames: ignored
    assert torch.allclose(linear_r2(x_nan[:400], y[:400], x_nan[400:], y[400:]), torch.ones(1, dtype=torch.float64))
    # a huge ridge penalty shrinks the readout to the training mean: R^2 ~ 0
    assert linear_r2(x[:400], y[:400], x[400:], y[400:], ridge=1e8)[0] < 0.01


def test_r2_score_matches_numpy_formula():
    rng = np.random.default_rng(3)
    y, p = rng.normal(size=(100, 2)), rng.normal(size=(100, 2))
    ref = 1 - ((p - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    assert np.allclose(r2_score(p, y).numpy(), ref)


@pytest.mark.parametrize("shape", [(6, 6), (4, 7), (1, 3)])
def test_optimal_assignment_matches_brute_force(shape):
    rng = np.random.default_rng(4)
    for _ in range(5):
        score = rng.normal(size=shape)
        cols = optimal_assignment(score)
        assert len(set(cols)) == shape[0]
        perms = itertools.permutations(range(shape[1]), shape[0])
        best = max(sum(score[i, p[i]] for i in range(shape[0])) for p in perms)
        assert math.isclose(sum(score[i, c] for i, c in enumerate(cols)), best, rel_tol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mcc_permuted_scaled_sources_is_one_and_noise_is_zero(dtype):
    g = torch.Generator().manual_seed(5)
    sources = torch.rand(5000, 4, generator=g, dtype=dtype) - 0.5
    perm = torch.tensor([2, 0, 3, 1])
    scale = torch.tensor([3.0, -0.5, 2.0, -7.0], dtype=dtype)
    latents = torch.cat([sources[:, perm] * scale + 1.0, torch.randn(5000, 2, generator=g, dtype=dtype)], 1)
    value, cols = mcc(latents, sources, return_assignment=True)
    assert value == pytest.approx(1.0, abs=1e-5)
    assert [int(perm[c]) for c in cols] == [0, 1, 2, 3]  # latent cols[i] holds source i
    assert mcc(torch.randn(5000, 4, generator=g, dtype=dtype), sources) < 0.05


def _lgssm(seed=0, action_dim=1):
    torch.manual_seed(seed)
    model = KalmanLatentModel(obs_dim=2, state_dim=4, action_dim=action_dim).double()
    with torch.no_grad():
        model.G.copy_(torch.randn(4, action_dim, dtype=torch.float64) * 0.5)
        model.b.copy_(torch.randn(4, dtype=torch.float64) * 0.3)
    return model


def _sample(model, actions, g):
    """z (B, T, L) from the model itself; actions[:, t] is taken after z_t (stored convention)."""
    b, t_len, _ = actions.shape
    A, Q, C, R = model.A, model.Q, model.C, model.R
    eye = torch.eye(model.state_dim, dtype=A.dtype)
    h = model.m0 + torch.randn(b, model.state_dim, generator=g, dtype=A.dtype) @ torch.linalg.cholesky(model.P0).T
    zs = []
    for t in range(t_len):
        if t > 0:
            h = h @ A.T + (eye - A) @ model.b + actions[:, t - 1] @ model.G.T \
                + torch.randn(b, model.state_dim, generator=g, dtype=A.dtype) @ torch.linalg.cholesky(Q).T
        zs.append(h @ C.T + torch.randn(b, model.obs_dim, generator=g, dtype=A.dtype) @ torch.linalg.cholesky(R).T)
    return torch.stack(zs, 1)


@torch.no_grad()
def test_predictive_metrics_correctly_specified_model_is_calibrated():
    g = torch.Generator().manual_seed(6)
    model = _lgssm()
    actions = torch.randn(64, 60, 1, generator=g, dtype=torch.float64)
    z = _sample(model, actions, g)
    out = predictive_metrics(model, z, actions, horizon=10, burn_in=5)
    assert out["k"] == list(range(1, 11))
    for c1, c2 in zip(out["coverage_1sigma"], out["coverage_2sigma"]):
        assert abs(c1 - 0.6827) < 0.03 and abs(c2 - 0.9545) < 0.015
    # k = 1 is the filter's own one-step predictive: same NLL as its per-step log-likelihood
    u = torch.cat([torch.zeros_like(actions[:, :1]), actions[:, :-1]], 1)
    step_ll = model.filter(z, u).step_log_likelihood[:, 6:]
    assert out["nll"][0] == pytest.approx(float(-step_ll.mean() / 2), rel=1e-9)
    # misaligned actions (not shifted) make the 1-step prediction worse
    worse = predictive_metrics(model, z, torch.cat([actions[:, 1:], actions[:, -1:]], 1), horizon=1)
    assert worse["nll"][0] > out["nll"][0] + 0.05


@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_predictive_metrics_dense_reference_and_dtypes(dtype):
    """k-step NLL against a dense computation: N(C A^k m + ..., C P_k C^T + R) from the filter output."""
    g = torch.Generator().manual_seed(7)
    model = _lgssm(action_dim=0)
    z = _sample(model, torch.zeros(3, 20, 0, dtype=torch.float64), g)
    model = model.to(dtype)
    out = predictive_metrics(model, z.to(dtype), None, horizon=3, burn_in=4)
    A, Q, C, R = (x.double() for x in (model.A, model.Q, model.C, model.R))
    res = kalman_filter(z, A, Q, C, R, model.m0.double(), model.P0.double(),
                        B=((torch.eye(4, dtype=torch.float64) - A) @ model.b.double())[:, None],
                        u=torch.ones(3, 20, 1, dtype=torch.float64))
    k, nlls = 3, []
    for t in range(4, 20 - k):
        m, P = res.filtered.mean[:, t], res.filtered.cov[:, t]
        for _ in range(k):
            m = m @ A.T + (torch.eye(4, dtype=torch.float64) - A) @ model.b.double()
            P = A @ P @ A.T + Q
        dist = torch.distributions.MultivariateNormal(m @ C.T, C @ P @ C.T + R)
        nlls.append(-dist.log_prob(z[:, t + k]))
    ref = float(torch.cat(nlls).mean() / 2)
    assert out["nll"][k - 1] == pytest.approx(ref, rel=1e-4 if dtype == torch.float32 else 1e-9)


def test_predictive_metrics_missing_targets_are_skipped():
    g = torch.Generator().manual_seed(8)
    model = _lgssm(action_dim=0)
    z = _sample(model, torch.zeros(4, 30, 0, dtype=torch.float64), g)
    z[:, 10:15] = float("nan")
    out = predictive_metrics(model, z, None, horizon=5)
    assert all(math.isfinite(v) for v in out["nll"] + out["coverage_2sigma"])


def test_linear_probe_accuracy_separable_and_random_labels():
    g = torch.Generator().manual_seed(9)
    centres = torch.randn(4, 8, generator=g) * 4
    labels = torch.randint(0, 4, (800,), generator=g)
    feats = centres[labels] + torch.randn(800, 8, generator=g)
    assert linear_probe_accuracy(feats[:600], labels[:600], feats[600:], labels[600:]) > 0.97
    random_labels = torch.randint(0, 4, (800,), generator=g)
    acc = linear_probe_accuracy(feats[:600], random_labels[:600], feats[600:], random_labels[600:])
    assert acc < 0.4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fit_readout_recovers_an_exact_affine_map(dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 50, 4, generator=gen, dtype=dtype)
    w_true, c_true = torch.randn(4, 3, generator=gen, dtype=dtype), torch.randn(3, generator=gen, dtype=dtype)
    y = x @ w_true + c_true
    y[0, 5] = float("nan")  # a row with NaN is dropped, not propagated
    w, c = fit_readout(x, y)
    torch.testing.assert_close(w, w_true.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(c, c_true.double(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_accuracy_matches_a_brute_force_vote(dtype):
    """Against a per-row loop: cosine similarities, the k best, votes exp(sim / T) summed per class."""
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    ytr, yte = torch.randint(0, 4, (120,), generator=gen), torch.randint(0, 4, (50,), generator=gen)
    xtr = (centers[ytr] + 1.5 * torch.randn(120, 6, generator=gen, dtype=torch.float64)).to(dtype)
    xte = (centers[yte] + 1.5 * torch.randn(50, 6, generator=gen, dtype=torch.float64)).to(dtype)
    k, temperature = 7, 0.1
    correct = 0
    for x, y in zip(xte.double(), yte):
        sims = [float(x @ t / (x.norm() * t.norm())) for t in xtr.double()]
        best = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        votes = [sum(math.exp(sims[j] / temperature) for j in best if ytr[j] == c) for c in range(4)]
        correct += int(max(range(4), key=lambda c: votes[c]) == int(y))
    assert knn_accuracy(xtr, ytr, xte, yte, k=k, temperature=temperature, chunk=16) == correct / 50
    assert 0.4 < correct / 50 < 1.0  # the classes overlap: not a trivial case
    assert knn_accuracy(xtr, ytr, xtr, ytr, k=1) == 1.0  # every training row is its own nearest neighbour
    with pytest.raises(ValueError, match="k >= 1"):
        knn_accuracy(xtr, ytr, xte, yte, k=0)
