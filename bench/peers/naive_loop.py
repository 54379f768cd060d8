"""Baseline: the naive filter, one sequence and one time step at a time in eager torch (float32).

The same textbook step as everyone else (Cholesky of S, triangular solves for the gain and the
log-likelihood), looped in Python over the batch and time; autograd gives the backward pass.
"""
import math
import sys

from common import child_main


def versions() -> dict:
    import torch
    return {"torch": torch.__version__}


def build(problem, variant, grad):
    import torch

    f32 = {k: torch.tensor(problem[k], dtype=torch.float32) for k in ("A", "Q", "C", "R", "m0", "P0", "z")}
    B, T, m = f32["z"].shape

    def run():
        leaves = {k: v.clone().requires_grad_(grad and k in "AQCRz") for k, v in f32.items()}
        A, Q, C, R, z = (leaves[k] for k in ("A", "Q", "C", "R", "z"))
        lls, means = [], []
        for b in range(B):
            mean, cov, ll = leaves["m0"], leaves["P0"], 0.0
            for t in range(T):
                mean, cov = A @ mean, A @ cov @ A.T + Q
                CP = C @ cov
                S = CP @ C.T + R
                L = torch.linalg.cholesky(S)
                e = z[b, t] - C @ mean
                w = torch.linalg.solve_triangular(L, e[:, None], upper=False)
                ll = ll - 0.5 * (m * math.log(2 * math.pi) + 2 * L.diagonal().log().sum() + (w**2).sum())
                K_T = torch.cholesky_solve(CP, L)
                mean = mean + e @ K_T
                cov = cov - CP.T @ K_T
                cov = 0.5 * (cov + cov.T)
                means.append(mean)
            lls.append(ll)
        ll = torch.stack(lls)
        grads = torch.autograd.grad(ll.sum(), [A, Q, C, R, z]) if grad else ()
        return ll, torch.stack(means), grads

    def summarise(out):
        ll, means, grads = out
        bad = sum(int((~torch.isfinite(x)).sum()) for x in (ll, means, *grads))
        return {"loglik": ll.detach().double().tolist(), "nonfinite": bad}

    return run, summarise


if __name__ == "__main__":
    sys.exit(child_main(versions, build))
