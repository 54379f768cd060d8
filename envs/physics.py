"""Shared numerical integration for the simulated environments."""

from __future__ import annotations

from typing import Callable

import numpy as np


def rk4(derivative: Callable[[np.ndarray], np.ndarray], y: np.ndarray, dt: float, substeps: int) -> np.ndarray:
    """Integrate dy/dt = derivative(y) over ``dt`` with ``substeps`` classical Runge-Kutta-4 steps (float64).

    Controls are held constant over ``dt`` (zero-order hold), so ``derivative`` closes over them.
    """
    h = dt / substeps
    y = np.asarray(y, np.float64)
    for _ in range(substeps):
        k1 = derivative(y)
        k2 = derivative(y + 0.5 * h * k1)
        k3 = derivative(y + 0.5 * h * k2)
        k4 = derivative(y + h * k3)
        y = y + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    return y


def wrap_angle(theta: np.ndarray | float) -> np.ndarray | float:
    """Wrap angles to [-pi, pi)."""
    return (np.asarray(theta) + np.pi) % (2.0 * np.pi) - np.pi
