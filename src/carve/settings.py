"""Settings that many layers need, as small frozen values instead of long argument lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

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
