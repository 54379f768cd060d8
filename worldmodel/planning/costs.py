"""Quadratic stage costs with an exact expectation under a Gaussian state.

For h ~ N(m, P) and a stage cost quadratic in (h, u), E c(h, u) = c(m, u) + tr(Whh P): only the trace term sees
the covariance. In a linear-Gaussian latent model P does not depend on the actions, so N candidate sequences need
N mean rollouts and one trace per (problem, step) (DESIGN section 4b).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _as_tensor(x: Tensor | float, like: Tensor) -> Tensor:
    """x as a tensor of like's dtype and device (a Python scalar is filled in there: no host-to-device copy)."""
    return x.to(like) if isinstance(x, Tensor) else like.new_full((), x)


class QuadraticCost:
    """Stage cost c(h, u) = h^T Whh h + 2 h^T Whu u + u^T Wuu u + wh^T h + wu^T u + c0.

    Under h ~ N(m, P): E c = c(m, u) + tr(Whh P) (exact).
    Whh (n, n); Whu (n, a) or None; Wuu (a, a), a scalar (a multiple of I, for any a) or None (zero); wh (n,) or
    (B, n) (a target per problem) or None; wu (a,) or None; c0 scalar or (B,). Whh and a matrix Wuu are
    symmetrised ((W + W^T)/2, which leaves the cost unchanged). All tensors take Whh's dtype and device.
    """

    def __init__(self, Whh: Tensor, Wuu: Tensor | float | None = None, Whu: Tensor | None = None,
                 wh: Tensor | None = None, wu: Tensor | None = None, c0: Tensor | float = 0.0):
        if not isinstance(Whh, Tensor) or Whh.dim() != 2 or Whh.shape[0] != Whh.shape[1]:
            raise ValueError(f"Whh must be a square (n, n) tensor, got {getattr(Whh, 'shape', type(Whh))}")
        n = Whh.shape[0]
        self.Whh = (Whh + Whh.mT) / 2
        self.Whu, self.wh, self.wu, Wuu = (None if x is None else _as_tensor(x, Whh) for x in (Whu, wh, wu, Wuu))
        if Wuu is not None and (Wuu.dim() not in (0, 2) or Wuu.dim() == 2 and Wuu.shape[0] != Wuu.shape[1]):
            raise ValueError(f"Wuu must be a scalar or a square (a, a) tensor, got {tuple(Wuu.shape)}")
        self.Wuu = Wuu if Wuu is None or Wuu.dim() != 2 else (Wuu + Wuu.mT) / 2
        self.c0 = _as_tensor(c0, Whh)
        if self.Whu is not None and (self.Whu.dim() != 2 or self.Whu.shape[0] != n):
            raise ValueError(f"Whu must be (n, a) with n = {n}, got {tuple(self.Whu.shape)}")
        if self.wu is not None and self.wu.dim() != 1:
            raise ValueError(f"wu must be (a,), got {tuple(self.wu.shape)}")
        weights = {name: tuple(x.shape) for name, x in (("Whu", self.Whu), ("Wuu", self.Wuu), ("wu", self.wu))
                   if x is not None and x.dim()}
        if len({shape[-1] for shape in weights.values()}) > 1:
            raise ValueError(f"the action weights disagree on the action dimension a: {weights}")
        if self.wh is not None and (self.wh.dim() not in (1, 2) or self.wh.shape[-1] != n):
            raise ValueError(f"wh must be (n,) or (B, n) with n = {n}, got {tuple(self.wh.shape)}")
        if self.c0.dim() > 1:
            raise ValueError(f"c0 must be a scalar or (B,), got {tuple(self.c0.shape)}")

    @classmethod
    def goal(cls, C: Tensor, z_goal: Tensor, weight: float | Tensor = 1.0,
             action_weight: float | Tensor = 0.0) -> QuadraticCost:
        """E ||C h - z_goal||^2_W + action_weight ||u||^2: Whh = C^T W C, wh = -2 C^T W z_goal,
        c0 = z_goal^T W z_goal. C (L, n); z_goal (L,) or (B, L); weight scalar or (L,) (W = diag(weight));
        action_weight scalar or (a,) (diagonal)."""
        w = _as_tensor(weight, C).expand(C.shape[0])
        if z_goal.shape[-1] != C.shape[0] or z_goal.dim() not in (1, 2):
            raise ValueError(f"z_goal must be (L,) or (B, L) with L = {C.shape[0]}, got {tuple(z_goal.shape)}")
        action_weight = _as_tensor(action_weight, C)
        Wuu = torch.diag(action_weight) if action_weight.dim() == 1 else action_weight
        return cls(C.mT @ (w[:, None] * C), Wuu=Wuu, wh=-2 * (z_goal * w) @ C, c0=(z_goal.square() * w).sum(-1))

    @property
    def state_dim(self) -> int:
        return self.Whh.shape[0]

    def blocks(self, action_dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """(Whh (n, n), Whu (n, a), Wuu (a, a), wh (n,) or (B, n), wu (a,)) as dense tensors, zeros for None."""
        new = self.Whh.new_zeros
        Wuu = new(action_dim, action_dim) if self.Wuu is None else self.Wuu
        if Wuu.dim() == 0:
            Wuu = Wuu * torch.eye(action_dim, dtype=Wuu.dtype, device=Wuu.device)
        return (self.Whh, new(self.state_dim, action_dim) if self.Whu is None else self.Whu, Wuu,
                new(self.state_dim) if self.wh is None else self.wh, new(action_dim) if self.wu is None else self.wu)

    def stage(self, mean: Tensor, actions: Tensor, cov: Tensor | None = None) -> Tensor:
        """Expected stage costs E c(h_k, u_k), h_k ~ N(mean_k, cov_k).

        mean (B, N, H, n) or (B, H, n); actions the same leading dims + (a,); cov (B, H, n, n) (shared by the N
        candidates), (B, N, H, n, n), or anything broadcastable to (B, H, n, n), or None (= 0).
        Returns (B, N, H) or (B, H)."""
        if mean.dim() not in (3, 4) or mean.shape[-1] != self.state_dim or actions.shape[:-1] != mean.shape[:-1]:
            raise ValueError(f"mean must be (B, N, H, n) or (B, H, n) with n = {self.state_dim} and actions the "
                             f"same leading dims + (a,), got {tuple(mean.shape)} and {tuple(actions.shape)}")
        lead = (1,) * (mean.dim() - 2)  # a per-problem wh (B, n) / c0 (B,) broadcasts over (N,) H
        cost = (mean @ self.Whh * mean).sum(-1)
        if self.Whu is not None:
            cost = cost + 2 * (mean @ self.Whu * actions).sum(-1)
        if self.Wuu is not None:
            uWu = actions.square().sum(-1) * self.Wuu if self.Wuu.dim() == 0 else (actions @ self.Wuu * actions).sum(-1)
            cost = cost + uWu
        if self.wh is not None:
            cost = cost + (mean * (self.wh if self.wh.dim() == 1 else self.wh.view(len(self.wh), *lead, -1))).sum(-1)
        if self.wu is not None:
            cost = cost + actions @ self.wu
        cost = cost + (self.c0 if self.c0.dim() == 0 else self.c0.view(-1, *lead))
        if cov is None:
            return cost
        trace = torch.einsum("...ij,ji->...", cov, self.Whh)  # once per (B, H), not per candidate
        return cost + (trace.unsqueeze(1) if mean.dim() == 4 and trace.dim() == 2 else trace)

    def total(self, mean: Tensor, actions: Tensor, cov: Tensor | None = None) -> Tensor:
        """Expected cost of the sequences, stage(...).sum(-1): (B, N) or (B,)."""
        return self.stage(mean, actions, cov).sum(-1)

    def to(self, *args, **kwargs) -> QuadraticCost:
        """A copy with every tensor moved by Tensor.to(*args, **kwargs) (device and/or dtype)."""
        move = {k: None if v is None else v.to(*args, **kwargs) for k, v in vars(self).items()}
        return QuadraticCost(**move)

