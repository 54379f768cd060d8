"""Method presets: name -> LDMLoss on the two dials (latent model P_theta, entropy estimator H).

| preset          | latent model                        | entropy                      | F    |
|-----------------|-------------------------------------|------------------------------|------|
| kalman          | KalmanLatentModel                   | plugin (stop-gradient target) | LDM  |
| kalman_knn      | KalmanLatentModel                   | knn (k=3, clip at 90 % quantile) | MI |
| kalman_logdet   | KalmanLatentModel                   | logdet over windows of 2     | LDM  |
| vicreg          | plane (sigma=1)                     | logdet                       | MI   |
| vicreg_ldm      | plane (sigma=1)                     | logdet of the joint (z, z')  | LDM  |
| vicreg_original | official VICReg loss 25/25/1        | (variance + covariance terms) | -   |
| simclr          | sphere (beta = 1/temperature = 10)  | kde (NT-Xent denominator)    | MI   |
| cpc             | bilinear predictor, steps=1         | kde (InfoNCE denominator)    | MI   |
| byol            | MLP predictor, vMF (beta=2)         | plugin, EMA target 0.996     | LDM  |
| simsiam         | MLP predictor, vMF (beta=2)         | plugin (stop-gradient)       | LDM  |
| jepa            | MLP predictor on context, Gaussian  | plugin, EMA target 0.996     | LDM  |
| ica             | factorized (logistic sources)       | jacobian (linear encoder)    | LDM  |

`make(name, dim, **overrides)` forwards overrides to the latent model (e.g. sigma, beta, kind,
hidden, steps, source, or KalmanLatentModel's action_dim, state_dim, ...), to the estimator (eps;
k, clip_quantile) and to LDMLoss (entropy, mi, window, target_ema, encoder, gather).

The paper's 8-combination ablation (plane/sphere x logdet/kde x LDM/MI) is
make("vicreg" | "simclr", dim, entropy="logdet" | "kde", mi=False | True). Pair presets model
z_1 -> z_2; the symmetrised BYOL/SimSiam loss is the mean of loss(z, target=t) and
loss(z.flip(1), target=t.flip(1)).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from worldmodel.distributed import gather
from worldmodel.latent_models import KalmanLatentModel, factorized, plane, predictor, sphere
from worldmodel.ldm import ESTIMATOR_OPTIONS, LDMLoss, LossOutput

__all__ = ["make", "PRESETS", "VICRegLoss"]


@dataclass(frozen=True)
class Preset:
    model: str  # kalman | plane | sphere | predictor | factorized
    entropy: str | None
    mi: bool = False
    model_kwargs: dict = field(default_factory=dict)
    loss_kwargs: dict = field(default_factory=dict)


PRESETS: dict[str, Preset | None] = {
    "kalman": Preset("kalman", "plugin"),
    "kalman_knn": Preset("kalman", "knn", mi=True, loss_kwargs={"k": 3, "clip_quantile": 0.9}),
    "kalman_logdet": Preset("kalman", "logdet", loss_kwargs={"window": 2}),
    "vicreg": Preset("plane", "logdet", mi=True),
    "vicreg_ldm": Preset("plane", "logdet"),
    "vicreg_original": None,  # VICRegLoss
    "simclr": Preset("sphere", "kde", mi=True, model_kwargs={"beta": 10.0}),
    "cpc": Preset("predictor", "kde", mi=True, model_kwargs={"kind": "bilinear"}),
    "byol": Preset("predictor", "plugin", model_kwargs={"beta": 2.0}, loss_kwargs={"target_ema": 0.996}),
    "simsiam": Preset("predictor", "plugin", model_kwargs={"beta": 2.0}),
    "jepa": Preset("predictor", "plugin", loss_kwargs={"target_ema": 0.996}),
    "ica": Preset("factorized", "jacobian"),
}

_MODEL_FACTORIES = {"plane": plane, "sphere": sphere, "predictor": predictor, "factorized": factorized}
_LOSS_OPTIONS = {"entropy", "mi", "window", "target_ema", "encoder", "gather"}


def _model_options(model: str) -> set[str]:
    factory = KalmanLatentModel if model == "kalman" else _MODEL_FACTORIES[model]
    skip = {"self", "dim", "obs_dim"}
    params = inspect.signature(factory).parameters.values()
    return {p.name for p in params if p.name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def make(name: str, dim: int, **overrides) -> LDMLoss:
    """The LDMLoss of preset `name` for latents of dimension `dim` (see the module table).

    e.g. make("kalman", dim=8, action_dim=1), make("simclr", 128, beta=2.0),
    make("vicreg", 64, entropy=None)  # no entropy term: collapses (ablation)
    """
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; valid: {sorted(PRESETS)}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    preset = PRESETS[name]
    if preset is None:
        valid = {"sim_coeff", "std_coeff", "cov_coeff", "gather"}
        _reject_unknown(name, overrides, valid)
        return VICRegLoss(dim=dim, **overrides)
    entropy = overrides.pop("entropy", preset.entropy)
    model_options = _model_options(preset.model)
    estimator_options = ESTIMATOR_OPTIONS.get(entropy, set())
    _reject_unknown(name, overrides, model_options | estimator_options | _LOSS_OPTIONS - {"entropy"})

    model_kwargs = {**preset.model_kwargs, **{k: v for k, v in overrides.items() if k in model_options}}
    if preset.model == "kalman":
        latent_model = KalmanLatentModel(dim, **model_kwargs)
    elif preset.model == "predictor":
        latent_model = predictor(dim, **model_kwargs)
    else:
        latent_model = _MODEL_FACTORIES[preset.model](**model_kwargs)

    # the preset's loss defaults belong to its estimator: another estimator starts from scratch
    defaults = {**preset.loss_kwargs, "mi": preset.mi} if entropy == preset.entropy else {}
    options = {**defaults, **{k: v for k, v in overrides.items() if k not in model_options}}
    entropy_kwargs = {k: options.pop(k) for k in list(options) if k in estimator_options}
    return LDMLoss(latent_model, entropy, entropy_kwargs=entropy_kwargs, dim=dim, **options)


def _reject_unknown(name: str, overrides: dict, valid: set[str]) -> None:
    unknown = set(overrides) - valid
    if unknown:
        raise ValueError(f"unknown override(s) {sorted(unknown)} for method {name!r}; valid: {sorted(valid)}")


class VICRegLoss(LDMLoss):
    """The official VICReg loss (Bardes, Ponce & LeCun 2022, ICLR; facebookresearch/vicreg
    main_vicreg.py), for comparison with the LDM presets. For z (B, 2, d), x = z[:, 0], y = z[:, 1]:

        invariance = mean((x - y)^2)                                   (per rank, like the original)
        variance   = mean(relu(1 - sqrt(Var x + 1e-4))) / 2 + same for y   (unbiased Var)
        covariance = sum_{i != j} Cov(x)_ij^2 / d + same for y           (Cov with 1 / (N - 1))
        loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance   (25/25/1)

    variance and covariance use the batch gathered over ranks, as the original. Reported as
    alignment = -sim_coeff * invariance, entropy = -(std_coeff * variance + cov_coeff * covariance).
    """

    def __init__(
        self,
        sim_coeff: float = 25.0,
        std_coeff: float = 25.0,
        cov_coeff: float = 1.0,
        gather: bool = True,
        dim: int | None = None,
    ):
        super().__init__(plane(), entropy=None, gather=gather, dim=dim)
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff

    def forward(self, z: Tensor, u=None, mask=None, target=None, R=None) -> LossOutput:
        z = self._check(z, u, mask, target, R)
        if z.shape[1] != 2 or mask is not None:
            raise ValueError(f"vicreg_original needs exactly two views z (B, 2, d) and no mask, got T={z.shape[1]}")
        x, y = z[:, 0], z[:, 1]
        invariance = F.mse_loss(x, y)
        if self.gather:
            x, y = gather(x), gather(y)
        if x.shape[0] < 2:
            raise ValueError("vicreg_original needs a batch of at least 2")
        variance = _hinge_std(x) / 2 + _hinge_std(y) / 2
        covariance = _off_diagonal_cov(x) + _off_diagonal_cov(y)
        alignment = -self.sim_coeff * invariance
        entropy = -(self.std_coeff * variance + self.cov_coeff * covariance)
        loss = -(alignment + entropy)
        logs = {
            "loss": float(loss.detach()),
            "alignment": float(alignment.detach()),
            "entropy": float(entropy.detach()),
            "latent_std": float(z.detach().flatten(0, 1).std(dim=0).mean()),
        }
        return LossOutput(loss, alignment, entropy, logs)


def _hinge_std(x: Tensor) -> Tensor:
    return F.relu(1 - torch.sqrt(x.var(dim=0) + 1e-4)).mean()


def _off_diagonal_cov(x: Tensor) -> Tensor:
    n, d = x.shape
    xc = x - x.mean(dim=0)
    cov = xc.T @ xc / (n - 1)
    return (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / d
