"""Rauch-Tung-Striebel smoothing of a :class:`FilterResult`, sequential or by associative scan."""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import _param
from .parallel import _associative_scan, _smoothing_combine
from .types import FilterResult, Gaussian, _cholesky, _mv, _per_step, symmetrize


def rts_smoother(result: FilterResult, A: Tensor, Q: Tensor, parallel: bool = False) -> Gaussian:
    """Rauch-Tung-Striebel smoother: N(m_{t|T}, P_{t|T}) ``(B, T, n)`` from a :class:`FilterResult`.

    ``A``, ``Q``: the transition matrix and process noise the filter used (``(n, n)`` or ``(B, n, n)``);
    the controls enter through ``result.predicted``.  With ``G_t = P_{t|t} A^T P_{t+1|t}^{-1}``
    (Cholesky solve), ``m_{t|T} = m_{t|t} + G_t (m_{t+1|T} - m_{t+1|t})`` and
    ``P_{t|T} = G_t P_{t+1|T} G_t^T + (I - G_t A) P_{t|t} (I - G_t A)^T + G_t Q G_t^T`` (Joseph-type form).
    ``parallel=True`` evaluates the same recursion by an associative scan (Särkkä & García-Fernández 2021).
    """
    f_mean, f_cov = result.filtered
    p_mean, p_cov = result.predicted
    batch, steps, n = f_mean.shape
    A = _param("A", A, (n, n), batch).to(f_mean.dtype)
    Q = _param("Q", Q, (n, n), batch).to(f_mean.dtype)
    with torch.autocast(f_mean.device.type, enabled=False):
        A_t, Q_t = _per_step(A, 2), _per_step(Q, 2)
        Lp = _cholesky(p_cov[:, 1:], "predicted covariance")
        G = torch.cholesky_solve(A_t @ f_cov[:, :-1], Lp).mT  # P_{t|t} A^T P_{t+1|t}^{-1}
        M = torch.eye(n, dtype=f_mean.dtype, device=f_mean.device) - G @ A_t
        E = torch.cat([G, torch.zeros_like(G[:, :1])], 1)
        g = torch.cat([f_mean[:, :-1] - _mv(G, p_mean[:, 1:]), f_mean[:, -1:]], 1)
        Lc = torch.cat([symmetrize(M @ f_cov[:, :-1] @ M.mT + G @ Q_t @ G.mT), f_cov[:, -1:]], 1)
        if parallel:
            flipped = _associative_scan(_smoothing_combine, tuple(x.flip(1) for x in (E, g, Lc)))
            return Gaussian(flipped[1].flip(1), flipped[2].flip(1))
        means, covs = [g[:, -1]], [Lc[:, -1]]
        for t in range(steps - 2, -1, -1):
            means.append(_mv(E[:, t], means[-1]) + g[:, t])
            covs.append(symmetrize(E[:, t] @ covs[-1] @ E[:, t].mT) + Lc[:, t])
        return Gaussian(torch.stack(means[::-1], 1), torch.stack(covs[::-1], 1))
