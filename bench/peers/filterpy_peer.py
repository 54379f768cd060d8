"""Peer: filterpy's KalmanFilter, one sequence at a time (forward only, float64 as filterpy computes)."""
import sys

import numpy as np

from common import child_main


def versions() -> dict:
    import filterpy
    import scipy
    return {"filterpy": filterpy.__version__, "scipy": scipy.__version__, "numpy": np.__version__}


def build(problem, variant, grad):
    if grad:
        return None
    from filterpy.kalman import KalmanFilter

    A, Q, C, R, z = (problem[k] for k in ("A", "Q", "C", "R", "z"))
    B, T, m = z.shape
    n = A.shape[0]

    def run():
        ll = np.zeros(B)
        means, covs = np.empty((B, T, n)), np.empty((B, T, n, n))
        for b in range(B):
            kf = KalmanFilter(dim_x=n, dim_z=m)
            kf.F, kf.Q, kf.H, kf.R = A, Q, C, R
            kf.x, kf.P = problem["m0"][:, None].copy(), problem["P0"].copy()
            for t in range(T):
                kf.predict()
                kf.update(z[b, t][:, None])
                ll[b] += kf.log_likelihood
                means[b, t], covs[b, t] = kf.x[:, 0], kf.P
        return ll, means, covs

    def summarise(out):
        ll, means, covs = out
        return {"loglik": ll.tolist(),
                "nonfinite": int((~np.isfinite(ll)).sum() + (~np.isfinite(means)).sum() + (~np.isfinite(covs)).sum())}

    return run, summarise


if __name__ == "__main__":
    sys.exit(child_main(versions, build))
