"""A corpus is a list of documents.  Train and eval splits are decided per document by a stable
hash, so they never overlap and stay the same across runs, machines and Python versions."""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
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


def _load_documents(spec: str, text_field: str) -> tuple[list[str], str]:
    """Return (documents, kind) for a builtin name or a path."""
    if spec in BUILTIN:
        data = resources.files("carve.corpora").joinpath("data", f"{spec}.jsonl.gz")
        with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
            return [json.loads(line)["text"] for line in fh if line.strip()], "builtin"
    path = Path(spec).expanduser()
    if not path.exists():
        raise UsageError(
            f"unknown corpus {spec!r}: give a builtin name ({', '.join(BUILTIN)}) or a path to "
            ".txt, .jsonl, .parquet, a directory of text files or a datasets.save_to_disk folder"
        )
    try:
        return _read_path(path, spec, text_field)
    except (OSError, EOFError, ValueError, RecursionError, zlib.error) as exc:  # unreadable or not what it says
        what = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise UsageError(f"corpus {spec!r} cannot be read ({type(exc).__name__}: {what})") from None


def _read_path(path: Path, spec: str, text_field: str) -> tuple[list[str], str]:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            return _load_hf_dataset(path, text_field), "datasets"
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UsageError(f"corpus directory {spec!r} contains no files")
        return [t for t in (_read_text(p) for p in files) if t.strip()], "directory"
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or path.name.endswith(".jsonl.gz"):
        opener: Any = gzip.open if path.name.endswith(".gz") else open
        docs = []
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
                docs.append(str(row[text_field]))
        return docs, "jsonl"
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if text_field not in table.column_names:
            raise UsageError(f"corpus {spec!r} has no column {text_field!r}; columns are {table.column_names}")
        return [str(t) for t in table.column(text_field).to_pylist() if t], "parquet"
    if suffix in {".txt", ".md", ".text", ""}:
        return _split_paragraph_docs(_read_text(path)), "text"
    raise UsageError(
        f"corpus {spec!r} has an unsupported type {suffix!r}: use .txt, .jsonl, .parquet, "
        "a directory of text files or a datasets.save_to_disk folder"
    )


def _load_hf_dataset(path: Path, text_field: str) -> list[str]:
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
    return [str(t) for t in ds[text_field] if t]


def _doc_is_eval(doc: str, share: float) -> bool:
    digest = hashlib.sha256(doc.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


@dataclass
class Corpus:
    """Documents from a builtin name or a path, split train/eval by a stable per-document hash."""

    spec: str
    text_field: str = "text"
    eval_share: float = EVAL_SHARE
    documents: list[str] = field(init=False, repr=False)
    kind: str = field(init=False)

    def __post_init__(self) -> None:
        docs, self.kind = _load_documents(str(self.spec), self.text_field)
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
        }

    def tokens(self, docs: list[str], tokenizer: Any) -> torch.Tensor:
        """`docs` tokenized and concatenated, each followed by the end-of-text token."""
        eos = tokenizer.eos_token_id
        ids: list[int] = []
        for d in docs:
            ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
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

    def eval_blocks(self, tokenizer: Any, n: int, length: int) -> torch.Tensor:
        """The first `n` non-overlapping `length`-token blocks of the held-out split: [<=n, length]."""
        docs = self.eval
        if not docs:
            raise UsageError(
                f"corpus {self.spec!r} has no held-out text: it needs several documents "
                f"(about {self.eval_share:.0%} are held out by hash)"
            )
        ids = self.tokens(docs, tokenizer)
        count = min(n, ids.numel() // length)
        if count == 0:
            raise UsageError(
                f"corpus {self.spec!r} has {ids.numel()} held-out tokens, fewer than one "
                f"evaluation block of {length} tokens"
            )
        return ids[: count * length].view(count, length)


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
