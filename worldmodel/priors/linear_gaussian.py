"""KalmanLatentModel: the learned linear-Gaussian state-space prior (a `StateSpacePrior`) of the `kalman` presets.

DESIGN section 1 ("The Kalman latent model"; Mikulasch & Zenke 2026, Sec. 6.1)::

    h_t = A (h_{t-1} - b) + b + G u_{t-1} + w_t,   w_t ~ N(0, Sigma_A)     (state h_t in R^S)
    z_t = D h_t + v_t,                             v_t ~ N(0, Sigma_D)     (encoder latent z_t in R^L)

In :mod:`worldmodel.kalman`'s textbook names: C = D, Q = Sigma_A, R = Sigma_D, and the bias enters as a
constant control, ``B u = G u + (I - A) b``.  All filtering is exact (no sampling) and runs in float32
or float64; half-precision latents are upcast to float32.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from worldmodel.kalman import FilterResult, Gaussian, kalman_filter, predict, symmetrize, update
from worldmodel.priors.base import StateSpacePrior

__all__ = ["CholeskyCovariance", "GaussianStateSpace", "KalmanLatentModel", "spectral_radius_upper_bound", "initial_transition",
           "bounded_transition"]


def _full_precision(method):
    """Run a method with autocast disabled: the Kalman maths never runs in half precision."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with torch.autocast(self.A_raw.device.type, enabled=False):
            return method(self, *args, **kwargs)

    return wrapper


def spectral_radius_upper_bound(A: Tensor, squarings: int = 6) -> Tensor:
    """Differentiable upper bound on the spectral radius: ``||A^k||_2^(1/k) >= rho(A)`` with k = 2^squarings.

    Gelfand's formula; A^k is formed by repeated squaring with renormalisation (no overflow).  Exact for
    normal matrices, tight within a factor cond(V)^(1/k) otherwise.  Unlike eigenvalue derivatives,
    its gradient stays bounded at repeated or defective eigenvalues.  ``A``: ``(..., n, n)`` -> ``(...)``.
    """
    tiny = torch.finfo(A.dtype).tiny
    log_scale = torch.zeros(A.shape[:-2], dtype=A.dtype, device=A.device)
    M = A
    for _ in range(squarings):
        M = M @ M
        norm = torch.linalg.matrix_norm(M).clamp_min(tiny)  # Frobenius, for renormalisation only
        M = M / norm[..., None, None]
        log_scale = 2.0 * log_scale + norm.log()
    top = torch.linalg.matrix_norm(M, ord=2).clamp_min(tiny)
    return torch.exp((log_scale + top.log()) / 2.0**squarings)


def initial_transition(state_dim: int, init_radius: float) -> Tensor:
    """A transition matrix ``I + 0.1 N(0, 1)`` ``(S, S)`` rescaled to spectral radius ``init_radius`` (DESIGN: 0.91)."""
    A = torch.eye(state_dim) + 0.1 * torch.randn(state_dim, state_dim)
    return A * (init_radius / torch.linalg.eigvals(A).abs().max())


def bounded_transition(A_raw: Tensor, spectral_bound: float | None) -> Tensor:
    """``A_raw / max(1, rho_hat / spectral_bound)`` per matrix of ``A_raw`` ``(..., S, S)``, rho_hat =
    :func:`spectral_radius_upper_bound`: spectral radius <= ``spectral_bound`` (None: ``A_raw``); differentiable."""
    if spectral_bound is None:
        return A_raw
    scale = (spectral_radius_upper_bound(A_raw) / spectral_bound).clamp_min(1.0)
    return A_raw / scale[..., None, None]


