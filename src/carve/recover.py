"""`carve recover`: distil a pruned model back towards its dense teacher on domain + general text.

Steps: load student and teacher → training blocks (a `mix` share general) and the fixed held-out
evaluation → evaluate before → `steps` optimizer steps of the distillation loss (full fine-tune
with AdamW, or LoRA adapters through PEFT, merged at the end) → evaluate after → save.

- Sparsity is kept: the zeros of pruned decoder Linear weights are frozen entries of the masked
  training loop (ops.train: never updated, no optimizer state), and a LoRA merge is masked.
- Checkpoints every `checkpoint_every` steps to `<out>.checkpoint/` (trained entries, optimizer
  state and RNG state in safetensors, step and losses in JSON: no pickles), written atomically;
  `resume=True` continues from it and gives the same result as an uninterrupted run; it is
  removed when the output is complete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carve import distributed
from carve.corpora import Corpus
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
from carve.manifest import MANIFEST_FILE, read_manifest
from carve.models import count_parameters, load_model
from carve.models.arch import count_zeros
from carve.models.load import check_source
from carve.ops.distill import model_distill_loss, reapply_masks, sparsity_masks
from carve.ops.finetune import add_lora
from carve.ops.train import Schedule, train, trainable_parameters
from carve.settings import check_types, flag

RESUME_FREE = ("eval_blocks", "cloze_items", "checkpoint_every", "device", "eval_domain", "save_dtype")  # may change


@dataclass
class RecoverRecipe:
    """Everything that decides a recovery run; one field per `carve recover` flag."""

    model: str = flag("the pruned model: a carve output directory (or any model source)", "")
    teacher: str | None = flag("dense teacher (default: the source named in MODEL/carve.json)")
    domain: str = flag("builtin corpus name or path", "legal")
    general: str = flag("open-domain corpus: builtin name or path", "general", aliases=("--general-corpus",))
    eval_domain: str | None = flag("corpus whose held-out split measures the domain (default: --domain's own)")
    mix: float = flag("share of training blocks from the general corpus", 0.5)
    steps: int = flag("optimizer steps", 200)
    batch_size: int = flag("blocks per step", 1)
    micro_batch: int | None = flag("blocks per forward/backward (gradient accumulation; default: --batch-size, one "
                                   "forward a step; under torchrun --batch-size shared by the processes)")  # fmt: skip
    block_len: int = flag("tokens per training and eval block", 512)
    lr: float | None = flag("peak learning rate (default 1e-4; 1e-3 with --lora)")
    warmup: int = flag("linear warm-up steps, then cosine decay to 10% of lr", 10)
    temperature: float = flag("distillation temperature T", 1.0)
    kd_weight: float = flag("weight of T²·KL(teacher ‖ student)", 1.0)
    lm_weight: float = flag("weight of the next-token cross-entropy", 0.0)
    lora: int = flag("train LoRA adapters of this rank (PEFT; 0: full fine-tune)", 0, metavar="RANK")
    checkpoint_every: int = flag("steps between checkpoints", 50)
    eval_blocks: int = flag("held-out blocks per corpus for perplexity", 32)
    cloze_items: int = flag("held-out domain cloze items (0: skip the cloze task)", 100)
    seed: int = flag("data order and LoRA initialisation", 0)
    text_field: str = flag("text field of .jsonl / .parquet / datasets corpora", "text")
    pool: list[str] = flag("with --domain select:TARGET, the pool the domain text is chosen from (DSIR)",
                           factory=list)  # fmt: skip
    dtype: str | None = flag("default: float32 on CPU, bfloat16 on CUDA", choices=("float32", "bfloat16", "float16"))
    device: str | None = flag("cpu, cuda, cuda:N (default: cuda when available)")
    save_dtype: str | None = flag(SAVE_DTYPE_HELP, choices=SAVE_DTYPES)

    def resolved(self) -> RecoverRecipe:
        """A copy with the learning rate decided and every value checked."""
        check_types(self)
        for source in (self.model, self.teacher):
            if source is not None:
                check_source(source)
        for name in ("steps", "batch_size", "block_len", "checkpoint_every", "eval_blocks"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be a positive whole number, not {getattr(self, name)}")
        if self.micro_batch is not None and (self.micro_batch < 1 or self.batch_size % self.micro_batch):
            raise UsageError(f"micro-batch {self.micro_batch} must be positive and divide batch-size {self.batch_size}")
        if not 0 <= self.mix <= 1:
            raise UsageError(f"mix {self.mix} is outside [0, 1]: it is the share of general training blocks")
        if self.temperature <= 0 or self.kd_weight < 0 or self.lm_weight < 0 or self.kd_weight + self.lm_weight == 0:
            raise UsageError("temperature must be positive, and kd-weight / lm-weight non-negative, not both 0")
        if self.lora < 0 or self.warmup < 0 or (self.lr is not None and self.lr <= 0):
            raise UsageError("lora rank and warmup must not be negative, and lr must be positive")
        return replace(self, lr=self.lr or (1e-3 if self.lora else 1e-4))


def _teacher_source(recipe: RecoverRecipe) -> str:
    """--teacher, else the model the student's manifest names (read, and so checked, either way)."""
    manifest = Path(recipe.model).expanduser() / MANIFEST_FILE
    source = read_manifest(manifest).get("source", {}).get("model") if manifest.is_file() else None
    if recipe.teacher:
        return recipe.teacher
    if source is not None:
        if Path(source).is_absolute() and not Path(source).exists():  # moved or deleted since
            raise UsageError(
                f"{recipe.model!r} was carved from {source!r} (its carve.json says), which is no longer there: "
                "give the dense model with --teacher"
            )
        return source
    raise UsageError(f"--teacher is needed: {recipe.model!r} has no carve.json naming the model it was carved from")


