"""Evaluation of a trained run: held-out linear readout R^2 (the model and its baselines), k-step
predictive NLL / coverage, the text table, the metrics.jsonl record and the PNG figures.

Nothing here tests the env's or the method's name: the env declares its readout targets
(``worldmodel.envs.readout_targets``) and the model says whether it filters (``WorldModel.can_filter``,
a state-space prior), which adds the k-step predictive scores and figure (``worldmodel.objective.kstep_predictive``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from worldmodel.checkpoint import TRAINING_KEYS, read_checkpoint
from worldmodel.evaluation import fit_readout, predictive_metrics
from worldmodel.model import ModelConfig, WorldModel, shift_actions
from worldmodel.objective import kstep_predictive
from worldmodel.training import ddp
from worldmodel.training.config import RUN_CONTROL, TrainConfig, config_difference
from worldmodel.training.data import ensure_dataset, load_split, make_run_env
from worldmodel.training.run import append_jsonl, load_matching_run, load_run, read_metrics

__all__ = ["baseline_model_config", "calibrate", "evaluate", "evaluate_run", "plot_losses",
           "print_eval_table", "readout_features", "readout_targets", "report", "split_features", "write_plots"]


# ---------------------------------------------------------------------------------------- what is read out
def readout_targets(cfg: TrainConfig, state: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """What a linear readout should recover (..., D) from the env state (..., s), and the names: the env
    declares them (``worldmodel.envs.readout_targets``)."""
    from worldmodel import envs

    env = make_run_env(cfg)
    try:
        return envs.readout_targets(env, state)
    finally:
        env.close()


@torch.no_grad()
def _batched(fn, model: WorldModel, data: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
    """cat_i fn(obs, action, mask) over batches of whole episodes, moved to the CPU as float32."""
    device = next(model.parameters()).device
    out = []
    # a bar only on interactive terminals (disable=None), removed when done
    for i in tqdm(range(0, len(data["obs"]), batch_size), desc="encode", leave=False, disable=None, unit="batch"):
        part = {k: v[i:i + batch_size].to(device) for k, v in data.items() if k in ("obs", "action", "mask")}
        out.append(fn(part["obs"], part["action"], part["mask"]).float().cpu())
    return torch.cat(out)


def readout_features(model: WorldModel, data: dict[str, torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """WorldModel.features (filtered state means, or latents for non-Kalman methods) of whole episodes."""
    return _batched(model.features, model, data, batch_size)


def split_features(model: WorldModel, cfg: TrainConfig, train_data: dict, val_data: dict) -> tuple[torch.Tensor, ...]:
    """readout_features of the train and val episodes (computed once, shared by eval and plots)."""
    return readout_features(model, train_data, cfg.eval.batch_size), readout_features(model, val_data,
                                                                                      cfg.eval.batch_size)


# ---------------------------------------------------------------------------------------- scores
def calibrate(model: WorldModel, cfg: TrainConfig, val_data: dict[str, torch.Tensor]) -> None:
    """Recalibrate the model's k-step prediction bands on the held-out episodes ``val_data``, for horizons up to
    max(cfg.eval.ks) (bands fitted on training episodes under-cover held-out ones: 64.8 % at 1 sigma, k = 1, on
    the pendulum; README, "Calibration")."""
    model.calibrate(val_data["obs"], val_data["action"], val_data["mask"], horizon=max(cfg.eval.ks),
                    burn_in=cfg.eval.burn_in, batch_size=cfg.eval.batch_size)


@torch.no_grad()
def evaluate(model: WorldModel, cfg: TrainConfig, train_data: dict, val_data: dict,
             features: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Held-out readout R^2 of the trained model and of the baselines; k-step NLL / coverage (Kalman).
    ``features``: the model's split_features, if already computed."""
    from worldmodel.evaluation import linear_r2

    y_train, names = readout_targets(cfg, train_data["state"])
    y_val, _ = readout_targets(cfg, val_data["state"])
    skip = cfg.eval.burn_in

    def r2(f_train: torch.Tensor, f_val: torch.Tensor) -> list[float]:
        return [float(v) for v in linear_r2(f_train[:, skip:], y_train[:, skip:], f_val[:, skip:], y_val[:, skip:])]

    features = features or split_features(model, cfg, train_data, val_data)
    results: dict[str, Any] = {"targets": names, "r2": {cfg.model.method: r2(*features)}, "predictive": {}}
    device = next(model.parameters()).device
    for baseline in cfg.eval.baselines:
        results["r2"][baseline] = r2(*split_features(_baseline_model(baseline, cfg, device), cfg, train_data,
                                                     val_data))
    if model.can_filter:
        z, variances = model.latents(val_data["obs"], val_data["mask"], cfg.eval.batch_size)
        pred = predictive_metrics(model.prior, z, val_data["action"], horizon=max(cfg.eval.ks),
                                  burn_in=cfg.eval.burn_in, mask=val_data["mask"], R=variances,
                                  folds=cfg.eval.calibration_folds)
        scores = [name for name in pred if name.startswith(("nll", "coverage", "calibrated"))]
        results["predictive"] = {f"k={k}": {name: pred[name][i] for name in scores}
                                 for i, k in enumerate(pred["k"]) if k in cfg.eval.ks}
    return results


