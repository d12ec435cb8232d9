"""A corpus is a list of documents.  Train and eval splits are decided per document by a stable
hash, so they never overlap and stay the same across runs, machines and Python versions."""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from carve.errors import UsageError

# name -> (description, source, licence); the text lives in data/<name>.jsonl.gz
BUILTIN: dict[str, tuple[str, str, str]] = {
    "general": (
        "English news and encyclopedic prose",
        "ABC news (Lee et al. 2005) + English Wikipedia sample, from the gensim wheel's test data",
        "CC BY-SA 3.0 (Wikipedia); research sample (ABC news)",
    ),
    "legal": (
        "Licence and copyright texts",
        "Debian /usr/share/common-licenses and /usr/share/doc/*/copyright",
        "each text's own licence (verbatim redistribution allowed)",
    ),
    "code": (
        "Python source code",
        "CPython 3.11 standard library Lib/*.py",
        "PSF-2.0",
    ),
    "scripture": (
        "King James Version of the Bible (every sixth chapter, Genesis to 2 Timothy)",
        "Debian bible-kjv-text 4.38, read with bible-kjv's `bible` program",
        "public domain (the 1611 translation)",
    ),
}

EVAL_SHARE = 0.15  # share of documents held out for evaluation


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _split_paragraph_docs(text: str, min_chars: int = 2000) -> list[str]:
    """A plain .txt file has no document boundaries: group consecutive paragraphs into
    documents of at least `min_chars` so a single file can still be split train/eval."""
    docs, cur = [], ""
    for para in text.split("\n\n"):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= min_chars:
            docs.append(cur)
            cur = ""
    if cur.strip():
        docs.append(cur)
    return [d for d in docs if d.strip()]


def _unknown(spec: str) -> UsageError:
    return UsageError(
        f"unknown corpus {spec!r}: give a builtin name ({', '.join(BUILTIN)}) or a path to "
        ".txt, .jsonl, .parquet, a directory of text files or a datasets.save_to_disk folder"
    )


def corpus_kind(spec: str) -> str:
    """builtin, datasets, directory, jsonl, parquet or text; a clear error for anything else."""
    if spec in BUILTIN:
        return "builtin"
    path = Path(spec).expanduser()
    if not path.exists():
        raise _unknown(spec)
    if path.is_dir():
        return "datasets" if (path / "dataset_info.json").exists() or (path / "state.json").exists() else "directory"
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if suffix in {".txt", ".md", ".text", ""}:
        return "text"
    raise UsageError(
        f"corpus {spec!r} has an unsupported type {suffix!r}: use .txt, .jsonl, .parquet, "
        "a directory of text files or a datasets.save_to_disk folder"
    )


def iter_documents(spec: str, text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(where, text) for each document of a builtin name or a path, read lazily (one document,
    one Parquet batch or one file at a time), so a pool larger than memory can be streamed.
    Unreadable input raises one UsageError naming the corpus."""
    kind = corpus_kind(spec)
    try:
        yield from _iter_kind(kind, spec, text_field)
    except (OSError, EOFError, ValueError, RecursionError, zlib.error, UnicodeDecodeError) as exc:
        what = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise UsageError(f"corpus {spec!r} cannot be read ({type(exc).__name__}: {what})") from None


def _iter_kind(kind: str, spec: str, text_field: str) -> Iterator[tuple[str, str]]:
    path = Path(spec).expanduser()
    if kind == "builtin":
        data = resources.files("carve.corpora").joinpath("data", f"{spec}.jsonl.gz")
        with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield spec, json.loads(line)["text"]
    elif kind == "datasets":
        for text in _iter_hf_dataset(path, text_field):
            yield spec, text
    elif kind == "directory":
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UsageError(f"corpus directory {spec!r} contains no files")
        for p in files:  # .jsonl / .parquet files by their records, any other file as one text
            structured = p.name.endswith((".jsonl", ".jsonl.gz")) or p.suffix.lower() == ".parquet"
            if structured:
                yield from ((str(p), t) for _, t in _iter_kind(corpus_kind(str(p)), str(p), text_field))
            else:
                yield str(p), _read_text(p)
    elif kind == "jsonl":
        opener: Any = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise UsageError(f"corpus {spec!r} line {i} is not valid JSON") from None
                if not isinstance(row, dict) or text_field not in row:
                    raise UsageError(f"corpus {spec!r} line {i} has no {text_field!r} field (set --text-field)")
                yield spec, str(row[text_field])
    elif kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise UsageError(f"corpus {spec!r} has no column {text_field!r}; columns are {pf.schema_arrow.names}")
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for t in batch.column(0).to_pylist():
                if t:
                    yield spec, str(t)
    else:
        for doc in _split_paragraph_docs(_read_text(path)):
            yield spec, doc


def _load_documents(spec: str, text_field: str) -> tuple[list[str], str]:
    """Return (documents, kind) for a builtin name or a path."""
    return [text for _, text in iter_documents(spec, text_field)], corpus_kind(spec)


def _iter_hf_dataset(path: Path, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"corpus {str(path)!r} is a saved Hugging Face dataset: pip install datasets to read it"
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if text_field not in ds.column_names:
        raise UsageError(f"corpus {str(path)!r} has no column {text_field!r}; columns are {ds.column_names}")
    for row in ds.select_columns([text_field]):
        if row[text_field]:
            yield str(row[text_field])


def _doc_is_eval(doc: str, share: float) -> bool:
    digest = hashlib.sha256(doc.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def embedded_ids(tokenizer: Any, text: str, where: str) -> list[int]:
    """`text`'s token ids (no special tokens added), refused in one line if it spells out a token the
    tokenizer added past the model's embedding rows (`carve.models.load.check_vocabulary` notes the
    rows): the model's forward would stop on an index error."""
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = getattr(tokenizer, "carve_embedded_rows", None)
    past = [i for i in ids if rows is not None and i >= rows]
    if past:
        raise UsageError(
            f"{where} spells out {tokenizer.convert_ids_to_tokens(past[0])!r}, token id {past[0]}, which the tokenizer "
            f"adds but the model does not embed ({rows} rows): remove it from the text"
        )
    return ids


