"""Encoders: a DreamerV3-style conv encoder for frames, an MLP encoder for vectors, and a
sequence wrapper that folds the (B, T) axes.

Frames arrive exactly as the envs and the rollout store hold them: uint8 (..., H, W, C). uint8 input
is scaled to [-0.5, 0.5] (DreamerV3's convention); float input is taken as already normalised.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from worldmodel.distributed import gather

__all__ = ["ChannelLayerNorm", "ConvEncoder", "LatentNorm", "MLPEncoder", "SequenceEncoder", "normalize_frames"]


def normalize_frames(frames: Tensor) -> Tensor:
    """uint8 frames -> float in [-0.5, 0.5]; float frames are returned as float (unchanged values)."""
    if frames.dtype == torch.uint8:
        return frames.float() / 255.0 - 0.5
    if not frames.is_floating_point():
        raise ValueError(f"frames must be uint8 or floating point, got dtype {frames.dtype}")
    return frames


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (N, C, H, W) feature map, per pixel (as in DreamerV3)."""

    def __init__(self, channels: int, eps: float = 1e-3):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return rearrange(self.norm(rearrange(x, "n c h w -> n h w c")), "n h w c -> n c h w")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "layer":
        return ChannelLayerNorm(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'layer', 'group' or 'none', got {kind!r}")


class ConvEncoder(nn.Module):
    """Frames (N, H, W, C) -> features (N, out_dim), for any square H = W >= 8.

    Average-pools the input by ``pool`` (reduced to the largest factor that divides H and leaves at
    least 16 px; 1 if none), then applies up to four stride-2 4x4 convolutions (padding 1, so each
    maps s px to floor(s / 2)) with widths depth * (1, 2, 4, 8), each followed by a norm and SiLU
    (DreamerV3), and a linear head on the flattened final map. A stage is left out only when it would
    shrink the map below 1x1 (pooled sizes 8..15 get three stages), so every size that is a multiple
    of 16 * pool keeps the four-stage architecture with an (H / 16 / pool)^2 * 8 depth map.

    Args:
        image_size: H = W of the input frames, >= 8.
        channels: C of the input frames.
        out_dim: output feature size.
        depth: width multiplier of the conv stages.
        norm: "layer" (per-pixel channel LayerNorm), "group" or "none".
        pool: largest average-pooling factor applied to the input before the convs (2: a cheap first
            stage for small CPU budgets); the factor used is ``self.pool``.
    """

    def __init__(self, image_size: int = 64, channels: int = 3, out_dim: int = 8, depth: int = 32,
                 norm: str = "layer", pool: int = 1):
        super().__init__()
        if int(image_size) != image_size or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        if int(pool) != pool or pool < 1:
            raise ValueError(f"pool must be an int >= 1, got {pool!r}")
        image_size = int(image_size)
        pool = max((p for p in range(1, int(pool) + 1) if image_size % p == 0 and image_size // p >= 16), default=1)
        self.image_size, self.channels, self.out_dim, self.pool = image_size, channels, out_dim, pool
        layers: list[nn.Module] = [nn.AvgPool2d(pool)] if pool > 1 else []
        width_in, res = channels, image_size // pool
        for mult in (1, 2, 4, 8):
            if res < 2:
                break
            width = depth * mult
            layers += [nn.Conv2d(width_in, width, 4, stride=2, padding=1, bias=norm == "none"),
                       _norm(norm, width), nn.SiLU()]
            width_in, res = width, res // 2
        self.convs = nn.Sequential(*layers)
        self.head = nn.Linear(width_in * res * res, out_dim)

    def forward(self, frames: Tensor) -> Tensor:
        """frames: (N, H, W, C) uint8 or float -> (N, out_dim)."""
        if frames.dim() != 4 or tuple(frames.shape[1:]) != (self.image_size, self.image_size, self.channels):
            raise ValueError(f"frames must have shape (N, {self.image_size}, {self.image_size}, {self.channels}) "
                             f"(image_size={self.image_size}, channels={self.channels} in the config), "
                             f"got {tuple(frames.shape)}")
        x = rearrange(normalize_frames(frames), "n h w c -> n c h w").to(self.head.weight.dtype)
        return self.head(self.convs(x).flatten(1))


class MLPEncoder(nn.Module):
    """Vectors (N, in_dim) -> (N, out_dim): `layers` hidden Linear + LayerNorm + SiLU blocks, linear head."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        blocks: list[nn.Module] = []
        width_in = in_dim
        for _ in range(layers):
            blocks += [nn.Linear(width_in, hidden), nn.LayerNorm(hidden), nn.SiLU()]
            width_in = hidden
        blocks.append(nn.Linear(width_in, out_dim))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, in_dim) -> (N, out_dim)."""
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"x must have shape (N, {self.in_dim}), got {tuple(x.shape)}")
        return self.net(x.to(self.net[0].weight.dtype))


class SequenceEncoder(nn.Module):
    """Applies a per-item encoder to (B, T, ...) inputs by folding (B, T) into one batch axis.

    Items with a NaN anywhere (dropped frames) are encoded from zeros and come out as NaN latents,
    so the filter downstream treats them as missing.
    """

    def __init__(self, encoder: nn.Module, chunk_size: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.chunk_size = chunk_size

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, T, ...) -> (B, T, out_dim)."""
        if x.dim() < 3:
            raise ValueError(f"x must have shape (B, T, ...), got {tuple(x.shape)}")
        b = x.shape[0]
        flat = rearrange(x, "b t ... -> (b t) ...")
        missing = None
        if flat.is_floating_point():
            missing = torch.isnan(flat).flatten(1).any(1)
            if missing.any():
                flat = torch.where(torch.isnan(flat), torch.zeros((), dtype=flat.dtype), flat)
            else:
                missing = None
        if self.chunk_size is None or flat.shape[0] <= self.chunk_size:
            out = self.encoder(flat)
        else:
            out = torch.cat([self.encoder(c) for c in flat.split(self.chunk_size)])
        if missing is not None:
            out = out.masked_fill(missing[:, None], float("nan"))
        return rearrange(out, "(b t) d -> b t d", b=b)


class LatentNorm(nn.Module):
    """Normalises latents (B, T, d) to zero mean and unit (co)variance; no learned parameters.

    kind="batch": per-dimension standardisation (z - mu) / sigma; kind="whiten": Cholesky whitening
    L^{-1} (z - mu) with Cov = L L^T; kind="none": identity. Fixing the latent scale removes the trivial
    collapse of the stop-gradient Kalman objective (a plug-in with a detached target has no entropy term
    that would prevent it).

    Training normalises with the statistics of the batch (their gradient is what stops the encoder
    from collapsing); eval (filtering, stepping, evaluation) with running statistics. These are
    bias-corrected exponential averages of the batch mean and of the uncentred second moment E[z z^T],
    so Cov = E[z z^T] - mu mu^T estimates the population covariance, not the smaller average
    within-batch covariance of time-correlated windows (which would mis-scale the latents in eval).
    Statistics use observed, finite rows only (mask (B, T) True = observed) and are gathered over
    ranks under torch.distributed (DDP sees the global batch).
    """

    def __init__(self, dim: int, kind: str = "batch", momentum: float = 0.02, eps: float = 1e-4):
        super().__init__()
        if kind not in ("batch", "whiten", "none"):
            raise ValueError(f"kind must be 'batch', 'whiten' or 'none', got {kind!r}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.kind, self.momentum, self.eps = kind, momentum, eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_moment", torch.zeros(dim, dim))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    def statistics(self) -> tuple[Tensor, Tensor]:
        """Running (mean (d,), covariance (d, d)); (0, I) before the first training batch."""
        n = int(self.num_batches)
        if n == 0:
            return self.running_mean.clone(), torch.eye(len(self.running_mean), dtype=self.running_mean.dtype,
                                                        device=self.running_mean.device)
        correction = 1.0 - (1.0 - self.momentum) ** n
        mean = self.running_mean / correction
        return mean, self.running_moment / correction - torch.outer(mean, mean)

    def _normalise(self, z: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
        x = z - mean.to(z.dtype)
        cov = cov.to(z.dtype)
        if self.kind == "batch":
            return x / (cov.diagonal() + self.eps).sqrt()
        chol = torch.linalg.cholesky(cov + self.eps * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device))
        return torch.linalg.solve_triangular(chol, x.unsqueeze(-1), upper=False).squeeze(-1)

    def forward(self, z: Tensor, mask: Tensor | None = None, running: bool = False) -> Tensor:
        """z: (B, T, d) (NaN rows stay NaN) -> (B, T, d). running=True uses the running statistics even
        in training mode (online filtering of single frames)."""
        if self.kind == "none":
            return z
        missing = ~torch.isfinite(z).all(-1)
        if missing.any():  # normalise zeros in their place (NaN must not reach the backward pass)
            observed = ~missing if mask is None else mask & ~missing
            return self(z.masked_fill(missing[..., None], 0.0), observed, running).masked_fill(missing[..., None],
                                                                                              float("nan"))
        if running or not self.training:
            return self._normalise(z, *self.statistics())
        rows = rearrange(z, "b t d -> (b t) d")
        if mask is not None:
            rows = rows[rearrange(mask, "b t -> (b t)")]
        rows = gather(rows)
        if rows.shape[0] < 2:
            raise ValueError("LatentNorm needs at least 2 observed latents in a training batch")
        mean = rows.mean(0)
        centred = rows - mean
        cov = centred.mT @ centred / (rows.shape[0] - 1)
        with torch.no_grad():
            moment = rows.mT @ rows / rows.shape[0]
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_moment.lerp_(moment.to(self.running_moment.dtype), self.momentum)
            self.num_batches += 1
        return self._normalise(z, mean, cov)
