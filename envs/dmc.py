"""DeepMind Control Suite tasks from pixels (optional: ``pip install dm_control``, which pulls mujoco).

``make_env("dmc:DOMAIN-TASK", image_size=64, action_repeat=None, camera_id=None)`` builds a ``DMCEnv``
for any (domain, task) of ``dm_control.suite.ALL_TASKS`` (``dmc:cartpole-swingup``, ``dmc:reacher-easy``,
``dmc:pendulum-swingup``, ``dmc:cheetah-run``, ``dmc:walker-walk``, ...):

- observation: uint8 (H, W, 3), the scene rendered by MuJoCo at ``image_size`` directly (no resize) from
  camera ``camera_id`` (default as PlaNet/Dreamer: camera 0, quadruped camera 2). Cartpole, reacher and
  pendulum cameras are fixed; cheetah's and walker's camera 0 follows the torso (so the root's x is not
  seen, only the floor sliding by). Cartpole's fixed camera 0 sees the cart only for |x| < ~1.5 of the
  rail's +-1.8: train.py's Ornstein-Uhlenbeck data (action repeat 8) holds the cart at the ends, out of
  view, in about half the frames (pole unobservable there); ``camera_id=1`` ("lookatcart", turns to
  follow the cart) keeps it in view.
- action: ``Box(spec.minimum, spec.maximum, float32)`` from the task's action spec (actions are clipped
  to it); each ``step`` holds the action for ``action_repeat`` physics control steps and returns the
  summed task reward.
- ``info["state"]``: float64 (qpos, qvel, act, extras): the MuJoCo physics state ``physics.data.qpos``,
  ``qvel`` (and ``act``, the actuator activations, empty except quadruped), flattened, after the step;
  ``extras`` = task quantities that are not physics state but are seen in the frame: reacher's target
  (x, y) (``physics.named.model.geom_pos["target", :2]``); none elsewhere. ``env.state_names`` names
  every entry. The first nq + nv + na entries are ``physics.get_state()``.
- episodes end with ``truncated=True`` at the task's time limit (20 s = 1000 control steps in every
  suite task), i.e. after ``episode_length = ceil(step_limit / action_repeat)`` steps; ``terminated``
  only if the task ends an episode with discount 0 (no suite task does).
- ``action_repeat`` defaults (``ACTION_REPEAT``): PlaNet's (Hafner et al. 2019) cartpole 8, reacher 4,
  cheetah 4, finger 2, ball_in_cup 4, walker 2; our choice for pendulum: 4 (0.08 s per frame, as
  cartpole's 8 x 0.01 s); every other domain 2 (Dreamer's setting).

Readout targets (``DMCEnv.readout_targets``), from the model's joints: a hinge joint gives sin, cos of
its angle; a slide joint its position; a free joint its height z and orientation quaternion (w, x, y, z);
a ball joint its quaternion; then every qvel entry ("v <joint>", free joints "v <joint>[i]"); then the
extras. Positions the camera cannot see are left out: the root's x (and y) of the tracking cameras
(unlimited slide joints named rootx/rooty: cheetah, walker, hopper, swimmer; x, y of free joints:
quadruped, humanoid, fish). Actuator activations are not targets. E.g. cartpole: slider, sin hinge_1,
cos hinge_1, v slider, v hinge_1; reacher: sin/cos shoulder, sin/cos wrist, v shoulder, v wrist,
target x, target y.

Rendering is headless: ``MUJOCO_GL`` is set to ``egl`` unless already set before dm_control is first
imported (``osmesa`` is the software fallback; it needs libosmesa6 and is slower).
"""

from __future__ import annotations

import math
import os

import gymnasium
import numpy as np
import torch
from gymnasium import spaces

from .readout import state_tensor
from .render import image_shape

__all__ = ["ACTION_REPEAT", "DMCEnv", "dmc_tasks", "parse_dmc_name", "suite"]

PREFIX = "dmc:"
# PlaNet's action repeats (Hafner et al. 2019, Table/appendix), pendulum ours; others DEFAULT_ACTION_REPEAT
ACTION_REPEAT = {"cartpole": 8, "reacher": 4, "cheetah": 4, "finger": 2, "ball_in_cup": 4, "walker": 2, "pendulum": 4}
DEFAULT_ACTION_REPEAT = 2
CAMERA = {"quadruped": 2}  # Dreamer's per-domain camera; 0 elsewhere
EPISODE_STEPS_WITHOUT_LIMIT = 1000  # control steps per episode of a task without a time limit (lqr)

