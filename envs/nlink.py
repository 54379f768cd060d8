"""N-link pendulum: a chain of n point masses on massless rods, torque at every joint.

With absolute link angles theta_i (from hanging down, counter-clockwise), masses m_k at the ends of
links of length l_k, and M_ij = l_i l_j sum_{k >= max(i, j)} m_k, the Euler-Lagrange equations are

    sum_j M_ij [cos(theta_i - theta_j) theta_j'' + sin(theta_i - theta_j) theta_j'^2]
        + g l_i sin(theta_i) sum_{k >= i} m_k = Q_i,

with generalised forces Q_i = tau_i - tau_{i+1} from joint torques tau_j = u_j - b phi_j' acting on
the relative joint angles phi_j = theta_j - theta_{j-1} (tau_{n+1} = 0; b = joint friction).
Integrated with RK4 substeps; energy E = T + V, T = 1/2 theta'^T [M * cos(theta_i - theta_j)] theta',
V = -g sum_k m_k sum_{i <= k} l_i cos(theta_i), is conserved when b = 0 and u = 0.
"""

from __future__ import annotations

import gymnasium
import numpy as np
import torch
from gymnasium import spaces

from .physics import array_module, rk4, wrap_angle
from .readout import angle_targets
from .render import Canvas, image_shape

LINK_COLORS = ((1.0, 1.0, 1.0), (1.0, 0.6, 0.2), (0.3, 0.8, 1.0), (0.4, 1.0, 0.4), (1.0, 0.4, 0.8))
GOAL_HOLD = 0.8  # sample_goal with gravity: the holding torques are at most this fraction of max_torque
GOAL_VELOCITY_WEIGHT = 0.01  # goal_cost: weight of the squared joint velocities
# The arm's control task (``defaults["control"]``): reach a goal pose (``sample_goal``; its image ``render_state``)
# with the arm in a horizontal plane, gravity 0 like dm_control's reacher (with gravity the torque limit holds only
# poses within ~0.16 rad of hanging, goals that look alike). The default friction 0.05 suffices: an MPPI planner on
# the true state (bench/nlink_oracle.py; horizon 20, 128 samples, 3 iterations) brings 10 of 10 random goals within
# 0.02 rad (mean goal error 0.08 rad at step 30, 0.01 at step 50), also without friction; 100 steps leave a learned
# model slack. success_error: a goal counts as reached when goal_error (norm over the links, rad), averaged over the
# last 10 steps, is below it; 0.2 rad moves the fingertip by at most 0.2 / sqrt(n) of the arm's reach. planner:
# PlannerConfig overrides for planning with ``simulate`` (its 10 RK4 substeps per step dominate): these succeed on
# all 10 goals at ~1 s CPU per step; the PlannerConfig defaults (30, 256, 6) do too, at ~3.5 s.
CONTROL = {"task": "goal", "env_kwargs": {"gravity": 0.0}, "episode_length": 100, "success_error": 0.2,
           "planner": {"horizon": 20, "samples": 128, "iterations": 3}}


def _matvec(matrix, vector):
    """matrix (..., n, n) @ vector (..., n) -> (..., n), numpy or torch (a plain ``@`` for one vector, so
    ``step``'s numpy arithmetic is unchanged)."""
    return matrix @ vector if vector.ndim == 1 else (matrix @ vector[..., None])[..., 0]


