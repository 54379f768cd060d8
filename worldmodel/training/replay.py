"""Online filtering of one episode, frame by frame through ``WorldModel.step``: the `filter` subcommand.

The episode is a held-out one of the store or a fresh one of the env (``filter.live``); frames can be
withheld (``filter.drop`` ranges, ``filter.drop_prob``). The beliefs are read out to the true state
with the readout fit on the training episodes and plotted with 2-sigma bands (``filter.png``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from worldmodel.evaluation import fit_readout
from worldmodel.training import ddp
from worldmodel.training.config import RUN_CONTROL, TrainConfig
from worldmodel.training.data import ensure_dataset, load_split, make_run_env
from worldmodel.training.evaluate import readout_features, readout_targets
from worldmodel.training.run import load_matching_run

__all__ = ["live_episode", "replay_filter"]


@torch.no_grad()
def replay_filter(cfg: TrainConfig) -> Path:
    """Feed one episode frame by frame through WorldModel.step (dropping the requested frames), read
    the beliefs out to the true state and plot them with 2-sigma bands. Returns the figure's path.
    ValueError for a model that cannot filter or an episode index out of range."""
    from worldmodel import plots

    model, stored, _ = load_matching_run(cfg)
    if not model.can_filter:
        raise ValueError(f"filter needs a state-space prior (e.g. method 'kalman'); run {str(cfg.run_dir)!r} used "
                         f"{stored.model.method!r}")
    run_cfg = dataclasses.replace(stored, **{k: getattr(cfg, k) for k in RUN_CONTROL})
    fc = run_cfg.filter
    store = ensure_dataset(stored)
    train_data, val_data = load_split(store, stored)
    if fc.live:
        episode = live_episode(run_cfg)
    else:
        if not 0 <= fc.episode < len(val_data["obs"]):
            raise ValueError(f"--filter.episode must be in [0, {len(val_data['obs'])}), got {fc.episode}")
        episode = {k: v[fc.episode] for k, v in val_data.items()}
    length = len(episode["obs"])
    observed = episode["mask"].clone()  # frames the env itself dropped stay dropped
    for a, b in zip(fc.drop[::2], fc.drop[1::2]):
        observed[a:b] = False
    if fc.drop_prob > 0:
        generator = torch.Generator().manual_seed(fc.seed)
        observed &= torch.rand(length, generator=generator) >= fc.drop_prob
    device = next(model.parameters()).device
    belief = model.init_belief(1)
    means, covs = [], []
    for t in range(length):
        frame = episode["obs"][t][None].to(device) if observed[t] else None
        action = episode["action"][t - 1][None].to(device) if t > 0 else None  # the action since frame t-1
        belief = model.step(belief, frame, action)
        means.append(belief.mean[0])
        covs.append(belief.cov[0])
    mean, cov = torch.stack(means).double().cpu(), torch.stack(covs).double().cpu()  # one transfer, not one a step
    batch = model.filter(episode["obs"][None].to(device), episode["action"][None].to(device),
                         observed[None].to(device)).filtered.mean[0].double().cpu()
    gap = float((batch - mean).abs().max())
    y_train, names = readout_targets(run_cfg, train_data["state"])
    skip = run_cfg.eval.burn_in
    w, c = fit_readout(readout_features(model, train_data, run_cfg.eval.batch_size)[:, skip:], y_train[:, skip:])
    readout_std = torch.einsum("fd,tfg,gd->td", w, cov, w).clamp_min(0).sqrt()
    y, _ = readout_targets(run_cfg, episode["state"])
    path = plots.filter_replay(y, mean @ w + c, readout_std, observed, cfg.run_dir / "filter.png", names=names)
    ddp.log(f"replayed {length} steps ({int((~observed).sum())} dropped frames) through WorldModel.step; its beliefs "
            f"match the batch filter to {gap:.1e} (max abs difference of the means); wrote {str(path)!r}")
    return path


def live_episode(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """A fresh episode of the run's env under the OU policy, seeded by filter.seed, of filter.length
    (or episode_length) steps: obs uint8 (T, H, W, C), action (T, a), state (T, s), mask bool (T,)."""
    from worldmodel.datasets import ou_policy

    env = make_run_env(cfg)
    policy = ou_policy(env)
    policy.reset(np.random.default_rng(cfg.filter.seed))
    obs, info = env.reset(seed=cfg.filter.seed)
    frames, actions, states = [], [], []
    for _ in range(cfg.filter.length or cfg.episode_length):
        action = np.asarray(policy(obs, info), np.float32).reshape(-1)
        frames.append(obs), actions.append(action), states.append(info["state"])
        obs, _, _, _, info = env.step(action)
    env.close()
    return {"obs": torch.from_numpy(np.stack(frames)), "action": torch.from_numpy(np.stack(actions)),
            "state": torch.from_numpy(np.stack(states)).float(), "mask": torch.ones(len(frames), dtype=torch.bool)}
