"""Online filtering of one episode, frame by frame through ``WorldModel.step``: the `filter` subcommand.

The episode is a held-out one of the store or a fresh one of the env (``filter.live``); frames can be
withheld (``filter.drop`` ranges, ``filter.drop_prob``). The beliefs are read out to the true state
with the readout fit on the training episodes and plotted with 2-sigma bands (``filter.png``).

Online monitoring: before each update the replay scores the new frame with ``WorldModel.surprise``
(-log p(z_t | past) in nats, total over the latent dims) and plots the trace (``surprise.png``) against
the 99th percentile of the surprise of normal frames (every observed frame of the held-out episodes after
``eval.burn_in``, scored by the batch filter, which gives the same numbers). ``filter.inject`` puts an
implausible event into the replayed frames: ``teleport`` (from step ``inject_at`` on, the frames of
another held-out episode: a jump in state) or ``freeze`` (the frame of step ``inject_at`` repeats for
``inject_length`` steps); the event window is shaded and its largest surprise is logged against that
percentile. The trace and the numbers also go to ``surprise.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from worldmodel.evaluation import fit_readout
from worldmodel.training import ddp
from worldmodel.training.config import RUN_CONTROL, TrainConfig
from worldmodel.training.data import ensure_dataset, load_split, make_run_env
from worldmodel.training.evaluate import _batched, readout_features, readout_targets
from worldmodel.training.run import load_matching_run

__all__ = ["inject_event", "live_episode", "normal_surprise", "replay_filter"]


@torch.no_grad()
def replay_filter(cfg: TrainConfig) -> Path:
    """Feed one episode frame by frame through WorldModel.step (dropping the requested frames, injecting
    the requested event), scoring every frame with WorldModel.surprise first; read the beliefs out to the
    true state and plot them with 2-sigma bands (filter.png) and the surprise trace (surprise.png, with
    surprise.json). Returns the path of filter.png. ValueError for a model that cannot filter, an episode
    index out of range or an event that does not fit the episode."""
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
    event = None
    if fc.inject is not None:
        episode, event = inject_event(run_cfg, episode, val_data)
    observed = episode["mask"].clone()  # frames the env itself dropped stay dropped
    for a, b in zip(fc.drop[::2], fc.drop[1::2]):
        observed[a:b] = False
    if fc.drop_prob > 0:
        generator = torch.Generator().manual_seed(fc.seed)
        observed &= torch.rand(length, generator=generator) >= fc.drop_prob
    device = next(model.parameters()).device
    belief = model.init_belief(1)
    means, covs, scores = [], [], []
    nan = belief.mean.new_full((), float("nan"))  # the surprise of a dropped frame
    for t in range(length):
        frame = episode["obs"][t][None].to(device) if observed[t] else None
        action = episode["action"][t - 1][None].to(device) if t > 0 else None  # the action since frame t-1
        scores.append(nan if frame is None else model.surprise(belief, frame, action)[0].to(nan.dtype))
        belief = model.step(belief, frame, action)
        means.append(belief.mean[0])
        covs.append(belief.cov[0])
    mean, cov = torch.stack(means).double().cpu(), torch.stack(covs).double().cpu()  # one transfer, not one a step
    surprise = torch.stack(scores).double().cpu()
    batch = model.filter(episode["obs"][None].to(device), episode["action"][None].to(device),
                         observed[None].to(device))
    gap = float((batch.filtered.mean[0].double().cpu() - mean).abs().max())
    surprise_gap = float((surprise + batch.step_log_likelihood[0].double().cpu())[observed].abs().max())
    y_train, names = readout_targets(run_cfg, train_data["state"])
    skip = run_cfg.eval.burn_in
    w, c = fit_readout(readout_features(model, train_data, run_cfg.eval.batch_size)[:, skip:], y_train[:, skip:])
    readout_std = torch.einsum("fd,tfg,gd->td", w, cov, w).clamp_min(0).sqrt()
    y, _ = readout_targets(run_cfg, episode["state"])
    window = None if event is None else (event["start"], event["stop"])
    path = plots.filter_replay(y, mean @ w + c, readout_std, observed, cfg.run_dir / "filter.png", names=names,
                               event=window)
    ddp.log(f"replayed {length} steps ({int((~observed).sum())} dropped frames) through WorldModel.step; its beliefs "
            f"match the batch filter to {gap:.1e} (max abs difference of the means); wrote {str(path)!r}")

    normal = normal_surprise(model, val_data, run_cfg)
    threshold = float(torch.quantile(normal, 0.99)) if len(normal) else float("nan")
    summary = {"surprise": [None if math.isnan(v) else v for v in surprise.tolist()],
               "observed": observed.tolist(), "normal_p99": threshold, "normal_frames": len(normal),
               "batch_gap": surprise_gap, "event": event}
    label = "" if event is None else f"{event['kind']} at step {event['start']}"
    plot_path = plots.surprise_trace(surprise, cfg.run_dir / "surprise.png", threshold=threshold, event=window,
                                     observed=observed, event_label=label)
    message = (f"surprise (-log p(z_t | past), nats) of the replayed frames: median {float(surprise.nanmedian()):.3g}"
               f"; 99th percentile of {len(normal)} normal held-out frames {threshold:.3g}; online surprise matches "
               f"the batch filter's step log-likelihood to {surprise_gap:.1e}; wrote {str(plot_path)!r}")
    if event is not None:
        part = surprise[event["start"]:event["stop"]]
        peak = int(part.nan_to_num(float("-inf")).argmax()) if bool(torch.isfinite(part).any()) else None
        event_max = float("nan") if peak is None else float(part[peak])
        event.update(max_surprise=None if peak is None else event_max,
                     max_step=None if peak is None else event["start"] + peak,
                     above_p99=bool(event_max > threshold))
        source = f", frames of held-out episode {event['source_episode']}" if event["kind"] == "teleport" else ""
        message += (f"\ninjected {event['kind']} at step {event['start']}{source}: max surprise over steps "
                    f"{event['start']}..{event['stop'] - 1} is {event_max:.3g} (step {event['max_step']}), "
                    f"{'above' if event['above_p99'] else 'NOT above'} the 99th percentile of normal frames "
                    f"{threshold:.3g}")
    (cfg.run_dir / "surprise.json").write_text(json.dumps(summary, indent=1) + "\n")
    ddp.log(message)
    return path


def inject_event(cfg: TrainConfig, episode: dict[str, torch.Tensor], val_data: dict[str, torch.Tensor],
                 ) -> tuple[dict[str, torch.Tensor], dict]:
    """The episode with cfg.filter's event injected, and the event {kind, start, stop, source_episode}:
    steps start..stop-1 are the event window. teleport: obs, state and mask from step start on come from
    another held-out episode (the actions stay the replayed ones); freeze: the frame of step start (and
    its mask) repeats up to step stop-1, the true state goes on."""
    fc = cfg.filter
    length = len(episode["obs"])
    start = length // 2 if fc.inject_at is None else fc.inject_at
    if not 1 <= start < length:
        raise ValueError(f"--filter.inject-at must be in [1, {length}) for an episode of {length} steps, got {start}")
    stop = min(start + fc.inject_length, length)
    episode = {k: v.clone() for k, v in episode.items()}
    event = {"kind": fc.inject, "start": start, "stop": stop, "source_episode": None}
    if fc.inject == "freeze":
        episode["obs"][start:stop] = episode["obs"][start]
        episode["mask"][start:stop] = episode["mask"][start]
        return episode, event
    count = len(val_data["obs"])
    candidates = [i for i in range(count) if fc.live or i != fc.episode]
    if fc.inject_episode is None:
        if not candidates:
            raise ValueError("--filter.inject teleport needs another held-out episode to take frames from")
        y_val, _ = readout_targets(cfg, val_data["state"])  # (N, T, D): pick the farthest state at step start
        y_here, _ = readout_targets(cfg, episode["state"])
        scale = y_val.reshape(-1, y_val.shape[-1]).std(0).clamp_min(1e-8)
        distance = ((y_val[candidates, start] - y_here[start]) / scale).square().sum(-1)
        source = candidates[int(distance.argmax())]
    else:
        source = fc.inject_episode
        if source not in candidates:
            raise ValueError(f"--filter.inject-episode must be another held-out episode in [0, {count}), got {source}")
    if len(val_data["obs"][source]) < length:
        raise ValueError(f"teleport source episode {source} has {len(val_data['obs'][source])} steps, fewer than the "
                         f"replayed {length}")
    for key in ("obs", "state", "mask"):
        episode[key][start:] = val_data[key][source][start:length]
    event["source_episode"] = source
    return episode, event


def normal_surprise(model, data: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.Tensor:
    """Surprise (nats) of every observed frame of ``data``'s episodes after eval.burn_in, as one flat tensor:
    minus the batch filter's per-step log-likelihood, which is what WorldModel.surprise gives online."""
    nll = _batched(lambda obs, action, mask: -model.filter(obs, action, mask).step_log_likelihood, model, data,
                   cfg.eval.batch_size)
    keep = data["mask"].clone()
    keep[:, :cfg.eval.burn_in] = False
    return nll.double()[keep]


def live_episode(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """A fresh episode of the run's env under its data policy (`worldmodel.envs.data_policy`), seeded by
    filter.seed, of filter.length (or episode_length) steps: obs uint8 (T, H, W, C), action (T, a), state (T, s),
    mask bool (T,)."""
    from worldmodel.envs import data_policy

    env = make_run_env(cfg)
    policy = data_policy(cfg.env, env)
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
