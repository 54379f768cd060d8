"""Native (C) loops for the Kalman filter on CPU, with the BLAS/LAPACK that PyTorch links.

A Python loop over tensor ops pays PyTorch's per-operator dispatch (3-5 us) on every matrix op of
every step, more than the arithmetic of a 32 x 32 step. ``native_kalman.c`` runs the same loops in C
and calls BLAS/LAPACK directly, through the ``?gemm_``/``?potrf_``/``?trsm_`` symbols of the library
torch itself uses (MKL in the x86-64 Linux wheels): the same routines, without the dispatch.

The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``; about 0.2 s)
into a directory private to the user (``$XDG_CACHE_HOME`` or ``~/.cache``, under ``ldm-worldmodel``;
else ``ldm-worldmodel-<uid>`` in the temporary directory; ``$WORLDMODEL_NATIVE_DIR`` instead of both),
keyed by a hash of the source and torch's version, and used only once a subprocess has checked it
against the Python loops in float64 and float32 (about 5 s, once; a check that fails or times out is
remembered and the Python loops run). ``native_build`` decides what may be loaded: only a library this
user built and self-tested, recorded by its sha256, in a directory no one else can write. Where anything
is missing (no compiler, no private directory, no such symbols in torch's libraries, another platform),
:func:`library` returns None and the filter runs its loops in Python: same results up to round-off.
``WORLDMODEL_NATIVE=0`` switches the native loops off; :func:`status` says why they are off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

from . import native_build
from .types import _new_empty  # huge pages for large outputs

__all__ = ["library", "status", "usable", "covariance_recursion", "mean_recursion", "innovation_loglik",
           "adjoint_mean_recursion", "sandwich_recursion"]

SOURCE = Path(__file__).with_name("native_kalman.c")
BLAS_SYMBOLS = ("sgemm_", "dgemm_", "spotrf_", "dpotrf_", "strsm_", "dtrsm_")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_why_not: list[str] = []  # the reason the native loops are off, once known


def _blas_pointers() -> list[int] | None:
    """Addresses of ``BLAS_SYMBOLS`` in the libraries torch has loaded (None where one is missing)."""
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if (lib_dir / name).exists():
            try:
                lib = ctypes.CDLL(str(lib_dir / name))
                return [ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value for symbol in BLAS_SYMBOLS]
            except (OSError, AttributeError):
                return None
    return None


SELF_TEST_TIMEOUT = 300.0  # seconds; a self-test that takes longer is remembered as failed
_SELF_TEST = f"""
import sys
from pathlib import Path
from worldmodel.kalman import kalman_filter, native
try:
    native._self_test(Path(sys.argv[1]), kalman_filter)
except AssertionError as exc:
    print(exc, file=sys.stderr)
    sys.exit({native_build.WRONG_RESULTS})
"""
_SELF_TEST_TOLERANCE = {torch.float64: 1e-9, torch.float32: 5e-5}  # x max(1, |value|); round-off: 1e-15, 2e-6


def _self_test(path: Path, kalman_filter) -> None:
    """Raise AssertionError unless the library at ``path`` reproduces the Python loops (values and
    gradients of a small ``kalman_filter`` with controls, in float64 and in float32); run in a subprocess of
    its own by ``native_build``, whose script passes the filter in (this module does not import the package
    above it)."""
    global library, usable
    lib = _load(path, _blas_pointers())
    saved = library, usable
    library = lambda: lib  # noqa: E731
    try:
        for dtype, tol in _SELF_TEST_TOLERANCE.items():
            gen = torch.Generator().manual_seed(0)
            n, m, k, batch, steps = 4, 3, 2, 2, 40

            def randn(*shape):
                return torch.randn(*shape, dtype=dtype, generator=gen)

            W, V, eye = randn(n, n), randn(m, m), torch.eye(n, dtype=dtype)
            args = [0.3 * randn(n, n), 0.1 * eye + W @ W.mT / n, randn(m, n),
                    0.2 * torch.eye(m, dtype=dtype) + V @ V.mT / m, randn(n), eye, randn(n, k)]
            z, u = randn(batch, steps, m), randn(batch, steps, k)

            def run(native: bool):
                global usable
                usable = lambda *xs: native  # noqa: E731
                leaves = [x.clone().requires_grad_() for x in args]
                res = kalman_filter(z, *leaves[:6], B=leaves[6], u=u)
                loss = res.log_likelihood.sum() + res.filtered.mean.square().sum() + res.filtered.cov.sum()
                return [res.log_likelihood, res.filtered.mean, res.predicted.cov,
                        *torch.autograd.grad(loss, leaves)]

            names = ["log-likelihood", "filtered mean", "predicted cov", *"dA dQ dC dR dx0 dP0 dB".split()]
            for what, a, b in zip(names, run(True), run(False)):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()),
                                           msg=lambda text: f"{dtype}, {what}: {' '.join(text.split())}")
    finally:
        library, usable = saved


def _self_test_env() -> dict:
    """The environment of the self-test's subprocess: this one, with this package importable."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]),
                                                        os.environ.get("PYTHONPATH", "")]))


