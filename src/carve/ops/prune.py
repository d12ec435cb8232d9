"""Scoring and unstructured / N:M pruning of a model's decoder Linear layers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from carve.engines.gradient import STATISTICS, accumulate_gradients
from carve.engines.layerwise import layerwise
from carve.errors import UsageError
from carve.masks.mask import ImportanceMap, Mask, select_mask
from carve.masks.select import GRANULARITIES, check_sparsity, parse_pattern
from carve.models.arch import DEFAULT_EXCLUDE, all_prunable_linears, as_param_layout, weight_matrix
from carve.scorers.gradient import normalized
from carve.scorers.registry import Scorer, get_scorer
from carve.scorers.sparsegpt import factor_of, obs_saliency, sparsegpt_prune, sparsegpt_score
from carve.scorers.stats import Hessian

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
    mask: Mask
    # per-Linear notes from the method, e.g. SparseGPT's damping retries
    info: dict[str, dict[str, Any]] = field(default_factory=dict)
    importance: ImportanceMap | None = None  # the scores the mask was selected from, if any


def _param_name(module_name: str) -> str:
    return f"{module_name}.weight"


def _needs_data(scorer: Scorer, calibration: torch.Tensor | None) -> torch.Tensor | None:
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
    include: tuple[str, ...] = ("*",),
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    batch_size: int = 8,
    general_calibration: torch.Tensor | None = None,
    lam: float = 1.0,
    lr: float = 0.0,
    calib_dtype: torch.dtype | None = None,
) -> ImportanceMap:
    """Importance of every prunable weight under `method`, on the dense model (no pruning).

    Gradient methods run the gradient engine over `calibration` (micro-batches of one block);
    `dual` also needs `general_calibration` (open-domain text) for its general importance, and
    takes `lam` (λ, the weight of general importance) and `lr` (SGD steps while accumulating).
    `calib_dtype` (e.g. bfloat16 for a float32 model): the layer-wise passes' forwards run under
    autocast in it (see carve.engines.layerwise); the gradient engine ignores it."""
    scorer = get_scorer(method)
    data = _needs_data(scorer, calibration)
    scores: dict[str, torch.Tensor] = {}
    linears = all_prunable_linears(model, include, exclude)
    meta: dict[str, Any] = {"scorer": method}
    if data is None:
        for name, lin in linears.items():
            scores[_param_name(name)] = as_param_layout(lin, scorer.score(weight_matrix(lin), None)).cpu()
    elif scorer.gradient is not None:
        wanted = scorer.gradient
        general: dict[str, torch.Tensor] = {}
        if scorer.needs_general:
            _check_general(scorer, general_calibration)
            meta.update(lam=lam, lr=lr)
            if lr > 0:  # the penalty of the refined loss needs Ĝ during the steps
                assert general_calibration is not None
                general = _general_importance(model, general_calibration, include, exclude, batch_size)

        def penalty(name: str, w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
            # gradient of the refined loss's regularizer λ·Σ Ĝ(θ − θ₀)²
            return 2 * lam * general[name].to(w.device) * (w - w0)

        grads = accumulate_gradients(
            model,
            data,
            [_param_name(n) for n in linears],
            {s: STATISTICS[s] for s in wanted},
            lr=lr,
            penalty=penalty if general else None,
            desc=f"gradients ({method})",
        )

        def finish(name: str, lin: nn.Module, general_matrix: torch.Tensor | None) -> None:
            # the statistics are popped as each score is written: memory stays one set of maps
            pname = _param_name(name)
            stats: dict[str, Any] = {s: as_param_layout(lin, grads.stats[s].pop(pname)) for s in wanted}
            if general_matrix is not None:
                stats.update(general=general_matrix, **{"lambda": lam})
            scores[pname] = as_param_layout(lin, scorer.score(weight_matrix(lin), stats)).cpu()

        if scorer.needs_general and not general:
            assert general_calibration is not None
            # Ĝ block by block on open-domain text, folded in as soon as each block's is known

            def combine(_i: int, block_linears: dict[str, nn.Module], hstats: dict[str, Any]) -> None:
                for name, lin in block_linears.items():
                    finish(name, lin, normalized(sparsegpt_score(weight_matrix(lin), hstats[name])))

            layerwise(
                model,
                general_calibration,
                combine,
                Hessian,
                include,
                exclude,
                batch_size,
                "general importance (OBS)",
                propagation="dense",
                calib_dtype=calib_dtype,
            )
        else:
            for name, lin in linears.items():
                g = general.pop(_param_name(name), None)
                finish(name, lin, None if g is None else as_param_layout(lin, g))
    else:

        def on_block(_i: int, block_linears: dict[str, nn.Module], stats: dict[str, Any]) -> None:
            for name, lin in block_linears.items():
                scores[_param_name(name)] = as_param_layout(lin, scorer.score(weight_matrix(lin), stats[name])).cpu()

        label = f"scoring ({method})"
        layerwise(
            model,
            data,
            on_block,
            scorer.statistic,
            include,
            exclude,
            batch_size,
            label,
            propagation="dense",
            calib_dtype=calib_dtype,
        )
    modules = dict(model.named_modules())
    meta["transposed"] = [k for k in scores if not isinstance(modules[k.removesuffix(".weight")], nn.Linear)]
    return ImportanceMap(scores, meta)


def _check_general(scorer: Scorer, general_calibration: torch.Tensor | None) -> None:
    if general_calibration is None or general_calibration.numel() == 0:
        raise UsageError(f"method {scorer.name!r} needs general (open-domain) calibration text")


def _general_importance(
    model: nn.Module,
    general_calibration: torch.Tensor,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Ĝ = G / mean(G) per matrix, G the OBS saliency on open-domain text (param layout)."""
    G = score(model, "sparsegpt", general_calibration, include=include, exclude=exclude, batch_size=batch_size)
    return {k: normalized(v) for k, v in G.items()}


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
    general_calibration: torch.Tensor | None = None,
    lam: float = 1.0,
    lr: float = 0.0,
    importance: ImportanceMap | None = None,
    reconstruct_with: torch.Tensor | None = None,
    calib_dtype: torch.dtype | None = None,
) -> PruneResult:
    """Prune the decoder Linear layers in place.

    Layer-wise methods run block by block.  `propagation="pruned"` (the papers' sequential
    propagation) calibrates each block on the outputs of the already-pruned blocks before it: two
    passes per block.  `"dense"` calibrates every block on the dense model's activations: one
    pass per block, faster, usually a little less accurate.  `"fused"` goes further than
    `"pruned"` in one pass: a single forward of all calibration blocks at once, each Linear pruned
    as its input arrives, so later Linears of the same block see it pruned too (GPTQ's "true
    sequential" order); every matmul runs once, but one block's activations for the whole
    calibration set are held at once.  `calib_dtype` (e.g. bfloat16 for a float32 model) runs the
    calibration forwards under autocast in it; statistics, scoring and pruning stay in float32 and
    the weights in the model's dtype (see carve.engines.layerwise).  `granularity` defaults to the
    method's paper ("row" for Wanda, "matrix" for magnitude and SparseGPT); "global" ranks all
    layers together (scored on the dense model, then pruned at once).

    Score-then-mask methods (gradient methods such as taylor, fisher, dual; any method at global
    granularity) score the dense model, select the mask, then either zero the removed weights or,
    with `reconstruct_with` (calibration blocks, e.g. a domain/general mix), keep that mask and
    update the kept weights by OBS compensation block by block (SparseGPT's update with a fixed
    mask).  Sweep methods (`dual-obs`) score the dense model on `calibration`, then choose the mask
    inside SparseGPT's sweep with Hessians from `reconstruct_with` (default `calibration`), `lam`
    weighing the OBS error against the importance (guided_sparsegpt).  `importance` reuses a saved
    ImportanceMap instead of scoring again."""
    scorer = get_scorer(method)
    nm = parse_pattern(pattern)
    sparsity = check_sparsity(sparsity, nm)
    granularity = granularity or scorer.granularity
    if granularity not in GRANULARITIES:
        raise UsageError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    check_propagation(propagation)
    global_ = granularity == "global" and nm is None
    check_method_options(scorer, global_, reconstruct_with is not None)
    score_first = scores_first(scorer, global_, importance is not None, reconstruct_with is not None)
    data = None if importance is not None else _needs_data(scorer, calibration)
    if score_first:
        if importance is None:
            importance = score(
                model,
                method,
                data,
                include=include,
                exclude=exclude,
                batch_size=batch_size,
                general_calibration=general_calibration,
                lam=lam,
                lr=lr,
                calib_dtype=calib_dtype,
            )
        if scorer.sweep:
            sweep_data = reconstruct_with if reconstruct_with is not None else calibration
            if sweep_data is None:
                raise UsageError(f"method {method!r} needs calibration text for its OBS sweep")
            return guided_sparsegpt(
                model,
                sweep_data,
                importance,
                sparsity,
                pattern=pattern,
                granularity=granularity,
                lam=lam,
                include=include,
                exclude=exclude,
                batch_size=batch_size,
                propagation=propagation,
                calib_dtype=calib_dtype,
            )
        mask = select_mask(importance, sparsity, granularity, pattern)
        if reconstruct_with is None:
            apply_mask(model, mask)
            return PruneResult(mask, importance=importance)
        notes = reconstruct(
            model,
            mask,
            reconstruct_with,
            include=include,
            exclude=exclude,
            batch_size=batch_size,
            propagation=propagation,
            calib_dtype=calib_dtype,
        )
        return PruneResult(mask, notes, importance=importance)

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
            propagation=propagation,
            calib_dtype=calib_dtype,
        )
    if not keep:
        raise UsageError(f"no Linear layers matched include={list(include)} exclude={list(exclude)}")
    return PruneResult(Mask(keep), info)


