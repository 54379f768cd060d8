"""Entropy estimators H for the LDM objective (DESIGN section 1, "uniformity" dial).

Sample-based estimators take x (N, D), rows i.i.d. samples, and return a scalar entropy in nats
including all constants, so that they converge to the true differential entropy. The LDM loss
(`worldmodel.objective.ldm.LDMLoss`) applies them to the joint window of views (F_LDM) or to each view
separately (F_MI); `kde` takes the latent model's own log-kernel matrix (the InfoNCE denominator).
`sigreg` is the exception: a Gaussianity test statistic (a penalty, not an entropy; see its docstring).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from worldmodel.priors.pairs import pairwise_sq_dists

__all__ = ["logdet", "kde", "knn", "sigreg", "plugin", "jacobian"]


def _check_samples(x: Tensor, name: str, min_n: int) -> None:
    if x.dim() < 2:
        raise ValueError(f"{name}: x must be (..., N, D), got shape {tuple(x.shape)}")
    if x.shape[-2] < min_n:
        raise ValueError(f"{name}: needs at least {min_n} samples, got N={x.shape[-2]}")


def logdet(x: Tensor, eps: float = 1e-4) -> Tensor:
    """Gaussian plug-in entropy of x (..., N, D) -> (...): H = 1/2 logdet(Cov + eps I) + D/2 log(2 pi e).

    Cov is the unbiased sample covariance (leading dims are independent sample sets). Exact for a
    Gaussian as N -> inf (bias O(D^2/N)).
    VICReg's variance/covariance terms are its second-order Taylor expansion around Cov = I
    (Bardes et al. 2022, "VICReg", ICLR; Mikulasch & Zenke 2026, LDM, arXiv 2605.03517).
    """
    _check_samples(x, "logdet", 2)
    n, d = x.shape[-2:]
    xc = x - x.mean(dim=-2, keepdim=True)
    cov = xc.transpose(-1, -2) @ xc / (n - 1) + eps * torch.eye(d, dtype=x.dtype, device=x.device)
    chol, info = torch.linalg.cholesky_ex(cov)
    if bool(info.any()):  # singular without eps: fall back to the LU route
        log_det = torch.linalg.slogdet(cov)[1]
    else:
        log_det = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * log_det + 0.5 * d * math.log(2 * math.pi * math.e)


def kde(log_kernel: Tensor, exclude_self: bool = False) -> Tensor:
    """Kernel density (resubstitution) entropy from a log-kernel matrix (..., N, M):

        H = -1/N sum_i log( 1/|J_i| sum_{j in J_i} k(x_i, y_j) ),   log k = log_kernel,

    J_i = the finite entries of row i (-inf marks excluded pairs; rows without any are skipped);
    `exclude_self` (square matrices) removes the diagonal (leave-one-out). Leading dims are extra
    rows (the mean runs over all of them). With a normalised kernel (e.g. Gaussian, bandwidth h) this
    converges to the true entropy; with the unnormalised vMF kernel exp(beta x^T y) (bandwidth
    1/beta) it is minus the InfoNCE / NT-Xent denominator up to the constant log|J_i|
    (Oord et al. 2018, "CPC"; Chen et al. 2020, "SimCLR"; Wang & Isola 2020).
    """
    if log_kernel.dim() < 2:
        raise ValueError(f"kde: log_kernel must be (..., N, M), got shape {tuple(log_kernel.shape)}")
    if exclude_self:
        n, m = log_kernel.shape[-2:]
        if n != m:
            raise ValueError(f"kde: exclude_self needs square matrices, got {tuple(log_kernel.shape)}")
        eye = torch.eye(n, dtype=torch.bool, device=log_kernel.device)
        log_kernel = log_kernel.masked_fill(eye, -math.inf)
    count = torch.isfinite(log_kernel).sum(dim=-1)
    rows = count > 0
    if not bool(rows.any()):
        raise ValueError("kde: no row has a kernel centre")
    log_density = torch.logsumexp(log_kernel[rows], dim=-1) - count[rows].to(log_kernel.dtype).log()
    return -log_density.mean()


def knn(x: Tensor, k: int = 3, clip_quantile: float | None = None) -> Tensor:
    """Kozachenko-Leonenko k-nearest-neighbour entropy of x (..., N, D) -> (...):

        H = psi(N) - psi(k) + log V_D + D/N sum_i log eps_i,   V_D = pi^(D/2) / Gamma(D/2 + 1),

    eps_i = Euclidean distance of x_i to its k-th nearest neighbour (Kozachenko & Leonenko 1987;
    Kraskov et al. 2004, eq. 20). Consistent for any density. `clip_quantile` (e.g. 0.9, the paper's
    kalman_knn training variant) clips eps_i at that quantile of the batch's eps (no gradient
    beyond it), which keeps outliers from dominating the gradient; it biases the value downwards.
    """
    _check_samples(x, "knn", k + 1)
    n, d = x.shape[-2:]
    xc = x - x.mean(dim=-2, keepdim=True).detach()
    sq = pairwise_sq_dists(xc, xc)
    sq = sq.masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), math.inf)
    sq_k = sq.topk(k, dim=-1, largest=False).values[..., -1]
    log_eps = 0.5 * sq_k.clamp_min(torch.finfo(x.dtype).tiny ** 0.5).log()
    if clip_quantile is not None:
        log_eps = torch.minimum(log_eps, torch.quantile(log_eps.detach(), clip_quantile, dim=-1, keepdim=True))
    log_unit_ball = 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)
    digamma = torch.special.digamma(torch.tensor([float(n), float(k)], dtype=torch.float64)).tolist()
    return digamma[0] - digamma[1] + log_unit_ball + d * log_eps.mean(-1)


def sigreg(x: Tensor, num_projections: int = 1024, knots: int = 17,
           generator: torch.Generator | None = None) -> Tensor:
    """SIGReg, LeWorldModel's Gaussianity regulariser, of x (..., N, D) -> (...) (dimensionless, not nats).

    The Epps-Pulley statistic of M = `num_projections` random 1-D projections h_m = x a_m, averaged:

        SIGReg = 1/M sum_m  N sum_k w_k |phi_N(t_k; h_m) - exp(-t_k^2 / 2)|^2 exp(-t_k^2 / 2),
        phi_N(t; h) = 1/N sum_i exp(i t h_i) = <cos t h> + i <sin t h>   (empirical characteristic function)

    on K = `knots` points t_k = 3 k / (K - 1) with trapezoid weights w_k = dt (1, 2, ..., 2, 1),
    dt = 3 / (K - 1): by the symmetry |phi_N(-t) - phi(-t)| = |phi_N(t) - phi(t)| this is the trapezoid
    rule of N * integral_{-3}^{3} |phi_N(t) - phi(t)|^2 exp(-t^2/2) dt (Epps & Pulley 1983). The directions
    a_m are the columns of a standard normal (D, M) matrix normalised to unit length, drawn anew on every
    call (from `generator` if given, else the global RNG) on x's device and dtype; leading dims of x share
    them. This is the published code (Maes et al. 2026, "LeWorldModel", arXiv 2603.19312;
    github.com/lucas-maes/le-wm, module.py `SIGReg`: knots=17, num_proj=1024, t in [0, 3], cos and sin
    parts, the factor N = batch size, mean over projections; after LeJEPA's SIGReg, Balestriero & LeCun
    2025, arXiv 2511.08544).

    Under x ~ N(0, I) its expectation is the same rule applied to (1 - exp(-t^2)), 1.052 for every N; for
    any other distribution it grows like N (Cramer-Wold: every 1-D marginal is N(0, 1) iff x ~ N(0, I)).

    Relation to the LDM objective: SIGReg is not an entropy estimate but a penalty toward N(0, I).
    For x ~ p with mean m and covariance C, H[p] = H[N(m, C)] - KL[p || N(m, C)], so at fixed covariance
    maximising the entropy is minimising the divergence from the Gaussian of the same moments, and N(0, I)
    is the maximum-entropy law among those with E|x|^2 = D; SIGReg measures a distance (a weighted L2
    distance of characteristic functions, not the KL) of every 1-D marginal from N(0, 1), and so plays the
    role of the uniformity term with a weight lambda: `LDMLoss(entropy="sigreg")` uses
    H := -lambda * D * SIGReg(x), which the loss's division per dimension turns into the entropy term
    -lambda * SIGReg (see `objective.ldm`).
    """
    _check_samples(x, "sigreg", 1)
    if num_projections < 1 or knots < 2:
        raise ValueError(f"sigreg: needs num_projections >= 1 and knots >= 2, got {num_projections}, {knots}")
    n, d = x.shape[-2:]
    directions = torch.randn(d, num_projections, generator=generator, device=x.device, dtype=x.dtype)
    directions = directions / directions.norm(dim=0)
    t = torch.linspace(0, 3, knots, device=x.device, dtype=x.dtype)
    target = torch.exp(-0.5 * t.square())  # the N(0, 1) characteristic function, also the window
    weights = torch.full_like(t, 2 * 3 / (knots - 1))
    weights[[0, -1]] = 3 / (knots - 1)
    phase = (x @ directions)[..., None] * t  # (..., N, M, K)
    error = (phase.cos().mean(-3) - target).square() + phase.sin().mean(-3).square()  # (..., M, K)
    return n * (error @ (weights * target)).mean(-1)


def plugin(z: Tensor, target: Tensor | None = None) -> Tensor:
    """Stop-gradient conditional-entropy plug-in: returns the target latents SG[target or z].

    H[z' | z] is estimated by the model's own cross-entropy -<log P(SG[z'] | z)>. Its gradient
    w.r.t. the target cancels the alignment's, so F = <log P(z'|z)> + H_plugin has the value 0 and
    the gradient of <log P(SG[z'] | z)>: the encoder learns only through the context/predictor
    branch (BYOL, Grill et al. 2020; SimSiam, Chen & He 2021; JEPA, Assran et al. 2023; the Kalman
    stop-gradient model, Mikulasch & Zenke 2026). With `target` (an EMA encoder's latents) it is
    BYOL's target network.
    """
    return (z if target is None else target).detach()


def jacobian(weight: Tensor) -> Tensor:
    """Entropy change of an invertible linear encoder z = W x: H[z] = H[x] + log|det W|.

    Returns log|det W| (the data entropy H[x] is a constant); with a factorized latent model
    this is maximum-likelihood ICA (Bell & Sejnowski 1995, Infomax; Hyvarinen & Oja 2000).
    """
    if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
        raise ValueError(f"jacobian: weight must be square (d, d), got shape {tuple(weight.shape)}")
    return torch.linalg.slogdet(weight)[1]
