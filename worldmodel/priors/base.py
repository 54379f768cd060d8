"""The prior interface: what the objective, the WorldModel, evaluation and planning ask of a latent model.

A prior P_theta is the *alignment* dial of LDM (DESIGN section 1). Every prior is a `LatentPrior`:

    alignment(z, u, mask, target, R) -> scalar   <log P_theta(z)>_R per modelled term (the objective's term)
    project(z)                                    latents on the prior's support (where entropy is measured)
    min_steps, conditional, lr_multiplier         what the objective checks and how fast it learns
    action_dim                                    size of the controls u it uses (0: it ignores u)

A *state-space* prior (`StateSpacePrior`: a belief over a hidden state h_t that explains z_t) adds exact
inference, which `WorldModel.filter/step/imagine`, the k-step loss term, evaluation and planning use:

    init_belief(B) -> Gaussian (B, S)             belief of h_0 before the first frame
    filter(z, u, mask, R, target) -> FilterResult filtered / predicted beliefs (B, T, S), log-likelihood (B,)
    step(belief, z_t, u_t, mask_t, R_t)           one online predict + update
    rollout(belief, actions) -> Gaussian (B, H, S)  exact k-step state predictive
    candidate_rollout(belief, H) -> fn               the same for N candidate action sequences (B, N, H, a) (planning)
    predict_observation(belief, R) -> Gaussian    the latent's predictive N(C m, C P C^T + R)

Nothing outside a prior tests which prior it is: callers ask `isinstance(prior, StateSpacePrior)` (can it
filter?) or read the attributes above. A new prior is one new module in `worldmodel/priors/` and one row
of `worldmodel.priors.PRIORS`.
"""

from __future__ import annotations

from typing import Callable

from einops import rearrange
from torch import Tensor, nn

from worldmodel.distributed import rank_mean
from worldmodel.kalman import FilterResult, Gaussian

__all__ = ["LatentPrior", "StateSpacePrior"]


class LatentPrior(nn.Module):
    """Base class of the latent models P_theta (see the module docstring).

    Class attributes a subclass may change:
        conditional: the prior scores z_t given other latents, so the stop-gradient `plugin`
            entropy estimator applies (False for the factorized ICA prior).
        lr_multiplier: learning-rate multiplier of its parameters relative to the encoder
            (`LDMLoss.param_groups`); instances may override it.
        action_dim: size a of the controls u (B, T, a) that `alignment` uses; 0 = it ignores u.
    """

    conditional: bool = True
    lr_multiplier: float = 1.0
    action_dim: int = 0

    @property
    def min_steps(self) -> int:
        """Shortest sequence length T the prior can score."""
        return 1

    def project(self, z: Tensor) -> Tensor:
        """Latents (..., d) on the prior's support, where entropies are measured (identity by default)."""
        return z

    def alignment(self, z: Tensor, u: Tensor | None = None, mask: Tensor | None = None,
                  target: Tensor | None = None, R: Tensor | None = None) -> Tensor:
        """<log P_theta(z)> per modelled term, a scalar (not yet divided by d).

        z (B, T, d) latents (zeros at missing steps); u (B, T, a) controls, u[:, t] driving the transition
        into step t; mask (B, T) bool, True = observed; target (B, T, d) detached latents that replace z
        as the predicted quantity (stop-gradient plug-in / EMA target branch); R per-frame observation
        noise (state-space priors only).
        """
        raise NotImplementedError


