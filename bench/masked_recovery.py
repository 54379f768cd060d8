"""Why dropped frames cost a batch of covariance recursions: how long the covariance takes to return to its
steady state after one dropped frame, against how long it takes to reach it from P0.

    python bench/masked_recovery.py

On a random stable system (spectral radius 0.95, Q = R = 0.1 I, C ~ N(0, 1/d), float64) it runs the covariance
recursion from P0 = I to its fixed point, counts the steps to within 4 float32 ulps of it (the filter's
steady-state stop), then drops one frame at the fixed point and counts the steps back. When both are about
equal, every sequence whose mask differs from the others' needs its own recursion for most of a window with 10 %
of the frames dropped (mean gap 10 steps), which is why masked batches cost B recursions where unmasked ones
cost one (issue 19; bench/README.md, "Missing frames").
"""

from __future__ import annotations

import numpy as np


def step(P, A, Q, C, R, observed: bool):
    """One covariance step: predict, then update if observed."""
    predicted = A @ P @ A.T + Q
    if not observed:
        return predicted
    S = C @ predicted @ C.T + R
    K = np.linalg.solve(S, C @ predicted).T
    return predicted - K @ S @ K.T


def main() -> None:
    rng = np.random.default_rng(0)
    tol = 4 * np.finfo(np.float32).eps
    for d, m in ((32, 32), (16, 8), (64, 16)):
        A = rng.standard_normal((d, d))
        A *= 0.95 / max(abs(np.linalg.eigvals(A)))
        Q, R, C = 0.1 * np.eye(d), 0.1 * np.eye(m), rng.standard_normal((m, d)) / np.sqrt(d)
        path, P = [], np.eye(d)
        for _ in range(1000):
            P = step(P, A, Q, C, R, True)
            path.append(P)
        fixed = path[-1]
        distance = lambda P: np.abs(P - fixed).max() / np.abs(fixed).max()
        converge = next(t for t, P in enumerate(path) if distance(P) < tol) + 1
        P, recover = step(fixed, A, Q, C, R, False), 0
        while distance(P) >= tol:
            P, recover = step(P, A, Q, C, R, True), recover + 1
        print(f"d={d:3d} m={m:3d}: {converge:3d} steps from P0 to the steady state, {recover:3d} back after one "
              f"dropped frame")


if __name__ == "__main__":
    main()
