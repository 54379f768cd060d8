"""Evaluation: latent probes (linear R^2, MCC), k-step predictive NLL and calibration of the exact
predictive Gaussian, and linear-probe and kNN accuracy for image SSL.

All fits run in float64 on the CPU; inputs may be torch tensors or numpy arrays of any float dtype. The
k-step predictive scores run on the latents' device.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "r2_score",
    "fit_readout",
    "linear_r2",
    "mcc",
    "optimal_assignment",
    "kstep_residuals",
    "predictive_metrics",
    "linear_probe_accuracy",
    "knn_accuracy",
]


def _as_2d(x: Any, name: str) -> Tensor:
    """(..., d) array/tensor -> float64 CPU tensor (N, d)."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x.detach()).cpu().double()
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape (..., d), got {tuple(t.shape)}")
    return t.reshape(-1, t.shape[-1])


def _as_labels(y: Any) -> Tensor:
    """Integer class labels (N,) as a CPU int64 tensor."""
    return torch.as_tensor(y.detach() if isinstance(y, Tensor) else np.asarray(y)).long().cpu().reshape(-1)


def r2_score(pred: Any, target: Any) -> Tensor:
    """Per-component coefficient of determination R^2 = 1 - SS_res / SS_tot, inputs (..., d) -> (d,)."""
    p, y = _as_2d(pred, "pred"), _as_2d(target, "target")
    if p.shape != y.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(p.shape)} and {tuple(y.shape)}")
    ss_res = (p - y).pow(2).sum(0)
    ss_tot = (y - y.mean(0)).pow(2).sum(0)
    return 1.0 - ss_res / ss_tot.clamp_min(torch.finfo(torch.float64).tiny)


