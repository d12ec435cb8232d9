"""`carve export DIR --gguf OUT.gguf --type f32|f16|bf16|q8_0|q4_0|mxfp4`: any carve output (dense, sparse,
structured, a fine-tuning update over its base) as a GGUF file llama.cpp runs.

The model is loaded as carve loads any source (`load_model`), then written with the `gguf` package's
writer under llama.cpp's tensor names and metadata keys for its architecture (what llama.cpp's own
convert_hf_to_gguf.py writes): Llama-style models (`llama`, and Mistral, SmolLM, TinyLlama, Llama
3.x ... which share it) as `llama`, whose Q and K projections are permuted from Hugging Face's
rotate-half layout to GGML's interleaved one, and whose Llama 3 RoPE scaling goes in as llama.cpp's
`rope_freqs.weight` (per-frequency factors); SmolLM3 and Granite as llama.cpp's `smollm3` and
`granite`, Llama's tensors with their own keys; OLMo 2 and 3 as llama.cpp's `olmo2` (a norm after
attention and after the MLP instead of before, Q and K norms over the whole projection, OLMo 3's
sliding-window pattern); StableLM as `stablelm` (LayerNorms with biases, RoPE over a quarter of each
head); StarCoder2 as `starcoder2` (the same LayerNorms, biases on every Linear, a two-Linear GELU
MLP; its sliding window said, as llama.cpp's graph has none); Phi-1, 1.5 and 2 as `phi2` (one
LayerNorm feeding attention and MLP side by side, biases everywhere, the head's too, RoPE over part
of each head); Cohere (Command R, R+, Aya) as `command-r` (one LayerNorm feeding attention and MLP
side by side, interleaved RoPE, the logit scale; Command R+'s per-head Q/K LayerNorms) and Cohere 2
(Command R7B) as `cohere2` (the same, with the per-layer sliding pattern that decides where RoPE
applies); Qwen2 as `qwen2` (rotate-half rope in
llama.cpp too, so no permutation; its Q/K/V biases kept); Qwen3 as `qwen3` (the same rope, no
biases, its per-head Q and K norms as `attn_q_norm` / `attn_k_norm`); Gemma (1, CodeGemma) as
`gemma` (Llama's tensor names, unpermuted, every norm weight written as 1 + w as below; llama.cpp
scales the embeddings by sqrt(hidden) as transformers does); Gemma 2 as `gemma2` (its norms
and tokenizer as Gemma 3's below, both soft-cappings, llama.cpp's fixed alternation of sliding and
global layers); Gemma 3 (text) as `gemma3` (four norms per block under llama.cpp's Gemma names,
every norm weight written as 1 + w since Gemma's RMSNorm scales by 1 + w and llama.cpp's by w, the
sliding-window layers as a per-layer pattern so that a structured output's kept blocks keep their
own kinds, the local RoPE base beside the global one). Where llama.cpp's graph sizes the query rows
by the hidden size (qwen2, qwen2moe, command-r, cohere2, olmo2, stablelm, exaone4, phi3), an output with
fewer heads is refused, except a Qwen2's: it goes in as `llama` (whose graph sizes the query rows by
the heads and takes Q/K/V biases), its Q and K rows and biases permuted. One-dimensional tensors
(norms) stay float32, as in llama.cpp's conversions; a matrix whose rows are not a whole number of
quantization blocks is stored as f16. The tokenizer goes in as GGUF metadata: a byte-level BPE
tokenizer (tokens, types, merges, special ids, chat template) as llama.cpp's `gpt2` model, its
pre-tokenizer name copied from the source GGUF when the model came from one (the embedded default),
else the architecture's (`default`, `qwen2` for both Qwen generations); a SentencePiece-style BPE
tokenizer (byte fallback: Gemma, Llama 2) as llama.cpp's `llama` model, whose merge order goes in as
scores. Ministral 3 goes in as `mistral3` (YaRN, Llama 4's attention temperature). EXAONE 4 goes in
as `exaone4` (OLMo 2's post-norms, per-head Q/K norms, Llama 3 RoPE as
`rope_freqs`). ERNIE 4.5 goes in as `ernie4_5` (interleaved RoPE in both libraries: no permutation). gpt-oss
goes in as `gpt-oss`: its interleaved gate/up experts taken apart, attention sinks,
biases everywhere, YaRN and the sliding pattern as keys. GLM-4 (0414) goes in as `glm4`
(GPT-J-style partial RoPE in both libraries: no permutation; the fused gate/up as `ffn_up`; a norm
after attention and after the MLP too). OLMoE goes in as `olmoe` (OLMo 2's whole-projection Q/K
norms, softmax routing not renormalized) and Granite 3 MoE as `granitemoe` (Granite's multipliers,
its experts under `block_sparse_moe`). Nemotron-4 and Minitron go in as `nemotron` (LayerNorms with
biases whose weights are written as 1 + w, a squared-ReLU MLP, partial rotate-half RoPE). OLMo (1)
goes in as `olmo` (no norm tensors: its LayerNorms have no weights; QKV clipping as `clamp_kqv`).
Seed-OSS goes in as `seed_oss` (Llama's tensors with Q/K/V biases, unpermuted). Arcee (AFM-4.5B)
goes in as `arcee` (Llama's tensors, a squared-ReLU MLP, YaRN as keys). HunYuan dense goes in as
`hunyuan-dense` (per-head Q/K norms after RoPE; its NTK-alpha RoPE as the stretched base). DeepSeek
V2 and V3 (Kimi K2, Moonlight) go in as `deepseek2`: the latent attention with its up-projection
split into llama.cpp's absorbed `attn_k_b` / `attn_v_b`, leading dense blocks, shared experts, V3's
sigmoid routing with its correction bias and expert groups; GLM-4.7-Flash the same. GLM-4.5 goes in
as `glm4moe` (Q/K/V biases, per-head Q/K norms, DeepSeek V3's routing), dots.llm1 as `dots1` (Qwen3's
attention, DeepSeek V3's routing), ERNIE 4.5 MoE as `ernie4_5-moe` (softmax routing with a correction
bias, experts every n-th block after the first ones), Hunyuan-A13B as `hunyuan-moe` (HunYuan's
attention, a shared MLP beside the experts), MiniMax-M2 as `minimax-m2` (whole-projection Q/K norms,
sigmoid routing with a correction bias), Llama 4 (text) as `llama4` (experts stored by columns, a
shared expert, llama.cpp's fixed chunking, NoPE blocks and temperature checked); LFM2 as `lfm2` (short
convolution blocks beside attention ones) and LFM2-MoE as `lfm2moe`; Granite 4.0 H as `granitehybrid`
(Mamba-2 blocks beside attention ones; Bamba the same, its Q and K permuted over the rotated half of each
head), Falcon-H1 as `falcon-h1` (Mamba-2 beside attention in every block, its µP multipliers folded into
the weights), Jamba as `jamba` (Mamba (1) blocks beside attention ones), Nemotron-H as `nemotron_h`
(Mamba-2, attention and MLP blocks);
Apertus as `apertus` (its xIELU parameters, read from the weights, as keys); Gemma 3n as `gemma3n` (AltUp,
LAuReL, per-layer embeddings, as llama.cpp fixes their sizes); Gemma 4 as `gemma4` (sliding and
global layers of their own head widths and key/value heads, the global ones' proportional RoPE as
`rope_freqs`, keys and values shared by the last blocks, per-layer embeddings, the MoE block beside the MLP,
its tokenizer as llama.cpp's own `gemma4` BPE). An image-text checkpoint whose text model is one of these
(Gemma 3 4B-27B; Gemma 4; Mistral 3: Mistral Small 3.x, Magistral, Ministral 3) goes in as its text model.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from carve.errors import UsageError
from carve.models import pretokenize
from carve.progress import progress

TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "mxfp4": "MXFP4"}
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "mxfp4": "MOSTLY_MXFP4_MOE"}  # fmt: skip
# `mxfp4` (llama.cpp's MXFP4_MOE, the format gpt-oss ships in): an MoE's 3-D expert tensors in MXFP4,
# every other matrix in this type
_MXFP4_OTHERS = "Q8_0"


@dataclass(frozen=True)
class Architecture:
    """What llama.cpp calls a Hugging Face model type and how its tensors go in."""

    gguf: str  # llama.cpp's architecture name (the metadata keys' prefix)
    permute_qk: bool  # rotate-half Q/K rows to GGML's interleaved rope layout (llama.cpp's LLAMA rope type)
    biases: tuple[str, ...]  # projections whose biases llama.cpp's architecture holds
    pre: str  # tokenizer pre-tokenizer name when the source GGUF does not give one
    norm_offset: float = 0.0  # added to every norm weight (Gemma's RMSNorm scales by 1 + w, llama.cpp's by w)
    names: tuple[tuple[str, str], ...] = ()  # tensor names of this architecture, tried before the common ones
    check: Callable[[Any], None] | None = None  # its own refusals (in place of the plain / Llama 3 RoPE check)
    metadata: Callable[[Any, Any], object] | None = None  # its own keys, written from the config
    fused: bool = False  # one qkv_proj and one gate_up_proj per block (Phi-3), as llama.cpp holds them
    caveats: Callable[[Any], list[str]] | None = None  # where llama.cpp computes otherwise, said, not refused
    # llama.cpp sizes the query rows and the output projection by the hidden size (its qwen2, qwen2moe,
    # command-r, cohere2, olmo2, olmoe, stablelm, exaone4 and phi3 graphs), not by heads x head_dim: fewer
    # heads cannot load
    query_is_hidden: bool = False
    # where query_is_hidden refuses: the llama.cpp architecture that computes the same with any number
    # of heads (a structured Qwen2 with heads removed, as llama.cpp's `llama`)
    narrow: Architecture | None = None
    # how the fused experts are stored: "rows" [E, 2·ff, hidden], gate rows then up rows (transformers'
    # usual, `_HALVES`); "columns" [E, hidden, 2·ff], gate columns then up columns, and down [E, ff, hidden]
    # (Llama 4); "interleaved" the same with gate and up columns alternating and a bias per matrix
    # (gpt-oss); the last two written transposed as llama.cpp's [E, out, in] tensors
    experts: str = "rows"
    # the RoPE base llama.cpp is to use, where the model derives it from the config's (HunYuan's NTK
    # alpha stretches it); None: the config's rope_theta
    theta: Callable[[Any], float] | None = None
    # the state-dict name of a block's recurrent mixer in place of attention (LFM2's short convolution
    # "conv"): such a block has no key/value heads (llama.cpp's head_count_kv 0 marks it)
    recurrent: str | None = None
    # the architecture's own per-block shapes where its blocks are not one attention and one MLP each
    # (DeepSeek's latent attention, `_mla_layout`; Nemotron-H's blocks of one kind each): (config, state,
    # arch) -> the head width, key/value heads and MLP width per block, as `_check_layout` returns them
    layout: Callable[[Any, dict[str, torch.Tensor], Any], dict[str, Any]] | None = None
    # keys read from the weights, not the config: (writer, config, value of a state-dict tensor by name)
    # (Apertus's xIELU parameters, per block)
    weight_metadata: Callable[[Any, Any, Callable[[str], torch.Tensor]], None] | None = None
    # the architecture's own tensor rule, tried first: (name, tensor, config) -> the llama.cpp tensors it
    # becomes, or None where the common rules apply (DeepSeek's latent split, Mamba-2's transforms)
    tensors: Callable[[str, torch.Tensor, Any], list[tuple[str, torch.Tensor]] | None] | None = None
    # llama.cpp's tokenizer model for a SentencePiece-style BPE tokenizer (byte fallback): its `llama` one
    # (merging by score), or the architecture's own BPE one that merges by the merge list (Gemma 4's `gemma4`)
    spm_tokenizer: str = "llama"
    # tokens written as user-defined (rendered as text) whatever their class in transformers, as llama.cpp's
    # converter writes them for this architecture (Gemma 4's chat markers, which its chat parser reads)
    shown_tokens: frozenset[str] = frozenset()
    # tensors computed from the config, not the weights, written before the model's (Gemma 4's global
    # layers' RoPE factors)
    computed: Callable[[Any], list[tuple[str, np.ndarray]]] | None = None
    # tensors of the model that go in stacked as one of llama.cpp's, along a new first dimension in the
    # order of their index (pattern with the index as its group -> llama.cpp's name): Gemma 3n's AltUp
    # projections; they come one after another in the state dict's order
    stacked: tuple[tuple[str, str], ...] = ()


def _check_exaone4(config: Any) -> None:
    """Refuse the EXAONE 4 variants llama.cpp's exaone4 graph computes otherwise: it windows attention
    (and leaves out RoPE in the global layers) only in a 64-block model with its fixed pattern, where
    transformers does so wherever the config sets a sliding window: such a config is refused; plain or
    Llama 3 RoPE (EXAONE 4.0 1.2B's)."""
    _check_plain_rope(config, "exaone4")
    if getattr(config, "sliding_window", None) is not None:
        raise UsageError(
            "GGUF export writes EXAONE 4 with global attention and RoPE in every layer (EXAONE 4.0 1.2B); this "
            "model sets a sliding window (its global layers have no RoPE), which llama.cpp follows only in 64 blocks"
        )


def _head_dim(config: Any) -> int:
    """A head's width: the config's `head_dim`, else hidden size / heads."""
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


# transformers' names of a tanh-approximated GELU in Gemma's configs ("gelu" there means the approximation)
_TANH_GELU = ("gelu_pytorch_tanh", "gelu")


def _check_activation(config: Any, arch: str, allowed: tuple[str, ...], graph: str) -> None:
    """Refuse an MLP activation llama.cpp's `arch` graph does not compute (`graph`: what it does)."""
    act = getattr(config, "hidden_activation", None) or config.hidden_act
    if act not in allowed:
        raise UsageError(f"llama.cpp's {arch} {graph}; this model's MLP uses {act!r}")


def _check_gemma_common(config: Any, arch: str, blocks_27b: int) -> None:
    """What llama.cpp's gemma2 and gemma3 graphs share: tanh-approximated GELU, and queries scaled by
    1/sqrt(head_dim), or by 1/sqrt(hidden / heads) for the 27B (told apart by its block count)."""
    _check_activation(config, arch, _TANH_GELU, "uses tanh-approximated GELU")
    head_dim = _head_dim(config)
    scalar = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == blocks_27b else head_dim
    if float(getattr(config, "query_pre_attn_scalar", scalar)) != float(scalar):
        raise UsageError(
            f"llama.cpp's {arch} scales attention by 1/sqrt({scalar}) for {config.num_hidden_layers} blocks; "
            f"this model's query_pre_attn_scalar is {config.query_pre_attn_scalar}"
        )


def _check_gemma(config: Any) -> None:
    """Refuse what llama.cpp's gemma graph (Gemma 1, CodeGemma) computes differently from
    transformers' Gemma: tanh-approximated GELU, queries scaled by 1/sqrt(head_dim), plain RoPE."""
    _check_plain_rope(config, "gemma")
    _check_activation(config, "gemma", _TANH_GELU, "uses tanh-approximated GELU")


def _check_glm4(config: Any) -> None:
    """Refuse what llama.cpp's glm4 graph computes otherwise: RoPE scaling, an activation other than
    SiLU."""
    _check_plain_rope(config, "glm4")
    _check_activation(config, "glm4", ("silu",), "gates its MLP with SiLU")


def _olmo1_metadata(writer: Any, config: Any) -> None:
    """OLMo (1)'s keys: its LayerNorms' epsilon (fixed in transformers' OlmoLayerNorm, not in the
    config) and its clipping of Q, K and V where set."""
    writer.add_layer_norm_eps(1e-5)
    if getattr(config, "clip_qkv", None):
        writer.add_clamp_kqv(float(config.clip_qkv))


def _check_seed_oss(config: Any) -> None:
    """Refuse what llama.cpp's seed_oss graph computes otherwise: RoPE scaling, an activation other
    than SiLU (an output projection bias is refused as any bias llama.cpp does not hold)."""
    _check_plain_rope(config, "seed_oss")
    _check_activation(config, "seed_oss", ("silu",), "gates its MLP with SiLU")


def _check_hunyuan_dense(config: Any) -> None:
    """Refuse what llama.cpp's hunyuan-dense graph computes otherwise: RoPE other than plain or
    HunYuan's fixed NTK alpha (`dynamic` with an `alpha`: a stretched base, `_hunyuan_theta`)."""
    kind, rope = rope_type(config), _rope(config)
    if kind != "default" and not (kind == "dynamic" and rope.get("alpha")):
        raise UsageError(f"GGUF export writes HunYuan's plain or NTK-alpha RoPE; this model scales it as {kind!r}")


def _hunyuan_theta(config: Any) -> float:
    """HunYuan's RoPE base: the config's, stretched by its NTK alpha as base · alpha^(d / (d − 2))
    (d the head's width; what transformers computes and llama.cpp's conversion writes)."""
    rope, dim = _rope(config), _head_dim(config)
    alpha = float(rope.get("alpha") or 1.0) if rope_type(config) == "dynamic" else 1.0
    return float(rope.get("rope_theta", 10000.0)) * alpha ** (dim / (dim - 2))


def _check_nemotron(config: Any) -> None:
    """Refuse what llama.cpp's nemotron graph (Nemotron-4, Minitron) computes otherwise: RoPE scaling,
    an MLP other than squared ReLU."""
    _check_plain_rope(config, "nemotron")
    _check_activation(config, "nemotron", ("relu2",), "uses a squared-ReLU MLP")


def _check_gemma3(config: Any) -> None:
    """Refuse what llama.cpp's gemma3 graph computes differently from transformers' Gemma 3."""
    if rope_type(config) not in ("default", "linear") or rope_type(config, "sliding_attention") != "default":
        raise UsageError(
            "GGUF export writes Gemma 3's plain or linearly scaled global RoPE; this model scales it otherwise"
        )
    if getattr(config, "attn_logit_softcapping", None) is not None or getattr(
        config, "use_bidirectional_attention", False
    ):
        raise UsageError(
            "llama.cpp's gemma3 has no attention-logit soft-capping or bidirectional attention: this model uses one"
        )
    _check_gemma_common(config, "gemma3", 62)


def _check_gemma2(config: Any) -> None:
    """Refuse what llama.cpp's gemma2 graph computes differently from transformers' Gemma 2: its
    layers alternate sliding and global from the first (a fixed pattern, not read from the file), so
    an output whose kept blocks break the alternation (a dropped block) is refused."""
    if rope_type(config) != "default":
        raise UsageError(f"GGUF export writes Gemma 2's plain RoPE; this model scales it as {rope_type(config)!r}")
    kinds = list(getattr(config, "layer_types", None) or [])
    fixed = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(len(kinds))]
    if getattr(config, "sliding_window", None) and kinds != fixed:
        raise UsageError(
            "llama.cpp's gemma2 makes every even layer sliding and every odd one global; this model's layers are "
            f"{', '.join(k.split('_')[0] for k in kinds)} (a structured output that dropped blocks): extract with "
            "--drop-run 2 (adjacent pairs of blocks dropped), or export the model before dropping"
        )
    _check_gemma_common(config, "gemma2", 46)


def _gemma2_metadata(writer: Any, config: Any) -> None:
    """Gemma 2's keys beyond the common ones: the sliding window (llama.cpp's pattern is fixed:
    `_check_gemma2`) and both soft-cappings."""
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _check_smollm3(config: Any) -> None:
    """Refuse what llama.cpp's smollm3 graph computes otherwise: it skips RoPE in every fourth layer
    (3, 7, ...) whatever the file says, as transformers' SmolLM3 does by default, so an output whose
    kept blocks break that rule (dropped blocks) is refused; it has no RoPE scaling (a sliding window:
    `check_config`)."""
    if rope_type(config) != "default":
        raise UsageError(f"GGUF export writes SmolLM3's plain RoPE; this model scales it as {rope_type(config)!r}")
    fixed = [int((i + 1) % 4 != 0) for i in range(config.num_hidden_layers)]
    if list(getattr(config, "no_rope_layers", fixed)) != fixed:
        raise UsageError(
            "llama.cpp's smollm3 skips RoPE in every fourth layer (3, 7, ...); this model's layers without RoPE are "
            f"{[i for i, r in enumerate(config.no_rope_layers) if not r]} (a structured output that dropped blocks): "
            "extract with --drop-run 4 (four consecutive blocks dropped at a time), or export the model before dropping"
        )


def _granite_metadata(writer: Any, config: Any) -> None:
    """Granite's four multipliers, under llama.cpp's names: the attention scale (in place of
    1/sqrt(head_dim)), the embedding and residual scales, and the logit scale (logits divided by it)."""
    writer.add_attention_scale(float(config.attention_multiplier))
    writer.add_embedding_scale(float(config.embedding_multiplier))
    writer.add_residual_scale(float(config.residual_multiplier))
    writer.add_logit_scale(float(config.logits_scaling))


def _granitemoe_metadata(writer: Any, config: Any) -> None:
    """Granite MoE's keys: Granite's multipliers and the expert counts."""
    _granite_metadata(writer, config)
    _moe_metadata(writer, config)