_MISSING = ("DeepMind Control tasks need dm_control (it pulls mujoco): pip install dm_control "
            "(or pip install 'ldm-worldmodel[dmc]'); rendering is headless with MUJOCO_GL=egl "
            "(needs libEGL, e.g. apt-get install libegl1) or MUJOCO_GL=osmesa (libosmesa6)")


def suite():
    """``dm_control.suite``, imported on first use with ``MUJOCO_GL=egl`` unless set; ImportError naming
    the install command where dm_control is missing."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    try:
        from dm_control import suite as dm_suite
    except ImportError as error:
        raise ImportError(f"{_MISSING} ({error})") from error
    return dm_suite


def dmc_tasks() -> list[str]:
    """Every ``dmc:DOMAIN-TASK`` name of ``dm_control.suite.ALL_TASKS``, sorted."""
    return sorted(f"{PREFIX}{domain}-{task}" for domain, task in suite().ALL_TASKS)


def parse_dmc_name(name: str) -> tuple[str, str]:
    """``"dmc:DOMAIN-TASK"`` -> (domain, task); ValueError listing the valid names for an unknown one.
    Domains hold no "-" (tasks may hold "_"), so the name splits at its first "-" after the prefix."""
    if not name.startswith(PREFIX):
        raise ValueError(f"a DeepMind Control env name starts with {PREFIX!r}, got {name!r}")
    domain, _, task = name[len(PREFIX):].partition("-")
    if (domain, task) not in suite().ALL_TASKS:
        raise ValueError(f"unknown DeepMind Control task {name!r}; choose one of {dmc_tasks()}")
    return domain, task


def _joint_layout(physics, domain: str):
    """[(kind, qpos index, name)] of the readout targets' positions, the qvel names, and the state names."""
    model = physics.model
    free, ball, slide, hinge = 0, 1, 2, 3  # mjtJoint
    positions, qpos_names, qvel_names = [], [None] * model.nq, [None] * model.nv
    for j in range(model.njnt):
        name, kind = model.id2name(j, "joint") or f"joint{j}", int(model.jnt_type[j])
        q, v = int(model.jnt_qposadr[j]), int(model.jnt_dofadr[j])
        if kind == free:
            for i, c in enumerate(("x", "y", "z", "qw", "qx", "qy", "qz")):
                qpos_names[q + i] = f"{name} {c}"
            positions += [("value", q + i, f"{name} {c}") for i, c in enumerate(("z", "qw", "qx", "qy", "qz"), 2)]
            qvel_names[v:v + 6] = [f"v {name}[{i}]" for i in range(6)]
        elif kind == ball:
            for i, c in enumerate(("qw", "qx", "qy", "qz")):
                qpos_names[q + i] = f"{name} {c}"
                positions.append(("value", q + i, f"{name} {c}"))
            qvel_names[v:v + 3] = [f"v {name}[{i}]" for i in range(3)]
        else:
            qpos_names[q], qvel_names[v] = name, f"v {name}"
            unseen = kind == slide and name in ("rootx", "rooty") and not model.jnt_limited[j]
            if kind == hinge:
                positions.append(("angle", q, name))
            elif not unseen:
                positions.append(("value", q, name))
    return positions, qpos_names, qvel_names


