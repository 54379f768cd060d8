"""Model-predictive control in the learned latent space: `MPC(model, **overrides).act(belief)`.

Every control step the planner minimises the *expected* cost of an action sequence over a horizon H under the
model's exact k-step predictive beliefs (`StateSpacePrior.candidate_rollout`): for the linear-Gaussian prior the
covariances do not depend on the actions, so N candidates cost N mean rollouts, and a quadratic cost has the
closed-form expectation (m - g)^T W (m - g) + tr(W P) (`QuadraticCost`): uncertainty enters without sampling the
dynamics. The first action is applied; the rest of the plan, shifted by one step, warm-starts the next call.

Costs, in order of precedence: `cost=` (any callable), `goal=` frames (E||C h - z_goal||^2 with z_goal the goal
frames' latents), else the model's fitted reward head (`WorldModel.reward`), plus value_weight x minus its fitted
value head at the horizon (`planning.ValueHead`: the discounted return beyond the plan, also exact in expectation).
Solvers: `mppi`, `cem` (any cost) and `lqr` (a linear prior and a convex quadratic cost; exact, with input bounds). Defaults come from `PlannerConfig`,
overridden by the model's stored `ModelConfig.planner`, then by the keyword overrides.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor

from worldmodel.kalman import Gaussian
from worldmodel.planning.costs import QuadraticCost
from worldmodel.planning.solvers import cem, lqr, mppi

__all__ = ["MPC", "PlannerConfig", "RecedingHorizon", "planning_threads"]

SOLVERS = ("mppi", "cem", "lqr")
# cost(means (B, N, H, S), covs (B, N or 1, H, S, S), actions (B, N, H, a)) -> expected total cost (B, N)
LatentCost = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class PlannerConfig:
    """Settings of the receding-horizon planner (stored with a model as ModelConfig.planner overrides)."""

    solver: Literal["mppi", "cem", "lqr"] = field(default="mppi", metadata={"help": "mppi, cem or lqr"})
    horizon: int = field(default=30, metadata={"help": "planning horizon H (steps)"})
    samples: int = field(default=256, metadata={"help": "candidate sequences per iteration (mppi, cem)"})
    iterations: int = field(default=6, metadata={"help": "solver iterations per control step (mppi, cem)"})
    elites: int = field(default=32, metadata={"help": "best candidates kept per iteration (mppi, cem)"})
    temperature: float = field(default=0.1, metadata={"help": "mppi temperature (unit-free)"})
    std: float = field(default=0.5, metadata={"help": "initial sampling std, fraction of the half action range"})
    action_weight: float = field(default=0.0, metadata={"help": "goal cost: weight of ||u||^2 per step"})
    value_weight: float = field(default=1.0, metadata={
        "help": "reward cost: weight of the model's fitted value head at the horizon (0 = none; mppi, cem)"})
    action_low: tuple[float, ...] | None = field(default=None, metadata={
        "help": "lower action bounds (a,) (train.py control stores the env's; none = ask for them)"})
    action_high: tuple[float, ...] | None = field(default=None, metadata={"help": "upper action bounds (a,)"})
    seed: int = field(default=0, metadata={"help": "seed of the solver's sampling (reset() restarts it)"})

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"planner solver must be one of {SOLVERS}, got {self.solver!r}")
        if min(self.horizon, self.samples, self.iterations, self.elites) < 1 or self.elites > self.samples:
            raise ValueError(f"planner needs horizon, samples, iterations >= 1 and 1 <= elites <= samples, got "
                             f"{self.horizon}, {self.samples}, {self.iterations}, {self.elites}")
        if not (self.temperature > 0 and self.std > 0 and self.action_weight >= 0 and self.value_weight >= 0):
            raise ValueError("planner needs temperature > 0, std > 0, action_weight >= 0 and value_weight >= 0")
        if (self.action_low is None) != (self.action_high is None) or (
                self.action_low is not None and (len(self.action_low) != len(self.action_high) or
                                                 any(lo >= hi for lo, hi in zip(self.action_low, self.action_high)))):
            raise ValueError(f"planner action_low / action_high must both be given, of equal length, low < high; got "
                             f"{self.action_low}, {self.action_high}")

    @classmethod
    def from_overrides(cls, *layers: dict) -> "PlannerConfig":
        """Defaults updated by each dict of overrides in turn; ValueError naming unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        merged: dict = {}
        for layer in layers:
            unknown = set(layer) - names
            if unknown:
                raise ValueError(f"unknown planner setting(s) {sorted(unknown)}; known: {sorted(names)}")
            merged.update(layer)
        return cls(**merged)


