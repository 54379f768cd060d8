"""Evaluation of an image-SSL run: linear-probe and kNN accuracy, and (procedural images) the held-out R^2
of the known generative factors, of the backbone features of the trained encoder and of the same
architecture untrained (its seeded initialisation), with a table, a metrics.jsonl record and figures.

The features are the backbone's output before the projector (``ResNetEncoder.features``; a conv
encoder's output, which has no projector), on the images without augmentation, as in SimCLR / VICReg.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from worldmodel.evaluation import knn_accuracy, linear_probe_accuracy, linear_r2
from worldmodel.model import WorldModel
from worldmodel.training.evaluate import plot_losses
from worldmodel.training.loop import build_model
from worldmodel.training.run import append_jsonl

__all__ = ["backbone_features", "evaluate_ssl", "factor_targets"]


@torch.no_grad()
def backbone_features(model: WorldModel, images: Tensor, batch_size: int = 512) -> Tensor:
    """Backbone features (N, F) float64 on the CPU of uint8 images (N, S, S, 3), ``batch_size`` at a time."""
    encoder = model.encoder.encoder
    extract = getattr(encoder, "features", encoder)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return torch.cat([extract(chunk.to(device)).double().cpu() for chunk in images.split(batch_size)])
    finally:
        model.train(was_training)


def factor_targets(factors: Tensor) -> tuple[Tensor, list[str]]:
    """Linear-readout targets (N, 5) of the procedural shapes' factors (N, 6) (``datasets.FACTOR_NAMES``):
    x, y, scale and the hue as a point on the circle (cos, sin of 2 pi hue). The shape is scored by the
    probes, and the rotation is left out (invisible for circles, and periodic per shape)."""
    hue = 2 * math.pi * factors[:, 4].double()
    return torch.stack([factors[:, 1].double(), factors[:, 2].double(), factors[:, 3].double(), hue.cos(), hue.sin()],
                       1), ["x", "y", "scale", "hue_cos", "hue_sin"]


def _scores(features: tuple[Tensor, Tensor], data, cfg) -> dict[str, Any]:
    """Probe and kNN accuracy (with labels) and factor R^2 (with factors) of (train, test) features."""
    (train, test), e = features, cfg.eval
    out: dict[str, Any] = {}
    labelled = data.train_labels[: len(train)] >= 0
    classes = int(data.train_labels.max()) + 1
    if classes >= 2 and bool(labelled.all()) and bool((data.test_labels >= 0).all()):
        ytr, yte = data.train_labels[: len(train)], data.test_labels
        out["probe"] = linear_probe_accuracy(train, ytr, test, yte, num_classes=max(classes, int(yte.max()) + 1))
        out["knn"] = knn_accuracy(train, ytr, test, yte, e.knn_k, e.knn_temperature)
    if data.train_factors is not None:
        y_train, names = factor_targets(data.train_factors[: len(train)])
        y_test, _ = factor_targets(data.test_factors)
        r2 = linear_r2(train, y_train, test, y_test, ridge=1e-6)
        out["r2"] = dict(zip(names, map(float, r2)))
    return out


def evaluate_ssl(model: WorldModel, cfg, data, step: int) -> dict[str, Any]:
    """Score the trained and the untrained encoder (see the module docstring), print the table, append
    ``{"kind": "eval", "step", "probe_accuracy": {<method>: acc, "untrained": acc}, "knn_accuracy": {...},
    "factor_r2": {...}, ...}`` to metrics.jsonl, write loss.png and features.png (cfg.plots); return the record."""
    method, e = cfg.model.method, cfg.eval
    probe_set = data.train[: e.probe_images]
    device = next(model.parameters()).device
    models = {method: model, "untrained": build_model(cfg, device).eval()}
    features = {name: (backbone_features(m, probe_set, e.batch_size), backbone_features(m, data.test, e.batch_size))
                for name, m in models.items()}
    scores = {name: _scores(f, data, cfg) for name, f in features.items()}
    record: dict[str, Any] = {"kind": "eval", "step": step, "source": data.source,
                              "features": f"backbone ({features[method][0].shape[1]}-d, before the projector)",
                              "probe_images": len(probe_set), "test_images": len(data.test)}
    for key, name in (("probe", "probe_accuracy"), ("knn", "knn_accuracy"), ("r2", "factor_r2")):
        if key in scores[method]:
            record[name] = {m: s[key] for m, s in scores.items()}
    if "probe" not in scores[method]:
        print("no class labels (or a single class): linear-probe and kNN accuracy skipped", flush=True)
    print_ssl_table(record)
    append_jsonl(cfg.run_dir / "metrics.jsonl", record)
    if cfg.plots:
        _plots(cfg.run_dir, features[method][1], data)
    return record


def print_ssl_table(record: dict[str, Any]) -> None:
    """The evaluation record as a text table: one row per encoder."""
    r2 = record.get("factor_r2", {})
    names = list(next(iter(r2.values()), {}))
    if not r2 and "probe_accuracy" not in record:
        return
    print(f"\n{record['source']}: {record['features']}, probes fit on {record['probe_images']} images, scored on "
          f"{record['test_images']} held-out images")
    print(f"{'encoder':<16}{'probe acc':>10}{'kNN acc':>10}" + "".join(f"{'R2 ' + n:>12}" for n in names))
    for encoder in record.get("probe_accuracy", r2) or []:
        row = f"{encoder:<16}"
        for key in ("probe_accuracy", "knn_accuracy"):
            row += f"{record[key][encoder]:>10.3f}" if key in record else f"{'-':>10}"
        print(row + "".join(f"{r2[encoder][n]:>12.3f}" for n in names))
    print(flush=True)


def _plots(run_dir: Path, test_features: Tensor, data) -> list[Path]:
    from worldmodel import plots

    paths = plot_losses(run_dir)
    labelled = bool((data.test_labels >= 0).all())  # procedural images: the class is the shape factor
    color, label = (data.test_labels, "class") if labelled else (torch.zeros(len(data.test_labels)), "")
    paths.append(plots.latent_scatter(test_features, color, run_dir / "features.png", label,
                                      title="held-out backbone features"))
    return paths
