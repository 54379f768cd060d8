"""Closed-loop return of a finished `train.py control` run's learned MPC, planned with other horizons.

    python bench/control_horizon.py --run runs/pendulum-control --horizons 10 15 20 30
    python bench/control_horizon.py --run runs/pendulum-control --horizons 15 --seed 300000   # unseen seeds

Loads ``<run>/checkpoint.pt`` (the final model) and ``<run>/config.json`` and runs the learned MPC (no
exploration noise) on --episodes env seeds from --seed, batched, as the run's own evaluation does
(`worldmodel.training.control.run_episodes`); only the planner's horizon changes. Prints the mean and every
episode's return per horizon.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from worldmodel.model import WorldModel
from worldmodel.training.config import TrainConfig
from worldmodel.training.control import ModelPolicy, run_episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished train.py control run directory")
    parser.add_argument("--horizons", type=int, nargs="+", default=[10, 15, 20, 30])
    parser.add_argument("--seed", type=int, default=100_000, help="first env seed (the run's evaluation: 100000)")
    parser.add_argument("--episodes", type=int, default=10)
    args = parser.parse_args()
    run = Path(args.run)
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    seeds = [args.seed + i for i in range(args.episodes)]
    for horizon in args.horizons:
        model = WorldModel.load(run / "checkpoint.pt").eval()
        model.config.planner["horizon"] = horizon
        out = run_episodes(cfg, ModelPolicy(model), seeds, cfg.control.episode_length, desc=f"horizon {horizon}")
        print(f"horizon {horizon:3d}: mean return {out['returns'].mean():8.1f}  episodes "
              f"{np.round(out['returns']).astype(int).tolist()}", flush=True)


if __name__ == "__main__":
    main()
