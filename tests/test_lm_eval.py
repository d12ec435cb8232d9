"""The lm-evaluation-harness bridge on a tiny model agrees with carve's own evaluator, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from carve.errors import UsageError
from carve.evaluation.lm_eval_bridge import run_tasks
from carve.evaluation.multiple_choice import (
    MCItem,
    builtin_tasks,
    encode_pair,
    load_items,
    mc_accuracy,
    task_yaml,
    write_items,
)
from tests.conftest import tiny_model

pytest.importorskip("lm_eval")  # an optional extra; .ci/run installs it, so CI runs these


@pytest.fixture
def local_task(tmp_path: Path) -> tuple[Path, list[MCItem]]:
    import carve

    docs = carve.Corpus("legal").documents[:12]
    items = [
        MCItem(d[:120], [d[120:160], docs[(i + 1) % 12][120:160], docs[(i + 2) % 12][200:230]], i % 3)
        for i, d in enumerate(docs)
    ]
    folder = tmp_path / "tasks"
    folder.mkdir()
    write_items(items, folder / "mine.jsonl")
    (folder / "mine.yaml").write_text(task_yaml("my_legal_mc", folder / "mine.jsonl"))
    return folder, items


def test_encode_pair_moves_trailing_space_to_the_choice(tokenizer) -> None:
    ctx, cont = encode_pair(tokenizer, "Copyright: ", "2020 Free")
    assert ctx == tokenizer.encode("Copyright:")
    assert ctx + cont == tokenizer.encode("Copyright: 2020 Free")


def test_local_task_same_accuracy_from_lm_eval_and_carve(local_task, tokenizer) -> None:
    folder, items = local_task
    assert load_items(folder / "mine.jsonl") == items
    model = tiny_model("llama", seed=3)
    ours = mc_accuracy(model, tokenizer, items)
    theirs = run_tasks(model, tokenizer, ["my_legal_mc"], include_path=str(folder))["my_legal_mc"]
    for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert theirs[key] == pytest.approx(ours[key], abs=1e-9), key
    assert 0 < ours["acc"] < 1 or 0 < ours["acc_norm"] < 1  # not a degenerate agreement


def test_builtin_cloze_task_agrees(tokenizer) -> None:
    path = builtin_tasks()["carve_cloze_legal"]
    items = load_items(path)[:10]
    assert len(load_items(path)) == 100 and all(len(i.choices) == 4 for i in items)
    model = tiny_model("llama", seed=4)
    ours = mc_accuracy(model, tokenizer, items)
    theirs = run_tasks(model, tokenizer, ["carve_cloze_legal"], limit=10)["carve_cloze_legal"]
    assert theirs["acc"] == pytest.approx(ours["acc"]) and theirs["acc_norm"] == pytest.approx(ours["acc_norm"])


def test_unknown_task_and_missing_data_are_one_line_errors(tmp_path: Path, tokenizer) -> None:
    model = tiny_model("llama")
    with pytest.raises(UsageError, match="unknown lm-eval task"):
        run_tasks(model, tokenizer, ["no_such_task_xyz"])
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "gone.yaml").write_text(task_yaml("gone_task", tmp_path / "missing.jsonl"))
    with pytest.raises(UsageError, match="offline"):
        run_tasks(model, tokenizer, ["gone_task"], include_path=str(folder))


def test_carve_eval_tasks_into_the_manifest(
    tmp_path: Path, model_dir: Path, small_corpus: Path, local_task, capsys
) -> None:
    from carve.cli.main import main

    folder, _ = local_task
    out = tmp_path / "out"
    assert main(["extract", "--model", str(model_dir), "--domain", str(small_corpus), "--out", str(out),
                 "--calib-blocks", "4", "--block-len", "32", "--eval-blocks", "2", "--cloze-items", "0",
                 "--quiet", "--no-speed"]) == 0  # fmt: skip
    capsys.readouterr()
    args = ["eval", str(out), "--domain", str(small_corpus), "--block-len", "32", "--eval-blocks", "2",
            "--cloze-items", "0", "--tasks", "my_legal_mc", "carve_cloze_code", "--include-path", str(folder),
            "--limit", "6", "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert "my_legal_mc" in capsys.readouterr().out
    tasks = json.loads((out / "carve.json").read_text())["tasks"]
    assert set(tasks) == {"my_legal_mc", "carve_cloze_code"}
    assert 0 <= tasks["my_legal_mc"]["acc"] <= 1 and "acc_stderr" in tasks["carve_cloze_code"]
    assert torch.isfinite(torch.tensor(tasks["my_legal_mc"]["acc_norm"]))
