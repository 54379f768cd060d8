"""The factorized prior of ICA: independent non-Gaussian sources, log P(z_t) = sum_i log p(z_{t,i})."""

from __future__ import annotations

import math

from torch import Tensor, nn

from worldmodel.priors.base import LatentPrior
from worldmodel.priors.pairs import masked_mean

__all__ = ["FactorizedPrior", "factorized"]


class FactorizedPrior(LatentPrior):
    """Independent sources: log P(z) = sum_i log p(z_i), p logistic or Laplace (unit scale).

    logistic: log p(s) = -s - 2 log(1 + e^{-s});  laplace: log p(s) = -|s| - log 2.
    """

    SOURCES = ("logistic", "laplace")
    conditional = False  # a marginal model: no target to detach, so no plugin estimator

    def __init__(self, source: str = "logistic"):
        super().__init__()
        if source not in self.SOURCES:
            raise ValueError(f"source must be one of {self.SOURCES}, got {source!r}")
        self.source = source

    def alignment(self, z, u=None, mask=None, target=None, R=None) -> Tensor:
        """Mean of log P(z_t) over observed steps (u, target and R do not apply)."""
        return masked_mean(self.log_prob(z), mask)

    def log_prob(self, z: Tensor) -> Tensor:
        """z (..., d) -> (...)."""
        if self.source == "logistic":
            return (-z - 2 * nn.functional.softplus(-z)).sum(-1)
        return (-z.abs() - math.log(2)).sum(-1)


def factorized(source: str = "logistic") -> FactorizedPrior:
    """Factorized ICA source model (logistic or Laplace sources)."""
    return FactorizedPrior(source)
