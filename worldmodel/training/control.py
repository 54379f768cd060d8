"""``train.py control``: the collect-train-plan loop (PlaNet's) and the closed-loop evaluation.

    seed episodes (uniform random actions) -> train phase 0 -> collect with MPC + exploration noise -> train
    phase 1 (fine-tuning on the grown store) -> ... -> closed-loop evaluation on fixed seeds

All data goes into one rollout store, ``<run_dir>/rollouts.zarr``; phase k trains ``<run_dir>/train-<k>/``
(an ordinary train.py run, initialised from phase k-1). Every part is resumable: collection continues at the
first missing episode, a phase at its checkpoint, a finished phase is skipped; so Ctrl-C keeps every collected
episode and the same command goes on. The evaluation runs the learned MPC (frames only), a uniform random
policy and an oracle MPC that plans with the simulator's true state and dynamics (``env.unwrapped.simulate``,
when the env has it) on the same seeds, batched over episodes, and writes ``control.json`` (returns, the
normalised score (R - R_random) / (R_oracle - R_random), planning ms per step), ``returns.png`` and
``episode.png`` (a filmstrip of one episode with the belief's linear readout against the true state).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from worldmodel.kalman import Gaussian
from worldmodel.model import WorldModel
from worldmodel.planning.mpc import MPC, PlannerConfig, RecedingHorizon, planning_threads
from worldmodel.training import ddp
from worldmodel.training.config import TrainConfig
from worldmodel.training.data import make_run_env
from worldmodel.training.loop import train

__all__ = ["control", "for_control", "run_episodes"]


def for_control(cfg: TrainConfig) -> TrainConfig:
    """The control run's config: the env's control defaults (``worldmodel.envs.control_defaults``: the task, reward or
    goal, its ``make_env`` kwargs and episode length) for every field not given, run name ``<env>-control``, a
    reward head for reward tasks and the env's action bounds stored as planner defaults; every other "none" field
    resolved as for training."""
    from worldmodel.envs import control_defaults

    defaults, control = control_defaults(cfg.env), cfg.control
    control = dataclasses.replace(control, task=control.task or defaults["task"],
                                  episode_length=control.episode_length or defaults["episode_length"],
                                  iterations=defaults["iterations"] if control.iterations is None else control.iterations)
    cfg = dataclasses.replace(cfg, control=control, name=cfg.name or f"{cfg.env}-control",
                              env_kwargs=defaults["env_kwargs"] if cfg.env_kwargs is None else cfg.env_kwargs,
                              episode_length=control.episode_length,
                              model=dataclasses.replace(cfg.model, reward_head=control.task == "reward")).resolved()
    env = make_run_env(cfg)
    try:
        space = env.action_space
        if not hasattr(space, "low") or cfg.model.action_dim == 0:
            raise ValueError(f"train.py control needs an env with continuous (Box) actions; {cfg.env!r} has "
                             f"{space}")
        missing = [m for m in ("sample_goal", "render_state", "goal_error") if not hasattr(env.unwrapped, m)]
        if control.task == "goal" and missing:
            raise ValueError(f"control.task 'goal' needs an env that declares goals ({', '.join(missing)} missing on "
                             f"{cfg.env!r})")
        bounds = {"action_low": [float(x) for x in np.ravel(space.low)],
                  "action_high": [float(x) for x in np.ravel(space.high)]}
    finally:
        env.close()
    planner = {**bounds, **defaults.get("planner", {}), **cfg.model.planner}
    PlannerConfig.from_overrides(planner)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, planner=planner))


def goal_set(env, rngs: list[np.random.Generator]) -> dict[str, np.ndarray]:
    """One goal per generator from the env's goal API: states (E, s) and their frames (E, H, W, C)."""
    states = np.stack([env.unwrapped.sample_goal(rng) for rng in rngs])
    return {"states": states, "frames": np.stack([env.unwrapped.render_state(g) for g in states])}


