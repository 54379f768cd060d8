"""Bouncing balls in a box with exact, event-driven elastic collisions.

1 to 3 discs of equal radius r and mass move freely in the box [-1, 1]^2. Within each step of dt the
simulation advances to the earliest collision (ball-wall or ball-ball, solved in closed form),
resolves it elastically and continues, so kinetic energy and momentum in ball-ball collisions are
conserved up to rounding. Wall hits flip the normal velocity; a ball-ball hit exchanges the velocity
components along the line of centres (equal masses).
"""

from __future__ import annotations

import gymnasium
import numpy as np
from gymnasium import spaces

from .readout import state_tensor
from .render import Canvas, image_shape

COLORS = ((1.0, 0.25, 0.25), (0.25, 1.0, 0.25), (0.35, 0.5, 1.0))


class BouncingBallsEnv(gymnasium.Env):
    """Pixel bouncing balls: obs uint8 (H, W, 3), one colour per ball (red, green, blue) on black.

    ``info["state"]`` = (x_1, y_1, ..., x_n, y_n, vx_1, vy_1, ..., vx_n, vy_n), float64.
    The balls are not controlled: the action space is Box(-1, 1, (0,)) (empty actions).
    Reset places the balls without overlap, uniformly in the box, with uniformly random directions
    and speeds in [0.5, 1] * ``max_speed``, or takes ``options={"state": ...}``. Reward is 0.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    defaults = {"image_size": 32, "episode_length": 100, "env_kwargs": {}}  # for ``worldmodel.envs.env_defaults``

    def __init__(
        self,
        image_size: int | tuple[int, int] = 64,
        n_balls: int = 2,
        radius: float = 0.2,
        max_speed: float = 1.0,
        dt: float = 0.1,
        render_mode: str | None = "rgb_array",
    ):
        if n_balls not in (1, 2, 3):
            raise ValueError(f"n_balls must be 1, 2 or 3, got {n_balls}")
        if not 0 < radius < 0.5:
            raise ValueError(f"radius must be in (0, 0.5), got {radius}")
        self.n_balls, self.radius, self.max_speed, self.dt = int(n_balls), float(radius), float(max_speed), float(dt)
        self.render_mode = render_mode
        height, width = image_shape(image_size)
        self.canvas = Canvas((height, width), extent=1.0)
        self.observation_space = spaces.Box(0, 255, (height, width, 3), np.uint8)
        self.action_space = spaces.Box(-1.0, 1.0, (0,), np.float32)
        self.position = np.zeros((self.n_balls, 2))
        self.velocity = np.zeros((self.n_balls, 2))

    @property
    def state(self) -> np.ndarray:
        return np.concatenate([self.position.reshape(-1), self.velocity.reshape(-1)])

    def kinetic_energy(self, state: np.ndarray) -> np.ndarray:
        """1/2 sum |v_i|^2 (unit masses) of state(s) (..., 4 n)."""
        v = np.asarray(state)[..., 2 * self.n_balls :]
        return 0.5 * np.sum(v**2, axis=-1)

    def readout_targets(self, state):
        """State (..., 4 n) -> float64 targets (..., 4 n): the state itself (positions, then velocities),
        names "x1", "y1", .., "vx1", "vy1", ..."""
        balls = range(1, self.n_balls + 1)
        names = [f"{c}{i}" for i in balls for c in "xy"] + [f"v{c}{i}" for i in balls for c in "xy"]
        return state_tensor(state, 4 * self.n_balls), names

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        n, r = self.n_balls, self.radius
        if options and "state" in options:
            state = np.asarray(options["state"], np.float64)
            if state.shape != (4 * n,) or not np.all(np.isfinite(state)):
                raise ValueError(f"options['state'] must be a finite vector of length {4 * n}, got {options['state']!r}")
            position, velocity = state[: 2 * n].reshape(n, 2), state[2 * n :].reshape(n, 2)
            if np.any(np.abs(position) > 1 - r) or self._min_gap(position) < 0:
                raise ValueError("options['state'] places balls outside the box or overlapping")
        else:
            position = np.zeros((n, 2))
            for i in range(n):  # rejection sampling of non-overlapping positions
                while True:
                    position[i] = self.np_random.uniform(-1 + r, 1 - r, 2)
                    if self._min_gap(position[: i + 1]) > 0.01:
                        break
            angle = self.np_random.uniform(0, 2 * np.pi, n)
            speed = self.max_speed * self.np_random.uniform(0.5, 1.0, n)
            velocity = speed[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
        self.position, self.velocity = position.copy(), velocity.copy()
        return self.render(), {"state": self.state}

    def _min_gap(self, position: np.ndarray) -> float:
        """Smallest distance between two ball surfaces (inf for one ball)."""
        gaps = [np.linalg.norm(position[i] - position[j]) - 2 * self.radius for i in range(len(position)) for j in range(i)]
        return min(gaps, default=np.inf)

    def _next_event(self, horizon: float):
        """(time, kind, i, j) of the first collision within ``horizon`` (kind 'wall' j = axis, or 'ball')."""
        best = (horizon, None, -1, -1)
        p, v, r = self.position, self.velocity, self.radius
        for i in range(self.n_balls):
            for axis in range(2):
                if v[i, axis] > 0:
                    t = (1 - r - p[i, axis]) / v[i, axis]
                elif v[i, axis] < 0:
                    t = (-1 + r - p[i, axis]) / v[i, axis]
                else:
                    continue
                if max(t, 0.0) < best[0]:
                    best = (max(t, 0.0), "wall", i, axis)
            for j in range(i):
                dp, dv = p[i] - p[j], v[i] - v[j]
                b = dp @ dv
                if b >= 0:  # separating
                    continue
                a, c = dv @ dv, dp @ dp - 4 * r * r
                disc = b * b - a * c
                if disc < 0:
                    continue
                t = max((-b - np.sqrt(disc)) / a, 0.0)
                if t < best[0]:
                    best = (t, "ball", i, j)
        return best

    def step(self, action=None):
        remaining = self.dt
        for _ in range(1000):  # far more events than a step can hold
            t, kind, i, j = self._next_event(remaining)
            self.position += t * self.velocity
            remaining -= t
            if kind is None:
                break
            if kind == "wall":
                self.velocity[i, j] = -self.velocity[i, j]
            else:
                normal = self.position[i] - self.position[j]
                normal /= np.linalg.norm(normal)
                exchange = (self.velocity[i] - self.velocity[j]) @ normal
                self.velocity[i] -= exchange * normal
                self.velocity[j] += exchange * normal
        np.clip(self.position, -1 + self.radius, 1 - self.radius, out=self.position)  # rounding only
        return self.render(), 0.0, False, False, {"state": self.state}

    def render(self) -> np.ndarray:
        image = self.canvas.blank()
        for position, color in zip(self.position, COLORS):
            self.canvas.disc(image, position, self.radius, color)
        return self.canvas.to_uint8(image)
