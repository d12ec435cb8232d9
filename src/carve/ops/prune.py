"""Unstructured / N:M pruning of a model's decoder Linear layers, from masks chosen by a
method's scores (carve.importance) or inside SparseGPT's OBS sweep.

Kinds of method:
- block-wise (Wanda, SparseGPT, magnitude per row or matrix): each Linear's mask is chosen as
  it is pruned, block by block through the layer-wise engine;
- score-then-mask (gradient methods such as taylor, fisher, dual; any method at global
  granularity; any reused importance map): the dense model is scored, the mask selected, then
  the removed weights zeroed, or with a reconstruction the kept ones updated by OBS compensation
  (SparseGPT's update with the mask fixed);
- sweep (dual-obs): the dense model is scored, then the mask chosen inside SparseGPT's sweep by
  the importance plus λ times the layer's OBS error (guided_sparsegpt).

Calibration (`carve.settings.Calibration`): `propagation="pruned"` (the papers' sequential
propagation) calibrates each block on the outputs of the already-pruned blocks before it: two
passes per block.  `"dense"` calibrates every block on the dense model's activations: one pass
per block, faster, usually a little less accurate.  `"fused"` goes further than `"pruned"` in one
pass: a single forward of all calibration blocks at once, each Linear pruned as its input
arrives, so later Linears of the same block see it pruned too (GPTQ's "true sequential" order);
every matmul runs once, but one block's activations for the whole calibration set are held at
once.  `dtype` (e.g. bfloat16 for a float32 model) runs the calibration forwards under autocast
in it; statistics, scoring and pruning stay in float32 and the weights in the model's dtype (see
carve.engines.layerwise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carve import distributed
from carve.engines.layerwise import layerwise
from carve.errors import UsageError
from carve.importance.scoring import needs_data, score
from carve.masks.mask import ImportanceMap, Mask, PackedKeep, select_mask
from carve.masks.select import GRANULARITIES, check_sparsity, parse_pattern
from carve.models.arch import as_param_layout, count_zeros, find_blocks, prunable_linears, weight_matrix
from carve.models.experts import Unfused, unfused
from carve.progress import progress
from carve.scorers.registry import Scorer, get_scorer
from carve.scorers.sparsegpt import factor_of, obs_saliency, sparsegpt_prune
from carve.scorers.stats import Hessian
from carve.settings import DEFAULT_CALIBRATION, DEFAULT_TARGETS, Calibration, Targets

PROPAGATIONS = ("pruned", "dense", "fused")


def check_propagation(propagation: str) -> None:
    if propagation not in PROPAGATIONS:
        raise UsageError(f"propagation {propagation!r} is not one of {', '.join(PROPAGATIONS)}")


def scores_first(scorer: Scorer, global_: bool, reusing: bool, reconstructing: bool) -> bool:
    """Whether `prune` scores the dense model, then masks (and so returns an ImportanceMap),
    rather than choosing the mask block by block while pruning."""
    return scorer.kind == "gradient" or global_ or reusing or reconstructing


def check_method_options(scorer: Scorer, global_: bool, reconstructing: bool) -> None:
    """Options a method cannot take (checked by `prune` and, before any work, by the recipe)."""
    if global_ and scorer.sweep:
        raise UsageError(f"method {scorer.name!r} chooses its mask in SparseGPT's sweep: use granularity row or matrix")
    if (global_ or reconstructing) and scorer.prune is not None:
        raise UsageError(
            f"method {scorer.name!r} prunes and updates weights block by block: it takes neither global "
            "granularity nor a separate reconstruction"
        )


@dataclass
class PruneResult:
    """The Outcome of unstructured / N:M pruning (see ops.outcome)."""

    mask: Mask
    # per-Linear notes from the method, e.g. SparseGPT's damping retries
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    importance: ImportanceMap | None = None  # the scores the mask was selected from, if any
    sparsity: float | None = None  # the target
    engine_seconds: dict[str, float] | None = None  # the layer-wise engine's parts (block-wise methods)
    # MoE: the fused experts modules pruned expert by expert, and the experts given no calibration token
    experts: dict[str, list[str]] | None = None

    def describe(self, model: nn.Module, zeros: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
        achieved = model_sparsity(model, self.mask, zeros)
        retries = {k: v for k, v in self.info.items() if v.get("damp_retries")}
        return {
            "sparsity": {
                "target": self.sparsity,
                "linear": round(achieved["linear"], 6),
                "all_parameters": round(achieved["all_parameters"], 6),
                "per_module": {k: round(v, 6) for k, v in self.mask.sparsity_per_param().items()},
                "not_pruned_in_blocks": unpruned_block_weights(model, self.mask),
            },
            "method_notes": {
                "hessian_damping_retries": retries,
                # pruned by magnitude: the calibration never reached them
                "without_calibration_input": sorted(k for k, v in self.info.items() if v.get("no_calibration_input")),
            },
            **({"experts": self.experts} if self.experts else {}),
            **({"engine_seconds": self.engine_seconds} if self.engine_seconds else {}),
        }

    def save(self, directory: Path) -> None:
        self.mask.save(directory / "mask.safetensors")


def _uncalibrated(stat: Any) -> dict[str, bool]:
    """The note on a Linear whose statistic saw no input (an MoE expert no token was routed to, a
    Linear whose weight the model reads without calling it: Jamba's dt_proj): it read as the
    identity, so the Linear was pruned by magnitude."""
    return {"no_calibration_input": True} if stat is not None and getattr(stat, "n", None) == 0 else {}


def _param_name(module_name: str) -> str:
    return f"{module_name}.weight"


def apply_mask(model: nn.Module, mask: Mask) -> None:
    """Zero the weights the mask removes (masks are in each parameter's own layout)."""
    with torch.no_grad():
        for pname, keep in mask.items():
            W = model.get_parameter(pname)  # a Linear's weight, or an MoE's fused 3-D experts
            W.masked_fill_(~keep.to(W.device), 0)  # +0.0 (multiplying gives -0.0 for negative weights)


def prune(
    model: nn.Module,
    method: str,
    sparsity: float | None = None,
    calibration: torch.Tensor | None = None,
    *,
    granularity: str | None = None,
    pattern: str | None = None,
    targets: Targets = DEFAULT_TARGETS,
    calib: Calibration = DEFAULT_CALIBRATION,
    general_calibration: torch.Tensor | None = None,
    lam: float = 1.0,
    lr: float = 0.0,
    importance: ImportanceMap | None = None,
    reconstruct_with: torch.Tensor | None = None,
) -> PruneResult:
    """Prune the targeted decoder Linear layers in place (an MoE's fused experts as one Linear per
    expert, carve.models.experts; `calib` and the kinds of method: see the module docstring).
    `granularity` defaults to the method's paper ("row" for Wanda, "matrix" for magnitude and
    SparseGPT); "global" ranks all layers together (scored on the dense model, then pruned at
    once).  `reconstruct_with`: calibration blocks (e.g. a domain/general mix) whose Hessians update
    the kept weights of a score-then-mask method by OBS compensation, or feed a sweep method's sweep
    (default `calibration`); `lam` weighs a sweep's OBS error against the importance; `importance`
    reuses a saved ImportanceMap; `general_calibration`, `lam` and `lr` are dual's
    (carve.importance.score)."""
    with unfused(model) as experts:  # MoE experts as one Linear each
        result = _prune(
            model, method, sparsity, calibration, granularity, pattern, targets, calib, general_calibration, lam, lr,
            None if importance is None else experts.unfold_map(importance), reconstruct_with,
        )  # fmt: skip
    return _folded(result, experts)


def _folded(result: PruneResult, experts: Unfused) -> PruneResult:
    """`result` keyed by the model's own parameters: a fused experts tensor's per-expert masks and
    scores as one (nothing changes without MoE experts)."""
    if not experts.modules:
        return result
    result.mask = experts.fold_mask(result.mask)
    result.importance = None if result.importance is None else experts.fold_map(result.importance)
    result.experts = {"unfused": sorted(experts.modules), "without_calibration_tokens": experts.unrouted()}
    return result


def _prune(
    model: nn.Module,
    method: str,
    sparsity: float | None,
    calibration: torch.Tensor | None,
    granularity: str | None,
    pattern: str | None,
    targets: Targets,
    calib: Calibration,
    general_calibration: torch.Tensor | None,
    lam: float,
    lr: float,
    importance: ImportanceMap | None,
    reconstruct_with: torch.Tensor | None,
) -> PruneResult:
    scorer = get_scorer(method)
    nm = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity, nm)
    granularity = granularity or scorer.granularity
    if granularity not in GRANULARITIES:
        raise UsageError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    check_propagation(calib.propagation)
    global_ = granularity == "global" and nm is None
    check_method_options(scorer, global_, reconstruct_with is not None)
    if not scores_first(scorer, global_, importance is not None, reconstruct_with is not None):
        data = needs_data(scorer, calibration)
        return _prune_blockwise(model, scorer, sparsity, granularity, nm, data, targets, calib)
    if importance is None:
        importance = score(
            model, method, calibration, targets=targets, calib=calib,
            general_calibration=general_calibration, lam=lam, lr=lr,
        )  # fmt: skip
    if calib.stream is not None and not scorer.sweep:  # streamed: the model's blocks are read one at a time
        return _mask_streamed(model, importance, sparsity, granularity, pattern, reconstruct_with, targets, calib)
    if scorer.sweep:
        sweep_data = reconstruct_with if reconstruct_with is not None else calibration
        if sweep_data is None:
            raise UsageError(f"method {method!r} needs calibration text for its OBS sweep")
        return guided_sparsegpt(
            model, sweep_data, importance, sparsity, pattern=pattern, granularity=granularity, lam=lam,
            targets=targets, calib=calib,
        )  # fmt: skip
    mask = select_mask(importance, sparsity, granularity, pattern)
    if reconstruct_with is None:
        apply_mask(model, mask)
        return PruneResult(mask, importance=importance, sparsity=sparsity)
    notes, seconds = _reconstruct(model, mask, reconstruct_with, targets, calib)
    return PruneResult(mask, notes, importance=importance, sparsity=sparsity, engine_seconds=seconds)


def _mask_streamed(
    model: nn.Module,
    importance: ImportanceMap,
    sparsity: float,
    granularity: str,
    pattern: str | None,
    reconstruct_with: torch.Tensor | None,
    targets: Targets,
    calib: Calibration,
) -> PruneResult:
    """Score-then-mask on a streamed model (per row or matrix): each matrix's mask chosen from its
    scores (read back from their temporary file) and kept bit-packed, then imposed block by block
    as each is read, or with a reconstruction through the streamed OBS sweep."""
    mask = select_mask(importance, sparsity, granularity, pattern, packed=True)
    if reconstruct_with is not None:
        notes, seconds = _reconstruct(model, mask, reconstruct_with, targets, calib)
        return PruneResult(mask, notes, importance=importance, sparsity=sparsity, engine_seconds=seconds)

    def impose(linears: dict[str, nn.Module]) -> None:
        apply_mask(model, Mask({_param_name(n): mask[_param_name(n)] for n in linears}))

    _each_block_streamed(model, targets, calib.stream, "pruning (mask)", impose)
    return PruneResult(mask, importance=importance, sparsity=sparsity)


def _each_block_streamed(
    model: nn.Module, targets: Targets, stream: Any, desc: str, fn: Callable[[dict[str, nn.Module]], None]
) -> None:
    """`fn(targeted linears)` on each decoder block in turn, the block read before and written and
    freed after (`stream.enter` / `stream.leave`), without calibration data."""
    prefix, blocks = find_blocks(model)
    with torch.no_grad():
        for i in progress(range(len(blocks)), desc, total=len(blocks)):
            stream.enter(i)
            fn(prunable_linears(blocks[i], f"{prefix}.{i}", targets.include, targets.exclude, blocks[:i]))
            stream.leave(i)


def _prune_blockwise(
    model: nn.Module,
    scorer: Scorer,
    sparsity: float,
    granularity: str,
    nm: tuple[int, int] | None,
    data: torch.Tensor | None,
    targets: Targets,
    calib: Calibration,
) -> PruneResult:
    """Methods that choose each Linear's mask as they prune it (Wanda, SparseGPT, magnitude per
    row or matrix), block by block through the layer-wise engine (no data: at once)."""
    # each Linear's mask bit-packed as it comes: an eighth of a bool per weight (101 MB -> 13 MB on
    # the embedded default; a streamed large model's would not fit its budget otherwise)
    keep: MutableMapping[str, torch.Tensor] = PackedKeep()
    info: dict[str, dict[str, Any]] = {}

    def prune_one(name: str, lin: nn.Module, stats: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        W = weight_matrix(lin)
        new, k, notes = scorer.prune_weight(W, stats.get(name), sparsity, granularity, nm)
        W.copy_(new)
        return k, {**notes, **_uncalibrated(stats.get(name))}

    def record(name: str, lin: nn.Module, k: torch.Tensor, notes: dict[str, Any]) -> None:
        keep[_param_name(name)] = as_param_layout(lin, k).cpu()
        if notes:
            info[_param_name(name)] = notes

    def prune_linears(linears: dict[str, nn.Module], stats: dict[str, Any]) -> None:
        _spread(linears, lambda name, lin: prune_one(name, lin, stats), record)

    if data is None and calib.stream is not None:  # streamed: block by block, each read, pruned, written
        _each_block_streamed(model, targets, calib.stream, f"pruning ({scorer.name})", lambda ls: prune_linears(ls, {}))
    elif data is None:
        with torch.no_grad():
            prune_linears(targets.linears(model), {})
    else:
        on_block = lambda _i, linears, stats: prune_linears(linears, stats)  # noqa: E731
        seconds = layerwise(model, data, on_block, scorer.statistic, targets, calib, f"pruning ({scorer.name})")
        return PruneResult(_matched(keep, targets), info, sparsity=sparsity, engine_seconds=seconds)
    return PruneResult(_matched(keep, targets), info, sparsity=sparsity)


def reconstruct(
    model: nn.Module,
    mask: Mask,
    calibration: torch.Tensor,
    *,
    targets: Targets = DEFAULT_TARGETS,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> dict[str, dict[str, Any]]:
    """Impose `mask` and update the kept weights by OBS compensation (SparseGPT's column sweep
    with the mask fixed), block by block (`calib` as in `prune`), Hessians from `calibration`.
    Returns per-Linear notes (damping retries)."""
    return _reconstruct(model, mask, calibration, targets, calib)[0]


def _reconstruct(
    model: nn.Module, mask: Mask, calibration: torch.Tensor, targets: Targets, calib: Calibration
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """`reconstruct`, with the engine's parts."""
    check_propagation(calib.propagation)
    return _obs_sweep(
        model,
        calibration,
        targets,
        calib,
        lambda pname, lin, W, factor: {
            "keep": as_param_layout(lin, mask[pname]).to(W.device) if pname in mask else None  # back to [out, in]
        },
    )


def guided_sparsegpt(
    model: nn.Module,
    calibration: torch.Tensor,
    guide: ImportanceMap,
    sparsity: float | None = None,
    *,
    pattern: str | None = None,
    granularity: str = "matrix",
    lam: float = 1.0,
    targets: Targets = DEFAULT_TARGETS,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> PruneResult:
    """SparseGPT (Hessians from `calibration`, `calib` as in `prune`) whose mask is chosen by
    the weight's end-to-end error plus λ times its layer OBS error: w²·(a/U_jj² + C), where
    C = I/θ₀² comes from an importance I = C·θ₀² of the dense weights θ₀ (for `fisher`/`dual-obs`,
    C = ½·E[g²]) and a = λ · mean(I) / mean(θ₀²/U_jj²) per matrix, so that λ = 1 gives both terms
    the same mean at the start of the sweep.  Weights the importance map lacks are left alone."""
    nm = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity, nm)
    keep: dict[str, torch.Tensor] = {}

    def args(pname: str, lin: nn.Module, W: torch.Tensor, factor: Any) -> dict[str, Any]:
        if pname not in guide:
            return {"keep": None}
        W0 = W.detach().float()
        imp = as_param_layout(lin, guide[pname]).to(W0.device).float()
        curvature = torch.where(W0 != 0, imp / W0.square().clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        obs0 = obs_saliency(W0, torch.diag(factor[0])).mean().item()
        signal = imp.mean().item()
        # no end-to-end signal (all-zero importance): plain SparseGPT
        a = lam * signal / obs0 if signal > 0 and obs0 > 0 else 1.0
        return {"guide": curvature, "obs_weight": a, "sparsity": sparsity, "granularity": granularity, "nm": nm}

    def done(pname: str, lin: nn.Module, k: torch.Tensor) -> None:
        keep[pname] = as_param_layout(lin, k).cpu()

    info, seconds = _obs_sweep(model, calibration, targets, calib, args, done, "pruning (OBS sweep, guided)")
    return PruneResult(_matched(keep, targets), info, importance=guide, sparsity=sparsity, engine_seconds=seconds)


def _matched(keep: MutableMapping[str, torch.Tensor], targets: Targets) -> Mask:
    if not keep:
        raise UsageError(f"no Linear layers matched include={list(targets.include)} exclude={list(targets.exclude)}")
    return Mask(keep)


def _obs_sweep(
    model: nn.Module,
    calibration: torch.Tensor,
    targets: Targets,
    calib: Calibration,
    args: Callable[[str, nn.Module, torch.Tensor, Any], dict[str, Any]],
    done: Callable[[str, nn.Module, torch.Tensor], None] | None = None,
    label: str = "reconstructing (OBS)",
) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """SparseGPT's column sweep over every targeted Linear, block by block (`calib` as in
    `prune`); `args(pname, lin, W, factor)` gives each Linear's keyword arguments (a
    fixed `keep`, or a `guide` with sparsity/pattern; `{"keep": None}` leaves the Linear alone);
    `done(pname, lin, keep)` receives each Linear's mask.  Returns per-Linear notes and the
    engine's parts (carve.engines.layerwise.layerwise)."""
    info: dict[str, dict[str, Any]] = {}

    def sweep_one(name: str, lin: nn.Module, stats: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]] | None:
        W = weight_matrix(lin)
        factor = factor_of(stats[name])
        kw = args(_param_name(name), lin, W, factor)
        if "keep" in kw and kw["keep"] is None:
            return None
        kw.setdefault("sparsity", 0.5)
        new, k, notes = sparsegpt_prune(W, stats[name].H, factor=factor, **kw)
        W.copy_(new)
        return k, {**notes, **_uncalibrated(stats[name])}

    def record(name: str, lin: nn.Module, k: torch.Tensor, notes: dict[str, Any]) -> None:
        if done is not None:
            done(_param_name(name), lin, k)
        if notes:
            info[_param_name(name)] = notes

    def on_block(_i: int, linears: dict[str, nn.Module], stats: dict[str, Any]) -> None:
        _spread(linears, lambda name, lin: sweep_one(name, lin, stats), record)

    seconds = layerwise(model, calibration, on_block, Hessian, targets, calib, label)
    return info, seconds


Result = tuple[torch.Tensor, dict[str, Any]]  # a Linear's [out, in] keep mask and its method notes


def _spread(
    linears: dict[str, nn.Module],
    work: Callable[[str, nn.Module], Result | None],
    record: Callable[[str, nn.Module, torch.Tensor, dict[str, Any]], None],
) -> None:
    """`work(name, lin)` for each Linear of a block (it prunes the weight in place and returns the
    mask and notes, or None to leave the Linear alone), then `record` of each result in name order.

    Under torch.distributed each Linear is worked on by one rank (carve.distributed.owners: cost
    out·in², SparseGPT's sweep) and its weight, mask and notes are broadcast from that rank, so the
    sweeps are shared out and every rank ends the block with the same bits.  One process: every
    Linear here, nothing sent."""
    owner = distributed.owners(
        {n: float(weight_matrix(lin).shape[0]) * float(weight_matrix(lin).shape[1]) ** 2 for n, lin in linears.items()}
    )
    mine = {name: work(name, lin) for name, lin in sorted(linears.items()) if owner[name] == distributed.rank()}
    for name in sorted(linears):
        lin, src = linears[name], owner[name]
        result = mine.get(name)
        if distributed.active():
            sent = distributed.broadcast_json(None if result is None else {"notes": result[1]}, src)
            if sent is not None:
                weight = lin.get_parameter("weight").data
                # an MoE expert's weight in an [E, in, out] tensor is a transposed view: sent contiguous
                sent_w = weight if weight.is_contiguous() else weight.contiguous()
                distributed.broadcast_(sent_w, src)
                if sent_w is not weight:
                    weight.copy_(sent_w)
                shape, device = weight_matrix(lin).shape, weight.device
                k = torch.empty(shape, dtype=torch.bool, device=device) if result is None else result[0].to(device)
                k = k.contiguous()
                result = (distributed.broadcast_(k, src), sent["notes"])
        if result is not None:
            record(name, lin, *result)


def unpruned_block_weights(model: nn.Module, pruned: Iterable[str]) -> dict[str, float]:
    """The decoder blocks' weight matrices (2-D and up) left dense, by name with the block index as
    `*`, each as its share of the blocks' parameters: those the targets leave out, and those carve
    cannot prune, not being Linear layers (an MoE's router; its experts' biases, stacked [E, out],
    are not matrices)."""
    prefix, blocks = find_blocks(model)
    kept, total = set(pruned), 0
    out: dict[str, float] = {}
    for i, block in enumerate(blocks):
        for name, p in block.named_parameters():
            total += p.numel()
            if p.dim() >= 2 and not name.endswith("bias") and f"{prefix}.{i}.{name}" not in kept:
                key = f"{prefix}.*.{name}"
                out[key] = out.get(key, 0) + p.numel()
    return {k: round(n / total, 4) for k, n in out.items()} if total else {}


def model_sparsity(
    model: nn.Module, pruned: Mask | Iterable[str], zeros: dict[str, tuple[int, int]] | None = None
) -> dict[str, float]:
    """Share of zeros over the pruned weights (a mask's parameters, or any parameter names) and
    over all parameters; `zeros` (parameter -> (zeros, entries)) when the weights were counted as
    they were written (a streamed extraction's, no longer in memory)."""
    if zeros is None:
        zeros = {k: (count_zeros(p), p.numel()) for k, p in model.named_parameters()}
    names = list(pruned)
    pruned_total = sum(zeros[k][1] for k in names)
    pruned_zeros = sum(zeros[k][0] for k in names)
    all_total = sum(n for _, n in zeros.values())
    all_zeros = sum(z for z, _ in zeros.values())
    return {
        "linear": pruned_zeros / pruned_total if pruned_total else 0.0,
        "all_parameters": all_zeros / all_total if all_total else 0.0,
    }
