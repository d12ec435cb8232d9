"""What every op returns: an Outcome that describes itself for the manifest and saves its files.

An op (prune, structure, train, and later merge and unlearn) changes the model in place and
returns an Outcome; the job skeleton puts `describe(model)` into carve.json (top-level sections)
and calls `save(directory)` inside the output being written, so each op owns its sections and
files and the job needs no branch per op."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from torch import nn

from carve.masks.mask import ImportanceMap


class Outcome(Protocol):
    importance: ImportanceMap | None  # the scores the op chose by, if it kept any

    def describe(self, model: nn.Module) -> dict[str, Any]:
        """Manifest sections (name -> content) of the op's result on `model`."""
        ...

    def save(self, directory: Path) -> None:
        """The op's own files (e.g. mask.safetensors) into an output being written."""
        ...
