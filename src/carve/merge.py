"""`carve merge`: task models (experts fine-tuned from one base) merged into one model, streamed
tensor by tensor (models/stream.py) with the methods of ops/merge.py; a mergekit YAML config is
read as the same recipe.  The output is a Hugging Face directory (the base's config and tokenizer,
the merged weights) with a carve.json that records the inputs' fingerprints, the method, its
parameters and, unless `--eval-blocks 0`, each task's perplexity before (base, expert) and after.
"""

from __future__ import annotations

import math
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from carve.errors import UsageError
from carve.job import SAVE_DTYPE_HELP, SAVE_DTYPES, Stages, manifest_start
from carve.models.stream import StreamWriter, TensorSource
from carve.ops.merge import METHODS, Method, combine, gram_mean, random_keep, sparsified, statistic_mean
from carve.settings import check_types, flag

RESCALES = ("inverse", "l1", "none")
DEFAULT_DENSITY = 0.2  # the share of each task vector the sparsifying methods keep unless told
# the tokenizer and config files copied from the base into the merged model
_BASE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
               "chat_template.jinja")  # fmt: skip


@dataclass
class MergeRecipe:
    """Everything that decides a merge; one field per `carve merge` flag."""

    base: str | None = flag("the base model the experts were fine-tuned from (a directory)", default=None)
    experts: list[str] = flag("NAME=DIR, one per expert (NAME: its domain, a builtin corpus or a path)", factory=list)
    method: str = flag("how the task vectors are merged", default="ties", choices=tuple(METHODS))
    density: list[float] = flag(
        "share of each task vector kept (one value, or one per expert); TIES top-k, DARE 1 - drop rate; "
        f"default {DEFAULT_DENSITY} (regmean and fisher weigh every entry: 1, and no other value)",
        factory=list,
    )
    weights: list[float] = flag(
        "weight of each expert's task vector (one value, or one per expert)", factory=lambda: [1.0]
    )
    lam: float = flag("λ: the merged task vector's scale", default=1.0, name="--lambda")
    gamma: float = flag("breadcrumbs: share of the largest entries dropped as outliers", default=0.01)
    rescale: str | None = flag(
        "rescale what a sparsification kept: by 1/density (inverse), to τ's L1 norm (l1, mergekit's), or none "
        "(default: inverse for DARE, none otherwise)",
        default=None,
        choices=RESCALES,
    )
    normalize: bool | None = flag(
        "divide by the summed weights of the entries kept (default: the method's)", default=None
    )
    importance: list[str] = flag(
        "NAME=FILE: an expert's importance map for the importance method (default: carve computes each expert's "
        "Fisher error of reverting its task vector on its domain)",
        factory=list,
    )
    data_blocks: int = flag(
        "the data-driven methods (importance's computed maps, regmean's Gram matrices, fisher's diagonals): blocks "
        "(of --block-len tokens) of each expert's domain",
        default=32,
        aliases=("--importance-blocks",),
    )
    regmean_alpha: float = flag(
        "regmean: the scale of the Gram matrices' off-diagonal entries (1: plain RegMean)", default=1.0
    )
    seed: int = flag("DARE's random drop", default=0)
    tall: bool = flag(
        "also write TALL masks (one bit per weight per task, λ_t chosen on held-out blocks)", default=False
    )
    select_blocks: int = flag(
        "TALL / Consensus: held-out blocks per domain that choose λ_t, the ones after the --eval-blocks evaluated "
        "(fewer where the split ends sooner), so no perplexity is measured on the blocks that chose λ_t",
        default=8,
    )
    consensus: int = flag("Consensus merging: keep only what at least K tasks' TALL masks select (0: off)", default=0)
    save_dtype: str | None = flag(SAVE_DTYPE_HELP, choices=SAVE_DTYPES)
    domains: list[str] = flag("the domain each expert is evaluated on, one per expert (default: the experts' names)",
                              factory=list)  # fmt: skip
    eval_blocks: int = flag("held-out blocks per domain for the per-task perplexities (0: no evaluation)", default=16)
    block_len: int = flag("tokens per eval block", default=512)
    general: str = flag("open-domain corpus for general perplexity", default="general")
    origin: dict[str, Any] = field(default_factory=dict)  # where the recipe came from (a mergekit config)

    def expert_dirs(self) -> dict[str, Path]:
        return _named(self.experts, "--expert", "legal=out/legal-ft")

    def domain_of(self) -> dict[str, str]:
        """Each expert's evaluation domain: `--domains` in expert order, else its name."""
        names = list(self.expert_dirs())
        return dict(zip(names, self.domains or names, strict=True))

    def resolved(self) -> MergeRecipe:
        """The recipe checked, one density and weight per expert; a UsageError before any work."""
        check_types(self)
        if self.base is None:
            raise UsageError("--base is needed: the model the experts were fine-tuned from")
        experts = self.expert_dirs()
        if not experts:
            raise UsageError("no experts: give --expert NAME=DIR once per expert")
        if not Path(self.base).expanduser().is_dir():
            raise UsageError(f"base {self.base!r} is not a model directory (the embedded default: write it as one "
                             "with `carve convert default --out DIR --save-dtype float32`)")  # fmt: skip
        for name, d in experts.items():
            if not d.is_dir():
                raise UsageError(f"{name} {str(d)!r} is not a model directory")
        if not 0 <= self.gamma < 1:
            raise UsageError(f"gamma {self.gamma} is outside [0, 1): the share of outliers Breadcrumbs drops")
        n = len(experts)
        statistic = METHODS[self.method].statistic
        if statistic is not None and any(d != 1 for d in self.density):
            what = "Gram matrices" if statistic == "gram" else "Fisher diagonals"
            raise UsageError(f"{self.method} merges every entry of the task vectors, weighted by the experts' {what}: "
                             "--density does not apply")  # fmt: skip
        given = self.density or [1.0 if statistic is not None else DEFAULT_DENSITY]
        density, weights = _per_expert(given, n, "density"), _per_expert(self.weights, n, "weights")
        bad = [d for d in density if not 0 < d <= 1 or not math.isfinite(d)]
        if bad:
            raise UsageError(f"density {bad[0]} is outside (0, 1]: the share of each task vector kept")
        maps = _named(self.importance, "--importance", "legal=importance.safetensors")
        if maps and (self.method != "importance" or set(maps) != set(experts)):
            raise UsageError("--importance NAME=FILE is for the importance method: give it for every expert, or for "
                             "none (carve then computes each expert's map on its domain)")  # fmt: skip
        computes_maps = (self.method == "importance" and not maps) or statistic is not None
        if computes_maps and self.data_blocks < 1:
            raise UsageError("--data-blocks must be at least 1")
        if not 0 <= self.regmean_alpha <= 1:
            raise UsageError(f"regmean-alpha {self.regmean_alpha} is outside [0, 1]")
        if statistic is not None and self.normalize is False:
            what = "Gram matrices" if statistic == "gram" else "Fisher diagonals"
            raise UsageError(f"{self.method} is a mean weighted by the experts' {what}: --no-normalize does not apply")
        if self.eval_blocks < 0 or self.block_len < 1:
            raise UsageError("eval-blocks must be 0 or more and block-len positive")
        if (self.tall or self.consensus) and (not self.eval_blocks or n < 2):
            raise UsageError("TALL masks and Consensus merging choose λ_t on held-out blocks of two or more experts' "
                             "domains: give --eval-blocks > 0 and at least two experts")  # fmt: skip
        if (self.tall or self.consensus) and self.select_blocks < 1:
            raise UsageError("--select-blocks must be at least 1: λ_t is chosen on them")
        if self.tall and self.consensus:
            raise UsageError("--tall stores the masks of the merged model; --consensus changes it: choose one")
        if not 0 <= self.consensus <= n:
            raise UsageError(f"consensus {self.consensus} is not between 1 and the number of experts ({n})")
        if self.domains and len(self.domains) != n:
            raise UsageError(f"--domains: give one per expert ({n}), not {len(self.domains)}")
        if self.eval_blocks or computes_maps:  # each expert's domain: --domains, else its name
            from carve.corpora import Corpus

            for name in [*(self.domains or experts), self.general]:
                try:
                    Corpus(name)
                except UsageError as exc:
                    hint = ("an expert is evaluated, and its importance or Gram matrices computed, on the corpus its "
                            "name or --domains gives")  # fmt: skip
                    raise UsageError(f"{exc} ({hint}; --eval-blocks 0 skips the evaluation)") from None
        rescale = self.rescale or ("inverse" if METHODS[self.method].rescale else "none")
        return replace(self, density=density, weights=weights, rescale=rescale)