class NLinkPendulumEnv(gymnasium.Env):
    """Pixel n-link pendulum: obs uint8 (H, W, 3), action Box(-max_torque, max_torque, (n,)) joint torques.

    ``info["state"]`` = (theta_1..theta_n, theta_dot_1..theta_dot_n), absolute angles wrapped to
    [-pi, pi), 0 = hanging down. Reset draws angles ~ U(-pi, pi) and velocities ~ U(-1, 1) * max_init_velocity,
    or takes ``options={"state": ...}``. Links are drawn in distinct colours. Reward is 0.

    Control (``defaults["control"]``, see CONTROL) is goal reaching: ``sample_goal(rng)`` a holdable pose,
    ``render_state(goal)`` its image, ``goal_error`` the score, ``goal_cost`` a smooth stage cost and ``simulate``
    the batched true dynamics for planners that know the state.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}
    # training data for ``worldmodel.envs.env_defaults``; "control": the control task (see CONTROL)
    defaults = {"image_size": 64, "episode_length": 100, "env_kwargs": {}, "control": CONTROL}

    def __init__(
        self,
        image_size: int | tuple[int, int] = 64,
        n_links: int = 2,
        link_length: float = 0.5,
        mass: float = 1.0,
        gravity: float = 9.81,
        friction: float = 0.05,
        dt: float = 0.05,
        substeps: int = 10,
        max_torque: float = 1.0,
        max_init_velocity: float = 1.0,
        render_mode: str | None = "rgb_array",
    ):
        if int(n_links) != n_links or not 1 <= n_links <= len(LINK_COLORS):
            raise ValueError(f"n_links must be an int in [1, {len(LINK_COLORS)}], got {n_links}")
        if friction < 0 or dt <= 0 or substeps < 1:
            raise ValueError(f"need friction >= 0, dt > 0, substeps >= 1; got {friction}, {dt}, {substeps}")
        self.n = int(n_links)
        self.lengths = np.full(self.n, float(link_length))
        self.masses = np.full(self.n, float(mass))
        self.gravity, self.friction, self.dt, self.substeps = float(gravity), float(friction), float(dt), int(substeps)
        self.max_torque, self.max_init_velocity = float(max_torque), float(max_init_velocity)
        self.render_mode = render_mode
        # tail masses sum_{k >= max(i, j)} m_k and the constant part of the mass matrix
        tail = np.cumsum(self.masses[::-1])[::-1]
        self._tail = tail
        self._tensor_constants: dict = {}
        self._mass_lengths = np.outer(self.lengths, self.lengths) * tail[np.maximum.outer(np.arange(self.n), np.arange(self.n))]
        height, width = image_shape(image_size)
        self.canvas = Canvas((height, width), extent=1.1 * self.lengths.sum())
        self.observation_space = spaces.Box(0, 255, (height, width, 3), np.uint8)
        self.action_space = spaces.Box(-self.max_torque, self.max_torque, (self.n,), np.float32)
        self.state = np.zeros(2 * self.n)

    def _constants(self, like):
        """(mass-length matrix M_ij (n, n), lengths (n,), tail masses (n,)) as arrays like ``like`` (a tensor's dtype
        and device, else the float64 numpy arrays themselves)."""
        consts = (self._mass_lengths, self.lengths, self._tail)
        if not isinstance(like, torch.Tensor):
            return consts
        key = (like.dtype, like.device)
        if key not in self._tensor_constants:  # converted once per dtype and device (the RK4 loop calls this often)
            self._tensor_constants[key] = tuple(torch.tensor(c.copy(), dtype=like.dtype, device=like.device)
                                                for c in consts)
        return self._tensor_constants[key]

    def derivative(self, y, torque):
        """d/dt (theta, theta_dot) at state(s) y (..., 2 n) under constant joint torque(s) (..., n): numpy (the
        (2 n,) vector ``step`` integrates) or torch (batched; ``simulate``)."""
        xp = array_module(y)
        mass_lengths, lengths, tail = self._constants(y)
        theta, omega = y[..., : self.n], y[..., self.n :]
        diff = theta[..., :, None] - theta[..., None, :]
        mass = mass_lengths * xp.cos(diff)
        zero = xp.zeros_like(omega[..., :1])
        joint_rate = omega - xp.concatenate([zero, omega[..., :-1]], axis=-1)  # phi_j' (np.diff with prepend=0)
        tau = torque - self.friction * joint_rate
        force = tau - xp.concatenate([tau[..., 1:], zero], axis=-1)  # Q_i = tau_i - tau_{i+1}
        rhs = force - _matvec(mass_lengths * xp.sin(diff), omega**2) - self.gravity * lengths * xp.sin(theta) * tail
        accel = xp.linalg.solve(mass, rhs) if rhs.ndim == 1 else xp.linalg.solve(mass, rhs[..., None])[..., 0]
        return xp.concatenate([omega, accel], axis=-1)

    def simulate(self, state, action):
        """The true dynamics, batched (for planning with the simulator's state, e.g. an oracle MPC): state
        (..., 2 n), action (..., n) tensors -> (next state (..., 2 n), reward (...)), exactly as ``step`` computes
        them (torques clipped to +-max_torque, ``substeps`` RK4 steps over dt, angles wrapped; reward 0), in the
        dtype and device of ``state``."""
        torque = action.to(state.dtype).clamp(-self.max_torque, self.max_torque)
        y = rk4(lambda y: self.derivative(y, torque), state, self.dt, self.substeps)
        y = torch.cat([wrap_angle(y[..., : self.n]), y[..., self.n :]], -1)
        return y, y.new_zeros(y.shape[:-1])

    # ------------------------------------------------------------------------------------------ goal reaching
    def static_torque(self, theta):
        """The joint torques u (..., n) that hold the arm still at absolute angles theta (..., n) against gravity
        (numpy or torch). With theta' = theta'' = 0 the equations of motion leave Q_i = g l_i sin(theta_i)
        sum_{k >= i} m_k, and Q_i = u_i - u_{i+1} (u_{n+1} = 0) gives u_i = sum_{j >= i} Q_j. A pose can be
        held iff |u_i| <= max_torque at every joint."""
        xp = array_module(theta)
        _, lengths, tail = self._constants(theta)
        q = self.gravity * lengths * tail * xp.sin(theta)
        return q.sum(-1, keepdims=True) - xp.cumsum(q, axis=-1) + q  # reverse cumulative sum

    def sample_goal(self, rng: np.random.Generator) -> np.ndarray:
        """A goal state (2 n,) for reaching: angles the arm can reach and hold still, velocities 0.

        Without gravity every pose can be held: angles ~ U(-pi, pi). With gravity the torque limit holds only
        poses near hanging (defaults: |theta_i| < 0.2 rad), so the holding torques are drawn instead, joint by
        joint from the tip: u_i uniform among the values with |u_i| <= GOAL_HOLD * max_torque and
        |u_i - u_{i+1}| <= |g| l_i sum_{k >= i} m_k, and theta_i = arcsin((u_i - u_{i+1}) / (g l_i sum_{k >= i}
        m_k)) on the stable (hanging) branch; so ``static_torque(goal)`` is within GOAL_HOLD * max_torque,
        leaving the controller some torque to spare.

        ``rng``: e.g. ``env.np_random`` after ``reset(seed=s)``; not a fresh ``np.random.default_rng(s)`` with the
        reset's seed, which repeats the reset's draws (the goal would be the start pose)."""
        if self.gravity == 0:
            theta = rng.uniform(-np.pi, np.pi, self.n)
        else:
            reach = abs(self.gravity) * self.lengths * self._tail  # |Q_i| with link i horizontal
            limit = GOAL_HOLD * self.max_torque
            force, after = np.zeros(self.n), 0.0  # Q_i; u_{i+1}
            for i in reversed(range(self.n)):
                u = rng.uniform(max(-limit, after - reach[i]), min(limit, after + reach[i]))
                force[i], after = u - after, u
            theta = np.arcsin(np.clip(force / reach, -1.0, 1.0))
            if self.gravity < 0:  # gravity pointing up: the stable branch is around theta = pi
                theta = np.pi - theta
        return np.concatenate([wrap_angle(theta), np.zeros(self.n)])

    def goal_error(self, state, goal):
        """Joint-angle error (...) of state(s) (..., 2 n) from goal(s) (..., 2 n): the Euclidean norm over the n
        links of the wrapped differences of the absolute angles, in radians (numpy or torch, broadcast)."""
        delta = wrap_angle(state[..., : self.n] - goal[..., : self.n])
        return (delta**2).sum(-1) ** 0.5

    def goal_cost(self, state, goal):
        """Smooth stage cost (...) of state(s) (..., 2 n) for reaching goal(s) (..., 2 n), for planners with the
        true dynamics (numpy or torch, broadcast):

            sum_i 2 (1 - cos(theta_i - goal_i)) + 0.01 sum_i (theta_dot_i - goal_dot_i)^2.

        2 (1 - cos d) = d^2 + O(d^4) near the goal, is smooth and periodic (no jump at the wrap) and bounded by 4
        per link far from it; the small velocity term makes the arm arrive at rest without penalising the swing
        on the way (1 rad/s weighs like 0.1 rad of angle error)."""
        xp = array_module(state)
        angle = (2.0 * (1.0 - xp.cos(state[..., : self.n] - goal[..., : self.n]))).sum(-1)
        return angle + GOAL_VELOCITY_WEIGHT * ((state[..., self.n :] - goal[..., self.n :]) ** 2).sum(-1)

    def readout_targets(self, state):
        """State (..., 2 n) -> float64 targets (..., 3 n) = (sin θ1, cos θ1, .., sin θn, cos θn, θ̇1, .., θ̇n)
        and their names (see ``readout.angle_targets``)."""
        return angle_targets(state, self.n)

    def energy(self, state: np.ndarray) -> np.ndarray:
        """Total mechanical energy of state(s) (..., 2 n)."""
        state = np.asarray(state)
        theta, omega = state[..., : self.n], state[..., self.n :]
        mass = self._mass_lengths * np.cos(theta[..., :, None] - theta[..., None, :])
        kinetic = 0.5 * np.einsum("...i,...ij,...j->...", omega, mass, omega)
        heights = np.cumsum(self.lengths * np.cos(theta), axis=-1)  # depth of each mass below the pivot
        return kinetic - self.gravity * np.sum(self.masses * heights, axis=-1)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if options and "state" in options:
            state = np.asarray(options["state"], np.float64)
            if state.shape != (2 * self.n,) or not np.all(np.isfinite(state)):
                raise ValueError(f"options['state'] must be a finite vector of length {2 * self.n}, got {options['state']!r}")
        else:
            state = np.concatenate([
                self.np_random.uniform(-np.pi, np.pi, self.n),
                self.np_random.uniform(-1, 1, self.n) * self.max_init_velocity,
            ])
        self.state = np.concatenate([wrap_angle(state[: self.n]), state[self.n :]])
        return self.render(), {"state": self.state.copy()}

    def step(self, action):
        action = np.asarray(action, np.float64).reshape(-1)
        if action.shape != (self.n,) or not np.isfinite(action).all():
            raise ValueError(f"action must be a finite array of shape ({self.n},), got {action!r}")
        torque = np.clip(action, -self.max_torque, self.max_torque)
        y = rk4(lambda y: self.derivative(y, torque), self.state, self.dt, self.substeps)
        self.state = np.concatenate([wrap_angle(y[: self.n]), y[self.n :]])
        return self.render(), 0.0, False, False, {"state": self.state.copy()}

    def render(self) -> np.ndarray:
        """The current frame, uint8 (H, W, 3): the links as capsules in distinct colours on black."""
        return self.render_state(self.state)

    def render_state(self, state) -> np.ndarray:
        """The frame(s) uint8 (..., H, W, 3) of state(s) (..., 2 n) (only the angles matter), without changing the
        env: e.g. the image of a goal (``sample_goal``); equal to ``render()`` after ``reset(options={"state": s})``."""
        state = np.asarray(state, np.float64)
        if state.shape[-1:] != (2 * self.n,):
            raise ValueError(f"state must have shape (..., {2 * self.n}), got {state.shape}")
        if state.ndim > 1:
            frames = [self.render_state(s) for s in state.reshape(-1, 2 * self.n)]
            return np.stack(frames).reshape(*state.shape[:-1], *self.observation_space.shape)
        theta = wrap_angle(state[: self.n])
        joints = np.cumsum(np.stack([self.lengths * np.sin(theta), -self.lengths * np.cos(theta)], 1), axis=0)
        joints = np.concatenate([np.zeros((1, 2)), joints])
        image = self.canvas.blank()
        width = 0.07 * self.lengths.sum()
        for k in range(self.n):
            self.canvas.capsule(image, joints[k], joints[k + 1], width, LINK_COLORS[k])
        return self.canvas.to_uint8(image)
