"""Kalman filter benchmark: our filter against its peers, on this machine, in one run.

    python bench/kalman.py --quick        # the world-model point (B=16, T=64, d=32), d=4, train.py's model; < 60 s
    python bench/kalman.py                # the full grid (d, B, T, m); skips what would take too long
    python bench/kalman.py --point 16 8 16 32 --impls ours_seq dynamax_seq   # chosen points and peers

Every implementation runs in its own subprocess, pinned to the same CPUs and thread count
(``--threads``, default 1: OMP/MKL/OpenBLAS/XLA variables plus CPU affinity), with the same glibc malloc
thresholds (those of ``worldmodel.allocator.tune_malloc``; ``--default-malloc``: glibc's), on bit-identical data
(a fixed random stable system, fixed seed; see ``bench/peers/common.py``). For each point it times the
forward pass and forward+backward (gradient of the summed log-likelihood w.r.t. z, A, Q, C, R): the
median of ``--reps`` (>= 5) calls after warm-up (compilation is excluded and reported separately).
Accuracy: each float32 log-likelihood against a float64 reference (numpy, batched), with NaN/inf counts.
The same run measures this machine's ceilings (sgemm peak, batched small-matmul rate at each (B, d),
the dispatch time of a trivial op) and our efficiency against them.

Outputs, under ``--out`` (default ``bench/results/``, git-ignored): ``kalman.json`` (every record),
``kalman.md`` (tables of ratios peer time / our time: > 1 means we are faster) and ``kalman.png``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
from common import cov_flops, mean_flops, thread_env  # noqa: E402

# name -> (runner module, variant, has backward, which points: grid | scan | point, dense outputs, note)
IMPLS = {
    "ours_seq": ("ours", "seq", True, "grid", False, "ours, sequential (eager)"),
    "ours_seq_full": ("ours", "seq_full", True, "grid", False,
                      "ours, sequential, no steady-state stop (every covariance step)"),
    "ours_par": ("ours", "par", True, "scan", False, "ours, parallel scan (eager)"),
    "ours_seq_compiled": ("ours", "seq_compiled", True, "point", False, "ours, sequential, torch.compile(step)"),
    "ours_par_compiled": ("ours", "par_compiled", True, "point", False, "ours, parallel scan, torch.compile(combine)"),
    "ours_seq_batched": ("ours", "seq_batched", True, "grid", True, "ours, parameters given per sequence (B, n, n)"),
    "ours_seq_masked": ("ours", "seq_masked", True, "masked", False,
                        "ours, 10% of frames dropped at random per sequence (mask)"),
    "ours_seq_masked_stepwise": ("ours", "seq_masked_stepwise", True, "masked", False,
                                 "ours, the same mask on the step-wise filter (the path before)"),
    "naive_loop": ("naive_loop", "float32", True, "grid", False, "naive per-sample Python loop (torch eager)"),
    "numpy_batched": ("numpy_batched", "float32", False, "grid", True, "numpy, vectorised over B (forward only)"),
    "filterpy": ("filterpy_peer", "float64", False, "grid", True, "filterpy, per sample (float64, forward only)"),
    "torch_kf": ("torchkf_peer", "float32", True, "grid", True, "torch-kf, batched"),
    "dynamax_seq": ("dynamax_peer", "seq", True, "grid", True, "dynamax lgssm_filter, jit + vmap (JAX CPU)"),
    "dynamax_par": ("dynamax_peer", "par", True, "scan", True, "dynamax parallel_lgssm_filter, jit + vmap (JAX CPU)"),
}
WORLD_POINT = dict(d=32, m=32, B=16, T=64)
DEFAULT_MODEL = (16, 8, 16, 32)  # train.py's defaults: state 16, latent 8, batch 16, window 32
OURS = "ours_seq"  # the denominator of every ratio
QUICK_SKIP = {
    "ours_seq_compiled": "torch.compile takes ~1 min to compile on this CPU",
    "ours_par_compiled": "torch.compile takes minutes to compile on this CPU",
    "dynamax_par": "XLA compiles the associative scan (and its gradient) for minutes on this CPU",
    "ours_par": "the parallel scan is ~30x slower than sequential on CPU (see the full grid)",
}


def grid(name: str) -> list[dict]:
    """quick: the world-model point, d=4 and the default model of train.py (state 16, latent 8, window 32);
    medium: d x T at B=16 plus B and m sweeps and the default model (31 points); full: every combination of
    d, m, B, T in the issue (120 points)."""
    if name == "quick":
        points = [(32, 32, 16, 64), (4, 4, 16, 64), DEFAULT_MODEL]
    elif name == "medium":
        points = [DEFAULT_MODEL] + [(d, d, 16, T) for d in (4, 16, 32, 64, 128) for T in (64, 256, 1024)]
        points += [(d, d, B, 64) for d in (4, 16, 32, 64, 128) for B in (1, 256)]
        points += [(d, d // 4, 16, 64) for d in (16, 32, 64, 128)] + [(32, 8, 256, 256)]
    else:
        points = [(d, m, B, T) for d in (4, 16, 32, 64, 128) for m in sorted({d, max(d // 4, 1)})
                  for B in (1, 16, 64, 256) for T in (64, 256, 1024)]
    return [dict(d=d, m=m, B=B, T=T) for d, m, B, T in points]


def subset(configs: list[dict], which: str) -> list[dict]:
    """The points an implementation runs: all, the long-T scan at B=16 (parallel scans), two points, or the
    world-model point and the default model (masked)."""
    if which == "masked":
        return [c for c in configs if c in (WORLD_POINT, dict(zip("dmBT", DEFAULT_MODEL)))]
    if which == "scan":
        return [c for c in configs if c["B"] == 16 and c["m"] == c["d"] and c["d"] in (4, 32)]
    if which == "point":
        return [c for c in configs if c["B"] == 16 and c["T"] == 64 and c["m"] == c["d"] and c["d"] in (4, 32)]
    return configs


def too_big(cfg: dict, mem_gb: float) -> bool:
    """Dense per-sequence outputs (filtered + predicted covariances, ~6 copies with autograd) exceed memory."""
    return 6 * cfg["B"] * cfg["T"] * cfg["d"] ** 2 * 4 / 1e9 > mem_gb


def run_child(module: str, spec: dict, args, log) -> list[dict]:
    """Run one implementation in its own pinned subprocess; return its JSON records."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.jsonl")
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(HERE / "peers" / f"{module}.py"), str(spec_path), str(out_path)]
        env = thread_env(args.threads, not args.default_malloc)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE / "peers"), str(HERE.parent), env.get("PYTHONPATH", "")])
        cpus = args.cpus
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=spec["limit_s"],
                                  preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
            status = f"exit {proc.returncode}"
            err = proc.stderr.strip().splitlines()[-3:] if proc.returncode else []
        except subprocess.TimeoutExpired:
            status, err = f"killed after the {spec['limit_s']} s limit", []
        recs = [json.loads(line) for line in out_path.read_text().splitlines()] if out_path.exists() else []
        log(f"  {spec['impl']:<18} {status:<12} {time.time() - t0:6.1f} s" + (f"  {' | '.join(err)}" if err else ""))
        if "killed" in status or err:
            done = {(r["d"], r["m"], r["B"], r["T"], r["grad"]) for r in recs if "d" in r}
            for cfg in spec["configs"]:
                for grad in spec["modes"]:
                    if (cfg["d"], cfg["m"], cfg["B"], cfg["T"], grad) not in done:
                        recs.append(dict(impl=spec["impl"], **cfg, grad=grad,
                                         skipped=f"not reached: {status}" + (f" ({err[-1]})" if err else "")))
        return recs