def _named(items: list[str], flag_name: str, example: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"{flag_name} takes NAME=PATH (e.g. {example}), not {item!r}")
        if name in out:
            raise UsageError(f"{flag_name} names {name!r} twice")
        out[name] = Path(path).expanduser()
    return out


def _per_expert(values: list[float], n: int, what: str) -> list[float]:
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UsageError(f"{what}: give one value or one per expert ({n}), not {len(values)}")
    return list(values)


def _check_inputs(base: TensorSource, experts: dict[str, TensorSource]) -> list[str]:
    """The tensors to merge (the base's), after refusing an expert that lacks one or differs in shape."""
    names = base.names()
    for label, src in experts.items():
        missing = [n for n in names if n not in src]
        if missing:
            raise UsageError(
                f"expert {label!r} has no tensor {missing[0]!r}: it is not a model of the base's architecture"
            )
        for n in names:
            if src.shape(n) != base.shape(n):
                raise UsageError(f"expert {label!r} differs from the base in shape at {n}: "
                                 f"{tuple(src.shape(n))} vs {tuple(base.shape(n))}")  # fmt: skip
    return names


def merge_tensor(
    base: torch.Tensor, experts: list[torch.Tensor], r: MergeRecipe, method: Method, name: str, extras: dict[str, Any]
) -> torch.Tensor:
    """One merged tensor (float32): θ₀ + λ·combine(sparsified τ_t)."""
    if not base.is_floating_point():
        return base
    b = base.float()
    stats = [g.get(name) for g in extras["stats"]] if method.statistic and extras.get("stats") else None
    if stats is not None and all(g is not None for g in stats):
        deltas = [e.float() - b for e in experts]
        if method.statistic == "gram":
            mixed = gram_mean(deltas, stats, r.weights, r.regmean_alpha)
        else:
            mixed = statistic_mean(deltas, stats, r.weights)
        return b + (mixed * r.lam if r.lam != 1 else mixed)  # elsewhere (norms, biases): the weighted mean

    def one(i: int) -> torch.Tensor:
        imp = extras["importance"][i].get(name) if extras.get("importance") else None
        m = method
        if method.sparsify == "importance" and imp is None and r.density[i] < 1:  # not in the map: by magnitude
            m = replace(method, sparsify="magnitude")
            extras.setdefault("by_magnitude", set()).add(re.sub(r"\.\d+\.", ".*.", name))
        drawn = extras["drawn"].take(name, i) if extras.get("drawn") else None
        return sparsified(experts[i].float() - b, m, r.density[i], gamma=r.gamma, generator=extras.get("generator"),
                          importance=imp, rescale=r.rescale or "none", drawn=drawn, inplace=True)  # fmt: skip

    # the experts' selections (sort_slice's numpy passes) are single-threaded: run them side by side,
    # but for DARE, whose masks must come from its one generator in expert order, and for tensors so
    # large that two experts' selection buffers at once would raise the peak memory
    sequential = method.sparsify in (None, "random") or b.numel() > PARALLEL_MAX or len(experts) < 2
    deltas = [one(i) for i in range(len(experts))] if sequential else list(_executor().map(one, range(len(experts))))
    return b + combine(deltas, r.weights, method, r.lam, r.normalize)


