"""Shared numerical integration for the simulated environments."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def array_module(x):
    """``torch`` for a tensor, else ``numpy``: the envs' physics runs on both (numpy for ``step``, batched torch
    tensors for planning with the true dynamics, e.g. ``PendulumEnv.simulate``)."""
    return torch if isinstance(x, torch.Tensor) else np


def rk4(derivative: Callable, y, dt: float, substeps: int):
    """Integrate dy/dt = derivative(y) over ``dt`` with ``substeps`` classical Runge-Kutta-4 steps (float64 for
    numpy input; a tensor keeps its dtype and device).

    Controls are held constant over ``dt`` (zero-order hold), so ``derivative`` closes over them.
    """
    h = dt / substeps
    if not isinstance(y, torch.Tensor):
        y = np.asarray(y, np.float64)
    for _ in range(substeps):
        k1 = derivative(y)
        k2 = derivative(y + 0.5 * h * k1)
        k3 = derivative(y + 0.5 * h * k2)
        k4 = derivative(y + h * k3)
        y = y + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    return y


def wrap_angle(theta):
    """Wrap angles (numpy, float or tensor) to [-pi, pi)."""
    if not isinstance(theta, torch.Tensor):
        theta = np.asarray(theta)
    return (theta + np.pi) % (2.0 * np.pi) - np.pi
