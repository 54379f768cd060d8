"""Peer: torch-kf (batched predict / project / update, float32, autograd for the backward pass).

torch-kf's own ``filter`` loop returns no likelihood, so the loop is written with its public
``predict``, ``project`` (which also forms S^-1) and ``update``, adding ``project(...).log_likelihood``.
"""
import sys

import numpy as np

from common import child_main, first_prior


def versions() -> dict:
    import torch
    import torch_kf
    return {"torch-kf": torch_kf.__version__, "torch": torch.__version__}


def build(problem, variant, grad):
    import torch
    from torch_kf import GaussianState, KalmanFilter

    f32 = {k: torch.tensor(problem[k], dtype=torch.float32) for k in ("A", "Q", "C", "R", "z")}
    prior_mean, prior_cov = (torch.tensor(x, dtype=torch.float32) for x in first_prior(problem))
    B, T, m = f32["z"].shape
    n = f32["A"].shape[0]

    def run():
        leaves = {k: v.clone().requires_grad_(grad) for k, v in f32.items()}
        kf = KalmanFilter(leaves["A"], leaves["C"], leaves["Q"], leaves["R"])
        state = GaussianState(prior_mean.expand(B, n)[..., None], prior_cov.expand(B, n, n))
        z = leaves["z"]
        ll = z.new_zeros(B)
        means, covs = [], []
        for t in range(T):
            if t:
                state = kf.predict(state)
            proj = kf.project(state)
            ll = ll + proj.log_likelihood(z[:, t, :, None])
            state = kf.update(state, z[:, t, :, None], projection=proj)
            means.append(state.mean[..., 0])
            covs.append(state.covariance)
        means, covs = torch.stack(means, 1), torch.stack(covs, 1)
        grads = torch.autograd.grad(ll.sum(), list(leaves.values())) if grad else ()
        return ll, means, covs, grads

    def summarise(out):
        ll, means, covs, grads = out
        bad = sum(int((~torch.isfinite(x)).sum()) for x in (ll, means, covs, *grads))
        return {"loglik": ll.detach().double().tolist(), "nonfinite": bad}

    return run, summarise


if __name__ == "__main__":
    sys.exit(child_main(versions, build))
