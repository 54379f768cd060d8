"""The train loop: ``train(cfg)`` reads top to bottom (setup, data, model and optimizer, one loop with
logging / checkpoint / stop hooks, final evaluation), with its small helpers above it.

Exact resume: the windows of step s are drawn from a generator seeded by (seed, s) and the learning
rate is a function of s, so a run stopped at step k and resumed from its checkpoint (model, optimizer
and the generator states of every rank) replays steps k+1.. bit for bit.

Distributed (``torchrun --nproc_per_node=N train.py``): every rank draws the same global batch of
``batch_size`` windows and trains on its contiguous slice; DDP averages gradients; only rank 0 writes.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from worldmodel.model import WorldModel
from worldmodel.planning.reward import fit_reward_head
from worldmodel.training import ddp
from worldmodel.training.config import TrainConfig
from worldmodel.training.data import (WindowSampler, ensure_dataset, load_split, open_store, split_episodes,
                                      split_windows, train_batches, validation_batch)
from worldmodel.training.evaluate import calibrate, report
from worldmodel.training.run import append_jsonl, prepare_run, restore, save_checkpoint, seed_all, start_files

__all__ = ["Interrupted", "build_model", "init_weights", "lr_factor", "make_optimizer", "run_steps", "train"]


class Interrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped training after a step whose checkpoint is saved; str() says how to go on."""


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier of step (1-based): linear warm-up, then cosine decay to min_lr_ratio."""
    if cfg.warmup and step <= cfg.warmup:
        return step / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_model(cfg: TrainConfig, device: torch.device) -> WorldModel:
    """The run's WorldModel with the seeded initialisation (identical on every rank)."""
    torch.manual_seed(cfg.seed)
    try:
        return WorldModel.from_config(cfg.model).to(device)
    except ValueError as err:
        raise ValueError(f"cannot build the model: {err}") from err


def init_weights(model: WorldModel, cfg: TrainConfig) -> None:
    """Load the weights of checkpoint ``cfg.init_from`` (its model config must equal the run's)."""
    source = WorldModel.load(cfg.init_from, map_location="cpu")
    if source.config != model.config:
        raise ValueError(f"--init-from {cfg.init_from!r} holds a model of another config; fine-tuning needs the same "
                         f"model settings")
    model.load_state_dict(source.state_dict())


