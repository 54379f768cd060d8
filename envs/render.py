"""Anti-aliased numpy rasteriser for the pixel environments (no display, no extra dependency).

World coordinates are mapped onto a square image: the world box ``[-extent, extent]^2`` fills the
frame, x to the right and y up. Shapes are drawn with a soft edge one pixel wide (coverage falls
linearly from 1 to 0 across the boundary), so sub-pixel motion changes pixel values and small angle
changes stay visible even at 16x16.
"""

from __future__ import annotations

import numpy as np

RGB = tuple[float, float, float]


def image_shape(image_size: int | tuple[int, int]) -> tuple[int, int]:
    """(H, W) from an int (square) or an (H, W) pair; ValueError naming ``image_size`` otherwise."""
    size = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
    if len(size) != 2 or any(int(s) != s or s < 4 for s in size):
        raise ValueError(f"image_size must be an int >= 4 or an (H, W) pair of such ints, got {image_size!r}")
    return int(size[0]), int(size[1])


class Canvas:
    """Pixel-centre coordinates of an (H, W) image covering ``[-extent, extent]`` along its shorter side.

    Draw calls alpha-composite a colour into a float32 (H, W, 3) image in [0, 1];
    ``to_uint8`` converts the result.
    """

    def __init__(self, image_size: int | tuple[int, int], extent: float, background: RGB = (0.0, 0.0, 0.0), warp=None):
        """``warp(x, y) -> (x', y')`` optionally maps every pixel centre to the scene point it shows
        (an image distortion applied to everything drawn)."""
        self.height, self.width = image_shape(image_size)
        self.extent = float(extent)
        self.pixel = 2.0 * self.extent / min(self.height, self.width)  # world units per pixel
        cols = (np.arange(self.width) + 0.5 - self.width / 2) * self.pixel
        rows = (self.height / 2 - np.arange(self.height) - 0.5) * self.pixel
        x, y = np.meshgrid(cols, rows)  # (H, W) each
        if warp is not None:
            x, y = warp(x, y)
        self.x, self.y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        self.warped = warp is not None
        self.background = np.asarray(background, np.float32)

    def blank(self) -> np.ndarray:
        """A fresh (H, W, 3) float32 image filled with the background colour."""
        return np.broadcast_to(self.background, (self.height, self.width, 3)).copy()

    def _window(self, points: np.ndarray, reach: float) -> tuple[slice, slice]:
        """Rows and columns of the pixels within ``reach`` (world units) of the points' bounding box;
        everything outside gets zero coverage, so drawing only there is exact and cheaper."""
        if self.warped:
            return slice(None), slice(None)
        lo, hi = points.min(0) - reach, points.max(0) + reach
        col = lambda x: x / self.pixel + self.width / 2 - 0.5  # fractional column of world x
        row = lambda y: self.height / 2 - 0.5 - y / self.pixel
        c0, c1 = int(np.floor(col(lo[0]))), int(np.ceil(col(hi[0]))) + 1
        r0, r1 = int(np.floor(row(hi[1]))), int(np.ceil(row(lo[1]))) + 1
        return slice(min(max(r0, 0), self.height), min(max(r1, 0), self.height)), slice(min(max(c0, 0), self.width), min(max(c1, 0), self.width))

    def _radius(self, radius: float, min_radius_px: float) -> float:
        return max(radius, min_radius_px * self.pixel)

    def _coverage(self, distance: np.ndarray, radius: float) -> np.ndarray:
        return np.clip((radius - distance) / self.pixel + 0.5, 0.0, 1.0)

    @staticmethod
    def _composite(image: np.ndarray, alpha: np.ndarray, color: RGB) -> None:
        a = alpha[..., None]
        image *= 1.0 - a
        image += a * np.asarray(color, np.float32)

    def disc(self, image: np.ndarray, center, radius: float, color: RGB, min_radius_px: float = 0.75) -> None:
        """Draw a filled disc (soft edge) in place."""
        radius = self._radius(radius, min_radius_px)
        rows, cols = self._window(np.array([center], np.float64), radius + self.pixel)
        d = np.hypot(self.x[rows, cols] - np.float32(center[0]), self.y[rows, cols] - np.float32(center[1]))
        self._composite(image[rows, cols], self._coverage(d, radius), color)

    def capsule(self, image: np.ndarray, start, end, radius: float, color: RGB, min_radius_px: float = 0.75) -> None:
        """Draw a thick line segment with round caps (soft edge) in place."""
        radius = self._radius(radius, min_radius_px)
        rows, cols = self._window(np.array([start, end], np.float64), radius + self.pixel)
        sx, sy = np.float32(start[0]), np.float32(start[1])
        dx, dy = np.float32(end[0]) - sx, np.float32(end[1]) - sy
        px, py = self.x[rows, cols] - sx, self.y[rows, cols] - sy
        length2 = dx * dx + dy * dy
        s = np.clip((px * dx + py * dy) / length2, 0.0, 1.0) if length2 > 0 else np.zeros_like(px)
        d = np.hypot(px - s * dx, py - s * dy)
        self._composite(image[rows, cols], self._coverage(d, radius), color)

    def gaussian(self, image: np.ndarray, center, sigma: float, color: RGB) -> None:
        """Draw an isotropic Gaussian blob exp(-|p - c|^2 / (2 sigma^2)) as alpha, in place."""
        d2 = (self.x - np.float32(center[0])) ** 2 + (self.y - np.float32(center[1])) ** 2
        self._composite(image, np.exp(-d2 / np.float32(2.0 * sigma * sigma)), color)

    @staticmethod
    def to_uint8(image: np.ndarray) -> np.ndarray:
        """Round a float image in [0, 1] to uint8."""
        return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