# ---------------------------------------------------------------------------------------- policies
class RandomPolicy:
    """Uniform random actions in the bounds, for a batch of E envs (env i's from generator i)."""

    def __init__(self, low: np.ndarray, high: np.ndarray):
        self.low, self.high = low, high

    def reset(self, rngs: list[np.random.Generator], goals: dict | None = None) -> None:
        self.rngs = rngs

    def __call__(self, obs: np.ndarray, state: np.ndarray) -> np.ndarray:
        return np.stack([rng.uniform(self.low, self.high) for rng in self.rngs]).astype(np.float32)


class ModelPolicy:
    """The learned MPC from frames: filter each frame with `WorldModel.step`, plan from the belief with `MPC` (the
    reward head, or the goal frames given to `reset`), add Gaussian exploration noise of std ``exploration`` x the
    half action range (0 for evaluation; env i's noise from generator i)."""

    def __init__(self, model: WorldModel, exploration: float = 0.0):
        self.model, self.exploration = model, exploration
        self.plan_ms: list[float] = []

    def reset(self, rngs: list[np.random.Generator], goals: dict | None = None) -> None:
        self.rngs, self.belief, self.previous = rngs, self.model.init_belief(len(rngs)), None
        self.means: list[torch.Tensor] = []  # filtered state means (E, S) of every step, for the readout figure
        self.mpc = MPC(self.model) if goals is None else MPC(self.model, goal=torch.as_tensor(goals["frames"]))

    @torch.no_grad()
    def __call__(self, obs: np.ndarray, state: np.ndarray) -> np.ndarray:
        device = self.mpc.low.device
        self.belief = self.model.step(self.belief, torch.as_tensor(obs, device=device), self.previous)
        self.means.append(self.belief.mean.float().cpu())
        action = self.mpc.plan(self.belief)[:, 0]
        self.plan_ms.append(self.mpc.last_ms)
        low, high = self.mpc.low, self.mpc.high
        if self.exploration > 0:
            noise = np.stack([rng.standard_normal(action.shape[1:]) for rng in self.rngs])
            noise = torch.as_tensor(noise, dtype=action.dtype, device=device)
            action = torch.minimum(torch.maximum(action + self.exploration * (high - low) / 2 * noise, low), high)
        self.previous = action.float()
        return action.cpu().numpy().astype(np.float32)


