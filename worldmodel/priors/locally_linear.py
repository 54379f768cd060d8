"""LocallyLinearPrior: a state-space prior whose transition is a state-dependent mixture of K linear systems.

In the style of the Recurrent Kalman Network (Becker et al., ICML 2019) and E2C (Watter et al., NeurIPS 2015)::

    h_t = A(m) h_{t-1} + G(m) u_{t-1} + c(m) + w_t,    w_t ~ N(0, Q)          (state h_t in R^S)
    z_t = C h_t + v_t,                                 v_t ~ N(0, R)          (encoder latent z_t in R^L)
    A(m) = sum_k alpha_k(m) A_k,  G(m) = sum_k alpha_k(m) G_k,  c(m) = sum_k alpha_k(m) c_k,
    alpha(m) = softmax(gate(m))          (gate: a small MLP, or a linear map, of the belief mean m)

The linearisation point m is the current belief mean: the filtered mean m_{t-1|t-1} when filtering, the
predicted mean m_{t+h-1|t} when rolling out. Given m the step is linear-Gaussian, so each step is an exact Kalman
predict and update with the local (A, G, c), and the belief stays Gaussian: an *assumed-density* filter (the
covariance is propagated with the local A(m), as RKN does, not with the Jacobian of h -> A(h) h). The one-step
predictive log-likelihood is the sum of the innovation log-densities, as for KalmanLatentModel.

alpha depends on m *with* gradient by default (``detach_alpha=False``): the computed likelihood is a function of
the history through the linearisation points, and its exact gradient includes how the encoder's latents move
them (RKN and E2C backpropagate through their coefficient networks alike); detaching would give a biased
gradient that ignores that the chosen local model depends on the past. ``detach_alpha=True`` is the option
(the gate's own parameters learn either way).

The same C = [I 0] (fixed by default), Q, R and (m0, P0) parameterisation as KalmanLatentModel, whose pieces are
reused (CholeskyCovariance, the A initialisation and the spectral bound, here per basis matrix). Every A_k starts
at the *same* draw I + 0.1 N(0, 1) rescaled to spectral radius 0.91, G_k = 0 and c_k = 0: at initialisation the
prior IS a KalmanLatentModel (alpha sums to 1); the gate's random initialisation makes the bases' gradients
differ, which separates them. `copy_kalman` loads a (trained) KalmanLatentModel into every basis. Note that
the bound holds per A_k: a convex combination of matrices of spectral radius <= 1.02 has spectral norm <= their
largest, but its spectral radius is not bounded by theirs in general (non-normal A_k).

There is no `transition()`: the mean dynamics are not linear, so MPC's `lqr` solver refuses this prior; mppi and
cem plan with `candidate_rollout`, whose covariances depend on the actions (``planning_cov``).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from worldmodel.kalman import FilterResult, Gaussian, predict, symmetrize, update
from worldmodel.kalman.checks import _dtype
from worldmodel.kalman.types import _JITTERS, _jitter_diagonal, log_prob_from_cholesky
from worldmodel.priors.linear_gaussian import (GaussianStateSpace, KalmanLatentModel, _full_precision,
                                               batched_belief, bounded_transition, initial_transition,
                                               observation_noise)

__all__ = ["LocallyLinearPrior"]

PLANNING_COVS = ("each", "mean")


class _Gate(nn.Module):
    """logits (..., K) of the mixture weights from the belief mean (..., S): Linear-ReLU-Linear, or one Linear map
    (``hidden=0``). Runs in the input's dtype (its weights are cast), so float64 filtering of a float32 model works."""

    def __init__(self, state_dim: int, num_bases: int, hidden: int):
        super().__init__()
        self.hidden = nn.Linear(state_dim, hidden) if hidden else None
        self.out = nn.Linear(hidden or state_dim, num_bases)

    def weights(self, dtype: torch.dtype) -> list[Tensor]:
        """(W1, b1, W2, b2) (or (W, b) for a linear gate) in ``dtype``."""
        layers = [self.out] if self.hidden is None else [self.hidden, self.out]
        return [p.to(dtype) for layer in layers for p in (layer.weight, layer.bias)]

    def forward(self, m: Tensor) -> Tensor:
        w = self.weights(m.dtype)
        if len(w) == 4:
            m = torch.relu(F.linear(m, w[0], w[1]))
        return F.linear(m, w[-2], w[-1])


