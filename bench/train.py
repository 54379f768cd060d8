"""Training-step benchmark: frames/s and peak memory of one full WorldModel training step.

    python bench/train.py                 # B=16, T=64, 64x64 frames, eager and compiled, on CPU
    python bench/train.py --device cuda   # the same on a GPU

One step = encoder on B*T frames + Kalman LDM loss (``method="kalman"``: exact filter, stop-gradient
plug-in) + backward + optimizer step, on random uint8 frames and actions. ``compiled`` applies
``torch.compile`` to the encoder only: the Kalman filter's time loop is never compiled (unrolling it
would recompile per sequence length), it runs as the library ships it. Each mode runs in its own
subprocess so that its peak memory (CPU: peak RSS of the process; GPU: ``max_memory_allocated``) is its
own. The Kalman share of the step (filter + loss, forward and backward, on the step's latents) is
timed separately. Writes ``train.json`` and ``train.md`` under ``--out`` (default bench/results/).
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
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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

    # the Kalman share: the LDM objective alone (filter + loss, forward + backward) on this step's latents
    z = model.encode(frames).detach().requires_grad_()
    u = torch.cat([torch.zeros_like(actions[:, :1]), actions[:, :-1]], 1)
    kal = []
    for i in range(args.reps + 2):
        _sync(device)
        t0 = time.perf_counter()
        model.objective(z, u=u).loss.backward()
        _sync(device)
        if i >= 2:
            kal.append(time.perf_counter() - t0)
    out = dict(mode=args.mode, device=device, threads=torch.get_num_threads(), malloc_tuned=malloc_tuned,
               batch=args.batch, T=args.T,
               image_size=args.image_size, latent_dim=args.latent_dim, state_dim=cfg.state_dim or 2 * args.latent_dim,
               step_s=med, step_all_s=times, first_step_s=first_s, frames_per_s=args.batch * args.T / med,
               kalman_loss_fwd_bwd_s=statistics.median(kal), loss=float(first.loss.detach()),
               torch=torch.__version__)
    if device.startswith("cuda"):
        out["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu"] = torch.cuda.get_device_name()
    else:
        out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["rss_before_first_step_mib"] = rss0
    return out


def report(results: list[dict]) -> str:
    ok = [r for r in results if "error" not in r]
    head = ok[0] if ok else {}
    lines = ["# Training-step benchmark\n",
             f"`python bench/train.py` — WorldModel(conv encoder, method=kalman), B={head.get('batch')}, "
             f"T={head.get('T')}, {head.get('image_size')}x{head.get('image_size')} frames, latent L="
             f"{head.get('latent_dim')}, state S={head.get('state_dim')}, {head.get('device')}, "
             f"{head.get('threads')} threads, glibc malloc "
             f"{'tuned (worldmodel.allocator, as train.py)' if head.get('malloc_tuned') else 'defaults'}, "
             "median of the timed steps.\n",
             "| mode | step (s) | frames/s | first step (s, incl. compile) | peak memory (MiB) | Kalman loss fwd+bwd (ms) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error']} | | | | |")
            continue
        mem = r.get("peak_mem_mib", r.get("peak_rss_mib"))
        lines.append(f"| {r['mode']} | {r['step_s']:.3f} | {r['frames_per_s']:.0f} | {r['first_step_s']:.1f} | "
                     f"{mem:.0f} | {r['kalman_loss_fwd_bwd_s'] * 1e3:.1f} |")
    lines.append("\nPeak memory on CPU is the peak RSS of the mode's own process (model, data, activations, "
                 "allocator caches); on GPU it is torch.cuda.max_memory_allocated.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--T", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--latent-dim", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
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
