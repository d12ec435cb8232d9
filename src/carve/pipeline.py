"""The main job as a short script of named steps: load → data → evaluate → prune → evaluate → save."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from carve.corpora import Corpus
from carve.engines.layerwise import check_calib_dtype
from carve.errors import UsageError
from carve.evaluation.speed import measure_speed, speedup
from carve.job import (  # noqa: F401  - the shared job skeleton (re-exported for callers of the pipeline)
    EvalData,
    Stages,
    calibration_data,
    evaluate,
    evaluate_source,
    held_out_data,
    manifest_head,
    metrics_of,
    peak_rss_mb,
    save_model_files,
    tensor_fingerprint,
    versions,
)
from carve.masks.mask import ImportanceMap
from carve.masks.select import check_sparsity, parse_pattern
from carve.models import LoadedModel, load_model
from carve.models.arch import DEFAULT_EXCLUDE, all_prunable_linears, count_parameters
from carve.models.load import check_calib_choice, resolve_calib_dtype
from carve.ops import model_sparsity, prune
from carve.ops.plan import DEFAULT_DROP_RULE, check_drop_rule
from carve.ops.prune import check_method_options, check_propagation, scores_first
from carve.ops.structure import structure
from carve.output import atomic_file, atomic_output_dir, check_output, write_json
from carve.scorers import SCORERS, get_scorer

SWEEP_MIX = 0.3  # dual-obs: share of general blocks in its sweep's Hessians (as SparseGPT's default mix)
# extract's default method: measured best in bench/RESULTS.md (dual section); wanda for --structure
DEFAULT_METHOD, DEFAULT_STRUCTURE_METHOD = "dual-obs", "wanda"


@dataclass
class Recipe:
    """Everything that decides an extraction; stored in the manifest, one field per CLI flag."""

    model: str | None = None
    domain: str = "legal"
    general: str = "general"
    method: str | None = None  # None: DEFAULT_METHOD, or DEFAULT_STRUCTURE_METHOD with --structure
    sparsity: float | None = None  # None: 0.5, or what the N:M pattern implies
    pattern: str | None = None
    granularity: str | None = None  # None: the method's paper
    mix: float | None = None  # share of calibration blocks from the general corpus (None: the method's)
    propagation: str = "pruned"  # "pruned" (sequential, the papers'), "dense" (one pass per block) or "fused"
    # dtype of the calibration forwards ("auto": bfloat16 for a float32 model where the device
    # multiplies bfloat16 natively, else the model's)
    calib_dtype: str = "auto"
    lam: float = 1.0  # dual: weight of general importance
    lr: float = 0.0  # gradient methods: SGD steps while accumulating (0: none)
    # score-then-mask: OBS reconstruction, this share general; dual-obs: its sweep's Hessian mix (0.3)
    reconstruct_mix: float | None = None
    importance: str | None = None  # importance.safetensors to reuse
    structure: bool = False  # remove whole channels / heads / blocks (a smaller dense model)
    keep: float | None = None  # structure: share of decoder-block parameters kept (None: 0.5)
    mlp_keep: float | None = None  # structure: share of MLP channels kept in every block
    heads_keep: float | None = None  # structure: share of key/value head groups kept
    drop_blocks: int | None = None  # structure: number of decoder blocks removed
    drop_rule: str | None = None  # structure: which blocks go, "distance" (the default) or "greedy"
    bias_compensation: bool = False  # structure: removed units' mean contribution kept as a bias (FLAP)
    speed: bool = True  # measure prefill / decode tokens/s of the dense and the extracted model
    calib_blocks: int = 64
    block_len: int = 512
    eval_blocks: int = 32
    cloze_items: int = 100  # held-out domain cloze items evaluated (0: none)
    seed: int = 0
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    text_field: str = "text"
    dtype: str | None = None
    device: str | None = None
    batch_size: int = 8

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """A YAML or JSON recipe, or the `recipe` of a carve.json manifest (to reproduce a run)."""
        import yaml

        p = Path(path).expanduser()
        if not p.is_file():
            raise UsageError(f"recipe file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise UsageError(f"recipe file {str(path)!r} is not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
        if isinstance(data, dict) and isinstance(data.get("recipe"), dict):
            data = data["recipe"]
        if not isinstance(data, dict):
            raise UsageError(f"recipe file {str(path)!r} must hold a mapping of recipe fields")
        data = {str(k).replace("-", "_"): v for k, v in data.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"recipe file {str(path)!r} has unknown fields {unknown}; known: {sorted(known)}")
        return cls(**data)

    def validate(self) -> None:
        targets = (self.keep, self.mlp_keep, self.heads_keep, self.drop_blocks)
        if any(t is not None for t in targets) or self.bias_compensation or self.drop_rule is not None:
            self.structure = True
        if self.structure:
            self._validate_structure()
        self.method = self.method or (DEFAULT_STRUCTURE_METHOD if self.structure else DEFAULT_METHOD)
        scorer = get_scorer(self.method)
        if self.reconstruct_mix is not None and scorer.prune is not None:
            raise UsageError(f"--reconstruct is for score-then-mask methods; {self.method} already updates the weights")
        if not self.structure:
            check_method_options(scorer, self.granularity == "global" and self.pattern is None, False)
            if scorer.sweep and self.reconstruct_mix is None:
                self.reconstruct_mix = SWEEP_MIX
            nm = parse_pattern(self.pattern)
            if self.sparsity is None and nm is None:
                self.sparsity = 0.5
            self.sparsity = check_sparsity(self.sparsity, nm)
        check_propagation(self.propagation)
        check_calib_choice(self.calib_dtype)
        if self.reconstruct_mix is not None and not 0 <= self.reconstruct_mix <= 1:
            raise UsageError(f"reconstruct mix {self.reconstruct_mix} is outside [0, 1]")
        if self.lam < 0 or self.lr < 0:
            raise UsageError("lambda and grad-lr must not be negative")
        if self.importance is not None and not Path(self.importance).expanduser().is_file():
            raise UsageError(f"importance file {self.importance!r} does not exist")
        if self.mix is None:
            self.mix = scorer.default_mix
        if not 0 <= self.mix <= 1:
            raise UsageError(f"mix {self.mix} is outside [0, 1]: it is the share of general calibration blocks")
        for name in ("calib_blocks", "block_len", "eval_blocks", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be a positive whole number, not {getattr(self, name)}")

    def _validate_structure(self) -> None:
        unstructured = {
            "sparsity": self.sparsity,
            "pattern": self.pattern,
            "granularity": self.granularity,
            "reconstruct": self.reconstruct_mix,
            "propagation": None if self.propagation == "pruned" else self.propagation,
            "calib-dtype": None if self.calib_dtype == "auto" else self.calib_dtype,
            # every block keeps the same units (a standard config), so no module can be left out
            "include": None if list(self.include) == ["*"] else self.include,
            "exclude": None if list(self.exclude) == list(DEFAULT_EXCLUDE) else self.exclude,
        }
        given = [f"--{k}" for k, v in unstructured.items() if v is not None]
        if given:
            raise UsageError(f"--structure removes whole channels, heads and blocks: {', '.join(given)} do not apply")
        if all(t is None for t in (self.keep, self.mlp_keep, self.heads_keep, self.drop_blocks)):
            self.keep = 0.5
        self.drop_rule = check_drop_rule(self.drop_rule or DEFAULT_DROP_RULE)


def _importance_key(
    recipe: Recipe, model_fingerprint: str, calib: torch.Tensor, general_calib: torch.Tensor | None
) -> dict[str, Any]:
    """What an importance map depends on: reusing one needs all of it to match."""
    data = hashlib.sha256(tensor_fingerprint(calib).encode())
    if general_calib is not None:
        data.update(tensor_fingerprint(general_calib).encode())
    lam = recipe.lam if get_scorer(recipe.method or DEFAULT_METHOD).needs_general else None  # only dual's use λ
    data.update(json.dumps([lam, recipe.lr, recipe.include, recipe.exclude]).encode())
    return {"scorer": recipe.method, "model_fingerprint": model_fingerprint, "data_fingerprint": data.hexdigest()[:16]}


def _importance_name(method: Any) -> Any:
    return get_scorer(method).importance_name if method in SCORERS else method


def _load_importance(path: str, key: dict[str, Any]) -> ImportanceMap:
    try:
        imp = ImportanceMap.load(Path(path).expanduser())
    except Exception as exc:
        raise UsageError(f"importance file {path!r} is not a carve importance map ({exc})") from None
    what = {"scorer": "method", "model_fingerprint": "model", "data_fingerprint": "calibration data and settings"}
    for field_name, label in what.items():
        saved, wanted = imp.meta.get(field_name), key[field_name]
        if field_name == "scorer":  # methods that compute the same importance share maps
            saved, wanted = _importance_name(saved), _importance_name(wanted)
        if saved != wanted:
            raise UsageError(
                f"importance file {path!r} was computed with another {label} "
                f"({imp.meta.get(field_name)} != {key[field_name]}); rerun without --importance"
            )
    return imp


def _scores_first(recipe: Recipe) -> bool:
    """Whether the extract scores the dense model first (and so has an importance map)."""
    global_ = (recipe.granularity or "") == "global" and recipe.pattern is None
    scorer = get_scorer(recipe.method or DEFAULT_METHOD)
    return scores_first(scorer, global_, recipe.importance is not None, recipe.reconstruct_mix is not None)


def _check_side_output(path: str | Path | None, overwrite: bool) -> None:
    if path is None:
        return
    p = Path(path).expanduser()
    if p.exists() and not overwrite:
        raise UsageError(f"{str(p)!r} already exists: choose another path or pass --overwrite")
    if p.is_dir():
        raise UsageError(f"{str(p)!r} is a directory; give a file path")


def _atomic_save(save: Any, path: str | Path) -> None:
    """`save(tmp_path)` then rename: an interrupted write leaves the old file or the new one."""
    with atomic_file(path) as tmp:
        save(tmp)


def extract(
    recipe: Recipe,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    model: LoadedModel | None = None,
    save_mask: str | Path | None = None,
    save_importance: str | Path | None = None,
    cache: bool = True,
) -> dict[str, Any]:
    """Run the main job; write the model, tokenizer, mask and carve.json to `out` when given,
        the mask (bit-packed) to `save_mask` and the importance map to `save_importance` when given
        (to compare domains without saving models).  `cache=False` measures the source model anew
    instead of reusing its cached "before" metrics.  Returns the manifest."""
    recipe.validate()
    mix, method = recipe.mix, recipe.method
    assert mix is not None and method is not None  # validate() resolved the defaults
    if out is not None:
        check_output(out, overwrite)
    if save_mask is not None and recipe.structure:
        raise UsageError("--save-mask is for weight masks; a structured extract's kept units are in its carve.json")
    if save_importance is not None and not (recipe.structure or _scores_first(recipe)):
        raise UsageError(
            f"{method} chooses its mask while updating weights and keeps no importance map; "
            "--save-importance works with wanda/magnitude at global granularity, gradient methods, dual or --structure"
        )
    _check_side_output(save_mask, overwrite)
    _check_side_output(save_importance, overwrite)
    stage = Stages()
    with stage("load_data"):
        domain = Corpus(recipe.domain, recipe.text_field)
        general = Corpus(recipe.general, recipe.text_field)
    with stage("load_model"):
        lm = model or load_model(recipe.model, dtype=recipe.dtype, device=recipe.device)
        # checked before any long work: the model has blocks and Linear layers to prune
        all_prunable_linears(lm.model, tuple(recipe.include), tuple(recipe.exclude))
        model_dtype = next(lm.model.parameters()).dtype
        # the autocast dtype of the calibration forwards (None: the model's own; --structure: unused)
        asked = resolve_calib_dtype(recipe.calib_dtype, lm.model)
        calib_dtype = None if recipe.structure else check_calib_dtype(model_dtype, asked)
    scorer = get_scorer(method)
    with stage("tokenize"):
        calib = calibration_data(lm.tokenizer, domain, general, recipe.calib_blocks, recipe.block_len, mix, recipe.seed)
        general_calib = (
            general.calibration_blocks(lm.tokenizer, recipe.calib_blocks, recipe.block_len, recipe.seed + 1)
            if scorer.needs_general
            else None
        )
        # the Hessians of --reconstruct come from the calibration blocks when the mixes agree
        rebuild = calib if recipe.reconstruct_mix == mix else None
        if recipe.reconstruct_mix is not None and rebuild is None:
            rebuild = calibration_data(
                lm.tokenizer,
                domain,
                general,
                recipe.calib_blocks,
                recipe.block_len,
                recipe.reconstruct_mix,
                recipe.seed,
            )
        importance_key = _importance_key(recipe, lm.fingerprint, calib, general_calib)
        reused = _load_importance(recipe.importance, importance_key) if recipe.importance else None
        held_out = held_out_data(
            lm.tokenizer, domain, general, recipe.eval_blocks, recipe.block_len, recipe.cloze_items
        )
    with stage("evaluate_before"):
        # the source's metrics are cached only for a model carve loaded itself (a model handed in
        # may have been changed since its fingerprint was taken)
        before, cached = evaluate_source(lm, held_out, cache=cache and model is None)
    prompt = held_out.blocks["domain"][1][0]  # speed is measured on the first held-out domain block
    if recipe.speed:
        with stage("speed_before"):
            dense_speed = measure_speed(lm.model, prompt)
    params_before = count_parameters(lm.model)
    with stage("prune"):
        if recipe.structure:
            shaped = structure(
                lm.model,
                method,
                calib,
                keep=recipe.keep,
                mlp_keep=recipe.mlp_keep,
                heads_keep=recipe.heads_keep,
                drop_blocks=recipe.drop_blocks,
                drop_rule=recipe.drop_rule or DEFAULT_DROP_RULE,
                general_calibration=general_calib,
                lam=recipe.lam,
                lr=recipe.lr,
                importance=reused,
                batch_size=recipe.batch_size,
                bias_compensation=recipe.bias_compensation,
            )
            importance = shaped.importance
        else:
            result = prune(
                lm.model,
                method,
                recipe.sparsity,
                calib,
                granularity=recipe.granularity,
                pattern=recipe.pattern,
                include=tuple(recipe.include),
                exclude=tuple(recipe.exclude),
                batch_size=recipe.batch_size,
                propagation=recipe.propagation,
                general_calibration=general_calib,
                lam=recipe.lam,
                lr=recipe.lr,
                importance=reused,
                reconstruct_with=rebuild,
                calib_dtype=calib_dtype,
            )
            importance = result.importance
    with stage("evaluate_after"):
        after = metrics_of(lm.model, held_out)
    manifest: dict[str, Any] = {
        **manifest_head("extract", lm, recipe),
        "data": {
            "domain": domain.describe(),
            "general": general.describe(),
            "calibration": {
                "blocks": len(calib),
                "general_blocks": round(mix * recipe.calib_blocks),
                "block_len": recipe.block_len,
                "seed": recipe.seed,
                "fingerprint": tensor_fingerprint(calib),
                # what the calibration forwards computed in (autocast), None for --structure
                "dtype": None if recipe.structure else str(calib_dtype or model_dtype).removeprefix("torch."),
            },
            "eval": held_out.describe(),
        },
        "metrics": {"before": before, "after": after, "before_from_cache": cached},
        "size": {"parameters_before": params_before, "parameters_after": count_parameters(lm.model)},
    }
    if recipe.structure:
        manifest["structure"] = {
            **shaped.plan.describe(),
            "config": {
                k: getattr(lm.model.config, k, None)
                for k in (
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "head_dim",
                    "intermediate_size",
                )
            },
            "block_distances": None if shaped.distances is None else [round(x, 5) for x in shaped.distances.tolist()],
            "drop_order": shaped.drop_order,
            "greedy_losses": shaped.greedy_losses,
        }
    else:
        achieved = model_sparsity(lm.model, result.mask)
        manifest["sparsity"] = {
            "target": recipe.sparsity,
            "linear": round(achieved["linear"], 6),
            "all_parameters": round(achieved["all_parameters"], 6),
            "per_module": {k: round(v, 6) for k, v in result.mask.sparsity_per_param().items()},
        }
        retries = {k: v for k, v in result.info.items() if v.get("damp_retries")}
        manifest["method_notes"] = {"hessian_damping_retries": retries}
    if recipe.speed:
        with stage("speed_after"):
            manifest["speed"] = speedup(dense_speed, measure_speed(lm.model, prompt))
    manifest["importance"] = (
        None
        if importance is None
        else {"file": "importance.safetensors", "reused_from": recipe.importance, **importance_key}
    )
    manifest["timings_s"] = stage.seconds
    manifest["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if out is not None:
        with atomic_output_dir(out, overwrite) as tmp:
            with stage("save"):
                save_model_files(tmp, lm.model, lm.tokenizer, manifest)
                if importance is not None:
                    importance.meta.update(importance_key)
                    importance.save(tmp / "importance.safetensors")
                if not recipe.structure:
                    result.mask.save(tmp / "mask.safetensors")
            manifest["timings_s"] = stage.seconds
            manifest["peak_rss_mb"] = round(peak_rss_mb(), 1)
            # written inside the temporary directory only: the rename publishes a complete output
            write_json(tmp / "carve.json", manifest)
    if save_mask is not None:
        _atomic_save(result.mask.save, save_mask)
    if save_importance is not None:
        assert importance is not None
        importance.meta.update(importance_key)
        _atomic_save(importance.save, save_importance)
    return manifest
