"""Image augmentations for two-view SSL, in plain torch (no torchvision), batched and device-agnostic.

Every function takes a float image (3, H, W) or a batch (N, 3, H, W) in [0, 1] and returns a new image
or batch of the same layout in [0, 1]. Random parameters are drawn per image, from ``generator`` (a
``torch.Generator`` on any device; default: torch's global generator, which DataLoader seeds per
worker), so a batch on a GPU is augmented there in a handful of kernels. ``SSLAugment`` chains them as
in SimCLR / BYOL.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_LUMA = (0.299, 0.587, 0.114)


def _check(image: Tensor) -> None:
    if image.ndim not in (3, 4) or image.shape[-3] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float tensor (3, H, W) or (N, 3, H, W), got {tuple(image.shape)} "
                         f"{image.dtype}")


def _batched(image: Tensor) -> tuple[Tensor, bool]:
    """(N, 3, H, W) view of an image or batch, and whether it was a single image."""
    _check(image)
    return (image[None], True) if image.ndim == 3 else (image, False)


def _rand(n: int, image: Tensor, generator: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> Tensor:
    """(n,) uniform draws on [low, high) on the generator's device, moved to the image's device and dtype."""
    device = generator.device if generator is not None else image.device
    draws = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return (low + (high - low) * draws).to(image.device, image.dtype)


def _per_image(value: float | Tensor, n: int, image: Tensor) -> Tensor:
    """A scalar or (n,) parameter as an (n, 1, 1, 1) tensor broadcasting over (n, 3, H, W)."""
    return torch.as_tensor(value, dtype=image.dtype, device=image.device).expand(n).reshape(n, 1, 1, 1)


def resize(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bilinear resize of (3, H, W) or (N, 3, H, W) to (..., *size)."""
    batch, single = _batched(image)
    if tuple(batch.shape[-2:]) != tuple(size):
        batch = F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return batch[0] if single else batch


def random_resized_crop(
    image: Tensor,
    size: tuple[int, int],
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    flip: Tensor | None = None,
    angle: Tensor | None = None,
) -> Tensor:
    """Crop a random box of area fraction ~ U(scale) and log-uniform aspect ratio from each image, resized
    to ``size`` (torchvision's box algorithm: 10 tries per image, then the largest centred box with a
    valid ratio; integer boxes). The crop is read by bilinear sampling at the output pixel centres, so a
    box of the output's size is copied exactly. ``flip`` (N,) bool mirrors the chosen images horizontally;
    ``angle`` (N,) radians rotates each box about its centre (the view turns clockwise on screen; points outside
    the image take the nearest edge pixel)."""
    batch, single = _batched(image)
    n, _, height, width = batch.shape
    tries = 10
    area = _rand(n * tries, batch, generator, *scale).double().view(n, tries) * height * width
    log_ratio = _rand(n * tries, batch, generator, math.log(ratio[0]), math.log(ratio[1])).double().view(n, tries)
    w, h = torch.round(torch.sqrt(area * log_ratio.exp())), torch.round(torch.sqrt(area / log_ratio.exp()))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.double().argmax(1, keepdim=True)  # the first valid try (0 when none is)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], valid.any(1)
    aspect = width / height  # fallback: the whole image, cut to the nearest valid ratio
    fw, fh = (width, round(width / ratio[0])) if aspect < ratio[0] else (
        (round(height * ratio[1]), height) if aspect > ratio[1] else (width, height))
    w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
    top = torch.where(found, torch.floor(_rand(n, batch, generator).double() * (height - h + 1)), (height - h) // 2)
    left = torch.where(found, torch.floor(_rand(n, batch, generator).double() * (width - w + 1)), (width - w) // 2)
    out_h, out_w = size
    cols = (torch.arange(out_w, dtype=torch.float64, device=batch.device) + 0.5) / out_w  # (W',) in (0, 1)
    if flip is not None:
        cols = torch.where(flip.to(batch.device)[:, None], 1 - cols, cols)  # (N, W')
    rows = (torch.arange(out_h, dtype=torch.float64, device=batch.device) + 0.5) / out_h
    x = (left[:, None] + cols * w[:, None])[:, None, :]  # (N, 1, W') in pixels
    y = (top[:, None] + rows * h[:, None])[:, :, None]  # (N, H', 1)
    if angle is not None:  # about the box centre, in pixels
        cx, cy = (left + w / 2)[:, None, None], (top + h / 2)[:, None, None]
        cos, sin = (f(angle.to(batch.device, torch.float64))[:, None, None] for f in (torch.cos, torch.sin))
        x, y = cx + (x - cx) * cos + (y - cy) * sin, cy - (x - cx) * sin + (y - cy) * cos
    x, y = torch.broadcast_tensors(x * (2 / width) - 1, y * (2 / height) - 1)  # normalised, align_corners=False
    grid = torch.stack([x, y], -1).to(batch.dtype)  # (N, H', W', 2)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="border", align_corners=False).clamp(0, 1)
    return out[0] if single else out


def horizontal_flip(image: Tensor) -> Tensor:
    return image.flip(-1)


def grayscale(image: Tensor) -> Tensor:
    """Luma 0.299 R + 0.587 G + 0.114 B, repeated over the 3 channels."""
    _check(image)
    luma = torch.einsum("...chw,c->...hw", image, torch.tensor(_LUMA, dtype=image.dtype, device=image.device))
    return luma.unsqueeze(-3).expand_as(image).clone()


def adjust_hue(image: Tensor, shift: float | Tensor) -> Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5]; a float or one per image (N,)) through an exact
    RGB -> HSV -> RGB round trip."""
    batch, single = _batched(image)
    r, g, b = batch.unbind(-3)  # elementwise below: reductions over the channel axis are slow on CPU
    value, low = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    chroma = value - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    sector = torch.where(r == value, (g - b) / safe, torch.where(g == value, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma > 0, sector / 6, torch.zeros_like(sector)) + _per_image(shift, len(batch), batch)[:, 0]
    hue = hue - hue.floor()  # (N, H, W) in [0, 1)
    # HSV -> RGB: channel n uses k = (n + 6 h) mod 6, f(n) = V - C max(0, min(k, 4 - k, 1))
    k = torch.tensor([5.0, 3.0, 1.0], dtype=batch.dtype, device=batch.device)[:, None, None] + 6 * hue[:, None]
    k = torch.where(k >= 6, k - 6, k)
    out = value[:, None] - chroma[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return out[0] if single else out


def color_jitter(
    image: Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Brightness x b, contrast (blend with the mean luma), saturation (blend with grayscale), hue shift,
    with factors b, c, s ~ U(1 - x, 1 + x) and hue ~ U(-hue, hue) turns per image; applied in that order."""
    batch, single = _batched(image)
    n = len(batch)
    factor = lambda x: _rand(n, batch, generator, 1 - x, 1 + x).view(n, 1, 1, 1)
    batch = (batch * factor(brightness)).clamp(0, 1)
    c = factor(contrast)
    batch = (c * batch + (1 - c) * grayscale(batch).mean((-3, -2, -1), keepdim=True)).clamp(0, 1)
    s = factor(saturation)
    batch = (s * batch + (1 - s) * grayscale(batch)).clamp(0, 1)
    if hue:
        batch = adjust_hue(batch, _rand(n, batch, generator, -hue, hue))
    return batch[0] if single else batch


