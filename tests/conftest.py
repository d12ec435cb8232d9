"""Tiny random models of several architectures, built in-process, and a tokenizer trained on the
fly: nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 384
ARCHS = ["llama", "qwen2", "mistral", "gemma3", "gpt2", "opt"]
MORE_ARCHS = ["qwen3", "gemma2", "granite", "cohere", "smollm3"]  # further Llama-style families


def tiny_config(arch: str):
    import transformers as tf

    common = {"vocab_size": VOCAB, "max_position_embeddings": 256}
    # the Llama family's sizes: 2 blocks, 4 query heads in 2 key/value groups
    sizes = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    if arch in ("llama", "qwen2", "mistral"):
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
        return cls(tie_word_embeddings=(arch == "qwen2"), **sizes, **common)
    if arch == "gemma3":
        # one sliding-window layer and one global layer: their masks differ, so the engine must
        # give each block its own recorded call
        return tf.Gemma3TextConfig(
            **sizes,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            **common,
        )
    # more Llama-style families (not in ARCHS: the structured tests and a few others take them)
    more = {"qwen3": tf.Qwen3Config, "gemma2": tf.Gemma2Config, "granite": tf.GraniteConfig, "cohere": tf.CohereConfig,
            "smollm3": tf.SmolLM3Config, "olmo2": tf.Olmo2Config, "stablelm": tf.StableLmConfig,
            # their projections under other names: Phi's dense and fc1/fc2, StarCoder2's c_fc/c_proj
            "phi": tf.PhiConfig, "starcoder2": tf.Starcoder2Config}  # fmt: skip
    if arch in more:
        extra = {"head_dim": 16, "sliding_window": 8} if arch in ("qwen3", "gemma2") else {}
        return more[arch](**sizes, **extra, **common, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**sizes, **common, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    if arch == "gpt_neox":  # its checkpoint names the head `embed_out` (transformers renames it on load)
        return tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                **common)  # fmt: skip
    if arch == "mixtral":  # its checkpoint's per-expert matrices are fused into one tensor on load
        return tf.MixtralConfig(**sizes, num_local_experts=4, num_experts_per_tok=2, **common)
    moe = {  # more MoE families: Qwen's per-expert checkpoints (fused on load); gpt-oss's stored fused, [E, in, out]
        "qwen3_moe": (tf.Qwen3MoeConfig, {"num_experts": 4, "moe_intermediate_size": 32, "head_dim": 16}),
        "qwen2_moe": (tf.Qwen2MoeConfig, {"num_experts": 4, "moe_intermediate_size": 32,
                                          "shared_expert_intermediate_size": 32}),
        "gpt_oss": (tf.GptOssConfig, {"num_local_experts": 4, "head_dim": 16, "sliding_window": 8}),
        # Llama 4: [E, in, out] experts called on tokens already routed, outside the experts interface
        "llama4_text": (tf.Llama4TextConfig, {"num_local_experts": 4, "head_dim": 16,
                                              "intermediate_size_mlp": 64, "interleave_moe_layer_step": 1}),
    }  # fmt: skip
    if arch in moe:
        cls, extra = moe[arch]
        return cls(**sizes, **extra, num_experts_per_tok=2, **common, pad_token_id=None, bos_token_id=None,
                   eos_token_id=None)  # fmt: skip
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256)
    if arch == "opt":
        return tf.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            **common,
        )
    raise ValueError(arch)


# multi-head latent attention (DeepSeek-V2/V3 and kin): keys and values per query head, small latent
# ranks, 4 experts in one group, MoE blocks from block 1 on
_MLA = {"num_key_value_heads": 4, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16, "kv_lora_rank": 32,
        "q_lora_rank": 48, "head_dim": 8, "n_routed_experts": 4, "moe_intermediate_size": 32, "n_group": 1,
        "topk_group": 1, "first_k_dense_replace": 1}  # fmt: skip
# linear-attention hybrids: the last of 3 blocks full attention (a cache needs one), small linear heads and experts
_HYBRID = {"layer_types": ["linear_attention", "linear_attention", "full_attention"], "linear_key_head_dim": 16,
           "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_head_dim": 16,
           "linear_num_heads": 4, "num_experts": 4, "moe_intermediate_size": 32,
           "shared_expert_intermediate_size": 32}  # fmt: skip
# what the generic sizes do not make a model that builds and runs a forward (found by bench/structured_archs.py)
TINY_FIXES: dict[str, dict] = {
    **dict.fromkeys(["deepseek_v2", "deepseek_v3", "deepseek_v32", "minicpm3", "youtu", "axk1", "axk2", "glm_moe_dsa",
                     "glm4_moe_lite"],
                    _MLA),
    **dict.fromkeys(["granitemoehybrid", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_next"], _HYBRID),
    **dict.fromkeys(["bailing_hybrid", "kimi_linear"], _HYBRID | _MLA),
    "jamba": {"attn_layer_period": 3, "attn_layer_offset": 2},
    "bamba": {"attn_layer_indices": [2]},
    "mamba2": {"num_heads": 8, "n_groups": 1},
    "dots3_note_text": _MLA | {"shared_experts_intermediate_size": 32},
    "gemma3n_text": {"layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
                     "num_kv_shared_layers": 0, "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8},
    "lfm2_moe": {"layer_types": ["conv", "conv", "full_attention"], "num_experts": 4, "moe_intermediate_size": 32},
    "gpt_neo": {"attention_types": [[["global", "local", "global"], 1]]},
    "dots1": {"n_shared_experts": 1, "moe_intermediate_size": 32, "first_k_dense_replace": 1},
    "zamba2": {"layers_block_type": ["linear_attention", "hybrid", "linear_attention"]},
    "reformer": {"is_decoder": True, "axial_pos_embds_dim": [32, 32], "axial_pos_shape": [16, 16],
                 "attn_layers": ["local", "local", "local"], "attention_head_size": 16},
    "longcat_flash": _MLA | {"expert_ffn_hidden_size": 32, "zero_expert_num": 2, "num_layers": 3, "moe_topk": 2},
    "gemma4_text": {"vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8},
    "cpmant": {"dim_ff": 96, "dim_head": 16},
    # CohereCompass reads RoPE parameters per layer type and has no default for them
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # DBRX's attention config lacks the rope_theta its attention reads, and clamps by clip_qkv
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 96, "moe_num_experts": 4, "moe_top_k": 1, "hidden_size": 64}},
    "zamba": {"layers_block_type": ["hybrid", "linear_attention", "hybrid"]},  # its shared block tied: two hybrids
    "xlstm": {"qk_dim_factor": 1.0},  # transformers' cache of an xLSTM with other q/k than v widths fails
    "qwen4_exp_text": _HYBRID | {"layer_types": ["linear_attention", "linear_attention", "indexed_attention"],
                                 "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                                 "indexer_budget": 8, "indexer_compress_ratio": 4, "ngram_vocab_size_base": 1000,
                                 "split_ngram_parts": 1, "ple_layer_ids": [1], "ple_embed_dim": 32},
}  # fmt: skip


# composite models (a text model beside vision / audio towers) whose towers at their default sizes
# exceed the sweep's memory: each sub-config tiny too (the text one as its own type's, the others
# with `_TOWER` sizes)
COMPOSITES = {
    "emu3",
    "fuyu",
    "gemma3",
    "gemma4",
    "gemma4_unified",
    "llama4",
    "mllama",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen4_exp",
}
_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 2, "head_dim": 16, "depth": 2, "num_heads": 2, "vision_output_dim": 32,
          "out_hidden_size": 64, "projector_input_dim": 32, "projector_output_dim": 64, "num_global_layers": 1}  # fmt: skip


def any_tiny_config(model_type: str, layers: int = 3):
    """A tiny config of any transformers model type: the Llama family's generic sizes (hidden 64,
    MLP 96, 4 query heads in 2 key/value groups of 16, 4 experts with top-1 routing; an encoder-decoder's
    decoder the same; rotary dimension 8 where it is a size of its own) and the type's `TINY_FIXES`
    (3 blocks), each passed only where the config's constructor takes it, under its own name or the
    one the config's `attribute_map` gives; what else the config needs is its default.  One of
    `COMPOSITES` gets its sub-configs the same way."""
    import inspect

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    sizes = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": layers, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": VOCAB, "max_position_embeddings": 256,
             "num_local_experts": 4, "num_experts_per_tok": 1, "pad_token_id": 0, "bos_token_id": 1,
             "eos_token_id": 2, "ffn_dim": 96, "decoder_layers": layers, "decoder_attention_heads": 4, "decoder_ffn_dim": 96,
             "encoder_ffn_dim": 96, "rotary_dim": 8}  # fmt: skip
    fixes = TINY_FIXES.get(model_type, {}) if layers == 3 else {}
    cls = CONFIG_MAPPING[model_type]
    takes = inspect.signature(cls.__init__).parameters
    if model_type in COMPOSITES:
        default = cls()
        for name in cls.sub_configs:
            sub = getattr(default, name, None)
            if name == "text_config":
                fixes = {**fixes, name: any_tiny_config(sub.model_type, layers).to_dict()}
            elif sub is not None:
                tower = inspect.signature(CONFIG_MAPPING[sub.model_type].__init__).parameters
                fixes = {
                    **fixes,
                    name: {"model_type": sub.model_type, **{k: v for k, v in _TOWER.items() if k in tower}},
                }
    given = {**sizes, **fixes}
    # a config that names a size otherwise (GPT-2's `n_embd`, BART's `d_model`, DeepSeek's
    # `n_routed_experts`) takes it under the name its `attribute_map` gives, unless that name is given
    aliases = getattr(cls, "attribute_map", {})
    for generic, size in sizes.items():
        own = aliases.get(generic)
        if generic not in takes and own in takes and own not in given:
            given[own] = size
    return cls(**{k: v for k, v in given.items() if k in takes})


def dsa_shared_model() -> torch.nn.Module:
    """A tiny GLM-MoE-DSA whose "shared" indexer layers reuse the top-k tokens of the last layer
    that computed them, passed from block to block beside the hidden states: 4 blocks, full /
    shared / full / shared, each query attending to 4 of its tokens (so the indices matter)."""
    import transformers as tf

    given = any_tiny_config("glm_moe_dsa").to_dict()
    for key in ("model_type", "transformers_version", "architectures", "indexer_types", "mlp_layer_types"):
        given.pop(key, None)
    config = tf.GlmMoeDsaConfig(**{**given, "num_hidden_layers": 4, "layer_types": ["indexed_attention"] * 4})
    config.mlp_layer_types = ["dense", "sparse", "sparse", "sparse"]
    config.indexer_types, config.index_topk = ["full", "shared", "full", "shared"], 4
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    return model.eval()


def byte_level_tokenizer(split: str | tuple[str, ...] | None, digits: bool = False, size: int = 400):
    """A byte-level BPE tokenizer trained on builtin legal text, splitting first by the regex `split`
    (as Llama 3's and Qwen2's do; several in turn, as DeepSeek V3's), or by single digits (SmolLM's),
    else by GPT-2's rule."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import carve

    tok = Tokenizer(models.BPE())
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    splits = (split,) if isinstance(split, str) else split or ()
    first = [pre_tokenizers.Split(Regex(one), behavior="isolated") for one in splits]
    first += [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    tok.pre_tokenizer = pre_tokenizers.Sequence([*first, level]) if first else level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(carve.Corpus("legal").documents[:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def gemma_style_tokenizer(size: int = 512, gemma4: bool = False):
    """A Gemma-style SentencePiece BPE tokenizer (byte fallback, spaces as "▁", no prefix space)
    trained on builtin legal text: transformers' own GemmaTokenizer pipeline over the trained
    vocabulary and merges, special tokens first and the 256 byte tokens after them, as in Gemma.
    `gemma4`: as Gemma 4's, no token joins newlines to other characters (trained with runs of newlines
    split apart) and a BOS goes before the text."""
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    import carve

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    if gemma4:
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("\n+"), behavior="isolated")
    trainer = trainers.BpeTrainer(
        vocab_size=size, special_tokens=specials + [f"<0x{i:02X}>" for i in range(256)], show_progress=False
    )
    tok.train_from_iterator([d[:2000] for d in carve.Corpus("legal").documents[:20]], trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return GemmaTokenizer(vocab=model["vocab"], merges=merges, **({"add_bos_token": True} if gemma4 else {}))


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import carve

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<eos>"], show_progress=False)
    tok.train_from_iterator(carve.Corpus("legal").documents[:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>", pad_token="<eos>")


@pytest.fixture
def model_dir(tmp_path: Path, tokenizer) -> Path:
    """A tiny Llama saved as a Hugging Face directory (what a user's local model looks like)."""
    out = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """A .jsonl corpus of real legal text, large enough for a few 64-token blocks."""
    import json

    import carve

    path = tmp_path / "corpus.jsonl"
    docs = carve.Corpus("legal").documents[:40]
    path.write_text("".join(json.dumps({"text": d[:3000]}) + "\n" for d in docs))
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch) -> None:
    """Cached evaluations go to a directory of each test, never the user's cache."""
    monkeypatch.setenv("CARVE_CACHE_DIR", str(tmp_path_factory.mktemp("carve-cache")))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """How many examples each fuzzed reader ran (tests/test_fuzz_readers.py)."""
    import sys

    fuzz = sys.modules.get("tests.test_fuzz_readers")
    counts = getattr(fuzz, "FUZZ_COUNTS", None)
    if counts:
        terminalreporter.write_sep("-", "fuzzed readers: examples run")
        for name, n in sorted(counts.items()):
            terminalreporter.write_line(f"{name}: {n}")
