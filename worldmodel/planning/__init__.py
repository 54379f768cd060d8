"""Planning in a latent model: costs (QuadraticCost, exact in expectation under a Gaussian belief) and solvers
(mppi, cem for any batched cost; lqr for linear dynamics with a quadratic cost). DESIGN section 4b."""

from .costs import QuadraticCost
from .solvers import CostFn, cem, lqr, mppi

__all__ = ["CostFn", "QuadraticCost", "cem", "lqr", "mppi"]
