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


def _matvec(matrix, vector):
    """matrix (..., n, n) @ vector (..., n) -> (..., n), numpy or torch (a plain ``@`` for one vector, so
    ``step``'s numpy arithmetic is unchanged)."""
    return matrix @ vector if vector.ndim == 1 else (matrix @ vector[..., None])[..., 0]


class NLinkPendulumEnv(gymnasium.Env):
    """Pixel n-link pendulum: obs uint8 (H, W, 3), action Box(-max_torque, max_torque, (n,)) joint torques.

    ``info["state"]`` = (theta_1..theta_n, theta_dot_1..theta_dot_n), absolute angles wrapped to
    [-pi, pi), 0 = hanging down. Reset draws angles ~ U(-pi, pi) and velocities ~ U(-1, 1) * max_init_velocity,
    or takes ``options={"state": ...}``. Links are drawn in distinct colours. Reward is 0.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 20}
    defaults = {"image_size": 64, "episode_length": 100, "env_kwargs": {}}  # for ``worldmodel.envs.env_defaults``

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
        theta = self.state[: self.n]
        joints = np.cumsum(np.stack([self.lengths * np.sin(theta), -self.lengths * np.cos(theta)], 1), axis=0)
        joints = np.concatenate([np.zeros((1, 2)), joints])
        image = self.canvas.blank()
        width = 0.07 * self.lengths.sum()
        for k in range(self.n):
            self.canvas.capsule(image, joints[k], joints[k + 1], width, LINK_COLORS[k])
        return self.canvas.to_uint8(image)
