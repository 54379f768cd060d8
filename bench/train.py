"""Training-step benchmark: frames/s, peak memory and a breakdown of one full WorldModel training step,
ours against a peer that runs the paper's own training loop.

    python bench/train.py                 # train.py's default model (B=16, window 32, 64x64 frames) on CPU
    python bench/train.py --device cuda   # the same on a GPU
    python bench/train.py --T 64 --modes eager paper   # another point, only some modes

One step = encoder on B*T frames + the default ``kalman`` LDM loss (exact filter, stop-gradient plug-in,
logdet entropy, the k-step term) + backward + Adam, on random uint8 frames and actions. Modes:
``eager`` (the library as shipped), ``compiled`` (``torch.compile`` of the encoder only: the filter's time
loop is never compiled, it would recompile per sequence length) and ``paper``: the same model, encoder,
batch and loss with the filter of the paper's published training loop (a Python loop over t, batched over
the sequences, an explicit ``torch.inverse`` of the innovation covariance and ``torch.logdet`` each step,
autograd for the backward pass; `paper_filter`). Each mode runs in its own subprocess so that its peak
memory (CPU: peak RSS of the process; GPU: ``max_memory_allocated``) is its own, and reports its first
loss (equal across the modes up to round-off: the peer computes the same objective). The breakdown times
the parts of the same step separately: encoder forward, loss forward (filter, entropy, k-step term), loss
backward, encoder backward, optimizer; and the k-step term's share of the loss (forward + backward with
and without it). Writes ``train.json`` and ``train.md`` under ``--out`` (default bench/results/).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def paper_filter(prior, z, u=None, mask=None, R=None, target=None, parallel=False):
    """The filter of the paper's published training loop, as a drop-in for ``KalmanLatentModel.filter``.

    A Python loop over the steps, batched over the sequences: predict, ``S = C P C^T + R``, an explicit
    ``torch.inverse(S)`` for the gain and the Mahalanobis term, ``torch.logdet(S)``, and the standard
    covariance update ``(I - K C) P``; autograd differentiates it. z (B, T, L), u (B, T, a) shifted
    actions; fully observed batches with the learned R only. Returns a ``FilterResult``.
    """
    import math

    import torch
    from worldmodel.kalman import FilterResult, Gaussian

    if mask is not None or R is not None:
        raise ValueError("the paper-loop peer filters fully observed batches with the learned R only")
    A, Q, C, obs_noise = prior.A, prior.Q, prior.C, prior.R
    B_aug, u_aug = prior._control(A, u, tuple(z.shape[:2]))
    drive = u_aug @ B_aug.mT  # (B, T, S)
    target = z if target is None else target
    batch, steps, dim = z.shape
    mean, cov = prior.m0.expand(batch, -1), prior.P0.expand(batch, -1, -1)
    eye = torch.eye(A.shape[-1], dtype=z.dtype, device=z.device)
    predicted, filtered, step_ll = ([], []), ([], []), []
    for t in range(steps):
        mean, cov = mean @ A.mT + drive[:, t], A @ cov @ A.mT + Q
        predicted[0].append(mean)
        predicted[1].append(cov)
        S = C @ cov @ C.mT + obs_noise
        S_inv = torch.inverse(S)
        gain = cov @ C.mT @ S_inv
        z_pred = mean @ C.mT
        e, e_target = z[:, t] - z_pred, target[:, t] - z_pred
        mahalanobis = (e_target[:, None] @ S_inv @ e_target[:, :, None])[:, 0, 0]
        step_ll.append(-0.5 * (dim * math.log(2 * math.pi) + torch.logdet(S) + mahalanobis))
        mean, cov = mean + (gain @ e[:, :, None])[:, :, 0], (eye - gain @ C) @ cov
        filtered[0].append(mean)
        filtered[1].append(cov)
    step_ll = torch.stack(step_ll, 1)
    stack = lambda pair: Gaussian(torch.stack(pair[0], 1), torch.stack(pair[1], 1))  # noqa: E731
    return FilterResult(stack(filtered), stack(predicted), step_ll.sum(1), step_ll)


def _timed(fn, device: str, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls (after one untimed call)."""
    fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def breakdown(model, opt, frames, actions, device: str, reps: int) -> dict:
    """Seconds of the parts of one training step, each timed on its own (medians): encoder forward,
    loss forward, loss backward (to the latents), encoder backward, optimizer step; and the k-step term's
    share of the loss forward + backward."""
    from worldmodel.model import shift_actions

    u = shift_actions(actions)
    parts = {}
    parts["encoder_forward"] = _timed(lambda: model.encode(frames), device, reps)
    z = model.encode(frames)
    latents = z.detach().requires_grad_()
    parts["loss_forward"] = _timed(lambda: model.objective(latents, u=u), device, reps)
    parts["loss_backward"] = _timed(lambda: model.objective(latents, u=u).loss.backward(), device, reps) \
        - parts["loss_forward"]
    latents.grad = None
    model.objective(latents, u=u).loss.backward()
    grad = latents.grad
    parts["encoder_backward"] = _timed(lambda: model.encode(frames).backward(grad), device, reps) \
        - parts["encoder_forward"]
    parts["optimizer"] = _timed(opt.step, device, reps)
    horizon = model.objective.multistep_horizon
    model.objective.multistep_horizon = 0
    without = _timed(lambda: model.objective(latents, u=u).loss.backward(), device, reps)
    model.objective.multistep_horizon = horizon
    parts["kstep_term"] = parts["loss_forward"] + parts["loss_backward"] - without
    opt.zero_grad(set_to_none=True)
    return parts