class DMCEnv(gymnasium.Env):
    """A ``dm_control.suite`` task from pixels (see the module docstring for every convention).

    ``domain``, ``task``: a pair of ``dm_control.suite.ALL_TASKS``; ``image_size``: H = W (or (H, W)) of
    the rendered frames; ``action_repeat``: control steps per env step (None = ``ACTION_REPEAT``);
    ``camera_id``: MuJoCo camera (None = 0, quadruped 2). Seeding: ``reset(seed=s)`` reseeds the task's
    random state (initial state, reacher's target) from gymnasium's generator, so a seed fixes the episode.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 25}

    def __init__(self, domain: str = "cartpole", task: str = "swingup", image_size: int | tuple[int, int] = 64,
                 action_repeat: int | None = None, camera_id: int | None = None, render_mode: str | None = "rgb_array"):
        parse_dmc_name(f"{PREFIX}{domain}-{task}")  # ValueError for an unknown pair
        repeat = ACTION_REPEAT.get(domain, DEFAULT_ACTION_REPEAT) if action_repeat is None else action_repeat
        if int(repeat) != repeat or repeat < 1:
            raise ValueError(f"action_repeat must be a positive int, got {action_repeat!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        self.domain, self.task, self.action_repeat = domain, task, int(repeat)
        self.camera_id = CAMERA.get(domain, 0) if camera_id is None else int(camera_id)
        self.size = image_shape(image_size)
        self.render_mode = render_mode
        self._env = suite().load(domain, task)
        self.physics = self._env.physics
        if not 0 <= self.camera_id < self.physics.model.ncam:
            raise ValueError(f"camera_id {self.camera_id} out of range: {domain} has {self.physics.model.ncam} cameras")
        limit = self._env._step_limit  # control steps until the task's time limit (inf: none)
        self.control_steps = EPISODE_STEPS_WITHOUT_LIMIT if math.isinf(limit) else int(round(limit))
        self.episode_length = math.ceil(self.control_steps / self.action_repeat)
        spec = self._env.action_spec()
        low = np.broadcast_to(spec.minimum, spec.shape).astype(np.float32)
        high = np.broadcast_to(spec.maximum, spec.shape).astype(np.float32)
        self.action_space = spaces.Box(low, high, dtype=np.float32)
        self.observation_space = spaces.Box(0, 255, (*self.size, 3), np.uint8)
        self._positions, qpos_names, qvel_names = _joint_layout(self.physics, domain)
        self._extras = (["target x", "target y"] if domain == "reacher" else [])
        model = self.physics.model
        self.state_names = qpos_names + qvel_names + [f"act[{i}]" for i in range(model.na)] + self._extras
        self.state_dim = len(self.state_names)
        self._nq, self._nv = model.nq, model.nv
        self._frame = None

    # ------------------------------------------------------------------------------------------ state
    def true_state(self) -> np.ndarray:
        """float64 (qpos, qvel, act, extras) of the physics now (see the module docstring)."""
        data = self.physics.data
        parts = [data.qpos, data.qvel, data.act]
        if self.domain == "reacher":
            parts.append(self.physics.named.model.geom_pos["target", ["x", "y"]])
        return np.concatenate([np.asarray(p, np.float64).reshape(-1) for p in parts])

    def _render(self) -> np.ndarray:
        frame = self.physics.render(height=self.size[0], width=self.size[1], camera_id=self.camera_id)
        self._frame = np.ascontiguousarray(frame[..., :3], dtype=np.uint8)
        return self._frame

    def render(self):
        """The last observed frame (uint8 (H, W, 3)); rendered afresh before the first reset."""
        return self._render() if self._frame is None else self._frame.copy()

    # ------------------------------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._env.task.random.seed(int(self.np_random.integers(2**31 - 1)))
        self._env.reset()
        self._t = 0
        return self._render(), {"state": self.true_state()}

    def step(self, action):
        action = np.clip(np.asarray(action, np.float64).reshape(self.action_space.shape),
                         self.action_space.low, self.action_space.high)
        reward, time_step = 0.0, None
        for _ in range(self.action_repeat):
            time_step = self._env.step(action)
            reward += time_step.reward or 0.0
            if time_step.last():
                break
        self._t += 1
        done = time_step.last()
        terminated = bool(done and time_step.discount == 0.0)
        truncated = bool(done and not terminated)
        return self._render(), float(reward), terminated, truncated, {"state": self.true_state()}

    def close(self):
        if getattr(self, "_env", None) is not None:
            self._env.close()
            self._env = None

    # ------------------------------------------------------------------------------------------ readout
    def readout_targets(self, state) -> tuple[torch.Tensor, list[str]]:
        """``state`` (..., state_dim) -> targets (..., r) float64 and r names (see the module docstring):
        positions (hinges as sin, cos; unseen root x/y left out), all velocities, the extras."""
        s = state_tensor(state, self.state_dim)
        columns, names = [], []
        for kind, q, name in self._positions:
            if kind == "angle":
                columns += [torch.sin(s[..., q]), torch.cos(s[..., q])]
                names += [f"sin {name}", f"cos {name}"]
            else:
                columns.append(s[..., q])
                names.append(name)
        columns += [s[..., self._nq + i] for i in range(self._nv)]
        names += self.state_names[self._nq:self._nq + self._nv]
        extra0 = self.state_dim - len(self._extras)
        columns += [s[..., extra0 + i] for i in range(len(self._extras))]
        names += self._extras
        return torch.stack(columns, -1), names
