"""The LDM objective: loss = -(alignment + entropy), per time step and latent dimension.

    F_LDM = <log P_theta(z_{1:T})>_R + H_R[z_{1:T}]          (mi=False, joint entropy)
    F_MI  = <log P_theta(z_{1:T})>_R + sum_t H_R[z_t]         (mi=True, marginal entropies)

(Mikulasch & Zenke 2026, "Understanding SSL via Latent Distribution Matching", arXiv 2605.03517;
F_MI after Aitchison & Ganev). Conventions of `LDMLoss.forward`, for z (B, T, d):

- latents are first normalised (`latent_norm`: none, batch or whiten; batch statistics in training,
  running statistics in eval): the stop-gradient Kalman preset whitens, which is what keeps its
  plug-in objective from collapsing, so that `make("kalman", d)` trains on its own.
- alignment = the prior's `alignment` (mean over the modelled terms of log P), divided by d. State-space
  prior: the T one-step predictive log-likelihoods log N(z_t; C m_{t|t-1}, S_t) (observed steps only).
  Pair priors (plane/sphere/predictor): log P(z_{t+k} | z_t) for k = 1..steps, averaged over t and k (the
  first step's marginal is flat). Factorized (ICA): log P(z_t), averaged over t.
- entropy = H per time step, divided by d. Joint: H[window of w consecutive latents] / w over all
  windows (w = `window`, default T; for T=2 that is H[z, z'] / 2). MI: mean_t H[z_t]. Hence
  F_MI - F_LDM = I[z; z'] / (T d) for a pair. `kde` uses the latent model's own kernel: a symmetric
  model (plane/sphere) pools all B*T latents leave-one-out (NT-Xent's denominator); a predictor
  scores every target of the batch against each context per (t, k) (CPC's InfoNCE denominator).
  `plugin` contributes 0 to the value: it detaches the target (see `entropy.plugin`).
  `sigreg` is not an entropy (`entropy.sigreg`): H := -weight * D * SIGReg of the same samples (D their
  dimension), so the entropy term is -weight * SIGReg, a dimensionless penalty toward N(0, I), not nats;
  with mi=True it is LeWorldModel's per-frame SIGReg averaged over t. The directions are redrawn on every
  call from the loss's own generator (option `seed`, default 0; None = the global RNG); with mi=True one
  draw serves all time steps (one per step when frames are masked). Options: weight (lambda, default
  SIGREG_WEIGHT = LeWM's 0.09), num_projections (1024), knots (17), seed.
- loss = -(alignment + entropy) - multistep_weight * multistep, where multistep is the exact k-step
  predictive log-likelihood (`objective.multistep`, state-space priors, k = 2..multistep_horizon; 0 = off).
  So d * loss equals NT-Xent - log(2N - 1) for simclr and InfoNCE - log B for cpc (tests/test_methods.py).

Multi-process: logdet, kde, knn and sigreg see the batch gathered over all ranks (`distributed.gather`,
autograd-aware); the alignment stays per rank. The rank average of the loss, and the DDP-averaged
gradients, then equal the single-process loss and gradients on the concatenated batch (sigreg: with a
seed, every rank draws the same directions; seed=None draws them per rank).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from worldmodel.distributed import gather
from worldmodel.kalman import Gaussian
from worldmodel.objective import entropy as estimators
from worldmodel.objective.multistep import multistep_log_likelihood
from worldmodel.objective.normalization import LatentNorm
from worldmodel.priors.base import LatentPrior, StateSpacePrior
from worldmodel.priors.pairs import TransitionPrior

__all__ = ["LossOutput", "LDMLoss", "ENTROPIES", "ESTIMATOR_OPTIONS", "SIGREG_WEIGHT"]

ENTROPIES = ("logdet", "kde", "knn", "sigreg", "plugin", "jacobian")
SIGREG_WEIGHT = 0.09  # LeWorldModel's lambda (github.com/lucas-maes/le-wm, config/train/lewm.yaml: loss.sigreg.weight)


def _sigreg_uniformity(x: Tensor, weight: float, **options) -> Tensor:
    """The uniformity term of entropy="sigreg" for x (..., N, D): -weight * D * SIGReg(x) (not nats). Extensive in
    D like an entropy, so that the loss's division per dimension leaves -weight * SIGReg."""
    return -weight * x.shape[-1] * estimators.sigreg(x, **options)


_SAMPLE_ESTIMATORS = {"logdet": estimators.logdet, "knn": estimators.knn, "sigreg": _sigreg_uniformity}
ESTIMATOR_OPTIONS = {"logdet": {"eps"}, "knn": {"k", "clip_quantile"},
                     "sigreg": {"weight", "num_projections", "knots", "seed"}}


