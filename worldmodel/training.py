"""Training, evaluation and online-filter replay of a WorldModel: the library behind ``train.py``.

Everything a run writes lives in ``<out_dir>/<name>/``: ``config.json``, ``metrics.jsonl`` (one JSON
object per logged step, ``{"kind": "train", ...}``, plus ``{"kind": "eval", ...}`` records),
``checkpoint.pt`` (model, optimizer, RNG states, step; written atomically) and PNG plots.

Exact resume: the windows of step s are drawn from a generator seeded by (seed, s) and the learning
rate is a function of s, so a run interrupted at step k and resumed from its checkpoint (model,
optimizer and torch/numpy/python RNG states of every rank) replays steps k+1.. bit for bit.

Distributed (``torchrun --nproc_per_node=N train.py``): every rank draws the same global batch of
``batch_size`` windows and trains on its contiguous slice; DDP averages gradients; only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from worldmodel import __version__
from worldmodel.cli import config_from_dict
from worldmodel.evaluation import fit_readout
from worldmodel.model import CHECKPOINT_FORMAT, ModelConfig, WorldModel

__all__ = ["RUN_CONTROL", "EvalConfig", "FilterConfig", "TrainConfig", "evaluate_run", "load_run", "replay_filter", "train"]


@dataclass
class EvalConfig:
    """Final evaluation: held-out linear readout R^2 and k-step predictive NLL / coverage."""

    ks: tuple[int, ...] = field(default=(1, 5, 10), metadata={"help": "prediction horizons k to report"})
    burn_in: int = field(default=5, metadata={
        "help": "first steps of every episode left out of readout fits and scores, and before the first k-step "
                "prediction (filter warm-up)"})
    baselines: tuple[str, ...] = field(default=("untrained",), metadata={
        "help": "rows added to the readout table: 'untrained' (the initial encoder), a preset name of "
                "worldmodel.methods (trained now with this config, e.g. vicreg) or a run directory"})
    baseline_steps: int | None = field(default=None, metadata={
        "help": "training steps of preset baselines (none = same as --steps)"})
    batch_size: int = field(default=32, metadata={"help": "episodes per forward pass when encoding"})

    def __post_init__(self):
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"eval.ks must be a non-empty list of horizons >= 1, got {self.ks}")
        if self.burn_in < 0 or self.batch_size < 1:
            raise ValueError(f"eval.burn_in must be >= 0 and eval.batch_size >= 1, got {self.burn_in}, "
                             f"{self.batch_size}")


@dataclass
class FilterConfig:
    """`filter` subcommand: replay one episode through WorldModel.step, one frame at a time."""

    episode: int = field(default=0, metadata={"help": "index of the held-out episode to replay"})
    live: bool = field(default=False, metadata={"help": "replay a fresh env episode instead of a stored one"})
    length: int | None = field(default=None, metadata={"help": "steps of a live episode (none = episode length)"})
    drop: tuple[int, ...] = field(default=(), metadata={
        "help": "dropped-frame ranges as start stop pairs, e.g. 40 60 (frames start..stop-1 are withheld)"})
    drop_prob: float = field(default=0.0, metadata={"help": "probability of dropping each further frame"})
    seed: int = field(default=1234, metadata={"help": "seed of live episodes and random frame drops"})

    def __post_init__(self):
        if len(self.drop) % 2:
            raise ValueError(f"filter.drop takes start stop pairs, got {self.drop}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"filter.drop_prob must be in [0, 1), got {self.drop_prob}")


# fields that do not change what is trained: a resumed run may change them freely
RUN_CONTROL = ("name", "out_dir", "device", "num_workers", "compile", "max_steps", "resume", "log_every",
                "ckpt_every", "eval", "filter", "progress", "plots")


@dataclass
class TrainConfig:
    """Everything a run needs; ``train.py`` generates its flags from these fields."""

    name: str = field(default="pendulum-kalman", metadata={"help": "run name: files go to <out_dir>/<name>/"})
    out_dir: str = field(default="runs", metadata={"help": "parent directory of runs"})
    data: str = field(default="data/pendulum-f0.5.zarr", metadata={
        "help": "rollout store; built with the env and an Ornstein-Uhlenbeck policy if missing (or topped up "
                "if it was built so and is short of episodes)"})
    env: str = field(default="pendulum", metadata={"help": "environment of worldmodel.envs used to build the data"})
    env_kwargs: dict = field(default_factory=lambda: {"friction": 0.5}, metadata={
        "help": "JSON keyword arguments of make_env (friction 0.5: few full rotations, so theta_dot is linearly "
                "recoverable from a linear-Gaussian filter)"})
    train_episodes: int = field(default=200, metadata={"help": "episodes used for training (the first ones)"})
    val_episodes: int = field(default=40, metadata={"help": "held-out episodes (after the training ones)"})
    episode_length: int = field(default=100, metadata={"help": "steps per collected episode"})
    window: int = field(default=32, metadata={"help": "training sequence length L"})
    batch_size: int = field(default=16, metadata={"help": "global batch of windows per step (split over ranks)"})
    steps: int = field(default=1500, metadata={"help": "optimizer steps (sets the learning-rate schedule)"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate of the encoder (AdamW)"})
    warmup: int = field(default=50, metadata={"help": "linear warm-up steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay ends at lr * min_lr_ratio"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=10.0, metadata={"help": "max global gradient norm (0 = off)"})
    seed: int = field(default=0, metadata={"help": "seed of the model init, window sampling and data collection"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    num_workers: int = field(default=0, metadata={
        "help": "0: train from the episodes loaded into memory; N > 0: stream windows from the store with N "
                "DataLoader workers (same batches; for data sets larger than memory)"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the training loss (minutes of compilation on CPU)"})
    log_every: int = field(default=25, metadata={"help": "steps between metrics.jsonl records"})
    ckpt_every: int = field(default=250, metadata={"help": "steps between periodic checkpoints"})
    max_steps: int | None = field(default=None, metadata={
        "help": "stop (with a checkpoint) at this step without changing the schedule; continue with --resume"})
    resume: bool = field(default=False, metadata={"help": "continue the run in <out_dir>/<name>/ from its checkpoint"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars"})
    plots: bool = field(default=True, metadata={"help": "write PNG figures after training / eval"})
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)

    def __post_init__(self):
        positive = ("train_episodes", "val_episodes", "episode_length", "window", "batch_size", "steps", "log_every",
                    "ckpt_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.window > self.episode_length:
            raise ValueError(f"window ({self.window}) must not exceed episode_length ({self.episode_length})")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return config_from_dict(cls, data)


def config_difference(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Dotted names of the fields (other than run-control ones) in which two configs differ."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if not prefix and k in RUN_CONTROL:
                continue
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "env_kwargs" else {prefix + k: v})
        return out
    fa, fb = flat(a.to_dict()), flat(b.to_dict())
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


# ---------------------------------------------------------------------------------------- utilities
def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _log(*args) -> None:
    if _rank() == 0:
        print(*args, flush=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ and device.index is None:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------- data
def ensure_dataset(cfg: TrainConfig):
    """Open ``cfg.data``, building it (or topping it up) with ``collect`` and an OU policy if it holds
    fewer than train_episodes + val_episodes episodes. Raises SystemExit on an incompatible store."""
    from worldmodel.datasets import RolloutStore, collect, ou_policy
    from worldmodel.envs import make_env

    needed = cfg.train_episodes + cfg.val_episodes
    path = Path(cfg.data)
    store = None
    if path.exists():
        try:
            store = RolloutStore.open(path)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"error: cannot use the dataset at {str(path)!r}: {err}") from None
        _check_store(store, cfg)
        if len(store) >= needed:
            return store
    env = make_env(cfg.env, image_size=cfg.model.image_size, **cfg.env_kwargs)
    if store is not None and (store.meta.get("env_id") != env.spec.id or store.meta.get("seed") != cfg.seed):
        env.close()
        what = "is empty (0 episodes)" if len(store) == 0 else f"has {len(store)} episodes"
        raise SystemExit(f"error: the dataset {str(path)!r} {what} but {needed} are needed (train_episodes="
                         f"{cfg.train_episodes} + val_episodes={cfg.val_episodes}), and it was not built by train.py "
                         f"for env={cfg.env!r}, seed={cfg.seed}, so it is not extended; pass another --data path")
    _log(f"building dataset {str(path)!r}: {needed - (len(store) if store else 0)} episodes of "
         f"{cfg.episode_length} steps ({cfg.env}, Ornstein-Uhlenbeck actions)")
    try:
        store = collect(env, ou_policy(env), needed, cfg.episode_length, store or path, seed=cfg.seed,
                        progress=cfg.progress)
    except ValueError as err:
        raise SystemExit(f"error: cannot extend the dataset at {str(path)!r}: {err}; pass a new --data path") from None
    finally:
        env.close()
    _check_store(store, cfg)
    return store


def _check_store(store, cfg: TrainConfig) -> None:
    """SystemExit unless the store's frames and actions fit the model config."""
    (height, width, channels), model = store.obs_shape, cfg.model
    where = f"the dataset {str(store.path)!r}"
    if (height, width) != (model.image_size, model.image_size):
        raise SystemExit(f"error: {where} holds {height}x{width} images but the model expects image_size="
                         f"{model.image_size}; pass --data with another path (it is built) or --model.image-size "
                         f"{height}")
    if channels != model.channels:
        raise SystemExit(f"error: {where} holds {channels}-channel images; pass --model.channels {channels}")
    if store.action_dim != model.action_dim:
        raise SystemExit(f"error: {where} holds {store.action_dim}-dimensional actions; pass --model.action-dim "
                         f"{store.action_dim}")
    built = store.meta.get("make_env")  # recorded by collect for envs from worldmodel.envs.make_env
    wanted = {"name": cfg.env, "kwargs": {"image_size": model.image_size, **cfg.env_kwargs}}
    if built is not None and built != json.loads(json.dumps(wanted)):
        raise SystemExit(f"error: {where} was built with make_env({built['name']!r}, **{built['kwargs']}) but this run "
                         f"asks for make_env({cfg.env!r}, **{wanted['kwargs']}); pass another --data path")


