"""The main job as a short script of named steps: load → data → evaluate → prune → evaluate → save."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from carve import distributed
from carve.corpora import Corpus
from carve.engines.activations import parse_size
from carve.engines.layerwise import check_calib_dtype
from carve.errors import UsageError
from carve.evaluation.speed import measure_speed, speedup
from carve.importance.scoring import score, streamed_unit_importance
from carve.job import (  # noqa: F401  - the shared job skeleton (re-exported for callers of the pipeline)
    SAVE_DTYPE_HELP,
    SAVE_DTYPES,
    EvalData,
    Stages,
    calibration_data,
    evaluate,
    evaluate_source,
    held_out_data,
    manifest_head,
    metrics_of,
    peak_rss_mb,
    round_to_saved,
    save_model_files,
    tensor_fingerprint,
    versions,
    write_output,
)
from carve.masks.mask import ImportanceMap
from carve.masks.select import GRANULARITIES, check_sparsity, parse_pattern
from carve.models import LoadedModel, load_model
from carve.models.anatomy import anatomy, text_part
from carve.models.arch import DEFAULT_EXCLUDE, count_parameters
from carve.models.experts import unfused
from carve.models.load import (
    check_calib_choice,
    check_source,
    check_vocabulary,
    config_dtype,
    directory_fingerprint,
    first_parameter,
    resolve_calib_dtype,
    resolve_device,
    resolve_dtype,
)
from carve.models.skeleton import SkeletonModel
from carve.models.sparse import SparseWriter
from carve.models.stream import StreamWriter
from carve.ops.expert_drop import ExpertsResult, apply_experts, drop_experts, experts_config, plan_experts
from carve.ops.outcome import Outcome
from carve.ops.plan import DEFAULT_DROP_RULE, DROP_RULES, ShapeTarget, UnitImportance, check_drop_rule, unit_importance
from carve.ops.prune import PROPAGATIONS, PruneResult, check_method_options, check_propagation, prune, scores_first
from carve.ops.structure import StructureResult, compensated_roles, plan_config, shared_copy, sliced_copy, structure
from carve.output import atomic_file, atomic_output_dir, check_output, claim, write_json
from carve.progress import progress
from carve.scorers import SCORERS, get_scorer
from carve.settings import Calibration, Targets, check_types, flag
from carve.streamed import (
    BlockStream,
    Reshaped,
    available_memory,
    check_streamable,
    copy_side_files,
    load_tokenizer,
    metrics,
    statistics_budget,
    streaming_reason,
)

STREAM_ACTIVATIONS = 512 * 2**20  # bytes of calibration activations a streamed job keeps in memory by default
SWEEP_MIX = 0.3  # dual-obs: share of general blocks in its sweep's Hessians (as SparseGPT's default mix)
# extract's default method: measured best in bench/RESULTS.md (dual section); wanda for --structure
DEFAULT_METHOD, DEFAULT_STRUCTURE_METHOD = "dual-obs", "wanda"
STRUCTURED = "structured extraction (a smaller dense model)"  # the CLI's group of these flags


@dataclass
class Recipe:
    """Everything that decides an extraction; stored in the manifest, one field per CLI flag
    (the CLI builds each flag from its field: name, type, default and help)."""

    model: str | None = flag("'default' (embedded SmolLM2-135M-Instruct), a directory, a .gguf or a hub id")
    domain: str = flag("builtin corpus name or path", "legal")
    eval_domain: str | None = flag("corpus whose held-out split measures the domain (default: --domain's own)")
    general: str = flag("open-domain corpus: builtin name or path", "general", aliases=("--general-corpus",))
    method: str | None = flag(f"scorer: {', '.join(sorted(SCORERS))} (default: dual-obs; wanda with --structure)")
    sparsity: float | None = flag("share of Linear weights to remove (default 0.5)")
    pattern: str | None = flag("N:M semi-structured pattern, e.g. 2:4 (keep N of every M)")
    granularity: str | None = flag("comparison group (default: the method's paper)", choices=GRANULARITIES)
    mix: float | None = flag(
        "share of calibration blocks from the general corpus (0 = domain only; default 0.3 for SparseGPT/Wanda, "
        "0 for gradient methods, whose gradients dual-obs takes from these blocks)"
    )
    propagation: str = flag(
        "calibrate each block on the pruned blocks' outputs (sequential), on the dense model's (one pass per "
        "block, faster), or fused: one forward of all calibration blocks at once, each Linear pruned as its "
        "input arrives (one pass, more memory)",
        "pruned",
        choices=PROPAGATIONS,
    )
    calib_dtype: str = flag(
        "dtype the calibration forwards compute in (autocast; statistics, scoring and pruning run in float32, "
        "the weights keep --dtype). auto: bfloat16 for a float32 model on a device that multiplies bfloat16 "
        "natively (AVX512-BF16/AMX CPU, CUDA), else the model's",
        "auto",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    hessian_dtype: str = flag(
        "dtype of each calibration batch's Hessian product XᵀX (SparseGPT, dual-obs's sweep, --reconstruct), "
        "summed in float64 either way. calib: the calibration forwards' dtype (with bfloat16 forwards: ~4x "
        "faster products on an AVX512-BF16 CPU, each batch's product rounded to bfloat16)",
        "float32",
        choices=("float32", "calib"),
    )
    lam: float = flag(
        "dual: weight of general importance against domain importance; dual-obs: weight of the layer's OBS "
        "error against the domain Fisher error",
        1.0,
        name="--lambda",
    )
    lr: float = flag("gradient methods: SGD learning rate of steps taken while accumulating (0: none)", 0.0,
                     name="--grad-lr")  # fmt: skip
    reconstruct_mix: float | None = flag(
        "score-then-mask methods: keep the mask, update kept weights by OBS compensation with a Hessian from "
        "calibration blocks, MIX of them general; dual-obs: MIX of its sweep's Hessian blocks general "
        f"(default {SWEEP_MIX})",
        name="--reconstruct",
        metavar="MIX",
    )
    importance: str | None = flag("importance.safetensors of an earlier extract (same model, data, method) to reuse")
    structure: bool = flag(
        "remove whole MLP channels, key/value head groups and decoder blocks instead of single weights",
        False,
        group=STRUCTURED,
    )
    keep: float | None = flag(
        "share of decoder-block parameters kept (default 0.5); carve chooses the split between MLP width, heads "
        "and depth by the calibration loss of each candidate",
        group=STRUCTURED,
    )
    mlp_keep: float | None = flag("share of MLP channels kept in every block", group=STRUCTURED)
    heads_keep: float | None = flag("share of attention heads kept, in whole key/value groups", group=STRUCTURED)
    drop_blocks: int | None = flag("number of decoder blocks removed", group=STRUCTURED)
    drop_rule: str | None = flag(
        "which blocks go: distance (default; least change between a block's input and output, one pass) or "
        "greedy (one at a time, the removal that raises the calibration loss least; about 13 min for 15 of 30 "
        "blocks of the embedded default on 2 CPU cores)",
        choices=DROP_RULES,
        group=STRUCTURED,
    )
    experts_keep: float | None = flag(
        "mixture-of-experts models: share of each MoE block's experts kept, the heaviest by routing mass on the "
        "calibration data (implies --structure)",
        group=STRUCTURED,
    )
    drop_run: int | None = flag(
        "drop blocks in runs of N consecutive blocks (default 1). A run as long as a model's fixed layer pattern "
        "keeps the pattern, which llama.cpp needs for GGUF: 2 for Gemma 2 (sliding and global layers alternate), "
        "4 for SmolLM3 (no RoPE in every fourth layer)",
        group=STRUCTURED,
    )
    bias_compensation: bool = flag(
        "keep the removed heads' and channels' mean contribution as a bias (FLAP; configs with mlp_bias / "
        "attention_bias, e.g. Llama)",
        False,
        group=STRUCTURED,
    )
    speed: bool = flag("measure prefill / decode tokens/s of the dense and extracted model (--no-speed: skip)", True)
    calib_blocks: int = flag("number of calibration blocks", 64)
    block_len: int = flag("tokens per calibration and eval block", 512)
    eval_blocks: int = flag("held-out blocks per corpus for perplexity", 32)
    cloze_items: int = flag("held-out domain cloze items (0: skip the cloze task)", 100)
    seed: int = flag("calibration sampling seed", 0)
    include: list[str] = flag("glob patterns of Linear modules to prune", factory=lambda: ["*"])
    exclude: list[str] = flag("glob patterns to leave dense", factory=lambda: list(DEFAULT_EXCLUDE))
    text_field: str = flag("text field of .jsonl / .parquet / datasets corpora", "text")
    pool: list[str] = flag("with --domain select:TARGET, the pool the domain text is chosen from (DSIR)",
                           factory=list)  # fmt: skip
    dtype: str | None = flag("default: float32 on CPU, bfloat16 on CUDA", choices=("float32", "bfloat16", "float16"))
    device: str | None = flag("cpu, cuda, cuda:N (default: cuda when available)")
    batch_size: int = flag("calibration blocks per forward pass", 8)
    stream: bool = flag(
        "read, prune and write one decoder block at a time, for models larger than memory (a local safetensors "
        "directory; every method but dual with --grad-lr, with or without --structure); on by itself "
        "when the weights would take more than half the memory available",
        False,
    )
    max_memory: str | None = flag(
        "calibration memory (e.g. 4GB, 512MiB): activations past it go to a temporary file ($TMPDIR) and are "
        "read back block by block, and a block whose Hessians would take more is calibrated in rounds, its "
        "Linears a few at a time (same result; default: activations kept, 512 MiB streamed; Hessians within "
        "half the memory free)",
        metavar="SIZE",
    )
    save_dtype: str | None = flag(SAVE_DTYPE_HELP, choices=SAVE_DTYPES)
    save_format: str = flag(
        "dense: plain safetensors for from_pretrained; sparse: the kept values and a bit-packed mask "
        "(unstructured and N:M; carve.load_model reads it, carve densify makes it dense)",
        "dense",
        choices=("dense", "sparse"),
    )

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

    def resolved(self) -> Recipe:
        """A copy with every default decided (method, sparsity, mix, sweep mix, structure
        targets) and every value checked; the recipe itself is left as given."""
        check_types(self)
        check_source(self.model)
        r = replace(self, include=list(self.include), exclude=list(self.exclude))
        shape = (r.keep, r.mlp_keep, r.heads_keep, r.drop_blocks)
        r.structure = (r.structure or any(t is not None for t in shape) or r.bias_compensation
                       or r.drop_rule is not None or r.drop_run is not None or r.experts_keep is not None)  # fmt: skip
        if r.structure:
            r._resolve_structure()
        r.method = r.method or (DEFAULT_STRUCTURE_METHOD if r.structure else DEFAULT_METHOD)
        scorer = get_scorer(r.method)
        if r.reconstruct_mix is not None and scorer.prune is not None:
            raise UsageError(f"--reconstruct is for score-then-mask methods; {r.method} already updates the weights")
        if not r.structure:
            check_method_options(scorer, r.granularity == "global" and r.pattern is None, False)
            if scorer.sweep and r.reconstruct_mix is None:
                r.reconstruct_mix = SWEEP_MIX
            nm = parse_pattern(r.pattern)
            r.sparsity = check_sparsity(0.5 if r.sparsity is None and nm is None else r.sparsity, nm)
        if r.structure and r.save_format == "sparse":
            raise UsageError("--save-format sparse is for unstructured and N:M outputs; a structured one is dense")
        check_propagation(r.propagation)
        check_calib_choice(r.calib_dtype)
        if r.hessian_dtype not in ("float32", "calib"):
            raise UsageError(f"unknown Hessian dtype {r.hessian_dtype!r}: use float32 or calib")
        if r.reconstruct_mix is not None and not 0 <= r.reconstruct_mix <= 1:
            raise UsageError(f"reconstruct mix {r.reconstruct_mix} is outside [0, 1]")
        if r.lam < 0 or r.lr < 0:
            raise UsageError("lambda and grad-lr must not be negative")
        if r.importance is not None and not Path(r.importance).expanduser().is_file():
            raise UsageError(f"importance file {r.importance!r} does not exist")
        r.mix = scorer.default_mix if r.mix is None else r.mix
        if not 0 <= r.mix <= 1:
            raise UsageError(f"mix {r.mix} is outside [0, 1]: it is the share of general calibration blocks")
        for name in ("calib_blocks", "block_len", "eval_blocks", "batch_size"):
            if getattr(r, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be a positive whole number, not {getattr(r, name)}")
        if r.max_memory is not None:
            parse_size(r.max_memory)
            if r.propagation == "fused":
                raise UsageError(
                    "--max-memory bounds the activations carried block to block; fused propagation holds the "
                    "whole calibration set at once: use --propagation pruned or dense"
                )
        if r.stream:
            why = _not_streamable(r)
            if why:
                raise UsageError(f"--stream: {why}")
            check_streamable(r.model)
        return r

    def _resolve_structure(self) -> None:
        unstructured = {
            "sparsity": self.sparsity,
            "pattern": self.pattern,
            "granularity": self.granularity,
            "reconstruct": self.reconstruct_mix,
            "propagation": None if self.propagation == "pruned" else self.propagation,
            "calib-dtype": None if self.calib_dtype == "auto" else self.calib_dtype,
            "hessian-dtype": None if self.hessian_dtype == "float32" else self.hessian_dtype,
            # every block keeps the same units (a standard config), so no module can be left out
            "include": None if list(self.include) == ["*"] else self.include,
            "exclude": None if list(self.exclude) == list(DEFAULT_EXCLUDE) else self.exclude,
        }
        given = [f"--{k}" for k, v in unstructured.items() if v is not None]
        if given:
            raise UsageError(f"--structure removes whole channels, heads and blocks: {', '.join(given)} do not apply")
        if self.experts_keep is not None:
            shape = {"keep": self.keep, "mlp-keep": self.mlp_keep, "heads-keep": self.heads_keep,
                     "drop-blocks": self.drop_blocks, "drop-rule": self.drop_rule, "drop-run": self.drop_run,
                     "bias-compensation": self.bias_compensation or None, "method": self.method,
                     "importance": self.importance}  # fmt: skip
            given = [f"--{k}" for k, v in shape.items() if v is not None]
            if given:
                raise UsageError(
                    f"--experts-keep removes whole experts, ranked by routing mass: {', '.join(given)} do not apply"
                )
            if not 0 < self.experts_keep <= 1:
                raise UsageError(f"--experts-keep {self.experts_keep} is outside (0, 1]")
            return
        if all(t is None for t in (self.keep, self.mlp_keep, self.heads_keep, self.drop_blocks)):
            self.keep = 0.5
        self.drop_rule = check_drop_rule(self.drop_rule or DEFAULT_DROP_RULE)
        if self.drop_run is not None and self.drop_run < 1:
            raise UsageError(f"--drop-run {self.drop_run}: blocks are dropped in runs of at least 1")

    def recorded(self) -> Recipe:
        """The resolved recipe as a manifest records it, so that it replays (`--recipe carve.json`): an
        expert job ranks experts by routing mass and names no scorer (--method is refused with it)."""
        return replace(self, method=None) if self.experts_keep is not None else self

    def targets(self) -> Targets:
        return Targets.of(self.include, self.exclude)

    def shape_target(self) -> ShapeTarget:
        return ShapeTarget(
            self.keep, self.mlp_keep, self.heads_keep, self.drop_blocks,
            self.drop_rule or DEFAULT_DROP_RULE, self.bias_compensation, self.drop_run or 1,
        )  # fmt: skip


def _importance_key(
    recipe: Recipe,
    model_fingerprint: str,
    calib: torch.Tensor,
    general_calib: torch.Tensor | None,
    settings: Calibration,
) -> dict[str, Any]:
    """What an importance map depends on: reusing one needs all of it to match (the calibration
    forwards' dtype and the Hessian products' too: a map scored in bfloat16 is not the float32 one)."""
    data = hashlib.sha256(tensor_fingerprint(calib).encode())
    if general_calib is not None:
        data.update(tensor_fingerprint(general_calib).encode())
    lam = recipe.lam if get_scorer(recipe.method or DEFAULT_METHOD).needs_general else None  # only dual's use λ
    dtypes = [str(settings.dtype), str(settings.products)]
    data.update(json.dumps([lam, recipe.lr, recipe.include, recipe.exclude, *dtypes]).encode())
    return {"scorer": recipe.method, "model_fingerprint": model_fingerprint, "data_fingerprint": data.hexdigest()[:16]}


def _importance_name(method: Any) -> Any:
    return get_scorer(method).importance_name if method in SCORERS else method


def _load_importance(path: str, key: dict[str, Any], lazy: bool = False) -> ImportanceMap:
    imp = ImportanceMap.load(Path(path).expanduser(), lazy=lazy)
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


def _not_streamable(r: Recipe) -> str | None:
    """Why a resolved recipe cannot stream (None: it can)."""
    if r.structure:
        if get_scorer(r.method or DEFAULT_STRUCTURE_METHOD).needs_general and r.lr:
            return f"{r.method} with --grad-lr takes steps on the whole model; it streams with --grad-lr 0"
        return None
    if _scores_first(r) and not _streamed_scores(r):
        return f"{r.method} with --grad-lr takes steps on the whole model; it streams with --grad-lr 0"
    if r.propagation == "fused":
        return "fused propagation runs the whole model at once; use --propagation pruned or dense"
    return None


def _streamed_scores(r: Recipe) -> bool:
    """Whether a score-then-mask extraction has its scores block by block: a reused map's read from its
    file a matrix at a time, a gradient method's from the streamed gradient pass, an activation
    method's from the streamed layer-wise pass, a weight method's from each block as it is read.  The
    masks are then chosen per row or matrix, or over all matrices at once by an out-of-core selection
    (global granularity).  Only dual's refined loss (--grad-lr) steps the whole model."""
    scorer = get_scorer(r.method or DEFAULT_METHOD)
    return r.importance is not None or not (scorer.needs_general and bool(r.lr))


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


