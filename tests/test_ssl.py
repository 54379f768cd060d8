"""Image SSL end to end (train.py ssl): two-view batches, the ResNet encoder, short runs per entropy-estimator
family with their probes against the untrained encoder, exact resume, torchrun, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402  (the repository-root entry script)
from worldmodel.datasets import SSLAugment  # noqa: E402
from worldmodel.encoders import ResNetEncoder  # noqa: E402
from worldmodel.model import WorldModel  # noqa: E402
from worldmodel.training import read_metrics  # noqa: E402
from worldmodel.training.ssl import view_batch  # noqa: E402

TINY = ["--model.image-size", "16", "--depth", "4", "--latent-dim", "8", "--hidden", "16", "--images", "96",
        "--eval.probe-images", "96", "--eval.test-images", "48", "--batch-size", "16", "--steps", "4", "--warmup",
        "1", "--log-every", "1", "--ckpt-every", "2", "--no-progress", "--no-plots"]


def _argv(tmp_path, name, *extra):
    return ["ssl", "--out-dir", str(tmp_path / "runs"), "--name", name, *TINY, *extra]


def test_view_batch_is_seeded_per_step_and_ranks_partition_it():
    images = torch.randint(0, 256, (40, 16, 16, 3), dtype=torch.uint8)
    augment = SSLAugment(16)
    batch = view_batch(images, augment, seed=3, step=5, batch_size=8)["obs"]
    assert batch.shape == (8, 2, 16, 16, 3) and batch.dtype == torch.float32
    assert batch.min() >= -0.5 and batch.max() <= 0.5
    torch.testing.assert_close(view_batch(images, augment, 3, 5, 8)["obs"], batch, rtol=0, atol=0)
    assert not torch.equal(view_batch(images, augment, 3, 6, 8)["obs"], batch)
    assert not torch.equal(batch[:, 0], batch[:, 1])  # two views, independently augmented
    halves = [view_batch(images, augment, 3, 5, 8, rank=r, world=2)["obs"] for r in range(2)]
    torch.testing.assert_close(torch.cat(halves), batch, rtol=0, atol=0)
    # with every augmentation off, both views are the drawn images themselves
    identity = SSLAugment(16, scale=(1.0, 1.0), jitter_p=0, gray_p=0, blur_p=0, flip_p=0)
    plain = view_batch(images, identity, 0, 1, 4)["obs"]
    assert (plain[:, 0] - plain[:, 1]).abs().max() < 1e-5
    drawn = ((plain[:, 0] + 0.5) * 255).round().to(torch.uint8)
    assert all(any(torch.equal(d, im) for im in images) for d in drawn)
    with pytest.raises(ValueError, match="divisible"):
        view_batch(images, augment, 0, 1, 7, rank=0, world=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resnet_features_of_an_image_do_not_depend_on_its_batch(dtype):
    """GroupNorm, not BatchNorm: a sample's features are its own (what makes 2 ranks equal 1 process)."""
    torch.manual_seed(0)
    encoder = ResNetEncoder(16, 3, out_dim=8, depth=4, blocks=(1, 2), hidden=16).to(dtype)
    frames = torch.rand(6, 16, 16, 3, dtype=dtype) - 0.5
    assert encoder.feature_dim == 8 and encoder.features(frames).shape == (6, 8) and encoder(frames).shape == (6, 8)
    whole, alone = encoder(frames), torch.cat([encoder(frames[i:i + 1]) for i in range(6)])
    torch.testing.assert_close(whole, alone, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
    pooled = ResNetEncoder(32, 3, out_dim=8, depth=4, pool=2)
    assert pooled.features(torch.zeros(2, 32, 32, 3)).shape == (2, 16)
    with pytest.raises(ValueError, match=r"frames must have shape \(N, 16, 16, 3\)"):
        encoder(torch.zeros(2, 8, 8, 3, dtype=dtype))
    with pytest.raises(ValueError, match="blocks"):
        ResNetEncoder(16, blocks=())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vicreg", "simclr", "byol", "kalman", "lewm"])
def test_ssl_run_per_estimator_family(tmp_path, method, capsys):
    """logdet (vicreg), kde (simclr), plugin with an EMA target (byol), the Kalman prior and sigreg (lewm) on view pairs: a
    short run trains, checkpoints, and scores the trained and the untrained encoder."""
    run_dir = train.main(_argv(tmp_path, method, "--method", method))
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["val_loss"]) for r in records if r["kind"] == "train")
    result = records[-1]
    assert result["kind"] == "eval" and result["source"] == "procedural"
    for key in ("probe_accuracy", "knn_accuracy"):
        assert set(result[key]) == {method, "untrained"} and all(0 <= v <= 1 for v in result[key].values())
    assert set(result["factor_r2"][method]) == {"x", "y", "scale", "hue_cos", "hue_sin"}
    assert "probe acc" in capsys.readouterr().out
    model = WorldModel.load(run_dir / "checkpoint.pt")
    assert model.config.method == method and model.config.encoder == "resnet"


