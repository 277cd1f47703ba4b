"""Dataclass configs ↔ argparse flags: library code takes a typed config, the CLI maps flags onto it.

Every library config (train.config.TrainConfig, …) is a small dataclass whose fields carry their
help text in `field(metadata={"help": …})`. A stage declares its flags from it
(`add_dataclass_arguments(parser, TrainConfig, lr=3e-4)`, a stage's own defaults as keyword
overrides) and builds the config from the parsed flags (`from_args(TrainConfig, args)`), so a
benchmark or a test constructs `TrainConfig(steps=20)` directly and never fakes a namespace.

Field name `foo_bar` is flag `--foo-bar`; a `bool` field defaulting to False is a store_true flag;
one defaulting to True becomes `--no-foo-bar`; `choices` in the metadata restrict the value;
`Optional[...]` fields take the inner type. Imports nothing from nanoseek.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing


def _flag_type(tp) -> type:
    """int | None -> int, 'float | None' -> float (string annotations under `from __future__`)."""
    if isinstance(tp, str):
        names = [t.strip() for t in tp.split("|") if t.strip() != "None"]
        return {"int": int, "float": float, "str": str, "bool": bool}[names[0]]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = (), **defaults) -> None:
    """One flag per field of dataclass `cls` (help from the field's metadata); `defaults` override
    the dataclass defaults for this parser; fields in `skip` are not exposed."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", "")
        kind = _flag_type(f.type)
        if kind is bool:
            if default:
                parser.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                                    default=True, help=f"turn off: {help_text}")
            else:
                parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, action="store_true",
                                    default=False, help=help_text)
            continue
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=default,
                            choices=f.metadata.get("choices"), help=help_text)


def from_args(cls, args: argparse.Namespace, **overrides):
    """An instance of dataclass `cls` from the parsed flags (fields not on `args` keep defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})
