"""Train, evaluate and replay a latent world model (LDM with an exact Kalman prior): the command line.

    python train.py                       # build data/pendulum.zarr if missing, train, evaluate, plot
    python train.py --env dot_figure8     # any env of worldmodel.envs, with that env's defaults
    python train.py --method vicreg --name vicreg --steps 500
    python train.py --resume              # continue an interrupted run (exactly)
    python train.py eval --name NAME      # readout R^2 + k-step NLL/coverage table, appended to metrics.jsonl
    python train.py filter --name NAME --filter.drop 40 60   # online filtering with dropped frames -> filter.png
    torchrun --nproc_per_node=2 train.py --steps 500         # DDP (gloo on CPU, nccl on GPU)

Subcommands, each with only its own flags (``train.py SUBCOMMAND --help``), generated from the fields of
worldmodel.training.TrainConfig:
    train (default)  every field but filter.*; nested ones as --model.x-y / --eval.x-y, model fields also
                     as --x-y (--method, --latent-dim, ...)
    eval             --name, --out-dir, --device, --progress, --plots and --eval.x-y
    filter           --name, --out-dir, --device, --progress, --plots and --filter.x-y
eval and filter read the run's config.json and apply only the flags you pass.

This file is the only place that turns the library's exceptions into exit codes: 1 with ``error: ...``
for bad settings, data or checkpoints, 2 for unknown flags (argparse), 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import NamedTuple

from worldmodel.allocator import tune_malloc
from worldmodel.cli import add_flags, apply_overrides, parse_overrides
from worldmodel.training import RUN_CONTROL, TrainConfig, evaluate_run, replay_filter, train


class Command(NamedTuple):
    help: str
    fields: tuple[str, ...]  # TrainConfig fields (or nested groups) the subcommand takes as flags
    aliases: tuple[str, ...] = ()  # nested groups whose fields also answer to --leaf-name


_RUN = ("name", "out_dir", "device", "progress", "plots")
COMMANDS = {
    "train": Command("train a model (the default)",
                     tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "filter"), ("model",)),
    "eval": Command("evaluate a run's checkpoint", (*_RUN, "eval")),
    "filter": Command("replay an episode through WorldModel.step and plot beliefs vs the true state",
                      (*_RUN, "filter")),
}


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand: only its own flags (an unknown one is an argparse error)."""
    spec = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"train.py {command}", description=f"{spec.help}.\n\n{__doc__}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_flags(parser, TrainConfig, spec.fields, spec.aliases)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[str, TrainConfig]:
    """(command, config) from command-line arguments; ``train`` when no subcommand is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"  # `train.py --help`: the train flags
    overrides = parse_overrides(build_parser(command).parse_args(argv), TrainConfig)
    try:
        base = TrainConfig()
        named = apply_overrides(base, {k: v for k, v in overrides.items() if k in ("name", "out_dir")})
        config_file = named.run_dir / "config.json"
        if command in ("eval", "filter") or overrides.get("resume"):
            if config_file.is_file():  # the run's settings; how to run it now (RUN_CONTROL) from defaults + flags
                try:
                    stored = TrainConfig.from_dict(json.loads(config_file.read_text()))
                except (ValueError, TypeError) as err:
                    raise ValueError(f"cannot read the run's settings {str(config_file)!r}: {err}") from None
                base = dataclasses.replace(stored, **{k: getattr(base, k) for k in RUN_CONTROL})
            elif command != "train":
                raise SystemExit(f"error: no run at {str(named.run_dir)!r} (missing config.json); train it first")
        return command, apply_overrides(base, overrides).resolved()
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
    except KeyboardInterrupt as err:  # training.Interrupted (a checkpoint is saved) or Ctrl-C elsewhere
        if os.environ.get("RANK", "0") == "0":
            print(str(err) or "interrupted (a dataset build continues where it stopped on the next run; training "
                  "resumes from the last checkpoint with --resume)", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
