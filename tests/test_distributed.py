"""2 gloo ranks x B/2 give the same loss and (DDP-averaged) gradients as 1 process x B, also with dropped
frames (masks that differ between the ranks)."""

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from worldmodel.distributed import gather
from worldmodel.methods import make

BATCH_PRESETS = ["vicreg", "vicreg_ldm", "vicreg_original", "simclr", "cpc", "kalman", "kalman_knn", "kalman_logdet"]
B, T_PAIR, T_SEQ, D_IN, D = 16, 2, 5, 5, 4


def setup(name, dtype, dropped):
    """Identical encoder, loss, global batch and mask on every rank (seeded); with `dropped`, about a
    quarter of the frames are missing, unevenly over the ranks' halves of the batch (NaN frames)."""
    torch.manual_seed(0)
    encoder = nn.Linear(D_IN, D).to(dtype)
    loss = make(name, D).to(dtype)
    T = T_SEQ if name.startswith("kalman") or name == "cpc" else T_PAIR
    x = torch.randn(B, T, D_IN, dtype=dtype)
    mask = None
    if dropped:
        mask = torch.rand(B, T) > torch.linspace(0.1, 0.4, B)[:, None]  # the second rank drops more
        mask[:, 0] = True  # every sequence keeps a frame and every rank enough pairs
        x = x.masked_fill(~mask[..., None], float("nan"))
    return encoder, loss, x, mask


def loss_and_grads(encoder, loss, x, mask=None):
    params = [p for p in list(encoder.parameters()) + list(loss.parameters()) if p.numel() > 0]
    z = encoder(x)
    value = loss(z if mask is None else z.masked_fill(~mask[..., None], 0.0), mask=mask).loss
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return value.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def worker(rank, world, port, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        report = {}
        for dtype, dropped in ((torch.float32, False), (torch.float64, False), (torch.float64, True)):
            for name in BATCH_PRESETS:
                encoder, loss, x, mask = setup(name, dtype, dropped)
                shard, shard_mask = x.chunk(world)[rank], None if mask is None else mask.chunk(world)[rank]
                value, grads = loss_and_grads(encoder, loss, shard, shard_mask)
                # what DDP does: average the loss (for logging) and the gradients over ranks
                dist.all_reduce(value)
                value /= world
                for g in grads:
                    dist.all_reduce(g)
                    g /= world
                loss.gather = False  # reference: one process with the whole batch
                ref_value, ref_grads = loss_and_grads(encoder, loss, x, mask)
                diffs = [(value - ref_value).abs()] + [(g - r).abs().max() for g, r in zip(grads, ref_grads)]
                report[(name, str(dtype), dropped)] = max(d.item() for d in diffs)
        # gather of mismatched shapes is a clear error on every rank
        try:
            gather(torch.zeros(rank + 1, 2))
            report["mismatch"] = "no error"
        except ValueError as err:
            report["mismatch"] = str(err)
        torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_ranks_match_one_process():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(2, free_port(), out_dir), nprocs=2, join=True)
        reports = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    for report in reports:
        assert "same shape" in report.pop("mismatch")
        for (name, dtype, dropped), diff in report.items():
            limit = 1e-5 if "float32" in dtype else 1e-10
            assert diff < limit, f"{name} {dtype} {'dropped frames' if dropped else ''}: max abs diff {diff:.2e}"