def baseline_model_config(model: ModelConfig, method: str) -> ModelConfig:
    """The run's encoder (and the data it reads) with preset ``method``'s default settings."""
    shared = ("encoder", "image_size", "channels", "depth", "pool", "norm", "input_dim", "hidden", "layers",
              "latent_dim", "action_dim")
    return ModelConfig(**{k: getattr(model, k) for k in shared}, method=method)


def _baseline_model(baseline: str, cfg: TrainConfig, device: torch.device) -> WorldModel:
    """'untrained' (the seeded initial model), a finished run directory, or a preset trained now."""
    from worldmodel.training.loop import build_model, train  # train -> evaluate -> a baseline's train

    if baseline == "untrained":
        return build_model(cfg, device).eval()
    if (Path(baseline) / "checkpoint.pt").is_file():
        return load_run(baseline, str(device))[0]
    try:
        model_cfg = baseline_model_config(cfg.model, baseline)
    except ValueError as err:
        raise ValueError(f"--eval.baselines entry {baseline!r} is neither 'untrained', a run directory nor a "
                         f"method: {err}") from None
    sub = dataclasses.replace(
        cfg, name=f"{cfg.name}/baseline-{baseline}", resume=True, max_steps=None, model=model_cfg,
        steps=cfg.eval.baseline_steps or cfg.steps)
    previous = sub.run_dir / "checkpoint.pt"
    if previous.is_file() and config_difference(
            TrainConfig.from_dict(read_checkpoint(previous, require=TRAINING_KEYS)["train_config"]), sub):
        sub = dataclasses.replace(sub, resume=False)  # a baseline of other settings: train it again
    ddp.log(f"training baseline {baseline!r} for {sub.steps} steps in {str(sub.run_dir)!r}")
    with torch.enable_grad():  # evaluate() runs under no_grad
        train(sub, final_eval=False)
    return load_run(sub.run_dir, str(device))[0]


def print_eval_table(results: dict[str, Any]) -> None:
    """Readout R^2 per model and k-step predictive metrics as two small text tables."""
    names = results["targets"]
    width = max(12, *(len(k) for k in results["r2"]))
    print("\nheld-out linear readout R² (filtered means; latents for non-Kalman methods)")
    print(f"{'model':<{width}} " + " ".join(f"{n:>8}" for n in names))
    for model_name, values in results["r2"].items():
        print(f"{model_name:<{width}} " + " ".join(f"{v:8.4f}" for v in values))
    if results["predictive"]:
        calibrated = "calibrated_1sigma" in next(iter(results["predictive"].values()))
        print("\nk-step prediction of held-out encoder latents (nominal coverage 68.3 % / 95.4 %"
              + ("; calibrated: bands recalibrated on the other folds of these episodes)" if calibrated else ")"))
        print(f"{'k':>4} {'NLL/dim':>9} {'cov 1σ':>8} {'cov 2σ':>8}"
              + (f" {'cal 1σ':>8} {'cal 2σ':>8}" if calibrated else ""))
        for k, m in results["predictive"].items():
            print(f"{k[2:]:>4} {m['nll']:9.4f} " + " ".join(
                f"{100 * m[name]:7.1f}%" for name in ("coverage_1sigma", "coverage_2sigma", "calibrated_1sigma",
                                                       "calibrated_2sigma") if name in m))
    print(flush=True)


# ---------------------------------------------------------------------------------------- figures
def plot_losses(run_dir: Path) -> list[Path]:
    """``<run_dir>/loss.png``: every logged training scalar of metrics.jsonl against the step (val_loss in the
    loss panel); [] before the first record."""
    from worldmodel import plots

    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    keys = sorted({k for r in records for k in r} - {"kind", "step", "lr", "elapsed_s", "frames_per_s"},
                  key=lambda k: (k not in ("loss", "val_loss"), k))
    curves = {k: [r[k] for r in records if k in r] for k in keys}
    steps = {k: [r["step"] for r in records if k in r] for k in keys}
    return [plots.loss_curves(steps, curves, run_dir / "loss.png")] if curves else []


