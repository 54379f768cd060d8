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
    dot_swirl     none                         (x, y) of the paper's Eq. 16 system, seen through a swirl
    cartpole, gym_pendulum, acrobot (or any rgb_array gymnasium id): the env's action space,
                  its ``unwrapped.state`` (needs pygame for rendering)
    dmc:DOMAIN-TASK  any ``dm_control.suite`` task (optional: pip install dm_control; see ``envs/dmc.py``):
                  the task's action spec, held ``action_repeat`` control steps; (qpos, qvel, act[, target])

``readout_targets(env, state) -> (targets, names)``: what a linear readout of the latent state is
scored against (``env.unwrapped.readout_targets`` on our envs). ``env_defaults(name)``: the frame size,
action width (as the rollout store holds actions: one-hot for Discrete), steps per episode and
``make_env`` kwargs of the training data, so that no run needs env-specific flags:

    name          readout targets                          image  action  episode  env_kwargs
    pendulum      sin θ, cos θ, θ̇                          64     1       100      friction=0.5
    balls         x_i, y_i, vx_i, vy_i (the state)         32     0       100
    nlink         sin θ_i, cos θ_i, θ̇_i                    64     2       100
    dot_figure8   x, y                                     10     0       100
    dot_square    x, y, sin φ, cos φ (φ: lap phase)        10     0       100
    dot_swirl     x, y                                     10     0       100
    cartpole      state[0..3] = (x, ẋ, θ, θ̇)               64     2       100 (ends early on a fall)
    gym_pendulum  sin θ, cos θ, θ̇                          64     1       100
    acrobot       sin θ_i, cos θ_i, θ̇_i (i = 1, 2)          64     3       100
    dmc:D-T       joint positions (hinges as sin, cos; no    64     spec    time limit / action_repeat
                  unseen root x), all qvel, reacher target          (cartpole-swingup 125, reacher-easy,
                                                                    pendulum-swingup, cheetah-run 250,
                                                                    walker-walk 500)

