"""One configuration under several seeds: ``python train.py --seeds 0 1 2``.

Each seed is an ordinary run, ``<name>-seed<S>`` on its own data set ``<data>-seed<S>.zarr`` (the seed draws
the episodes too, so the spread covers the data as well as the initialisation and the windows). A seed whose
run has finished with the same settings is not trained again, an interrupted one resumes, so the command
can be repeated after Ctrl-C. The summary (mean, standard deviation, min and max over the seeds of every
held-out readout R^2 and of the k-step NLL and coverages) is printed and written to ``<name>/seeds.json``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from worldmodel.training.config import TrainConfig, config_difference
from worldmodel.training.run import read_metrics

__all__ = ["seed_config", "summarize_seeds", "train_seeds"]


def seed_config(cfg: TrainConfig, seed: int) -> TrainConfig:
    """The run of one seed: name ``<name>-seed<S>``, data ``<data>-seed<S>.zarr`` (``cfg`` resolved)."""
    data = Path(cfg.data)
    return dataclasses.replace(cfg, seed=seed, seeds=(), name=f"{cfg.name}-seed{seed}",
                               data=str(data.with_name(f"{data.stem}-seed{seed}{data.suffix}")))


def _finished_eval(cfg: TrainConfig) -> dict | None:
    """The final eval record of a finished run of exactly these settings, else None."""
    config_file, metrics = cfg.run_dir / "config.json", cfg.run_dir / "metrics.jsonl"
    if not (config_file.is_file() and metrics.is_file()):
        return None
    try:
        stored = TrainConfig.from_dict(json.loads(config_file.read_text()))
    except (ValueError, TypeError):
        return None
    evals = [r for r in read_metrics(metrics) if r.get("kind") == "eval" and r.get("step") == cfg.steps]
    return evals[-1] if evals and not config_difference(stored, cfg) else None


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "min": min(values),
            "max": max(values)}


def summarize_seeds(records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean, std (population), min and max over the seeds of each eval record's R^2 (per model and readout
    target) and k-step metrics. ``records``: seed -> the run's eval record (``training.evaluate.evaluate``)."""
    first = next(iter(records.values()))
    runs = list(records.values())
    summary: dict[str, Any] = {"seeds": list(records), "targets": first["targets"], "r2": {}, "predictive": {}}
    for model in first["r2"]:
        summary["r2"][model] = [_spread([r["r2"][model][i] for r in runs]) for i in range(len(first["targets"]))]
    for k, metrics in first["predictive"].items():
        summary["predictive"][k] = {name: _spread([r["predictive"][k][name] for r in runs]) for name in metrics
                                    if all(name in r["predictive"].get(k, {}) for r in runs)}  # older runs: fewer
    return summary


def print_seed_table(summary: dict[str, Any]) -> None:
    """The summary as text: mean ± std [min, max] per readout target and per k."""
    def cell(s: dict, scale: float = 1.0) -> str:
        return f"{scale * s['mean']:.4f} ± {scale * s['std']:.4f} [{scale * s['min']:.4f}, {scale * s['max']:.4f}]"

    print(f"\nover seeds {summary['seeds']}: held-out linear readout R² (filtered means; latents for non-Kalman "
          "methods), mean ± std [min, max]")
    for model, per_target in summary["r2"].items():
        for name, s in zip(summary["targets"], per_target):
            print(f"  {model:<12} {name:<14} {cell(s)}")
    if summary["predictive"]:
        print("k-step prediction of held-out encoder latents (nominal coverage 68.3 % / 95.4 %)")
        for k, metrics in summary["predictive"].items():
            print(f"  {k:<5} " + "   ".join(f"{name} {cell(s)}" for name, s in metrics.items()))
    print(flush=True)


def train_seeds(cfg: TrainConfig) -> dict[str, Any]:
    """Train and evaluate ``cfg`` once per seed of ``cfg.seeds`` (see the module docstring); returns the summary."""
    from worldmodel.training import ddp
    from worldmodel.training.loop import train

    cfg = cfg.resolved()
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ValueError(f"--seeds must be distinct, got {list(cfg.seeds)}")
    records = {}
    for seed in cfg.seeds:
        run = seed_config(cfg, seed)
        record = _finished_eval(run)
        if record is None:
            ddp.log(f"seed {seed}: training {str(run.run_dir)!r}")
            train(dataclasses.replace(run, resume=True))
            record = _finished_eval(run)
        else:
            ddp.log(f"seed {seed}: {str(run.run_dir)!r} has finished with these settings; using its evaluation")
        records[seed] = record
    if ddp.rank() != 0:
        return {}
    summary = summarize_seeds(records)
    print_seed_table(summary)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "seeds.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
