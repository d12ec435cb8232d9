"""`carve finetune` end to end on a tiny local model: every trainable kind, frozen weights
untouched, the update alone (--save-delta) round-trips bit for bit, bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import carve
from carve.cli.main import main
from carve.finetune import FinetuneRecipe, finetune
from carve.inspect import load_run
from carve.models.delta import DELTA_FILE, apply_delta, load_delta
from carve.ops.finetune import lora_rank_for
from carve.report import run_row
from carve.settings import Targets
from tests.conftest import tiny_model

FAST = ["--steps", "2", "--block-len", "32", "--eval-blocks", "2", "--cloze-items", "0", "--quiet"]


def _run(model_dir: Path, corpus: Path, out: Path, *extra: str) -> int:
    return main(["finetune", str(model_dir), "--domain", str(corpus), *FAST, "--out", str(out), *extra])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("kind", ["lift", "fisher", "magnitude", "random", "full", "lora"])
def test_each_trainable_kind(tmp_path: Path, model_dir: Path, small_corpus: Path, kind: str) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / kind
    assert _run(model_dir, small_corpus, out, "--trainable", kind, "--density", "0.1", "--rank", "4") == 0
    manifest = json.loads((out / "carve.json").read_text())
    assert manifest["job"] == "finetune" and manifest["trainable"]["kind"] == kind
    assert len(manifest["training"]["losses"]) == 2 and manifest["data"]["train"]["fingerprint"]
    model = AutoModelForCausalLM.from_pretrained(out)  # stock transformers, adapters merged
    assert not any("lora" in n for n, _ in model.named_parameters())
    before, after = _weights(model_dir), _weights(out)
    linear = [k for k in before if k.endswith("proj.weight")]
    moved = sum(int((after[k] != before[k]).sum()) for k in linear)
    total = sum(before[k].numel() for k in linear)
    if kind in ("full", "lora"):
        assert moved > 0.5 * total
    else:  # 10% of each matrix trained, every other entry bitwise unchanged
        assert 0 < moved <= 0.1 * total + len(linear)
        assert all(torch.equal(after[k], before[k]) for k in before if k not in linear)
    if kind == "lora":
        assert manifest["trainable"]["lora_rank"] == lora_rank_for(tiny_model("llama"), 0.1)
    # inspect and report say what the run was
    row = run_row(load_run(out))
    assert row["what"].startswith(f"finetune {kind}") and row["what"].endswith(", 2 steps")
    assert row["domain"] == small_corpus.name and row["domain_ppl"] == manifest["metrics"]["after"]["domain_ppl"]


def test_lora_rank_matches_the_trainable_count() -> None:
    model = tiny_model("llama")
    linears = Targets().linears(model)
    weights = sum(lin.weight.numel() for lin in linears.values())
    r = lora_rank_for(model, 0.1)
    adapters = r * sum(sum(lin.weight.shape) for lin in linears.values())
    assert abs(adapters - 0.1 * weights) <= sum(sum(lin.weight.shape) for lin in linears.values()) / 2


def test_importance_and_mask_files_choose_what_is_trained(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    """An importance map from `carve extract --save-importance` trains its top entries; a saved
    mask trains exactly its entries."""
    imp = tmp_path / "imp.safetensors"
    recipe = carve.Recipe(model=str(model_dir), domain=str(small_corpus), method="fisher", calib_blocks=2,
                          block_len=32, eval_blocks=2, cloze_items=0, speed=False)  # fmt: skip
    carve.extract(recipe, save_importance=imp)
    out = tmp_path / "imp"
    assert _run(model_dir, small_corpus, out, "--trainable", f"importance:{imp}", "--density", "0.1") == 0
    scores = carve.ImportanceMap.load(imp)
    chosen = carve.select_mask(scores, 0.9, "matrix")
    before, after = _weights(model_dir), _weights(out)
    for k, keep in chosen.items():
        assert torch.equal(after[k][~keep], before[k][~keep]), k

    mask = carve.Mask({k: v for k, v in chosen.items() if "mlp" in k})
    mask.save(tmp_path / "mask.safetensors")
    out2 = tmp_path / "masked"
    assert _run(model_dir, small_corpus, out2, "--trainable", f"mask:{tmp_path / 'mask.safetensors'}") == 0
    after2 = _weights(out2)
    for k in before:
        if k in mask:
            assert torch.equal(after2[k][~mask[k]], before[k][~mask[k]]) and not torch.equal(after2[k], before[k])
        else:
            assert torch.equal(after2[k], before[k]), k


def test_save_delta_round_trips_bit_for_bit(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    from transformers import AutoModelForCausalLM

    kw = {"model": str(model_dir), "domain": str(small_corpus), "steps": 2, "block_len": 32, "eval_blocks": 2,
          "cloze_items": 0, "density": 0.1, "rank": 4}  # fmt: skip
    whole = finetune(FinetuneRecipe(**kw), tmp_path / "whole")
    delta = finetune(FinetuneRecipe(**kw, save_delta=True), tmp_path / "delta")
    assert not (tmp_path / "delta" / "model.safetensors").exists()
    assert delta["size"]["delta_entries"] == whole["trainable"]["parameters"]
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    apply_delta(base, *load_delta(tmp_path / "delta" / DELTA_FILE))
    want = _weights(tmp_path / "whole")
    for n, p in base.state_dict().items():
        if n in want:
            assert torch.equal(p, want[n]), n
    # carve loads the update as a model (its base, named by its carve.json, with the update applied)
    loaded = carve.load_model(str(tmp_path / "delta")).model.state_dict()
    assert all(torch.equal(loaded[n], want[n]) for n in want)
    # the update is small: well under a tenth of the model file
    assert (tmp_path / "delta" / DELTA_FILE).stat().st_size < 0.1 * (
        tmp_path / "whole" / "model.safetensors"
    ).stat().st_size


def test_finetune_resumes_to_the_uninterrupted_result(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    kw = {"model": str(model_dir), "domain": str(small_corpus), "steps": 4, "block_len": 32, "eval_blocks": 2,
          "cloze_items": 0, "density": 0.1, "rank": 4, "checkpoint_every": 2}  # fmt: skip
    finetune(FinetuneRecipe(**kw), tmp_path / "straight")

    def crash(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneRecipe(**kw), tmp_path / "resumed", on_step=crash)
    ckpt = tmp_path / "resumed.checkpoint"
    assert sorted(p.name for p in ckpt.iterdir()) == ["progress.json", "state.safetensors"]
    m = finetune(FinetuneRecipe(**kw), tmp_path / "resumed", resume=True)
    assert m["training"]["resumed_from_step"] == 2 and not ckpt.exists()
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--trainable", "everything"], "is not one of lift"),
        (["--trainable", "importance:/no/such/file"], "does not exist"),
        (["--trainable", "importance"], "needs the file"),
        (["--density", "0"], "density 0.0 is outside"),
        (["--density", "1.5"], "is outside (0, 1)"),
        (["--mix", "2"], "mix 2.0 is outside"),
        (["--steps", "0"], "steps must be a positive"),
        (["--batch-size", "3", "--micro-batch", "2"], "not a multiple"),
    ],
)
def test_bad_input(tmp_path: Path, model_dir: Path, small_corpus: Path, capsys, flags: list[str], message: str) -> None:
    out = tmp_path / "out"
    assert _run(model_dir, small_corpus, out, *flags) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.*")) and not (tmp_path / "out.checkpoint").exists()


def test_an_importance_map_of_another_model_is_refused(
    tmp_path: Path, model_dir: Path, small_corpus: Path, capsys
) -> None:
    imp = carve.ImportanceMap({"model.layers.0.mlp.up_proj.weight": torch.rand(128, 64)}, {"model_fingerprint": "x"})
    imp.save(tmp_path / "imp.safetensors")
    assert (
        _run(model_dir, small_corpus, tmp_path / "o", "--trainable", f"importance:{tmp_path / 'imp.safetensors'}") == 2
    )
    assert "another model" in capsys.readouterr().err
    wrong = carve.Mask({"model.layers.0.mlp.up_proj.weight": torch.ones(3, 3, dtype=torch.bool)})
    wrong.save(tmp_path / "m.safetensors")
    assert _run(model_dir, small_corpus, tmp_path / "o", "--trainable", f"mask:{tmp_path / 'm.safetensors'}") == 2
    assert "does not have in that shape" in capsys.readouterr().err


def test_fisher_trains_the_top_of_the_domain_fisher_on_the_training_blocks(
    tmp_path: Path, model_dir: Path, small_corpus: Path
) -> None:
    from carve.importance import compute_importance
    from carve.job import training_blocks

    m = finetune(FinetuneRecipe(model=str(model_dir), domain=str(small_corpus), trainable="fisher", density=0.1,
                                steps=2, block_len=32, eval_blocks=2, cloze_items=0), tmp_path / "f")  # fmt: skip
    lm = carve.load_model(str(model_dir))
    blocks = training_blocks(lm.tokenizer, carve.Corpus(str(small_corpus)), carve.Corpus("general"), 2, 32, 0.0, 0)
    chosen = carve.select_mask(compute_importance("fisher", lm.model, data=blocks), 0.9, "matrix")
    before, after = _weights(model_dir), _weights(tmp_path / "f")
    for k, keep in chosen.items():
        assert torch.equal(after[k][~keep], before[k][~keep]) and not torch.equal(after[k][keep], before[k][keep]), k
    assert m["trainable"]["kind"] == "fisher"
