"""bench/identify.py's generator is what it says: the latent system has the requested eigenvalues and unit stationary
variance, and the MLP mixing is invertible (its inverse recovers the sources; its Jacobian has full rank)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from identify import latent_system, make_task, random_mixing, simulate  # noqa: E402


@pytest.mark.parametrize("n", range(2, 9))
def test_latent_system_has_the_requested_eigenvalues_and_mixed_time_scales(n):
    A, noise_std, eigenvalues = latent_system(n)
    assert A.shape == (n, n) and len(eigenvalues) == n
    computed = torch.linalg.eigvals(A)
    key = lambda z: (round(z.real.item(), 9), round(z.imag.item(), 9))  # noqa: E731
    for got, want in zip(sorted(computed, key=key), sorted(eigenvalues, key=key)):
        assert abs(got - want) < 1e-12
    rotations = int((eigenvalues.imag > 0).sum())
    assert rotations == max(1, round(n / 3)) and int((eigenvalues.imag == 0).sum()) == n - 2 * rotations
    assert float(eigenvalues.abs().max()) < 1  # stable
    if rotations > 1:  # rotations at different frequencies
        angles = eigenvalues[eigenvalues.imag > 0].angle()
        assert float(angles.max() / angles.min()) == pytest.approx(8.0)
    # the noise keeps every source at unit stationary variance: Sigma = A Sigma A^T + diag(q) holds for Sigma = I
    torch.testing.assert_close(A @ A.T + torch.diag(noise_std**2), torch.eye(n, dtype=A.dtype))


def test_simulated_sources_are_stationary_with_unit_variance():
    A, noise_std, _ = latent_system(3)
    s = simulate(A, noise_std, 4000, 30, torch.Generator().manual_seed(0))
    var = s.var(dim=0)  # (T, n) across sequences
    assert float((var - 1).abs().max()) < 0.1
    lag1 = (s[:, 1:] * s[:, :-1]).mean((0, 1))
    torch.testing.assert_close(lag1, torch.diagonal(A), atol=0.06, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [2, 5, 8])
def test_mlp_mixing_is_invertible(n, dtype):
    gen = torch.Generator().manual_seed(n)
    mixing = random_mixing(n, 40, layers=3, gen=gen, dtype=dtype)
    for w in mixing.weights:
        s = torch.linalg.svdvals(w)
        assert 0.5 - 1e-6 <= float(s.min()) and float(s.max()) <= 2 + 1e-6  # square, condition number <= 4
    assert int(torch.linalg.matrix_rank(mixing.readout)) == n
    s = 2 * torch.randn(500, n, generator=gen, dtype=dtype)
    x = mixing(s)
    assert x.shape == (500, 40) and x.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(mixing.inverse(x), s, atol=tol, rtol=tol)
    # nonlinear: the mixing is not affine in the sources
    affine = torch.linalg.lstsq(torch.cat([s, torch.ones(500, 1, dtype=dtype)], 1), x).solution
    residual = x - torch.cat([s, torch.ones(500, 1, dtype=dtype)], 1) @ affine
    assert float(residual.pow(2).sum() / (x - x.mean(0)).pow(2).sum()) > 0.01
    # a full-rank Jacobian everywhere sampled (leaky ReLU: no flat pieces)
    jac = torch.autograd.functional.jacobian(lambda v: mixing(v), s[0])
    assert int(torch.linalg.matrix_rank(jac)) == n


def test_make_task_shapes_and_seeding():
    task = make_task(3, seed=1, train_seqs=5, test_seqs=2, length=7)
    assert task["s_train"].shape == (5, 7, 3) and task["x_train"].shape == (5, 7, 40)
    assert task["x_test"].dtype == torch.float32 and task["s_test"].shape == (2, 7, 3)
    again = make_task(3, seed=1, train_seqs=5, test_seqs=2, length=7)
    assert torch.equal(task["x_train"], again["x_train"])
    assert not torch.equal(task["x_train"], make_task(3, seed=2, train_seqs=5, test_seqs=2, length=7)["x_train"])
    assert math.isfinite(float(task["x_train"].abs().max()))


def test_the_suite_trains_and_scores_with_twice_as_many_latents_as_sources(tmp_path, single_thread):
    from identify import main

    (record,) = main(["--latents", "2", "--steps", "2", "--out", str(tmp_path / "r.jsonl")])
    assert record["latent_dim"] == 4 and len(record["r2"]) == len(record["r2_z"]) == 2
    assert all(math.isfinite(v) for v in [*record["r2"], *record["r2_z"], record["mcc"]])
    assert (tmp_path / "r.jsonl").read_text().count("\n") == 1