_SIGNATURES = {  # C function (without its _f32/_f64 suffix): (return type, argument types)
    "wm_covariance_recursion": (ctypes.c_int, [ctypes.c_int] * 3 + [ctypes.c_void_p] * 12
                                + [ctypes.c_int, ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_double]),
    "wm_mean_recursion": (None, [ctypes.c_int] * 5 + [ctypes.c_void_p] * 8),
    "wm_innovation_loglik": (None, [ctypes.c_int] * 4 + [ctypes.c_void_p] * 4),
    "wm_adjoint_mean_recursion": (None, [ctypes.c_int] * 4 + [ctypes.c_void_p] * 3),
    "wm_sandwich_recursion": (ctypes.c_int, [ctypes.c_int] * 2 + [ctypes.c_void_p, ctypes.c_long] * 2
                              + [ctypes.c_void_p] * 3),
}


def _load(path: Path, pointers: list[int]) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.wm_set_blas(*(ctypes.c_void_p(p) for p in pointers))
    for name, (restype, argtypes) in _SIGNATURES.items():
        for suffix in _SUFFIX.values():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.restype, fn.argtypes = restype, argtypes
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled native loops, bound to torch's BLAS; None where they are unavailable (see :func:`status`)."""
    if os.environ.get("WORLDMODEL_NATIVE", "1") == "0":
        _why_not.append("switched off by WORLDMODEL_NATIVE=0")
        return None
    if not sys.platform.startswith("linux"):
        _why_not.append(f"not built on {sys.platform}")
        return None
    pointers = _blas_pointers()
    if pointers is None:
        _why_not.append(f"torch's libraries do not export {', '.join(BLAS_SYMBOLS)}")
        return None
    name = f"native_kalman-{hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:16]}"
    dirs, reasons = native_build.candidate_dirs()
    for directory in dirs:
        try:
            path = native_build.find_or_build(directory, name, SOURCE, [sys.executable, "-c", _SELF_TEST],
                                              _self_test_env(), SELF_TEST_TIMEOUT)
        except native_build.Rejected as exc:  # a wrong build: the same anywhere else
            reasons.append(str(exc))
            break
        except native_build.NotHere as exc:
            reasons.append(str(exc))
            continue
        try:
            return _load(path, pointers)  # checked (owner, mode, sha256) just before
        except (OSError, AttributeError) as exc:
            reasons.append(f"loading {path} failed: {exc}")
    _why_not.append("; ".join(reasons) or "nowhere to build")
    return None


def _call(name: str, dtype: torch.dtype, *args):
    """Call the C function ``name`` for ``dtype``; tensors among ``args`` are passed as their data pointers."""
    fn = getattr(library(), f"{name}_{_SUFFIX[dtype]}")
    return fn(*(x.data_ptr() if isinstance(x, Tensor) else x for x in args))


def status() -> str:
    """'native' when the native loops run, else why not."""
    return "native" if library() is not None else f"python ({_why_not[-1] if _why_not else 'unknown'})"


def usable(*xs: Tensor) -> bool:
    """Whether the native loops can take these tensors: on CPU, float32 or float64, no autograd tracking
    needed inside (callers are autograd Functions), and the library is available."""
    x = xs[0]
    return x.device.type == "cpu" and x.dtype in _SUFFIX and library() is not None


def covariance_recursion(A: Tensor, Q: Tensor, C: Tensor, R: Tensor, P0: Tensor, steps: int, ulps: float,
                         every: int, min_left: int, observed: Tensor | None = None, first: int = 0) -> tuple[Tensor, ...]:
    """``native_kalman.c``'s covariance recursion for shared parameters ``A, Q, P0`` ``(n, n)``, ``C``
    ``(m, n)``, ``R`` ``(m, m)`` (symmetric), with missing steps where ``observed`` ``(steps,)`` is 0 (None:
    none; ``first``: the step after the last missing one). Returns P_{t|t-1} and P_{t|t} ``(steps, n, n)``
    (symmetrised, extended past the stop), and for the k computed steps X_t = S_t^{-1} C P_{t|t-1}
    ``(k, m, n)`` (0 where missing), S_t and its lower Cholesky factor L_t ``(k, m, m)`` and the info
    ``(k,)`` int32."""
    n, m = A.shape[-1], C.shape[-2]
    A, Q, C, R, P0 = (x.contiguous() for x in (A, Q, C, R, P0))
    flags = None if observed is None else (observed != 0).to(torch.uint8)
    Pp, Pf = _new_empty(A, (steps, n, n)), _new_empty(A, (steps, n, n))
    X, S, L = A.new_empty(steps, m, n), A.new_empty(steps, m, m), A.new_empty(steps, m, m)
    info = torch.zeros(steps, dtype=torch.int32)
    k = _call("wm_covariance_recursion", A.dtype, n, m, steps, A, Q, C, R, P0, Pp, Pf, X, S, L, info, flags, first,
              ulps, every, min_left, torch.finfo(A.dtype).eps)
    if k < 0:
        raise MemoryError("native covariance recursion: out of memory")
    return Pp, Pf, X[:k], S[:k], L[:k], info[:k]


