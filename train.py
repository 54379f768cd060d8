"""Train, evaluate and replay a latent world model (LDM with an exact Kalman prior): the command line.

    python train.py                       # build data/pendulum.zarr if missing, train, evaluate, plot
    python train.py --env dot_figure8     # any env of worldmodel.envs, with that env's defaults
    python train.py --method vicreg --name vicreg --steps 500
    python train.py --resume              # continue an interrupted run (exactly)
    python train.py --seeds 0 1 2         # one run per seed; mean and spread of R^2 and coverage -> seeds.json
    python train.py eval --name NAME      # readout R^2 + k-step NLL/coverage table, appended to metrics.jsonl
    python train.py filter --name NAME --filter.drop 40 60   # online filtering with dropped frames -> filter.png
    python train.py import --videos clips/ --data data/clips.zarr   # outside data -> a rollout store
    python train.py control               # collect-train-plan loop on the pendulum swing-up, closed-loop eval
    python train.py ssl --method simclr   # image SSL on two views of the procedural shapes, probes vs untrained
    torchrun --nproc_per_node=2 train.py --steps 500         # DDP (gloo on CPU, nccl on GPU)

Subcommands, each with only its own flags (``train.py SUBCOMMAND --help``), generated from the fields of
a config dataclass (worldmodel.training.TrainConfig, or worldmodel.datasets.ImportConfig for import):
    train (default)  every field but filter.*; nested ones as --model.x-y / --eval.x-y, model fields also
                     as --x-y (--method, --latent-dim, ...)
    eval             --name, --out-dir, --device, --progress, --plots and --eval.x-y
    filter           --name, --out-dir, --device, --progress, --plots and --filter.x-y
    control          the train flags (for each training phase) and --control.x-y (worldmodel.training.control);
                     planner settings as --model.planner '{"horizon": 30, "samples": 256}'
    ssl              every field of worldmodel.training.ssl.SSLConfig: --data DIR, --steps, --batch-size,
                     --augment '{"scale": [0.3, 1.0]}', model fields as --method, --depth, ... and --eval.x-y
    import           --videos DIR | --hdf5 F | --npz F | --minari PATH | --lerobot PATH, --data OUT.zarr,
                     --image-size, --fps, --strict, ... (worldmodel.datasets.importers)
eval and filter read the run's config.json and apply only the flags you pass. Training on an imported
store (--data OUT.zarr) takes the frame size, channels, action size, a 80/20 episode split and the
window (at most 32) from the store unless given; its readout evaluation is skipped (no simulator state).

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
from worldmodel.datasets import ImportConfig, run_import
from worldmodel.training import RUN_CONTROL, TrainConfig, evaluate_run, replay_filter, train, train_seeds
from worldmodel.training.control import control
from worldmodel.training.ssl import SSLConfig, train_ssl
from worldmodel.training.data import imported_store_settings, is_imported


class Command(NamedTuple):
    help: str
    fields: tuple[str, ...] | None  # fields (or nested groups) of ``config`` taken as flags (None: all)
    aliases: tuple[str, ...] = ()  # nested groups whose fields also answer to --leaf-name
    config: type = TrainConfig  # the dataclass the flags are generated from and parsed into


_RUN = ("name", "out_dir", "device", "progress", "plots")
COMMANDS = {
    "train": Command("train a model (the default)",
                     tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("filter", "control")),
                     ("model",)),
    "eval": Command("evaluate a run's checkpoint", (*_RUN, "eval")),
    "filter": Command("replay an episode through WorldModel.step and plot beliefs vs the true state",
                      (*_RUN, "filter")),
    "control": Command("collect with MPC, train, repeat; evaluate closed-loop against random and oracle policies",
                       tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("filter", "seeds")),
                       ("model",)),
    "ssl": Command("image SSL: train any preset on two augmented views of images, then probe the features",
                   None, ("model",), config=SSLConfig),
    "import": Command("import videos, HDF5 / npz arrays, or a Minari / LeRobot dataset on disk into a rollout "
                      "store", None, config=ImportConfig),
}


def build_parser(command: str) -> argparse.ArgumentParser:
    """The parser of one subcommand: only its own flags (an unknown one is an argparse error)."""
    spec = COMMANDS[command]
    parser = argparse.ArgumentParser(prog=f"train.py {command}", description=f"{spec.help}.\n\n{__doc__}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_flags(parser, spec.config, spec.fields, spec.aliases)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[str, TrainConfig | SSLConfig | ImportConfig]:
    """(command, config) from command-line arguments; ``train`` when no subcommand is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"  # `train.py --help`: the train flags
    spec = COMMANDS[command]
    overrides = parse_overrides(build_parser(command).parse_args(argv), spec.config)
    try:
        if spec.config not in (TrainConfig, SSLConfig):
            return command, apply_overrides(spec.config(), overrides)
        if command == "control":  # resolved by training.control.for_control (the env's own dynamics)
            from worldmodel.envs import control_defaults

            method = control_defaults(overrides.get("env", TrainConfig.env)).get("method")
            if method and "model.method" not in overrides:
                overrides["model.method"] = method
            return command, apply_overrides(TrainConfig(), overrides)
        if command == "train":
            overrides = {**imported_store_settings(overrides), **overrides}
        base = spec.config()
        named = apply_overrides(base, {k: v for k, v in overrides.items() if k in ("name", "out_dir", "env",
                                                                                  "model.method")})
        config_file = named.run_dir / "config.json"
        if command in ("eval", "filter") or overrides.get("resume"):
            if config_file.is_file():  # the run's settings; how to run it now (RUN_CONTROL) from defaults + flags
                try:
                    stored = spec.config.from_dict(json.loads(config_file.read_text()))
                except (ValueError, TypeError) as err:
                    raise ValueError(f"cannot read the run's settings {str(config_file)!r}: {err}") from None
                run_control = getattr(spec.config, "RUN_CONTROL", RUN_CONTROL)
                base = dataclasses.replace(stored, **{k: getattr(base, k) for k in run_control})
            elif command != "train":
                raise SystemExit(f"error: no run at {str(named.run_dir)!r} (missing config.json); train it first")
        return command, apply_overrides(base, overrides).resolved()
    except (ValueError, TypeError) as err:
        raise SystemExit(f"error: {err}") from None