def available(name: str) -> str | None:
    """None if the peer's packages import, else the reason it is skipped."""
    pkgs = {"filterpy": ["filterpy"], "torch_kf": ["torch_kf"], "dynamax_seq": ["jax", "dynamax"],
            "dynamax_par": ["jax", "dynamax"]}.get(name, [])
    import importlib.util
    missing = [p for p in pkgs if importlib.util.find_spec(p) is None]
    return f"not installed ({', '.join(missing)}; pip install -e '.[bench]')" if missing else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="three points, the fast implementations (< 60 s)")
    ap.add_argument("--grid", choices=("quick", "medium", "full"), default="full",
                    help="points to run (--quick implies quick; default full: 120 points)")
    ap.add_argument("--point", type=int, nargs=4, action="append", metavar=("D", "M", "B", "T"),
                    help="run these points (repeatable) instead of a grid, e.g. your model's size; every "
                         "implementation named in --impls runs at each of them")
    ap.add_argument("--impls", nargs="*", default=None, help=f"subset of {list(IMPLS)}")
    ap.add_argument("--threads", type=int, default=1, help="threads for every library (default 1)")
    ap.add_argument("--cpus", type=int, nargs="*", default=None,
                    help="CPU ids to pin to (default: the last --threads CPUs this process may use)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per point (>= 5; default 7, quick 5)")
    ap.add_argument("--budget", type=float, default=None, help="seconds one point may take per implementation")
    ap.add_argument("--limit", type=float, default=None, help="seconds one implementation's subprocess may take")
    ap.add_argument("--mem-gb", type=float, default=4.0, help="skip points whose dense outputs exceed this")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="time used for the ratios: process CPU time (robust on a shared machine) or wall")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc defaults (else every implementation's process gets the thresholds "
                         "of worldmodel.allocator.tune_malloc)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="no run: combine the records of earlier kalman.json files (later files win) into one report")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.quick:
        args.grid = "quick"
    args.reps = max(5, args.reps or (5 if args.quick else 7))
    args.budget = args.budget or (8.0 if args.quick else 20.0)
    args.limit = args.limit or (25.0 if args.quick else 300.0)
    if args.cpus is None:
        allowed = sorted(os.sched_getaffinity(0))
        args.cpus = allowed[-args.threads:]
    args.out.mkdir(parents=True, exist_ok=True)
    t_start, load_start = time.time(), os.getloadavg()
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    configs = [dict(d=d, m=m, B=B, T=T) for d, m, B, T in args.point] if args.point else grid(args.grid)
    big = [c for c in configs if too_big(c, args.mem_gb)]
    # the world-model point first (its figures must exist even if a time limit cuts a peer short), then
    # by work, so that each peer's time per unit of work at a smaller point predicts the next one
    configs.sort(key=lambda c: (c != WORLD_POINT, c["B"] * c["T"] * cov_flops(c["d"], c["m"])))
    names = args.impls or list(IMPLS)
    log(f"Kalman benchmark: {len(configs)} points, threads={args.threads}, cpus={args.cpus}, "
        f"reps={args.reps}, clock={args.clock}, budget {args.budget:g} s per point")
    if big:
        log(f"  {len(big)} points whose dense (B, T, n, n) outputs exceed --mem-gb {args.mem_gb:g} are skipped for "
            "the implementations that materialise them: "
            + ", ".join(f"d={c['d']},m={c['m']},B={c['B']},T={c['T']}" for c in big[:6]) + (" ..." if len(big) > 6 else ""))

    records: list[dict] = []
    skipped: dict[str, str] = {}
    # ceilings first (same pinning)
    Bs, ds = sorted({1} | {c["B"] for c in configs}), sorted({c["d"] for c in configs})
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp, "c.json"), Path(tmp, "c.out")
        spec.write_text(json.dumps({"B": Bs, "d": ds, "min_time": 0.02 if args.quick else 0.05}))
        env = thread_env(args.threads, not args.default_malloc)
        subprocess.run([sys.executable, str(HERE / "peers" / "ceilings.py"), str(spec), str(out)], env=env, check=True,
                       preexec_fn=lambda: os.sched_setaffinity(0, args.cpus))
        ceilings = json.loads(out.read_text())
    log(f"  ceilings: sgemm {ceilings['sgemm_gflops']:.1f} GFLOP/s, trivial op {ceilings['dispatch_us']:.1f} us "
        f"({ceilings['dispatch_autograd_us']:.1f} us recorded by autograd)")

    # float64 reference
    ref_spec = dict(impl="reference_f64", variant="reference", seed=args.seed, reps=5, warmup=0, budget_s=1e9,
                    modes=[False], configs=configs, limit_s=args.limit * 4, reference=True)
    ref_recs = run_child("numpy_batched", ref_spec, args, log)
    reference = {(r["d"], r["m"], r["B"], r["T"]): np.array(r["loglik"]) for r in ref_recs if "loglik" in r}

    # implementations named in --impls run at every --point; otherwise the slow ones run at a few points
    everywhere = bool(args.point and args.impls)
    for name in names:
        module, variant, has_grad, which, dense, _ = IMPLS[name]
        why = available(name) or (QUICK_SKIP.get(name) if args.quick else None)
        if why:
            skipped[name] = why
            log(f"  {name:<18} skipped: {why}")
            continue
        mine = [c for c in (configs if everywhere else subset(configs, which)) if not (dense and c in big)]
        spec = dict(impl=name, variant=variant, seed=args.seed, reps=args.reps, warmup=2 if args.quick else 3,
                    budget_s=args.budget,
                    modes=[False, True] if has_grad else [False], configs=mine, limit_s=args.limit)
        records += run_child(module, spec, args, log)

    versions = {}
    for r in records:
        if "versions" in r:
            versions[r["impl"]] = r["versions"]
    records = [r for r in records if "versions" not in r]
    for r in records:
        ref = reference.get((r["d"], r["m"], r["B"], r["T"]))
        if "loglik" in r and ref is not None:
            ll = np.array(r.pop("loglik"), dtype=float)
            with np.errstate(invalid="ignore"):
                rel = np.abs(ll - ref) / np.abs(ref)
            r["loglik_rel_err"] = float(np.nanmax(rel)) if np.isfinite(rel).any() else float("nan")
            r["loglik_nan"] = int((~np.isfinite(ll)).sum())
        if "wall_s" in r:
            r["time_s"] = r["cpu_s" if args.clock == "cpu" else "wall_s"]
            r["gflops"] = r["B"] * r["T"] * cov_flops(r["d"], r["m"]) / r["time_s"] / 1e9
    result = dict(args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  machine=dict(cpu_count=os.cpu_count(), load_avg_start=load_start, load_avg_end=os.getloadavg()),
                  ceilings=ceilings, versions=versions, skipped_impls=skipped, records=records,
                  skipped_points=big, elapsed_s=time.time() - t_start)
    (args.out / "kalman.json").write_text(json.dumps(result, indent=1))
    md = report(result)
    (args.out / "kalman.md").write_text(md)
    print(md)
    try:
        plot(result, args.out / "kalman.png")
    except Exception as exc:  # noqa: BLE001 - a plot failure must not lose the numbers
        print(f"plot failed: {exc}")
    print(f"wrote {args.out}/kalman.json, kalman.md, kalman.png in {time.time() - t_start:.0f} s")
    return 0


