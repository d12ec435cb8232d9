"""Builtin corpora, user corpus formats, and the document-level train/eval split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carve import Corpus, UsageError
from carve.corpora import BUILTIN


@pytest.mark.parametrize("name", list(BUILTIN))
def test_builtin_corpora_are_large_and_split_disjointly(name: str) -> None:
    c = Corpus(name)
    assert sum(len(d.encode()) for d in c.documents) >= 300_000
    assert len(set(c.documents)) == len(c.documents)  # de-duplicated
    train, held = set(c.train), set(c.eval)
    assert train and held and not train & held
    assert len(train) + len(held) == len(c.documents)


def test_split_is_stable_and_per_document(tmp_path: Path) -> None:
    docs = [f"document number {i} " * 30 for i in range(60)]
    p = tmp_path / "c.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    a, b = Corpus(str(p)), Corpus(str(p))
    assert a.eval == b.eval and a.fingerprint == b.fingerprint
    # adding documents never moves an existing document across the split
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in [*docs, "new " * 50]))
    assert set(a.eval) <= set(Corpus(str(p)).eval)


def test_formats(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"text {i} " * 40 for i in range(10)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet")
    (tmp_path / "dir").mkdir()
    for i, d in enumerate(docs):
        (tmp_path / "dir" / f"{i}.txt").write_text(d)
    (tmp_path / "c.txt").write_text("\n\n".join(docs))
    assert Corpus(str(tmp_path / "c.jsonl"), "body").documents == docs
    assert Corpus(str(tmp_path / "c.parquet"), "body").documents == docs
    assert sorted(Corpus(str(tmp_path / "dir")).documents) == sorted(docs)
    assert "".join(Corpus(str(tmp_path / "c.txt")).documents).replace("\n", "") == "".join(docs)


def test_missing_text_field_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(UsageError, match="has no 'text' field"):
        Corpus(str(tmp_path / "c.jsonl"))


def test_calibration_blocks_are_seeded_and_from_train(tokenizer) -> None:
    c = Corpus("legal")
    a = c.calibration_blocks(tokenizer, 4, 64, seed=1)
    assert a.shape == (4, 64)
    assert a.equal(c.calibration_blocks(tokenizer, 4, 64, seed=1))
    assert not a.equal(c.calibration_blocks(tokenizer, 4, 64, seed=2))
    e = c.eval_blocks(tokenizer, 3, 64)
    assert e.shape == (3, 64)
    # skip: the held-out blocks after the first ones, up to the end of the split
    assert c.eval_blocks(tokenizer, 2, 64, skip=1).equal(e[1:])
    total = len(c.eval_blocks(tokenizer, 10**6, 64))
    assert len(c.eval_blocks(tokenizer, 5, 64, skip=total - 2)) == 2
    with pytest.raises(UsageError, match=f"{total} held-out blocks of 64 tokens, none after the first {total}"):
        c.eval_blocks(tokenizer, 1, 64, skip=total)


def test_too_short_corpus(tmp_path: Path, tokenizer) -> None:
    (tmp_path / "short.txt").write_text("just a few words")
    c = Corpus(str(tmp_path / "short.txt"))
    with pytest.raises(UsageError, match="too few for one calibration block"):
        c.calibration_blocks(tokenizer, 2, 64)
    with pytest.raises(UsageError, match="no held-out text"):
        c.eval_blocks(tokenizer, 2, 64)


def test_unknown_corpus() -> None:
    with pytest.raises(UsageError, match="unknown corpus 'nope'"):
        Corpus("nope")