def main(argv: list[str] | None = None) -> Path | dict:
    command, cfg = parse_args(argv)
    tune_malloc()  # keep freed tensor memory in the heap (no-op off glibc or when MALLOC_* is set)
    try:
        if command == "import":
            return run_import(cfg)
        if command == "eval" and is_imported(cfg):
            raise ValueError(f"the run's dataset {cfg.data!r} was imported: it has no simulator readout targets to "
                             f"evaluate against (train.py evaluates imported data only by its training loss)")
        if command == "filter":
            return replay_filter(cfg)
        if command == "control":
            return control(cfg)
        if command == "ssl":
            return train_ssl(cfg)
        if command == "eval":
            return evaluate_run(cfg)
        imported = is_imported(cfg)
        if cfg.seeds:
            if imported:
                raise ValueError("--seeds compares readout evaluations, and an imported data set has none")
            return train_seeds(cfg)
        run_dir = train(cfg, final_eval=not imported)
        if imported:
            print(f"trained on the imported dataset {cfg.data!r}: the readout evaluation is skipped (it needs the "
                  f"simulator's state and readout targets); losses are in {str(run_dir / 'metrics.jsonl')!r}",
                  flush=True)
        return run_dir
    except KeyboardInterrupt as err:  # training.Interrupted (a checkpoint is saved) or Ctrl-C elsewhere
        if os.environ.get("RANK", "0") == "0":
            print(str(err) or "interrupted (a dataset build continues where it stopped on the next run; training "
                  "resumes from the last checkpoint with --resume)", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except (ValueError, FileNotFoundError, FloatingPointError, ImportError) as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