@dataclass
class ExtractData:
    """The tokenized data of an extraction: calibration blocks (and the general blocks of dual,
    the blocks of --reconstruct when its mix differs), the held-out evaluation, and what an
    importance map of this run depends on (its reuse key)."""

    calib: torch.Tensor
    general_calib: torch.Tensor | None
    rebuild: torch.Tensor | None
    held_out: EvalData
    importance_key: dict[str, Any]

    def describe(self, r: Recipe, calib_dtype: str | None) -> dict[str, Any]:
        return {
            "blocks": len(self.calib),
            "general_blocks": round((r.mix or 0) * r.calib_blocks),
            "block_len": r.block_len,
            "seed": r.seed,
            "fingerprint": tensor_fingerprint(self.calib),
            "dtype": calib_dtype,  # what the calibration forwards computed in (autocast); None for --structure
            # what each batch's Hessian product XᵀX computed in (--hessian-dtype)
            "hessian_products": None if calib_dtype is None or r.hessian_dtype == "float32" else calib_dtype,
        }


def _tokenize(
    r: Recipe, lm: LoadedModel, calib_settings: Calibration, domain: Corpus, general: Corpus, evaluated: Corpus
) -> ExtractData:
    tok = lm.tokenizer
    calib = calibration_data(tok, domain, general, r.calib_blocks, r.block_len, r.mix or 0.0, r.seed)
    general_calib = None
    if get_scorer(r.method or DEFAULT_METHOD).needs_general:
        general_calib = general.calibration_blocks(tok, r.calib_blocks, r.block_len, r.seed + 1)
    # the Hessians of --reconstruct come from the calibration blocks when the mixes agree
    rebuild = calib if r.reconstruct_mix == r.mix else None
    if r.reconstruct_mix is not None and rebuild is None:
        rebuild = calibration_data(tok, domain, general, r.calib_blocks, r.block_len, r.reconstruct_mix, r.seed)
    held_out = held_out_data(tok, evaluated, general, r.eval_blocks, r.block_len, r.cloze_items)
    return ExtractData(
        calib, general_calib, rebuild, held_out,
        _importance_key(r, lm.fingerprint, calib, general_calib, calib_settings),
    )  # fmt: skip


