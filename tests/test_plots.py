"""worldmodel.plots: every figure writes a valid, non-empty PNG and rejects mismatched arrays."""

import numpy as np
import pytest
import torch

from worldmodel import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_loss_curves(tmp_path, rng):
    steps = {"loss": np.arange(1, 51), "val_loss": np.arange(5, 51, 5)}
    curves = {"loss": np.exp(-steps["loss"] / 20) + 0.1, "val_loss": -np.log(steps["val_loss"])}
    path = plots.loss_curves(steps, curves, tmp_path / "sub" / "loss.png")
    assert path == tmp_path / "sub" / "loss.png" and _is_png(path)
    with pytest.raises(ValueError, match="same length"):
        plots.loss_curves({"loss": [1, 2]}, {"loss": [1.0]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="at least one"):
        plots.loss_curves({}, {}, tmp_path / "bad.png")


def test_trajectories_with_bands_and_dropped_frames(tmp_path, rng):
    t = np.linspace(0, 6, 60)
    true = np.stack([np.sin(t), np.cos(t), t], 1)
    pred = torch.tensor(true + 0.1 * rng.standard_normal(true.shape))  # tensors are accepted too
    observed = np.ones(60, bool)
    observed[20:30] = False
    path = plots.filter_replay(true, pred, np.full_like(true, 0.2), observed, tmp_path / "filter.png",
                               names=["sin θ", "cos θ", "θ̇"])
    assert _is_png(path)
    assert _is_png(plots.trajectories(true[:, 0], tmp_path / "plain.png"))
    with pytest.raises(ValueError, match="pred must have shape"):
        plots.trajectories(true, tmp_path / "bad.png", pred[:, :2])
    with pytest.raises(ValueError, match="std must have the shape"):
        plots.trajectories(true, tmp_path / "bad.png", pred, np.ones((60, 2)))
    with pytest.raises(ValueError, match="names must have 3"):
        plots.trajectories(true, tmp_path / "bad.png", names=["a"])


def test_kstep_predictions_and_latent_scatter(tmp_path, rng):
    true = rng.standard_normal((40, 2)).cumsum(0)
    mean, std = true[11:31] + 0.3, np.linspace(0.1, 1.0, 20)[:, None].repeat(2, 1)
    assert _is_png(plots.kstep_predictions(true, mean, std, 10, tmp_path / "kstep.png"))
    theta = rng.uniform(-np.pi, np.pi, 300)
    latents = np.stack([np.sin(theta), np.cos(theta), 0.1 * rng.standard_normal(300)], 1)
    assert _is_png(plots.latent_scatter(latents, theta, tmp_path / "latents.png", "theta"))
    with pytest.raises(ValueError, match="color must have length"):
        plots.latent_scatter(latents, theta[:10], tmp_path / "bad.png")