class _DrawnAhead:
    """DARE's keep-masks drawn in a thread, in the order the merge takes them (each floating tensor,
    then each expert) from the one seeded generator: the same masks as drawing each in turn (the
    generator is used by this thread alone), while the caller does the arithmetic.  At most `ahead`
    tensors' masks wait in memory."""

    def __init__(self, order: list[tuple[str, list[int]]], densities: list[float], generator: torch.Generator,
                 ahead: int = 2) -> None:  # fmt: skip
        import queue
        import threading

        self._queue: Any = queue.Queue(maxsize=max(1, ahead * len(densities)))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._draw, args=(order, densities, generator), daemon=True)
        self._thread.start()

    def _draw(self, order: list[tuple[str, list[int]]], densities: list[float], generator: torch.Generator) -> None:
        try:
            for n, shape in order:
                for i, d in enumerate(densities):
                    if not self._put((n, i, None if d >= 1 else random_keep(shape, d, generator))):
                        return
        except BaseException as exc:  # handed to the caller, raised where it takes the next mask
            self._put((None, None, exc))

    def _put(self, item: tuple[Any, Any, Any]) -> bool:
        """Queue `item` unless the merge has stopped (then False)."""
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def take(self, name: str, i: int) -> torch.Tensor | None:
        got_name, got_i, value = self._queue.get()
        if isinstance(value, BaseException):
            raise value
        if (got_name, got_i) != (name, i):
            raise RuntimeError(f"DARE masks out of order: expected {name}[{i}], drawn {got_name}[{got_i}]")
        return value

    def __enter__(self) -> _DrawnAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


PARALLEL_MAX = 8_000_000  # entries: above this an expert's selection runs alone (measured: no gain above)
_EXECUTOR: Any = None


def _executor() -> Any:
    global _EXECUTOR
    if _EXECUTOR is None:
        import os
        from concurrent.futures import ThreadPoolExecutor

        _EXECUTOR = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)))
    return _EXECUTOR


