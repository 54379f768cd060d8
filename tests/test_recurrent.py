"""The recurrent prior (`worldmodel.priors.RecurrentPrior`, preset `predictive_knn`): its log-likelihood against a
float64 Gaussian computed by hand from torch's own fused nn.LSTM, masks (missing latents replaced by the prediction,
not scored), the sigma options, and a few training steps of `train.py --env dot_swirl --method predictive_knn`."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from worldmodel.methods import make
from worldmodel.priors import RecurrentPrior, build_prior

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float64]


def tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-11, "atol": 1e-11}


def random_prior(dim=3, hidden=5, dtype=torch.float64, seed=0):
    """A prior with a random (non-zero) head and sigma, so that every part of the mean shows in the likelihood."""
    torch.manual_seed(seed)
    prior = RecurrentPrior(dim, hidden=hidden).to(dtype)
    with torch.no_grad():
        prior.head.weight.normal_()
        prior.head.bias.normal_()
        prior.log_sigma.fill_(math.log(0.7))
    return prior


def reference_lstm(prior: RecurrentPrior) -> nn.LSTM:
    """torch's fused nn.LSTM (float64) with the prior's cell weights: an implementation independent of LSTMCell."""
    cell = prior.cell
    lstm = nn.LSTM(cell.input_size, cell.hidden_size, batch_first=True).double()
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(lstm, f"{name}_l0").copy_(getattr(cell, name))
    return lstm


def gaussian_log_density(x, mean, std):
    """log N(x; mean, std^2 I) over the last axis, written out (float64)."""
    d = x.shape[-1]
    return -0.5 * ((x - mean) / std).pow(2).sum(-1) - d * math.log(std) - 0.5 * d * math.log(2 * math.pi)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_likelihood_is_the_gaussian_of_the_lstm_prediction(dtype):
    prior = random_prior(dtype=dtype)
    z = torch.randn(4, 6, 3, dtype=torch.float64)
    lstm, head = reference_lstm(prior), prior.head
    outputs, _ = lstm(z[:, :-1])  # o_{t-1} after reading z_1..z_{t-1}
    mean = z[:, :-1] + outputs @ head.weight.double().T + head.bias.double()
    expected = gaussian_log_density(z[:, 1:], mean, 0.7)  # (B, T - 1): steps 2..T
    log_prob = prior.log_prob(z.to(dtype))
    assert log_prob.dtype == dtype
    torch.testing.assert_close(log_prob[:, 1:].double(), expected, **tol(dtype))
    assert bool((log_prob[:, 0] == 0).all())  # the first latent's marginal is flat: not scored
    torch.testing.assert_close(prior.alignment(z.to(dtype)).double(), expected.mean(), **tol(dtype))
    # the objective: alignment per latent dimension; F_MI with the kNN entropy of every step's latents
    loss = make("predictive_knn", 3, hidden=5).to(dtype)
    loss.prior.load_state_dict(prior.state_dict())
    out = loss(z.to(dtype))
    torch.testing.assert_close(out.alignment.double(), expected.mean() / 3, **tol(dtype))
    assert loss.mi and loss.entropy == "knn" and loss.entropy_kwargs == {"k": 3, "clip_quantile": 0.9}


@pytest.mark.parametrize("dtype", DTYPES)
def test_missing_latents_are_replaced_by_the_prediction_and_not_scored(dtype):
    prior = random_prior(dtype=dtype)
    z = torch.randn(3, 7, 3, dtype=torch.float64)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 2] = mask[0, 3] = False  # a gap
    mask[1, 0] = False  # the first frame dropped: the first observed one (t = 1) is not scored
    mask[2, 6] = False  # the last one dropped
    # reference: the fused LSTM stepped one latent at a time, fed its own prediction where a latent is missing
    lstm, w, c = reference_lstm(prior), prior.head.weight.double(), prior.head.bias.double()
    expected = torch.zeros(3, 7, dtype=torch.float64)
    for b in range(3):
        state, previous, seen = None, torch.zeros(3, dtype=torch.float64), False
        for t in range(7):
            hidden = torch.zeros(5, dtype=torch.float64) if state is None else state[0][0, 0]
            mean = previous + hidden @ w.T + c
            x = z[b, t] if mask[b, t] else mean
            if mask[b, t] and seen:
                expected[b, t] = gaussian_log_density(z[b, t], mean, 0.7)
            seen = seen or bool(mask[b, t])
            _, state = lstm(x[None, None], state)
            previous = x
    log_prob = prior.log_prob(z.to(dtype), mask)
    torch.testing.assert_close(log_prob.double(), expected, **tol(dtype))
    scored = RecurrentPrior.scored(z, mask)
    assert scored.sum() == 3 * 6 - 2 - 1 - 1
    assert not scored[1, 1] and scored[1, 2] and not scored[0, 2]
    torch.testing.assert_close(prior.alignment(z.to(dtype), mask=mask).double(), expected.sum() / scored.sum(),
                               **tol(dtype))
    # what stands at a missing step changes nothing (NaN included, as the objective zeroes them first)
    other = z.clone()
    other[~mask] = 1e3
    torch.testing.assert_close(prior.log_prob(other.to(dtype), mask), log_prob, rtol=0, atol=0)
    # an all-True mask is no mask
    torch.testing.assert_close(prior.log_prob(z.to(dtype), torch.ones(3, 7, dtype=torch.bool)),
                               prior.log_prob(z.to(dtype)), rtol=0, atol=0)


def test_masked_training_step_through_the_objective_is_finite():
    loss = make("predictive_knn", 4)
    z = torch.randn(8, 10, 4, requires_grad=True)
    mask = torch.rand(8, 10, generator=torch.Generator().manual_seed(0)) > 0.3
    out = loss(torch.where(mask[..., None], z, torch.full_like(z, float("nan"))), mask=mask)
    out.loss.backward()
    assert torch.isfinite(out.loss) and bool(torch.isfinite(z.grad).all())


def test_sigma_learned_by_default_or_fixed_and_options():
    learned = make("predictive_knn", 4)
    assert learned.prior.log_sigma.requires_grad and float(learned.prior.log_sigma.detach()) == 0.0
    z = torch.randn(6, 5, 4)
    learned(z).loss.backward()
    assert learned.prior.log_sigma.grad is not None and learned.prior.log_sigma.grad != 0
    fixed = make("predictive_knn", 4, sigma=0.5, hidden=8, lr_multiplier=10.0)
    assert not fixed.prior.log_sigma.requires_grad and float(fixed.prior.log_sigma.exp()) == pytest.approx(0.5)
    assert fixed.prior.cell.hidden_size == 8
    groups = fixed.param_groups(1e-3)
    assert [g["lr"] for g in groups] == [pytest.approx(1e-2)]
    assert all(p.requires_grad for g in groups for p in g["params"])
    # untrained: the plane prior z_t ~ N(z_{t-1}, sigma^2 I)
    torch.testing.assert_close(learned.prior.predict(z)[:, 1:], z[:, :-1])
    for bad in ({"sigma": 0.0}, {"hidden": 0}, {"lr_multiplier": -1.0}):
        with pytest.raises(ValueError):
            build_prior("recurrent", 4, **bad)


@pytest.mark.slow
def test_train_py_runs_predictive_knn_on_dot_swirl(tmp_path):
    sys.path.insert(0, str(ROOT))
    import train

    run = train.main(["--env", "dot_swirl", "--method", "predictive_knn", "--data", str(tmp_path / "swirl.zarr"),
                      "--out-dir", str(tmp_path / "runs"), "--name", "pknn", "--train-episodes", "6",
                      "--val-episodes", "3", "--episode-length", "24", "--window", "12", "--batch-size", "6",
                      "--steps", "4", "--warmup", "1", "--log-every", "1", "--no-progress", "--no-plots",
                      "--eval.baselines"])
    from worldmodel.training import read_metrics

    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    final = records[-1]
    assert final["kind"] == "eval" and len(final["r2"]["predictive_knn"]) == 2