def merge(paths: list[Path], out: Path) -> int:
    """One report from several runs (e.g. the compile-heavy variants run at another time than the rest)."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    merged = dict(results[-1])
    recs = {}
    for res in results:
        for r in res["records"]:
            recs[(r["impl"], r["d"], r["m"], r["B"], r["T"], r["grad"])] = r
    merged["records"] = list(recs.values())
    merged["versions"] = {k: v for res in results for k, v in res["versions"].items()}
    merged["ceilings"] = dict(merged["ceilings"], bmm_gflops={
        k: v for res in results for k, v in res["ceilings"]["bmm_gflops"].items()})
    ran = {r["impl"] for r in merged["records"]}
    merged["skipped_impls"] = {k: v for res in results for k, v in res["skipped_impls"].items() if k not in ran}
    merged["merged_from"] = [str(p) for p in paths]
    out.mkdir(parents=True, exist_ok=True)
    (out / "kalman.json").write_text(json.dumps(merged, indent=1))
    md = report(merged) + "\nMerged from " + ", ".join(f"`{p}`" for p in paths) + \
        " (runs at different times: ratios across them carry the machine's load difference).\n"
    (out / "kalman.md").write_text(md)
    print(md)
    plot(merged, out / "kalman.png")
    return 0


def _index(records):
    return {(r["impl"], r["d"], r["m"], r["B"], r["T"], r["grad"]): r for r in records}


def _fmt_ratio(peer, ours):
    if peer is None or "time_s" not in peer:
        return "skip" if peer is None or "skipped" in peer or "error" in peer else "-"
    if ours is None or "time_s" not in ours:
        return f"({peer['time_s'] * 1e3:.3g} ms)"
    return f"{peer['time_s'] / ours['time_s']:.2f}"


def report(result: dict) -> str:
    recs = result["records"]
    idx = _index(recs)
    impls = [n for n in IMPLS if any(r["impl"] == n for r in recs)]
    peers = [n for n in impls if n != OURS]
    points = sorted({(r["d"], r["m"], r["B"], r["T"]) for r in recs})
    clock = result["args"]["clock"]
    out = ["# Kalman filter benchmark\n",
           f"`python bench/kalman.py{' --quick' if result['args']['quick'] else ''}` — threads={result['args']['threads']}, "
           f"cpus={result['args']['cpus']}, malloc={'glibc defaults' if result['args'].get('default_malloc') else 'tuned'}, "
           f"median of {result['args']['reps']} calls, {clock} time. "
           f"Ratios are peer time / `{OURS}` time: > 1 means ours is faster. "
           "Forward-only peers (numpy, filterpy) are compared on their forward time in the fwd+bwd table too "
           "(they cannot give gradients), which favours them.\n"]
    out += summary(result)
    out += masked_ratios(result)
    for grad in (False, True):
        title = "forward + backward" if grad else "forward"
        out.append(f"\n## {title}: ratio peer / ours (ours in ms)\n")
        out.append("| d | m | B | T | ours ms | " + " | ".join(peers) + " |")
        out.append("|" + "---|" * (5 + len(peers)))
        for d, m, B, T in points:
            ours = idx.get((OURS, d, m, B, T, grad))
            o = f"{ours['time_s'] * 1e3:.3g}" if ours and "time_s" in ours else "skip"
            cells = []
            for p in peers:
                rec = idx.get((p, d, m, B, T, grad)) or (idx.get((p, d, m, B, T, False)) if grad else None)
                cells.append(_fmt_ratio(rec, ours))
            out.append(f"| {d} | {m} | {B} | {T} | {o} | " + " | ".join(cells) + " |")
    # efficiency
    ceil = result["ceilings"]
    out.append("\n## Efficiency against this machine's ceilings (forward)\n")
    out.append(f"sgemm peak {ceil['sgemm_gflops']:.1f} GFLOP/s; trivial op {ceil['dispatch_us']:.2f} us "
               f"({ceil['dispatch_autograd_us']:.2f} us recorded by autograd); `bmm(B,d)` is the measured rate of a "
               "batched (B, d, d) @ (B, d, d) matmul. Work: `cov_flops(d, m)` per covariance step (dense "
               "covariance form: A P A^T, C P, C P C^T, Cholesky, gain solves, update) and `mean_flops(d, m)` per "
               "sequence and step. `ours_seq` (shared parameters) runs the covariance recursion once for the "
               "batch, and only up to its steady state (k steps, recorded per point; `ours_seq_full`: all T): "
               "k·cov_flops + B·T·mean_flops against bmm(1, d), the rate of the single-matrix ops it issues. "
               "`ours_seq_batched` runs one recursion per sequence, batched: B·k·cov_flops + B·T·mean_flops "
               "against bmm(B, d). *Effective* counts the B·T·cov_flops a per-sequence filter without the stop "
               "would do, against bmm(B, d).\n")
    out.append("| impl | d | m | B | T | work GFLOP/s | % of its ceiling | effective % of bmm(B,d) | % of sgemm |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for name in ("ours_seq", "ours_seq_full", "ours_seq_batched"):
        for d, m, B, T in points:
            r = idx.get((name, d, m, B, T, False))
            if not r or "time_s" not in r:
                continue
            bmm_B, bmm_1 = ceil["bmm_gflops"].get(f"{B},{d}"), ceil["bmm_gflops"].get(f"1,{d}")
            if not bmm_B or not bmm_1:
                continue
            dense = B * T * cov_flops(d, m) / r["time_s"] / 1e9
            batched = name == "ours_seq_batched"  # one recursion per sequence, else one for the batch
            steps = (B if batched else 1) * r.get("cov_steps", T)  # the covariance steps it computed
            work = (steps * cov_flops(d, m) + B * T * mean_flops(d, m)) / r["time_s"] / 1e9
            ref = bmm_B if batched else bmm_1
            out.append(f"| {name} | {d} | {m} | {B} | {T} | {work:.2f} | {100 * work / ref:.0f} % | "
                       f"{100 * dense / bmm_B:.0f} % | {100 * work / ceil['sgemm_gflops']:.1f} % |")
    # accuracy
    out.append("\n## Accuracy: float32 log-likelihood vs float64 reference (max over the grid)\n")
    out.append("| impl | max rel. error | points with NaN/inf | points |")
    out.append("|---|---|---|---|")
    for name in impls:
        rs = [r for r in recs if r["impl"] == name and "loglik_rel_err" in r]
        if rs:
            errs = [r["loglik_rel_err"] for r in rs]
            bad = sum(1 for r in rs if r.get("nonfinite", 0) or r.get("loglik_nan", 0) or math.isnan(r["loglik_rel_err"]))
            out.append(f"| {name} | {max(errs):.2e} | {bad} | {len(rs)} |")
    # skips
    notes = [f"- `{k}`: {v}" for k, v in result["skipped_impls"].items()]
    reasons: dict[str, int] = {}
    for r in recs:
        for key in ("skipped", "error"):
            if key in r:
                reasons.setdefault(f"`{r['impl']}` {'fwd+bwd' if r['grad'] else 'fwd'}: {r[key].split(':')[0]}", 0)
                reasons[f"`{r['impl']}` {'fwd+bwd' if r['grad'] else 'fwd'}: {r[key].split(':')[0]}"] += 1
    notes += [f"- {k} ({v} points)" for k, v in reasons.items()]
    if result["skipped_points"]:
        notes.append(f"- {len(result['skipped_points'])} grid points skipped for every implementation: dense outputs "
                     f"above --mem-gb {result['args']['mem_gb']}")
    if notes:
        out.append("\n## Skipped\n")
        out += notes
    out.append("\n## Versions\n")
    for k, v in result["versions"].items():
        out.append(f"- {k}: " + ", ".join(f"{a} {b}" for a, b in v.items()))
    return "\n".join(out) + "\n"


def summary(result: dict) -> list[str]:
    """The world-model point for every implementation, and where a peer beats ours."""
    idx = _index(result["records"])
    w = WORLD_POINT
    key = lambda name, grad: (name, w["d"], w["m"], w["B"], w["T"], grad)  # noqa: E731
    ours = {g: idx.get(key(OURS, g)) for g in (False, True)}
    out = [f"\n## World-model point: B={w['B']}, T={w['T']}, d={w['d']}, m={w['m']}\n",
           "| implementation | fwd ms | fwd+bwd ms | ratio fwd | ratio fwd+bwd | loglik rel. err | NaN/inf |",
           "|---|---|---|---|---|---|---|"]
    for name in IMPLS:
        recs = {g: idx.get(key(name, g)) for g in (False, True)}
        if recs[False] is None and recs[True] is None:
            continue
        cells = []
        for g in (False, True):
            r = recs[g]
            cells.append(f"{r['time_s'] * 1e3:.2f}" if r and "time_s" in r else ("n/a" if g else "skip"))
        for g in (False, True):
            r = recs[g] or (recs[False] if g else None)
            cells.append(_fmt_ratio(r, ours[g]) if name != OURS else "1")
        r = recs[False] or recs[True]
        err = f"{r['loglik_rel_err']:.1e}" if "loglik_rel_err" in r else "-"
        out.append(f"| {IMPLS[name][-1]} (`{name}`) | " + " | ".join(cells) + f" | {err} | {r.get('nonfinite', '-')} |")
    out.append("\nn/a: no backward pass (forward-only peers are compared on their forward time in the ratio).\n")
    wins = []
    for (name, d, m, B, T, grad), o in sorted(idx.items()):
        if name != OURS or "time_s" not in o:
            continue
        for peer in IMPLS:
            r = idx.get((peer, d, m, B, T, grad))
            if r is None and grad and not IMPLS[peer][2]:  # forward-only peer: its forward time
                r = idx.get((peer, d, m, B, T, False))
            if peer.startswith("ours") or not r or "time_s" not in r or r["time_s"] >= o["time_s"]:
                continue
            wins.append(f"{peer} {'fwd+bwd' if grad else 'fwd'} d={d},m={m},B={B},T={T} ({o['time_s'] / r['time_s']:.2f}x)")
    out.append(f"Points where a peer is faster than `{OURS}` ({len(wins)}): " + ("; ".join(wins) if wins else "none") + "\n")
    return out


def masked_ratios(result: dict) -> list[str]:
    """Time with 10% of frames dropped at random per sequence over time with every frame, per point."""
    idx = _index(result["records"])
    points = sorted({(r["d"], r["m"], r["B"], r["T"]) for r in result["records"] if r["impl"] == "ours_seq_masked"})
    if not points:
        return []
    out = ["\n## Missing frames: time with a mask (10% of frames dropped at random per sequence) / without\n",
           "`ours_seq_masked`: the fused filter (one covariance recursion per distinct mask row); "
           "`ours_seq_masked_stepwise`: the same mask on the step-wise filter, the path masked batches took before.\n",
           "| d | m | B | T | pass | unmasked ms | masked ms | masked / unmasked | step-wise masked / unmasked |",
           "|---|---|---|---|---|---|---|---|---|"]
    for d, m, B, T in points:
        for grad in (False, True):
            base = idx.get((OURS, d, m, B, T, grad))
            cells = [_fmt_ratio(idx.get((name, d, m, B, T, grad)), base)
                     for name in ("ours_seq_masked", "ours_seq_masked_stepwise")]
            masked = idx.get(("ours_seq_masked", d, m, B, T, grad))
            ms = [f"{r['time_s'] * 1e3:.3g}" if r and "time_s" in r else "skip" for r in (base, masked)]
            out.append(f"| {d} | {m} | {B} | {T} | {'fwd+bwd' if grad else 'fwd'} | {' | '.join(ms)} | "
                       + " | ".join(cells) + " |")
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in result["records"] if "time_s" in r and r["m"] == r["d"]]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for row, grad in enumerate((False, True)):
        sub = [r for r in recs if r["grad"] == grad]
        B_ref = 16 if any(r["B"] == 16 for r in sub) else max((r["B"] for r in sub), default=16)
        for i, name in enumerate(IMPLS):
            style = dict(marker="o", label=name, color=f"C{i % 10}", linestyle="-" if i < 10 else "--")
            mine = [r for r in sub if r["impl"] == name and r["B"] == B_ref]
            d_ref = 32 if any(r["d"] == 32 for r in mine) else None
            vs_t = sorted((r["T"], r["time_s"]) for r in mine if r["d"] == d_ref)
            T_ref = min((r["T"] for r in mine), default=64)
            vs_d = sorted((r["d"], r["time_s"]) for r in mine if r["T"] == T_ref)
            if vs_t:
                axes[row, 0].plot(*zip(*vs_t), **style)
            if vs_d:
                axes[row, 1].plot(*zip(*vs_d), **style)
        what = "forward + backward" if grad else "forward"
        axes[row, 0].set(xscale="log", yscale="log", xlabel="T", ylabel="seconds", title=f"{what}: d = m = 32, B = {B_ref}")
        axes[row, 1].set(xscale="log", yscale="log", xlabel="d (= m)", ylabel="seconds", title=f"{what}: T = 64, B = {B_ref}")
    for ax in axes.flat:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
