"""Entropy estimators against closed-form entropies (Gaussian, uniform) and dense references."""

import math

import numpy as np
import pytest
import torch

from worldmodel.objective import entropy as E
from worldmodel.priors import plane

DTYPES = [torch.float32, torch.float64]


def gaussian_sample(n, dtype, seed=0):
    """x ~ N(0, L L^T) in 2-D and its true entropy 1/2 logdet(2 pi e Cov)."""
    g = torch.Generator().manual_seed(seed)
    L = torch.tensor([[1.0, 0.0], [0.6, 0.5]], dtype=torch.float64)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) @ L.T
    return x.to(dtype), 0.5 * math.log(np.linalg.det(2 * math.pi * math.e * (L @ L.T).numpy()))


def uniform_sample(n, dtype, seed=0):
    """x ~ U([0, 2]^2), true entropy log 4."""
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.rand(n, 2, generator=g, dtype=torch.float64)).to(dtype), math.log(4.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_logdet_converges_to_gaussian_entropy(dtype):
    g = torch.Generator().manual_seed(1)
    d = 4
    L = torch.randn(d, d, generator=g, dtype=torch.float64) / 2 + torch.eye(d, dtype=torch.float64)
    true = 0.5 * np.linalg.slogdet(2 * math.pi * math.e * (L @ L.T).numpy())[1]
    errors = []
    for n in (100, 20000):
        x = (torch.randn(n, d, generator=g, dtype=torch.float64) @ L.T).to(dtype)
        errors.append(abs(E.logdet(x, eps=0.0).item() - true))
    assert errors[1] < errors[0] and errors[1] < 0.03  # stated tolerance at N = 20000 (sampling sd ~ sqrt(d/2N) = 0.01)
    # plug-in formula against a dense float64 numpy reference at small N, eps included
    x = torch.randn(50, d, generator=g, dtype=torch.float64).to(dtype)
    cov = np.cov(x.double().numpy(), rowvar=False) + 1e-3 * np.eye(d)
    ref = 0.5 * np.linalg.slogdet(cov)[1] + 0.5 * d * math.log(2 * math.pi * math.e)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert E.logdet(x, eps=1e-3).item() == pytest.approx(ref, abs=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sample", [gaussian_sample, uniform_sample])
def test_knn_converges_to_true_entropy(dtype, sample):
    x, true = sample(2000, dtype)
    assert abs(E.knn(x, k=3).item() - true) < 0.06  # stated tolerance at N = 2000, d = 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sample, bandwidth, tol", [(gaussian_sample, 0.15, 0.06), (uniform_sample, 0.06, 0.1)])
def test_kde_converges_to_true_entropy(dtype, sample, bandwidth, tol):
    # Gaussian kernel = the plane model's kernel; leave-one-out resubstitution estimate.
    # Uniform: the bias is O(bandwidth) from the boundary, so the tolerance is wider.
    small, true = sample(200, dtype)
    x, _ = sample(2000, dtype, seed=1)
    err_small = abs(E.kde(plane(sigma=bandwidth).log_kernel(small, small), exclude_self=True).item() - true)
    err = abs(E.kde(plane(sigma=bandwidth).log_kernel(x, x), exclude_self=True).item() - true)
    assert err < tol
    assert err < err_small


def test_kde_matches_dense_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    h = 0.7
    diff = x[:, None] - x[None]
    k = torch.exp(-(diff**2).sum(-1) / (2 * h * h)) / (2 * math.pi * h * h) ** 1.5
    k.fill_diagonal_(0)
    ref = -torch.log(k.sum(1) / 29).mean()
    assert E.kde(plane(sigma=h).log_kernel(x, x), exclude_self=True).item() == pytest.approx(ref.item(), rel=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_knn_matches_dense_reference_and_clip(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    dist = torch.cdist(x, x) + torch.diag(torch.full((40,), math.inf, dtype=torch.float64))
    eps = dist.sort(dim=1).values[:, 2]  # 3rd neighbour
    digamma = torch.special.digamma(torch.tensor([40.0, 3.0], dtype=torch.float64))
    const = float(digamma[0] - digamma[1])
    ref = const + 1.5 * math.log(math.pi) - math.lgamma(2.5) + 3 * eps.log().mean().item()
    xt = x.to(dtype).requires_grad_()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert E.knn(xt, k=3).item() == pytest.approx(ref, abs=tol)
    log_eps = eps.log()
    clipped_ref = ref - 3 * log_eps.mean().item() + 3 * log_eps.clamp_max(torch.quantile(log_eps, 0.9)).mean().item()
    clipped = E.knn(xt, k=3, clip_quantile=0.9)
    assert clipped.item() == pytest.approx(clipped_ref, abs=tol) and clipped.item() < ref - 1e-3
    clipped.backward()
    assert torch.isfinite(xt.grad).all()


def test_jacobian_is_entropy_change_of_linear_map():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(5000, 3, generator=g, dtype=torch.float64)
    assert E.jacobian(W).item() == pytest.approx(np.log(abs(np.linalg.det(W.numpy()))), rel=1e-10)
    change = E.logdet(x @ W.T, eps=0.0) - E.logdet(x, eps=0.0)
    assert change.item() == pytest.approx(E.jacobian(W).item(), abs=1e-8)


def test_plugin_detaches_target():
    z = torch.randn(4, 2, 3, requires_grad=True)
    target = torch.randn(4, 2, 3, requires_grad=True)
    assert not E.plugin(z).requires_grad and torch.equal(E.plugin(z), z)
    assert torch.equal(E.plugin(z, target), target) and not E.plugin(z, target).requires_grad


def test_bad_input_raises():
    with pytest.raises(ValueError, match="logdet"):
        E.logdet(torch.randn(5))
    with pytest.raises(ValueError, match="at least 4"):
        E.knn(torch.randn(3, 2), k=3)
    with pytest.raises(ValueError, match="square"):
        E.kde(torch.randn(3, 4), exclude_self=True)
    with pytest.raises(ValueError, match="square"):
        E.jacobian(torch.randn(3, 2))


@pytest.mark.parametrize("estimator", [E.logdet, E.knn, lambda x: E.knn(x, clip_quantile=0.9)])
def test_leading_dims_are_independent_sample_sets(estimator):
    x = torch.randn(3, 20, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(estimator(x), torch.stack([estimator(s) for s in x]))


# -- sigreg (LeWorldModel's Gaussianity regulariser) ----------------------------------------------
def directions_of(seed, d, m, dtype):
    """The unit directions sigreg draws first from a generator seeded `seed`: normalised N(0, 1) columns."""
    a = torch.randn(d, m, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return a / a.norm(dim=0)


def sigreg_reference(x, directions, knots=17):
    """Maes et al. 2026 (arXiv 2603.19312), Epps & Pulley 1983, in float64 loops: for every direction a_m, the
    trapezoid rule on the symmetric grid of 2K - 1 knots over [-3, 3] of N |phi_N(t) - exp(-t^2/2)|^2 exp(-t^2/2),
    phi_N(t) = mean_i exp(i t x_i . a_m); the mean over the directions."""
    x, a = np.asarray(x, dtype=np.float64), np.asarray(directions, dtype=np.float64)
    n = x.shape[0]
    grid = np.linspace(-3.0, 3.0, 2 * knots - 1)
    dt = grid[1] - grid[0]
    total = 0.0
    for m in range(a.shape[1]):
        h = x @ a[:, m]
        for j, t in enumerate(grid):
            ecf = np.mean(np.exp(1j * t * h))
            weight = dt / 2 if j in (0, len(grid) - 1) else dt
            total += weight * n * abs(ecf - math.exp(-t * t / 2)) ** 2 * math.exp(-t * t / 2)
    return total / a.shape[1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("knots", [17, 5])
def test_sigreg_matches_the_papers_formula(dtype, knots):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(50, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.5, 2.0]) + 0.3).to(dtype)
    value = E.sigreg(x, num_projections=7, knots=knots, generator=torch.Generator().manual_seed(5))
    ref = sigreg_reference(x, directions_of(5, 3, 7, dtype), knots)
    assert value.dtype == dtype and value.shape == ()
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    assert value.item() == pytest.approx(ref, rel=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigreg_is_small_for_gaussians_and_large_otherwise(dtype):
    # under N(0, I) the expectation is sum_k w_k (1 - exp(-t_k^2)) exp(-t_k^2/2) = 1.052 at every N (an O(1)
    # test statistic); any other law grows like N
    t = np.linspace(0, 3, 17)
    w = np.full(17, 3 / 8)
    w[[0, -1]] = 3 / 16
    null_mean = float((w * (1 - np.exp(-t**2)) * np.exp(-t**2 / 2)).sum())
    g = torch.Generator().manual_seed(0)
    n, d = 3000, 4

    def value(x):
        return E.sigreg(x.to(dtype), num_projections=64, generator=torch.Generator().manual_seed(1)).item()

    gaussian = [value(torch.randn(n, d, generator=g, dtype=torch.float64)) for _ in range(5)]
    assert np.mean(gaussian) == pytest.approx(null_mean, abs=0.3) and max(gaussian) < 2.5
    signs = torch.randint(0, 2, (n, d), generator=g, dtype=torch.float64) * 2 - 1
    others = {
        "collapsed": torch.full((n, d), 0.5, dtype=torch.float64) + 1e-3 * torch.randn(n, d, generator=g),
        "uniform (unit variance)": (torch.rand(n, d, generator=g, dtype=torch.float64) - 0.5) * 12**0.5,
        "bimodal": signs + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64),
        "scaled Gaussian": 3 * torch.randn(n, d, generator=g, dtype=torch.float64),
    }
    for name, x in others.items():
        assert value(x) > 5 * null_mean, name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start", ["uniform", "bimodal"])
def test_sigreg_gradient_pushes_a_batch_toward_gaussian(dtype, start):
    g = torch.Generator().manual_seed(0)
    n, d = 256, 2
    if start == "uniform":
        x = (torch.rand(n, d, generator=g, dtype=dtype) - 0.5) * 12**0.5
    else:
        signs = (torch.randint(0, 2, (n, d), generator=g) * 2 - 1).to(dtype)
        x = signs + 0.2 * torch.randn(n, d, generator=g, dtype=dtype)
    x.requires_grad_()

    def evaluate():  # fixed evaluation directions
        return E.sigreg(x.detach(), num_projections=128, generator=torch.Generator().manual_seed(9)).item()

    before = evaluate()
    draws = torch.Generator().manual_seed(3)  # fresh directions every step, as in training
    opt = torch.optim.Adam([x], lr=0.03)
    for _ in range(40):
        opt.zero_grad()
        E.sigreg(x, num_projections=32, generator=draws).backward()
        opt.step()
    after = evaluate()
    assert after < 0.2 * before and after < 5.0, (before, after)


def test_sigreg_redraws_directions_per_call_and_shares_them_over_leading_dims():
    x = torch.randn(3, 40, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    first, second = E.sigreg(x[0], 16, generator=g), E.sigreg(x[0], 16, generator=g)
    assert first.item() != second.item()  # a new draw on every call
    batched = E.sigreg(x, 16, generator=torch.Generator().manual_seed(4))
    each = torch.stack([E.sigreg(s, 16, generator=torch.Generator().manual_seed(4)) for s in x])
    torch.testing.assert_close(batched, each)
    assert batched[0].item() == first.item()
    with pytest.raises(ValueError, match="num_projections"):
        E.sigreg(x[0], num_projections=0)
    with pytest.raises(ValueError, match="sigreg"):
        E.sigreg(torch.randn(4))
