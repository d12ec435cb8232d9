"""Distillation recovery: the loss against a direct computation, training lowers it, sparsity
survives full and LoRA updates, and an interrupted run resumes to the same result."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import carve
from carve.cli.main import main
from carve.ops.distill import distill_loss
from carve.ops.train import checkpoint_dir
from carve.pipeline import tensor_fingerprint
from carve.recover import RecoverRecipe, recover

TINY = {"block_len": 32, "eval_blocks": 2, "cloze_items": 0}


def test_distill_loss_against_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    T = 2.0
    kl = 0.0
    for b in range(2):
        for i in range(4):  # the last position has no next token
            p = F.softmax(t[b, i] / T, -1)
            kl += (p * (p.log() - F.log_softmax(s[b, i] / T, -1))).sum()
    ce = sum(-F.log_softmax(s[b, i], -1)[ids[b, i + 1]] for b in range(2) for i in range(4))
    want = 0.7 * T**2 * kl / 8 + 0.3 * ce / 8
    torch.testing.assert_close(distill_loss(s, t, ids, T, 0.7, 0.3), want)
    assert distill_loss(t, t, ids, T, 1.0, 0.0).abs().item() < 1e-6  # a perfect student


def _extract(model_dir: Path, corpus: Path, out: Path, **kw) -> Path:
    recipe = carve.Recipe(model=str(model_dir), domain=str(corpus), calib_blocks=4, speed=False, **TINY, **kw)
    carve.extract(recipe, out)
    return out


@pytest.fixture
def structured(tmp_path: Path, model_dir: Path, small_corpus: Path) -> Path:
    return _extract(model_dir, small_corpus, tmp_path / "structured", structure=True, keep=0.6)


@pytest.fixture
def sparse(tmp_path: Path, model_dir: Path, small_corpus: Path) -> Path:
    return _extract(model_dir, small_corpus, tmp_path / "sparse", method="magnitude", sparsity=0.5)


def _recipe(student: Path, corpus: Path, **kw) -> RecoverRecipe:
    return RecoverRecipe(model=str(student), domain=str(corpus), **{**TINY, "lr": 3e-3, "warmup": 1, **kw})


def test_recovery_lowers_the_distillation_loss(tmp_path: Path, tokenizer) -> None:
    """A teacher with peaked predictions (large random weights), a student with 60% of its block
    parameters, text with a repeating pattern the student can learn to predict as the teacher
    does: the distillation loss falls over training."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    corpus = tmp_path / "periodic.jsonl"
    text = "the licence grants you the right to copy the work. " * 60
    corpus.write_text("".join(json.dumps({"text": f"document {i}. {text}"}) + "\n" for i in range(30)))
    config = tiny_config("llama")
    config.initializer_range = 0.3
    torch.manual_seed(0)
    teacher_dir = tmp_path / "teacher"
    AutoModelForCausalLM.from_config(config).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    student = _extract(teacher_dir, corpus, tmp_path / "student", structure=True, keep=0.6)
    m = recover(_recipe(student, corpus, steps=24, mix=0.0), tmp_path / "rec")
    losses = m["training"]["losses"]
    assert len(losses) == 24 and sum(losses[-5:]) < 0.6 * sum(losses[:5])
    assert m["teacher"]["model"] == str(teacher_dir)
    assert m["metrics"]["dense"] is not None and m["metrics"]["after"]["domain_ppl"] > 1
    assert not checkpoint_dir(tmp_path / "rec").exists()


@pytest.mark.parametrize("lora", [0, 4])
def test_sparsity_is_kept(tmp_path: Path, sparse: Path, small_corpus: Path, lora: int) -> None:
    from transformers import AutoModelForCausalLM

    m = recover(_recipe(sparse, small_corpus, steps=3, lora=lora), tmp_path / "rec")
    sp = m["sparsity"]
    assert sp["masked_weights"] > 0 and sp["zeros_kept"]
    assert sp["zero_share_after"] == pytest.approx(sp["zero_share_before"]) == pytest.approx(0.5, abs=0.01)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rec")  # a plain model, adapters merged
    before = AutoModelForCausalLM.from_pretrained(sparse)
    w, w0 = model.model.layers[0].mlp.down_proj.weight, before.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w == 0, w0 == 0) and not torch.equal(w, w0)  # trained, same zeros
    assert not any("lora" in k for k in load_file(str(tmp_path / "rec" / "model.safetensors")))


