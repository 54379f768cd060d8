"""The locally-linear prior's cost against the linear one: training step and planning rollout, on CPU.

    python bench/locally_linear.py [--threads 1] [--repeats 5]

1. One training step (``WorldModel.loss`` forward + backward) at the ModelConfig defaults (conv encoder on 64x64
   frames, latent 8, state 16, action 1) on a batch of 16 windows of 32 random frames, for ``kalman`` and
   ``kalman_ll`` in turn (interleaved, so that load from other processes hits both alike); and the prior's share
   of it (the objective on the step's latents, forward + backward).
2. ``candidate_rollout`` at B=1, N=256, H=30, S=16 (one solver iteration of the default planner), for the linear
   prior and the locally-linear one with both ``planning_cov`` settings.
Prints medians in milliseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from common import median_times  # noqa: E402

from worldmodel.kalman import Gaussian
from worldmodel.model import ModelConfig, WorldModel, shift_actions
from worldmodel.priors import KalmanLatentModel, LocallyLinearPrior


def timed(fn, repeats: int) -> float:
    """Median wall time of fn() in ms (``median_times`` of the Kalman benchmark, no warm-up)."""
    return 1000 * median_times(fn, repeats, warmup=0)["wall_s"]


def training_step(repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (16, 32, 64, 64, 3), dtype=torch.uint8, generator=gen)
    actions = torch.randn(16, 32, 1, generator=gen)
    runs = {}
    for method in ("kalman", "kalman_ll"):
        torch.manual_seed(0)
        model = WorldModel.from_config(ModelConfig(method=method))

        def step(model=model):
            model.zero_grad(set_to_none=True)
            model.loss(frames, actions).loss.backward()

        with torch.no_grad():
            z = model.encode(frames)

        def prior_share(model=model, z=z):
            latents = z.clone().requires_grad_()
            model.objective(latents, u=shift_actions(actions)).loss.backward()

        step(), prior_share()  # warm up
        runs[method] = (step, prior_share)
    results = {name: {"step": [], "prior": []} for name in runs}
    for _ in range(repeats):  # interleaved
        for name, (step, prior_share) in runs.items():
            results[name]["step"].append(timed(step, 1))
            results[name]["prior"].append(timed(prior_share, 1))
    for name, r in results.items():
        print(f"{name:10s} training step {statistics.median(r['step']):8.1f} ms   "
              f"prior share (objective on latents, fwd+bwd) {statistics.median(r['prior']):8.1f} ms")
    ratio = statistics.median(results["kalman_ll"]["step"]) / statistics.median(results["kalman"]["step"])
    print(f"step-time ratio kalman_ll / kalman: {ratio:.2f}")


def planning(repeats: int) -> None:
    batch, n, horizon = 1, 256, 30
    actions = torch.rand(batch, n, horizon, 1, generator=torch.Generator().manual_seed(1)) * 4 - 2
    priors = {"kalman (linear)": KalmanLatentModel(8, 16, 1)}
    for cov in ("mean", "each"):
        for hidden in (32, 0):
            priors[f"locally_linear K=8 hidden={hidden} planning_cov={cov}"] = \
                LocallyLinearPrior(8, 16, 1, hidden=hidden, planning_cov=cov)
    for name, prior in priors.items():
        with torch.no_grad():
            belief = prior.init_belief(batch)
            belief = Gaussian(belief.mean.clone(), belief.cov.clone())
        rollout = prior.candidate_rollout(belief, horizon)
        rollout(actions)
        ms = timed(lambda: rollout(actions), repeats * 6)
        print(f"candidate_rollout B=1 N=256 H=30 S=16  {name:45s} {ms:6.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    planning(args.repeats)
    training_step(args.repeats)


if __name__ == "__main__":
    main()
