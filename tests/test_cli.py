"""worldmodel.cli (dataclass -> argparse) and train.py's subcommands: each takes only its own flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402  (the repository-root entry script)
from worldmodel.cli import add_flags, apply_overrides, config_from_dict, config_to_argv, parse_overrides  # noqa: E402
from worldmodel.training import TrainConfig  # noqa: E402


# ------------------------------------------------------------------------------------------- generic
@dataclass
class _Inner:
    width: int = 4
    scale: float | None = None
    tag: str = "a"


@dataclass
class _Other:
    tag: str = "b"
    depth: int = 2


@dataclass
class _Outer:
    steps: int = 10
    flag: bool = True
    ks: tuple[int, ...] = (1, 2)
    kwargs: dict = field(default_factory=dict)
    inner: _Inner = field(default_factory=_Inner)


@dataclass
class _Clash:
    width: int = 1
    inner: _Inner = field(default_factory=_Inner)
    other: _Other = field(default_factory=_Other)


def _parse(cls, argv, fields=None, aliases=()):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_flags(parser, cls, fields, aliases)
    return apply_overrides(cls(), parse_overrides(parser.parse_args(argv), cls))


def test_flags_round_trip_every_field_type():
    cfg = _Outer(steps=3, flag=False, ks=(5,), kwargs={"g": 9.8}, inner=_Inner(width=7, scale=0.25, tag="b"))
    assert _parse(_Outer, config_to_argv(cfg)) == cfg
    assert _parse(_Outer, []) == _Outer()
    # none -> None; empty tuple; --no-flag
    parsed = _parse(_Outer, ["--inner.width", "9", "--inner.scale", "none", "--ks", "--no-flag"])
    assert parsed == _Outer(flag=False, ks=(), inner=_Inner(width=9))
    with pytest.raises(SystemExit):
        _parse(_Outer, ["--steps", "three"])
    with pytest.raises(SystemExit):
        _parse(_Outer, ["--kwargs", "[1, 2]"])  # not a JSON object


def test_short_aliases_only_for_chosen_groups_and_unique_leaves():
    assert _parse(_Outer, ["--width", "9"], aliases=("inner",)).inner.width == 9
    with pytest.raises(SystemExit):
        _parse(_Outer, ["--width", "9"])  # no aliases unless asked for
    # inner.width clashes with the top-level width, inner.tag with other.tag: dotted only
    assert _parse(_Clash, ["--scale", "0.5", "--depth", "3"], aliases=("inner", "other")) == _Clash(
        inner=_Inner(scale=0.5), other=_Other(depth=3))
    with pytest.raises(SystemExit):
        _parse(_Clash, ["--tag", "x"], aliases=("inner", "other"))
    assert _parse(_Clash, ["--width", "2"], aliases=("inner", "other")) == _Clash(width=2)  # the top-level field


def test_field_selection_rejects_other_flags():
    assert _parse(_Outer, ["--steps", "4", "--inner.tag", "z"], fields=("steps", "inner")) == _Outer(
        steps=4, inner=_Inner(tag="z"))
    with pytest.raises(SystemExit):
        _parse(_Outer, ["--ks", "3"], fields=("steps", "inner"))
    cfg = _Outer(steps=3, inner=_Inner(width=7))
    assert config_to_argv(cfg, ("inner.width",)) == ["--inner.width", "7"]
    with pytest.raises(ValueError, match="stepz"):
        _parse(_Outer, [], fields=("stepz",))


# ------------------------------------------------------------------------------------------- train.py
def test_train_config_round_trips_through_flags_and_json():
    cfg = TrainConfig()
    changed = dataclasses.replace(cfg, name="x", steps=7, lr=1.5e-3, max_steps=2, progress=False,
                                  env_kwargs={"friction": 0.0},
                                  model=dataclasses.replace(cfg.model, latent_dim=5, state_dim=7, heteroscedastic=True,
                                                            method_kwargs={"q_std": 0.1}),
                                  eval=dataclasses.replace(cfg.eval, ks=(1, 3), baselines=()))
    command, parsed = train.parse_args(config_to_argv(changed, train.COMMANDS["train"].fields))
    assert command == "train" and parsed == changed.resolved()
    changed = dataclasses.replace(changed, filter=dataclasses.replace(cfg.filter, drop=(4, 8)))
    assert TrainConfig.from_dict(json.loads(json.dumps(changed.to_dict()))) == changed
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        config_from_dict(TrainConfig, {"stepz": 1})


def test_env_defaults_fill_every_field_left_at_none():
    """`train.py --env NAME` needs no other flag: image size, channels, action dim, episode length, env kwargs,
    data path and run name come from the env (worldmodel.envs.env_defaults); explicit flags win."""
    from worldmodel.envs import env_defaults

    _, cfg = train.parse_args(["--env", "balls"])
    d = env_defaults("balls")
    assert (cfg.model.image_size, cfg.model.channels, cfg.model.action_dim) == (d.image_size, d.channels, d.action_dim)
    assert (cfg.episode_length, cfg.env_kwargs, cfg.data, cfg.name) == (d.episode_length, d.env_kwargs,
                                                                        "data/balls.zarr", "balls-kalman")
    _, cfg = train.parse_args(["--env", "pendulum"])
    assert cfg.env_kwargs == {"friction": 0.5} and cfg.data == "data/pendulum.zarr"
    _, cfg = train.parse_args(["--env", "pendulum", "--env-kwargs", '{"friction": 0.1}', "--image-size", "32"])
    assert cfg.model.image_size == 32 and cfg.data != "data/pendulum.zarr" and cfg.data.startswith("data/pendulum-")
    assert cfg.resolved() == cfg  # resolving twice changes nothing
    _, cfg = train.parse_args(["--env", "dot_figure8", "--env-kwargs", '{"image_size": 16}'])  # once a TypeError
    assert cfg.model.image_size == 16 and "image_size" not in cfg.env_kwargs


def test_model_fields_keep_their_short_flags():
    _, cfg = train.parse_args(["--method", "vicreg", "--latent-dim", "5", "--image-size", "32"])
    assert (cfg.model.method, cfg.model.latent_dim, cfg.model.image_size) == ("vicreg", 5, 32)


@pytest.fixture
def run_root(tmp_path):
    """An --out-dir holding a run 'r' (its config.json only): enough for eval / filter to parse."""
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps(TrainConfig(name="r", out_dir=str(tmp_path)).to_dict()))
    return ["--out-dir", str(tmp_path), "--name", "r"]


@pytest.mark.parametrize("argv", [
    ["--filter.drop", "1", "2"],          # a filter flag given to train
    ["train", "--length", "12"],          # filter.length has no short alias
    ["--baselines", "untrained"],         # eval.* only dotted
    ["--drop-prob", "0.1"],
])
def test_train_rejects_flags_of_other_subcommands(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("command, flag", [
    ("eval", ["--steps", "3"]), ("eval", ["--method", "vicreg"]), ("eval", ["--model.latent-dim", "6"]),
    ("eval", ["--filter.drop", "1", "2"]), ("filter", ["--eval.ks", "1"]), ("filter", ["--data", "x.zarr"]),
    ("filter", ["--length", "5"]),
])
def test_eval_and_filter_take_only_their_flags(command, flag, run_root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args([command, *run_root, *flag])
    assert exit_info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_eval_and_filter_apply_their_flags_to_the_stored_run(run_root):
    command, cfg = train.parse_args(["eval", *run_root, "--eval.baselines", "vicreg", "--no-plots"])
    assert command == "eval" and cfg.eval.baselines == ("vicreg",) and not cfg.plots
    _, cfg = train.parse_args(["filter", *run_root, "--filter.drop", "4", "8", "--filter.live"])
    assert cfg.filter.drop == (4, 8) and cfg.filter.live


@pytest.mark.parametrize("command, present, absent", [
    ("train", ["--steps", "--method", "--latent-dim", "--model.latent-dim", "--eval.ks"],
     ["--filter.", "--length", "--ks", "--baselines"]),
    ("eval", ["--name", "--out-dir", "--device", "--progress", "--plots", "--eval.baselines"],
     ["--steps", "--model.", "--filter.", "--data"]),
    ("filter", ["--name", "--out-dir", "--device", "--progress", "--plots", "--filter.drop"],
     ["--steps", "--model.", "--eval.", "--data", "--resume"]),
])
def test_help_of_each_subcommand_lists_only_its_flags(command, present, absent, capsys):
    with pytest.raises(SystemExit):
        train.parse_args([command, "--help"])
    lines = [line.split("  ")[1] for line in capsys.readouterr().out.splitlines() if line.startswith("  --")]
    flags = re.findall(r"--[\w.-]+", " ".join(lines))  # each option line: '  --a.b A, --b B   help'
    for flag in present:
        assert flag in flags, flag
    for prefix in absent:
        assert not [f for f in flags if f.startswith(prefix)], prefix


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "steps must be >= 1"),
    (["--window", "200", "--episode-length", "100"], "window"),
    (["eval", "--out-dir", "/nonexistent-runs"], "no run at"),
])
def test_invalid_config_exits_with_message(argv, message):
    with pytest.raises(SystemExit, match=message):
        train.parse_args(argv)


def test_invalid_filter_config_exits_with_message(run_root):
    with pytest.raises(SystemExit, match="start stop pairs"):
        train.parse_args(["filter", *run_root, "--filter.drop", "3"])
