"""Scoring and unstructured / N:M pruning of a model's decoder Linear layers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from carve.engines.layerwise import layerwise
from carve.errors import UsageError
from carve.masks.mask import ImportanceMap, Mask, select_mask
from carve.masks.select import GRANULARITIES, check_sparsity, parse_pattern
from carve.models.arch import DEFAULT_EXCLUDE, all_prunable_linears, as_param_layout, weight_matrix
from carve.scorers.registry import Scorer, get_scorer

PROPAGATIONS = ("pruned", "dense")


@dataclass
class PruneResult:
    mask: Mask
    # per-Linear notes from the method, e.g. SparseGPT's damping retries
    info: dict[str, dict[str, Any]] = field(default_factory=dict)


def _param_name(module_name: str) -> str:
    return f"{module_name}.weight"


def _needs_data(scorer: Scorer, calibration: torch.Tensor | None) -> torch.Tensor | None:
    if scorer.statistic is None:
        return None
    if calibration is None or calibration.numel() == 0:
        raise UsageError(f"method {scorer.name!r} needs calibration text")
    return calibration


def score(
    model: nn.Module,
    method: str,
    calibration: torch.Tensor | None = None,
    *,
    include: tuple[str, ...] = ("*",),
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    batch_size: int = 8,
) -> ImportanceMap:
    """Importance of every prunable weight under `method`, on the dense model (no pruning)."""
    scorer = get_scorer(method)
    data = _needs_data(scorer, calibration)
    scores: dict[str, torch.Tensor] = {}
    if data is None:
        for name, lin in all_prunable_linears(model, include, exclude).items():
            scores[_param_name(name)] = as_param_layout(lin, scorer.score(weight_matrix(lin), None)).cpu()
    else:

        def on_block(_i: int, linears: dict[str, nn.Module], stats: dict[str, Any]) -> None:
            for name, lin in linears.items():
                scores[_param_name(name)] = as_param_layout(lin, scorer.score(weight_matrix(lin), stats[name])).cpu()

        layerwise(
            model, data, on_block, scorer.statistic, include, exclude, batch_size, f"scoring ({method})", rerun=False
        )
    modules = dict(model.named_modules())
    transposed = [k for k in scores if not isinstance(modules[k.removesuffix(".weight")], nn.Linear)]
    return ImportanceMap(scores, {"scorer": method, "transposed": transposed})


def apply_mask(model: nn.Module, mask: Mask) -> None:
    """Zero the weights the mask removes (masks are in each parameter's own layout)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for pname, keep in mask.items():
            W = modules[pname.removesuffix(".weight")].weight
            W.mul_(keep.to(W.device, W.dtype))


def prune(
    model: nn.Module,
    method: str,
    sparsity: float | None = None,
    calibration: torch.Tensor | None = None,
    *,
    granularity: str | None = None,
    pattern: str | None = None,
    include: tuple[str, ...] = ("*",),
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    batch_size: int = 8,
    propagation: str = "pruned",
) -> PruneResult:
    """Prune the decoder Linear layers in place.

    Layer-wise methods run block by block.  `propagation="pruned"` (the papers' sequential
    propagation) calibrates each block on the outputs of the already-pruned blocks before it: two
    passes per block.  `"dense"` calibrates every block on the dense model's activations: one
    pass per block, faster, usually a little less accurate.  `granularity` defaults to the
    method's paper ("row" for Wanda, "matrix" for magnitude and SparseGPT); "global" ranks all
    layers together (scored on the dense model, then pruned at once)."""
    scorer = get_scorer(method)
    nm = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity, nm)
    granularity = granularity or scorer.granularity
    if granularity not in GRANULARITIES:
        raise UsageError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    if propagation not in PROPAGATIONS:
        raise UsageError(f"propagation {propagation!r} is not one of {', '.join(PROPAGATIONS)}")
    data = _needs_data(scorer, calibration)
    if granularity == "global" and nm is None:
        if scorer.prune is not None:
            raise UsageError(f"method {method!r} prunes block by block; use granularity row or matrix")
        mask = select_mask(
            score(model, method, data, include=include, exclude=exclude, batch_size=batch_size),
            sparsity,
            "global",
        )
        apply_mask(model, mask)
        return PruneResult(mask)

    keep: dict[str, torch.Tensor] = {}
    info: dict[str, dict[str, Any]] = {}

    def prune_linears(linears: dict[str, nn.Module], stats: dict[str, Any]) -> None:
        for name, lin in linears.items():
            W = weight_matrix(lin)
            new, k, notes = scorer.prune_weight(W, stats.get(name), sparsity, granularity, nm)
            W.copy_(new)
            keep[_param_name(name)] = as_param_layout(lin, k).cpu()
            if notes:
                info[_param_name(name)] = notes

    if data is None:
        with torch.no_grad():
            prune_linears(all_prunable_linears(model, include, exclude), {})
    else:
        layerwise(
            model,
            data,
            lambda _i, linears, stats: prune_linears(linears, stats),
            scorer.statistic,
            include,
            exclude,
            batch_size,
            f"pruning ({method})",
            rerun=propagation == "pruned",
        )
    if not keep:
        raise UsageError(f"no Linear layers matched include={list(include)} exclude={list(exclude)}")
    return PruneResult(Mask(keep), info)


def model_sparsity(model: nn.Module, mask: Mask) -> dict[str, float]:
    """Share of zeros over the pruned Linear weights and over all parameters."""
    params = dict(model.named_parameters())
    pruned_total = sum(params[k].numel() for k in mask)
    pruned_zeros = sum(int((params[k] == 0).sum()) for k in mask)
    all_total = sum(p.numel() for p in model.parameters())
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return {
        "linear": pruned_zeros / pruned_total if pruned_total else 0.0,
        "all_parameters": all_zeros / all_total if all_total else 0.0,
    }
