"""Readout targets: the true quantities a linear readout of a good latent state should recover.

Each env class of ours defines ``readout_targets(state) -> (targets, names)``; ``readout_targets(env,
state)`` answers for any env from ``make_env``: the env's own method, angle-aware targets for the
gymnasium envs whose state holds raw angles (``ANGLE_STATES``), else the state itself.
``state``: numpy array or torch tensor (..., state_dim), ``info["state"]`` stacked over episodes and
time; ``targets``: float64 torch tensor (..., r); ``names``: r short strings.
"""

from __future__ import annotations

import gymnasium
import torch
from torch import Tensor

# gymnasium id -> number of raw angles n of a state (theta_1..theta_n, theta_dot_1..theta_dot_n)
ANGLE_STATES = {"Pendulum-v1": 1, "Acrobot-v1": 2}


def state_tensor(state, dim: int | None = None) -> Tensor:
    """``state`` (..., dim) (numpy or torch) as a float64 CPU tensor; ValueError unless it has at least one
    axis and (when ``dim`` is given) a last axis of ``dim``."""
    s = torch.as_tensor(state.detach() if isinstance(state, Tensor) else state).cpu().double()
    if s.dim() < 1 or (dim is not None and s.shape[-1] != dim):
        raise ValueError(f"state must have shape (..., {dim or 'd'}), got {tuple(s.shape)}")
    return s


def angle_targets(state, n: int) -> tuple[Tensor, list[str]]:
    """State (..., 2 n) = (theta_1..theta_n, theta_dot_1..theta_dot_n) -> targets (..., 3 n) =
    (sin theta_1, cos theta_1, .., sin theta_n, cos theta_n, theta_dot_1, .., theta_dot_n).

    Names "sin θ", "cos θ", "θ̇" for n = 1, else numbered ("sin θ1", .., "θ̇2").
    """
    s = state_tensor(state, 2 * n)
    theta, velocity = s[..., :n], s[..., n:]
    angles = torch.stack([torch.sin(theta), torch.cos(theta)], -1).flatten(-2)
    index = [""] if n == 1 else [str(i + 1) for i in range(n)]
    names = [f"{f} θ{i}" for i in index for f in ("sin", "cos")] + [f"θ̇{i}" for i in index]
    return torch.cat([angles, velocity], -1), names


def readout_targets(env: gymnasium.Env, state) -> tuple[Tensor, list[str]]:
    """Readout targets (..., r) (float64) and their r names for any env from ``make_env``.

    ``env.unwrapped.readout_targets`` where it exists (our envs); for the gymnasium ids in
    ``ANGLE_STATES`` (gym_pendulum, acrobot) ``angle_targets``; otherwise the state itself, named
    "state[i]" (e.g. cartpole, whose pole angle stays small within an episode).
    """
    own = getattr(env.unwrapped, "readout_targets", None)
    if own is not None:
        return own(state)
    spec = env.unwrapped.spec
    if spec is not None and spec.id in ANGLE_STATES:
        return angle_targets(state, ANGLE_STATES[spec.id])
    s = state_tensor(state)
    return s, [f"state[{i}]" for i in range(s.shape[-1])]
