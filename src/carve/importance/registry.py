"""Importance sources: registered functions that turn a model (and, for some, data or a
reference model) into an ImportanceMap over the targeted Linear weights.

A source is one decorated function `fn(model, linears, data, **params) -> {param name: scores}`
(scores in the parameter's own layout, float32, on the CPU), with its paper beside it.  The
registry builds the ImportanceMap and its metadata (source, parameters, transposed weights);
masks are then selected from maps (carve.masks.select_mask) and consumed by ops (prune, train,
merge).  Every source owns its dtype (scores are float32 whatever the model's) and batching.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from carve.errors import UsageError
from carve.masks.mask import ImportanceMap
from carve.settings import DEFAULT_TARGETS, Targets

SourceFn = Callable[..., dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Source:
    name: str
    paper: str
    url: str
    fn: SourceFn
    needs: tuple[str, ...]  # what `compute_importance` must be given: "data", "reference"


SOURCES: dict[str, Source] = {}


def importance_source(
    name: str, *, paper: str = "", url: str = "", needs: tuple[str, ...] = (), scorer: str | None = None
) -> Callable[[SourceFn], SourceFn]:
    """Register `fn` as the importance source `name`; `scorer`: a pruning scorer whose maths the
    source shares, and so its paper and URL (one citation, one place)."""
    if scorer is not None:
        from carve.scorers import get_scorer

        paper, url = get_scorer(scorer).paper, get_scorer(scorer).url

    def deco(fn: SourceFn) -> SourceFn:
        SOURCES[name] = Source(name, paper, url, fn, needs)
        return fn

    return deco


def get_source(name: str) -> Source:
    from carve import importance  # noqa: F401  - importing the package registers the builtins

    if name not in SOURCES:
        raise UsageError(f"unknown importance source {name!r}: use one of {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def compute_importance(
    name: str,
    model: nn.Module,
    targets: Targets = DEFAULT_TARGETS,
    *,
    data: torch.Tensor | None = None,
    reference: nn.Module | Mapping[str, torch.Tensor] | None = None,
    **params: Any,
) -> ImportanceMap:
    """The importance map of source `name` over `targets`' Linear weights of `model`.  An MoE's
    fused experts are scored as one Linear per expert and come back as one tensor per fused
    parameter (carve.models.experts), a reference model's read as the same per-expert slices."""
    from carve.models.experts import unfused

    source = get_source(name)
    given = {"data": data is not None and data.numel() > 0, "reference": reference is not None}
    missing = [n for n in source.needs if not given[n]]
    if missing:
        raise UsageError(f"importance source {name!r} needs {' and '.join(missing)}")
    accepts = inspect.signature(source.fn).parameters
    extra: dict[str, Any] = {}
    if "targets" in accepts:  # sources that run an engine over the targeted modules themselves
        extra["targets"] = targets
    for key, value in (("data", data), ("reference", reference)):
        if value is not None:
            if key not in accepts:
                raise UsageError(f"importance source {name!r} takes no {key}")
            extra[key] = value
    with unfused(model) as experts:
        linears = targets.linears(model)
        if reference is not None and experts.modules:  # read per expert, as the job's Linears are named
            extra["reference"] = experts.reference(reference)
        scores = source.fn(model, linears, **extra, **params)
    transposed = [f"{n}.weight" for n, lin in linears.items() if not isinstance(lin, nn.Linear)]
    plain = {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool, type(None)))}
    meta = {"scorer": name, "source": name, "params": plain, "transposed": transposed}
    return experts.fold_map(ImportanceMap(scores, meta))
