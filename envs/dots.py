"""The paper's dot videos: a Gaussian dot moving on a figure-8, on a square, or under a nonlinear
2-D system seen through a swirl distortion (Mikulasch & Zenke 2026, Sec. 6.1). The paper uses 10x10
frames: ``make_env("dot_figure8", image_size=10)``; add observation noise with ``pixel_noise``.

- ``figure8``: phase phi_{t+1} = phi_t + omega + phase_noise * N(0, 1); position (cos phi, sin phi cos phi).
- ``square``: the same phase drives constant-speed motion along the square with corners (+-1, +-1).
- ``swirl``: we could not obtain the paper's Eq. 16, so this is a clearly-labelled substitute: a
  stochastic Hopf oscillator with amplitude-dependent frequency (Euler-Maruyama, one step per frame),
  with z = x + i y:
      z_{t+1} = z_t + [alpha (1 - |z_t|^2) + i (omega + beta |z_t|^2)] z_t + noise (N(0, I) * process_noise),
  alpha = 0.1, beta = 0.15, omega = 2 pi / 40, process_noise = 0.05 by default; z_0 uniform in the disc of
  radius 1.2. The frame shows the scene through a swirl distortion: the pixel at radius rho and angle psi
  shows the scene point at angle psi + swirl * exp(-rho / swirl_radius) (swirl = 2 rad, swirl_radius = 0.6).

``info["state"]`` = the dot's true (undistorted) position (x, y). The dot is uncontrolled: the action
space is Box(-1, 1, (0,)). Reward is 0.
"""

from __future__ import annotations

import gymnasium
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from .readout import state_tensor
from .render import Canvas, image_shape

PATHS = ("figure8", "square", "swirl")


def square_path(phase: np.ndarray) -> np.ndarray:
    """Constant-speed position on the square with corners (+-1, +-1); phase 2 pi = one lap, (..., 2)."""
    s = (np.asarray(phase) / (2 * np.pi) % 1.0) * 4.0  # 0..4 along the perimeter
    side, u = np.floor(s), s - np.floor(s)
    corners = np.array([[1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
    start, end = corners[side.astype(int)], corners[side.astype(int) + 1]
    return start + u[..., None] * (end - start)


def square_phase(position: Tensor) -> Tensor:
    """Inverse of ``square_path``: the lap phase in [0, 2 pi) of positions (..., 2) on the square."""
    x, y = position[..., 0], position[..., 1]
    s = torch.where(x >= y.abs(), (y + 1) / 2,  # right side, upwards
                    torch.where(y >= x.abs(), 1 + (1 - x) / 2,  # top, leftwards
                                torch.where(-x >= y.abs(), 2 + (1 - y) / 2, 3 + (x + 1) / 2)))  # left; bottom
    return (s % 4) * (torch.pi / 2)


def figure8_path(phase: np.ndarray) -> np.ndarray:
    """Position (cos phi, sin phi cos phi), (..., 2)."""
    phase = np.asarray(phase)
    return np.stack([np.cos(phase), np.sin(phase) * np.cos(phase)], -1)


def swirl(x: np.ndarray, y: np.ndarray, strength: float, radius: float):
    """Scene point shown at pixel (x, y): rotate by strength * exp(-rho / radius) about the centre."""
    rho = np.hypot(x, y)
    angle = np.arctan2(y, x) + strength * np.exp(-rho / radius)
    return rho * np.cos(angle), rho * np.sin(angle)


class DotEnv(gymnasium.Env):
    """Gaussian dot video; see the module docstring for the three paths."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    # for ``worldmodel.envs.env_defaults``: the paper's 10x10 frames; 2.5 laps per
    # episode on the figure-8 and the square
    defaults = {"image_size": 10, "episode_length": 100, "env_kwargs": {}}

    def __init__(
        self,
        image_size: int | tuple[int, int] = 10,
        path: str = "figure8",
        omega: float = 2 * np.pi / 40,
        phase_noise: float = 0.0,
        process_noise: float = 0.05,
        alpha: float = 0.1,
        beta: float = 0.15,
        dot_sigma: float = 0.25,
        swirl_strength: float = 2.0,
        swirl_radius: float = 0.6,
        render_mode: str | None = "rgb_array",
    ):
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.path, self.omega, self.phase_noise, self.process_noise = path, float(omega), float(phase_noise), float(process_noise)
        self.alpha, self.beta, self.dot_sigma = float(alpha), float(beta), float(dot_sigma)
        self.render_mode = render_mode
        height, width = image_shape(image_size)
        warp = (lambda x, y: swirl(x, y, swirl_strength, swirl_radius)) if path == "swirl" else None
        self.canvas = Canvas((height, width), extent=1.6 if path == "swirl" else 1.25, warp=warp)
        self.observation_space = spaces.Box(0, 255, (height, width, 3), np.uint8)
        self.action_space = spaces.Box(-1.0, 1.0, (0,), np.float32)
        self.phase, self.position = 0.0, np.zeros(2)

    def _place(self) -> None:
        if self.path != "swirl":
            self.position = (figure8_path if self.path == "figure8" else square_path)(self.phase)

    def readout_targets(self, state):
        """State (..., 2) -> float64 targets: the position (x, y); on the square also (sin φ, cos φ) of
        the lap phase φ (``square_phase``).

        On the figure-8, (x, y) = (cos φ, sin 2φ / 2) are harmonics 1 and 2 of the phase, which a linear
        latent (rotations) holds exactly; the swirl system is scored on (x, y) too. The square's corners
        need many harmonics, and the paper's linear decoding of it failed: it reports R² against a
        sinusoid at the motion frequency instead. Every such sinusoid is a combination of (sin φ, cos φ),
        so their R² compares with the paper's 0.97, while (x, y) stay the stricter score.
        """
        position = state_tensor(state, 2)
        if self.path != "square":
            return position, ["x", "y"]
        phase = square_phase(position)
        targets = torch.cat([position, torch.stack([torch.sin(phase), torch.cos(phase)], -1)], -1)
        return targets, ["x", "y", "sin φ", "cos φ"]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if self.path == "swirl":
            r, a = 1.2 * np.sqrt(self.np_random.uniform()), self.np_random.uniform(0, 2 * np.pi)
            self.position = np.array([r * np.cos(a), r * np.sin(a)])
        else:
            self.phase = self.np_random.uniform(0, 2 * np.pi)
        self._place()
        return self.render(), {"state": self.position.copy()}

    def step(self, action=None):
        if self.path == "swirl":
            z = complex(*self.position)
            r2 = abs(z) ** 2
            z = z + complex(self.alpha * (1 - r2), self.omega + self.beta * r2) * z
            self.position = np.array([z.real, z.imag]) + self.process_noise * self.np_random.standard_normal(2)
        else:
            self.phase = self.phase + self.omega + self.phase_noise * self.np_random.standard_normal()
            self._place()
        return self.render(), 0.0, False, False, {"state": self.position.copy()}

    def render(self) -> np.ndarray:
        image = self.canvas.blank()
        self.canvas.gaussian(image, self.position, self.dot_sigma, (1.0, 1.0, 1.0))
        return self.canvas.to_uint8(image)
