"""Data-path benchmark: collection vs store write speed, and window streaming through a DataLoader.

    python bench/data.py [--episodes 40] [--T 200] [--length 16] [--batch-size 32] [--workers 2] [--pixel-noise 0.05]

Prints frames/s for (1) env + policy stepping of the pixel pendulum, (2) RolloutStore.append of the
same episodes, (3) SequenceWindows streamed by a DataLoader with ``--workers`` workers (frames =
batch * window length, after one warm-up batch). Results also go to bench/results/data.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from worldmodel.datasets import RolloutStore, SequenceWindows, action_vector, episode_seeds, ou_policy
from worldmodel.envs import make_env


def collect_in_memory(env, n_episodes: int, T: int, seed: int = 0) -> tuple[list[dict], float]:
    """Roll an OU policy; returns the episodes and the seconds spent stepping (no storage)."""
    policy, episodes, elapsed = ou_policy(env), [], 0.0
    for i in range(n_episodes):
        env_seed, policy_seed = episode_seeds(seed, i)
        start = time.perf_counter()
        policy.reset(np.random.default_rng(policy_seed))
        obs, info = env.reset(seed=env_seed)
        frames, actions, states, rewards = [], [], [], []
        for _ in range(T):
            action = policy(obs, info)
            frames.append(obs)
            states.append(info["state"])
            actions.append(action_vector(env.action_space, action))
            obs, reward, _, _, info = env.step(action)
            rewards.append(reward)
        elapsed += time.perf_counter() - start
        episodes.append({
            "obs": np.stack(frames),
            "action": np.stack(actions),
            "state": np.stack(states).astype(np.float32),
            "reward": np.asarray(rewards, np.float32),
        })
    return episodes, elapsed


def stream(path: Path, length: int, batch_size: int, workers: int, seconds: float) -> float:
    """Frames per second of shuffled windows through a DataLoader (after a warm-up batch)."""
    windows = SequenceWindows(path, length)
    loader = torch.utils.data.DataLoader(
        windows, batch_size=batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    frames, start, warm = 0, None, False
    while True:
        for batch in loader:
            if not warm:
                warm, start = True, time.perf_counter()
                continue
            frames += batch["obs"].shape[0] * batch["obs"].shape[1]
            if time.perf_counter() - start > seconds:
                return frames / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--T", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--chunk-frames", type=int, default=None, help="frames per obs chunk (default: whole episode)")
    parser.add_argument("--compression-level", type=int, default=2, help="blosc-zstd level of the store")
    parser.add_argument("--pixel-noise", type=float, default=0.0, help="i.i.d. pixel noise (worst case for compression)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    env = make_env("pendulum", image_size=args.image_size, pixel_noise=args.pixel_noise)
    episodes, collect_s = collect_in_memory(env, args.episodes, args.T)
    n_frames = args.episodes * args.T
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.zarr"
        store = RolloutStore.create(path, obs_shape=env.observation_space.shape, action_dim=1, state_dim=2, env_id="pendulum",
                                    chunk_frames=args.chunk_frames, compression_level=args.compression_level)
        start = time.perf_counter()
        for episode in episodes:
            store.append(**episode)
        write_s = time.perf_counter() - start
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        stream_fps = stream(path, args.length, args.batch_size, args.workers, args.seconds)
    results = {
        "config": vars(args),
        "collect_frames_per_s": n_frames / collect_s,
        "write_frames_per_s": n_frames / write_s,
        "compression_ratio": sum(e["obs"].nbytes for e in episodes) / size,
        "stream_frames_per_s": stream_fps,
    }
    for key, value in results.items():
        if key != "config":
            print(f"{key:>24}: {value:,.1f}")
    out = Path(__file__).parent / "results" / f"data{'_noise' if args.pixel_noise else ''}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