def _calibration(r: Recipe, lm: LoadedModel) -> Calibration:
    """The calibration settings, with the autocast dtype checked against the model's (None: the
    model's own; --structure calibrates in the model's dtype)."""
    model_dtype = first_parameter(lm.model).dtype
    asked = None if r.structure else resolve_calib_dtype(r.calib_dtype, lm.model)
    budget = None if r.max_memory is None else parse_size(r.max_memory)
    dtype = check_calib_dtype(model_dtype, asked)
    # None: float32 products.  A 16-bit model computes in its own dtype (dtype None), so "calib" is that dtype
    products = (dtype or model_dtype) if r.hessian_dtype == "calib" else None
    # a block's Hessians within the budget, or half the memory free now (the model loaded): past it the
    # block is calibrated in rounds, the same bits (carve.engines.layerwise.rounds)
    statistics = statistics_budget(budget)
    return Calibration(
        r.batch_size, r.propagation, dtype, max_memory=budget, statistics_memory=statistics, products=products
    )


def _operate(r: Recipe, lm: LoadedModel, data: ExtractData, calib: Calibration) -> Outcome:
    """The op the recipe asks for: structured slicing or unstructured / N:M pruning."""
    assert r.method is not None
    # streamed: the map's matrices read from its file as they are needed, never the whole map
    lazy = calib.stream is not None
    reused = _load_importance(r.importance, data.importance_key, lazy) if r.importance else None
    if r.experts_keep is not None:
        return drop_experts(lm.model, data.calib, r.experts_keep, r.batch_size)
    if r.structure:
        scores = reused or partial(
            score, lm.model, r.method, data.calib, calib=calib,
            general_calibration=data.general_calib, lam=r.lam, lr=r.lr,
        )  # fmt: skip
        return structure(lm.model, scores, data.calib, r.shape_target(), batch_size=r.batch_size)
    return prune(
        lm.model, r.method, r.sparsity, data.calib, granularity=r.granularity, pattern=r.pattern,
        targets=r.targets(), calib=calib, general_calibration=data.general_calib, lam=r.lam, lr=r.lr,
        importance=reused, reconstruct_with=data.rebuild,
    )  # fmt: skip


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
    r = recipe.resolved()
    if not distributed.writes():  # under torch.distributed rank 0 alone writes; the others compute alike
        out = save_mask = save_importance = None
    with claim(out, save_mask, save_importance):
        _check_outputs(r, out, overwrite, save_mask, save_importance)
        return _extract(r, out, overwrite, model, save_mask, save_importance, cache)


