"""The job skeleton: the cached source evaluation, and writes that a crash at any point leaves
as the old or the new version, never half of one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import carve
import carve.job
import carve.output
import carve.pipeline
from carve.corpora import Corpus
from carve.errors import UsageError
from carve.job import evaluate_source, held_out_data, metrics_of
from carve.output import atomic_output_dir, recover_replaced, replace_path, write_json

FAST = {"calib_blocks": 2, "block_len": 32, "eval_blocks": 2, "cloze_items": 0, "speed": False}


def test_cached_source_evaluation_equals_a_fresh_one_and_follows_its_key(
    tmp_path: Path, model_dir: Path, small_corpus: Path, tokenizer, monkeypatch
) -> None:
    from tests.conftest import tiny_model

    lm = carve.load_model(str(model_dir))
    dom, gen = Corpus(str(small_corpus)), Corpus("general")
    data = held_out_data(lm.tokenizer, dom, gen, 2, 32, 0)
    first, hit = evaluate_source(lm, data)
    assert not hit
    again, hit = evaluate_source(lm, data)
    assert hit and again == first == metrics_of(lm.model, data)
    # other held-out data, another model, another dtype: measured anew
    assert not evaluate_source(lm, held_out_data(lm.tokenizer, dom, gen, 3, 32, 0))[1]
    other = tmp_path / "other"
    tiny_model("llama", seed=5).save_pretrained(other)
    tokenizer.save_pretrained(other)
    m_other, hit = evaluate_source(carve.load_model(str(other)), data)
    assert not hit and m_other != first
    assert not evaluate_source(carve.load_model(str(model_dir), dtype="bfloat16"), data)[1]
    assert not evaluate_source(lm, data, cache=False)[1]
    # other code under the same version string: measured anew
    with monkeypatch.context() as patched:
        patched.setattr(carve.job, "source_digest", lambda: "0" * 12)
        assert not evaluate_source(lm, data)[1]
        assert evaluate_source(lm, data)[1]
    assert evaluate_source(lm, data) == (first, True)
    # a damaged entry is measured anew, not trusted
    for f in (carve.output.cache_dir() / "eval").glob("*.json"):
        f.write_text("{half")
    assert evaluate_source(lm, data) == (first, False)


def test_the_source_digest_follows_every_source_file_and_records_in_manifests(tmp_path: Path) -> None:
    import shutil

    from carve.job import versions

    copy = tmp_path / "carve"
    shutil.copytree(Path(carve.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert carve.output.source_digest(copy) == carve.output.source_digest() == versions()["carve_source"]
    deep = sorted(copy.rglob("*.py"))[-1]
    deep.write_bytes(deep.read_bytes() + b"\n")
    carve.output.source_digest.cache_clear()  # one digest per process: carve's files do not change under it
    changed = carve.output.source_digest(copy)
    assert changed != carve.output.source_digest()
    deep.rename(deep.with_name("renamed.py"))
    carve.output.source_digest.cache_clear()
    assert carve.output.source_digest(copy) not in (changed, carve.output.source_digest())


def test_a_second_extract_reuses_the_source_evaluation(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    r = {"model": str(model_dir), "domain": str(small_corpus), "method": "magnitude", **FAST}
    a = carve.extract(carve.Recipe(**r), tmp_path / "a")
    b = carve.extract(carve.Recipe(**r, sparsity=0.3), tmp_path / "b")
    c = carve.extract(carve.Recipe(**r), tmp_path / "c", cache=False)
    assert not a["metrics"]["before_from_cache"] and b["metrics"]["before_from_cache"]
    assert not c["metrics"]["before_from_cache"]
    assert a["metrics"]["before"] == b["metrics"]["before"] == c["metrics"]["before"]


def test_json_write_interrupted_midway_leaves_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "carve.json"
    write_json(path, {"version": 1})
    real = Path.write_text

    def half(self: Path, text: str, *a, **kw) -> int:
        real(self, text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", half)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"version": 2, "padding": "x" * 1000})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["carve.json"]


def test_a_replacement_interrupted_between_its_renames_is_undone(tmp_path: Path, monkeypatch) -> None:
    """Where no atomic exchange is available (not Linux, or a file system without renameat2)."""
    import carve.output

    monkeypatch.setattr(carve.output, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "carve.json").write_text("old")
    real = Path.rename
    calls = []

    def rename(self: Path, target):  # the old output moved aside, then a crash
        calls.append(self)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, target)

    with atomic_output_dir(tmp_path / "new") as tmp:
        (tmp / "carve.json").write_text("new")
    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        replace_path(tmp_path / "new", out)
    monkeypatch.setattr(Path, "rename", real)
    assert not out.exists()  # the moment after the crash: old aside, new not in
    recover_replaced(out)  # what the next run does first
    assert (out / "carve.json").read_text() == "old"


@pytest.mark.parametrize("crash_at", range(5))
def test_extract_crashing_at_each_write_leaves_the_old_output_whole(
    tmp_path: Path, model_dir: Path, small_corpus: Path, monkeypatch, crash_at: int
) -> None:
    """An --overwrite extract killed at each of its writes (model files, importance, mask,
    carve.json, the final rename): the previous output is still there, complete, and no temporary
    directory is left behind."""
    r = {"model": str(model_dir), "domain": str(small_corpus), "method": "fisher", **FAST}
    out = tmp_path / "out"
    carve.extract(carve.Recipe(**r), out)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    writes = [
        (carve.pipeline, "save_model_files"),
        (carve.ImportanceMap, "save"),
        (carve.Mask, "save"),
        (carve.job, "write_json"),
        (carve.output, "replace_path"),
    ]
    target, name = writes[crash_at]
    real = getattr(target, name)

    def crash(*a, **kw):
        real(*a, **kw) if name == "write_json" else None  # carve.json written, then the crash
        raise KeyboardInterrupt

    monkeypatch.setattr(target, name, crash)
    with pytest.raises(KeyboardInterrupt):
        carve.extract(carve.Recipe(**r, sparsity=0.3), out, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_include_and_exclude_are_refused_with_structure(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    """Structured extraction keeps the same units in every block (a standard config): a module
    filter cannot be honoured, so it is refused before any work, naming the flag."""
    for extra in ({"include": ["*mlp*"]}, {"exclude": ["*q_proj*"]}):
        recipe = carve.Recipe(model=str(model_dir), domain=str(small_corpus), structure=True, **extra, **FAST)
        with pytest.raises(UsageError, match=f"--{next(iter(extra))}"):
            carve.extract(recipe, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_quiet_before_transformers_is_imported_still_silences_its_bars() -> None:
    """set_quiet does not import transformers (a merge never needs it), yet its bars stay off."""
    import subprocess
    import sys

    code = (
        "import sys; from carve.progress import set_quiet; set_quiet(True); "
        "assert 'transformers' not in sys.modules; "
        "from transformers.utils import logging; assert not logging.is_progress_bar_enabled(); "
        "set_quiet(False); assert logging.is_progress_bar_enabled()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
