"""Command-line flags built from a recipe dataclass: one flag per field, with the field's type,
default and help (`carve.settings.flag`), so each default is written once, in the recipe."""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields
from typing import Any


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the type a flag parses, whether it is a list) of a field's type hint."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return _base_type(args[0])
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def add_recipe_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """`--field-name` for every field of `cls` not in `skip` (booleans: a switch to the other value)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        default: Any = f.default_factory() if f.default_factory is not MISSING else f.default
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        kind, many = _base_type(hints[f.name])
        name = "--" + f.name.replace("_", "-")
        if kind is bool:
            flag = name if not default else "--no-" + f.name.replace("_", "-")
            parser.add_argument(flag, dest=f.name, action="store_false" if default else "store_true", help=help_text)
            continue
        shown = " ".join(map(str, default)) if many else default
        parser.add_argument(
            name,
            dest=f.name,
            type=kind,
            nargs="+" if many else None,
            default=default,
            help=f"{help_text} (default: {shown})" if default is not None else help_text,
        )


def recipe_from(args: argparse.Namespace, cls: type) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
