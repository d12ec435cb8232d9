"""The job skeleton every job shares: load → data → evaluate (cached for an unchanged source) →
op → evaluate → save, with one manifest head, one way to time stages and one atomic output.

- `held_out_data` / `metrics_of`: the fixed evaluation set and the metrics on it.
- `evaluate_source`: the source model's "before" metrics, cached under the user's cache
  directory by (model fingerprint, held-out data fingerprints, dtype and device, carve version),
  so a second job on the same model and data skips that evaluation (`cache=False`: measure anew).
- `manifest_head`, `save_model_files`, `Stages`, `peak_rss_mb`: the parts of every carve.json.
"""

from __future__ import annotations

import hashlib
import json
import platform
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from carve import distributed
from carve.corpora import Corpus
from carve.errors import UsageError
from carve.evaluation import ClozeTask, build_cloze, cloze_accuracy, perplexity
from carve.models import LoadedModel
from carve.models.load import first_parameter
from carve.output import (
    atomic_output_dir,
    cache_dir,
    check_output,
    claim,
    remove_dead_temporaries,
    source_digest,
    write_json,
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Stages:
    """Wall time per named stage, and the process's peak RSS when each stage ended (the peak so
    far: a stage's own peak is the first to reach the value)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.rss_mb: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t, 3)
        self.rss_mb[name] = round(peak_rss_mb(), 1)

    def record(self, manifest: dict[str, Any]) -> None:
        """The timings and memory sections of a manifest, as of now."""
        manifest["timings_s"], manifest["peak_rss_mb"] = dict(self.seconds), round(peak_rss_mb(), 1)
        manifest["peak_rss_after_stage_mb"] = dict(self.rss_mb)


def tensor_fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()[:16]


def calibration_data(
    tokenizer: Any, domain: Corpus, general: Corpus, n: int, length: int, mix: float, seed: int
) -> torch.Tensor:
    """`n` blocks: round(mix·n) from the general corpus, the rest from the domain."""
    n_general = round(mix * n)
    parts = [
        domain.calibration_blocks(tokenizer, n - n_general, length, seed),
        general.calibration_blocks(tokenizer, n_general, length, seed + 1),
    ]
    return torch.cat([p for p in parts if p.numel()])


@dataclass
class EvalData:
    """The fixed evaluation set: held-out perplexity blocks per corpus, the domain cloze task."""

    blocks: dict[str, tuple[str, torch.Tensor]]  # "domain"|"general" -> (corpus name, [n, L])
    cloze: ClozeTask | None = None
    cloze_note: str = ""  # why there is no cloze task, if there is none

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            key: {"blocks": len(b), "block_len": b.shape[1], "fingerprint": tensor_fingerprint(b)}
            for key, (_name, b) in self.blocks.items()
        }
        if self.cloze is not None:
            out["domain_cloze"] = {"items": len(self.cloze.answers), "fingerprint": self.cloze.fingerprint()}
        elif self.cloze_note:
            out["domain_cloze"] = {"skipped": self.cloze_note}
        return out


def held_out_data(
    tokenizer: Any, domain: Corpus, general: Corpus, blocks: int, block_len: int, cloze_items: int = 100
) -> EvalData:
    """The first `blocks` held-out blocks of each corpus and `cloze_items` domain cloze items:
    the same for every model evaluated with the same corpora and settings.  A domain with too
    little held-out text for a cloze task is evaluated by perplexity alone (the reason is kept)."""
    data = EvalData(
        {
            key: (c.name, c.eval_blocks(tokenizer, blocks, block_len))
            for key, c in (("domain", domain), ("general", general))
        }
    )
    if cloze_items > 0:
        try:
            data.cloze = build_cloze(domain, tokenizer, cloze_items)
        except UsageError as exc:
            data.cloze_note = str(exc)
    return data


def metrics_of(model: Any, data: EvalData) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (name, blocks) in data.blocks.items():
        out[f"{key}_ppl"] = round(perplexity(model, blocks, desc=f"perplexity ({name})"), 4)
        out[f"{key}_eval_blocks"] = len(blocks)
        out["block_len"] = blocks.shape[1]
    if data.cloze is not None:
        out["domain_cloze"] = cloze_accuracy(model, data.cloze)
    return out


def evaluate(
    model: LoadedModel,
    domain: str | Corpus = "legal",
    general: str | Corpus = "general",
    *,
    blocks: int = 32,
    block_len: int = 512,
    cloze_items: int = 100,
) -> dict[str, Any]:
    """Domain and general perplexity on the first `blocks` held-out blocks of `block_len` tokens,
    and accuracy on `cloze_items` held-out domain cloze items (0: none)."""
    dom = domain if isinstance(domain, Corpus) else Corpus(domain)
    gen = general if isinstance(general, Corpus) else Corpus(general)
    return metrics_of(model.model, held_out_data(model.tokenizer, dom, gen, blocks, block_len, cloze_items))


def manifest_start(job: str, source: str, fingerprint: str) -> dict[str, Any]:
    """The first entries of every carve.json: what job, when, with which versions, on what."""
    return {
        "carve_manifest": 1,
        "job": job,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
        "source": {"model": source, "fingerprint": fingerprint},
    }


def manifest_head(job: str, lm: LoadedModel, recipe: Any) -> dict[str, Any]:
    """`manifest_start` of a job on a loaded model, with its recipe."""
    return {**manifest_start(job, lm.source, lm.fingerprint), "recipe": asdict(recipe)}


SAVE_DTYPES = ("float32", "bfloat16", "float16")
SAVE_DTYPE_HELP = "dtype of the saved weights (default: the source's own precision; bfloat16 for a quantized GGUF)"


def round_to_saved(lm: LoadedModel, choice: str | None) -> dict[str, Any]:
    """Decide the saved dtype (`choice`, else the source's precision) and round the model's weights
    to it in place, kept in the dtype they compute in, so the metrics measured next are the saved
    model's.  Returns the manifest's `saved` section."""
    name = choice or lm.source_dtype
    target = getattr(torch, name)
    compute = first_parameter(lm.model).dtype
    if target not in (compute, torch.float32):  # to float32 saving is exact: nothing to round
        with torch.no_grad():
            for p in lm.model.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(target).to(compute)
    how = f"on the weights as saved ({name}), computed in {str(compute).removeprefix('torch.')}"
    return {"dtype": name, "metrics_measured": how}


def save_model_files(
    tmp: Path, model: Any, tokenizer: Any, manifest: dict[str, Any], dtype: str | None = None, sparse: bool = False
) -> None:
    """Model and tokenizer into an output being written, the weights in `dtype` (None: as they are):
    plain safetensors, or carve's sparse format (models/sparse.py); its size into the manifest."""
    compute = first_parameter(model).dtype
    target = getattr(torch, dtype) if dtype else compute
    if sparse:
        from carve.models.sparse import save_sparse_model

        manifest.setdefault("size", {})["sparse"] = save_sparse_model(tmp, model, target)
    else:
        model.to(target)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            model.to(compute)  # the caller's model as it was (a rounded model casts back exactly)
    tokenizer.save_pretrained(tmp)
    size = sum(f.stat().st_size for f in tmp.glob("model*.safetensors"))
    manifest.setdefault("size", {})["file_mb"] = round(size / 2**20, 2)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    from carve import __version__

    return {
        "carve": __version__,
        "carve_source": source_digest(),  # a digest of its .py files: code that differs, same version
        "torch": torch.__version__,
        "transformers": version("transformers"),  # its metadata: importing it takes ~0.5 s
        "python": platform.python_version(),
    }


def training_blocks(
    tokenizer: Any, domain: Corpus, general: Corpus, n: int, length: int, mix: float, seed: int
) -> torch.Tensor:
    """`n` training blocks of `length` tokens (round(mix·n) general), in an order shuffled with `seed`."""
    blocks = calibration_data(tokenizer, domain, general, n, length, mix, seed)
    return blocks[torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))]


