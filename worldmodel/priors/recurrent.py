"""RecurrentPrior: an autoregressive latent model, an LSTM over the past latents with a Gaussian conditional.

    P_theta(z_{1:T}) = prod_{t >= 2} N(z_t ; g_t, sigma^2 I),    g_t = x_{t-1} + W o_{t-1} + c,
    (o_t, s_t) = LSTM(x_t, (o_{t-1}, s_{t-1})),  x_t = z_t where observed, else g_t,  (o_0, s_0) = 0

The LSTM reads z_{<t} and g_t is its prediction of z_t (Mikulasch & Zenke 2026, the predictive model of their
nonlinear Eq. 16 experiment; `worldmodel.methods` preset ``predictive_knn`` with kNN entropy, F_MI). The marginal
of the first observed latent is flat (improper), as for the pair priors. Choices:

- Residual mean: the head W, c starts at zero, so the untrained prior is the plane prior z_t ~ N(z_{t-1}, sigma^2 I)
  (a slow-feature start); the LSTM learns the correction.
- One learned isotropic sigma (``sigma=None``, the default; a float fixes it). With it the objective is invariant to
  the scale of the latents: scaling z by c adds -d log c to the maximised alignment (sigma follows the error) and
  +d log c to the entropy, so no hand-picked sigma sets the latent scale. A *per-dimension* learned sigma would be
  exploitable: a sample-based estimator in d dimensions (kNN) barely notices one latent shrinking to a constant, while
  that latent's -log sigma_i grows without bound.
- Missing latents (mask False) are replaced by the prediction g_t (a predict-only step, as in the Kalman filter), so a
  model trained without masks runs on sequences with dropped frames; they are not scored.

It is a `LatentPrior`, not a `StateSpacePrior`: its belief over the future is not a Gaussian over a state, so
WorldModel.features reads out the encoder latents (as for the pair priors).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from worldmodel.priors.base import LatentPrior
from worldmodel.priors.pairs import masked_mean

__all__ = ["RecurrentPrior"]


class RecurrentPrior(LatentPrior):
    """z_t | z_{<t} ~ N(g_t, sigma^2 I), g from an LSTM over z_{<t} (see the module docstring).

    Args:
        dim: latent dimension d.
        hidden: LSTM width.
        sigma: fixed conditional std, or None to learn one isotropic std (initialised at 1).
        lr_multiplier: learning-rate multiplier of these parameters relative to the encoder.
    """

    def __init__(self, dim: int, hidden: int = 64, sigma: float | None = None, lr_multiplier: float = 1.0):
        super().__init__()
        if dim < 1 or hidden < 1:
            raise ValueError(f"dim and hidden must be >= 1, got dim={dim}, hidden={hidden}")
        if sigma is not None and not sigma > 0:
            raise ValueError(f"sigma must be positive or None (learned), got {sigma}")
        if not lr_multiplier > 0:
            raise ValueError(f"lr_multiplier must be positive, got {lr_multiplier}")
        self.dim, self.lr_multiplier = dim, float(lr_multiplier)
        self.cell = nn.LSTMCell(dim, hidden)
        self.head = nn.Linear(hidden, dim)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        log_sigma = torch.zeros(()) if sigma is None else torch.tensor(math.log(sigma))
        self.log_sigma = nn.Parameter(log_sigma, requires_grad=sigma is None)

    @property
    def min_steps(self) -> int:
        return 2

    def predict(self, z: Tensor, mask: Tensor | None = None) -> Tensor:
        """One-step predictions g (B, T, d) of z (B, T, d): g[:, t] from z[:, :t] (mask (B, T) bool, True = observed;
        missing latents are replaced by their prediction). g[:, 0] is the prediction from no past (not scored)."""
        batch = z.shape[0]
        state = (z.new_zeros(batch, self.cell.hidden_size), z.new_zeros(batch, self.cell.hidden_size))
        previous = torch.zeros_like(z[:, 0])
        means = []
        for t in range(z.shape[1]):
            mean = previous + self.head(state[0])
            x = z[:, t] if mask is None else torch.where(mask[:, t, None], z[:, t], mean)
            state = self.cell(x, state)
            means.append(mean)
            previous = x
        return torch.stack(means, 1)

    def log_prob(self, z: Tensor, mask: Tensor | None = None, target: Tensor | None = None) -> Tensor:
        """log N(target_t; g_t, sigma^2 I) (B, T) with g from z (`predict`); target defaults to z. Entries that are not
        scored (the first observed step and missing ones) are 0."""
        target = z if target is None else target
        variance = (2 * self.log_sigma).exp().to(z.dtype)
        sq = (target - self.predict(z, mask)).pow(2).sum(-1)
        log_density = -0.5 * sq / variance - 0.5 * z.shape[-1] * (math.log(2 * math.pi) + variance.log())
        return torch.where(self.scored(z, mask), log_density, torch.zeros((), dtype=log_density.dtype,
                                                                          device=log_density.device))

    @staticmethod
    def scored(z: Tensor, mask: Tensor | None = None) -> Tensor:
        """(B, T) bool: the steps that are scored, observed ones after the first observed one."""
        observed = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device) if mask is None else mask
        seen_before = torch.cumsum(observed, 1) - observed.long() > 0
        return observed & seen_before

    def alignment(self, z, u=None, mask=None, target=None, R=None) -> Tensor:
        """Mean of log P(target_t | z_{<t}) over the scored steps (u and R are ignored: no controls)."""
        return masked_mean(self.log_prob(z, mask, target), self.scored(z, mask))
