"""Goal reaching on the N-link arm with the true dynamics: how well can a sampling planner do at all?

    python bench/nlink_oracle.py                          # the arm's control defaults (env, planner), 10 seeds
    python bench/nlink_oracle.py --friction 0.5 --horizon 20 --samples 128 --iterations 3

Runs ``--seeds`` episodes in lockstep (one env each; seed s: ``env.reset(seed=s)``, then the goal
``env.sample_goal(env.np_random)``). Every step plans with ``worldmodel.planning.mppi`` on the true state,
cost = sum over the horizon of ``env.goal_cost`` along ``env.simulate`` rollouts, warm-started from the last plan
shifted by one step (receding horizon), all episodes in one batched call; the first action goes to ``env.step``.
Reports per episode the final goal error (``env.goal_error``, mean over the last 10 steps), the success rate (final
error < ``--success`` rad) and the median planning time per step of one episode (batch 1, ``--threads`` threads;
timed separately on the first episode's first ``--timing-steps`` steps), as wall-clock and as process CPU time (which
leaves out waiting for a core on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from worldmodel.envs import make_env
from worldmodel.planning.solvers import mppi


def planner(env, goal: torch.Tensor, args, generator: torch.Generator):
    """A receding-horizon MPPI policy: state (B, 2n) float64 tensor -> first action (B, n)."""
    low = torch.full((env.n,), -env.max_torque, dtype=torch.float64)
    high = -low
    plan = None

    def cost(state, actions):
        s = state[:, None].expand(-1, actions.shape[1], -1)
        total = actions.new_zeros(actions.shape[:2])
        for h in range(actions.shape[2]):
            s, _ = env.simulate(s, actions[:, :, h])
            total = total + env.goal_cost(s, goal[:, None])
        return total

    def act(state):
        nonlocal plan
        mean = (torch.zeros(len(state), args.horizon, env.n, dtype=torch.float64) if plan is None
                else torch.cat([plan[:, 1:], plan[:, -1:]], 1))
        plan = mppi(lambda a: cost(state, a), mean, low, high, std=args.std, samples=args.samples,
                    iterations=args.iterations, temperature=args.temperature, elites=args.elites,
                    generator=generator)
        return plan[:, 0]

    return act


def run(args) -> dict:
    kwargs = json.loads(args.env_kwargs) if args.env_kwargs else {}
    if args.friction is not None:
        kwargs["friction"] = args.friction
    envs = [make_env("nlink", image_size=16, **kwargs).unwrapped for _ in range(args.seeds)]
    states, goals = [], []
    for seed, env in enumerate(envs):
        _, info = env.reset(seed=seed)
        states.append(info["state"])
        goals.append(env.sample_goal(env.np_random))  # continues the reset's stream (a fresh rng(seed) would repeat it)
    env = envs[0]
    state, goal = torch.tensor(np.stack(states)), torch.tensor(np.stack(goals))

    # planning time of one episode (batch 1)
    act = planner(env, goal[:1], args, torch.Generator().manual_seed(0))
    times, cpu_times = [], []
    for _ in range(args.timing_steps):
        start, cpu = time.perf_counter(), time.process_time()
        act(state[:1])
        times.append(1000 * (time.perf_counter() - start))
        cpu_times.append(1000 * (time.process_time() - cpu))

    act = planner(env, goal, args, torch.Generator().manual_seed(0))
    errors = np.zeros((args.seeds, args.length))
    start = time.perf_counter()
    for t in range(args.length):
        actions = act(state).numpy()
        state = torch.tensor(np.stack([e.step(a)[4]["state"] for e, a in zip(envs, actions)]))
        errors[:, t] = env.goal_error(state.numpy(), goal.numpy())
    final = errors[:, -10:].mean(1)
    return {"env_kwargs": kwargs, "horizon": args.horizon, "samples": args.samples, "iterations": args.iterations,
            "length": args.length, "final_error": final.round(3).tolist(), "mean_final_error": float(final.mean()),
            "success_rate": float((final < args.success).mean()), "initial_error": errors[:, 0].round(2).tolist(),
            "ms_per_step_batch1": float(np.median(times)), "cpu_ms_per_step_batch1": float(np.median(cpu_times)), "wall_s": time.perf_counter() - start,
            "error_every_10": errors.mean(0)[9::10].round(3).tolist()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-kwargs", default=None, help="JSON make_env kwargs (default: the env's control defaults)")
    p.add_argument("--friction", type=float, default=None, help="override the joint friction")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--length", type=int, default=None, help="episode length (default: the control default)")
    p.add_argument("--horizon", type=int, default=None, help="default: the control task's planner setting")
    p.add_argument("--samples", type=int, default=None, help="default: the control task's planner setting")
    p.add_argument("--iterations", type=int, default=None, help="default: the control task's planner setting")
    p.add_argument("--elites", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--std", type=float, default=0.5)
    p.add_argument("--success", type=float, default=0.2, help="success: final goal error below this (rad)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timing-steps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    control = make_env("nlink", image_size=16).unwrapped.defaults["control"]
    if args.env_kwargs is None:
        args.env_kwargs = json.dumps(control["env_kwargs"])
    args.length = args.length or control["episode_length"]
    for name in ("horizon", "samples", "iterations"):
        if getattr(args, name) is None:
            setattr(args, name, control["planner"][name])
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