def merge(recipe: MergeRecipe, out: str | Path, overwrite: bool = False, cache: bool = True) -> dict[str, Any]:
    """Run `carve merge`: the merged model written to `out` (atomically); returns its manifest."""
    from carve.output import atomic_output_dir, claim, write_json

    r = recipe.resolved()
    stage = Stages()
    with claim(out), atomic_output_dir(out, overwrite) as tmp, tempfile.TemporaryDirectory() as scratch:
        computed, given, stats, section = None, r, None, "importance"
        statistic = METHODS[r.method].statistic
        data, select = None, None
        if r.eval_blocks:  # tokenized first: a corpus too short for the blocks asked is refused before any merging
            from transformers import AutoTokenizer

            with stage("tokenize"):
                tok = AutoTokenizer.from_pretrained(Path(r.base or "").expanduser())
                data = _eval_data(r, tok)
                select = _select_data(r, tok) if r.tall or r.consensus else None
        if r.method == "importance" and not r.importance:
            with stage("importance"):
                r, computed = _fisher_maps(r, Path(scratch))
        if statistic == "gram":
            with stage("grams"):
                stats, computed = _gram_maps(r, Path(scratch))
            section = "grams"
        if statistic == "fisher":
            with stage("fisher"):
                stats, computed = _fisher_diagonals(r, Path(scratch))
            section = "fisher"
        with stage("merge"):
            manifest = _stream_merge(r, tmp, stats)
        if computed is not None:  # the recipe as given (the maps were temporary), and how they were made
            manifest["recipe"] = asdict(given)
            manifest[section] = computed
        if data is not None:
            if select is not None:
                with stage("tall"):
                    manifest["tall"] = _localize(r, tmp, select, data)
            with stage("evaluation"):
                manifest["merge_metrics"] = _evaluate(r, tmp, data, manifest.get("tall"), cache)
        stage.record(manifest)
        write_json(tmp / "carve.json", manifest)
    return manifest


def _fisher_maps(r: MergeRecipe, directory: Path) -> tuple[MergeRecipe, dict[str, Any]]:
    """The importance method's maps when none are given: for each expert, ½·E[g²]·τ² per Linear
    weight (the `fisher` source at the expert with the base as reference point: the Fisher error of
    reverting that entry of its task vector), g the next-token-loss gradient at the expert on
    `data_blocks` blocks of its domain's train split.  One expert in memory at a time, the
    base's tensors read one at a time; the maps go to `directory`.  Returns the recipe pointing at
    them (the recorded recipe keeps none) and what the manifest says of them."""
    from carve.importance.registry import compute_importance

    paths, said = {}, {}
    with TensorSource(r.base or "") as base:
        reference = _Tensors(base)
        for name, lm, data, said[name] in _experts_on_their_domains(r):
            scores = compute_importance("fisher", lm.model, data=data, reference=reference)
            paths[name] = directory / f"{name}.safetensors"
            scores.save(paths[name])
            del lm, scores
    score = "½·E[g²]·(θ_expert − θ_base)², g at the expert on its domain (the fisher source)"
    return replace(r, importance=[f"{k}={p}" for k, p in paths.items()]), {"score": score, "per_expert": said}


