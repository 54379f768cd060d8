"""Planning time per control step: MPC.plan at the default model (latent 8, state 16, 1 action, a fitted reward
and value head) for each solver, plus the oracle's true-dynamics MPPI on the pendulum.

    python bench/planning.py                      # default planner (mppi, H=30, 256 samples, 6 iterations)
    python bench/planning.py --method kalman_ll --horizon 25   # the pendulum control run's model and planner
    python bench/planning.py --device cuda        # on a GPU
    python bench/planning.py --batch 10           # B beliefs planned at once (batched evaluation episodes)

Prints the median milliseconds per `plan` call over --repeats calls (after --warmup). On the CPU a plan of fewer
than SMALL_PLAN numbers per rollout step (beliefs x samples x state width) runs on one intra-op thread, a larger one
on all (`planning.mpc.planning_threads`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from common import median_times  # noqa: E402

from worldmodel.model import ModelConfig, WorldModel
from worldmodel.planning import MPC, PlannerConfig
from worldmodel.planning.mpc import RecedingHorizon, planning_threads


def _time(fn, warmup: int, repeats: int) -> float:
    """Median wall milliseconds of ``repeats`` calls after ``warmup`` (the Kalman benchmark's median_times)."""
    return 1000 * median_times(fn, repeats, warmup)["wall_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--method", default="kalman", help="the model's method (kalman_ll: locally linear; no lqr)")
    parser.add_argument("--horizon", type=int, default=None, help="planning horizon (default: PlannerConfig's)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    bounds = {"action_low": [-2.0], "action_high": [2.0]}
    if args.horizon:
        bounds["horizon"] = args.horizon
    model = WorldModel.from_config(ModelConfig(method=args.method, reward_head=True, planner=bounds)).to(device).eval()
    with torch.no_grad():  # any fitted quadratic reward and value: the cost's shape does not change the time
        for head in (model.reward_head, model.value_head):
            head.Whh.copy_(-torch.eye(head.state_dim)), head.fitted.fill_(True)
        model.reward_head.Wuu.fill_(-0.001)
    belief = model.init_belief(args.batch)
    print(f"MPC.plan, {args.method}, B={args.batch}, latent 8, state 16, {device}: median ms per control step")
    for solver in ("mppi", "cem", "lqr"):
        if solver == "lqr" and not hasattr(model.prior, "transition"):
            continue
        # lqr plans without the terminal value (it need not be convex)
        mpc = MPC(model, solver=solver, **({"value_weight": 0} if solver == "lqr" else {}))
        ms = _time(lambda: mpc.plan(belief), args.warmup, args.repeats)
        cfg = mpc.config
        print(f"  {solver:5s} H={cfg.horizon} N={cfg.samples} iterations={cfg.iterations}: {ms:7.2f} ms")
    if device.type == "cpu":
        from worldmodel.envs import make_env

        env = make_env("pendulum", image_size=16).unwrapped
        planner = PlannerConfig(**bounds)  # the same horizon
        solver = RecedingHorizon(planner, torch.tensor([-2.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64))
        state = torch.zeros(args.batch, 2, dtype=torch.float64)

        def oracle_cost(actions):
            s, total = state[:, None].expand(-1, actions.shape[1], -1), actions.new_zeros(actions.shape[:2])
            for h in range(actions.shape[2]):
                s, r = env.simulate(s, actions[:, :, h])
                total = total - r
            return total

        def oracle_plan():
            with planning_threads(state.device, args.batch * planner.samples, state.shape[1]):
                solver(oracle_cost, args.batch)

        ms = _time(oracle_plan, args.warmup, max(3, args.repeats // 4))
        print(f"  oracle (true pendulum dynamics, mppi H={planner.horizon} N={planner.samples}): {ms:7.2f} ms")


if __name__ == "__main__":
    main()