SMALL_PLAN = 16384  # numbers per rollout step (candidates x state width) below which a CPU plan runs on one thread


@contextlib.contextmanager
def planning_threads(device: torch.device, candidates: int, width: int):
    """Run a plan that rolls out ``candidates`` states (beliefs x samples) of ``width`` numbers each with one intra-op
    thread on the CPU when candidates x width < SMALL_PLAN, else with all. Measured on a quiet 2-core machine, 2
    threads against 1: one belief of the default model (256 x 16) 1.1x slower (10-20x slower on a busy machine);
    10 beliefs (2560 x 16) 1.35x faster (`kalman`) and 1.5x (`kalman_ll`); the pendulum oracle's 10 beliefs (2560 x
    2) 1.15x slower."""
    if device.type != "cpu" or candidates * width >= SMALL_PLAN:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class RecedingHorizon:
    """A sampling solver (mppi / cem) kept warm across control steps: each call starts from the last plan
    shifted by one step (the new last action repeats). Works for any `cost(actions (B, N, H, a)) -> (B, N)`."""

    def __init__(self, config: PlannerConfig, low: Tensor, high: Tensor):
        self.config, self.low, self.high = config, low, high
        self.generator: torch.Generator | None = None
        self.plan: Tensor | None = None

    def reset(self) -> None:
        self.plan, self.generator = None, None

    def warm_start(self, batch: int) -> Tensor:
        """The initial mean (B, H, a): the shifted last plan, or the middle of the action range."""
        if self.plan is not None and self.plan.shape[0] == batch:
            return torch.cat([self.plan[:, 1:], self.plan[:, -1:]], 1)
        middle = (self.low + self.high) / 2
        return middle.expand(batch, self.config.horizon, -1).clone()

    def __call__(self, cost: Callable[[Tensor], Tensor], batch: int) -> Tensor:
        """Plan (B, H, a) minimising `cost`; keeps it for the next call's warm start."""
        cfg = self.config
        if self.generator is None:
            self.generator = torch.Generator(device=self.low.device).manual_seed(cfg.seed)
        solver = mppi if cfg.solver == "mppi" else cem
        extra = {"temperature": cfg.temperature} if cfg.solver == "mppi" else {}
        self.plan = solver(cost, self.warm_start(batch), self.low, self.high, std=cfg.std, samples=cfg.samples,
                           iterations=cfg.iterations, elites=cfg.elites, generator=self.generator, **extra)
        return self.plan


