"""The LDM objective: loss = -(alignment + entropy), per time step and latent dimension.

    F_LDM = <log P_theta(z_{1:T})>_R + H_R[z_{1:T}]          (mi=False, joint entropy)
    F_MI  = <log P_theta(z_{1:T})>_R + sum_t H_R[z_t]         (mi=True, marginal entropies)

(Mikulasch & Zenke 2026, "Understanding SSL via Latent Distribution Matching", arXiv 2605.03517;
F_MI after Aitchison & Ganev). Conventions of `LDMLoss.forward`, for z (B, T, d):

- alignment = mean over the modelled terms of log P, divided by d. Kalman model: the T one-step
  predictive log-likelihoods log N(z_t; C m_{t|t-1}, S_t) (observed steps only). Transition models
  (plane/sphere/predictor): log P(z_{t+k} | z_t) for k = 1..steps, averaged over t and k (the first
  step's marginal is flat). Factorized (ICA): log P(z_t), averaged over t.
- entropy = H per time step, divided by d. Joint: H[window of w consecutive latents] / w over all
  windows (w = `window`, default T; for T=2 that is H[z, z'] / 2). MI: mean_t H[z_t]. Hence
  F_MI - F_LDM = I[z; z'] / (T d) for a pair. `kde` uses the latent model's own kernel: a symmetric
  model (plane/sphere) pools all B*T latents leave-one-out (NT-Xent's denominator); a predictor
  scores every target of the batch against each context per (t, k) (CPC's InfoNCE denominator).
  `plugin` contributes 0 to the value: it detaches the target (see `entropy.plugin`).
- loss = -(alignment + entropy). So d * loss equals NT-Xent - log(2N - 1) for simclr and
  InfoNCE - log B for cpc (checked in tests/test_methods.py).

Multi-process: logdet, kde and knn see the batch gathered over all ranks (`distributed.gather`,
autograd-aware); the alignment stays per rank. The rank average of the loss, and the DDP-averaged
gradients, then equal the single-process loss and gradients on the concatenated batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor, nn

from worldmodel import entropy as estimators
from worldmodel.distributed import gather
from worldmodel.latent_models import FactorizedModel, TransitionModel

__all__ = ["LossOutput", "LDMLoss", "ENTROPIES", "ESTIMATOR_OPTIONS"]

ENTROPIES = ("logdet", "kde", "knn", "plugin", "jacobian")
_SAMPLE_ESTIMATORS = {"logdet": estimators.logdet, "knn": estimators.knn}
ESTIMATOR_OPTIONS = {"logdet": {"eps"}, "knn": {"k", "clip_quantile"}}


class LossOutput(NamedTuple):
    loss: Tensor  # scalar, -(alignment + entropy)
    alignment: Tensor  # scalar, <log P> per step and latent dimension
    entropy: Tensor  # scalar, H per step and latent dimension
    logs: dict[str, float]


class LDMLoss(nn.Module):
    """-F_LDM (or -F_MI) for a latent model and an entropy estimator (the two dials).

    Args:
        latent_model: a `TransitionModel` (plane/sphere/predictor), a `FactorizedModel`, or a
            `KalmanLatentModel` (anything with `log_prob(z, u, mask, R, stop_gradient_target)`).
        entropy: one of ENTROPIES, or None to drop the entropy term (collapses; for ablations).
        mi: marginal entropies (F_MI) instead of the joint one (F_LDM); batch estimators only.
        entropy_kwargs: options of the estimator (logdet: eps; knn: k, clip_quantile).
        window: joint-entropy window length (default: the whole sequence T).
        target_ema: None, or the EMA decay of a target encoder that the owner keeps and whose
            latents it passes as `target` (BYOL/JEPA); plugin estimator only.
        encoder: the invertible linear encoder (module with a square `.weight`) for `jacobian`.
            Not registered as a submodule: its owner holds (and saves) its parameters.
        gather: gather latents over ranks for batch estimators when torch.distributed is on.
        dim: the latent dimension d, if fixed (`make` sets it); forward then checks z against it.
    """

    def __init__(
        self,
        latent_model: nn.Module,
        entropy: str | None,
        mi: bool = False,
        *,
        entropy_kwargs: dict | None = None,
        window: int | None = None,
        target_ema: float | None = None,
        encoder: nn.Module | None = None,
        gather: bool = True,
        dim: int | None = None,
    ):
        super().__init__()
        if entropy is not None and entropy not in ENTROPIES:
            raise ValueError(f"entropy must be one of {ENTROPIES} or None, got {entropy!r}")
        self.kind = (
            "transition"
            if isinstance(latent_model, TransitionModel)
            else "factorized"
            if isinstance(latent_model, FactorizedModel)
            else "kalman"
        )
        if self.kind == "kalman" and not (hasattr(latent_model, "log_prob") and hasattr(latent_model, "filter")):
            raise ValueError(f"latent_model: unsupported type {type(latent_model).__name__}")
        if mi and entropy not in ("logdet", "kde", "knn"):
            raise ValueError(f"mi=True needs a batch estimator (logdet, kde, knn), got entropy={entropy!r}")
        if entropy == "kde" and self.kind != "transition":
            raise ValueError("entropy='kde' needs a transition latent model (plane, sphere, predictor)")
        if entropy == "plugin" and self.kind == "factorized":
            raise ValueError("entropy='plugin' needs a conditional latent model (transition or kalman)")
        if entropy == "kde" and not mi and not latent_model.symmetric:
            raise ValueError("joint kde (mi=False) needs a symmetric latent model (plane or sphere)")
        options = dict(entropy_kwargs or {})
        unknown = set(options) - ESTIMATOR_OPTIONS.get(entropy, set())
        if unknown:
            raise ValueError(
                f"entropy_kwargs {sorted(unknown)} not valid for entropy={entropy!r}; "
                f"valid: {sorted(ESTIMATOR_OPTIONS.get(entropy, set()))}"
            )
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if target_ema is not None and (entropy != "plugin" or not 0.0 <= target_ema < 1.0):
            raise ValueError(f"target_ema must be in [0, 1) and needs entropy='plugin', got {target_ema}")
        self.latent_model = latent_model
        self.entropy, self.mi, self.entropy_kwargs = entropy, bool(mi), options
        self.window, self.target_ema, self.gather, self.dim = window, target_ema, gather, dim
        object.__setattr__(self, "encoder", encoder)

    def forward(
        self,
        z: Tensor,
        u: Tensor | None = None,
        mask: Tensor | None = None,
        target: Tensor | None = None,
        R: Tensor | None = None,
    ) -> LossOutput:
        """z (B, T, d) latents; u (B, T, k) shifted actions (used by the Kalman model, ignored by
        the others) and mask (B, T) bool, as for `kalman_filter`; target (B, T, d) latents of a
        target branch (plugin only; default z.detach()); R (B, T, d, d) or variances (B, T, d):
        per-frame observation noise (Kalman model only)."""
        z = self._check(z, u, mask, target, R)
        if mask is not None:
            z = torch.where(mask[..., None], z, torch.zeros((), dtype=z.dtype, device=z.device))
        alignment = self._alignment(z, u, mask, target, R)
        entropy = self._entropy(z, mask)
        d = z.shape[-1]
        alignment, entropy = alignment / d, entropy / d
        loss = -(alignment + entropy)
        with torch.no_grad():
            observed = z.flatten(0, 1) if mask is None else z[mask]
            std = observed.std(dim=0).mean() if observed.shape[0] > 1 else z.new_tensor(float("nan"))
        logs = {
            "loss": float(loss.detach()),
            "alignment": float(alignment.detach()),
            "entropy": float(entropy.detach()),
            "latent_std": float(std),
        }
        return LossOutput(loss, alignment, entropy, logs)

    # -- alignment <log P> -------------------------------------------------------------------
    def _alignment(self, z, u, mask, target, R) -> Tensor:
        model = self.latent_model
        if self.kind == "kalman":
            plugin = self.entropy == "plugin"
            target = estimators.plugin(z, target) if plugin else None
            ll = model.log_prob(z, u=u, mask=mask, R=R, stop_gradient_target=plugin, target=target)
            steps = z.shape[0] * z.shape[1] if mask is None else mask.sum()
            return ll.sum() / steps
        if self.kind == "factorized":
            return _masked_mean(model.log_prob(z), mask)
        tgt = estimators.plugin(z, target) if self.entropy == "plugin" else z
        terms = []
        for k in range(1, model.steps + 1):
            pair_mask = None if mask is None else mask[:, :-k] & mask[:, k:]
            terms.append(_masked_mean(model.log_prob(z[:, :-k], tgt[:, k:], k), pair_mask))
        return torch.stack(terms).mean()

    # -- entropy H -------------------------------------------------------------------------------
    def _entropy(self, z: Tensor, mask: Tensor | None) -> Tensor:
        if self.entropy in (None, "plugin"):
            return z.new_zeros(())
        if self.entropy == "jacobian":
            if self.encoder is None:
                raise ValueError("entropy='jacobian' needs the linear encoder: make('ica', dim, encoder=...)")
            return estimators.jacobian(self.encoder.weight).to(z.dtype)
        if self.kind == "transition":
            z = self.latent_model.project(z)
        if self.gather:
            z = gather(z)
            mask = None if mask is None else gather(mask.to(torch.uint8)).bool()
        if self.entropy == "kde":
            return self._kde(z, mask)
        return self._sample_entropy(z, mask)

    def _sample_entropy(self, z: Tensor, mask: Tensor | None) -> Tensor:
        estimate = _SAMPLE_ESTIMATORS[self.entropy]
        if self.mi and mask is None:  # all steps at once: (T, B, d) -> (T,)
            return estimate(rearrange(z, "b t d -> t b d"), **self.entropy_kwargs).mean()
        if self.mi:
            steps = [z[:, t][mask[:, t]] for t in range(z.shape[1])]
            return torch.stack([estimate(x, **self.entropy_kwargs) for x in steps]).mean()
        w = self._window(z)
        windows = rearrange(z.unfold(1, w, 1), "b n d w -> (b n) (w d)")
        if mask is not None:
            windows = windows[mask.unfold(1, w, 1).all(-1).flatten()]
        return estimate(windows, **self.entropy_kwargs) / w

    def _kde(self, z: Tensor, mask: Tensor | None) -> Tensor:
        model = self.latent_model
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
    def _check(self, z, u, mask, target, R) -> Tensor:
        if not isinstance(z, Tensor) or z.dim() != 3 or not z.is_floating_point():
            raise ValueError(f"z must be a float tensor (B, T, d), got {_describe(z)}")
        B, T, d = z.shape
        if self.dim is not None and d != self.dim:
            raise ValueError(f"z: latent dimension {d} does not match this loss (dim={self.dim})")
        if self.kind == "transition" and T < self.latent_model.steps + 1:
            raise ValueError(
                f"z: this latent model pairs z_t with z_(t+k) for k <= {self.latent_model.steps}, "
                f"so it needs T >= {self.latent_model.steps + 1} steps, got T={T}"
            )
        if u is not None and (not isinstance(u, Tensor) or u.dim() != 3 or u.shape[:2] != (B, T)):
            raise ValueError(f"u must be (B, T, k) = ({B}, {T}, k), got {_describe(u)}")
        if R is not None and self.kind != "kalman":
            raise ValueError("R (observation noise) is only used by the Kalman latent model")
        if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (B, T)):
            raise ValueError(f"mask must be a bool tensor (B, T) = ({B}, {T}), got {_describe(mask)}")
        if target is not None:
            if self.entropy != "plugin":
                raise ValueError("target is only used by the plugin estimator (stop-gradient / EMA target branch)")
            if not isinstance(target, Tensor) or target.shape != z.shape:
                raise ValueError(f"target must have z's shape {tuple(z.shape)}, got {_describe(target)}")
        observed = z if mask is None else z[mask]
        if not bool(torch.isfinite(observed).all()):
            raise ValueError(
                "z contains non-finite values (NaN/inf) at observed steps; pass mask (False = missing frame)"
            )
        if target is not None and not bool(torch.isfinite(target if mask is None else target[mask]).all()):
            raise ValueError("target contains non-finite values (NaN/inf) at observed steps")
        return z


def _masked_mean(x: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp_min(1)


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__