@torch.no_grad()
def write_plots(model: WorldModel, cfg: TrainConfig, train_data: dict, val_data: dict,
                features: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[Path]:
    """Loss curves; readout of a held-out episode and the latent space against the true state;
    k-step predictions with 2-sigma bands (models that filter). ``features``: as in ``evaluate``."""
    from worldmodel import plots

    run_dir = cfg.run_dir
    paths = plot_losses(run_dir)

    y_train, names = readout_targets(cfg, train_data["state"])
    skip = cfg.eval.burn_in
    train_features, val_features = features or split_features(model, cfg, train_data, val_data)
    w, c = fit_readout(train_features[:, skip:], y_train[:, skip:])
    y_val, _ = readout_targets(cfg, val_data["state"])
    paths.append(plots.trajectories(y_val[0], run_dir / "readout.png", val_features[0].double() @ w + c, names=names,
                                    title="linear readout of the latent features (held-out episode)"))
    paths.append(plots.latent_scatter(val_features.reshape(-1, val_features.shape[-1]), y_val[..., 0].reshape(-1),
                                      run_dir / "latents.png", names[0]))
    if model.can_filter:
        device = next(model.parameters()).device
        episode = {k: v[:1].to(device) for k, v in val_data.items()}
        z = model.encode(episode["obs"])[0].float().cpu()
        start = min(2 * cfg.eval.burn_in, len(z) - 2)
        horizon = min(2 * max(cfg.eval.ks), len(z) - 1 - start)
        filtered = model.filter(episode["obs"], episode["action"], episode["mask"]).filtered
        starts = torch.tensor([start], device=device)
        pz = kstep_predictive(model.prior, filtered, shift_actions(episode["action"]), starts, horizon)[0]
        dims = min(3, z.shape[-1])
        std = torch.diagonal(pz.cov[0, 0], dim1=-2, dim2=-1).sqrt()[:, :dims].cpu()
        std = std * model.calibration.half_widths(2.0, horizon)[:, :dims].cpu() / 2  # the recalibrated 95.4 % band
        paths.append(plots.kstep_predictions(z[:start + 1 + horizon, :dims], pz.mean[0, 0, :, :dims].cpu(), std, start,
                                             run_dir / "kstep.png", names=[f"z[{i}]" for i in range(dims)]))
    return paths


# ---------------------------------------------------------------------------------------- a run's report
def report(model: WorldModel, cfg: TrainConfig, train_data: dict, val_data: dict, step: int,
           board: Any = None) -> dict[str, Any]:
    """evaluate, print the table, append ``{"kind": "eval", "step": step, ...}`` to metrics.jsonl and
    write the figures (if cfg.plots); with cfg.tensorboard also log the record's scalars and the figures
    to TensorBoard (on ``board``, the train loop's TensorBoardWriter, else a writer of its own); returns
    the results."""
    own = board is None and cfg.tensorboard
    if own:  # before any work: a missing tensorboard package stops here
        from worldmodel.training.tensorboard import TensorBoardWriter

        board = TensorBoardWriter(cfg.run_dir)
    try:
        features = split_features(model, cfg, train_data, val_data)
        results = evaluate(model, cfg, train_data, val_data, features)
        print_eval_table(results)
        record = {"kind": "eval", "step": step, **results}
        append_jsonl(cfg.run_dir / "metrics.jsonl", record)
        paths = write_plots(model, cfg, train_data, val_data, features) if cfg.plots else []
        if board is not None:
            board.record(record)
            board.figures(paths, step)
            board.flush()
        return results
    finally:
        if own:
            board.close()


def evaluate_run(cfg: TrainConfig) -> dict[str, Any]:
    """`eval` subcommand: report on the checkpoint of ``cfg.run_dir`` (its stored settings with cfg's run control)."""
    model, stored, ckpt = load_matching_run(cfg)
    store = ensure_dataset(stored)
    train_data, val_data = load_split(store, stored)
    run_cfg = dataclasses.replace(stored, **{k: getattr(cfg, k) for k in RUN_CONTROL})
    if model.calibration is not None and run_cfg.eval.calibration_folds:
        calibrate(model, run_cfg, val_data)  # as after training (a run from before recalibration: here, unsaved)
    return report(model, run_cfg, train_data, val_data, ckpt["step"])
