"""The readout ceiling of a linear filter: R^2 of each true-state entry from an affine map of the last k
true configurations (the first ``--positions`` entries of the stored state).

A Kalman filter's mean is linear in the history of its latents, so even with latents that encode the
configuration exactly, its linear readout of a velocity cannot beat this bound. Bounces (balls), wraps and
fast swings make it less than 1.

    python train.py --env balls --name balls              # builds data/balls.zarr
    python bench/linear_ceiling.py --data data/balls.zarr --positions 4

Fit on the first 80 % of the episodes, scored on the rest, the first ``max(k)`` steps of each skipped.
"""
from __future__ import annotations

import argparse

import numpy as np

from worldmodel.datasets import RolloutStore


def ceiling(state: np.ndarray, positions: int, k: int, skip: int, train_fraction: float = 0.8) -> np.ndarray:
    """Held-out R^2 of every state entry (D,) from the last k configurations; state (N, T, D)."""
    def design(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        history = [s[:, skip - j:s.shape[1] - j, :positions] for j in range(k)]
        x = np.concatenate(history, -1).reshape(-1, positions * k)
        return np.c_[x, np.ones(len(x))], s[:, skip:].reshape(-1, s.shape[-1])

    cut = int(len(state) * train_fraction)
    (x_fit, y_fit), (x_test, y_test) = design(state[:cut]), design(state[cut:])
    weights = np.linalg.lstsq(x_fit, y_fit, rcond=None)[0]
    residual = ((x_test @ weights - y_test) ** 2).sum(0)
    return 1.0 - residual / ((y_test - y_test.mean(0)) ** 2).sum(0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a rollout store with a state array")
    ap.add_argument("--positions", type=int, required=True, help="leading state entries that are observed")
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 5, 9])
    args = ap.parse_args(argv)
    store = RolloutStore.open(args.data, read_only=True)
    state = np.stack([store.episode(i)["state"] for i in range(len(store))]).astype(np.float64)
    print(f"{args.data}: {state.shape[0]} episodes, state {state.shape[-1]}, the first {args.positions} observed")
    print(f"{'k':>3}  R^2 per state entry")
    for k in args.ks:
        print(f"{k:>3}  " + " ".join(f"{v:.4f}" for v in ceiling(state, args.positions, k, max(args.ks))))


if __name__ == "__main__":
    main()
