"""`carve export --gguf` (issue 21): carve outputs of tiny Llama-style, Qwen2, Qwen3, Gemma 3 and Phi-3 models written as GGUF reload
through transformers' own GGUF loader with logits equal to the source's within the type's
tolerance: dense, sparse-format, structured (narrower MLP and attention, dropped blocks)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import carve
from carve.cli.main import main
from carve.errors import UsageError
from carve.models.gguf_header import read_gguf_header
from tests.conftest import VOCAB, gemma_style_tokenizer, tiny_model

FAST = ["--calib-blocks", "4", "--block-len", "32", "--eval-blocks", "2", "--quiet", "--no-speed", "--cloze-items", "0"]
# largest |logit difference| as a share of the largest |logit|, by type (tiny random models)
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "bf16": 2e-2, "q8_0": 5e-2, "q4_0": 0.3}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _reloaded(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _check(source: Path | str, gguf: Path, kind: str) -> None:
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    want = _logits(carve.load_model(str(source)).model, ids)
    got = _logits(_reloaded(gguf), ids)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= TOLERANCE[kind] * want.abs().max(), kind


def _exported(model: torch.nn.Module, tokenizer, src: Path, kind: str) -> tuple[Path, dict]:
    """`model` saved with `tokenizer` as `src`, exported to `src`.gguf; the file and its header."""
    from carve.models.gguf_header import read_gguf_header

    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    gguf = src.with_name(f"{src.name}-{kind}.gguf")
    assert main(["export", str(src), "--gguf", str(gguf), "--type", kind]) == 0
    return gguf, read_gguf_header(gguf)


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_dense_model_every_type(kind: str, tmp_path: Path, model_dir: Path) -> None:
    gguf = tmp_path / f"m-{kind}.gguf"
    assert main(["export", str(model_dir), "--gguf", str(gguf), "--type", kind, "--json"]) == 0
    _check(model_dir, gguf, kind)


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_qwen2_as_llama_cpp_qwen2(kind: str, tmp_path: Path, tokenizer) -> None:

    src = tmp_path / "tiny-qwen2"
    model = tiny_model("qwen2")
    with torch.no_grad():  # random biases, so that a bias lost or misplaced shows in the logits
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    gguf, meta = _exported(model, tokenizer, src, kind)
    # transformers builds a Qwen2 directory's tokenizer as Qwen2Tokenizer, with Qwen2's split rule
    assert meta["general.architecture"] == "qwen2" and meta["tokenizer.ggml.pre"] == "qwen2"
    _check(src, gguf, kind)


def test_embedding_rows_beyond_the_tokenizer_padded(tmp_path: Path, tokenizer, capsys) -> None:
    """A model with more embedding rows than its tokenizer has tokens (Qwen2's 151,936 rows for 151,665
    tokens) gets unused `[PAD<id>]` tokens up to its rows, as llama.cpp's converter writes them (llama.cpp
    sizes the embeddings by the token list: unpadded, it does not load; bench/export_archs.py, row
    qwen2-padded-vocab); transformers' GGUF loader reads it back with the same logits.  A tokenizer with
    more tokens than rows is refused, nothing written; added tokens past the rows are left out, said in a note."""
    import transformers as tf
    from gguf import GGUFReader, TokenType

    config = tf.LlamaConfig(vocab_size=len(tokenizer) + 24, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    src = tmp_path / "tiny-padded"
    gguf, meta = _exported(tf.AutoModelForCausalLM.from_config(config), tokenizer, src, "f16")
    assert meta["llama.vocab_size"] == config.vocab_size
    fields = GGUFReader(gguf).fields
    tokens = fields["tokenizer.ggml.tokens"]
    types = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]
    assert len(tokens.data) == len(types) == config.vocab_size
    pads = [bytes(tokens.parts[i]).decode() for i in tokens.data[len(tokenizer) :]]
    assert pads == [f"[PAD{i}]" for i in range(len(tokenizer), config.vocab_size)]
    assert set(types[len(tokenizer) :]) == {TokenType.UNUSED} and TokenType.UNUSED not in types[: len(tokenizer)]
    _check(src, gguf, "f16")

    small = tmp_path / "tiny-short"
    tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**config.to_dict(), "vocab_size": len(tokenizer) - 1})
                                        ).save_pretrained(small)  # fmt: skip
    tokenizer.save_pretrained(small)
    out = tmp_path / "short.gguf"
    refused = f"gives token ids up to {len(tokenizer) - 1} but the model embeds only {len(tokenizer) - 1} tokens"
    for stream in ("--stream", "--no-stream", "--auto"):  # one rule (the loader's), however the model is read
        assert main(["export", str(small), "--gguf", str(out), *([stream] if stream != "--auto" else [])]) == 2
        assert refused in capsys.readouterr().err, stream
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))

    extra = copy.deepcopy(tokenizer)  # an added token past the rows (as transformers' GGUF reader adds some)
    extra.add_tokens(["<extra>"], special_tokens=True)
    tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**config.to_dict(), "vocab_size": len(tokenizer)})
                                        ).save_pretrained(small)  # fmt: skip
    extra.pad_token = "<extra>"  # a padding token past the rows: refused, by the loader and by the export alike
    extra.save_pretrained(small)
    for stream in ("--stream", "--no-stream"):
        assert main(["export", str(small), "--gguf", str(out), stream]) == 2
        assert f"gives token ids up to {len(tokenizer)} but the model embeds only" in capsys.readouterr().err
    assert not out.exists()
    extra.pad_token, extra.unk_token = tokenizer.pad_token, "<extra>"  # an unknown token past them: not written
    extra.save_pretrained(small)
    assert main(["export", str(small), "--gguf", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert any("<extra>" in n and "left out" in n for n in info["notes"])
    assert any(f"UNK token ({len(tokenizer)}) lies past the token list" in n for n in info["notes"])
    assert "tokenizer.ggml.unknown_token_id" not in read_gguf_header(out)
    assert len(GGUFReader(out).fields["tokenizer.ggml.tokens"].data) == len(tokenizer)

    # a gap in the tokenizer's ids (a vocabulary entry at id rows - 3, none at the ids before it): the gap and the
    # rows after the token padded, the token at its own id
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    at = config.vocab_size - 3
    data["model"]["vocab"]["<gap>"] = at
    gapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), eos_token="<eos>",
                                     unk_token="<unk>", pad_token="<eos>")  # fmt: skip
    assert gapped.convert_tokens_to_ids("<gap>") == at and at - 5 >= len(tokenizer)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(small)
    gapped.save_pretrained(small)
    assert main(["export", str(small), "--gguf", str(out), "--overwrite"]) == 0
    fields = GGUFReader(out).fields
    tokens = fields["tokenizer.ggml.tokens"]
    names = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    assert len(names) == config.vocab_size and names[at] == "<gap>"
    assert [i for i, t in enumerate(names) if t.startswith("[PAD")] == [i for i in range(len(tokenizer), config.vocab_size)
                                                                       if i != at]  # fmt: skip


def test_named_chat_templates(tmp_path: Path, tokenizer) -> None:
    """A tokenizer with several chat templates by name (Command R's default, tool_use and rag) goes in as
    llama.cpp's converter writes them: `default` as tokenizer.chat_template, each other under its name and
    listed in tokenizer.chat_templates (before, the export failed with a traceback on them)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = {"default": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
                         "tool_use": "{{ tools }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}  # fmt: skip
    _, meta = _exported(tiny_model("llama"), tok, tmp_path / "tiny-templates", "f16")
    assert meta["tokenizer.chat_template"] == tok.chat_template["default"]
    assert meta["tokenizer.chat_template.tool_use"] == tok.chat_template["tool_use"]
    assert meta["tokenizer.chat_templates"] == ["tool_use"]


@pytest.mark.parametrize(
    "model_type, gguf",
    [("qwen2_moe", "qwen2moe"), ("cohere", "command-r"), ("cohere2", "cohere2"), ("phi3", "phi3"),
     ("olmo2", "olmo2"), ("stablelm", "stablelm")],
)  # fmt: skip
def test_query_heads_narrower_than_the_hidden_size_refused(model_type: str, gguf: str) -> None:
    """llama.cpp's qwen2, qwen2moe, command-r, cohere2, olmo2, stablelm and phi3 size the query rows and the
    output projection by the hidden size (a structured Qwen2 with half its heads exported, then failed to
    load in llama.cpp: "attn_q.weight has wrong shape"): such a config is refused before anything is
    written; llama, qwen3 and gemma take it (head_dim apart from hidden / heads), and a Qwen2 goes in as
    llama.cpp's llama."""
    from types import SimpleNamespace

    from carve.export import check_config

    base = {"qk_layernorm": False, "use_parallel_residual": False, "use_qk_norm": False, "logit_scale": 0.0625,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "hidden_size": 64,
            "num_attention_heads": 2, "head_dim": 16, "num_hidden_layers": 2, "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"]}  # fmt: skip
    with pytest.raises(UsageError, match=f"llama.cpp's {gguf} takes query heads as wide as the hidden size"):
        check_config(SimpleNamespace(model_type=model_type, **base))
    check_config(SimpleNamespace(model_type=model_type, **{**base, "head_dim": 32}))  # 2 x 32 = 64: taken
    for taken in ("llama", "qwen3"):
        check_config(SimpleNamespace(model_type=taken, **base))
    qwen2 = SimpleNamespace(model_type="qwen2", **base)
    assert check_config(qwen2).gguf == "llama" and check_config(qwen2).permute_qk
    assert check_config(SimpleNamespace(model_type="qwen2", **{**base, "head_dim": 32})).gguf == "qwen2"


def test_structured_qwen2_exports(tmp_path: Path, tokenizer, small_corpus: Path, capsys) -> None:
    """A structured Qwen2 with narrower MLPs and a block dropped exports as llama.cpp's qwen2 and
    reloads; with half its heads it goes in as llama.cpp's llama (its qwen2 graph takes query heads as
    wide as the hidden size), Q and K rows and biases permuted to interleaved RoPE, said in a note, and
    reloads as a Llama with Q/K/V biases to the same logits (transformers undoes the permutation)."""
    src = tmp_path / "tiny-qwen2"
    model = tiny_model("qwen2")
    with torch.no_grad():  # random biases, so that a bias lost or left unpermuted shows in the logits
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    data = [str(src), "--domain", str(small_corpus), "--general", str(small_corpus), *FAST, "--mlp-keep", "0.5"]
    out, narrow = tmp_path / "structured", tmp_path / "narrow"
    assert main(["extract", *data, "--heads-keep", "1.0", "--drop-blocks", "1", "--out", str(out)]) == 0
    assert main(["export", str(out), "--gguf", str(tmp_path / "s.gguf"), "--type", "f16"]) == 0
    assert read_gguf_header(tmp_path / "s.gguf")["general.architecture"] == "qwen2"
    _check(out, tmp_path / "s.gguf", "f16")
    assert main(["extract", *data, "--heads-keep", "0.5", "--drop-blocks", "0", "--out", str(narrow)]) == 0
    config = json.loads((narrow / "config.json").read_text())
    assert config["num_attention_heads"] * config["head_dim"] < config["hidden_size"]
    capsys.readouterr()
    assert main(["export", str(narrow), "--gguf", str(tmp_path / "n.gguf"), "--type", "f16"]) == 0
    assert "written as llama.cpp's llama, not qwen2" in capsys.readouterr().err
    meta = read_gguf_header(tmp_path / "n.gguf")
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert meta["llama.attention.head_count"] == config["num_attention_heads"]
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    want = _logits(carve.load_model(str(narrow)).model, ids)
    # transformers' GGUF loader reads no attention_bias for llama: asked for, o_proj's bias is zero
    reloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="n.gguf", dtype=torch.float32, attention_bias=True
    ).eval()
    assert reloaded.model.layers[0].self_attn.q_proj.bias.abs().max() > 0
    got = _logits(reloaded, ids)
    assert (got - want).abs().max() <= TOLERANCE["f16"] * want.abs().max()


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_qwen3_as_llama_cpp_qwen3(kind: str, tmp_path: Path, tokenizer) -> None:
    """Qwen3: head_dim apart from hidden / heads, per-head Q and K norms (random, so that a norm lost
    or swapped shows in the logits).  head_dim 128 as in every released Qwen3: transformers' GGUF
    loader reads no key length for qwen3 and assumes 128 (llama.cpp reads the key length written)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    src = tmp_path / "tiny-qwen3"
    config = tiny_config("qwen3")
    config.head_dim = 128
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_norm.weight.normal_(1, 0.5)
            layer.self_attn.k_norm.weight.normal_(1, 0.5)
    gguf, meta = _exported(model, tokenizer, src, kind)
    assert meta["general.architecture"] == "qwen3" and meta["qwen3.attention.key_length"] == 128
    _check(src, gguf, kind)


def _gemma_with_random_norms(config: Any) -> torch.nn.Module:
    """A Gemma model (seed 0) whose norm weights are drawn from N(0, 0.5): Gemma scales by 1 + w, so a
    lost norm or a missing 1 + w shows in the logits."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("kind", ["f16", "bf16"])  # quantized types: the same writer as the Llama tests'
def test_gemma3_as_llama_cpp_gemma3(kind: str, tmp_path: Path, tokenizer) -> None:
    """Gemma 3: four norms per block and per-head Q/K norms (random, so that a lost or swapped norm or
    a missing 1 + w shows in the logits), embeddings scaled by sqrt(hidden), tied head.  head_dim 256
    as in every released Gemma 3: transformers' GGUF loader reads no query_pre_attn_scalar and keeps
    the config's default (256), which llama.cpp's 1/sqrt(head_dim) then matches.  The sequence is
    longer than the sliding window, so a layer's kind matters; transformers' loader derives the kinds
    from its default pattern (every sixth layer global), so the model follows it here, and the per-layer
    pattern llama.cpp reads is checked in the metadata."""
    import transformers as tf
    from gguf import GGUFReader

    src = tmp_path / "tiny-gemma3"
    config = tf.Gemma3TextConfig(vocab_size=512, max_position_embeddings=256, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                 sliding_window=8)  # fmt: skip
    assert config.layer_types[:2] == ["sliding_attention"] * 2 and config.layer_types[5] == "full_attention"
    model = _gemma_with_random_norms(config)
    gguf, meta = _exported(model, tokenizer, src, kind)
    assert meta["general.architecture"] == "gemma3" and meta["gemma3.attention.sliding_window"] == 8
    field = GGUFReader(gguf).fields["gemma3.attention.sliding_window_pattern"]  # numeric: not in carve's header
    assert [bool(field.parts[i][0]) for i in field.data] == [True] * 5 + [False]
    assert meta["gemma3.rope.freq_base"] == 1_000_000.0 and meta["gemma3.rope.freq_base_swa"] == 10_000.0
    _check(src, gguf, kind)


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_phi3_as_llama_cpp_phi3(kind: str, tmp_path: Path, tokenizer, small_corpus: Path, capsys) -> None:
    """Phi-3: one fused qkv_proj (llama.cpp's attn_qkv) and one fused gate_up_proj (its ffn_up, gate rows
    first), rotate-half RoPE (no permutation), no biases; a dense model and a 50% sparse extraction."""
    src = tmp_path / "tiny-phi3"
    gguf, meta = _exported(tiny_model("phi3"), tokenizer, src, kind)
    assert meta["general.architecture"] == "phi3" and meta["phi3.feed_forward_length"] == 128
    assert meta["phi3.attention.head_count_kv"] == 2 and meta["phi3.rope.dimension_count"] == 16
    _check(src, gguf, kind)
    out = tmp_path / "sparse"
    assert main(["extract", "--model", str(src), "--domain", str(small_corpus), "--general", str(small_corpus),
                 "--method", "sparsegpt", "--sparsity", "0.5", "--out", str(out), *FAST]) == 0  # fmt: skip
    assert main(["export", str(out), "--gguf", str(tmp_path / "sparse.gguf"), "--type", kind]) == 0
    _check(out, tmp_path / "sparse.gguf", kind)
    # structured: half the MLP channels sliced out of the fused gate_up_proj, a block dropped
    out = tmp_path / "structured"
    data = [str(src), "--domain", str(small_corpus), "--general", str(small_corpus), *FAST, "--structure"]
    assert main(["extract", *data, "--heads-keep", "1.0", "--mlp-keep", "0.5", "--drop-blocks", "1",
                 "--out", str(out)]) == 0  # fmt: skip
    gguf = tmp_path / "structured.gguf"
    assert main(["export", str(out), "--gguf", str(gguf), "--type", kind]) == 0
    meta = read_gguf_header(gguf)
    assert (meta["phi3.block_count"], meta["phi3.feed_forward_length"]) == (1, 64)
    _check(out, gguf, kind)
    # without half its heads: llama.cpp sizes phi3's query rows by the hidden size (bench/RESULTS.md,
    # export-archs: it fails to load the file), so the export is refused and writes nothing
    narrow = tmp_path / "narrow"
    assert main(["extract", *data, "--heads-keep", "0.5", "--mlp-keep", "0.5", "--drop-blocks", "0",
                 "--out", str(narrow)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["export", str(narrow), "--gguf", str(tmp_path / "narrow.gguf")]) == 2
    assert "query heads as wide as the hidden size" in capsys.readouterr().err
    assert not (tmp_path / "narrow.gguf").exists()


def test_phi3_sliding_window_noted(tmp_path: Path, tokenizer, capsys) -> None:
    """llama.cpp's phi3 disables Phi-3's sliding window (bench/RESULTS.md, export-archs: it matches
    transformers without the window): the export writes the window, says so, and goes on."""
    from tests.conftest import tiny_config

    config = tiny_config("phi3")
    config.sliding_window = 16
    from transformers import AutoModelForCausalLM

    src = tmp_path / "phi3-window"
    capsys.readouterr()
    _, meta = _exported(AutoModelForCausalLM.from_config(config), tokenizer, src, "f16")
    assert meta["phi3.attention.sliding_window"] == 16
    assert "full attention" in capsys.readouterr().err


def test_mistral_sliding_window_noted(tmp_path: Path, tokenizer, capsys) -> None:
    """Mistral goes in as llama.cpp's llama, which attends to the whole context: the export says so."""
    model = tiny_model("mistral")
    model.config.sliding_window = 16
    capsys.readouterr()
    _, meta = _exported(model, tokenizer, tmp_path / "mistral-window", "f16")
    assert meta["general.architecture"] == "llama" and "past 16 tokens" in capsys.readouterr().err


def _phi3_longrope(rope: dict[str, Any]) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    config = tiny_config("phi3")  # head_dim 16, context 256
    config.original_max_position_embeddings = rope.get("original_max_position_embeddings", 256)  # Phi-3 keeps both
    config.rope_parameters = {"rope_theta": 10000.0, "partial_rotary_factor": 0.75, **rope}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_phi3_longrope_as_rope_factors(tmp_path: Path, tokenizer, capsys) -> None:
    """LongRoPE (the 128k Phi-3, Phi-3.5, Phi-4-mini) as llama.cpp's phi3 takes it (its
    convert_hf_to_gguf's keys): the config's long and short factors as `rope_factors_long.weight` and
    `rope_factors_short.weight`, one per rotated frequency (here 3/4 of a head rotated, as Phi-4-mini),
    the original context, and the attention factor transformers scales cos and sin by; every other
    tensor and key as the same weights' plain-RoPE export.  (transformers' GGUF loader reads no RoPE
    scaling; the logits in llama.cpp itself: bench/export_archs.py, phi3-longrope rows.)"""
    import math

    import numpy as np
    from gguf import GGUFReader

    long, short = [1.5, 2.0, 4.0, 8.0, 12.0, 16.0], [1.0, 1.1, 1.3, 1.6, 2.0, 2.5]
    model = _phi3_longrope({"rope_type": "longrope", "long_factor": long, "short_factor": short,
                            "original_max_position_embeddings": 64})  # fmt: skip
    assert model.model.rotary_emb.attention_scaling == pytest.approx(math.sqrt(1 + math.log(256 / 64) / math.log(64)))
    capsys.readouterr()
    gguf, meta = _exported(model, tokenizer, tmp_path / "tiny-phi3-long", "f16")
    assert "run it with n_ctx 64 or less" in capsys.readouterr().err
    assert meta["phi3.rope.dimension_count"] == 12 and meta["phi3.rope.scaling.original_context_length"] == 64
    assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx(model.model.rotary_emb.attention_scaling, rel=1e-6)
    plain_model = _phi3_longrope({"rope_type": "default"})
    plain_model.load_state_dict(model.state_dict())
    plain, plain_meta = _exported(plain_model, tokenizer, tmp_path / "tiny-phi3-plain", "f16")
    rope_keys = {"phi3.rope.scaling.original_context_length", "phi3.rope.scaling.attn_factor"}
    other = {"carve.tensor_types", "general.name"}  # the directory's name; the file's tensors: below
    assert {k: v for k, v in meta.items() if k not in rope_keys | other} == {
        k: v for k, v in plain_meta.items() if k not in other
    }
    tensors = {t.name: np.array(t.data) for t in GGUFReader(str(gguf)).tensors}
    plain_tensors = {t.name: np.array(t.data) for t in GGUFReader(str(plain)).tensors}
    assert np.array_equal(tensors.pop("rope_factors_long.weight"), np.float32(long))
    assert np.array_equal(tensors.pop("rope_factors_short.weight"), np.float32(short))
    assert tensors.keys() == plain_tensors.keys()
    assert all(np.array_equal(tensors[k], plain_tensors[k]) for k in tensors)


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        ({"rope_type": "longrope", "long_factor": [2.0] * 8, "short_factor": [1.0] * 6,
          "original_max_position_embeddings": 64}, "6 long and short factors"),
        ({"rope_type": "longrope", "long_factor": [2.0] * 6, "short_factor": [1.0] * 6}, "original_max_position"),
        ({"rope_type": "linear", "factor": 4.0}, "scales it as 'linear'"),
    ],
)  # fmt: skip
def test_phi3_rope_llama_cpp_cannot_take_refused(rope: dict[str, Any], message: str) -> None:
    """carve's own check of a Phi-3's RoPE before any work (transformers' Phi3Config refuses these
    too, so a model directory never gets this far; a config from elsewhere might)."""
    from types import SimpleNamespace

    from carve.errors import UsageError
    from carve.export import check_config

    config = SimpleNamespace(model_type="phi3", hidden_size=64, num_attention_heads=4,
                             rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.75, **rope})  # fmt: skip
    with pytest.raises(UsageError, match=message):
        check_config(config)


