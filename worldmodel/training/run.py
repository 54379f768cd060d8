"""A run directory and the state that makes a resume exact.

``<out_dir>/<name>/`` holds ``config.json`` (TrainConfig), ``metrics.jsonl`` (one JSON object per line:
``{"kind": "train", "step", "loss", ..., "val_loss", "lr", "elapsed_s", "frames_per_s"}`` every
log_every steps, ``{"kind": "eval", "step", "targets", "r2", "predictive"}`` per evaluation) and
``checkpoint.pt`` (worldmodel.checkpoint's format with TRAINING_KEYS: model, optimizer, step and the
torch / numpy / python generator states of every rank).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worldmodel.checkpoint import TRAINING_KEYS, model_payload, read_checkpoint, write_checkpoint
from worldmodel.model import WorldModel
from worldmodel.training import ddp
from worldmodel.training.config import TrainConfig, config_difference

__all__ = ["append_jsonl", "load_matching_run", "load_run", "prepare_run", "read_metrics", "restore",
           "save_checkpoint", "seed_all", "start_files"]


# ---------------------------------------------------------------------------------------- metrics.jsonl
def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line. A last line without its newline is torn (an append cut short by a killed
    process): it is dropped first."""
    with open(path, "ab+") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            if f.read(1) != b"\n":
                f.seek(0)
                f.truncate(f.read().rfind(b"\n") + 1)
        f.write((json.dumps(record) + "\n").encode())


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file (a torn last line, see append_jsonl, is skipped)."""
    with open(path) as f:
        lines = f.read().split("\n")  # lines[-1]: "" or a torn line
    return [json.loads(line) for line in lines[:-1] if line.strip()]


def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and os.replace: a killed process leaves the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- generator states
def _rng_state() -> dict[str, Any]:
    """torch / numpy / python (/ cuda) generator states as tensors and ints (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       gauss], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------- checkpoint.pt
def save_checkpoint(model: WorldModel, optimizer: torch.optim.Optimizer, cfg: TrainConfig, step: int) -> None:
    """Write ``<run_dir>/checkpoint.pt`` (rank 0; every rank must call it: it gathers their RNG states).
    WorldModel.save's payload plus the training state, so ``WorldModel.load`` reads it too."""
    rng = ddp.all_gather_object(_rng_state())
    if ddp.rank() == 0:
        write_checkpoint(cfg.run_dir / "checkpoint.pt", model_payload(
            cfg.model.to_dict(), model.state_dict(), train_config=cfg.to_dict(), step=step,
            optimizer=optimizer.state_dict(), rng=rng))


def restore(ckpt: dict, model: WorldModel, optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Load model, optimizer and this rank's generator states from a training checkpoint."""
    model.load_weights(ckpt["state_dict"], str(cfg.run_dir / "checkpoint.pt"))
    optimizer.load_state_dict(ckpt["optimizer"])
    if len(ckpt["rng"]) != ddp.world():
        raise ValueError(f"checkpoint was written by {len(ckpt['rng'])} ranks, this run has {ddp.world()}")
    _set_rng_state(ckpt["rng"][ddp.rank()])


def prepare_run(cfg: TrainConfig | Any) -> tuple[int, dict | None]:
    """Resume bookkeeping on rank 0: (start step, checkpoint or None); writes nothing. ValueError when
    ``--resume`` meets a checkpoint of other settings. ``cfg``: a TrainConfig, or any config with run_dir,
    resume, steps, max_steps, to_dict and from_dict (training.ssl.SSLConfig)."""
    run_dir = cfg.run_dir
    ckpt_path = run_dir / "checkpoint.pt"
    ckpt = None
    if cfg.resume and ckpt_path.is_file():
        ckpt = read_checkpoint(ckpt_path, require=TRAINING_KEYS)
        diff = config_difference(type(cfg).from_dict(ckpt["train_config"]), cfg)
        if diff:
            raise ValueError(f"checkpoint {str(ckpt_path)!r} comes from another config (differs in "
                             f"{', '.join(diff)}); resume with the same settings or choose another --name")
        if ckpt["step"] >= cfg.steps and not cfg.max_steps:
            ddp.log(f"run {str(run_dir)!r} already finished {ckpt['step']} steps")
    elif cfg.resume:
        ddp.log(f"no checkpoint in {str(run_dir)!r}; starting from scratch")
    elif ckpt_path.is_file():
        ddp.log(f"note: starting {str(run_dir)!r} over (its checkpoint is replaced; --resume would continue it)")
    return (ckpt["step"] if ckpt else 0), ckpt


def start_files(cfg: TrainConfig, ckpt: dict | None) -> None:
    """Write config.json and start (or trim, when resuming) metrics.jsonl: once the run is known to load."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(cfg.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    metrics = cfg.run_dir / "metrics.jsonl"
    if ckpt is None:
        metrics.write_text("")
    elif metrics.exists():  # drop records logged after the checkpoint by an interrupted process
        keep = [r for r in read_metrics(metrics) if r.get("kind") == "train" and r["step"] <= ckpt["step"]]
        _write_text_atomic(metrics, "".join(json.dumps(r) + "\n" for r in keep))


# ---------------------------------------------------------------------------------------- finished runs
def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[WorldModel, TrainConfig, dict]:
    """(model in eval mode, config, checkpoint) of a finished or interrupted run."""
    ckpt = read_checkpoint(Path(run_dir) / "checkpoint.pt", require=TRAINING_KEYS)
    cfg = TrainConfig.from_dict(ckpt["train_config"])
    model = WorldModel.from_config(cfg.model)
    model.load_weights(ckpt["state_dict"], str(Path(run_dir) / "checkpoint.pt"))
    return model.to(ddp.select_device(device)).eval(), cfg, ckpt


def load_matching_run(cfg: TrainConfig) -> tuple[WorldModel, TrainConfig, dict]:
    """load_run of ``cfg.run_dir``, refusing a checkpoint whose config differs from ``cfg`` in anything
    but run control (ValueError)."""
    model, stored, ckpt = load_run(cfg.run_dir, cfg.device)
    diff = config_difference(stored, cfg)
    if diff:
        raise ValueError(f"checkpoint in {str(cfg.run_dir)!r} comes from another config (differs in "
                         f"{', '.join(diff)})")
    return model, stored, ckpt
