"""The one exact k-step predictive of the project, used by the k-step loss term, evaluation and plots.

From every filtered belief N(m_{t|t}, P_{t|t}) of a state-space prior, the prior's own `rollout` and
`predict_observation` give, without sampling, the predictive distribution of the latent k steps ahead,
N(C m_{t+k|t}, C P_{t+k|t} C^T + R), k = 1..H.
"""

from __future__ import annotations

import torch
from torch import Tensor

from worldmodel.distributed import rank_mean
from worldmodel.kalman import Gaussian
from worldmodel.priors.base import StateSpacePrior

__all__ = ["kstep_predictive", "multistep_log_likelihood"]


def kstep_predictive(prior: StateSpacePrior, filtered: Gaussian, u: Tensor | None, starts: Tensor, horizon: int,
                     R: Tensor | None = None) -> tuple[Gaussian, Tensor, Tensor]:
    """Latent predictives of steps t + 1 .. t + H from the filtered beliefs of the steps t in `starts`.

    Args:
        prior: the state-space prior that filtered.
        filtered: filtered state beliefs, mean (B, T, S) and cov (B, T, S, S).
        u: controls (B, T, a), u[:, t] driving the transition into step t, or None (zero actions).
        starts: (N,) int steps t whose beliefs predict (on any device: the outputs are on the beliefs').
        horizon: H.
        R: per-frame observation noise (B, T, L) or (B, T, L, L) of the predicted steps, or None (the
            prior's own).
    Returns:
        prediction: Gaussian with mean (B, N, H, L), cov (B, N, H, L, L), or (1, N, H, L, L) (broadcasting
            against the means) where the batch shares its covariances and the prior's predicted ones depend
            on neither the means nor the actions (`StateSpacePrior.rollout_beliefs`);
        times: (N, H) the predicted steps t + k, clamped to T - 1;
        valid: (N, H) bool, t + k < T (clamped steps are predicted but must not be scored).
    """
    batch, steps = filtered.mean.shape[:2]
    starts = starts.to(filtered.mean.device)
    times = starts[:, None] + torch.arange(1, horizon + 1, device=starts.device)
    valid = times < steps
    times = times.clamp(max=steps - 1)
    shared = batch > 1 and filtered.cov.stride(0) == 0  # one covariance per step for the batch (fully observed)
    cov = filtered.cov[:1 if shared else batch, starts]
    if u is None:
        controls = filtered.mean.new_zeros(batch, len(starts), horizon, prior.action_dim)
    else:
        controls = u[:, times]
    noise = None if R is None else R[:, times]
    prediction = prior.predict_observation(prior.rollout_beliefs(Gaussian(filtered.mean[:, starts], cov), controls),
                                           noise)
    return prediction, times, valid


def multistep_log_likelihood(prior: StateSpacePrior, z: Tensor, target: Tensor, horizon: int,
                             u: Tensor | None = None, mask: Tensor | None = None,
                             R: Tensor | None = None, filtered: Gaussian | None = None) -> Tensor:
    """Mean over t and k = 2..H of log N(target_{t+k}; C m_{t+k|t}, C P_{t+k|t} C^T + R), per latent dimension.

    The exact k-step predictive from every filtered belief (latent overshooting, Hafner et al. 2019, with
    the stop-gradient target of the plug-in). It fits the long-horizon predictive spread of a misspecified
    linear model, which the one-step likelihood alone leaves too narrow. z, target (B, T, L); u (B, T, a);
    mask (B, T) bool, True = observed (missing steps are neither filtered nor scored); filtered: the filtered
    beliefs of z (B, T, S) where the caller has them (the objective's alignment filter), else z is filtered
    here. Under DDP the mean is over the ranks' mean count of scored terms (`distributed.rank_mean`).
    """
    batch, steps, dim = z.shape
    horizon = min(horizon, steps - 1)
    if horizon < 2:
        return z.new_zeros(())
    if filtered is None:
        filtered = prior.filter(z, u, mask, R).filtered
    starts = torch.arange(steps - 2, device=z.device)  # beliefs with at least 2 steps ahead
    pred, times, valid = kstep_predictive(prior, filtered, u, starts, horizon, R)
    valid = valid.expand(batch, -1, -1) if mask is None else valid & mask[:, times]
    later = Gaussian(pred.mean[:, :, 1:], pred.cov[:, :, 1:])  # k >= 2
    log_likelihood = later.log_prob(target[:, times[:, 1:]].to(later.mean.dtype))
    valid = valid[:, :, 1:]
    return (log_likelihood * valid).sum() / rank_mean(valid.sum()).clamp_min(1) / dim
