"""TensorBoard logging beside metrics.jsonl (``--tensorboard``): rank 0 writes the same scalars as the
metrics.jsonl records and the PNG figures as images to ``<run_dir>/tensorboard/``.

Tags: ``train/<key>`` for every number of a train record (loss, its terms, val_loss, lr, elapsed_s,
frames_per_s) at its step; ``eval/r2/<model>/<target>`` and ``eval/predictive/k=<k>/<metric>`` for the eval
record; ``figures/<name>`` for ``<name>.png``. ``tensorboard`` (the package) is imported only when the
option is on; without it the run stops before training with an error saying how to install it.

Like metrics.jsonl, the log follows the run: a fresh run removes the event files of an earlier run of
the same name, and a resumed run hides the events logged after its checkpoint (SummaryWriter's
``purge_step``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

__all__ = ["TensorBoardMissing", "TensorBoardWriter", "flatten_record"]


class TensorBoardMissing(ImportError, ValueError):
    """--tensorboard without the tensorboard package (a ValueError too: train.py reports it as a bad setting)."""


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch raises ImportError when tensorboard is not installed
        raise TensorBoardMissing(
            f"--tensorboard needs the tensorboard package ({err}); install it with `pip install tensorboard` "
            f"(or `pip install 'ldm-worldmodel[tensorboard]'`), or run without --tensorboard") from None
    return SummaryWriter


def flatten_record(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{tag: value} of every finite number in a (nested) metrics record: dict keys joined with '/', lists
    indexed by the record's ``targets`` names where they match in length (readout R^2 per target), else
    by position; strings, booleans, ``kind`` and ``step`` are left out."""
    names = record.get("targets") if isinstance(record.get("targets"), list) else None
    out: dict[str, float] = {}

    def visit(value: Any, tag: str) -> None:
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, (int, float)):
            if math.isfinite(value):
                out[tag] = float(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                visit(item, f"{tag}/{key}")
        elif isinstance(value, (list, tuple)):
            labels = names if names is not None and len(names) == len(value) else range(len(value))
            for label, item in zip(labels, value):
                visit(item, f"{tag}/{label}")

    for key, value in record.items():
        if key not in ("kind", "step", "targets"):
            visit(value, f"{prefix}{key}")
    return out


class TensorBoardWriter:
    """A SummaryWriter on ``<run_dir>/tensorboard/`` (see the module docstring). ``fresh``: a new run
    (earlier event files there are removed); ``resume_step``: the checkpoint's step of a resumed run
    (events logged after it are purged). TensorBoardMissing without the tensorboard package."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, fresh: bool = False):
        SummaryWriter = _summary_writer()
        self.log_dir = Path(run_dir) / "tensorboard"
        if fresh and self.log_dir.is_dir():
            for old in self.log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        purge = None if resume_step is None else resume_step + 1
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)

    def record(self, record: dict[str, Any], step: int | None = None) -> None:
        """The numbers of one metrics.jsonl record, under ``<kind>/`` at ``step`` (default: the record's)."""
        step = record.get("step", 0) if step is None else step
        for tag, value in flatten_record(record, f"{record.get('kind', 'train')}/").items():
            self._writer.add_scalar(tag, value, step)

    def figures(self, paths: Iterable[str | Path], step: int) -> None:
        """PNG figures as images ``figures/<stem>``."""
        import matplotlib.image

        for path in paths:
            path = Path(path)
            image = matplotlib.image.imread(path)  # (H, W, 3 or 4) floats in [0, 1] for a PNG
            if image.ndim == 2:
                image = image[..., None].repeat(3, -1)
            self._writer.add_image(f"figures/{path.stem}", image[..., :3], step, dataformats="HWC")

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
