"""Gymnasium environments with pixel observations and the true state in ``info["state"]``.

``make_env(name, image_size=64, **kwargs)`` builds any of them; every env is also registered with
gymnasium under ``worldmodel/<Name>-v0`` (e.g. ``gymnasium.make("worldmodel/Pendulum-v0")``).
Observations are uint8 (H, W, 3); ``info["state"]`` is a float64 vector, for evaluation only.
"""

from __future__ import annotations

import gymnasium

from .pendulum import PendulumEnv

__all__ = ["make_env", "ENV_IDS", "PendulumEnv"]

# short name -> gymnasium id of our own simulated environments
ENV_IDS = {
    "pendulum": "worldmodel/Pendulum-v0",
}
_ENTRY_POINTS = {
    "worldmodel/Pendulum-v0": "worldmodel.envs.pendulum:PendulumEnv",
}
for _env_id, _entry in _ENTRY_POINTS.items():
    if _env_id not in gymnasium.registry:
        gymnasium.register(id=_env_id, entry_point=_entry)


def make_env(name: str, image_size: int | tuple[int, int] = 64, **kwargs) -> gymnasium.Env:
    """Build environment ``name`` (one of ``ENV_IDS``) with uint8 (H, W, 3) frames of ``image_size``.

    Extra keyword arguments go to the environment's constructor.
    """
    if name not in ENV_IDS:
        raise ValueError(f"unknown env name {name!r}; choose one of {sorted(ENV_IDS)}")
    return gymnasium.make(ENV_IDS[name], image_size=image_size, disable_env_checker=True, **kwargs)