def run_mode(args) -> dict:
    """One mode (eager or compiled) in this process; returns its measurements."""
    import torch
    from worldmodel.allocator import tune_malloc
    from worldmodel.model import ModelConfig, WorldModel

    malloc_tuned = False if args.default_malloc else tune_malloc()  # as train.py does
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    cfg = ModelConfig(encoder="conv", image_size=args.image_size, latent_dim=args.latent_dim, action_dim=1,
                      method="kalman")
    model = WorldModel.from_config(cfg).to(device)
    opt = torch.optim.Adam(model.param_groups(1e-3))
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (args.batch, args.T, args.image_size, args.image_size, 3), dtype=torch.uint8,
                           generator=gen).to(device)
    actions = torch.randn(args.batch, args.T, 1, generator=gen).to(device)
    if args.mode == "compiled":
        model.encoder = torch.compile(model.encoder)
    if args.mode == "paper":
        model.prior.filter = types.MethodType(paper_filter, model.prior)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def step():
        opt.zero_grad(set_to_none=True)
        out = model.loss(frames, actions)
        out.loss.backward()
        opt.step()
        model.update_target()
        return out

    t0 = time.perf_counter()
    first = step()
    _sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.reps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)

    parts = breakdown(model, opt, frames, actions, device, args.reps)
    out = dict(mode=args.mode, device=device, threads=torch.get_num_threads(), malloc_tuned=malloc_tuned,
               batch=args.batch, T=args.T,
               image_size=args.image_size, latent_dim=args.latent_dim, state_dim=cfg.state_dim or 2 * args.latent_dim,
               step_s=med, step_all_s=times, first_step_s=first_s, frames_per_s=args.batch * args.T / med,
               breakdown_s=parts, loss=float(first.loss.detach()),
               torch=torch.__version__)
    if device.startswith("cuda"):
        out["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    else:
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["rss_before_first_step_mib"] = rss0
    return out


PARTS = ("encoder_forward", "loss_forward", "loss_backward", "encoder_backward", "optimizer", "kstep_term")


def report(results: list[dict]) -> str:
    ok = [r for r in results if "error" not in r]
    head = ok[0] if ok else {}
    eager = next((r for r in ok if r["mode"] == "eager"), None)
    lines = ["# Training-step benchmark\n",
             f"`python bench/train.py` — WorldModel(conv encoder, method=kalman), B={head.get('batch')}, "
             f"T={head.get('T')}, {head.get('image_size')}x{head.get('image_size')} frames, latent L="
             f"{head.get('latent_dim')}, state S={head.get('state_dim')}, {head.get('device')}, "
             f"{head.get('threads')} threads, glibc malloc "
             f"{'tuned (worldmodel.allocator, as train.py)' if head.get('malloc_tuned') else 'defaults'}, "
             "median of the timed steps.\n",
             "| mode | step (s) | frames/s | step / eager step | first step (s, incl. compile) | peak memory (MiB) "
             "| first loss |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error']} | | | | | |")
            continue
        mem = r.get("peak_mem_mib", r.get("peak_rss_mib"))
        ratio = f"{r['step_s'] / eager['step_s']:.2f}" if eager else "n/a"
        lines.append(f"| {r['mode']} | {r['step_s']:.3f} | {r['frames_per_s']:.0f} | {ratio} | "
                     f"{r['first_step_s']:.1f} | {mem:.0f} | {r['loss']:.6f} |")
    lines += ["\nBreakdown (ms, each part timed on its own; the k-step term is part of the loss rows):\n",
              "| mode | " + " | ".join(p.replace("_", " ") for p in PARTS) + " |",
              "|---|" + "---|" * len(PARTS)]
    lines += [f"| {r['mode']} | " + " | ".join(f"{r['breakdown_s'][p] * 1e3:.1f}" for p in PARTS) + " |" for r in ok]
    lines.append("\nPeak memory on CPU is the peak RSS of the mode's own process (model, data, activations, "
                 "allocator caches); on GPU it is torch.cuda.max_memory_allocated. paper: the filter of the "
                 "paper's published loop (Python loop over t, torch.inverse of the innovation covariance).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--T", type=int, default=32, help="window (train.py's default: 32)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--latent-dim", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled", "paper"],
                    choices=["eager", "compiled", "paper"])
    ap.add_argument("--default-malloc", action="store_true",
                    help="keep glibc's default allocator settings (train.py tunes them: worldmodel.allocator)")
    ap.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode in this process
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--mode", mode] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in ("batch", "T", "image_size", "latent_dim", "device", "threads", "reps", "warmup")] + (
            ["--default-malloc"] if args.default_malloc else [])
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
            results.append(dict(mode=mode, error=err))
            print(f"{mode}: failed after {time.time() - t0:.0f} s: {err}")
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{mode}: {r['frames_per_s']:.0f} frames/s, step {r['step_s']:.3f} s ({time.time() - t0:.0f} s total)")
    (args.out / "train.json").write_text(json.dumps(results, indent=1))
    md = report(results)
    (args.out / "train.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