def load_split(store, cfg: TrainConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(train, val) episodes in memory: obs uint8 (N, T, H, W, C), action (N, T, a), state (N, T, s),
    mask bool (N, T) (True = frame observed).

    Train = the first train_episodes episodes, val = the next val_episodes; T = the store's episode
    length (shorter episodes are zero-padded; windows never reach the padding)."""
    needed = cfg.train_episodes + cfg.val_episodes
    if len(store) == 0:
        raise SystemExit(f"error: the dataset {str(store.path)!r} is empty (0 episodes)")
    if len(store) < needed:
        raise SystemExit(f"error: the dataset {str(store.path)!r} has {len(store)} episodes, {needed} needed "
                         f"(train_episodes={cfg.train_episodes} + val_episodes={cfg.val_episodes})")
    if store.lengths()[:needed].max() < cfg.window:
        raise SystemExit(f"error: the episodes of {str(store.path)!r} are shorter than window={cfg.window}")

    def stack(indices) -> dict[str, torch.Tensor]:
        keys = ("obs", "action", "state", "mask")
        episodes = [store.window(int(i), 0, store.episode_length, keys=keys) for i in indices]
        return {key: torch.from_numpy(np.stack([e[key] for e in episodes])) for key in keys}

    return stack(range(cfg.train_episodes)), stack(range(cfg.train_episodes, needed))


class WindowSampler:
    """Window indices of step s: ``batch_size`` draws from a generator seeded by (seed, s); rank r keeps
    its contiguous slice of this global batch. Stateless, hence exactly resumable."""

    def __init__(self, n_windows: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if batch_size % world:
            raise SystemExit(f"error: batch_size={batch_size} must be divisible by the number of ranks ({world})")
        self.n, self.batch, self.seed = n_windows, batch_size, seed
        self.lo, self.hi = rank * batch_size // world, (rank + 1) * batch_size // world

    def __call__(self, step: int) -> list[int]:
        return np.random.default_rng([self.seed, step]).integers(0, self.n, self.batch)[self.lo:self.hi].tolist()


class _StepBatches(torch.utils.data.Sampler):
    """DataLoader batch_sampler yielding the window indices of steps start+1 .. stop."""

    def __init__(self, sampler: WindowSampler, start: int, stop: int):
        self.sampler, self.start, self.stop = sampler, start, stop

    def __iter__(self):
        return (self.sampler(step) for step in range(self.start + 1, self.stop + 1))

    def __len__(self) -> int:
        return self.stop - self.start


def window_batch(windows, data: dict[str, torch.Tensor], indices: list[int], first_episode: int = 0):
    """Windows ``indices`` of SequenceWindows ``windows``, gathered from in-memory episodes ``data``
    (whose row 0 is store episode ``first_episode``): dict of (B, L, ...) tensors."""
    located = np.array([windows.locate(i) for i in indices]).reshape(-1, 2)
    episode = torch.as_tensor(located[:, 0] - first_episode)[:, None]
    t = torch.as_tensor(located[:, 1])[:, None] + torch.arange(windows.length)
    return {key: value[episode, t] for key, value in data.items()}


def train_batches(cfg: TrainConfig, windows, data: dict[str, torch.Tensor], sampler: WindowSampler, start: int,
                  stop: int):
    """Batches of steps start+1 .. stop: gathered from memory (num_workers=0) or streamed from the store
    by DataLoader workers; both give the same windows."""
    if cfg.num_workers == 0:
        return (window_batch(windows, data, sampler(step)) for step in range(start + 1, stop + 1))
    return iter(torch.utils.data.DataLoader(windows, batch_sampler=_StepBatches(sampler, start, stop),
                                            num_workers=cfg.num_workers, persistent_workers=False))


# ---------------------------------------------------------------------------------------- model
class _LossModule(nn.Module):
    """forward = WorldModel.loss, so DDP sees (and synchronises) the training computation."""

    def __init__(self, model: WorldModel):
        super().__init__()
        self.model = model

    def forward(self, frames: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor):
        return self.model.loss(frames, actions, mask)


def make_optimizer(model: WorldModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over ``model.param_groups`` (Kalman parameters at lr * kalman_lr_multiplier); every group
    remembers its peak rate as ``base_lr`` for the schedule."""
    groups = [{**group, "base_lr": group["lr"]} for group in model.param_groups(cfg.lr)]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


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
        raise SystemExit(f"error: cannot build the model: {err}") from err


# ---------------------------------------------------------------------------------------- checkpoints
def _checkpoint(model: WorldModel, optimizer, cfg: TrainConfig, step: int, rng: list) -> dict:
    """WorldModel.save's format (so ``WorldModel.load(checkpoint.pt)`` works) plus the training state."""
    return {"format": CHECKPOINT_FORMAT, "version": __version__, "config": cfg.model.to_dict(),
            "state_dict": model.state_dict(), "train_config": cfg.to_dict(), "step": step,
            "optimizer": optimizer.state_dict(), "rng": rng}


def _gather_rng() -> list:
    states = [None] * _world()
    if _world() > 1:
        dist.all_gather_object(states, _rng_state())
    else:
        states[0] = _rng_state()
    return states


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint; SystemExit with a clear message if absent or not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: no checkpoint at {str(path)!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise SystemExit(f"error: cannot read checkpoint {str(path)!r}: {err}") from err
    if not isinstance(ckpt, dict) or not {"train_config", "state_dict", "step"} <= ckpt.keys():
        raise SystemExit(f"error: {str(path)!r} is not a train.py checkpoint")
    return ckpt


def load_run(run_dir: str | Path, device: str = "cpu") -> tuple[WorldModel, TrainConfig, dict]:
    """(model in eval mode, config, checkpoint) of a finished or interrupted run."""
    ckpt = load_checkpoint(Path(run_dir) / "checkpoint.pt")
    cfg = TrainConfig.from_dict(ckpt["train_config"])
    model = WorldModel.from_config(cfg.model)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise SystemExit(f"error: checkpoint in {str(run_dir)!r} does not match its config: {err}") from None
    return model.to(_device(device)).eval(), cfg, ckpt


# ---------------------------------------------------------------------------------------- training
class _StopFlag:
    """SIGINT/SIGTERM set a flag checked between steps (a second Ctrl-C interrupts immediately)."""

    def __init__(self):
        self.set = False
        self._previous = {}

    def _handle(self, signum, frame):
        self.set = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _log(f"\nsignal {signum}: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _init_distributed(device: torch.device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)


def _prepare_run(cfg: TrainConfig) -> tuple[int, dict | None]:
    """Resume bookkeeping on rank 0: (start step, checkpoint or None); writes nothing."""
    run_dir = cfg.run_dir
    ckpt_path = run_dir / "checkpoint.pt"
    ckpt = None
    if cfg.resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        stored = TrainConfig.from_dict(ckpt["train_config"])
        diff = config_difference(stored, cfg)
        if diff:
            raise SystemExit(f"error: checkpoint {str(ckpt_path)!r} comes from another config (differs in "
                             f"{', '.join(diff)}); resume with the same settings or choose another --name")
        if ckpt["step"] >= cfg.steps and not cfg.max_steps:
            _log(f"run {str(run_dir)!r} already finished {ckpt['step']} steps")
    elif cfg.resume:
        _log(f"no checkpoint in {str(run_dir)!r}; starting from scratch")
    elif ckpt_path.is_file():
        _log(f"note: starting {str(run_dir)!r} over (its checkpoint is replaced; --resume would continue it)")
    return (ckpt["step"] if ckpt else 0), ckpt


def _start_files(cfg: TrainConfig, ckpt: dict | None) -> None:
    """Write config.json and start (or trim, when resuming) metrics.jsonl: once the run is known to load."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    metrics = cfg.run_dir / "metrics.jsonl"
    if ckpt is None:
        metrics.write_text("")
    elif metrics.exists():  # drop records logged after the checkpoint by an interrupted process
        keep = [r for r in read_metrics(metrics) if r.get("kind") == "train" and r["step"] <= ckpt["step"]]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in keep))


def train(cfg: TrainConfig, final_eval: bool = True) -> Path:
    """Train (or resume) the run described by ``cfg``; evaluate and plot on rank 0 when finished
    (``final_eval=False`` skips that).

    Returns the run directory. Raises SystemExit(130) after saving a checkpoint on SIGINT/SIGTERM.
    """
    device = _device(cfg.device)
    _init_distributed(device)
    rank, world = _rank(), _world()
    start, ckpt = _prepare_run(cfg) if rank == 0 else (0, None)
    store = ensure_dataset(cfg) if rank == 0 else None
    if world > 1:
        box = [start, ckpt]
        dist.broadcast_object_list(box)  # every rank resumes from rank 0's checkpoint
        start, ckpt = box
        dist.barrier()
    if store is None:
        from worldmodel.datasets import RolloutStore
        store = RolloutStore.open(cfg.data, read_only=True)
    train_data, val_data = load_split(store, cfg)

    model = build_model(cfg, device)
    optimizer = make_optimizer(model, cfg)
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as err:
            raise SystemExit(f"error: the checkpoint in {str(cfg.run_dir)!r} does not fit this model (written by "
                             f"another version?): {err}") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        if len(ckpt["rng"]) != world:
            raise SystemExit(f"error: checkpoint was written by {len(ckpt['rng'])} ranks, this run has {world}")
        _set_rng_state(ckpt["rng"][rank])
    else:
        _seed_all(cfg.seed + rank)
    if rank == 0:
        _start_files(cfg, ckpt)
    loss_module: nn.Module = _LossModule(model)
    if world > 1:
        loss_module = nn.parallel.DistributedDataParallel(loss_module, device_ids=[device] if device.type == "cuda"
                                                          else None)
    step_fn = torch.compile(loss_module) if cfg.compile else loss_module

    from worldmodel.datasets import SequenceWindows

    windows = SequenceWindows(store, cfg.window, episodes=range(cfg.train_episodes))
    sampler = WindowSampler(len(windows), cfg.batch_size, cfg.seed, rank, world)
    val_windows = SequenceWindows(store, cfg.window, episodes=range(cfg.train_episodes,
                                                                    cfg.train_episodes + cfg.val_episodes))
    val_batch = window_batch(val_windows, val_data, WindowSampler(len(val_windows), cfg.batch_size, cfg.seed + 1,
                                                                  rank, world)(0), cfg.train_episodes)
    stop_at = cfg.steps if cfg.max_steps is None else min(cfg.steps, cfg.max_steps)
    batches = train_batches(cfg, windows, train_data, sampler, start, stop_at)
    metrics_path = cfg.run_dir / "metrics.jsonl"
    sums: dict[str, float] = {}
    count, t0, t_log, step = 0, time.time(), time.time(), start
    bar = tqdm(total=stop_at, initial=start, desc="train", disable=rank != 0 or not cfg.progress, dynamic_ncols=True)

    def save(at: int) -> None:
        rng = _gather_rng()
        if rank == 0:
            _atomic_save(_checkpoint(model, optimizer, cfg, at, rng), cfg.run_dir / "checkpoint.pt")

    with _StopFlag() as stop:
        while step < stop_at:
            step += 1
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(step, cfg)
            batch = next(batches)
            model.train()
            try:
                out = step_fn(batch["obs"].to(device), batch["action"].to(device), batch["mask"].to(device))
            except ValueError as err:  # bad input by the library's convention, e.g. a method/window mismatch
                raise SystemExit(f"error: method {cfg.model.method!r} cannot train on these windows: {err}") from err
            if not torch.isfinite(out.loss):
                raise SystemExit(f"error: non-finite loss {float(out.loss)} at step {step}; the last periodic checkpoint "
                                 f"is kept (try a lower --lr or --grad-clip)")
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            model.update_target()
            values = {"loss": float(out.loss.detach()), **{k: float(v) for k, v in out.logs.items()}}
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            if step == 1 or step % cfg.log_every == 0 or step == stop_at:
                record = _reduce_mean({k: v / count for k, v in sums.items()})
                record["val_loss"] = _validation_loss(model, val_batch, device)
                now = time.time()
                record.update(kind="train", step=step, lr=cfg.lr * lr_factor(step, cfg), elapsed_s=round(now - t0, 3),
                              frames_per_s=round(count * cfg.batch_size * cfg.window / (now - t_log), 1))
                t_log = now
                if rank == 0:
                    _append_jsonl(metrics_path, record)
                bar.set_postfix(loss=f"{record['loss']:.4g}")
                sums, count = {}, 0
            bar.update(1)
            if step % cfg.ckpt_every == 0 and step < stop_at:
                save(step)
            if _any_rank(stop.set):
                save(step)
                bar.close()
                _log(f"interrupted at step {step}; checkpoint saved to {str(cfg.run_dir / 'checkpoint.pt')!r}; "
                     f"continue with --resume")
                _shutdown()
                raise SystemExit(130)
    bar.close()
    if step > start or ckpt is None:
        save(step)
    if world > 1:
        dist.barrier()
    _shutdown()
    if step < cfg.steps:
        _log(f"stopped at step {step} of {cfg.steps} (--max-steps); continue with --resume")
        return cfg.run_dir
    if rank == 0 and final_eval:
        model.eval()
        features = split_features(model, cfg, train_data, val_data)
        results = evaluate(model, cfg, train_data, val_data, features)
        print_eval_table(results)
        _append_jsonl(metrics_path, {"kind": "eval", "step": step, **results})
        if cfg.plots:
            write_plots(model, cfg, train_data, val_data, features)
        _log(f"wrote {str(cfg.run_dir)!r}")
    return cfg.run_dir


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU under nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _any_rank(flag: bool) -> bool:
    if _world() == 1:
        return flag
    t = torch.tensor([float(flag)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _reduce_mean(values: dict[str, float]) -> dict[str, float]:
    if _world() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return {k: float(v) / _world() for k, v in zip(keys, t.tolist())}


@torch.no_grad()
def _validation_loss(model: WorldModel, batch: dict[str, torch.Tensor], device: torch.device) -> float:
    model.eval()
    loss = float(model.loss(batch["obs"].to(device), batch["action"].to(device), batch["mask"].to(device)).loss)
    return _reduce_mean({"v": loss})["v"]


# ---------------------------------------------------------------------------------------- evaluation
def readout_targets(cfg: TrainConfig, state: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """True quantities a linear readout should recover, and their names."""
    from worldmodel.evaluation import pendulum_targets

    if cfg.env == "pendulum":
        return pendulum_targets(state), ["sin θ", "cos θ", "θ̇"]
    return state, [f"state[{i}]" for i in range(state.shape[-1])]


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


def encode_episodes(model: WorldModel, data: dict[str, torch.Tensor], batch_size: int = 32) -> torch.Tensor:
    """Encoder latents z (N, T, L) of whole episodes."""
    return _batched(lambda obs, action, mask: model.encode(obs), model, data, batch_size)


def split_features(model: WorldModel, cfg: TrainConfig, train_data: dict, val_data: dict) -> tuple[torch.Tensor, ...]:
    """readout_features of the train and val episodes (computed once, shared by eval and plots)."""
    return readout_features(model, train_data, cfg.eval.batch_size), readout_features(model, val_data,
                                                                                      cfg.eval.batch_size)


@torch.no_grad()
def evaluate(model: WorldModel, cfg: TrainConfig, train_data: dict, val_data: dict,
             features: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """Held-out readout R^2 of the trained model and of the baselines; k-step NLL / coverage (Kalman).
    ``features``: the model's split_features, if already computed."""
    from worldmodel.evaluation import linear_r2, predictive_metrics

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
    if cfg.model.is_kalman:
        z = encode_episodes(model, val_data, cfg.eval.batch_size).to(device)
        pred = predictive_metrics(model.latent_model, z, val_data["action"].to(device), horizon=max(cfg.eval.ks),
                                  burn_in=cfg.eval.burn_in, mask=val_data["mask"].to(device))
        results["predictive"] = {
            f"k={k}": {"nll": pred["nll"][i], "coverage_1sigma": pred["coverage_1sigma"][i],
                       "coverage_2sigma": pred["coverage_2sigma"][i]}
            for i, k in enumerate(pred["k"]) if k in cfg.eval.ks}
    return results


# ModelConfig fields a preset baseline shares with the run (the encoder and the data it reads)
_ENCODER_FIELDS = ("encoder", "image_size", "channels", "depth", "pool", "norm", "input_dim", "hidden", "layers",
                   "latent_dim", "action_dim")


def _baseline_model(baseline: str, cfg: TrainConfig, device: torch.device) -> WorldModel:
    """'untrained' (the seeded initial model), a finished run directory, or a preset trained now."""
    if baseline == "untrained":
        return build_model(cfg, device).eval()
    if (Path(baseline) / "checkpoint.pt").is_file():
        return load_run(baseline, str(device))[0]
    shared = {k: getattr(cfg.model, k) for k in _ENCODER_FIELDS}  # same encoder; method settings default
    try:
        model_cfg = ModelConfig(**shared, method=baseline)
    except ValueError as err:
        raise SystemExit(f"error: --eval.baselines entry {baseline!r} is neither 'untrained', a run directory "
                         f"nor a method: {err}") from None
    sub = dataclasses.replace(
        cfg, name=f"{cfg.name}/baseline-{baseline}", resume=True, max_steps=None, model=model_cfg,
        steps=cfg.eval.baseline_steps or cfg.steps)
    previous = sub.run_dir / "checkpoint.pt"
    if previous.is_file() and config_difference(TrainConfig.from_dict(load_checkpoint(previous)["train_config"]), sub):
        sub = dataclasses.replace(sub, resume=False)  # a baseline of other settings: train it again
    _log(f"training baseline {baseline!r} for {sub.steps} steps in {str(sub.run_dir)!r}")
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
        print("\nk-step prediction of held-out encoder latents (nominal coverage 68.3 % / 95.4 %)")
        print(f"{'k':>4} {'NLL/dim':>9} {'cov 1σ':>8} {'cov 2σ':>8}")
        for k, m in results["predictive"].items():
            print(f"{k[2:]:>4} {m['nll']:9.4f} {100 * m['coverage_1sigma']:7.1f}% "
                  f"{100 * m['coverage_2sigma']:7.1f}%")
    print(flush=True)


# ---------------------------------------------------------------------------------------- plots
@torch.no_grad()
def write_plots(model: WorldModel, cfg: TrainConfig, train_data: dict, val_data: dict,
                features: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[Path]:
    """Loss curves; readout of a held-out episode and the latent space against the true state;
    k-step predictions with 2-sigma bands (Kalman methods). ``features``: as in ``evaluate``."""
    from worldmodel import plots
    from worldmodel.kalman import Gaussian

    run_dir = cfg.run_dir
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    keys = sorted({k for r in records for k in r} - {"kind", "step", "lr", "elapsed_s", "frames_per_s"},
                  key=lambda k: (k not in ("loss", "val_loss"), k))
    curves = {k: [r[k] for r in records if k in r] for k in keys}
    steps = {k: [r["step"] for r in records if k in r] for k in keys}
    paths = [plots.loss_curves(steps, curves, run_dir / "loss.png")] if curves else []

    y_train, names = readout_targets(cfg, train_data["state"])
    skip = cfg.eval.burn_in
    train_features, val_features = features or split_features(model, cfg, train_data, val_data)
    w, c = fit_readout(train_features[:, skip:], y_train[:, skip:])
    y_val, _ = readout_targets(cfg, val_data["state"][:1])
    paths.append(plots.trajectories(y_val[0], run_dir / "readout.png", val_features[0].double() @ w + c, names=names,
                                    title="linear readout of the latent features (held-out episode)"))
    paths.append(plots.latent_scatter(val_features.reshape(-1, val_features.shape[-1]),
                                      val_data["state"][..., 0].reshape(-1), run_dir / "latents.png",
                                      "theta" if cfg.env == "pendulum" else "state[0]"))
    if cfg.model.is_kalman:
        device = next(model.parameters()).device
        episode = {k: v[:1].to(device) for k, v in val_data.items()}
        z = model.encode(episode["obs"])[0].float().cpu()
        start = min(2 * cfg.eval.burn_in, len(z) - 2)
        horizon = min(2 * max(cfg.eval.ks), len(z) - 1 - start)
        filtered = model.filter(episode["obs"][:, :start + 1], episode["action"][:, :start + 1],
                                episode["mask"][:, :start + 1]).filtered
        belief = Gaussian(filtered.mean[:, -1], filtered.cov[:, -1])
        pz = model.imagine(belief, episode["action"][:, start:start + horizon], observe=True)
        dims = min(3, z.shape[-1])
        std = torch.diagonal(pz.cov[0], dim1=-2, dim2=-1).sqrt()[:, :dims].cpu()
        paths.append(plots.kstep_predictions(z[:start + 1 + horizon, :dims], pz.mean[0, :, :dims].cpu(), std, start,
                                             run_dir / "kstep.png", names=[f"z[{i}]" for i in range(dims)]))
    return paths


# ---------------------------------------------------------------------------------------- eval / filter
def _load_matching_run(cfg: TrainConfig) -> tuple[WorldModel, TrainConfig, dict]:
    """load_run, refusing a checkpoint whose config differs from ``cfg`` in anything but run control."""
    model, stored, ckpt = load_run(cfg.run_dir, cfg.device)
    diff = config_difference(stored, cfg)
    if diff:
        raise SystemExit(f"error: checkpoint in {str(cfg.run_dir)!r} comes from another config (differs in "
                         f"{', '.join(diff)})")
    return model, stored, ckpt


def evaluate_run(cfg: TrainConfig) -> dict[str, Any]:
    """`eval` subcommand: evaluate a run's checkpoint, print the table and append it to metrics.jsonl."""
    model, stored, ckpt = _load_matching_run(cfg)
    store = ensure_dataset(stored)
    train_data, val_data = load_split(store, stored)
    run_cfg = dataclasses.replace(stored, **{k: getattr(cfg, k) for k in RUN_CONTROL})
    features = split_features(model, run_cfg, train_data, val_data)
    results = evaluate(model, run_cfg, train_data, val_data, features)
    print_eval_table(results)
    _append_jsonl(cfg.run_dir / "metrics.jsonl", {"kind": "eval", "step": ckpt["step"], **results})
    if cfg.plots:
        write_plots(model, run_cfg, train_data, val_data, features)
    return results


@torch.no_grad()
def replay_filter(cfg: TrainConfig) -> Path:
    """`filter` subcommand: feed one episode frame by frame through WorldModel.step (dropping the
    requested frames), read the beliefs out to the true state and plot them with 2-sigma bands."""
    from worldmodel import plots

    model, stored, _ = _load_matching_run(cfg)
    if not stored.model.is_kalman:
        raise SystemExit(f"error: filter needs a Kalman method; run {str(cfg.run_dir)!r} used {stored.model.method!r}")
    run_cfg = dataclasses.replace(stored, **{k: getattr(cfg, k) for k in RUN_CONTROL})
    fc = run_cfg.filter
    store = ensure_dataset(stored)
    train_data, val_data = load_split(store, stored)
    if fc.live:
        episode = _live_episode(run_cfg)
    else:
        if not 0 <= fc.episode < len(val_data["obs"]):
            raise SystemExit(f"error: --filter.episode must be in [0, {len(val_data['obs'])}), got {fc.episode}")
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
        means.append(belief.mean[0].double().cpu())
        covs.append(belief.cov[0].double().cpu())
    mean, cov = torch.stack(means), torch.stack(covs)
    batch = model.filter(episode["obs"][None].to(device), episode["action"][None].to(device),
                         observed[None].to(device)).filtered.mean[0].double().cpu()
    gap = float((batch - mean).abs().max())
    y_train, names = readout_targets(run_cfg, train_data["state"])
    skip = run_cfg.eval.burn_in
    w, c = fit_readout(readout_features(model, train_data, run_cfg.eval.batch_size)[:, skip:], y_train[:, skip:])
    readout_std = torch.einsum("fd,tfg,gd->td", w, cov, w).clamp_min(0).sqrt()
    y, _ = readout_targets(run_cfg, episode["state"])
    path = plots.filter_replay(y, mean @ w + c, readout_std, observed, cfg.run_dir / "filter.png", names=names)
    _log(f"replayed {length} steps ({int((~observed).sum())} dropped frames) through WorldModel.step; its beliefs "
         f"match the batch filter to {gap:.1e} (max abs difference of the means); wrote {str(path)!r}")
    return path


def _live_episode(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """A fresh episode of the env under the OU policy, seeded by --filter.seed."""
    from worldmodel.datasets import ou_policy
    from worldmodel.envs import make_env

    env = make_env(cfg.env, image_size=cfg.model.image_size, **cfg.env_kwargs)
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
