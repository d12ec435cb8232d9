"""Settings that many layers need, as small frozen values instead of long argument lists."""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from carve.errors import UsageError
from carve.models.arch import DEFAULT_EXCLUDE, all_prunable_linears


@dataclass(frozen=True)
class Targets:
    """Which Linear modules of the decoder blocks a job touches (glob patterns on module names)."""

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE

    @classmethod
    def of(cls, include: list[str] | tuple[str, ...], exclude: list[str] | tuple[str, ...]) -> Targets:
        return cls(tuple(include), tuple(exclude))

    def linears(self, model: nn.Module) -> dict[str, nn.Module]:
        """Module name -> Linear (or GPT-2 Conv1D); a clear error when nothing matches."""
        return all_prunable_linears(model, self.include, self.exclude)

    def is_default(self) -> bool:
        return self == Targets()


DEFAULT_TARGETS = Targets()


@dataclass(frozen=True)
class Calibration:
    """How calibration data reaches a layer-wise or gradient pass."""

    batch_size: int = 8  # blocks per forward
    propagation: str = "pruned"  # "pruned" | "dense" | "fused" (see ops.prune.prune)
    dtype: torch.dtype | None = None  # autocast dtype of the forwards (None: the model's)
    # streamed extraction: an object whose enter(i) / leave(i) the layer-wise engine calls before
    # block i is calibrated and after it is pruned (reads it from disk, writes and frees it: carve.streamed)
    stream: Any = None
    # bytes of calibration activations the layer-wise engine keeps in memory (None: no limit); the
    # rest goes to a temporary file (carve.engines.activations)
    max_memory: int | None = None
    # bytes one block's statistics (Hessians) may take at once (None: no limit); past it the block's
    # Linears are calibrated in rounds, the last-called first (carve.engines.layerwise.rounds)
    statistics_memory: int | None = None
    # dtype of a Hessian's per-batch products XᵀX (None: float32); summed in float64 either way
    products: torch.dtype | None = None


DEFAULT_CALIBRATION = Calibration()


def flag(
    help: str,
    default: Any = None,
    *,
    factory: Any = None,
    name: str | None = None,
    aliases: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    group: str | None = None,
) -> Any:
    """A recipe field with what its command-line flag needs: the CLI builds the flag from the
    field (name, type, default, help), so each default is written once, here.  `name` overrides
    the flag's name (--lambda for `lam`), `aliases` adds others, `group` a help section."""
    meta = {"help": help, "name": name, "aliases": aliases, "choices": choices, "metavar": metavar, "group": group}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _accepts(hint: Any, value: Any) -> bool:
    """Whether `value` has the type `hint` (str, int, float, bool, list[X], X | None) exactly as a
    recipe field needs: no bool for a number, no string for a list, finite numbers only."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) in (list, tuple):
        (item, *_) = typing.get_args(hint) or (Any,)
        return isinstance(value, list | tuple) and all(_accepts(item, v) for v in value)
    return True  # a type carve does not check here


def _describe(hint: Any) -> str:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple):
        item = typing.get_args(hint)[0]
        return "a list of " + {str: "strings", int: "whole numbers", float: "finite numbers"}.get(item, str(item))
    names = {type(None): "null", bool: "true or false", int: "a whole number", float: "a finite number"}
    return names.get(hint, "a string" if hint is str else str(hint))


def check_types(settings: Any) -> None:
    """Refuse a dataclass of settings (a recipe) holding a value of the wrong type for any field:
    `include: "*mlp*"` (a string, not a list), `speed: "no"`, a string sparsity, `nan`."""
    hints = typing.get_type_hints(type(settings))
    for f in fields(settings):
        value = getattr(settings, f.name)
        name = f.name.replace("_", "-")
        if f.name in hints and not _accepts(hints[f.name], value):
            raise UsageError(f"{name} must be {_describe(hints[f.name])}, not {value!r:.60}")
        choices = f.metadata.get("choices")
        if choices and value is not None and value not in choices:
            raise UsageError(f"{name} must be one of {', '.join(choices)}, not {value!r:.60}")