class StateSpacePrior(LatentPrior):
    """A prior with a Gaussian belief over a hidden state h_t in R^S observed through z_t in R^L.

    Subclasses set `obs_dim` (L), `state_dim` (S), `action_dim` (a) and implement the inference methods;
    `alignment` (the one-step predictive log-likelihood per observed step) comes from `filter`.
    """

    obs_dim: int
    state_dim: int
    action_dim: int

    def init_belief(self, batch_size: int) -> Gaussian:
        """N(m0, P0) as mean (B, S), cov (B, S, S)."""
        raise NotImplementedError

    def filter(self, z: Tensor, u: Tensor | None = None, mask: Tensor | None = None, R: Tensor | None = None,
               target: Tensor | None = None) -> FilterResult:
        """Exact filtering of z (B, T, L); `target` replaces z in the likelihood term only."""
        raise NotImplementedError

    def step(self, belief: Gaussian, z_t: Tensor | None, u_t: Tensor | None = None, mask_t: Tensor | None = None,
             R_t: Tensor | None = None) -> Gaussian:
        """Predict with u_t (B, a), then update with z_t (B, L) (None: predict only)."""
        raise NotImplementedError

    def rollout(self, belief: Gaussian, actions: Tensor | int) -> Gaussian:
        """Exact k-step state beliefs (B, H, S) under actions (B, H, a) (or a horizon H: zero actions)."""
        raise NotImplementedError

    def predict_observation(self, belief: Gaussian, R: Tensor | None = None) -> Gaussian:
        """The latent's predictive distribution N(C m, C P C^T + R) over any leading dims of `belief`."""
        raise NotImplementedError

    def rollout_beliefs(self, belief: Gaussian, actions: Tensor) -> Gaussian:
        """`rollout` from N beliefs of each of B sequences: means (B, N, S), covs (B, N, S, S), or (1, N, S, S)
        when the batch shares them; actions (B, N, H, a) -> means (B, N, H, S), covs (B, N, H, S, S), or
        (1, N, H, S, S) from shared ones where the covariances depend on neither the means nor the actions
        (they broadcast against the means). By default: `rollout` on all B N beliefs."""
        batch, n = belief.mean.shape[:2]
        flat = Gaussian(rearrange(belief.mean, "b n s -> (b n) s"),
                        rearrange(belief.cov.expand(batch, -1, -1, -1), "b n s r -> (b n) s r"))
        states = self.rollout(flat, rearrange(actions, "b n h a -> (b n) h a"))
        return Gaussian(rearrange(states.mean, "(b n) h s -> b n h s", b=batch),
                        rearrange(states.cov, "(b n) h s r -> b n h s r", b=batch))

    def candidate_rollout(self, belief: Gaussian, horizon: int) -> Callable[[Tensor], Gaussian]:
        """For planning: a function that rolls N candidate action sequences (B, N, H, a) out from the beliefs
        (B, S) -> means (B, N, H, S), covs (B, N, H, S, S). A prior computes what does not depend on the actions
        once, here (the planner calls this once per control step and the function once per solver iteration); one
        whose covariances do not depend on the actions may return them once per belief, (B, 1, H, S, S).
        By default: `rollout` on every candidate."""
        def rollout(actions: Tensor) -> Gaussian:
            batch, n = actions.shape[:2]
            flat = Gaussian(belief.mean.repeat_interleave(n, 0),
                            belief.cov.expand(batch, -1, -1).repeat_interleave(n, 0))
            states = self.rollout(flat, actions.flatten(0, 1))
            return Gaussian(states.mean.unflatten(0, (batch, n)), states.cov.unflatten(0, (batch, n)))

        return rollout

    def alignment(self, z, u=None, mask=None, target=None, R=None) -> Tensor:
        """Sum of the one-step predictive log-likelihoods log N(z_t; C m_{t|t-1}, S_t) per observed step
        (under DDP per the ranks' mean count of observed steps: see `distributed.rank_mean`)."""
        return self.filtered_alignment(z, u, mask, target, R)[0]

    def filtered_alignment(self, z, u=None, mask=None, target=None, R=None) -> tuple[Tensor, FilterResult]:
        """`alignment` and the `filter` result it came from (whose beliefs do not depend on `target`), so that
        the k-step term reuses the beliefs instead of filtering again."""
        result = self.filter(z, u, mask, R, target)
        steps = z.shape[0] * z.shape[1] if mask is None else rank_mean(mask.sum())
        return result.log_likelihood.sum() / steps, result
