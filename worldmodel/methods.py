"""Method presets: name -> LDMLoss on the two dials (prior P_theta, entropy estimator H).

| preset          | latent model                        | entropy                      | F    |
|-----------------|-------------------------------------|------------------------------|------|
| kalman          | KalmanLatentModel, whitened latents | plugin (stop-gradient target) | LDM  |
| kalman_knn      | KalmanLatentModel                   | knn (k=3, clip at 90 % quantile) | MI |
| kalman_logdet   | KalmanLatentModel                   | logdet over windows of 2     | LDM  |
| kalman_ll       | LocallyLinearPrior (K=8 bases), whitened latents | plugin (stop-gradient target) | LDM |
| vicreg          | plane (sigma=1)                     | logdet                       | MI   |
| vicreg_ldm      | plane (sigma=1)                     | logdet of the joint (z, z')  | LDM  |
| vicreg_original | official VICReg loss 25/25/1 on consecutive pairs | (variance + covariance terms) | - |
| simclr          | sphere (beta = 1/temperature = 10)  | kde (NT-Xent denominator)    | MI   |
| cpc             | bilinear predictor, steps=1         | kde (InfoNCE denominator)    | MI   |
| byol            | MLP predictor, vMF (beta=2)         | plugin, EMA target 0.996     | LDM  |
| simsiam         | MLP predictor, vMF (beta=2)         | plugin (stop-gradient)       | LDM  |
| jepa            | MLP predictor on context, Gaussian  | plugin, EMA target 0.996     | LDM  |
| ica             | factorized (logistic sources)       | jacobian (linear encoder)    | LDM  |
| lewm            | MLP predictor g(z_t, a_t), sigma^2 = 1/2 | sigreg (lambda = 0.09), per frame | MI |
| predictive_knn  | RecurrentPrior (LSTM over z_{<t}, learned sigma) | knn (k=3, clip at 90 % quantile) | MI |

kalman_ll is the kalman row with a locally-linear prior (A(m) = sum_k alpha_k(m) A_k, alpha a softmax of a small
MLP of the belief mean; assumed-density filtering), for dynamics a linear latent model cannot represent; its
options: num_bases, hidden, detach_alpha, planning_cov. The Kalman presets (kalman_ll too) also fit the exact k-step
predictive (multistep_horizon=10, weight 3).

`make(name, dim, **overrides)` forwards overrides to the prior (e.g. sigma, beta, kind, hidden, steps,
source, action_predictor's or KalmanLatentModel's action_dim, state_dim, lr_multiplier, ...), to the estimator
(eps; k, clip_quantile; weight, num_projections, knots, seed) and to LDMLoss (entropy, mi, window, target_ema,
encoder, gather, latent_norm, multistep_horizon, multistep_weight). The loss trains on its own:

    loss_fn = make("kalman", 8)
    opt = torch.optim.Adam([{"params": encoder.parameters(), "lr": lr}, *loss_fn.param_groups(lr)])

A preset is one row of PRESETS: a prior of `worldmodel.priors.PRIORS`, an estimator, and their options.

lewm is LeWorldModel (Maes et al. 2026, arXiv 2603.19312; github.com/lucas-maes/le-wm, train.py): loss =
mean((g(z_t, a_t) - z_{t+1})^2) + lambda * SIGReg, SIGReg per frame over the batch and averaged over frames. With
sigma^2 = 1/2 the alignment per dimension is -MSE - 1/2 log(pi), so its LDM loss is exactly that loss + 1/2 log(pi).
LeWM's predictor is a causal transformer over a history of 3 latents; here it is Markov (an MLP of z_t and a_t,
option action_dim, zero actions when none are given: image SSL on pairs). Its options: sigma, hidden, kind, steps;
sigreg's weight, num_projections, knots, seed (see `objective.ldm`).

The paper's 8-combination ablation (plane/sphere x logdet/kde x LDM/MI) is
make("vicreg" | "simclr", dim, entropy="logdet" | "kde", mi=False | True). Pair presets model
z_1 -> z_2; the symmetrised BYOL/SimSiam loss is the mean of loss(z, target=t) and
loss(z.flip(1), target=t.flip(1)).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from worldmodel.distributed import gather
from worldmodel.objective.ldm import ESTIMATOR_OPTIONS, LDMLoss
from worldmodel.priors import build_prior, prior_options
from worldmodel.priors.pairs import masked_mean

__all__ = ["make", "Preset", "PRESETS", "VICRegLoss"]


@dataclass(frozen=True)
class Preset:
    """One method: a prior, an entropy estimator and their options.

    estimator_kwargs belong to the estimator (its options, window, target_ema, latent_norm) and are dropped
    when `make` is given another `entropy`; objective_kwargs (the k-step term) stay. `encoder="linear"`:
    the entropy term needs an invertible linear encoder (`make(..., encoder=module)`; WorldModel builds one).
    """

    prior: str  # a row of worldmodel.priors.PRIORS
    entropy: str | None
    mi: bool = False
    prior_kwargs: dict = field(default_factory=dict)
    estimator_kwargs: dict = field(default_factory=dict)
    objective_kwargs: dict = field(default_factory=dict)
    encoder: str = "any"
    loss: type = LDMLoss


_MULTISTEP = {"multistep_horizon": 10, "multistep_weight": 3.0}


class VICRegLoss(LDMLoss):
    """The official VICReg loss (Bardes, Ponce & LeCun 2022, ICLR; facebookresearch/vicreg
    main_vicreg.py), for comparison with the LDM presets. Over the pairs of consecutive latents
    (x, y) = (z_t, z_{t+1}) with both observed (for T = 2: the two views):

        invariance = mean((x - y)^2)                                   (per rank, like the original)
        variance   = mean(relu(1 - sqrt(Var x + 1e-4))) / 2 + same for y   (unbiased Var)
        covariance = sum_{i != j} Cov(x)_ij^2 / d + same for y           (Cov with 1 / (N - 1))
        loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance   (25/25/1)

    variance and covariance use the batch gathered over ranks, as the original. Reported as
    alignment = -sim_coeff * invariance, entropy = -(std_coeff * variance + cov_coeff * covariance).
    """

    def __init__(self, prior, *, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                 cov_coeff: float = 1.0, gather: bool = True, dim: int | None = None):
        super().__init__(prior, None, gather=gather, dim=dim)
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff

    def _terms(self, z, u, mask, target, R) -> tuple[Tensor, Tensor, None]:
        x, y = z[:, :-1].flatten(0, 1), z[:, 1:].flatten(0, 1)
        both = None if mask is None else (mask[:, :-1] & mask[:, 1:]).flatten()
        if both is None:
            invariance = F.mse_loss(x, y)
        else:  # the mean over observed pairs (of all ranks, under DDP)
            invariance = masked_mean((x - y).pow(2).mean(-1), both)
        if self.gather:  # all pairs of every rank (equal shapes), then the observed ones
            x, y = gather(x), gather(y)
            both = None if both is None else gather(both.to(torch.uint8)).bool()
        if both is not None:
            x, y = x[both], y[both]
        if x.shape[0] < 2:
            raise ValueError("vicreg_original needs at least 2 observed pairs in a batch")
        variance = _hinge_std(x) / 2 + _hinge_std(y) / 2
        covariance = _off_diagonal_cov(x) + _off_diagonal_cov(y)
        return -self.sim_coeff * invariance, -(self.std_coeff * variance + self.cov_coeff * covariance), None


PRESETS: dict[str, Preset] = {
    "kalman": Preset("kalman", "plugin", estimator_kwargs={"latent_norm": "whiten"}, objective_kwargs=_MULTISTEP),
    "kalman_knn": Preset("kalman", "knn", mi=True, estimator_kwargs={"k": 3, "clip_quantile": 0.9},
                         objective_kwargs=_MULTISTEP),
    "kalman_logdet": Preset("kalman", "logdet", estimator_kwargs={"window": 2}, objective_kwargs=_MULTISTEP),
    "kalman_ll": Preset("locally_linear", "plugin", estimator_kwargs={"latent_norm": "whiten"},
                        objective_kwargs=_MULTISTEP),
    "vicreg": Preset("plane", "logdet", mi=True),
    "vicreg_ldm": Preset("plane", "logdet"),
    "vicreg_original": Preset("plane", None, loss=VICRegLoss),
    "simclr": Preset("sphere", "kde", mi=True, prior_kwargs={"beta": 10.0}),
    "cpc": Preset("predictor", "kde", mi=True, prior_kwargs={"kind": "bilinear"}),
    "byol": Preset("predictor", "plugin", prior_kwargs={"beta": 2.0}, estimator_kwargs={"target_ema": 0.996}),
    "simsiam": Preset("predictor", "plugin", prior_kwargs={"beta": 2.0}),
    "jepa": Preset("predictor", "plugin", estimator_kwargs={"target_ema": 0.996}),
    "ica": Preset("factorized", "jacobian", encoder="linear"),
    "lewm": Preset("action_predictor", "sigreg", mi=True, prior_kwargs={"sigma": math.sqrt(0.5)}),
    "predictive_knn": Preset("recurrent", "knn", mi=True, estimator_kwargs={"k": 3, "clip_quantile": 0.9}),
}


def _loss_options(loss: type) -> set[str]:
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    params = inspect.signature(loss).parameters.values()
    return {p.name for p in params if p.kind not in kinds} - {"prior", "entropy", "entropy_kwargs", "dim"}


def make(name: str, dim: int, **overrides) -> LDMLoss:
    """The LDMLoss of preset `name` for latents of dimension `dim` (see the module table).

    e.g. make("kalman", dim=8, action_dim=1), make("simclr", 128, beta=2.0),
    make("vicreg", 64, entropy=None)  # no entropy term: collapses (ablation)
    """
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; valid: {sorted(PRESETS)}")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    preset = PRESETS[name]
    loss_options = _loss_options(preset.loss)
    if preset.loss is not LDMLoss:  # a loss of its own (vicreg_original): only its options
        _reject_unknown(name, overrides, loss_options)
        return preset.loss(build_prior(preset.prior, dim, **preset.prior_kwargs), dim=dim, **overrides)
    entropy = overrides.pop("entropy", preset.entropy)
    model_options = prior_options(preset.prior)
    estimator_options = ESTIMATOR_OPTIONS.get(entropy, set())
    _reject_unknown(name, overrides, model_options | estimator_options | loss_options)

    prior_kwargs = {**preset.prior_kwargs, **{k: v for k, v in overrides.items() if k in model_options}}
    prior = build_prior(preset.prior, dim, **prior_kwargs)
    # the preset's estimator options belong to its estimator: another estimator starts from scratch
    own = {**preset.estimator_kwargs, "mi": preset.mi} if entropy == preset.entropy else {}
    options = {**preset.objective_kwargs, **own, **{k: v for k, v in overrides.items() if k not in model_options}}
    entropy_kwargs = {k: options.pop(k) for k in list(options) if k in estimator_options}
    return LDMLoss(prior, entropy, entropy_kwargs=entropy_kwargs, dim=dim, **options)


def _reject_unknown(name: str, overrides: dict, valid: set[str]) -> None:
    unknown = set(overrides) - valid
    if unknown:
        raise ValueError(f"unknown override(s) {sorted(unknown)} for method {name!r}; valid: {sorted(valid)}")


def _hinge_std(x: Tensor) -> Tensor:
    return F.relu(1 - torch.sqrt(x.var(dim=0) + 1e-4)).mean()


def _off_diagonal_cov(x: Tensor) -> Tensor:
    n, d = x.shape
    xc = x - x.mean(dim=0)
    cov = xc.T @ xc / (n - 1)
    return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / d