def test_resume_after_an_interruption_gives_the_uninterrupted_result(
    tmp_path: Path, structured: Path, small_corpus: Path
) -> None:
    recipe = _recipe(structured, small_corpus, steps=6, checkpoint_every=2)
    recover(recipe, tmp_path / "straight")

    def crash(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        recover(recipe, out, on_step=crash)
    assert not out.exists()
    assert json.loads((checkpoint_dir(out) / "progress.json").read_text())["step"] == 4
    m = recover(recipe, out, resume=True)
    assert m["training"]["resumed_from_step"] == 4 and len(m["training"]["losses"]) == 6
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    straight = json.loads((tmp_path / "straight" / "carve.json").read_text())["training"]["losses"]
    assert m["training"]["losses"] == pytest.approx(straight, abs=1e-4)


def test_chained_recovery_and_another_evaluation_corpus(
    tmp_path: Path, structured: Path, small_corpus: Path, tokenizer
) -> None:
    """A recovery of a recovered model still compares with the dense model (not with the first
    recovery's starting point); training on one corpus and measuring on another's held-out split
    evaluates that split, and the extraction's dense figures (measured elsewhere) are not shown."""
    extracted = json.loads((structured / "carve.json").read_text())
    first = recover(_recipe(structured, small_corpus, steps=2), tmp_path / "first")
    assert first["metrics"]["dense"] == extracted["metrics"]["before"]
    second = recover(_recipe(tmp_path / "first", small_corpus, steps=2), tmp_path / "second")
    assert second["metrics"]["dense"] == extracted["metrics"]["before"]
    assert second["metrics"]["before"] == pytest.approx(first["metrics"]["after"], rel=1e-4)

    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": d[:3000]}) + "\n" for d in carve.Corpus("general").documents[:40]))
    m = recover(_recipe(tmp_path / "first", small_corpus, steps=1, eval_domain=str(other)), tmp_path / "elsewhere")
    blocks = carve.Corpus(str(other)).eval_blocks(tokenizer, TINY["eval_blocks"], TINY["block_len"])
    assert m["data"]["eval"]["domain"]["fingerprint"] == tensor_fingerprint(blocks)
    assert m["metrics"]["dense"] is None and m["recipe"]["eval_domain"] == str(other)


def test_recover_cli_and_bad_input(
    tmp_path: Path, structured: Path, small_corpus: Path, model_dir: Path, capsys
) -> None:
    out = tmp_path / "rec"
    base = ["recover", str(structured), "--domain", str(small_corpus), "--block-len", "32", "--eval-blocks", "2",
            "--cloze-items", "0", "--quiet", "--out", str(out)]  # fmt: skip
    assert main([*base, "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "recovered" in printed and "dense teacher" in printed
    # a checkpoint from an interrupted run is neither ignored nor silently replaced
    checkpoint_dir(tmp_path / "again").mkdir()
    again = [*base[:-1], str(tmp_path / "again"), "--steps", "2"]
    assert main(again) == 2 and "--resume" in capsys.readouterr().err
    assert main([*base[:-1], str(tmp_path / "none"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    # a model without a manifest needs --teacher
    assert main(["recover", str(model_dir), *base[2:-1], str(tmp_path / "x")]) == 2
    assert "--teacher is needed" in capsys.readouterr().err
    assert main([*base[:-1], str(tmp_path / "y"), "--temperature", "0"]) == 2
    # a teacher named by the manifest that has since moved is named in the message, with the way out
    moved = tmp_path / "moved"
    shutil.copytree(structured, moved)
    manifest = json.loads((moved / "carve.json").read_text())
    manifest["source"]["model"] = str(tmp_path / "gone-dense")
    (moved / "carve.json").write_text(json.dumps(manifest))
    assert main(["recover", str(moved), *base[2:-1], str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "gone-dense" in err and "no longer there" in err and "--teacher" in err
    assert not any((tmp_path / n).exists() for n in ("x", "y", "z"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("temperature, kd, lm", [(1.0, 1.0, 0.0), (2.0, 0.5, 0.3)])
def test_chunked_distillation_equals_full_logits(arch: str, temperature: float, kd: float, lm: float) -> None:
    """The distillation loss over chunks of positions (no whole-block full-vocabulary logits)
    equals the loss from the full logits, and so do the student's gradients."""
    from carve.ops.distill import model_distill_loss
    from tests.conftest import tiny_model

    student, teacher = tiny_model(arch, seed=1), tiny_model(arch, seed=2)
    ids = torch.randint(0, 384, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits
    full = distill_loss(student(input_ids=ids).logits, t_logits, ids, temperature, kd, lm)
    full.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    chunked = model_distill_loss(student, teacher, ids, temperature, kd, lm, chunk=16)
    chunked.backward()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    for n, g in grads.items():
        torch.testing.assert_close(dict(student.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-6, msg=n)
