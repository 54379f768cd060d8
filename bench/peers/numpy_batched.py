"""Peer: the textbook covariance-form filter in numpy, vectorised over the batch (forward only).

``variant`` ``float32``: the timed peer, every array batched over B. ``reference``: the benchmark's
float64 reference, the same textbook recursion with the covariances computed once (the parameters are
shared, so they are the same for every sequence), which keeps it affordable on the largest points.
Gain by a Cholesky-backed solve; log N(e; 0, S) = -1/2 (m log 2 pi + 2 sum log diag L + |L^-1 e|^2).
"""
import sys

import numpy as np

from common import child_main


def versions() -> dict:
    return {"numpy": np.__version__}


def filter_loglik(p: dict, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    A, Q, C, R = (p[k].astype(dtype) for k in "AQCR")
    z = p["z"].astype(dtype)
    B, T, m = z.shape
    mean = np.broadcast_to(p["m0"].astype(dtype), (B, A.shape[0])).copy()
    cov = np.broadcast_to(p["P0"].astype(dtype), (B, *A.shape)).copy()
    means, covs = np.empty((B, T, A.shape[0]), dtype), np.empty((B, T, *A.shape), dtype)
    ll = np.zeros(B, dtype)
    for t in range(T):
        mean = mean @ A.T
        cov = A @ cov @ A.T + Q
        CP = C @ cov                                   # (B, m, n)
        S = CP @ C.T + R
        L = np.linalg.cholesky(S)
        e = z[:, t] - mean @ C.T
        w = np.linalg.solve(L, e[..., None])[..., 0]   # L^-1 e
        ll -= 0.5 * (m * np.log(2 * np.pi) + 2 * np.log(np.diagonal(L, axis1=1, axis2=2)).sum(-1) + (w**2).sum(-1))
        K_T = np.linalg.solve(S, CP)                   # (S^-1 C P) = K^T
        mean = mean + (e[:, None, :] @ K_T)[:, 0]       # m + K e
        cov = cov - CP.transpose(0, 2, 1) @ K_T
        cov = 0.5 * (cov + cov.transpose(0, 2, 1))
        means[:, t], covs[:, t] = mean, cov
    return ll, means, covs


def reference_loglik(p: dict) -> np.ndarray:
    """float64 log-likelihood (B,) with one covariance recursion shared by all sequences."""
    A, Q, C, R, z = p["A"], p["Q"], p["C"], p["R"], p["z"]
    B, T, m = z.shape
    mean, P = np.broadcast_to(p["m0"], (B, A.shape[0])).copy(), p["P0"].copy()
    ll = np.zeros(B)
    for t in range(T):
        mean, P = mean @ A.T, A @ P @ A.T + Q
        CP = C @ P
        S = CP @ C.T + R
        L = np.linalg.cholesky(S)
        e = z[:, t] - mean @ C.T
        w = np.linalg.solve(L, e.T)  # (m, B)
        ll -= 0.5 * (m * np.log(2 * np.pi) + 2 * np.log(np.diag(L)).sum() + (w**2).sum(0))
        K_T = np.linalg.solve(S, CP)
        mean = mean + e @ K_T
        P = P - CP.T @ K_T
        P = 0.5 * (P + P.T)
    return ll


def build(problem, variant, grad):
    if grad:
        return None
    if variant == "reference":
        ll = reference_loglik(problem)
        return (lambda: ll), (lambda out: {"loglik": out.tolist(), "nonfinite": int((~np.isfinite(out)).sum())})
    dtype = np.dtype(variant)

    def summarise(out):
        ll, means, covs = out
        return {"loglik": ll.astype(float).tolist(),
                "nonfinite": int((~np.isfinite(ll)).sum() + (~np.isfinite(means)).sum() + (~np.isfinite(covs)).sum())}

    return (lambda: filter_loglik(problem, dtype)), summarise


if __name__ == "__main__":
    sys.exit(child_main(versions, build))