class OraclePolicy:
    """MPC with the simulator's true state and dynamics: the same solver and settings as the learned MPC; the cost is
    minus the sum of true rewards of ``env.unwrapped.simulate(state, action) -> (state, reward)``, or with goals the
    sum of ``env.unwrapped.goal_cost(state, goal)``."""

    def __init__(self, simulator, planner: PlannerConfig):
        low, high = (torch.tensor(b, dtype=torch.float64) for b in (planner.action_low, planner.action_high))
        self.simulator, self.solver = simulator, RecedingHorizon(planner, low, high)
        self.plan_ms: list[float] = []

    def reset(self, rngs: list[np.random.Generator], goals: dict | None = None) -> None:
        self.solver.reset()
        self.goal = None if goals is None else torch.as_tensor(goals["states"], dtype=torch.float64)[:, None]

    def _cost(self, state: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        s = state[:, None].expand(-1, actions.shape[1], -1)
        total = actions.new_zeros(actions.shape[:2])
        for h in range(actions.shape[2]):
            s, reward = self.simulator.simulate(s, actions[:, :, h])
            total = total + (-reward if self.goal is None else self.simulator.goal_cost(s, self.goal))
        return total

    def __call__(self, obs: np.ndarray, state: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        s = torch.as_tensor(state, dtype=torch.float64)
        with planning_threads(s.device, len(s) * self.solver.config.samples, s.shape[1]):
            action = self.solver(lambda actions: self._cost(s, actions), len(s))[:, 0]
        self.plan_ms.append(1000 * (time.perf_counter() - start))
        return action.numpy().astype(np.float32)


class _Collecting:
    """A policy of this module as ``datasets.collect``'s batched policy ``policy(obs (E, ...), infos)`` (a fresh goal
    of ``goal_env`` per episode, drawn with the episode's generator, when given)."""

    def __init__(self, policy, goal_env=None):
        self.policy, self.goal_env = policy, goal_env

    def reset(self, rngs: list[np.random.Generator]) -> None:
        self.policy.reset(rngs, None if self.goal_env is None else goal_set(self.goal_env, rngs))

    def __call__(self, obs: np.ndarray, infos: list[dict]) -> np.ndarray:
        return self.policy(obs, np.stack([np.asarray(info["state"], np.float64) for info in infos]))


# ---------------------------------------------------------------------------------------- episodes
def run_episodes(cfg: TrainConfig, policy, seeds: list[int], length: int, keep_frames: int = 1,
                 desc: str = "episodes", goals: bool = False) -> dict[str, np.ndarray]:
    """Run ``policy`` (batched: ``reset(rngs, goals)`` with a generator per env seeded by its seed,
    ``policy(obs (E, H, W, C), state (E, s)) -> actions (E, a)``) in one env per seed for ``length`` steps in lockstep
    (an env that terminates stops earning reward).
    Returns returns (E,), rewards (E, T), states (E, T, s) and the frames (k, T, H, W, C) of the first k episodes;
    with ``goals`` also the goals (seeded by the episode seeds, the same for every policy) and goal_error (E, T)."""
    envs = [make_run_env(cfg) for _ in seeds]
    try:
        first = [env.reset(seed=int(s)) for env, s in zip(envs, seeds)]
        obs = np.stack([o for o, _ in first])
        state = np.stack([np.asarray(i["state"], np.float64) for _, i in first])
        goal = goal_set(envs[0], [np.random.default_rng([int(s), 1]) for s in seeds]) if goals else None
        policy.reset([np.random.default_rng(int(s)) for s in seeds], goal)
        rewards = np.zeros((len(seeds), length))
        states = np.zeros((len(seeds), length, state.shape[-1]))
        frames = np.zeros((min(keep_frames, len(seeds)), length, *obs.shape[1:]), np.uint8)
        alive = np.ones(len(seeds), bool)
        for t in tqdm(range(length), desc=desc, leave=False, disable=None):
            states[:, t], frames[:, t] = state, obs[:len(frames)]
            actions = policy(obs, state)
            for i, env in enumerate(envs):
                if alive[i]:
                    o, r, terminated, truncated, info = env.step(actions[i])
                    obs[i], state[i], rewards[i, t] = o, info["state"], r
                    alive[i] = not (terminated or truncated)
        out = {"returns": rewards.sum(1), "rewards": rewards, "states": states, "frames": frames}
        if goal is not None:
            out.update(goals=goal, goal_error=np.asarray(envs[0].unwrapped.goal_error(states, goal["states"][:, None])))
        return out
    finally:
        for env in envs:
            env.close()


# ---------------------------------------------------------------------------------------- the loop
def _phase_config(cfg: TrainConfig, k: int, episodes: int) -> TrainConfig:
    """The ordinary training run of phase k on the first ``episodes`` episodes of the run's store."""
    c, run_dir = cfg.control, cfg.run_dir
    return dataclasses.replace(
        cfg, out_dir=str(run_dir), name=f"train-{k}", data=str(run_dir / "rollouts.zarr"),
        train_episodes=episodes - c.val_episodes, val_episodes=c.val_episodes, resume=True, plots=False,
        steps=cfg.steps if k == 0 else c.steps_per_iteration, warmup=cfg.warmup if k == 0 else 0,
        init_from=None if k == 0 else str(run_dir / f"train-{k - 1}" / "checkpoint.pt"))


def _collect(cfg: TrainConfig, policy, episodes: int) -> list[float]:
    """Grow the run's store to ``episodes`` episodes with ``policy`` (resumable), episodes_per_iteration envs in
    lockstep (one batched planning call per step); returns of the store's episodes."""
    from worldmodel.datasets import collect

    envs = [make_run_env(cfg) for _ in range(cfg.control.episodes_per_iteration)]
    path = cfg.run_dir / "rollouts.zarr"
    try:
        goal_env = envs[0] if cfg.control.task == "goal" else None
        store = collect(envs, _Collecting(policy, goal_env), episodes, cfg.control.episode_length, path,
                        seed=cfg.seed, progress=cfg.progress)
    finally:
        for env in envs:
            env.close()
    return [float(store.window(i, 0, int(n), keys=("reward",))["reward"].sum()) for i, n in enumerate(store.lengths())]


def control(cfg: TrainConfig) -> dict:
    """The collect-train-plan loop and the closed-loop evaluation (module docstring); ``cfg`` as ``for_control``
    makes it. Returns the record written to ``<run_dir>/control.json``."""
    cfg = for_control(cfg)
    c, run_dir = cfg.control, cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    t0 = time.time()
    low, high = (np.asarray(b, np.float32) for b in (cfg.model.planner["action_low"], cfg.model.planner["action_high"]))
    returns = _collect(cfg, RandomPolicy(low, high), c.seed_episodes)
    for k in range(c.iterations + 1):
        episodes = c.seed_episodes + k * c.episodes_per_iteration
        ddp.log(f"control phase {k}: training on {episodes} episodes")
        phase = _phase_config(cfg, k, episodes)
        train(phase, final_eval=False)
        if k == c.iterations:
            break
        model = WorldModel.load(phase.run_dir / "checkpoint.pt").eval()
        returns = _collect(cfg, ModelPolicy(model, c.exploration), episodes + c.episodes_per_iteration)
    model = WorldModel.load(run_dir / f"train-{c.iterations}" / "checkpoint.pt").eval()
    model.save(run_dir / "checkpoint.pt")
    record = evaluate_control(cfg, model, collected=returns)
    record["elapsed_s"] = round(time.time() - t0, 1)
    (run_dir / "control.json").write_text(json.dumps(record, indent=2) + "\n")
    _print_table(record)
    return record


def evaluate_control(cfg: TrainConfig, model: WorldModel, collected: list[float] | None = None) -> dict:
    """Closed-loop evaluation on seeds eval_seed + i of the learned MPC, a random policy and (when the env has
    ``simulate``) the oracle MPC: returns, and for goal tasks the final goal error (mean over the last tenth of the
    episode) and success rate (final error below the env's ``success_error``); the normalised score (returns, or
    final errors for goal tasks); planning ms per step (of a batch of all evaluation episodes, and of the learned MPC
    for one env: planning_ms_one_env); and the figures (when
    cfg.plots). ``collected``: the returns of the episodes collected by the loop, kept in the record and plotted."""
    from worldmodel import plots

    c = cfg.control
    goals = c.task == "goal"
    seeds = [c.eval_seed + i for i in range(c.eval_episodes)]
    planner = PlannerConfig.from_overrides(cfg.model.planner)
    policies = {"mpc": ModelPolicy(model), "random": RandomPolicy(np.asarray(planner.action_low, np.float32),
                                                                  np.asarray(planner.action_high, np.float32))}
    from worldmodel.envs import control_defaults

    tolerance = control_defaults(cfg.env).get("success_error", 0.2)
    env = make_run_env(cfg)
    if c.oracle and hasattr(env.unwrapped, "simulate"):
        policies["oracle"] = OraclePolicy(env.unwrapped, planner)
    env.close()
    runs = {name: run_episodes(cfg, policy, seeds, c.episode_length, desc=f"eval {name}", goals=goals)
            for name, policy in policies.items()}
    record = {"kind": "control", "env": cfg.env, "task": c.task, "seeds": seeds, "episode_length": c.episode_length,
              "returns": {name: run["returns"].round(3).tolist() for name, run in runs.items()},
              "planning_ms": {name: round(float(np.median(p.plan_ms)), 3) for name, p in policies.items()
                              if hasattr(p, "plan_ms")}, "collected_returns": collected or []}
    single = MPC(model) if not goals else MPC(model, goal=torch.as_tensor(runs["mpc"]["goals"]["frames"][:1]))
    one = model.init_belief(1)
    record["planning_ms_one_env"] = round(float(np.median([(single.plan(one), single.last_ms)[1] for _ in range(20)])), 3)
    key = "returns"
    if goals:
        key, tail = "final_error", max(1, c.episode_length // 10)
        record["final_error"] = {name: run["goal_error"][:, -tail:].mean(1).round(4).tolist() for name, run in runs.items()}
        record["goal_tolerance"] = tolerance
        record["success_rate"] = {name: float(np.mean(np.asarray(v) < tolerance)) for name, v in record[key].items()}
    mean = {name: float(np.mean(v)) for name, v in record[key].items()}
    record["mean_" + key] = mean
    if "oracle" in mean and mean["oracle"] != mean["random"]:
        record["score"] = (mean["mpc"] - mean["random"]) / (mean["oracle"] - mean["random"])
    if cfg.plots:
        plots.control_returns(record, cfg.run_dir / "returns.png", key)
        truth, readout, names = _belief_readout(cfg, torch.stack(policies["mpc"].means, 1), runs["mpc"]["states"])
        trace, label = (runs["mpc"]["goal_error"][0], "goal error") if goals else (runs["mpc"]["rewards"][0], "reward")
        plots.control_episode(runs["mpc"]["frames"][0], truth, readout, names, trace, cfg.run_dir / "episode.png",
                              trace_label=label, goal=runs["mpc"]["goals"]["frames"][0] if goals else None)
    return record


def _belief_readout(cfg: TrainConfig, means: torch.Tensor, states: np.ndarray):
    """(true targets (T, D), their linear readout from the filtered means (T, D), names) of evaluation episode 0;
    the affine readout is fit on the other evaluation episodes (on episode 0 itself when it is the only one)."""
    from worldmodel import envs
    from worldmodel.evaluation import fit_readout

    env = make_run_env(cfg)
    try:
        targets, names = envs.readout_targets(env, states)
    finally:
        env.close()
    fit = slice(1, None) if len(means) > 1 else slice(None)
    W, c = fit_readout(means[fit].double(), targets[fit])
    return targets[0].numpy(), (means[0].double() @ W + c).numpy(), names


def _print_table(record: dict) -> None:
    """The evaluation as a small text table on stdout."""
    goals = record["task"] == "goal"
    key = "final_error" if goals else "returns"
    what = "final goal error (rad)" if goals else "returns"
    lines = [f"closed-loop {what} over {record['episode_length']} steps, {len(record['seeds'])} seeds "
             f"({record['env']}):", f"  {'policy':8s} {'mean':>9s} {'std':>8s} {'plan ms':>8s}"
             + ("  success" if goals else "")]
    for name, values in record[key].items():
        ms = record["planning_ms"].get(name)
        success = f"  {record['success_rate'][name]:7.0%}" if goals else ""
        lines.append(f"  {name:8s} {np.mean(values):9.3g} {np.std(values):8.3g} "
                     f"{'        ' if ms is None else f'{ms:8.1f}'}{success}")
    lines.append(f"  learned MPC, one env: {record['planning_ms_one_env']:.1f} ms per planning step")
    if "score" in record:
        lines.append(f"  normalised score (X - X_random) / (X_oracle - X_random) of the mean {what}: "
                     f"{record['score']:.3f}")
    print("\n".join(lines), flush=True)