def test_gemma3_structured_keeps_layer_kinds(tmp_path: Path, tokenizer, small_corpus: Path) -> None:
    """A structured Gemma 3 output (a block dropped, MLPs narrowed) exports with the per-layer sliding
    pattern of the blocks it kept, and reloads with the output's weights.  transformers' loader
    derives the layer kinds from its default pattern (here: all sliding) and not from the file, and
    the kinds differ in RoPE base, so the reload is compared with the output's weights under those
    kinds (the kinds themselves: the metadata check here, and llama.cpp in bench/export_archs.py)."""
    import transformers as tf
    from gguf import GGUFReader

    src = tmp_path / "tiny-gemma3"
    config = tf.Gemma3TextConfig(vocab_size=512, max_position_embeddings=256, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                 sliding_window=32, layer_types=["sliding_attention", "full_attention", "sliding_attention"])  # fmt: skip
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "structured"
    data = ["--model", str(src), "--domain", str(small_corpus), "--general", str(small_corpus), *FAST]
    assert main(["extract", *data, "--out", str(out), "--structure", "--drop-blocks", "1", "--mlp-keep", "0.5",
                 "--heads-keep", "1.0"]) == 0  # fmt: skip
    kinds = json.loads((out / "config.json").read_text())["layer_types"]
    assert len(kinds) == 2
    gguf = tmp_path / "structured.gguf"
    assert main(["export", str(out), "--gguf", str(gguf), "--type", "f16"]) == 0
    field = GGUFReader(gguf).fields["gemma3.attention.sliding_window_pattern"]
    assert [bool(field.parts[i][0]) for i in field.data] == [k == "sliding_attention" for k in kinds]
    as_loaded = tmp_path / "as-loaded"
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    model.config.layer_types = ["sliding_attention"] * len(kinds)
    model.save_pretrained(as_loaded)
    tokenizer.save_pretrained(as_loaded)
    _check(as_loaded, gguf, "f16")


def test_sentencepiece_tokenizer_as_llama_vocab(tmp_path: Path) -> None:
    """A SentencePiece-style BPE tokenizer goes in as llama.cpp's `llama` model: byte tokens typed
    BYTE, no prefix space (Gemma), merge order as scores (a token's score is minus the rank of the
    merge that makes it), and read back by transformers' GGUF loader it encodes text, bytes outside
    the vocabulary included, to the same ids."""
    import transformers as tf
    from gguf import GGUFReader, TokenType

    tok = gemma_style_tokenizer()
    src = tmp_path / "tiny-gemma3"
    config = tf.Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=256)  # fmt: skip
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tok.save_pretrained(src)
    gguf = tmp_path / "g.gguf"
    assert main(["export", str(src), "--gguf", str(gguf)]) == 0
    fields = GGUFReader(gguf).fields

    def values(key: str) -> list:
        f = fields[key]
        return [f.parts[i][0] if len(f.parts[i]) == 1 else bytes(f.parts[i]).decode() for i in f.data]

    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    assert not bool(fields["tokenizer.ggml.add_space_prefix"].parts[-1][0])
    tokens, types, scores = (
        values("tokenizer.ggml.tokens"),
        values("tokenizer.ggml.token_type"),
        values("tokenizer.ggml.scores"),
    )
    assert [t for t, k in zip(tokens, types, strict=True) if k == TokenType.BYTE] == [
        f"<0x{i:02X}>" for i in range(256)
    ]
    merges = values("tokenizer.ggml.merges")
    first = {}
    for r, m in enumerate(merges):
        first.setdefault(m.replace(" ", ""), r)
    assert all(scores[tokens.index(t)] == -r for t, r in list(first.items())[:50])
    back = tf.AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name)
    for text in ["The parties agree that the licence is granted.", "  two spaces,  and é ü ∑ 😀 outside it"]:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_gemma2_as_llama_cpp_gemma2(kind: str, tmp_path: Path, tokenizer) -> None:
    """Gemma 2: four norms per block (random, so that a lost norm or a missing 1 + w shows), embeddings
    scaled by sqrt(hidden), tied head, attention and final soft-capping (transformers' defaults, 50 and
    30, which its GGUF loader keeps, as it keeps query_pre_attn_scalar 256: head_dim 256 here), layers
    alternating sliding and global from the first, a sequence longer than the window."""
    import transformers as tf

    config = tf.Gemma2Config(vocab_size=512, max_position_embeddings=256, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                             sliding_window=8)  # fmt: skip
    assert config.layer_types == ["sliding_attention", "full_attention"] * 2
    model = _gemma_with_random_norms(config)
    gguf, meta = _exported(model, tokenizer, tmp_path / "tiny-gemma2", kind)
    assert meta["general.architecture"] == "gemma2" and meta["gemma2.attention.sliding_window"] == 8
    assert meta["gemma2.attn_logit_softcapping"] == 50.0 and meta["gemma2.final_logit_softcapping"] == 30.0
    _check(tmp_path / "tiny-gemma2", gguf, kind)


def test_gemma2_refusals(tmp_path: Path, tokenizer, capsys) -> None:
    """A Gemma 2 llama.cpp's gemma2 computes otherwise: refused by name, with nothing written.  A
    structured output that dropped one block breaks llama.cpp's fixed sliding / global alternation."""
    import transformers as tf

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32,
             "sliding_window": 8}  # fmt: skip
    cases = {
        "dropped block": ({"layer_types": ["sliding_attention", "sliding_attention", "full_attention"]},
                          "every even layer sliding"),
        "query_pre_attn_scalar": ({"query_pre_attn_scalar": 64}, "scales attention by 1/sqrt(32)"),
        "activation": ({"hidden_activation": "silu"}, "tanh-approximated GELU"),
    }  # fmt: skip
    models = {name: (tf.AutoModelForCausalLM.from_config(tf.Gemma2Config(**{**sizes, **extra})), message)
              for name, (extra, message) in cases.items()}  # fmt: skip
    _assert_export_refused(tmp_path, tokenizer, capsys, models)