class LossOutput(NamedTuple):
    loss: Tensor  # scalar, -(alignment + entropy) [- multistep_weight * multistep]
    alignment: Tensor  # scalar, <log P> per step and latent dimension
    entropy: Tensor  # scalar, H per step and latent dimension (sigreg: -weight * SIGReg, not nats)
    logs: dict[str, float]


class LDMLoss(nn.Module):
    """-F_LDM (or -F_MI) for a prior and an entropy estimator (the two dials).

    Args:
        prior: a `worldmodel.priors.LatentPrior` (its `alignment` is the first term).
        entropy: one of ENTROPIES, or None to drop the entropy term (collapses; for ablations).
        mi: marginal entropies (F_MI) instead of the joint one (F_LDM); batch estimators only.
        entropy_kwargs: options of the estimator (logdet: eps; knn: k, clip_quantile; sigreg: weight,
            num_projections, knots, seed: see the module docstring; its logs add the raw statistic "sigreg").
        window: joint-entropy window length (default: the whole sequence T).
        target_ema: None, or the EMA decay of a target encoder that the owner keeps and whose
            latents it passes as `target` (BYOL/JEPA); plugin estimator only.
        encoder: the invertible linear encoder (module with a square `.weight`) for `jacobian`.
            Not registered as a submodule: its owner holds (and saves) its parameters.
        gather: gather latents over ranks for batch estimators and the latent normalisation when
            torch.distributed is on.
        dim: the latent dimension d, if fixed (`make` sets it); forward then checks z against it.
        latent_norm: "none", "batch" or "whiten" (`LatentNorm`), applied to z (and to `target`, with
            its own batch statistics) before everything else; needs `dim`.
        multistep_horizon, multistep_weight: the k-step predictive term (state-space priors; 0 = off).
    """

    def __init__(
        self,
        prior: LatentPrior,
        entropy: str | None,
        mi: bool = False,
        *,
        entropy_kwargs: dict | None = None,
        window: int | None = None,
        target_ema: float | None = None,
        encoder: nn.Module | None = None,
        gather: bool = True,
        dim: int | None = None,
        latent_norm: str = "none",
        multistep_horizon: int = 0,
        multistep_weight: float = 1.0,
    ):
        super().__init__()
        if not isinstance(prior, LatentPrior):
            raise ValueError(f"prior must be a worldmodel.priors.LatentPrior, got {type(prior).__name__}")
        if entropy is not None and entropy not in ENTROPIES:
            raise ValueError(f"entropy must be one of {ENTROPIES} or None, got {entropy!r}")
        if mi and entropy not in ("logdet", "kde", "knn", "sigreg"):
            raise ValueError(f"mi=True needs a batch estimator (logdet, kde, knn, sigreg), got entropy={entropy!r}")
        if entropy == "kde" and not isinstance(prior, TransitionPrior):
            raise ValueError("entropy='kde' needs a kernel prior (plane, sphere, predictor)")
        if entropy == "kde" and prior.action_dim:
            raise ValueError("entropy='kde' does not support an action-conditioned predictor (action_dim > 0)")
        if entropy == "plugin" and not prior.conditional:
            raise ValueError("entropy='plugin' needs a conditional prior (it detaches the predicted latents)")
        if entropy == "kde" and not mi and not prior.symmetric:
            raise ValueError("joint kde (mi=False) needs a symmetric prior (plane or sphere)")
        options = dict(entropy_kwargs or {})
        unknown = set(options) - ESTIMATOR_OPTIONS.get(entropy, set())
        if unknown:
            raise ValueError(
                f"entropy_kwargs {sorted(unknown)} not valid for entropy={entropy!r}; "
                f"valid: {sorted(ESTIMATOR_OPTIONS.get(entropy, set()))}"
            )
        seed = options.pop("seed", 0)
        if entropy == "sigreg" and options.setdefault("weight", SIGREG_WEIGHT) <= 0:
            raise ValueError(f"the sigreg weight must be positive, got {options['weight']}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if target_ema is not None and (entropy != "plugin" or not 0.0 <= target_ema < 1.0):
            raise ValueError(f"target_ema must be in [0, 1) and needs entropy='plugin', got {target_ema}")
        if multistep_horizon < 0 or multistep_horizon == 1:
            raise ValueError(f"multistep_horizon must be 0 (off) or >= 2, got {multistep_horizon}")
        if multistep_horizon and not isinstance(prior, StateSpacePrior):
            raise ValueError("multistep_horizon needs a state-space prior (one that filters, e.g. kalman)")
        if latent_norm != "none" and dim is None:
            raise ValueError(f"latent_norm={latent_norm!r} needs the latent dimension dim")
        self.prior = prior
        self.latent_norm = LatentNorm(dim or 1, latent_norm)
        self.entropy, self.mi, self.entropy_kwargs = entropy, bool(mi), options
        self.seed, self._generators = seed, {}  # sigreg's directions: one generator per device, made on first use
        self.window, self.target_ema, self.gather, self.dim = window, target_ema, gather, dim
        self.multistep_horizon, self.multistep_weight = int(multistep_horizon), float(multistep_weight)
        object.__setattr__(self, "encoder", encoder)

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups of the loss's own parameters: the prior's at lr * prior.lr_multiplier, others at lr."""
        prior = [p for p in self.prior.parameters() if p.requires_grad]
        seen = {id(p) for p in prior}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in seen]
        groups = [{"params": rest, "lr": lr}] if rest else []
        if prior:
            groups.append({"params": prior, "lr": lr * self.prior.lr_multiplier})
        return groups

    def forward(
        self,
        z: Tensor,
        u: Tensor | None = None,
        mask: Tensor | None = None,
        target: Tensor | None = None,
        R: Tensor | None = None,
    ) -> LossOutput:
        """z (B, T, d) latents (NaN rows count as missing when masked); u (B, T, k) shifted actions
        (state-space priors; ignored by the others) and mask (B, T) bool, as for `kalman_filter`;
        target (B, T, d) latents of a target branch (plugin only; default z.detach()); R (B, T, d, d) or
        variances (B, T, d): per-frame observation noise (state-space priors only)."""
        self._check(z, u, mask, target, R)
        z = self._observed(self.latent_norm(z, mask, across_ranks=self.gather), mask)
        if target is not None:
            target = self._observed(self.latent_norm(target, mask, update=False, across_ranks=self.gather), mask)
        self._check_finite(z, target, mask)
        alignment, entropy, filtered = self._terms(z, u, mask, target, R)
        loss = -(alignment + entropy)
        with torch.no_grad():
            observed = z.flatten(0, 1) if mask is None else z[mask]
            std = observed.std(dim=0).mean() if observed.shape[0] > 1 else z.new_tensor(float("nan"))
        logs = {"alignment": float(alignment.detach()), "entropy": float(entropy.detach()), "latent_std": float(std)}
        if self.entropy == "sigreg":
            logs["sigreg"] = -logs["entropy"] / self.entropy_kwargs["weight"]
        if self.multistep_horizon:
            stopped = z.detach() if target is None else target.detach()
            multistep = multistep_log_likelihood(self.prior, z, stopped, self.multistep_horizon, u, mask, R, filtered)
            loss = loss - self.multistep_weight * multistep
            logs["multistep"] = float(multistep.detach())
        return LossOutput(loss, alignment, entropy, {"loss": float(loss.detach()), **logs})

    @staticmethod
    def _observed(z: Tensor, mask: Tensor | None) -> Tensor:
        """z with zeros at missing steps (their NaNs must never reach a computation)."""
        if mask is None:
            return z
        return torch.where(mask[..., None], z, torch.zeros((), dtype=z.dtype, device=z.device))

    def _terms(self, z, u, mask, target, R) -> tuple[Tensor, Tensor, Gaussian | None]:
        """(alignment, entropy), each per step and latent dimension, and the filtered beliefs of z where the
        k-step term needs them (filtered once, by the alignment)."""
        d = z.shape[-1]
        if self.entropy == "plugin":
            target = estimators.plugin(z, target)
        filtered = None
        if self.multistep_horizon:
            alignment, result = self.prior.filtered_alignment(z, u=u, mask=mask, target=target, R=R)
            filtered = result.filtered
        else:
            alignment = self.prior.alignment(z, u=u, mask=mask, target=target, R=R)
        return alignment / d, self._entropy(z, mask) / d, filtered

    # -- entropy H -------------------------------------------------------------------------------
    def _entropy(self, z: Tensor, mask: Tensor | None) -> Tensor:
        if self.entropy in (None, "plugin"):
            return z.new_zeros(())
        if self.entropy == "jacobian":
            if self.encoder is None:
                raise ValueError("entropy='jacobian' needs the linear encoder: make('ica', dim, encoder=...)")
            return estimators.jacobian(self.encoder.weight).to(z.dtype)
        z = self.prior.project(z)
        if self.gather:
            z = gather(z)
            mask = None if mask is None else gather(mask.to(torch.uint8)).bool()
        if self.entropy == "kde":
            return self._kde(z, mask)
        return self._sample_entropy(z, mask)

    def _sample_entropy(self, z: Tensor, mask: Tensor | None) -> Tensor:
        estimate, options = _SAMPLE_ESTIMATORS[self.entropy], self.entropy_kwargs
        if self.entropy == "sigreg":
            options = {**options, "generator": self._generator(z.device)}
        if self.mi and mask is None:  # all steps at once: (T, B, d) -> (T,)
            return estimate(rearrange(z, "b t d -> t b d"), **options).mean()
        if self.mi:
            steps = [z[:, t][mask[:, t]] for t in range(z.shape[1])]
            return torch.stack([estimate(x, **options) for x in steps]).mean()
        w = self._window(z)
        windows = rearrange(z.unfold(1, w, 1), "b n d w -> (b n) (w d)")
        if mask is not None:
            windows = windows[mask.unfold(1, w, 1).all(-1).flatten()]
        return estimate(windows, **options) / w

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """The seeded generator of sigreg's directions on `device` (None: the global RNG)."""
        if self.seed is None:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _kde(self, z: Tensor, mask: Tensor | None) -> Tensor:
        model = self.prior
        if not self.mi:  # joint: product kernel over the window, leave-one-out over windows
            w = self._window(z)
            windows = rearrange(z.unfold(1, w, 1), "b n d w -> w (b n) d")
            if mask is not None:
                windows = windows[:, mask.unfold(1, w, 1).all(-1).flatten()]
            log_kernel = model.log_kernel(windows, windows).sum(0)
            return estimators.kde(log_kernel, exclude_self=True) / w
        if model.symmetric:  # pooled marginal: every latent is a kernel centre for every other
            x = z.flatten(0, 1) if mask is None else z[mask]
            return estimators.kde(model.log_kernel(x, x), exclude_self=True)
        terms = []
        for k in range(1, model.steps + 1):  # per (t, k): contexts z_t vs all targets z_{t+k}
            contexts, targets = rearrange(z[:, :-k], "b t d -> t b d"), rearrange(z[:, k:], "b t d -> t b d")
            log_kernel = model.log_kernel(contexts, targets, k)
            if mask is not None:
                rows = rearrange(mask[:, :-k], "b t -> t b 1")
                cols = rearrange(mask[:, k:], "b t -> t 1 b")
                log_kernel = log_kernel.masked_fill(~(rows & cols), float("-inf"))
            terms.append(estimators.kde(log_kernel))
        return torch.stack(terms).mean()

    def _window(self, z: Tensor) -> int:
        w = self.window or z.shape[1]
        if w > z.shape[1]:
            raise ValueError(f"window={w} is longer than the sequence (T={z.shape[1]})")
        return w

    # -- input checks ----------------------------------------------------------------------------
    def _check(self, z, u, mask, target, R) -> None:
        if not isinstance(z, Tensor) or z.dim() != 3 or not z.is_floating_point():
            raise ValueError(f"z must be a float tensor (B, T, d), got {_describe(z)}")
        B, T, d = z.shape
        if self.dim is not None and d != self.dim:
            raise ValueError(f"z: latent dimension {d} does not match this loss (dim={self.dim})")
        if T < self.prior.min_steps:
            raise ValueError(f"z: this prior needs sequences of T >= {self.prior.min_steps} steps, got T={T}")
        if u is not None and (not isinstance(u, Tensor) or u.dim() != 3 or u.shape[:2] != (B, T)):
            raise ValueError(f"u must be (B, T, k) = ({B}, {T}, k), got {_describe(u)}")
        if R is not None and not isinstance(self.prior, StateSpacePrior):
            raise ValueError("R (observation noise) is only used by state-space priors")
        if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (B, T)):
            raise ValueError(f"mask must be a bool tensor (B, T) = ({B}, {T}), got {_describe(mask)}")
        if target is not None:
            if self.entropy != "plugin":
                raise ValueError("target is only used by the plugin estimator (stop-gradient / EMA target branch)")
            if not isinstance(target, Tensor) or target.shape != z.shape:
                raise ValueError(f"target must have z's shape {tuple(z.shape)}, got {_describe(target)}")

    @staticmethod
    def _check_finite(z: Tensor, target: Tensor | None, mask: Tensor | None) -> None:
        if not bool(torch.isfinite(z).all()):
            raise ValueError(
                "z contains non-finite values (NaN/inf) at observed steps; pass mask (False = missing frame)"
            )
        if target is not None and not bool(torch.isfinite(target).all()):
            raise ValueError("target contains non-finite values (NaN/inf) at observed steps")


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
