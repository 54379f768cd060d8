"""The one checkpoint format of ldm-worldmodel: write it atomically, read it with clear errors.

A checkpoint is one ``torch.save``d dict (tensors and plain values only, so it loads with
``weights_only=True``):

    format      FORMAT ("ldm-worldmodel/world-model")
    version     worldmodel.__version__ of the writer
    config      ModelConfig as a dict
    state_dict  WorldModel.state_dict()

``WorldModel.save`` writes exactly these (MODEL_KEYS); a training run adds ``train_config``
(TrainConfig as a dict), ``step``, ``optimizer`` (its state_dict) and ``rng`` (one generator state per
rank), so ``WorldModel.load`` also reads a training checkpoint (TRAINING_KEYS).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from worldmodel import __version__

__all__ = ["FORMAT", "MODEL_KEYS", "TRAINING_KEYS", "model_payload", "read_checkpoint", "upgrade_state_dict",
           "write_checkpoint"]

FORMAT = "ldm-worldmodel/world-model"
MODEL_KEYS = ("format", "version", "config", "state_dict")
TRAINING_KEYS = (*MODEL_KEYS, "train_config", "step", "optimizer", "rng")


def model_payload(config: dict[str, Any], state_dict: dict[str, torch.Tensor], **extra: Any) -> dict[str, Any]:
    """The checkpoint dict of a model (``config``: ModelConfig.to_dict()), plus ``extra`` keys."""
    return {"format": FORMAT, "version": __version__, "config": config, "state_dict": state_dict, **extra}


def write_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically (a temporary file, then os.replace): a reader,
    or a crash mid-write, never sees a partial file. Creates the parent directories."""
    if payload.get("format") != FORMAT or not set(MODEL_KEYS) <= payload.keys():
        raise ValueError(f"a checkpoint payload needs the keys {list(MODEL_KEYS)} with format {FORMAT!r} "
                         "(build it with model_payload)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # left only by a failed save


def read_checkpoint(path: str | Path, require: tuple[str, ...] = MODEL_KEYS,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint dict at ``path``, which must hold the keys ``require`` (MODEL_KEYS or TRAINING_KEYS).

    Raises FileNotFoundError if there is no file, ValueError (naming the path) if it is not a torch
    file, not an ldm-worldmodel checkpoint, or lacks a required key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle, zip and weights_only errors alike
        raise ValueError(f"{str(path)!r} is not a torch file of tensors and plain values: {err}") from err
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an ldm-worldmodel checkpoint (no format {FORMAT!r})")
    missing = [key for key in require if key not in ckpt]
    if missing and "train_config" in missing:
        raise ValueError(f"{str(path)!r} is not a training checkpoint (saved by WorldModel.save; has no "
                         f"{', '.join(missing)})")
    if missing:
        raise ValueError(f"{str(path)!r} is an incomplete checkpoint (has no {', '.join(missing)})")
    return ckpt


# parameter names of checkpoints written before the prior interface (latent norm and prior inside the objective)
_OLD_PREFIXES = {"latent_norm.": "objective.latent_norm.", "objective.latent_model.": "objective.prior.",
                 "target_norm.": None}


def upgrade_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A WorldModel state dict with the parameter names of this version (older names are renamed)."""
    out = {}
    for key, value in state.items():
        for old, new in _OLD_PREFIXES.items():
            if key.startswith(old):
                key = None if new is None else new + key[len(old):]
                break
        if key is not None:
            out[key] = value
    return out