@pytest.mark.slow
def test_ssl_resume_is_exact_and_plots(tmp_path):
    straight = train.main(_argv(tmp_path, "straight", "--plots"))
    with pytest.raises(SystemExit, match="another config.*lr"):
        train.main(_argv(tmp_path, "straight", "--resume", "--lr", "0.1"))
    train.main(_argv(tmp_path, "halves", "--max-steps", "2"))
    resumed = train.main(_argv(tmp_path, "halves", "--resume", "--plots"))
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True)["state_dict"] for d in (straight, resumed))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    losses = [[r["loss"] for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "train"] for d in (straight, resumed)]
    assert losses[0] == losses[1]
    assert (resumed / "loss.png").stat().st_size > 1000 and (resumed / "features.png").stat().st_size > 1000


@pytest.mark.slow
def test_ssl_under_torchrun_matches_one_process(tmp_path):
    one = train.main(_argv(tmp_path, "one", "--steps", "1"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *_argv(tmp_path, "two", "--steps", "1")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = [read_metrics(d / "metrics.jsonl")[0] for d in (one, tmp_path / "runs" / "two")]
    assert first[1]["loss"] == pytest.approx(first[0]["loss"], rel=1e-5, abs=1e-6)


def _write_images(folder: Path, sizes, mode="RGB"):
    PIL = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        PIL.fromarray(pixels).convert(mode).save(folder / f"{i}.png")


@pytest.mark.slow
def test_ssl_on_image_folders_and_bad_input(tmp_path, capsys):
    """Mixed sizes and grayscale images train (resized, converted to RGB); a class-less folder trains with the
    probes skipped; an empty or missing folder is a clear error."""
    for label in ("a", "b"):
        _write_images(tmp_path / "classes" / label, [(20, 30), (16, 16), (40, 24)] * 4)
    _write_images(tmp_path / "classes" / "a", [(18, 18)] * 3, mode="L")
    run_dir = train.main(_argv(tmp_path, "folder", "--data", str(tmp_path / "classes"), "--steps", "2"))
    result = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert result["source"] == "image folder (2 classes)" and set(result["probe_accuracy"]) == {"vicreg", "untrained"}
    assert "factor_r2" not in result

    _write_images(tmp_path / "flat", [(24, 24)] * 12)
    capsys.readouterr()
    run_dir = train.main(_argv(tmp_path, "flat", "--data", str(tmp_path / "flat"), "--steps", "2"))
    result = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert result["source"] == "image folder (no classes)" and "probe_accuracy" not in result
    assert "no class labels (or a single class): linear-probe and kNN accuracy skipped" in capsys.readouterr().out

    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no images"):
        train.main(_argv(tmp_path, "empty", "--data", str(tmp_path / "empty")))
    with pytest.raises(SystemExit, match="does not exist"):
        train.main(_argv(tmp_path, "missing", "--data", str(tmp_path / "missing")))
    with pytest.raises(SystemExit, match="image SSL needs an image encoder"):
        train.main(_argv(tmp_path, "mlp", "--model.encoder", "mlp", "--model.input-dim", "4"))
    with pytest.raises(SystemExit, match="ica"):
        train.main(_argv(tmp_path, "ica", "--method", "ica"))


@pytest.mark.slow
def test_ssl_reads_cifar_folders(tmp_path):
    from test_images import write_cifar

    write_cifar(tmp_path / "c10", 10, n=8)
    run_dir = train.main(_argv(tmp_path, "cifar", "--data", str(tmp_path / "c10"), "--steps", "2"))
    result = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert result["source"] == "CIFAR-10" and result["test_images"] == 8
    assert json.loads((run_dir / "config.json").read_text())["data"] == str(tmp_path / "c10")
