"""The scorer registry: adding a method is one decorated function with its paper beside it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from carve.errors import UsageError
from carve.masks.select import keep_mask

# A statistic is built per Linear from its in_features and fed its inputs: see scorers/stats.py.
StatFactory = Callable[[int, Any], Any]
ScoreFn = Callable[[torch.Tensor, Any], torch.Tensor]
# prune(W[out,in], stat, sparsity, granularity, nm) -> (new W, keep mask, info)
PruneFn = Callable[..., tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]


@dataclass(frozen=True)
class Scorer:
    name: str
    paper: str
    url: str
    score: ScoreFn
    statistic: StatFactory | None  # None: needs no calibration data
    granularity: str  # the comparison group the paper uses
    prune: PruneFn | None = None  # methods that also update the kept weights (OBS)
    # gradient methods: the gradient engine's statistics the score reads (see engines/gradient.py)
    gradient: tuple[str, ...] | None = None
    needs_general: bool = False  # scored with a general importance too (dual)
    # the importance guides a SparseGPT sweep (mask by OBS error + importance, see ops.prune)
    sweep: bool = False
    # another method whose importance maps this one computes (saved maps are interchangeable)
    scores_as: str | None = None

    @property
    def importance_name(self) -> str:
        """The method whose importance this one computes: maps saved by methods with the same
        importance name are interchangeable (dual-obs's scores are fisher's)."""
        return self.scores_as or self.name

    @property
    def kind(self) -> str:
        if self.gradient is not None:
            return "gradient"
        return "weight" if self.statistic is None else "layerwise"

    @property
    def default_mix(self) -> float:
        """Default share of general calibration blocks: 0.3 measured best for SparseGPT
        (bench/RESULTS.md); gradient methods calibrate on the domain only (dual brings its own
        general term)."""
        return 0.0 if self.kind == "gradient" else 0.3

    def prune_weight(
        self, W: torch.Tensor, stat: Any, sparsity: float, granularity: str, nm: tuple[int, int] | None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        if self.prune is not None:
            return self.prune(W, stat, sparsity, granularity, nm)
        keep = keep_mask(self.score(W, stat), sparsity, granularity, nm)
        return W.masked_fill(~keep, 0), keep, {}  # +0.0 where removed (W * keep gives -0.0 for W < 0)


SCORERS: dict[str, Scorer] = {}


def register(
    name: str,
    *,
    paper: str,
    url: str,
    statistic: StatFactory | None = None,
    granularity: str = "row",
    prune: PruneFn | None = None,
    gradient: tuple[str, ...] | None = None,
    needs_general: bool = False,
    sweep: bool = False,
    scores_as: str | None = None,
) -> Callable[[ScoreFn], ScoreFn]:
    def deco(fn: ScoreFn) -> ScoreFn:
        SCORERS[name] = Scorer(
            name, paper, url, fn, statistic, granularity, prune, gradient, needs_general, sweep, scores_as
        )
        return fn

    return deco


def get_scorer(name: str) -> Scorer:
    from carve import scorers  # noqa: F401  - importing the package registers the builtins

    if name not in SCORERS:
        raise UsageError(f"unknown method {name!r}: use one of {', '.join(sorted(SCORERS))}")
    return SCORERS[name]