def _dense_metrics(source_manifest: Path, evaluation: dict[str, Any]) -> dict[str, Any] | None:
    """The dense model's metrics from the student's manifest when they were measured on the same
    held-out data: an extraction's `before`, or the `dense` an earlier recovery carried along."""
    if not source_manifest.is_file():
        return None
    m = read_manifest(source_manifest)
    measured = m.get("data", {}).get("eval") or {}
    dense = m.get("metrics", {}).get("dense" if m.get("job") == "recover" else "before")
    if not dense or any(measured.get(k) != evaluation.get(k) for k in ("domain", "general")):
        return None
    if measured.get("domain_cloze") != evaluation.get("domain_cloze"):  # other items, or none
        dense = {k: v for k, v in dense.items() if k != "domain_cloze"}
    return dict(dense)


def _sparsity_kept(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The manifest's check that training kept the pruned matrices' zeros."""
    kept = {n: p for n, p in model.named_parameters() if n in masks}
    masked = sum(int(m.numel()) for m in masks.values())
    return {
        "masked_weights": len(masks),  # pruned matrices trained with masked updates
        "zero_share_before": round(sum(count_zeros(m) for m in masks.values()) / masked, 6) if masks else 0.0,
        "zero_share_after": round(sum(count_zeros(kept[n]) for n in masks) / masked, 6) if masks else 0.0,
        "zeros_kept": all(bool((kept[n][~m] == 0).all()) for n, m in masks.items()),
    }


def _default_micro_batch(batch_size: int) -> int:
    """One forward a step; under torchrun, the step's blocks shared evenly by the processes where
    they divide (else the step as one micro-batch, which `distributed.shard` refuses by name)."""
    n = distributed.world()
    return batch_size // n if n > 1 and batch_size % n == 0 else batch_size


def recover(
    recipe: RecoverRecipe,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    on_step: Callable[[int], None] | None = None,
    cache: bool = True,
) -> dict[str, Any]:
    """Run the recovery; write the model, tokenizer and carve.json to `out`. `on_step(step)` is
    called after every optimizer step (after any checkpoint of that step).  Training is ops.train's
    masked loop: the pruned matrices' zeros are frozen entries (never updated)."""
    recipe = recipe.resolved()
    teacher = _teacher_source(recipe)  # the student's manifest read (and checked) before any work
    with training_output(out, overwrite, resume) as ckpt:
        return _recover(recipe, teacher, out, ckpt, overwrite, resume, on_step, cache)


def _recover(
    recipe: RecoverRecipe, teacher_source: str, out: str | Path, ckpt: Path, overwrite: bool, resume: bool,
    on_step: Callable[[int], None] | None, cache: bool,
) -> dict[str, Any]:  # fmt: skip
    stage = Stages()
    with stage("load_data"):
        domain = Corpus(recipe.domain, recipe.text_field, pool=tuple(recipe.pool))
        general = Corpus(recipe.general, recipe.text_field)
        evaluated = Corpus(recipe.eval_domain, recipe.text_field) if recipe.eval_domain else domain
    with stage("load_model"):
        student = load_model(recipe.model, dtype=recipe.dtype, device=recipe.device)
        teacher = load_model(teacher_source, dtype=recipe.dtype, device=recipe.device)
        if len(teacher.tokenizer) != len(student.tokenizer):
            raise UsageError(
                f"teacher {teacher.source!r} and student {student.source!r} have different tokenizers "
                f"({len(teacher.tokenizer)} vs {len(student.tokenizer)} tokens)"
            )
    tok = student.tokenizer
    with stage("tokenize"):
        n = recipe.steps * recipe.batch_size
        train_blocks = training_blocks(tok, domain, general, n, recipe.block_len, recipe.mix, recipe.seed)
        held_out = held_out_data(tok, evaluated, general, recipe.eval_blocks, recipe.block_len, recipe.cloze_items)
    with stage("evaluate_before"):
        before, cached = evaluate_source(student, held_out, cache=cache)
    model: nn.Module = student.model
    masks = sparsity_masks(model)
    if recipe.lora:
        model = add_lora(model, recipe.lora, seed=recipe.seed)
        trainable = trainable_parameters(model)
    else:  # every parameter, the pruned matrices only where they are not zero: zeros stay zeros
        trainable = {n: masks.get(n) for n, _ in model.named_parameters()}
    assert recipe.lr is not None
    schedule = Schedule(
        steps=recipe.steps,
        lr=recipe.lr,
        batch_size=recipe.batch_size,
        micro_batch=recipe.micro_batch or _default_micro_batch(recipe.batch_size),
        warmup=recipe.warmup,
        checkpoint_every=recipe.checkpoint_every,
    )
    teacher.model.eval()

    def loss_fn(m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return model_distill_loss(m, teacher.model, ids, recipe.temperature, recipe.kd_weight, recipe.lm_weight)

    with stage("train"):
        result = train(
            model, train_blocks, loss_fn, trainable, schedule,
            checkpoint=ckpt, resume=resume, run=run_identity(recipe, student, train_blocks, RESUME_FREE),
            on_step=on_step, desc="distillation",
        )  # fmt: skip
    model.eval()
    if recipe.lora:
        model = model.merge_and_unload()  # type: ignore[operator]
        reapply_masks(model, masks)  # the merged update is masked too: zeros stay zeros
    student.model = model
    saved = round_to_saved(student, recipe.save_dtype)  # the "after" metrics are the saved model's
    with stage("evaluate_after"):
        after = metrics_of(model, held_out)
    dense = _dense_metrics(Path(recipe.model).expanduser() / MANIFEST_FILE, held_out.describe())
    manifest: dict[str, Any] = {
        **manifest_head("recover", student, recipe),
        "teacher": {"model": teacher.source, "fingerprint": teacher.fingerprint},
        "data": {"train": describe_blocks(train_blocks, recipe.mix), "eval": held_out.describe()},
        "training": result.describe(schedule, recipe.block_len),
        "sparsity": _sparsity_kept(model, masks),
        "metrics": {"dense": dense, "before": before, "after": after, "before_from_cache": cached},
        "size": {"parameters": count_parameters(model)},
        "saved": saved,
    }

    def files(tmp: Path) -> None:
        save_model_files(tmp, student.model, tok, manifest, saved["dtype"])

    write_output(out, overwrite, manifest, stage, files)
    return manifest