Noise: ``make_env(..., pixel_noise=s, correlated_noise=r, drop_prob=p)`` (see ``ObservationNoise``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gymnasium

from .balls import BouncingBallsEnv
from .dots import DotEnv
from .nlink import NLinkPendulumEnv
from .pendulum import PendulumEnv
from .readout import readout_targets
from .wrappers import ObservationNoise, PixelObservation, resize_frame, true_state

__all__ = [
    "ENV_IDS",
    "GYM_PIXEL_ENVS",
    "BouncingBallsEnv",
    "DotEnv",
    "EnvDefaults",
    "NLinkPendulumEnv",
    "ObservationNoise",
    "PendulumEnv",
    "PixelObservation",
    "env_defaults",
    "control_defaults",
    "data_policy",
    "make_env",
    "readout_targets",
    "resize_frame",
    "true_state",
]

# short name -> (gymnasium id, env class, constructor kwargs) of our own simulated environments; each
# class declares ``defaults`` (image_size, episode_length, env_kwargs) for ``env_defaults``
_OWN = {
    "pendulum": ("worldmodel/Pendulum-v0", PendulumEnv, {}),
    "balls": ("worldmodel/BouncingBalls-v0", BouncingBallsEnv, {}),
    "nlink": ("worldmodel/NLinkPendulum-v0", NLinkPendulumEnv, {}),
    "dot_figure8": ("worldmodel/DotFigure8-v0", DotEnv, {"path": "figure8"}),
    "dot_square": ("worldmodel/DotSquare-v0", DotEnv, {"path": "square"}),
    "dot_swirl": ("worldmodel/DotSwirl-v0", DotEnv, {"path": "swirl"}),
}
ENV_IDS = {name: env_id for name, (env_id, _, _) in _OWN.items()}
# short name -> gymnasium id of classic envs wrapped by PixelObservation (rendering needs pygame)
GYM_PIXEL_ENVS = {"cartpole": "CartPole-v1", "gym_pendulum": "Pendulum-v1", "acrobot": "Acrobot-v1"}
# training data of gymnasium envs wrapped by PixelObservation (their frames are resized to image_size)
_GYM_DEFAULTS = {"image_size": 64, "episode_length": 100, "env_kwargs": {}}
# the training data of envs whose episodes end early under random actions: cartpole's pole falls after 8-45 steps
# (median 11) under Ornstein-Uhlenbeck pushes; a noisy balancer (30 % random actions) keeps most episodes to 100
_DATA_POLICIES = {"cartpole": {"gains": (0.05, 0.2, 1.0, 0.4), "epsilon": 0.3, "noise_std": 0.05}}

for _env_id, _cls, _kwargs in _OWN.values():
    if _env_id not in gymnasium.registry:
        gymnasium.register(id=_env_id, entry_point=f"{_cls.__module__}:{_cls.__name__}", kwargs=_kwargs)
# DeepMind Control tasks ("dmc:DOMAIN-TASK"): one gymnasium id, the (domain, task) as kwargs; dm_control is
# imported only when one is built (envs/dmc.py)
DMC_ID, DMC_PREFIX = "worldmodel/DMC-v0", "dmc:"
if DMC_ID not in gymnasium.registry:
    gymnasium.register(id=DMC_ID, entry_point=f"{__name__}.dmc:DMCEnv")


@dataclass(frozen=True)
class EnvDefaults:
    """Everything a training run needs to collect data and build a model for one env (``env_defaults``).

    image_size: H = W of the training frames; channels: C of the frames; action_dim: width of the
    stored action vector (one-hot for Discrete, 0 = uncontrolled); episode_length: steps per collected
    episode (an upper bound where the env terminates early); env_kwargs: ``make_env`` kwargs of the data,
    ``make_env(name, image_size=d.image_size, **d.env_kwargs)``.
    """

    image_size: int
    channels: int
    action_dim: int
    episode_length: int
    env_kwargs: dict = field(default_factory=dict)


def env_defaults(name: str) -> EnvDefaults:
    """The ``EnvDefaults`` of env ``name`` (one of ``ENV_IDS`` or ``GYM_PIXEL_ENVS``, ``dmc:DOMAIN-TASK``, or
    a gymnasium id that renders ``rgb_array``). Builds the env once, without rendering, to read its spaces
    (and, for DeepMind Control, its episode length)."""
    from worldmodel.datasets.collect import action_dim  # the store's action width (datasets imports envs)

    declared = _OWN[name][1].defaults if name in _OWN else _GYM_DEFAULTS
    env_kwargs = dict(declared["env_kwargs"])
    env = make_env(name, image_size=declared["image_size"], **env_kwargs)  # ValueError for unknown names
    # DeepMind Control: one episode runs to the task's time limit, in steps of action_repeat control steps
    episode_length = env.unwrapped.episode_length if name.startswith(DMC_PREFIX) else declared["episode_length"]
    try:
        return EnvDefaults(image_size=declared["image_size"], channels=env.observation_space.shape[-1],
                           action_dim=action_dim(env.action_space), episode_length=episode_length,
                           env_kwargs=env_kwargs)
    finally:
        env.close()


def data_policy(name: str, env: gymnasium.Env):
    """The policy that collects env ``name``'s training data (``collect``'s ``policy(obs, info)``): smooth
    Ornstein-Uhlenbeck actions, or the env's own (cartpole: a noisy balancer on the true state)."""
    from worldmodel.datasets.collect import StateFeedbackPolicy, ou_policy

    if name in _DATA_POLICIES:
        return StateFeedbackPolicy(env.action_space, **_DATA_POLICIES[name])
    return ou_policy(env)


_CONTROL = {"task": "reward", "env_kwargs": {}, "episode_length": 200, "iterations": 3}


def control_defaults(name: str) -> dict:
    """What ``train.py control`` does on env ``name`` unless told otherwise: ``task`` (reward: maximise the env's
    reward; goal: reach goal states the env draws, ``sample_goal`` / ``render_state`` / ``goal_error``), the
    ``make_env`` kwargs (the env's own dynamics, not the training data's), the episode length, the number of
    collect-then-train ``iterations`` and optionally
    ``method`` (the preset trained when --method is not given), ``planner`` (PlannerConfig defaults) and ``success_error`` (goal tasks: the final goal error that counts as
    reached). Our envs declare them as ``defaults["control"]``; others get a reward task on 200-step episodes of
    the default env."""
    declared = _OWN[name][1].defaults if name in _OWN else {}
    return {**_CONTROL, **declared.get("control", {})}


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
    ``PixelObservation``; kwargs go to ``gymnasium.make``), or ``dmc:DOMAIN-TASK``, a ``dm_control.suite``
    task (``envs.dmc.DMCEnv``; kwargs: ``action_repeat``, ``camera_id``). ``pixel_noise``, ``correlated_noise`` and
    ``drop_prob`` add an ``ObservationNoise`` wrapper (see there for their exact meaning).
    The returned env carries ``make_env_args = (name, kwargs)`` so that ``make_env(name, **kwargs)``
    rebuilds it (the collector stores them in the rollout store's metadata).
    """
    if name in _OWN:
        env = gymnasium.make(ENV_IDS[name], image_size=image_size, disable_env_checker=True, **kwargs)
    elif name.startswith(DMC_PREFIX):
        from .dmc import parse_dmc_name  # imports dm_control: ImportError naming the install where missing

        domain, task = parse_dmc_name(name)  # ValueError listing the valid tasks
        env = gymnasium.make(DMC_ID, domain=domain, task=task, image_size=image_size, disable_env_checker=True, **kwargs)
    elif name in GYM_PIXEL_ENVS or name in gymnasium.registry:
        env = gymnasium.make(GYM_PIXEL_ENVS.get(name, name), render_mode="rgb_array", **kwargs)
        env = PixelObservation(env, image_size)
    else:
        raise ValueError(f"unknown env name {name!r}; choose one of {sorted(_OWN) + sorted(GYM_PIXEL_ENVS)}, "
                         f"'dmc:DOMAIN-TASK' (dm_control.suite) or a gymnasium id")
    noise = {"pixel_noise": pixel_noise, "correlated_noise": correlated_noise, "drop_prob": drop_prob}
    if any(noise.values()):
        env = ObservationNoise(env, **noise)
    env.make_env_args = (name, {"image_size": image_size, **{k: v for k, v in noise.items() if v}, **kwargs})
    return env
