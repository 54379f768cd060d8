"""Shared pieces of the Kalman benchmark: the test problem, thread pinning, timing, the child loop.

Every implementation runs in its own subprocess (``python bench/peers/<peer>.py SPEC OUT``). The parent
starts it pinned (CPU affinity and the thread-count variables of ``thread_env``), the child rebuilds each
problem from the seed (so all peers see bit-identical float64 data), times forward and
forward+backward (median of ``reps`` runs after ``warmup`` runs), and appends one JSON line per
measurement to OUT, so a child killed by the time limit still leaves what it measured.

Model (DESIGN.md section 1, the contract's conventions): h_0 ~ N(m0, P0), and for t = 1..T

    h_t = A h_{t-1} + w_t,  w_t ~ N(0, Q);   z_t = C h_t + v_t,  v_t ~ N(0, R)

log-likelihood = sum_t log N(z_t; C m_{t|t-1}, C P_{t|t-1} C^T + R). Peers whose first step is an
update (torch-kf, dynamax) get the prior of h_1, N(A m0, A P0 A^T + Q), which is the same model.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
import zlib
from typing import Callable

import numpy as np

from worldmodel.allocator import ENV_VARS, MMAP_THRESHOLD, TRIM_THRESHOLD


def thread_env(threads: int, tuned_malloc: bool = True) -> dict[str, str]:
    """Environment that fixes every math library (OpenMP, MKL, OpenBLAS, XLA) to ``threads`` threads and,
    with ``tuned_malloc``, gives every process the glibc malloc thresholds of
    ``worldmodel.allocator.tune_malloc`` (heap blocks up to 32 MiB, freed memory kept): the same allocator
    for every implementation, without which each call page-faults its fresh outputs back in."""
    xla = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" if threads == 1 else ""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), JAX_PLATFORMS="cpu", XLA_FLAGS=xla)
    for name in ENV_VARS:
        env.pop(name, None)
    if tuned_malloc:
        env.update(zip(ENV_VARS, (str(MMAP_THRESHOLD), str(TRIM_THRESHOLD))))
    return env


def config_seed(seed: int, *key) -> int:
    return zlib.crc32(repr((seed, *key)).encode()) & 0x7FFFFFFF


def make_system(d: int, m: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed random stable system (float64): spectral radius 0.95, well-conditioned Q and R."""
    rng = np.random.default_rng(config_seed(seed, "system", d, m))
    A = rng.standard_normal((d, d))
    A *= 0.95 / np.max(np.abs(np.linalg.eigvals(A)))
    W = rng.standard_normal((d, d)) / np.sqrt(d)
    Q = 0.1 * np.eye(d) + 0.05 * W @ W.T
    C = rng.standard_normal((m, d)) / np.sqrt(d)
    V = rng.standard_normal((m, m)) / np.sqrt(m)
    R = 0.5 * np.eye(m) + 0.1 * V @ V.T
    return dict(A=A, Q=Q, C=C, R=R, m0=np.zeros(d), P0=np.eye(d))


def make_problem(d: int, m: int, B: int, T: int, seed: int = 0) -> dict[str, np.ndarray]:
    """System plus observations z (B, T, m) sampled from it, all float64 and reproducible."""
    sysm = make_system(d, m, seed)
    rng = np.random.default_rng(config_seed(seed, "data", d, m, B, T))
    LQ, LR = np.linalg.cholesky(sysm["Q"]), np.linalg.cholesky(sysm["R"])
    h = sysm["m0"] + rng.standard_normal((B, d)) @ np.linalg.cholesky(sysm["P0"]).T
    z = np.empty((B, T, m))
    for t in range(T):
        h = h @ sysm["A"].T + rng.standard_normal((B, d)) @ LQ.T
        z[:, t] = h @ sysm["C"].T + rng.standard_normal((B, m)) @ LR.T
    return dict(sysm, z=z)


