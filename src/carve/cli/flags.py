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


def add_recipe_flags(
    parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), unset: bool = False
) -> None:
    """A flag for every field of `cls` not in `skip` (booleans: a switch to the other value).
    `unset=True`: a flag the user does not give is absent from the parsed namespace (so values
    from a recipe file are not overridden by defaults); the help still shows the default."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        default: Any = f.default_factory() if f.default_factory is not MISSING else f.default
        where = parser
        if meta.get("group"):
            where = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        help_text = meta.get("help", "").replace("%", "%%")  # argparse formats help with %
        kind, many = _base_type(hints[f.name])
        name = meta.get("name") or "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name}
        if unset:
            kw["default"] = argparse.SUPPRESS
        if kind is bool and default is None:  # unset means "the method's own choice": both switches
            where.add_argument(name, action=argparse.BooleanOptionalAction, help=help_text, **({"default": None} | kw))
            continue
        if kind is bool:
            switch = name if not default else "--no-" + name.removeprefix("--")
            where.add_argument(switch, action="store_false" if default else "store_true", help=help_text, **kw)
            continue
        if default is not None and default != "" and "(default" not in help_text:
            shown = " ".join(map(str, default)) if many else default
            help_text = f"{help_text} (default: {shown})"
        where.add_argument(
            name,
            *meta.get("aliases", ()),
            type=kind,
            nargs="+" if many else None,
            choices=meta.get("choices"),
            metavar=meta.get("metavar"),
            help=help_text,
            **({"default": default} | kw),
        )


def recipe_from(args: argparse.Namespace, cls: type, base: Any = None) -> Any:
    """The recipe the flags give: `base`'s values (a recipe file's), overridden by every flag given."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    if base is None:
        return cls(**given)
    return cls(**{**{f.name: getattr(base, f.name) for f in fields(cls)}, **given})