def _tiny_gguf(
    config: Any, tokenizer, src: Path, norms: bool = False
) -> tuple[dict[str, torch.Tensor], dict, dict[str, Any]]:
    """A tiny model of `config` (seed 0; `norms`: its norm weights and biases drawn from N(0, 0.5), so
    that an offset or a lost one shows) exported as f16 GGUF: its state dict, the file's metadata and
    its tensors by llama.cpp's names."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if norms and "norm" in name:
                p.normal_(0, 0.5)
    gguf, meta = _exported(model, tokenizer, src, "f16")
    return model.state_dict(), meta, _gguf_tensors(gguf)


def _assert_written(tensors: dict[str, Any], state: dict[str, torch.Tensor], names: dict[str, str]) -> None:
    """Each llama.cpp tensor `tensors[name]` holds the model's `state[names[name]]` as an f16 export writes
    it: matrices in f16, vectors (norms, biases) in float32."""
    import numpy as np

    for name, hf in names.items():
        w = state[hf]
        want = w.numpy() if w.dim() == 1 else w.half().numpy()
        assert np.array_equal(tensors[name].reshape(want.shape), want), name


def _assert_export_refused(tmp_path: Path, tokenizer, capsys, models: dict[str, tuple[Any, str]]) -> None:
    """Each model (name -> (model, message)) saved with `tokenizer` and exported: refused with one line that
    says `message`, nothing written."""
    for i, (name, (model, message)) in enumerate(models.items()):
        src, out = tmp_path / f"refused-{i}", tmp_path / f"refused-{i}.gguf"
        model.save_pretrained(src)
        tokenizer.save_pretrained(src)
        capsys.readouterr()
        assert main(["export", str(src), "--gguf", str(out)]) == 2, name
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()


def _assert_text_model_exported(model: Any, tokenizer, tmp_path: Path, arch: str, computed: int = 0) -> None:
    """An image-text checkpoint `model` saved and exported: as llama.cpp's `arch`, only its text model's tensors
    (plus `computed` ones from its config: Gemma 4's RoPE factors) and the head where not tied, nothing of its
    vision tower; streamed, the same file."""
    from carve.export import export

    src = tmp_path / "image-text"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    assert export(src, tmp_path / "mem.gguf", "f16", stream=False)["architecture"] == arch
    tensors = _gguf_tensors(tmp_path / "mem.gguf")
    assert not any("vision" in name or "visual" in name or "mm" in name for name in tensors)
    text = [k for k in model.state_dict() if k.startswith("model.language_model.")]
    head = "lm_head.weight" in model.state_dict() and not model.config.get_text_config().tie_word_embeddings
    assert len(tensors) == len(text) + head + computed
    export(src, tmp_path / "st.gguf", "f16", stream=True)
    assert (tmp_path / "st.gguf").read_bytes() == (tmp_path / "mem.gguf").read_bytes()


def _gguf_tensors(path: Path) -> dict[str, Any]:
    import numpy as np
    from gguf import GGUFReader

    return {t.name: np.array(t.data) for t in GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("arch", ["smollm3", "granite"])
def test_llama_family_with_own_keys(arch: str, tmp_path: Path, tokenizer) -> None:
    """SmolLM3 and Granite go in as llama.cpp's `smollm3` and `granite`: Llama's tensors (Q/K permuted)
    byte for byte as the same weights exported as a Llama, under their own architecture with their
    own keys (Granite's four multipliers).  transformers' GGUF loader reads neither; their logits in
    llama.cpp itself: bench/export_archs.py, rows smollm3 and granite."""
    import numpy as np
    import transformers as tf

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
             "tie_word_embeddings": True, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}  # fmt: skip
    extra = {"granite": {"attention_multiplier": 0.05, "embedding_multiplier": 12.0, "residual_multiplier": 0.25,
                         "logits_scaling": 8.0}}.get(arch, {})  # fmt: skip
    config = {"smollm3": tf.SmolLM3Config, "granite": tf.GraniteConfig}[arch](**sizes, **extra)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    gguf, meta = _exported(model, tokenizer, tmp_path / f"tiny-{arch}", "f16")
    llama = tf.AutoModelForCausalLM.from_config(
        tf.LlamaConfig(**sizes, rope_theta=config.rope_parameters["rope_theta"])
    )
    llama.load_state_dict(model.state_dict())
    plain, plain_meta = _exported(llama, tokenizer, tmp_path / "tiny-llama", "f16")
    assert meta["general.architecture"] == arch and plain_meta["general.architecture"] == "llama"
    assert meta[f"{arch}.rope.freq_base"] == plain_meta["llama.rope.freq_base"]
    if arch == "granite":
        assert [meta[f"granite.{k}"] for k in ("attention.scale", "embedding_scale", "residual_scale", "logit_scale")] \
            == pytest.approx([0.05, 12.0, 0.25, 8.0])  # fmt: skip
    tensors, plain_tensors = _gguf_tensors(gguf), _gguf_tensors(plain)
    assert tensors.keys() == plain_tensors.keys()
    assert all(np.array_equal(tensors[k], plain_tensors[k]) for k in tensors)


def test_gemma_as_llama_cpp_gemma(tmp_path: Path, tokenizer) -> None:
    """Gemma 1 (CodeGemma) as llama.cpp's `gemma`: each tensor under Llama's GGUF name, Q and K
    unpermuted (rotate-half RoPE), every norm weight written as 1 + w (Gemma's RMSNorm scales by 1 + w,
    llama.cpp's by w), head_dim apart from hidden / heads as key and value lengths; exact GELU and
    scaled RoPE refused.  transformers' GGUF loader does not read it; its logits in llama.cpp itself:
    bench/export_archs.py, row gemma."""
    import numpy as np
    import transformers as tf

    from carve.errors import UsageError
    from carve.export import architecture

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 256}  # fmt: skip
    state, meta, tensors = _tiny_gguf(tf.GemmaConfig(**sizes), tokenizer, tmp_path / "tiny-gemma", norms=True)
    assert meta["general.architecture"] == "gemma"
    assert meta["gemma.attention.key_length"] == meta["gemma.attention.value_length"] == 256
    for hf, name in {"model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
                     "model.layers.1.self_attn.k_proj.weight": "blk.1.attn_k.weight",
                     "model.layers.0.mlp.gate_proj.weight": "blk.0.ffn_gate.weight"}.items():  # fmt: skip
        want = state[hf].half().numpy()
        assert np.array_equal(tensors[name].reshape(want.shape), want), name
    for hf, name in {"model.layers.0.input_layernorm.weight": "blk.0.attn_norm.weight",
                     "model.layers.1.post_attention_layernorm.weight": "blk.1.ffn_norm.weight",
                     "model.norm.weight": "output_norm.weight"}.items():  # fmt: skip
        assert np.allclose(tensors[name], state[hf].numpy() + 1.0), name
    assert "output.weight" not in tensors  # tied: llama.cpp reads the embeddings
    check = architecture("gemma").check
    assert check is not None
    with pytest.raises(UsageError, match="tanh-approximated GELU"):
        check(tf.GemmaConfig(**sizes, hidden_act="relu"))
    with pytest.raises(UsageError, match="plain RoPE"):
        check(tf.GemmaConfig(**sizes, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))


def test_olmoe_as_llama_cpp_olmoe(tmp_path: Path, tokenizer) -> None:
    """OLMoE as llama.cpp's `olmoe`: Llama's names unpermuted, the whole-projection Q/K norms, the
    router and each expert's gate, up and down as llama.cpp's expert tensors, the expert counts; what
    its graph computes otherwise refused (renormalized routing, clipped QKV, fewer key/value heads than
    query heads: its K norm is sized by the hidden size).  Logits in llama.cpp itself:
    bench/export_archs.py, rows olmoe and olmoe-experts."""
    import numpy as np
    import transformers as tf

    from carve.errors import UsageError
    from carve.export import architecture

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts": 4, "num_experts_per_tok": 2,
             "max_position_embeddings": 256}  # fmt: skip
    state, meta, tensors = _tiny_gguf(tf.OlmoeConfig(**sizes), tokenizer, tmp_path / "tiny-olmoe")
    assert meta["general.architecture"] == "olmoe"
    assert meta["olmoe.expert_count"] == 4 and meta["olmoe.expert_used_count"] == 2
    gate_up = state["model.layers.1.mlp.experts.gate_up_proj"]  # [E, 2·ff, hidden], gate rows first
    for name, want in {"blk.1.attn_q.weight": state["model.layers.1.self_attn.q_proj.weight"],
                       "blk.1.attn_k_norm.weight": state["model.layers.1.self_attn.k_norm.weight"],
                       "blk.1.ffn_gate_exps.weight": gate_up[:, :32], "blk.1.ffn_up_exps.weight": gate_up[:, 32:],
                       "blk.1.ffn_down_exps.weight": state["model.layers.1.mlp.experts.down_proj"]}.items():  # fmt: skip
        w = want.numpy() if want.dim() == 1 else want.half().numpy()
        assert np.array_equal(tensors[name].reshape(w.shape), w), name
    assert np.array_equal(
        tensors["blk.1.ffn_gate_inp.weight"].reshape(4, 64), state["model.layers.1.mlp.gate.weight"].numpy()
    )
    check = architecture("olmoe").check
    assert check is not None
    for change, words in (({"norm_topk_prob": True}, "does not renormalize"), ({"clip_qkv": 8.0}, "does not clip"),
                          ({"num_key_value_heads": 2}, "sizes the K norm")):  # fmt: skip
        with pytest.raises(UsageError, match=words):
            check(tf.OlmoeConfig(**{**sizes, **change}))


def test_granite_moe_as_llama_cpp_granitemoe(tmp_path: Path, tokenizer) -> None:
    """Granite 3 MoE as llama.cpp's `granitemoe`: Granite's four multipliers, the expert counts, Q and K
    permuted as Llama's, the router and experts under `block_sparse_moe` as llama.cpp's expert tensors;
    with a shared expert (GraniteMoeShared), its gate, up and down as llama.cpp's `*_shexp` and its
    width.  Logits in llama.cpp itself: bench/export_archs.py, rows granitemoe, granitemoe-experts and
    granitemoe-shared."""
    import numpy as np
    import transformers as tf

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
             "max_position_embeddings": 256, "attention_multiplier": 0.05, "embedding_multiplier": 12.0,
             "residual_multiplier": 0.25, "logits_scaling": 8.0}  # fmt: skip
    state, meta, tensors = _tiny_gguf(tf.GraniteMoeConfig(**sizes), tokenizer, tmp_path / "tiny-granitemoe")
    assert meta["general.architecture"] == "granitemoe"
    assert meta["granitemoe.expert_count"] == 4 and meta["granitemoe.expert_used_count"] == 2
    assert [meta[f"granitemoe.{k}"] for k in ("attention.scale", "embedding_scale", "residual_scale", "logit_scale")] \
        == pytest.approx([0.05, 12.0, 0.25, 8.0])  # fmt: skip
    gate_up = state["model.layers.0.block_sparse_moe.experts.gate_up_proj"]
    for name, want in {"blk.0.ffn_gate_exps.weight": gate_up[:, :32], "blk.0.ffn_up_exps.weight": gate_up[:, 32:],
                       "blk.0.ffn_down_exps.weight": state["model.layers.0.block_sparse_moe.experts.down_proj"],
                       "blk.0.attn_v.weight": state["model.layers.0.self_attn.v_proj.weight"]}.items():  # fmt: skip
        assert np.array_equal(tensors[name].reshape(want.shape), want.half().numpy()), name
    router = state["model.layers.0.block_sparse_moe.router.weight"].numpy()
    assert np.array_equal(tensors["blk.0.ffn_gate_inp.weight"].reshape(router.shape), router)  # float32
    q = tensors["blk.0.attn_q.weight"].reshape(64, 64)
    assert not np.array_equal(q, state["model.layers.0.self_attn.q_proj.weight"].half().numpy())  # permuted
    # with a shared expert beside the routed ones: its fused gate/up (gate rows first) as two tensors
    state, meta, tensors = _tiny_gguf(tf.GraniteMoeSharedConfig(**sizes, shared_intermediate_size=48), tokenizer,
                                      tmp_path / "tiny-granitemoe-shared")  # fmt: skip
    assert meta["general.architecture"] == "granitemoe" and meta["granitemoe.expert_shared_feed_forward_length"] == 48
    fused = state["model.layers.1.shared_mlp.input_linear.weight"]
    for name, want in {"blk.1.ffn_gate_shexp.weight": fused[:48], "blk.1.ffn_up_shexp.weight": fused[48:],
                       "blk.1.ffn_down_shexp.weight": state["model.layers.1.shared_mlp.output_linear.weight"]}.items():  # fmt: skip
        assert np.array_equal(tensors[name].reshape(want.shape), want.half().numpy()), name


# DeepSeek in small: 3 blocks (the first dense), 4 heads of 16 + 8 rotated key channels and 12 value
# channels from a latent of 24, queries through rank 32, 4 experts (2 per token) beside 2 shared ones
_DEEPSEEK = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256, "q_lora_rank": 32,
             "kv_lora_rank": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
             "moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 2,
             "first_k_dense_replace": 1, "routed_scaling_factor": 2.5}  # fmt: skip


def _deepseek_config(arch: str, **extra: Any) -> Any:
    import transformers as tf

    if arch == "deepseek_v3":
        return tf.DeepseekV3Config(**{**_DEEPSEEK, "n_group": 2, "topk_group": 1, **extra})
    if arch == "glm4_moe_lite":  # GLM-4.7-Flash: its dense blocks named in mlp_layer_types
        sizes = {k: v for k, v in _DEEPSEEK.items() if k != "first_k_dense_replace"}
        return tf.Glm4MoeLiteConfig(**{**sizes, "mlp_layer_types": ["dense", "sparse", "sparse"], **extra})
    return tf.DeepseekV2Config(**{**_DEEPSEEK, "topk_method": "greedy", **extra})


def test_deepseek_as_llama_cpp_deepseek2(tmp_path: Path, tokenizer) -> None:
    """DeepSeek V3 and V2-Lite as llama.cpp's `deepseek2`: the latent attention as one key/value head of
    the latent's width (its per-head widths as the `_mla` keys), `kv_b_proj` as the absorbed pair
    `attn_k_b` (each head's key rows transposed) and `attn_v_b`, V3's sigmoid routing with its
    correction bias (float32), renormalized, scaled, in groups, YaRN's log multiplier as llama.cpp's
    converter writes it (0.1·mscale_all_dim); V2-Lite's single query projection (`q_lora_rank` 0) and
    softmax routing; GLM-4.7-Flash (DeepSeek V3's blocks).  Logits in llama.cpp itself:
    bench/export_archs.py, rows deepseek-v3, deepseek-v3-yarn, deepseek-v3-experts, deepseek-v2,
    deepseek-v2-lite and glm4-moe-lite."""
    import numpy as np
    from gguf import GGUFReader

    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64,
            "mscale": 0.707, "mscale_all_dim": 0.707}  # fmt: skip
    config = _deepseek_config("deepseek_v3", norm_topk_prob=True, rope_parameters=yarn)
    state, meta, tensors = _tiny_gguf(config, tokenizer, tmp_path / "tiny-deepseek-v3")
    a = "deepseek2."
    assert meta["general.architecture"] == "deepseek2"
    assert {k: meta[a + k] for k in ("attention.head_count_kv", "attention.key_length", "attention.value_length",
                                     "attention.key_length_mla", "attention.value_length_mla", "attention.q_lora_rank",
                                     "attention.kv_lora_rank", "rope.dimension_count", "leading_dense_block_count",
                                     "expert_count", "expert_used_count", "expert_shared_count",
                                     "expert_feed_forward_length", "expert_gating_func", "expert_weights_norm",
                                     "expert_group_count", "expert_group_used_count")} == {
        "attention.head_count_kv": 1, "attention.key_length": 24 + 8, "attention.value_length": 24,
        "attention.key_length_mla": 16 + 8, "attention.value_length_mla": 12, "attention.q_lora_rank": 32,
        "attention.kv_lora_rank": 24, "rope.dimension_count": 8, "leading_dense_block_count": 1, "expert_count": 4,
        "expert_used_count": 2, "expert_shared_count": 2, "expert_feed_forward_length": 32, "expert_gating_func": 2,
        "expert_weights_norm": True, "expert_group_count": 2, "expert_group_used_count": 1}  # fmt: skip
    ffn = GGUFReader(str(tmp_path / "tiny-deepseek-v3-f16.gguf")).fields[a + "feed_forward_length"].contents()
    assert ffn == [96, 32, 32]  # the dense block's width, then the experts'
    assert meta[a + "expert_weights_scale"] == pytest.approx(2.5)
    assert meta[a + "rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707)
    kv_b = state["model.layers.1.self_attn.kv_b_proj.weight"].reshape(4, 16 + 12, 24)  # per head: key rows, value rows
    k_b, v_b = tensors["blk.1.attn_k_b.weight"].reshape(4, 24, 16), tensors["blk.1.attn_v_b.weight"].reshape(4, 12, 24)
    assert np.array_equal(k_b, kv_b[:, :16].transpose(1, 2).half().numpy())
    assert np.array_equal(v_b, kv_b[:, 16:].half().numpy())
    assert not any("attn_kv_b" in name for name in tensors)
    bias = state["model.layers.2.mlp.gate.e_score_correction_bias"].numpy()
    assert tensors["blk.2.exp_probs_b.bias"].dtype == np.float32 and np.array_equal(tensors["blk.2.exp_probs_b.bias"],
                                                                                    bias)  # fmt: skip
    shared = state["model.layers.2.mlp.shared_experts.down_proj.weight"]  # two shared experts' width, as one MLP
    assert np.array_equal(tensors["blk.2.ffn_down_shexp.weight"].reshape(shared.shape), shared.half().numpy())
    assert "blk.0.ffn_gate.weight" in tensors and "blk.0.ffn_gate_exps.weight" not in tensors  # the dense block
    assert "blk.1.ffn_gate_exps.weight" in tensors and "blk.1.attn_q_b.weight" in tensors
    # V2-Lite: one query projection, softmax routing not renormalized, no groups, no correction bias
    lite = _deepseek_config("deepseek_v2", q_lora_rank=None)
    state, meta, tensors = _tiny_gguf(lite, tokenizer, tmp_path / "tiny-deepseek-v2-lite")
    assert meta[a + "attention.q_lora_rank"] == 0 and meta[a + "expert_gating_func"] == 1
    assert meta[a + "expert_weights_norm"] is False and a + "expert_group_count" not in meta
    q = state["model.layers.0.self_attn.q_proj.weight"]
    assert np.array_equal(tensors["blk.0.attn_q.weight"].reshape(q.shape), q.half().numpy())
    assert not any("exp_probs_b" in name or "attn_q_a" in name for name in tensors)
    # GLM-4.7-Flash: DeepSeek V3's blocks, its leading dense block read off mlp_layer_types
    state, meta, tensors = _tiny_gguf(_deepseek_config("glm4_moe_lite"), tokenizer, tmp_path / "tiny-glm4-moe-lite")
    assert meta["general.architecture"] == "deepseek2" and meta[a + "leading_dense_block_count"] == 1
    assert meta[a + "expert_gating_func"] == 2 and "blk.1.attn_k_b.weight" in tensors


def test_glm4_moe_as_llama_cpp_glm4moe(tmp_path: Path, tokenizer) -> None:
    """GLM-4.5 as llama.cpp's `glm4moe`: Q/K/V with their biases unpermuted (rotate-half RoPE over half
    of each head in both), the per-head Q/K norms, the norm before the MLP as `post_attention_norm`,
    DeepSeek V3's routing (sigmoid with its correction bias, groups, renormalized, scaled), the leading
    dense block and the shared expert.  Logits in llama.cpp itself: bench/export_archs.py, row glm4-moe."""
    import transformers as tf

    config = tf.Glm4MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=32, attention_bias=True,
                              use_qk_norm=True, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                              n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1,
                              routed_scaling_factor=2.5, max_position_embeddings=256)  # fmt: skip
    state, meta, tensors = _tiny_gguf(config, tokenizer, tmp_path / "tiny-glm4-moe", norms=True)
    a = "glm4moe."
    assert meta["general.architecture"] == "glm4moe"
    assert {k: meta[a + k] for k in ("rope.dimension_count", "attention.key_length", "leading_dense_block_count",
                                     "expert_count", "expert_shared_count", "expert_gating_func", "expert_weights_norm",
                                     "expert_group_count", "expert_group_used_count")} == {
        "rope.dimension_count": 16, "attention.key_length": 32, "leading_dense_block_count": 1, "expert_count": 4,
        "expert_shared_count": 1, "expert_gating_func": 2, "expert_weights_norm": True, "expert_group_count": 2,
        "expert_group_used_count": 1}  # fmt: skip
    _assert_written(tensors, state, {"blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
                                     "blk.0.attn_k.bias": "model.layers.0.self_attn.k_proj.bias",
                                     "blk.0.attn_q_norm.weight": "model.layers.0.self_attn.q_norm.weight",
                                     "blk.0.post_attention_norm.weight": "model.layers.0.post_attention_layernorm.weight",
                                     "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
                                     "blk.1.exp_probs_b.bias": "model.layers.1.mlp.gate.e_score_correction_bias",
                                     "blk.1.ffn_up_shexp.weight": "model.layers.1.mlp.shared_experts.up_proj.weight"})  # fmt: skip
    assert "blk.1.ffn_gate_exps.weight" in tensors and "blk.0.ffn_norm.weight" not in tensors


def test_dots1_as_llama_cpp_dots1(tmp_path: Path, tokenizer) -> None:
    """dots.llm1 as llama.cpp's `dots1`: Qwen3's attention (per-head Q/K norms, unpermuted), DeepSeek
    V3's routing tensors and keys; fewer key/value heads than query heads (llama.cpp sizes K and V by
    the query heads) and sliding layers refused.  Logits in llama.cpp itself: bench/export_archs.py,
    row dots1."""
    import transformers as tf

    from carve.export import check_config

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16, "moe_intermediate_size": 32,
             "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
             "routed_scaling_factor": 2.5, "max_position_embeddings": 256}  # fmt: skip
    state, meta, tensors = _tiny_gguf(tf.Dots1Config(**sizes), tokenizer, tmp_path / "tiny-dots1", norms=True)
    assert meta["general.architecture"] == "dots1" and meta["dots1.expert_gating_func"] == 2
    assert meta["dots1.leading_dense_block_count"] == 1 and meta["dots1.expert_shared_count"] == 1
    _assert_written(tensors, state, {"blk.0.attn_k_norm.weight": "model.layers.0.self_attn.k_norm.weight",
                                     "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
                                     "blk.1.exp_probs_b.bias": "model.layers.1.mlp.gate.e_score_correction_bias",
                                     "blk.1.ffn_gate_shexp.weight": "model.layers.1.mlp.shared_experts.gate_proj.weight"})  # fmt: skip
    for change, message in (({"num_key_value_heads": 2}, "as many key/value heads"),
                            ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window layers")):  # fmt: skip
        with pytest.raises(UsageError, match=message):
            check_config(tf.Dots1Config(**{**sizes, **change}))


def test_ernie4_5_moe_as_llama_cpp_ernie4_5_moe(tmp_path: Path, tokenizer) -> None:
    """ERNIE 4.5 MoE as llama.cpp's `ernie4_5-moe`: where its experts are (every `moe_layer_interval`-th
    block from `moe_layer_start_index`), its routing correction bias ([1, E]) as the one-dimensional
    float32 `exp_probs_b`, the shared experts' width; experts that stop before the last block refused.
    Logits in llama.cpp itself: bench/export_archs.py, row ernie4_5-moe."""
    import numpy as np
    import transformers as tf

    from carve.export import check_config

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 2, "moe_intermediate_size": 32, "num_experts": 4,
             "num_experts_per_tok": 2, "moe_num_shared_experts": 2, "moe_layer_start_index": 1,
             "moe_layer_end_index": 2, "moe_layer_interval": 1, "use_bias": False,
             "max_position_embeddings": 256}  # fmt: skip
    config = tf.Ernie4_5_MoeConfig(**sizes)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.moe_statics.e_score_correction_bias.normal_()
    gguf, meta = _exported(model, tokenizer, tmp_path / "tiny-ernie-moe", "f16")
    tensors, a = _gguf_tensors(gguf), "ernie4_5-moe."
    assert meta["general.architecture"] == "ernie4_5-moe"
    assert [meta[a + k] for k in ("leading_dense_block_count", "interleave_moe_layer_step",
                                  "expert_shared_feed_forward_length", "expert_count")] == [1, 1, 64, 4]  # fmt: skip
    bias = model.model.layers[1].mlp.gate.moe_statics.e_score_correction_bias.detach().reshape(-1).numpy()
    assert tensors["blk.1.exp_probs_b.bias"].dtype == np.float32 and np.array_equal(tensors["blk.1.exp_probs_b.bias"],
                                                                                    bias)  # fmt: skip
    assert "blk.0.ffn_gate.weight" in tensors and "blk.2.ffn_up_shexp.weight" in tensors
    with pytest.raises(UsageError, match="stop at block 1 of 2"):
        check_config(tf.Ernie4_5_MoeConfig(**{**sizes, "moe_layer_end_index": 1}))


def test_hunyuan_moe_as_llama_cpp_hunyuan_moe(tmp_path: Path, tokenizer) -> None:
    """Hunyuan-A13B as llama.cpp's `hunyuan-moe`: HunYuan dense's attention (Q/K norms after RoPE, the
    NTK-alpha base stretched), the router `gate.wg` (float32) and the shared MLP as `*_shexp`, each
    expert as wide as it; per-block expert counts refused.  Logits in llama.cpp itself:
    bench/export_archs.py, row hunyuan-moe."""
    import numpy as np
    import transformers as tf

    from carve.export import _hunyuan_theta, check_config

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 4, "moe_topk": 2,
             "max_position_embeddings": 256,
             "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "alpha": 1000.0, "factor": 1.0}}  # fmt: skip
    config = tf.HunYuanMoEV1Config(**sizes)
    state, meta, tensors = _tiny_gguf(config, tokenizer, tmp_path / "tiny-hunyuan-moe", norms=True)
    a = "hunyuan-moe."
    assert meta["general.architecture"] == "hunyuan-moe"
    assert [meta[a + k] for k in ("expert_count", "expert_used_count", "expert_feed_forward_length",
                                  "expert_shared_feed_forward_length")] == [4, 2, 32, 32]  # fmt: skip
    assert meta[a + "rope.freq_base"] == pytest.approx(_hunyuan_theta(config)) and _hunyuan_theta(config) > 1e6
    router = state["model.layers.1.mlp.gate.wg.weight"].numpy()
    assert np.array_equal(tensors["blk.1.ffn_gate_inp.weight"].reshape(router.shape), router)  # float32
    _assert_written(tensors, state, {"blk.1.ffn_down_shexp.weight": "model.layers.1.mlp.shared_mlp.down_proj.weight",
                                     "blk.1.attn_k_norm.weight": "model.layers.1.self_attn.key_layernorm.weight"})  # fmt: skip
    # a top-k per block (Hunyuan-A13B's config), the same in each: one count; differing: refused
    state, meta, tensors = _tiny_gguf(tf.HunYuanMoEV1Config(**{**sizes, "moe_topk": [2, 2]}), tokenizer,
                                      tmp_path / "tiny-hunyuan-moe-per-block")  # fmt: skip
    assert meta[a + "expert_used_count"] == 2
    with pytest.raises(UsageError, match=r"vary \(\[1, 2\]\)"):
        check_config(tf.HunYuanMoEV1Config(**{**sizes, "moe_topk": [2, 1]}))


def test_minimax_m2_as_llama_cpp_minimax_m2(tmp_path: Path, tokenizer) -> None:
    """MiniMax-M2 as llama.cpp's `minimax-m2`: Q/K norms over the whole projection, RoPE over the
    rotated share of each head (unpermuted), the routing correction bias as `exp_probs_b`, sigmoid
    gating, each expert's width; a tied output matrix refused (llama.cpp reads its own).  Logits in
    llama.cpp itself: bench/export_archs.py, row minimax-m2."""
    import numpy as np
    import transformers as tf

    from carve.export import check_config

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rotary_dim": 8,
             "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 256,
             "eos_token_id": None}  # fmt: skip
    state, meta, tensors = _tiny_gguf(tf.MiniMaxM2Config(**sizes), tokenizer, tmp_path / "tiny-minimax-m2", norms=True)
    a = "minimax-m2."
    assert meta["general.architecture"] == "minimax-m2"
    assert [meta[a + k] for k in ("rope.dimension_count", "expert_count", "expert_used_count",
                                  "expert_feed_forward_length", "expert_gating_func")] == [8, 4, 2, 32, 2]  # fmt: skip
    for name, want in {"blk.1.attn_q_norm.weight": "model.layers.1.self_attn.q_norm.weight",  # [heads x head_dim]
                       "blk.1.attn_k_norm.weight": "model.layers.1.self_attn.k_norm.weight",
                       "blk.1.exp_probs_b.bias": "model.layers.1.mlp.e_score_correction_bias"}.items():  # fmt: skip
        assert np.array_equal(tensors[name], state[want].numpy()), name
    assert tensors["blk.1.attn_q_norm.weight"].shape == (64,) and "output.weight" in tensors
    with pytest.raises(UsageError, match="ties it to the embeddings"):
        check_config(tf.MiniMaxM2Config(**sizes, tie_word_embeddings=True))


def test_llama4_as_llama_cpp_llama4(tmp_path: Path, tokenizer) -> None:
    """Llama 4 (text) as llama.cpp's `llama4`: Q/K unpermuted (RoPE on interleaved pairs in both), the
    experts stored by columns ([E, hidden, 2·ff]: gate columns, then up) written as llama.cpp's
    [E, ff, hidden] halves and down transposed, the router (float32), the shared expert, the dense
    blocks between MoE ones (`interleave_moe_layer_step`); what llama.cpp fixes (every fourth block
    without RoPE, 8192-token chunks, the temperature, the L2 norm by expert count) refused otherwise.
    Logits in llama.cpp itself: bench/export_archs.py, rows llama4 and llama4-llama3-rope."""
    import numpy as np
    import transformers as tf

    from carve.export import check_config

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 32, "intermediate_size_mlp": 96,
             "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "num_local_experts": 4, "num_experts_per_tok": 1, "interleave_moe_layer_step": 2,
             "max_position_embeddings": 256}  # fmt: skip
    state, meta, tensors = _tiny_gguf(tf.Llama4TextConfig(**sizes), tokenizer, tmp_path / "tiny-llama4", norms=True)
    a = "llama4."
    assert meta["general.architecture"] == "llama4"
    assert [meta[a + k] for k in ("interleave_moe_layer_step", "expert_count", "expert_used_count",
                                  "expert_feed_forward_length")] == [2, 4, 1, 32]  # fmt: skip
    gate_up, down = (
        state["model.layers.1.feed_forward.experts.gate_up_proj"],
        state["model.layers.1.feed_forward.experts.down_proj"],
    )
    for name, want in {"blk.1.ffn_gate_exps.weight": gate_up[:, :, :32].transpose(1, 2),
                       "blk.1.ffn_up_exps.weight": gate_up[:, :, 32:].transpose(1, 2),
                       "blk.1.ffn_down_exps.weight": down.transpose(1, 2),
                       "blk.1.ffn_up_shexp.weight": state["model.layers.1.feed_forward.shared_expert.up_proj.weight"],
                       "blk.0.ffn_gate.weight": state["model.layers.0.feed_forward.gate_proj.weight"],
                       "blk.0.attn_q.weight": state["model.layers.0.self_attn.q_proj.weight"]}.items():  # fmt: skip
        assert np.array_equal(tensors[name].reshape(want.shape), want.half().numpy()), name
    router = state["model.layers.1.feed_forward.router.weight"].numpy()
    assert np.array_equal(tensors["blk.1.ffn_gate_inp.weight"].reshape(router.shape), router)  # float32
    for change, message in (({"no_rope_layers": [1, 1, 0, 1]}, "every fourth block"),
                            ({"attention_chunk_size": 1024}, "chunks of 8192"),
                            ({"num_local_experts": 128}, "exactly when a model does not have 128 experts")):  # fmt: skip
        with pytest.raises(UsageError, match=message):
            check_config(tf.Llama4TextConfig(**{**sizes, **change}))


def test_lfm2_as_llama_cpp_lfm2(tmp_path: Path, tokenizer) -> None:
    """LFM2 as llama.cpp's `lfm2`: short-convolution blocks (no key/value heads: 0 in the per-block
    `head_count_kv`) beside attention ones, the convolution's kernel [hidden, 1, L] as llama.cpp's
    {L, hidden} in float32, its length as `shortconv.l_cache`, the final norm (`embedding_norm`) as
    `token_embd_norm`, the RMSNorm epsilon from `norm_eps`; convolution biases refused; LFM2-MoE as
    `lfm2moe` (dense blocks first, experts with their routing bias).  Logits in llama.cpp itself:
    bench/export_archs.py, rows lfm2 and lfm2-moe."""
    import numpy as np
    import transformers as tf
    from gguf import GGUFReader

    from carve.export import check_config

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
             "layer_types": ["conv", "full_attention", "conv"], "norm_eps": 1e-4}  # fmt: skip
    state, meta, tensors = _tiny_gguf(tf.Lfm2Config(**sizes), tokenizer, tmp_path / "tiny-lfm2", norms=True)
    assert meta["general.architecture"] == "lfm2" and meta["lfm2.shortconv.l_cache"] == 3
    assert meta["lfm2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-4)
    fields = GGUFReader(str(tmp_path / "tiny-lfm2-f16.gguf")).fields
    assert fields["lfm2.attention.head_count_kv"].contents() == [0, 2, 0]
    kernel = state["model.layers.2.conv.conv.weight"]  # [hidden, 1, L]
    assert tensors["blk.2.shortconv.conv.weight"].dtype == np.float32
    assert np.array_equal(tensors["blk.2.shortconv.conv.weight"], kernel.reshape(64, 3).numpy())
    _assert_written(tensors, state, {"token_embd_norm.weight": "model.embedding_norm.weight",
                                     "blk.1.attn_q_norm.weight": "model.layers.1.self_attn.q_layernorm.weight",
                                     "blk.2.shortconv.in_proj.weight": "model.layers.2.conv.in_proj.weight",
                                     "blk.1.ffn_up.weight": "model.layers.1.feed_forward.w3.weight"})  # fmt: skip
    with pytest.raises(UsageError, match="without biases"):
        check_config(tf.Lfm2Config(**sizes, conv_bias=True))
    # LFM2-MoE (LFM2-8B-A1B): the first block dense, then experts under `feed_forward`, their bias
    moe = tf.Lfm2MoeConfig(**sizes, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, num_dense_layers=1)
    state, meta, tensors = _tiny_gguf(moe, tokenizer, tmp_path / "tiny-lfm2-moe")
    assert meta["general.architecture"] == "lfm2moe" and meta["lfm2moe.leading_dense_block_count"] == 1
    assert [meta["lfm2moe." + k] for k in ("expert_count", "expert_used_count", "expert_gating_func")] == [4, 2, 2]
    gate_up = state["model.layers.2.feed_forward.experts.gate_up_proj"]  # [E, 2·ff, hidden], gate rows first
    assert np.array_equal(tensors["blk.2.ffn_up_exps.weight"].reshape(4, 32, 64), gate_up[:, 32:].half().numpy())
    bias = state["model.layers.2.feed_forward.expert_bias"].numpy()
    assert np.array_equal(tensors["blk.2.exp_probs_b.bias"], bias) and "blk.0.ffn_gate.weight" in tensors
    with pytest.raises(UsageError, match="does not scale it"):
        check_config(tf.Lfm2MoeConfig(**sizes, num_experts=4, routed_scaling_factor=2.0))


def test_granite_hybrid_as_llama_cpp_granitehybrid(tmp_path: Path, tokenizer) -> None:
    """Granite 4.0 H as llama.cpp's `granitehybrid`: Mamba-2 blocks (0 key/value heads) with A as
    -exp(A_log) and D as [heads, 1], the convolution {L, channels} in float32, its bias, the time-step
    bias, the gated norm's weight by groups, Mamba-2's sizes as `ssm.*` keys; RoPE only where the config
    rotates (`rope.scaling.finetuned`); with experts, the shared MLP as the shared expert, without them
    as the MLP; a clamped time step refused.  Logits in llama.cpp itself: bench/export_archs.py, rows
    granite-hybrid and granite-hybrid-rope."""
    import numpy as np
    import transformers as tf
    from gguf import GGUFReader

    from carve.export import check_config

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 32, "shared_intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 256, "layer_types": ["mamba", "attention"], "mamba_n_heads": 8,
             "mamba_d_head": 16, "mamba_d_state": 16, "mamba_n_groups": 2, "mamba_d_conv": 4, "mamba_expand": 2}  # fmt: skip
    state, meta, tensors = _tiny_gguf(tf.GraniteMoeHybridConfig(**sizes, num_local_experts=4, num_experts_per_tok=2),
                                      tokenizer, tmp_path / "tiny-granite-hybrid", norms=True)  # fmt: skip
    a = "granitehybrid."
    assert meta["general.architecture"] == "granitehybrid" and meta[a + "rope.scaling.finetuned"] is False
    assert [meta[a + "ssm." + k] for k in ("conv_kernel", "inner_size", "state_size", "time_step_rank",
                                           "group_count")] == [4, 128, 16, 8, 2]  # fmt: skip
    assert GGUFReader(str(tmp_path / "tiny-granite-hybrid-f16.gguf")).fields[a + "attention.head_count_kv"].contents() \
        == [0, 2]  # fmt: skip
    p = "model.layers.0.mamba."
    for name, want in {"blk.0.ssm_a": -torch.exp(state[p + "A_log"]).reshape(8, 1),
                       "blk.0.ssm_d": state[p + "D"].reshape(8, 1), "blk.0.ssm_dt.bias": state[p + "dt_bias"],
                       "blk.0.ssm_conv1d.weight": state[p + "conv1d.weight"].reshape(192, 4),
                       "blk.0.ssm_conv1d.bias": state[p + "conv1d.bias"],
                       "blk.0.ssm_norm.weight": state[p + "norm.weight"].reshape(2, 64)}.items():  # fmt: skip
        assert tensors[name].dtype == np.float32 and np.allclose(tensors[name].reshape(want.shape), want.numpy()), name
    assert "blk.1.ffn_gate_shexp.weight" in tensors and "blk.0.ssm_in.weight" in tensors
    # without experts (Granite 4.0 H Micro's kind): the shared MLP is the block's MLP
    state, meta, tensors = _tiny_gguf(tf.GraniteMoeHybridConfig(**sizes, num_local_experts=0), tokenizer,
                                      tmp_path / "tiny-granite-hybrid-dense")  # fmt: skip
    fused = state["model.layers.1.shared_mlp.input_linear.weight"]
    assert np.array_equal(tensors["blk.1.ffn_up.weight"].reshape(64, 64), fused[64:].half().numpy())
    assert "blk.1.ffn_down.weight" in tensors and not any("exps" in name or "shexp" in name for name in tensors)
    with pytest.raises(UsageError, match="clamp"):
        check_config(tf.GraniteMoeHybridConfig(**sizes, time_step_limit=(0.0, 10.0)))


def test_bamba_as_llama_cpp_granitehybrid(tmp_path: Path, tokenizer) -> None:
    """Bamba as llama.cpp's `granitehybrid`: Granite 4.0 H's Mamba-2 blocks, RoPE always on over half of
    each head, so Q and K rows permuted over the rotated half only (the other half as it is); its norms
    and MLP under their Bamba names.  Logits in llama.cpp itself: bench/export_archs.py, row bamba."""
    import numpy as np
    import transformers as tf

    from carve.export import _permute

    config = tf.BambaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=8,
                            mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2,
                            max_position_embeddings=256)  # fmt: skip
    state, meta, tensors = _tiny_gguf(config, tokenizer, tmp_path / "tiny-bamba", norms=True)
    a = "granitehybrid."
    assert meta["general.architecture"] == "granitehybrid" and meta[a + "rope.scaling.finetuned"] is True
    assert meta[a + "rope.dimension_count"] == 8  # half of each 16-channel head
    k = state["model.layers.1.self_attn.k_proj.weight"].numpy()  # 2 heads of 16
    got = tensors["blk.1.attn_k.weight"].reshape(k.shape)
    want = k.reshape(2, 16, 64).copy()
    want[:, :8] = want[:, :8].reshape(2, 2, 4, 64).swapaxes(1, 2).reshape(2, 8, 64)  # the rotated half interleaved
    assert np.array_equal(got, want.reshape(k.shape).astype(np.float16))
    assert np.array_equal(_permute(k, 2), _permute(k, 2, 16))  # the whole head by default, as for Llama
    for name in ("blk.0.ssm_in.weight", "blk.1.ffn_norm.weight", "output_norm.weight", "blk.0.ffn_gate.weight"):
        assert name in tensors, name


def test_falcon_h1_as_llama_cpp_falcon_h1(tmp_path: Path, tokenizer) -> None:
    """Falcon-H1 as llama.cpp's `falcon-h1`, its µP multipliers folded into the weights they scale (llama.cpp's
    graph has none, as after its converter): the embeddings, the head, Q/K/V by the attention input's (K by
    the key's too), the output by the attention output's, the MLP's gate and down, Mamba-2's input rows by
    `ssm_in_multiplier` and their section's multiplier (z, x, B, C, dt), its output; the MLP's norm under
    llama.cpp's suffix-less name; Mamba's norm before its gate and a tied head refused.  Logits in
    llama.cpp itself: bench/export_archs.py, row falcon-h1."""
    import numpy as np
    import transformers as tf

    from carve.export import check_config

    mup = {"key_multiplier": 0.5, "attention_in_multiplier": 0.8, "attention_out_multiplier": 1.25,
           "ssm_in_multiplier": 0.7, "ssm_out_multiplier": 1.3, "ssm_multipliers": [1.5, 0.5, 1.2, 0.8, 2.0],
           "mlp_multipliers": [1.4, 0.6], "embedding_multiplier": 2.0, "lm_head_multiplier": 0.5}  # fmt: skip
    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
             "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_n_groups": 2, "mamba_d_conv": 4,
             "mamba_expand": 2, "mamba_d_ssm": 128, "mamba_rms_norm": True, "mamba_norm_before_gate": False}  # fmt: skip
    state, meta, tensors = _tiny_gguf(tf.FalconH1Config(**sizes, **mup), tokenizer, tmp_path / "tiny-falcon-h1")
    assert meta["general.architecture"] == "falcon-h1" and meta["falcon-h1.ssm.inner_size"] == 128
    p = "model.layers.1."
    for name, want in {"blk.1.attn_k.weight": state[p + "self_attn.k_proj.weight"] * 0.8 * 0.5,
                       "blk.1.attn_output.weight": state[p + "self_attn.o_proj.weight"] * 1.25,
                       "blk.1.ffn_gate.weight": state[p + "feed_forward.gate_proj.weight"] * 1.4,
                       "blk.1.ssm_out.weight": state[p + "mamba.out_proj.weight"] * 1.3,
                       "token_embd.weight": state["model.embed_tokens.weight"] * 2.0,
                       "output.weight": state["lm_head.weight"] * 0.5}.items():  # fmt: skip
        assert np.array_equal(tensors[name].reshape(want.shape), want.half().numpy()), name
    rows = state[p + "mamba.in_proj.weight"]  # z 128, x 128, B 32, C 32, dt 8
    factor = torch.tensor([1.5] * 128 + [0.5] * 128 + [1.2] * 32 + [0.8] * 32 + [2.0] * 8).reshape(-1, 1) * 0.7
    assert np.array_equal(tensors["blk.1.ssm_in.weight"].reshape(rows.shape), (rows * factor).half().numpy())
    assert "blk.1.ffn_norm" in tensors and "blk.1.ssm_norm.weight" in tensors
    for change, message in (({"mamba_norm_before_gate": True}, "norms it before"),
                            ({"tie_word_embeddings": True}, "ties them")):  # fmt: skip
        with pytest.raises(UsageError, match=message):
            check_config(tf.FalconH1Config(**{**sizes, **mup, **change}))


def test_jamba_as_llama_cpp_jamba(tmp_path: Path, tokenizer) -> None:
    """Jamba as llama.cpp's `jamba`: Mamba (1) blocks (0 key/value heads) with A as -exp(A_log) [inner,
    state] in float32, the convolution {L, channels}, the x and dt projections (the latter's bias) and the
    dt / B / C norms under `ssm_*` names, Mamba's sizes as `ssm.*` keys; attention blocks without RoPE;
    dense MLPs and experts (the router under `feed_forward`).  Logits in llama.cpp itself:
    bench/export_archs.py, row jamba."""
    import numpy as np
    import transformers as tf
    from gguf import GGUFReader

    config = tf.JambaConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                            expert_layer_period=2, expert_layer_offset=1, attn_layer_period=4, attn_layer_offset=2,
                            mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8,
                            max_position_embeddings=256)  # fmt: skip
    state, meta, tensors = _tiny_gguf(config, tokenizer, tmp_path / "tiny-jamba", norms=True)
    a = "jamba."
    assert [meta[a + "ssm." + k] for k in ("conv_kernel", "inner_size", "state_size", "time_step_rank")] == [4, 128,
                                                                                                           16, 8]  # fmt: skip
    assert meta[a + "expert_count"] == 4
    assert GGUFReader(str(tmp_path / "tiny-jamba-f16.gguf")).fields[a + "attention.head_count_kv"].contents() == [
        0, 0, 2, 0]  # fmt: skip
    p = "model.layers.1.mamba."
    assert tensors["blk.1.ssm_a"].dtype == np.float32
    assert np.allclose(tensors["blk.1.ssm_a"].reshape(128, 16), -torch.exp(state[p + "A_log"]).numpy())
    for name, want in {"blk.1.ssm_dt.bias": p + "dt_proj.bias", "blk.1.ssm_b_norm.weight": p + "b_layernorm.weight",
                       "blk.1.ssm_d": p + "D"}.items():  # fmt: skip
        assert np.array_equal(tensors[name], state[want].numpy()), name
    x = state[p + "x_proj.weight"]
    assert np.array_equal(tensors["blk.1.ssm_x.weight"].reshape(x.shape), x.half().numpy())
    assert "blk.1.ffn_gate_inp.weight" in tensors and "blk.0.ffn_gate.weight" in tensors
    assert "blk.2.attn_q.weight" in tensors and "output_norm.weight" in tensors


def _mamba_config(model_type: str, **changes: Any) -> Any:
    import transformers as tf

    sizes = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "state_size": 16, "conv_kernel": 4,
             "expand": 2, **changes}  # fmt: skip
    if model_type == "mamba2":
        return tf.Mamba2Config(**{"num_heads": 8, "head_dim": 16, "n_groups": 2, **sizes})
    return (tf.FalconMambaConfig if model_type == "falcon_mamba" else tf.MambaConfig)(time_step_rank=8, **sizes)


def test_mamba_as_llama_cpp_mamba(tmp_path: Path, tokenizer) -> None:
    """A pure Mamba (1) as llama.cpp's `mamba`: Mamba's parameters as for Jamba under `backbone.layers.N.mixer`,
    the embeddings, block norms and final norm under llama.cpp's names, Mamba's sizes as `ssm.*` keys, no
    attention heads; transformers' GGUF loader reads it back with the same logits.  Falcon-Mamba as the same
    architecture with `ssm.dt_b_c_rms` set (its time step, B and C RMS-normed).  Logits in llama.cpp itself:
    bench/export_archs.py, rows mamba and falcon-mamba."""
    import transformers as tf

    src = tmp_path / "tiny-mamba"
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_mamba_config("mamba"))
    with torch.no_grad():  # earlier tokens matter; a lost norm shows
        for name, p in model.named_parameters():
            if name.endswith("conv1d.weight"):
                p.normal_(0, 1)
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.normal_(1, 0.5)
    gguf, meta = _exported(model, tokenizer, src, "f16")
    assert meta["general.architecture"] == "mamba" and meta["mamba.attention.head_count"] == 0
    assert [meta["mamba.ssm." + k] for k in ("conv_kernel", "inner_size", "state_size", "time_step_rank")] == [
        4, 128, 16, 8]  # fmt: skip
    assert not meta["mamba.ssm.dt_b_c_rms"]
    _check(src, gguf, "f16")
    _, meta, tensors = _tiny_gguf(_mamba_config("falcon_mamba"), tokenizer, tmp_path / "tiny-falcon-mamba")
    assert meta["general.architecture"] == "mamba" and meta["mamba.ssm.dt_b_c_rms"]
    assert {"token_embd.weight", "blk.1.attn_norm.weight", "blk.1.ssm_x.weight", "blk.1.ssm_dt.bias",
            "output_norm.weight"} <= set(tensors)  # fmt: skip


def test_mamba2_as_llama_cpp_mamba2(tmp_path: Path, tokenizer) -> None:
    """A pure Mamba-2 (Mamba-Codestral) as llama.cpp's `mamba2`: its mixer's parameters as for Granite 4.0 H
    (A as -exp(A_log) and D as [heads, 1], the gated norm's weight by groups, the time-step bias as
    `ssm_dt.bias`), Mamba-2's sizes as `ssm.*` keys; projection biases, a convolution without its bias and
    a clamped time step refused.  Logits in llama.cpp itself: bench/export_archs.py, row mamba2."""
    import numpy as np

    from carve.export import check_config

    state, meta, tensors = _tiny_gguf(_mamba_config("mamba2"), tokenizer, tmp_path / "tiny-mamba2", norms=True)
    assert meta["general.architecture"] == "mamba2"
    assert [meta["mamba2.ssm." + k] for k in ("conv_kernel", "inner_size", "state_size", "time_step_rank",
                                              "group_count")] == [4, 128, 16, 8, 2]  # fmt: skip
    p = "backbone.layers.1.mixer."
    assert np.allclose(tensors["blk.1.ssm_a"].reshape(-1), -torch.exp(state[p + "A_log"]).numpy())
    assert np.array_equal(tensors["blk.1.ssm_norm.weight"].reshape(2, 64), state[p + "norm.weight"].reshape(2, 64))
    _assert_written(tensors, state, {"blk.1.ssm_dt.bias": p + "dt_bias", "blk.1.ssm_d": p + "D",
                                     "blk.1.ssm_in.weight": p + "in_proj.weight",
                                     "blk.0.attn_norm.weight": "backbone.layers.0.norm.weight",
                                     "output_norm.weight": "backbone.norm_f.weight"})  # fmt: skip
    for changes, message in (({"use_bias": True}, "without biases"), ({"use_conv_bias": False}, "reads a bias"),
                             ({"time_step_limit": (0.0, 0.1)}, "does not clamp")):  # fmt: skip
        with pytest.raises(UsageError, match=message):
            check_config(_mamba_config("mamba2", **changes))
    with pytest.raises(UsageError, match="without biases"):
        check_config(_mamba_config("mamba", use_bias=True))


def test_nemotron_h_as_llama_cpp_nemotron_h(tmp_path: Path, tokenizer) -> None:
    """Nemotron-H as llama.cpp's `nemotron_h`: blocks of one kind each, told apart by llama.cpp from the
    per-block key/value heads and MLP widths (Mamba-2: 0 and 0; attention: its heads and 0; MLP: 0 and
    its width), Mamba-2's parameters as for Granite 4.0 H, the embeddings and final norm under their
    Nemotron-H names; expert blocks and a non-squared-ReLU MLP refused.  Logits in llama.cpp itself:
    bench/export_archs.py, row nemotron-h."""
    import numpy as np
    import transformers as tf
    from gguf import GGUFReader

    from carve.export import check_config

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
             "mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 2, "conv_kernel": 4,
             "expand": 2, "hybrid_override_pattern": "M*M-"}  # fmt: skip
    state, meta, tensors = _tiny_gguf(tf.NemotronHConfig(**sizes), tokenizer, tmp_path / "tiny-nemotron-h", norms=True)
    a = "nemotron_h."
    fields = GGUFReader(str(tmp_path / "tiny-nemotron-h-f16.gguf")).fields
    assert fields[a + "attention.head_count_kv"].contents() == [0, 2, 0, 0]
    assert fields[a + "feed_forward_length"].contents() == [0, 0, 0, 96]
    assert [meta[a + "ssm." + k] for k in ("inner_size", "group_count", "time_step_rank")] == [128, 2, 8]
    a_log = state["model.layers.2.mixer.A_log"]
    assert np.allclose(tensors["blk.2.ssm_a"].reshape(8, 1), -torch.exp(a_log).reshape(8, 1).numpy())
    _assert_written(tensors, state, {"token_embd.weight": "model.embeddings.weight", "output_norm.weight": "model.norm_f.weight",
                                     "blk.3.ffn_up.weight": "model.layers.3.mixer.up_proj.weight",
                                     "blk.1.attn_output.weight": "model.layers.1.mixer.o_proj.weight"})  # fmt: skip
    with pytest.raises(UsageError, match="squared-ReLU"):
        check_config(tf.NemotronHConfig(**sizes, mlp_hidden_act="silu"))


def _qwen35_config(**changes: Any) -> Any:
    import transformers as tf

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
             "linear_conv_kernel_dim": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
             "linear_num_key_heads": 2, "linear_num_value_heads": 6,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                 "mrope_section": [2, 1, 1], "mrope_interleaved": True}}  # fmt: skip
    return tf.Qwen3_5TextConfig(**{**sizes, **changes})


def test_qwen35_as_llama_cpp_qwen35(tmp_path: Path, tokenizer) -> None:
    """Qwen3.5's text model as llama.cpp's `qwen35`: the Gated DeltaNet's tensors as llama.cpp's converter
    writes them (A as -exp(A_log); QKV, output gate, b, a, A, the time-step bias, the convolution's value
    channels and the output projection's columns with the value heads tiled: three per key head here),
    the decoder's RMSNorms plus one (the DeltaNet's gated norm as it is), the attention's query-and-gate
    rows as they are, the DeltaNet's sizes and which blocks are recurrent as keys; unequal key and value
    head widths and a non-SiLU activation refused.  Logits in llama.cpp itself: bench/export_archs.py,
    row qwen35."""
    import numpy as np
    from gguf import GGUFReader

    from carve.export import check_config

    config = _qwen35_config()
    state, meta, tensors = _tiny_gguf(config, tokenizer, tmp_path / "tiny-qwen35", norms=True)
    a = "qwen35."
    assert meta["general.architecture"] == "qwen35"
    assert [meta[a + "ssm." + k] for k in ("conv_kernel", "state_size", "group_count", "time_step_rank",
                                           "inner_size")] == [4, 8, 2, 6, 48]  # fmt: skip
    fields = GGUFReader(str(tmp_path / "tiny-qwen35-f16.gguf")).fields
    assert [bool(x) for x in fields[a + "attention.recurrent_layers"].contents()] == [True, True, True, False]
    assert fields[a + "rope.dimension_sections"].contents() == [2, 1, 1, 0]
    assert meta[a + "rope.dimension_count"] == 8 and meta[a + "attention.key_length"] == 16
    assert meta[a + "attention.head_count_kv"] == 2

    def tiled(w: torch.Tensor, width: int, dim: int = 0) -> np.ndarray:  # k0v0 k1v0 k0v1 k1v1 k0v2 k1v2
        heads = w.float().split(width, dim=dim)
        return torch.cat([heads[k * 3 + v] for v in range(3) for k in range(2)], dim=dim).numpy()

    p = "model.layers.1.linear_attn."
    qkv = state[p + "in_proj_qkv.weight"]
    want = np.concatenate([qkv[:32].float().numpy(), tiled(qkv[32:], 8)])
    assert np.array_equal(tensors["blk.1.attn_qkv.weight"].reshape(want.shape), want.astype(np.float16))
    conv = state[p + "conv1d.weight"].reshape(80, 4)
    want = np.concatenate([conv[:32].numpy(), tiled(conv[32:], 8)])  # kept in float32, as llama.cpp's converter does
    assert np.array_equal(tensors["blk.1.ssm_conv1d.weight"].reshape(80, 4), want)
    for gguf_name, hf, width, dim in (("attn_gate.weight", "in_proj_z.weight", 8, 0), ("ssm_beta.weight", "in_proj_b.weight", 1, 0),
                                      ("ssm_alpha.weight", "in_proj_a.weight", 1, 0), ("ssm_out.weight", "out_proj.weight", 8, 1)):  # fmt: skip
        want = tiled(state[p + hf], width, dim).astype(np.float16)
        assert np.array_equal(tensors[f"blk.1.{gguf_name}"].reshape(want.shape), want), gguf_name
    assert np.array_equal(tensors["blk.1.ssm_dt.bias"].reshape(6), tiled(state[p + "dt_bias"], 1))
    assert np.allclose(tensors["blk.1.ssm_a"].reshape(6), tiled(-torch.exp(state[p + "A_log"]), 1))
    assert np.array_equal(tensors["blk.1.ssm_norm.weight"].reshape(8), state[p + "norm.weight"].numpy())
    for gguf_name, hf in (("blk.3.attn_norm.weight", "model.layers.3.input_layernorm.weight"),
                          ("blk.3.post_attention_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
                          ("blk.3.attn_q_norm.weight", "model.layers.3.self_attn.q_norm.weight"),
                          ("output_norm.weight", "model.norm.weight")):  # fmt: skip
        assert np.array_equal(tensors[gguf_name].reshape(-1), (state[hf].float() + 1).numpy()), gguf_name
    _assert_written(tensors, state, {"blk.3.attn_q.weight": "model.layers.3.self_attn.q_proj.weight",
                                     "blk.3.attn_output.weight": "model.layers.3.self_attn.o_proj.weight",
                                     "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
                                     "token_embd.weight": "model.embed_tokens.weight"})  # fmt: skip
    for changes, message in (({"linear_value_head_dim": 16}, "equally wide"), ({"hidden_act": "gelu"}, "SiLU")):
        with pytest.raises(UsageError, match=message):
            check_config(_qwen35_config(**changes))


def test_qwen35_moe_as_llama_cpp_qwen35moe(tmp_path: Path, tokenizer) -> None:
    """Qwen3.5-MoE's text model as llama.cpp's `qwen35moe`: Qwen3.5's blocks (as `qwen35`) with experts as
    Qwen2-MoE's go in (the fused gate/up rows as two tensors, the shared expert and its sigmoid gate),
    the experts' keys beside the DeltaNet's.  Logits in llama.cpp itself: bench/export_archs.py, row
    qwen35-moe."""
    import numpy as np
    import transformers as tf

    sizes = {k: v for k, v in _qwen35_config().to_dict().items() if k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "max_position_embeddings", "linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
        "linear_num_key_heads", "linear_num_value_heads", "rope_parameters")}  # fmt: skip
    config = tf.Qwen3_5MoeTextConfig(**sizes, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                     shared_expert_intermediate_size=48)  # fmt: skip
    state, meta, tensors = _tiny_gguf(config, tokenizer, tmp_path / "tiny-qwen35-moe", norms=True)
    a = "qwen35moe."
    assert meta["general.architecture"] == "qwen35moe"
    assert [meta[a + k] for k in ("expert_count", "expert_used_count", "expert_feed_forward_length",
                                  "expert_shared_feed_forward_length", "ssm.time_step_rank")] == [4, 2, 32, 48, 6]  # fmt: skip
    gate_up = state["model.layers.2.mlp.experts.gate_up_proj"]
    assert np.array_equal(tensors["blk.2.ffn_gate_exps.weight"].reshape(4, 32, 64), gate_up[:, :32].half().numpy())
    assert np.array_equal(tensors["blk.2.ffn_up_exps.weight"].reshape(4, 32, 64), gate_up[:, 32:].half().numpy())
    assert np.array_equal(tensors["blk.0.ffn_gate_inp_shexp.weight"].reshape(-1),
                          state["model.layers.0.mlp.shared_expert_gate.weight"].reshape(-1).numpy())  # fmt: skip
    router = state["model.layers.3.mlp.gate.weight"]  # kept in float32, as llama.cpp's converter keeps it
    assert np.array_equal(tensors["blk.3.ffn_gate_inp.weight"].reshape(router.shape), router.numpy())
    _assert_written(tensors, state, {"blk.3.ffn_down_shexp.weight": "model.layers.3.mlp.shared_expert.down_proj.weight",
                                     "blk.1.ssm_norm.weight": "model.layers.1.linear_attn.norm.weight"})  # fmt: skip
    assert np.array_equal(tensors["blk.3.attn_k_norm.weight"].reshape(-1),
                          (state["model.layers.3.self_attn.k_norm.weight"] + 1).numpy())  # fmt: skip


def test_qwen3_next_as_llama_cpp_qwen3next(tmp_path: Path, tokenizer) -> None:
    """Qwen3-Next as llama.cpp's `qwen3next`: the DeltaNet's fused `in_proj_qkvz` (per key head: its query,
    its key, its value heads, their gates) taken apart into `attn_qkv` (every query, every key, every value)
    and `attn_gate`, the value heads in Hugging Face's order (llama.cpp's qwen3next repeats the key heads
    to match), `in_proj_ba` as `ssm_ba` as it is; the rest as Qwen3.5-MoE's; top-k routing weights not
    renormalized refused.  Logits in llama.cpp itself: bench/export_archs.py, row qwen3-next."""
    import numpy as np
    import transformers as tf

    from carve.export import check_config

    sizes = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "linear_conv_kernel_dim": 4,
             "linear_key_head_dim": 8, "linear_value_head_dim": 8, "linear_num_key_heads": 2,
             "linear_num_value_heads": 6, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
             "shared_expert_intermediate_size": 48}  # fmt: skip
    state, meta, tensors = _tiny_gguf(tf.Qwen3NextConfig(**sizes), tokenizer, tmp_path / "tiny-qwen3-next", norms=True)
    a = "qwen3next."
    assert meta["general.architecture"] == "qwen3next" and meta[a + "rope.dimension_count"] == 4
    assert [meta[a + k] for k in ("ssm.state_size", "ssm.group_count", "ssm.time_step_rank", "ssm.inner_size",
                                  "expert_count", "expert_shared_feed_forward_length")] == [8, 2, 6, 48, 4, 48]  # fmt: skip
    p = "model.layers.0.linear_attn."
    per_head = state[p + "in_proj_qkvz.weight"].reshape(2, 8 + 8 + 24 + 24, 64)  # each key head's q, k, 3 v, 3 z
    q, k, v, z = (per_head[:, lo:hi].reshape(-1, 64) for lo, hi in ((0, 8), (8, 16), (16, 40), (40, 64)))
    want = torch.cat([q, k, v]).half().numpy()
    assert np.array_equal(tensors["blk.0.attn_qkv.weight"].reshape(want.shape), want)
    assert np.array_equal(tensors["blk.0.attn_gate.weight"].reshape(48, 64), z.half().numpy())
    _assert_written(tensors, state, {"blk.0.ssm_ba.weight": p + "in_proj_ba.weight",
                                     "blk.0.ssm_out.weight": p + "out_proj.weight", "blk.0.ssm_dt.bias": p + "dt_bias",
                                     "blk.3.ffn_up_shexp.weight": "model.layers.3.mlp.shared_expert.up_proj.weight"})  # fmt: skip
    assert np.allclose(tensors["blk.0.ssm_a"].reshape(6), -torch.exp(state[p + "A_log"]).numpy())
    assert np.array_equal(tensors["output_norm.weight"].reshape(-1), (state["model.norm.weight"] + 1).numpy())
    with pytest.raises(UsageError, match="renormalizes"):
        check_config(tf.Qwen3NextConfig(**sizes, norm_topk_prob=False))
    with pytest.raises(UsageError, match="dense MLP layers"):
        check_config(tf.Qwen3NextConfig(**sizes, mlp_only_layers=[1]))


def test_qwen35_image_text_checkpoint_exports_its_text_model(tmp_path: Path, tokenizer) -> None:
    """Qwen3.5 ships as an image-text checkpoint (Qwen3_5ForConditionalGeneration, model type qwen3_5): its
    text model goes in as llama.cpp's `qwen35`, the vision tower left out; streamed, the same file (the
    skeleton, built from the text config, takes the file's name from the source directory)."""
    import transformers as tf
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5VisionConfig

    vision = Qwen3_5VisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                 patch_size=8, temporal_patch_size=2, spatial_merge_size=2)  # fmt: skip
    torch.manual_seed(0)
    model = tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(text_config=_qwen35_config().to_dict(),
                                                                vision_config=vision.to_dict()))  # fmt: skip
    _assert_text_model_exported(model, tokenizer, tmp_path, "qwen35")