def _extract(
    r: Recipe, out: str | Path | None, overwrite: bool, model: LoadedModel | None, save_mask: str | Path | None,
    save_importance: str | Path | None, cache: bool,
) -> dict[str, Any]:  # fmt: skip
    stage = Stages()
    with stage("load_data"):
        domain, general = Corpus(r.domain, r.text_field, pool=tuple(r.pool)), Corpus(r.general, r.text_field)
        evaluated = Corpus(r.eval_domain, r.text_field) if r.eval_domain else domain
    if model is None:
        reason = streaming_reason(r.model, resolve_dtype(r.dtype, resolve_device(r.device)), r.stream)
        if reason is not None and _not_streamable(r) is None:
            if save_importance is not None:
                raise UsageError(
                    f"--save-importance holds the whole importance map; this extraction streams ({reason}): "
                    "leave it out, or run where the model fits in memory"
                )
            return _extract_streamed(r, out, overwrite, save_mask, stage, (domain, general, evaluated), reason)
    elif r.stream:
        raise UsageError("--stream reads the model from disk; it cannot stream a model handed in already loaded")
    with stage("load_model"):
        lm = model or load_model(r.model, dtype=r.dtype, device=r.device)
        with unfused(lm.model):  # checked before any long work: there are Linear layers to prune
            r.targets().linears(lm.model)
        calib = _calibration(r, lm)
    with stage("tokenize"):
        data = _tokenize(r, lm, calib, domain, general, evaluated)
    with stage("evaluate_before"):
        # cached only for a model carve loaded itself (one handed in may have changed since)
        before, cached = evaluate_source(lm, data.held_out, cache=cache and model is None)
    prompt = data.held_out.blocks["domain"][1][0]  # speed is measured on the first held-out domain block
    if r.speed:
        with stage("speed_before"):
            dense_speed = measure_speed(lm.model, prompt)
    params_before = count_parameters(lm.model)
    with stage("prune"):
        outcome = _operate(r, lm, data, calib)
    saved = round_to_saved(lm, r.save_dtype)  # the "after" metrics are the saved model's
    with stage("evaluate_after"):
        after = metrics_of(lm.model, data.held_out)
    calib_dtype = None if r.structure else str(calib.dtype or first_parameter(lm.model).dtype).removeprefix("torch.")
    manifest: dict[str, Any] = {
        **manifest_head("extract", lm, r.recorded()),
        "data": {
            "domain": domain.describe(),
            **({"eval_domain": evaluated.describe()} if r.eval_domain else {}),
            "general": general.describe(),
            "calibration": data.describe(r, calib_dtype),
            "eval": data.held_out.describe(),
        },
        "metrics": {"before": before, "after": after, "before_from_cache": cached},
        "size": {"parameters_before": params_before, "parameters_after": count_parameters(lm.model)},
        "saved": {**saved, "format": r.save_format},
        **outcome.describe(lm.model),
    }
    if r.speed:
        with stage("speed_after"):
            manifest["speed"] = speedup(dense_speed, measure_speed(lm.model, prompt))
    importance = outcome.importance
    if importance is not None:
        importance.meta.update(data.importance_key)
    manifest["importance"] = None if importance is None else {
        "file": "importance.safetensors", "reused_from": r.importance, **data.importance_key}  # fmt: skip
    stage.record(manifest)
    if out is not None:
        _write_output(out, overwrite, lm, outcome, manifest, stage, r)
    if save_mask is not None:
        assert isinstance(outcome, PruneResult)  # a structured extract's --save-mask was refused
        _atomic_save(outcome.mask.save, save_mask)
    if save_importance is not None:
        assert importance is not None
        _atomic_save(importance.save, save_importance)
    return manifest