def mean_recursion(X: Tensor, A: Tensor, CA: Tensor, y: Tensor, b: Tensor | None, x0: Tensor) -> tuple[Tensor, Tensor]:
    """``native_kalman.c``'s mean recursion for shared parameters: gains ``X`` ``(k, m, n)`` (the last one for
    the steps after k), ``A`` ``(n, n)``, ``CA`` ``(m, n)``, ``y`` ``(B, T, m)``, ``b`` ``(B, T, n)`` or None and
    ``x0`` ``(B, n)`` -> (F_t = A - X_t^T CA ``(k, n, n)``, the means ``(B, T, n)``)."""
    (k, m, n), (batch, steps, _) = X.shape, y.shape
    X, A, CA, y, x0 = (x.contiguous() for x in (X, A, CA, y, x0))
    b = None if b is None else b.contiguous()
    F, out = A.new_empty(k, n, n), A.new_empty(batch, steps, n)
    _call("wm_mean_recursion", A.dtype, n, m, k, batch, steps, X, A, CA, y, b, x0, F, out)
    return F, out


def innovation_loglik(L: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
    """``native_kalman.c``'s innovation log-likelihood for factors shared by the batch: ``L`` ``(k, m, m)``
    (the last one for the steps after k) and residuals ``e`` ``(B, T, m)`` -> (whitened residuals
    L_t^{-1} e_t ``(B, T, m)``, log N(e_t; 0, L_t L_t^T) ``(B, T)``)."""
    (k, m, _), (batch, steps, _) = L.shape, e.shape
    L, e = L.contiguous(), e.contiguous()
    w, ll = e.new_empty(batch, steps, m), e.new_empty(batch, steps)
    _call("wm_innovation_loglik", e.dtype, m, k, batch, steps, L, e, w, ll)
    return w, ll


def adjoint_mean_recursion(F: Tensor, g: Tensor) -> Tensor:
    """``native_kalman.c``'s adjoint of the mean recursion: lam_t = g_t + lam_{t+1} F_{t+1} (rows), lam_{T-1} =
    g_{T-1}, with ``F`` ``(k, n, n)`` (F_t = F_{k-1} for t >= k) and ``g`` ``(B, T, n)`` -> lam ``(B, T, n)``."""
    (k, n, _), (batch, steps, _) = F.shape, g.shape
    F, g = F.contiguous(), g.contiguous()
    lam = g.new_empty(batch, steps, n)
    _call("wm_adjoint_mean_recursion", g.dtype, n, k, batch, steps, F, g, lam)
    return lam


def _steps_of_matrices(x: Tensor) -> Tensor:
    """``x`` ``(L, n, n)`` with each matrix row-major contiguous (an expanded stack stays a view)."""
    return x if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1] else x.contiguous()


def sandwich_recursion(N: Tensor, D: Tensor, states: bool) -> tuple[Tensor | None, Tensor, Tensor]:
    """``native_kalman.c``'s G_j = D_j + N_j G_{j+1} N_j^T for j = L-1 .. 0 from G_L = 0, with ``N`` ``(n, n)``
    (every step) or ``(L, n, n)`` and ``D`` ``(L, n, n)`` (L >= 1; an expanded stack is read as such) ->
    (every G_j ``(L, n, n)`` if ``states`` else None, sum_j G_j, G_0)."""
    steps, n = D.shape[-3], D.shape[-1]
    N, D = _steps_of_matrices(N), _steps_of_matrices(D)
    out = D.new_empty(steps, n, n) if states else None
    total, last = D.new_empty(n, n), D.new_empty(n, n)
    if _call("wm_sandwich_recursion", D.dtype, n, steps, N, N.stride(-3) if N.dim() == 3 else 0, D, D.stride(-3),
             out, total, last):
        raise MemoryError("native sandwich recursion: out of memory")
    return out, total, last
