"""Wrappers: pixel frames for any ``render_mode="rgb_array"`` env, and observation noise / frame drops."""

from __future__ import annotations

import functools

import gymnasium
import numpy as np
from gymnasium import spaces

from .render import image_shape


@functools.lru_cache(maxsize=32)
def _area_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) box-filter weights: output pixel i averages source interval [i, i + 1) * n_in / n_out."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    j = np.arange(n_in)
    overlap = np.minimum(edges[1:, None], j + 1) - np.maximum(edges[:-1, None], j)
    weights = np.clip(overlap, 0.0, None)
    return (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a uint8 (h, w, C) frame to (H, W, C) by area averaging (exact box filter; numpy only)."""
    h, w, c = frame.shape
    if (h, w) == tuple(size):
        return np.ascontiguousarray(frame)
    rows, cols = _area_weights(h, size[0]), _area_weights(w, size[1])
    x = rows @ frame.reshape(h, w * c).astype(np.float32)  # (H, w * C)
    x = (x.reshape(size[0], w, c).transpose(0, 2, 1) @ cols.T).transpose(0, 2, 1)  # (H, W, C)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def true_state(env: gymnasium.Env, observation) -> np.ndarray:
    """The physical state of ``env``: ``env.unwrapped.state`` where it is a numeric vector (CartPole,
    Pendulum-v1 (theta, theta_dot), Acrobot (theta1, theta2, dtheta1, dtheta2)), else the observation."""
    state = getattr(env.unwrapped, "state", None)
    try:
        return np.array(state if state is not None else observation, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return np.array(observation, dtype=np.float64).reshape(-1)


class PixelObservation(gymnasium.Wrapper, gymnasium.utils.RecordConstructorArgs):
    """Replace the observation of an ``render_mode="rgb_array"`` env by its rendered frame resized to
    ``image_size`` (uint8 (H, W, 3); the full frame is scaled, so the aspect ratio may change).

    ``info["state"]`` holds the env's true state (see ``true_state``) and ``info["env_obs"]`` its
    original observation.
    """

    def __init__(self, env: gymnasium.Env, image_size: int | tuple[int, int] = 64):
        if env.render_mode != "rgb_array":
            raise ValueError(f"PixelObservation needs an env made with render_mode='rgb_array', got {env.render_mode!r}")
        gymnasium.utils.RecordConstructorArgs.__init__(self, image_size=image_size)
        gymnasium.Wrapper.__init__(self, env)
        self.size = image_shape(image_size)
        self.observation_space = spaces.Box(0, 255, (*self.size, 3), np.uint8)

    def _frame(self) -> np.ndarray:
        frame = np.asarray(self.env.render())
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] < 3:
            raise ValueError(f"render() must return uint8 (h, w, 3+) frames, got {frame.dtype} {frame.shape}")
        return resize_frame(frame[..., :3], self.size)

    def reset(self, **kwargs):
        observation, info = self.env.reset(**kwargs)
        return self._frame(), {**info, "state": true_state(self.env, observation), "env_obs": observation}

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        info = {**info, "state": true_state(self.env, observation), "env_obs": observation}
        return self._frame(), reward, terminated, truncated, info


class ObservationNoise(gymnasium.Wrapper, gymnasium.utils.RecordConstructorArgs):
    """Corrupt uint8 frames; the true state in ``info`` is untouched. Applied in this order:

    - ``pixel_noise`` = s: i.i.d. Gaussian pixel noise, obs + 255 s N(0, 1), clipped to [0, 255].
    - ``correlated_noise`` = r > 0: time-correlated noise as in the RKN pendulum benchmark (Becker et
      al., ICML 2019): a factor f_0 ~ U(0, 1), f_{t+1} = clip(f_t + U(-r, r), 0, 1) (RKN: r = 0.2),
      rescaled per episode as clip((f - t1) / (t2 - t1), 0, 1) with t1 ~ U(0.1, 0.4), t2 ~ U(0.6, 0.9);
      obs = f obs + (1 - f) U(0, 255) (fresh uniform noise image each step). ``info["noise_factor"]``
      = f (1 = clean, 0 = pure noise).
    - ``drop_prob`` = p: each frame after the first of an episode is dropped with probability p and
      replaced by an all-zero (black) frame; ``info["dropped"]`` says so (always present). The
      collector stores mask = not dropped, which the Kalman filter treats as a missing observation.

    Noise is drawn from the wrapper's own generator, seeded by ``reset(seed=...)``. Both wrappers record
    their arguments, so ``gymnasium.make(env.spec)`` rebuilds a wrapped env.
    """

    def __init__(self, env: gymnasium.Env, pixel_noise: float = 0.0, correlated_noise: float = 0.0, drop_prob: float = 0.0):
        for name, value, upper in (("pixel_noise", pixel_noise, np.inf), ("correlated_noise", correlated_noise, 1.0), ("drop_prob", drop_prob, 1.0)):
            if not 0.0 <= value <= upper:
                raise ValueError(f"{name} must be in [0, {upper}], got {value}")
        space = env.observation_space
        if not (isinstance(space, spaces.Box) and space.dtype == np.uint8):
            raise ValueError(f"ObservationNoise needs uint8 image observations, got {space!r}")
        gymnasium.utils.RecordConstructorArgs.__init__(self, pixel_noise=pixel_noise, correlated_noise=correlated_noise, drop_prob=drop_prob)
        gymnasium.Wrapper.__init__(self, env)
        self.pixel_noise, self.correlated_noise, self.drop_prob = float(pixel_noise), float(correlated_noise), float(drop_prob)
        self._rng = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None or self._rng is None:
            self._rng = np.random.default_rng(None if seed is None else [seed, 7919])
        obs, info = self.env.reset(seed=seed, options=options)
        rng = self._rng
        self._walk = rng.uniform()
        self._thresholds = (rng.uniform(0.1, 0.4), rng.uniform(0.6, 0.9))
        return self._corrupt(obs, info, first=True)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self.correlated_noise:
            self._walk = float(np.clip(self._walk + self._rng.uniform(-self.correlated_noise, self.correlated_noise), 0, 1))
        obs, info = self._corrupt(obs, info, first=False)
        return obs, reward, terminated, truncated, info

    def _corrupt(self, obs: np.ndarray, info: dict, first: bool):
        rng, info = self._rng, dict(info)
        x = obs.astype(np.float32)
        if self.pixel_noise:
            x += 255.0 * self.pixel_noise * rng.standard_normal(x.shape, dtype=np.float32)
        if self.correlated_noise:
            t1, t2 = self._thresholds
            factor = float(np.clip((self._walk - t1) / (t2 - t1), 0.0, 1.0))
            x = factor * x + (1.0 - factor) * rng.uniform(0.0, 255.0, x.shape).astype(np.float32)
            info["noise_factor"] = factor
        dropped = (not first) and self.drop_prob > 0 and rng.uniform() < self.drop_prob
        info["dropped"] = bool(dropped)
        if dropped:
            return np.zeros_like(obs), info
        return np.clip(x + 0.5, 0, 255).astype(np.uint8) if (self.pixel_noise or self.correlated_noise) else obs, info
