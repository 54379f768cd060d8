"""train.py control: the collect-train-plan loop, its resumption, and the oracle planner on the true pendulum."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402  (the repository-root entry script)
from worldmodel.datasets import RolloutStore  # noqa: E402
from worldmodel.model import WorldModel  # noqa: E402
from worldmodel.planning import PlannerConfig  # noqa: E402
from worldmodel.training.control import ModelPolicy, OraclePolicy, run_episodes  # noqa: E402
from worldmodel.training.config import TrainConfig  # noqa: E402
from worldmodel.training.data import make_run_env  # noqa: E402

TINY = ["--steps", "20", "--window", "8", "--batch-size", "4", "--log-every", "10", "--model.image-size", "16",
        "--model.depth", "4", "--model.pool", "1", "--latent-dim", "3", "--eval.batch-size", "4", "--no-progress",
        "--control.seed-episodes", "4", "--control.iterations", "1", "--control.episodes-per-iteration", "2",
        "--control.steps-per-iteration", "5", "--control.episode-length", "24", "--control.eval-episodes", "3",
        "--model.planner", '{"horizon": 12, "samples": 64, "iterations": 3, "elites": 8}']


def _run(tmp_path, *extra):
    return train.main(["control", "--out-dir", str(tmp_path / "runs"), *TINY, *extra])


@pytest.mark.slow
def test_control_loop_collects_trains_evaluates_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = _run(tmp_path)
    run_dir = tmp_path / "runs" / "pendulum-control"
    store = RolloutStore.open(run_dir / "rollouts.zarr", read_only=True)
    assert len(store) == 4 + 2 and store.episode_length == 24
    # the score is the normalised return, and the oracle (true state and dynamics) beats random actions
    mean = {k: np.mean(v) for k, v in record["returns"].items()}
    assert set(mean) == {"mpc", "random", "oracle"} and all(len(v) == 3 for v in record["returns"].values())
    assert record["score"] == pytest.approx((mean["mpc"] - mean["random"]) / (mean["oracle"] - mean["random"]), rel=1e-3)
    assert mean["oracle"] > mean["random"] + 5
    assert json.loads((run_dir / "control.json").read_text())["returns"] == record["returns"]
    stored = [float(store.episode(i)["reward"].sum()) for i in range(len(store))]
    assert record["collected_returns"] == pytest.approx(stored) and record["planning_ms_one_env"] > 0
    # the final model carries the fitted reward head and the env's action bounds as planner defaults
    model = WorldModel.load(run_dir / "checkpoint.pt")
    assert bool(model.reward_head.fitted) and model.config.planner["action_high"] == [2.0]
    assert model.config.method == "kalman_ll"  # the pendulum's control default (envs.control_defaults), no --method
    r2 = [r for r in map(json.loads, (run_dir / "train-1" / "metrics.jsonl").read_text().splitlines())
          if r["kind"] == "reward_head"]
    assert len(r2) == 1 and np.isfinite(r2[0]["r2"])
    # 24-step episodes are too short for returns discounted by 0.95: the value head stays unfitted, unused
    assert r2[0]["value_r2"] is None and not bool(model.value_head.fitted)
    # phase 1 started from phase 0's weights (fine-tuning 5 steps), not from a fresh initialisation
    weights = lambda m: torch.nn.utils.parameters_to_vector(m.encoder.parameters())
    phase0 = WorldModel.load(run_dir / "train-0" / "checkpoint.pt")
    torch.manual_seed(1)
    fresh = WorldModel.from_config(model.config)
    assert (weights(model) - weights(phase0)).norm() < 0.2 * (weights(model) - weights(fresh)).norm()
    # a second call finds everything done: same store, same evaluation (seeded solvers and policies)
    episode0 = store.episode(0)["obs"].copy()
    again = _run(tmp_path)
    assert again["returns"] == record["returns"]
    assert len(RolloutStore.open(run_dir / "rollouts.zarr", read_only=True)) == 6
    np.testing.assert_array_equal(RolloutStore.open(run_dir / "rollouts.zarr").episode(0)["obs"], episode0)


@pytest.mark.slow
def test_interrupted_collection_keeps_the_episodes_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    calls = {"n": 0}
    original = ModelPolicy.__call__

    def interrupt_mid_episode(self, obs, state):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, obs, state)

    monkeypatch.setattr(ModelPolicy, "__call__", interrupt_mid_episode)
    with pytest.raises(SystemExit) as stop:
        _run(tmp_path)
    assert stop.value.code == 130
    path = tmp_path / "runs" / "pendulum-control" / "rollouts.zarr"
    # the seed episodes are kept; the MPC's two episodes ran in lockstep and are collected again
    assert len(RolloutStore.open(path, read_only=True)) == 4
    monkeypatch.setattr(ModelPolicy, "__call__", original)
    record = _run(tmp_path)
    assert len(RolloutStore.open(path, read_only=True)) == 6 and len(record["returns"]["mpc"]) == 3


@pytest.mark.slow
def test_oracle_mpc_swings_the_pendulum_up(tmp_path):
    """The planner on the true dynamics (the evaluation's oracle) swings the pendulum up from a random state and
    holds it: a nonlinear task with the env's default torque limit (2 < m g l: it must pump energy)."""
    cfg = TrainConfig(env="pendulum", env_kwargs={}, out_dir=str(tmp_path)).resolved()
    env = make_run_env(cfg)
    planner = PlannerConfig(action_low=(-2.0,), action_high=(2.0,), horizon=30, samples=128)
    episodes = run_episodes(cfg, OraclePolicy(env.unwrapped, planner), [7], 120, keep_frames=0)
    upright_error = np.abs((episodes["states"][0, -20:, 0] % (2 * np.pi)) - np.pi)
    assert upright_error.max() < 0.3


@pytest.mark.slow
def test_goal_task_on_the_arm_reports_final_errors_and_success(tmp_path, monkeypatch):
    """`--env nlink` is a goal task (the env declares it): goal frames drawn by the env, the same goals for every
    policy, final goal errors and success rates; the oracle, planning on the true state, ends nearer its goals than
    random torques."""
    monkeypatch.chdir(tmp_path)
    planner = '{"horizon": 6, "samples": 32, "iterations": 2, "elites": 8}'
    args = [a if a != TINY[TINY.index("--model.planner") + 1] else planner for a in TINY]
    args[args.index("--control.episode-length") + 1] = "30"
    record = train.main(["control", "--env", "nlink", "--out-dir", str(tmp_path / "runs"), *args])
    assert record["task"] == "goal" and set(record["final_error"]) == {"mpc", "random", "oracle"}
    errors = {k: np.mean(v) for k, v in record["final_error"].items()}
    assert errors["oracle"] < 0.7 * errors["random"]
    assert record["success_rate"]["oracle"] == np.mean(np.asarray(record["final_error"]["oracle"]) < 0.2)
    config = json.loads((tmp_path / "runs" / "nlink-control" / "config.json").read_text())
    assert config["env_kwargs"] == {"gravity": 0.0} and config["model"]["reward_head"] is False


def test_control_defaults_come_from_the_env_unless_given():
    """The pendulum declares its loop (kalman_ll, 6 iterations, planning 25 steps ahead); other envs get 3
    iterations; flags override the env's defaults."""
    from worldmodel.training.config import ControlConfig
    from worldmodel.training.control import for_control

    pendulum = for_control(TrainConfig(env="pendulum"))
    assert pendulum.control.iterations == 6 and pendulum.model.planner["horizon"] == 25
    assert for_control(TrainConfig(env="nlink")).control.iterations == 3
    given = for_control(TrainConfig(env="pendulum", control=ControlConfig(iterations=2)))
    assert given.control.iterations == 2
    with pytest.raises(ValueError, match="iterations"):
        ControlConfig(iterations=-1)
