"""The lewm preset through WorldModel (sequences with actions, image-SSL pairs) and the sigreg estimator under
two ranks: gathered batch, the same directions on every rank, the same loss and gradients as one process."""

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from worldmodel.methods import make
from worldmodel.model import ModelConfig, WorldModel
from test_distributed import free_port

pytestmark = pytest.mark.usefixtures("single_thread")

FAST = {"num_projections": 64}  # CPU time: LeWM's 1024 directions are the default


def controlled_system(g, batch=32, steps=4):
    """A damped rotation of s (B, T, 2) driven by actions (B, T, 2) (actions[:, t] taken after frame t), seen
    as x = W s (B, T, 8) through a fixed random W."""
    w = torch.randn(8, 2, generator=torch.Generator().manual_seed(7))
    c, s_ = 0.9 * math.cos(0.4), 0.9 * math.sin(0.4)
    rotation = torch.tensor([[c, -s_], [s_, c]])
    actions = torch.randn(batch, steps, 2, generator=g)
    s = [torch.randn(batch, 2, generator=g)]
    for t in range(steps - 1):
        s.append(s[-1] @ rotation.T + 0.5 * actions[:, t] + 0.1 * torch.randn(batch, 2, generator=g))
    return torch.stack(s, 1) @ w.T, actions


def two_views(g, batch=32):
    """Image SSL's single-step case: (x, x + noise) of 4 Gaussian factors mixed into 8 dims, no actions."""
    w = torch.randn(8, 4, generator=torch.Generator().manual_seed(7))
    s = torch.randn(batch, 4, generator=g)
    return torch.stack([s, s + 0.2 * torch.randn(batch, 4, generator=g)], 1) @ w.T, None


@pytest.mark.parametrize("data, action_dim", [(controlled_system, 2), (two_views, 0)])
def test_lewm_world_model_trains_without_collapse(data, action_dim):
    torch.manual_seed(0)
    model = WorldModel.from_config(ModelConfig(method="lewm", encoder="mlp", input_dim=8, latent_dim=4, hidden=32,
                                               action_dim=action_dim, method_kwargs=FAST))
    assert model.prior.action_dim == action_dim and not model.can_filter
    opt = torch.optim.Adam(model.param_groups(3e-3))
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(80):
        frames, actions = data(g)
        out = model.loss(frames, actions)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-10:]) < sum(losses[:10]), losses
    with torch.no_grad():
        z = model.encode(data(torch.Generator().manual_seed(2), batch=256)[0])
    assert z.flatten(0, 1).std(0).min() > 0.3  # no dimension collapsed (SIGReg pulls every marginal to N(0, 1))


def test_world_model_passes_actions_to_an_action_conditioned_predictor():
    torch.manual_seed(0)
    model = WorldModel.from_config(ModelConfig(method="lewm", encoder="mlp", input_dim=8, latent_dim=4, hidden=32,
                                               action_dim=2, method_kwargs=FAST))
    frames, actions = controlled_system(torch.Generator().manual_seed(1))
    assert model.loss(frames, actions).alignment.item() != model.loss(frames).alignment.item()


# -- two ranks ------------------------------------------------------------------------------------
CASES = [("lewm", 2, {}), ("lewm", 5, {}), ("vicreg", 2, {"entropy": "sigreg"}),
         ("vicreg_ldm", 3, {"entropy": "sigreg", "window": 2})]
B, D_IN, D = 16, 5, 4


def setup(name, T, options, dtype, dropped):
    """Identical encoder, loss, global batch and mask on every rank (seeded); with `dropped`, frames missing
    unevenly over the ranks' halves of the batch."""
    torch.manual_seed(0)
    encoder = torch.nn.Linear(D_IN, D).to(dtype)
    loss = make(name, D, num_projections=32, **options).to(dtype)
    x = torch.randn(B, T, D_IN, dtype=dtype)
    mask = None
    if dropped:
        mask = torch.rand(B, T) > torch.linspace(0.1, 0.4, B)[:, None]
        mask[:, :2] = True  # every rank keeps pairs and windows
        x = x.masked_fill(~mask[..., None], float("nan"))
    return encoder, loss, x, mask


def loss_and_grads(encoder, loss, x, mask):
    params = list(encoder.parameters()) + [p for p in loss.parameters() if p.requires_grad]
    z = encoder(x)
    value = loss(z if mask is None else z.masked_fill(~mask[..., None], 0.0), mask=mask).loss
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return value.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        report = {}
        for dtype, dropped in ((torch.float32, False), (torch.float64, False), (torch.float64, True)):
            for name, T, options in CASES:
                encoder, loss, x, mask = setup(name, T, options, dtype, dropped)
                shard, shard_mask = x.chunk(world)[rank], None if mask is None else mask.chunk(world)[rank]
                value, grads = loss_and_grads(encoder, loss, shard, shard_mask)
                dist.all_reduce(value)  # what DDP does: average the loss and the gradients over ranks
                value /= world
                for g in grads:
                    dist.all_reduce(g)
                    g /= world
                encoder, loss, x, mask = setup(name, T, options, dtype, dropped)  # fresh generator: same draws
                loss.gather = False
                ref_value, ref_grads = loss_and_grads(encoder, loss, x, mask)
                diffs = [(value - ref_value).abs()] + [(g - r).abs().max() for g, r in zip(grads, ref_grads)]
                report[(name, T, str(dtype), dropped)] = max(d.item() for d in diffs)
        torch.save(report, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_sigreg_two_ranks_match_one_process():
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(2, free_port(), out_dir), nprocs=2, join=True)
        reports = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    for report in reports:
        for (name, T, dtype, dropped), diff in report.items():
            limit = 1e-5 if "float32" in dtype else 1e-10
            assert diff < limit, f"{name} T={T} {dtype} {'dropped frames' if dropped else ''}: max abs diff {diff:.2e}"