def _fisher_diagonals(r: MergeRecipe, directory: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """Fisher merging's statistics: for each expert, the diagonal empirical Fisher E[g²] of every
    floating parameter (embeddings and norms included), g the next-token-loss gradient at the expert
    on `data_blocks` blocks of its domain's train split.  One expert in memory at a time; each
    expert's diagonal goes to a file in `directory`.  Returns the files and what the manifest says."""
    from safetensors.torch import save_file

    from carve.engines.gradient import accumulate_gradients

    files: dict[str, Path] = {}
    said: dict[str, Any] = {}
    for name, lm, data, said[name] in _experts_on_their_domains(r):
        params = [n for n, p in lm.model.named_parameters() if p.is_floating_point()]
        stats = accumulate_gradients(lm.model, data, params, ("grad_sq",), desc=f"Fisher diagonal ({name})")
        files[name] = directory / f"fisher-{len(files)}.safetensors"
        save_file({n: t.contiguous().cpu() for n, t in stats.stats["grad_sq"].items()}, str(files[name]))
        del lm, stats
    what = "E[g²] per parameter entry, g the next-token-loss gradient at the expert on its domain (empirical Fisher)"
    return files, {"statistic": what, "per_expert": said}


def _experts_on_their_domains(r: MergeRecipe) -> Iterator[tuple[str, Any, torch.Tensor, dict[str, Any]]]:
    """Each expert loaded in turn with `data_blocks` blocks of its domain's train split:
    (name, loaded model, blocks, what the manifest says of them)."""
    from carve.corpora import Corpus
    from carve.job import calibration_data, tensor_fingerprint
    from carve.models.load import load_model

    for name, d in r.expert_dirs().items():
        lm = load_model(str(d))
        domain = Corpus(r.domain_of()[name])
        data = calibration_data(lm.tokenizer, domain, domain, r.data_blocks, r.block_len, 0.0, r.seed)
        yield name, lm, data, {"domain": domain.name, "blocks": len(data), "block_len": r.block_len,
                               "data_fingerprint": tensor_fingerprint(data)}  # fmt: skip
        del lm  # one expert in memory at a time (the caller drops its reference too)


def _gram_maps(r: MergeRecipe, directory: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """RegMean's statistics, for each expert on `data_blocks` blocks of its domain: the input
    Gram matrix 2/n·Σ x xᵀ of every Linear in the decoder blocks (the layer-wise engine's SparseGPT
    Hessian, at the expert, every block fed the expert's own dense outputs) and the input embedding's
    token frequencies.  One expert in memory at a time; each block's matrices go to a file in the
    expert's folder under `directory` (Linears fed one input share one matrix).  Returns the folders
    and what the manifest says of them."""
    import json

    from safetensors.torch import save_file

    from carve.engines.layerwise import layerwise
    from carve.scorers.stats import Hessian
    from carve.settings import DEFAULT_TARGETS, Calibration
    from carve.streamed import statistics_budget

    folders: dict[str, Path] = {}
    said: dict[str, Any] = {}
    for name, lm, data, said[name] in _experts_on_their_domains(r):
        folder = folders[name] = directory / f"grams-{len(folders)}"
        folder.mkdir()
        parts: Counter[int] = Counter()  # a block calibrated in rounds comes in parts: a file each

        def on_block(
            i: int, linears: dict[str, torch.nn.Module], stats: dict[str, Any], folder: Path = folder, parts=parts
        ) -> None:
            leaders: dict[int, str] = {}
            tensors: dict[str, torch.Tensor] = {}
            aliases = {}
            for n in linears:
                key = leaders.setdefault(id(stats[n]), f"{n}.weight")
                tensors.setdefault(key, stats[n].H.contiguous())
                aliases[f"{n}.weight"] = key
            path = folder / f"block-{i:05d}-{parts[i]:02d}.safetensors"
            parts[i] += 1
            save_file(tensors, str(path), metadata={"aliases": json.dumps(aliases)})

        # a block's matrices within half the memory free (the expert loaded), else in rounds: the same bits
        calib = Calibration(propagation="dense", statistics_memory=statistics_budget(None))
        seconds = layerwise(lm.model, data, on_block, Hessian, DEFAULT_TARGETS, calib, f"Gram matrices ({name})")
        said[name]["most_rounds"] = seconds.get("most_rounds", 1)
        embedding = lm.model.get_input_embeddings().weight
        key = next(n for n, p in lm.model.named_parameters() if p is embedding)
        rows = torch.bincount(data.reshape(-1), minlength=embedding.shape[0]).double() / data.numel()
        save_file(
            {key: rows.float()}, str(folder / "embedding.safetensors"), metadata={"aliases": json.dumps({key: key})}
        )
        head = lm.model.get_output_embeddings()
        if isinstance(head, torch.nn.Linear) and head.weight is not embedding:  # untied: a Linear of its own
            head_key = next(n for n, p in lm.model.named_parameters() if p is head.weight)
            final = Hessian(head.in_features)  # its inputs: the final (normed) hidden states
            with torch.no_grad():
                for batch in data.split(calib.batch_size):
                    final.update(lm.model.base_model(input_ids=batch).last_hidden_state)
            save_file({head_key: final.H}, str(folder / "head.safetensors"),
                      metadata={"aliases": json.dumps({head_key: head_key})})  # fmt: skip
        del lm
    what = ("per Linear of the decoder blocks (and an untied output head): its input Gram matrix 2/n·Σ x xᵀ at "
            "the expert on its domain; the input embedding: its token frequencies there")  # fmt: skip
    return folders, {"statistic": what, "alpha": r.regmean_alpha, "per_expert": said}


class _Tensors(Mapping[str, torch.Tensor]):
    """A TensorSource as a read-only mapping: each tensor read when asked for."""

    def __init__(self, source: TensorSource) -> None:
        self.source = source

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.source:
            raise KeyError(name)
        return self.source.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.source

    def __iter__(self) -> Iterator[str]:
        return iter(self.source.names())

    def __len__(self) -> int:
        return len(self.source.names())


def _localize(r: MergeRecipe, tmp: Path, select: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """TALL masks chosen per task on the `select` blocks; saved with each rebuilt expert measured on
    the evaluation blocks `data` (`--tall`), or used to keep the consensus (`--consensus K`)."""
    from carve import tall

    base = Path(r.base or "").expanduser()
    masks, report = tall.choose(base, tmp, r.expert_dirs(), select, data if r.tall else None)
    if r.tall:
        tall.save_masks(tmp / tall.TALL_FILE, masks, {t: report[t]["lambda"] for t in masks})
        size = (tmp / tall.TALL_FILE).stat().st_size
        return {"per_task": report, "masks_mb": round(size / 2**20, 3)}
    staged = tmp / ".consensus"
    staged.mkdir()
    kept = tall.apply_consensus(base, tmp, masks, r.consensus, staged)
    for f in tmp.glob("model*.safetensors*"):
        f.unlink()
    for f in staged.iterdir():
        f.rename(tmp / f.name)
    staged.rmdir()
    return {"per_task": report, "consensus": {"at_least": r.consensus, "kept_share": round(kept, 5)}}


def _stream_merge(r: MergeRecipe, tmp: Path, stats: dict[str, Path] | None = None) -> dict[str, Any]:
    from contextlib import ExitStack

    from carve.models.load import file_fingerprint
    from carve.progress import progress

    method = METHODS[r.method]
    with ExitStack() as stack:
        base = stack.enter_context(TensorSource(r.base or ""))
        experts = {k: stack.enter_context(TensorSource(d)) for k, d in r.expert_dirs().items()}
        names = _check_inputs(base, experts)
        extras: dict[str, Any] = {"generator": torch.Generator().manual_seed(r.seed)}
        if method.sparsify == "importance":
            maps = _named(r.importance, "--importance", "")
            extras["importance"] = [_lazy_map(stack, maps[k], r.base, names) for k in experts]
        if stats is not None:  # Gram matrices (a folder per expert) or Fisher diagonals (a file per expert)
            if method.statistic == "gram":
                extras["stats"] = [_lazy_grams(stack, stats[k]) for k in experts]
            else:  # keyed by the loaded model's parameters: read under the checkpoint's names too
                extras["stats"] = [_lazy_map(stack, stats[k], r.base, names) for k in experts]
        if method.sparsify == "random":  # DARE: its masks drawn ahead, beside the arithmetic
            floats = [(n, base.shape(n)) for n in names if base.dtype(n).is_floating_point]
            extras["drawn"] = stack.enter_context(_DrawnAhead(floats, r.density, extras["generator"]))
        out_dtype = getattr(torch, r.save_dtype) if r.save_dtype else None
        specs = [(n, _saved_dtype(base.dtype(n), out_dtype), base.shape(n)) for n in names]
        writer = StreamWriter(tmp, specs)
        try:
            for n in progress(names, desc=f"merge ({r.method})"):
                writer.write(n, merge_tensor(base.get(n), [e.get(n) for e in experts.values()], r, method, n, extras))
        finally:
            writer.close()
        fingerprints = {
            "base": file_fingerprint(base.files),
            **{k: file_fingerprint(e.files) for k, e in experts.items()},
        }
    base_dir = Path(r.base or "").expanduser()
    for f in _BASE_FILES:
        if (base_dir / f).is_file():
            shutil.copy2(base_dir / f, tmp / f)
    if r.save_dtype:
        set_config_dtype(tmp / "config.json", r.save_dtype)
    described: dict[str, Any] = {"name": r.method, "paper": method.paper, "normalize": _normalize(r, method)}
    if method.sparsify == "importance":  # the tensors no map covers, trimmed by magnitude (block index as *)
        described["trimmed_by_magnitude"] = sorted(extras.get("by_magnitude", ()))
    return {
        **manifest_start("merge", str(r.base), fingerprints["base"]),
        "experts": {k: {"model": str(d), "fingerprint": fingerprints[k]} for k, d in r.expert_dirs().items()},
        "recipe": asdict(r),
        "method": described,
        "saved": {"dtype": r.save_dtype or "as the base", "format": "dense", "tensors": len(names)},
        "size": {"file_mb": round(sum(f.stat().st_size for f in tmp.glob("model*.safetensors")) / 2**20, 2)},
    }


def _saved_dtype(dtype: torch.dtype, out: torch.dtype | None) -> torch.dtype:
    """A float tensor in the asked dtype (else the base's); others as they are."""
    return out if out is not None and dtype.is_floating_point else dtype


def _normalize(r: MergeRecipe, method: Method) -> bool:
    return method.normalize if r.normalize is None else r.normalize


def _lazy_map(stack: Any, path: Path, base: str | None = None, checkpoint: list[str] | None = None) -> Any:
    """An importance map (or Fisher diagonals) read one tensor at a time: .get(name) gives its
    entry or None.  Where its entries are not all among the `base` checkpoint's tensor names
    (`checkpoint`), they are read under those names too (an MoE's fused experts and renamed router:
    carve.models.experts.CheckpointNames), so every expert is merged by its own statistics."""
    from carve.masks.mask import reading_safetensors

    handle = stack.enter_context(reading_safetensors(path, "an importance map"))
    keys = set(handle.keys())
    names = None
    if base and checkpoint is not None and not keys <= set(checkpoint):
        names = _checkpoint_names(base, {k: handle.get_slice(k).get_shape() for k in keys})

    class _Map:
        def get(self, name: str) -> torch.Tensor | None:
            if name in keys:
                return handle.get_tensor(name)
            return names.get(name, handle.get_tensor) if names is not None else None

    return _Map()


def _checkpoint_names(base: str, shapes: dict[str, list[int]]) -> Any:
    """The translation of a map's entries to `base`'s checkpoint names (None: none differs)."""
    from carve.models.experts import CheckpointNames

    config_file = Path(base).expanduser() / "config.json"
    if not config_file.is_file():
        return None
    from transformers import AutoConfig

    names = CheckpointNames(AutoConfig.from_pretrained(config_file.parent), shapes)
    return names if names.source else None


def _lazy_grams(stack: Any, folder: Path) -> Any:
    """An expert's Gram matrices (`_gram_maps`) read one at a time: .get(name) gives the matrix
    for a Linear weight, the token frequencies for the input embedding, else None."""
    import json

    from carve.masks.mask import reading_safetensors

    where: dict[str, tuple[Any, str]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        handle = stack.enter_context(reading_safetensors(path, "Gram matrices"))
        for name, key in json.loads((handle.metadata() or {})["aliases"]).items():
            where[name] = (handle, key)

    class _Grams:
        def get(self, name: str) -> torch.Tensor | None:
            found = where.get(name)
            return None if found is None else found[0].get_tensor(found[1])

    return _Grams()


def set_config_dtype(path: Path, dtype: str) -> None:
    """A saved config.json rewritten to say its weights are in `dtype`."""
    import json

    if path.is_file():
        config = json.loads(path.read_text())
        config["dtype"] = dtype
        config.pop("torch_dtype", None)
        path.write_text(json.dumps(config, indent=2) + "\n")


def _eval_data(r: MergeRecipe, tok: Any) -> dict[str, Any]:
    """Each task's held-out blocks (its domain and the general corpus), tokenized by the base's tokenizer."""
    from carve.corpora import Corpus
    from carve.job import held_out_data

    general = Corpus(r.general)
    n, length = r.eval_blocks, r.block_len
    return {t: held_out_data(tok, Corpus(d), general, n, length, cloze_items=0) for t, d in r.domain_of().items()}


def _select_data(r: MergeRecipe, tok: Any) -> dict[str, Any]:
    """Each task's λ_t-choosing blocks: up to --select-blocks of its domain's held-out split, after
    the --eval-blocks that `_eval_data` evaluates on."""
    from carve.corpora import Corpus
    from carve.job import EvalData

    return {
        t: EvalData({"domain": (c.name, c.eval_blocks(tok, r.select_blocks, r.block_len, skip=r.eval_blocks))})
        for t, c in ((t, Corpus(d)) for t, d in r.domain_of().items())
    }


def _evaluate(
    r: MergeRecipe, merged: Path, data: dict[str, Any], localized: dict[str, Any] | None, cache: bool = True
) -> dict[str, Any]:
    """Each task's domain perplexity (and general) for the base, its expert and the merge (and its
    TALL-rebuilt expert), one model in memory at a time."""
    from carve.job import EvalData, evaluate_source, metrics_of
    from carve.models.load import load_model
    from carve.tall import retained_gain

    experts = r.expert_dirs()
    runs = [("base", str(r.base), list(experts)), ("merged", str(merged), list(experts))]
    runs += [("expert", str(d), [t]) for t, d in experts.items()]
    rows: dict[str, dict[str, Any]] = {t: {} for t in experts}
    for label, path, tasks in runs:
        lm = load_model(path)
        general: dict[str, Any] = {}  # the merge's general perplexity: the same blocks for every task
        for t in tasks:  # the inputs' metrics come from the evaluation cache when they were measured before
            if label != "merged":
                rows[t][label] = evaluate_source(lm, data[t], cache)[0]
                continue
            general = general or metrics_of(lm.model, EvalData({"general": data[t].blocks["general"]}))
            rows[t][label] = {**metrics_of(lm.model, EvalData({"domain": data[t].blocks["domain"]})), **general}
        del lm
    for t, row in rows.items():
        ppl = {k: row[k]["domain_ppl"] for k in ("base", "expert", "merged")}
        row["normalized_gain"] = retained_gain(ppl["base"], ppl["expert"], ppl["merged"])
        if localized and "consensus" not in localized:
            rebuilt = localized["per_task"][t]["rebuilt"]["domain_ppl"]
            row["tall_retained_gain"] = retained_gain(ppl["base"], ppl["expert"], rebuilt)
    gains = [row["normalized_gain"] for row in rows.values() if row["normalized_gain"] is not None]
    return {"per_task": rows, "mean_normalized_gain": round(sum(gains) / len(gains), 4) if gains else None}


# mergekit's config keys carve reads, and what each of its methods' parameters means here
_MERGEKIT_TOP = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
_MERGEKIT_GLOBAL = {"normalize", "lambda", "rescale", "int8_mask", "gamma", "density", "weight"}
_MERGEKIT_MODEL = {"weight", "density", "gamma"}


def from_mergekit(path: str | Path) -> MergeRecipe:
    """A mergekit YAML config as a recipe (mergekit's defaults: density 1, DARE rescaled to the L1
    norm); an option carve does not support is refused by name."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).expanduser().read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"cannot read the mergekit config {str(path)!r}: {exc}") from None
    if not isinstance(config, dict):
        raise UsageError(f"{str(path)!r} is not a mergekit config (a mapping with merge_method, models ...)")
    unknown = sorted(set(config) - _MERGEKIT_TOP)
    if unknown:
        raise UsageError(f"mergekit option {unknown[0]!r} is not supported by carve merge")
    method = config.get("merge_method")
    if method not in METHODS or not METHODS[method].mergekit:
        names = ", ".join(m for m, k in METHODS.items() if k.mergekit)
        raise UsageError(f"mergekit merge_method {method!r} is not supported by carve merge (it has {names})")
    params = _scalars(config.get("parameters") or {}, _MERGEKIT_GLOBAL, "parameters")
    models = config.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) and "model" in m for m in models):
        raise UsageError("mergekit config: `models` must list entries with `model:` (the experts)")
    base = config.get("base_model")
    if not isinstance(base, str):
        raise UsageError("mergekit config: `base_model` (the model the experts were fine-tuned from) is needed")
    experts, density, weights, gamma = [], [], [], []
    for m in models:
        if m["model"] == base:
            continue  # mergekit lets the base appear among the models
        extra = sorted(set(m) - {"model", "parameters"})
        if extra:
            raise UsageError(f"mergekit option {extra[0]!r} of a model is not supported by carve merge")
        p = {**params, **_scalars(m.get("parameters") or {}, _MERGEKIT_MODEL, f"{m['model']}'s parameters")}
        if "weight" not in p:
            raise UsageError(f"mergekit config: {m['model']} has no weight (mergekit requires one)")
        experts.append(f"{Path(str(m['model'])).name}={m['model']}")
        density.append(float(p.get("density", 1.0)))
        weights.append(float(p["weight"]))
        gamma.append(float(p.get("gamma", 0.01)))
    if len(set(gamma)) > 1:
        raise UsageError("mergekit config: carve merge takes one gamma for all models")
    dtype = config.get("out_dtype") or config.get("dtype")
    if dtype is not None and dtype not in SAVE_DTYPES:
        raise UsageError(f"mergekit dtype {dtype!r} is not one of {', '.join(SAVE_DTYPES)}")
    return MergeRecipe(
        base=base, experts=experts, method=method, density=density, weights=weights,
        lam=float(params.get("lambda", 1.0)), gamma=gamma[0] if gamma else 0.01,
        rescale=_mergekit_rescale(params, METHODS[method]),
        normalize=params.get("normalize"), save_dtype=dtype, origin={"mergekit_config": str(path)},
    )  # fmt: skip


def _mergekit_rescale(params: dict[str, Any], method: Method) -> str:
    """mergekit's `rescale` (default: on for DARE) is to the L1 norm."""
    return "l1" if params.get("rescale", method.rescale) else "none"


def _scalars(params: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise UsageError(f"mergekit config: {where} must be a mapping")
    for k, v in params.items():
        if k not in allowed:
            raise UsageError(f"mergekit parameter {k!r} ({where}) is not supported by carve merge")
        if isinstance(v, bool) or isinstance(v, (int, float)):
            continue
        raise UsageError(f"mergekit parameter {k!r} ({where}): carve merge takes one number, not {v!r} "
                         "(per-layer gradients and filters are not supported)")  # fmt: skip
    return dict(params)