def test_apertus_as_llama_cpp_apertus(tmp_path: Path, tokenizer) -> None:
    """Apertus as llama.cpp's `apertus`: Q and K unpermuted (rotate-half RoPE in both), per-head Q/K
    norms, its norms under their Apertus names, the xIELU MLP's up and down, and each block's xIELU
    parameters as keys, as the model stores them (llama.cpp applies the softplus itself), not as
    tensors.  Logits in llama.cpp itself: bench/export_archs.py, row apertus."""
    import numpy as np
    import transformers as tf
    from gguf import GGUFReader

    config = tf.ApertusConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".act_fn." in name:
                p.normal_()
    gguf, meta = _exported(model, tokenizer, tmp_path / "tiny-apertus", "f16")
    assert meta["general.architecture"] == "apertus"
    fields, state = GGUFReader(str(gguf)).fields, model.state_dict()
    for key in ("alpha_p", "alpha_n", "beta", "eps"):
        want = [float(state[f"model.layers.{i}.mlp.act_fn.{key}"].reshape(-1)[0]) for i in range(2)]
        assert fields[f"xielu.{key}"].contents() == pytest.approx(want), key  # llama.cpp's keys: no prefix
    tensors = _gguf_tensors(gguf)
    assert not any("act_fn" in name or "alpha" in name for name in tensors)
    q = state["model.layers.1.self_attn.q_proj.weight"]
    assert np.array_equal(tensors["blk.1.attn_q.weight"].reshape(q.shape), q.half().numpy())  # unpermuted
    assert "blk.1.attn_norm.weight" in tensors and "blk.1.ffn_norm.weight" in tensors
    assert "blk.1.ffn_up.weight" in tensors and "blk.1.ffn_gate.weight" not in tensors


