"""Closed-loop return of a finished `train.py control` run's learned MPC, planned with other horizons or
terminal-value weights.

    python bench/control_horizon.py --run runs/pendulum-control --horizons 10 15 20 30
    python bench/control_horizon.py --run runs/pendulum-control --horizons 15 --seed 300000   # unseen seeds
    python bench/control_horizon.py --run runs/pendulum-control --horizons 20 25 --oracle     # and the score
    python bench/control_horizon.py --run runs/pendulum-control --horizons 25 --value-weights 0 1   # value head

Loads ``<run>/checkpoint.pt`` (the final model) and ``<run>/config.json`` and runs the learned MPC (no
exploration noise) on --episodes env seeds from --seed, batched, as the run's own evaluation does
(`worldmodel.training.control.run_episodes`); only the planner's horizon (and with --value-weights its
value_weight: the weight of the model's fitted value head at the horizon) changes. Prints the mean and every
episode's return per horizon; with --oracle also the oracle's (the same planner on the simulator's true state and
dynamics, at the same horizon, run once per horizon) and the normalised score against it and uniform random
actions.
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
    parser.add_argument("--value-weights", type=float, nargs="+", default=[None],
                        help="planner value_weight values to compare (default: the model's stored one)")
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
        oracle = _oracle_returns(cfg, planner, seeds, length)
    for horizon in args.horizons:
        for weight in args.value_weights:
            model = WorldModel.load(run / "checkpoint.pt").eval()
            model.config.planner["horizon"] = horizon
            if weight is not None:
                model.config.planner["value_weight"] = weight
            learned = run_episodes(cfg, ModelPolicy(model), seeds, length, desc=f"horizon {horizon}")["returns"]
            label = "" if weight is None else f", value weight {weight:g}"
            print(f"horizon {horizon:3d}{label}: {show(learned)}", flush=True)
            if args.oracle:
                print(f"  score: {(learned.mean() - random.mean()) / (oracle(horizon).mean() - random.mean()):.3f}")


def _oracle_returns(cfg, planner, seeds, length):
    """horizon -> the oracle's returns at that horizon (each run once)."""
    cache = {}

    def returns(horizon: int) -> np.ndarray:
        if horizon not in cache:
            env = make_run_env(cfg)
            oracle_planner = dataclasses.replace(planner, horizon=horizon)
            cache[horizon] = run_episodes(cfg, OraclePolicy(env.unwrapped, oracle_planner), seeds, length,
                                          desc=f"oracle {horizon}")["returns"]
            env.close()
            print(f"oracle {horizon:3d}: mean return {cache[horizon].mean():8.1f}", flush=True)
        return cache[horizon]
    return returns


if __name__ == "__main__":
    main()
