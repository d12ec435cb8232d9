"""`carve unlearn-scenario`: a reproducible MUSE-style unlearning scenario built from offline text.

From a corpus (default the builtin `scripture`, one King James chapter a document), `documents`
documents are drawn with `seed`; `forget_share` of them form the forget set, `holdout_share` the
holdout set (text of the same kind the models never train on), the rest the retain set.  Then two
full fine-tunes of the model with the same settings, each `epochs` passes over non-overlapping
`block_len`-token blocks in a seeded order (ops.train, every parameter trained):

- `target/`: trained on forget + retain (the model to unlearn from);
- `retain-model/`: trained on retain only (the gold standard unlearning should approach, and
  PrivLeak's reference).

DIR holds forget.jsonl, retain.jsonl, holdout.jsonl, both models (each with its carve.json) and
scenario.json: the split, the settings, and the unlearning measures of the base, target and
retain models.  Each part is written atomically and a second call with the same settings reuses
what is there, so users and the bench start from the same point.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from carve.corpora import Corpus
from carve.engines.activations import bound_heap_retention
from carve.engines.gradient import next_token_loss
from carve.errors import UsageError
from carve.job import Stages, manifest_head, save_model_files, tensor_fingerprint, write_output
from carve.models import load_model
from carve.models.load import check_source
from carve.ops.train import Schedule, train
from carve.output import atomic_file, write_json
from carve.settings import check_types, flag
from carve.unlearn import UnlearnRecipe, corpus_blocks, unlearn_data, unlearn_metrics

PARTS = ("forget", "retain", "holdout")


@dataclass
class ScenarioRecipe:
    """Everything that decides the scenario; one field per `carve unlearn-scenario` flag."""

    model: str | None = flag("the base model: 'default' (embedded), a directory, a .gguf or a hub id", default=None)
    corpus: str = flag("documents to split: builtin corpus name or path", default="scripture")
    documents: int = flag("documents drawn from the corpus", default=30)
    forget_share: float = flag("share of the documents to forget", default=0.1)
    holdout_share: float = flag("share held out (never trained on)", default=0.1)
    epochs: int = flag("passes over the training documents", default=4)
    lr: float = flag("peak learning rate of the fine-tunes", default=1e-4)
    batch_size: int = flag("blocks per optimizer step", default=4)
    block_len: int = flag("tokens per training block", default=256)
    seed: int = flag("document draw and data order", default=0)
    text_field: str = flag("text field of .jsonl / .parquet / datasets corpora", default="text")
    dtype: str | None = flag("float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on CUDA)", default=None)
    device: str | None = flag("cpu, cuda, cuda:N (default: cuda when available)", default=None)

    def validate(self) -> None:
        check_types(self)
        check_source(self.model)
        for name in ("documents", "epochs", "batch_size", "block_len"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be a positive whole number, not {getattr(self, name)}")
        if (
            not 0 < self.forget_share < 1
            or not 0 < self.holdout_share < 1
            or self.forget_share + self.holdout_share >= 1
        ):
            raise UsageError("forget-share and holdout-share must be in (0, 1) and leave documents to retain")
        if self.lr <= 0:
            raise UsageError(f"lr must be positive, not {self.lr}")


def split_documents(recipe: ScenarioRecipe) -> dict[str, list[str]]:
    """The seeded draw of `documents` documents and their forget / holdout / retain split."""
    docs = Corpus(recipe.corpus, recipe.text_field).documents
    if len(docs) < recipe.documents:
        raise UsageError(
            f"corpus {recipe.corpus!r} has {len(docs)} documents, fewer than --documents {recipe.documents}"
        )
    drawn = random.Random(recipe.seed).sample(docs, recipe.documents)
    n_forget = max(1, round(recipe.forget_share * recipe.documents))
    n_holdout = max(1, round(recipe.holdout_share * recipe.documents))
    if n_forget + n_holdout >= recipe.documents:
        raise UsageError(f"{recipe.documents} documents leave none to retain: draw more with --documents")
    return {
        "forget": drawn[:n_forget],
        "holdout": drawn[n_forget : n_forget + n_holdout],
        "retain": drawn[n_forget + n_holdout :],
    }


def _epochs(blocks: torch.Tensor, epochs: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([blocks[torch.randperm(len(blocks), generator=gen)] for _ in range(epochs)])


def _fine_tune(recipe: ScenarioRecipe, files: list[Path], out: Path, role: str) -> None:
    """A full fine-tune of the base model on the documents of `files`, written to `out`."""
    stage = Stages()
    with stage("load_model"):
        lm = load_model(recipe.model, dtype=recipe.dtype, device=recipe.device)
    docs = [d for f in files for d in Corpus(str(f)).documents]
    blocks = corpus_blocks(Corpus(str(files[0])), lm.tokenizer, recipe.block_len, role, docs)
    rows = _epochs(blocks, recipe.epochs, recipe.seed)
    schedule = Schedule(steps=len(rows) // recipe.batch_size, lr=recipe.lr, batch_size=recipe.batch_size, warmup=5,
                        checkpoint_every=10**9)  # fmt: skip
    bound_heap_retention()
    with stage("train"):
        result = train(lm.model, rows, next_token_loss, dict.fromkeys(n for n, _ in lm.model.named_parameters()),
                       schedule, desc=f"scenario: {role}")  # fmt: skip
    lm.model.eval()
    manifest: dict[str, Any] = {
        **manifest_head("unlearn-scenario", lm, recipe),
        "role": role,
        "data": {
            "files": [f.name for f in files],
            "documents": len(docs),
            "blocks": len(blocks),
            "fingerprint": tensor_fingerprint(blocks),
        },
        "training": result.describe(schedule, recipe.block_len),
    }
    write_output(out, False, manifest, stage, lambda tmp: save_model_files(tmp, lm.model, lm.tokenizer, manifest))


def build_scenario(recipe: ScenarioRecipe, out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Build (or reuse) the scenario in `out`; returns scenario.json's content."""
    recipe.validate()
    root = Path(out).expanduser()
    settings = asdict(recipe)
    record = root / "scenario.json"
    if record.is_file():
        done = json.loads(record.read_text())
        if done.get("settings") == settings and not overwrite:
            return dict(done)
        if not overwrite:
            raise UsageError(f"{str(root)!r} holds a scenario with other settings: choose another --out or --overwrite")
    if root.exists() and overwrite:
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    split = split_documents(recipe)
    files = {k: root / f"{k}.jsonl" for k in PARTS}
    for k in PARTS:
        if not files[k].is_file():
            with atomic_file(files[k]) as tmp:
                tmp.write_text("".join(json.dumps({"text": d}) + "\n" for d in split[k]))
    models = {"target": [files["forget"], files["retain"]], "retain-model": [files["retain"]]}
    for role, parts in models.items():
        if not (root / role / "carve.json").is_file():
            _fine_tune(recipe, parts, root / role, role)
    measures = _measure(recipe, root, files)
    result = {
        "settings": settings,
        "split": {k: {"documents": len(split[k]), "fingerprint": Corpus(str(files[k])).fingerprint} for k in PARTS},
        "measures": measures,
    }
    write_json(record, result)
    return result


def _measure(recipe: ScenarioRecipe, root: Path, files: dict[str, Path]) -> dict[str, Any]:
    """The unlearning measures (carve unlearn's defaults) of the base, target and retain models."""
    from carve.evaluation.unlearning import privleak

    probe = UnlearnRecipe(forget=str(files["forget"]), retain=str(files["retain"]), holdout=str(files["holdout"]))
    out: dict[str, Any] = {}
    data = None  # the three models share the base's tokenizer: the probe data is made once
    for name, source in (("base", recipe.model), ("target", str(root / "target")),
                         ("retain_model", str(root / "retain-model"))):  # fmt: skip
        lm = load_model(source, dtype=recipe.dtype, device=recipe.device)
        if data is None:
            data, _ = unlearn_data(lm.tokenizer, probe)
        out[name] = unlearn_metrics(lm.model, lm.tokenizer, data)
        del lm
    ref = out["retain_model"]["mia_auc"]
    for m in out.values():
        m["privleak"] = round(privleak(m["mia_auc"], ref), 4)
    return out
