"""The run's configuration: TrainConfig (with its ModelConfig, EvalConfig and FilterConfig), and which
fields a resumed or re-evaluated run may change (RUN_CONTROL)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from worldmodel.cli import config_from_dict
from worldmodel.model import ModelConfig

__all__ = ["RUN_CONTROL", "ControlConfig", "EvalConfig", "FilterConfig", "TrainConfig", "config_difference"]


@dataclass
class EvalConfig:
    """Final evaluation: held-out linear readout R^2 and k-step predictive NLL / coverage."""

    ks: tuple[int, ...] = field(default=(1, 5, 10, 20), metadata={"help": "prediction horizons k to report"})
    calibration_folds: int = field(default=5, metadata={
        "help": "the k-step prediction bands are recalibrated on the held-out episodes (worldmodel.calibration) and "
                "their coverage is scored by cross-fitting over this many folds of them (0: not recalibrated)"})
    burn_in: int = field(default=5, metadata={
        "help": "first steps of every episode left out of readout fits and scores, and before the first k-step "
                "prediction (filter warm-up)"})
    baselines: tuple[str, ...] = field(default=("untrained",), metadata={
        "help": "rows added to the readout table: 'untrained' (the initial encoder), a preset name of "
                "worldmodel.methods (trained now with this config, e.g. vicreg) or a run directory"})
    baseline_steps: int | None = field(default=None, metadata={
        "help": "training steps of preset baselines (none = the run's steps)"})
    batch_size: int = field(default=32, metadata={"help": "episodes per forward pass when encoding"})

    def __post_init__(self):
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"eval.ks must be a non-empty list of horizons >= 1, got {self.ks}")
        if self.calibration_folds < 0 or self.calibration_folds == 1:
            raise ValueError(f"eval.calibration_folds must be 0 (off) or >= 2, got {self.calibration_folds}")
        if self.burn_in < 0 or self.batch_size < 1:
            raise ValueError(f"eval.burn_in must be >= 0 and eval.batch_size >= 1, got {self.burn_in}, "
                             f"{self.batch_size}")


INJECTIONS = (None, "teleport", "freeze")  # events `filter --filter.inject` can inject


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
    inject: Literal["teleport", "freeze"] | None = field(default=None, metadata={
        "help": "inject an implausible event into the replayed frames and score it in surprise.png: teleport "
                "(from step inject_at on, the frames of another held-out episode: a jump in state) or freeze "
                "(the frame of step inject_at repeats for inject_length steps) (none = no event)"})
    inject_at: int | None = field(default=None, metadata={
        "help": "step k of the injected event (none = the middle of the episode)"})
    inject_length: int = field(default=5, metadata={
        "help": "steps of the event window (freeze: frames held; both: the steps scored against the normal frames)"})
    inject_episode: int | None = field(default=None, metadata={
        "help": "teleport: the held-out episode whose frames are shown from step k on (none = the one whose true "
                "state at step k is farthest from the replayed one's)"})

    def __post_init__(self):
        if len(self.drop) % 2:
            raise ValueError(f"filter.drop takes start stop pairs, got {self.drop}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"filter.drop_prob must be in [0, 1), got {self.drop_prob}")
        if self.inject not in INJECTIONS:
            raise ValueError(f"filter.inject must be one of {', '.join(map(str, INJECTIONS))}, got {self.inject!r}")
        if self.inject_length < 1 or (self.inject_at is not None and self.inject_at < 1):
            raise ValueError(f"filter.inject_at must be >= 1 and filter.inject_length >= 1, got {self.inject_at}, "
                             f"{self.inject_length}")


@dataclass
class ControlConfig:
    """`control` subcommand: the collect-train-plan loop and its closed-loop evaluation (training.control)."""

    task: Literal["reward", "goal"] | None = field(default=None, metadata={
        "help": "reward (maximise the env's reward with a learned reward head) or goal (reach goal frames the env "
                "draws) (none = the env's, worldmodel.envs.control_defaults)"})
    episode_length: int | None = field(default=None, metadata={
        "help": "steps per episode, collected and evaluated (none = the env's control default)"})
    seed_episodes: int = field(default=40, metadata={"help": "episodes of uniform random actions before phase 0"})
    iterations: int | None = field(default=None, metadata={
        "help": "collect-then-train iterations after phase 0 (none = the env's control default, else 3)"})
    episodes_per_iteration: int = field(default=10, metadata={"help": "MPC episodes collected per iteration"})
    steps_per_iteration: int = field(default=400, metadata={
        "help": "fine-tuning steps of the phases after the first (phase 0 trains --steps)"})
    exploration: float = field(default=0.3, metadata={
        "help": "std of the Gaussian noise added to the MPC's actions while collecting (fraction of the half range)"})
    val_episodes: int = field(default=2, metadata={"help": "the latest episodes held out of each phase (val loss)"})
    eval_episodes: int = field(default=10, metadata={"help": "evaluation episodes (fixed seeds)"})
    eval_seed: int = field(default=100_000, metadata={"help": "env seed of evaluation episode i: eval_seed + i"})
    oracle: bool = field(default=True, metadata={
        "help": "also evaluate an MPC with the true state and dynamics (envs with simulate())"})

    def __post_init__(self):
        for name in ("episode_length", "seed_episodes", "episodes_per_iteration", "steps_per_iteration",
                     "val_episodes", "eval_episodes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"control.{name} must be >= 1, got {getattr(self, name)}")
        if (self.iterations is not None and self.iterations < 0) or self.exploration < 0:
            raise ValueError("control.iterations and control.exploration must be >= 0")
        if self.val_episodes >= self.seed_episodes:
            raise ValueError(f"control.val_episodes ({self.val_episodes}) must be < seed_episodes "
                             f"({self.seed_episodes})")


# fields that do not change what is trained: a resumed run may change them freely
RUN_CONTROL = ("name", "out_dir", "device", "num_workers", "compile", "max_steps", "resume", "log_every",
                "ckpt_every", "eval", "filter", "progress", "plots", "tensorboard", "control", "seeds")


@dataclass
class TrainConfig:
    """Everything a run needs; ``train.py`` generates its flags from these fields."""

    name: str | None = field(default=None, metadata={
        "help": "run name: files go to <out_dir>/<name>/ (none = <env>-<method>)"})
    out_dir: str = field(default="runs", metadata={"help": "parent directory of runs"})
    data: str | None = field(default=None, metadata={
        "help": "rollout store; built with the env and an Ornstein-Uhlenbeck policy if missing (or topped up "
                "if it was built so and is short of episodes) (none = data/<env>.zarr, with a hash of env_kwargs "
                "when they are given)"})
    env: str = field(default="pendulum", metadata={"help": "environment of worldmodel.envs used to build the data"})
    env_kwargs: dict | None = field(default=None, metadata={
        "help": "JSON keyword arguments of make_env (none = the env's training defaults, "
                "worldmodel.envs.env_defaults: e.g. pendulum friction 0.5, so few full rotations that theta_dot "
                "is linearly recoverable from a linear-Gaussian filter)"})
    train_episodes: int = field(default=200, metadata={"help": "episodes used for training (the first ones)"})
    val_episodes: int = field(default=40, metadata={"help": "held-out episodes (after the training ones)"})
    episode_length: int | None = field(default=None, metadata={
        "help": "steps per collected episode (none = the env's default)"})
    skip_corrupt: bool = field(default=False, metadata={
        "help": "pass over the episodes of the dataset with a damaged chunk (failed crc32c checksum or "
                "decompression) with a warning naming them, and use the next intact ones (without it a corrupt "
                "episode stops the run with an error naming it)"})
    window: int = field(default=32, metadata={"help": "training sequence length L"})
    batch_size: int = field(default=16, metadata={"help": "global batch of windows per step (split over ranks)"})
    steps: int = field(default=1500, metadata={"help": "optimizer steps (sets the learning-rate schedule)"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate of the encoder (AdamW)"})
    warmup: int = field(default=50, metadata={"help": "linear warm-up steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay ends at lr * min_lr_ratio"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=10.0, metadata={"help": "max global gradient norm (0 = off)"})
    seed: int = field(default=0, metadata={"help": "seed of the model init, window sampling and data collection"})
    seeds: tuple[int, ...] = field(default=(), metadata={
        "help": "train and evaluate once per seed (runs <name>-seed<S> on data <data>-seed<S>.zarr; finished ones "
                "are reused) and report the mean and spread of R^2 and coverage in <name>/seeds.json"})
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
    init_from: str | None = field(default=None, metadata={
        "help": "start from the weights of this checkpoint (fine-tuning; same model config; fresh optimizer)"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars"})
    plots: bool = field(default=True, metadata={"help": "write PNG figures after training / eval"})
    tensorboard: bool = field(default=False, metadata={
        "help": "also log the metrics.jsonl scalars and the PNG figures to <run_dir>/tensorboard/ (needs the "
                "tensorboard package)"})
    model: ModelConfig = field(default_factory=lambda: ModelConfig(image_size=None, channels=None, action_dim=None))
    eval: EvalConfig = field(default_factory=EvalConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    control: ControlConfig = field(default_factory=ControlConfig)

    def __post_init__(self):
        positive = ("train_episodes", "val_episodes", "episode_length", "window", "batch_size", "steps", "log_every",
                    "ckpt_every")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.episode_length is not None and self.window > self.episode_length:
            raise ValueError(f"window ({self.window}) must not exceed episode_length ({self.episode_length})")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / (self.name or f"{self.env}-{self.model.method}")

    def resolved(self) -> "TrainConfig":
        """This config with every "none = the env's default" field filled in from
        ``worldmodel.envs.env_defaults(env)`` (what a run stores in config.json)."""
        from worldmodel.envs import env_defaults

        defaults = env_defaults(self.env)
        model, env_kwargs = self.model, self.env_kwargs
        if env_kwargs is not None and "image_size" in env_kwargs:  # the frame size is the model's setting
            env_kwargs = {k: v for k, v in env_kwargs.items() if k != "image_size"}
            size = self.env_kwargs["image_size"]
            if model.image_size not in (None, size):
                raise ValueError(f"env_kwargs image_size={size} contradicts model.image_size={model.image_size}; "
                                 f"pass --model.image-size only")
            model = dataclasses.replace(model, image_size=size)
        model = dataclasses.replace(model, **{k: getattr(defaults, k) for k in ("image_size", "channels", "action_dim")
                                              if getattr(model, k) is None})
        data = self.data
        if data is None:
            suffix = "" if env_kwargs is None else "-" + hashlib.sha1(
                json.dumps(env_kwargs, sort_keys=True).encode()).hexdigest()[:8]
            data = f"data/{self.env.replace(':', '_').replace('/', '_')}{suffix}.zarr"
        return dataclasses.replace(
            self, name=self.name or f"{self.env}-{model.method}", data=data, model=model,
            env_kwargs=defaults.env_kwargs if env_kwargs is None else env_kwargs,
            episode_length=self.episode_length or defaults.episode_length)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return config_from_dict(cls, data)


def config_difference(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Dotted names of the fields (other than run-control ones: RUN_CONTROL, or the config class's own
    ``RUN_CONTROL`` attribute) in which two configs of one class differ."""
    run_control = getattr(type(a), "RUN_CONTROL", RUN_CONTROL)

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if not prefix and k in run_control:
                continue
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "env_kwargs" else {prefix + k: v})
        return out
    fa, fb = flat(a.to_dict()), flat(b.to_dict())
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
