"""Input checks and preparation, once at the entry of the filter.

Shapes (shared ``(n, n)``, batched ``(B, n, n)`` or, for R, per step ``(B, T, m, m)``), finiteness,
symmetric positive semi-definite covariances (one host sync for all checks), the compute dtype, and the
missing steps (mask and NaN in ``z``). Errors are ValueErrors that name the argument.

Covariances (Q, R, P0) are checked at the precision they were given in, before promotion to the compute
dtype: asymmetric by at most 1e3 ulps of that dtype relative to their largest entry (so ``L @ L.T``
computed in float32 passes with float64 data), and positive semi-definite to the same tolerance; the
error states the measured and the allowed value. The filter then uses their symmetric parts.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import Tensor


def _dtype(*xs: Tensor | None) -> torch.dtype:
    dtype = torch.float32
    for x in xs:
        if x is not None and x.is_floating_point():
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _as_tensor(name: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


# a covariance may be asymmetric, and indefinite, by this many ulps of the dtype it was given in, relative
# to its largest entry (the round-off of computing it, e.g. L L^T or A P A^T in that dtype; the check
# runs after promotion to the compute dtype), but at most by _COVARIANCE_MAX_RELATIVE (half precision)
_COVARIANCE_ULPS = 1e3
_COVARIANCE_MAX_RELATIVE = 1e-2


def _relative_tolerance(given: torch.dtype, compute: torch.dtype) -> float:
    """Allowed asymmetry |X - X^T| (and lift of the diagonal for the definiteness check) of a covariance
    given in ``given``, relative to its largest entry: ``_COVARIANCE_ULPS`` ulps of ``given`` (of ``compute``
    for an integer matrix, which is exact), at most ``_COVARIANCE_MAX_RELATIVE``."""
    eps = torch.finfo(given if given.is_floating_point else compute).eps
    return min(_COVARIANCE_ULPS * eps, _COVARIANCE_MAX_RELATIVE)


def _covariance_detail(name: str, x: Tensor, rel: float, given: torch.dtype, symmetry: bool) -> str:
    """How far the covariance ``x`` ``(..., n, n)`` is from symmetric (``symmetry``) or from positive
    semi-definite (its smallest eigenvalue), against what the relative tolerance ``rel`` allows; for a
    stack, of the matrix that exceeds it most (an error path: syncs)."""
    scale = x.abs().amax((-2, -1))
    if symmetry:
        value = (x - x.mT).abs().amax((-2, -1))
        excess = value - rel * scale
    else:
        value = torch.linalg.eigvalsh(x).amin(-1)  # its lower triangle: symmetric to the tolerance
        excess = -value - rel * scale
    i = int(excess.flatten().argmax())
    where = f" in {name}[{', '.join(map(str, np.unravel_index(i, excess.shape)))}]" if excess.dim() else ""
    value, scale = value.flatten()[i].item(), scale.flatten()[i].item()
    what = (f"max |{name} - {name}^T| = {value:.3g}, allowed at most {rel * scale:.3g}" if symmetry
            else f"smallest eigenvalue {value:.3g}, allowed at least {-rel * scale:.3g}")
    given = str(given).removeprefix("torch.")
    return f": {what}{where} ({rel:.3g} x max |{name}| = {scale:.3g}, for {given} input)"


def _problems(named: dict[str, Tensor], covariances: dict[str, tuple[float, torch.dtype]]) -> tuple[list, Tensor]:
    """Checks of the inputs ``named``: ``(message, whether only finiteness counts, detail)`` triples and
    their values, one 1-D tensor not yet synchronised (see ``_raise_first``). Non-finite values in each
    tensor (its sum, where NaN and inf propagate); for the ``covariances`` among them, given as
    ``name: (relative tolerance, dtype given)`` (``_relative_tolerance``), also asymmetry beyond the
    tolerance and a failed Cholesky factorisation of the matrix with its diagonal lifted by the tolerance
    (not positive semi-definite): invalid where the value is > 0. ``detail`` (None or a function of no
    arguments) describes a failed check in numbers. Covariances of one shape and tolerance are checked
    together, as one stack."""
    checks, sums, groups = [], [], {}
    for name, x in named.items():
        if name in covariances:
            groups.setdefault((tuple(x.shape), covariances[name][0]), []).append(name)
        else:
            checks.append((f"{name} contains non-finite values (NaN or inf)", True, None))
            sums.append(x.sum())
    values = [torch.stack(sums)]
    for (_, rel), names in groups.items():
        X = torch.stack([named[name] for name in names])  # a fresh copy, lifted in place below
        scale = X.abs().amax((-2, -1), keepdim=True)
        tol = rel * scale.clamp_min(torch.finfo(X.dtype).tiny)
        asymmetry = ((X - X.mT).abs() - tol).flatten(1).amax(1)
        X.diagonal(dim1=-2, dim2=-1).add_(tol[..., 0])
        failed = torch.linalg.cholesky_ex(X, upper=True).info.reshape(len(names), -1).amax(1)  # upper: faster
        values.append(torch.stack([scale.flatten(1).sum(1), asymmetry, failed.to(X.dtype)], 1).flatten())
        for name in names:
            detail = functools.partial(_covariance_detail, name, named[name], *covariances[name])
            checks += [(f"{name} contains non-finite values (NaN or inf)", True, None),
                       (f"{name} must be a symmetric covariance matrix", False, functools.partial(detail, True)),
                       (f"{name} must be positive (semi-)definite", False, functools.partial(detail, False))]
    return checks, torch.cat(values)


def _raise_first(problems: tuple[list, Tensor], *fetch: Tensor) -> list[float]:
    """Raise ValueError with the message (and detail) of the first failed check of ``_problems``: a value
    that is not finite, or one > 0 unless only finiteness counts. One host sync, which also fetches the
    0-d tensors ``fetch`` (returned as floats)."""
    checks, values = problems
    values = torch.cat([values, *(x.reshape(1) for x in fetch)]).tolist()  # one dtype: inputs are cast to it
    for (message, finite_only, detail), value in zip(checks, values):
        if not math.isfinite(value) or (value > 0 and not finite_only):
            raise ValueError(message + (detail() if detail is not None and math.isfinite(value) else ""))
    return values[len(checks):]


def _param(name: str, x, shape: tuple[int, ...], batch: int, steps: int | None = None) -> Tensor:
    """Check that ``x`` has ``shape`` (shared), ``(batch, *shape)`` (batched) or, if ``steps`` is given,
    ``(batch, steps, *shape)`` (per step); a leading batch dimension of 1 is accepted and dropped."""
    x = _as_tensor(name, x)
    allowed = [shape, (batch, *shape), (1, *shape)]
    if steps is not None:
        allowed += [(batch, steps, *shape), (1, steps, *shape)]
    if tuple(x.shape) not in allowed:
        opts = " or ".join(str(s) for s in allowed[:2] + allowed[3:4])
        raise ValueError(f"{name} must have shape {opts}, got {tuple(x.shape)}")
    if x.dim() > len(shape) and x.shape[0] == 1 and batch != 1:
        x = x.expand(batch, *x.shape[1:])
    return x


def _prepare(z, A, Q, C, R, m0, P0, B, u, mask, target):
    """Validate all inputs once and return them cast to the compute dtype, plus ``(bu, observed)``."""
    z = _as_tensor("z", z)
    if z.dim() != 3 or z.shape[1] == 0:
        raise ValueError(f"z must have shape (B, T, m) with T >= 1, got {tuple(z.shape)}")
    batch, steps, m = z.shape
    A = _as_tensor("A", A)
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must have shape (n, n) or (B, n, n), got {tuple(A.shape)}")
    n = A.shape[-1]
    A = _param("A", A, (n, n), batch)
    Q = _param("Q", Q, (n, n), batch)
    C = _param("C", C, (m, n), batch)
    R = _param("R", R, (m, m), batch, steps)
    m0 = _param("m0", m0, (n,), batch)
    P0 = _param("P0", P0, (n, n), batch)
    if (B is None) != (u is None):
        raise ValueError("B and u must be given together (got only " + ("B)" if u is None else "u)"))
    if u is not None:
        u = _as_tensor("u", u)
        if u.dim() != 3 or u.shape[:2] != (batch, steps):
            raise ValueError(f"u must have shape (B, T, k) = ({batch}, {steps}, k), got {tuple(u.shape)}")
        B = _param("B", B, (n, u.shape[-1]), batch)
    if target is not None:
        target = _as_tensor("target", target)
        if target.shape != z.shape:
            raise ValueError(f"target must have the shape of z {tuple(z.shape)}, got {tuple(target.shape)}")

    dtype = _dtype(z, A, Q, C, R, m0, P0, B, u, target)
    covariances = {name: (_relative_tolerance(x.dtype, dtype), x.dtype) for name, x in (("Q", Q), ("R", R), ("P0", P0))}
    A, Q, C, R, m0, P0, z = (x.to(dtype) for x in (A, Q, C, R, m0, P0, z))
    if target is not None:
        target = target.to(dtype)
    if u is not None:
        B, u = B.to(dtype), u.to(dtype)
    named = dict(A=A, C=C, m0=m0, Q=Q, R=R, P0=P0) | ({} if u is None else dict(B=B, u=u))
    # NaN in z or target marks a missing step; their sums are finite when there is none (the common case)
    with torch.no_grad():  # checks only: nothing for autograd to record
        sums = _raise_first(_problems(named, covariances), *(x.sum() for x in (z, target) if x is not None))
    # the covariances the filter uses: their symmetric parts (equal to them where they are symmetric)
    Q, R, P0 = (0.5 * (x + x.mT) for x in (Q, R, P0))
    observed = None
    if mask is not None or not all(math.isfinite(x) for x in sums):
        missing = torch.isnan(z).any(-1)
        if target is not None:
            missing = missing | torch.isnan(target).any(-1)
        if mask is not None:
            mask = _as_tensor("mask", mask)
            if tuple(mask.shape) != (batch, steps):
                raise ValueError(f"mask must have shape (B, T) = ({batch}, {steps}), got {tuple(mask.shape)}")
            missing = missing | ~mask.to(torch.bool)
        infinite = torch.isinf(z).any(-1)
        if target is not None:
            infinite = infinite | torch.isinf(target).any(-1)
        any_missing, any_infinite = torch.stack([missing.any(), (infinite & ~missing).any()]).tolist()  # one sync
        if any_infinite:
            raise ValueError("z contains inf (NaN marks a missing observation, inf is an error)")
        if any_missing:
            observed = ~missing
            z = torch.where(observed[..., None], z, 0.0)
            if target is not None:
                target = torch.where(observed[..., None], target, 0.0)
    bu = None
    if u is not None:
        bu = u @ B.mT if B.dim() == 2 else torch.einsum("bnk,btk->btn", B, u)
    return z, A, Q, C, R, m0, P0, bu, observed, target