def _extract_streamed(
    r: Recipe, out: str | Path | None, overwrite: bool, save_mask: str | Path | None, stage: Stages,
    corpora: tuple[Corpus, Corpus, Corpus], reason: str,
) -> dict[str, Any]:  # fmt: skip
    """The extraction one block at a time (carve.streamed): read, calibrate, prune, write, free;
    before and after perplexity from the same pass.  No cloze and no speed (both need the whole
    model in memory); the manifest says so."""
    domain, general, evaluated = corpora
    path = check_streamable(r.model)
    device = resolve_device(r.device)
    with stage("load_model"):
        tok = load_tokenizer(path)
        skeleton = SkeletonModel(path, resolve_dtype(r.dtype, device), device)
        check_vocabulary(tok, skeleton.model, str(r.model))
        source_dtype = config_dtype(path / "config.json")
        lm = LoadedModel(skeleton.model, tok, str(r.model), directory_fingerprint(path), source_dtype)
        r.targets().linears(lm.model)
        calib = _calibration(r, lm)
        if calib.max_memory is None:
            # streaming is for bounded memory: the blocks' kept inputs (a streamed gradient pass keeps
            # every block's: 2.3 GB on the embedded default) spill past STREAM_ACTIVATIONS, or past a
            # quarter of what is free if that is less; the bits are the same either way
            free = available_memory()
            calib = replace(calib, max_memory=min(STREAM_ACTIVATIONS, free // 4 if free else STREAM_ACTIVATIONS))
    streamed_r = replace(r, cloze_items=0, speed=False)
    with stage("tokenize"):
        data = _tokenize(streamed_r, lm, calib, domain, general, evaluated)
    save_name = r.save_dtype or source_dtype
    with skeleton, atomic_output_dir(out, overwrite) if out is not None else nullcontext(None) as tmp:
        specs = [(stored, getattr(torch, save_name) if skeleton.source.dtype(stored).is_floating_point
                  else skeleton.source.dtype(stored), shape) for stored, shape in skeleton.stored_specs()]  # fmt: skip
        config, reshaped = lm.model.config, None
        structured: StructureResult | ExpertsResult | None = None
        if r.structure:  # planned first (passes of their own), then sliced block by block as it is written
            with stage("plan"):
                assert r.method is not None
                units: Callable[[], UnitImportance] = partial(
                    streamed_unit_importance, skeleton, r.method, data.calib, calib=calib,
                    general_calibration=data.general_calib, lam=r.lam, lr=r.lr,
                )  # fmt: skip
                if r.importance:  # a reused map: each block's units reduced from its matrices, read one at a time
                    reused = _load_importance(r.importance, data.importance_key, lazy=True)
                    units = lambda: UnitImportance(*unit_importance(reused, anatomy(lm.model)))  # noqa: E731
                if r.experts_keep is not None:
                    structured = plan_experts(lm.model, data.calib, r.experts_keep, r.batch_size, source=skeleton)
                    reshaped, specs, config = _reshaped_experts(skeleton, structured, getattr(torch, save_name))
                else:
                    structured = structure(lm.model, units, data.calib, r.shape_target(), batch_size=r.batch_size,
                                           source=skeleton)  # fmt: skip
                    reshaped, specs, config = _reshaped(skeleton, structured, getattr(torch, save_name))
                    structured.config = config
            skeleton.load_others()
        writer: StreamWriter | SparseWriter | None = None
        if tmp is not None:  # the sparse format's files are laid out as the tensors come, the dense ones up front
            writer = SparseWriter(tmp, skeleton.aliases()) if r.save_format == "sparse" else StreamWriter(tmp, specs)
        stream = BlockStream(skeleton, writer, data.held_out, getattr(torch, save_name), reshaped)
        with stage("prune"):
            stream.start()
            if structured is None:
                outcome: Outcome = _operate(r, lm, data, replace(calib, stream=stream))
            else:
                outcome = structured
                stream.captured()
                for i in progress(range(len(skeleton.blocks)), "slicing and writing (streamed)"):
                    stream.enter(i)
                    stream.leave(i)
        with stage("evaluate"):
            before = metrics(stream.perplexities(stream.before, "perplexity (before)"), data.held_out)
            after = metrics(stream.perplexities(stream.after, "perplexity (after)"), data.held_out)
        calib_dtype = str(calib.dtype or first_parameter(lm.model).dtype).removeprefix("torch.")
        compute = str(skeleton.dtype).removeprefix("torch.")
        manifest: dict[str, Any] = {
            **manifest_head("extract", lm, streamed_r.recorded()),
            "streamed": {
                "why": reason, "cloze": "not measured (needs the whole model)", "speed": "not measured",
                "activations_in_memory_mb": None if calib.max_memory is None else round(calib.max_memory / 2**20),
                "statistics_in_memory_mb": (
                    None if calib.statistics_memory is None else round(calib.statistics_memory / 2**20)
                ),
            },
            "data": {
                "domain": domain.describe(),
                **({"eval_domain": evaluated.describe()} if r.eval_domain else {}),
                "general": general.describe(),
                "calibration": data.describe(r, calib_dtype),
                "eval": data.held_out.describe(),
            },
            "metrics": {"before": before, "after": after, "before_from_cache": False},
            "size": {"parameters_before": sum(math.prod(shape) for name, shape in skeleton.stored_specs()
                                              if name not in skeleton.buffer_names.values()),
                     "parameters_after": sum(n for _, n in stream.zeros.values())},
            "saved": {"dtype": save_name, "format": r.save_format, "metrics_measured": (
                f"computed in {compute}" + ("" if save_name in (compute, "float32") else
                f"; the metrics are of the decoder blocks as saved ({save_name}) and of the tensors outside them "
                f"in {compute}"))},
            **(outcome.describe(lm.model) if structured else _pruned(outcome).describe(lm.model, stream.zeros)),
            # a gradient method's map stays in temporary files: it is not saved when streaming
            "importance": {"reused_from": r.importance} if r.importance else None,
        }  # fmt: skip
        if tmp is not None:
            assert writer is not None
            with stage("save"):
                written = writer.close()
                if written is not None:
                    manifest["size"]["sparse"] = written
                config.dtype = getattr(torch, save_name)
                config.save_pretrained(tmp)
                copy_side_files(path, tmp)
                tok.save_pretrained(tmp)
                outcome.save(tmp)
                manifest["size"]["file_mb"] = round(
                    sum(f.stat().st_size for f in tmp.glob("model*.safetensors")) / 2**20, 2
                )
            stage.record(manifest)
            write_json(tmp / "carve.json", manifest)
        stage.record(manifest)
    if save_mask is not None:
        _atomic_save(_pruned(outcome).mask.save, save_mask)
    return manifest


def _reshaped(
    skeleton: SkeletonModel, result: StructureResult, dtype: torch.dtype
) -> tuple[Reshaped, list[tuple[str, torch.dtype, list[int]]], Any]:
    """How a streamed structured extraction writes its plan: each kept block sliced (and renumbered),
    the output's tensor layout (from the blocks sliced on the meta device, before any is read),
    and the output's config."""
    anat = anatomy(skeleton.model)
    plan = result.plan
    roles = compensated_roles(skeleton.model, plan, result.means)
    index = {i: k for k, i in enumerate(i for i in range(len(anat.blocks)) if i not in plan.drop)}

    def block(i: int) -> torch.nn.Module:
        return sliced_copy(anat, plan, i, roles, None if result.means is None else result.means[i])

    config = copy.deepcopy(skeleton.model.config)
    plan_config(text_part(config), anat, plan, roles)
    return _reshaped_as(skeleton, block, index, config, dtype)


def _reshaped_experts(
    skeleton: SkeletonModel, result: ExpertsResult, dtype: torch.dtype
) -> tuple[Reshaped, list[tuple[str, torch.dtype, list[int]]], Any]:
    """How a streamed extraction writes dropped experts: each block's MoE sliced to the kept experts."""

    def block(i: int) -> torch.nn.Module:
        twin = shared_copy(skeleton.blocks[i])
        apply_experts(twin, result, f"{skeleton.prefix}.{i}.")
        return twin

    config = copy.deepcopy(skeleton.model.config)
    experts_config(text_part(config), result)
    return _reshaped_as(skeleton, block, {i: i for i in range(len(skeleton.blocks))}, config, dtype)


def _reshaped_as(
    skeleton: SkeletonModel, block: Callable[[int], torch.nn.Module], index: dict[int, int], config: Any,
    dtype: torch.dtype,
) -> tuple[Reshaped, list[tuple[str, torch.dtype, list[int]]], Any]:  # fmt: skip
    """The Reshaped writer of `block(i)` as block `index[i]` and the output's tensor layout: the
    tensors outside the blocks as stored, each kept block's its reshaped copy's tensors under the
    names the source gives block `index[i]`'s (an MoE's sliced fused experts split per expert)."""
    specs: list[tuple[str, torch.dtype, list[int]]] = []
    seen: set[int] = set()
    for name, (stored, shape) in skeleton.specs.items():
        i = skeleton.block_of(name)
        if i is None:
            kind = skeleton.source.dtype(stored)
            specs.append((stored, dtype if kind.is_floating_point else kind, shape))
        elif i not in seen and i in index:  # the sliced block's tensors, in its own order
            seen.add(i)
            twin, at = block(i), f"{skeleton.prefix}.{index[i]}."
            specs += [(stored, dtype if p.is_floating_point() else p.dtype, list(part.shape))
                      for n, p in twin.named_parameters()
                      for stored, part in skeleton.checkpoint_tensors(at + n, p.detach())]  # fmt: skip
            specs += [(skeleton.buffer_names[at + n], dtype if b.is_floating_point() else b.dtype, list(b.shape))
                      for n, b in skeleton.stored_buffers_in(i, twin)]  # fmt: skip
    specs += [(skeleton.buffer_names[n], dtype if b.is_floating_point() else b.dtype, list(b.shape))
              for n, b in skeleton.buffers_of(None)]  # fmt: skip
    return Reshaped(block, index), specs, config


def _pruned(outcome: Outcome) -> PruneResult:
    assert isinstance(outcome, PruneResult)  # the unstructured and N:M jobs
    return outcome


def _check_outputs(
    r: Recipe, out: str | Path | None, overwrite: bool, save_mask: str | Path | None, save_importance: str | Path | None
) -> None:
    """Every output path and side output checked before any work is done."""
    if out is not None:
        check_output(out, overwrite)
    if save_mask is not None and r.structure:
        raise UsageError("--save-mask is for weight masks; a structured extract's kept units are in its carve.json")
    if save_importance is not None and not (r.structure or _scores_first(r)):
        raise UsageError(
            f"{r.method} chooses its mask while updating weights and keeps no importance map; "
            "--save-importance works with wanda/magnitude at global granularity, gradient methods, dual or --structure"
        )
    _check_side_output(save_mask, overwrite)
    _check_side_output(save_importance, overwrite)


def _write_output(
    out: str | Path,
    overwrite: bool,
    lm: LoadedModel,
    outcome: Outcome,
    manifest: dict[str, Any],
    stage: Stages,
    r: Recipe,
) -> None:
    """Model, tokenizer, the outcome's files, importance and carve.json, published by one rename."""

    def files(tmp: Path) -> None:
        dtype = manifest["saved"]["dtype"]
        save_model_files(tmp, lm.model, lm.tokenizer, manifest, dtype, sparse=r.save_format == "sparse")
        outcome.save(tmp)
        if outcome.importance is not None:
            outcome.importance.save(tmp / "importance.safetensors")

    write_output(out, overwrite, manifest, stage, files)