def observation_noise(learned: Tensor, R: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """The learned observation noise ``learned`` ``(L, L)``, or the override ``R``: full ``shape + (L, L)`` or
    diagonal variances ``shape + (L,)``."""
    if R is None:
        return learned
    L = learned.shape[-1]
    if R.shape == (*shape, L):
        return torch.diag_embed(R)
    if R.shape == (*shape, L, L):
        return R
    raise ValueError(
        f"R must have shape {(*shape, L, L)} (full) or {(*shape, L)} (variances), got {tuple(R.shape)}"
    )


def batched_belief(belief: Gaussian, state_dim: int) -> Gaussian:
    """Check a belief ``(B, S)`` and give its covariance the batch dimension ``(B, S, S)``."""
    S = state_dim
    mean, cov = belief
    if mean.dim() != 2 or mean.shape[-1] != S or cov.shape[-2:] != (S, S):
        raise ValueError(
            f"belief must have mean (B, {S}) and cov (B, {S}, {S}), "
            f"got {tuple(mean.shape)}, {tuple(cov.shape)}"
        )
    return Gaussian(mean, cov.expand(mean.shape[0], S, S))


class CholeskyCovariance(nn.Module):
    """A learned covariance ``L L^T``; ``L`` lower triangular with diagonal ``min_std + exp(log_diag)``.

    ``full=False`` keeps ``L`` diagonal (a diagonal covariance with a learned log-scale per dimension).
    """

    def __init__(self, dim: int, init_std: float = 1.0, full: bool = False, min_std: float = 0.0):
        super().__init__()
        if not init_std > min_std >= 0.0:
            raise ValueError(f"need init_std > min_std >= 0, got init_std={init_std}, min_std={min_std}")
        self.min_std = float(min_std)
        self.log_diag = nn.Parameter(torch.full((dim,), math.log(init_std - min_std)))
        self.lower = nn.Parameter(torch.zeros(dim, dim)) if full else None

    def factor(self) -> Tensor:
        """The Cholesky factor ``L`` ``(dim, dim)``."""
        L = torch.diag_embed(self.min_std + self.log_diag.exp())
        return L if self.lower is None else L + torch.tril(self.lower, -1)

    def forward(self) -> Tensor:
        """The covariance ``(dim, dim)``."""
        if self.lower is None:
            return torch.diag_embed((self.min_std + self.log_diag.exp()).square())
        L = self.factor()
        return symmetrize(L @ L.mT)


class GaussianStateSpace(StateSpacePrior):
    """What the Gaussian state-space priors share: the dimensions and their checks, the observation model
    z = C h + v (C fixed [I 0] or learned), the process / observation noises Q, R and the initial belief N(m0, P0)
    as `CholeskyCovariance`s, and the learning-rate multiplier. Subclasses register their transition parameters
    between `_setup` and `_add_observation_and_noise` (that order keeps the random initialisation)."""

    def _setup(self, obs_dim: int, state_dim: int | None, action_dim: int, spectral_bound: float | None,
               lr_multiplier: float) -> int:
        """Check and store the dimensions, the spectral bound and the lr multiplier; returns S (default 2 L)."""
        if not lr_multiplier > 0:
            raise ValueError(f"lr_multiplier must be positive, got {lr_multiplier}")
        self.lr_multiplier = float(lr_multiplier)
        state_dim = 2 * obs_dim if state_dim is None else state_dim
        if obs_dim < 1 or state_dim < 1 or action_dim < 0:
            raise ValueError(
                f"need obs_dim >= 1, state_dim >= 1, action_dim >= 0; got {obs_dim}, {state_dim}, {action_dim}"
            )
        if spectral_bound is not None and not spectral_bound > 0:
            raise ValueError(f"spectral_bound must be positive or None, got {spectral_bound}")
        self.obs_dim, self.state_dim, self.action_dim = obs_dim, state_dim, action_dim
        self.spectral_bound = spectral_bound
        return state_dim

    def _add_observation_and_noise(self, learn_C: bool, full_cov: bool, q_std: float, r_std: float,
                                   min_noise_std: float) -> None:
        C = torch.eye(self.obs_dim, self.state_dim)
        if learn_C:
            self.C_param = nn.Parameter(C)
        else:
            self.register_buffer("C_param", C)
        self.Q_cov = CholeskyCovariance(self.state_dim, q_std, full_cov, min_noise_std)
        self.R_cov = CholeskyCovariance(self.obs_dim, r_std, full_cov, min_noise_std)
        self.m0 = nn.Parameter(torch.zeros(self.state_dim))
        self.P0_cov = CholeskyCovariance(self.state_dim, 1.0, full=True)

    @property
    def C(self) -> Tensor:
        """Observation matrix D ``(L, S)``."""
        return self.C_param

    @property
    @_full_precision
    def Q(self) -> Tensor:
        """Process noise Sigma_A ``(S, S)``."""
        return self.Q_cov()

    @property
    @_full_precision
    def R(self) -> Tensor:
        """Observation noise Sigma_D ``(L, L)``."""
        return self.R_cov()

    @property
    @_full_precision
    def P0(self) -> Tensor:
        """Initial state covariance ``(S, S)``."""
        return self.P0_cov()


class KalmanLatentModel(GaussianStateSpace):
    """Learned linear-Gaussian state-space model over encoder latents, with exact Kalman filtering.

    Args:
        obs_dim: L, the latent (observation) dimension.
        state_dim: S >= 1, the hidden state dimension (default 2 L).
        action_dim: k, the action dimension (0 = uncontrolled).
        learn_C: learn the observation matrix (default: fixed ``[I 0]``, the first L state coordinates).
        full_cov: full Cholesky factors for Q and R (default: diagonal with a learned log-scale).
        spectral_bound: on every forward the effective A is ``A_raw / max(1, rho_hat / spectral_bound)``
            with rho_hat = :func:`spectral_radius_upper_bound` (>= the spectral radius), so the spectral
            radius of A never exceeds the bound; differentiable.  None disables the bound.
        init_radius: A starts at ``I + 0.1 N(0, 1)`` rescaled to this spectral radius (DESIGN: 0.91).
        q_std, r_std: initial standard deviations of the process / observation noise.
        min_noise_std: floor added to the Cholesky diagonals of Q and R (keeps float32 filtering sane).
        lr_multiplier: learning-rate multiplier of these parameters relative to the encoder (the paper
            uses 100x).
    """

    def __init__(
        self,
        obs_dim: int,
        state_dim: int | None = None,
        action_dim: int = 0,
        learn_C: bool = False,
        full_cov: bool = False,
        spectral_bound: float | None = 1.02,
        init_radius: float = 0.91,
        q_std: float = 0.3,
        r_std: float = 0.3,
        min_noise_std: float = 1e-3,
        lr_multiplier: float = 100.0,
    ):
        super().__init__()
        state_dim = self._setup(obs_dim, state_dim, action_dim, spectral_bound, lr_multiplier)
        self.A_raw = nn.Parameter(initial_transition(state_dim, init_radius))
        self.b = nn.Parameter(torch.zeros(state_dim))
        self.G = nn.Parameter(torch.zeros(state_dim, action_dim))
        self._add_observation_and_noise(learn_C, full_cov, q_std, r_std, min_noise_std)

    # ---- effective parameters -------------------------------------------------------------------
    @property
    @_full_precision
    def A(self) -> Tensor:
        """Effective transition matrix ``(S, S)``, spectral radius <= spectral_bound."""
        return bounded_transition(self.A_raw, self.spectral_bound)

    def _control(self, A: Tensor, u: Tensor | None, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """``(B_aug, u_aug)`` with ``B_aug u_aug = G u + (I - A) b`` for controls ``u`` of ``shape + (k,)``
        (None = zero actions)."""
        eye = torch.eye(self.state_dim, dtype=A.dtype, device=A.device)
        B_aug = torch.cat([self.G, ((eye - A) @ self.b)[:, None]], 1)
        if u is None:  # no control given: zero actions
            u = self.b.new_zeros(*shape, self.action_dim)
        elif u.shape != (*shape, self.action_dim):
            raise ValueError(f"u must have shape {(*shape, self.action_dim)}, got {tuple(u.shape)}")
        return B_aug, torch.cat([u.to(B_aug.dtype), u.new_ones(*shape, 1, dtype=B_aug.dtype)], -1)

    def _obs_noise(self, R: Tensor | None, shape: tuple[int, ...]) -> Tensor:
        """Learned R, or the override: full ``shape + (L, L)`` or diagonal variances ``shape + (L,)``."""
        return observation_noise(self.R, R, shape)

    # ---- sequences ------------------------------------------------------------------------------
    @_full_precision
    def filter(
        self,
        z: Tensor,
        u: Tensor | None = None,
        mask: Tensor | None = None,
        R: Tensor | None = None,
        target: Tensor | None = None,
        parallel: bool = False,
    ) -> FilterResult:
        """Kalman filter over latents ``z`` ``(B, T, L)``; see :func:`worldmodel.kalman.kalman_filter`.

        ``u`` ``(B, T, k)`` with ``u[:, t]`` driving the transition into step t (already shifted);
        ``mask`` ``(B, T)`` bool, True = observed (NaN latents also count as missing);
        ``R`` overrides the learned observation noise per frame: ``(B, T, L, L)`` or variances ``(B, T, L)``;
        ``target`` ``(B, T, L)`` replaces z in the likelihood term only.
        """
        if z.dim() != 3 or z.shape[-1] != self.obs_dim:
            raise ValueError(f"z must have shape (B, T, {self.obs_dim}), got {tuple(z.shape)}")
        A = self.A
        B_aug, u_aug = self._control(A, u, tuple(z.shape[:2]))
        return kalman_filter(
            z, A, self.Q, self.C, self._obs_noise(R, tuple(z.shape[:2])), self.m0, self.P0,
            B_aug, u_aug, mask, parallel, target=target,
        )  # fmt: skip

    def log_prob(
        self,
        z: Tensor,
        u: Tensor | None = None,
        mask: Tensor | None = None,
        R: Tensor | None = None,
        stop_gradient_target: bool = False,
        target: Tensor | None = None,
        parallel: bool = False,
    ) -> Tensor:
        """Exact log P(z_{1:T} | u) = sum_t log N(z_t; C m_{t|t-1}, C P_{t|t-1} C^T + R), shape ``(B,)``.

        ``stop_gradient_target=True`` is DESIGN's stop-gradient plug-in: the innovation's target z_t is
        detached (``target = z.detach()``), while z_{<t} still carry gradient through the filter history.
        An explicit ``target`` (e.g. latents of an EMA target encoder) takes precedence.
        """
        if target is None and stop_gradient_target:
            target = z.detach()
        return self.filter(z, u, mask, R, target, parallel).log_likelihood

    def forward(self, z: Tensor, u: Tensor | None = None, mask: Tensor | None = None, **kwargs) -> Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(z, u, mask, **kwargs)

    # ---- online use -----------------------------------------------------------------------------
    def _batched(self, belief: Gaussian) -> Gaussian:
        """Check a belief ``(B, S)`` and give its covariance the batch dimension ``(B, S, S)``."""
        return batched_belief(belief, self.state_dim)

    @_full_precision
    def init_belief(self, batch_size: int) -> Gaussian:
        """Belief of h_0 before any observation, N(m0, P0), as ``(B, S)`` / ``(B, S, S)``."""
        S = self.state_dim
        return Gaussian(self.m0.expand(batch_size, S), self.P0.expand(batch_size, S, S))

    @_full_precision
    def step(
        self,
        belief: Gaussian,
        z_t: Tensor | None,
        u_t: Tensor | None = None,
        mask_t: Tensor | None = None,
        R_t: Tensor | None = None,
    ) -> Gaussian:
        """One online filter step: predict with ``u_t`` ``(B, k)``, then update with ``z_t`` ``(B, L)``.

        ``z_t=None`` (or NaN rows, or ``mask_t`` ``(B,)`` False) means predict only.  ``R_t``: per-frame
        observation noise ``(B, L, L)`` or variances ``(B, L)``.  Applied T times from
        :meth:`init_belief` it reproduces :meth:`filter`'s filtered beliefs.
        """
        belief = self._batched(belief)
        batch = belief.mean.shape[0]
        A = self.A
        B_aug, u_aug = self._control(A, u_t, (batch,))
        prior = predict(belief, A, self.Q, B_aug, u_aug)
        if z_t is None:
            return prior
        return update(prior, z_t, self.C, self._obs_noise(R_t, (batch,)), mask_t)[0]

    @_full_precision
    def rollout(self, belief: Gaussian, actions: Tensor | int) -> Gaussian:
        """Exact k-step predictive state beliefs N(m_{t+h|t}, P_{t+h|t}), h = 1..H, as ``(B, H, S)``.

        ``actions`` ``(B, H, k)``; ``actions[:, 0]`` is the action taken at the belief's step (it drives
        the first transition).  Without actions (``action_dim == 0``) pass the horizon H as an int.
        """
        belief = self._batched(belief)
        batch = belief.mean.shape[0]
        if isinstance(actions, int):
            actions = belief.mean.new_zeros(batch, actions, self.action_dim)
        if actions.dim() != 3 or actions.shape[0] != batch:
            raise ValueError(f"actions must have shape (B={batch}, H, {self.action_dim}), got {tuple(actions.shape)}")
        A, Q = self.A, self.Q
        B_aug, u_aug = self._control(A, actions, tuple(actions.shape[:2]))
        means, covs = [], []
        for h in range(actions.shape[1]):
            belief = predict(belief, A, Q, B_aug, u_aug[:, h])
            means.append(belief.mean)
            covs.append(belief.cov)
        S = self.state_dim
        if not means:
            return Gaussian(belief.mean.new_zeros(batch, 0, S), belief.mean.new_zeros(batch, 0, S, S))
        return Gaussian(torch.stack(means, 1), torch.stack(covs, 1))

    @_full_precision
    def rollout_beliefs(self, belief: Gaussian, actions: Tensor) -> Gaussian:
        """`StateSpacePrior.rollout_beliefs`: covariances shared by the batch (1, N, S, S) are rolled out once,
        (1, N, H, S, S) (they depend on neither the means nor the actions), the means (B, N, H, S) alone."""
        if belief.cov.shape[0] != 1 or belief.mean.shape[0] == 1 or actions.shape[2] == 0:
            return super().rollout_beliefs(belief, actions)
        covs = self.rollout(Gaussian(belief.mean[0], belief.cov[0]), actions.shape[2]).cov[None]
        A, G, c = self.transition()
        drive = rearrange(actions.to(A.dtype) @ G.mT + c, "b n h s -> h b n s")
        mean, means = belief.mean, []
        for step in drive:
            mean = mean @ A.mT + step
            means.append(mean)
        return Gaussian(torch.stack(means, 2), covs)

    @_full_precision
    def candidate_rollout(self, belief: Gaussian, horizon: int) -> Callable[[Tensor], Gaussian]:
        """`rollout` of N candidate action sequences (B, N, H, k) from beliefs (B, S), exact and cheap: the
        covariances do not depend on the actions, so they are rolled out here, once per belief (B, 1, H, S, S), and
        the returned function only propagates the N means, m_{h+1} = A m_h + G u_h + (I - A) b -> (B, N, H, S)."""
        belief = self._batched(belief)
        batch = belief.mean.shape[0]
        A, G, c = (x.detach() for x in self.transition())
        covs = self.rollout(belief, horizon).cov[:, None].detach()
        start = belief.mean.detach()

        def rollout(actions: Tensor) -> Gaussian:
            if actions.shape[0] != batch or actions.shape[2:] != (horizon, self.action_dim) or actions.dim() != 4:
                raise ValueError(f"actions must have shape (B={batch}, N, H={horizon}, {self.action_dim}), got "
                                 f"{tuple(actions.shape)}")
            n = actions.shape[1]
            # 2-d matmuls on contiguous rows: a batched matmul on an expanded belief is ~30x slower on CPU
            drive = rearrange(actions.to(A.dtype) @ G.mT + c, "b n h s -> h (b n) s").contiguous()
            mean, means = repeat(start, "b s -> (b n) s", n=n), []
            for h in range(horizon):
                mean = torch.addmm(drive[h], mean, A.mT)
                means.append(mean)
            return Gaussian(rearrange(torch.stack(means), "h (b n) s -> b n h s", b=batch), covs)

        return rollout

    def transition(self) -> tuple[Tensor, Tensor, Tensor]:
        """The mean dynamics h' = A h + G u + c as (A (S, S), G (S, k), c = (I - A) b (S,)): linear, as LQR needs."""
        A = self.A
        return A, self.G, self.b - A @ self.b

    @_full_precision
    def predict_observation(self, belief: Gaussian, R: Tensor | None = None) -> Gaussian:
        """Predictive distribution of the latent: N(C m, C P C^T + R), over any leading dims of ``belief``.

        ``R`` optionally overrides the learned noise (full ``(..., L, L)`` or variances ``(..., L)``).
        """
        C = self.C
        mean = belief.mean @ C.mT
        noise = self._obs_noise(R, tuple(belief.mean.shape[:-1]))
        return Gaussian(mean, symmetrize(C @ belief.cov @ C.mT + noise))
