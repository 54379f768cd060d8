"""Autograd-aware all-gather for batch-statistics losses under torch.distributed.

Convention (the one DDP and the official VICReg/SimCLR code use): every rank computes the
batch-statistic term on the *gathered* batch, DDP averages parameter gradients over ranks. The
backward of the gather therefore sums the incoming gradients over ranks (all_reduce) and returns
this rank's slice. Then the rank-averaged gradient of (local per-sample term + global batch term)
equals the single-process gradient on the concatenated batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "gather", "rank_mean"]


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rank, ctx.size = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum of d(loss_r)/dx over all ranks r
        return grad.narrow(0, ctx.rank * ctx.size, ctx.size)


def gather(x: Tensor) -> Tensor:
    """Concatenate `x` (N, ...) from all ranks along dim 0, rank order; identity if not distributed.

    Gradients flow back to every rank's own shard (see module docstring). All ranks must pass the
    same shape; a mismatch raises ValueError on every rank.
    """
    if not is_distributed():
        return x
    x = x.contiguous()
    shape = torch.tensor(x.shape, dtype=torch.long, device=x.device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(
            f"gather: every rank must pass the same shape, got {[tuple(s.tolist()) for s in shapes]}"
            " (use a DistributedSampler with drop_last=True)"
        )
    return _AllGather.apply(x)


def rank_mean(x: Tensor) -> Tensor:
    """x (a count, any shape) averaged over ranks, without gradient; x itself when not distributed.

    The denominator of a masked mean under DDP: each rank divides its local sum by the mean count, so the
    rank average of the losses (what DDP logs and differentiates) is the global sum over the global count,
    as for one process with the whole batch, also when ranks observe different numbers of steps.
    """
    if not is_distributed():
        return x
    x = x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32).clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()
