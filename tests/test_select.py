"""`carve select`: DSIR's features and weights and ZIP-FIT's NCD against direct computations, a
streamed pool against an in-memory one, seeded runs identical, bad input refused with nothing
written, and selected text feeding a job (`--domain select:TARGET --pool P`) with the selection in
its manifest."""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

import carve
from carve import selection
from carve.cli.main import main
from carve.selection import (
    Hasher,
    SelectRecipe,
    TargetCompressor,
    iter_chunks,
    joined_examples,
    ncd,
    ngram_buckets,
    select,
)


def _direct_buckets(text: str, buckets: int = 10000) -> list[int]:
    """data-selection's get_ngram_counts, written out: WordPunct words of the lower-cased text,
    unigrams and space-joined bigrams, each sha256-hashed into a bucket."""
    ws = re.findall(r"\w+|[^\w\s]+", text.lower())
    grams = ws + [f"{a} {b}" for a, b in itertools.pairwise(ws)]
    return [int(hashlib.sha256(g.encode()).hexdigest(), 16) % buckets for g in grams]


TEXTS = [
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
    "def main(argv):\n    return parse(argv) or 0  # the entry point",
    "And God said, Let there be light: and there was light.",
    'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND!!',
]


def test_dsir_buckets_match_a_direct_computation_with_and_without_the_memo(monkeypatch) -> None:
    hasher = Hasher(10000)
    for t in TEXTS * 2:  # the second round is served from the memo
        assert sorted(ngram_buckets(t, hasher)[0]) == sorted(_direct_buckets(t))
    monkeypatch.setattr(selection, "MEMO", 3)  # a memo that overflows at once: the same buckets
    small = Hasher(10000)
    for t in TEXTS * 3:
        assert sorted(ngram_buckets(t, small)[0]) == sorted(_direct_buckets(t))


