"""`carve finetune`: sparse fine-tuning of a model on domain text, training only a chosen share
of its weights (LIFT principal weights, an importance map, magnitude, random), or the dense
baselines (every parameter; LoRA at an equal trainable count).

Steps: load → training blocks (a `mix` share general) and the fixed held-out evaluation →
evaluate the source (cached) → the trainable mask → `steps` masked AdamW steps of the next-token
loss (ops.train) → evaluate → save (the whole model, or with `save_delta` only the update: the
changed entries' bit-packed mask and values, for merging).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carve.corpora import Corpus
from carve.engines.activations import bound_heap_retention
from carve.engines.gradient import next_token_loss
from carve.errors import UsageError
from carve.job import (
    SAVE_DTYPE_HELP,
    SAVE_DTYPES,
    Stages,
    describe_blocks,
    evaluate_source,
    held_out_data,
    manifest_head,
    metrics_of,
    round_to_saved,
    run_identity,
    save_model_files,
    training_blocks,
    training_output,
    write_output,
)
from carve.models import LoadedModel, count_parameters, load_model
from carve.models.arch import DEFAULT_EXCLUDE
from carve.models.delta import DELTA_FILE, save_delta
from carve.models.load import check_source
from carve.ops.finetune import Trainable, add_lora, lora_rank_for, trainable_mask
from carve.ops.train import Schedule, train, trainable_parameters
from carve.settings import Targets, check_types, flag

# peak learning rates by what is trained: a sparse subset takes larger steps than the whole
# model (LIFT's practice); LoRA's usual 1e-3. LIFT's 2e-3 was measured on the embedded default
# (bench/finetune.py, 3 seeds on legal and code); other sparse masks keep 5e-4 (Fisher importance
# at 2e-3 raised general perplexity by 2.2 on legal)
RESUME_FREE = (
    "eval_blocks",
    "cloze_items",
    "checkpoint_every",
    "save_delta",
    "save_dtype",
    "device",
    "eval_domain",
)  # may change
DEFAULT_LR = {"full": 5e-5, "lora": 1e-3, "lift": 2e-3, "sparse": 5e-4}


@dataclass
class FinetuneRecipe:
    """Everything that decides a fine-tune; one field per `carve finetune` flag."""

    model: str | None = flag(
        "'default' (embedded SmolLM2-135M-Instruct), a directory, a .gguf or a hub id", default=None
    )
    domain: str = flag("builtin corpus name or path", default="legal")
    eval_domain: str | None = flag("corpus whose held-out split measures the domain (default: --domain's own)")
    general: str = flag("open-domain corpus: builtin name or path", default="general")
    trainable: str = flag(
        "what is trained: lift, fisher (the domain's Fisher importance on the training blocks), magnitude, "
        "random, importance:FILE, mask:FILE (a top-density share of each matrix), full (every parameter) or "
        "lora (adapters with the same trainable count)",
        default="lift",
    )
    density: float = flag("share of each targeted matrix trained (and LoRA's trainable count)", default=0.05)
    rank: float = flag("lift: rank of each matrix's approximation (a fraction < 1: of its full rank)", default=128)
    mix: float = flag("share of training blocks from the general corpus", default=0.0)
    steps: int = flag("optimizer steps", default=100)
    batch_size: int = flag("blocks per optimizer step", default=1)
    micro_batch: int = flag("blocks per forward/backward (gradient accumulation)", default=1)
    block_len: int = flag("tokens per training and eval block", default=512)
    lr: float | None = flag(
        "peak learning rate (default: 5e-5 full, 1e-3 lora, 2e-3 lift, 5e-4 other masks)", default=None
    )
    warmup: int = flag("linear warm-up steps, then cosine decay to 10%", default=10)
    weight_decay: float = flag("decoupled weight decay of the trained entries", default=0.0)
    checkpoint_every: int = flag("steps between checkpoints", default=50)
    eval_blocks: int = flag("held-out blocks per corpus for perplexity", default=32)
    cloze_items: int = flag("held-out domain cloze items (0: skip the cloze task)", default=100)
    seed: int = flag("data order, random masks and LoRA initialisation", default=0)
    include: list[str] = flag("glob patterns of Linear modules to train", factory=lambda: ["*"])
    exclude: list[str] = flag("glob patterns left frozen", factory=lambda: list(DEFAULT_EXCLUDE))
    text_field: str = flag("text field of .jsonl / .parquet / datasets corpora", default="text")
    pool: list[str] = flag("with --domain select:TARGET, the pool the domain text is chosen from (DSIR)",
                           factory=list)  # fmt: skip
    dtype: str | None = flag("float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)", default=None)
    device: str | None = flag("cpu, cuda, cuda:N (default: cuda when available)", default=None)
    save_delta: bool = flag("write only the update (bit-packed mask + changed values), not the model", default=False)
    save_dtype: str | None = flag(SAVE_DTYPE_HELP + "; not with --save-delta", choices=SAVE_DTYPES)

    def validate(self) -> Trainable:
        check_types(self)
        check_source(self.model)
        spec = Trainable.parse(self.trainable)
        for name in ("steps", "batch_size", "micro_batch", "block_len", "checkpoint_every", "eval_blocks"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be a positive whole number, not {getattr(self, name)}")
        if not 0 < self.density < 1:
            raise UsageError(f"density {self.density} is outside (0, 1): the share of each matrix trained, e.g. 0.05")
        if not 0 <= self.mix <= 1:
            raise UsageError(f"mix {self.mix} is outside [0, 1]: it is the share of general training blocks")
        if self.batch_size % self.micro_batch:
            raise UsageError(f"batch-size {self.batch_size} is not a multiple of micro-batch {self.micro_batch}")
        if self.save_delta and self.save_dtype is not None:
            raise UsageError("--save-dtype is for whole models; --save-delta stores the update in the run's dtype")
        if (self.lr is not None and self.lr <= 0) or self.warmup < 0 or self.weight_decay < 0 or self.rank <= 0:
            raise UsageError("lr and rank must be positive, warmup and weight-decay not negative")
        return spec

    def schedule(self, spec: Trainable) -> Schedule:
        lr = self.lr or DEFAULT_LR.get(spec.kind, DEFAULT_LR["sparse"])
        return Schedule(
            steps=self.steps,
            lr=lr,
            batch_size=self.batch_size,
            micro_batch=self.micro_batch,
            warmup=self.warmup,
            weight_decay=self.weight_decay,
            checkpoint_every=self.checkpoint_every,
        )


def _save_delta(tmp: Path, model: nn.Module, base: dict[str, torch.Tensor], lm: LoadedModel, manifest: dict) -> None:
    """The update alone (models.delta's format), the tokenizer, and its size into the manifest."""
    entries = save_delta(tmp / DELTA_FILE, model, base)
    lm.tokenizer.save_pretrained(tmp)
    manifest.setdefault("size", {}).update(
        delta_mb=round((tmp / DELTA_FILE).stat().st_size / 2**20, 3), delta_entries=entries
    )


def _what_to_train(
    lm: LoadedModel, recipe: FinetuneRecipe, spec: Trainable, blocks: torch.Tensor
) -> tuple[nn.Module, dict[str, torch.Tensor | None], dict[str, Any]]:
    """The model to train (LoRA-wrapped for lora), its trainable entries, and their description."""
    targets = Targets.of(recipe.include, recipe.exclude)
    if spec.kind == "full":
        trainable: dict[str, torch.Tensor | None] = {n: None for n, _ in lm.model.named_parameters()}
        return lm.model, trainable, {"kind": "full"}
    if spec.kind == "lora":
        rank = lora_rank_for(lm.model, recipe.density, targets)
        model = add_lora(lm.model, rank, targets, seed=recipe.seed)
        return model, trainable_parameters(model), {"kind": "lora", "lora_rank": rank}
    mask = trainable_mask(
        lm.model, spec, recipe.density, targets, rank=recipe.rank, seed=recipe.seed,
        model_fingerprint=lm.fingerprint, data=blocks,
    )  # fmt: skip
    info = {"kind": spec.kind, "file": spec.path, "density": round(1 - mask.sparsity(), 6), "matrices": len(mask)}
    if spec.kind == "lift":
        info["rank"] = recipe.rank
    return lm.model, dict(mask.items()), info


def finetune(
    recipe: FinetuneRecipe,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    cache: bool = True,
    on_step: Any = None,
) -> dict[str, Any]:
    """Run the fine-tune; write the model (or its update), tokenizer and carve.json to `out`."""
    spec = recipe.validate()
    with training_output(out, overwrite, resume) as ckpt:
        return _finetune(recipe, spec, out, ckpt, overwrite, resume, cache, on_step)


def _finetune(
    recipe: FinetuneRecipe, spec: Trainable, out: str | Path, ckpt: Path, overwrite: bool, resume: bool,
    cache: bool, on_step: Any,
) -> dict[str, Any]:  # fmt: skip
    stage = Stages()
    with stage("load_data"):
        domain = Corpus(recipe.domain, recipe.text_field, pool=tuple(recipe.pool))
        general = Corpus(recipe.general, recipe.text_field)
        evaluated = Corpus(recipe.eval_domain, recipe.text_field) if recipe.eval_domain else domain
    with stage("load_model"):
        lm = load_model(recipe.model, dtype=recipe.dtype, device=recipe.device)
    with stage("tokenize"):
        n = recipe.steps * recipe.batch_size
        train_blocks = training_blocks(lm.tokenizer, domain, general, n, recipe.block_len, recipe.mix, recipe.seed)
        held_out = held_out_data(
            lm.tokenizer, evaluated, general, recipe.eval_blocks, recipe.block_len, recipe.cloze_items
        )
    with stage("evaluate_before"):
        before, cached = evaluate_source(lm, held_out, cache=cache)
    base = {n: p.detach().cpu().clone() for n, p in lm.model.named_parameters()} if recipe.save_delta else {}
    with stage("select"):
        model, trainable, info = _what_to_train(lm, recipe, spec, train_blocks)
    bound_heap_retention()
    schedule = recipe.schedule(spec)
    with stage("train"):
        result = train(
            model, train_blocks, next_token_loss, trainable, schedule,
            checkpoint=ckpt, resume=resume, run=run_identity(recipe, lm, train_blocks, RESUME_FREE), on_step=on_step,
            desc=f"fine-tuning ({spec.kind})",
        )  # fmt: skip
    model.eval()
    if spec.kind == "lora":
        model = model.merge_and_unload()  # type: ignore[operator]
    lm.model = model
    # the "after" metrics are the saved model's; an update (--save-delta) keeps the run's dtype
    saved: dict[str, Any] = {"dtype": None, "delta": True}
    if not recipe.save_delta:
        saved = round_to_saved(lm, recipe.save_dtype)
    with stage("evaluate_after"):
        after = metrics_of(model, held_out)
    manifest: dict[str, Any] = {
        **manifest_head("finetune", lm, recipe),
        "data": {
            "domain": domain.describe(),
            **({"eval_domain": evaluated.describe()} if recipe.eval_domain else {}),
            "general": general.describe(),
            "train": describe_blocks(train_blocks, recipe.mix),
            "eval": held_out.describe(),
        },
        "trainable": {**info, "parameters": result.trained_entries},
        "training": result.describe(schedule, recipe.block_len),
        "metrics": {"before": before, "after": after, "before_from_cache": cached},
        "size": {"parameters": count_parameters(model)},
        "saved": saved,
    }

    def files(tmp: Path) -> None:
        if recipe.save_delta:
            _save_delta(tmp, model, base, lm, manifest)
        else:
            save_model_files(tmp, model, lm.tokenizer, manifest, saved["dtype"])

    write_output(out, overwrite, manifest, stage, files)
    return manifest