def _check_olmo(config: Any) -> None:
    """Refuse what llama.cpp's olmo2 graph (OLMo 2 and OLMo 3) computes otherwise: RoPE scaling, or
    another RoPE base in the sliding layers than in the global ones (it has one base)."""
    kinds = ("full_attention", "sliding_attention")
    if any(rope_type(config, k) != "default" for k in kinds):
        raise UsageError(f"GGUF export writes OLMo's plain RoPE; this model scales it as {rope_type(config)!r}")
    bases = {float(theta) for k in kinds if (theta := _rope(config, k).get("rope_theta")) is not None}
    if len(bases) > 1:
        raise UsageError(f"llama.cpp's olmo2 has one RoPE base; this model's layers use {sorted(bases)}")


def _window_metadata(writer: Any, config: Any) -> bool:
    """The sliding window and its per-layer pattern from `layer_types` (llama.cpp reads the pattern
    array and so follows the blocks a structured output kept), when the model has sliding layers;
    whether it has (OLMo 3's, Gemma 3's and Cohere 2's; OLMo 2 has none)."""
    kinds = list(getattr(config, "layer_types", None) or [])
    if getattr(config, "sliding_window", None) and "sliding_attention" in kinds:
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([k == "sliding_attention" for k in kinds])
        return True
    return False


def _check_stablelm(config: Any) -> None:
    """Refuse the StableLM variants llama.cpp's stablelm graph takes in another form: per-head Q/K
    LayerNorms (StableLM 2 12B) and the parallel residual; plain RoPE only."""
    _check_plain_rope(config, "stablelm")
    if getattr(config, "qk_layernorm", False) or getattr(config, "use_parallel_residual", False):
        raise UsageError(
            "GGUF export writes StableLM's sequential blocks without Q/K norms (StableLM 2 1.6B, 3B, Zephyr); "
            "this model has " + ("per-head Q/K norms" if config.qk_layernorm else "a parallel residual")
        )


def _stablelm_metadata(writer: Any, config: Any) -> None:
    """StableLM's sequential residual, said (llama.cpp's stablelm reads it, its default is parallel)."""
    writer.add_parallel_residual(False)


def _check_cohere(config: Any) -> None:
    """Refuse the Cohere variants llama.cpp's command-r graph computes otherwise: it reads per-head Q/K
    LayerNorms (Command R+'s `use_qk_norm`) exactly when the model has 64 blocks or more (Command R+'s
    64), so a model with them and fewer blocks (a structured Command R+ that dropped some), or without
    them and as many, is refused; plain RoPE only."""
    _check_plain_rope(config, "command-r")
    qk_norm, blocks = bool(getattr(config, "use_qk_norm", False)), int(config.num_hidden_layers)
    if qk_norm != (blocks >= 64):
        raise UsageError(
            f"llama.cpp's command-r takes per-head Q/K norms exactly in models of 64 blocks or more (Command R+); "
            f"this model has {blocks} blocks {'with' if qk_norm else 'without'} them: export the model before "
            "dropping blocks"
        )


def _cohere_metadata(writer: Any, config: Any) -> None:
    """Cohere's logit scale (logits multiplied by it), as llama.cpp's converter writes it."""
    import gguf

    writer.add_logit_scale(float(config.logit_scale))
    writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def _check_cohere2(config: Any) -> None:
    """Refuse the Cohere 2 variants llama.cpp's cohere2 graph computes otherwise: it rotates queries
    and keys in the sliding layers only, as transformers does, by the per-layer pattern it reads, so a
    model without sliding layers (no pattern to read) is refused; plain RoPE only."""
    _check_plain_rope(config, "cohere2")
    kinds = list(getattr(config, "layer_types", None) or [])
    if not getattr(config, "sliding_window", None) or "sliding_attention" not in kinds:
        raise UsageError("GGUF export writes Cohere 2 (Command R7B) with its sliding layers; this model has none")


def _cohere2_metadata(writer: Any, config: Any) -> None:
    """Cohere 2's keys: Cohere's logit scale and, always, the sliding window and its per-layer pattern
    (llama.cpp rotates queries and keys in the sliding layers only, as transformers does)."""
    _cohere_metadata(writer, config)
    _window_metadata(writer, config)


def _gemma3_metadata(writer: Any, config: Any) -> None:
    """Gemma 3's keys beyond the common ones: sliding window and its per-layer pattern, the local
    RoPE base, linear RoPE scaling of the global layers, final-logit soft-capping."""
    import gguf

    if _window_metadata(writer, config):
        writer.add_rope_freq_base_swa(float(_rope(config, "sliding_attention").get("rope_theta", 10000.0)))
    if rope_type(config) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(_rope(config)["factor"]))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _check_gemma4(config: Any) -> None:
    """Refuse what llama.cpp's gemma4 graph computes differently from transformers' Gemma 4: an MLP other
    than tanh-approximated GELU, bidirectional attention over text, RoPE other than plain in the sliding
    layers (over the whole head) and plain or proportional in the global ones, per-layer embeddings
    with a vocabulary of their own (llama.cpp reads them by the token ids)."""
    _check_activation(config, "gemma4", _TANH_GELU, "uses tanh-approximated GELU")
    if getattr(config, "use_bidirectional_attention", None) == "all":
        raise UsageError("llama.cpp's gemma4 attends causally over text; this model attends both ways")
    sliding = _rope(config, "sliding_attention")
    if rope_type(config, "sliding_attention") != "default" or float(sliding.get("partial_rotary_factor", 1.0)) != 1:
        raise UsageError("GGUF export writes Gemma 4's sliding layers with plain RoPE over the whole head; this "
                         "model rotates them otherwise")  # fmt: skip
    if rope_type(config) not in ("default", "proportional"):
        raise UsageError(
            f"GGUF export writes Gemma 4's plain or proportional global RoPE; this model's is {rope_type(config)!r}"
        )
    if set(config.layer_types) - {"sliding_attention", "full_attention"}:
        raise UsageError(f"llama.cpp's gemma4 has sliding and global attention layers; this model has "
                         f"{sorted(set(config.layer_types))}")  # fmt: skip
    if getattr(config, "hidden_size_per_layer_input", 0) and config.vocab_size_per_layer_input != config.vocab_size:
        raise UsageError(
            f"llama.cpp's gemma4 reads the per-layer embeddings by the {config.vocab_size} token ids; this model "
            f"has {config.vocab_size_per_layer_input} of them"
        )


def _gemma4_layer(config: Any, kind: str = "full_attention") -> Any:
    """The settings of Gemma 4's layers of one kind (`per_layer_config`: their head width and key/value
    heads; the config's own `head_dim` is refused as ambiguous); a global layer's where none is of `kind`."""
    kinds = list(config.layer_types)
    return config.per_layer_config[kinds.index(kind if kind in kinds else "full_attention")]


def _gemma4_metadata(writer: Any, config: Any) -> None:
    """Gemma 4's keys beyond the common ones: the sliding window and its per-layer pattern (always:
    llama.cpp requires them), the sliding layers' RoPE base and head width (the global ones' are the
    common keys), the layers that reuse an earlier layer's keys and values, the per-layer embeddings'
    width (0 without them), final-logit soft-capping, an MoE block's experts."""
    writer.add_sliding_window(int(config.sliding_window))
    writer.add_sliding_window_pattern([k == "sliding_attention" for k in config.layer_types])
    writer.add_rope_freq_base_swa(float(_rope(config, "sliding_attention").get("rope_theta", 10000.0)))
    sliding = int(_gemma4_layer(config, "sliding_attention").head_dim)
    writer.add_key_length_swa(sliding)
    writer.add_value_length_swa(sliding)
    writer.add_rope_dimension_count_swa(sliding)
    writer.add_shared_kv_layers(int(config.num_kv_shared_layers or 0))
    writer.add_embedding_length_per_layer_input(int(getattr(config, "hidden_size_per_layer_input", 0) or 0))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    if getattr(config, "enable_moe_block", False):
        writer.add_expert_count(int(config.num_experts))
        writer.add_expert_used_count(int(config.top_k_experts))
        writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))


def _gemma4_layout(config: Any, state: dict[str, torch.Tensor], arch: Architecture) -> dict[str, Any]:
    """Gemma 4's per-block shapes: the global layers' head width as the common key length (the sliding
    ones' in `_gemma4_metadata`), key/value heads by each layer's kind (a layer that reuses an earlier
    one's keys and values has none of its own: its kind's), the MLP's width per block (twice as wide in
    the reusing layers of the double-wide models)."""
    full = _gemma4_layer(config)
    ffn, kv = [], []
    for i, kind in enumerate(config.layer_types):
        p = f"model.layers.{i}."
        layer = config.per_layer_config[i]
        q_rows = state[p + "self_attn.q_proj.weight"].shape[0]
        k = state.get(p + "self_attn.k_proj.weight")
        if q_rows != config.num_attention_heads * layer.head_dim or (
            k is not None and k.shape[0] != layer.num_key_value_heads * layer.head_dim
        ):
            raise UsageError(f"block {i}'s attention shapes do not fit llama.cpp's {kind.split('_')[0]} heads")
        ffn.append(int(state[p + "mlp.gate_proj.weight"].shape[0]))
        kv.append(int(layer.num_key_value_heads))
    return {"head_dim": int(full.head_dim), "ffn": ffn, "kv": kv, "rope_dims": int(full.head_dim)}


def _gemma4_rope_freqs(config: Any) -> np.ndarray:
    """The global layers' RoPE as llama.cpp's gemma4 takes it (`rope_freqs.weight`, read by those layers
    only): per rotary frequency of the whole head (NeoX pairs), the factor its angle is divided by.
    transformers' proportional RoPE rotates the first partial_rotary_factor · head/2 frequencies, at the
    whole head's frequencies divided by the config's `factor`, and leaves the others unrotated: those
    get 1e30 (an angle of zero), as llama.cpp's converter writes them."""
    rope, dim = _rope(config), int(_gemma4_layer(config).head_dim)
    rotated = (
        int(float(rope.get("partial_rotary_factor", 1.0)) * dim // 2)
        if rope_type(config) == "proportional"
        else dim // 2
    )
    factor = float(rope.get("factor", 1.0)) if rope_type(config) == "proportional" else 1.0
    return np.array([factor] * rotated + [1e30] * (dim // 2 - rotated), dtype=np.float32)


def _gemma4_tensors(name: str, w: torch.Tensor, config: Any) -> list[tuple[str, torch.Tensor]] | None:
    """An MoE block's experts and router as llama.cpp's gemma4 holds them: the fused gate/up experts
    [E, 2·ff, hidden] as ffn_gate_exps and ffn_up_exps, the router's input scale as `ffn_gate_inp.scale`,
    its per-expert scale (which multiplies each chosen expert's weight) as `ffn_down_exps.scale`."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(experts\.gate_up_proj|experts\.down_proj|router\.[\w.]+)", name)
    if m is None:
        return None
    blk, what = m[1], m[2]
    if what == "experts.gate_up_proj":
        gate, up = w.chunk(2, dim=1)
        return [(f"blk.{blk}.ffn_gate_exps.weight", gate), (f"blk.{blk}.ffn_up_exps.weight", up)]
    targets = {"experts.down_proj": "ffn_down_exps.weight", "router.proj.weight": _ROUTER,
               "router.scale": "ffn_gate_inp.scale", "router.per_expert_scale": "ffn_down_exps.scale"}  # fmt: skip
    target = targets.get(what)
    if target is None:
        raise UsageError(f"llama.cpp has no tensor for {name!r} in this architecture: this layout cannot be exported")
    return [(f"blk.{blk}.{target}", w)]


# what llama.cpp's gemma3n graph fixes rather than reads from the file (its hparams' defaults and constants)
_GEMMA3N_FIXED = {"altup_num_inputs": 4, "altup_active_idx": 0, "laurel_rank": 64, "hidden_size_per_layer_input": 256}
_GEMMA3N_KV_FROM = 20  # the first block that reuses an earlier block's keys and values, in llama.cpp's gemma3n
_GEMMA3N_SPARSE = (10, 0.95)  # its first 10 blocks keep the MLP's gate activations above the 95th percentile


def _check_gemma3n(config: Any) -> None:
    """Refuse what llama.cpp's gemma3n graph computes differently from transformers' Gemma 3n: its AltUp
    streams, LAuReL rank and per-layer embedding width are fixed (E2B's and E4B's), keys and values are
    reused from block 20 on, activation sparsity (the 95th percentile) is in the first 10 blocks only, the
    AltUp correction is always scaled, the logits always soft-capped; an MLP other than tanh-approximated
    GELU, RoPE other than plain."""
    _check_activation(config, "gemma3n", _TANH_GELU, "uses tanh-approximated GELU")
    for key, value in _GEMMA3N_FIXED.items():
        if getattr(config, key, None) != value:
            raise UsageError(
                f"llama.cpp's gemma3n fixes {key} at {value}; this model's is {getattr(config, key, None)}"
            )
    n, shared = config.num_hidden_layers, int(config.num_kv_shared_layers or 0)
    if (n - shared if shared else max(n, _GEMMA3N_KV_FROM)) != _GEMMA3N_KV_FROM:
        reuse = f"from block {n - shared} on" if shared else "nowhere"
        raise UsageError(f"llama.cpp's gemma3n reuses keys and values from block {_GEMMA3N_KV_FROM} on; this model's "
                         f"{n} blocks reuse them {reuse}")  # fmt: skip
    first, level = _GEMMA3N_SPARSE
    fixed = [level if i < first else 0.0 for i in range(n)]
    if [float(x) for x in config.activation_sparsity_pattern] != fixed:
        pattern = list(config.activation_sparsity_pattern)
        raise UsageError(f"llama.cpp's gemma3n keeps the top 5% of the MLP's gate activations in the first {first} "
                         f"blocks only; this model's sparsity pattern is {pattern}")  # fmt: skip
    if not config.altup_correct_scale or not getattr(config, "final_logit_softcapping", None):
        raise UsageError(
            "llama.cpp's gemma3n scales the AltUp correction and soft-caps the logits; this model does not"
        )
    if any(rope_type(config, kind) != "default" for kind in ("full_attention", "sliding_attention")):
        raise UsageError("GGUF export writes Gemma 3n's plain RoPE; this model scales it")


def _gemma3n_caveats(config: Any) -> list[str]:
    """Where llama.cpp's gemma3n computes otherwise, said: its activation-sparsity cutoff takes the spread
    of the gate's activations over n - 1 channels (transformers' over n), sqrt(n / (n - 1)) times
    transformers' (1.00006 at Gemma 3n's 8192 channels)."""
    sizes = config.intermediate_size if isinstance(config.intermediate_size, list) else [config.intermediate_size]
    n = min(int(x) for x in sizes[: _GEMMA3N_SPARSE[0]])
    return [f"llama.cpp's gemma3n computes the activation-sparsity cutoff with the spread over n - 1 channels "
            f"(transformers: n): the cutoff's spread is {math.sqrt(n / (n - 1)):.5f} times transformers' at this "
            f"model's {n}-channel MLP"]  # fmt: skip


def _gemma3n_metadata(writer: Any, config: Any) -> None:
    """Gemma 3n's keys beyond the common ones: the sliding window and its per-layer pattern, the sliding
    layers' RoPE base, final-logit soft-capping, the AltUp streams (count, the active one), the per-layer
    embeddings' width, the layers reusing keys and values, activation sparsity per block (the standard
    normal's quantile of each block's level: 0.95 -> 1.645, 0 -> -inf; llama.cpp reads its fixed levels,
    `_check_gemma3n`), as llama.cpp's converter writes them."""
    from statistics import NormalDist

    _window_metadata(writer, config)
    writer.add_rope_freq_base_swa(float(_rope(config, "sliding_attention").get("rope_theta", 10000.0)))
    writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    writer.add_altup_active_idx(int(config.altup_active_idx))
    writer.add_altup_num_inputs(int(config.altup_num_inputs))
    writer.add_embedding_length_per_layer_input(int(config.hidden_size_per_layer_input))
    writer.add_shared_kv_layers(int(config.num_kv_shared_layers or 0))
    writer.add_activation_sparsity_scale(
        [NormalDist().inv_cdf(float(x)) if x > 0 else float("-inf") for x in config.activation_sparsity_pattern]
    )


def _gemma3n_layout(config: Any, state: dict[str, torch.Tensor], arch: Architecture) -> dict[str, Any]:
    """Gemma 3n's per-block shapes: one head width, key/value heads from the config (the blocks that
    reuse earlier keys and values have no key projection to count them by; the others' are checked),
    the MLP's width per block (a list in its config)."""
    head_dim, kv = _head_dim(config), int(config.num_key_value_heads)
    ffn = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        k = state.get(p + "self_attn.k_proj.weight")
        if state[p + "self_attn.q_proj.weight"].shape[0] != config.num_attention_heads * head_dim or (
            k is not None and k.shape[0] != kv * head_dim
        ):
            raise UsageError(f"block {i}'s attention shapes do not fit llama.cpp's heads")
        ffn.append(int(state[p + "mlp.gate_proj.weight"].shape[0]))
    return {"head_dim": head_dim, "ffn": ffn, "kv": [kv] * config.num_hidden_layers}


def _gemma3n_tensors(name: str, w: torch.Tensor, config: Any) -> list[tuple[str, torch.Tensor]] | None:
    """Gemma 3n's per-layer embeddings over the whole vocabulary, as llama.cpp reads them by the token
    ids: where the model's has fewer rows (the image and audio tokens past `vocab_size_per_layer_input`),
    those tokens get token 0's row, as transformers gives them (llama.cpp's converter writes zeros).  A
    block that reuses earlier keys and values has no key or value projection in transformers, but
    llama.cpp's gemma3n loads them for every block (and reads none there; its converter writes the
    checkpoint's unused ones): written beside the block's query projection, zeros (the key norm ones)."""
    if name == "model.embed_tokens_per_layer.weight" and w.shape[0] < config.vocab_size:
        return [("per_layer_token_embd.weight", torch.cat([w, w[:1].expand(config.vocab_size - w.shape[0], -1)]))]
    m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", name)
    if m is None or int(m[1]) < config.num_hidden_layers - int(config.num_kv_shared_layers or 0):
        return None
    head_dim, blk = _head_dim(config), m[1]
    kv = w.new_zeros(int(config.num_key_value_heads) * head_dim, w.shape[1])
    return [(f"blk.{blk}.attn_q.weight", w), (f"blk.{blk}.attn_k.weight", kv), (f"blk.{blk}.attn_v.weight", kv),
            (f"blk.{blk}.attn_k_norm.weight", w.new_ones(head_dim))]  # fmt: skip


def rope_freq_factors(model: Any, head_dim: int, base: float) -> np.ndarray:
    """Llama 3's RoPE scaling as llama.cpp takes it: `rope_freqs.weight`, per rotary frequency the
    factor its angle is divided by, here the plain frequency over the one the model itself uses
    (its rotary embedding's `inv_freq`, from transformers' Llama 3 rule)."""
    used = next((m.inv_freq for m in model.modules() if hasattr(m, "inv_freq") and hasattr(m, "rope_type")), None)
    if used is None:
        raise UsageError("the model declares Llama 3 RoPE scaling but has no rotary embedding module to read it from")
    plain = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return (plain / used.double().cpu()).float().numpy()


def _rotary_dims(config: Any, head_dim: int) -> int:
    """How many of a head's channels RoPE rotates (Phi-4-mini: 3/4 of them)."""
    rotated = getattr(config, "partial_rotary_factor", None) or _rope(config).get("partial_rotary_factor") or 1.0
    return int(head_dim * float(rotated))


def _check_phi3(config: Any) -> None:
    """Refuse the Phi-3 variants whose RoPE llama.cpp's phi3 graph does not take: plain RoPE and
    LongRoPE (the 128k Phi-3, Phi-3.5, Phi-4-mini) go, with one long and one short factor per
    rotated frequency."""
    kind = rope_type(config)
    if kind == "longrope":
        rope = _rope(config)
        head_dim = _head_dim(config)
        half = _rotary_dims(config, head_dim) // 2
        bad = [k for k in ("long_factor", "short_factor") if len(rope.get(k) or []) != half]
        if bad or not rope.get("original_max_position_embeddings"):
            raise UsageError(
                f"this Phi-3's LongRoPE parameters are incomplete: llama.cpp needs original_max_position_embeddings "
                f"and {half} long and short factors (one per rotated frequency){'; ' + ', '.join(bad) if bad else ''}"
            )
    elif kind != "default":
        raise UsageError(f"GGUF export writes Phi-3's plain RoPE and LongRoPE; this model scales it as {kind!r}")


def _phi3_metadata(writer: Any, config: Any) -> None:
    """Phi-3's keys beyond the common ones: its sliding window (every layer; llama.cpp reads it and
    then disables it, `_phi3_caveats`), and with LongRoPE the context its short factors serve (the
    factors and the attention factor: `_rope_tensors`)."""
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
    if rope_type(config) == "longrope":
        writer.add_rope_scaling_orig_ctx_len(int(_rope(config)["original_max_position_embeddings"]))


