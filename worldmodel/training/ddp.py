"""torch.distributed for the train loop: ranks, start/stop, and the few collectives it needs.

Started by ``torchrun --nproc_per_node=N train.py`` (WORLD_SIZE > 1): gloo on the CPU, nccl on GPUs.
Every helper also works without torch.distributed (one rank, no communication).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather_object", "any_rank", "barrier", "broadcast_object", "init", "log", "rank", "reduce_mean",
           "select_device", "shutdown", "world"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world() -> int:
    return dist.get_world_size() if _active() else 1


def log(*args) -> None:
    """print on rank 0 only."""
    if rank() == 0:
        print(*args, flush=True)


def select_device(name: str) -> torch.device:
    """cpu, cuda, cuda:N or auto (cuda if available); a bare ``cuda`` under torchrun is cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ and device.index is None:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def init(device: torch.device) -> None:
    """Join the process group when started with WORLD_SIZE > 1 (nccl for cuda devices, else gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def shutdown() -> None:
    if _active():
        dist.destroy_process_group()


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    out = [None] * world()
    if world() > 1:
        dist.all_gather_object(out, obj)
    else:
        out[0] = obj
    return out


def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU under nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on some rank."""
    if world() == 1:
        return flag
    t = torch.tensor([float(flag)], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the ranks (all ranks must pass the same keys)."""
    if world() == 1:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return {k: float(v) / world() for k, v in zip(keys, t.tolist())}
