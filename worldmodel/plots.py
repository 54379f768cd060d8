"""Matplotlib figures (Agg backend, no display needed): loss curves, trajectories against the true
state (readouts, online filter replays with dropped frames, k-step predictions with 2-sigma bands),
the surprise trace of an online replay and a 2-D view of the latent space.

Every function takes numpy arrays (or tensors) and an output path, writes one PNG and returns the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["control_episode", "control_returns", "filter_replay", "kstep_predictions", "latent_scatter", "loss_curves", "surprise_trace", "trajectories"]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _as_columns(x: Any, name: str) -> np.ndarray:
    a = _np(x)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape (T,) or (T, d), got {a.shape}")
    return a


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_curves(steps: dict[str, Any], curves: dict[str, Any], path: str | Path, title: str = "training") -> Path:
    """Training curves: ``curves[name]`` (N,) against ``steps[name]`` (N,), one panel per name, with
    ``val_<name>`` drawn in the panel of ``<name>``. Positive curves spanning > 1 decade get a log axis."""
    if not curves:
        raise ValueError("curves must contain at least one series")
    panels: dict[str, list[str]] = {}
    for name in curves:
        base = name[4:] if name.startswith("val_") and name[4:] in curves else name
        panels.setdefault(base, []).append(name)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False, layout="constrained")
    for ax, (panel, names) in zip(axes.flat, panels.items()):
        for name in names:
            y, x = _np(curves[name]).reshape(-1), _np(steps[name]).reshape(-1)
            if x.shape != y.shape:
                raise ValueError(f"steps[{name!r}] and curves[{name!r}] must have the same length, got {x.shape}, "
                                 f"{y.shape}")
            ax.plot(x, y, lw=1.4, label="validation" if name != panel else "train")
            finite = y[np.isfinite(y)]
            if len(finite) and finite.min() > 0 and finite.max() > 10 * finite.min():
                ax.set_yscale("log")
        if len(names) > 1:
            ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.set_title(panel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)


def trajectories(true: Any, path: str | Path, pred: Any = None, std: Any = None, *, time: Any = None,
                 pred_time: Any = None, names: Sequence[str] | None = None, observed: Any = None,
                 title: str = "", pred_label: str = "model", event: tuple[int, int] | None = None) -> Path:
    """True trajectories (T, d) and optional model predictions (T', d) with +-2 std bands, one panel per
    component. ``pred_time`` (T',) places predictions on the time axis (default: same as ``time``);
    ``observed`` (T,) bool shades the steps whose frame was dropped (False); ``event`` (start, stop)
    shades the steps start..stop-1 of an injected event (indices into ``time``)."""
    y = _as_columns(true, "true")
    t = np.arange(len(y)) if time is None else _np(time).reshape(-1)
    if len(t) != len(y):
        raise ValueError(f"time must have length {len(y)}, got {len(t)}")
    d = y.shape[1]
    names = list(names) if names is not None else [f"x{i}" for i in range(d)]
    if len(names) != d:
        raise ValueError(f"names must have {d} entries, got {len(names)}")
    fig, axes = plt.subplots(d, 1, figsize=(8, 1.9 * d + 0.6), sharex=True, squeeze=False)
    if pred is not None:
        p = _as_columns(pred, "pred")
        tp = t if pred_time is None else _np(pred_time).reshape(-1)
        if p.shape[1] != d or len(tp) != len(p):
            raise ValueError(f"pred must have shape ({len(tp)}, {d}), got {p.shape}")
        s = None if std is None else _as_columns(std, "std")
        if s is not None and s.shape != p.shape:
            raise ValueError(f"std must have the shape of pred {p.shape}, got {s.shape}")
    for i, ax in enumerate(axes[:, 0]):
        ax.plot(t, y[:, i], color="k", lw=1.3, label="true")
        if pred is not None:
            ax.plot(tp, p[:, i], color="C0", lw=1.3, label=pred_label)
            if s is not None:
                ax.fill_between(tp, p[:, i] - 2 * s[:, i], p[:, i] + 2 * s[:, i], color="C0", alpha=0.25,
                                lw=0, label="±2σ")
        if observed is not None:
            dropped = ~np.asarray(_np(observed).reshape(-1), dtype=bool)
            for j in np.flatnonzero(dropped):
                ax.axvspan(t[j] - 0.5 * _step(t), t[j] + 0.5 * _step(t), color="C3", alpha=0.15, lw=0)
        if event is not None:
            _shade_event(ax, t, event)
        ax.set_ylabel(names[i])
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=8, ncol=3)
    if observed is not None and (~np.asarray(_np(observed), dtype=bool)).any():
        axes[0, 0].set_title(f"{title}  (red: dropped frames)" if title else "red: dropped frames")
    elif title:
        axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("step")
    return _save(fig, path)


def _step(t: np.ndarray) -> float:
    return float(np.median(np.diff(t))) if len(t) > 1 else 1.0


def _shade_event(ax: plt.Axes, t: np.ndarray, event: tuple[int, int], label: str | None = None) -> None:
    start, stop = int(event[0]), int(event[1])
    if not 0 <= start < stop <= len(t):
        raise ValueError(f"event must be (start, stop) with 0 <= start < stop <= {len(t)}, got {event}")
    half = 0.5 * _step(t)
    ax.axvspan(t[start] - half, t[stop - 1] + half, color="C1", alpha=0.2, lw=0, label=label)


def filter_replay(true: Any, mean: Any, std: Any, observed: Any, path: str | Path,
                  names: Sequence[str] | None = None, event: tuple[int, int] | None = None) -> Path:
    """Online filter beliefs (read out to state space) with 2-sigma bands against the true state;
    dropped frames shaded (red), an injected event's steps start..stop-1 too (orange)."""
    title = "online filter replay" + ("" if event is None else "  (orange: injected event)")
    return trajectories(true, path, mean, std, names=names, observed=observed, title=title, pred_label="belief",
                        event=event)


def surprise_trace(surprise: Any, path: str | Path, threshold: float | None = None,
                   event: tuple[int, int] | None = None, observed: Any = None, event_label: str = "") -> Path:
    """Surprise -log p(z_t | past) (T,) of an online replay (NaN at dropped frames, which are shaded red),
    with a reference level ``threshold`` (the 99th percentile of normal frames) as a dashed line and an
    injected event's steps start..stop-1 shaded orange."""
    s = _np(surprise).reshape(-1)
    t = np.arange(len(s))
    fig, ax = plt.subplots(figsize=(8, 2.8))
    ax.plot(t, s, color="C0", lw=1.3, marker=".", ms=3, label="surprise")
    if threshold is not None and np.isfinite(threshold):
        ax.axhline(threshold, color="k", ls="--", lw=1, label="99th pct. of normal frames")
    if observed is not None:
        dropped = ~np.asarray(_np(observed).reshape(-1), dtype=bool)
        if len(dropped) != len(s):
            raise ValueError(f"observed must have length {len(s)}, got {len(dropped)}")
        for j in np.flatnonzero(dropped):
            ax.axvspan(t[j] - 0.5, t[j] + 0.5, color="C3", alpha=0.15, lw=0)
    if event is not None:
        _shade_event(ax, t, event, label=event_label or "injected event")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("-log p(z_t | past) [nats]")
    ax.set_title("surprise of each new frame under the filter's one-step prediction")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def kstep_predictions(true: Any, mean: Any, std: Any, start: int, path: str | Path,
                      names: Sequence[str] | None = None) -> Path:
    """Open-loop k-step prediction from step ``start``: ``true`` (T, d) targets, ``mean``/``std`` (H, d)
    predictive moments of steps start+1 .. start+H, drawn with 2-sigma bands."""
    horizon = len(_as_columns(mean, "mean"))
    return trajectories(true, path, mean, std, pred_time=np.arange(start + 1, start + 1 + horizon), names=names,
                        title=f"open-loop prediction from step {start}", pred_label="prediction")


def latent_scatter(latents: Any, color: Any, path: str | Path, color_label: str = "", title: str = "latent means") -> Path:
    """The first two principal components of latents (N, n), coloured by a true quantity (N,)."""
    z = _as_columns(latents, "latents")
    c = _np(color).reshape(-1)
    if len(c) != len(z):
        raise ValueError(f"color must have length {len(z)}, got {len(c)}")
    zc = z - z.mean(0)
    _, _, vt = np.linalg.svd(zc, full_matrices=False)
    pcs = zc @ vt[:2].T
    if pcs.shape[1] == 1:
        pcs = np.concatenate([pcs, np.zeros_like(pcs)], 1)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    points = ax.scatter(pcs[:, 0], pcs[:, 1], c=c, s=5, cmap="twilight" if "theta" in color_label else "viridis")
    fig.colorbar(points, ax=ax, label=color_label)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    return _save(fig, path)


def control_returns(record: dict, path: str | Path, key: str = "returns") -> Path:
    """Closed-loop evaluation of ``train.py control``: ``record[key]`` (returns, or final goal errors) of every
    evaluation episode per policy (dots, with the mean as a bar), and the returns of the episodes collected during
    the loop in order (seed, then MPC)."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.4), layout="constrained")
    for i, (name, values) in enumerate(record[key].items()):
        values = _np(values)
        ax.bar(i, values.mean(), color=f"C{i}", alpha=0.35)
        ax.plot(np.full(len(values), i) + np.linspace(-0.2, 0.2, len(values)), values, "o", color=f"C{i}", ms=4)
    ax.set_xticks(range(len(record[key])), list(record[key]))
    score = f", score {record['score']:.2f}" if "score" in record else ""
    ax.set(ylabel=key.replace("_", " "), title=f"evaluation ({len(record['seeds'])} seeds{score})")
    collected = _np(record.get("collected_returns", []))
    bx.plot(np.arange(len(collected)), collected, ".", color="0.3")
    bx.set(xlabel="collected episode", ylabel="return", title="data collection (random seed episodes, then MPC)")
    return _save(fig, path)


def control_episode(frames: Any, truth: Any, readout: Any, names: Sequence[str], trace: Any, path: str | Path,
                    n_frames: int = 10, trace_label: str = "reward", goal: Any = None) -> Path:
    """One closed-loop episode: a filmstrip of ``n_frames`` frames (T, H, W, C) spread over the episode (then the goal
    frame, when given), the true readout targets (T, D) against their linear readout from the filter's beliefs, and a
    per-step trace (T,) (the reward, or the goal error)."""
    frames, truth, readout, trace = np.asarray(frames), _as_columns(truth, "truth"), _as_columns(readout, "readout"), _np(trace)
    T = len(frames)
    picks = np.linspace(0, T - 1, min(n_frames, T)).astype(int)
    shown = [(frames[t], f"t={t}") for t in picks] + ([] if goal is None else [(np.asarray(goal), "goal")])
    fig = plt.figure(figsize=(1.2 * len(shown), 5.2), layout="constrained")
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=[1.0, 1.6, 1.0])
    for ax, (image, title) in zip(top.subplots(1, len(shown)), shown):
        ax.imshow(image)
        ax.set_axis_off()
        ax.set_title(title, fontsize=8)
    ax = middle.subplots()
    for d in range(truth.shape[1]):
        ax.plot(truth[:, d], color=f"C{d}", label=names[d])
        ax.plot(readout[:, d], "--", color=f"C{d}")
    ax.set(ylabel="true (solid), belief readout (dashed)")
    ax.legend(fontsize=7, ncol=min(4, truth.shape[1]), loc="upper right")
    bx = bottom.subplots()
    bx.plot(trace, color="0.3")
    bx.set(xlabel="step", ylabel=trace_label)
    return _save(fig, path)