class LocallyLinearPrior(GaussianStateSpace):
    """Locally-linear Gaussian state-space prior with assumed-density filtering (see the module docstring).

    Args:
        obs_dim: L, the latent (observation) dimension.
        state_dim: S >= 1, the hidden state dimension (default 2 L).
        action_dim: a, the action dimension (0 = uncontrolled).
        num_bases: K, the number of linear systems (A_k, G_k, c_k) mixed (K = 1: a linear-Gaussian model).
        hidden: hidden width of the gate MLP m -> logits of alpha (0: a linear map).
        detach_alpha: compute alpha from the detached belief mean (no gradient through the linearisation point).
        planning_cov: covariances of `candidate_rollout`: "mean" (default: every candidate's mean rolled out, one
            covariance sequence per problem (B, 1, H, S, S), that of the first call's candidate 0, the warm start;
            the planner's trace term is then one constant per control step and ranks no candidates, as with the
            linear prior)
            or "each" (exact per candidate (B, N, H, S, S)). Measured (bench/locally_linear.py --threads 1, a call
            after the first, B=1, N=256, H=30, S=16, K=8, a quiet 2-core AVX2 CPU, 2026-12-08): linear prior
            0.53 ms, "mean" 3.0 ms, "each" 22 ms.
        learn_C, full_cov, spectral_bound (per basis A_k), init_radius, q_std, r_std, min_noise_std, lr_multiplier:
            as for :class:`~worldmodel.priors.KalmanLatentModel` (the lr multiplier also applies to the gate).
    """

    def __init__(
        self,
        obs_dim: int,
        state_dim: int | None = None,
        action_dim: int = 0,
        num_bases: int = 8,
        hidden: int = 32,
        detach_alpha: bool = False,
        planning_cov: str = "mean",
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
        if num_bases < 1 or hidden < 0:
            raise ValueError(f"need num_bases >= 1 and hidden >= 0, got {num_bases}, {hidden}")
        if planning_cov not in PLANNING_COVS:
            raise ValueError(f"planning_cov must be one of {PLANNING_COVS}, got {planning_cov!r}")
        state_dim = self._setup(obs_dim, state_dim, action_dim, spectral_bound, lr_multiplier)
        self.num_bases, self.detach_alpha, self.planning_cov = num_bases, bool(detach_alpha), planning_cov

        # one draw for all bases, first (so that with a seed, K = 1 draws KalmanLatentModel's A)
        self.A_raw = nn.Parameter(initial_transition(state_dim, init_radius).repeat(num_bases, 1, 1))
        self.G = nn.Parameter(torch.zeros(num_bases, state_dim, action_dim))
        self.c = nn.Parameter(torch.zeros(num_bases, state_dim))
        self._add_observation_and_noise(learn_C, full_cov, q_std, r_std, min_noise_std)
        self.gate = _Gate(state_dim, num_bases, hidden)

    # ---- effective parameters -------------------------------------------------------------------
    @property
    @_full_precision
    def A(self) -> Tensor:
        """The basis transition matrices ``(K, S, S)``, each of spectral radius <= spectral_bound."""
        return bounded_transition(self.A_raw, self.spectral_bound)

    def alpha(self, mean: Tensor) -> Tensor:
        """Mixture weights ``(..., K)`` (softmax, summing to 1) at belief means ``(..., S)``."""
        return torch.softmax(self.gate(mean.detach() if self.detach_alpha else mean), -1)

    def _bases(self, dtype: torch.dtype, E: Tensor | None = None) -> Tensor:
        """The bases [A_k, G_k, c_k] in ``dtype`` as ``(K, S, S + a + 1)``, left-multiplied by ``E`` ``(r, S)``
        when given (then ``(K, r, S + a + 1)``)."""
        bases = torch.cat([self.A, self.G, self.c[..., None]], -1).to(dtype)
        return bases if E is None else E @ bases

    def _local(self, mean: Tensor, bases: Tensor) -> tuple[Tensor, Tensor]:
        """The local system at belief means ``(B, S)`` from ``_bases`` ``(K, r, S + a + 1)``, with one product:
        (E) A(m) ``(B, r, S)`` and (E) [G(m), c(m)] ``(B, r, a + 1)``."""
        local = (self.alpha(mean) @ bases.flatten(1)).view(mean.shape[0], *bases.shape[1:])
        return local[..., :self.state_dim], local[..., self.state_dim:]

    def _control(self, u: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
        """Augmented controls [u, 1] ``shape + (a + 1,)`` (None = zero actions)."""
        if u is None:
            u = torch.zeros(*shape, self.action_dim, dtype=dtype, device=device)
        elif u.shape != (*shape, self.action_dim):
            raise ValueError(f"u must have shape {(*shape, self.action_dim)}, got {tuple(u.shape)}")
        return torch.cat([u.to(dtype), torch.ones(*shape, 1, dtype=dtype, device=device)], -1)

    @torch.no_grad()
    def copy_kalman(self, kalman: KalmanLatentModel) -> "LocallyLinearPrior":
        """Load a KalmanLatentModel of the same sizes and covariance structure into every basis (A_k = its A_raw,
        G_k = its G, c_k = (I - A) b) and its C, Q, R, m0, P0: the prior then computes exactly what it does, and
        training refines the bases from there (e.g. warm-starting from a trained `kalman` model). Returns self."""
        if (kalman.obs_dim, kalman.state_dim, kalman.action_dim) != (self.obs_dim, self.state_dim, self.action_dim):
            raise ValueError("copy_kalman needs the same obs_dim, state_dim and action_dim")
        if kalman.spectral_bound != self.spectral_bound:
            raise ValueError(f"copy_kalman needs the same spectral_bound, got {kalman.spectral_bound}")
        A = kalman.A
        self.A_raw.copy_(kalman.A_raw.expand_as(self.A_raw))
        self.G.copy_(kalman.G.expand_as(self.G))
        self.c.copy_((kalman.b - A @ kalman.b).expand_as(self.c))
        self.C_param.copy_(kalman.C_param)
        self.m0.copy_(kalman.m0)
        for name in ("Q_cov", "R_cov", "P0_cov"):
            getattr(self, name).load_state_dict(getattr(kalman, name).state_dict())
        return self

    # ---- sequences ------------------------------------------------------------------------------
    @_full_precision
    def filter(self, z: Tensor, u: Tensor | None = None, mask: Tensor | None = None, R: Tensor | None = None,
               target: Tensor | None = None) -> FilterResult:
        """Assumed-density filter over latents ``z`` ``(B, T, L)``: per step, predict with the local system at the
        filtered mean, then the Kalman update; returns what :func:`worldmodel.kalman.kalman_filter` does.

        ``u`` ``(B, T, a)``, ``u[:, t]`` driving the transition into step t; ``mask`` ``(B, T)`` bool, True =
        observed (NaN latents also count as missing: only predicted, no likelihood term); ``R`` per-frame
        observation noise ``(B, T, L, L)`` or variances ``(B, T, L)``; ``target`` ``(B, T, L)`` replaces z in
        the likelihood term only. Float32 or float64 (half precision is upcast).
        """
        if z.dim() != 3 or z.shape[-1] != self.obs_dim or z.shape[1] == 0:
            raise ValueError(f"z must have shape (B, T >= 1, {self.obs_dim}), got {tuple(z.shape)}")
        if target is not None and target.shape != z.shape:
            raise ValueError(f"target must have the shape of z {tuple(z.shape)}, got {tuple(target.shape)}")
        batch, steps, _ = z.shape
        dtype = _dtype(z, self.A_raw, target)
        missing = torch.isnan(z).any(-1)
        if target is not None:
            missing = missing | torch.isnan(target).any(-1)
        if mask is not None:
            if tuple(mask.shape) != (batch, steps):
                raise ValueError(f"mask must have shape (B, T) = {(batch, steps)}, got {tuple(mask.shape)}")
            missing = missing | ~mask.to(torch.bool)
        observed = None
        z = z.to(dtype)
        if bool(missing.any()):  # one host sync; fully observed windows (training) skip the masking per step
            observed = ~missing
            z = torch.where(observed[..., None], z, 0.0)
            if target is not None:
                target = torch.where(observed[..., None], target.to(dtype), 0.0)
            observed = observed.to(dtype)
        elif target is not None:
            target = target.to(dtype)
        u_aug = self._control(u, (batch, steps), dtype, z.device)
        R = observation_noise(self.R, R, (batch, steps)).to(dtype)
        for jitter in _JITTERS:
            result, ok = self._filter(z, u_aug, observed, R, target, jitter)
            if ok:
                if jitter:
                    warnings.warn(f"LocallyLinearPrior.filter: Cholesky failed, used relative jitter {jitter:g}",
                                  RuntimeWarning)
                return result
        raise FloatingPointError("LocallyLinearPrior.filter: innovation covariance not positive definite")

    def _filter(self, z, u_aug, observed, R, target, jitter) -> tuple[FilterResult, bool]:
        """The filter with one Cholesky factorisation per step of the joint covariance of (z_t, h_t) given the past:

            J_t = E_t (A_t P_{t-1|t-1} A_t^T + Q) E_t^T + [[R_t, 0], [0, 0]],   E_t = [o_t C; I],
            chol(J_t) = [[L_t, 0], [W_t^T, F_t]],

        where o_t is 1 at an observed step and 0 at a missing one: L_t L_t^T = S_t = C P_{t|t-1} C^T + R_t, W_t =
        L_t^{-1} C P_{t|t-1} and F_t F_t^T = P_{t|t-1} - W_t^T W_t = P_{t|t} (at a missing step W_t = 0 and F_t =
        chol P_{t|t-1}: a pure predict). The step carries F_t, so J_t = (E_t A_t F_{t-1})(E_t A_t F_{t-1})^T + J0_t
        (J0_t = E_t Q E_t^T + R_t's block): P_{t|t} stays positive definite by construction, and a step is a few
        batched ops (the gate, A_t, two products, one Cholesky, one triangular solve) where the predict-then-update
        form takes about twice as many, each an autograd node. J_t is formed from the float32 products and factorised
        in float64: its h-block pivots are P_{t|t}, which a precise observation (small R) makes small against
        P_{t|t-1}, and float32 round-off in J_t would then make it indefinite (measured: a Cholesky failure while
        fine-tuning the pendulum control model). ``jitter`` > 0 adds ``_jitter_diagonal`` of the S_t block to it."""
        batch, steps, m = z.shape
        dtype, S = z.dtype, self.state_dim
        Q, C = self.Q.to(dtype), self.C.to(dtype)
        E = torch.cat([C, torch.eye(S, dtype=dtype, device=z.device)])  # (m + S, S): h -> (C h, h)
        bases = self._bases(dtype, E)  # one product with alpha gives E A_t and E [G_t, c_t]: the local (C h, h)
        J0 = (E @ Q @ E.mT).double()  # J_t is formed and factorised in float64 (see below)
        if observed is not None:  # E_t = [o_t C; I]: the rows of C vanish at missing steps
            rows = F.pad(observed[..., None].expand(batch, steps, m), (0, S), value=1.0)[..., None]  # (B, T, m + S, 1)
            J0 = J0 * rows * rows.mT
        J0 = J0 + F.pad(R.double(), (0, S, 0, S))  # R (m, m) or (B, T, m, m) into the top-left block
        rhs = z[..., None] if target is None else torch.stack([z, target], -1)  # (B, T, m, 1 or 2)
        mean = self.m0.to(dtype).expand(batch, S)
        factor = self.P0_cov.factor().to(dtype).expand(batch, S, S)  # the learned Cholesky factor of P0
        pm, fm, Js, Ls, Fs, vs, infos = [], [], [], [], [], [], []
        for t in range(steps):
            EA, EB = self._local(mean, bases)
            drive = EB @ u_aug[:, t, :, None]
            Em = torch.baddbmm(drive, EA, mean[..., None])  # (C m_{t|t-1}, m_{t|t-1})
            GF = EA @ factor
            if observed is not None:
                GF = GF * rows[:, t]
            GF = GF.double()
            J = torch.baddbmm(J0 if J0.dim() == 2 else J0[:, t], GF, GF.mT)
            if jitter:
                J = J + torch.diag_embed(F.pad(_jitter_diagonal(J[:, :m, :m], jitter), (0, S)))
            chol, info = torch.linalg.cholesky_ex(J)
            chol = chol.to(dtype)
            L, WT, factor = chol[:, :m, :m], chol[:, m:, :m], chol[:, m:, m:]
            v = torch.linalg.solve_triangular(L, rhs[:, t] - Em[:, :m], upper=False)
            predicted = Em[:, m:]
            pm.append(predicted[..., 0]), Js.append(J), Ls.append(L), Fs.append(factor), vs.append(v[..., -1])
            infos.append(info)
            mean = torch.baddbmm(predicted, WT, v[..., :1]).squeeze(-1)  # m_{t|t}
            fm.append(mean)
        ok = not bool((torch.stack(infos) > 0).any())
        step_ll = log_prob_from_cholesky(torch.stack(vs, 1), torch.stack(Ls, 1))
        if observed is not None:
            step_ll = step_ll * observed
        factors = torch.stack(Fs, 1)
        P_pred = symmetrize(torch.stack(Js, 1)[..., m:, m:].to(dtype))
        return FilterResult(Gaussian(torch.stack(fm, 1), factors @ factors.mT), Gaussian(torch.stack(pm, 1), P_pred),
                            step_ll.sum(1), step_ll), ok

    # ---- online use -----------------------------------------------------------------------------
    @_full_precision
    def init_belief(self, batch_size: int) -> Gaussian:
        """Belief of h_0 before any observation, N(m0, P0), as ``(B, S)`` / ``(B, S, S)``."""
        S = self.state_dim
        return Gaussian(self.m0.expand(batch_size, S), self.P0.expand(batch_size, S, S))

    @_full_precision
    def step(self, belief: Gaussian, z_t: Tensor | None, u_t: Tensor | None = None, mask_t: Tensor | None = None,
             R_t: Tensor | None = None) -> Gaussian:
        """One online step: predict with ``u_t`` ``(B, a)`` through the local system at the belief's mean, then
        update with ``z_t`` ``(B, L)`` (None, NaN rows or ``mask_t`` ``(B,)`` False: predict only). ``R_t``:
        ``(B, L, L)`` or variances ``(B, L)``. Applied T times from `init_belief` it reproduces `filter`."""
        belief = batched_belief(belief, self.state_dim)
        batch = belief.mean.shape[0]
        dtype = _dtype(belief.mean, belief.cov, self.A_raw)
        A_t, B_t = self._local(belief.mean.to(dtype), self._bases(dtype))
        prior = predict(belief, A_t, self.Q, B_t, self._control(u_t, (batch,), dtype, belief.mean.device))
        if z_t is None:
            return prior
        return update(prior, z_t, self.C, observation_noise(self.R, R_t, (batch,)), mask_t)[0]

    @_full_precision
    def rollout(self, belief: Gaussian, actions: Tensor | int) -> Gaussian:
        """Assumed-density k-step state beliefs (B, H, S): each step predicts through the local system at the
        predicted mean. ``actions`` ``(B, H, a)``, ``actions[:, 0]`` taken at the belief's step; or a horizon H
        (zero actions)."""
        belief = batched_belief(belief, self.state_dim)
        batch = belief.mean.shape[0]
        if isinstance(actions, int):
            actions = belief.mean.new_zeros(batch, actions, self.action_dim)
        if actions.dim() != 3 or actions.shape[0] != batch:
            raise ValueError(f"actions must have shape (B={batch}, H, {self.action_dim}), got {tuple(actions.shape)}")
        dtype = _dtype(belief.mean, belief.cov, self.A_raw, actions)
        u_aug = self._control(actions, tuple(actions.shape[:2]), dtype, belief.mean.device)
        S = self.state_dim
        bases = self._bases(dtype)
        Q = self.Q.to(dtype)
        mean, cov = belief.mean.to(dtype), belief.cov.to(dtype)
        means, covs = [], []
        for h in range(actions.shape[1]):
            A_t, B_t = self._local(mean, bases)
            mean = torch.baddbmm(B_t @ u_aug[:, h, :, None], A_t, mean[..., None]).squeeze(-1)
            cov = torch.baddbmm(Q, A_t @ cov, A_t.mT)
            means.append(mean), covs.append(cov)
        if not means:
            return Gaussian(mean.new_zeros(batch, 0, S), mean.new_zeros(batch, 0, S, S))
        return Gaussian(torch.stack(means, 1), symmetrize(torch.stack(covs, 1)))

    @_full_precision
    def candidate_rollout(self, belief: Gaussian, horizon: int) -> Callable[[Tensor], Gaussian]:
        """`rollout` of N candidate action sequences (B, N, H, a) from beliefs (B, S), for planning (no gradient).

        All B N candidates in one loop over H with few ops per step (at these sizes a step costs about its op
        count), candidates as *columns*: column j of one buffer holds x = [m; u; 1] (the actions filled in up
        front), so that every elementwise op and the sum over k run along contiguous rows (1.2-1.3x faster than
        candidates as rows, B=1, N=256, S=16, K=8). A step: one 2-d matmul gives [A_k m + G_k u + c_k]_k for every k
        and the gate's first layer W1 m + b1; then relu, the second layer and the softmax over k give alpha, and
        the alpha-weighted sum over k (a product and a sum) is written into the next step's column.

        The covariances depend on the actions here (``planning_cov``): ``"each"``: per candidate,
        P' = A(m) P A(m)^T + Q (B, N, H, S, S), as `rollout` computes them, after the loop from its alphas (every
        A(m) in one product, then 2 batched ops per step); about 7x the time of the means alone
        (bench/locally_linear.py). ``"mean"``: those of the *first call's* candidate 0 (the planner's warm start,
        its current mean), (B, 1, H, S, S), computed so in the first call and returned by the later ones: then the
        expected cost's trace term is one constant for all candidates of a control step, as for the linear-Gaussian
        prior, and changes no mppi / cem decision.
        """
        belief = batched_belief(belief, self.state_dim)
        batch, S, K, a = belief.mean.shape[0], self.state_dim, self.num_bases, self.action_dim
        dtype = _dtype(belief.mean, belief.cov, self.A_raw)
        width = S + a + 1  # x = [m; u; 1]
        with torch.no_grad():
            bases = self._bases(dtype)  # (K, S, width)
            A = bases[..., :S].flatten(1)  # (K, S S): A_t = alpha^T A for the covariances
            gate = self.gate.weights(dtype)  # (W1, b1, W2, b2) or (W, b)
            W1, b1 = gate[0], gate[1]
            # W @ x = [A_k m + G_k u + c_k]_k (K S) ; W1 m + b1
            first = torch.cat([W1, W1.new_zeros(W1.shape[0], a + 1)], 1)
            first[:, -1] = b1
            W = torch.cat([bases.reshape(K * S, width), first]).contiguous()
            second = (gate[3][:, None], gate[2].contiguous()) if len(gate) == 4 else None
            Q = self.Q.to(dtype)
            start, start_cov = belief.mean.to(dtype), belief.cov.to(dtype).contiguous()
        each = self.planning_cov == "each"
        mean_covs: list[Tensor] = []  # "mean": the first call's covariances

        @torch.no_grad()
        def rollout(actions: Tensor) -> Gaussian:
            if actions.dim() != 4 or actions.shape[0] != batch or actions.shape[2:] != (horizon, a):
                raise ValueError(f"actions must have shape (B={batch}, N, H={horizon}, {a}), got "
                                 f"{tuple(actions.shape)}")
            n = actions.shape[1]
            columns = batch * n
            x = torch.empty(horizon + 1, width, columns, dtype=dtype, device=start.device)
            x[0, :S] = repeat(start, "b s -> s (b n)", n=n)
            x[:horizon, S:-1] = rearrange(actions.to(dtype), "b n h a -> h a (b n)")
            x[horizon, S:-1] = 0.0
            x[:, -1] = 1.0
            product = torch.empty(K, S, columns, dtype=dtype, device=start.device)
            # the covariances of every column ("each") or of candidate 0 of each problem ("mean", first call)
            tracked = slice(None) if each else slice(None, None, n) if not mean_covs else None
            alphas = []  # alpha (K, tracked) of every step, for the covariances after the loop
            for h in range(horizon):
                y = torch.mm(W, x[h])
                logits = y[K * S:]
                if second is not None:
                    logits = torch.addmm(second[0], second[1], torch.relu_(logits))
                alpha = torch.softmax(logits, 0)  # (K, columns)
                if tracked is not None:
                    alphas.append(alpha[:, tracked])
                torch.mul(y[:K * S].view(K, S, columns), alpha[:, None], out=product)
                torch.sum(product, 0, out=x[h + 1, :S])
            means = rearrange(x[1:, :S], "h s (b n) -> b n h s", b=batch).contiguous()
            if tracked is not None:  # P' = A(m) P A(m)^T + Q along the tracked columns, all A(m) in one product
                A_steps = (torch.stack(alphas).mT @ A).view(horizon, -1, S, S)
                cov = repeat(start_cov, "b s t -> (b n) s t", n=n if each else 1).contiguous()
                covs = torch.empty(horizon, *cov.shape, dtype=dtype, device=start.device)
                for h in range(horizon):
                    cov = torch.baddbmm(Q, torch.bmm(A_steps[h], cov), A_steps[h].mT, out=covs[h])
            if each:
                return Gaussian(means, rearrange(covs, "h (b n) s t -> b n h s t", b=batch))
            if not mean_covs:
                mean_covs.append(symmetrize(rearrange(covs, "h b s t -> b 1 h s t")))
            return Gaussian(means, mean_covs[0])

        return rollout

    @_full_precision
    def predict_observation(self, belief: Gaussian, R: Tensor | None = None) -> Gaussian:
        """Predictive distribution of the latent: N(C m, C P C^T + R), over any leading dims of ``belief``."""
        C = self.C
        noise = observation_noise(self.R, R, tuple(belief.mean.shape[:-1]))
        return Gaussian(belief.mean @ C.mT, symmetrize(C @ belief.cov @ C.mT + noise))
