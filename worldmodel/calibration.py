"""Recalibrated k-step prediction bands (split-conformal quantiles of standardized residuals).

The exact k-step predictive of a linear-Gaussian prior is Gaussian with a covariance that does not depend on
the state. Real prediction errors are not: they are larger in some states than in others, so, pooled over
states, they are heavier-tailed than one Gaussian, and its c-sigma band covers more than its nominal share
erf(c / sqrt 2) at c = 1 and less at c = 2 (measured on the pixel pendulum: 78 % and 93 % at k = 5).

`PredictiveCalibration` corrects the bands, not the model: from held-out predictions it stores, per horizon
k and latent coordinate i, the empirical quantile q_{k,i}(p) of the standardized error
|z_i - mu_i| / sqrt(Sigma_ii) at the levels p = erf(c / sqrt 2) of a grid of c. The band

    mu_i +- c s_{k,i}(c) sqrt(Sigma_ii),   s_{k,i}(c) = q_{k,i}(erf(c / sqrt 2)) / c,

then covers a share erf(c / sqrt 2) of the calibration errors, and of new ones from the same distribution
(split conformal prediction, Vovk et al. 2005; the recalibration of Kuleshov et al., ICML 2018). Fit it on
episodes the coverage is not scored on. Levels between grid points interpolate s linearly in c; bands
wider than the grid's last c use its factor, horizons past the fitted ones the last horizon's.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["PredictiveCalibration", "SIGMA_GRID"]

SIGMA_GRID = tuple(round(0.05 * i, 2) for i in range(1, 81))  # band half-widths c = 0.05 .. 4 (in sigmas)
_QUANTILE_ROWS = 1 << 20  # rows per torch.nanquantile call (it refuses inputs of more than 2^24 elements)


class PredictiveCalibration(nn.Module):
    """Widening factors s (H, L, C) of the k-step bands at the half-widths ``SIGMA_GRID`` (C,) (in sigmas); empty
    until `fit`.

    Buffers, saved with the model; a checkpoint without them (or from before they existed) loads unfitted.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("factors", torch.ones(0, 0, len(SIGMA_GRID)))

    @property
    def fitted(self) -> bool:
        return self.factors.shape[0] > 0

    @property
    def horizon(self) -> int:
        """The largest k fitted (0 when unfitted)."""
        return self.factors.shape[0]

    @torch.no_grad()
    def fit(self, standardized: Tensor, valid: Tensor) -> "PredictiveCalibration":
        """Fit from standardized errors (..., H, L) ((z - mu) / sqrt(diag Sigma) of the k-step predictions, e.g.
        `worldmodel.evaluation.kstep_residuals`) and valid (..., H) bool. Horizons are kept up to the last one
        with a valid error. Returns self."""
        if standardized.dim() < 2 or valid.shape != standardized.shape[:-1]:
            raise ValueError(f"standardized (..., H, L) and valid (..., H) do not match: {tuple(standardized.shape)}, "
                             f"{tuple(valid.shape)}")
        errors = standardized.detach().abs().double().cpu().flatten(0, -3)  # (N, H, L); two copies to the host
        keep = valid.cpu().flatten(0, -2)
        if not torch.isfinite(errors[keep]).all():
            raise ValueError("the standardized errors of the valid predictions must be finite")
        counts = keep.sum(0)
        if not counts.any():
            raise ValueError("no valid prediction to calibrate on")
        horizon = int(counts.nonzero().max()) + 1
        errors = errors[:, :horizon].masked_fill(~keep[:, :horizon, None], float("nan"))
        grid = torch.tensor(SIGMA_GRID, dtype=torch.float64)
        levels = torch.erf(grid / math.sqrt(2))
        if len(errors) > _QUANTILE_ROWS:  # a strided subset: the quantiles of a few million rows are exact enough
            errors = errors[:: math.ceil(len(errors) / _QUANTILE_ROWS)]
        factors = []
        for k in range(horizon):  # (N, L) at a time: nanquantile's input limit
            quantiles = torch.nanquantile(errors[:, k], levels, dim=0)  # (C, L); NaN where k has no valid row
            factors.append(torch.nan_to_num(quantiles.T / grid, nan=1.0))
        self.factors = torch.stack(factors).to(self.factors)
        return self

    def half_widths(self, sigmas: float, horizon: int | None = None) -> Tensor:
        """Half-widths (H, L), in predictive standard deviations, of the recalibrated band whose nominal coverage
        is that of the Gaussian's ``sigmas``-sigma band, for k = 1..H (H: ``horizon``, default the fitted one).
        Unfitted: ``sigmas`` everywhere (the Gaussian band)."""
        if not sigmas > 0:
            raise ValueError(f"sigmas must be > 0, got {sigmas}")
        horizon = self.horizon if horizon is None else horizon
        if not self.fitted:
            return torch.full((horizon, 1), float(sigmas), device=self.factors.device)
        c = min(max(float(sigmas), SIGMA_GRID[0]), SIGMA_GRID[-1])  # on the host: no device synchronisation
        j = min(bisect.bisect_left(SIGMA_GRID, c), len(SIGMA_GRID) - 1)
        i = max(j - 1, 0)
        weight = 0.0 if j == i else (c - SIGMA_GRID[i]) / (SIGMA_GRID[j] - SIGMA_GRID[i])
        factor = torch.lerp(self.factors[..., i], self.factors[..., j], weight)  # (H_fit, L)
        past = factor[-1:].expand(max(horizon - self.horizon, 0), -1)  # horizons past the fitted: the last one's
        return sigmas * torch.cat([factor[:horizon], past])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        """Loads factors of any fitted shape; a state dict without them leaves the calibration unfitted."""
        factors = state_dict.get(prefix + "factors")
        if factors is not None:
            if factors.dim() != 3 or factors.shape[-1] != len(SIGMA_GRID):
                error_msgs.append(f"{prefix}factors has shape {tuple(factors.shape)}, expected (H, L, "
                                  f"{len(SIGMA_GRID)})")
                return
            self.factors = factors.to(self.factors)
