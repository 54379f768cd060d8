"""Closed-loop return of a finished `train.py control` run's learned MPC, planned with other horizons.

    python bench/control_horizon.py --run runs/pendulum-control --horizons 10 15 20 30
    python bench/control_horizon.py --run runs/pendulum-control --horizons 15 --seed 300000   # unseen seeds
    python bench/control_horizon.py --run runs/pendulum-control --horizons 20 25 --oracle     # and the score

Loads ``<run>/checkpoint.pt`` (the final model) and ``<run>/config.json`` and runs the learned MPC (no
exploration noise) on --episodes env seeds from --seed, batched, as the run's own evaluation does
(`worldmodel.training.control.run_episodes`); only the planner's horizon changes. Prints the mean and every
episode's return per horizon; with --oracle also the oracle's (the same planner on the simulator's true state and
dynamics, at the same horizon) and the normalised score against it and uniform random actions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from worldmodel.model import WorldModel
from worldmodel.planning import PlannerConfig
from worldmodel.training.config import TrainConfig
from worldmodel.training.control import ModelPolicy, OraclePolicy, RandomPolicy, run_episodes
from worldmodel.training.data import make_run_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished train.py control run directory")
    parser.add_argument("--horizons", type=int, nargs="+", default=[10, 15, 20, 30])
    parser.add_argument("--seed", type=int, default=100_000, help="first env seed (the run's evaluation: 100000)")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--oracle", action="store_true", help="also run the oracle and random actions: the score")
    args = parser.parse_args()
    run = Path(args.run)
    cfg = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))
    seeds = [args.seed + i for i in range(args.episodes)]
    length = cfg.control.episode_length
    show = lambda returns: f"mean return {returns.mean():8.1f}  episodes {np.round(returns).astype(int).tolist()}"
    if args.oracle:
        planner = PlannerConfig.from_overrides(cfg.model.planner)
        bounds = (np.asarray(planner.action_low, np.float32), np.asarray(planner.action_high, np.float32))
        random = run_episodes(cfg, RandomPolicy(*bounds), seeds, length, desc="random")["returns"]
        print(f"random     : {show(random)}", flush=True)
    for horizon in args.horizons:
        model = WorldModel.load(run / "checkpoint.pt").eval()
        model.config.planner["horizon"] = horizon
        learned = run_episodes(cfg, ModelPolicy(model), seeds, length, desc=f"horizon {horizon}")["returns"]
        print(f"horizon {horizon:3d}: {show(learned)}", flush=True)
        if args.oracle:
            env = make_run_env(cfg)
            oracle_planner = dataclasses.replace(planner, horizon=horizon)
            oracle = run_episodes(cfg, OraclePolicy(env.unwrapped, oracle_planner), seeds, length,
                                  desc=f"oracle {horizon}")["returns"]
            env.close()
            score = (learned.mean() - random.mean()) / (oracle.mean() - random.mean())
            print(f"oracle {horizon:3d}: {show(oracle)}\n  score at horizon {horizon}: {score:.3f}", flush=True)


if __name__ == "__main__":
    main()