def gaussian_blur(image: Tensor, sigma: float | Tensor) -> Tensor:
    """Separable Gaussian blur with std ``sigma`` pixels (a float or one per image (N,); kernel radius
    ceil(3 max sigma), reflect padding)."""
    batch, single = _batched(image)
    n, c, height, width = batch.shape
    sigma = _per_image(sigma, n, batch).view(n, 1)
    radius = min(max(1, math.ceil(3 * float(sigma.max()))), min(height, width) - 1)
    x = torch.arange(-radius, radius + 1, dtype=batch.dtype, device=batch.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum(-1, keepdim=True)).repeat_interleave(c, 0)  # (N * 3, K)
    out = F.pad(batch.reshape(1, n * c, height, width), (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel[:, None, None, :], groups=n * c)
    out = F.conv2d(out, kernel[:, None, :, None], groups=n * c).view(n, c, height, width)
    return out[0] if single else out


class SSLAugment:
    """SimCLR-style view: random resized crop (rotated by ~ U(-rotation, rotation) degrees; default 0) ->
    flip (p=``flip_p``) -> colour jitter (p=``jitter_p``) -> grayscale (p=``gray_p``) -> Gaussian blur
    (p=``blur_p``, sigma ~ U(0.1, 2) * size / 32).

    Call it on a float image (3, H, W) or a batch (N, 3, H, W) in [0, 1]: every image gets its own draws."""

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.2, 1.0),
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float = 0.5,
        flip_p: float = 0.5,
        rotation: float = 0.0,
    ):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.rotation = float(rotation)
        self.scale, self.jitter = scale, jitter
        self.jitter_p, self.gray_p, self.blur_p, self.flip_p = jitter_p, gray_p, blur_p, flip_p

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        batch, single = _batched(image)
        n = len(batch)
        coin = lambda p: (_rand(n, batch, generator) < p).view(n, 1, 1, 1)
        angle = _rand(n, batch, generator, -1.0, 1.0) * math.radians(self.rotation) if self.rotation else None
        batch = random_resized_crop(batch, self.size, self.scale, generator=generator, flip=coin(self.flip_p).view(n),
                                    angle=angle)
        if self.jitter_p > 0:
            batch = torch.where(coin(self.jitter_p), color_jitter(batch, *self.jitter, generator=generator), batch)
        if self.gray_p > 0:
            batch = torch.where(coin(self.gray_p), grayscale(batch), batch)
        if self.blur_p > 0:
            sigma = _rand(n, batch, generator, 0.1, 2.0) * self.size[0] / 32
            batch = torch.where(coin(self.blur_p), gaussian_blur(batch, sigma), batch)
        return batch[0] if single else batch
