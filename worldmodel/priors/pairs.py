"""Pair priors: the conditional P(z_{t+k} | z_t), k = 1..steps, of the image-SSL presets (plane, sphere, predictor).

`TransitionPrior` maps the context through `predict` (identity, a network g_k, or a bilinear map W_k) and
scores the target with one of three kernels:

    gaussian: log N(z'; m, sigma^2 I)    vmf: beta m^T z' / (|m| |z'|)    dot: m^T z'

`log_prob(context, target, step)` is elementwise over leading dims; `log_kernel` gives the pairwise matrix
that the `kde` entropy estimator needs (the InfoNCE denominator). The marginal of the first step is flat
(improper), as in the paper. Built by `plane` (VICReg), `sphere` (SimCLR), `predictor` (BYOL, SimSiam,
JEPA, CPC) and `action_predictor` (LeWorldModel: g_k also sees the actions u_{t+1..t+k}).
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from worldmodel.distributed import rank_mean
from worldmodel.priors.base import LatentPrior

__all__ = ["TransitionPrior", "plane", "sphere", "predictor", "action_predictor", "masked_mean", "pairwise_sq_dists"]

KERNELS = ("gaussian", "vmf", "dot")


class TransitionPrior(LatentPrior):
    """P(z_{t+k} | z_t) = kernel(z_{t+k}; predict(z_t, k)) for k = 1..steps (see module docstring).

    Args:
        kernel: "gaussian" (sigma), "vmf" (beta = 1 / temperature) or "dot" (bilinear critic).
        networks: one module per step mapping context (..., d) -> (..., d); None = identity
            (then the kernel is symmetric and the kde estimator pools all views as samples of one
            marginal, which is NT-Xent's denominator). With `action_dim` a > 0 the network of step k
            maps (..., d + k a), the context and the actions u_{t+1..t+k} concatenated, to (..., d).
        action_dim: size a of the controls u that condition the networks (0 = none).
    """

    def __init__(
        self,
        kernel: str,
        sigma: float = 1.0,
        beta: float = 1.0,
        networks: list[nn.Module] | None = None,
        action_dim: int = 0,
    ):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if sigma <= 0 or beta <= 0:
            raise ValueError(f"sigma and beta must be positive, got sigma={sigma}, beta={beta}")
        if action_dim < 0 or (action_dim and networks is None):
            raise ValueError(f"action_dim must be >= 0 and needs networks, got {action_dim}")
        self.kernel, self.sigma, self.beta = kernel, float(sigma), float(beta)
        self.networks = None if networks is None else nn.ModuleList(networks)
        self.action_dim = int(action_dim)

    @property
    def steps(self) -> int:
        """Number of prediction offsets k = 1..steps."""
        return 1 if self.networks is None else len(self.networks)

    @property
    def min_steps(self) -> int:
        return self.steps + 1

    @property
    def symmetric(self) -> bool:
        """True when log k(a, b) = log k(b, a) (no network between context and target)."""
        return self.networks is None

    def project(self, z: Tensor) -> Tensor:
        """Latents on the model's support, where entropies are measured: the unit sphere for the
        vmf kernel (so sphere + logdet/knn estimate an entropy on the sphere), else unchanged."""
        return nn.functional.normalize(z, dim=-1, eps=1e-8) if self.kernel == "vmf" else z

    def predict(self, context: Tensor, step: int = 1, actions: Tensor | None = None) -> Tensor:
        """The kernel centre for z_{t+step} given z_t = context (..., d) and, when the prior takes
        actions, actions (..., step * a) = u_{t+1..t+step} concatenated (None: zero controls)."""
        if not 1 <= step <= self.steps:
            raise ValueError(f"step must be in 1..{self.steps}, got {step}")
        if self.networks is None:
            return context
        if self.action_dim:
            if actions is None:
                actions = context.new_zeros(*context.shape[:-1], step * self.action_dim)
            context = torch.cat([context, actions], dim=-1)
        return self.networks[step - 1](context)

    def alignment(self, z, u=None, mask=None, target=None, R=None) -> Tensor:
        """Mean over k = 1..steps of the mean log P(target_{t+k} | z_t, u_{t+1..t+k}) over observed pairs;
        target defaults to z. u (B, T, a), u[:, t] driving the transition into step t, is used when the
        prior takes actions (None: zero controls) and ignored otherwise."""
        target = z if target is None else target
        if self.action_dim and u is not None and u.shape[-1] != self.action_dim:
            raise ValueError(f"u: this predictor takes actions of size {self.action_dim}, got {u.shape[-1]}")
        terms = []
        for k in range(1, self.steps + 1):
            pair_mask = None if mask is None else mask[:, :-k] & mask[:, k:]
            actions = None
            if self.action_dim and u is not None:  # u_{t+1..t+k} for every context t = 0..T-k-1
                actions = rearrange(u[:, 1:].unfold(1, k, 1), "b n a k -> b n (k a)")
            terms.append(masked_mean(self.log_prob(z[:, :-k], target[:, k:], k, actions), pair_mask))
        return torch.stack(terms).mean()

    def log_prob(self, context: Tensor, target: Tensor, step: int = 1, actions: Tensor | None = None) -> Tensor:
        """log P(target | context, actions) for aligned (..., d) tensors -> (...) (actions: see `predict`)."""
        mean = self.predict(context, step, actions)
        d = target.shape[-1]
        if self.kernel == "gaussian":
            return self._gaussian((target - mean).pow(2).sum(-1), d)
        if self.kernel == "vmf":
            return self.beta * nn.functional.cosine_similarity(mean, target, dim=-1, eps=1e-8)
        return (mean * target).sum(-1)

    def log_kernel(self, context: Tensor, target: Tensor, step: int = 1) -> Tensor:
        """Pairwise log P(target_j | context_i): context (..., N, d), target (..., M, d) -> (..., N, M)."""
        mean = self.predict(context, step)
        d = target.shape[-1]
        if self.kernel == "gaussian":
            return self._gaussian(pairwise_sq_dists(mean, target), d)
        if self.kernel == "vmf":
            mean = nn.functional.normalize(mean, dim=-1, eps=1e-8)
            target = nn.functional.normalize(target, dim=-1, eps=1e-8)
            return self.beta * mean @ target.transpose(-1, -2)
        return mean @ target.transpose(-1, -2)


    def _gaussian(self, sq: Tensor, d: int) -> Tensor:
        """log N of squared distances sq under the isotropic kernel N(0, sigma^2 I) in d dimensions."""
        return -0.5 * sq / self.sigma**2 - 0.5 * d * math.log(2 * math.pi * self.sigma**2)


def plane(sigma: float = 1.0) -> TransitionPrior:
    """Gaussian transition on the plane: z' ~ N(z, sigma^2 I) (VICReg's invariance term)."""
    return TransitionPrior("gaussian", sigma=sigma)


def sphere(beta: float = 10.0) -> TransitionPrior:
    """von Mises-Fisher on the unit sphere: log P(z'|z) = beta z^T z' + const on normalised z
    (SimCLR with temperature 1 / beta)."""
    return TransitionPrior("vmf", beta=beta)


def predictor(
    dim: int,
    kind: str = "mlp",
    hidden: int | None = None,
    steps: int = 1,
    sigma: float = 1.0,
    beta: float | None = None,
) -> TransitionPrior:
    """Learned predictor g_k: z_{t+k} ~ N(g_k(z_t), sigma^2 I), or vMF around g_k(z_t) if `beta`.

    kind: "mlp" (Linear-ReLU-Linear, `hidden` units, default 4 dim; BYOL/SimSiam/JEPA),
    "linear" (Linear), or "bilinear" (CPC's critic log f_k = z_{t+k}^T W_k z_t, W_k init I).
    Without actions (`action_predictor` adds them: it is a prior of its own because WorldModel hands its
    action_dim to every prior that takes one).
    """
    return action_predictor(dim, 0, kind, hidden, steps, sigma, beta)


def action_predictor(
    dim: int,
    action_dim: int = 0,
    kind: str = "mlp",
    hidden: int | None = None,
    steps: int = 1,
    sigma: float = 1.0,
    beta: float | None = None,
) -> TransitionPrior:
    """`predictor` conditioned on the actions: z_{t+k} ~ N(g_k(z_t, u_{t+1..t+k}), sigma^2 I) (LeWorldModel's
    predictor of the next latent from (z_t, a_t) for k = 1); g_k sees the k actions concatenated, zeros when
    no actions are given. kind "mlp" or "linear" when action_dim > 0 (CPC's bilinear critic has none).
    """
    if dim < 1 or steps < 1 or action_dim < 0:
        raise ValueError(f"dim and steps must be >= 1 and action_dim >= 0, got {dim}, {steps}, {action_dim}")
    kinds = ("mlp", "linear", "bilinear")
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
    if kind == "bilinear" and action_dim:
        raise ValueError("kind='bilinear' (CPC's critic) takes no actions: use mlp or linear with action_dim > 0")
    hidden = hidden or 4 * dim

    def network(step: int) -> nn.Module:
        inputs = dim + step * action_dim
        if kind == "mlp":
            return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        layer = nn.Linear(inputs, dim, bias=kind == "linear")
        if kind == "bilinear":
            nn.init.eye_(layer.weight)
        return layer

    networks = [network(k) for k in range(1, steps + 1)]
    if kind == "bilinear":
        return TransitionPrior("dot", networks=networks)
    if beta is not None:
        return TransitionPrior("vmf", beta=beta, networks=networks, action_dim=action_dim)
    return TransitionPrior("gaussian", sigma=sigma, networks=networks, action_dim=action_dim)


def masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of x (B, T) over the entries where mask (B, T) is True (all when mask is None). Under DDP the
    count is the ranks' mean count (`distributed.rank_mean`), so the rank average is the global mean."""
    if mask is None:
        return x.mean()
    return (x * mask).sum() / rank_mean(mask.sum()).clamp_min(1)


def pairwise_sq_dists(x: Tensor, y: Tensor) -> Tensor:
    """Squared Euclidean distances (..., N, M) between rows of x (..., N, D) and y (..., M, D)."""
    sq = (x * x).sum(-1)[..., :, None] + (y * y).sum(-1)[..., None, :] - 2 * x @ y.transpose(-1, -2)
    return sq.clamp_min(0)