class MPC:
    """Receding-horizon control of a `WorldModel` with a state-space prior (see the module docstring).

        mpc = MPC(model)                      # the model's reward head (trained on data with rewards)
        mpc = MPC(model, goal=goal_frames)    # reach the goal frames: E||C h - z_goal||^2
        mpc = MPC(model, cost=fn)             # fn(means (B,N,H,S), covs (B,N|1,H,S,S), actions (B,N,H,a)) -> (B,N)
        mpc.reset(); action = mpc.act(belief)

    `act` returns the first planned action, (a,) for a belief of batch size 1, else (B, a); `last_plan` holds the
    whole plan (B, H, a) and `last_ms` the planning time in milliseconds.
    """

    def __init__(self, model, goal: Tensor | None = None, cost: LatentCost | None = None, **overrides):
        if not model.can_filter:
            raise TypeError(f"MPC needs a model with a state-space prior (e.g. method 'kalman'); method "
                            f"{model.config.method!r} cannot predict beliefs")
        if not model.config.action_dim:
            raise ValueError("MPC needs a model trained with actions (its action_dim is 0): there is nothing to plan")
        self.model, self.prior = model, model.prior
        self.config = PlannerConfig.from_overrides(model.config.planner, overrides)
        a, cfg, ref = model.config.action_dim, self.config, self.prior.m0
        if cfg.action_low is None or len(cfg.action_low) != a:
            raise ValueError(f"MPC needs the action bounds: pass action_low=, action_high= ({a} values each; got "
                             f"{cfg.action_low}), or store them in ModelConfig.planner (train.py control does)")
        # filled in on the model's device (no host-to-device copy of a Python list)
        self.low, self.high = (torch.stack([ref.new_full((), float(v)) for v in bound])
                               for bound in (cfg.action_low, cfg.action_high))
        self.quadratic: QuadraticCost | None = None
        self.terminal: QuadraticCost | None = None  # minus the value head, at the horizon
        self.custom = cost
        if cost is None:
            self.quadratic = self._goal_cost(goal) if goal is not None else self._reward_cost()
            head = model.value_head
            if goal is None and cfg.value_weight > 0 and head is not None and bool(head.fitted):
                self.terminal = head.cost()
        if self.config.solver == "lqr":
            if self.quadratic is None or not hasattr(self.prior, "transition"):
                raise ValueError("solver 'lqr' needs a prior with linear mean dynamics (transition()) and a quadratic "
                                 "cost (a goal or the reward head), not a custom callable")
            if self.terminal is not None:
                raise ValueError("solver 'lqr' plans without a terminal value (the value head need not be convex): "
                                 "pass value_weight=0, or use mppi or cem")
        self.solver = RecedingHorizon(self.config, self.low, self.high)
        self.last_plan: Tensor | None = None
        self.last_ms = 0.0

    def _goal_cost(self, goal: Tensor) -> QuadraticCost:
        """E||C h - z_goal||^2 + action_weight ||u||^2, z_goal the latents of goal frames (H, W, C) or (B, H, W, C)."""
        goal = torch.as_tensor(goal)
        one = goal.dim() == len(self.model.frame_shape)
        frames = goal[None] if one else goal
        if tuple(frames.shape[1:]) != self.model.frame_shape:
            raise ValueError(f"goal must be one frame {self.model.frame_shape} or a batch (B, *{self.model.frame_shape}), "
                             f"got {tuple(goal.shape)}")
        with torch.no_grad():
            z_goal = self.model.encode(frames[:, None].to(self.prior.m0.device))[:, 0]
        if not torch.isfinite(z_goal).all():
            raise ValueError("the goal frame has NaN pixels: it has no latent to reach")
        z_goal = z_goal[0] if one else z_goal
        return QuadraticCost.goal(self.prior.C.detach(), z_goal.detach(), 1.0, self.config.action_weight)

    def _reward_cost(self) -> QuadraticCost:
        head = self.model.reward_head
        if head is None or not bool(head.fitted):
            raise ValueError("MPC needs a cost: pass goal= frames or cost=, or train the model with rewards "
                             "(ModelConfig.reward_head=True fits a reward head after training)")
        return head.cost()

    def reset(self) -> None:
        """Forget the warm start (call at the start of every episode)."""
        self.solver.reset()
        self.last_plan = None

    @torch.no_grad()
    def plan(self, belief: Gaussian) -> Tensor:
        """The plan (B, H, a) from beliefs mean (B, S), cov (B, S, S)."""
        mean, cov = belief
        if mean.dim() != 2 or mean.shape[-1] != self.prior.state_dim:
            raise ValueError(f"belief mean must have shape (B, {self.prior.state_dim}), got {tuple(mean.shape)}")
        if not (torch.isfinite(mean).all() and torch.isfinite(cov).all()):
            raise ValueError("the belief is not finite (NaN or inf in its mean or covariance): reset the filter "
                             "(model.init_belief) before planning")
        belief = Gaussian(mean.to(self.prior.m0.dtype), cov.to(self.prior.m0.dtype))
        start = time.perf_counter()
        with planning_threads(mean.device, mean.shape[0] * self.config.samples, mean.shape[1]):
            plan = self._solve(belief)
        self.last_ms = 1000 * (time.perf_counter() - start)
        self.last_plan = plan
        return plan

    def _solve(self, belief: Gaussian) -> Tensor:
        if self.config.solver == "lqr":
            A, G, c = self.prior.transition()
            cost = self.quadratic.to(device=A.device, dtype=A.dtype)
            return lqr(A, G, cost, belief.mean, self.config.horizon, c, self.low, self.high)
        rollout = self.prior.candidate_rollout(belief, self.config.horizon)
        return self.solver(lambda actions: self._expected_cost(rollout(actions), actions), belief.mean.shape[0])

    def _expected_cost(self, states: Gaussian, actions: Tensor) -> Tensor:
        """Expected total cost (B, N) of candidate sequences (B, N, H, a) reaching the state beliefs `states`."""
        if self.custom is not None:
            return self.custom(states.mean, states.cov, actions)
        total = self.quadratic.total(states.mean, actions, states.cov)
        if self.terminal is None:
            return total
        last = self.terminal.stage(states.mean[..., -1:, :], actions[..., -1:, :], states.cov[..., -1:, :, :])
        return total + self.config.value_weight * last[..., 0]

    def act(self, belief: Gaussian) -> Tensor:
        """The first action of the plan: (a,) for a belief of batch size 1, else (B, a)."""
        first = self.plan(belief)[:, 0]
        return first[0] if first.shape[0] == 1 else first
