"""WorldModel: an encoder and an LDM objective (prior P_theta, entropy H); filtering and imagination when
the prior is a state-space prior.

Pixels go in as uint8 (B, T, H, W, C), exactly as the envs and the rollout store hold them (float
frames are also accepted; NaN frames count as dropped, inf is refused). The encoder maps every frame
x_t to a latent z_t in R^L; the objective (`worldmodel.methods.make`) normalises the latents and scores
them under its prior. When the prior is a `StateSpacePrior` (the Kalman presets: z_t observes a hidden state h_t of a
learned linear-Gaussian model) the model also filters (`filter`, `step`) and predicts k steps ahead
(`imagine`) exactly (DESIGN section 1; Mikulasch & Zenke 2026, Sec. 6.1). The model never tests the
preset's name: it asks the prior what it can do.

Actions follow the store's convention: actions[:, t] is taken after frame t. The model shifts them to
the filter's convention itself, u = cat(0, actions[:, :-1]) (u[:, t] drives the transition into t).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from worldmodel.calibration import PredictiveCalibration
from worldmodel.checkpoint import MODEL_KEYS, model_payload, read_checkpoint, upgrade_state_dict, write_checkpoint
from worldmodel.encoders import ConvEncoder, LinearEncoder, MLPEncoder, ResNetEncoder, SequenceEncoder
from worldmodel.kalman import FilterResult, Gaussian
from worldmodel.methods import PRESETS, make
from worldmodel.objective import NORMS, LossOutput
from worldmodel.planning.mpc import PlannerConfig
from worldmodel.planning.reward import RewardHead, ValueHead
from worldmodel.priors import StateSpacePrior, prior_options

__all__ = ["ModelConfig", "WorldModel", "shift_actions", "upgrade_state_dict"]

ENCODERS = ("auto", "conv", "mlp", "linear", "resnet")
_RENAMED = {"kalman_lr_multiplier": "prior_lr_multiplier"}  # fields of older configs


@dataclass
class ModelConfig:
    """Architecture and objective of a WorldModel (plain values only: it is stored in checkpoints).
    None means "the method's own default" (see worldmodel.methods.PRESETS)."""

    encoder: str = field(default="auto", metadata={
        "help": "conv (frames), mlp (vector observations), linear (fixed projection + learned square map, as "
                "ica needs), resnet (a ResNet backbone + MLP projector, for image SSL) or auto (linear when the "
                "method needs it, mlp when input_dim > 0, else conv)"})
    image_size: int | None = field(default=64, metadata={
        "help": "H = W of the frames (conv and linear encoders; none = the env's native size)"})
    channels: int | None = field(default=3, metadata={"help": "C of the frames (none = the env's)"})
    depth: int = field(default=16, metadata={"help": "conv encoder width multiplier: widths depth*(1,2,4,8)"})
    blocks: tuple[int, ...] = field(default=(1, 1, 1), metadata={
        "help": "resnet encoder: basic blocks per stage, widths depth*(1,2,4,..) (ResNet-18: 2 2 2 2, depth 64)"})
    pool: int = field(default=2, metadata={
        "help": "average-pool the frames by this factor before the convs (2: a cheap first stage)"})
    norm: str = field(default="layer", metadata={"help": "conv encoder norm: layer, group or none"})
    input_dim: int = field(default=0, metadata={"help": "observation size (mlp encoder)"})
    hidden: int = field(default=256, metadata={"help": "hidden width (mlp encoder; the resnet encoder's projector)"})
    layers: int = field(default=2, metadata={"help": "hidden layers (mlp encoder)"})
    latent_dim: int = field(default=8, metadata={"help": "L, the encoder latent (observation) dimension"})
    state_dim: int | None = field(default=None, metadata={
        "help": "S, the state dimension of a state-space prior (none = 2 L)"})
    action_dim: int | None = field(default=1, metadata={"help": "action size (0 = uncontrolled; none = the env's)"})
    method: str = field(default="kalman", metadata={"help": "preset of worldmodel.methods (kalman, vicreg, ...)"})
    method_kwargs: dict = field(default_factory=dict, metadata={"help": "JSON overrides of methods.make"})
    latent_norm: str = field(default="auto", metadata={
        "help": "batch, whiten, none, or auto (the method's own: whiten for the kalman preset)"})
    heteroscedastic: bool = field(default=False, metadata={
        "help": "predict the observation noise per frame from the encoder (state-space priors)"})
    prior_lr_multiplier: float | None = field(default=None, metadata={
        "help": "learning-rate multiplier of the prior's parameters (none = the prior's own: 100 for kalman, "
                "as in the paper)"})
    multistep_horizon: int | None = field(default=None, metadata={
        "help": "state-space priors: also fit the exact k-step predictive log-likelihoods, k = 2..H (0 = off; "
                "none = the method's own: 10 for the kalman presets)"})
    multistep_weight: float | None = field(default=None, metadata={
        "help": "weight of the k-step term in the loss (none = the method's own: 3 for the kalman presets)"})
    reward_head: bool = field(default=False, metadata={
        "help": "add a reward head (quadratic in state and action, exact expectation under the belief), fitted "
                "to the stored rewards after training (state-space priors with actions)"})
    value_discount: float = field(default=0.95, metadata={
        "help": "with a reward head, also fit a terminal value head (quadratic in the state) to the returns "
                "discounted by this (0 = none; the planner adds it at the horizon, PlannerConfig.value_weight)"})
    planner: dict = field(default_factory=dict, metadata={
        "help": "JSON planner defaults stored with the model (worldmodel.planning.PlannerConfig: solver, horizon, "
                "samples, action_low, action_high, ...)"})

    def __post_init__(self):
        self.blocks = tuple(self.blocks)  # a list when read from JSON
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.method not in PRESETS:
            raise ValueError(f"method must be one of {sorted(PRESETS)}, got {self.method!r}")
        if self.latent_norm not in ("auto", *NORMS):
            raise ValueError(f"latent_norm must be auto, batch, whiten or none, got {self.latent_norm!r}")
        if self.latent_dim < 1 or (self.action_dim or 0) < 0 or (self.state_dim is not None and self.state_dim < 1):
            raise ValueError("latent_dim and state_dim must be >= 1 and action_dim >= 0")
        if self.multistep_horizon is not None and (self.multistep_horizon < 0 or self.multistep_horizon == 1):
            raise ValueError(f"multistep_horizon must be 0 (off) or >= 2, got {self.multistep_horizon}")
        if not 0 <= self.value_discount < 1:
            raise ValueError(f"value_discount must be in [0, 1) (0 = no value head), got {self.value_discount}")
        if self.resolved_encoder == "mlp" and self.input_dim < 1:
            raise ValueError("encoder='mlp' needs input_dim >= 1")
        PlannerConfig.from_overrides(self.planner)  # ValueError for unknown or invalid settings

    @property
    def resolved_encoder(self) -> str:
        """The encoder built: `encoder`, or for auto the one the method and the input call for."""
        if self.encoder != "auto":
            return self.encoder
        if PRESETS[self.method].encoder == "linear":
            return "linear"
        return "mlp" if self.input_dim > 0 else "conv"

    def objective_overrides(self) -> dict[str, Any]:
        """Keyword overrides of `methods.make` this config asks for (method_kwargs win)."""
        preset = PRESETS[self.method]
        accepted = prior_options(preset.prior)
        overrides: dict[str, Any] = {}
        if "action_dim" in accepted:
            overrides["action_dim"] = self.action_dim
        if "state_dim" in accepted:
            overrides["state_dim"] = self.state_dim
        for name in ("latent_norm", "multistep_horizon", "multistep_weight"):
            value = getattr(self, name)
            if value not in (None, "auto"):
                overrides[name] = value
        return {**overrides, **self.method_kwargs}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
        """Inverse of to_dict; configs of earlier versions (kalman_lr_multiplier) are upgraded."""
        values = dict(values)
        if any(old in values for old in _RENAMED):  # before priors: multistep settings only for state-space ones
            values = {_RENAMED.get(k, k): v for k, v in values.items()}
            if "multistep_horizon" not in PRESETS.get(values.get("method"), PRESETS["kalman"]).objective_kwargs:
                values.update(multistep_horizon=None, multistep_weight=None)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - names
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}")
        return cls(**values)


def shift_actions(actions: Tensor | None) -> Tensor | None:
    """Stored actions (B, T, a) (action[t] taken after frame t) -> filter controls u (B, T, a),
    u[:, t] = action[:, t-1] driving the transition into step t, u[:, 0] = 0."""
    if actions is None:
        return None
    return torch.cat([torch.zeros_like(actions[:, :1]), actions[:, :-1]], 1)


class WorldModel(nn.Module):
    """Encoder + LDM objective; filtering and imagination when the prior is a state-space prior.

    Build with `WorldModel.from_config(ModelConfig(...))`. Attributes: `encoder` (SequenceEncoder),
    `objective` (LDMLoss of `worldmodel.methods.make`, holding the latent normalisation and the prior),
    `prior` (the objective's prior), `target_encoder` (EMA copy, only when the objective has `target_ema`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        unset = [k for k in ("image_size", "channels", "action_dim") if getattr(config, k) is None]
        if unset:
            raise ValueError(f"ModelConfig fields {unset} are none (\"the env's\"): set them, or let "
                             f"TrainConfig.resolved() take them from the env")
        self.config = config
        L = config.latent_dim
        out_dim = 2 * L if config.heteroscedastic else L
        kind = config.resolved_encoder
        frame_shape = (config.image_size, config.image_size, config.channels)
        if kind == "conv":
            item = ConvEncoder(config.image_size, config.channels, out_dim, config.depth, config.norm, config.pool)
        elif kind == "mlp":
            item = MLPEncoder(config.input_dim, out_dim, config.hidden, config.layers)
        elif kind == "resnet":
            item = ResNetEncoder(config.image_size, config.channels, out_dim, config.depth, config.blocks, config.hidden,
                                 config.pool)
        else:
            item = LinearEncoder((config.input_dim,) if config.input_dim else frame_shape, out_dim, config.pool)
        self.encoder = SequenceEncoder(item)
        overrides = config.objective_overrides()
        if PRESETS[config.method].encoder == "linear":
            if kind != "linear" or config.heteroscedastic:
                raise ValueError(f"method {config.method!r} needs encoder='linear' (or auto) and no heteroscedastic "
                                 f"noise (its entropy is log|det| of a square linear encoder)")
            overrides.setdefault("encoder", item)
        self.objective = make(config.method, L, **overrides)
        if config.heteroscedastic and not self.can_filter:
            raise ValueError(f"heteroscedastic=True needs a state-space prior, method {config.method!r} has none")
        if config.prior_lr_multiplier is not None:
            self.prior.lr_multiplier = float(config.prior_lr_multiplier)
        # recalibrated k-step prediction bands (`calibrate`), saved with the weights
        self.calibration = PredictiveCalibration() if self.can_filter else None
        self.reward_head: RewardHead | None = None
        if config.reward_head:
            if not self.can_filter or not config.action_dim:
                raise ValueError(f"reward_head=True needs a state-space prior and actions (method {config.method!r}, "
                                 f"action_dim {config.action_dim})")
            self.reward_head = RewardHead(self.prior.state_dim, config.action_dim)
        self.value_head = ValueHead(self.prior.state_dim, config.value_discount) if (
            config.reward_head and config.value_discount > 0) else None
        self.target_encoder: SequenceEncoder | None = None
        if self.objective.target_ema is not None:
            self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)

    @classmethod
    def from_config(cls, config: ModelConfig | dict) -> "WorldModel":
        return cls(ModelConfig.from_dict(config) if isinstance(config, dict) else config)

    @property
    def prior(self) -> nn.Module:
        """The latent model P_theta (`worldmodel.priors.LatentPrior`)."""
        return self.objective.prior

    @property
    def can_filter(self) -> bool:
        """True when the prior is a state-space prior: filter, step, imagine and k-step metrics work."""
        return isinstance(self.prior, StateSpacePrior)

    # ---- encoding ----------------------------------------------------------------------------
    @property
    def frame_shape(self) -> tuple[int, ...]:
        """The shape of one frame: (H, W, C), or (input_dim,) for vector encoders."""
        cfg = self.config
        if cfg.input_dim and cfg.resolved_encoder != "conv":
            return (cfg.input_dim,)
        return (cfg.image_size, cfg.image_size, cfg.channels)

    def _check_frames(self, frames: Tensor, extra: int) -> None:
        cfg, item = self.config, self.frame_shape
        if frames.dim() != extra + len(item) or tuple(frames.shape[extra:]) != item:
            lead = "(B, T, " if extra == 2 else "(B, "
            raise ValueError(f"frames must have shape {lead}{', '.join(map(str, item))}) for this config "
                             f"(image_size={cfg.image_size}, channels={cfg.channels}), got {tuple(frames.shape)}")
        if frames.is_floating_point() and bool(torch.isinf(frames).any()):
            raise ValueError("frames contain inf; mark a dropped frame with NaN (or mask=False) instead")

    def _raw_latents(self, frames: Tensor, target: bool = False) -> tuple[Tensor, Tensor | None]:
        """frames (B, T, ...) -> encoder latents z (B, T, L) before normalisation (NaN where a frame is NaN)
        and the per-frame observation-noise variances (B, T, L) (heteroscedastic) or None."""
        self._check_frames(frames, 2)
        out = (self.target_encoder if target else self.encoder)(frames)
        L = self.config.latent_dim
        if not self.config.heteroscedastic:
            return out, None
        variances = torch.nan_to_num(nn.functional.softplus(out[..., L:]) + 1e-4, nan=1.0)
        return out[..., :L], variances

    def _latents(self, frames: Tensor, mask: Tensor | None = None, running: bool = False) -> tuple[Tensor, Tensor | None]:
        """Normalised latents (B, T, L) and variances, as the objective sees them (running=True: running
        statistics also in training mode)."""
        z, variances = self._raw_latents(frames)
        return self.objective.latent_norm(z, mask, running), variances

    @torch.no_grad()
    def latents(self, frames: Tensor, mask: Tensor | None = None, batch_size: int = 32) -> tuple[Tensor, Tensor | None]:
        """Latents z (B, T, L) of whole episodes frames (B, T, ...) and their observation-noise variances
        (B, T, L) (heteroscedastic models; else None), encoded batch_size episodes at a time on the model's
        device, without gradients, normalised with the running statistics (also in training mode)."""
        self._check_frames(frames, 2)
        device = next(self.parameters()).device
        parts = [self._latents(frames[i:i + batch_size].to(device),
                               None if mask is None else mask[i:i + batch_size].to(device), running=True)
                 for i in range(0, len(frames), batch_size)]
        z = torch.cat([p[0] for p in parts])
        return z, None if parts[0][1] is None else torch.cat([p[1] for p in parts])

    def encode(self, frames: Tensor) -> Tensor:
        """Latents z (B, T, L) of frames (B, T, H, W, C) (or (B, T, input_dim) for vector encoders)."""
        return self._latents(frames)[0]

    # ---- training ----------------------------------------------------------------------------
    def loss(self, frames: Tensor, actions: Tensor | None = None, mask: Tensor | None = None) -> LossOutput:
        """The LDM loss of a batch of windows: frames (B, T, ...), actions (B, T, a) stored convention,
        mask (B, T) bool (True = observed; NaN frames are also treated as dropped)."""
        self._check_inputs(frames, actions, mask)
        z, variances = self._raw_latents(frames)
        observed = torch.isfinite(z).all(-1)
        if mask is not None:
            observed = observed & mask.to(torch.bool)
        mask = None if bool(observed.all()) else observed
        target = None
        if self.target_encoder is not None:
            with torch.no_grad():
                target = self._raw_latents(frames, target=True)[0]
        u = shift_actions(actions) if self.can_filter or self.prior.action_dim else None
        return self.objective(z, u=u, mask=mask, target=target, R=variances)

    @torch.no_grad()
    def update_target(self) -> None:
        """EMA update of the target encoder (call after every optimizer step; no-op without one)."""
        if self.target_encoder is None:
            return
        decay = float(self.objective.target_ema)
        for t, o in zip(self.target_encoder.parameters(), self.encoder.parameters()):
            t.lerp_(o, 1.0 - decay)
        for t, o in zip(self.target_encoder.buffers(), self.encoder.buffers()):
            t.copy_(o)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups: the encoder at lr, then the objective's (`LDMLoss.param_groups`: the
        prior at lr * its lr_multiplier)."""
        encoder = [p for p in self.encoder.parameters() if p.requires_grad]
        return [{"params": encoder, "lr": lr}, *self.objective.param_groups(lr)]

    # ---- filtering and imagination (state-space priors) ----------------------------------------
    def _state_space(self, what: str) -> StateSpacePrior:
        if not self.can_filter:
            raise TypeError(f"WorldModel.{what} needs a state-space prior (e.g. method 'kalman'); method "
                            f"{self.config.method!r} uses {type(self.prior).__name__}")
        return self.prior

    def _check_inputs(self, frames: Tensor, actions: Tensor | None, mask: Tensor | None) -> None:
        """ValueError naming the expected shape / dtype of bad frames (first), actions or mask."""
        self._check_frames(frames, 2)
        bt = tuple(frames.shape[:2])
        if actions is not None:
            a = self.config.action_dim
            if not actions.is_floating_point():
                raise ValueError(f"actions must be floating point, got dtype {actions.dtype}")
            if actions.dim() != 3 or tuple(actions.shape[:2]) != bt or actions.shape[-1] != a:
                raise ValueError(f"actions must have shape (B, T, {a}) matching frames {bt}, "
                                 f"got {tuple(actions.shape)}")
        if mask is not None:
            if mask.dtype != torch.bool:
                raise ValueError(f"mask must be a bool tensor (True = observed), got dtype {mask.dtype}")
            if tuple(mask.shape) != bt:
                raise ValueError(f"mask must have shape (B, T) = {bt}, got {tuple(mask.shape)}")

    def filter(self, frames: Tensor, actions: Tensor | None = None, mask: Tensor | None = None) -> FilterResult:
        """Exact filtering of frames (B, T, ...): FilterResult with filtered N(m_{t|t}, P_{t|t}) and
        predicted N(m_{t|t-1}, P_{t|t-1}) state beliefs (B, T, S). Missing frames (mask False or NaN) are
        only predicted."""
        prior = self._state_space("filter")
        self._check_inputs(frames, actions, mask)
        z, variances = self._latents(frames, mask)
        return prior.filter(z, u=shift_actions(actions), mask=mask, R=variances)

    def features(self, frames: Tensor, actions: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Readout features (B, T, F): filtered state means m_{t|t} for state-space priors, else the latents."""
        if self.can_filter:
            return self.filter(frames, actions, mask).filtered.mean
        return self.encode(frames)

    def init_belief(self, batch_size: int) -> Gaussian:
        """Belief N(m0, P0) of the state before the first frame: mean (B, S), cov (B, S, S)."""
        return self._state_space("init_belief").init_belief(batch_size)

    def step(self, belief: Gaussian, frame: Tensor | None = None, action: Tensor | None = None) -> Gaussian:
        """One online filter step: predict with `action` (B, a), the action applied since the belief's
        time (None = zero action), then update with the live `frame` (B, H, W, C). frame=None, or a
        frame with NaN, only predicts. Starting from init_belief and calling step(belief, frame[:, t],
        action[:, t-1]) (action None at t=0) reproduces `filter`'s filtered beliefs."""
        prior = self._state_space("step")
        batch = belief.mean.shape[0]
        if action is not None and not action.is_floating_point():
            raise ValueError(f"action must be floating point, got dtype {action.dtype}")
        if action is not None and tuple(action.shape) != (batch, self.config.action_dim):
            raise ValueError(f"action must have shape ({batch}, {self.config.action_dim}), got {tuple(action.shape)}")
        z_t = variances = None
        if frame is not None:
            self._check_frames(frame, 1)
            if frame.shape[0] != batch:
                raise ValueError(f"frame batch {frame.shape[0]} differs from the belief's {batch}")
            z, var = self._latents(frame[:, None], running=True)
            z_t, variances = z[:, 0], None if var is None else var[:, 0]
        return prior.step(belief, z_t, action, R_t=variances)

    def surprise(self, belief: Gaussian, frame: Tensor, action: Tensor | None = None) -> Tensor:
        """Surprise (B,) of a live frame: -log p(z_t | past), in nats, of the frame's latent z_t (B, L) under
        the filter's one-step prediction from `belief` (the belief after the previous frame, as `step` takes
        it): predict with `action` (B, a) (None = zero action), then score z_t under the predictive
        N(C m, C P C^T + R) (`predict_observation`, per-frame R when heteroscedastic) with `Gaussian.log_prob`.

        It is the total over the L latent dimensions (divide by L for a per-dimension value), i.e. minus the
        filter's per-step log-likelihood term: summed over an episode stepped online (surprise at step t from
        the belief after t-1, then `step`), it equals -filter(frames, actions).log_likelihood. An anomaly /
        novelty score of the frame; it does not change the belief (call `step` for that).

        A dropped frame has no surprise: rows whose frame holds NaN give NaN (the filter adds nothing for
        them, so use nansum to compare with its log-likelihood); frame=None is a ValueError. TypeError
        without a state-space prior.
        """
        prior = self._state_space("surprise")
        if frame is None:
            raise ValueError("surprise needs a frame (B, ...): a dropped frame has no surprise (mark dropped rows "
                             "with NaN to get NaN for them)")
        batch = belief.mean.shape[0]
        if action is not None and not action.is_floating_point():
            raise ValueError(f"action must be floating point, got dtype {action.dtype}")
        if action is not None and tuple(action.shape) != (batch, self.config.action_dim):
            raise ValueError(f"action must have shape ({batch}, {self.config.action_dim}), got {tuple(action.shape)}")
        self._check_frames(frame, 1)
        if frame.shape[0] != batch:
            raise ValueError(f"frame batch {frame.shape[0]} differs from the belief's {batch}")
        z, variances = self._latents(frame[:, None], running=True)
        z_t, R_t = z[:, 0], None if variances is None else variances[:, 0]
        predictive = prior.predict_observation(prior.step(belief, None, action), R_t)
        missing = ~torch.isfinite(z_t).all(-1)
        nll = -predictive.log_prob(torch.where(missing[:, None], predictive.mean.to(z_t.dtype), z_t))
        return nll.masked_fill(missing, float("nan"))

    def reward(self, belief: Gaussian, action: Tensor) -> Tensor:
        """Expected reward (B,) of taking `action` (B, a) at `belief` (B, S): the reward head's E r(h', u) under the
        predicted belief of the next state h' (exact: the head is quadratic, see `planning.RewardHead`).
        ValueError without a fitted reward head (ModelConfig.reward_head=True and data with rewards)."""
        prior = self._state_space("reward")
        if self.reward_head is None:
            raise ValueError("this model has no reward head: train it with ModelConfig.reward_head=True on data with "
                             "rewards (train.py control does)")
        batch = belief.mean.shape[0]
        if action is None or not action.is_floating_point() or tuple(action.shape) != (batch, self.config.action_dim):
            raise ValueError(f"action must be a float tensor of shape ({batch}, {self.config.action_dim}), got "
                             f"{None if action is None else tuple(action.shape)}")
        with torch.autocast(belief.mean.device.type, enabled=False):
            return self.reward_head.expected(prior.step(belief, None, action), action.to(belief.mean.dtype))

    def imagine(self, belief: Gaussian, actions: Tensor | int, observe: bool = False) -> Gaussian:
        """Exact k-step predictive Gaussians from `belief`, k = 1..H (no sampling).

        actions (B, H, a): actions[:, 0] is taken at the belief's step; or an int H (zero actions).
        Returns the state beliefs N(m_{t+k|t}, P_{t+k|t}) (B, H, S), or with observe=True the
        predictive distribution of the latents N(C m, C P C^T + R) (B, H, L).
        """
        prior = self._state_space("imagine")
        states = prior.rollout(belief, actions)
        return prior.predict_observation(states) if observe else states

    @torch.no_grad()
    def calibrate(self, frames: Tensor, actions: Tensor | None = None, mask: Tensor | None = None, horizon: int = 20,
                  burn_in: int = 5, batch_size: int = 32) -> PredictiveCalibration:
        """Fit the recalibrated k-step prediction bands (`worldmodel.calibration`) on whole episodes frames
        (B, T, ...), actions (B, T, a), mask (B, T): every filtered belief from step burn_in on predicts
        1..horizon steps ahead. Encodes batch_size episodes at a time. Returns (and keeps) `self.calibration`."""
        from worldmodel.evaluation import kstep_residuals

        prior = self._state_space("calibrate")
        self._check_inputs(frames, actions, mask)
        z, variances = self.latents(frames, mask, batch_size)
        _, standardized, valid = kstep_residuals(prior, z, actions, horizon, burn_in, mask, variances)
        return self.calibration.fit(standardized, valid)

    def prediction_band(self, belief: Gaussian, actions: Tensor | int, sigmas: float = 2.0) -> tuple[Tensor, Tensor]:
        """Lower and upper ends (B, H, L) of the k-step latent prediction bands from `belief` (actions as in
        `imagine`): mean +- the half-width whose coverage is nominally the Gaussian sigmas-sigma band's,
        erf(sigmas / sqrt 2), recalibrated by `calibrate` (before that: sigmas predictive standard deviations)."""
        prediction = self.imagine(belief, actions, observe=True)
        std = torch.diagonal(prediction.cov, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        half = self.calibration.half_widths(sigmas, std.shape[1]).to(std) * std
        return prediction.mean - half, prediction.mean + half

    # ---- checkpoints (the one format of worldmodel.checkpoint) -----------------------------------
    def save(self, path: str | Path) -> None:
        """One file (written atomically) holding the weights, the config (as a dict) and the project version."""
        write_checkpoint(path, model_payload(self.config.to_dict(), self.state_dict()))

    @classmethod
    def load(cls, path: str | Path, config: ModelConfig | dict | None = None,
             map_location: str | torch.device = "cpu") -> "WorldModel":
        """Load a model saved by `save` (or a train.py checkpoint). With `config`, the checkpoint must have
        been saved with that config (else ValueError naming the differing fields)."""
        ckpt = read_checkpoint(path, MODEL_KEYS, map_location)
        stored = ModelConfig.from_dict(ckpt["config"])
        if config is not None:
            wanted = ModelConfig.from_dict(config) if isinstance(config, dict) else config
            diff = {k: (v, getattr(wanted, k)) for k, v in stored.to_dict().items() if getattr(wanted, k) != v}
            if diff:
                detail = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"checkpoint {str(path)!r} was saved with another config ({detail})")
        model = cls(stored)
        model.load_weights(ckpt["state_dict"], str(path))
        return model

    def load_weights(self, state_dict: dict[str, Tensor], source: str = "the checkpoint") -> None:
        """load_state_dict of a checkpoint's weights (names of earlier versions upgraded); ValueError naming
        `source` when they do not fit this model's config."""
        try:
            self.load_state_dict(upgrade_state_dict(state_dict))
        except RuntimeError as err:
            raise ValueError(f"{source!r} does not match its config (written by another version?): {err}") from err