def test_text_model_of_a_multimodal_checkpoint(tmp_path: Path, tokenizer) -> None:
    """A Gemma 3 image-text checkpoint (Gemma3ForConditionalGeneration: Gemma 3 4B, 12B, 27B) exports its
    text model as llama.cpp's `gemma3`: the language model's tensors under the text-only names, the
    vision tower and projector left out and said so in a note; streamed, the same file.  Logits in
    llama.cpp itself: bench/export_archs.py, row gemma3-multimodal."""
    import numpy as np
    import transformers as tf

    from carve.export import export

    text = tf.Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                               sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                               max_position_embeddings=256)  # fmt: skip
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(text_config=text, vision_config=vision,
                                                              mm_tokens_per_image=4))  # fmt: skip
    src = tmp_path / "gemma3-mm"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    info = export(src, tmp_path / "mem.gguf", "f16", stream=False)
    assert info["architecture"] == "gemma3" and "mmproj" in info["notes"][-1]
    tensors, state = _gguf_tensors(tmp_path / "mem.gguf"), model.state_dict()
    assert not any("vision" in name or "mm_" in name for name in tensors)
    q = state["model.language_model.layers.1.self_attn.q_proj.weight"]
    assert np.array_equal(tensors["blk.1.attn_q.weight"].reshape(q.shape), q.half().numpy())
    assert len(tensors) == sum(k.startswith("model.language_model.") for k in state)  # the head is tied
    export(src, tmp_path / "st.gguf", "f16", stream=True)
    assert (tmp_path / "st.gguf").read_bytes() == (tmp_path / "mem.gguf").read_bytes()


def test_text_model_of_a_mistral3_checkpoint(tmp_path: Path, tokenizer) -> None:
    """A Mistral 3 image-text checkpoint (Mistral Small 3.x, Magistral; loaded with
    AutoModelForImageTextToText) exports its Mistral text model as llama.cpp's `llama`, the Pixtral
    tower left out and said so; transformers' GGUF loader gives the text model's logits."""
    from carve.export import export
    from tests.test_structure import _mistral3

    model = _mistral3(tokenizer, tmp_path / "mistral3")
    info = export(tmp_path / "mistral3", tmp_path / "m.gguf", "f16", stream=False)
    assert info["architecture"] == "llama" and "mmproj" in info["notes"][-1]
    assert not any("vision" in name or "mm_" in name for name in _gguf_tensors(tmp_path / "m.gguf"))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    want, got = _logits(model, ids), _logits(_reloaded(tmp_path / "m.gguf"), ids)
    assert (got - want).abs().max() <= TOLERANCE["f16"] * want.abs().max()
    export(tmp_path / "mistral3", tmp_path / "st.gguf", "f16", stream=True)
    assert (tmp_path / "st.gguf").read_bytes() == (tmp_path / "m.gguf").read_bytes()


@pytest.mark.parametrize(
    ("arch", "change", "message"),
    [
        ("deepseek_v3", {"rope_interleave": False}, "rotates halves"),
        ("deepseek_v3", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0,
                                             "original_max_position_embeddings": 64, "mscale": 1.0,
                                             "mscale_all_dim": 0.707}}, "mscale equal to mscale_all_dim"),
        ("deepseek_v3", {"hidden_act": "gelu"}, "gates its MLPs with SiLU"),
        ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}, "by their best one"),
        ("glm4_moe_lite", {"mlp_layer_types": ["dense", "sparse", "dense"]}, "dense MLP blocks only before"),
    ],
)  # fmt: skip
def test_deepseek_refusals(arch: str, change: dict[str, Any], message: str) -> None:
    """What llama.cpp's deepseek2 computes otherwise is refused by name."""
    from carve.errors import UsageError
    from carve.export import check_config

    with pytest.raises(UsageError, match=message):
        check_config(_deepseek_config(arch, **change))


def test_glm4_as_llama_cpp_glm4(tmp_path: Path, tokenizer) -> None:
    """GLM-4 (0414) as llama.cpp's `glm4`: Q/K/V and their biases unpermuted (GPT-J-style RoPE in both),
    the fused gate/up as `ffn_up` (gate rows first), the norms after attention and after the MLP as
    `post_attention_norm` / `post_ffw_norm` beside `attn_norm` / `ffn_norm`, the rotary width half a
    head; scaled RoPE and a non-SiLU MLP refused; query heads narrower than the hidden size taken.  Logits in
    llama.cpp itself: bench/export_archs.py, rows glm4 and glm4-structured."""
    import transformers as tf

    from carve.errors import UsageError
    from carve.export import architecture

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
             "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}  # fmt: skip
    state, meta, tensors = _tiny_gguf(tf.Glm4Config(**sizes), tokenizer, tmp_path / "tiny-glm4")
    assert meta["general.architecture"] == "glm4" and meta["glm4.rope.dimension_count"] == 8
    names = {"model.layers.1.self_attn.q_proj.weight": "blk.1.attn_q.weight",
             "model.layers.1.self_attn.k_proj.bias": "blk.1.attn_k.bias",
             "model.layers.1.mlp.gate_up_proj.weight": "blk.1.ffn_up.weight",
             "model.layers.1.input_layernorm.weight": "blk.1.attn_norm.weight",
             "model.layers.1.post_self_attn_layernorm.weight": "blk.1.post_attention_norm.weight",
             "model.layers.1.post_attention_layernorm.weight": "blk.1.ffn_norm.weight",
             "model.layers.1.post_mlp_layernorm.weight": "blk.1.post_ffw_norm.weight"}  # fmt: skip
    _assert_written(tensors, state, {name: hf for hf, name in names.items()})  # norms and biases stay float32
    assert len(tensors) == len([n for n in state if "rotary" not in n])
    check = architecture("glm4").check
    assert check is not None
    with pytest.raises(UsageError, match="SiLU"):
        check(tf.Glm4Config(**sizes, hidden_act="gelu"))
    with pytest.raises(UsageError, match="plain RoPE"):
        check(tf.Glm4Config(**sizes, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                                                      "partial_rotary_factor": 0.5}))  # fmt: skip
    # query heads narrower than the hidden size (a structured GLM-4 with heads removed): llama.cpp's glm4 sizes
    # them by heads x head_dim, so the export takes them (row glm4-structured)
    from carve.export import check_config

    assert check_config(tf.Glm4Config(**{**sizes, "num_attention_heads": 2, "num_key_value_heads": 1})).gguf == "glm4"


def test_nemotron_as_llama_cpp_nemotron(tmp_path: Path, tokenizer) -> None:
    """Nemotron-4 / Minitron as llama.cpp's `nemotron`: LayerNorm weights written as 1 + w (its
    LayerNorm1P), their biases as they are, the squared-ReLU MLP's up and down, Q and K unpermuted, the
    rotary width half a head, the LayerNorm epsilon; scaled RoPE and other activations refused.
    Logits in llama.cpp itself: bench/export_archs.py, row nemotron."""
    import numpy as np
    import transformers as tf

    from carve.errors import UsageError
    from carve.export import architecture

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
             "pad_token_id": None, "bos_token_id": None, "eos_token_id": None, "norm_eps": 1e-4}  # fmt: skip
    state, meta, tensors = _tiny_gguf(tf.NemotronConfig(**sizes), tokenizer, tmp_path / "tiny-nemotron", norms=True)
    assert meta["general.architecture"] == "nemotron" and meta["nemotron.rope.dimension_count"] == 8
    assert meta["nemotron.attention.layer_norm_epsilon"] == pytest.approx(1e-4)
    assert np.allclose(tensors["blk.1.attn_norm.weight"], state["model.layers.1.input_layernorm.weight"].numpy() + 1)
    assert np.array_equal(tensors["blk.1.ffn_norm.bias"], state["model.layers.1.post_attention_layernorm.bias"].numpy())
    assert np.allclose(tensors["output_norm.weight"], state["model.norm.weight"].numpy() + 1)
    for hf, name in {"model.layers.1.self_attn.k_proj.weight": "blk.1.attn_k.weight",
                     "model.layers.1.mlp.up_proj.weight": "blk.1.ffn_up.weight"}.items():  # fmt: skip
        want = state[hf].half().numpy()
        assert np.array_equal(tensors[name].reshape(want.shape), want), name
    assert len(tensors) == len([n for n in state if "rotary" not in n])
    check = architecture("nemotron").check
    assert check is not None
    with pytest.raises(UsageError, match="squared-ReLU"):
        check(tf.NemotronConfig(**sizes, hidden_act="silu"))


def test_olmo1_as_llama_cpp_olmo(tmp_path: Path, tokenizer) -> None:
    """OLMo (1) as llama.cpp's `olmo`: no norm tensors (its LayerNorms have no weights), Q and K
    permuted as Llama's, the LayerNorm epsilon transformers fixes (1e-5) and the Q/K/V clipping as
    `clamp_kqv`.  Logits in llama.cpp itself: bench/export_archs.py, row olmo (contrast: unclipped)."""
    import numpy as np
    import transformers as tf

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, "clip_qkv": 3.0,
             "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}  # fmt: skip
    state, meta, tensors = _tiny_gguf(tf.OlmoConfig(**sizes), tokenizer, tmp_path / "tiny-olmo")
    assert meta["general.architecture"] == "olmo"
    assert meta["olmo.attention.clamp_kqv"] == pytest.approx(3.0)
    assert meta["olmo.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert not any("norm" in k for k in tensors)
    v = state["model.layers.0.self_attn.v_proj.weight"].half().numpy()
    assert np.array_equal(tensors["blk.0.attn_v.weight"].reshape(v.shape), v)
    q = state["model.layers.0.self_attn.q_proj.weight"].half().numpy()
    assert not np.array_equal(tensors["blk.0.attn_q.weight"].reshape(q.shape), q)  # permuted
    assert sorted(map(tuple, tensors["blk.0.attn_q.weight"].reshape(q.shape))) == sorted(
        map(tuple, q)
    )  # rows reordered


def test_seed_oss_as_llama_cpp_seed_oss(tmp_path: Path, tokenizer, capsys: pytest.CaptureFixture[str]) -> None:
    """Seed-OSS as llama.cpp's `seed_oss`: Llama's tensors unpermuted with their Q/K/V biases, the
    norm before the MLP as `post_attention_norm` (llama.cpp's name for it there), heads x head_dim
    apart from the hidden size; an output projection bias refused.  Logits in llama.cpp itself:
    bench/export_archs.py, row seed_oss."""
    import transformers as tf

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 256,
             "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}  # fmt: skip
    state, meta, tensors = _tiny_gguf(tf.SeedOssConfig(**sizes), tokenizer, tmp_path / "tiny-seed")
    assert meta["general.architecture"] == "seed_oss" and meta["seed_oss.attention.key_length"] == 32
    _assert_written(tensors, state, {"blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
                                     "blk.1.attn_v.bias": "model.layers.1.self_attn.v_proj.bias",
                                     "blk.1.post_attention_norm.weight":
                                         "model.layers.1.post_attention_layernorm.weight"})  # fmt: skip
    assert not any(k.endswith("ffn_norm.weight") for k in tensors)
    src = tmp_path / "tiny-seed-bias"
    tf.AutoModelForCausalLM.from_config(tf.SeedOssConfig(**sizes, attention_out_bias=True)).save_pretrained(src)
    tokenizer.save_pretrained(src)
    capsys.readouterr()
    assert main(["export", str(src), "--gguf", str(tmp_path / "bias.gguf")]) == 2
    assert (
        "llama.cpp's seed_oss architecture holds no bias 'model.layers.0.self_attn.o_proj.bias'"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "bias.gguf").exists()


def test_arcee_as_llama_cpp_arcee(tmp_path: Path, tokenizer) -> None:
    """Arcee (AFM-4.5B) as llama.cpp's `arcee`: Llama's tensors with Q and K permuted, the
    squared-ReLU MLP's up and down, YaRN's factor and original context as keys; YaRN with its own
    attention factor, and another activation, refused.  Logits in llama.cpp itself:
    bench/export_archs.py, row arcee (contrast: plain RoPE)."""
    import numpy as np
    import transformers as tf

    from carve.errors import UsageError
    from carve.export import architecture

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
             "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}  # fmt: skip
    state, meta, tensors = _tiny_gguf(tf.ArceeConfig(**sizes, rope_parameters=dict(yarn)), tokenizer, tmp_path / "tiny")
    assert meta["general.architecture"] == "arcee" and meta["arcee.feed_forward_length"] == 128
    assert meta["arcee.rope.scaling.factor"] == 4.0 and meta["arcee.rope.scaling.original_context_length"] == 64
    up = state["model.layers.1.mlp.up_proj.weight"].half().numpy()
    assert np.array_equal(tensors["blk.1.ffn_up.weight"].reshape(up.shape), up)
    assert not any("ffn_gate" in k for k in tensors)
    k = state["model.layers.1.self_attn.k_proj.weight"].half().numpy()
    assert not np.array_equal(tensors["blk.1.attn_k.weight"].reshape(k.shape), k)  # permuted
    check = architecture("arcee").check
    assert check is not None
    with pytest.raises(UsageError, match="default attention factor"):
        check(tf.ArceeConfig(**sizes, rope_parameters={**yarn, "attention_factor": 2.0}))
    with pytest.raises(UsageError, match="squared-ReLU"):
        check(tf.ArceeConfig(**sizes, hidden_act="silu"))


def test_hunyuan_dense_as_llama_cpp_hunyuan_dense(tmp_path: Path, tokenizer) -> None:
    """HunYuan dense as llama.cpp's `hunyuan-dense`: Llama's tensors unpermuted, the per-head Q/K
    norms (after RoPE in both) as `attn_q_norm` / `attn_k_norm`, and the RoPE base its NTK alpha
    stretches, base · alpha^(d / (d − 2)), as llama.cpp's freq base; true dynamic NTK refused.  Logits in
    llama.cpp itself: bench/export_archs.py, row hunyuan (contrast: plain RoPE)."""
    import numpy as np
    import transformers as tf

    from carve.errors import UsageError
    from carve.export import architecture

    rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0, "factor": 1.0}
    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256,
             "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}  # fmt: skip
    config = tf.HunYuanDenseV1Config(**sizes, rope_parameters=dict(rope))
    state, meta, tensors = _tiny_gguf(config, tokenizer, tmp_path / "tiny-hunyuan", norms=True)
    assert meta["general.architecture"] == "hunyuan-dense"
    assert meta["hunyuan-dense.rope.freq_base"] == pytest.approx(10000.0 * 1000.0 ** (16 / 14), rel=1e-6)
    for hf, name in {"model.layers.1.self_attn.query_layernorm.weight": "blk.1.attn_q_norm.weight",
                     "model.layers.1.self_attn.key_layernorm.weight": "blk.1.attn_k_norm.weight"}.items():  # fmt: skip
        assert np.array_equal(tensors[name], state[hf].numpy()), name
    q = state["model.layers.1.self_attn.q_proj.weight"].half().numpy()
    assert np.array_equal(tensors["blk.1.attn_q.weight"].reshape(q.shape), q)  # unpermuted
    check = architecture("hunyuan_v1_dense").check
    assert check is not None
    with pytest.raises(UsageError, match="NTK-alpha"):
        check(tf.HunYuanDenseV1Config(**sizes, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                                 "factor": 2.0}))  # fmt: skip


