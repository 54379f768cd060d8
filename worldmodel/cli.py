"""Command-line flags generated from (nested) dataclasses, and their inverse.

Every leaf field of a config dataclass becomes one flag: ``steps`` -> ``--steps``, a field of a nested
dataclass ``model.latent_dim`` -> ``--model.latent-dim``. A parser can take a subset of the fields
(``fields``: names or dotted prefixes, e.g. ``("name", "eval")``; a flag of another subset is then an
argparse error) and give the leaves of some nested groups a short alias (``aliases=("model",)``:
``--latent-dim``) where the leaf name is unique among the parser's flags and no top-level field has it.
Types: int, float, str, ``X | None`` (write ``none``), bool (``--flag`` / ``--no-flag``),
``tuple[X, ...]`` / ``list[X]`` (space-separated values), dict (JSON). Flags default to "not given",
so ``parse_overrides`` returns only what the user typed; apply them to any base config with
``apply_overrides`` (defaults, or a stored run's config.json).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import types
import typing
from typing import Any, Iterator

__all__ = ["add_flags", "apply_overrides", "config_from_dict", "config_to_argv", "leaf_fields", "parse_overrides",
           "selected_fields"]


def leaf_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted name, field, resolved type) of every non-dataclass field of ``cls``, depth first."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from leaf_fields(kind, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, kind


def selected_fields(cls: type, fields: tuple[str, ...] | None = None) -> list[tuple[str, dataclasses.Field, Any]]:
    """The leaf_fields of ``cls`` whose dotted name is, or lies under, one of ``fields`` (None: all).
    ValueError for an entry of ``fields`` that selects nothing."""
    def under(name: str, selector: str) -> bool:
        return name == selector or name.startswith(selector + ".")

    leaves = list(leaf_fields(cls))
    if fields is None:
        return leaves
    chosen = [leaf for leaf in leaves if any(under(leaf[0], f) for f in fields)]
    unknown = [f for f in fields if not any(under(name, f) for name, _, _ in chosen)]
    if unknown:
        raise ValueError(f"no {cls.__name__} fields {unknown}")
    return chosen


def _strip_optional(kind: Any) -> tuple[Any, bool]:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(kind)) == 2:
            return args[0], True
        raise TypeError(f"unsupported union type {kind!r} for a CLI flag")
    return kind, False


def _scalar(kind: Any, optional: bool):
    """A str -> value converter for a scalar type (None for ``none`` when optional)."""
    if typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)
        base = type(choices[0])
    elif kind in (int, float, str):
        base, choices = kind, None
    elif kind is dict or typing.get_origin(kind) is dict:
        base, choices = json.loads, None
    else:
        raise TypeError(f"unsupported field type {kind!r} for a CLI flag")

    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        value = base(text)
        if choices is not None and value not in choices:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {list(choices)}")
        if base is json.loads and not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
        return value

    convert.__name__ = getattr(base, "__name__", "json")
    return convert


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls: type, fields: tuple[str, ...] | None = None,
              aliases: tuple[str, ...] = ()) -> None:
    """Add one flag per selected leaf field of dataclass ``cls`` (see the module docstring for ``fields``
    and ``aliases``); defaults are shown in the help, values parse only if given."""
    chosen = selected_fields(cls, fields)
    leaf_counts = collections.Counter(name.rsplit(".", 1)[-1] for name, _, _ in chosen)
    top_level = {f.name for f in dataclasses.fields(cls)}
    defaults = dataclasses.asdict(cls())
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f, kind in chosen:
        group_name = name.rsplit(".", 1)[0] if "." in name else ""
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(f"{group_name} options" if group_name else "config")
        group = groups[group_name]
        leaf = name.rsplit(".", 1)[-1]
        options = [_flag(name)]
        if name.split(".")[0] in aliases and "." in name and leaf_counts[leaf] == 1 and leaf not in top_level:
            options.append(_flag(leaf))
        default = defaults
        for part in name.split("."):
            default = default[part]
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {json.dumps(default)})".strip()
        base, optional = _strip_optional(kind)
        kwargs: dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=help_text)
        if base is bool:
            group.add_argument(*options, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(base) in (tuple, list):
            group.add_argument(*options, nargs="*", type=_scalar(typing.get_args(base)[0], False), metavar="X",
                               **kwargs)
        else:
            group.add_argument(*options, type=_scalar(base, optional), metavar=leaf.upper(),
                               **kwargs)


def parse_overrides(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The {dotted name: value} of the config flags the user gave (tuples for sequence fields)."""
    given = vars(namespace)
    out = {}
    for name, _, kind in leaf_fields(cls):
        if name in given:
            value = given[name]
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """A copy of dataclass ``config`` with dotted-name ``overrides`` applied (validated by __post_init__)."""
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for name, value in overrides.items():
        head, _, rest = name.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            direct[head] = value
    for head, sub in nested.items():
        direct[head] = apply_overrides(getattr(config, head), sub)
    return dataclasses.replace(config, **direct)


def config_to_argv(config: Any, fields: tuple[str, ...] | None = None) -> list[str]:
    """Flags that reproduce the ``fields`` (as in add_flags) of ``config`` from the defaults:
    ``apply_overrides(cls(), parse(argv)) == config`` in those fields."""
    argv: list[str] = []
    for name, _, kind in selected_fields(type(config), fields):
        value = config
        for part in name.split("."):
            value = getattr(value, part)
        flag = _flag(name)
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is None:
            argv += [flag, "none"]
        elif isinstance(value, (tuple, list)):
            argv += [flag, *map(str, value)]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


def config_from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Inverse of ``dataclasses.asdict`` (lists back to tuples); unknown keys raise ValueError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    kwargs = {}
    for name, value in data.items():
        kind, _ = _strip_optional(hints[name])
        if dataclasses.is_dataclass(kind):
            value = config_from_dict(kind, value)
        elif typing.get_origin(kind) is tuple and value is not None:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
