"""Native (C) loops for the Kalman filter on CPU, with the BLAS/LAPACK that PyTorch links.

A Python loop over tensor ops pays PyTorch's per-operator dispatch (3-5 us) on every matrix op of
every step, more than the arithmetic of a 32 x 32 step. ``native_kalman.c`` runs the same loops in C
and calls BLAS/LAPACK directly, through the ``?gemm_``/``?potrf_``/``?trsm_`` symbols of the library
torch itself uses (MKL in the x86-64 Linux wheels): the same routines, without the dispatch.

The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``; about 0.2 s)
into the user cache (``$XDG_CACHE_HOME`` or ``~/.cache``, under ``ldm-worldmodel``; else a per-user
temporary directory), keyed by a hash of the source and torch's version, and kept only once a
subprocess has checked it against the Python loops (about 5 s, once; a failed check is remembered
and the Python loops run). Where anything is missing (no compiler, no such symbols in torch's
libraries, another platform), :func:`library` returns None and the filter runs its loops in Python:
same results up to round-off. ``WORLDMODEL_NATIVE=0`` switches the native loops off; :func:`status`
says why they are off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

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


def _compile(target: Path) -> str | None:
    """Compile ``SOURCE`` into the shared library ``target`` (atomically); an error message or None."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return "no C compiler (set CC or install cc)"
    cmd, tmp = [compiler, "-O2", "-shared", "-fPIC", "-o", "OUT", str(SOURCE.resolve()), "-lm"], None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        cmd[cmd.index("OUT")] = tmp
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode:
            return f"{' '.join(cmd)} failed: {proc.stderr.strip()[:500]}"
        # a wrong BLAS interface (say 64-bit integers) would crash or corrupt: check in a process of its own
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]),
                                                          os.environ.get("PYTHONPATH", "")]))
        check = subprocess.run([sys.executable, "-c", _SELF_TEST, tmp], capture_output=True, text=True, timeout=300,
                               env=env)
        if check.returncode:
            error = f"the freshly built {target.name} failed its self-test: " + " ".join(
                check.stderr.strip().splitlines()[-4:])
            if check.returncode == _WRONG_RESULTS or check.returncode < 0:  # wrong results or a crash: remember it,
                target.with_suffix(".failed").write_text(error)  # so later processes do not build and test again
            return error
        os.replace(tmp, target)
        for stale in target.parent.glob("native_kalman-*"):  # builds of earlier sources or torch versions
            if stale != target:
                stale.unlink(missing_ok=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{' '.join(cmd)} failed: {exc}"
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
    return None


_WRONG_RESULTS = 3  # the self-test's exit status when the library runs but its results differ
_SELF_TEST = f"""
import sys
from pathlib import Path
from worldmodel.kalman import kalman_filter, native
try:
    native._self_test(Path(sys.argv[1]), kalman_filter)
except AssertionError as exc:
    print(exc, file=sys.stderr)
    sys.exit({_WRONG_RESULTS})
"""


def _self_test(path: Path, kalman_filter) -> None:
    """Raise AssertionError unless the library at ``path`` reproduces the Python loops (values and
    gradients of a small float64 ``kalman_filter`` with controls); run in a subprocess of its own by
    ``_compile``, whose script passes the filter in (this module does not import the package above it)."""
    gen = torch.Generator().manual_seed(0)
    n, m, k, batch, steps = 4, 3, 2, 2, 40

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen)

    W, V = randn(n, n), randn(m, m)
    args = [0.3 * randn(n, n), 0.1 * torch.eye(n, dtype=torch.float64) + W @ W.mT / n, randn(m, n),
            0.2 * torch.eye(m, dtype=torch.float64) + V @ V.mT / m, randn(n), torch.eye(n, dtype=torch.float64),
            randn(n, k)]
    z, u = randn(batch, steps, m), randn(batch, steps, k)

    def run():
        leaves = [x.clone().requires_grad_() for x in args]
        res = kalman_filter(z, *leaves[:6], B=leaves[6], u=u)
        loss = res.log_likelihood.sum() + res.filtered.mean.square().sum() + res.filtered.cov.sum()
        return [res.log_likelihood, res.filtered.mean, res.predicted.cov,
                *torch.autograd.grad(loss, leaves)]

    lib = _load(path, _blas_pointers())
    global library, usable
    library, usable = (lambda: lib), (lambda *xs: True)
    got = run()
    usable = lambda *xs: False  # noqa: E731
    for a, b in zip(got, run()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def _build_dirs() -> list[Path]:
    """Where the compiled library is kept: the user cache, else a per-user temporary directory."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return [Path(base) / "ldm-worldmodel", Path(tempfile.gettempdir()) / f"ldm-worldmodel-{os.getuid()}"]


_SIGNATURES = {  # C function (without its _f32/_f64 suffix): (return type, argument types)
    "wm_covariance_recursion": (ctypes.c_int, [ctypes.c_int] * 3 + [ctypes.c_void_p] * 11
                                + [ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_double]),
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
    name = f"native_kalman-{hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:16]}.so"
    errors = []
    for target in _build_dirs():
        failed = (target / name).with_suffix(".failed")
        if failed.exists():
            errors.append(f"{failed.read_text()} (delete {failed} to try again)")
            continue
        error = None if target.joinpath(name).exists() else _compile(target / name)
        if error is None:
            try:
                return _load(target / name, pointers)
            except (OSError, AttributeError) as exc:
                error = f"loading {target / name} failed: {exc}"
        errors.append(error)
    _why_not.append(errors[0])
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
                         every: int, min_left: int) -> tuple[Tensor, ...]:
    """``native_kalman.c``'s covariance recursion for shared parameters ``A, Q, P0`` ``(n, n)``, ``C``
    ``(m, n)``, ``R`` ``(m, m)`` (symmetric). Returns P_{t|t-1} and P_{t|t} ``(steps, n, n)`` (symmetrised,
    extended past the stop), and for the k computed steps X_t = S_t^{-1} C P_{t|t-1} ``(k, m, n)``, S_t and
    its lower Cholesky factor L_t ``(k, m, m)`` and the info ``(k,)`` int32."""
    n, m = A.shape[-1], C.shape[-2]
    A, Q, C, R, P0 = (x.contiguous() for x in (A, Q, C, R, P0))
    Pp, Pf = _new_empty(A, (steps, n, n)), _new_empty(A, (steps, n, n))
    X, S, L = A.new_empty(steps, m, n), A.new_empty(steps, m, m), A.new_empty(steps, m, m)
    info = torch.zeros(steps, dtype=torch.int32)
    k = _call("wm_covariance_recursion", A.dtype, n, m, steps, A, Q, C, R, P0, Pp, Pf, X, S, L, info, ulps, every,
              min_left, torch.finfo(A.dtype).eps)
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
