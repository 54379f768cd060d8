"""Closed-loop return of a finished `train.py control` run's learned MPC, planned with other horizons, solver
iterations or terminal-value weights.

    python bench/control_horizon.py --run runs/pendulum-control --horizons 10 15 20 30
    python bench/control_horizon.py --run runs/pendulum-control --horizons 15 --seed 300000   # unseen seeds
    python bench/control_horizon.py --run runs/pendulum-control --horizons 20 25 --oracle     # and the score
    python bench/control_horizon.py --run runs/pendulum-control --horizons 25 --value-weights 0 1   # value head
    python bench/control_horizon.py --run runs/pendulum-control --horizons 15 25 --iterations 4 6 --oracle \
        --oracle-horizon 25                                                   # every pair, against one oracle

Loads ``<run>/checkpoint.pt`` (the final model) and ``<run>/config.json`` and runs the learned MPC (no
exploration noise) on --episodes env seeds from --seed, batched, as the run's own evaluation does
(`worldmodel.training.control.run_episodes`); only the planner's horizon (and with --iterations its solver
iterations, with --value-weights its value_weight: the weight of the model's fitted value head at the horizon)
changes. Prints the mean and every episode's return per setting, and the median planning ms per step of the
batch; with --oracle also the oracle's (the run's planner on the simulator's true state and dynamics, at the
same horizon or at --oracle-horizon, run once per horizon) and the normalised score against it and uniform
random actions.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
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
    parser.add_argument("--iterations", type=int, nargs="+", default=[None],
                        help="planner iterations to compare (default: the model's stored ones)")
    parser.add_argument("--value-weights", type=float, nargs="+", default=[None],
                        help="planner value_weight values to compare (default: the model's stored one)")
    parser.add_argument("--oracle", action="store_true", help="also run the oracle and random actions: the score")
    parser.add_argument("--oracle-horizon", type=int, default=None,
                        help="the oracle's horizon for every score (default: each setting's own horizon)")
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
    for horizon, iterations, weight in itertools.product(args.horizons, args.iterations, args.value_weights):
        model = WorldModel.load(run / "checkpoint.pt").eval()
        changes = {"horizon": horizon, "iterations": iterations, "value_weight": weight}
        model.config.planner.update({k: v for k, v in changes.items() if v is not None})
        policy = ModelPolicy(model)
        learned = run_episodes(cfg, policy, seeds, length, desc=f"horizon {horizon}")["returns"]
        label = "".join(f", {k} {v:g}" for k, v in changes.items() if k != "horizon" and v is not None)
        print(f"horizon {horizon:3d}{label}: {show(learned)}  planning {np.median(policy.plan_ms):.1f} ms/step",
              flush=True)
        if args.oracle:
            reference = oracle(args.oracle_horizon or horizon).mean()
            print(f"  score: {(learned.mean() - random.mean()) / (reference - random.mean()):.3f}")


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
