"""The LDM objective: entropy estimators (`entropy`), latent normalisation (`normalization`), the loss
(`ldm.LDMLoss`: alignment of a prior + entropy) and the one exact k-step predictive (`multistep`)."""

from worldmodel.objective.ldm import ENTROPIES, ESTIMATOR_OPTIONS, LDMLoss, LossOutput
from worldmodel.objective.multistep import kstep_predictive, multistep_log_likelihood
from worldmodel.objective.normalization import NORMS, LatentNorm

__all__ = ["ENTROPIES", "ESTIMATOR_OPTIONS", "LDMLoss", "LossOutput", "LatentNorm", "NORMS", "kstep_predictive",
           "multistep_log_likelihood"]
