"""The paper's dot videos: a Gaussian dot moving on a figure-8, on a square, or under a nonlinear
2-D system seen through a swirl distortion (Mikulasch & Zenke 2026, Sec. 6.1). The paper uses 10x10
frames: ``make_env("dot_figure8", image_size=10)``; add observation noise with ``pixel_noise``.

- ``figure8``: phase phi_{t+1} = phi_t + omega + phase_noise * N(0, 1); position (cos phi, sin phi cos phi).
- ``square``: the same phase drives constant-speed motion along the square with corners (+-1, +-1).
- ``swirl``: the paper's Eq. 16. With (r, θ) the polar coordinates of z = (x, y) (``swirl_field``):

      dx/dt = [a k cos(k(θ − θ0)) − λ (r − r0)] cos θ − r sin θ
      dy/dt = [a k cos(k(θ − θ0)) − λ (r − r0)] sin θ + r cos θ

  k = 4, a = 0.5, θ0 = −3π/8; one RK4 step of dt = 0.3 per frame (``rk4_step``), then the process
  noise ν ~ N(0, process_noise I), process_noise = 0.1, is added; z_0 is uniform on the unit circle.
  With λ = 0 this is Eq. 16 as written (a k cos(k(θ − θ0)) pushes radially, the rest is a rotation at
  angular speed 1). That reading has no bounded attractor: dθ/dt = 1 and dr/dt = a k cos(k(θ − θ0)) make
  every orbit a closed four-petal curve r = c + a sin(k(θ − θ0)) with an arbitrary offset c, so r is
  only neutrally stable. Noise makes it a random walk (with this noise, mean r ≈ 4 after 100 frames,
  13 after 1000) and even without noise RK4 at dt = 0.3 drifts outwards (mean r 1 → 2 in 5000 frames). We
  therefore add the relaxation −λ (r − r0) r̂ with λ = 1, r0 = 1 (``relax_rate``, ``r0``), the term
  the authors' own code adds to this system for its two-system variant. The attractor is then a
  limit cycle around r ≈ 1: r = r0 + a k (λ cos kφ + k sin kφ) / (λ² + k²), φ = θ − θ0, i.e.
  r ∈ [0.515, 1.485] (petal amplitude 0.485 instead of 0.5), still one lap per 2π (≈ 21 frames).
  Noise: the authors' reference code adds N(0, 0.1 I) to the state after each RK4 frame step, so
  variance 0.1 is per frame (std sqrt(0.1)); the SDE reading (variance 0.1 per unit time, std
  sqrt(0.1 dt)) is ``process_noise=0.03``. With λ = 1 radial deviations decay by exp(−λ dt) = 0.74 per
  frame, so the stationary radial spread is about sqrt(0.1 / (1 − exp(−2 λ dt))) ≈ 0.47: over 300
  seeds x 1000 frames mean r stays at 1.2, r < 3 (inside the frame) on 99.9 % of frames, max r 3.7;
  nothing can overflow (the field grows at most linearly and the relaxation dominates it at large r).

  The frame shows the dot through skimage's swirl (``swirl``; strength 10, radius 200): the pixel at
  radius ρ and angle ψ shows the scene point at angle ψ − strength exp(−ρ / (ln 2 · radius / 5)) (the
  minus sign: skimage rotates in image (column, row) coordinates, whose row axis points down). The
  paper rendered 10x10 frames covering [−3, 3]² with a Gaussian of sigma 1 pixel and swirled them with
  radius 200 pixels; we keep that scale independent of ``image_size``: the canvas covers
  [−extent, extent]², extent = 3, ``swirl_radius`` is in pixels of a 10-pixel frame (world radius
  = swirl_radius · 2 extent / 10 = 120), and dot_sigma = 0.6 (one such pixel).

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
    """Scene point shown at pixel (x, y) under skimage's swirl (``skimage.transform.swirl``, rotation
    0), in y-up coordinates: rotate by -strength * exp(-rho / (ln 2 * radius / 5)) about the centre, so
    the twist has fallen to about 1/1000 of ``strength`` at ``radius``."""
    rho = np.hypot(x, y)
    angle = np.arctan2(y, x) - strength * np.exp(-rho / (np.log(2) * radius / 5))
    return rho * np.cos(angle), rho * np.sin(angle)


def swirl_field(z: np.ndarray, k: float = 4.0, a: float = 0.5, theta0: float = -3 * np.pi / 8,
                relax_rate: float = 1.0, r0: float = 1.0) -> np.ndarray:
    """dz/dt of the swirl system (the paper's Eq. 16 plus the relaxation -relax_rate (r - r0) r̂; see
    the module docstring) at states z (..., 2)."""
    z = np.asarray(z, np.float64)
    x, y = z[..., 0], z[..., 1]
    r, theta = np.hypot(x, y), np.arctan2(y, x)
    radial = a * k * np.cos(k * (theta - theta0)) - relax_rate * (r - r0)
    cos, sin = np.cos(theta), np.sin(theta)
    return np.stack([radial * cos - r * sin, radial * sin + r * cos], -1)


def rk4_step(field, z: np.ndarray, dt: float) -> np.ndarray:
    """One classical Runge-Kutta step of dz/dt = field(z)."""
    k1 = field(z)
    k2 = field(z + 0.5 * dt * k1)
    k3 = field(z + 0.5 * dt * k2)
    k4 = field(z + dt * k3)
    return z + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


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
        process_noise: float = 0.1,
        k: float = 4.0,
        a: float = 0.5,
        theta0: float = -3 * np.pi / 8,
        relax_rate: float = 1.0,
        r0: float = 1.0,
        dt: float = 0.3,
        extent: float | None = None,
        dot_sigma: float | None = None,
        swirl_strength: float = 10.0,
        swirl_radius: float = 200.0,
        render_mode: str | None = "rgb_array",
    ):
        """``omega``, ``phase_noise``: figure-8 and square. ``process_noise`` (the variance of ν per
        frame), ``k``, ``a``, ``theta0``, ``relax_rate``, ``r0``, ``dt``, ``swirl_strength`` and
        ``swirl_radius`` (in pixels of a 10-pixel frame): the swirl system. ``extent`` (canvas half-width)
        and ``dot_sigma`` default to 1.25 and 0.25 on the figure-8 and the square, 3 and 0.6 on the swirl."""
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        self.path, self.omega, self.phase_noise, self.process_noise = path, float(omega), float(phase_noise), float(process_noise)
        self.k, self.a, self.theta0, self.relax_rate, self.r0, self.dt = (
            float(k), float(a), float(theta0), float(relax_rate), float(r0), float(dt))
        is_swirl = path == "swirl"
        extent = float(extent if extent is not None else 3.0 if is_swirl else 1.25)
        self.dot_sigma = float(dot_sigma if dot_sigma is not None else 0.2 * extent if is_swirl else 0.25)
        self.render_mode = render_mode
        height, width = image_shape(image_size)
        radius = swirl_radius * 2 * extent / 10  # world units: the paper's 10-pixel frame spans 2 extent
        warp = (lambda x, y: swirl(x, y, swirl_strength, radius)) if is_swirl else None
        self.canvas = Canvas((height, width), extent=extent, warp=warp)
        self.observation_space = spaces.Box(0, 255, (height, width, 3), np.uint8)
        self.action_space = spaces.Box(-1.0, 1.0, (0,), np.float32)
        self.phase, self.position = 0.0, np.zeros(2)

    def field(self, z: np.ndarray) -> np.ndarray:
        """The swirl system's noise-free vector field dz/dt at states z (..., 2)."""
        return swirl_field(z, self.k, self.a, self.theta0, self.relax_rate, self.r0)

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
            angle = self.np_random.uniform(0, 2 * np.pi)  # a random unit-norm state
            self.position = np.array([np.cos(angle), np.sin(angle)])
        else:
            self.phase = self.np_random.uniform(0, 2 * np.pi)
        self._place()
        return self.render(), {"state": self.position.copy()}

    def step(self, action=None):
        if self.path == "swirl":
            noise = np.sqrt(self.process_noise) * self.np_random.standard_normal(2)
            self.position = rk4_step(self.field, self.position, self.dt) + noise
        else:
            self.phase = self.phase + self.omega + self.phase_noise * self.np_random.standard_normal()
            self._place()
        return self.render(), 0.0, False, False, {"state": self.position.copy()}

    def render(self) -> np.ndarray:
        image = self.canvas.blank()
        self.canvas.gaussian(image, self.position, self.dot_sigma, (1.0, 1.0, 1.0))
        return self.canvas.to_uint8(image)