def _finite_rows(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    keep = torch.isfinite(x).all(1) & torch.isfinite(y).all(1)
    return x[keep], y[keep]


def fit_readout(features: Any, targets: Any, ridge: float = 0.0) -> tuple[Tensor, Tensor]:
    """Affine readout y ~ x W + c fit by (ridge) least squares in float64; rows with NaN are dropped.

    Args:
        features: (..., F) latent features (e.g. filtered means); targets: (..., D), same leading axes.
        ridge: L2 penalty on W (not on the bias), relative to the mean feature variance.
    Returns:
        W (F, D) and c (D,), float64.
    """
    x, y = _finite_rows(_as_2d(features, "features"), _as_2d(targets, "targets"))
    if len(x) == 0:
        raise ValueError("no finite rows to fit the readout")
    mu_x, mu_y = x.mean(0), y.mean(0)
    xc, yc = x - mu_x, y - mu_y
    gram = xc.T @ xc
    penalty = ridge * gram.diagonal().mean().clamp_min(1e-12)
    w = torch.linalg.lstsq(gram + penalty * torch.eye(len(gram), dtype=gram.dtype), xc.T @ yc).solution
    return w, mu_y - mu_x @ w


def linear_r2(features_train: Any, targets_train: Any, features_test: Any, targets_test: Any,
              ridge: float = 0.0) -> Tensor:
    """Held-out R^2 of an affine readout (`fit_readout`) fit on training data, scored on test data.

    Args:
        features_train: (..., F) latent features of the training episodes (e.g. filtered means).
        targets_train: (..., D) true state on the same steps (leading axes must match).
        features_test, targets_test: the same for held-out episodes.
        ridge: L2 penalty on W (not on the bias), relative to the mean feature variance.
    Returns:
        (D,) float64 tensor: R^2 per target component on the test set. Rows with NaN are dropped.
    """
    xte, yte = _finite_rows(_as_2d(features_test, "features_test"), _as_2d(targets_test, "targets_test"))
    if _as_2d(features_train, "features_train").shape[1] != xte.shape[1] or \
            _as_2d(targets_train, "targets_train").shape[1] != yte.shape[1]:
        raise ValueError("train and test features/targets must have the same last dimension")
    if len(xte) == 0:
        raise ValueError("no finite rows to score the readout")
    w, c = fit_readout(features_train, targets_train, ridge)
    return r2_score(xte @ w + c, yte)


def optimal_assignment(score: Any) -> list[int]:
    """Exact maximum-score assignment (Hungarian algorithm, O(n^2 m)) for an (n, m) matrix, n <= m.

    Returns cols with cols[i] the column matched to row i (all distinct)."""
    s = np.asarray(score, dtype=np.float64)
    n, m = s.shape
    if n > m:
        raise ValueError(f"score must have at least as many columns as rows, got {s.shape}")
    cost = -s
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    p, way = np.zeros(m + 1, dtype=int), np.zeros(m + 1, dtype=int)  # p[j]: row matched to column j (1-based)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = np.full(m + 1, np.inf), np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    cols = [0] * n
    for j in range(1, m + 1):
        if p[j]:
            cols[p[j] - 1] = j - 1
    return cols


def mcc(latents: Any, sources: Any, return_assignment: bool = False) -> float | tuple[float, list[int]]:
    """Mean correlation coefficient: mean |Pearson correlation| between true sources and latents after
    the optimal one-to-one matching (Hungarian algorithm; Hyvarinen & Morioka 2016, Khemakhem et al. 2020).

    Args:
        latents: (..., d_z) learned latents; sources: (..., d_s) true sources on the same samples.
        return_assignment: also return, for each of the min(d_s, d_z) matched pairs in source order
            (or latent order if d_z < d_s), the index of its partner.
    """
    z, s = _finite_rows(_as_2d(latents, "latents"), _as_2d(sources, "sources"))
    z = (z - z.mean(0)) / z.std(0).clamp_min(1e-12)
    s = (s - s.mean(0)) / s.std(0).clamp_min(1e-12)
    corr = (s.T @ z / (len(z) - 1)).abs()  # (d_s, d_z)
    if corr.shape[0] > corr.shape[1]:
        corr = corr.T
    cols = optimal_assignment(corr.numpy())
    value = float(corr[torch.arange(len(cols)), torch.tensor(cols)].mean())
    return (value, cols) if return_assignment else value


@torch.no_grad()
def kstep_residuals(prior: Any, z: Tensor, actions: Tensor | None = None, horizon: int = 20, burn_in: int = 5,
                    mask: Tensor | None = None, R: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Scores of the prior's exact k-step predictions of held-out latents, k = 1..horizon.

    Every filtered belief N(m_{t|t}, P_{t|t}) with burn_in <= t < T - 1 predicts z_{t+k} by the exact k-step
    predictive Gaussian N(mu, Sigma) (`worldmodel.objective.kstep_predictive`).

    Args:
        prior: a state-space prior (`worldmodel.priors.StateSpacePrior`).
        z: (B, T, d) latents. actions: (B, T, a) stored actions (action[t] taken after frame t) or None.
        mask: (B, T) bool, True = observed (used when filtering). R: optional per-step observation noise
            (B, T, d, d), or its variances (B, T, d), passed to the filter (heteroscedastic models, e.g. the
            variances of `WorldModel.latents`); predictions use the prior's R.
        Runs on the device of z (actions, mask and R may be on another: they are moved there).
    Returns:
        nll (B, N, H): -log N(z_{t+k}; mu, Sigma) (0 where not valid);
        standardized (B, N, H, d): (z_{t+k} - mu) / sqrt(diag Sigma) per coordinate (0 where not valid);
        valid (B, N, H) bool: t + k < T and z_{t+k} observed and finite.
        N = T - 1 - burn_in starts; H = min(horizon, N).
    """
    from worldmodel.model import shift_actions
    from worldmodel.objective import kstep_predictive

    if z.dim() != 3:
        raise ValueError(f"z must have shape (B, T, d), got {tuple(z.shape)}")
    b, t_len, d = z.shape
    if t_len - burn_in - 1 < 1:
        raise ValueError(f"sequences of length {t_len} are too short for burn_in={burn_in}")
    horizon = min(horizon, t_len - burn_in - 1)
    actions, mask, R = (None if x is None else x.to(z.device) for x in (actions, mask, R))
    u = shift_actions(actions)
    filtered = prior.filter(z, u=u, mask=mask, R=R).filtered
    starts = torch.arange(burn_in, t_len - 1, device=z.device)
    pred, times, valid = kstep_predictive(prior, filtered, u, starts, horizon)
    target = z[:, times].to(pred.mean.dtype)  # (B, N, H, d)
    valid = valid.expand(b, -1, -1) & torch.isfinite(target).all(-1)
    if mask is not None:
        valid = valid & mask[:, times]
    target = torch.nan_to_num(target)
    nll = torch.where(valid, -pred.log_prob(target), 0.0)
    standardized = (target - pred.mean) / torch.diagonal(pred.cov, dim1=-2, dim2=-1).clamp_min(1e-30).sqrt()
    return nll, torch.where(valid[..., None], standardized, 0.0), valid


@torch.no_grad()
def predictive_metrics(prior: Any, z: Tensor, actions: Tensor | None = None, horizon: int = 20,
                       burn_in: int = 5, mask: Tensor | None = None, R: Tensor | None = None,
                       calibration: Any = None, folds: int = 0) -> dict[str, list[float]]:
    """k-step predictive NLL and calibration of the exact predictive Gaussian, k = 1..horizon.

    Scores `kstep_residuals` (same arguments) per k:
      nll[k-1]       = mean over beliefs of -log N(z_{t+k}; mu, Sigma) / d   (nats per latent dimension),
      coverage_1sigma[k-1], coverage_2sigma[k-1] = fraction of latent coordinates with
                       |z - mu| <= c sqrt(diag Sigma) (nominal 68.27 % and 95.45 %).
    Recalibrated bands (`worldmodel.calibration.PredictiveCalibration`) add
      calibrated_1sigma[k-1], calibrated_2sigma[k-1] = the same fractions for |z - mu| <= c s_{k,i}(c) sqrt(Sigma_ii),
    with the bands of a fitted `calibration` (fit on other episodes), or, with ``folds`` >= 2, cross-fitted:
    the episodes are split into that many contiguous folds and each fold is scored with bands fitted on the
    others (at most one fold per episode). One host synchronisation for the scores of all horizons.

    Returns:
        dict with lists of length horizon: "k", "nll", "coverage_1sigma", "coverage_2sigma" (and the
        calibrated pair), plus the nominal coverages "nominal_1sigma", "nominal_2sigma".
    """
    from worldmodel.calibration import PredictiveCalibration

    nll, standardized, valid = kstep_residuals(prior, z, actions, horizon, burn_in, mask, R)
    b, _, h, d = standardized.shape
    widths = {"coverage_1sigma": 1.0, "coverage_2sigma": 2.0}
    if calibration is not None and calibration.fitted:
        widths |= {f"calibrated_{c:.0f}sigma": calibration.half_widths(c, h).to(standardized) for c in (1.0, 2.0)}
    elif folds >= 2 and b >= 2:
        bounds = [f * b // min(folds, b) for f in range(min(folds, b) + 1)]  # contiguous folds of episodes
        half = {c: standardized.new_empty(b, 1, h, d) for c in (1.0, 2.0)}
        for lo, hi in zip(bounds, bounds[1:]):
            others = [torch.cat([x[:lo], x[hi:]]) for x in (standardized, valid)]
            fitted = PredictiveCalibration().to(z.device).fit(*others)
            for c in half:
                half[c][lo:hi] = fitted.half_widths(c, h).to(standardized)
        widths |= {f"calibrated_{c:.0f}sigma": w for c, w in half.items()}
    # per k: the beliefs scored, their summed NLL and their coordinates within each band (one host sync)
    scores = [valid.sum((0, 1)), nll.double().sum((0, 1))]
    scores += [(valid[..., None] & (standardized.abs() <= w)).sum((0, 1, 3)) for w in widths.values()]
    count, nll_sum, *within = torch.stack([x.double() for x in scores]).tolist()
    out: dict[str, list[float]] = {"k": [], "nll": []} | {name: [] for name in widths}
    for k in range(len(count)):
        if count[k]:
            out["k"].append(k + 1)
            out["nll"].append(nll_sum[k] / count[k] / d)
            for name, inside in zip(widths, within):
                out[name].append(inside[k] / (count[k] * d))
    out["nominal_1sigma"] = [math.erf(1 / math.sqrt(2))] * len(out["k"])
    out["nominal_2sigma"] = [math.erf(2 / math.sqrt(2))] * len(out["k"])
    return out


def linear_probe_accuracy(features_train: Any, labels_train: Any, features_test: Any, labels_test: Any,
                          num_classes: int | None = None, weight_decay: float = 1e-4, max_iter: int = 200) -> float:
    """Top-1 test accuracy of a multinomial logistic-regression probe on frozen (standardised) features.

    Fit by full-batch L-BFGS in float64 on the cross-entropy + weight_decay/2 ||W||^2.
    features: (N, F); labels: (N,) integer classes.
    """
    xtr, xte = _as_2d(features_train, "features_train"), _as_2d(features_test, "features_test")
    ytr, yte = _as_labels(labels_train), _as_labels(labels_test)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError("features and labels must have the same number of rows")
    classes = num_classes if num_classes is not None else int(max(ytr.max(), yte.max())) + 1
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-8)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    w = torch.zeros(xtr.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + bias, ytr) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xte @ w + bias).argmax(1) == yte).double().mean())


def knn_accuracy(features_train: Any, labels_train: Any, features_test: Any, labels_test: Any, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> float:
    """Top-1 test accuracy of the weighted kNN classifier of Wu et al. (2018), as solo-learn and DINO score
    SSL features: rows are L2-normalised, each test row's k most cosine-similar training rows vote for
    their class with weight exp(similarity / temperature), the class with the largest vote wins.

    features: (N, F); labels: (N,) integer classes. Test rows are scored ``chunk`` at a time (memory N x chunk).
    """
    xtr, xte = _as_2d(features_train, "features_train"), _as_2d(features_test, "features_test")
    ytr, yte = _as_labels(labels_train), _as_labels(labels_test)
    if len(xtr) != len(ytr) or len(xte) != len(yte) or xtr.shape[1] != xte.shape[1]:
        raise ValueError("features and labels must have the same number of rows, train and test the same width")
    if k < 1 or temperature <= 0:
        raise ValueError(f"knn_accuracy needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    classes = num_classes if num_classes is not None else int(max(ytr.max(), yte.max())) + 1
    k = min(k, len(xtr))
    xtr = torch.nn.functional.normalize(xtr, dim=1)
    correct = 0
    for rows, labels in zip(torch.nn.functional.normalize(xte, dim=1).split(chunk), yte.split(chunk)):
        similarity, index = (rows @ xtr.T).topk(k, dim=1)
        votes = torch.zeros(len(rows), classes, dtype=torch.float64)
        votes.scatter_add_(1, ytr[index], (similarity / temperature).exp())
        correct += int((votes.argmax(1) == labels).sum())
    return correct / len(yte)