def describe_blocks(blocks: torch.Tensor, mix: float) -> dict[str, Any]:
    """A manifest's record of a set of token blocks: enough to rebuild and check them."""
    return {
        "blocks": len(blocks),
        "general_blocks": round(mix * len(blocks)),
        "block_len": blocks.shape[1],
        "tokens": int(blocks.numel()),
        "fingerprint": tensor_fingerprint(blocks),
    }


def write_output(
    out: str | Path, overwrite: bool, manifest: dict[str, Any], stage: Stages, files: Callable[[Path], None]
) -> None:
    """The one writer of every job's output: `files(tmp)` and carve.json into a temporary
    directory, published by one rename (a crash leaves the old output or the new one).  Under
    torch.distributed rank 0 alone writes; every rank's manifest gets its timings and peak RSS."""
    if not distributed.writes():
        stage.record(manifest)
        return
    with atomic_output_dir(out, overwrite) as tmp:
        with stage("save"):
            files(tmp)
        stage.record(manifest)
        write_json(tmp / "carve.json", manifest)


@contextmanager
def training_output(out: str | Path, overwrite: bool, resume: bool) -> Iterator[Path]:
    """A training job's hold on its output and checkpoint for the whole run (`output.claim`:
    checked, locked, an interrupted run's leftovers removed); yields the checkpoint directory,
    which is removed once the block completes (the output is then written)."""
    from carve.ops.train import check_checkpoint, checkpoint_dir, remove_checkpoint

    if not distributed.writes():  # under torch.distributed rank 0 alone claims, checks and writes
        yield checkpoint_dir(out)
        return
    with claim(out, checkpoint_dir(out)):
        check_output(out, overwrite)
        ckpt = check_checkpoint(out, resume, overwrite)
        yield ckpt
        remove_checkpoint(ckpt)