def reconstruct(
    model: nn.Module,
    mask: Mask,
    calibration: torch.Tensor,
    *,
    include: tuple[str, ...] = ("*",),
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    batch_size: int = 8,
    propagation: str = "pruned",
    calib_dtype: torch.dtype | None = None,
) -> dict[str, dict[str, Any]]:
    """Impose `mask` and update the kept weights by OBS compensation (SparseGPT's column sweep
    with the mask fixed), block by block (`propagation` as in `prune`), Hessians from
    `calibration` (`calib_dtype` as in `prune`).  Returns per-Linear notes (damping retries)."""
    check_propagation(propagation)
    return _obs_sweep(
        model,
        calibration,
        include,
        exclude,
        batch_size,
        lambda pname, lin, W, factor: {
            "keep": as_param_layout(lin, mask[pname]).to(W.device) if pname in mask else None  # back to [out, in]
        },
        propagation=propagation,
        calib_dtype=calib_dtype,
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
    include: tuple[str, ...] = ("*",),
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    batch_size: int = 8,
    propagation: str = "pruned",
    calib_dtype: torch.dtype | None = None,
) -> PruneResult:
    """SparseGPT (Hessians from `calibration`, `propagation` and `calib_dtype` as in `prune`) whose mask is chosen by
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

    label = "pruning (OBS sweep, guided)"
    info = _obs_sweep(model, calibration, include, exclude, batch_size, args, done, label, propagation, calib_dtype)
    if not keep:
        raise UsageError(f"no Linear layers matched include={list(include)} exclude={list(exclude)}")
    return PruneResult(Mask(keep), info, importance=guide)


def _obs_sweep(
    model: nn.Module,
    calibration: torch.Tensor,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    batch_size: int,
    args: Callable[[str, nn.Module, torch.Tensor, Any], dict[str, Any]],
    done: Callable[[str, nn.Module, torch.Tensor], None] | None = None,
    label: str = "reconstructing (OBS)",
    propagation: str = "pruned",
    calib_dtype: torch.dtype | None = None,
) -> dict[str, dict[str, Any]]:
    """SparseGPT's column sweep over every matched Linear, block by block (`propagation` as in
    `prune`); `args(pname, lin, W, factor)` gives each Linear's keyword arguments (a
    fixed `keep`, or a `guide` with sparsity/pattern; `{"keep": None}` leaves the Linear alone);
    `done(pname, lin, keep)` receives each Linear's mask."""
    info: dict[str, dict[str, Any]] = {}

    def on_block(_i: int, linears: dict[str, nn.Module], stats: dict[str, Any]) -> None:
        for name, lin in linears.items():
            pname = _param_name(name)
            W = weight_matrix(lin)
            factor = factor_of(stats[name])
            kw = args(pname, lin, W, factor)
            if "keep" in kw and kw["keep"] is None:
                continue
            kw.setdefault("sparsity", 0.5)
            new, k, notes = sparsegpt_prune(W, stats[name].H, factor=factor, **kw)
            W.copy_(new)
            if done is not None:
                done(pname, lin, k)
            if notes:
                info[pname] = notes

    layerwise(model, calibration, on_block, Hessian, include, exclude, batch_size, label, propagation, calib_dtype)
    return info


def model_sparsity(model: nn.Module, pruned: Mask | Iterable[str]) -> dict[str, float]:
    """Share of zeros over the pruned weights (a mask's parameters, or any parameter names) and
    over all parameters."""
    params = dict(model.named_parameters())
    names = list(pruned)
    pruned_total = sum(params[k].numel() for k in names)
    pruned_zeros = sum(int((params[k] == 0).sum()) for k in names)
    all_total = sum(p.numel() for p in model.parameters())
    all_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return {
        "linear": pruned_zeros / pruned_total if pruned_total else 0.0,
        "all_parameters": all_zeros / all_total if all_total else 0.0,
    }
