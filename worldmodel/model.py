"""WorldModel: encoder + latent normalisation + LDM objective (latent model P_theta and entropy H).

Pixels go in as uint8 (B, T, H, W, C), exactly as the envs and the rollout store hold them (float
frames are also accepted; NaN frames count as dropped). The encoder maps every frame x_t to a latent
z_t in R^L; for the Kalman presets z_t is the observation of a hidden state h_t in R^S of a learned
linear-Gaussian state-space model, which gives exact filtering (`filter`, `step`) and exact k-step
prediction (`imagine`) (DESIGN section 1; Mikulasch & Zenke 2026, Sec. 6.1).

Actions follow the store's convention: actions[:, t] is taken after frame t. The model shifts them to
the filter's convention itself, u = cat(0, actions[:, :-1]) (u[:, t] drives the transition into t).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from worldmodel import __version__
from worldmodel.encoders import ConvEncoder, LatentNorm, MLPEncoder, SequenceEncoder
from worldmodel.kalman import FilterResult, Gaussian
from worldmodel.ldm import LossOutput
from worldmodel.methods import PRESETS, make

__all__ = ["ModelConfig", "WorldModel", "shift_actions"]

CHECKPOINT_FORMAT = "ldm-worldmodel/world-model"


@dataclass
class ModelConfig:
    """Architecture and objective of a WorldModel (plain values only: it is stored in checkpoints)."""

    encoder: str = field(default="conv", metadata={"help": "conv (frames) or mlp (vector observations)"})
    image_size: int = field(default=64, metadata={"help": "H = W of the frames (conv encoder)"})
    channels: int = field(default=3, metadata={"help": "C of the frames (conv encoder)"})
    depth: int = field(default=16, metadata={"help": "conv encoder width multiplier: widths depth*(1,2,4,8)"})
    pool: int = field(default=2, metadata={
        "help": "average-pool the frames by this factor before the convs (2: a cheap first stage)"})
    norm: str = field(default="layer", metadata={"help": "conv encoder norm: layer, group or none"})
    input_dim: int = field(default=0, metadata={"help": "observation size (mlp encoder)"})
    hidden: int = field(default=256, metadata={"help": "hidden width (mlp encoder)"})
    layers: int = field(default=2, metadata={"help": "hidden layers (mlp encoder)"})
    latent_dim: int = field(default=8, metadata={"help": "L, the encoder latent (observation) dimension"})
    state_dim: int | None = field(default=None, metadata={"help": "S, the Kalman state dimension (none = 2 L)"})
    action_dim: int = field(default=1, metadata={"help": "action size (0 = uncontrolled)"})
    method: str = field(default="kalman", metadata={"help": "preset of worldmodel.methods (kalman, vicreg, ...)"})
    method_kwargs: dict = field(default_factory=dict, metadata={"help": "JSON overrides of methods.make"})
    latent_norm: str = field(default="auto", metadata={
        "help": "batch, whiten, none, or auto (whiten for plug-in Kalman presets, none otherwise)"})
    heteroscedastic: bool = field(default=False, metadata={
        "help": "predict the Kalman observation noise per frame from the encoder"})
    kalman_lr_multiplier: float = field(default=100.0, metadata={
        "help": "learning-rate multiplier of the Kalman parameters (the paper uses 100)"})
    multistep_horizon: int = field(default=10, metadata={
        "help": "Kalman methods: also fit the exact k-step predictive log-likelihoods, k = 2..H (0 = off; "
                "ignored by other methods)"})
    multistep_weight: float = field(default=3.0, metadata={"help": "weight of the k-step term in the loss"})

    def __post_init__(self):
        if self.encoder not in ("conv", "mlp"):
            raise ValueError(f"encoder must be 'conv' or 'mlp', got {self.encoder!r}")
        if self.method not in PRESETS:
            raise ValueError(f"method must be one of {sorted(PRESETS)}, got {self.method!r}")
        if self.latent_norm not in ("auto", "batch", "whiten", "none"):
            raise ValueError(f"latent_norm must be auto, batch, whiten or none, got {self.latent_norm!r}")
        if self.latent_dim < 1 or self.action_dim < 0 or (self.state_dim is not None and self.state_dim < 1):
            raise ValueError("latent_dim and state_dim must be >= 1 and action_dim >= 0")
        if self.encoder == "mlp" and self.input_dim < 1:
            raise ValueError("encoder='mlp' needs input_dim >= 1")
        if self.heteroscedastic and not self.is_kalman:
            raise ValueError(f"heteroscedastic=True needs a Kalman method, got {self.method!r}")
        if self.multistep_horizon < 0 or self.multistep_horizon == 1:
            raise ValueError(f"multistep_horizon must be 0 (off) or >= 2, got {self.multistep_horizon}")

    @property
    def is_kalman(self) -> bool:
        """True when the method's latent model is a KalmanLatentModel (filtering is available)."""
        preset = PRESETS[self.method]
        return preset is not None and preset.model == "kalman"

    @property
    def resolved_latent_norm(self) -> str:
        if self.latent_norm != "auto":
            return self.latent_norm
        entropy = self.method_kwargs.get("entropy", PRESETS[self.method].entropy if PRESETS[self.method] else None)
        return "whiten" if self.is_kalman and entropy == "plugin" else "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ModelConfig":
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
    """Encoder + latent normalisation + LDM objective; filtering and imagination for Kalman presets.

    Build with `WorldModel.from_config(ModelConfig(...))`. Attributes: `encoder` (SequenceEncoder),
    `latent_norm` (LatentNorm), `objective` (LDMLoss of `worldmodel.methods.make`), `latent_model`
    (the objective's latent model), `target_encoder` / `target_norm` (EMA copies, only when the
    objective has `target_ema`).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        L = config.latent_dim
        out_dim = 2 * L if config.heteroscedastic else L
        if config.encoder == "conv":
            item = ConvEncoder(config.image_size, config.channels, out_dim, config.depth, config.norm, config.pool)
        else:
            item = MLPEncoder(config.input_dim, out_dim, config.hidden, config.layers)
        self.encoder = SequenceEncoder(item)
        self.latent_norm = LatentNorm(L, config.resolved_latent_norm)
        overrides = dict(config.method_kwargs)
        if config.is_kalman:
            overrides.setdefault("action_dim", config.action_dim)
            overrides.setdefault("state_dim", config.state_dim)
        self.objective = make(config.method, L, **overrides)
        if config.is_kalman:
            self.latent_model.param_group_lr_multiplier = float(config.kalman_lr_multiplier)
        self.target_encoder: SequenceEncoder | None = None
        self.target_norm: LatentNorm | None = None
        if getattr(self.objective, "target_ema", None) is not None:
            self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self.target_norm = copy.deepcopy(self.latent_norm)

    @classmethod
    def from_config(cls, config: ModelConfig | dict) -> "WorldModel":
        return cls(ModelConfig.from_dict(config) if isinstance(config, dict) else config)

    @property
    def latent_model(self) -> nn.Module:
        return self.objective.latent_model

    # ---- encoding ----------------------------------------------------------------------------
    def _check_frames(self, frames: Tensor, extra: int) -> None:
        cfg = self.config
        item = (cfg.image_size, cfg.image_size, cfg.channels) if cfg.encoder == "conv" else (cfg.input_dim,)
        if frames.dim() != extra + len(item) or tuple(frames.shape[extra:]) != item:
            lead = "(B, T, " if extra == 2 else "(B, "
            raise ValueError(f"frames must have shape {lead}{', '.join(map(str, item))}) for this config "
                             f"(image_size={cfg.image_size}, channels={cfg.channels}), got {tuple(frames.shape)}")

    def _latents(self, frames: Tensor, mask: Tensor | None = None, target: bool = False,
                 running: bool = False) -> tuple[Tensor, Tensor | None]:
        """frames (B, T, ...) -> normalised latents z (B, T, L) (NaN where a frame is NaN) and the
        per-frame observation-noise variances (B, T, L) (heteroscedastic) or None. running=True
        normalises with the running statistics also in training mode."""
        self._check_frames(frames, 2)
        encoder, norm = (self.target_encoder, self.target_norm) if target else (self.encoder, self.latent_norm)
        out = encoder(frames)
        L = self.config.latent_dim
        z, variances = out[..., :L], None
        if self.config.heteroscedastic:
            variances = nn.functional.softplus(out[..., L:]) + 1e-4
            variances = torch.nan_to_num(variances, nan=1.0)
        return norm(z, mask, running), variances

    def encode(self, frames: Tensor) -> Tensor:
        """Latents z (B, T, L) of frames (B, T, H, W, C) (or (B, T, input_dim) for the mlp encoder)."""
        return self._latents(frames)[0]

    # ---- training ----------------------------------------------------------------------------
    def loss(self, frames: Tensor, actions: Tensor | None = None, mask: Tensor | None = None) -> LossOutput:
        """The LDM loss of a batch of windows: frames (B, T, ...), actions (B, T, a) stored convention,
        mask (B, T) bool (True = observed; NaN frames are also treated as dropped)."""
        self._check_actions(frames, actions)
        z, variances = self._latents(frames, mask)
        observed = torch.isfinite(z).all(-1)
        if mask is not None:
            observed = observed & mask.to(torch.bool)
        has_missing = not bool(observed.all())
        z = torch.where(observed[..., None], z, torch.zeros((), dtype=z.dtype, device=z.device))
        target = None
        if self.target_encoder is not None:
            with torch.no_grad():
                target = self._latents(frames, mask, target=True)[0]
                target = torch.where(observed[..., None], target, torch.zeros((), dtype=z.dtype, device=z.device))
        kwargs = {} if variances is None else {"R": variances}
        u = shift_actions(actions) if self.config.is_kalman else None
        mask = observed if has_missing else None
        out = self.objective(z, u=u, mask=mask, target=target, **kwargs)
        if not (self.config.multistep_horizon and self.config.is_kalman):
            return out
        multistep = self._multistep_log_likelihood(z, u, mask, variances, z.detach() if target is None else target)
        loss = out.loss - self.config.multistep_weight * multistep
        return LossOutput(loss, out.alignment, out.entropy,
                          {**out.logs, "loss": float(loss.detach()), "multistep": float(multistep.detach())})

    def _multistep_log_likelihood(self, z: Tensor, u: Tensor | None, mask: Tensor | None, variances: Tensor | None,
                                  target: Tensor) -> Tensor:
        """Mean over t and k = 2..H of log N(SG[z_{t+k}]; C m_{t+k|t}, C P_{t+k|t} C^T + R) per latent dimension:
        the exact k-step predictive from every filtered belief (latent overshooting, Hafner et al. 2019, with
        the stop-gradient target of the plug-in). Fits the long-horizon predictive spread of a misspecified
        linear model, which the one-step likelihood alone leaves too narrow."""
        lm = self.latent_model
        b, t_len, d = z.shape
        horizon = min(self.config.multistep_horizon, t_len - 1)
        if horizon < 2:
            return z.new_zeros(())
        filtered = lm.filter(z, u=u, mask=mask, R=variances).filtered
        steps = torch.arange(t_len - 2, device=z.device)  # beliefs with at least 2 steps ahead
        times = steps[:, None] + torch.arange(1, horizon + 1, device=z.device)  # (S, H) target steps
        valid = (times < t_len).expand(b, -1, -1)
        times = times.clamp(max=t_len - 1)
        belief = Gaussian(rearrange(filtered.mean[:, steps], "b s n -> (b s) n"),
                          rearrange(filtered.cov[:, steps], "b s n m -> (b s) n m"))
        controls = z.new_zeros(b, len(steps), horizon, lm.action_dim) if u is None else u[:, times]
        controls = rearrange(controls * valid[..., None], "b s h a -> (b s) h a")
        noise = None if variances is None else rearrange(variances[:, times], "b s h d -> (b s) h d")
        pred = lm.observe(lm.rollout(belief, controls), noise)
        if mask is not None:
            valid = valid & mask[:, times]
        valid = rearrange(valid, "b s h -> (b s) h")[:, 1:]
        tgt = rearrange(target[:, times], "b s h d -> (b s) h d")[:, 1:].to(pred.mean.dtype)
        chol = torch.linalg.cholesky_ex(pred.cov[:, 1:])[0]
        white = torch.linalg.solve_triangular(chol, (tgt - pred.mean[:, 1:]).unsqueeze(-1), upper=False).squeeze(-1)
        ll = -0.5 * white.pow(2).sum(-1) - torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1) \
            - 0.5 * d * math.log(2 * math.pi)
        return (ll * valid).sum() / valid.sum().clamp_min(1) / d

    @torch.no_grad()
    def update_target(self) -> None:
        """EMA update of the target encoder (call after every optimizer step; no-op without one)."""
        if self.target_encoder is None:
            return
        decay = float(self.objective.target_ema)
        for target, online in ((self.target_encoder, self.encoder), (self.target_norm, self.latent_norm)):
            for t, o in zip(target.parameters(), online.parameters()):
                t.lerp_(o, 1.0 - decay)
            for t, o in zip(target.buffers(), online.buffers()):
                t.copy_(o)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups: the Kalman parameters at lr * kalman_lr_multiplier, the rest at lr."""
        fast: list[nn.Parameter] = []
        seen: set[int] = set()
        if self.config.is_kalman:
            fast = [p for p in self.latent_model.parameters() if p.requires_grad]
            seen = {id(p) for p in fast}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in seen]
        groups = [{"params": rest, "lr": lr}]
        if fast:
            groups.append({"params": fast, "lr": lr * self.config.kalman_lr_multiplier})
        return groups

    # ---- filtering and imagination (Kalman presets) ------------------------------------------
    def _require_kalman(self, what: str) -> None:
        if not self.config.is_kalman:
            kalman = sorted(n for n, p in PRESETS.items() if p is not None and p.model == "kalman")
            raise TypeError(f"WorldModel.{what} needs a Kalman latent model (method one of {kalman}), "
                            f"got method {self.config.method!r}")

    def _check_actions(self, frames: Tensor, actions: Tensor | None) -> None:
        if actions is None:
            return
        a = self.config.action_dim
        if actions.dim() != 3 or tuple(actions.shape[:2]) != tuple(frames.shape[:2]) or actions.shape[-1] != a:
            raise ValueError(f"actions must have shape (B, T, {a}) matching frames {tuple(frames.shape[:2])}, "
                             f"got {tuple(actions.shape)}")

    def filter(self, frames: Tensor, actions: Tensor | None = None, mask: Tensor | None = None) -> FilterResult:
        """Exact Kalman filtering of frames (B, T, ...): FilterResult with filtered N(m_{t|t}, P_{t|t})
        and predicted N(m_{t|t-1}, P_{t|t-1}) state beliefs (B, T, S). Missing frames (mask False or
        NaN) are only predicted."""
        self._require_kalman("filter")
        self._check_actions(frames, actions)
        z, variances = self._latents(frames, mask)
        return self.latent_model.filter(z, u=shift_actions(actions), mask=mask, R=variances)

    def features(self, frames: Tensor, actions: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Readout features (B, T, F): filtered state means m_{t|t} for Kalman methods, else the latents."""
        if self.config.is_kalman:
            return self.filter(frames, actions, mask).filtered.mean
        return self.encode(frames)

    def init_belief(self, batch_size: int) -> Gaussian:
        """Belief N(m0, P0) of the state before the first frame: mean (B, S), cov (B, S, S)."""
        self._require_kalman("init_belief")
        return self.latent_model.init_belief(batch_size)

    def step(self, belief: Gaussian, frame: Tensor | None = None, action: Tensor | None = None) -> Gaussian:
        """One online filter step: predict with `action` (B, a), the action applied since the belief's
        time (None = zero action), then update with the live `frame` (B, H, W, C). frame=None, or a
        frame with NaN, only predicts. Starting from init_belief and calling step(belief, frame[:, t],
        action[:, t-1]) (action None at t=0) reproduces `filter`'s filtered beliefs."""
        self._require_kalman("step")
        batch = belief.mean.shape[0]
        if action is not None and tuple(action.shape) != (batch, self.config.action_dim):
            raise ValueError(f"action must have shape ({batch}, {self.config.action_dim}), got {tuple(action.shape)}")
        z_t = variances = None
        if frame is not None:
            self._check_frames(frame, 1)
            if frame.shape[0] != batch:
                raise ValueError(f"frame batch {frame.shape[0]} differs from the belief's {batch}")
            z, var = self._latents(frame[:, None], running=True)
            z_t, variances = z[:, 0], None if var is None else var[:, 0]
        return self.latent_model.step(belief, z_t, action, R_t=variances)

    def imagine(self, belief: Gaussian, actions: Tensor | int, observe: bool = False) -> Gaussian:
        """Exact k-step predictive Gaussians from `belief`, k = 1..H (no sampling).

        actions (B, H, a): actions[:, 0] is taken at the belief's step; or an int H (zero actions).
        Returns the state beliefs N(m_{t+k|t}, P_{t+k|t}) (B, H, S), or with observe=True the
        predictive distribution of the latents N(C m, C P C^T + R) (B, H, L).
        """
        self._require_kalman("imagine")
        states = self.latent_model.rollout(belief, actions)
        return self.latent_model.observe(states) if observe else states

    # ---- checkpoints ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """One file holding the weights, the config (as a dict) and the project version."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": CHECKPOINT_FORMAT, "version": __version__, "config": self.config.to_dict(),
                    "state_dict": self.state_dict()}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, config: ModelConfig | dict | None = None,
             map_location: str | torch.device = "cpu") -> "WorldModel":
        """Load a `save`d model. With `config`, the checkpoint must have been saved with that config
        (else ValueError naming the differing fields)."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
        try:
            ckpt = torch.load(Path(path), map_location=map_location, weights_only=True)
        except Exception as err:  # not a torch file
            raise ValueError(f"{str(path)!r} is not a WorldModel checkpoint: {err}") from err
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{str(path)!r} is not a WorldModel checkpoint (saved by WorldModel.save)")
        stored = ModelConfig.from_dict(ckpt["config"])
        if config is not None:
            wanted = ModelConfig.from_dict(config) if isinstance(config, dict) else config
            diff = {k: (v, getattr(wanted, k)) for k, v in stored.to_dict().items() if getattr(wanted, k) != v}
            if diff:
                detail = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in diff.items())
                raise ValueError(f"checkpoint {str(path)!r} was saved with another config ({detail})")
        model = cls(stored)
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as err:
            raise ValueError(f"checkpoint {str(path)!r} does not match its config: {err}") from err
        return model