@dataclass
class Corpus:
    """Documents from a builtin name or a path, split train/eval by a stable per-document hash."""

    spec: str
    text_field: str = "text"
    eval_share: float = EVAL_SHARE
    pool: tuple[str, ...] = ()  # with spec "select:TARGET": the pool the domain text is chosen from
    documents: list[str] = field(init=False, repr=False)
    kind: str = field(init=False)
    selection: dict[str, Any] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        from carve.selection import read_selection, selected_from_pool

        source = str(self.spec)
        if source.startswith("select:"):
            source = str(selected_from_pool(source.removeprefix("select:"), list(self.pool), self.text_field))
        elif self.pool:
            raise UsageError(f"a pool is given but the domain {self.spec!r} is not select:TARGET")
        docs, self.kind = _load_documents(source, self.text_field)
        if Path(source).suffix == ".jsonl" and Path(source).exists():
            self.selection = read_selection(source)
            self.kind = "selection" if self.selection else self.kind
        self.documents = [d for d in docs if d.strip()]
        if not self.documents:
            raise UsageError(f"corpus {self.spec!r} contains no text")

    @property
    def name(self) -> str:
        return self.spec if self.spec in BUILTIN else Path(self.spec).name

    @property
    def train(self) -> list[str]:
        return [d for d in self.documents if not _doc_is_eval(d, self.eval_share)]

    @property
    def eval(self) -> list[str]:
        return [d for d in self.documents if _doc_is_eval(d, self.eval_share)]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for d in self.documents:
            h.update(hashlib.sha256(d.encode("utf-8")).digest())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        return {
            "spec": str(self.spec),
            "kind": self.kind,
            "documents": len(self.documents),
            "train_documents": len(self.train),
            "eval_documents": len(self.eval),
            "fingerprint": self.fingerprint,
            **({"selection": _selection_summary(self.selection)} if self.selection else {}),
        }

    def tokens(self, docs: list[str], tokenizer: Any) -> torch.Tensor:
        """`docs` tokenized and concatenated, each followed by the end-of-text token."""
        eos = tokenizer.eos_token_id
        ids: list[int] = []
        for d in docs:
            ids.extend(embedded_ids(tokenizer, d, f"corpus {self.spec!r}"))
            if eos is not None:
                ids.append(int(eos))
        return torch.tensor(ids, dtype=torch.long)

    def calibration_blocks(self, tokenizer: Any, n: int, length: int, seed: int = 0) -> torch.Tensor:
        """`n` windows of `length` tokens at seeded random offsets in the train split: [n, length]."""
        if n <= 0:
            return torch.empty(0, length, dtype=torch.long)
        ids = self.tokens(self.train, tokenizer)
        if ids.numel() <= length:
            raise UsageError(
                f"corpus {self.spec!r} has {ids.numel()} training tokens, too few for one "
                f"calibration block of {length} tokens (lower --block-len or give more text)"
            )
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - length, (n,), generator=gen)
        return torch.stack([ids[s : s + length] for s in starts.tolist()])

    def eval_blocks(self, tokenizer: Any, n: int, length: int, skip: int = 0) -> torch.Tensor:
        """The first `n` non-overlapping `length`-token blocks of the held-out split: [<=n, length];
        with `skip`, those after its first `skip` blocks."""
        docs = self.eval
        if not docs:
            raise UsageError(
                f"corpus {self.spec!r} has no held-out text: it needs several documents "
                f"(about {self.eval_share:.0%} are held out by hash)"
            )
        ids = self.tokens(docs, tokenizer)
        count = min(n, ids.numel() // length - skip)
        if count <= 0 and skip:
            raise UsageError(
                f"corpus {self.spec!r} has {ids.numel() // length} held-out blocks of {length} tokens, "
                f"none after the first {skip}"
            )
        if count <= 0:
            raise UsageError(
                f"corpus {self.spec!r} has {ids.numel()} held-out tokens, fewer than one "
                f"evaluation block of {length} tokens"
            )
        return ids[skip * length : (skip + count) * length].view(count, length)


def _selection_summary(m: dict[str, Any]) -> dict[str, Any]:
    """What a manifest records of the selection a corpus came from (`carve select`'s manifest)."""
    r = m.get("recipe", {})
    return {
        "method": r.get("method"),
        "target": r.get("target"),
        "inputs": m.get("inputs"),
        "parameters": {k: v for k, v in r.items() if k not in ("target", "pool", "method")},
        "chosen": m.get("chosen"),
        "pool_chunks": m.get("pool_chunks"),
    }


def builtin_corpora() -> list[dict[str, Any]]:
    """Name, size, source and licence of each builtin corpus."""
    rows = []
    for name, (desc, source, licence) in BUILTIN.items():
        c = Corpus(name)
        rows.append(
            {
                "name": name,
                "description": desc,
                "documents": len(c.documents),
                "kilobytes": round(sum(len(d.encode()) for d in c.documents) / 1024),
                "source": source,
                "licence": licence,
            }
        )
    return rows
