"""Recalibrated k-step prediction bands (worldmodel.calibration) against known error distributions."""

import math

import pytest
import torch

from worldmodel.calibration import SIGMA_GRID, PredictiveCalibration
from worldmodel.evaluation import predictive_metrics
from worldmodel.model import ModelConfig, WorldModel
from worldmodel.priors import KalmanLatentModel

DTYPES = [torch.float32, torch.float64]


def _nominal(c: float) -> float:
    return math.erf(c / math.sqrt(2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fit_recovers_the_scale_of_scaled_gaussian_errors(dtype):
    """Errors N(0, s_k^2) per horizon k: the factor is s_k at every band width (|r| quantile = s_k c exactly)."""
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.5, 1.0, 2.0], dtype=dtype)
    errors = torch.randn(200_000, 3, 2, generator=g, dtype=dtype) * scales[:, None]
    cal = PredictiveCalibration().fit(errors, torch.ones(200_000, 3, dtype=torch.bool))
    assert cal.horizon == 3 and cal.factors.shape == (3, 2, len(SIGMA_GRID))
    for c in (0.5, 1.0, 2.0, 3.0):
        assert torch.allclose(cal.half_widths(c) / c, scales[:, None].expand(3, 2).float(), rtol=0.02)


def test_calibrated_band_covers_its_nominal_share_of_new_heavy_tailed_errors():
    """Laplace errors of unit variance: the Gaussian bands miss their nominal share by more than 5 points at
    1 sigma; bands fitted on one sample cover it within a point on another and equal the Laplace quantiles."""
    torch.manual_seed(1)
    t = torch.distributions.Laplace(0.0, 1 / math.sqrt(2))
    fit_errors, new_errors = (t.sample((100_000, 1, 4)) for _ in range(2))
    cal = PredictiveCalibration().fit(fit_errors, torch.ones(100_000, 1, dtype=torch.bool))
    for c in (1.0, 1.5, 2.0):
        gaussian = float((new_errors.abs() <= c).double().mean())
        calibrated = float((new_errors.abs() <= cal.half_widths(c)).double().mean())
        assert abs(gaussian - _nominal(c)) > (0.05 if c == 1.0 else 0.005)
        assert calibrated == pytest.approx(_nominal(c), abs=0.01)
        exact = float(t.icdf(torch.tensor(0.5 + _nominal(c) / 2)))  # the Laplace's own central quantile
        assert float(cal.half_widths(c).mean()) == pytest.approx(exact, rel=0.03)