def _pool(tmp_path: Path, n_per: int = 12) -> tuple[Path, Path]:
    """A pool directory of legal, code and scripture documents, and a legal target file."""
    pool = tmp_path / "pool"
    pool.mkdir()
    for name in ("legal", "code", "scripture"):
        docs = carve.Corpus(name).documents[:n_per]
        (pool / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    target = tmp_path / "target.jsonl"
    target.write_text("".join(json.dumps({"text": d}) + "\n" for d in carve.Corpus("legal").documents[-6:]))
    return pool, target


def _in_memory_dsir(
    pool_texts: list[str], target_texts: list[str], k: int, min_words: int
) -> tuple[list[int], np.ndarray]:
    count = lambda ts: np.bincount([b for t in ts for b in _direct_buckets(t)], minlength=10000)  # noqa: E731
    pt, pr = count(target_texts), count(pool_texts)
    diff = np.log(pt / pt.sum() + 1e-8) - np.log(pr / pr.sum() + 1e-8)
    weights = np.array([diff[_direct_buckets(t)].sum() for t in pool_texts])
    n_words = np.array([len(re.findall(r"\w+|[^\w\s]+", t.lower())) for t in pool_texts])
    order = [i for i in np.argsort(-weights, kind="stable") if n_words[i] >= min_words]
    return sorted(order[:k]), weights


def test_dsir_weights_and_picks_equal_an_in_memory_computation(tmp_path: Path) -> None:
    pool, target = _pool(tmp_path)
    recipe = SelectRecipe(target=[str(target)], pool=[str(pool)], method="dsir", k=10, top_k=True, chunk=200)
    m = select(recipe, tmp_path / "sel.jsonl")
    chunks = [c.text for c in selection.iter_chunks([str(pool)], 200, "text")]
    targets = [c.text for c in selection.iter_chunks([str(target)], 200, "text")]
    picks, weights = _in_memory_dsir(chunks, targets, 10, 100)
    rows = [json.loads(line) for line in (tmp_path / "sel.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [chunks[i] for i in picks]
    np.testing.assert_allclose([r["score"] for r in rows], weights[picks], rtol=1e-9)
    assert m["pool_chunks"] == len(chunks) and m["chosen"]["chunks"] == 10
    assert set(m["chosen"]["by_source"]) == {str(pool)}
    assert all("legal.jsonl" in r["file"] for r in rows)  # the legal target picks the legal documents


def test_ncd_and_zipfit_alignment_against_direct_gzip() -> None:
    raw = [t.encode() for t in TEXTS]
    direct_len = lambda b: len(gzip.compress(b, compresslevel=9, mtime=0))  # noqa: E731
    for x in raw:
        for t in raw:
            cx, ct, ctx = direct_len(x), direct_len(t), direct_len(t + x)
            assert ncd(x, t) == pytest.approx((ctx - min(cx, ct)) / max(cx, ct))
    tc = TargetCompressor(raw[:3], level=9)
    for x in raw:
        expected = sum(1 - ncd(x, t) for t in raw[:3]) / 3
        assert tc.alignment(x) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("method", ["dsir", "zipfit", "random"])
def test_a_streamed_pool_picks_as_the_same_pool_in_one_file_and_seeds_repeat(tmp_path: Path, method: str) -> None:
    pool, target = _pool(tmp_path, n_per=8)
    merged = tmp_path / "merged.jsonl"
    merged.write_text("".join(f.read_text() for f in sorted(pool.glob("*.jsonl"))))
    common = {"target": [str(target)], "method": method, "k": 6, "workers": 1, "target_samples": 4}
    a = select(SelectRecipe(pool=[str(pool)], **common), tmp_path / "a.jsonl")  # type: ignore[arg-type]
    b = select(SelectRecipe(pool=[str(merged)], **common), tmp_path / "b.jsonl")  # type: ignore[arg-type]
    again = select(SelectRecipe(pool=[str(pool)], **common), tmp_path / "c.jsonl")  # type: ignore[arg-type]
    texts = lambda p: [json.loads(line)["text"] for line in p.read_text().splitlines()]  # noqa: E731
    assert texts(tmp_path / "a.jsonl") == texts(tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "c.jsonl").read_bytes()
    assert a["chosen"]["chunks"] == b["chosen"]["chunks"] == again["chosen"]["chunks"] == 6
    if method == "random":  # seeded: another seed draws another sample (DSIR: weights dwarf the noise here)
        other = select(SelectRecipe(pool=[str(pool)], **{**common, "seed": 1}), tmp_path / "d.jsonl")  # type: ignore[arg-type]
        assert texts(tmp_path / "d.jsonl") != texts(tmp_path / "a.jsonl") and other["chosen"]["chunks"] == 6


@pytest.mark.parametrize(
    ("case", "message"),
    [("empty_target", "contains no text"), ("empty_pool", "contains no text"), ("k_too_large", "more than the pool"),
     ("unreadable", "cannot be read"), ("no_k", "exactly one of")],
)  # fmt: skip
def test_bad_input_is_refused_and_nothing_is_written(tmp_path: Path, capsys, case: str, message: str) -> None:
    pool, target = _pool(tmp_path, n_per=3)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    args = {"--target": str(target), "--pool": str(pool), "--k": "5"}
    if case == "empty_target":
        args["--target"] = str(empty)
    elif case == "empty_pool":
        args["--pool"] = str(empty)
    elif case == "k_too_large":
        args["--k"] = "100000"
    elif case == "unreadable":
        args["--pool"] = str(broken)
    argv = ["select", *[x for kv in args.items() for x in kv], "--out", str(tmp_path / "out.jsonl"), "--quiet"]
    if case == "no_k":
        argv.remove("--k")
        argv.remove("5")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_selected_text_feeds_a_job_and_its_manifest_records_the_selection(tmp_path: Path, model_dir: Path) -> None:
    pool, target = _pool(tmp_path, n_per=10)
    flags = ["--trainable", "random", "--density", "0.1", "--steps", "1", "--block-len", "32", "--eval-blocks", "1",
             "--cloze-items", "0", "--quiet"]  # fmt: skip
    out = tmp_path / "ft"
    assert main(["finetune", str(model_dir), "--domain", f"select:{target}", "--pool", str(pool), *flags,
                 "--out", str(out)]) == 0  # fmt: skip
    domain = json.loads((out / "carve.json").read_text())["data"]["domain"]
    assert domain["kind"] == "selection" and domain["selection"]["method"] == "dsir"
    assert domain["selection"]["inputs"]["pool"][str(pool)]["chunks"] > 0
    # a selection output given as the domain is recorded the same way
    sel = tmp_path / "chosen.jsonl"
    assert (
        main(["select", "--target", str(target), "--pool", str(pool), "--k", "20", "--out", str(sel), "--quiet"]) == 0
    )
    out2 = tmp_path / "ft2"
    flags += ["--eval-domain", "legal"]  # trained on the selection, measured on the builtin held-out split
    assert main(["finetune", str(model_dir), "--domain", str(sel), *flags, "--out", str(out2)]) == 0
    data = json.loads((out2 / "carve.json").read_text())["data"]
    assert data["domain"]["selection"]["chosen"]["chunks"] == 20 and data["eval_domain"]["spec"] == "legal"
    # carve report shows what was selected: chunks per source and the score histogram
    page = tmp_path / "report.html"
    assert main(["report", str(sel), str(out), "--out", str(page)]) == 0
    text = page.read_text()
    assert text.count("selected</h2>") == 2 and "alt='selection scores'" in text and str(pool) in text
    assert main(["finetune", str(model_dir), "--domain", "legal", "--pool", str(pool), *flags, "--out",
                 str(tmp_path / "ft3")]) == 2  # fmt: skip


def test_chunks_keep_the_text_as_written() -> None:
    code = "def f(x):\n    return x + 1\n\n\nclass A:\n    pass  # done\n"
    pieces = list(selection.chunks_of(code, 4))
    assert pieces[0] == "def f(x):\n    return x" and "\n\n\nclass" in pieces[1]
    assert " ".join(" ".join(p.split()) for p in pieces) == " ".join(code.split())
    assert list(selection.chunks_of(code, 0)) == [code]


def test_joined_examples_reach_the_chunk_length_in_order() -> None:
    texts = ["a b c", "d e", "f g h i", "j", "k l"]
    pieces = joined_examples(texts, 4)
    assert pieces == ["a b c\n\nd e", "f g h i\n\nj\n\nk l"]  # the short tail ("j", "k l" < 4 words) joins the last
    assert joined_examples(["x y"], 4) == ["x y"]  # too short to reach the length: one piece
    assert all(len(p.split()) >= 4 for p in joined_examples(texts * 3, 4))


@pytest.mark.parametrize(("chunk", "match", "joined_words"), [(40, None, 40), (40, 0, 0), (0, None, 256), (40, 90, 90)])
def test_zipfit_scores_are_the_alignment_to_the_joined_or_plain_examples(
    tmp_path: Path, chunk: int, match: int | None, joined_words: int
) -> None:
    pool, target = _pool(tmp_path, n_per=3)
    recipe = SelectRecipe(target=[str(target)], pool=[str(pool)], method="zipfit", k=6, workers=1, chunk=chunk,
                          min_words=1, match_length=match, target_samples=1000)  # fmt: skip
    manifest = select(recipe, tmp_path / "z.jsonl")
    assert manifest["fitted"]["joined_words"] == joined_words
    examples = [c.text for c in iter_chunks([str(target)], chunk, "text") if c.text.strip()]
    if joined_words:
        joined = joined_examples(examples, joined_words)
        assert len(joined) < len(examples)  # examples were joined: the cases differ
        examples = joined
    for row in map(json.loads, (tmp_path / "z.jsonl").read_text().splitlines()):
        x = row["text"].encode()
        expected = sum(1 - ncd(x, t.encode()) for t in examples) / len(examples)
        assert row["score"] == pytest.approx(expected, abs=1e-12)
