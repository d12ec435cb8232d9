"""The importance a pruning method scores (carve.scorers' registry) as an ImportanceMap: the
importance layer's entry point for every extraction method, kept apart from the pruning op.

One function per kind of scorer, each feeding the scorer's pure maths from one engine:
- weight scorers (magnitude): the weights alone;
- activation scorers (wanda, sparsegpt): the layer-wise engine's statistics of each Linear's
  inputs, on the dense model (`propagation="dense"`);
- gradient scorers (taylor, fisher, dual-obs): the gradient engine's per-weight statistics of
  the next-token loss;
- dual (D-Pruner): the general importance Ĝ (SparseGPT's OBS saliency on open-domain text,
  normalized per matrix) first, then the domain gradient statistics, with SGD steps under the
  refined loss's penalty 2λĜ(θ − θ₀) when `lr > 0`.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from carve.engines.activations import SpilledTensors
from carve.engines.gradient import STATISTICS, accumulate_gradients, streamed_gradients
from carve.engines.layerwise import layerwise
from carve.errors import UsageError
from carve.masks.mask import ImportanceMap
from carve.models.anatomy import anatomy
from carve.models.arch import as_param_layout, find_blocks, prunable_linears, weight_matrix
from carve.models.experts import unfused
from carve.ops.plan import UnitImportance, block_unit_importance, unit_importance
from carve.progress import progress
from carve.scorers.gradient import normalized
from carve.scorers.registry import Scorer, get_scorer
from carve.settings import DEFAULT_CALIBRATION, DEFAULT_TARGETS, Calibration, Targets

if TYPE_CHECKING:
    from carve.engines.gradient import BlockSource


def needs_data(scorer: Scorer, calibration: torch.Tensor | None) -> torch.Tensor | None:
    """The calibration blocks a scorer needs (None for weight scorers), or a clear error."""
    if scorer.kind == "weight":
        return None
    if calibration is None or calibration.numel() == 0:
        raise UsageError(f"method {scorer.name!r} needs calibration text")
    return calibration


def score(
    model: nn.Module,
    method: str,
    calibration: torch.Tensor | None = None,
    *,
    targets: Targets = DEFAULT_TARGETS,
    calib: Calibration = DEFAULT_CALIBRATION,
    general_calibration: torch.Tensor | None = None,
    lam: float = 1.0,
    lr: float = 0.0,
) -> ImportanceMap:
    """Importance of every targeted weight under `method`, on the dense model (no pruning).

    `dual` also needs `general_calibration` (open-domain text) and takes `lam` (λ, the weight of
    general importance) and `lr` (SGD steps while accumulating).  `calib.dtype` runs the
    layer-wise passes' forwards under autocast (see carve.engines.layerwise); the gradient engine
    computes in the model's dtype.  An MoE's fused experts are scored as one Linear per expert and
    their scores returned as one tensor per fused parameter (carve.models.experts)."""
    with unfused(model) as experts:  # MoE experts as one Linear each
        imp = _score(model, method, calibration, targets, calib, general_calibration, lam, lr)
    return experts.fold_map(imp)


def _score(
    model: nn.Module,
    method: str,
    calibration: torch.Tensor | None,
    targets: Targets,
    calib: Calibration,
    general_calibration: torch.Tensor | None,
    lam: float,
    lr: float,
) -> ImportanceMap:
    scorer = get_scorer(method)
    data = needs_data(scorer, calibration)
    linears = targets.linears(model)
    meta: dict[str, Any] = {"scorer": method}
    scores: MutableMapping[str, torch.Tensor]
    if data is None and calib.stream is not None:  # each block read, scored, freed; its scores to a file
        scores = SpilledTensors()
        streamed_weight_scores(calib.stream.sk, scorer, targets, lambda _i, block: scores.update(block))
        calib.stream.sk.load_block(0)  # as the pass found it (the streamed activation pass does the same)
    elif data is None:
        scores = weight_scores(scorer, linears)
    elif scorer.needs_general:
        if general_calibration is None or general_calibration.numel() == 0:
            raise UsageError(f"method {scorer.name!r} needs general (open-domain) calibration text")
        general = general_importance(model, general_calibration, targets, calib)
        scores = gradient_scores(model, scorer, linears, data, general=general, lam=lam, lr=lr, calib=calib)
        meta.update(lam=lam, lr=lr)
    elif scorer.gradient is not None:
        scores = gradient_scores(model, scorer, linears, data, calib=calib)
    else:
        scores = activation_scores(model, scorer, data, targets, calib)
    meta["transposed"] = [f"{n}.weight" for n, lin in linears.items() if not isinstance(lin, nn.Linear)]
    return ImportanceMap(scores, meta)


def weight_scores(scorer: Scorer, linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": as_param_layout(lin, scorer.score(weight_matrix(lin), None)).cpu()
            for n, lin in linears.items()}  # fmt: skip


def streamed_weight_scores(
    source: BlockSource, scorer: Scorer, targets: Targets, per_block: Callable[[int, dict[str, torch.Tensor]], None]
) -> None:
    """A weight scorer's scores (magnitude) one decoder block at a time: each block read, its
    targeted Linears scored, the scores handed to `per_block(i, scores)`, the block freed."""
    prefix, _ = find_blocks(source.model)
    for i in progress(range(len(source.blocks)), f"scoring ({scorer.name})"):
        source.load_block(i)
        per_block(i, weight_scores(scorer, prunable_linears(source.blocks[i], f"{prefix}.{i}", targets.include,
                                                            targets.exclude, source.blocks[:i])))  # fmt: skip
        source.free_block(i)


def activation_scores(
    model: nn.Module,
    scorer: Scorer,
    data: torch.Tensor,
    targets: Targets,
    calib: Calibration,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    per_block: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> MutableMapping[str, torch.Tensor]:
    """Scores from each Linear's input statistics, on the dense model's activations (each passed
    through `transform` when given).  Streamed (`calib.stream`): each block read, scored and freed,
    its scores to a temporary file.  With `per_block`, each block's scores go to it instead (the
    map returned stays empty)."""
    scores: MutableMapping[str, torch.Tensor] = {} if calib.stream is None or per_block else SpilledTensors()

    pending: dict[int, dict[str, torch.Tensor]] = {}  # with per_block: scores of a block not yet whole

    def hand_over(before: int | None) -> None:  # the blocks the engine has left (all, with None)
        assert per_block is not None
        for j in [j for j in pending if before is None or j < before]:
            per_block(j, pending.pop(j))

    def on_block(i: int, linears: dict[str, nn.Module], stats: dict[str, Any]) -> None:
        block: dict[str, torch.Tensor] = {}
        for name, lin in linears.items():
            t = as_param_layout(lin, scorer.score(weight_matrix(lin), stats[name])).cpu()
            block[f"{name}.weight"] = t if transform is None else transform(t)
        if per_block is not None:  # a block may come in rounds (carve.engines.layerwise.rounds)
            hand_over(i)
            pending.setdefault(i, {}).update(block)
        else:
            scores.update(block)

    stream = None
    if calib.stream is not None:
        stream = _Visit(calib.stream.sk)
        stream.sk.load_others()
        stream.sk.load_block(0)
    dense = replace(calib, propagation="dense", stream=stream)
    layerwise(model, data, on_block, scorer.statistic, targets, dense, f"scoring ({scorer.name})")
    if per_block is not None:
        hand_over(None)
    if stream is not None:  # as the pass found them: the tensors outside the blocks and block 0 read
        stream.sk.load_others()
        stream.sk.load_block(0)
    return scores


def general_importance(
    model: nn.Module, general: torch.Tensor, targets: Targets, calib: Calibration
) -> MutableMapping[str, torch.Tensor]:
    """Ĝ = G / mean(G) per matrix, G SparseGPT's OBS saliency on open-domain text (D-Pruner's
    general importance), in each parameter's layout."""
    return activation_scores(model, get_scorer("sparsegpt"), general, targets, calib, normalized)


