"""The native (C) loops of the fused Kalman filter against the Python loops and a float64 reference."""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
def test_native_loops_are_built_where_a_compiler_and_torchs_blas_exist(native_build_dir):
    assert native.status() == "native"
    assert Path(native.library()._name).parent == native_build_dir  # the tests' own directory (conftest)


def _env(tmp_path: Path, **extra) -> dict:
    """The environment of a subprocess that builds in the usual places, here under ``tmp_path``: the user
    cache in tmp_path/cache, the temporary directory tmp_path/tmp."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "WORLDMODEL_NATIVE_DIR"}
    return {**env, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TMPDIR": str(tmp_path / "tmp"),
            "WORLDMODEL_NATIVE": "1", **extra}


def _status(env: dict, setup: str = "") -> str:
    """native.status() in a new process with ``env``, after ``setup`` (Python, with ``native`` and ``Path``)."""
    code = f"from pathlib import Path\nfrom worldmodel.kalman import native\n{setup}\nprint(native.status())"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


@pytest.fixture
def fresh_library(monkeypatch):
    """native.library() looked up anew in this test, in the places the test sets (not those of the session)."""
    monkeypatch.delenv("WORLDMODEL_NATIVE_DIR")
    native.library.cache_clear()
    yield
    native.library.cache_clear()


def _filter_runs():
    z, I = torch.randn(2, 8, 2, dtype=F64), torch.eye(3, dtype=F64)
    res = kalman_filter(z, 0.9 * I, I, torch.ones(2, 3, dtype=F64), torch.eye(2, dtype=F64), torch.zeros(3, dtype=F64),
                        I)
    assert res.log_likelihood.shape == (2,) and torch.isfinite(res.log_likelihood).all()


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
    out = _status(_env(tmp_path, CC="false"))
    assert out.startswith("python (false -O2") and "failed" in out


@needs_native
def test_an_unwritable_cache_builds_in_the_temporary_directory(tmp_path):
    """Where the user cache cannot be written, the library is built under the temporary directory."""
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache directory should be")
    assert _status(_env(tmp_path)) == "native"
    assert len(list(tmp_path.glob("tmp/ldm-worldmodel-*/native_kalman-*.so"))) == 1


@needs_native
def test_a_build_that_fails_its_self_test_is_never_used_and_remembered(tmp_path):
    """A library whose results differ from the Python loops (here: a log-likelihood off by 5e-7) is
    rejected by the self-test in its own process; the next process reads the verdict instead of rebuilding,
    and neither tries the temporary directory (the verdict holds there too)."""
    bad = tmp_path / "native_kalman.c"
    source = native.SOURCE.read_text()
    assert "m * log_2pi));" in source
    bad.write_text(source.replace("m * log_2pi));", "m * log_2pi + 1e-6));"))
    first, second = (_status(_env(tmp_path), f"native.SOURCE = Path({str(bad)!r})") for _ in range(2))
    assert first.startswith("python (the freshly built native_kalman-") and "failed its self-test" in first
    assert "to try again" in second
    assert not list((tmp_path / "cache").glob("*/*.so")) and len(list((tmp_path / "cache").glob("*/*.failed"))) == 1
    assert not list((tmp_path / "tmp").iterdir())


@needs_native
def test_a_build_wrong_only_in_float32_fails_its_self_test(tmp_path):
    """The self-test checks float32 as well as float64: a library whose float32 log-likelihood is off (by 0.05
    a step) is rejected."""
    bad = tmp_path / "native_kalman.c"
    bad.write_text(native.SOURCE.read_text().replace("m * log_2pi));",
                                                     "m * log_2pi + (sizeof(REAL) == 4 ? 0.1 : 0.0)));"))
    out = _status(_env(tmp_path), f"native.SOURCE = Path({str(bad)!r})")
    assert out.startswith("python (the freshly built native_kalman-") and "failed its self-test" in out
    assert "torch.float32, log-likelihood" in out


@needs_native
def test_a_self_test_that_times_out_is_remembered(tmp_path):
    """A self-test that does not finish in time is remembered like a failed one: the next process (whose
    compiler would fail) neither builds nor tests again, and says how to try again."""
    first = _status(_env(tmp_path), "native.SELF_TEST_TIMEOUT = 0.01")
    second = _status(_env(tmp_path, CC="false"))
    assert first.startswith("python (the self-test of the freshly built native_kalman-")
    assert "did not finish within 0.01 s" in first and "to try again" in first
    assert second == first


@needs_native
def test_a_self_test_that_cannot_run_is_tried_again(tmp_path):
    """A self-test that cannot run (here: an import error) says nothing about the library: not remembered."""
    first = _status(_env(tmp_path), "native._SELF_TEST = 'import no_such_module'")
    assert "could not run" in first and "No module named 'no_such_module'" in first
    assert not list(tmp_path.glob("*/*/*.failed"))
    assert _status(_env(tmp_path, CC="false")).startswith("python (false -O2")  # it builds again


_PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen("%s", "w");
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
"""


def _plant(tmp_path: Path, dirs: list[Path], mode: int) -> Path:
    """Compile a library whose constructor writes a marker file, and place it in each of ``dirs`` (with
    ``mode``) under every name the loader looks for: ``native_kalman-<key>.so``, and
    ``native_kalman-<key>-<sha256[:16]>.so`` next to the record ``native_kalman-<key>.ok`` of that sha256
    (another library's). Returns the marker's path."""
    marker, source, planted = tmp_path / "planted-library-ran", tmp_path / "planted.c", tmp_path / "planted.so"
    source.write_text(_PLANTED % marker)
    subprocess.run([os.environ.get("CC") or "cc", "-shared", "-fPIC", "-o", str(planted), str(source)], check=True)
    key = hashlib.sha256(native.SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:16]
    digest = hashlib.sha256(b"another library").hexdigest()
    for directory in dirs:
        directory.mkdir(parents=True)
        os.chmod(directory, mode)
        for name in (f"native_kalman-{key}.so", f"native_kalman-{key}-{digest[:16]}.so"):
            shutil.copy(planted, directory / name)
        (directory / f"native_kalman-{key}.ok").write_text(digest + "\n")
    return marker