@pytest.mark.parametrize("arch", ["olmo2", "olmo3"])
def test_olmo_as_llama_cpp_olmo2(arch: str, tmp_path: Path, tokenizer) -> None:
    """OLMo 2 and 3 as llama.cpp's `olmo2`: each Hugging Face tensor under llama.cpp's name, unpermuted
    (rotate-half RoPE), the norms after attention and after the MLP as `post_attention_norm` and
    `post_ffw_norm`, the whole-projection Q/K norms as `attn_q_norm` / `attn_k_norm`; OLMo 3's sliding
    window and per-layer pattern.  transformers' GGUF loader reads neither; their logits in
    llama.cpp itself: bench/export_archs.py, rows olmo2 and olmo3."""
    import transformers as tf
    from gguf import GGUFReader

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
             "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}  # fmt: skip
    config = tf.Olmo2Config(**sizes) if arch == "olmo2" else tf.Olmo3Config(**sizes, sliding_window=16)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    gguf, meta = _exported(model, tokenizer, tmp_path / f"tiny-{arch}", "f16")
    assert meta["general.architecture"] == "olmo2"
    if arch == "olmo3":
        assert meta["olmo2.attention.sliding_window"] == 16
        field = GGUFReader(gguf).fields["olmo2.attention.sliding_window_pattern"]
        assert [bool(field.parts[i][0]) for i in field.data] == [True, True, True, False]
    tensors = _gguf_tensors(gguf)
    names = {
        "model.layers.0.post_attention_layernorm.weight": "blk.0.post_attention_norm.weight",
        "model.layers.0.post_feedforward_layernorm.weight": "blk.0.post_ffw_norm.weight",
        "model.layers.0.self_attn.q_norm.weight": "blk.0.attn_q_norm.weight",
        "model.layers.0.self_attn.q_proj.weight": "blk.0.attn_q.weight",
        "model.layers.0.self_attn.k_proj.weight": "blk.0.attn_k.weight",
    }
    _assert_written(tensors, model.state_dict(), {name: hf for hf, name in names.items()})
    assert len(tensors) == len([n for n in model.state_dict() if "rotary" not in n])
    assert not any(k.endswith(("attn_norm.weight", "ffn_norm.weight")) for k in tensors)


def test_structured_stablelm_exports(tmp_path: Path, tokenizer, small_corpus: Path) -> None:
    """A StableLM, whose heads structured extraction cannot remove (its attention keeps the hidden size),
    cut in MLP width and depth by `carve extract --keep 0.5`, exports and reloads with the output's logits."""
    src = tmp_path / "tiny-stablelm"
    tiny_model("stablelm").save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "structured"
    assert main(["extract", str(src), "--domain", str(small_corpus), "--general", str(small_corpus), *FAST,
                 "--keep", "0.5", "--out", str(out)]) == 0  # fmt: skip
    manifest = json.loads((out / "carve.json").read_text())
    assert manifest["size"]["parameters_after"] < manifest["size"]["parameters_before"]
    config = json.loads((out / "config.json").read_text())
    assert config["num_attention_heads"] * config["head_dim"] == config["hidden_size"]  # every head kept
    assert main(["export", str(out), "--gguf", str(tmp_path / "s.gguf"), "--type", "f16"]) == 0
    _check(out, tmp_path / "s.gguf", "f16")


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_stablelm_as_llama_cpp_stablelm(qkv_bias: bool, tmp_path: Path, tokenizer) -> None:
    """StableLM 2 (1.6B: no Q/K/V biases; 3B and Zephyr: with them) as llama.cpp's `stablelm`:
    LayerNorms with their biases (random here, so that a lost one shows), RoPE over a quarter of each
    head (rotate-half, no permutation), the sequential residual said; reloaded through transformers'
    GGUF loader with the source's logits."""
    import transformers as tf

    config = tf.StableLmConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               use_qkv_bias=qkv_bias)  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.startswith("model.norm") or name.endswith("proj.bias"):
                p.normal_(1 if name.endswith("weight") else 0, 0.5)
    gguf, meta = _exported(model, tokenizer, tmp_path / "tiny-stablelm", "f16")
    assert meta["general.architecture"] == "stablelm" and meta["stablelm.rope.dimension_count"] == 4
    assert meta["stablelm.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert meta["stablelm.use_parallel_residual"] is False
    assert ("blk.0.attn_q.bias" in _gguf_tensors(gguf)) == qkv_bias
    _check(tmp_path / "tiny-stablelm", gguf, "f16")


def test_starcoder2_as_llama_cpp_starcoder2(tmp_path: Path, tokenizer, small_corpus: Path, capsys) -> None:
    """StarCoder2 as llama.cpp's `starcoder2`: LayerNorms and every Linear with biases (random here,
    so that a lost one shows), the two-Linear GELU MLP as ffn_up / ffn_down, rotate-half RoPE (no
    permutation), the sliding window said; reloaded through transformers' GGUF loader with the
    source's logits.  A structured output (MLP width cut) exports the same way."""
    model = tiny_model("starcoder2")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.startswith("model.norm") or name.endswith(".bias"):
                p.normal_(1 if name.endswith("weight") else 0, 0.5)
    model.config.sliding_window = 512  # past the test's context: said, not computed otherwise here
    capsys.readouterr()
    gguf, meta = _exported(model, tokenizer, tmp_path / "tiny-starcoder2", "f16")
    assert meta["general.architecture"] == "starcoder2" and "past 512 tokens" in capsys.readouterr().err
    assert meta["starcoder2.attention.layer_norm_epsilon"] == pytest.approx(model.config.norm_epsilon)
    names = _gguf_tensors(gguf)
    assert {"blk.0.ffn_up.bias", "blk.0.ffn_down.bias", "blk.0.attn_output.bias", "output_norm.bias"} <= set(names)
    _check(tmp_path / "tiny-starcoder2", gguf, "f16")
    out = tmp_path / "structured"
    assert main(["extract", str(tmp_path / "tiny-starcoder2"), "--domain", str(small_corpus), "--general",
                 str(small_corpus), *FAST, "--mlp-keep", "0.5", "--out", str(out)]) == 0  # fmt: skip
    assert json.loads((out / "config.json").read_text())["intermediate_size"] < model.config.intermediate_size
    assert main(["export", str(out), "--gguf", str(tmp_path / "s.gguf"), "--type", "q8_0"]) == 0
    _check(out, tmp_path / "s.gguf", "q8_0")


def test_phi2_as_llama_cpp_phi2(tmp_path: Path, tokenizer, capsys) -> None:
    """Phi-1/1.5/2 as llama.cpp's `phi2`: one LayerNorm a block (weight and bias), Q/K/V, the
    attention's `dense` and the MLP's fc1 / fc2 with their biases, the final LayerNorm and the
    head's bias; RoPE over part of each head.  transformers' GGUF loader has no phi2, so every
    tensor is read back from the file and compared with the source's (llama.cpp runs it: bench
    row phi2); per-head Q/K LayerNorms are refused."""
    import transformers as tf

    model = tiny_model("phi")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith(".bias"):
                p.normal_(1 if name.endswith("weight") else 0, 0.5)
    gguf, meta = _exported(model, tokenizer, tmp_path / "tiny-phi", "f16")
    assert meta["general.architecture"] == "phi2"
    assert meta["phi2.rope.dimension_count"] == int(16 * model.config.rope_parameters["partial_rotary_factor"])
    written = _gguf_tensors(gguf)
    want = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
            "lm_head.bias": "output.bias", "model.final_layernorm.bias": "output_norm.bias"}  # fmt: skip
    for i in range(model.config.num_hidden_layers):
        for hf, cpp in (("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
                        ("self_attn.v_proj", "attn_v"), ("self_attn.dense", "attn_output"), ("mlp.fc1", "ffn_up"),
                        ("mlp.fc2", "ffn_down")):  # fmt: skip
            for kind in ("weight", "bias"):
                want[f"model.layers.{i}.{hf}.{kind}"] = f"blk.{i}.{cpp}.{kind}"
    state = model.state_dict()
    assert len(written) == len(state) and set(want.values()) <= set(written)
    for hf, cpp in want.items():
        got = torch.from_numpy(written[cpp].astype("float32")).reshape(state[hf].shape)
        torch.testing.assert_close(got, state[hf].float(), rtol=1e-3, atol=1e-3)
    config = tiny_model("phi").config
    config.qk_layernorm = True
    src = tmp_path / "qk-norm"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tokenizer.save_pretrained(src)
    capsys.readouterr()
    assert main(["export", str(src), "--gguf", str(tmp_path / "x.gguf")]) != 0
    assert "Q/K LayerNorms" in capsys.readouterr().err and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": "stablelm", "qk_layernorm": True}, "per-head Q/K norms"),
        ({"model_type": "stablelm", "use_parallel_residual": True}, "a parallel residual"),
        ({"model_type": "olmo3", "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 5e5},
                                                     "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
         "one RoPE base"),
        ({"model_type": "olmo3", "rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 5e5},
                                                     "sliding_attention": {"rope_type": "default", "rope_theta": 5e5}}},
         "plain RoPE"),
    ],
)  # fmt: skip
def test_llama_cpp_cannot_take_refused(config: dict[str, Any], message: str) -> None:
    """carve's own checks of what llama.cpp's stablelm and olmo2 graphs compute otherwise."""
    from types import SimpleNamespace

    from carve.errors import UsageError
    from carve.export import check_config

    base = {"qk_layernorm": False, "use_parallel_residual": False, "rope_parameters": {"rope_type": "default"}}
    with pytest.raises(UsageError, match=message):
        check_config(SimpleNamespace(**{**base, **config}))


def test_cohere_as_llama_cpp_command_r(tmp_path: Path, tokenizer) -> None:
    """Cohere (Command R, Aya) as llama.cpp's `command-r`: each tensor under llama.cpp's name and
    unpermuted (both libraries rotate adjacent pairs), one norm a block (`attn_norm`, no `ffn_norm`),
    the logit scale; Command R+'s per-head Q/K LayerNorms ([heads, head_dim], float32) in a model of 64
    blocks, refused in fewer (llama.cpp reads them only from 64 blocks on).  transformers' GGUF loader
    reads no Cohere; its logits in llama.cpp itself: bench/export_archs.py, rows cohere and
    cohere-qk-norm."""
    import numpy as np
    import transformers as tf

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
             "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.CohereConfig(**sizes, logit_scale=0.25))
    gguf, meta = _exported(model, tokenizer, tmp_path / "tiny-cohere", "f16")
    assert meta["general.architecture"] == "command-r" and meta["command-r.logit_scale"] == 0.25
    tensors = _gguf_tensors(gguf)
    _assert_written(tensors, model.state_dict(), {"blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
                                                  "blk.1.attn_k.weight": "model.layers.1.self_attn.k_proj.weight",
                                                  "blk.1.attn_norm.weight": "model.layers.1.input_layernorm.weight"})  # fmt: skip
    assert not any("ffn_norm" in k for k in tensors) and "output.weight" not in tensors  # the head is tied
    assert len(tensors) == len(model.state_dict()) - 1
    src = tmp_path / "cohere-qk-norm"
    tf.AutoModelForCausalLM.from_config(tf.CohereConfig(**sizes, use_qk_norm=True)).save_pretrained(src)
    tokenizer.save_pretrained(src)
    assert main(["export", str(src), "--gguf", str(tmp_path / "q.gguf")]) == 2 and not (tmp_path / "q.gguf").exists()
    plus = tf.CohereConfig(**{**sizes, "num_hidden_layers": 64}, use_qk_norm=True)  # Command R+'s depth
    state, meta, tensors = _tiny_gguf(plus, tokenizer, tmp_path / "tiny-cohere-plus", norms=True)
    q_norm, k_norm = state["model.layers.63.self_attn.q_norm.weight"], state["model.layers.63.self_attn.k_norm.weight"]
    assert q_norm.shape == (4, 16) and k_norm.shape == (2, 16)
    assert tensors["blk.63.attn_q_norm.weight"].dtype == np.float32
    assert np.array_equal(tensors["blk.63.attn_q_norm.weight"], q_norm.numpy())
    assert np.array_equal(tensors["blk.63.attn_k_norm.weight"], k_norm.numpy())


def test_cohere2_as_llama_cpp_cohere2(tmp_path: Path, tokenizer, small_corpus: Path) -> None:
    """Cohere 2 (Command R7B) as llama.cpp's `cohere2`: Cohere's tensors (unpermuted, one norm a block),
    the logit scale, the sliding window and the per-layer pattern llama.cpp reads (RoPE in the sliding
    layers only, in both libraries); a structured output that dropped a block exports with the pattern
    of the blocks it kept; a model without sliding layers is refused.  Its logits in llama.cpp itself:
    bench/export_archs.py, row cohere2."""
    import numpy as np
    import transformers as tf
    from gguf import GGUFReader

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
             "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.Cohere2Config(**sizes, logit_scale=0.25, sliding_window=8))
    assert model.config.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    gguf, meta = _exported(model, tokenizer, tmp_path / "tiny-cohere2", "f16")
    assert meta["general.architecture"] == "cohere2" and meta["cohere2.logit_scale"] == 0.25
    assert meta["cohere2.attention.sliding_window"] == 8
    field = GGUFReader(gguf).fields["cohere2.attention.sliding_window_pattern"]
    assert [bool(field.parts[i][0]) for i in field.data] == [True, True, True, False]
    tensors = _gguf_tensors(gguf)
    w = model.state_dict()["model.layers.2.self_attn.k_proj.weight"].half().numpy()
    assert np.array_equal(tensors["blk.2.attn_k.weight"].reshape(w.shape), w)  # unpermuted
    assert not any("ffn_norm" in k for k in tensors) and len(tensors) == len(model.state_dict()) - 1
    src, out = tmp_path / "tiny-cohere2", tmp_path / "structured"
    assert main(["extract", str(src), "--domain", str(small_corpus), "--general", str(small_corpus), *FAST,
                 "--drop-blocks", "1", "--mlp-keep", "0.5", "--heads-keep", "1.0", "--out", str(out)]) == 0  # fmt: skip
    kinds = json.loads((out / "config.json").read_text())["layer_types"]
    assert main(["export", str(out), "--gguf", str(tmp_path / "s.gguf")]) == 0
    field = GGUFReader(tmp_path / "s.gguf").fields["cohere2.attention.sliding_window_pattern"]
    assert len(kinds) == 3 and [bool(field.parts[i][0]) for i in field.data] == [
        k == "sliding_attention" for k in kinds
    ]
    full = tmp_path / "cohere2-full"
    tf.AutoModelForCausalLM.from_config(tf.Cohere2Config(**sizes, layer_types=["full_attention"] * 4)).save_pretrained(
        full)  # fmt: skip
    tokenizer.save_pretrained(full)
    assert main(["export", str(full), "--gguf", str(tmp_path / "f.gguf")]) == 2 and not (tmp_path / "f.gguf").exists()


def test_smollm3_structured_without_its_rope_rule_refused(tmp_path: Path, tokenizer, capsys) -> None:
    """llama.cpp's smollm3 skips RoPE in layers 3, 7, ... whatever the file says: an output whose kept
    blocks break that rule (one dropped block) is refused by name, with nothing written."""
    import transformers as tf

    config = tf.SmolLM3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, no_rope_layers=[1, 1, 0, 1],
                              pad_token_id=None, bos_token_id=None, eos_token_id=None)  # fmt: skip
    src = tmp_path / "smollm3-dropped"
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tokenizer.save_pretrained(src)
    capsys.readouterr()
    assert main(["export", str(src), "--gguf", str(tmp_path / "s.gguf")]) == 2
    err = capsys.readouterr().err
    assert "skips RoPE in every fourth layer" in err and "[2]" in err and not (tmp_path / "s.gguf").exists()


def test_gemma3_refusals(tmp_path: Path, tokenizer, capsys) -> None:
    """What llama.cpp's gemma3 graph computes otherwise is refused by name, with nothing written."""
    import transformers as tf

    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}  # fmt: skip
    cases = {
        "query_pre_attn_scalar": ({"query_pre_attn_scalar": 64}, "scales attention by 1/sqrt(32)"),
        "softcap": ({"attn_logit_softcapping": 50.0}, "soft-capping"),
        "activation": ({"hidden_activation": "silu"}, "tanh-approximated GELU"),
    }
    models = {name: (tf.AutoModelForCausalLM.from_config(tf.Gemma3TextConfig(**{"query_pre_attn_scalar": 32, **sizes,
                                                                                **extra})), message)
              for name, (extra, message) in cases.items()}  # fmt: skip
    _assert_export_refused(tmp_path, tokenizer, capsys, models)


def test_llama3_rope_scaling_as_rope_freqs(tmp_path: Path, tokenizer) -> None:
    """Llama 3's RoPE scaling: `rope_freqs.weight` holds llama.cpp's per-frequency factors, here
    against llama.cpp's own formula (convert_hf_to_gguf's), and every other tensor is the plain
    export's (transformers' GGUF loader reads no RoPE scaling: the reload is compared with the same
    weights under plain RoPE)."""
    import math

    import numpy as np
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # fmt: skip
    config = tiny_config("llama")
    config.rope_parameters = {**scaling, "rope_theta": 10000.0}
    torch.manual_seed(0)
    src = tmp_path / "tiny-llama3"
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    tokenizer.save_pretrained(src)
    gguf = tmp_path / "l3.gguf"
    assert main(["export", str(src), "--gguf", str(gguf), "--type", "f16"]) == 0
    tensors = {t.name: np.array(t.data) for t in GGUFReader(str(gguf)).tensors}
    want = []
    for i in range(0, 16, 2):  # head_dim 16
        wavelen = 2 * math.pi * 10000.0 ** (i / 16)
        if wavelen < 64 / 4.0:
            want.append(1.0)
        elif wavelen > 64 / 1.0:
            want.append(8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert np.allclose(tensors["rope_freqs.weight"], want, rtol=1e-6) and len(set(want)) > 2  # all three regimes
    plain = tmp_path / "plain"
    model = AutoModelForCausalLM.from_pretrained(src)
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    model.save_pretrained(plain)
    tokenizer.save_pretrained(plain)
    _check(plain, gguf, "f16")


def test_tokenizer_and_metadata(tmp_path: Path, model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from carve.models.gguf_header import read_gguf_header

    gguf = tmp_path / "m.gguf"
    assert main(["export", str(model_dir), "--gguf", str(gguf)]) == 0
    meta = read_gguf_header(gguf)
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["general.name"] == model_dir.name  # the directory's name, not its local path
    assert meta["llama.block_count"] == 2 and meta["llama.attention.head_count_kv"] == 2
    src = AutoTokenizer.from_pretrained(model_dir)
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf.name)
    text = "The parties agree that the licence is granted."
    assert back(text)["input_ids"] == src(text)["input_ids"]


def test_pre_tokenizer_named_from_the_split_rule(tmp_path: Path, capsys) -> None:
    """llama.cpp splits text before BPE by a rule named in `tokenizer.ggml.pre`; carve reads the rule
    off the tokenizer (Llama 3's regex, Qwen2's, DeepSeek V3's three in turn, SmolLM's single digits,
    GPT-2's) rather than the architecture, and says so when it knows no name for it (as for DeepSeek
    V3's rules in another order)."""
    from carve.models.gguf_header import read_gguf_header
    from carve.models.pretokenize import SEQUENCES, SPLITS
    from tests.conftest import byte_level_tokenizer

    by_name = {v: k for k, v in {**SPLITS, **SEQUENCES}.items()}
    cases = [(by_name["llama-bpe"], False, "llama-bpe"), (by_name["qwen2"], False, "qwen2"),
             (by_name["deepseek-v3"], False, "deepseek-v3"), (by_name["deepseek-v3"][::-1], False, "default"),
             (None, True, "smollm"), (None, False, "gpt-2"), (r"\d+|\D+", False, "default")]  # fmt: skip
    for i, (split, digits, want) in enumerate(cases):
        tok = byte_level_tokenizer(split, digits, size=VOCAB)  # as many tokens as the model has rows
        src = tmp_path / f"m{i}"
        tiny_model("llama").save_pretrained(src)
        tok.save_pretrained(src)
        capsys.readouterr()
        assert main(["export", str(src), "--gguf", str(tmp_path / f"m{i}.gguf")]) == 0
        assert read_gguf_header(tmp_path / f"m{i}.gguf")["tokenizer.ggml.pre"] == want, want
        assert ("knows no llama.cpp pre-tokenizer" in capsys.readouterr().err) == (want == "default")


def test_sparse_and_structured_outputs(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    data = ["--model", str(model_dir), "--domain", str(small_corpus), "--general", str(small_corpus), *FAST]
    outs = {
        "sparse": ["--method", "magnitude", "--save-format", "sparse"],
        "structured": ["--structure", "--keep", "0.5"],
        "dropped": ["--structure", "--drop-blocks", "1", "--mlp-keep", "1.0", "--heads-keep", "1.0"],
    }
    for name, extra in outs.items():
        out = tmp_path / name
        assert main(["extract", *data, "--out", str(out), *extra]) == 0, name
        gguf = tmp_path / f"{name}.gguf"
        assert main(["export", str(out), "--gguf", str(gguf), "--type", "f16"]) == 0, name
        _check(out, gguf, "f16")


def _qwen3_moe(**extra: object) -> torch.nn.Module:
    """A tiny Qwen3-MoE whose routing matters: weights large enough to spread tokens over the experts."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    settings = {"norm_topk_prob": True, **extra}
    config = Qwen3MoeConfig(
        vocab_size=384, max_position_embeddings=256, hidden_size=64, intermediate_size=32, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
        num_experts_per_tok=2, pad_token_id=None, bos_token_id=None, eos_token_id=None, **settings,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.2)
    return model


def _pruned_export(model: torch.nn.Module, tokenizer, corpus: Path, tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """`model` saved, pruned per expert by `carve extract` (Wanda, 50%) and exported as `kind`: the
    output and the GGUF."""
    src = tmp_path / "tiny-moe"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "pruned"
    assert main(["extract", "--model", str(src), "--domain", str(corpus), "--general", "general",
                 "--method", "wanda", "--sparsity", "0.5", "--out", str(out), *FAST]) == 0  # fmt: skip
    gguf = tmp_path / f"moe-{kind}.gguf"
    assert main(["export", str(out), "--gguf", str(gguf), "--type", kind]) == 0
    return out, gguf


def _reload_within(out: Path, gguf: Path, kind: str) -> torch.Tensor:
    """Per position, whether the GGUF reloaded by transformers, given the output's config (its MoE GGUF
    mappings read no expert widths), gives the output's logits within the type's tolerance."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    want = _logits(carve.load_model(str(out)).model, ids)
    config = AutoConfig.from_pretrained(out)
    got = _logits(AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, config=config).eval(), ids)
    return (got - want).abs().amax(-1) <= TOLERANCE[kind] * want.abs().max()


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_qwen3_moe_as_llama_cpp_qwen3moe(kind: str, tmp_path: Path, tokenizer, small_corpus: Path) -> None:
    """Qwen3-MoE, pruned per expert by `carve extract`: each fused gate/up tensor goes in as llama.cpp's
    ffn_gate_exps and ffn_up_exps, the router float32 whatever the type; the reload computes the
    source's logits, and the header has the keys llama.cpp reads."""
    import gguf as gguf_py

    from carve.models.gguf_header import read_gguf_header

    out, gguf = _pruned_export(_qwen3_moe(), tokenizer, small_corpus, tmp_path, kind)
    meta = read_gguf_header(gguf)
    assert meta["general.architecture"] == "qwen3moe"
    assert (meta["qwen3moe.expert_count"], meta["qwen3moe.expert_used_count"]) == (4, 2)
    assert meta["qwen3moe.expert_feed_forward_length"] == 32
    tensors = {t.name: t for t in gguf_py.GGUFReader(gguf).tensors}
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == gguf_py.GGMLQuantizationType.F32
    assert [int(d) for d in tensors["blk.0.ffn_gate_exps.weight"].shape] == [64, 32, 4]  # ggml order: in, out, E
    assert [int(d) for d in tensors["blk.1.ffn_down_exps.weight"].shape] == [32, 64, 4]
    assert _reload_within(out, gguf, kind).all(), kind


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_qwen2_moe_as_llama_cpp_qwen2moe(kind: str, tmp_path: Path, tokenizer, small_corpus: Path) -> None:
    """Qwen2-MoE, pruned per expert by `carve extract` (its shared expert as a dense MLP): the routed
    experts as llama.cpp's *_exps tensors, the shared expert as *_shexp and its gate as the one row
    ffn_gate_inp_shexp (float32, as the router), Q/K/V biases kept; the reload computes the source's
    logits."""
    import gguf as gguf_py

    from carve.models.gguf_header import read_gguf_header

    model = tiny_model("qwen2_moe")
    with torch.no_grad():  # routing and the shared expert's gate that matter
        for name, p in model.named_parameters():
            if "experts" in name or name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                p.normal_(0, 0.2)
    out, gguf = _pruned_export(model, tokenizer, small_corpus, tmp_path, kind)
    meta = read_gguf_header(gguf)
    assert meta["general.architecture"] == "qwen2moe"
    assert (meta["qwen2moe.expert_count"], meta["qwen2moe.expert_used_count"]) == (4, 2)
    assert meta["qwen2moe.expert_feed_forward_length"] == 32
    assert meta["qwen2moe.expert_shared_feed_forward_length"] == 32
    tensors = {t.name: t for t in gguf_py.GGUFReader(gguf).tensors}
    for name in ("blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_inp_shexp.weight"):
        assert tensors[name].tensor_type == gguf_py.GGMLQuantizationType.F32, name
    assert [int(d) for d in tensors["blk.0.ffn_gate_inp_shexp.weight"].shape] == [64]  # llama.cpp's {n_embd}
    assert [int(d) for d in tensors["blk.1.ffn_up_shexp.weight"].shape] == [64, 32]
    assert [int(d) for d in tensors["blk.1.ffn_down_exps.weight"].shape] == [32, 64, 4]
    assert "blk.0.attn_q.bias" in tensors
    within = _reload_within(out, gguf, kind)
    # f16: every position; q8_0: a token whose router logits nearly tie can take another expert when the
    # hidden states move by quantization (3 of 48 positions here, each otherwise at a typical 1% error)
    assert within.all() if kind == "f16" else within.float().mean() >= 0.9, kind