def _phi3_caveats(config: Any) -> list[str]:
    notes = []
    window = getattr(config, "sliding_window", None)
    if window:
        notes.append(f"llama.cpp runs Phi-3 with full attention (it disables the sliding window, llama.cpp PR "
                     f"13676): past {window} tokens of context it computes otherwise than transformers, as after "
                     "llama.cpp's own conversion")  # fmt: skip
    if rope_type(config) == "longrope":
        orig = int(_rope(config)["original_max_position_embeddings"])
        notes.append(f"llama.cpp takes LongRoPE's long factors when its context (n_ctx, rounded up to a multiple of "
                     f"256) is above {orig} tokens, transformers when the sequence is: run it with n_ctx {orig} or "
                     "less to compute shorter sequences as transformers does, as after llama.cpp's own "
                     "conversion")  # fmt: skip
    return notes


def _rope_tensors(model: Any, config: Any, head_dim: int, theta: float) -> tuple[list[tuple[str, np.ndarray]], Any]:
    """The RoPE scaling llama.cpp reads from tensors: Llama 3's `rope_freqs.weight`; LongRoPE's
    `rope_factors_long.weight` and `rope_factors_short.weight` (the config's factors, float32) with
    the attention factor transformers scales cos and sin by (its rotary embedding's
    `attention_scaling`: the config's, or sqrt(1 + ln s / ln L) for s = context / original L).
    Returns the tensors and that factor (None without LongRoPE)."""
    kind = rope_type(config)
    if kind == "llama3":  # llama.cpp reads the scaled frequencies from this tensor
        return [("rope_freqs.weight", rope_freq_factors(model, head_dim, theta))], None
    if kind != "longrope":
        return [], None
    rope = _rope(config)
    rotary = next((m for m in model.modules() if hasattr(m, "attention_scaling") and hasattr(m, "rope_type")), None)
    if rotary is None:
        raise UsageError("the model declares LongRoPE but has no rotary embedding module to read it from")
    factors = [
        (f"rope_factors_{k}.weight", np.asarray(rope[f"{k}_factor"], dtype=np.float32)) for k in ("long", "short")
    ]
    return factors, float(rotary.attention_scaling)


# llama.cpp graphs that read Llama 3's scaling from `rope_freqs.weight`
_ROPE_FREQS_ARCHS = ("llama", "exaone4", "llama4", "apertus")


def _check_plain_rope(config: Any, gguf_arch: str) -> None:
    kind = rope_type(config)
    if kind not in ("default", "llama3") or (kind == "llama3" and gguf_arch not in _ROPE_FREQS_ARCHS):
        raise UsageError(f"GGUF export writes plain RoPE and Llama 3's scaling so far; this model scales it ({kind!r})")


def _n_experts(config: Any) -> int:
    return int(getattr(config, "num_local_experts", None) or config.num_experts)


def _window_caveats(config: Any) -> list[str]:
    """Mistral and Mixtral go in as llama.cpp's `llama`, StarCoder2 as its `starcoder2`, neither of
    which has a sliding window (as after llama.cpp's own conversion of them): said, not refused."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return []
    gguf = ARCHITECTURES[config.model_type].gguf
    return [f"llama.cpp's {gguf} architecture attends to the whole context: past {window} tokens this model's "
            "sliding window makes transformers compute otherwise, as after llama.cpp's own conversion"]  # fmt: skip


def _check_phi2(config: Any) -> None:
    """Refuse the Phi (1, 1.5, 2) variants llama.cpp's phi2 graph computes otherwise: per-head Q/K
    LayerNorms (`qk_layernorm`), an MLP other than a tanh-approximated GELU; plain RoPE."""
    _check_plain_rope(config, "phi2")
    if getattr(config, "qk_layernorm", False):
        raise UsageError("GGUF export writes Phi without Q/K LayerNorms; this model has them (qk_layernorm)")
    _check_activation(config, "phi2", ("gelu_new", "gelu_pytorch_tanh"), "computes a tanh-approximated GELU")


def _check_starcoder2(config: Any) -> None:
    """Refuse the StarCoder2 variants llama.cpp's starcoder2 graph computes otherwise: it takes the
    biases of every projection and LayerNorm, a tanh-approximated GELU MLP, plain RoPE."""
    _check_plain_rope(config, "starcoder2")
    if not getattr(config, "use_bias", True):
        raise UsageError("llama.cpp's starcoder2 needs the projections' biases; this model has none")
    _check_activation(config, "starcoder2", ("gelu_pytorch_tanh", "gelu_new"), "computes a tanh-approximated GELU")


def _check_qwen3_moe(config: Any) -> None:
    """Refuse the Qwen3-MoE variants llama.cpp's qwen3moe graph computes otherwise: it renormalizes
    the top-k routing weights and has an MoE block in every layer."""
    _check_plain_rope(config, "qwen3moe")
    if not getattr(config, "norm_topk_prob", False):
        raise UsageError(
            "llama.cpp's qwen3moe renormalizes the top-k routing weights; this model does not (norm_topk_prob false)"
        )
    _check_every_layer_moe(config, "qwen3moe")


def _check_qwen2_moe(config: Any) -> None:
    """Refuse the Qwen2-MoE variants llama.cpp's qwen2moe graph computes otherwise: it takes the top-k
    routing weights as the softmax gives them (not renormalized) and has an MoE block in every layer."""
    _check_plain_rope(config, "qwen2moe")
    if getattr(config, "norm_topk_prob", False):
        raise UsageError(
            "llama.cpp's qwen2moe does not renormalize the top-k routing weights; this model does (norm_topk_prob true)"
        )
    _check_every_layer_moe(config, "qwen2moe")


def _check_olmoe(config: Any) -> None:
    """Refuse the OLMoE variants llama.cpp's olmoe graph computes otherwise: it takes the top-k routing
    weights as the softmax gives them (not renormalized), does not clip Q, K and V, and sizes the K
    norm by the hidden size (key/value heads as many as query heads, as OLMoE-1B-7B has)."""
    _check_plain_rope(config, "olmoe")
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if kv != config.num_attention_heads:
        raise UsageError(
            f"llama.cpp's olmoe sizes the K norm by the hidden size (as many key/value heads as query heads); this "
            f"model has {kv} key/value heads for {config.num_attention_heads} query heads"
        )
    if getattr(config, "norm_topk_prob", False):
        raise UsageError(
            "llama.cpp's olmoe does not renormalize the top-k routing weights; this model does (norm_topk_prob true)"
        )
    if getattr(config, "clip_qkv", None):
        raise UsageError(f"llama.cpp's olmoe does not clip Q, K and V; this model clips them at {config.clip_qkv}")


def _check_every_layer_moe(config: Any, gguf_arch: str) -> None:
    if list(getattr(config, "mlp_only_layers", None) or []) or int(getattr(config, "decoder_sparse_step", 1)) != 1:
        raise UsageError(
            f"llama.cpp's {gguf_arch} has experts in every layer; this model has dense MLP layers among them"
        )


def _moe_metadata(writer: Any, config: Any) -> None:
    """An MoE's keys: how many experts, how many each token uses, and (qwen2moe, qwen3moe) each one's
    width and (qwen2moe) the shared expert's."""
    writer.add_expert_count(_n_experts(config))
    writer.add_expert_used_count(int(config.num_experts_per_tok))
    if getattr(config, "moe_intermediate_size", None):
        writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))
    # the shared expert's width (Qwen2-MoE's; Granite MoE's `shared_intermediate_size`)
    shared = getattr(config, "shared_expert_intermediate_size", None) or getattr(
        config, "shared_intermediate_size", None
    )
    if shared:
        writer.add_expert_shared_feed_forward_length(int(shared))


def _check_gpt_oss(config: Any) -> None:
    """Refuse the gpt-oss variants llama.cpp's gpt-oss graph computes otherwise: it fixes the clamped
    SwiGLU's constants (α 1.702, limit 7), needs the attention biases and the sliding window, and
    takes plain or YaRN RoPE."""
    kind = rope_type(config)
    if kind not in ("default", "yarn"):
        raise UsageError(f"GGUF export writes gpt-oss's plain or YaRN RoPE; this model scales it as {kind!r}")
    alpha, limit = float(getattr(config, "swiglu_alpha", 1.702)), float(getattr(config, "swiglu_limit", 7.0))
    if (round(alpha, 6), limit) != (1.702, 7.0):
        raise UsageError(
            f"llama.cpp's gpt-oss fixes the SwiGLU at alpha 1.702 and limit 7; this model's are {alpha} and {limit}"
        )
    if not getattr(config, "attention_bias", True) or not getattr(config, "sliding_window", None):
        raise UsageError("llama.cpp's gpt-oss needs attention biases and a sliding window; this model lacks one")


def _gpt_oss_metadata(writer: Any, config: Any) -> None:
    """gpt-oss's keys: the experts (each one's width is the config's intermediate size), the sliding
    window with its per-layer pattern, and YaRN (llama.cpp scales cos and sin by 0.1 ln s + 1 itself,
    as transformers does by default)."""
    _moe_metadata(writer, config)
    writer.add_expert_feed_forward_length(int(config.intermediate_size))
    writer.add_sliding_window(int(config.sliding_window))
    writer.add_sliding_window_pattern([k == "sliding_attention" for k in config.layer_types])
    _yarn_metadata(writer, config)


def _yarn_metadata(writer: Any, config: Any) -> None:
    """YaRN's keys, when the config scales RoPE so: the factor, the original context, β fast / slow."""
    import gguf

    if rope_type(config) != "yarn":
        return
    rope = _rope(config)
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                     ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):  # fmt: skip
        if rope.get(key) is not None:
            add(float(rope[key]))


def _check_ministral3(config: Any) -> None:
    """Refuse the Ministral 3 variants llama.cpp's mistral3 graph computes otherwise: it takes plain or
    YaRN RoPE, and YaRN's attention factor as the ratio of its two mscales with the first one 1."""
    kind = rope_type(config)
    if kind not in ("default", "yarn"):
        raise UsageError(f"GGUF export writes Ministral 3's plain or YaRN RoPE; this model scales it as {kind!r}")
    rope = _rope(config)
    if kind == "yarn" and (float(rope.get("mscale") or 1.0) != 1.0 or rope.get("attention_factor") is not None):
        raise UsageError("llama.cpp's mistral3 takes YaRN's mscale as 1 and no attention factor; this model sets one")
    if getattr(config, "sliding_window", None):
        raise UsageError("GGUF export writes Ministral 3 with full attention; this model uses a sliding window")


def _check_arcee(config: Any) -> None:
    """Refuse what llama.cpp's arcee graph (AFM-4.5B) computes otherwise: RoPE other than plain or
    YaRN (with YaRN's attention factor its default, 0.1·ln(factor) + 1, as llama.cpp computes it), an
    MLP other than squared ReLU."""
    kind = rope_type(config)
    if kind not in ("default", "yarn"):
        raise UsageError(f"GGUF export writes Arcee's plain or YaRN RoPE; this model scales it as {kind!r}")
    rope = _rope(config)
    if kind == "yarn" and any(rope.get(k) is not None for k in ("mscale", "mscale_all_dim", "attention_factor")):
        raise UsageError("llama.cpp's arcee takes YaRN's default attention factor; this model sets its own")
    _check_activation(config, "arcee", ("relu2",), "uses a squared-ReLU MLP")


def _ministral3_metadata(writer: Any, config: Any) -> None:
    """Ministral 3's keys: YaRN with its `mscale_all_dim` (llama.cpp's log multiplier), and Llama 4's
    attention temperature (queries scaled by 1 + β·ln(1 + ⌊position / original context⌋))."""
    _yarn_metadata(writer, config)
    rope = _rope(config)
    if rope_type(config) == "yarn" and rope.get("mscale_all_dim") is not None:
        writer.add_rope_scaling_yarn_log_mul(float(rope["mscale_all_dim"]))
    if rope.get("llama_4_scaling_beta"):
        writer.add_attn_temperature_scale(float(rope["llama_4_scaling_beta"]))


def _gpt_oss_caveats(config: Any) -> list[str]:
    """Where llama.cpp's YaRN computes otherwise: it rounds the correction range to whole dimensions,
    which transformers does only with `truncate` true (gpt-oss says false)."""
    rope = _rope(config)
    if rope_type(config) != "yarn" or rope.get("truncate", True):
        return []
    return ["llama.cpp rounds YaRN's correction range to whole dimensions; this model's RoPE does not (truncate: "
            "false), so its rotations differ slightly in the dimensions at the range's edges, as after llama.cpp's "
            "own conversion"]  # fmt: skip


def _check_deepseek(config: Any) -> None:
    """Refuse what llama.cpp's deepseek2 graph (DeepSeek V2 and V3, Kimi K2, Moonlight) computes
    otherwise: RoPE other than plain or YaRN with both mscales equal (cos and sin then unscaled, the
    attention scale multiplied by (0.1·mscale·ln factor + 1)² in both libraries); RoPE on rotate-half
    pairs (it rotates interleaved ones, as DeepSeek's `rope_interleave` and V2's complex rotation do);
    an MLP other than SiLU-gated; V2's group-limited routing (it ranks groups by their best expert,
    llama.cpp by their best two, V3's rule)."""
    kind, rope = rope_type(config), _rope(config)
    if kind not in ("default", "yarn"):
        raise UsageError(f"GGUF export writes DeepSeek's plain or YaRN RoPE; this model scales it as {kind!r}")
    if kind == "yarn" and (
        not rope.get("mscale_all_dim") or rope.get("mscale") != rope["mscale_all_dim"] or rope.get("attention_factor")
    ):
        raise UsageError(
            "llama.cpp's deepseek2 takes YaRN with mscale equal to mscale_all_dim (DeepSeek's, Kimi K2's); this "
            f"model's are {rope.get('mscale')} and {rope.get('mscale_all_dim')}"
        )
    _check_activation(config, "deepseek2", ("silu",), "gates its MLPs with SiLU")
    _leading_dense(config)
    if config.model_type != "deepseek_v2" and not getattr(config, "rope_interleave", True):
        raise UsageError("llama.cpp's deepseek2 rotates interleaved pairs; this model rotates halves (rope_interleave "
                         "false)")  # fmt: skip
    groups, used = int(getattr(config, "n_group", None) or 1), int(getattr(config, "topk_group", None) or 1)
    if config.model_type == "deepseek_v2" and config.topk_method == "group_limited_greedy" and used < groups:
        raise UsageError(
            f"llama.cpp's deepseek2 ranks expert groups by their best two experts; this model routes to the best "
            f"{used} of {groups} groups by their best one (DeepSeek V2's group_limited_greedy)"
        )


def _deepseek_metadata(writer: Any, config: Any) -> None:
    """DeepSeek's keys: the latent attention's ranks and head widths (llama.cpp runs it as one key/value
    head of the latent's width, `_mla_layout`), the leading dense blocks, and the routing: V3's sigmoid
    scores with their correction bias (`exp_probs_b`), renormalized top-k and groups ranked by their
    best two experts; V2's softmax, not renormalized; both scaled by `routed_scaling_factor`."""
    writer.add_q_lora_rank(int(config.q_lora_rank or 0))  # 0: one q_proj (V2-Lite)
    writer.add_kv_lora_rank(int(config.kv_lora_rank))
    writer.add_key_length_mla(int(config.qk_nope_head_dim + config.qk_rope_head_dim))
    writer.add_value_length_mla(int(config.v_head_dim))
    _routing_metadata(writer, config, sigmoid=config.model_type != "deepseek_v2")
    _yarn_metadata(writer, config)
    if rope_type(config) == "yarn":  # the attention scale's (0.1·mscale·ln factor + 1)²
        writer.add_rope_scaling_yarn_log_mul(0.1 * float(_rope(config)["mscale_all_dim"]))


def _routing_metadata(writer: Any, config: Any, sigmoid: bool) -> None:
    """DeepSeek's routing, as DeepSeek V3 and GLM-4.5 share it (`sigmoid`): sigmoid scores with their
    correction bias (`exp_probs_b`), the top-k renormalized where the config says so, groups ranked by
    their best two experts; or V2's softmax, not renormalized. Both scaled by `routed_scaling_factor`,
    beside `n_shared_experts` shared experts, after `first_k_dense_replace` dense blocks."""
    import gguf

    writer.add_leading_dense_block_count(_leading_dense(config))
    _moe_metadata(writer, config)
    writer.add_expert_shared_count(int(config.n_shared_experts))
    writer.add_expert_weights_scale(float(config.routed_scaling_factor))
    writer.add_expert_weights_norm(bool(sigmoid and config.norm_topk_prob))
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX)
    groups = int(getattr(config, "n_group", None) or 1)
    if sigmoid and groups > 1:
        writer.add_expert_group_count(groups)
        writer.add_expert_group_used_count(int(config.topk_group))


def _sigmoid_routing_metadata(writer: Any, config: Any) -> None:
    """GLM-4.5's and dots.llm1's keys: DeepSeek V3's routing (GLM-4.5's MTP layers, which transformers
    does not load, are not written)."""
    _routing_metadata(writer, config, sigmoid=True)


def _check_no_sliding(config: Any, arch: str) -> None:
    """Refuse sliding-window layers (`layer_types`) where llama.cpp's `arch` graph attends to the whole context."""
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise UsageError(f"llama.cpp's {arch} attends to the whole context; this model has sliding-window layers")


def _check_dots1(config: Any) -> None:
    """Refuse what llama.cpp's dots1 graph (dots.llm1) computes otherwise: RoPE scaling, sliding
    layers (it has no window), fewer key/value heads than query heads (it sizes K and V by the query
    heads, as dots.llm1 has them), an MLP other than SiLU-gated, dense blocks after MoE ones."""
    _check_plain_rope(config, "dots1")
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if kv != config.num_attention_heads:
        raise UsageError(f"llama.cpp's dots1 takes as many key/value heads as query heads; this model has {kv} "
                         f"key/value heads for {config.num_attention_heads}")  # fmt: skip
    _check_no_sliding(config, "dots1")
    _check_activation(config, "dots1", ("silu",), "gates its MLPs with SiLU")
    _leading_dense(config)


def _leading_dense(config: Any) -> int:
    """How many blocks have a dense MLP before the MoE ones: `first_k_dense_replace`, or the leading
    "dense" entries of `mlp_layer_types` (GLM-4.7-Flash), which llama.cpp can only hold first."""
    kinds = getattr(config, "mlp_layer_types", None)
    if not kinds:
        return int(config.first_k_dense_replace or 0)
    lead = next((i for i, k in enumerate(kinds) if k != "dense"), len(kinds))
    if any(k == "dense" for k in kinds[lead:]):
        raise UsageError(
            f"llama.cpp holds dense MLP blocks only before the MoE ones; this model's are {', '.join(kinds)}"
        )
    return lead


def _check_ernie4_5_moe(config: Any) -> None:
    """Refuse what llama.cpp's ernie4_5-moe graph computes otherwise: it puts experts in every
    `moe_layer_interval`-th block from `moe_layer_start_index` to the last, so a model whose experts
    stop earlier (`moe_layer_end_index`) is refused; plain RoPE, a SiLU-gated MLP."""
    _check_plain_rope(config, "ernie4_5-moe")
    _check_activation(config, "ernie4_5-moe", ("silu",), "gates its MLPs with SiLU")
    last = config.num_hidden_layers - 1
    if int(config.moe_layer_end_index) < last:
        raise UsageError(f"llama.cpp's ernie4_5-moe has experts up to the last block; this model's stop at block "
                         f"{config.moe_layer_end_index} of {last}")  # fmt: skip


def _ernie4_5_moe_metadata(writer: Any, config: Any) -> None:
    """ERNIE 4.5 MoE's keys: the experts (softmax routing, its correction bias choosing them, the top-k
    renormalized: llama.cpp's fixed rule for this architecture), where they are (every
    `moe_layer_interval`-th block from `moe_layer_start_index`), the shared experts' width."""
    _moe_metadata(writer, config)
    writer.add_leading_dense_block_count(int(config.moe_layer_start_index))
    writer.add_interleave_moe_layer_step(int(config.moe_layer_interval))
    if config.moe_num_shared_experts:
        writer.add_expert_shared_feed_forward_length(int(config.moe_intermediate_size * config.moe_num_shared_experts))


def _check_hunyuan_moe(config: Any) -> None:
    """Refuse what llama.cpp's hunyuan-moe graph (Hunyuan-A13B) computes otherwise: HunYuan dense's
    RoPE rules (`_check_hunyuan_dense`), a top-k that varies by block (one count for all; Hunyuan-A13B
    gives one per block, all the same)."""
    _check_hunyuan_dense(config)
    for value in (config.num_experts, config.moe_topk):
        _one_for_all_blocks(value)


def _one_for_all_blocks(value: Any) -> int:
    """A count the config gives once or per block (Hunyuan-A13B's `moe_topk`), as one number; a
    UsageError where it varies by block (llama.cpp takes one for all)."""
    values = set(value) if isinstance(value, list | tuple) else {value}
    if len(values) != 1:
        raise UsageError(f"llama.cpp takes one expert count for every block; this model's vary ({sorted(values)})")
    return int(values.pop())