@needs_native
@pytest.mark.parametrize("case", ["wrong sha256", "writable by others", "another user's"])
def test_a_planted_library_is_never_loaded(monkeypatch, fresh_library, tmp_path, case):
    """A library planted where the loader looks, with the expected name, is not loaded (its constructor
    never runs) whether its sha256 is not the recorded one (the compiler fails, so nothing is rebuilt), its
    directory is writable by others, or the directory is another user's; the Python loops run."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    dirs = [tmp_path / "cache" / "ldm-worldmodel", tmp_path / "tmp" / f"ldm-worldmodel-{os.getuid()}"]
    marker = _plant(tmp_path, dirs, 0o777 if case == "writable by others" else 0o700)
    monkeypatch.setenv("CC", "false")
    uid = os.geteuid()
    if case == "another user's":
        monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    _filter_runs()
    status = native.status()
    assert not marker.exists()
    assert status.startswith("python (") and all(str(directory) in status for directory in dirs)
    assert {"wrong sha256": "is not the library whose sha256", "writable by others": "writable by others",
            "another user's": f"uid {uid}"}[case] in status


@pytest.mark.parametrize("temp", ["private", "unusable"])
def test_no_home_directory_uses_the_temporary_directory_or_the_python_loops(monkeypatch, tmp_path, temp):
    """With HOME unset, no passwd entry and no XDG_CACHE_HOME (a container run with --user), the library
    is loaded from the private temporary directory, or where that cannot be used, the Python loops run
    and status() says why; kalman_filter never fails because of it."""
    if temp == "private":
        if native.status() != "native":
            pytest.skip("no native build")
        shutil.copytree(Path(native.library()._name).parent, tmp_path / f"ldm-worldmodel-{os.getuid()}")  # as built
    else:
        (tmp_path / f"ldm-worldmodel-{os.getuid()}").write_text("a file where the directory should be")
    monkeypatch.delenv("WORLDMODEL_NATIVE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("HOME", raising=False)

    def no_home(cls):
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", classmethod(no_home))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    native.library.cache_clear()
    try:
        _filter_runs()
        status, lib = native.status(), native.library()
    finally:
        native.library.cache_clear()
    if temp == "private":
        assert status == "native" and Path(lib._name).parent == tmp_path / f"ldm-worldmodel-{os.getuid()}"
    else:
        assert status.startswith("python (no user cache (no XDG_CACHE_HOME, no home directory: Could not determine")
        assert f"ldm-worldmodel-{os.getuid()} is not a directory" in status


_HOLD = """
import sys, torch
from worldmodel.kalman import kalman_filter, native
print(native.library()._name, flush=True)
sys.stdin.readline()  # meanwhile another process builds in the same directory
z, I = torch.randn(2, 30, 2, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
res = kalman_filter(z, 0.9 * I, I, torch.ones(2, 3).double(), torch.eye(2).double(), torch.zeros(3).double(), I)
print(native.status(), bool(torch.isfinite(res.log_likelihood).all()))
"""


@needs_native
def test_a_build_keeps_the_files_other_processes_have_loaded(tmp_path, native_build_dir):
    """A build of another source (or torch version) in the same directory neither deletes nor rewrites
    the library another process has loaded (which would be a SIGBUS there, e.g. over NFS); it deletes only
    other builds' files unused for a week."""
    env = _env(tmp_path)
    cache = tmp_path / "cache" / "ldm-worldmodel"
    if native_build_dir.is_dir():
        shutil.copytree(native_build_dir, cache)  # as built here before
    else:
        cache.mkdir(parents=True)
    stale = cache / "native_kalman-0123456789abcdef-0123456789abcdef.so"
    stale.write_bytes(b"a build of a month ago")
    os.utime(stale, (time.time() - 30 * 86400,) * 2)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        loaded = Path(holder.stdout.readline().strip())
        inode, digest = loaded.stat().st_ino, hashlib.sha256(loaded.read_bytes()).hexdigest()
        other = tmp_path / "native_kalman.c"
        other.write_text(native.SOURCE.read_text() + "\n/* another source */\n")
        assert _status(env, f"native.SOURCE = Path({str(other)!r})") == "native"
        assert loaded.stat().st_ino == inode and hashlib.sha256(loaded.read_bytes()).hexdigest() == digest
        assert not stale.exists()
        out, _ = holder.communicate("\n", timeout=120)
    finally:
        holder.kill()
    assert holder.returncode == 0 and out.split() == ["native", "True"]


@needs_native
def test_a_rebuild_keeps_an_identical_library_file(tmp_path, native_build_dir):
    """A rebuild (here: its record deleted) that compiles to the same bytes keeps the file that is there (the
    same inode, which processes may have mapped) instead of renaming over it."""
    from worldmodel.kalman import native_build

    assert native.status() == "native"
    directory = tmp_path / "build"
    shutil.copytree(native_build_dir, directory)
    (library,), (record,) = directory.glob("*.so"), directory.glob("*.ok")
    inode = library.stat().st_ino
    record.unlink()
    path = native_build.find_or_build(directory, record.stem, native.SOURCE, ["true"], dict(os.environ), 60)
    assert path == library and library.stat().st_ino == inode and record.exists()
