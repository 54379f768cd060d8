"""`python train.py --method NAME` trains every preset and `python train.py --env NAME` every built-in env
with that env's own defaults (image size, channels, action dim, episode length, env kwargs), no other flag
that matters; only the run's size is shrunk here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from worldmodel.envs import ENV_IDS, GYM_PIXEL_ENVS, env_defaults  # noqa: E402
from worldmodel.methods import PRESETS  # noqa: E402

SMALL_RUN = ["--train-episodes", "3", "--val-episodes", "2", "--batch-size", "8", "--steps", "3",
             "--warmup", "1", "--log-every", "1", "--no-progress", "--eval.baselines", "--eval.ks", "1", "2",
             "--eval.burn-in", "2"]
SMALL_MODEL = ["--model.depth", "4", "--model.latent-dim", "4"]


def _finished(run_dir: Path) -> dict:
    """The run's eval record, after checking that every logged loss is finite."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")
    (evaluation,) = [r for r in records if r["kind"] == "eval"]
    return evaluation


@pytest.fixture(scope="module")
def small_pendulum(tmp_path_factory):
    """A shared 5-episode pendulum store of 16x16 frames and 20 steps."""
    root = tmp_path_factory.mktemp("every")
    return root, ["--data", str(root / "pendulum.zarr"), "--out-dir", str(root / "runs"), "--episode-length", "20",
                  "--window", "8",
                  "--model.image-size", "16", "--no-plots", *SMALL_RUN, *SMALL_MODEL]


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(PRESETS))
def test_every_preset_trains_from_train_py(method, small_pendulum):
    root, argv = small_pendulum
    run_dir = train.main([*argv, "--method", method])
    assert run_dir == root / "runs" / f"pendulum-{method}"
    evaluation = _finished(run_dir)
    assert evaluation["targets"] == ["sin θ", "cos θ", "θ̇"] and len(evaluation["r2"][method]) == 3
    stored = json.loads((run_dir / "config.json").read_text())
    assert stored["model"]["method"] == method
    assert bool(evaluation["predictive"]) == method.startswith("kalman")  # k-step scores when the prior filters


@pytest.mark.slow
@pytest.mark.parametrize("env", [*ENV_IDS, *GYM_PIXEL_ENVS])
def test_every_env_trains_with_its_defaults(env, tmp_path, monkeypatch):
    if env in GYM_PIXEL_ENVS:
        pytest.importorskip("pygame")
    monkeypatch.chdir(tmp_path)  # the default data path data/<env>.zarr and runs/ land here
    run_dir = train.main(["--env", env, *SMALL_RUN, *SMALL_MODEL])
    assert run_dir == Path("runs") / f"{env}-kalman" and (tmp_path / "data" / f"{env}.zarr").is_dir()
    defaults = env_defaults(env)
    stored = json.loads((run_dir / "config.json").read_text())
    assert (stored["model"]["image_size"], stored["model"]["action_dim"]) == (defaults.image_size, defaults.action_dim)
    assert stored["env_kwargs"] == defaults.env_kwargs and stored["episode_length"] == defaults.episode_length
    assert stored["window"] == 32  # cartpole too: its data policy keeps the pole up (worldmodel.envs.data_policy)
    evaluation = _finished(run_dir)
    assert evaluation["targets"] and all(math.isfinite(v) for v in evaluation["r2"]["kalman"])
    assert {p.name for p in run_dir.glob("*.png")} >= {"loss.png", "readout.png", "latents.png", "kstep.png"}
