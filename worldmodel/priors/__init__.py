"""Latent models P_theta behind one interface (`base.LatentPrior`; state-space priors: `base.StateSpacePrior`).

    kalman      linear_gaussian.KalmanLatentModel   linear-Gaussian state space, exact Kalman filtering
    locally_linear  locally_linear.LocallyLinearPrior   mixture of K linear systems weighted by the belief mean,
                                                    assumed-density (locally linearised) Kalman filtering
    plane       pairs.plane                         z' ~ N(z, sigma^2 I)
    sphere      pairs.sphere                        von Mises-Fisher on the unit sphere
    predictor   pairs.predictor                     z' ~ N(g(z), sigma^2 I) (or vMF / bilinear critic)
    action_predictor  pairs.action_predictor        z_{t+1} ~ N(g(z_t, u_{t+1}), sigma^2 I): the predictor with actions
    factorized  factorized.factorized               independent non-Gaussian sources (ICA)
    recurrent   recurrent.RecurrentPrior            z_t ~ N(g(z_{<t}), sigma^2 I), g an LSTM over the past latents

`PRIORS` maps a name to its builder; a builder whose first parameter is `dim` (or `obs_dim`) receives the
latent dimension. Adding a prior: one module here and one row in `PRIORS` (then a preset row in
`worldmodel.methods.PRESETS`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from worldmodel.priors.base import LatentPrior, StateSpacePrior
from worldmodel.priors.factorized import FactorizedPrior, factorized
from worldmodel.priors.linear_gaussian import CholeskyCovariance, KalmanLatentModel, spectral_radius_upper_bound
from worldmodel.priors.locally_linear import LocallyLinearPrior
from worldmodel.priors.pairs import TransitionPrior, action_predictor, plane, predictor, sphere
from worldmodel.priors.recurrent import RecurrentPrior

__all__ = [
    "PRIORS", "build_prior", "prior_options", "LatentPrior", "StateSpacePrior", "KalmanLatentModel",
    "LocallyLinearPrior", "CholeskyCovariance", "spectral_radius_upper_bound", "TransitionPrior", "FactorizedPrior",
    "RecurrentPrior",
    "plane", "sphere", "predictor", "action_predictor", "factorized",
]

PRIORS: dict[str, Callable[..., LatentPrior]] = {
    "kalman": KalmanLatentModel,
    "locally_linear": LocallyLinearPrior,
    "plane": plane,
    "sphere": sphere,
    "predictor": predictor,
    "action_predictor": action_predictor,
    "factorized": factorized,
    "recurrent": RecurrentPrior,
}
_DIM_NAMES = ("dim", "obs_dim")


def _parameters(name: str) -> list[inspect.Parameter]:
    if name not in PRIORS:
        raise ValueError(f"unknown prior {name!r}; valid: {sorted(PRIORS)}")
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p for p in inspect.signature(PRIORS[name]).parameters.values() if p.kind not in kinds]


def prior_options(name: str) -> set[str]:
    """The keyword options of prior `name` (everything its builder takes besides the dimension)."""
    return {p.name for p in _parameters(name) if p.name not in _DIM_NAMES}


def build_prior(name: str, dim: int, **options) -> LatentPrior:
    """Prior `name` for latents of dimension `dim`, with `options` of `prior_options(name)`."""
    takes_dim = any(p.name in _DIM_NAMES for p in _parameters(name))
    return PRIORS[name](dim, **options) if takes_dim else PRIORS[name](**options)