def _hunyuan_moe_metadata(writer: Any, config: Any) -> None:
    """Hunyuan-A13B's keys: the experts (softmax routing, the top-k renormalized: llama.cpp's fixed rule
    here), each one as wide as the shared MLP beside it (the config's intermediate size; transformers'
    HunYuan reads no other width)."""
    writer.add_expert_count(_one_for_all_blocks(config.num_experts))
    writer.add_expert_used_count(_one_for_all_blocks(config.moe_topk))
    writer.add_expert_feed_forward_length(int(config.intermediate_size))
    writer.add_expert_shared_feed_forward_length(int(config.intermediate_size))


def _check_minimax_m2(config: Any) -> None:
    """Refuse what llama.cpp's minimax-m2 graph computes otherwise: RoPE scaling, sliding layers, an
    MLP other than SiLU-gated, an output matrix tied to the embeddings (it reads its own)."""
    _check_plain_rope(config, "minimax-m2")
    _check_no_sliding(config, "minimax-m2")
    _check_activation(config, "minimax-m2", ("silu",), "gates its MLPs with SiLU")
    if getattr(config, "tie_word_embeddings", False):
        raise UsageError(
            "llama.cpp's minimax-m2 reads an output matrix of its own; this model ties it to the embeddings"
        )


def _minimax_m2_metadata(writer: Any, config: Any) -> None:
    """MiniMax-M2's keys: the experts, each as wide as the config's intermediate size, and its routing
    (sigmoid scores, a correction bias choosing the experts, the top-k renormalized, not scaled)."""
    import gguf

    _moe_metadata(writer, config)
    writer.add_expert_feed_forward_length(int(config.intermediate_size))
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


def _check_llama4(config: Any) -> None:
    """Refuse what llama.cpp's llama4 graph computes otherwise. It fixes what Llama 4 Scout and
    Maverick set: attention in chunks of 8192 tokens in three blocks of four and global in every
    fourth (3, 7, ...), which also has no RoPE and scales its queries by Llama 4's temperature (scale
    0.1, floor 8192); the L2 norm of queries and keys in the RoPE blocks exactly when the model does not
    have 128 experts (Scout's 16 have it, Maverick's 128 not). A model whose blocks break that pattern
    (a structured output that dropped some) or set other values is refused; plain or Llama 3 RoPE."""
    _check_plain_rope(config, "llama4")
    n = int(config.num_hidden_layers)
    fixed = [int((i + 1) % 4 != 0) for i in range(n)]
    kinds = ["chunked_attention" if r else "full_attention" for r in fixed]
    if list(config.no_rope_layers) != fixed or list(getattr(config, "layer_types", None) or kinds) != kinds:
        raise UsageError(
            "llama.cpp's llama4 leaves RoPE out and attends globally in every fourth block (3, 7, ...); this "
            "model's blocks without RoPE are "
            f"{[i for i, r in enumerate(config.no_rope_layers) if not r]} (a structured output that dropped blocks): "
            "extract with --drop-run 4, or export the model before dropping"
        )
    fixed_values = {
        "attention_chunk_size": 8192,
        "floor_scale": 8192,
        "attn_scale": 0.1,
        "attn_temperature_tuning": True,
    }
    values = {k: getattr(config, k, None) for k in fixed_values}
    if values != fixed_values:
        raise UsageError(
            "llama.cpp's llama4 fixes attention chunks of 8192 and the temperature's floor 8192 and scale 0.1 "
            f"(Llama 4's); this model sets {values}"
        )
    if bool(config.use_qk_norm) != (_n_experts(config) != 128):
        raise UsageError(
            "llama.cpp's llama4 normalizes queries and keys exactly when a model does not have 128 experts "
            f"(Scout: 16 with the norm, Maverick: 128 without); this model has {_n_experts(config)} experts "
            f"{'with' if config.use_qk_norm else 'without'} it"
        )


def _llama4_metadata(writer: Any, config: Any) -> None:
    """Llama 4's keys: the experts (each as wide as the config's intermediate size, as the shared expert
    beside them) and every n-th block having them; chunked attention, its temperature and the L2 norm
    are llama.cpp's own fixed rules (`_check_llama4`)."""
    _moe_metadata(writer, config)
    writer.add_expert_feed_forward_length(int(config.intermediate_size))
    writer.add_interleave_moe_layer_step(int(config.interleave_moe_layer_step))


def _check_lfm2(config: Any) -> None:
    """Refuse what llama.cpp's lfm2 graph computes otherwise: RoPE scaling, biases in the short
    convolution (its graph adds none)."""
    _check_plain_rope(config, "lfm2")
    if getattr(config, "conv_bias", False):
        raise UsageError("llama.cpp's lfm2 takes its short convolutions without biases; this model's have them")


def _lfm2_metadata(writer: Any, config: Any) -> None:
    """LFM2's keys: the RMSNorm epsilon (its config's `norm_eps`) and the short convolution's length
    (`conv_L_cache`); the per-block key/value heads, 0 in the convolution blocks, come with the shapes."""
    writer.add_layer_norm_rms_eps(float(config.norm_eps))
    writer.add_shortconv_l_cache(int(config.conv_L_cache))


def _check_lfm2_moe(config: Any) -> None:
    """Refuse what llama.cpp's lfm2moe graph computes otherwise: LFM2's rules (`_check_lfm2`), and its
    routing fixed as LFM2-8B-A1B's: sigmoid scores with an expert bias choosing the experts, the top-k
    renormalized, not scaled."""
    _check_lfm2(config)
    if not config.use_expert_bias or not config.norm_topk_prob or float(config.routed_scaling_factor) != 1.0:
        raise UsageError(
            "llama.cpp's lfm2moe routes with an expert bias, renormalizes the top-k and does not scale it "
            f"(LFM2-8B-A1B's); this model's use_expert_bias, norm_topk_prob and routed_scaling_factor are "
            f"{config.use_expert_bias}, {config.norm_topk_prob} and {config.routed_scaling_factor}"
        )


def _lfm2_moe_metadata(writer: Any, config: Any) -> None:
    """LFM2-MoE's keys: LFM2's, the dense blocks first (`num_dense_layers`), the experts, sigmoid gating."""
    import gguf

    _lfm2_metadata(writer, config)
    writer.add_leading_dense_block_count(int(config.num_dense_layers))
    _moe_metadata(writer, config)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)


def _check_granite_hybrid(config: Any) -> None:
    """Refuse what llama.cpp's granitehybrid graph (Granite 4.0 H) computes otherwise: RoPE scaling (RoPE
    itself only where `position_embedding_type` is "rope"; Granite 4.0 H has none), a clamped time step
    (`time_step_limit` other than (0, inf)), convolution or projection biases beyond Mamba-2's conv
    bias, an MLP other than SiLU-gated."""
    _check_plain_rope(config, "granitehybrid")
    _check_mamba2(config, "granitehybrid")
    _check_activation(config, "granitehybrid", ("silu",), "gates its MLPs with SiLU")


def _mamba2_sizes(config: Any) -> dict[str, int]:
    """Mamba-2's sizes under each config's names (Granite 4.0 H's `mamba_*`, Nemotron-H's, Mamba-2's own)."""
    if hasattr(config, "mamba_n_heads"):  # Falcon-H1 may set the inner width apart (`mamba_d_ssm`)
        inner = getattr(config, "mamba_d_ssm", None) or config.mamba_expand * config.hidden_size
        return {"conv": int(config.mamba_d_conv), "inner": int(inner),
                "state": int(config.mamba_d_state), "heads": int(config.mamba_n_heads),
                "groups": int(config.mamba_n_groups)}  # fmt: skip
    if hasattr(config, "mamba_num_heads"):  # Nemotron-H
        return {"conv": int(config.conv_kernel), "inner": int(config.mamba_num_heads * config.mamba_head_dim),
                "state": int(config.ssm_state_size), "heads": int(config.mamba_num_heads),
                "groups": int(config.n_groups)}  # fmt: skip
    return {
        "conv": int(config.conv_kernel),
        "inner": int(config.num_heads * config.head_dim),
        "state": int(config.state_size),
        "heads": int(config.num_heads),
        "groups": int(config.n_groups),
    }  # Mamba-2


def _mamba2_metadata(writer: Any, config: Any) -> None:
    """Mamba-2's keys: convolution length, inner width, state size, heads (as the time-step rank), groups."""
    sizes = _mamba2_sizes(config)
    writer.add_ssm_conv_kernel(sizes["conv"])
    writer.add_ssm_inner_size(sizes["inner"])
    writer.add_ssm_state_size(sizes["state"])
    writer.add_ssm_time_step_rank(sizes["heads"])
    writer.add_ssm_group_count(sizes["groups"])


def _check_mamba2(config: Any, arch: str) -> None:
    """What llama.cpp's Mamba-2 layer computes otherwise: a clamped time step (`time_step_limit`
    other than (0, inf)), biases in Mamba-2's projections."""
    limit = tuple(float(x) for x in (getattr(config, "time_step_limit", None) or (0.0, math.inf)))
    if limit != (0.0, math.inf):
        raise UsageError(f"llama.cpp's {arch} does not clamp Mamba-2's time step; this model clamps it to {limit}")
    if getattr(config, "mamba_proj_bias", False) or getattr(config, "use_bias", False):
        raise UsageError(f"llama.cpp's {arch} takes Mamba-2's projections without biases; this model's have them")


def _granite_hybrid_metadata(writer: Any, config: Any) -> None:
    """Granite 4.0 H's keys: Granite's multipliers, the experts (when it has them) and the shared MLP's
    width, Mamba-2's sizes (convolution length, inner width, state size, heads as the time-step rank,
    groups), and whether the attention blocks rotate (`rope.scaling.finetuned`, which llama.cpp's
    granitehybrid reads as "use RoPE")."""
    _granite_metadata(writer, config)
    if getattr(config, "num_local_experts", 0):
        _moe_metadata(writer, config)
    _mamba2_metadata(writer, config)
    writer.add_rope_scaling_finetuned(getattr(config, "position_embedding_type", None) == "rope")


_MAMBA2 = ("A_log", "D", "dt_bias", "conv1d", "norm", "in_proj", "out_proj")  # a Mamba-2 mixer's parameters


def _mamba2_tensors(name: str, w: torch.Tensor, config: Any) -> list[tuple[str, torch.Tensor]] | None:
    """Mamba-2's parameters as llama.cpp's converter writes them: A as -exp(A_log) and D as [heads, 1],
    the time-step bias as `ssm_dt.bias`, the depthwise convolution [channels, 1, L] as {L, channels},
    the gated norm's weight as [groups, inner / groups]; and a dense Granite 4.0 H's shared MLP (no
    experts) as its plain MLP. None for any other tensor."""
    m = re.fullmatch(r"(?:model|backbone)\.layers\.(\d+)\.(mamba|mixer|shared_mlp)\.(\w+)(?:\.(weight|bias))?", name)
    if m is None or (m[2] == "mixer" and m[3] not in _MAMBA2):  # Nemotron-H's attention and MLP mixers
        return None
    blk, part, what, kind = f"blk.{m[1]}", m[2], m[3], m[4]
    if part == "shared_mlp":
        if getattr(config, "num_local_experts", 0):
            return None  # beside experts: the shared expert (`_HALVES`, `_GRANITEMOE_NAMES`)
        if what == "input_linear":
            gate, up = w.chunk(2, dim=0)
            return [(f"{blk}.ffn_gate.weight", gate), (f"{blk}.ffn_up.weight", up)]
        return [(f"{blk}.ffn_down.weight", w)]
    if what == "A_log":
        return [(f"{blk}.ssm_a", -torch.exp(w.float()).reshape(-1, 1))]
    if what == "D":
        return [(f"{blk}.ssm_d", w.reshape(-1, 1))]
    if what == "dt_bias":
        return [(f"{blk}.ssm_dt.bias", w)]
    if what == "conv1d":
        return [(f"{blk}.ssm_conv1d.{kind}", w.reshape(w.shape[0], -1) if kind == "weight" else w)]
    if what == "norm":
        return [(f"{blk}.ssm_norm.weight", w.reshape(_mamba2_sizes(config)["groups"], -1))]
    names = {"in_proj": "ssm_in", "out_proj": "ssm_out"}
    if what in names:
        return [(f"{blk}.{names[what]}.{kind}", w)]
    raise UsageError(f"llama.cpp has no tensor for {name!r} in this architecture: this layout cannot be exported")


def _check_nemotron_h(config: Any) -> None:
    """Refuse what llama.cpp's nemotron_h graph (Nemotron-H, Nemotron Nano 2) computes otherwise: expert
    blocks (Nemotron 3's), an MLP other than squared ReLU, Mamba-2's rules (`_check_mamba2`); it has
    no RoPE, as Nemotron-H."""
    kinds = set(config.layer_types) - {"linear_attention", "full_attention", "mlp"}
    if kinds:
        raise UsageError(f"GGUF export writes Nemotron-H's Mamba-2, attention and MLP blocks; this model has "
                         f"{sorted(kinds)} blocks")  # fmt: skip
    if config.mlp_hidden_act != "relu2":
        raise UsageError(f"llama.cpp's nemotron_h uses a squared-ReLU MLP; this model's uses {config.mlp_hidden_act!r}")
    _check_mamba2(config, "nemotron_h")


def _nemotron_h_metadata(writer: Any, config: Any) -> None:
    """Nemotron-H's keys: the RMSNorm epsilon (its `layer_norm_epsilon`, under both of llama.cpp's
    epsilon keys: its nemotron_h loader requires the LayerNorm one) and Mamba-2's sizes; which
    block is which, llama.cpp reads off the per-block key/value heads and MLP widths (`_nemotron_h_layout`)."""
    writer.add_layer_norm_rms_eps(float(config.layer_norm_epsilon))
    writer.add_layer_norm_eps(float(config.layer_norm_epsilon))  # llama.cpp's nemotron_h reads this key too
    _mamba2_metadata(writer, config)


