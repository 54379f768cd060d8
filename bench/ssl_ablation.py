"""The paper's 8-combination SSL ablation (Mikulasch & Zenke 2026, Sec. 5): latent model plane / sphere x
entropy estimator logdet / kde x objective F_LDM (joint entropy) / F_MI (marginal entropies), each trained
with ``train.py ssl`` (same encoder, steps, batch and augmentations) for several seeds, scored by the
linear-probe and kNN accuracy of the backbone features on held-out images.

    python bench/ssl_ablation.py --quick          # CPU: small encoder and few steps (about 1-2 min a run)
    python bench/ssl_ablation.py --steps 500      # the train.py ssl defaults otherwise
    python bench/ssl_ablation.py --data ~/cifar   # CIFAR-10/100 or an image folder on disk

Every finished run is appended to ``bench/results/ssl_ablation.jsonl`` (and its run directory kept under
``runs/ssl-ablation/``); a rerun with the same settings skips the runs already there, so an interrupted
ablation continues where it stopped. Prints a markdown table: mean +- spread (half the range) over seeds,
ranked by probe accuracy, with the paper's ranking beside it (plane + logdet best; F_LDM ~ F_MI).
The combinations are ``make("vicreg" | "simclr", d, entropy=..., mi=...)``: vicreg's prior is the plane
(Gaussian transition, sigma 1), simclr's the sphere (vMF, beta 10).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
from pathlib import Path

from worldmodel.cli import apply_overrides
from worldmodel.training import read_metrics
from worldmodel.training.ssl import SSLConfig, train_ssl

PRIORS = {"plane": "vicreg", "sphere": "simclr"}
QUICK = {"steps": 60, "batch_size": 64, "images": 2000, "warmup": 10, "model.depth": 8,
         "eval.probe_images": 2000, "eval.test_images": 1000}


def combinations():
    for prior, entropy, objective in itertools.product(PRIORS, ("logdet", "kde"), ("LDM", "MI")):
        yield f"{prior}+{entropy}+{objective}", PRIORS[prior], {"entropy": entropy, "mi": objective == "MI"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CPU settings: " + json.dumps(QUICK))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, help="optimizer steps (default: train.py ssl's, or --quick's)")
    parser.add_argument("--data", help="CIFAR / image folder on disk (default: the procedural shapes)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="bench/results/ssl_ablation.jsonl")
    args = parser.parse_args()

    overrides = {**(QUICK if args.quick else {}), "data": args.data, "device": args.device, "progress": False,
                 "plots": False, "out_dir": "runs/ssl-ablation"}
    if args.steps:
        overrides["steps"] = args.steps
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    results: dict[str, list[dict]] = {}
    for (label, method, kwargs), seed in itertools.product(combinations(), args.seeds):
        cfg = apply_overrides(SSLConfig(), {**overrides, "seed": seed, "model.method": method,
                                            "model.method_kwargs": kwargs,
                                            "name": f"{label}-seed{seed}"})
        cfg = apply_overrides(cfg, {"name": f"{cfg.name}-{cfg.steps}x{cfg.batch_size}-depth{cfg.model.depth}"})
        settings = {k: v for k, v in cfg.to_dict().items() if k not in SSLConfig.RUN_CONTROL}
        previous = [r for r in done if r["settings"] == settings]
        if previous:
            record = previous[-1]
        else:
            print(f"--- {label}, seed {seed}", flush=True)
            run_dir = train_ssl(cfg)
            scores = read_metrics(run_dir / "metrics.jsonl")[-1]
            record = {"combination": label, "seed": seed, "settings": settings,
                      "probe": scores["probe_accuracy"][method], "knn": scores["knn_accuracy"][method],
                      "untrained_probe": scores["probe_accuracy"]["untrained"],
                      "elapsed_s": [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"][-1][
                          "elapsed_s"]}
            with open(out, "a") as f:
                f.write(json.dumps(record) + "\n")
        results.setdefault(label, []).append(record)
    print_table(results, dataclasses.replace(cfg, seed=0))


def _mean_spread(values: list[float]) -> str:
    spread = (max(values) - min(values)) / 2
    return f"{100 * statistics.mean(values):.1f} +- {100 * spread:.1f}"


def print_table(results: dict[str, list[dict]], cfg: SSLConfig) -> None:
    ranked = sorted(results, key=lambda label: -statistics.mean(r["probe"] for r in results[label]))
    seeds = len(next(iter(results.values())))
    untrained = [r["untrained_probe"] for rs in results.values() for r in rs]
    print(f"\n{cfg.data or 'procedural shapes'}, {cfg.steps} steps x {cfg.batch_size} images, depth {cfg.model.depth}, "
          f"{seeds} seeds (mean +- half range), untrained probe {100 * statistics.mean(untrained):.1f} %\n")
    print("| rank | latent model + entropy + objective | probe acc (%) | kNN acc (%) | min / run |")
    print("|---|---|---|---|---|")
    for rank, label in enumerate(ranked, 1):
        rs = results[label]
        minutes = statistics.mean(r["elapsed_s"] for r in rs) / 60
        print(f"| {rank} | {label} | {_mean_spread([r['probe'] for r in rs])} | {_mean_spread([r['knn'] for r in rs])} "
              f"| {minutes:.1f} |")
    print("\npaper (CIFAR-100, ResNet-18): plane + logdet best; F_LDM and F_MI about equal")


if __name__ == "__main__":
    main()
