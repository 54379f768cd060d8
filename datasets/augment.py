"""Image augmentations for two-view SSL, in plain torch (no torchvision).

Every function takes a float image (C, H, W) in [0, 1] with C = 3 and an optional
``torch.Generator`` (default: torch's global generator, which DataLoader seeds per worker), and
returns a new (C, H', W') image in [0, 1]. ``SSLAugment`` chains them as in SimCLR / BYOL.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LUMA = torch.tensor([0.299, 0.587, 0.114])


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _check(image: torch.Tensor) -> None:
    if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float tensor (3, H, W), got {tuple(image.shape)} {image.dtype}")


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of (C, H, W) to (C, *size)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def random_resized_crop(
    image: torch.Tensor,
    size: tuple[int, int],
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop a random box of area fraction ~ U(scale) and log-uniform aspect ratio, resized to ``size``
    (torchvision's algorithm: 10 tries, then the largest centred box with a valid ratio)."""
    _check(image)
    _, height, width = image.shape
    area = height * width
    for _ in range(10):
        target = area * _uniform(*scale, generator)
        aspect = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), generator))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return resize(image[:, top : top + h, left : left + w], size)
    aspect = width / height
    w, h = (width, round(width / ratio[0])) if aspect < ratio[0] else (round(height * ratio[1]), height) if aspect > ratio[1] else (width, height)
    top, left = (height - h) // 2, (width - w) // 2
    return resize(image[:, top : top + h, left : left + w], size)


def horizontal_flip(image: torch.Tensor) -> torch.Tensor:
    return image.flip(-1)


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """Luma 0.299 R + 0.587 G + 0.114 B, repeated over the 3 channels."""
    _check(image)
    return torch.einsum("chw,c->hw", image, _LUMA.to(image)).expand_as(image).clone()


def adjust_hue(image: torch.Tensor, shift: float) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5]) through an exact RGB -> HSV -> RGB round trip."""
    _check(image)
    r, g, b = image
    value, argmax = image.max(0)
    chroma = value - image.min(0).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(argmax == 0, ((g - b) / safe) % 6, torch.where(argmax == 1, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = (hue / 6 + shift) % 1.0
    # HSV -> RGB: channel n uses k = (n + 6 h) mod 6, f(n) = V - C max(0, min(k, 4 - k, 1))
    k = (torch.tensor([5.0, 3.0, 1.0], dtype=image.dtype)[:, None, None] + 6 * hue) % 6
    return value - chroma * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def color_jitter(
    image: torch.Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
    hue: float = 0.1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Brightness x b, contrast (blend with the mean luma), saturation (blend with grayscale), hue shift,
    with factors b, c, s ~ U(1 - x, 1 + x) and hue ~ U(-hue, hue) turns; applied in that order."""
    _check(image)
    image = (image * _uniform(1 - brightness, 1 + brightness, generator)).clamp(0, 1)
    mean = grayscale(image).mean()
    c = _uniform(1 - contrast, 1 + contrast, generator)
    image = (c * image + (1 - c) * mean).clamp(0, 1)
    s = _uniform(1 - saturation, 1 + saturation, generator)
    image = (s * image + (1 - s) * grayscale(image)).clamp(0, 1)
    return adjust_hue(image, _uniform(-hue, hue, generator)) if hue else image


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with std ``sigma`` pixels (kernel radius ceil(3 sigma), reflect padding)."""
    _check(image)
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, min(image.shape[1:]) - 1)
    x = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    return out[0]


class SSLAugment:
    """SimCLR-style view: random resized crop -> flip (p=0.5) -> colour jitter (p=``jitter_p``) ->
    grayscale (p=``gray_p``) -> Gaussian blur (p=``blur_p``, sigma ~ U(0.1, 2) * size / 32)."""

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.2, 1.0),
        jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        jitter_p: float = 0.8,
        gray_p: float = 0.2,
        blur_p: float = 0.5,
        flip_p: float = 0.5,
    ):
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.scale, self.jitter = scale, jitter
        self.jitter_p, self.gray_p, self.blur_p, self.flip_p = jitter_p, gray_p, blur_p, flip_p

    def __call__(self, image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        coin = lambda p: p > 0 and torch.rand((), generator=generator).item() < p
        image = random_resized_crop(image, self.size, self.scale, generator=generator)
        if coin(self.flip_p):
            image = horizontal_flip(image)
        if coin(self.jitter_p):
            image = color_jitter(image, *self.jitter, generator=generator)
        if coin(self.gray_p):
            image = grayscale(image)
        if coin(self.blur_p):
            image = gaussian_blur(image, _uniform(0.1, 2.0, generator) * self.size[0] / 32)
        return image