def test_invalid_errors_are_ignored_and_empty_horizons_dropped():
    errors = torch.randn(1000, 4, 2, generator=torch.Generator().manual_seed(2))
    valid = torch.ones(1000, 4, dtype=torch.bool)
    valid[:, 3] = False
    valid[:500, 1] = False
    errors[:500, 1] = 1e6  # invalid: must not count
    cal = PredictiveCalibration().fit(errors, valid)
    assert cal.horizon == 3
    assert float(cal.half_widths(2.0)[1].max()) < 3.0
    with pytest.raises(ValueError, match="no valid"):
        PredictiveCalibration().fit(errors, torch.zeros(1000, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="do not match"):
        PredictiveCalibration().fit(errors, valid[:, :2])
    nonfinite = errors.clone()
    nonfinite[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        PredictiveCalibration().fit(nonfinite, valid)


def test_half_widths_interpolate_clamp_and_extend():
    cal = PredictiveCalibration()
    assert torch.equal(cal.half_widths(2.0, 3), torch.full((3, 1), 2.0))  # unfitted: the Gaussian band
    grid = torch.tensor(SIGMA_GRID)
    cal.factors = torch.stack([1 + grid, 2 + grid])[:, None, :]  # (H=2, L=1, C): factor linear in c
    assert float(cal.half_widths(1.025)[0, 0]) == pytest.approx(1.025 * 2.025, rel=1e-6)  # between grid points
    assert float(cal.half_widths(6.0)[0, 0]) == pytest.approx(6.0 * 5.0, rel=1e-6)  # past the grid: its last factor
    assert float(cal.half_widths(0.01)[1, 0]) == pytest.approx(0.01 * 2.05, rel=1e-6)  # below: its first
    extended = cal.half_widths(1.0, 4)
    assert extended.shape == (4, 1) and torch.equal(extended[3], extended[1])  # past the fitted horizon: the last
    with pytest.raises(ValueError, match="sigmas"):
        cal.half_widths(0.0)


def _lgssm() -> KalmanLatentModel:
    torch.manual_seed(0)
    return KalmanLatentModel(obs_dim=2, state_dim=4, action_dim=0).double()


def _sample_mixed_noise(model: KalmanLatentModel, batch: int, steps: int, g: torch.Generator) -> torch.Tensor:
    """z (B, T, L) from the model with every noise term of episode b scaled by s_b in {0.4, 1.6} (E s^2 ~ 1.4):
    pooled over episodes the errors are a scale mixture, heavier-tailed than any one Gaussian."""
    A, Q, C, R = model.A, model.Q, model.C, model.R
    scale = torch.where(torch.rand(batch, 1, generator=g, dtype=torch.float64) < 0.5, 0.4, 1.6)
    eye = torch.eye(model.state_dim, dtype=A.dtype)
    h = model.m0 + torch.randn(batch, model.state_dim, generator=g, dtype=A.dtype) @ torch.linalg.cholesky(model.P0).T
    zs = []
    for t in range(steps):
        if t:
            noise = torch.randn(batch, model.state_dim, generator=g, dtype=A.dtype) @ torch.linalg.cholesky(Q).T
            h = h @ A.T + (eye - A) @ model.b + scale * noise
        noise = torch.randn(batch, model.obs_dim, generator=g, dtype=A.dtype) @ torch.linalg.cholesky(R).T
        zs.append(h @ C.T + scale * noise)
    return torch.stack(zs, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_predictive_metrics_calibrated_coverage_is_nominal_on_new_episodes(dtype):
    """A linear-Gaussian system whose noise scale varies by episode: the exact predictive Gaussian's bands are
    off by more than 4 points at 1 sigma; recalibrated on 300 episodes, they cover within 2 points of nominal
    on 300 others, at every k."""
    from worldmodel.evaluation import kstep_residuals

    g = torch.Generator().manual_seed(3)
    model = _lgssm()
    fit_z, new_z = (_sample_mixed_noise(model, 300, 40, g).to(dtype) for _ in range(2))
    model = model.to(dtype)
    _, standardized, valid = kstep_residuals(model, fit_z, None, horizon=10, burn_in=5)
    cal = PredictiveCalibration().fit(standardized, valid)
    out = predictive_metrics(model, new_z, None, horizon=10, burn_in=5, calibration=cal)
    assert out["k"] == list(range(1, 11))
    assert max(abs(c - 0.6827) for c in out["coverage_1sigma"]) > 0.04
    for c1, c2 in zip(out["calibrated_1sigma"], out["calibrated_2sigma"]):
        assert abs(c1 - 0.6827) < 0.02 and abs(c2 - 0.9545) < 0.02
    assert "calibrated_1sigma" not in predictive_metrics(model, new_z, None, horizon=2, calibration=PredictiveCalibration())
    # cross-fitted over 2 folds of the episodes: each half scored with the bands of the other half
    crossed = predictive_metrics(model, new_z, None, horizon=10, burn_in=5, folds=2)
    halves = (slice(0, 150), slice(150, 300))
    parts = []
    for score, fit in (halves, halves[::-1]):
        _, standardized, valid = kstep_residuals(model, new_z[fit], None, horizon=10, burn_in=5)
        parts.append(predictive_metrics(model, new_z[score], None, horizon=10, burn_in=5,
                                        calibration=PredictiveCalibration().fit(standardized, valid)))
    for name in ("calibrated_1sigma", "calibrated_2sigma"):  # equal halves, equal counts: the mean of the two
        expected = [(a + b) / 2 for a, b in zip(parts[0][name], parts[1][name])]
        assert crossed[name] == pytest.approx(expected, abs=1e-9)
        assert max(abs(c - (0.6827 if "1" in name else 0.9545)) for c in crossed[name]) < 0.02


def test_world_model_calibrates_saves_and_bands(tmp_path):
    """WorldModel.calibrate fits on frames; the factors survive save/load; a state dict without them (an older
    checkpoint) loads unfitted; prediction_band is mean +- the calibrated half-width."""
    torch.manual_seed(0)
    config = ModelConfig(encoder="mlp", input_dim=6, hidden=16, layers=1, latent_dim=2, state_dim=3, action_dim=1,
                         image_size=1, channels=1)
    model = WorldModel(config).eval()
    frames = torch.randn(5, 30, 6)
    actions = torch.randn(5, 30, 1)
    mask = torch.ones(5, 30, dtype=torch.bool)
    mask[0, 10:13] = False
    cal = model.calibrate(frames, actions, mask, horizon=6, burn_in=3, batch_size=2)
    assert cal is model.calibration and cal.horizon == 6
    model.save(tmp_path / "m.pt")
    loaded = WorldModel.load(tmp_path / "m.pt")
    assert torch.equal(loaded.calibration.factors, cal.factors)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("calibration.")}
    older = WorldModel(config)
    older.load_weights(state)
    assert not older.calibration.fitted
    with pytest.raises(ValueError, match="calibration.factors has shape"):
        older.load_weights({**state, "calibration.factors": torch.ones(2, 2)})
    belief = model.init_belief(2)
    lower, upper = model.prediction_band(belief, torch.zeros(2, 8, 1), sigmas=2.0)
    prediction = model.imagine(belief, torch.zeros(2, 8, 1), observe=True)
    std = torch.diagonal(prediction.cov, dim1=-2, dim2=-1).sqrt()
    half = cal.half_widths(2.0, 8) * std
    assert torch.allclose((lower + upper) / 2, prediction.mean, atol=1e-6)
    assert torch.allclose((upper - lower) / 2, half, atol=1e-6)