def _nemotron_h_layout(config: Any, state: dict[str, torch.Tensor], arch: Architecture) -> dict[str, Any]:
    """Nemotron-H's blocks, one kind each, as llama.cpp tells them apart: a Mamba-2 block has no key/value
    heads and no MLP width, an attention block its key/value heads and no MLP width, an MLP block its
    width and no key/value heads."""
    head_dim, kv, ffn = _head_dim(config), [], []
    for i, kind in enumerate(config.layer_types):
        p = f"model.layers.{i}.mixer."
        k_rows = 0
        if kind == "full_attention":
            q_rows, k_rows = state[p + "q_proj.weight"].shape[0], state[p + "k_proj.weight"].shape[0]
            if q_rows != config.num_attention_heads * head_dim or k_rows % head_dim:
                raise UsageError(f"block {i}'s attention shapes ({q_rows}, {k_rows} rows) do not fit llama.cpp's heads")
        kv.append(int(k_rows // head_dim))
        ffn.append(int(state[p + "up_proj.weight"].shape[0]) if kind == "mlp" else 0)
    return {"head_dim": head_dim, "kv": kv, "ffn": ffn}


def _check_apertus(config: Any) -> None:
    """Refuse what llama.cpp's apertus graph computes otherwise: RoPE other than plain or Llama 3's, an
    MLP other than xIELU."""
    _check_plain_rope(config, "apertus")
    _check_activation(config, "apertus", ("xielu",), "uses an xIELU MLP")


def _apertus_weight_metadata(writer: Any, config: Any, value: Callable[[str], torch.Tensor]) -> None:
    """Apertus's xIELU parameters, one of each per block, as the model stores them (α_p and α_n before
    the softplus that transformers and llama.cpp's xIELU each apply: α_p = softplus(·), α_n = β +
    softplus(·)), β and ε."""
    act = [f"model.layers.{i}.mlp.act_fn." for i in range(config.num_hidden_layers)]
    for key, add in (("alpha_p", writer.add_xielu_alpha_p), ("alpha_n", writer.add_xielu_alpha_n),
                     ("beta", writer.add_xielu_beta), ("eps", writer.add_xielu_eps)):  # fmt: skip
        add([float(value(a + key).float().reshape(-1)[0]) for a in act])


def _apertus_tensors(name: str, w: torch.Tensor, config: Any) -> list[tuple[str, torch.Tensor]] | None:
    """Apertus's xIELU parameters go in as keys (`_apertus_weight_metadata`), not tensors."""
    return [] if ".mlp.act_fn." in name else None


def _check_bamba(config: Any) -> None:
    """Refuse what llama.cpp's granitehybrid graph computes otherwise for Bamba: RoPE scaling, Mamba-2's
    rules (`_check_mamba2`), an MLP other than SiLU-gated."""
    _check_plain_rope(config, "granitehybrid")
    _check_mamba2(config, "granitehybrid")
    _check_activation(config, "granitehybrid", ("silu",), "gates its MLPs with SiLU")


def _bamba_metadata(writer: Any, config: Any) -> None:
    """Bamba's keys: Mamba-2's sizes and RoPE on (`rope.scaling.finetuned`: Bamba always rotates, over
    part of each head); no multipliers (Granite's are 1 here)."""
    _mamba2_metadata(writer, config)
    writer.add_rope_scaling_finetuned(True)


def _check_falcon_h1(config: Any) -> None:
    """Refuse what llama.cpp's falcon-h1 graph computes otherwise: Mamba-2's gated norm before the gate
    (`mamba_norm_before_gate` with `mamba_rms_norm`: llama.cpp norms after it), an output tied to the
    embeddings (their multipliers differ: the export writes both scaled), RoPE scaling, Mamba-2's rules,
    an MLP other than SiLU-gated."""
    _check_plain_rope(config, "falcon-h1")
    _check_mamba2(config, "falcon-h1")
    _check_activation(config, "falcon-h1", ("silu",), "gates its MLP with SiLU")
    if getattr(config, "mamba_rms_norm", False) and getattr(config, "mamba_norm_before_gate", False):
        raise UsageError("llama.cpp's falcon-h1 norms Mamba-2's output after its gate; this model norms it before")
    if getattr(config, "tie_word_embeddings", False):
        raise UsageError("GGUF export writes Falcon-H1's output matrix apart from its embeddings; this model ties them")


def _falcon_h1_tensors(name: str, w: torch.Tensor, config: Any) -> list[tuple[str, torch.Tensor]] | None:
    """Falcon-H1's µP multipliers folded into the weights they scale, as llama.cpp's converter does (its
    graph has none): the embeddings, the head, attention's input (Q, K, V; K also by `key_multiplier`) and
    output, the MLP's gate and down, Mamba-2's input (by `ssm_in_multiplier` and, per output row, the five
    `ssm_multipliers` of z, x, B, C and dt) and output. Mamba-2's other parameters as Granite 4.0 H's."""
    m = re.fullmatch(r"model\.layers\.\d+\.(self_attn|feed_forward|mamba)\.(\w+?)(?:_proj)?\.weight", name)
    scale: float | torch.Tensor | None = None
    if name == "model.embed_tokens.weight":
        scale = float(config.embedding_multiplier)
    elif name == "lm_head.weight":
        scale = float(config.lm_head_multiplier)
    elif m is not None and m[1] == "self_attn":
        scale = {"q": config.attention_in_multiplier, "v": config.attention_in_multiplier,
                 "k": config.attention_in_multiplier * config.key_multiplier,
                 "o": config.attention_out_multiplier}[m[2]]  # fmt: skip
    elif m is not None and m[1] == "feed_forward":
        scale = {"gate": config.mlp_multipliers[0], "down": config.mlp_multipliers[1], "up": 1.0}[m[2]]
    elif m is not None and m[2] == "in":
        sizes = _mamba2_sizes(config)
        inner, bc = sizes["inner"], sizes["groups"] * sizes["state"]
        widths = (inner, inner, bc, bc, sizes["heads"])  # z, x, B, C, dt rows
        scale = config.ssm_in_multiplier * torch.cat(
            [torch.full((n,), float(f), device=w.device) for n, f in zip(widths, config.ssm_multipliers, strict=True)]
        ).reshape(-1, 1)  # on the tensor's device: the meta one when a streamed export plans its tensors
    elif m is not None and m[2] == "out":
        scale = float(config.ssm_out_multiplier)
    if scale is None:
        return _mamba2_tensors(name, w, config)
    return [(gguf_name(name, ARCHITECTURES["falcon_h1"]), w.float() * scale)]


def _check_jamba(config: Any) -> None:
    """Refuse what llama.cpp's jamba graph computes otherwise: biases in Mamba's input and output
    projections, an MLP other than SiLU-gated (Jamba has no RoPE: nothing to scale)."""
    if getattr(config, "mamba_proj_bias", False):
        raise UsageError("llama.cpp's jamba takes Mamba's projections without biases; this model's have them")
    _check_activation(config, "jamba", ("silu",), "gates its MLPs with SiLU")


def _jamba_metadata(writer: Any, config: Any) -> None:
    """Jamba's keys: Mamba's sizes (convolution length, inner width, state size, the time step's rank) and,
    where it has experts, their counts (softmax routing, the top-k not renormalized, llama.cpp's rule
    here, as transformers computes it)."""
    writer.add_ssm_conv_kernel(int(config.mamba_d_conv))
    writer.add_ssm_inner_size(int(config.mamba_expand * config.hidden_size))
    writer.add_ssm_state_size(int(config.mamba_d_state))
    writer.add_ssm_time_step_rank(int(config.mamba_dt_rank))
    if int(config.num_experts) > 1:
        _moe_metadata(writer, config)


def _mamba1_tensors(name: str, w: torch.Tensor, config: Any) -> list[tuple[str, torch.Tensor]] | None:
    """Mamba (1) parameters (Jamba's, a pure Mamba's) as llama.cpp's converter writes them: A as -exp(A_log)
    [inner, state], the depthwise convolution [channels, 1, L] as {L, channels}, the input, x, dt and output
    projections and the dt / B / C norms under llama.cpp's `ssm_*` names. None for any other tensor."""
    m = re.fullmatch(
        r"(?:model\.layers\.(\d+)\.mamba|backbone\.layers\.(\d+)\.mixer)\.(\w+?)(?:\.(weight|bias))?", name
    )
    if m is None:
        return None
    blk, what, kind = f"blk.{m[1] or m[2]}", m[3], m[4]
    if what == "A_log":
        return [(f"{blk}.ssm_a", -torch.exp(w.float()))]
    if what == "D":
        return [(f"{blk}.ssm_d", w)]
    if what == "conv1d":
        return [(f"{blk}.ssm_conv1d.{kind}", w.reshape(w.shape[0], -1) if kind == "weight" else w)]
    names = {"in_proj": "ssm_in", "x_proj": "ssm_x", "dt_proj": "ssm_dt", "out_proj": "ssm_out",
             "dt_layernorm": "ssm_dt_norm", "b_layernorm": "ssm_b_norm", "c_layernorm": "ssm_c_norm"}  # fmt: skip
    if what in names:
        return [(f"{blk}.{names[what]}.{kind}", w)]
    raise UsageError(f"llama.cpp has no tensor for {name!r} in this architecture: this layout cannot be exported")


def _check_mamba(config: Any) -> None:
    """Refuse what llama.cpp's mamba and mamba2 graphs (Mamba, Falcon-Mamba, Mamba-2, Mamba-Codestral)
    compute otherwise: biases in the input and output projections, a convolution without its bias,
    an activation other than SiLU; Mamba-2's rules (`_check_mamba2`)."""
    arch = "mamba2" if config.model_type == "mamba2" else "mamba"
    if config.use_bias:
        raise UsageError(f"llama.cpp's {arch} takes Mamba's projections without biases; this model's have them")
    if not config.use_conv_bias:
        raise UsageError(f"llama.cpp's {arch} reads a bias of Mamba's convolution; this model's has none")
    if config.hidden_act != "silu":
        raise UsageError(f"llama.cpp's {arch} gates with SiLU; this model uses {config.hidden_act!r}")
    if arch == "mamba2":
        _check_mamba2(config, arch)


def _mamba_metadata(writer: Any, config: Any) -> None:
    """A pure Mamba's keys: the RMSNorm epsilon; Mamba (1)'s sizes (convolution length, inner width,
    state size, the time step's rank) and whether the time step, B and C are RMS-normed without weights
    (Falcon-Mamba's `ssm.dt_b_c_rms`), or Mamba-2's (`_mamba2_metadata`)."""
    writer.add_layer_norm_rms_eps(float(config.layer_norm_epsilon))
    if config.model_type == "mamba2":
        _mamba2_metadata(writer, config)
        return
    writer.add_ssm_conv_kernel(int(config.conv_kernel))
    writer.add_ssm_inner_size(int(config.intermediate_size))
    writer.add_ssm_state_size(int(config.state_size))
    writer.add_ssm_time_step_rank(int(config.time_step_rank))
    writer.add_ssm_dt_b_c_rms(config.model_type == "falcon_mamba")


def _mamba_layout(config: Any, state: dict[str, torch.Tensor], arch: Architecture) -> dict[str, Any]:
    """A pure Mamba's blocks: no attention (no heads, no key/value heads), no MLP."""
    n = int(config.num_hidden_layers)
    return {"head_dim": 0, "kv": [0] * n, "ffn": [0] * n}


_MAMBA_NAMES = (  # a pure Mamba's embeddings, block norms and final norm under `backbone`
    (r"backbone\.embeddings\.weight", "token_embd.weight"),
    (r"backbone\.layers\.(\d+)\.norm\.weight", "blk.{}.attn_norm.weight"),
    (r"backbone\.norm_f\.weight", "output_norm.weight"),
)


def _check_qwen35(config: Any) -> None:
    """Refuse what llama.cpp's qwen35 graph (Qwen3.5's text model) computes otherwise: RoPE scaling,
    key and value heads of different widths in the Gated DeltaNet blocks (llama.cpp sizes both by its
    state size), value heads not a multiple of the key heads, an activation other than SiLU (the
    DeltaNet's convolution and the MLP), layer kinds other than linear and full attention."""
    _check_plain_rope(config, "qwen35")
    _check_activation(config, "qwen35", ("silu",), "takes SiLU in the MLP and the DeltaNet's convolution")
    kinds = set(config.layer_types) - {"linear_attention", "full_attention"}
    if kinds:
        raise UsageError(
            f"GGUF export writes Qwen3.5's linear and full attention blocks; this model has {sorted(kinds)}"
        )
    if config.linear_key_head_dim != config.linear_value_head_dim:
        raise UsageError(f"llama.cpp's qwen35 takes the DeltaNet's key and value heads equally wide; this model's are "
                         f"{config.linear_key_head_dim} and {config.linear_value_head_dim}")  # fmt: skip
    if config.linear_num_value_heads % config.linear_num_key_heads:
        raise UsageError(f"the DeltaNet's {config.linear_num_value_heads} value heads are not a multiple of its "
                         f"{config.linear_num_key_heads} key heads")  # fmt: skip


def _delta_net_metadata(writer: Any, config: Any) -> None:
    """A Gated DeltaNet hybrid's keys (Qwen3.5, Qwen3-Next), as llama.cpp's converter writes them:
    convolution length, key head width as the state size, key heads as the groups, value heads as
    the time-step rank, all value heads' width as the inner size; which blocks are recurrent."""
    writer.add_ssm_conv_kernel(int(config.linear_conv_kernel_dim))
    writer.add_ssm_state_size(int(config.linear_key_head_dim))
    writer.add_ssm_group_count(int(config.linear_num_key_heads))
    writer.add_ssm_time_step_rank(int(config.linear_num_value_heads))
    writer.add_ssm_inner_size(int(config.linear_value_head_dim * config.linear_num_value_heads))
    writer.add_array(f"{writer.arch}.attention.recurrent_layers", [t == "linear_attention" for t in config.layer_types])


def _qwen35_metadata(writer: Any, config: Any) -> None:
    """Qwen3.5's keys: the DeltaNet's (`_delta_net_metadata`) and the multimodal RoPE's sections (the
    text model rotates every section by the token's position: plain RoPE)."""
    _delta_net_metadata(writer, config)
    sections = list(_rope(config).get("mrope_section") or [11, 11, 10])
    writer.add_rope_dimension_sections([*sections, *[0] * (4 - len(sections))])


def _qwen35_moe_metadata(writer: Any, config: Any) -> None:
    """Qwen3.5-MoE's keys: Qwen3.5's and the experts' (count, used per token, width, the shared one's)."""
    _qwen35_metadata(writer, config)
    _moe_metadata(writer, config)


def _check_qwen3_next(config: Any) -> None:
    """Refuse what llama.cpp's qwen3next graph computes otherwise: Qwen3.5's rules (`_check_qwen35`),
    top-k routing weights not renormalized, dense MLP blocks among the expert ones."""
    _check_qwen35(config)
    if not getattr(config, "norm_topk_prob", True):
        raise UsageError("llama.cpp's qwen3next renormalizes the top-k routing weights; this model does not "
                         "(norm_topk_prob false)")  # fmt: skip
    _check_every_layer_moe(config, "qwen3next")


def _qwen3_next_metadata(writer: Any, config: Any) -> None:
    """Qwen3-Next's keys: the DeltaNet's and the experts'."""
    _delta_net_metadata(writer, config)
    _moe_metadata(writer, config)


def _qwen35_layout(config: Any, state: dict[str, torch.Tensor], arch: Architecture) -> dict[str, Any]:
    """Qwen3.5's blocks: full attention (a query projection twice the heads' width: each head's query,
    then its output gate) or a Gated DeltaNet, each with an MLP; the attention blocks' key/value heads
    stand for every block's (llama.cpp tells the DeltaNet blocks by `attention.recurrent_layers`)."""
    head_dim, kv, ffn = _head_dim(config), set(), []
    for i, kind in enumerate(config.layer_types):
        p = f"model.layers.{i}."
        if kind == "full_attention":
            q_rows, k_rows = (
                state[p + "self_attn.q_proj.weight"].shape[0],
                state[p + "self_attn.k_proj.weight"].shape[0],
            )
            if q_rows != 2 * config.num_attention_heads * head_dim or k_rows % head_dim:
                raise UsageError(f"block {i}'s attention shapes ({q_rows}, {k_rows} rows) do not fit llama.cpp's heads")
            kv.add(int(k_rows // head_dim))
        ffn.append(_ffn_width(state, p, arch))
    if len(kv) > 1:
        raise UsageError(
            f"llama.cpp's qwen35 takes one number of key/value heads; this model's blocks have {sorted(kv)}"
        )
    return {"head_dim": head_dim, "kv": [kv.pop() if kv else 0] * len(ffn), "ffn": ffn}


def _value_heads_tiled(w: torch.Tensor, dim: int, config: Any, width: int) -> torch.Tensor:
    """The DeltaNet's value heads along `dim` (each `width` wide) from Hugging Face's order, grouped by
    key head (k0's v0..v(r-1), k1's, ...), to llama.cpp's tiled one (each key head's v0, then each's
    v1, ...), as llama.cpp's converter reorders them: ggml broadcasts the key heads that way."""
    k_heads, v_heads = int(config.linear_num_key_heads), int(config.linear_num_value_heads)
    if k_heads == v_heads:
        return w
    dim = dim % w.dim()
    shape = list(w.shape)
    grouped = w.reshape(*shape[:dim], k_heads, v_heads // k_heads, width, *shape[dim + 1 :])
    return grouped.transpose(dim, dim + 1).reshape(shape)


_QWEN35_NORMS = {  # Qwen3.5's RMSNorms scale by 1 + w (llama.cpp's by w): the weight written plus one
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def _qwen35_tensors(name: str, w: torch.Tensor, config: Any) -> list[tuple[str, torch.Tensor]] | None:
    """Qwen3.5's tensors (`_delta_net_tensors`), every value-head dimension tiled."""
    return _delta_net_tensors(name, w, config, tiled=True)


def _qwen3_next_tensors(name: str, w: torch.Tensor, config: Any) -> list[tuple[str, torch.Tensor]] | None:
    """Qwen3-Next's tensors (`_delta_net_tensors`), the value heads in Hugging Face's order (llama.cpp's
    qwen3next repeats the key heads to match them)."""
    return _delta_net_tensors(name, w, config, tiled=False)


def _delta_net_tensors(name: str, w: torch.Tensor, config: Any, tiled: bool) -> list[tuple[str, torch.Tensor]] | None:
    """A Gated DeltaNet hybrid's tensors (Qwen3.5, Qwen3-Next) as llama.cpp's converter writes them: the
    decoder's RMSNorms plus one (the DeltaNet's gated norm as it is); the DeltaNet's QKV projection as
    `attn_qkv` and its output gate as `attn_gate` (Qwen3-Next's fused `in_proj_qkvz`, grouped by key
    head, taken apart into the two), b and a as `ssm_beta` and `ssm_alpha` (Qwen3-Next's fused
    `in_proj_ba` as `ssm_ba`, as it is), A as -exp(A_log), the time-step bias as `ssm_dt.bias`, the
    depthwise convolution [channels, 1, L] as {L, channels}; `tiled`: every value-head dimension
    reordered (`_value_heads_tiled`). None for the rest (attention, MLP, embeddings, head)."""
    if name == "model.norm.weight":
        return [("output_norm.weight", w.float() + 1.0)]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name) or re.fullmatch(
        r"model\.layers\.(\d+)\.linear_attn\.(A_log|dt_bias)", name
    )
    if m is None:
        return None
    blk, what = f"blk.{m[1]}", m[2]
    if what in _QWEN35_NORMS:
        return [(f"{blk}.{_QWEN35_NORMS[what]}.weight", w.float() + 1.0)]
    if not what.startswith("linear_attn") and what not in ("A_log", "dt_bias"):
        return None
    what = what.removeprefix("linear_attn.")
    key, value = config.linear_key_head_dim * config.linear_num_key_heads, int(config.linear_value_head_dim)

    def order(w: torch.Tensor, dim: int, width: int) -> torch.Tensor:  # the value heads along `dim`
        return _value_heads_tiled(w, dim, config, width) if tiled else w

    if what == "in_proj_qkvz":  # per key head: its query, its key, its value heads, their gates
        k_heads, k_width = int(config.linear_num_key_heads), int(config.linear_key_head_dim)
        share = config.linear_num_value_heads // k_heads * value
        q, k, v, z = (part.reshape(-1, w.shape[-1]) for part in w.reshape(k_heads, -1, w.shape[-1]).split(
            [k_width, k_width, share, share], dim=1))  # fmt: skip
        return [(f"{blk}.attn_qkv.weight", torch.cat([q, k, order(v, 0, value)])),
                (f"{blk}.attn_gate.weight", order(z, 0, value))]  # fmt: skip
    if what in ("in_proj_qkv", "conv1d"):
        w = w.reshape(w.shape[0], -1)  # the convolution's [channels, 1, L] as [channels, L]
        target = f"{blk}.attn_qkv.weight" if what == "in_proj_qkv" else f"{blk}.ssm_conv1d.weight"
        return [(target, torch.cat([w[: 2 * key], order(w[2 * key :], 0, value)]))]
    if what == "A_log":
        return [(f"{blk}.ssm_a", order(-torch.exp(w.float()), 0, 1))]
    rows = {"in_proj_z": ("attn_gate.weight", 0, value), "in_proj_b": ("ssm_beta.weight", 0, 1),
            "in_proj_a": ("ssm_alpha.weight", 0, 1), "dt_bias": ("ssm_dt.bias", 0, 1),
            "out_proj": ("ssm_out.weight", 1, value), "in_proj_ba": ("ssm_ba.weight", 0, 0)}  # fmt: skip
    if what in rows:  # Qwen3-Next's in_proj_ba (b and a per key head) as it is: never tiled
        target, dim, width = rows[what]
        return [(f"{blk}.{target}", order(w, dim, width) if width else w)]
    if what == "norm":
        return [(f"{blk}.ssm_norm.weight", w)]
    raise UsageError(f"llama.cpp has no tensor for {name!r} in this architecture: this layout cannot be exported")


def _check_glm4_moe(config: Any) -> None:
    """Refuse what llama.cpp's glm4moe graph (GLM-4.5, GLM-4.5-Air) computes otherwise: RoPE scaling,
    an MLP other than SiLU-gated."""
    _check_plain_rope(config, "glm4moe")
    _check_activation(config, "glm4moe", ("silu",), "gates its MLPs with SiLU")
    _leading_dense(config)


def _mla_split(name: str, w: torch.Tensor, config: Any) -> list[tuple[str, torch.Tensor]] | None:
    """The latent's up-projection `kv_b_proj` ([heads·(nope + v), latent]: per head its key rows, then
    its value rows) as llama.cpp's absorbed pair: `attn_k_b` [heads, latent, nope] (each head's key
    rows transposed) and `attn_v_b` [heads, v, latent]; None for any other tensor."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.self_attn\.kv_b_proj\.weight", name)
    if m is None:
        return None
    nope, v = int(config.qk_nope_head_dim), int(config.v_head_dim)
    k_b, v_b = w.reshape(-1, nope + v, w.shape[-1]).split([nope, v], dim=1)
    return [(f"blk.{m[1]}.attn_k_b.weight", k_b.transpose(1, 2)), (f"blk.{m[1]}.attn_v_b.weight", v_b)]


def _mla_layout(config: Any, state: dict[str, torch.Tensor], arch: Architecture) -> dict[str, Any]:
    """The widths llama.cpp's deepseek2 needs: with the latent absorbed into the queries, one key/value
    head a block, keys as wide as the latent plus the rotated channels and values as the latent (the
    per-head widths as `key_length_mla` / `value_length_mla`: `_deepseek_metadata`); RoPE over the
    rotated channels only; after checking each block's projections against the config's heads."""
    heads, nope, rope, v = (int(config.num_attention_heads), int(config.qk_nope_head_dim),
                            int(config.qk_rope_head_dim), int(config.v_head_dim))  # fmt: skip
    latent, ffn = int(config.kv_lora_rank), []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        q = state.get(p + "self_attn.q_b_proj.weight", state.get(p + "self_attn.q_proj.weight"))
        rows = (q.shape[0] if q is not None else 0, state[p + "self_attn.kv_b_proj.weight"].shape[0],
                state[p + "self_attn.o_proj.weight"].shape[1])  # fmt: skip
        if rows != (heads * (nope + rope), heads * (nope + v), heads * v):
            raise UsageError(
                f"block {i}'s latent attention shapes {rows} do not fit {heads} heads of the config's widths"
            )
        ffn.append(_ffn_width(state, p, arch))
    n = config.num_hidden_layers
    return {"head_dim": nope + rope, "key_length": latent + rope, "value_length": latent, "rope_dims": rope,
            "kv": [1] * n, "ffn": ffn}  # fmt: skip


_ROUTED_NAMES = (  # DeepSeek's routing bias (V3, GLM-4.5) and shared experts
    (r"model\.layers\.(\d+)\.mlp\.gate\.e_score_correction_bias", "blk.{}.exp_probs_b.bias"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.gate_proj\.weight", "blk.{}.ffn_gate_shexp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.up_proj\.weight", "blk.{}.ffn_up_shexp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_experts\.down_proj\.weight", "blk.{}.ffn_down_shexp.weight"),
)
_DEEPSEEK_NAMES = (  # the latent attention's projections and norms
    (r"model\.layers\.(\d+)\.self_attn\.q_a_proj\.weight", "blk.{}.attn_q_a.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_a_layernorm\.weight", "blk.{}.attn_q_a_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_b_proj\.weight", "blk.{}.attn_q_b.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_a_proj_with_mqa\.weight", "blk.{}.attn_kv_a_mqa.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.kv_a_layernorm\.weight", "blk.{}.attn_kv_a_norm.weight"),
    *_ROUTED_NAMES,
)
_DEEPSEEK = Architecture(
    "deepseek2",
    False,
    (),
    "default",
    names=_DEEPSEEK_NAMES,
    check=_check_deepseek,
    metadata=_deepseek_metadata,
    layout=_mla_layout,
    tensors=_mla_split,
)
_GPT_OSS_NAMES = (
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{}.post_attention_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.sinks", "blk.{}.attn_sinks.weight"),  # one logit a head
    (r"model\.layers\.(\d+)\.mlp\.router\.weight", "blk.{}.ffn_gate_inp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.router\.bias", "blk.{}.ffn_gate_inp.bias"),
)
_PHI3_NAMES = (
    (r"model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight", "blk.{}.attn_qkv.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight", "blk.{}.ffn_up.weight"),  # gate rows first, then up
)
_QWEN2_MOE_NAMES = (  # the shared expert beside the routed ones, and its sigmoid gate ([1, hidden])
    (r"model\.layers\.(\d+)\.mlp\.shared_expert\.gate_proj\.weight", "blk.{}.ffn_gate_shexp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert\.up_proj\.weight", "blk.{}.ffn_up_shexp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert\.down_proj\.weight", "blk.{}.ffn_down_shexp.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight", "blk.{}.ffn_gate_inp_shexp.weight"),
)
_GRANITEMOE_NAMES = (  # Granite 3 MoE's router and experts, under `block_sparse_moe`; a shared expert's down
    (r"model\.layers\.(\d+)\.block_sparse_moe\.router\.weight", "blk.{}.ffn_gate_inp.weight"),
    (r"model\.layers\.(\d+)\.shared_mlp\.output_linear\.weight", "blk.{}.ffn_down_shexp.weight"),
)
# GLM-4 (0414): gate and up fused, gate rows first (llama.cpp's SwiGLU halves); a norm after each sublayer
_GLM4_NAMES = (
    (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.weight", "blk.{}.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.post_self_attn_layernorm\.weight", "blk.{}.post_attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_mlp_layernorm\.weight", "blk.{}.post_ffw_norm.weight"),
)
_HUNYUAN_NAMES = (  # per-head Q/K norms, applied after RoPE in both libraries
    (r"model\.layers\.(\d+)\.self_attn\.query_layernorm\.weight", "blk.{}.attn_q_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.key_layernorm\.weight", "blk.{}.attn_k_norm.weight"),
)
_GRANITEMOE = Architecture("granitemoe", True, (), "default", names=_GRANITEMOE_NAMES, metadata=_granitemoe_metadata)
_SEED_OSS_NAMES = ((r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{}.post_attention_norm.weight"),)
_LFM2_NAMES = (  # LFM2's blocks: a short convolution or attention, a SwiGLU MLP (w1, w3, w2), the final norm
    (r"model\.embedding_norm\.weight", "token_embd_norm.weight"),
    (r"model\.layers\.(\d+)\.operator_norm\.weight", "blk.{}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.ffn_norm\.weight", "blk.{}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.conv\.(conv|in_proj|out_proj)\.weight", "blk.{}.shortconv.{}.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.out_proj\.weight", "blk.{}.attn_output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k)_layernorm\.weight", "blk.{}.attn_{}_norm.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.w1\.weight", "blk.{}.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.w3\.weight", "blk.{}.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.feed_forward\.w2\.weight", "blk.{}.ffn_down.weight"),
)
# GLM-4.5: the norm before the MLP under llama.cpp's `post_attention_norm` name too; DeepSeek's routing tensors
_GLM4_MOE_NAMES = (*_SEED_OSS_NAMES, *_ROUTED_NAMES)
_GEMMA_NAMES = (
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{}.post_attention_norm.weight"),
    (r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.weight", "blk.{}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_feedforward_layernorm\.weight", "blk.{}.post_ffw_norm.weight"),
)
# Gemma 4's chat markers that llama.cpp's converter writes as user-defined tokens, rendered as text (not as
# control tokens, which detokenize to nothing), so that llama.cpp's chat parser reads them
_GEMMA4_SHOWN = frozenset(("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                           "<tool_response|>", '<|"|>'))  # fmt: skip
_PER_LAYER_NAMES = (  # per-layer input embeddings (Gemma 3n, Gemma 4 E2B / E4B)
    (r"model\.layers\.(\d+)\.per_layer_input_gate\.weight", "blk.{}.inp_gate.weight"),
    (r"model\.layers\.(\d+)\.per_layer_projection\.weight", "blk.{}.proj.weight"),
    (r"model\.layers\.(\d+)\.post_per_layer_input_norm\.weight", "blk.{}.post_norm.weight"),
    (r"model\.embed_tokens_per_layer\.weight", "per_layer_token_embd.weight"),
    (r"model\.per_layer_model_projection\.weight", "per_layer_model_proj.weight"),
    (r"model\.per_layer_projection_norm\.weight", "per_layer_proj_norm.weight"),
)
_GEMMA4_NAMES = (  # Gemma 3's four norms a block, an MoE block's three more, per-layer embeddings, a layer scale
    *_GEMMA_NAMES,
    *_PER_LAYER_NAMES,
    (r"model\.layers\.(\d+)\.pre_feedforward_layernorm_2\.weight", "blk.{}.pre_ffw_norm_2.weight"),
    (r"model\.layers\.(\d+)\.post_feedforward_layernorm_(1|2)\.weight", "blk.{}.post_ffw_norm_{}.weight"),
    (r"model\.layers\.(\d+)\.layer_scalar", "blk.{}.layer_output_scale.weight"),
)
_GEMMA3N_NAMES = (  # Gemma 3's four norms a block, per-layer embeddings, AltUp and LAuReL
    *_GEMMA_NAMES,
    *_PER_LAYER_NAMES,
    (r"model\.layers\.(\d+)\.altup\.correct_output_scale", "blk.{}.altup_correct_scale.weight"),
    (r"model\.layers\.(\d+)\.altup\.correction_coefs\.weight", "blk.{}.altup_correct_coef.weight"),
    (r"model\.layers\.(\d+)\.altup\.prediction_coefs\.weight", "blk.{}.altup_predict_coef.weight"),
    (r"model\.layers\.(\d+)\.altup\.modality_router\.weight", "blk.{}.altup_router.weight"),
    (r"model\.layers\.(\d+)\.altup\.router_norm\.weight", "blk.{}.altup_router_norm.weight"),
    (r"model\.layers\.(\d+)\.laurel\.linear_left\.weight", "blk.{}.laurel_l.weight"),
    (r"model\.layers\.(\d+)\.laurel\.linear_right\.weight", "blk.{}.laurel_r.weight"),
    (r"model\.layers\.(\d+)\.laurel\.post_laurel_norm\.weight", "blk.{}.laurel_post_norm.weight"),
)
_OLMO_NAMES = (  # no norm before attention or MLP: one after each, on the sublayer's output
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{}.post_attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_feedforward_layernorm\.weight", "blk.{}.post_ffw_norm.weight"),
)
_STABLELM_NAMES = (  # LayerNorms: a bias beside each weight
    (r"model\.layers\.(\d+)\.input_layernorm\.bias", "blk.{}.attn_norm.bias"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.bias", "blk.{}.ffn_norm.bias"),
    (r"model\.norm\.bias", "output_norm.bias"),
)
_STARCODER2_NAMES = (  # StableLM's LayerNorm biases, and an MLP of two Linears with biases
    *_STABLELM_NAMES,
    (r"model\.layers\.(\d+)\.mlp\.c_fc\.(weight|bias)", "blk.{}.ffn_up.{}"),
    (r"model\.layers\.(\d+)\.mlp\.c_proj\.(weight|bias)", "blk.{}.ffn_down.{}"),
)
_PHI2_NAMES = (  # Phi-1/1.5/2: one LayerNorm a block, attention and MLP side by side, biases everywhere
    (r"model\.layers\.(\d+)\.input_layernorm\.(weight|bias)", "blk.{}.attn_norm.{}"),
    (r"model\.layers\.(\d+)\.self_attn\.dense\.(weight|bias)", "blk.{}.attn_output.{}"),
    (r"model\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", "blk.{}.ffn_up.{}"),
    (r"model\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", "blk.{}.ffn_down.{}"),
    (r"model\.final_layernorm\.(weight|bias)", "output_norm.{}"),
    (r"lm_head\.bias", "output.bias"),
)
# OLMo 2 and 3, one llama.cpp architecture: rotate-half RoPE (no permutation), Q and K norms over the whole projection
_OLMO = Architecture(
    "olmo2", False, (), "default", names=_OLMO_NAMES, check=_check_olmo, metadata=_window_metadata, query_is_hidden=True
)


def _as_llama_caveats(config: Any) -> list[str]:
    return [
        f"written as llama.cpp's llama, not qwen2: its qwen2 graph takes query heads as wide as the hidden size, and "
        f"these {config.num_attention_heads} heads are narrower (the same computation: Q and K rows permuted to "
        "llama's interleaved RoPE, their biases with them)"
    ]


# Qwen2 with fewer query heads than the hidden size holds: llama.cpp's llama graph sizes the query rows by
# the heads and takes optional Q/K/V biases; its interleaved RoPE needs the Q and K rows (and biases) permuted
_QWEN2_AS_LLAMA = Architecture("llama", True, ("q_proj", "k_proj", "v_proj"), "qwen2", caveats=_as_llama_caveats)
# the MLP and final-norm names of the hybrids built on Granite 4.0 H's and Jamba's layout (`feed_forward`,
# `pre_ff_layernorm`, `final_layernorm`): Bamba, Falcon-H1 (its own ffn_norm), Jamba
_PRE_FF_NORM = (r"model\.layers\.(\d+)\.pre_ff_layernorm\.weight", "blk.{}.ffn_norm.weight")
_FEED_FORWARD = (
    (r"model\.layers\.(\d+)\.feed_forward\.(gate|up|down)_proj\.weight", "blk.{}.ffn_{}.weight"),
    (r"model\.final_layernorm\.weight", "output_norm.weight"),
)

ARCHITECTURES = {
    "llama": Architecture("llama", True, (), "default"),
    "mistral": Architecture("llama", True, (), "default", caveats=_window_caveats),
    # Ministral 3: Llama's blocks (Q/K permuted), YaRN, Llama 4's attention temperature
    "ministral3": Architecture("mistral3", True, (), "default", check=_check_ministral3, metadata=_ministral3_metadata),
    "smollm3": Architecture("smollm3", True, (), "default", check=_check_smollm3),
    "granite": Architecture("granite", True, (), "default", metadata=_granite_metadata),
    "qwen2": Architecture(
        "qwen2", False, ("q_proj", "k_proj", "v_proj"), "qwen2", query_is_hidden=True, narrow=_QWEN2_AS_LLAMA
    ),
    "qwen3": Architecture("qwen3", False, (), "qwen2"),
    # ERNIE 4.5 (dense): Llama's blocks with RoPE on interleaved pairs in both libraries (no permutation),
    # Q/K/V/O biases when the config has them (`use_bias`; llama.cpp holds no MLP bias)
    "ernie4_5": Architecture("ernie4_5", False, ("q_proj", "k_proj", "v_proj", "o_proj"), "default"),
    "olmo2": _OLMO,
    # EXAONE 4: OLMo 2's norms after attention and MLP, per-head Q/K norms, rotate-half RoPE (no permutation)
    "exaone4": Architecture(
        "exaone4", False, (), "default", names=_OLMO_NAMES, check=_check_exaone4, query_is_hidden=True
    ),
    "olmo3": _OLMO,
    # StableLM (2): rotate-half RoPE over a quarter of each head, LayerNorms with biases, Q/K/V biases (3B)
    "stablelm": Architecture(
        "stablelm",
        False,
        ("q_proj", "k_proj", "v_proj", "input_layernorm", "post_attention_layernorm", "norm"),
        "default",
        names=_STABLELM_NAMES,
        check=_check_stablelm,
        metadata=_stablelm_metadata,
        query_is_hidden=True,
    ),
    # StarCoder2: rotate-half RoPE in llama.cpp too (no permutation), LayerNorms and every Linear with biases
    "starcoder2": Architecture(
        "starcoder2",
        False,
        (
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "input_layernorm",
            "post_attention_layernorm",
            "norm",
            "c_fc",
            "c_proj",
        ),
        "default",
        names=_STARCODER2_NAMES,
        check=_check_starcoder2,
        caveats=_window_caveats,
        query_is_hidden=True,
    ),
    # Phi-1, 1.5 and 2: rotate-half RoPE over part of each head in llama.cpp too (no permutation)
    "phi": Architecture(
        "phi2",
        False,
        ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "input_layernorm", "final_layernorm", "lm_head"),
        "default",
        names=_PHI2_NAMES,
        check=_check_phi2,
        query_is_hidden=True,
    ),
    # Cohere (Command R, Aya): attention and MLP side by side on one LayerNorm (no bias), interleaved
    # RoPE in both libraries (no permutation), logits scaled
    "cohere": Architecture(
        "command-r", False, (), "default", check=_check_cohere, metadata=_cohere_metadata, query_is_hidden=True
    ),
    # Cohere 2 (Command R7B): Cohere's tensors, sliding layers with RoPE, global layers without
    "cohere2": Architecture(
        "cohere2", False, (), "default", check=_check_cohere2, metadata=_cohere2_metadata, query_is_hidden=True
    ),
    # GLM-4 (0414): Q/K/V biases, GPT-J-style RoPE over part of each head (llama.cpp's too: unpermuted),
    # the MLP's gate and up fused, a norm after attention and after the MLP besides the usual two; query
    # heads sized by heads x head_dim in llama.cpp's graph (narrower and wider than the hidden size load)
    "glm4": Architecture(
        "glm4", False, ("q_proj", "k_proj", "v_proj"), "default", names=_GLM4_NAMES, check=_check_glm4
    ),
    # HunYuan dense: Llama's tensors unpermuted, per-head Q/K norms after RoPE, an NTK-alpha RoPE base
    "hunyuan_v1_dense": Architecture(
        "hunyuan-dense", False, (), "default", names=_HUNYUAN_NAMES, check=_check_hunyuan_dense, theta=_hunyuan_theta
    ),
    # Arcee (AFM-4.5B): Llama's tensors, Q/K permuted, a squared-ReLU MLP of up/down, YaRN as keys
    "arcee": Architecture("arcee", True, (), "default", check=_check_arcee, metadata=_yarn_metadata),
    # Seed-OSS: Llama's tensors with Q/K/V biases, rotate-half RoPE in llama.cpp too (unpermuted); the norm
    # before its MLP under llama.cpp's `post_attention_norm` name
    "seed_oss": Architecture(
        "seed_oss", False, ("q_proj", "k_proj", "v_proj"), "default", names=_SEED_OSS_NAMES, check=_check_seed_oss
    ),
    # OLMo (1): LayerNorms without weights (no norm tensors), Llama's Q/K permutation, QKV clipping
    "olmo": Architecture("olmo", True, (), "default", metadata=_olmo1_metadata),
    # Nemotron-4 and Minitron: LayerNorms with biases scaling by 1 + w (as Gemma's), a squared-ReLU MLP of
    # two Linears, rotate-half RoPE over part of each head (llama.cpp's too: unpermuted)
    "nemotron": Architecture(
        "nemotron",
        False,
        ("input_layernorm", "post_attention_layernorm", "norm"),
        "default",
        norm_offset=1.0,
        names=_STABLELM_NAMES,
        check=_check_nemotron,
    ),
    # Gemma 1 (and CodeGemma): Llama's tensors unpermuted, its norms scaled by 1 + w
    "gemma": Architecture("gemma", False, (), "default", norm_offset=1.0, check=_check_gemma),
    "gemma2": Architecture(
        "gemma2",
        False,
        (),
        "default",
        norm_offset=1.0,
        names=_GEMMA_NAMES,
        check=_check_gemma2,
        metadata=_gemma2_metadata,
    ),
    "gemma3_text": Architecture(
        "gemma3",
        False,
        (),
        "default",
        norm_offset=1.0,
        names=_GEMMA_NAMES,
        check=_check_gemma3,
        metadata=_gemma3_metadata,
    ),
    # Gemma 3n (text; E2B, E4B): Gemma 3's blocks with RMSNorms scaling by w, four AltUp streams, LAuReL,
    # per-layer embeddings, keys and values reused from block 20 on, activation sparsity in the first 10 blocks
    "gemma3n_text": Architecture(
        "gemma3n",
        False,
        (),
        "default",
        names=_GEMMA3N_NAMES,
        check=_check_gemma3n,
        metadata=_gemma3n_metadata,
        layout=_gemma3n_layout,
        tensors=_gemma3n_tensors,
        caveats=_gemma3n_caveats,
        stacked=(
            (r"model\.altup_projections\.(\d+)\.weight", "altup_proj.weight"),
            (r"model\.altup_unembed_projections\.(\d+)\.weight", "altup_unembd_proj.weight"),
        ),
    ),
    # Gemma 4 (text; E2B, E4B, 31B, 26B-A4B): Gemma 3's blocks with RMSNorms scaling by w (no offset), sliding
    # and global layers of different head widths and key/value heads, the global ones' proportional RoPE as
    # `rope_freqs`, keys and values shared across the last layers, per-layer embeddings, an MoE beside the
    # MLP; its tokenizer as llama.cpp's own `gemma4` BPE
    "gemma4_text": Architecture(
        "gemma4",
        False,
        (),
        "default",
        names=_GEMMA4_NAMES,
        check=_check_gemma4,
        metadata=_gemma4_metadata,
        layout=_gemma4_layout,
        tensors=_gemma4_tensors,
        spm_tokenizer="gemma4",
        shown_tokens=_GEMMA4_SHOWN,
        computed=lambda config: [("rope_freqs.weight", _gemma4_rope_freqs(config))],
    ),
    # DeepSeek V2 and V3 (Kimi K2, Moonlight): latent attention, leading dense blocks, shared experts
    "deepseek_v2": _DEEPSEEK,
    "deepseek_v3": _DEEPSEEK,
    "glm4_moe_lite": _DEEPSEEK,  # GLM-4.7-Flash: DeepSeek V3's blocks, its dense ones by `mlp_layer_types`
    # ERNIE 4.5 MoE (21B-A3B, 300B-A47B): ERNIE 4.5's attention (interleaved RoPE, unpermuted), softmax
    # routing with a correction bias choosing the experts, experts every n-th block after the first ones
    "ernie4_5_moe": Architecture(
        "ernie4_5-moe",
        False,
        ("q_proj", "k_proj", "v_proj"),
        "default",
        names=(
            (r"model\.layers\.(\d+)\.mlp\.gate\.moe_statics\.e_score_correction_bias", "blk.{}.exp_probs_b.bias"),
            *_ROUTED_NAMES,
        ),
        check=_check_ernie4_5_moe,
        metadata=_ernie4_5_moe_metadata,
    ),
    # Hunyuan-A13B: HunYuan dense's attention (Q/K norms after RoPE, NTK-alpha base), a shared MLP beside
    # experts of its width, softmax routing renormalized
    "hunyuan_v1_moe": Architecture(
        "hunyuan-moe",
        False,
        (),
        "default",
        names=(
            *_HUNYUAN_NAMES,
            (r"model\.layers\.(\d+)\.mlp\.gate\.wg\.weight", "blk.{}.ffn_gate_inp.weight"),
            (r"model\.layers\.(\d+)\.mlp\.shared_mlp\.(gate|up|down)_proj\.weight", "blk.{}.ffn_{}_shexp.weight"),
        ),
        check=_check_hunyuan_moe,
        metadata=_hunyuan_moe_metadata,
        theta=_hunyuan_theta,
    ),
    # MiniMax-M2: whole-projection Q/K norms (OLMo 2's), rotate-half RoPE over part of each head (unpermuted),
    # sigmoid routing with a correction bias, no shared expert
    "minimax_m2": Architecture(
        "minimax-m2",
        False,
        (),
        "default",
        names=((r"model\.layers\.(\d+)\.mlp\.e_score_correction_bias", "blk.{}.exp_probs_b.bias"),),
        check=_check_minimax_m2,
        metadata=_minimax_m2_metadata,
    ),
    # Llama 4 (Scout, Maverick; text): Llama's attention with RoPE on interleaved pairs (unpermuted), a
    # shared expert beside experts stored by columns, sigmoid top-k scores weighting each expert's input
    "llama4_text": Architecture(
        "llama4",
        False,
        (),
        "default",
        names=(
            (r"model\.layers\.(\d+)\.feed_forward\.router\.weight", "blk.{}.ffn_gate_inp.weight"),
            (r"model\.layers\.(\d+)\.feed_forward\.(gate|up|down)_proj\.weight", "blk.{}.ffn_{}.weight"),
            (
                r"model\.layers\.(\d+)\.feed_forward\.shared_expert\.(gate|up|down)_proj\.weight",
                "blk.{}.ffn_{}_shexp.weight",
            ),
        ),
        check=_check_llama4,
        metadata=_llama4_metadata,
        experts="columns",
    ),
    # LFM2 (Liquid): blocks of a gated short convolution or of attention (per-head Q/K norms, rotate-half
    # RoPE: unpermuted), each with a SwiGLU MLP (w1, w3, w2); the final norm under `embedding_norm`
    "lfm2": Architecture(
        "lfm2", False, (), "default", names=_LFM2_NAMES, check=_check_lfm2, metadata=_lfm2_metadata, recurrent="conv"
    ),
    # LFM2-MoE (LFM2-8B-A1B): LFM2's blocks, experts after the first dense ones, sigmoid routing with a bias
    "lfm2_moe": Architecture(
        "lfm2moe",
        False,
        (),
        "default",
        names=(
            *_LFM2_NAMES,
            (r"model\.layers\.(\d+)\.feed_forward\.gate\.weight", "blk.{}.ffn_gate_inp.weight"),
            (r"model\.layers\.(\d+)\.feed_forward\.expert_bias", "blk.{}.exp_probs_b.bias"),
        ),
        check=_check_lfm2_moe,
        metadata=_lfm2_moe_metadata,
        recurrent="conv",
    ),
    # Granite 4.0 H: Mamba-2 blocks beside attention ones (Granite's, NoPE unless the config rotates), experts
    # and a shared expert (or, without experts, the shared MLP as the MLP), Granite's multipliers
    "granitemoehybrid": Architecture(
        "granitehybrid",
        True,
        ("conv1d",),
        "default",
        names=_GRANITEMOE_NAMES,
        check=_check_granite_hybrid,
        metadata=_granite_hybrid_metadata,
        recurrent="mamba",
        tensors=_mamba2_tensors,
    ),
    # Bamba: Granite 4.0 H's blocks without experts or multipliers (llama.cpp's granitehybrid), RoPE over half
    # of each head (Q and K rows permuted over the rotated half)
    "bamba": Architecture(
        "granitehybrid",
        True,
        ("conv1d",),
        "default",
        names=(_PRE_FF_NORM, *_FEED_FORWARD),
        check=_check_bamba,
        metadata=_bamba_metadata,
        recurrent="mamba",
        tensors=_mamba2_tensors,
    ),
    # Falcon-H1: Mamba-2 and attention side by side in every block on one norm, then a SwiGLU MLP; its µP
    # multipliers folded into the weights (`_falcon_h1_tensors`)
    "falcon_h1": Architecture(
        "falcon-h1",
        False,
        ("conv1d",),
        "default",
        names=(
            # llama.cpp's falcon-h1 reads the MLP's norm without the ".weight" suffix
            (r"model\.layers\.(\d+)\.pre_ff_layernorm\.weight", "blk.{}.ffn_norm"),
            *_FEED_FORWARD,
            (r"model\.layers\.(\d+)\.mamba\.in_proj\.weight", "blk.{}.ssm_in.weight"),
            (r"model\.layers\.(\d+)\.mamba\.out_proj\.weight", "blk.{}.ssm_out.weight"),
        ),
        check=_check_falcon_h1,
        metadata=_mamba2_metadata,
        tensors=_falcon_h1_tensors,
    ),
    # Mamba (state-spaces' Mamba, Falcon-Mamba: the time step, B and C RMS-normed) and Mamba-2 (Mamba-Codestral):
    # Mamba blocks only, each a norm and a mixer
    **{
        model_type: Architecture(
            "mamba2" if model_type == "mamba2" else "mamba",
            False,
            ("conv1d",) if model_type == "mamba2" else ("conv1d", "dt_proj"),
            "gpt-2",
            names=_MAMBA_NAMES,
            check=_check_mamba,
            metadata=_mamba_metadata,
            tensors=_mamba2_tensors if model_type == "mamba2" else _mamba1_tensors,
            layout=_mamba_layout,
        )
        for model_type in ("mamba", "falcon_mamba", "mamba2")
    },
    # Jamba: Mamba (1) blocks and attention blocks (no RoPE), each with a dense MLP or experts
    "jamba": Architecture(
        "jamba",
        False,
        ("conv1d", "dt_proj"),
        "default",
        names=(
            _PRE_FF_NORM,
            *_FEED_FORWARD,
            (r"model\.layers\.(\d+)\.feed_forward\.router\.weight", "blk.{}.ffn_gate_inp.weight"),
        ),
        check=_check_jamba,
        metadata=_jamba_metadata,
        recurrent="mamba",
        tensors=_mamba1_tensors,
    ),
    # Nemotron-H (Nemotron Nano 2): blocks of one kind each, Mamba-2, attention (no RoPE) or a squared-ReLU MLP
    "nemotron_h": Architecture(
        "nemotron_h",
        False,
        ("conv1d",),
        "default",
        names=(
            (r"model\.embeddings\.weight", "token_embd.weight"),
            (r"model\.norm_f\.weight", "output_norm.weight"),
            (r"model\.layers\.(\d+)\.norm\.weight", "blk.{}.attn_norm.weight"),
            (r"model\.layers\.(\d+)\.mixer\.(q|k|v)_proj\.weight", "blk.{}.attn_{}.weight"),
            (r"model\.layers\.(\d+)\.mixer\.o_proj\.weight", "blk.{}.attn_output.weight"),
            (r"model\.layers\.(\d+)\.mixer\.(up|down)_proj\.weight", "blk.{}.ffn_{}.weight"),
        ),
        check=_check_nemotron_h,
        metadata=_nemotron_h_metadata,
        tensors=_mamba2_tensors,
        layout=_nemotron_h_layout,
    ),
    # Qwen3.5 (text; of an image-text checkpoint too): Gated DeltaNet blocks and gated full-attention ones
    # (per-head Q/K norms, rotate-half RoPE over a quarter of each head), RMSNorms scaling by 1 + w
    "qwen3_5_text": Architecture(
        "qwen35",
        False,
        (),
        "qwen2",
        check=_check_qwen35,
        metadata=_qwen35_metadata,
        layout=_qwen35_layout,
        tensors=_qwen35_tensors,
    ),
    # Qwen3.5-MoE (35B-A3B to 397B-A17B): Qwen3.5's blocks with Qwen2-MoE's experts (top-k renormalized, as
    # llama.cpp's qwen35moe does) and sigmoid-gated shared expert in every block
    "qwen3_5_moe_text": Architecture(
        "qwen35moe",
        False,
        (),
        "qwen2",
        names=_QWEN2_MOE_NAMES,
        check=_check_qwen35,
        metadata=_qwen35_moe_metadata,
        layout=_qwen35_layout,
        tensors=_qwen35_tensors,
    ),
    # Qwen3-Next (80B-A3B): Qwen3.5-MoE's blocks before Qwen3.5, the DeltaNet's projections fused per key head
    # (`in_proj_qkvz`, `in_proj_ba`), no multimodal RoPE
    "qwen3_next": Architecture(
        "qwen3next",
        False,
        (),
        "qwen2",
        names=_QWEN2_MOE_NAMES,
        check=_check_qwen3_next,
        metadata=_qwen3_next_metadata,
        layout=_qwen35_layout,
        tensors=_qwen3_next_tensors,
    ),
    # Apertus: Llama's attention with per-head Q/K norms, rotate-half RoPE in llama.cpp too (unpermuted), Llama 3
    # RoPE scaling, an xIELU MLP of up and down whose parameters go in as keys
    "apertus": Architecture(
        "apertus",
        False,
        (),
        "default",
        names=(
            (r"model\.layers\.(\d+)\.attention_layernorm\.weight", "blk.{}.attn_norm.weight"),
            (r"model\.layers\.(\d+)\.feedforward_layernorm\.weight", "blk.{}.ffn_norm.weight"),
        ),
        check=_check_apertus,
        weight_metadata=_apertus_weight_metadata,
        tensors=_apertus_tensors,
    ),
    # dots.llm1: Qwen3's attention (per-head Q/K norms, rotate-half RoPE), DeepSeek V3's routing and blocks
    "dots1": Architecture(
        "dots1", False, (), "qwen2", names=_ROUTED_NAMES, check=_check_dots1, metadata=_sigmoid_routing_metadata
    ),
    # GLM-4.5 (and -Air): Llama-style attention with Q/K/V biases and optional per-head Q/K norms, rotate-half
    # RoPE over half of each head (unpermuted), DeepSeek V3's routing, leading dense blocks, shared experts
    "glm4_moe": Architecture(
        "glm4moe",
        False,
        ("q_proj", "k_proj", "v_proj"),
        "default",
        names=_GLM4_MOE_NAMES,
        check=_check_glm4_moe,
        metadata=_sigmoid_routing_metadata,
    ),
    # softmax routing with the top-k weights renormalized in llama.cpp's llama graph, as in transformers' Mixtral
    "mixtral": Architecture("llama", True, (), "default", metadata=_moe_metadata, caveats=_window_caveats),
    "qwen3_moe": Architecture("qwen3moe", False, (), "qwen2", check=_check_qwen3_moe, metadata=_moe_metadata),
    # Granite 3 MoE: Granite's multipliers, its experts under `block_sparse_moe`, softmax over the
    # top-k logits (the top-k weights renormalized, as llama.cpp's granitemoe computes); the same with a
    # shared expert beside the routed ones (its gate and up fused, gate first)
    "granitemoe": _GRANITEMOE,
    "granitemoeshared": _GRANITEMOE,
    # OLMoE: Llama's norms, whole-projection Q/K norms (as OLMo 2's), softmax routing not renormalized
    "olmoe": Architecture(
        "olmoe", False, (), "default", check=_check_olmoe, metadata=_moe_metadata, query_is_hidden=True
    ),
    # attention sinks, biases everywhere, a clamped SwiGLU over interleaved gate/up experts, YaRN
    "gpt_oss": Architecture(
        "gpt-oss",
        False,
        ("q_proj", "k_proj", "v_proj", "o_proj", "router"),
        "default",
        names=_GPT_OSS_NAMES,
        check=_check_gpt_oss,
        metadata=_gpt_oss_metadata,
        caveats=_gpt_oss_caveats,
        experts="interleaved",
    ),
    "qwen2_moe": Architecture(
        "qwen2moe",
        False,
        ("q_proj", "k_proj", "v_proj"),
        "qwen2",
        names=_QWEN2_MOE_NAMES,
        check=_check_qwen2_moe,
        metadata=_moe_metadata,
        query_is_hidden=True,
    ),
    "phi3": Architecture(
        "phi3",
        False,
        (),
        "default",
        names=_PHI3_NAMES,
        check=_check_phi3,
        metadata=_phi3_metadata,
        fused=True,
        caveats=_phi3_caveats,
        query_is_hidden=True,
    ),
}
_NAMES = [
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.bias", "blk.{}.attn_q.bias"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.bias", "blk.{}.attn_k.bias"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.bias", "blk.{}.attn_v.bias"),
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blk.{}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "blk.{}.attn_q.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "blk.{}.attn_k.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "blk.{}.attn_v.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "blk.{}.attn_output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.bias", "blk.{}.attn_output.bias"),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", "blk.{}.attn_q_norm.weight"),  # Qwen3: per head
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", "blk.{}.attn_k_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "blk.{}.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "blk.{}.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "blk.{}.ffn_down.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", "blk.{}.ffn_gate_inp.weight"),  # an MoE's router
    # [E, hidden, ff]; under `block_sparse_moe` (Granite 3 MoE) or `feed_forward` (LFM2-MoE) too
    (r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe|feed_forward)\.experts\.down_proj", "blk.{}.ffn_down_exps.weight"),
]
# one tensor as two of llama.cpp's, its first and second halves along a dimension, gate first: an MoE's
# fused experts' gate and up rows ([E, 2·ff, hidden]), and Granite MoE's shared expert's ([2·ff, hidden])
_HALVES = (
    (
        r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe|feed_forward)\.experts\.gate_up_proj",
        1,
        ("ffn_gate_exps", "ffn_up_exps"),
    ),
    (r"model\.layers\.(\d+)\.shared_mlp\.input_linear\.weight", 0, ("ffn_gate_shexp", "ffn_up_shexp")),
)
_ROUTER = "ffn_gate_inp.weight"  # kept float32, as llama.cpp's conversion keeps it: it chooses the experts


def _keep_f32(target: str) -> bool:
    """Written float32 whatever the type: the router, biases (gpt-oss's experts' are [E, ff]), norms
    (Cohere's per-head Q/K norms are [heads, head_dim]), LFM2's and Mamba-2's convolution kernels and
    Mamba-2's A and D (llama.cpp's ssm ops take them in float32, as its converter writes them), Gemma 3n's
    AltUp coefficients (as its converter writes them)."""
    return target.endswith((_ROUTER, ".bias", "norm.weight", _CONV, ".ssm_a", ".ssm_d", "ssm_conv1d.weight",
                            "altup_correct_coef.weight", "altup_predict_coef.weight"))  # fmt: skip


# one row written 1-D (float32): Qwen2-MoE's shared expert gate [1, hidden], ERNIE 4.5's routing bias [1, E]
_ROWS = ("ffn_gate_inp_shexp.weight", "exp_probs_b.bias")
_CONV = "shortconv.conv.weight"  # LFM2's short convolution's kernel, one row of L taps a channel


def gguf_name(name: str, arch: Architecture | None = None) -> str:
    """llama.cpp's name of a Hugging Face parameter; a UsageError for one it has none for."""
    for pattern, target in (*(arch.names if arch else ()), *_NAMES):
        m = re.fullmatch(pattern, name)
        if m:
            return target.format(*m.groups())
    raise UsageError(f"llama.cpp has no tensor for {name!r} in this architecture: this layout cannot be exported")


def _permute(w: np.ndarray, n_head: int, rot: int | None = None) -> np.ndarray:
    """Hugging Face's rotate-half Q/K rows to GGML's interleaved rope layout (convert_hf_to_gguf's permute),
    over the first `rot` rows of each head (the rotated ones; all of them by default), the others as
    they are."""
    head = w.shape[0] // n_head
    rot = rot or head
    h = w.reshape(n_head, head, *w.shape[1:])
    turned = h[:, :rot].reshape(n_head, 2, rot // 2, *w.shape[1:]).swapaxes(1, 2).reshape(n_head, rot, *w.shape[1:])
    return np.concatenate([turned, h[:, rot:]], axis=1).reshape(w.shape)


def architecture(model_type: Any) -> Architecture:
    if model_type not in ARCHITECTURES:
        names = ", ".join(ARCHITECTURES)
        raise UsageError(
            f"GGUF export supports Llama-style, SmolLM3, Granite, Qwen2, Qwen3, OLMo 1, 2 and 3, StableLM, Cohere, "
            "GLM-4, Nemotron, Seed-OSS, Arcee, HunYuan, Gemma 1, 2, 3, 3n and 4 text, Phi-3, ERNIE 4.5, EXAONE 4, "
            "Ministral 3, StarCoder2, Phi-1/1.5/2, Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Granite MoE (also shared), "
            "gpt-oss, DeepSeek V2/V3, GLM-4.5, GLM-4.7-Flash, dots.llm1, ERNIE 4.5 MoE, Hunyuan-A13B, MiniMax-M2, "
            "Llama 4 (text), LFM2 (also MoE), Granite 4.0 H, Bamba, Falcon-H1, Jamba, Nemotron-H, Apertus, Mamba, "
            "Falcon-Mamba, Mamba-2, Qwen3.5, Qwen3.5-MoE and Qwen3-Next "
            f"models ({names}) so far; "
            f"this is {model_type!r}"
        )
    return ARCHITECTURES[model_type]


def check_config(config: Any) -> Architecture:
    """The config's architecture, after refusing what llama.cpp's graph for it computes differently:
    `Architecture.narrow` in place of one that cannot hold the config's query heads."""
    arch = architecture(config.model_type)
    if arch.check is not None:
        arch.check(config)
    else:
        _check_plain_rope(config, arch.gguf)
    if getattr(config, "use_sliding_window", False):
        raise UsageError("GGUF export writes full attention; this model uses a sliding window")
    if arch.query_is_hidden and not _query_is_hidden(config):
        if arch.narrow is None:
            raise _query_width_error(config, arch.gguf)
        return arch.narrow
    return arch


def _query_is_hidden(config: Any) -> bool:
    head_dim = _head_dim(config)
    return bool(config.num_attention_heads * head_dim == config.hidden_size)


def _query_width_error(config: Any, gguf: str) -> UsageError:
    """The refusal of query heads narrower or wider than the hidden size where llama.cpp's graph sizes them by it
    (`Architecture.query_is_hidden`) and no other architecture of llama.cpp's computes the same."""
    head_dim = _head_dim(config)
    return UsageError(
        f"llama.cpp's {gguf} takes query heads as wide as the hidden size ({config.hidden_size}); this "
        f"model's {config.num_attention_heads} heads of {head_dim} are {config.num_attention_heads * head_dim} "
        "wide (a structured output that removed heads): extract with --heads-keep 1.0 (MLP width and depth "
        "only) for a GGUF, or export the model before extracting"
    )


def _check_layout(config: Any, state: dict[str, torch.Tensor]) -> tuple[Architecture, dict[str, Any]]:
    """The architecture written and the per-layer widths llama.cpp needs, after refusing what its
    architecture cannot hold."""
    arch = check_config(config)
    extra = sorted(k for k in state if k.endswith(".bias") and k.split(".")[-2] not in arch.biases)
    if extra:
        raise UsageError(f"llama.cpp's {arch.gguf} architecture holds no bias {extra[0]!r}: this model has one")
    if arch.layout is not None:
        return arch, arch.layout(config, state, arch)
    head_dim = _head_dim(config)
    n_layers = config.num_hidden_layers
    ffn, kv = [], []
    for i in range(n_layers):
        p = f"model.layers.{i}."
        if arch.recurrent and f"{p}{arch.recurrent}.in_proj.weight" in state:  # no attention in this block
            ffn.append(_ffn_width(state, p, arch))
            kv.append(0)
            continue
        if arch.fused:  # Phi-3: the query rows, then the key rows, then as many value rows
            qkv = state[p + "self_attn.qkv_proj.weight"].shape[0]
            q_rows, k_rows = config.num_attention_heads * head_dim, (qkv - config.num_attention_heads * head_dim) // 2
            ffn.append(state[p + "mlp.gate_up_proj.weight"].shape[0] // 2)
        else:
            q_rows = state[p + "self_attn.q_proj.weight"].shape[0]
            k_rows = state[p + "self_attn.k_proj.weight"].shape[0]
            ffn.append(_ffn_width(state, p, arch))
        if q_rows != config.num_attention_heads * head_dim or k_rows % head_dim or k_rows <= 0:
            raise UsageError(f"block {i}'s attention shapes ({q_rows}, {k_rows} rows) do not fit llama.cpp's heads")
        kv.append(k_rows // head_dim)
    return arch, {"head_dim": head_dim, "ffn": ffn, "kv": kv}


def _ffn_width(state: dict[str, torch.Tensor], p: str, arch: Architecture) -> int:
    """Block `p`'s MLP width: an MoE's expert width, half a fused gate/up's rows (GLM-4), a gated MLP's
    gate rows (LFM2's w1), or a plain one's first Linear's (StarCoder2's c_fc, Phi's fc1, Nemotron's
    up_proj)."""
    experts = next((state[k] for m in _MLPS if (k := f"{p}{m}.experts.gate_up_proj") in state), None)
    if experts is not None:
        return int(experts.shape[1 if arch.experts == "rows" else 2] // 2)
    if p + "mlp.gate_up_proj.weight" in state:
        return int(state[p + "mlp.gate_up_proj.weight"].shape[0] // 2)
    names = [f"{p}{m}.{n}.weight" for m in _MLPS for n in ("gate_proj", "c_fc", "fc1", "up_proj", "w1")]
    if p + "shared_mlp.input_linear.weight" in state:  # Granite 4.0 H without experts: gate and up fused
        return int(state[p + "shared_mlp.input_linear.weight"].shape[0] // 2)
    return int(next(state[k] for k in names if k in state).shape[0])


# a block's MLP module: `mlp`, Granite 3 MoE's `block_sparse_moe`, Llama 4's `feed_forward`
_MLPS = ("mlp", "block_sparse_moe", "feed_forward")


def _rope(config: Any, layers: str = "full_attention") -> dict[str, Any]:
    """The config's RoPE parameters (of one kind of layer where they are given per kind, as Gemma 3's)."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(rope, dict):
        return {}
    return dict(rope.get(layers) or {}) if any(isinstance(v, dict) for v in rope.values()) else rope


def rope_type(config: Any, layers: str = "full_attention") -> str:
    """The config's RoPE variant ("default" when it scales nothing)."""
    rope = _rope(config, layers)
    return str(rope.get("rope_type", rope.get("type")) or "default")


def _tokenizer_metadata(
    writer: Any, tokenizer: Any, source_gguf: Path | None, arch: Architecture, vocab: int, name: str
) -> list[str]:
    """The tokenizer as GGUF metadata: a byte-level BPE one as llama.cpp's `gpt2` tokenizer model, a
    SentencePiece-style BPE one (byte fallback: Llama 2, Mistral 7B v0.1, Gemma) as its `llama` one, or as
    the architecture's own (`Architecture.spm_tokenizer`: Gemma 4's `gemma4`, a BPE that merges by the
    merge list, its chat markers rendered as text).
    Its token list is padded to the model's `vocab` embedding rows (Qwen2's 151,936 rows hold 151,665
    tokens), and a gap in the tokenizer's ids filled, with unused `[PAD<id>]` tokens, as llama.cpp's
    converter does: llama.cpp sizes the embeddings by the token list and does not load a model whose
    rows it does not count; added tokens
    past the rows are left out (they have no row), other tokens past them refused, as carve's loader
    refuses them (`carve.models.load.check_rows`, one rule for both).  Returns notes on
    what llama.cpp may do otherwise (a split rule carve has no llama.cpp name for, tokens left out)."""
    import gguf

    from carve.models.load import check_rows

    notes: list[str] = []
    data = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UsageError(
            "GGUF export supports BPE tokenizers (byte-level or with byte fallback) so far; this one is not"
        )
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}  # every token by its id, added ones too
    added = set(tokenizer.get_added_vocab().values())
    past = check_rows(tokenizer, vocab, name)
    if past:  # added tokens past the rows (transformers' GGUF reader adds some) have none to embed them
        notes.append(f"the added tokens {', '.join(by_id[i] for i in past)} lie past the model's {vocab} embedding "
                     "rows: left out of the GGUF")  # fmt: skip
    special = set(tokenizer.all_special_ids)
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    merges = [" ".join(m) for m in pairs]
    spm = bool(model.get("byte_fallback"))
    # a row no token names (past the tokenizer, or a gap in its ids) as an unused `[PAD<id>]` token
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab)]
    types = [_token_type(i, t, special, added, spm, arch.shown_tokens) if i in by_id else int(gguf.TokenType.UNUSED)
             for i, t in enumerate(tokens)]  # fmt: skip
    writer.add_tokenizer_model(arch.spm_tokenizer if spm else "gpt2")
    if spm:  # llama.cpp's SentencePiece tokenizer merges by score, not by a merge list (its own BPE ones by
        # the list: the scores are the same there, unused)
        writer.add_token_scores(_merge_scores(tokens, pairs))
        writer.add_add_space_prefix(_prepends_space(data))
    else:
        known = _source_pre_tokenizer(source_gguf) or pretokenize.name_of(data)
        if known is None:
            notes.append(f"carve knows no llama.cpp pre-tokenizer splitting text as this tokenizer does; it wrote "
                         f"{arch.pre!r} (the architecture's): llama.cpp may tokenize some text otherwise than "
                         "transformers")  # fmt: skip
        writer.add_tokenizer_pre(known or arch.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)  # transformers' GGUF loader rebuilds the BPE model from them
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None and token_id >= vocab:
            notes.append(f"the {kind.upper()} token ({token_id}) lies past the token list: not written")
        elif token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    # whether a BOS goes before the text, as the tokenizer does it (llama.cpp's defaults differ by
    # pre-tokenizer: Llama 3's adds one, and a vocabulary without BOS would get token 11 as one)
    writer.add_add_bos_token(_adds_bos(tokenizer))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several, by name (Command R's default, tool_use and rag), as llama.cpp's
        # converter writes them: `default` as the chat template, the others as tokenizer.chat_template.<name>
        template = [{"name": name, "template": text} for name, text in template.items()]
    if template:
        writer.add_chat_template(template)
    return notes


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a")["input_ids"] if bos is not None else []
    return bool(ids) and ids[0] == bos


def _token_type(
    i: int, token: str, special: set[int], added: set[int], spm: bool, shown: frozenset[str] = frozenset()
) -> int:
    """llama.cpp's type of token `i` (`shown`: tokens the architecture writes as user-defined,
    `Architecture.shown_tokens`)."""
    import gguf

    if token in shown:
        return int(gguf.TokenType.USER_DEFINED)
    if i in special:
        return int(gguf.TokenType.CONTROL)
    if i in added:
        return int(gguf.TokenType.USER_DEFINED)
    if spm and re.fullmatch(r"<0x[0-9A-F]{2}>", token):  # byte-fallback tokens
        return int(gguf.TokenType.BYTE)
    return int(gguf.TokenType.NORMAL)


def _merge_scores(tokens: list[str], merges: list[tuple[str, ...]]) -> list[float]:
    """Scores under which llama.cpp's SentencePiece tokenizer (always merge the adjacent pair whose
    joined token scores highest) merges in the BPE merge list's order: a token made by merge r
    scores -r (its first merge, when several make it); tokens no merge makes score below all."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        rank.setdefault("".join(merge), r)
    floor = -float(len(merges) + 1)
    return [-float(rank[t]) if t in rank else floor for t in tokens]


def _prepends_space(data: dict[str, Any]) -> bool:
    """Whether the tokenizer puts "▁" before the text (Llama 2's Prepend or Metaspace; not Gemma's)."""
    text = json.dumps([data.get("normalizer"), data.get("pre_tokenizer")])
    return '"Prepend"' in text or bool(re.search(r'"prepend_scheme": "(first|always)"', text))


def _source_pre_tokenizer(source_gguf: Path | None) -> str | None:
    if source_gguf is None:
        return None
    from carve.models.gguf_header import read_gguf_header

    pre = read_gguf_header(source_gguf).get("tokenizer.ggml.pre")
    return pre if isinstance(pre, str) else None


def _heads(target: str, w: torch.Tensor, config: Any, shape: dict[str, Any]) -> int | None:
    """The heads a Q or K tensor's rows are permuted by (None: not one of them)."""
    if ".attn_q." in target:
        return int(config.num_attention_heads)
    if ".attn_k." in target:
        return int(w.shape[0] // shape["head_dim"])
    return None


def _ggml_type(shape: tuple[int, ...], kind: str, keep_f32: bool = False) -> Any:
    """The ggml type a tensor of `shape` is written in: F32 for vectors (and `keep_f32` ones), else
    the export type (`mxfp4`: MXFP4 for an MoE's 3-D experts, Q8_0 for other matrices), or F16 where
    its rows are not a whole number of quantization blocks (as llama.cpp's convert does)."""
    import gguf

    if len(shape) == 1 or keep_f32:
        return gguf.GGMLQuantizationType.F32
    name = _MXFP4_OTHERS if kind == "mxfp4" and len(shape) != 3 else TYPES[kind]
    qtype = gguf.GGMLQuantizationType[name]
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return gguf.GGMLQuantizationType.F16
    return qtype


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    """Bytes a tensor of `shape` takes in the GGUF as `qtype` (known before its data is computed)."""
    import gguf

    return math.prod(gguf.quant_shape_to_byte_shape(shape, qtype))


def _tensor(
    w: torch.Tensor, kind: str, permute_heads: int | None = None, keep_f32: bool = False, rot: int | None = None
) -> tuple[Any, Any]:
    """(data, ggml type) of one tensor in the export type (`_ggml_type`), its rows permuted over
    `permute_heads` heads when given (the first `rot` rows of each).  A large tensor's data is a
    `_Sliced` one, converted and written a slice of its first dimension at a time (`_SLICE` values): a
    262k-token embedding, or Gemma's per-layer embeddings (2.3B values in Gemma 4 E2B), has neither a
    float32 copy nor a whole converted copy beside it (rows are quantized independently: the same
    bytes)."""
    qtype = _ggml_type(tuple(w.shape), kind, keep_f32)
    if permute_heads or w.dim() < 2 or w.numel() <= _SLICE:
        data = w.detach().float().cpu().numpy()
        if permute_heads:
            data = _permute(data, permute_heads, rot)
        return _converted(data, qtype), qtype
    return _Sliced(w, qtype), qtype


class _Sliced:
    """A large tensor's GGUF data, converted as it is written: what the `gguf` writer reads of the data it
    is given (its size in bytes, and `tofile`), one slice of the first dimension converted at a time."""

    def __init__(self, w: torch.Tensor, qtype: Any) -> None:
        self.w, self.qtype = w.detach(), qtype
        self.nbytes = _nbytes(tuple(w.shape), qtype)
        self.step = max(1, _SLICE // math.prod(w.shape[1:]))

    def tofile(self, f: Any) -> None:
        for start in range(0, self.w.shape[0], self.step):
            _converted(self.w[start : start + self.step].float().cpu().numpy(), self.qtype).tofile(f)


_SLICE = 1 << 24  # values of a tensor converted at a time (64 MB in float32)


def _converted(data: np.ndarray, qtype: Any) -> np.ndarray:
    """float32 `data` in `qtype` (F32 as it is, F16 cast, the others quantized row by row)."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return np.asarray(gguf.quants.quantize(data, qtype))


def _gguf_tensors(items: Iterable[tuple[str, torch.Tensor]], arch: Architecture, config: Any) -> Any:
    """(llama.cpp name, tensor) of every tensor written, from the model's (name, tensor) in its state
    dict's order: an MoE's fused gate/up experts as llama.cpp's two tensors, each [E, ff, hidden]
    (Llama 4's and gpt-oss's stored by columns taken apart and transposed, `_column_experts`); DeepSeek's
    latent up-projection as the absorbed pair (`_mla_split`), Mamba-2's state-space parameters
    (`_mamba2_tensors`): an architecture's own rule first; one-row tensors as vectors and LFM2's
    convolution kernels as {L, hidden}; consecutive tensors an architecture stacks (Gemma 3n's AltUp
    projections, `Architecture.stacked`) as one, in the order of their index."""
    stack: tuple[str, dict[int, torch.Tensor]] | None = None  # the stacked tensor being gathered
    for name, w in items:
        into = next(((target, int(m[1])) for pattern, target in arch.stacked if (m := re.fullmatch(pattern, name))),
                    None)  # fmt: skip
        if stack is not None and (into is None or into[0] != stack[0]):
            yield stack[0], torch.stack([t for _, t in sorted(stack[1].items())])
            stack = None
        if into is not None:
            stack = stack or (into[0], {})
            stack[1][into[1]] = w
            continue
        if arch.experts != "rows" and ".experts." in name:
            yield from _column_experts(name, w, interleaved=arch.experts == "interleaved")
            continue
        own = arch.tensors(name, w, config) if arch.tensors else None
        if own is not None:
            yield from own
            continue
        halves = next(((m, dim, names) for pattern, dim, names in _HALVES if (m := re.fullmatch(pattern, name))), None)
        if halves is None:
            target = gguf_name(name, arch)
            # [1, n] as llama.cpp's {n}: 1-D, so float32 as a norm (llama.cpp's convert keeps it float32
            # too) and read back by transformers' GGUF loader as the row it expects; LFM2's depthwise
            # convolution [hidden, 1, L] as llama.cpp's {L, hidden}
            if target.endswith(_ROWS):
                w = w.reshape(-1)
            elif target.endswith(_CONV):
                w = w.reshape(w.shape[0], w.shape[-1])
            yield target, w
            continue
        m, dim, names = halves
        for half, target in zip(w.chunk(2, dim=dim), names, strict=True):
            yield f"blk.{m[1]}.{target}.weight", half
    if stack is not None:
        yield stack[0], torch.stack([t for _, t in sorted(stack[1].items())])


def _column_experts(name: str, w: torch.Tensor, interleaved: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Experts stored by columns as llama.cpp holds them: gate_up_proj [E, hidden, 2·ff] (Llama 4: the
    gate columns, then the up ones; gpt-oss: alternating) as ffn_gate_exps and ffn_up_exps
    [E, ff, hidden]; down_proj [E, ff, hidden] as ffn_down_exps [E, hidden, ff]; gpt-oss's biases
    alongside ([E, ff] and [E, hidden])."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.(?:mlp|feed_forward)\.experts\.(gate_up_proj|down_proj)(_bias)?", name)
    if m is None:
        raise UsageError(f"llama.cpp has no tensor for {name!r} in this architecture: this layout cannot be exported")
    blk, what, bias = m[1], m[2], "bias" if m[3] else "weight"
    if what == "down_proj":
        yield f"blk.{blk}.ffn_down_exps.{bias}", w if m[3] else w.transpose(1, 2)
        return
    w = w if m[3] else w.transpose(1, 2)  # [E, 2·ff, hidden] (weights) or [E, 2·ff] (biases)
    gate, up = (w[:, 0::2], w[:, 1::2]) if interleaved else w.chunk(2, dim=1)
    yield f"blk.{blk}.ffn_gate_exps.{bias}", gate
    yield f"blk.{blk}.ffn_up_exps.{bias}", up


# where a multimodal checkpoint (Gemma 3's and Mistral 3's image-text models) holds its text model's tensors
_TEXT_PREFIX = "model.language_model."


def _text_config(config: Any) -> Any:
    """The config of the text model GGUF export writes: a multimodal checkpoint's text config where it
    has one whose architecture GGUF export takes (Gemma 3's `gemma3_text`), else the config itself."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text if text is not config and text.model_type in ARCHITECTURES else config


def _text_tensors(items: Iterable[tuple[str, torch.Tensor]], multimodal: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors GGUF export writes: a multimodal model's text model's under the text-only names
    (`model.language_model.` as `model.`, the head as it is), the rest (vision tower, projector) left
    out; every tensor of a text model; never a rotary embedding's computed `inv_freq`."""
    for name, w in items:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if not multimodal:
            yield name, w
        elif name.startswith(_TEXT_PREFIX):
            yield "model." + name[len(_TEXT_PREFIX) :], w
        elif name == "lm_head.weight":
            yield name, w


def write_gguf(
    lm: Any,
    path: Path,
    kind: str,
    source_gguf: Path | None = None,
    items: Callable[[], Iterator[tuple[str, torch.Tensor]]] | None = None,
    read: Callable[[str], torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Write the loaded model `lm` to `path` as GGUF of `kind`; returns what the export records.

    The tensors' names, shapes and types go in the header first (from the state dict's shapes),
    then each tensor's data as it is computed, one at a time: `items()` gives them in the state
    dict's order (a streamed export: `lm.model` a skeleton whose state dict is on the meta device,
    each decoder block read when its tensors come; default: the state dict itself), and `read(name)`
    one of them on its own (an architecture's keys read from its weights: Apertus's xIELU)."""
    import gguf

    if kind not in TYPES:
        raise UsageError(f"unknown GGUF type {kind!r}: use one of {', '.join(TYPES)}")
    full = lm.model.config
    config = _text_config(full)
    state = dict(_text_tensors(lm.model.state_dict().items(), config is not full))
    tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(full, "tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)
    arch, shape = _check_layout(config, state)
    if kind == "mxfp4" and not any(w.dim() == 3 for w in state.values()):
        raise UsageError("--type mxfp4 writes an MoE's experts in MXFP4 (as gpt-oss ships); this model has no "
                         "experts: use q8_0 or q4_0")  # fmt: skip
    writer = gguf.GGUFWriter(str(path), arch.gguf)
    # the source's directory name, not its path (a GGUF carries no local paths)
    # (a skeleton of a multimodal checkpoint built from its text config has no name: the source's, then)
    named = str(getattr(full, "_name_or_path", "") or getattr(lm, "source", "") or "")
    writer.add_name(Path(named).name or "carve output")
    # a pure Mamba has no context length and no attention heads (llama.cpp's converter writes 2^20 and 0)
    writer.add_context_length(int(getattr(config, "max_position_embeddings", None) or 2**20))
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    uniform_ffn, uniform_kv = len(set(shape["ffn"])) <= 1, len(set(shape["kv"])) <= 1
    writer.add_feed_forward_length(shape["ffn"][0] if uniform_ffn and shape["ffn"] else shape["ffn"])
    writer.add_head_count(int(getattr(config, "num_attention_heads", 0) if shape["head_dim"] else 0))
    writer.add_head_count_kv(shape["kv"][0] if uniform_kv and shape["kv"] else shape["kv"])
    theta = (
        arch.theta(config)
        if arch.theta
        else float(getattr(config, "rope_theta", None) or _rope(config).get("rope_theta", 10000.0))
    )
    writer.add_rope_freq_base(theta)
    if getattr(config, "rms_norm_eps", None) is not None:
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    else:  # LayerNorm (StableLM's layer_norm_eps, StarCoder2's norm_epsilon, Nemotron's norm_eps; OLMo's
        # fixed one: its metadata)
        keys = ("layer_norm_eps", "norm_epsilon", "norm_eps")
        eps = next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), None)
        if eps is not None:
            writer.add_layer_norm_eps(float(eps))
    # Phi-4-mini rotates 3/4 of a head, Bamba half; DeepSeek its rotated channels
    rotated = shape.get("rope_dims") or _rotary_dims(config, shape["head_dim"])
    if shape["head_dim"]:  # a model with attention
        writer.add_rope_dimension_count(rotated)
        writer.add_key_length(shape.get("key_length", shape["head_dim"]))
        writer.add_value_length(shape.get("value_length", shape["head_dim"]))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[kind]]))
    if arch.metadata is not None:
        arch.metadata(writer, config)
    if arch.weight_metadata is not None:

        def value(name: str) -> torch.Tensor:
            t = state[name]
            return read(name) if t.device.type == "meta" and read is not None else t

        arch.weight_metadata(writer, config, value)
    tokenizer_notes = _tokenizer_metadata(writer, lm.tokenizer, source_gguf, arch, int(config.vocab_size), lm.source)
    notes = [*(arch.caveats(config) if arch.caveats else []), *tokenizer_notes]
    if config is not full:
        notes.append(f"the text model of a {full.model_type} checkpoint: its other parts (a vision tower, a projector) "
                     "are not written; llama.cpp reads them from a separate mmproj file, which carve does not "
                     "write")  # fmt: skip
    rope_tensors, attn_factor = _rope_tensors(lm.model, config, shape["head_dim"], theta)
    if arch.computed is not None:
        rope_tensors += arch.computed(config)
    if attn_factor is not None:
        writer.add_rope_scaling_attn_factors(attn_factor)
    for name, values in rope_tensors:
        writer.add_tensor_info(name, values.shape, values.dtype, values.nbytes)
    planned = []
    for target, w in _gguf_tensors(state.items(), arch, config):
        qtype = _ggml_type(tuple(w.shape), kind, keep_f32=_keep_f32(target))
        writer.add_tensor_info(
            target, tuple(w.shape), np.dtype(np.float32), _nbytes(tuple(w.shape), qtype), raw_dtype=qtype
        )
        planned.append((target, qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, values in rope_tensors:
        writer.write_tensor_data(values)
    given = _text_tensors(items(), config is not full) if items is not None else iter(state.items())
    data = (item for item in given if item[0] in state)
    written = progress(_gguf_tensors(data, arch, config), "writing GGUF", total=len(planned))
    for (target, w), (want, qtype) in zip(written, planned, strict=True):
        if arch.norm_offset and target.endswith("norm.weight"):
            w = w.float() + arch.norm_offset
        heads = _heads(target, w, config, shape) if arch.permute_qk else None
        array, got = _tensor(w, kind, heads, keep_f32=_keep_f32(target), rot=rotated)
        if (target, got) != (want, qtype):
            raise RuntimeError(f"GGUF tensor {target} ({got}) came where the header says {want} ({qtype})")
        writer.write_tensor_data(array)
    writer.close()
    return {"type": kind, "architecture": arch.gguf, "tensors": len(state), "file_bytes": path.stat().st_size,
            "feed_forward_length": shape["ffn"], "head_count_kv": shape["kv"],
            "notes": notes}  # fmt: skip


def export(
    src: str | Path, gguf_path: str | Path, kind: str = "f16", overwrite: bool = False, stream: bool | None = None
) -> dict[str, Any]:
    """`carve export`: the carve output (or any model source) `src` as a GGUF file, written atomically.
    Streamed, the model is a skeleton (models/skeleton) and each decoder block is read when its
    tensors are written, then freed: the same file byte for byte in a fraction of the memory.
    `stream=None` (the default) streams a local safetensors directory (dense, sparse, an update) and
    loads anything else whole, as it does a directory whose tensors the skeleton cannot read one at a
    time; True streams or refuses; False loads the model whole.  A streamed export that was asked
    for, or that a model too large for the memory available forced, says so in a note."""
    from carve.manifest import read_manifest
    from carve.models import load_model
    from carve.output import atomic_file, claim
    from carve.streamed import check_streamable, streaming_reason

    if kind not in TYPES:
        raise UsageError(f"unknown GGUF type {kind!r}: use one of {', '.join(TYPES)}")
    out = Path(gguf_path).expanduser()
    if out.suffix != ".gguf":
        raise UsageError(f"{str(out)!r}: give a file name ending in .gguf")
    if out.is_dir() or (out.exists() and not overwrite):
        raise UsageError(f"{str(out)!r} already exists: choose another path or pass --overwrite")
    source = Path(src).expanduser()
    manifest = read_manifest(source) if (source / "carve.json").is_file() else {}
    if (source / "config.json").is_file():  # refused before loading: a layout not exported
        from carve.models.load import read_config

        full = read_config(source)
        text = _text_config(full)
        architecture(text.model_type if text is not full else json.loads((source / "config.json").read_text()).get(
            "model_type"))  # fmt: skip
        check_config(text)
    reason = None if stream is False else streaming_reason(str(src), torch.float32, bool(stream))
    if reason is not None:
        check_streamable(str(src))
    auto = stream is None and reason is None and _streamable(source)
    base = str((manifest.get("source") or {}).get("model") or src)
    origin = _gguf_origin(base)
    with claim(out):
        info: dict[str, Any] | None = None
        if reason is not None or auto:
            try:
                info = _export_streamed(source, out, kind, origin)
            except _Unstreamable:  # loaded whole below; a refusal of the model itself is not retried
                if not auto:
                    raise
            if info is not None:
                info["streamed"] = reason or "a local safetensors directory"
                if reason is not None:
                    info["notes"].append(f"exported one decoder block at a time ({reason})")
        if info is None:
            lm = load_model(str(src), dtype="float32", device="cpu")
            with atomic_file(out) as tmp:
                info = write_gguf(lm, tmp, kind, origin)
    return {**info, "file_bytes": out.stat().st_size, "source": str(src)}


def _streamable(source: Path) -> bool:
    from carve.streamed import check_streamable

    try:
        check_streamable(str(source))
    except UsageError:
        return False
    return True


class _Unstreamable(UsageError):
    """The skeleton cannot read a directory one tensor at a time (an export of it then loads it whole)."""


def _export_streamed(source: Path, out: Path, kind: str, origin: Path | None) -> dict[str, Any]:
    """`write_gguf` on a skeleton of `source`: one decoder block in memory at a time (float32).  What
    `write_gguf` refuses is refused here, not retried by loading the model whole (a model larger than
    memory would be read whole only to be refused again)."""
    from carve.models.load import LoadedModel
    from carve.models.skeleton import SkeletonModel
    from carve.output import atomic_file
    from carve.streamed import load_tokenizer

    tok = load_tokenizer(source)
    try:
        model = SkeletonModel(source, torch.float32, "cpu", others=False)  # embeddings read at their turn
    except UsageError as e:
        raise _Unstreamable(str(e)) from e
    with model as skeleton, atomic_file(out) as tmp:
        lm = LoadedModel(skeleton.model, tok, str(source), "", "float32")
        return write_gguf(
            lm, tmp, kind, origin, items=skeleton.state_items, read=lambda n: skeleton.source.get(skeleton.specs[n][0])
        )


def _gguf_origin(source: str) -> Path | None:
    """The GGUF a model came from (its tokenizer's pre-tokenizer name is copied), if it came from one."""
    from carve.models.load import _DEFAULT_ALIASES, default_gguf

    if source in _DEFAULT_ALIASES:
        return default_gguf()
    p = Path(source).expanduser()
    return p if p.suffix == ".gguf" and p.is_file() else None