def make_optimizer(model: WorldModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``model.param_groups`` (Kalman parameters at lr * kalman_lr_multiplier); every group
    remembers its peak rate as ``base_lr`` for the schedule."""
    groups = [{**group, "base_lr": group["lr"]} for group in model.param_groups(cfg.lr)]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


class _LossModule(nn.Module):
    """forward = WorldModel.loss, so DDP sees (and synchronises) the training computation."""

    def __init__(self, model: WorldModel):
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor, actions: torch.Tensor | None, mask: torch.Tensor | None):
        return self.model.loss(frames, actions, mask)


def _loss_step(model: WorldModel, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """(frames, actions, mask) -> LossOutput: WorldModel.loss, in DDP over several ranks, compiled on request."""
    module: nn.Module = _LossModule(model)
    if ddp.world() > 1:
        module = nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
    return torch.compile(module) if cfg.compile else module


def _on(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if x is None else x.to(device)


@torch.no_grad()
def _validation_loss(model: WorldModel, batch: dict[str, torch.Tensor], device: torch.device) -> float:
    model.eval()
    loss = float(model.loss(*(_on(batch.get(key), device) for key in ("obs", "action", "mask"))).loss)
    return ddp.reduce_mean({"v": loss})["v"]


class _StopFlag:
    """SIGINT/SIGTERM set a flag checked between steps (a second Ctrl-C interrupts immediately)."""

    def __init__(self):
        self.set = False
        self._previous = {}

    def _handle(self, signum, frame):
        self.set = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        ddp.log(f"\nsignal {signum}: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_steps(model: WorldModel, optimizer: torch.optim.Optimizer, cfg, batches, steps: range,
              val_batch: dict[str, torch.Tensor], device: torch.device, board=None) -> int:
    """The optimisation loop of ``train`` and ``train_ssl``: for each step, the learning rate of the schedule,
    WorldModel.loss on the next of ``batches`` (dicts with obs and optionally action and mask), a clipped
    AdamW step and the target update; the hooks log (metrics.jsonl, tensorboard ``board``, the progress bar)
    every ``cfg.log_every`` steps with the validation loss on ``val_batch``, checkpoint every ``cfg.ckpt_every``
    steps, and stop with a checkpoint on SIGINT / SIGTERM (``Interrupted``). Returns the last step."""
    rank = ddp.rank()
    loss_step = _loss_step(model, cfg, device)
    metrics_path = cfg.run_dir / "metrics.jsonl"
    sums: dict[str, float] = {}
    count, t0, t_log, step, stop_at = 0, time.time(), time.time(), steps.start - 1, steps.stop - 1
    bar = tqdm(total=stop_at, initial=step, desc="train", disable=rank != 0 or not cfg.progress, dynamic_ncols=True)
    with _StopFlag() as stop:
        for step in steps:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, cfg)
            batch = next(batches)
            model.train()
            try:
                out = loss_step(*(_on(batch.get(key), device) for key in ("obs", "action", "mask")))
            except ValueError as err:  # bad input by the library's convention, e.g. a method/window mismatch
                raise ValueError(f"training step {step} (method {cfg.model.method!r}, windows of {cfg.window}) "
                                 f"failed: {err}") from err
            if not torch.isfinite(out.loss):
                raise FloatingPointError(f"non-finite loss {float(out.loss)} at step {step}; the last periodic "
                                         f"checkpoint is kept (try a lower --lr or --grad-clip)")
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            model.update_target()

            # ---- hooks: log the means since the last record, checkpoint, stop on a signal
            for k, v in {"loss": float(out.loss.detach()), **{k: float(v) for k, v in out.logs.items()}}.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            if step == 1 or step % cfg.log_every == 0 or step == stop_at:
                record = ddp.reduce_mean({k: v / count for k, v in sums.items()})
                record["val_loss"] = _validation_loss(model, val_batch, device)
                now = time.time()
                record.update(kind="train", step=step, lr=cfg.lr * lr_factor(step, cfg), elapsed_s=round(now - t0, 3),
                              frames_per_s=round(count * cfg.batch_size * cfg.window / (now - t_log), 1))
                if rank == 0:
                    append_jsonl(metrics_path, record)
                    if board is not None:
                        board.record(record)
                bar.set_postfix(loss=f"{record['loss']:.4g}")
                sums, count, t_log = {}, 0, now
            bar.update(1)
            if step % cfg.ckpt_every == 0 and step < stop_at:
                save_checkpoint(model, optimizer, cfg, step)
            if ddp.any_rank(stop.set):
                save_checkpoint(model, optimizer, cfg, step)
                bar.close()
                if board is not None:
                    board.close()
                ddp.shutdown()
                raise Interrupted(f"interrupted at step {step}; checkpoint saved to "
                                  f"{str(cfg.run_dir / 'checkpoint.pt')!r}; continue with --resume")
    bar.close()
    return step


def train(cfg: TrainConfig, final_eval: bool = True) -> Path:
    """Train (or resume) the run described by ``cfg``; evaluate and plot on rank 0 when finished
    (``final_eval=False`` skips that). Returns the run directory.

    Raises ValueError for data, config or checkpoint problems, FloatingPointError for a non-finite
    loss, and ``Interrupted`` (a KeyboardInterrupt) after saving a checkpoint on SIGINT / SIGTERM.
    """
    # ---- processes, resume point and data (rank 0 checks the checkpoint and builds the data set)
    cfg = cfg.resolved()  # the env's defaults for every field left at none
    device = ddp.select_device(cfg.device)
    ddp.init(device)
    rank, world = ddp.rank(), ddp.world()
    start, ckpt = prepare_run(cfg) if rank == 0 else (0, None)
    store = ensure_dataset(cfg) if rank == 0 else None
    start, ckpt = ddp.broadcast_object((start, ckpt))  # every rank resumes from rank 0's checkpoint
    ddp.barrier()
    if store is None:
        store = open_store(cfg)
    episodes = split_episodes(store, cfg)  # (train, val) store indices; --skip-corrupt passes over corrupt ones
    train_data, val_data = load_split(store, cfg, episodes)
    windows, val_windows = split_windows(store, cfg, episodes)
    sampler = WindowSampler(len(windows), cfg.batch_size, cfg.seed, rank, world)
    val_batch = validation_batch(val_windows, val_data, cfg, rank, world)

    # ---- model and optimizer, restored when resuming
    model = build_model(cfg, device)
    optimizer = make_optimizer(model, cfg)
    if ckpt is not None:
        restore(ckpt, model, optimizer, cfg)
    else:
        if cfg.init_from:
            init_weights(model, cfg)
        seed_all(cfg.seed + rank)
    board = None
    if rank == 0:
        if cfg.tensorboard:  # before start_files: a missing tensorboard package changes nothing in the run dir
            from worldmodel.training.tensorboard import TensorBoardWriter

            board = TensorBoardWriter(cfg.run_dir, resume_step=None if ckpt is None else ckpt["step"],
                                      fresh=ckpt is None)
        start_files(cfg, ckpt)

    # ---- the loop: steps start+1 .. stop_at
    stop_at = cfg.steps if cfg.max_steps is None else min(cfg.steps, cfg.max_steps)
    batches = train_batches(cfg, windows, train_data, sampler, start, stop_at)
    step = run_steps(model, optimizer, cfg, batches, range(start + 1, stop_at + 1), val_batch, device, board)
    if step > start or ckpt is None:
        if model.reward_head is not None and step == cfg.steps:
            r2 = fit_reward_head(model.eval(), train_data, batch_size=cfg.eval.batch_size)
            if rank == 0:
                record = {"kind": "reward_head", "step": step, "r2": r2["reward"]}
                if "value" in r2:
                    record["value_r2"] = None if math.isnan(r2["value"]) else r2["value"]
                append_jsonl(cfg.run_dir / "metrics.jsonl", record)
        if model.calibration is not None and cfg.eval.calibration_folds and step == cfg.steps:
            calibrate(model.eval(), cfg, val_data)
        save_checkpoint(model, optimizer, cfg, step)
    ddp.barrier()
    ddp.shutdown()

    # ---- final evaluation (rank 0)
    try:
        if step < cfg.steps:
            ddp.log(f"stopped at step {step} of {cfg.steps} (--max-steps); continue with --resume")
            return cfg.run_dir
        if rank == 0 and final_eval:
            report(model.eval(), cfg, train_data, val_data, step, board)
            ddp.log(f"wrote {str(cfg.run_dir)!r}")
        return cfg.run_dir
    finally:
        if board is not None:
            board.close()
