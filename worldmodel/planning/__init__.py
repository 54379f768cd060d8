"""Planning in a latent model (DESIGN section 4b): costs (QuadraticCost, exact in expectation under a Gaussian
belief; RewardHead, a learned quadratic reward; ValueHead, a quadratic terminal value), solvers (mppi, cem for any
batched cost; lqr for linear dynamics with a quadratic cost) and the receding-horizon controller MPC(model, **overrides).act(belief)."""

from .costs import QuadraticCost
from .mpc import MPC, PlannerConfig, RecedingHorizon
from .reward import RewardHead, ValueHead, fit_reward_head
from .solvers import CostFn, cem, lqr, mppi

__all__ = ["MPC", "CostFn", "PlannerConfig", "QuadraticCost", "RecedingHorizon", "RewardHead", "ValueHead",
           "cem", "fit_reward_head", "lqr", "mppi"]
