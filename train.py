"""Train, evaluate and replay a latent world model (LDM with an exact Kalman prior).

    python train.py                       # build data/pendulum-f0.5.zarr if missing, train, evaluate, plot
    python train.py --method vicreg --name vicreg --steps 500
    python train.py --resume              # continue an interrupted run (exactly)
    python train.py eval --name NAME      # readout R^2 + k-step NLL/coverage table, appended to metrics.jsonl
    python train.py filter --name NAME --filter.drop 40 60   # online filtering with dropped frames -> filter.png
    torchrun --nproc_per_node=2 train.py --steps 500         # DDP (gloo on CPU, nccl on GPU)

Subcommands: train (default), eval, filter. Every field of worldmodel.training.TrainConfig is a flag;
nested fields are --model.x-y / --eval.x-y / --filter.x-y (also --x-y when the name is unique).
eval and filter read the run's config.json and apply only the flags you pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from worldmodel.allocator import tune_malloc
from worldmodel.cli import add_flags, apply_overrides, parse_overrides
from worldmodel.training import RUN_CONTROL, TrainConfig, evaluate_run, replay_filter, train

COMMANDS = {"train": "train a model (the default)", "eval": "evaluate a run's checkpoint",
            "filter": "replay an episode through WorldModel.step and plot beliefs vs the true state"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,filter}")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=f"{help_text}.\n\n{__doc__}", allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_flags(p, TrainConfig)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[str, TrainConfig]:
    """(command, config) from command-line arguments; ``train`` when no subcommand is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:  # also makes `train.py --help` list the train flags
        argv.insert(0, "train")
    args = build_parser().parse_args(argv)
    overrides = parse_overrides(args, TrainConfig)
    try:
        base = TrainConfig()
        named = apply_overrides(base, {k: v for k, v in overrides.items() if k in ("name", "out_dir")})
        config_file = named.run_dir / "config.json"
        if args.command in ("eval", "filter") or overrides.get("resume"):
            if config_file.is_file():  # the run's settings; how to run it now (RUN_CONTROL) from defaults + flags
                stored = TrainConfig.from_dict(json.loads(config_file.read_text()))
                base = dataclasses.replace(stored, **{k: getattr(base, k) for k in RUN_CONTROL})
            elif args.command != "train":
                raise SystemExit(f"error: no run at {str(named.run_dir)!r} (missing config.json); train it first")
        return args.command, apply_overrides(base, overrides)
    except (ValueError, TypeError) as err:
        raise SystemExit(f"error: {err}") from None


def main(argv: list[str] | None = None) -> Path | dict:
    command, cfg = parse_args(argv)
    tune_malloc()  # keep freed tensor memory in the heap (no-op off glibc or when MALLOC_* is set)
    try:
        if command == "eval":
            return evaluate_run(cfg)
        if command == "filter":
            return replay_filter(cfg)
        return train(cfg)
    except KeyboardInterrupt:  # outside the training loop (which saves a checkpoint itself): data build, eval
        raise SystemExit("interrupted (a dataset build continues where it stopped on the next run; "
                         "training resumes from the last checkpoint with --resume)") from None


if __name__ == "__main__":
    main()
