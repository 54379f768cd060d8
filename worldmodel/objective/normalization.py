"""Latent normalisation of the LDM objective: batch standardisation or whitening, running statistics for eval."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from worldmodel.distributed import gather

__all__ = ["LatentNorm", "NORMS"]

NORMS = ("batch", "whiten", "none")


class LatentNorm(nn.Module):
    """Normalises latents (B, T, d) to zero mean and unit (co)variance; no learned parameters.

    kind="batch": per-dimension standardisation (z - mu) / sigma; kind="whiten": Cholesky whitening
    L^{-1} (z - mu) with Cov = L L^T; kind="none": identity. Fixing the latent scale removes the trivial
    collapse of the stop-gradient Kalman objective (a plug-in with a detached target has no entropy term
    that would prevent it).

    Training normalises with the statistics of the batch (their gradient is what stops the encoder
    from collapsing); eval (filtering, stepping, evaluation) with running statistics. These are
    bias-corrected exponential averages of the batch mean and of the uncentred second moment E[z z^T],
    so Cov = E[z z^T] - mu mu^T estimates the population covariance, not the smaller average
    within-batch covariance of time-correlated windows (which would mis-scale the latents in eval).
    Statistics use observed, finite rows only (mask (B, T) True = observed) and are gathered over
    ranks under torch.distributed (DDP sees the global batch).
    """

    def __init__(self, dim: int, kind: str = "batch", momentum: float = 0.02, eps: float = 1e-4):
        super().__init__()
        if kind not in NORMS:
            raise ValueError(f"kind must be 'batch', 'whiten' or 'none', got {kind!r}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.kind, self.momentum, self.eps = kind, momentum, eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_moment", torch.zeros(dim, dim))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    def statistics(self) -> tuple[Tensor, Tensor]:
        """Running (mean (d,), covariance (d, d)); (0, I) before the first training batch."""
        n = int(self.num_batches)
        if n == 0:
            return self.running_mean.clone(), torch.eye(len(self.running_mean), dtype=self.running_mean.dtype,
                                                        device=self.running_mean.device)
        correction = 1.0 - (1.0 - self.momentum) ** n
        mean = self.running_mean / correction
        return mean, self.running_moment / correction - torch.outer(mean, mean)

    def _normalise(self, z: Tensor, mean: Tensor, cov: Tensor) -> Tensor:
        x = z - mean.to(z.dtype)
        cov = cov.to(z.dtype)
        if self.kind == "batch":
            return x / (cov.diagonal() + self.eps).sqrt()
        chol = torch.linalg.cholesky(cov + self.eps * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device))
        return torch.linalg.solve_triangular(chol, x.unsqueeze(-1), upper=False).squeeze(-1)

    def forward(self, z: Tensor, mask: Tensor | None = None, running: bool = False, update: bool = True,
                across_ranks: bool = True) -> Tensor:
        """z: (B, T, d) (NaN rows stay NaN) -> (B, T, d). running=True uses the running statistics even
        in training mode (online filtering of single frames); update=False leaves them unchanged (a
        target branch normalised by its own batch); across_ranks=False keeps the statistics to this rank's
        batch under torch.distributed."""
        if self.kind == "none":
            return z
        missing = ~torch.isfinite(z).all(-1)
        if missing.any():  # normalise zeros in their place (NaN must not reach the backward pass)
            observed = ~missing if mask is None else mask & ~missing
            zeros = z.masked_fill(missing[..., None], 0.0)
            out = self(zeros, observed, running, update, across_ranks)
            return out.masked_fill(missing[..., None], float("nan"))
        if running or not self.training:
            return self._normalise(z, *self.statistics())
        # every rank gathers all its rows and their weights (equal shapes, also with dropped frames)
        share = gather if across_ranks else (lambda x: x)
        rows = share(rearrange(z, "b t d -> (b t) d"))
        weights = None if mask is None else share(rearrange(mask, "b t -> (b t)").to(rows.dtype))
        count = rows.shape[0] if weights is None else weights.sum()
        if count < 2:
            raise ValueError("LatentNorm needs at least 2 observed latents in a training batch")
        if weights is None:
            mean = rows.mean(0)
            centred = rows - mean
        else:
            mean = weights @ rows / count
            centred = (rows - mean) * weights[:, None]
        cov = centred.mT @ centred / (count - 1)
        if update:
            self._track(rows, weights, mean, count)
        return self._normalise(z, mean, cov)

    @torch.no_grad()
    def _track(self, rows: Tensor, weights: Tensor | None, mean: Tensor, count) -> None:
        """Fold a training batch's mean (d,) and uncentred second moment E[z z^T] of the rows (N, d) with
        weights (N,) (None: all 1) into the running statistics."""
        weighted = rows if weights is None else rows * weights[:, None]
        moment = weighted.mT @ rows / count
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
        self.running_moment.lerp_(moment.to(self.running_moment.dtype), self.momentum)
        self.num_batches += 1