def test_mixtral_as_llama_cpp_llama_with_experts(tmp_path: Path, tokenizer, capsys) -> None:
    """Mixtral goes in as llama.cpp's `llama` with experts (as llama.cpp's own conversion writes it),
    which transformers' GGUF loader cannot read back: each tensor is read back from the file and
    compared with the source's (Q and K un-permuted, gate and up joined)."""
    import gguf as gguf_py

    from carve.export import _permute

    model = tiny_model("mixtral")
    model.config.sliding_window = 16  # llama.cpp's llama attends to the whole context: said, not refused
    capsys.readouterr()
    gguf, meta = _exported(model, tokenizer, tmp_path / "tiny-mixtral", "f16")
    assert "past 16 tokens" in capsys.readouterr().err
    assert meta["general.architecture"] == "llama" and meta["llama.expert_count"] == 4
    assert meta["llama.expert_used_count"] == 2 and meta["llama.feed_forward_length"] == 128
    tensors = {t.name: torch.from_numpy(t.data.astype("float32")) for t in gguf_py.GGUFReader(gguf).tensors}
    state = model.state_dict()
    for i in range(2):
        experts = state[f"model.layers.{i}.mlp.experts.gate_up_proj"]
        joined = torch.cat([tensors[f"blk.{i}.ffn_gate_exps.weight"], tensors[f"blk.{i}.ffn_up_exps.weight"]], dim=1)
        torch.testing.assert_close(joined, experts, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(tensors[f"blk.{i}.ffn_down_exps.weight"], state[f"model.layers.{i}.mlp.experts.down_proj"],
                                   atol=2e-3, rtol=2e-3)  # fmt: skip
        assert torch.equal(tensors[f"blk.{i}.ffn_gate_inp.weight"], state[f"model.layers.{i}.mlp.gate.weight"])
        q = torch.from_numpy(_permute(state[f"model.layers.{i}.self_attn.q_proj.weight"].numpy(), 4))
        torch.testing.assert_close(tensors[f"blk.{i}.attn_q.weight"], q, atol=2e-3, rtol=2e-3)


def test_ministral3_as_llama_cpp_mistral3(tmp_path: Path, tokenizer) -> None:
    """Ministral 3 as llama.cpp's `mistral3`: Llama's tensors (Q and K permuted), YaRN as keys with its
    `mscale_all_dim` as llama.cpp's log multiplier, Llama 4's attention temperature β; an mscale other
    than 1 refused by name.  Logits in llama.cpp: bench/export_archs.py, row ministral3."""
    import numpy as np
    import transformers as tf

    from carve.export import _permute, check_config

    config = tf.Ministral3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                                 pad_token_id=None, bos_token_id=None, eos_token_id=None)  # fmt: skip
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 64,
                              "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                              "llama_4_scaling_beta": 0.1}  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    gguf, meta = _exported(model, tokenizer, tmp_path / "tiny-ministral3", "f16")
    assert meta["general.architecture"] == "mistral3" and meta["mistral3.rope.scaling.type"] == "yarn"
    assert meta["mistral3.rope.scaling.factor"] == 16 and meta["mistral3.rope.scaling.original_context_length"] == 64
    assert meta["mistral3.rope.scaling.yarn_log_multiplier"] == 1
    assert meta["mistral3.attention.temperature_scale"] == pytest.approx(0.1)
    q = _permute(model.state_dict()["model.layers.1.self_attn.q_proj.weight"].numpy(), 4).astype(np.float16)
    assert np.array_equal(_gguf_tensors(gguf)["blk.1.attn_q.weight"].reshape(q.shape), q)
    config.rope_parameters = {**config.rope_parameters, "mscale": 0.5}
    with pytest.raises(UsageError, match="mscale as 1"):
        check_config(config)


def test_exaone4_as_llama_cpp_exaone4(tmp_path: Path, tokenizer) -> None:
    """EXAONE 4 as llama.cpp's `exaone4`: the norms after attention and MLP under OLMo 2's names, per-head
    Q/K norms, Q and K not permuted (rotate-half in both), Llama 3's RoPE scaling as `rope_freqs.weight`
    (EXAONE 4.0 1.2B's); a sliding window (which llama.cpp follows only in 64 blocks) refused by name.
    Logits in llama.cpp: bench/export_archs.py, row exaone4."""
    import numpy as np
    import transformers as tf

    from carve.export import check_config

    config = tf.Exaone4Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                              sliding_window=None, sliding_window_pattern=None, layer_types=["full_attention"] * 2,
                              pad_token_id=None, bos_token_id=None, eos_token_id=None)  # fmt: skip
    config.rope_parameters = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64, "rope_theta": 10000.0}  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    gguf, meta = _exported(model, tokenizer, tmp_path / "tiny-exaone4", "f16")
    assert meta["general.architecture"] == "exaone4"
    tensors = _gguf_tensors(gguf)
    assert "rope_freqs.weight" in tensors and not any(k.endswith(".attn_norm.weight") for k in tensors)
    state = model.state_dict()
    for hf, name in [("post_attention_layernorm", "post_attention_norm"), ("post_feedforward_layernorm", "post_ffw_norm"),
                     ("self_attn.q_norm", "attn_q_norm")]:  # fmt: skip
        assert np.array_equal(tensors[f"blk.1.{name}.weight"], state[f"model.layers.1.{hf}.weight"].numpy()), name
    q = state["model.layers.1.self_attn.q_proj.weight"].half().numpy()
    assert np.array_equal(tensors["blk.1.attn_q.weight"].reshape(q.shape), q)
    windowed = tf.Exaone4Config(**{**config.to_dict(), "sliding_window": 16})
    with pytest.raises(UsageError, match="sets a sliding window"):
        check_config(windowed)


def test_ernie_as_llama_cpp_ernie4_5(tmp_path: Path, tokenizer) -> None:
    """ERNIE 4.5 as llama.cpp's `ernie4_5`: Llama's tensor names, Q and K not permuted (both libraries
    rotate interleaved pairs), heads narrower than hidden / heads kept (head_dim 128 beside a hidden
    size of 64); MLP biases, which llama.cpp's graph has not, refused by name.  Logits in llama.cpp:
    bench/export_archs.py, row ernie4_5."""
    import numpy as np
    import transformers as tf

    config = tf.Ernie4_5Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               pad_token_id=None, bos_token_id=None, eos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    gguf, meta = _exported(model, tokenizer, tmp_path / "tiny-ernie", "f16")
    assert meta["general.architecture"] == "ernie4_5" and meta["ernie4_5.attention.key_length"] == 128
    tensors = _gguf_tensors(gguf)
    for hf, name in [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("mlp.gate_proj", "ffn_gate")]:
        w = model.state_dict()[f"model.layers.1.{hf}.weight"].half().numpy()
        assert np.array_equal(tensors[f"blk.1.{name}.weight"].reshape(w.shape), w), name
    biased = tf.AutoModelForCausalLM.from_config(tf.Ernie4_5Config(**{**config.to_dict(), "use_bias": True}))
    biased.save_pretrained(tmp_path / "biased")
    tokenizer.save_pretrained(tmp_path / "biased")
    from carve.export import export

    with pytest.raises(UsageError, match=r"holds no bias 'model\.layers\.0\.mlp\.down_proj\.bias'"):
        export(tmp_path / "biased", tmp_path / "biased.gguf")
    assert not (tmp_path / "biased.gguf").exists()


def _tiny_gpt_oss(**extra: Any) -> torch.nn.Module:
    import transformers as tf

    config = tf.GptOssConfig(vocab_size=512, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                             num_experts_per_tok=2, sliding_window=16, max_position_embeddings=1024,
                             pad_token_id=None, bos_token_id=None, eos_token_id=None, **extra)  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases and sinks random too, so that a lost or misplaced one shows
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_gpt_oss_as_llama_cpp_gpt_oss(tmp_path: Path, tokenizer, capsys) -> None:
    """gpt-oss as llama.cpp's `gpt-oss` (as its own conversion writes it; transformers' GGUF loader
    cannot read it back): the interleaved gate/up experts [E, hidden, 2·ff] taken apart into
    [E, ff, hidden] gate and up tensors with their biases, the down experts transposed, attention
    sinks, the router's bias, biases kept float32; the sliding pattern and YaRN as keys, and
    llama.cpp's rounding of YaRN's range said.  Logits in llama.cpp: bench/export_archs.py, row gpt-oss."""
    import gguf as gguf_py

    model = _tiny_gpt_oss()
    capsys.readouterr()
    gguf, meta = _exported(model, tokenizer, tmp_path / "tiny-gpt-oss", "q8_0")
    assert "truncate: false" in capsys.readouterr().err
    assert meta["general.architecture"] == "gpt-oss"
    assert (meta["gpt-oss.expert_count"], meta["gpt-oss.expert_used_count"]) == (4, 2)
    assert meta["gpt-oss.expert_feed_forward_length"] == 32 and meta["gpt-oss.attention.sliding_window"] == 16
    assert meta["gpt-oss.rope.scaling.type"] == "yarn" and meta["gpt-oss.rope.scaling.factor"] == 32
    assert meta["gpt-oss.rope.scaling.original_context_length"] == 4096
    reader = gguf_py.GGUFReader(gguf)
    field = reader.fields["gpt-oss.attention.sliding_window_pattern"]
    assert [bool(field.parts[i][0]) for i in field.data] == [True, False]  # sliding, full
    read = {t.name: t for t in reader.tensors}
    tensors = {k: torch.from_numpy(gguf_py.quants.dequantize(t.data, t.tensor_type).astype("float32"))
               for k, t in read.items()}  # fmt: skip
    state = model.state_dict()
    for i in range(2):
        p = f"model.layers.{i}."
        gate_up, gate_up_bias = state[p + "mlp.experts.gate_up_proj"], state[p + "mlp.experts.gate_up_proj_bias"]
        want = {
            "ffn_gate_exps.weight": gate_up[:, :, 0::2].transpose(1, 2), "ffn_up_exps.weight": gate_up[:, :, 1::2].transpose(1, 2),
            "ffn_down_exps.weight": state[p + "mlp.experts.down_proj"].transpose(1, 2),
            "ffn_gate_exps.bias": gate_up_bias[:, 0::2], "ffn_up_exps.bias": gate_up_bias[:, 1::2],
            "ffn_down_exps.bias": state[p + "mlp.experts.down_proj_bias"],
            "ffn_gate_inp.weight": state[p + "mlp.router.weight"], "ffn_gate_inp.bias": state[p + "mlp.router.bias"],
            "attn_sinks.weight": state[p + "self_attn.sinks"], "attn_output.bias": state[p + "self_attn.o_proj.bias"],
            "post_attention_norm.weight": state[p + "post_attention_layernorm.weight"],
        }  # fmt: skip
        for name, w in want.items():
            t = tensors[f"blk.{i}.{name}"].reshape(w.shape)
            if name.endswith("bias") or name.startswith(("ffn_gate_inp", "attn_sinks", "post_")):  # float32, exact
                assert read[f"blk.{i}.{name}"].tensor_type == gguf_py.GGMLQuantizationType.F32, name
                assert torch.equal(t, w), name
            else:
                torch.testing.assert_close(t, w, atol=0.02, rtol=0.02)


def test_gpt_oss_with_experts_removed_exports(tmp_path: Path, tokenizer, small_corpus: Path) -> None:
    """`carve extract --experts-keep 0.5` on a gpt-oss, then `carve export`: the kept experts' count
    and each kept expert's tensors (as the cut model holds them) in the file."""
    import gguf as gguf_py
    from transformers import AutoModelForCausalLM

    src, out = tmp_path / "tiny-gpt-oss", tmp_path / "cut"
    _tiny_gpt_oss().save_pretrained(src)
    tokenizer.save_pretrained(src)
    assert main(["extract", str(src), "--domain", str(small_corpus), "--general", str(small_corpus), *FAST,
                 "--experts-keep", "0.5", "--out", str(out)]) == 0  # fmt: skip
    assert main(["export", str(out), "--gguf", str(tmp_path / "cut.gguf"), "--type", "f16"]) == 0
    meta = read_gguf_header(tmp_path / "cut.gguf")
    assert (meta["gpt-oss.expert_count"], meta["gpt-oss.expert_used_count"]) == (2, 2)
    tensors = {t.name: t for t in gguf_py.GGUFReader(tmp_path / "cut.gguf").tensors}
    cut = AutoModelForCausalLM.from_pretrained(out).state_dict()
    down = torch.from_numpy(tensors["blk.1.ffn_down_exps.weight"].data.astype("float32"))
    want = cut["model.layers.1.mlp.experts.down_proj"].transpose(1, 2)
    torch.testing.assert_close(down.reshape(want.shape), want, atol=2e-3, rtol=2e-3)
    bias = torch.from_numpy(tensors["blk.1.ffn_gate_inp.bias"].data.copy())
    assert torch.equal(bias, cut["model.layers.1.mlp.router.bias"])


def test_mxfp4_type_writes_the_experts_in_mxfp4(tmp_path: Path, tokenizer, model_dir: Path) -> None:
    """`--type mxfp4` (llama.cpp's MXFP4_MOE, as gpt-oss ships): the experts in MXFP4, within MXFP4's
    error of the source's; other matrices Q8_0, vectors and biases F32; a dense model refused by name,
    with nothing written."""
    import gguf as gguf_py

    model = _tiny_gpt_oss()
    gguf, meta = _exported(model, tokenizer, tmp_path / "tiny-gpt-oss", "mxfp4")
    assert meta["general.file_type"] == int(gguf_py.LlamaFileType.MOSTLY_MXFP4_MOE)
    read = {t.name: t for t in gguf_py.GGUFReader(gguf).tensors}
    kinds = {name: t.tensor_type.name for name, t in read.items()}
    assert kinds["blk.0.ffn_gate_exps.weight"] == kinds["blk.1.ffn_down_exps.weight"] == "MXFP4"
    assert kinds["blk.0.attn_q.weight"] == kinds["token_embd.weight"] == "Q8_0"
    assert kinds["blk.0.ffn_gate_exps.bias"] == kinds["blk.0.ffn_gate_inp.weight"] == "F32"
    t = read["blk.1.ffn_down_exps.weight"]
    got = torch.from_numpy(gguf_py.quants.dequantize(t.data, t.tensor_type).astype("float32"))
    want = model.state_dict()["model.layers.1.mlp.experts.down_proj"].transpose(1, 2)
    # MXFP4: 4-bit values sharing a power-of-two scale per 32: each value within a quarter of its block's max
    blocks = want.reshape(-1, 32)
    err = (got.reshape(-1, 32) - blocks).abs()
    assert (err <= 0.25 * blocks.abs().amax(dim=1, keepdim=True) + 1e-6).all()
    assert main(["export", str(model_dir), "--gguf", str(tmp_path / "dense.gguf"), "--type", "mxfp4"]) == 2
    assert not (tmp_path / "dense.gguf").exists()


def test_gpt_oss_refusals() -> None:
    """What llama.cpp's gpt-oss fixes or needs is refused by name."""
    from carve.export import check_config

    for extra, message in [({"swiglu_limit": 5.0}, "limit 7"), ({"attention_bias": False}, "attention biases"),
                           ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "'linear'")]:  # fmt: skip
        with pytest.raises(UsageError, match=message):
            check_config(_tiny_gpt_oss(**extra).config)


def test_moe_refusals(tmp_path: Path, tokenizer, capsys) -> None:
    """What llama.cpp's MoE graphs compute otherwise is refused by name, before anything is written."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    qwen2_moe = tiny_config("qwen2_moe")
    qwen2_moe.norm_topk_prob = True
    cases = {
        "norm_topk_prob false": _qwen3_moe(norm_topk_prob=False),
        "dense MLP layers among them": _qwen3_moe(mlp_only_layers=[1]),
        "norm_topk_prob true": AutoModelForCausalLM.from_config(qwen2_moe),
    }
    _assert_export_refused(tmp_path, tokenizer, capsys, {message: (model, message) for message, model in cases.items()})


def test_refusals(tmp_path: Path, model_dir: Path, capsys) -> None:
    gpt2 = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(gpt2)
    for f in model_dir.glob("tokenizer*"):
        (gpt2 / f.name).write_bytes(f.read_bytes())
    cases = [
        (
            ["export", str(gpt2), "--gguf", str(tmp_path / "g.gguf")],
            "so far; this is 'gpt2'",  # after the list of what GGUF export supports, which grows
        ),
        (["export", str(model_dir), "--gguf", str(tmp_path / "g.bin")], "ending in .gguf"),
    ]
    (tmp_path / "exists.gguf").write_bytes(b"mine")
    capsys.readouterr()
    cases.append((["export", str(model_dir), "--gguf", str(tmp_path / "exists.gguf")], "already exists"))
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert (tmp_path / "exists.gguf").read_bytes() == b"mine"
    assert not (tmp_path / "g.gguf").exists()


def test_pre_tokenizer_rules_are_the_ones_transformers_restores_from_a_gguf() -> None:
    """carve's split rules are transformers' own for the same llama.cpp names, so a GGUF carve writes
    and transformers reads back splits text as the source did (a rule mistyped here fails)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from carve.models.pretokenize import SPLITS

    assert {name: GGUF_PRE_TOKENIZER_SPLITS[name] for name in SPLITS.values()} == {v: k for k, v in SPLITS.items()}


@pytest.mark.parametrize("arch, kind", [("llama", "q8_0"), ("qwen2", "f16"), ("mistral", "bf16"), ("qwen3", "q4_0"),
                                        ("mixtral", "f16"), ("qwen2_moe", "q8_0"), ("qwen3_moe", "f16"),
                                        ("gpt_oss", "q8_0"), ("deepseek_v3", "f16"), ("llama4_text", "q8_0"),
                                        ("apertus", "f16"), ("qwen3_5_text", "q8_0")])  # fmt: skip
