"""The native (C) loops of the fused Kalman filter against the Python loops and a float64 reference."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from worldmodel.kalman import native, recursions
from worldmodel.kalman import kalman_filter

from test_kalman import make_system
from test_kalman_speed_options import _assert_close, _assert_close_with_grads, _run

F32, F64 = torch.float32, torch.float64
needs_native = pytest.mark.skipif(shutil.which(os.environ.get("CC") or "cc") is None and shutil.which("gcc") is None,
                                  reason="no C compiler: the native loops cannot be built here")


@needs_native
def test_native_loops_are_built_where_a_compiler_and_torchs_blas_exist():
    assert native.status() == "native"


def _both_paths(monkeypatch, fn):
    """``fn()`` with the native loops, then with the Python loops."""
    got = fn()
    monkeypatch.setattr(native, "usable", lambda *xs: False)
    return got, fn()


@needs_native
@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("n, m, k", [(5, 3, 0), (5, 3, 2), (3, 6, 1), (40, 10, 0)])
def test_native_filter_matches_python_loops_and_float64_reference(monkeypatch, dtype, n, m, k):
    """Beliefs, likelihoods and gradients agree with the Python loops (and, in float64, with the step-wise
    filter), with and without controls, for n < m and n > m."""
    z, sys_ = make_system(batch=3, steps=50, n=n, m=m, k=k, seed=31)
    z, sys_ = z.to(dtype), {key: v.to(dtype) for key, v in sys_.items()}

    def run():
        leaves = {key: v.clone().requires_grad_() for key, v in sys_.items()}
        res = kalman_filter(z, **leaves)
        loss = res.log_likelihood.sum() + res.filtered.mean.square().sum() + res.predicted.cov.sum()
        return res, torch.autograd.grad(loss, list(leaves.values()))

    (res, grads), (ref, ref_grads) = _both_paths(monkeypatch, run)
    _assert_close_with_grads(res, grads, ref, ref_grads, 1e-11 if dtype == F64 else 2e-5)
    if dtype == F64:
        _assert_close(res, _run("sequential", z, sys_), 1e-10)


@needs_native
def test_native_recursion_stops_where_the_python_joint_form_does():
    """The steady-state stop checks the same joint factor as the Python joint form: the same step count, up to
    one check (round-off differs between the two forms)."""
    _, sys_ = make_system(batch=1, steps=200, n=6, m=2, k=0, seed=32)
    args = [sys_[key].float() for key in ("A", "Q", "C", "R", "P0")]
    args[1], args[3], args[4] = (0.5 * (x + x.mT) for x in (args[1], args[3], args[4]))
    stop = (recursions._STEADY_ULPS, recursions._STEADY_EVERY, recursions._STEADY_MIN_LEFT)
    k_native = native.covariance_recursion(*args, 200, *stop)[2].shape[0]
    k_python = recursions._joint_recursion(*args, 200)[2].shape[0]
    assert abs(k_native - k_python) <= recursions._STEADY_EVERY and max(k_native, k_python) < 200


@needs_native
def test_native_recursion_flags_a_singular_filtered_covariance():
    """A state with zero variance makes P_{t|t} singular: the info is m + the failed order (the caller then
    switches to the Joseph form); an indefinite R gives the failed order of S."""
    _, sys_ = make_system(batch=1, steps=5, n=3, m=2, k=0, seed=33)
    keep = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=F64))
    A, Q, C, R, P0 = (sys_[key] for key in ("A", "Q", "C", "R", "P0"))
    Q, R, P0 = (0.5 * (x + x.mT) for x in (Q, R, P0))
    info = native.covariance_recursion(keep @ A @ keep, keep @ Q @ keep, C, R, keep @ P0 @ keep, 5, 4.0, 4, 16)[-1]
    assert info[-1] == 2 + 3 and (info[:-1] == 0).all()
    info = native.covariance_recursion(A, Q, C, -torch.eye(2, dtype=F64) * 1e3, P0, 5, 4.0, 4, 16)[-1]
    assert info.tolist() == [1]


def test_switched_off_native_loops_fall_back_to_python():
    """WORLDMODEL_NATIVE=0 runs the Python loops and says so."""
    code = ("import torch; from worldmodel.kalman import kalman_filter, native;"
            "print(native.status()); z = torch.randn(2, 8, 2); I = torch.eye(3);"
            "res = kalman_filter(z, 0.9 * I, I, torch.ones(2, 3), torch.eye(2), torch.zeros(3), I);"
            "print(res.log_likelihood.shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, WORLDMODEL_NATIVE="0")).stdout
    assert out.splitlines() == ["python (switched off by WORLDMODEL_NATIVE=0)", "torch.Size([2])"]


def test_a_failed_build_falls_back_with_the_compiler_error(tmp_path):
    """A compiler that fails leaves the Python loops, and status() quotes the error."""
    code = "from worldmodel.kalman import native; print(native.status())"
    env = dict(os.environ, CC="false", XDG_CACHE_HOME=str(tmp_path), WORLDMODEL_NATIVE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.startswith("python (false -O2") and "failed" in out


@needs_native
def test_an_unwritable_cache_builds_in_the_temporary_directory(tmp_path):
    """Where the user cache cannot be written, the library is built under the temporary directory."""
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache directory should be")
    code = "from worldmodel.kalman import native; print(native.status())"
    env = dict(os.environ, XDG_CACHE_HOME=str(blocked), TMPDIR=str(tmp_path), WORLDMODEL_NATIVE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "native"
    assert len(list(tmp_path.glob("ldm-worldmodel-*/native_kalman-*.so"))) == 1


@needs_native
def test_a_build_that_fails_its_self_test_is_never_used_and_remembered(tmp_path):
    """A library whose results differ from the Python loops (here: a log-likelihood off by 5e-7) is
    rejected by the self-test in its own process; the next process reads the verdict instead of rebuilding."""
    bad = tmp_path / "native_kalman.c"
    source = native.SOURCE.read_text()
    assert "m * log_2pi));" in source
    bad.write_text(source.replace("m * log_2pi));", "m * log_2pi + 1e-6));"))
    code = ("from pathlib import Path; from worldmodel.kalman import native; "
            f"native.SOURCE = Path({str(bad)!r}); print(native.status())")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), WORLDMODEL_NATIVE="1")
    first, second = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    env=env).stdout for _ in range(2))
    assert first.startswith("python (the freshly built native_kalman-") and "failed its self-test" in first
    assert "to try again" in second
    assert not list((tmp_path / "cache").glob("*/*.so")) and len(list((tmp_path / "cache").glob("*/*.failed"))) == 1