def gradient_scores(
    model: nn.Module,
    scorer: Scorer,
    linears: dict[str, nn.Module],
    data: torch.Tensor,
    *,
    general: MutableMapping[str, torch.Tensor] | None = None,
    lam: float = 1.0,
    lr: float = 0.0,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> MutableMapping[str, torch.Tensor]:
    """Scores from the gradient engine's statistics of the next-token loss on `data`; with
    `general` (dual), each score also gets Ĝ and λ, and steps (`lr > 0`) take the refined loss's
    penalty gradient 2λĜ(θ − θ₀).  Streamed (`calib.stream`): the statistics come block by block
    from the streamed gradient pass and each block's scores go to a temporary file as they come."""
    assert scorer.gradient is not None
    wanted = scorer.gradient
    general = {} if general is None else general
    fns = {s: STATISTICS[s] for s in wanted}
    by_param = {f"{n}.weight": lin for n, lin in linears.items()}

    def score_of(pname: str, grad_stats: dict[str, torch.Tensor]) -> torch.Tensor:
        lin = by_param[pname]
        stats: dict[str, Any] = {s: as_param_layout(lin, grad_stats[s]) for s in wanted}
        if pname in general:  # Ĝ popped as each score is written: memory stays one set of maps
            stats.update(general=as_param_layout(lin, general.pop(pname)), **{"lambda": lam})
        return as_param_layout(lin, scorer.score(weight_matrix(lin), stats)).cpu()

    if calib.stream is not None:
        if lr > 0:
            raise UsageError(f"{scorer.name} with --grad-lr steps the whole model: it does not stream")
        spilled = SpilledTensors()

        def on_block(_i: int, block_stats: dict[str, dict[str, torch.Tensor]]) -> None:
            for pname in sorted(block_stats):
                spilled[pname] = score_of(pname, block_stats[pname])

        streamed_gradients(calib.stream.sk, data, list(by_param), fns, on_block, max_memory=calib.max_memory,
                           desc=f"gradients ({scorer.name})")  # fmt: skip
        return spilled

    def penalty(name: str, w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
        return 2 * lam * general[name].to(w.device) * (w - w0)

    grads = accumulate_gradients(
        model, data, list(by_param), fns, lr=lr, penalty=penalty if general else None,
        desc=f"gradients ({scorer.name})",
    )  # fmt: skip
    # statistics are popped as each score is written: memory stays one set of maps
    return {p: score_of(p, {s: grads.stats[s].pop(p) for s in wanted}) for p in by_param}


class _Visit:
    """The layer-wise engine's stream hooks for a read-only pass: each block read before it is
    calibrated and freed after (nothing written)."""

    def __init__(self, source: BlockSource) -> None:
        self.source = self.sk = source  # `sk`: what the streamed gradient pass reads blocks from

    def captured(self) -> None:
        self.source.free_others()

    def enter(self, i: int) -> None:
        self.source.load_block(i)

    def leave(self, i: int) -> None:
        self.source.free_block(i)


def streamed_unit_importance(
    source: BlockSource,
    method: str,
    calibration: torch.Tensor | None,
    *,
    targets: Targets = DEFAULT_TARGETS,
    calib: Calibration = DEFAULT_CALIBRATION,
    general_calibration: torch.Tensor | None = None,
    lam: float = 1.0,
    lr: float = 0.0,
) -> UnitImportance:
    """`unit_importance` of `score(...)` for a streamed structured extraction: each block scored
    under `method` on the dense model exactly as `score` scores it (the same statistics, in the
    same order), then reduced to its key/value groups' and MLP channels' importance at once, so
    the whole map is never held.  A gradient method's scores (dual's with its general importance,
    also streamed) come from the streamed gradient pass, held in temporary files until reduced."""
    scorer = get_scorer(method)
    anat = anatomy(source.model)
    if scorer.gradient is not None:
        visit = replace(calib, stream=_Visit(source))
        source.load_others()
        spilled = score(source.model, method, calibration, targets=targets, calib=visit,
                        general_calibration=general_calibration, lam=lam, lr=lr)  # fmt: skip
        return UnitImportance(*unit_importance(spilled.scores, anat))
    groups = torch.zeros(len(anat.parts), anat.kv_heads)
    channels = torch.zeros(len(anat.parts), anat.intermediate)

    def reduce(i: int, scores: dict[str, torch.Tensor]) -> None:
        groups[i], channels[i] = block_unit_importance(scores, anat.parts[i], anat)

    data = needs_data(scorer, calibration)
    if data is None:
        streamed_weight_scores(source, scorer, targets, reduce)
    else:
        visit = replace(calib, propagation="dense", stream=_Visit(source))
        activation_scores(source.model, scorer, data, targets, visit, per_block=reduce)
    return UnitImportance(groups, channels)
