"""DeepMind Control collection speed: frames/s of env + Ornstein-Uhlenbeck policy, split into physics and rendering.

    MUJOCO_GL=egl python bench/dmc_collect.py [--tasks dmc:cartpole-swingup dmc:walker-walk] [--frames 250] [--size 64]

For each task: frames/s of ``env.step`` (action_repeat control steps + one render at ``--size``) over
``--frames`` steps after a warm-up episode start, the milliseconds per frame spent in MuJoCo's
renderer alone (the same number of renders of the final state), and how long ``train.py``'s default
data set (train 200 + val 40 episodes of ``env_defaults(task).episode_length`` steps) takes to collect
at that speed. Results also go to bench/results/dmc_collect.json. Needs dm_control.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from worldmodel.datasets import episode_seeds, ou_policy
from worldmodel.envs import env_defaults, make_env

TASKS = ["dmc:cartpole-swingup", "dmc:reacher-easy", "dmc:pendulum-swingup", "dmc:cheetah-run", "dmc:walker-walk"]


def measure(name: str, frames: int, size: int) -> dict:
    env = make_env(name, image_size=size)
    u = env.unwrapped
    policy = ou_policy(env)
    env_seed, policy_seed = episode_seeds(0, 0)
    policy.reset(np.random.default_rng(policy_seed))
    obs, info = env.reset(seed=env_seed)  # the first render also creates the GL context: not timed
    start, done = time.perf_counter(), 0
    while done < frames:
        obs, _, terminated, truncated, info = env.step(policy(obs, info))
        done += 1
        if terminated or truncated:
            obs, info = env.reset()
    step_s = (time.perf_counter() - start) / frames
    start = time.perf_counter()
    for _ in range(frames):
        u.physics.render(height=size, width=size, camera_id=u.camera_id)
    render_s = (time.perf_counter() - start) / frames
    d = env_defaults(name)
    env.close()
    default_frames = 240 * d.episode_length
    return {"task": name, "action_repeat": u.action_repeat, "episode_length": d.episode_length,
            "frames_per_s": 1.0 / step_s, "ms_per_frame": 1e3 * step_s, "render_ms": 1e3 * render_s,
            "default_dataset_frames": default_frames, "default_dataset_min": default_frames * step_s / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--frames", type=int, default=250)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    rows = [measure(name, args.frames, args.size) for name in args.tasks]
    print(f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}, {args.size}x{args.size} frames, {args.frames} steps per task")
    print("| task | action repeat | frames/s | ms/frame | of which render ms | episode | default data (240 ep) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['action_repeat']} | {r['frames_per_s']:.0f} | {r['ms_per_frame']:.1f} | "
              f"{r['render_ms']:.1f} | {r['episode_length']} | {r['default_dataset_frames']} frames, "
              f"{r['default_dataset_min']:.1f} min |")
    out = Path(__file__).parent / "results" / "dmc_collect.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"mujoco_gl": os.environ.get("MUJOCO_GL"), "size": args.size, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
