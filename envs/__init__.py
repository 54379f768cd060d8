"""Gymnasium environments with pixel observations and the true state in ``info["state"]``.

``make_env(name, image_size=64, **kwargs)`` builds any of them. Our simulated envs are registered
with gymnasium under ``worldmodel/<Name>-v0`` (e.g. ``gymnasium.make("worldmodel/Pendulum-v0")``).
Observations are uint8 (H, W, 3); ``info["state"]`` is a float64 vector, for evaluation only.

    name          action                       info["state"]
    pendulum      Box(-2, 2, (1,)) torque      (theta, theta_dot), theta = 0 hanging down
    balls         none (shape (0,))            (x_1, y_1, .., x_n, y_n, vx_1, vy_1, .., vx_n, vy_n)
    nlink         Box(-1, 1, (n,)) joint torques  (theta_1..theta_n, theta_dot_1..theta_dot_n), absolute
    dot_figure8   none                         (x, y) on (cos phi, sin phi cos phi)
    dot_square    none                         (x, y) on the square with corners (+-1, +-1)
    dot_swirl     none                         (x, y) of a nonlinear 2-D system, seen through a swirl
    cartpole, gym_pendulum, acrobot (or any rgb_array gymnasium id): the env's action space,
                  its ``unwrapped.state`` (needs pygame for rendering)

Noise: ``make_env(..., pixel_noise=s, correlated_noise=r, drop_prob=p)`` (see ``ObservationNoise``).
"""

from __future__ import annotations

import gymnasium

from .balls import BouncingBallsEnv
from .dots import DotEnv
from .nlink import NLinkPendulumEnv
from .pendulum import PendulumEnv
from .wrappers import ObservationNoise, PixelObservation, resize_frame, true_state

__all__ = [
    "ENV_IDS",
    "GYM_PIXEL_ENVS",
    "BouncingBallsEnv",
    "DotEnv",
    "NLinkPendulumEnv",
    "ObservationNoise",
    "PendulumEnv",
    "PixelObservation",
    "make_env",
    "resize_frame",
    "true_state",
]

# short name -> (gymnasium id, entry point, default kwargs) of our own simulated environments
_OWN = {
    "pendulum": ("worldmodel/Pendulum-v0", "worldmodel.envs.pendulum:PendulumEnv", {}),
    "balls": ("worldmodel/BouncingBalls-v0", "worldmodel.envs.balls:BouncingBallsEnv", {}),
    "nlink": ("worldmodel/NLinkPendulum-v0", "worldmodel.envs.nlink:NLinkPendulumEnv", {}),
    "dot_figure8": ("worldmodel/DotFigure8-v0", "worldmodel.envs.dots:DotEnv", {"path": "figure8"}),
    "dot_square": ("worldmodel/DotSquare-v0", "worldmodel.envs.dots:DotEnv", {"path": "square"}),
    "dot_swirl": ("worldmodel/DotSwirl-v0", "worldmodel.envs.dots:DotEnv", {"path": "swirl"}),
}
ENV_IDS = {name: env_id for name, (env_id, _, _) in _OWN.items()}
# short name -> gymnasium id of classic envs wrapped by PixelObservation (rendering needs pygame)
GYM_PIXEL_ENVS = {"cartpole": "CartPole-v1", "gym_pendulum": "Pendulum-v1", "acrobot": "Acrobot-v1"}

for _env_id, _entry, _kwargs in _OWN.values():
    if _env_id not in gymnasium.registry:
        gymnasium.register(id=_env_id, entry_point=_entry, kwargs=_kwargs)


def make_env(
    name: str,
    image_size: int | tuple[int, int] = 64,
    *,
    pixel_noise: float = 0.0,
    correlated_noise: float = 0.0,
    drop_prob: float = 0.0,
    **kwargs,
) -> gymnasium.Env:
    """Build environment ``name`` with uint8 (H, W, 3) frames of ``image_size`` and ``info["state"]``.

    ``name``: one of ``ENV_IDS`` (our simulated envs; kwargs go to their constructors), one of
    ``GYM_PIXEL_ENVS``, or any registered gymnasium id that renders ``rgb_array`` (both wrapped by
    ``PixelObservation``; kwargs go to ``gymnasium.make``). ``pixel_noise``, ``correlated_noise`` and
    ``drop_prob`` add an ``ObservationNoise`` wrapper (see there for their exact meaning).
    The returned env carries ``make_env_args = (name, kwargs)`` so that ``make_env(name, **kwargs)``
    rebuilds it (the collector stores them in the rollout store's metadata).
    """
    if name in _OWN:
        env = gymnasium.make(ENV_IDS[name], image_size=image_size, disable_env_checker=True, **kwargs)
    elif name in GYM_PIXEL_ENVS or name in gymnasium.registry:
        env = gymnasium.make(GYM_PIXEL_ENVS.get(name, name), render_mode="rgb_array", **kwargs)
        env = PixelObservation(env, image_size)
    else:
        raise ValueError(f"unknown env name {name!r}; choose one of {sorted(_OWN) + sorted(GYM_PIXEL_ENVS)} or a gymnasium id")
    noise = {"pixel_noise": pixel_noise, "correlated_noise": correlated_noise, "drop_prob": drop_prob}
    if any(noise.values()):
        env = ObservationNoise(env, **noise)
    env.make_env_args = (name, {"image_size": image_size, **{k: v for k, v in noise.items() if v}, **kwargs})
    return env
