"""`carve unlearn`: make a model forget a corpus (a licensed book, a customer's documents, personal
data) while keeping the rest, updating only the weights that carry it (SalUn, WAGLE, an importance
map) or, as baselines, random weights or every weight.

Steps: load → the forget, retain and holdout blocks and the fixed measures' data → measure the
source (cached) and the reference (retain) model if given → the updatable weights (ops.unlearn's
masks) → `steps` masked AdamW steps of the objective (GA, GradDiff, NPO; ops.unlearn) in the shared
training loop (ops.train: frozen weights bitwise unchanged, checkpoints, resume) → measure → save.

Measures (evaluation/unlearning.py), before and after, all in the manifest: forget perplexity,
verbatim ROUGE-L of greedy continuations of forget passages, min-k% MIA AUC of forget against
holdout passages and PrivLeak against `reference`, holdout, retain and general perplexity, retain
cloze accuracy.  The forget, retain and holdout corpora are used whole (no held-out split: the forget
set is the very text to forget).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from carve.corpora import Corpus
from carve.engines.activations import bound_heap_retention
from carve.errors import UsageError
from carve.evaluation import build_cloze, cloze_accuracy, perplexity
from carve.evaluation.unlearning import MIN_K, mia_auc, privleak, verbatim_rouge
from carve.job import (
    SAVE_DTYPE_HELP,
    SAVE_DTYPES,
    Stages,
    evaluate_source,
    manifest_head,
    round_to_saved,
    run_identity,
    save_model_files,
    tensor_fingerprint,
    training_output,
    write_output,
)
from carve.models import LoadedModel, load_model
from carve.models.arch import DEFAULT_EXCLUDE
from carve.models.load import check_source, first_parameter
from carve.ops.train import Schedule, train
from carve.ops.unlearn import OBJECTIVES, RETAIN_LOSSES, MaskSpec, Objective, pack_rows, summed_nll, unlearn_mask
from carve.settings import Targets, check_types, flag

RESUME_FREE = ("eval_blocks", "cloze_items", "verbatim_items", "checkpoint_every", "save_dtype", "device", "reference",
               "eval_every")  # fmt: skip


@dataclass
class UnlearnRecipe:
    """Everything that decides an unlearning run; one field per `carve unlearn` flag."""

    model: str | None = flag("the model to unlearn from: a directory, a .gguf, a hub id or 'default'", default=None)
    forget: str = flag("the text to forget: builtin corpus name or path (used whole)", default="")
    retain: str = flag("text to keep: builtin corpus name or path (used whole)", default="")
    holdout: str | None = flag("text like the forget set that the model never saw (membership inference)", default=None)
    general: str = flag("open-domain corpus for general perplexity: builtin name or path", default="general")
    reference: str | None = flag("a retain model (trained without the forget set): PrivLeak's reference", default=None)
    objective: str = flag("ga (gradient ascent), graddiff or npo", default="npo", choices=OBJECTIVES)
    retain_loss: str = flag("retain term of graddiff and npo: nll, or kl to the original model", default="nll",
                            choices=RETAIN_LOSSES)  # fmt: skip
    alpha: float = flag("weight of the retain term", default=1.0)
    beta: float = flag("npo's inverse temperature β", default=0.1)
    mask: str = flag("which weights change: salun, wagle, fisher (carve's forget-set importance), random, none "
                     "(every targeted weight) or importance:FILE",
                     default="salun")  # fmt: skip
    density: float = flag("share of the targeted weights updated (every mask but none)", default=0.5)
    mu: float = flag("wagle: the Hessian-diagonal constant μ of the retain term", default=1e-6)
    mask_blocks: int = flag("forget (and, for wagle, retain) blocks of the saliency gradient pass", default=32)
    steps: int = flag("optimizer steps", default=30)
    batch_size: int = flag("rows (a forget and a retain block each) per optimizer step", default=2)
    micro_batch: int = flag("rows per forward/backward (gradient accumulation)", default=1)
    block_len: int = flag("tokens per forget/retain block", default=256)
    lr: float = flag("peak learning rate", default=2e-5)
    warmup: int = flag("linear warm-up steps, then cosine decay to 10%", default=0)
    checkpoint_every: int = flag("steps between checkpoints", default=50)
    mia_len: int = flag("tokens per membership-inference passage", default=128)
    min_k: float = flag("min-k% share of a passage's lowest token log-probs", default=MIN_K)
    verbatim_items: int = flag("forget passages whose greedy continuation is scored (ROUGE-L)", default=32)
    prompt_len: int = flag("verbatim: prompt tokens (the continuation is as long)", default=32)
    eval_blocks: int = flag("blocks for retain and general perplexity", default=16)
    cloze_items: int = flag("retain cloze items (0: skip)", default=100)
    eval_every: int = flag("measure forget, retain and general perplexity and the MIA AUC every N steps, to see "
                           "where to stop (0: before and after only)", default=0)  # fmt: skip
    stop_privleak: float | None = flag("stop at the first measure (--eval-every) whose PrivLeak against "
                                       "--reference is at or below this, e.g. 0.05: within the band around the "
                                       "retain model's 0 (default: train every step)", default=None)  # fmt: skip
    seed: int = flag("data order and the random mask", default=0)
    include: list[str] = flag("glob patterns of Linear modules that may change", factory=lambda: ["*"])
    exclude: list[str] = flag("glob patterns left frozen", factory=lambda: list(DEFAULT_EXCLUDE))
    text_field: str = flag("text field of .jsonl / .parquet / datasets corpora", default="text")
    dtype: str | None = flag("float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)", default=None)
    device: str | None = flag("cpu, cuda, cuda:N (default: cuda when available)", default=None)
    save_dtype: str | None = flag(SAVE_DTYPE_HELP, choices=SAVE_DTYPES)

    def validate(self) -> MaskSpec:
        check_types(self)
        check_source(self.model)
        if not self.forget or not self.retain:
            raise UsageError("unlearning needs --forget CORPUS (the text to forget) and --retain CORPUS (text to keep)")
        spec = MaskSpec.parse(self.mask)
        whole = ("steps", "batch_size", "micro_batch", "block_len", "checkpoint_every", "mia_len", "mask_blocks")
        for name in (*whole, "eval_blocks", "prompt_len"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be a positive whole number, not {getattr(self, name)}")
        if not 0 < self.density <= 1:
            raise UsageError(f"density {self.density} is outside (0, 1]: the share of the targeted weights updated")
        if not 0 < self.min_k <= 1:
            raise UsageError(f"min-k {self.min_k} is outside (0, 1]")
        if self.batch_size % self.micro_batch:
            raise UsageError(f"batch-size {self.batch_size} is not a multiple of micro-batch {self.micro_batch}")
        if self.lr <= 0 or self.beta <= 0 or self.mu <= 0 or self.alpha < 0 or self.warmup < 0:
            raise UsageError("lr, beta and mu must be positive, alpha and warmup not negative")
        if self.verbatim_items < 0 or self.cloze_items < 0 or self.eval_every < 0:
            raise UsageError("verbatim-items, cloze-items and eval-every must not be negative")
        if self.stop_privleak is not None and not (self.reference and self.eval_every):
            raise UsageError("--stop-privleak needs --reference (PrivLeak's retain model) and --eval-every N "
                             "(how often PrivLeak is measured)")  # fmt: skip
        return spec

    def schedule(self) -> Schedule:
        return Schedule(
            steps=self.steps, lr=self.lr, batch_size=self.batch_size, micro_batch=self.micro_batch,
            warmup=self.warmup, checkpoint_every=self.checkpoint_every,
        )  # fmt: skip


@dataclass
class UnlearnData:
    """The blocks an unlearning run trains on and the fixed data of its measures."""

    forget: torch.Tensor  # [nf, block_len]: trained on, forget perplexity
    retain: torch.Tensor  # [nr, block_len]: trained on; the first eval_blocks give retain perplexity
    forget_passages: torch.Tensor  # [n, mia_len]
    holdout_passages: torch.Tensor | None  # [m, mia_len]
    verbatim: torch.Tensor  # [k, 2·prompt_len] forget windows
    general: torch.Tensor  # [g, block_len] held-out general blocks
    eval_blocks: int
    prompt_len: int
    min_k: float
    cloze: Any = None  # the retain corpus's cloze task
    names: dict[str, str] | None = None

    def describe(self) -> dict[str, Any]:
        parts = {"forget": self.forget, "retain": self.retain, "forget_passages": self.forget_passages,
                 "verbatim": self.verbatim, "general": self.general}  # fmt: skip
        if self.holdout_passages is not None:
            parts["holdout_passages"] = self.holdout_passages
        out: dict[str, Any] = {
            k: {"shape": list(v.shape), "fingerprint": tensor_fingerprint(v)} for k, v in parts.items()
        }
        out["measures"] = {"eval_blocks": self.eval_blocks, "prompt_len": self.prompt_len, "min_k": self.min_k}
        if self.cloze is not None:
            out["retain_cloze"] = {"items": len(self.cloze.answers), "fingerprint": self.cloze.fingerprint()}
        return {"unlearn": out}


def corpus_blocks(
    corpus: Corpus, tokenizer: Any, length: int, what: str, documents: list[str] | None = None
) -> torch.Tensor:
    """Every document of `corpus` (or the given `documents`) as non-overlapping `length`-token
    blocks (the tail shorter than a block is left out); a clear error when there is not one block."""
    ids = corpus.tokens(corpus.documents if documents is None else documents, tokenizer)
    count = ids.numel() // length
    if count == 0:
        raise UsageError(f"{what} corpus {corpus.spec!r} has {ids.numel()} tokens, fewer than one block of {length}")
    return ids[: count * length].view(count, length)


def unlearn_data(tokenizer: Any, recipe: UnlearnRecipe) -> tuple[UnlearnData, dict[str, Corpus]]:
    corpora = {k: Corpus(v, recipe.text_field) for k, v in (("forget", recipe.forget), ("retain", recipe.retain))}
    if recipe.holdout:
        corpora["holdout"] = Corpus(recipe.holdout, recipe.text_field)
    corpora["general"] = Corpus(recipe.general, recipe.text_field)
    if corpora["forget"].fingerprint == corpora["retain"].fingerprint:
        raise UsageError("the forget and retain corpora are the same text: unlearning would undo itself")
    if "holdout" in corpora and corpora["holdout"].fingerprint == corpora["forget"].fingerprint:
        raise UsageError("the holdout corpus is the forget corpus: membership inference needs unseen text")
    forget = corpus_blocks(corpora["forget"], tokenizer, recipe.block_len, "forget")
    retain = corpus_blocks(corpora["retain"], tokenizer, recipe.block_len, "retain")
    passages = corpus_blocks(corpora["forget"], tokenizer, recipe.mia_len, "forget")
    holdout = corpus_blocks(corpora["holdout"], tokenizer, recipe.mia_len, "holdout") if recipe.holdout else None
    verbatim = corpus_blocks(corpora["forget"], tokenizer, 2 * recipe.prompt_len, "forget")[: recipe.verbatim_items]
    cloze = None
    if recipe.cloze_items:
        whole = Corpus(recipe.retain, recipe.text_field, eval_share=1.0)  # every retain document may give items
        try:
            cloze = build_cloze(whole, tokenizer, recipe.cloze_items)
        except UsageError:
            cloze = None
    data = UnlearnData(
        forget, retain, passages, holdout, verbatim,
        corpora["general"].eval_blocks(tokenizer, recipe.eval_blocks, recipe.block_len),
        recipe.eval_blocks, recipe.prompt_len, recipe.min_k, cloze,
    )  # fmt: skip
    return data, corpora


TRAJECTORY = ("forget_ppl", "retain_ppl", "general_ppl", "mia_auc", "privleak")


def trajectory_metrics(model: Any, data: UnlearnData) -> dict[str, Any]:
    """The measures taken along training (`eval_every`): forget, retain and general perplexity and the
    MIA AUC, the cheap ones (no generation, no cloze)."""
    out: dict[str, Any] = {
        "forget_ppl": round(perplexity(model, data.forget, desc="perplexity (forget)"), 4),
        "retain_ppl": round(perplexity(model, data.retain[: data.eval_blocks], desc="perplexity (retain)"), 4),
        "general_ppl": round(perplexity(model, data.general, desc="perplexity (general)"), 4),
    }
    if data.holdout_passages is not None:
        out["mia_auc"] = round(mia_auc(model, data.forget_passages, data.holdout_passages, data.min_k), 4)
    return out


def unlearn_metrics(model: Any, tokenizer: Any, data: UnlearnData) -> dict[str, Any]:
    """Every measure of the module docstring on `model` (PrivLeak is added once a reference AUC is known)."""
    out = trajectory_metrics(model, data)
    if len(data.verbatim):
        out["verbatim_rougeL"] = round(verbatim_rouge(model, tokenizer, data.verbatim, data.prompt_len), 4)
    if data.holdout_passages is not None:
        out["holdout_ppl"] = round(perplexity(model, data.holdout_passages, desc="perplexity (holdout)"), 4)
    if data.cloze is not None:
        out["retain_cloze"] = cloze_accuracy(model, data.cloze)
    return out


def _with_privleak(metrics: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    if reference and "mia_auc" in metrics and "mia_auc" in reference:
        return {**metrics, "privleak": round(privleak(metrics["mia_auc"], reference["mia_auc"]), 4)}
    return metrics


def unlearn(
    recipe: UnlearnRecipe,
    out: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    cache: bool = True,
    on_step: Any = None,
) -> dict[str, Any]:
    """Run the unlearning; write the model, tokenizer and carve.json to `out`."""
    spec = recipe.validate()
    if recipe.reference:
        check_source(recipe.reference)
    with training_output(out, overwrite, resume) as ckpt:
        return _unlearn(recipe, spec, out, ckpt, overwrite, resume, cache, on_step)


def _measured(lm: LoadedModel, data: UnlearnData, cache: bool) -> tuple[dict[str, Any], bool]:
    return evaluate_source(lm, data, cache=cache, measure=lambda m: unlearn_metrics(m, lm.tokenizer, data))


def _unlearn(
    recipe: UnlearnRecipe, spec: MaskSpec, out: str | Path, ckpt: Path, overwrite: bool, resume: bool,
    cache: bool, on_step: Any,
) -> dict[str, Any]:  # fmt: skip
    stage = Stages()
    with stage("load_model"):
        lm = load_model(recipe.model, dtype=recipe.dtype, device=recipe.device)
    with stage("load_data"):
        data, corpora = unlearn_data(lm.tokenizer, recipe)
    reference = None
    if recipe.reference:
        with stage("evaluate_reference"):
            ref = load_model(recipe.reference, dtype=recipe.dtype, device=recipe.device)
            reference, _ = _measured(ref, data, cache)
            del ref
    with stage("evaluate_before"):
        before, cached = _measured(lm, data, cache)
    targets = Targets.of(recipe.include, recipe.exclude)
    bound_heap_retention()
    with stage("select"):
        trainable = unlearn_mask(
            lm.model, spec, recipe.density, targets, data.forget[: recipe.mask_blocks],
            data.retain[: recipe.mask_blocks], mu=recipe.mu, seed=recipe.seed, model_fingerprint=lm.fingerprint,
        )  # fmt: skip
    objective = _objective(recipe, lm, data)
    rows = pack_rows(data.forget, data.retain, recipe.steps * recipe.batch_size, recipe.seed)
    schedule = recipe.schedule()
    trajectory: list[dict[str, Any]] = []

    def after_step(done: int) -> bool:
        measured = bool(recipe.eval_every) and done % recipe.eval_every == 0 and done < recipe.steps
        if measured:
            lm.model.eval()  # the training loop's mode is restored below; no randomness is drawn
            trajectory.append({"step": done, **_with_privleak(trajectory_metrics(lm.model, data), reference)})
            lm.model.train()
        if on_step is not None:
            on_step(done)
        level = recipe.stop_privleak
        return measured and level is not None and trajectory[-1]["privleak"] <= level

    with stage("train"):
        result = train(
            lm.model, rows, objective, trainable, schedule, checkpoint=ckpt, resume=resume,
            run=run_identity(recipe, lm, rows, RESUME_FREE), on_step=after_step,
            desc=f"unlearning ({recipe.objective})",
        )  # fmt: skip
    objective.reference = None
    lm.model.eval()
    saved = round_to_saved(lm, recipe.save_dtype)
    with stage("evaluate_after"):
        after = unlearn_metrics(lm.model, lm.tokenizer, data)
    if recipe.eval_every:  # the curve ends at the run's own after-measures
        last = _with_privleak(after, reference)
        point = {"step": result.stopped_at or recipe.steps, **{k: last[k] for k in TRAJECTORY if k in last}}
        if trajectory and trajectory[-1]["step"] == point["step"]:  # stopped there: the same model, measured again
            trajectory[-1] = point
        else:
            trajectory.append(point)
    updated = sum(p.numel() if k is None else int(k.sum()) for p, k in _masked(lm, trainable))
    manifest: dict[str, Any] = {
        **manifest_head("unlearn", lm, recipe),
        "data": {**{k: c.describe() for k, c in corpora.items()}, "blocks": data.describe()["unlearn"]},
        "mask": {
            "kind": spec.kind,
            "file": spec.path,
            "density": recipe.density if spec.kind != "none" else 1.0,
            "updatable_parameters": updated,
            "targeted_matrices": len(trainable),
        },
        "training": result.describe(schedule, recipe.block_len),
        "metrics": {
            "before": _with_privleak(before, reference),
            "after": _with_privleak(after, reference),
            "reference": _with_privleak(reference, reference) if reference else None,
            "reference_model": recipe.reference,
            "before_from_cache": cached,
            "trajectory": trajectory if recipe.eval_every else None,
        },
        "saved": saved,
    }
    write_output(out, overwrite, manifest, stage, lambda tmp: save_model_files(tmp, lm.model, lm.tokenizer, manifest,
                                                                                saved["dtype"]))  # fmt: skip
    return manifest


def _masked(lm: LoadedModel, trainable: dict[str, torch.Tensor | None]) -> list[tuple[torch.Tensor, Any]]:
    params = dict(lm.model.named_parameters())
    return [(params[n], k) for n, k in trainable.items()]


def _objective(recipe: UnlearnRecipe, lm: LoadedModel, data: UnlearnData) -> Objective:
    reference_nll = None
    if recipe.objective == "npo":
        with torch.no_grad():
            reference_nll = summed_nll(lm.model, data.forget.to(first_parameter(lm.model).device)).detach().cpu()
    teacher = None
    if recipe.objective != "ga" and recipe.retain_loss == "kl":
        import copy

        teacher = copy.deepcopy(lm.model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    return Objective(recipe.objective, recipe.block_len, recipe.alpha, recipe.beta, recipe.retain_loss,
                     reference_nll, teacher)  # fmt: skip
