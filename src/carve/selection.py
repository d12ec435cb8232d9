"""`carve select`: choose the pool text most like a target (a handful of examples or a corpus), by
DSIR or ZIP-FIT, streamed so a pool is bounded by disk, not memory.

The pool (files, directories, .jsonl, .parquet, saved datasets, builtin corpora) is read document
by document (`corpora.iter_documents`) and cut into chunks of at most `chunk` words (`--chunk`; 0:
whole documents).  Every pass streams the pool again; what stays in memory is one score and one
length per chunk, the DSIR bag-of-n-gram models and (ZIP-FIT) the target's compressor states.
The chosen chunks are written in pool order by a last pass.

- DSIR (Xie et al. 2023, arXiv 2302.03169), as the `data-selection` package computes it: words by
  NLTK's WordPunct rule (`\\w+|[^\\w\\s]+` on lower-cased text); unigrams and bigrams (joined by a
  space) hashed by sha256 into `buckets` (10,000) buckets; p_target and p_raw the normalized bucket
  counts of the target and of the whole pool; a chunk's log importance weight
  log w = Σ_features count · (log(p_target + 1e-8) − log(p_raw + 1e-8)); chunks of fewer than
  `min_words` (100) words are never chosen; k chosen by Gumbel top-k (log w + Gumbel noise, seeded:
  sampling without replacement ∝ w) or, with `top_k`, by log w itself.
- ZIP-FIT (Obbad et al. 2024, arXiv 2410.18194): alignment(x) = mean over target examples t of
  1 − NCD(x, t), NCD(x, t) = (C(tx) − min(C(x), C(t))) / max(C(x), C(t)), C the gzip-compressed
  length at `level` (9, gzip's default; zip-fit's default level 0 stores without compressing and
  makes every score equal).  The cost does not grow with the product of the sets' sizes: each
  target example is compressed once and its compressor state kept, so C(tx) costs only x's bytes
  (the state copied, x fed, flushed: the same bytes gzip writes for t + x); at most
  `target_samples` target examples (seeded draw) take part; candidates are scored in `workers`
  processes.  The k chunks of highest alignment are chosen.  Deviation (`match_length`): consecutive
  target examples are first joined into pieces of at least `match_length` words (default `chunk`, or
  256 for whole documents; 0: the paper's examples as they are), so each NCD compares texts of like
  length; NCD otherwise favours chunks near the examples' own length (32 HumanEval problems of
  20-114 words against a pool cut into 100-256-word chunks: 0.498 of the top 500 code; joined:
  1.000, bench/RESULTS.md).
- random: k chunks uniformly (seeded), the baseline.

`--tokens N` in place of `--k`: the best chunks until their words (DSIR's word count) reach N.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from carve.corpora.corpus import iter_documents
from carve.errors import UsageError
from carve.output import atomic_file, check_writable, claim, write_json
from carve.progress import progress
from carve.settings import check_types, flag

METHODS = ("dsir", "zipfit", "random")
WORD = re.compile(r"\w+|[^\w\s]+")
MANIFEST_SUFFIX = ".carve.json"


@dataclass
class SelectRecipe:
    """Everything that decides a selection; one field per `carve select` flag."""

    target: list[str] = flag("the target: corpus names, files or directories of examples", factory=list)
    pool: list[str] = flag("the pool to choose from: files, directories, .jsonl, .parquet, datasets", factory=list)
    method: str = flag("dsir, zipfit or random", default="dsir", choices=METHODS)
    k: int | None = flag("chunks to choose", default=None)
    tokens: int | None = flag("or: choose until the chosen chunks hold this many words", default=None)
    chunk: int = flag("words per chunk (documents are cut into chunks of at most this many; 0: whole)", default=256)
    min_words: int = flag("shortest chunk that may be chosen, in words", default=100)
    buckets: int = flag("dsir: hashed n-gram buckets", default=10000)
    smoothing: float = flag(
        "dsir: pseudo-count added to every target bucket (data-selection's target_laplace_smoothing; "
        "0 as its default; more helps a small target)",
        default=0.0,
    )
    top_k: bool = flag("dsir: the k highest weights instead of Gumbel top-k sampling", default=False)
    level: int = flag("zipfit: gzip compression level (1-9)", default=9)
    target_samples: int = flag("zipfit: target examples compared with each chunk (seeded draw)", default=32)
    match_length: int | None = flag(
        "zipfit: join consecutive target examples into pieces of at least this many words, so both sides of every "
        "NCD are alike in length (default: --chunk, or 256 when --chunk is 0; 0: each example alone, as the paper)",
        default=None,
    )
    workers: int = flag("scoring processes (0: one per CPU core)", default=0)
    seed: int = flag("Gumbel noise, target sample and the random method", default=0)
    text_field: str = flag("text field of .jsonl / .parquet / datasets inputs", default="text")

    def validate(self) -> None:
        check_types(self)
        if not self.target:
            raise UsageError("selection needs a --target: a corpus, example files or a directory of them")
        if not self.pool:
            raise UsageError("selection needs a --pool to choose from")
        if (self.k is None) == (self.tokens is None):
            raise UsageError("give exactly one of --k (chunks) and --tokens (words)")
        if (self.k is not None and self.k < 1) or (self.tokens is not None and self.tokens < 1):
            raise UsageError("--k and --tokens must be positive")
        if self.smoothing < 0:
            raise UsageError(f"--smoothing {self.smoothing} is negative")
        if self.chunk < 0 or self.min_words < 0 or self.buckets < 1 or self.target_samples < 1 or self.workers < 0:
            raise UsageError("chunk, min-words and workers must not be negative; buckets, target-samples positive")
        if not 1 <= self.level <= 9:
            raise UsageError(f"--level {self.level} is not a gzip level (1-9)")
        if self.match_length is not None and self.match_length < 0:
            raise UsageError(f"--match-length {self.match_length} is negative")

    def joined_length(self) -> int:
        """ZIP-FIT's target pieces' least length in words (0: the examples as they are)."""
        if self.match_length is not None:
            return self.match_length
        return self.chunk or 256


@dataclass
class Chunk:
    source: str  # the pool argument it came from
    where: str  # its file (or the argument)
    text: str


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


SPACE = re.compile(r"\S+")


def chunks_of(text: str, size: int) -> Iterator[str]:
    """`text` cut before every `size`-th whitespace-separated word (0: the whole text), each piece
    as written (newlines and indentation kept: code stays code), stripped at its ends."""
    if size <= 0:
        if text.strip():
            yield text
        return
    starts = [m.start() for i, m in enumerate(SPACE.finditer(text)) if i % size == 0]
    for a, b in itertools.pairwise([*starts, len(text)]):
        piece = text[a:b].strip()
        if piece:
            yield piece


def iter_chunks(specs: list[str], chunk: int, text_field: str) -> Iterator[Chunk]:
    for spec in specs:
        for where, text in iter_documents(spec, text_field):
            for piece in chunks_of(text, chunk):
                yield Chunk(spec, where, piece)


# ---------------------------------------------------------------- DSIR


MEMO = 1_000_000  # memoized words and word pairs, each: memory bounded whatever the pool's size


def _bucket(gram: str, buckets: int) -> int:
    return int(hashlib.sha256(gram.encode("utf-8")).hexdigest(), 16) % buckets


class Hasher:
    """sha256 buckets of unigrams and bigrams (data-selection's), memoized: words by an id, word
    pairs by the pair of ids (n-grams recur, Zipf's law), up to MEMO of each; beyond that a rare
    n-gram is hashed again each time it appears."""

    def __init__(self, buckets: int):
        self.buckets = buckets
        self.ids: dict[str, int] = {}
        self.words: list[str] = []
        self.word_bucket: list[int] = []
        self.pairs: dict[int, int] = {}

    def _id(self, w: str) -> int:
        i = self.ids.get(w)
        if i is None:
            i = len(self.words)
            self.words.append(w)
            self.word_bucket.append(_bucket(w, self.buckets))
            if len(self.ids) < MEMO:
                self.ids[w] = i
        return i

    def __call__(self, ws: list[str]) -> list[int]:
        ids = [self._id(w) for w in ws]
        out = [self.word_bucket[i] for i in ids]
        pairs, words, kept = self.pairs, self.words, len(self.ids)  # ids below `kept` are memoized words
        for a, b in itertools.pairwise(ids):
            key = a << 32 | b
            bucket = pairs.get(key) if a < kept and b < kept else None
            if bucket is None:
                bucket = _bucket(f"{words[a]} {words[b]}", self.buckets)
                if len(pairs) < MEMO and a < kept and b < kept:
                    pairs[key] = bucket
            out.append(bucket)
        if len(self.words) > 2 * MEMO:  # ids of unmemoized words are not reused: drop them
            del self.words[len(self.ids) :], self.word_bucket[len(self.ids) :]
        return out


def ngram_buckets(text: str, hasher: Hasher) -> tuple[list[int], int]:
    """The buckets of a text's unigrams and bigrams (with repeats) and its word count."""
    ws = words(text)
    return hasher(ws), len(ws)


def ngram_counts(texts: Iterator[str] | list[str], hasher: Hasher) -> np.ndarray:
    counts = np.zeros(hasher.buckets, dtype=np.int64)
    for t in texts:
        counts += np.bincount(ngram_buckets(t, hasher)[0], minlength=hasher.buckets)
    return counts


def log_ratio(target: np.ndarray, raw: np.ndarray, smoothing: float = 0.0) -> np.ndarray:
    """log(p_target + 1e-8) − log(p_raw + 1e-8), data-selection's importance estimator (p_target
    from the counts plus `smoothing` each)."""
    t = target + smoothing
    pt, pr = t / max(t.sum(), 1), raw / max(raw.sum(), 1)
    return np.log(pt + 1e-8) - np.log(pr + 1e-8)


# ---------------------------------------------------------------- ZIP-FIT


def compressed_len(data: bytes, level: int) -> int:
    """len(gzip.compress(data, level)): the gzip container's deflate stream, header and trailer."""
    c = zlib.compressobj(level, zlib.DEFLATED, 31)
    return len(c.compress(data)) + len(c.flush())


def ncd(x: bytes, t: bytes, level: int = 9) -> float:
    """Normalized compression distance by direct compression (the reference computation)."""
    cx, ct, ctx = compressed_len(x, level), compressed_len(t, level), compressed_len(t + x, level)
    return (ctx - min(cx, ct)) / max(cx, ct)


class TargetCompressor:
    """Each target example compressed once; C(t + x) from a copy of t's compressor state."""

    def __init__(self, examples: list[bytes], level: int):
        self.level = level
        self.states = []
        for t in examples:
            c = zlib.compressobj(level, zlib.DEFLATED, 31)
            head = c.compress(t)
            self.states.append((c, len(head), compressed_len(t, level)))

    def alignment(self, x: bytes) -> float:
        """mean over target examples of 1 − NCD(x, t)."""
        cx = compressed_len(x, self.level)
        total = 0.0
        for state, head, ct in self.states:
            c = state.copy()
            ctx = head + len(c.compress(x)) + len(c.flush())
            total += 1 - (ctx - min(cx, ct)) / max(cx, ct)
        return total / len(self.states)


_WORKER: Any = None  # the worker process's scorer: a Hasher (dsir) or a TargetCompressor (zipfit)


def _init_zipfit(examples: list[bytes], level: int) -> None:
    global _WORKER
    _WORKER = TargetCompressor(examples, level)


def _zipfit_batch(texts: list[str]) -> list[tuple[float, int]]:
    return [(_WORKER.alignment(t.encode("utf-8")), len(words(t))) for t in texts]


def _init_dsir(buckets: int) -> None:
    global _WORKER
    _WORKER = Hasher(buckets)


def _dsir_batch(texts: list[str]) -> list[tuple[bytes, int]]:
    """Each text's n-gram buckets (uint32 bytes, in ngram_buckets' order) and word count."""
    out = []
    for t in texts:
        ids, n = ngram_buckets(t, _WORKER)
        out.append((np.asarray(ids, dtype=np.uint32).tobytes(), n))
    return out


def _in_workers(
    recipe: SelectRecipe, chunks: Iterator[Chunk], init: Any, initargs: tuple[Any, ...], fn: Any
) -> Iterator[Any]:
    """fn's result for every chunk, in order, computed in `recipe.workers` processes over batches
    of 64 chunks; at most 4 batches per process in flight, so memory stays bounded."""
    import multiprocessing as mp
    import os

    procs = recipe.workers or os.cpu_count() or 1
    ctx = mp.get_context("spawn" if os.name == "nt" else "fork")
    with ctx.Pool(procs, initializer=init, initargs=initargs) as pool:
        pending: list[Any] = []
        batch: list[str] = []
        for c in chunks:
            batch.append(c.text)
            if len(batch) == 64:
                pending.append(pool.apply_async(fn, (batch,)))
                batch = []
                while len(pending) > 4 * procs:
                    yield from pending.pop(0).get()
        if batch:
            pending.append(pool.apply_async(fn, (batch,)))
        for p in pending:
            yield from p.get()


# ---------------------------------------------------------------- selection


def gumbel_keys(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).gumbel(size=n)


def choose(
    scores: np.ndarray, lengths: np.ndarray, eligible: np.ndarray, k: int | None, tokens: int | None
) -> np.ndarray:
    """Indices (ascending) of the highest-scoring eligible chunks: k of them, or as many as it takes
    for their lengths to reach `tokens`."""
    order = np.argsort(-np.where(eligible, scores, -np.inf), kind="stable")
    order = order[: int(eligible.sum())]
    if k is not None:
        picked = order[:k]
    else:
        reach = int(np.searchsorted(np.cumsum(lengths[order]), tokens or 0)) + 1
        picked = order[:reach]
    return np.sort(picked)


@dataclass
class Tally:
    """Chunks and a fingerprint of their text per input, taken as a pass streams by."""

    hashes: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def __call__(self, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        for c in chunks:
            if c.source not in self.hashes:
                self.hashes[c.source], self.counts[c.source] = hashlib.sha256(), 0
            self.hashes[c.source].update(hashlib.sha256(c.text.encode("utf-8")).digest())
            self.counts[c.source] += 1
            yield c

    def describe(self, specs: list[str]) -> dict[str, Any]:
        return {
            s: {
                "chunks": self.counts.get(s, 0),
                "fingerprint": self.hashes[s].hexdigest()[:16] if s in self.hashes else None,
            }
            for s in specs
        }


def _stream(recipe: SelectRecipe, desc: str, tally: Tally | None = None) -> Iterator[Chunk]:
    chunks = iter_chunks(recipe.pool, recipe.chunk, recipe.text_field)
    return progress(tally(chunks) if tally is not None else chunks, desc)


def _target_texts(recipe: SelectRecipe, tally: Tally) -> list[str]:
    texts = [c.text for c in tally(iter_chunks(recipe.target, recipe.chunk, recipe.text_field)) if c.text.strip()]
    if not texts:
        raise UsageError(f"the target {' '.join(recipe.target)!r} contains no text")
    return texts


def _scores(recipe: SelectRecipe, target: list[str], tally: Tally) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One score, one word count per pool chunk, and what the method fitted."""
    lengths: list[int] = []
    if recipe.method == "dsir":
        return _dsir_scores(recipe, target, tally)
    if recipe.method == "random":
        lengths = [len(words(c.text)) for c in _stream(recipe, "random: pool", tally)]
        return np.random.default_rng(recipe.seed).random(len(lengths)), np.asarray(lengths), {}
    if recipe.joined_length():
        target = joined_examples(target, recipe.joined_length())
    sample = random.Random(recipe.seed).sample(target, min(recipe.target_samples, len(target)))
    examples = [t.encode("utf-8") for t in sample]
    scored = _in_workers(recipe, _stream(recipe, "zipfit: alignment", tally), _init_zipfit, (examples, recipe.level),
                         _zipfit_batch)  # fmt: skip
    scores = []
    for score, n in scored:
        scores.append(score)
        lengths.append(n)
    fitted = {"target_examples": len(examples), "level": recipe.level, "joined_words": recipe.joined_length()}
    return np.asarray(scores), np.asarray(lengths), fitted


def joined_examples(texts: list[str], size: int) -> list[str]:
    """Consecutive texts joined (by a blank line) into pieces of at least `size` words; a shorter
    tail joins the last piece.  ZIP-FIT's target side, length-matched to pool chunks of `size`."""
    pieces: list[str] = []
    current: list[str] = []
    count = 0
    for t in texts:
        current.append(t)
        count += len(words(t))
        if count >= size:
            pieces.append("\n\n".join(current))
            current, count = [], 0
    if current:
        tail = "\n\n".join(current)
        if pieces:
            pieces[-1] += "\n\n" + tail
        else:
            pieces.append(tail)
    return pieces


def _dsir_scores(
    recipe: SelectRecipe, target: list[str], tally: Tally
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One pass over the pool in worker processes: each chunk's n-gram buckets counted into p_raw
    and spilled to a temporary file (4 bytes an n-gram), then the weights from the spill: the pool
    is tokenized and hashed once, and memory holds three numbers per chunk."""
    import tempfile

    raw = np.zeros(recipe.buckets, dtype=np.int64)
    sizes, lengths = [], []
    with tempfile.TemporaryFile() as spill:
        chunks = _stream(recipe, "dsir: pool n-grams", tally)
        for ids, n in _in_workers(recipe, chunks, _init_dsir, (recipe.buckets,), _dsir_batch):
            arr = np.frombuffer(ids, dtype=np.uint32)
            raw += np.bincount(arr, minlength=recipe.buckets)
            spill.write(ids)
            sizes.append(arr.size)
            lengths.append(n)
        diff = log_ratio(ngram_counts(target, Hasher(recipe.buckets)), raw, recipe.smoothing)
        spill.seek(0)
        scores = [float(diff[np.frombuffer(spill.read(4 * size), dtype=np.uint32)].sum()) for size in sizes]
    w = np.asarray(scores)
    if not recipe.top_k:
        w = w + gumbel_keys(len(w), recipe.seed)
    return w, np.asarray(lengths), {"raw_ngrams": int(raw.sum()), "log_weights": scores}


def histogram(values: np.ndarray, bins: int = 20) -> dict[str, list[float]]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {"edges": [], "counts": []}
    counts, edges = np.histogram(finite, bins=bins)
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts]}


def select(recipe: SelectRecipe, out: str | Path, *, overwrite: bool = False, at_most: bool = False) -> dict[str, Any]:
    """Choose from the pool; write OUT (.jsonl: text, score, source, file per chosen chunk) and
    OUT.carve.json (inputs' fingerprints, method, parameters, source shares, score histogram).
    `at_most`: k is an upper bound (fewer eligible chunks are all chosen) instead of an error."""
    import time

    recipe.validate()
    path = Path(out).expanduser()
    manifest_path = path.with_name(path.name + MANIFEST_SUFFIX)
    for p in (path, manifest_path):
        if p.exists() and not overwrite:
            raise UsageError(f"output {str(p)!r} already exists: choose another --out or pass --overwrite")
    check_writable(path)
    started = time.perf_counter()
    with claim(path, manifest_path):
        targets, pool_tally = Tally(), Tally()
        target = _target_texts(recipe, targets)
        scores, lengths, fitted = _scores(recipe, target, pool_tally)
        if not len(scores):
            raise UsageError(f"the pool {' '.join(recipe.pool)!r} contains no text")
        eligible = lengths >= recipe.min_words
        if at_most and recipe.k is not None:
            recipe = replace(recipe, k=min(recipe.k, int(eligible.sum())))
        if not eligible.any():
            raise UsageError(
                f"the pool has no chunk of at least {recipe.min_words} words ({len(scores)} chunks in all)"
            )
        if recipe.k is not None and recipe.k > int(eligible.sum()):
            raise UsageError(
                f"--k {recipe.k} is more than the pool's {int(eligible.sum())} chunks of at least "
                f"{recipe.min_words} words ({len(scores)} chunks in all)"
            )
        if recipe.tokens is not None and recipe.tokens > int(lengths[eligible].sum()):
            raise UsageError(
                f"--tokens {recipe.tokens} is more than the {int(lengths[eligible].sum())} words of the pool's "
                f"chunks of at least {recipe.min_words} words"
            )
        picked = choose(scores, lengths, eligible, recipe.k, recipe.tokens)
        reported = np.asarray(fitted.pop("log_weights")) if "log_weights" in fitted else scores
        chosen = set(picked.tolist())
        shares: dict[str, int] = {}
        with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            for i, c in enumerate(_stream(recipe, "writing the selection")):
                if i in chosen:
                    shares[c.source] = shares.get(c.source, 0) + 1
                    row = {"text": c.text, "score": float(reported[i]), "source": c.source, "file": c.where}
                    fh.write(json.dumps(row) + "\n")
        manifest = {
            "carve_manifest": 1,
            "job": "select",
            "recipe": asdict(recipe),
            "inputs": {"target": targets.describe(recipe.target), "pool": pool_tally.describe(recipe.pool)},
            "fitted": fitted,
            "pool_chunks": len(scores),
            "eligible_chunks": int(eligible.sum()),
            "chosen": {"chunks": len(picked), "words": int(lengths[picked].sum()), "by_source": shares},
            "score_histogram": {"pool": histogram(reported[eligible]), "chosen": histogram(reported[picked])},
            "seconds": round(time.perf_counter() - started, 2),
        }
        write_json(manifest_path, manifest)
    return manifest


INLINE_K = 1000  # chunks `--domain select:TARGET` chooses (fewer when the pool has fewer)


def _stat(spec: str) -> list[Any]:
    p = Path(spec).expanduser()
    if not p.exists():
        return [spec]
    files = sorted(p.rglob("*")) if p.is_dir() else [p]
    return [spec, *[(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]]


def selected_from_pool(target: str, pool: list[str], text_field: str = "text") -> Path:
    """`--domain select:TARGET --pool P ...`: DSIR's choice of up to INLINE_K chunks from the pool,
    cached under carve's cache directory by the inputs (paths, sizes, modification times) and
    carve's code (its version and `source_digest`); a changed input or code selects anew."""
    from carve import __version__
    from carve.output import cache_dir, source_digest

    if not target:
        raise UsageError("--domain select:TARGET needs the target after the colon, e.g. select:examples/")
    if not pool:
        raise UsageError("--domain select:TARGET needs --pool: the files or corpora to choose the domain text from")
    key = hashlib.sha256(
        json.dumps(
            [_stat(target), [_stat(p) for p in pool], text_field, INLINE_K, __version__, source_digest()]
        ).encode()
    ).hexdigest()[:24]
    out = cache_dir() / "select" / f"{key}.jsonl"
    if out.is_file() and out.with_name(out.name + MANIFEST_SUFFIX).is_file():
        return out
    select(SelectRecipe(target=[target], pool=list(pool), k=INLINE_K, text_field=text_field), out, overwrite=True,
           at_most=True)  # fmt: skip
    return out


def read_selection(path: str | Path) -> dict[str, Any] | None:
    """The manifest beside a selection output, if there is one."""
    p = Path(path).expanduser()
    m = p.with_name(p.name + MANIFEST_SUFFIX)
    if m.is_file():
        try:
            return dict(json.loads(m.read_text()))
        except ValueError:
            return None
    return None
