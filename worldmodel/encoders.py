"""Encoders: a DreamerV3-style conv encoder for frames, an MLP encoder for vectors, and a
sequence wrapper that folds the (B, T) axes.

Frames arrive exactly as the envs and the rollout store hold them: uint8 (..., H, W, C). uint8 input
is scaled to [-0.5, 0.5] (DreamerV3's convention); float input is taken as already normalised.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


__all__ = ["ChannelLayerNorm", "ConvEncoder", "LinearEncoder", "MLPEncoder", "ResNetEncoder", "SequenceEncoder",
           "normalize_frames"]


def _scale_pixels(x: Tensor) -> Tensor:
    """Pixel values 0..255 (as floats) -> [-0.5, 0.5]."""
    return x / 255.0 - 0.5


def normalize_frames(frames: Tensor) -> Tensor:
    """uint8 frames -> float in [-0.5, 0.5]; float frames are returned as float (unchanged values)."""
    if frames.dtype == torch.uint8:
        return _scale_pixels(frames.float())
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
        x, convs, dtype = rearrange(frames, "n h w c -> n c h w"), self.convs, self.head.weight.dtype
        if frames.dtype != torch.uint8:
            return self.head(convs(normalize_frames(x).to(dtype)).flatten(1))
        x = x.to(dtype)
        if self.pool > 1:  # pool, then scale: the same values (both are linear), pool^2 fewer pixels scaled
            x, convs = convs[0](x), convs[1:]
        return self.head(convs(_scale_pixels(x)).flatten(1))


class _BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs with GroupNorm and ReLU around a shortcut (a strided 1x1
    projection when the stride or width changes)."""

    def __init__(self, width_in: int, width: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width_in, width, 3, stride, 1, bias=False), _norm("group", width), nn.ReLU(),
            nn.Conv2d(width, width, 3, 1, 1, bias=False), _norm("group", width))
        self.shortcut = nn.Identity() if stride == 1 and width_in == width else nn.Sequential(
            nn.Conv2d(width_in, width, 1, stride, bias=False), _norm("group", width))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """Images (N, H, W, C) -> projected latents (N, out_dim): a small ResNet backbone and an MLP projector,
    the image-SSL architecture (SimCLR / VICReg / BYOL: losses act on the projection, probes read the
    backbone's features).

    Backbone: average pooling by ``pool`` (1: none), a 3x3 stem of width ``depth`` (the CIFAR stem), then ``len(blocks)`` stages of basic blocks with widths depth * (1, 2, 4, 8, ...), every
    stage after the first halving the map, then global average pooling: ``feature_dim`` = depth *
    2^(stages - 1). GroupNorm instead of BatchNorm, so a sample's features never depend on its batch
    (multi-process training equals one process without synchronised statistics). Projector:
    Linear -> LayerNorm -> ReLU -> Linear (``hidden`` units).
    """

    def __init__(self, image_size: int = 32, channels: int = 3, out_dim: int = 64, depth: int = 32,
                 blocks: tuple[int, ...] = (1, 1, 1), hidden: int = 512, pool: int = 1):
        super().__init__()
        if int(image_size) != image_size or image_size < 8:
            raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
        self.image_size, self.channels, self.out_dim = int(image_size), channels, out_dim
        if int(pool) != pool or pool < 1 or not blocks or min(blocks) < 1:
            raise ValueError(f"pool must be an int >= 1 and blocks a non-empty list of counts >= 1, got {pool!r}, "
                             f"{blocks!r}")
        layers: list[nn.Module] = [nn.AvgPool2d(int(pool))] if pool > 1 else []
        layers += [nn.Conv2d(channels, depth, 3, 1, 1, bias=False), _norm("group", depth), nn.ReLU()]
        width_in = depth
        for stage, count in enumerate(blocks):
            width = depth * 2**stage
            for index in range(count):
                layers.append(_BasicBlock(width_in, width, 2 if stage and not index else 1))
                width_in = width
        self.backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = width_in
        self.projector = nn.Sequential(nn.Linear(width_in, hidden), nn.LayerNorm(hidden), nn.ReLU(),
                                       nn.Linear(hidden, out_dim))

    def features(self, frames: Tensor) -> Tensor:
        """frames: (N, H, W, C) uint8 or float -> backbone features (N, feature_dim)."""
        if frames.dim() != 4 or tuple(frames.shape[1:]) != (self.image_size, self.image_size, self.channels):
            raise ValueError(f"frames must have shape (N, {self.image_size}, {self.image_size}, {self.channels}) "
                             f"(image_size={self.image_size}, channels={self.channels} in the config), "
                             f"got {tuple(frames.shape)}")
        x = rearrange(normalize_frames(frames), "n h w c -> n c h w").to(self.projector[0].weight.dtype)
        return self.backbone(x.contiguous())

    def forward(self, frames: Tensor) -> Tensor:
        """frames: (N, H, W, C) uint8 or float -> (N, out_dim)."""
        return self.projector(self.features(frames))


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


class LinearEncoder(nn.Module):
    """Inputs (N, H, W, C) frames or (N, input_dim) vectors -> z = W P x, (N, out_dim).

    P is a fixed random projection with orthonormal rows (a buffer, saved with the model) of the
    flattened, `pool`-average-pooled input; W is a learned square map (`weight`, initialised to I). This is
    the invertible linear encoder of ICA: the `jacobian` entropy log|det W| is exact for the learned part.
    """

    def __init__(self, input_shape: tuple[int, ...], out_dim: int, pool: int = 1):
        super().__init__()
        self.pool = nn.AvgPool2d(pool) if len(input_shape) == 3 and pool > 1 else nn.Identity()
        if len(input_shape) == 3:
            height, width, channels = input_shape
            features = (height // pool) * (width // pool) * channels if pool > 1 else height * width * channels
        else:
            features = int(input_shape[0])
        if features < out_dim:
            raise ValueError(f"LinearEncoder needs at least out_dim={out_dim} input features, got {features}")
        self.image = len(input_shape) == 3
        self.register_buffer("projection", torch.linalg.qr(torch.randn(features, out_dim))[0].T.contiguous())
        self.linear = nn.Linear(out_dim, out_dim, bias=False)
        nn.init.eye_(self.linear.weight)

    @property
    def weight(self) -> Tensor:
        """The learned square map W (out_dim, out_dim)."""
        return self.linear.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.image:
            x = self.pool(rearrange(normalize_frames(x), "n h w c -> n c h w"))
        flat = x.flatten(1).to(self.projection.dtype)
        return self.linear(flat @ self.projection.T)