def test_streamed_export_writes_the_same_file(arch: str, kind: str, tmp_path: Path, tokenizer) -> None:
    """`carve export --stream`: the header first, then each decoder block read when its tensors are
    written and freed (a sharded source; a Mixtral's or Qwen-MoE's per-expert checkpoint tensors fused
    on reading, as transformers does) — the in-memory export's file byte for byte."""
    from carve.models.skeleton import SkeletonModel

    src = tmp_path / "src"
    # qwen3moe: top-k renormalized; gpt-oss: its experts interleaved, stored fused in the file
    # DeepSeek V3: the latent's up-projection split in two, the routing bias a buffer; Llama 4: experts
    # stored by columns, dense blocks between MoE ones; Apertus: keys read from its weights (xIELU's, per block);
    # Qwen3.5: the DeltaNet's value heads reordered, its A from A_log
    if arch in ("deepseek_v3", "llama4_text", "apertus", "qwen3_5_text"):
        import transformers as tf

        sizes = {"vocab_size": 512, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2}
        config = {
            "deepseek_v3": lambda: _deepseek_config(arch),
            "llama4_text": lambda: tf.Llama4TextConfig(**sizes, intermediate_size=32, intermediate_size_mlp=96,
                                                       num_hidden_layers=4, head_dim=16, num_local_experts=4,
                                                       interleave_moe_layer_step=2),
            "apertus": lambda: tf.ApertusConfig(**sizes, intermediate_size=96, num_hidden_layers=2),
            "qwen3_5_text": _qwen35_config,
        }[arch]()  # fmt: skip
        model = tf.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".act_fn." in name:
                    p.normal_()
    else:
        model = {"qwen3_moe": _qwen3_moe, "gpt_oss": _tiny_gpt_oss}.get(arch, lambda: tiny_model(arch))()
    model.save_pretrained(src, max_shard_size="100KB")
    tokenizer.save_pretrained(src)
    from carve.export import export

    assert "streamed" not in export(src, tmp_path / "mem.gguf", kind, stream=False)  # the whole model loaded
    most: list[int] = []
    load = SkeletonModel.load_block

    def counting(self: SkeletonModel, i: int) -> None:
        load(self, i)
        most.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in self.blocks))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SkeletonModel, "load_block", counting)
        assert main(["export", str(src), "--gguf", str(tmp_path / "st.gguf"), "--type", kind, "--stream",
                     "--quiet"]) == 0  # fmt: skip
    assert most and max(most) == 1  # never two blocks in memory
    assert (tmp_path / "st.gguf").read_bytes() == (tmp_path / "mem.gguf").read_bytes()
    auto = export(src, tmp_path / "auto.gguf", kind)  # a local safetensors directory streams by default
    assert auto["streamed"] == "a local safetensors directory"
    assert not any("decoder block at a time" in note for note in auto["notes"])  # not worth a note
    assert (tmp_path / "auto.gguf").read_bytes() == (tmp_path / "mem.gguf").read_bytes()


def test_streamed_export_of_sparse_and_structured_outputs(
    tmp_path: Path, model_dir: Path, small_corpus: Path, capsys
) -> None:
    """A sparse-format output (read through its masks) and a structured one (narrower, fewer blocks)
    export streamed to the in-memory export's bytes; a fine-tuning update over its base (no config of
    its own) is loaded whole by default; a source that is not a local safetensors directory is
    refused by `--stream` with nothing written."""
    from carve.export import export

    outs = {"sparse": ["--method", "sparsegpt", "--sparsity", "0.5", "--save-format", "sparse"],
            "structured": ["--structure", "--keep", "0.5", "--method", "magnitude"],
            "delta": ["--trainable", "magnitude", "--save-delta", "--steps", "2"]}  # fmt: skip
    for name, flags in outs.items():
        out = tmp_path / name
        job = ["finetune", str(model_dir), "--domain", str(small_corpus), "--block-len", "32",
               "--eval-blocks", "2", "--cloze-items", "0", "--quiet"] if name == "delta" else \
              ["extract", "--model", str(model_dir), "--domain", str(small_corpus), "--general", "general", *FAST]  # fmt: skip
        assert main([*job, *flags, "--out", str(out)]) == 0
        files = [tmp_path / f"{name}-{how}.gguf" for how in ("mem", "st")]
        assert main(["export", str(out), "--gguf", str(files[0]), "--no-stream", "--quiet"]) == 0
        capsys.readouterr()
        if name == "delta":  # an update names its base and has no config of its own: loaded whole by default
            assert "streamed" not in export(out, files[1])
        else:
            assert main(["export", str(out), "--gguf", str(files[1]), "--stream", "--quiet"]) == 0
            assert "one decoder block at a time (--stream)" in capsys.readouterr().err
        assert files[0].read_bytes() == files[1].read_bytes(), name
    assert main(["export", "default", "--gguf", str(tmp_path / "d.gguf"), "--stream", "--quiet"]) == 2
    assert not (tmp_path / "d.gguf").exists()


def _gemma4_config(**changes: Any) -> Any:
    """A tiny Gemma 4 (text) as E2B is built: sliding and global layers (head widths 16 and 32, 2 and 1
    key/value heads, the global ones' values their keys), per-layer embeddings, the last two blocks
    reusing earlier keys and values with a double-wide MLP."""
    import transformers as tf

    kinds = ["sliding_attention", "full_attention"] * 3
    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 32,
             "num_global_key_value_heads": 1, "attention_k_eq_v": True, "max_position_embeddings": 256,
             "vocab_size_per_layer_input": 512, "hidden_size_per_layer_input": 8, "num_kv_shared_layers": 2,
             "use_double_wide_mlp": True, "sliding_window": 16, "layer_types": kinds,
             "final_logit_softcapping": 30.0}  # fmt: skip
    return tf.Gemma4TextConfig(**{**sizes, **changes})


def test_gemma4_as_llama_cpp_gemma4(tmp_path: Path, tokenizer) -> None:
    """Gemma 4's text model as llama.cpp's `gemma4`: the global layers' head width as the key length and the
    sliding ones' as the `_swa` one, key/value heads and MLP widths per block (double-wide where keys and
    values are reused), the layers reusing them and the per-layer embeddings' width as keys; every tensor
    under llama.cpp's name as it is (Gemma 4's RMSNorms scale by w: no offset), no key or value projection
    where the model has none; the global layers' proportional RoPE as `rope_freqs` (the factors under which
    llama.cpp's frequencies over the whole head are transformers' own, unrotated ones 1e30).  Logits and
    tokenizer in llama.cpp itself: bench/export_archs.py, rows gemma4 and gemma4-moe."""
    import numpy as np
    from gguf import GGUFReader

    config = _gemma4_config()
    state, meta, tensors = _tiny_gguf(config, tokenizer, tmp_path / "tiny-gemma4", norms=True)
    a = "gemma4."
    assert meta["general.architecture"] == "gemma4"
    assert [meta[a + k] for k in ("attention.key_length", "attention.key_length_swa", "rope.dimension_count",
                                  "rope.dimension_count_swa", "attention.shared_kv_layers",
                                  "embedding_length_per_layer_input", "attention.sliding_window")] == [
        32, 16, 32, 16, 2, 8, 16]  # fmt: skip
    assert meta[a + "rope.freq_base"] == 1e6 and meta[a + "rope.freq_base_swa"] == 1e4
    fields = GGUFReader(str(tmp_path / "tiny-gemma4-f16.gguf")).fields
    assert fields[a + "attention.head_count_kv"].contents() == [2, 1] * 3
    assert fields[a + "feed_forward_length"].contents() == [96] * 4 + [192] * 2
    assert fields[a + "attention.sliding_window_pattern"].contents() == [True, False] * 3
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

    used = Gemma4TextRotaryEmbedding(config).full_attention_inv_freq.double()
    plain = 1.0 / (1e6 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32))
    freqs = tensors["rope_freqs.weight"]
    assert np.allclose(freqs[used > 0], (plain / used)[used > 0].numpy()) and (freqs[used == 0] == 1e30).all()
    assert int((used > 0).sum()) == 4  # a quarter of the global heads' 16 frequencies rotated
    names = {"per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
             "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
             "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight",
             "blk.5.inp_gate.weight": "model.layers.5.per_layer_input_gate.weight",
             "blk.5.proj.weight": "model.layers.5.per_layer_projection.weight",
             "blk.5.post_norm.weight": "model.layers.5.post_per_layer_input_norm.weight",
             "blk.5.layer_output_scale.weight": "model.layers.5.layer_scalar",
             "blk.1.post_attention_norm.weight": "model.layers.1.post_attention_layernorm.weight",
             "blk.1.ffn_norm.weight": "model.layers.1.pre_feedforward_layernorm.weight",
             "blk.1.post_ffw_norm.weight": "model.layers.1.post_feedforward_layernorm.weight",
             "blk.1.attn_q_norm.weight": "model.layers.1.self_attn.q_norm.weight",
             "blk.1.attn_k.weight": "model.layers.1.self_attn.k_proj.weight",
             "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
             "blk.4.ffn_gate.weight": "model.layers.4.mlp.gate_proj.weight"}  # fmt: skip
    _assert_written(tensors, state, names)
    # the global layers' values are their keys, the last two blocks' keys and values block 2's and 3's
    assert "blk.1.attn_v.weight" not in tensors and "blk.4.attn_k.weight" not in tensors
    assert "blk.4.attn_k_norm.weight" not in tensors and "output.weight" not in tensors  # tied head


def test_gemma4_moe_experts_and_router(tmp_path: Path, tokenizer) -> None:
    """Gemma 4's MoE block (26B-A4B) as llama.cpp's gemma4 holds it: the fused gate/up experts as
    ffn_gate_exps and ffn_up_exps, the router as ffn_gate_inp (float32), its input scale as
    `ffn_gate_inp.scale`, its per-expert scale as `ffn_down_exps.scale`, the block's three norms more under
    their names; the experts' count, use and width as keys."""
    import numpy as np

    config = _gemma4_config(hidden_size_per_layer_input=0, num_kv_shared_layers=0, use_double_wide_mlp=False,
                            num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
                            enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)  # fmt: skip
    state, meta, tensors = _tiny_gguf(config, tokenizer, tmp_path / "tiny-gemma4-moe", norms=True)
    assert [meta["gemma4." + k] for k in ("expert_count", "expert_used_count", "expert_feed_forward_length")] == [
        4, 2, 32]  # fmt: skip
    gate_up = state["model.layers.1.experts.gate_up_proj"]
    for name, want in (("ffn_gate_exps", gate_up[:, :32]), ("ffn_up_exps", gate_up[:, 32:]),
                       ("ffn_down_exps", state["model.layers.1.experts.down_proj"])):  # fmt: skip
        assert np.array_equal(tensors[f"blk.1.{name}.weight"].reshape(want.shape), want.half().numpy()), name
    _assert_written(tensors, state, {"blk.1.ffn_gate_inp.scale": "model.layers.1.router.scale",
                                     "blk.1.ffn_down_exps.scale": "model.layers.1.router.per_expert_scale",
                                     "blk.1.pre_ffw_norm_2.weight": "model.layers.1.pre_feedforward_layernorm_2.weight",
                                     "blk.1.post_ffw_norm_1.weight": "model.layers.1.post_feedforward_layernorm_1.weight",
                                     "blk.1.post_ffw_norm_2.weight": "model.layers.1.post_feedforward_layernorm_2.weight"})  # fmt: skip
    router = state["model.layers.1.router.proj.weight"].numpy()
    assert np.array_equal(tensors["blk.1.ffn_gate_inp.weight"].reshape(router.shape), router)  # float32


def test_gemma4_tokenizer_as_llama_cpp_gemma4_bpe(tmp_path: Path) -> None:
    """A Gemma 4 model's SentencePiece-style BPE tokenizer goes in as llama.cpp's own `gemma4` tokenizer
    model (a BPE that merges by the merge list), no space prefix, its chat markers as user-defined tokens
    (rendered as text, so that llama.cpp's chat parser reads them), other special tokens as control ones;
    a Gemma 3's as llama.cpp's `llama` model, as before."""
    import json

    import gguf
    import transformers as tf
    from gguf import GGUFReader

    tok = gemma_style_tokenizer(gemma4=True)
    tok.add_special_tokens({"additional_special_tokens": ["<|channel>", "<turn|>"]})
    config = _gemma4_config(vocab_size=len(tok), vocab_size_per_layer_input=len(tok))
    _, meta, _ = _tiny_gguf(config, tok, tmp_path / "g4")
    assert meta["tokenizer.ggml.model"] == "gemma4" and meta["tokenizer.ggml.add_space_prefix"] is False
    assert meta["tokenizer.ggml.add_bos_token"] is True
    fields = GGUFReader(str(tmp_path / "g4-f16.gguf")).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    kind = {t: types[tokens.index(t)] for t in ("<|channel>", "<turn|>", "<bos>", "<0x41>")}
    assert kind == {"<|channel>": gguf.TokenType.USER_DEFINED, "<turn|>": gguf.TokenType.CONTROL,
                    "<bos>": gguf.TokenType.CONTROL, "<0x41>": gguf.TokenType.BYTE}  # fmt: skip
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]  # llama.cpp's gemma4 merges by them
    assert fields["tokenizer.ggml.merges"].contents() == [m if isinstance(m, str) else " ".join(m) for m in merges]
    gemma3 = tf.Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32)  # fmt: skip
    _, meta, _ = _tiny_gguf(gemma3, tok, tmp_path / "g3")
    assert meta["tokenizer.ggml.model"] == "llama"
    fields = GGUFReader(str(tmp_path / "g3-f16.gguf")).fields
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[fields["tokenizer.ggml.tokens"].contents().index("<|channel>")] == gguf.TokenType.CONTROL


def test_gemma4_refusals(tmp_path: Path, tokenizer, capsys) -> None:
    """What llama.cpp's gemma4 graph computes otherwise is refused by name, with nothing written."""
    cases = {
        "activation": ({"hidden_activation": "silu"}, "tanh-approximated GELU"),
        "bidirectional": ({"use_bidirectional_attention": "all"}, "attends both ways"),
        "per-layer-vocab": ({"vocab_size_per_layer_input": 256}, "has 256 of them"),
        "sliding-rope": ({"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                                    "rope_theta": 1e4},
                                              "full_attention": {"rope_type": "proportional",
                                                                 "partial_rotary_factor": 0.25,
                                                                 "rope_theta": 1e6}}},
                         "plain RoPE over the whole head"),
    }  # fmt: skip
    import transformers as tf

    models = {name: (tf.AutoModelForCausalLM.from_config(_gemma4_config(**extra)), message)
              for name, (extra, message) in cases.items()}  # fmt: skip
    _assert_export_refused(tmp_path, tokenizer, capsys, models)


def test_gemma4_image_text_checkpoint_exports_its_text_model(tmp_path: Path, tokenizer) -> None:
    """Gemma 4 ships as an image-text checkpoint (Gemma4ForConditionalGeneration, model type gemma4): its
    text model goes in as llama.cpp's `gemma4`, the vision tower and its projector left out; streamed, the
    same file."""
    import transformers as tf

    vision = tf.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, head_dim=16)  # fmt: skip
    torch.manual_seed(0)
    model = tf.Gemma4ForConditionalGeneration(tf.Gemma4Config(text_config=_gemma4_config().to_dict(),
                                                              vision_config=vision.to_dict(), audio_config=None))  # fmt: skip
    _assert_text_model_exported(model, tokenizer, tmp_path, "gemma4", computed=1)  # rope_freqs


def _gemma3n_config(**changes: Any) -> Any:
    """A tiny Gemma 3n (text) with what llama.cpp's gemma3n fixes: 4 AltUp streams, LAuReL rank 64,
    per-layer embeddings of 256, 22 blocks reusing keys and values from block 20 on, activation sparsity in
    the first 10; 8 tokens past the per-layer vocabulary (Gemma 3n's image and audio tokens)."""
    import transformers as tf

    sizes = {"vocab_size": 520, "vocab_size_per_layer_input": 512, "hidden_size": 64, "intermediate_size": 96,
             "num_hidden_layers": 22, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
             "hidden_size_per_layer_input": 256, "laurel_rank": 64, "num_kv_shared_layers": 2,
             "sliding_window": 16, "max_position_embeddings": 256}  # fmt: skip
    return tf.Gemma3nTextConfig(**{**sizes, **changes})


def test_gemma3n_as_llama_cpp_gemma3n(tmp_path: Path, tokenizer) -> None:
    """Gemma 3n's text model as llama.cpp's `gemma3n`: the AltUp projections stacked into llama.cpp's one tensor
    each (in their index order), its coefficients in float32, LAuReL and the per-layer embeddings under
    llama.cpp's names, the per-layer embeddings over the whole vocabulary (the tokens past
    `vocab_size_per_layer_input` get token 0's row, as transformers reads them), norms as they are (Gemma
    3n's RMSNorms scale by w), zero key and value tensors in the blocks that reuse earlier ones; the AltUp
    streams, the per-layer width, the reusing blocks and each block's sparsity (the normal quantile of its
    level) as keys.  Logits in llama.cpp itself: bench/export_archs.py, row gemma3n."""
    import numpy as np
    from gguf import GGUFReader

    state, meta, tensors = _tiny_gguf(_gemma3n_config(), tokenizer, tmp_path / "tiny-gemma3n", norms=True)
    a = "gemma3n."
    assert meta["general.architecture"] == "gemma3n"
    assert [meta[a + k] for k in ("altup.active_idx", "altup.num_inputs", "embedding_length_per_layer_input",
                                  "attention.shared_kv_layers", "final_logit_softcapping")] == [0, 4, 256, 2, 30.0]  # fmt: skip
    fields = GGUFReader(str(tmp_path / "tiny-gemma3n-f16.gguf")).fields
    scales = fields[a + "activation_sparsity_scale"].contents()
    assert np.allclose(scales[:10], 1.6448536) and all(x == float("-inf") for x in scales[10:])
    for target, hf in (("altup_proj.weight", "model.altup_projections"),
                       ("altup_unembd_proj.weight", "model.altup_unembed_projections")):  # fmt: skip
        want = torch.stack([state[f"{hf}.{i}.weight"] for i in range(3)]).half().numpy()
        assert np.array_equal(tensors[target].reshape(want.shape), want), target
    per_layer = state["model.embed_tokens_per_layer.weight"]
    want = torch.cat([per_layer, per_layer[:1].expand(8, -1)]).half().numpy()
    assert np.array_equal(tensors["per_layer_token_embd.weight"].reshape(want.shape), want)
    for name, hf in (("blk.3.altup_predict_coef.weight", "model.layers.3.altup.prediction_coefs.weight"),
                     ("blk.3.altup_correct_coef.weight", "model.layers.3.altup.correction_coefs.weight")):  # fmt: skip
        w = state[hf].numpy()  # float32, as llama.cpp's converter keeps them
        assert np.array_equal(tensors[name].reshape(w.shape), w), name
    _assert_written(tensors, state, {"blk.3.altup_correct_scale.weight": "model.layers.3.altup.correct_output_scale",
                                     "blk.3.altup_router.weight": "model.layers.3.altup.modality_router.weight",
                                     "blk.3.altup_router_norm.weight": "model.layers.3.altup.router_norm.weight",
                                     "blk.3.laurel_l.weight": "model.layers.3.laurel.linear_left.weight",
                                     "blk.3.laurel_r.weight": "model.layers.3.laurel.linear_right.weight",
                                     "blk.3.laurel_post_norm.weight": "model.layers.3.laurel.post_laurel_norm.weight",
                                     "blk.3.inp_gate.weight": "model.layers.3.per_layer_input_gate.weight",
                                     "blk.3.post_attention_norm.weight":
                                         "model.layers.3.post_attention_layernorm.weight"})  # fmt: skip
    # blocks 20 and 21 reuse block 18's and 19's keys and values and have no projections for them in transformers;
    # llama.cpp loads them anyway (and reads none): zeros, the key norm ones
    assert not tensors["blk.20.attn_k.weight"].any() and not tensors["blk.21.attn_v.weight"].any()
    assert tensors["blk.20.attn_k.weight"].size == 32 * 64 and (tensors["blk.20.attn_k_norm.weight"] == 1).all()
    assert tensors["blk.19.attn_k.weight"].any()


def test_gemma3n_refusals(tmp_path: Path, tokenizer, capsys) -> None:
    """What llama.cpp's gemma3n fixes rather than reads is refused by name, with nothing written."""
    import transformers as tf

    cases = {
        "laurel_rank": ({"laurel_rank": 32}, "fixes laurel_rank at 64"),
        "per-layer width": ({"hidden_size_per_layer_input": 128}, "fixes hidden_size_per_layer_input at 256"),
        "kv sharing": ({"num_kv_shared_layers": 4}, "reuses keys and values from block 20 on"),
        "sparsity": ({"activation_sparsity_pattern": [0.95] * 5 + [0.0] * 17}, "first 10 blocks only"),
        "activation": ({"hidden_activation": "silu"}, "tanh-approximated GELU"),
    }
    models = {name: (tf.AutoModelForCausalLM.from_config(_gemma3n_config(**extra)), message)
              for name, (extra, message) in cases.items()}  # fmt: skip
    _assert_export_refused(tmp_path, tokenizer, capsys, models)


@pytest.mark.parametrize("kind", ["f16", "q8_0"])
def test_large_tensors_converted_in_slices_give_the_same_file(
    kind: str, tmp_path: Path, model_dir: Path, monkeypatch
) -> None:
    """A tensor larger than `_SLICE` values is converted and written a slice of rows at a time (neither its
    float32 copy nor its converted data ever whole): the same file byte for byte as converted whole."""
    import carve.export as ex

    whole = tmp_path / "whole.gguf"
    ex.export(model_dir, whole, kind, stream=False)
    monkeypatch.setattr(ex, "_SLICE", 1000)  # every matrix here in many slices, some of one row
    sliced = tmp_path / "sliced.gguf"
    ex.export(model_dir, sliced, kind, stream=False)
    assert sliced.read_bytes() == whole.read_bytes()