def run_identity(recipe: Any, lm: LoadedModel, blocks: torch.Tensor, free: tuple[str, ...]) -> dict[str, Any]:
    """What a resumed training run must share with the run that wrote the checkpoint: the recipe
    (but the fields in `free`, which do not change the training), the model and the training data."""
    fields = {k: v for k, v in asdict(recipe).items() if k not in free}
    return {**fields, "model_fingerprint": lm.fingerprint, "train_fingerprint": tensor_fingerprint(blocks)}


def evaluation_key(lm: LoadedModel, data: Any) -> str:
    """What the source model's metrics depend on: the weights, the held-out data, the dtype and
    device they were computed in, and the code (`versions`: carve's source, not only its version
    string, torch's and transformers')."""
    param = first_parameter(lm.model)
    what = [lm.fingerprint, data.describe(), str(param.dtype), param.device.type, versions()]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def evaluate_source(
    lm: LoadedModel, data: Any, cache: bool = True, measure: Callable[[Any], dict[str, Any]] | None = None
) -> tuple[dict[str, Any], bool]:
    """The metrics of the freshly loaded source model on `data`, and whether they came from the
    cache.  A cached entry is used only when its key matches; an unreadable one is measured anew.
    `measure(model)`: a job's own measures (default `metrics_of` on `data`, an EvalData); `data`
    is whatever they read, its `describe()` part of the cache key."""
    path = cache_dir() / "eval" / f"{evaluation_key(lm, data)}.json"
    if cache and path.is_file():
        try:
            return dict(json.loads(path.read_text())["metrics"]), True
        except (ValueError, KeyError, OSError):
            pass
    metrics = measure(lm.model) if measure is not None else metrics_of(lm.model, data)
    if cache:
        try:
            if path.parent.is_dir():
                remove_dead_temporaries(path.parent)  # entries a killed job was writing
            write_json(path, {"source": lm.source, "fingerprint": lm.fingerprint, "metrics": metrics})
        except OSError:  # a read-only cache directory costs the next job a re-evaluation, no more
            pass
    return metrics, False