def first_prior(p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """N(A m0, A P0 A^T + Q): the prior of h_1, for peers that start with an update."""
    return p["A"] @ p["m0"], p["A"] @ p["P0"] @ p["A"].T + p["Q"]


def cov_flops(d: int, m: int) -> float:
    """Floating-point operations of one dense covariance-form step for one sequence.

    A P A^T (4 d^3), C P (2 m d^2), C P C^T (2 m^2 d), Cholesky of S (m^3 / 3), the gain by two
    triangular solves (2 m^2 d), P - K (C P) (2 m d^2), plus the O(d^2) mean work.
    """
    return 4 * d**3 + 4 * m * d**2 + 4 * m**2 * d + m**3 / 3 + 4 * d**2 + 4 * m * d


def mean_flops(d: int, m: int) -> float:
    """The per-sequence part of a step once the covariances are known: A m, C m, K e, L^-1 e."""
    return 4 * d**2 + 4 * m * d + m**2


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def median_times(fn: Callable[[], object], reps: int, warmup: int) -> dict[str, float | list[float]]:
    """Median wall and CPU time of ``reps`` calls after ``warmup`` calls.

    The CPU time of the process excludes the time it waits for a core, so it is the robust figure on a
    shared machine (all peers run single-threaded, where CPU time = wall time when nothing else runs).
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        w, c, _ = timed(fn)
        wall.append(w)
        cpu.append(c)
    return {"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "wall_all_s": wall, "cpu_all_s": cpu}


def child_main(impl_versions: Callable[[], dict], build: Callable) -> None:
    """Entry of a peer subprocess. ``build(problem, variant, grad)`` returns ``(run, summarise)`` or None.

    ``run()`` does one full forward (and backward when ``grad``); ``summarise(out)`` turns one output
    into ``{"loglik": list[float] (B,), "nonfinite": int}`` (NaN/inf in log-likelihoods, beliefs, grads).
    """
    spec = json.load(open(sys.argv[1]))
    out_path = sys.argv[2]
    versions = impl_versions()
    # seconds per unit of work (B*T*flops) at the largest point of the same (d, m, grad) measured so
    # far (configs come sorted by work), used to skip points that would blow the per-point budget
    rate: dict[tuple, float] = {}
    with open(out_path, "a") as out:
        out.write(json.dumps({"impl": spec["impl"], "versions": versions}) + "\n")
        out.flush()
        for cfg in spec["configs"]:
            d, m, B, T = cfg["d"], cfg["m"], cfg["B"], cfg["T"]
            problem = None
            for grad in spec["modes"]:
                rec = dict(impl=spec["impl"], d=d, m=m, B=B, T=T, grad=grad)
                work = B * T * cov_flops(d, m)
                key = (d, m, grad)
                est = rate.get(key, 0.0) * work
                if est * (spec["reps"] + spec["warmup"] + 1) > 3 * spec["budget_s"]:  # 3x slack: most scale sublinearly in B
                    rec["skipped"] = f"too slow: estimated {est:.2f} s per call (budget {spec['budget_s']} s per point)"
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    continue
                if problem is None:
                    problem = make_problem(d, m, B, T, spec["seed"])
                try:
                    built = build(problem, spec["variant"], grad)
                    if built is None:
                        continue  # this implementation has no backward pass
                    run, summarise = built
                    first_s, _, first = timed(run)  # includes compilation / tracing
                    rec.update(summarise(first))
                    rec["first_call_s"] = first_s
                    if spec.get("reference"):  # accuracy reference: one call, no timing
                        out.write(json.dumps(rec) + "\n")
                        out.flush()
                        continue
                    # one more call decides whether reps fit the budget
                    one, _, _ = timed(run)
                    rate[key] = one / work
                    if one * spec["reps"] > spec["budget_s"]:
                        rec["skipped"] = f"too slow: {one:.2f} s per call (budget {spec['budget_s']} s per point)"
                    else:
                        rec.update(median_times(run, spec["reps"], max(spec["warmup"] - 2, 0)))
                        rate[key] = rec["wall_s"] / work
                except Exception as exc:  # noqa: BLE001 - a failing peer is reported, never fatal
                    rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                out.write(json.dumps(rec) + "\n")
                out.flush()
