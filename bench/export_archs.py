"""`carve export --gguf` in llama.cpp itself for the layouts the embedded default does not have:
Qwen3 (per-head Q/K norms, head_dim apart from hidden / heads), Llama 3's RoPE scaling, Gemma 3
with a SentencePiece-style tokenizer, Phi-3 (fused qkv and gate/up projections, a sliding window;
and with LongRoPE, as the 128k Phi-3, Phi-3.5 and Phi-4-mini), and the mixture-of-experts
Mixtral, Qwen3-MoE, OLMoE and Qwen2-MoE (fused experts split into llama.cpp's tensors; Qwen2-MoE's
shared expert beside them).

    .venv/bin/python bench/export_archs.py [--kinds qwen3 llama3-rope gemma3 phi3]

Each row: a tiny random model (hidden 64, 2 blocks, 4 query heads in 2 key/value groups, the
embedded default's tokenizer and vocabulary; seed 0) saved with save_pretrained, exported with
`carve export SRC --gguf OUT --type f16`, and one random 200-token block (seed 1) scored by
transformers and by llama.cpp (bench/llamacpp.py: llama-cpp-python built from its PyPI source):
summed next-token NLL and top-1 agreement.  Qwen3: head_dim 128, Q/K norm weights drawn from
N(1, 0.5) so that a lost or swapped norm shows.  Llama 3 RoPE: original context 64, factor 8, low /
high frequency factors 1 / 4, Q and K weights scaled by 8 so that positions matter; the same block
is also scored by transformers with the scaling removed, which llama.cpp must not match.  Gemma 3:
3 blocks of kinds sliding / full / sliding (not llama.cpp's default every-sixth pattern), window
16 (the block is 200 tokens), head_dim 256, every norm weight from N(0, 0.5) (Gemma scales by
1 + w), and a Gemma-style SentencePiece BPE tokenizer (byte fallback, 2000 entries) trained on 20
builtin legal documents (tests/conftest.py's `gemma_style_tokenizer`); the same block is also scored
by transformers with every layer global (what llama.cpp would compute if the pattern were lost), and
held-out texts (legal documents 20-39 and code documents 0-9, 400 characters each, and one line of
accented, mathematical and emoji characters) are tokenized by llama.cpp and by transformers.  Phi-3:
fused qkv_proj and gate_up_proj, every layer attending within a sliding window of 16 tokens; the
same block is also scored by transformers without the window, which llama.cpp must not match.
Gemma 3 image-text (`gemma3-multimodal`): the gemma3 row's text model inside a Gemma3ForConditionalGeneration with a
tiny SigLIP tower (1 block of 32); carve exports the text model.
Gemma 2: 4 blocks alternating sliding / global (llama.cpp's fixed pattern), window 16, attention
and final soft-capping at 5 and 3 (query and key weights scaled by 8 so that the caps bite), norm
weights from N(0, 0.5), the Gemma-style tokenizer; contrast: every layer global and nothing capped.
OLMo 2 and 3: 4 blocks, norm weights from N(1, 0.5), query and key weights scaled by 8; OLMo 3
with its default pattern (three sliding layers, then a global one), window 16; contrast (OLMo 3):
every layer global.
StableLM: 4 blocks with Q/K/V biases (StableLM 2 3B, Zephyr), LayerNorm weights and biases and the
Q/K/V biases random, query and key weights scaled by 8, RoPE over a quarter of each head.
StarCoder2: 4 blocks, LayerNorm weights and biases and every Linear's bias random, query and key
weights scaled by 8, no sliding window (llama.cpp's starcoder2 has none; the export says so).
Phi-2 (`phi`, llama.cpp's phi2): 4 blocks, the LayerNorms' weights and biases and every bias (the
head's too) random, query and key weights scaled by 8, RoPE over half of each head.
Cohere: 4 blocks (attention and MLP side by side on one LayerNorm, weights from N(1, 0.5)), query
and key weights scaled by 8, logits scaled by 1/16 (Command R's); contrast: logits not scaled.
SmolLM3 and Granite: 4 Llama-style blocks, query and key weights scaled by 8; SmolLM3 without RoPE
in layer 3 (its rule: every fourth layer), contrast: RoPE in every layer; Granite with multipliers
of the order of Granite 3's (attention 1/64, embedding 12, residual 0.22, logits divided by 8),
contrast: every multiplier 1.
Phi-3 LongRoPE (`phi3-longrope`, `phi3-longrope-short`): no window, 3/4 of each head rotated,
original context 256 of 2048, 6 long and 6 short factors, query and key rows scaled by 8; scored on
300 tokens (both take the long factors) and on 200 (llama.cpp's context then 212, which it rounds up
to 256, within the original 256: both take the short ones); contrast: plain RoPE over the same
channels.
Phi-3 structured (`phi3-structured`): 4 blocks, query and key rows scaled by 8, no window, cut by
`carve extract --domain legal --heads-keep 1.0 --mlp-keep 0.5 --drop-blocks 1` (3 blocks of 64 MLP
channels sliced out of the fused gate_up_proj; every head kept: llama.cpp's phi3 sizes the query rows
by the hidden size, so an output without some heads is refused by the export) before the export;
contrast: the unsliced source. Qwen2 and Llama structured (`qwen2-structured`, `llama-structured`): 4
blocks (Qwen2 with random Q/K/V biases), query and key weights scaled by 8, cut the same way; Llama
with half its heads too (`--heads-keep 0.5`: 2 heads of 16 channels beside a hidden size of 64), and
Qwen2 with half its heads (`qwen2-structured-heads`), which the export writes as llama.cpp's `llama`
(Q and K rows and biases permuted): llama.cpp's qwen2 takes query rows as wide as the hidden size only.
OLMo 2 and StableLM structured (`olmo2-structured`, `stablelm-structured`): the OLMo 2 and StableLM rows'
models cut by `--mlp-keep 0.5 --drop-blocks 1` (every head kept: structured extraction cannot remove
heads of either).
Cohere with per-head Q/K LayerNorms (`cohere-qk-norm`, Command R+'s): the cohere row's model with them (their
weights from N(1, 0.5)) and 64 blocks (llama.cpp's command-r reads the norms only in models of 64 blocks or more).
Cohere 2 (`cohere2`): 4 blocks (sliding, global, sliding, sliding: not llama.cpp's default pattern of a
global layer every fourth, so llama.cpp must read the file's; window 16 and RoPE in the sliding layers
only), LayerNorm
weights from N(1, 0.5), query and key weights scaled by 8, logits scaled by 1/16; contrast: every layer
sliding (RoPE and the window everywhere). `cohere2-structured`: the same model cut like the other
structured rows (every head kept): the pattern of the kept blocks, which llama.cpp reads from the file.
Mixtral and Qwen2-MoE with experts removed (`mixtral-experts`, `qwen2-moe-experts`): the MoE rows' models
cut by `carve extract --domain legal --experts-keep 0.75` (3 of 4 experts kept in every block, top-2
routing) before the export; contrast: the source.
gpt-oss (`gpt-oss`, `gpt-oss-experts`): 4 experts, top-2, attention sinks, biases everywhere, gpt-oss's
YaRN (factor 32 over an original 4096, truncate false), layers sliding / global with window 16; expert
and router weights from N(0, 0.2), every other bias and the sinks from N(0, 0.5), query and key weights
scaled by 8; contrast: top-1 routing; `-experts`: cut by `--experts-keep 0.75` as the other MoEs;
`-mxfp4`: the same model exported with `--type mxfp4` (its experts in MXFP4, the other matrices q8_0),
no contrast (the agreement measures what MXFP4 costs).
`hunyuan-moe-f32`, `lfm2-moe-f32`: those rows' models exported with `--type f32` (lossless), no contrast:
where their f16 rows disagree with transformers, whether the disagreement is f16 rounding (gone in float32)
or the layout (still there).
Ministral 3 (`ministral3`): 4 Llama-style blocks with Ministral 3's RoPE as released (YaRN factor 16,
both mscales 1, Llama 4's attention temperature β 0.1) over an original context of 64, so that the
temperature acts past position 64; query and key weights scaled by 8; contrast: the temperature removed.
`ministral3-multimodal`: the same text model inside a Mistral 3 image-text checkpoint
(Mistral3ForConditionalGeneration with a tiny Pixtral tower, as Ministral 3 and Mistral Small 3.x ship),
loaded by carve with AutoModelForImageTextToText; no contrast (the text model's logits are the ministral3 row's).
EXAONE 4 (`exaone4`): 4 blocks, norms after attention and MLP and per-head Q/K norms from N(1, 0.5),
query and key weights scaled by 8, Llama 3's RoPE scaling as in the `llama3-rope` row (EXAONE 4.0
1.2B scales its RoPE so); contrast: RoPE not scaled.
ERNIE 4.5 (`ernie4_5`): 4 Llama-style blocks with RoPE on interleaved pairs (no permutation), query
and key weights scaled by 8.
Mixtral structured (`mixtral-structured`): the Mixtral row's model cut by `--heads-keep 0.5
--drop-blocks 1` (an MoE's heads and depth; its experts are left as they are).
Mixtral / Qwen3-MoE / Qwen2-MoE: 4 experts, top-2 routing, expert and router weights (and Qwen2-MoE's
shared expert and its gate) from N(0, 0.2) so that tokens spread over the experts and the mixture
matters; contrast: the same weights with top-1 routing, which llama.cpp must not match.
DeepSeek (`deepseek-v3`, `deepseek-v2`, `deepseek-v2-lite`): 4 blocks, the first dense, latent attention (query rank
32, latent 32, 4 heads of 16 unrotated and 8 rotated key channels, 16 value channels; V2-Lite: one query
projection), 8 experts of width 32, 2 per token, a shared expert, routing scaled by 2.5; V3: sigmoid scores
with a random correction bias, renormalized, the best 1 of 2 groups (contrast: both groups open); V2: softmax,
greedy (contrast: top-1); V2-Lite with its YaRN (factor 40 over an original 64, both mscales 0.707; contrast:
plain RoPE); `deepseek-v3-yarn`: DeepSeek V3's YaRN (both mscales 1; contrast: plain RoPE);
`deepseek-v3-experts`: cut by `--experts-keep 0.75` (3 of 4 in each group); expert, router and shared expert
weights from N(0, 0.2), norm weights from N(1, 0.5), query and latent projections scaled by 4.
GLM-4.7-Flash (`glm4-moe-lite`): the `deepseek-v3` row's model as a Glm4MoeLite (its dense block named in
`mlp_layer_types`); contrast: both groups open.
dots.llm1 (`dots1`): 4 blocks, the first dense, 4 query and 4 key/value heads of 32 with per-head Q/K norms from
N(1, 0.5), query and key weights scaled by 8, DeepSeek V3's routing over 8 experts in 2 groups (contrast: both
open), 2 per token, a shared expert.
ERNIE 4.5 MoE (`ernie4_5-moe`): 4 blocks, the first dense, 8 experts of width 32 (2 per token) and a shared
one, softmax routing with a correction bias from N(0, 0.2), query and key weights scaled by 8; contrast: top-1.
Hunyuan-A13B (`hunyuan-moe`): 4 blocks, HunYuan's attention as the hunyuan row's (NTK alpha 1000, Q/K norms
from N(1, 0.5), query and key weights scaled by 8), a shared MLP of width 32 beside 8 experts as wide, 2 per
token, every MLP weight from N(0, 0.2); contrast: top-1.
MiniMax-M2 (`minimax-m2`): 4 blocks, whole-projection Q/K norms and the other norms from N(1, 0.5), RoPE over
half of each head, 8 experts of width 32, 2 per token, sigmoid routing with a correction bias, routing weights
from N(0, 0.2), query and key weights scaled by 8; contrast: top-1.
Llama 4 (`llama4`, `llama4-llama3-rope`): 4 blocks, dense and MoE alternating (Maverick's step 2), no RoPE in
block 3, queries and keys L2-normalized in the others, 4 experts stored by columns and a shared one, top-1,
expert, router and shared expert weights from N(0, 0.2), norm weights from N(1, 0.5), query and key weights
scaled by 8; contrast: without the L2 norm; `-llama3-rope`: with the llama3-rope row's RoPE scaling (Scout's
kind; contrast: plain RoPE).
LFM2 (`lfm2`): 4 blocks (convolution, convolution, attention, convolution), the convolutions' taps from N(0, 1)
and their input projections scaled by 8 (so that earlier tokens matter), norm weights (per-head Q/K norms among
them) from N(1, 0.5), query and key weights scaled by 8; no contrast row (by hand: see the notes).
LFM2-MoE (`lfm2-moe`): the same blocks, the first dense, then 8 experts of width 32, top-2, sigmoid routing with
an expert bias, router, expert weights and bias from N(0, 0.2); contrast: top-1.
Granite 4.0 H (`granite-hybrid`, `granite-hybrid-rope`): 4 blocks, Mamba-2 (8 heads of 16, state 16, one group,
convolution of 4 with taps from N(0, 1)) in blocks 0, 1 and 3, attention in block 2, 4 experts (top-2) and a shared
one, routing and MLP weights from N(0, 0.2), norm weights from N(1, 0.5), query and key weights scaled by 8;
Granite's multipliers and no RoPE (Granite 4.0 H's; contrast: top-1); `-rope`: with RoPE, no multipliers but
attention scaled by 1/4, Mamba's output projections scaled by 0.1 (contrast: no RoPE).
Falcon-H1 (`falcon-h1`): 4 blocks of Mamba-2 (2 groups, its gated norm, taps from N(0, 1)) beside attention, then a
SwiGLU MLP, every µP multiplier away from 1 (FALCON_H1_MUP), norm weights from N(1, 0.5), query and key weights
scaled by 8; contrast: every multiplier 1.
Jamba (`jamba`): 4 blocks, Mamba (1) in 0, 1 and 3 (state 16, convolution taps from N(0, 1)), attention in block 2,
experts (4, top-2; routing weights from N(0, 0.2)) in blocks 1 and 3, norm weights from N(1, 0.5), query and key
weights scaled by 8; contrast: top-1.
Bamba (`bamba`): 4 blocks, Mamba-2 in 0, 1 and 3 (taps from N(0, 1), output projections scaled by 0.1), attention
with RoPE over half of each head in block 2, norm weights from N(1, 0.5), query and key weights scaled by 8;
contrast: no channel rotated.
Nemotron-H (`nemotron-h`): 4 blocks of one kind each (Mamba-2, attention, Mamba-2, squared-ReLU MLP), Mamba-2
with 8 heads of 16, state 16, 2 groups, convolution taps from N(0, 1), norm weights from N(1, 0.5), query and key
weights scaled by 8; no contrast row (by hand: see the notes).
Apertus (`apertus`): 4 blocks, per-head Q/K norms and the other norm weights from N(1, 0.5), Llama 3 RoPE scaling
as the llama3-rope row's, each block's xIELU α_p and α_n (before softplus) from N(0, 1), query and key weights
scaled by 8; contrast: plain RoPE.
GLM-4.5 (`glm4-moe`): 4 blocks, the first dense, 4 heads of 32 (twice the hidden size) with random Q/K/V biases
and per-head Q/K norms from N(1, 0.5), query and key weights scaled by 8, DeepSeek V3's routing over 8 experts
of width 32 in 2 groups (the best 1 open; contrast: both open), 2 per token, a shared expert.
llama3-tokenizer: a plain tiny Llama with a byte-level BPE tokenizer (2000 entries, trained on 20
builtin legal documents) that splits text by Llama 3's rule; the held-out texts (plus one line of
phone numbers, dates and long numbers) tokenized by llama.cpp and by transformers, from carve's
export and from the same model exported with the architecture's pre-tokenizer name ("default").
deepseek-v3-tokenizer: the deepseek-v3 row's model with a byte-level BPE tokenizer (2000 entries, trained on the
same legal documents) that splits text by DeepSeek V3's three rules in turn (digits in threes, CJK runs, words and
punctuation); tokenized as the llama3-tokenizer row's texts, with the same contrast.
Mamba, Falcon-Mamba and Mamba-2 (`mamba`, `falcon-mamba`, `mamba2`): 4 Mamba blocks each and nothing else (Mamba
(1): state 16, time-step rank 8; Mamba-2: 8 heads of 16 in 2 groups), convolution taps from N(0, 1), norm weights
(the gated norm's too) from N(1, 0.5); the mamba and falcon-mamba rows have the same weights (the same seed and
sizes), so each is the other's contrast (Falcon-Mamba RMS-norms the time step, B and C without weights).
Qwen3.5 (`qwen35`): 4 blocks, Gated DeltaNet in 0-2 (2 key heads and 4 value heads of 16: the value heads
reordered for llama.cpp; taps from N(0, 1)), gated attention in 3 (4 query heads of 16, RoPE over half of each),
norm weights from N(0, 0.5) (Qwen3.5's RMSNorms scale by 1 + w; the DeltaNet's gated norm by w), query and key
weights scaled by 8; no contrast row. Qwen3.5-MoE (`qwen35-moe`): the same blocks with 4 experts of width 32
(top-2, renormalized) and a sigmoid-gated shared expert of width 48 in each, their weights from N(0, 0.2);
contrast: top-1. Qwen3-Next (`qwen3-next`): the qwen35-moe row's sizes, the DeltaNet's projections fused per key
head as Qwen3-Next stores them (value heads not reordered); contrast: top-1.
Structured hybrids (`qwen35-structured`, `bamba-structured`, `nemotron-h-structured`): the qwen35, bamba and
nemotron-h rows' models cut by `--mlp-keep 0.5 --drop-blocks 1 --heads-keep 0.5` (the DeltaNet and Mamba blocks
kept whole); contrast: the unsliced source.
Gemma 3n (`gemma3n`): 22 blocks with what llama.cpp's gemma3n fixes (4 AltUp streams, LAuReL rank 64, per-layer
embeddings of 256, the last 2 blocks reusing blocks 18's and 19's keys and values, activation sparsity at the 95th
percentile in the first 10), 4 query heads of 16 in 2 key/value groups, an MLP of 2048 channels, window 16, norm
weights from N(1, 0.5), the AltUp coefficients and router from N(0, 0.5) and its output scale from N(1, 0.5), the
Gemma-style tokenizer (held-out texts tokenized); contrast: no activation sparsity.
Gemma 4 (`gemma4`): 6 blocks, sliding and global alternating (4 query heads of 16 and 2 key/value heads; 4 of 32 and
1, the global ones' values their keys), window 16, proportional RoPE over a quarter of the global heads, per-layer
embeddings of 8, the last 2 blocks reusing blocks 2's and 3's keys and values with a double-wide MLP, final
soft-capping at 30, norm weights from N(1, 0.5) (Gemma 4's RMSNorms scale by w), each block's output scale from
U(0.5, 1.5), a Gemma-4-style tokenizer (tests/conftest.py's `gemma_style_tokenizer(gemma4=True)`: no token joins
newlines to other characters, a BOS before the text) whose held-out texts llama.cpp tokenizes; contrast: RoPE over
the whole global heads. `gemma4-f32`: the same model exported as f32 (the f16 row's misses are near-ties: their
margins against f32). `gemma4-moe`: 4 blocks, 4 experts of 32 (top-2) beside the MLP in each (26B-A4B's block),
expert and router weights from N(0, 0.2), the router's input and per-expert scales from N(1, 0.5); contrast: top-1;
`gemma4-moe-f32` the same exported as f32. `gemma4-structured`: 4 blocks in 31B's shape (no per-layer embeddings,
nothing shared, the gemma4 row's sizes otherwise) cut by `--mlp-keep 0.5 --drop-blocks 1` (every head kept: structured
extraction holds Gemma 4's heads), `gemma4-moe-structured` the gemma4-moe row's model with a block dropped; contrast:
the unsliced source.
qwen2-padded-vocab: a tiny Qwen2 (random Q/K/V biases) with 64 embedding rows more than its tokenizer has tokens,
as Qwen2 / Qwen2.5 / Qwen3 (151,936 rows, 151,665 tokens), Phi-3 and OLMo 2 ship; the export pads the token list
with unused tokens (before 2026-12-05 it did not, and llama.cpp did not load such a file).
default-tokenizer: no export; the embedded default's own GGUF tokenizes the held-out texts in
llama.cpp, against carve's tokenizer of it and transformers' GGUF tokenizer as it comes.
Results: bench/results/export_archs.jsonl; the table: the `export-archs` section of bench/RESULTS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import carve
from common import HERE, MODEL_DIR, OUT, ROOT, commit, ensure_model, load_results, save_result, write_section
from llamacpp import run_gguf

sys.path.insert(0, str(ROOT))
from tests.conftest import byte_level_tokenizer, gemma_style_tokenizer

RESULTS = HERE / "results" / "export_archs.jsonl"
CARVE = str(ROOT / ".venv" / "bin" / "carve")
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512}  # fmt: skip
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 10000.0}  # fmt: skip


# LongRoPE as the 128k Phi-3, Phi-3.5 and Phi-4-mini have it, in small: original context 256 of 2048 (the
# attention factor sqrt(1 + ln 8 / ln 256)), 3/4 of each 16-channel head rotated: 6 factors of each kind.
# 256, not less: llama.cpp rounds its context up to a multiple of 256, and takes the long factors past it
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": 256, "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0],
            "long_factor": [1.5, 3.0, 6.0, 12.0, 24.0, 48.0]}  # fmt: skip
# tokens scored (default 200): past the original context (long factors), and within it with llama.cpp's
# context at 212, rounded to 256 (short factors)
# Ministral 3's RoPE as released (YaRN factor 16, both mscales 1, Llama 4's temperature β 0.1) over an
# original context of 64, so that YaRN's interpolation and the temperature (past position 64) both act
MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0, "original_max_position_embeddings": 64,
                   "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                   "llama_4_scaling_beta": 0.1}  # fmt: skip
DEEPSEEK_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 64,
                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}  # fmt: skip
# Falcon-H1's µP multipliers, each away from 1 so that one lost or misapplied shows
FALCON_H1_MUP = {"key_multiplier": 0.5, "attention_in_multiplier": 0.8, "attention_out_multiplier": 1.25,
                 "ssm_in_multiplier": 0.7, "ssm_out_multiplier": 1.3, "ssm_multipliers": [1.5, 0.5, 1.2, 0.8, 2.0],
                 "mlp_multipliers": [1.4, 0.6], "embedding_multiplier": 2.0, "lm_head_multiplier": 0.5}  # fmt: skip
HUNYUAN_ROPE = {"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0, "factor": 1.0}
ARCEE_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
# rows exported in a type other than f16; a `-f32` row is its model's row exported lossless (`--type f32`)
TYPE = {
    "gpt-oss-mxfp4": "mxfp4",
    "hunyuan-moe-f32": "f32",
    "lfm2-moe-f32": "f32",
    "gemma4-f32": "f32",
    "gemma4-moe-f32": "f32",
}
BLOCK = {"phi3-longrope": 300, "phi3-longrope-short": 200}


# Granite's multipliers, of the order of Granite 3's (attention 1/64 in place of 1/sqrt(16), embedding 12,
# residual 0.22, logits divided by 8)
GRANITE = {"attention_multiplier": 0.015625, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
           "logits_scaling": 8.0}  # fmt: skip


def _perturbed(model: torch.nn.Module, norms: tuple[str, ...], mean: float) -> torch.nn.Module:
    """`model` with the weights named by `norms` (suffixes) drawn from N(mean, 0.5), so that a lost or
    misplaced norm shows, and the query and key weights scaled by 8, so that positions matter."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(norms):
                p.normal_(mean, 0.5)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8)
    return model.eval()


def _fused_qk_scaled(model: torch.nn.Module) -> torch.nn.Module:
    """A Phi-3 `model` with the query and key rows of its fused qkv_proj (4 + 2 heads of 16) scaled by 8,
    so that positions matter."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight[: 6 * 16].mul_(8)
    return model.eval()


def _layernorms_and_biases_drawn(model: torch.nn.Module, biases: str = ".bias") -> torch.nn.Module:
    """LayerNorm weights from N(1, 0.5), the biases named `*biases` from N(0, 0.5) (so that a lost or
    swapped one shows), query and key weights scaled by 8 (so that positions matter)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.startswith("model.norm") or name.endswith(biases):
                p.normal_(1 if name.endswith("weight") else 0, 0.5)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8)
    return model.eval()


Rule = tuple[Callable[[str], bool], Callable[[torch.Tensor], object]]


def _drawn(model: torch.nn.Module, *rules: Rule) -> torch.nn.Module:
    """`model` with each parameter a rule matches (by name) changed by it, parameter by parameter and rule by
    rule in order, so that a row's random draws follow one sequence."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            for match, change in rules:
                if match(name):
                    change(p)
    return model


# a Mamba convolution's taps from N(0, 1): earlier tokens then matter
TAPS: Rule = (lambda name: name.endswith("conv1d.weight"), lambda p: p.normal_(0, 1.0))


def _routing_drawn(model: torch.nn.Module) -> torch.nn.Module:
    """DeepSeek V3's routing made to matter: expert, router and shared expert weights and the routing
    correction bias from N(0, 0.2); per-head Q/K norm weights from N(1, 0.5)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.experts." in name or ".mlp.gate." in name or ".shared_experts." in name:
                p.normal_(0, 0.2)
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.normal_(1, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.2)
    return model.eval()


def _deepseek(kind: str, vocab: int) -> torch.nn.Module:
    """DeepSeek V3 (V2): 4 blocks, the first dense, latent attention (query rank 32, latent 32, 4 heads of
    16 unrotated + 8 rotated key channels and 16 value channels), 8 experts of width 32 in 2 groups
    (V3: the best 1 group's experts, sigmoid scores with a random correction bias, renormalized; V2:
    softmax, greedy), 2 per token, a shared expert, scaled by 2.5; expert, router and shared expert
    weights from N(0, 0.2), norm weights from N(1, 0.5), query and latent weights scaled by 4."""
    import transformers as tf

    sizes = {**SIZES, "num_hidden_layers": 4, "num_key_value_heads": 4, "pad_token_id": None, "bos_token_id": None,
             "eos_token_id": None}  # fmt: skip
    mla = {"q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
           "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
           "first_k_dense_replace": 1, "routed_scaling_factor": 2.5}  # fmt: skip
    if kind == "glm4-moe-lite":  # GLM-4.7-Flash: DeepSeek V3's blocks, the dense one named in mlp_layer_types
        mla = {k: v for k, v in mla.items() if k != "first_k_dense_replace"}
        config: Any = tf.Glm4MoeLiteConfig(**sizes, **mla, n_group=2, topk_group=1, norm_topk_prob=True,
                                           mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
                                           vocab_size=vocab)  # fmt: skip
    elif kind.startswith("deepseek-v3"):
        config = tf.DeepseekV3Config(**sizes, **mla, n_group=2, topk_group=1, norm_topk_prob=True,
                                     vocab_size=vocab)  # fmt: skip
        if kind.startswith("deepseek-v3-yarn"):  # DeepSeek V3's YaRN (factor 40, both mscales 1) over 64 positions
            config.rope_parameters = dict(DEEPSEEK_YARN)
    else:  # V2-Lite: one query projection, no low-rank pair
        lite = {"q_lora_rank": None} if kind.startswith("deepseek-v2-lite") else {}
        config = tf.DeepseekV2Config(**sizes, **{**mla, **lite}, topk_method="greedy", vocab_size=vocab)
        if lite:  # and V2-Lite's YaRN: both mscales 0.707
            config.rope_parameters = {**DEEPSEEK_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp.experts." in name or ".mlp.gate." in name or ".shared_experts." in name:
                p.normal_(0, 0.2)
            if name.endswith("norm.weight"):
                p.normal_(1, 0.5)
            if name.endswith(("q_b_proj.weight", "q_proj.weight", "kv_a_proj_with_mqa.weight", "kv_b_proj.weight")):
                p.mul_(4)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.2)
    return model.eval()


def tiny(kind: str, vocab: int) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    kind = kind.removesuffix("-f32")  # the same model as its f16 row
    if kind in ("gemma3", "gemma3-multimodal"):
        sizes = {**SIZES, "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1}
        kinds = ["sliding_attention", "full_attention", "sliding_attention"]
        config = tf.Gemma3TextConfig(**sizes, head_dim=256, sliding_window=16, vocab_size=vocab, layer_types=kinds)
        if kind == "gemma3-multimodal":  # the same text model inside a Gemma 3 image-text checkpoint (tiny SigLIP)
            vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8)  # fmt: skip
            config = tf.Gemma3Config(text_config=config, vision_config=vision, mm_tokens_per_image=4)
        model = tf.AutoModelForCausalLM.from_config(config) if kind == "gemma3" else tf.Gemma3ForConditionalGeneration(
            config)  # fmt: skip
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0, 0.5)
        return model.eval()
    if kind.removesuffix("-experts") in (
        "deepseek-v3",
        "deepseek-v3-yarn",
        "deepseek-v2",
        "deepseek-v2-lite",
        "glm4-moe-lite",
        "deepseek-v3-tokenizer",
    ):
        return _deepseek(kind, vocab)
    if kind == "dots1":  # dots.llm1 in small: Qwen3's attention (per-head Q/K norms), DeepSeek V3's routing
        sizes = {**SIZES, "num_hidden_layers": 4, "num_key_value_heads": 4, "pad_token_id": None, "bos_token_id": None,
                 "eos_token_id": None}  # fmt: skip
        config = tf.Dots1Config(**sizes, head_dim=32, moe_intermediate_size=32, n_routed_experts=8,
                                num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                                first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                                vocab_size=vocab)  # fmt: skip
        return _perturbed(_routing_drawn(tf.AutoModelForCausalLM.from_config(config)), (), 0.0)  # q/k x 8
    if kind == "ernie4_5-moe":  # ERNIE 4.5 MoE in small: softmax routing with a correction bias, a dense block first
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        config = tf.Ernie4_5_MoeConfig(**sizes, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                       moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=3,
                                       moe_layer_interval=1, use_bias=False, vocab_size=vocab)  # fmt: skip
        return _perturbed(_routing_drawn(tf.AutoModelForCausalLM.from_config(config)), (), 0.0)  # q/k x 8
    if kind == "hunyuan-moe":  # Hunyuan-A13B in small: HunYuan's attention and NTK alpha, a shared MLP, 8 experts
        sizes = {**SIZES, "num_hidden_layers": 4, "intermediate_size": 32, "pad_token_id": None, "bos_token_id": None,
                 "eos_token_id": None}  # fmt: skip
        config = tf.HunYuanMoEV1Config(**sizes, head_dim=16, num_experts=8, moe_topk=2, vocab_size=vocab,
                                       rope_parameters=dict(HUNYUAN_ROPE))  # fmt: skip
        model = tf.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".mlp." in name:
                    p.normal_(0, 0.2)
        return _perturbed(model, ("layernorm.weight",), 1.0)
    if kind.startswith("granite-hybrid"):  # Granite 4.0 H in small: Mamba-2 blocks around an attention block
        sizes = {**SIZES, "num_hidden_layers": 4, "intermediate_size": 32, "pad_token_id": None, "bos_token_id": None,
                 "eos_token_id": None}  # fmt: skip
        rope = "rope" if kind == "granite-hybrid-rope" else None  # Granite 4.0 H: no position embedding
        # with RoPE, no multipliers but the usual attention scale (not Granite's 1/64) so that positions move it
        plain = {"attention_multiplier": 0.25, "embedding_multiplier": 1.0, "residual_multiplier": 1.0,
                 "logits_scaling": 1.0}  # fmt: skip
        multipliers = plain if rope else GRANITE
        config = tf.GraniteMoeHybridConfig(**sizes, **multipliers, shared_intermediate_size=64, num_local_experts=4,
                                           num_experts_per_tok=2, vocab_size=vocab, position_embedding_type=rope,
                                           layer_types=["mamba", "mamba", "attention", "mamba"], mamba_n_heads=8,
                                           mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1, mamba_d_conv=4,
                                           mamba_expand=2)  # fmt: skip
        routing: Rule = (
            lambda name: ".block_sparse_moe." in name or ".shared_mlp." in name,
            lambda p: p.normal_(0, 0.2),
        )
        # with RoPE, the attention block's share larger
        smaller: Rule = (lambda name: bool(rope) and name.endswith("mamba.out_proj.weight"), lambda p: p.mul_(0.1))
        model = _drawn(tf.AutoModelForCausalLM.from_config(config), routing, TAPS, smaller)
        return _perturbed(model, ("layernorm.weight", "mamba.norm.weight"), 1.0)
    if kind == "falcon-h1":  # Falcon-H1 in small: Mamba-2 beside attention in every block, µP multipliers that matter
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        config = tf.FalconH1Config(**sizes, head_dim=16, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16,
                                   mamba_n_groups=2, mamba_d_conv=4, mamba_expand=2, mamba_d_ssm=128,
                                   mamba_rms_norm=True, mamba_norm_before_gate=False, vocab_size=vocab,
                                   **FALCON_H1_MUP)  # fmt: skip
        model = _drawn(tf.AutoModelForCausalLM.from_config(config), TAPS)
        return _perturbed(model, ("layernorm.weight", "mamba.norm.weight"), 1.0)
    if kind in ("mamba", "falcon-mamba", "mamba2"):  # pure Mamba (1) / Falcon-Mamba / Mamba-2, 4 blocks
        sizes = {"vocab_size": vocab, "hidden_size": 64, "num_hidden_layers": 4, "state_size": 16, "conv_kernel": 4,
                 "expand": 2, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}  # fmt: skip
        mamba1 = tf.FalconMambaConfig if kind == "falcon-mamba" else tf.MambaConfig
        config = (tf.Mamba2Config(**sizes, num_heads=8, head_dim=16, n_groups=2) if kind == "mamba2" else
                  mamba1(**sizes, time_step_rank=8))  # fmt: skip
        return _perturbed(
            _drawn(tf.AutoModelForCausalLM.from_config(config), TAPS), ("norm.weight", "norm_f.weight"), 1.0
        )
    if kind == "jamba":  # Jamba in small: Mamba (1) blocks around an attention block, experts every other block
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        config = tf.JambaConfig(**sizes, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
                                expert_layer_offset=1, attn_layer_period=4, attn_layer_offset=2, mamba_d_state=16,
                                mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8, vocab_size=vocab)  # fmt: skip
        routing = (lambda name: ".experts." in name or ".router." in name, lambda p: p.normal_(0, 0.2))
        return _perturbed(
            _drawn(tf.AutoModelForCausalLM.from_config(config), routing, TAPS), ("layernorm.weight",), 1.0
        )
    if (
        kind.removesuffix("-structured") == "bamba"
    ):  # Bamba in small: Mamba-2 blocks around an attention block with RoPE over half a head
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        config = tf.BambaConfig(**sizes, attn_layer_indices=[2], mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16,
                                mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, vocab_size=vocab)  # fmt: skip
        smaller = (lambda name: name.endswith("mamba.out_proj.weight"), lambda p: p.mul_(0.1))  # so that RoPE shows
        model = _drawn(tf.AutoModelForCausalLM.from_config(config), TAPS, smaller)
        return _perturbed(model, ("layernorm.weight", "mamba.norm.weight"), 1.0)
    # Gemma 3n in small, with what llama.cpp's gemma3n fixes: 4 AltUp streams, LAuReL rank 64, per-layer embeddings
    # of 256, 22 blocks of which the last 2 reuse keys and values (from block 20), activation sparsity (the 95th
    # percentile) in the first 10
    if kind == "gemma3n":
        # an MLP of 2048 channels: llama.cpp's sparsity cutoff takes the spread over n - 1 (transformers: over n),
        # which moves the cutoff by sqrt(n / (n - 1)): 1.00024 here, 1.00006 at E2B's 8192 (0.5% at 96 channels)
        config = tf.Gemma3nTextConfig(**{**SIZES, "num_hidden_layers": 22, "intermediate_size": 2048}, head_dim=16,
                                      hidden_size_per_layer_input=256, laurel_rank=64, num_kv_shared_layers=2,
                                      sliding_window=16, vocab_size=vocab,
                                      vocab_size_per_layer_input=vocab)  # fmt: skip
        model = tf.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # AltUp's coefficients and output scale (initialized to zero) drawn, so that they act
            for name, p in model.named_parameters():
                if name.endswith(("correction_coefs.weight", "prediction_coefs.weight", "modality_router.weight")):
                    p.normal_(0, 0.5)
                if name.endswith("correct_output_scale"):
                    p.normal_(1, 0.5)
        return _perturbed(model, ("norm.weight", "layernorm.weight"), 1.0)
    # Gemma 4 in small: sliding and global layers of different head widths (16 / 32) and key/value heads (2 / 1,
    # the global ones' values their keys), proportional RoPE over a quarter of the global heads; E2B's per-layer
    # embeddings, keys and values shared by the last two blocks and their MLP double-wide; -moe: 26B-A4B's
    # experts (4, top-2) beside the MLP in every block, nothing shared
    if kind in ("gemma4", "gemma4-moe", "gemma4-structured", "gemma4-moe-structured"):
        kinds = ["sliding_attention", "full_attention"] * (3 if kind == "gemma4" else 2)
        sizes = {**SIZES, "num_hidden_layers": len(kinds), "intermediate_size": 96}
        common = {"head_dim": 16, "global_head_dim": 32, "num_global_key_value_heads": 1, "attention_k_eq_v": True,
                  "sliding_window": 16, "layer_types": kinds, "final_logit_softcapping": 30.0, "vocab_size": vocab,
                  "vocab_size_per_layer_input": vocab}  # fmt: skip
        if kind == "gemma4":
            extra = {"hidden_size_per_layer_input": 8, "num_kv_shared_layers": 2, "use_double_wide_mlp": True}
        elif kind == "gemma4-structured":  # 31B's shape: no per-layer embeddings, nothing shared, 4 blocks
            extra = {"hidden_size_per_layer_input": 0}
        else:
            extra = {"hidden_size_per_layer_input": 0, "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2,
                     "moe_intermediate_size": 32}  # fmt: skip
        config = tf.Gemma4TextConfig(**sizes, **common, **extra)
        routing: Rule = (lambda name: ".experts." in name or ".router." in name, lambda p: p.normal_(0, 0.2))
        scales: Rule = (lambda name: name.endswith(("router.scale", "per_expert_scale")), lambda p: p.normal_(1, 0.5))
        model = _drawn(tf.AutoModelForCausalLM.from_config(config), routing, scales)
        with torch.no_grad():  # each block's output scale away from 1 (a buffer: a lost one shows)
            for layer in model.model.layers:
                layer.layer_scalar.uniform_(0.5, 1.5)
        return _perturbed(model, ("norm.weight", "layernorm.weight", "layernorm_1.weight", "layernorm_2.weight"), 1.0)
    if (
        kind.removesuffix("-structured") == "nemotron-h"
    ):  # Nemotron-H in small: Mamba-2, attention, Mamba-2, MLP blocks (no RoPE)
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        config = tf.NemotronHConfig(**sizes, head_dim=16, mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=16,
                                    n_groups=2, conv_kernel=4, expand=2, hybrid_override_pattern="M*M-",
                                    vocab_size=vocab)  # fmt: skip
        return _perturbed(_drawn(tf.AutoModelForCausalLM.from_config(config), TAPS), ("norm.weight",), 1.0)
    # Qwen3.5 in small: 3 Gated DeltaNet blocks (4 value heads on 2 key heads), then attention; -moe: 4 experts
    # (top-2) and a gated shared expert in every block; Qwen3-Next: as -moe
    if kind in ("qwen35", "qwen35-structured", "qwen35-moe", "qwen3-next"):
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1],
                "mrope_interleaved": True}  # fmt: skip
        common = {"head_dim": 16, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                  "linear_num_key_heads": 2, "linear_num_value_heads": 4, "rope_parameters": rope,
                  "vocab_size": vocab}  # fmt: skip
        moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
               "shared_expert_intermediate_size": 48}  # fmt: skip
        if kind.removesuffix("-structured") == "qwen35":
            config = tf.Qwen3_5TextConfig(**sizes, **common)
        elif kind == "qwen3-next":  # no multimodal RoPE sections
            plain = {k: v for k, v in rope.items() if not k.startswith("mrope")}
            config = tf.Qwen3NextConfig(**sizes, **{**common, "rope_parameters": plain}, **moe)
        else:
            config = tf.Qwen3_5MoeTextConfig(**sizes, **common, **moe)
        routing: Rule = (lambda name: ".mlp." in name, lambda p: p.normal_(0, 0.2))
        dense = kind.removesuffix("-structured") == "qwen35"
        model = _drawn(tf.AutoModelForCausalLM.from_config(config), TAPS, *([routing] if not dense else []))
        return _perturbed(model, ("norm.weight",), 0.0)
    if kind == "apertus":  # Apertus in small: per-head Q/K norms, Llama 3 RoPE, an xIELU MLP with its parameters drawn
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        config = tf.ApertusConfig(**sizes, vocab_size=vocab, rope_parameters=dict(LLAMA3))
        model = tf.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # each block's own xIELU (α_p, α_n from N(0, 1) before softplus)
            for name, p in model.named_parameters():
                if name.endswith(("act_fn.alpha_p", "act_fn.alpha_n")):
                    p.normal_(0, 1.0)
        return _perturbed(model, ("norm.weight",), 1.0)
    if kind == "minimax-m2":  # MiniMax-M2 in small: whole-projection Q/K norms, RoPE over half a head, 8 experts
        sizes = {**SIZES, "num_hidden_layers": 4, "intermediate_size": 32, "pad_token_id": None, "bos_token_id": None,
                 "eos_token_id": None}  # fmt: skip
        config = tf.MiniMaxM2Config(**sizes, head_dim=16, rotary_dim=8, num_local_experts=8, num_experts_per_tok=2,
                                    vocab_size=vocab)  # fmt: skip
        return _perturbed(_routing_drawn(tf.AutoModelForCausalLM.from_config(config)), ("norm.weight",), 1.0)
    if kind.startswith("llama4"):  # Llama 4 in small: dense and MoE blocks alternating, no RoPE in block 3
        sizes = {**SIZES, "num_hidden_layers": 4, "intermediate_size": 32, "pad_token_id": None, "bos_token_id": None,
                 "eos_token_id": None}  # fmt: skip
        config = tf.Llama4TextConfig(**sizes, intermediate_size_mlp=128, head_dim=16, num_local_experts=4,
                                     num_experts_per_tok=1, interleave_moe_layer_step=2, vocab_size=vocab)  # fmt: skip
        if kind == "llama4-llama3-rope":  # Scout's RoPE scaling (Llama 3's), as the llama3-rope row's
            config.rope_parameters = dict(LLAMA3)
        model = tf.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".experts." in name or ".router." in name or ".shared_expert." in name:
                    p.normal_(0, 0.2)
        return _perturbed(model, ("norm.weight",), 1.0)
    if kind in ("lfm2", "lfm2-moe"):  # LFM2 in small: short-convolution blocks around an attention block
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
                 "layer_types": ["conv", "conv", "full_attention", "conv"], "vocab_size": vocab}  # fmt: skip
        if kind == "lfm2":
            config: Any = tf.Lfm2Config(**sizes)
        else:  # LFM2-8B-A1B's kind: the first block dense, then 8 experts, top-2, sigmoid routing with a bias
            config = tf.Lfm2MoeConfig(**sizes, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                      num_dense_layers=1)  # fmt: skip
        model = tf.AutoModelForCausalLM.from_config(config)
        if kind == "lfm2-moe":
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if ".experts." in name or ".gate." in name:
                        p.normal_(0, 0.2)
                for name, b in model.named_buffers():
                    if name.endswith("expert_bias"):
                        b.normal_(0, 0.2)
        # the convolutions' taps and gates large enough that earlier tokens matter
        taps: Rule = (lambda name: name.endswith("conv.conv.weight"), lambda p: p.normal_(0, 1.0))
        gates: Rule = (lambda name: name.endswith("conv.in_proj.weight"), lambda p: p.mul_(8))
        return _perturbed(_drawn(model, taps, gates), ("norm.weight",), 1.0)
    if kind == "glm4-moe":  # GLM-4.5 in small: DeepSeek V3's routing, Q/K/V biases, per-head Q/K norms
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        config = tf.Glm4MoeConfig(**sizes, head_dim=32, attention_bias=True, use_qk_norm=True, moe_intermediate_size=32,
                                  n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2,
                                  topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
                                  vocab_size=vocab)  # fmt: skip
        return _layernorms_and_biases_drawn(_routing_drawn(tf.AutoModelForCausalLM.from_config(config)), "proj.bias")
    if kind == "hunyuan":  # HunYuan dense: 4 blocks, per-head Q/K norms after RoPE drawn, NTK alpha 1000, q/k x 8
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        config = tf.HunYuanDenseV1Config(**sizes, head_dim=16, vocab_size=vocab, rope_parameters=dict(HUNYUAN_ROPE))
        return _perturbed(tf.AutoModelForCausalLM.from_config(config), ("layernorm.weight",), 1.0)
    if kind == "arcee":  # 4 blocks: squared-ReLU MLP, YaRN (factor 4 over an original context of 64), q/k x 8
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
                 "max_position_embeddings": 256}  # fmt: skip
        config = tf.ArceeConfig(**sizes, vocab_size=vocab, rope_parameters=dict(ARCEE_ROPE))
        return _perturbed(tf.AutoModelForCausalLM.from_config(config), (), 0)
    if kind == "seed_oss":  # 4 blocks: random Q/K/V biases, head_dim 32 (heads x head_dim apart from hidden)
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        model = tf.AutoModelForCausalLM.from_config(tf.SeedOssConfig(**sizes, head_dim=32, vocab_size=vocab))
        return _layernorms_and_biases_drawn(model, "proj.bias")
    if kind == "olmo":  # OLMo (1): 4 blocks, weightless LayerNorms, Q/K/V clipped at 2 (query and key weights x 8)
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        return _perturbed(
            tf.AutoModelForCausalLM.from_config(tf.OlmoConfig(**sizes, clip_qkv=2.0, vocab_size=vocab)), (), 0
        )
    if kind == "nemotron":  # 4 blocks: LayerNorm1P weights and biases N(0, 0.5), squared ReLU, RoPE over half a head
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        model = tf.AutoModelForCausalLM.from_config(tf.NemotronConfig(**sizes, head_dim=16, vocab_size=vocab))
        return _perturbed(model, ("norm.weight", "norm.bias"), 0.0)
    if (
        kind.removesuffix("-structured") == "glm4"
    ):  # 4 blocks: norms N(1, 0.5) (two more per block), Q/K/V biases, RoPE over half a head
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        model = tf.AutoModelForCausalLM.from_config(tf.Glm4Config(**sizes, head_dim=16, vocab_size=vocab))
        return _layernorms_and_biases_drawn(model, "proj.bias")
    if kind.removesuffix("-structured") == "gemma":  # Gemma 1: 4 blocks, (1 + w) norms drawn, head_dim 256
        sizes = {**SIZES, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32}
        config = tf.GemmaConfig(**sizes, vocab_size=vocab)
        return _perturbed(tf.AutoModelForCausalLM.from_config(config), ("norm.weight",), 0.0)
    if kind == "gemma2":  # 4 blocks alternating sliding / global, window 16; soft-capping that bites
        sizes = {**SIZES, "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1}
        config = tf.Gemma2Config(**sizes, head_dim=256, sliding_window=16, vocab_size=vocab,
                                 attn_logit_softcapping=5.0, final_logit_softcapping=3.0)  # fmt: skip
        # query and key scaled: attention logits past the cap of 5
        return _perturbed(tf.AutoModelForCausalLM.from_config(config), ("norm.weight",), 0.0)
    if (
        kind.removesuffix("-structured") == "stablelm"
    ):  # LayerNorms with random weights and biases, Q/K/V biases, RoPE over a quarter head
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        model = tf.AutoModelForCausalLM.from_config(tf.StableLmConfig(**sizes, vocab_size=vocab, use_qkv_bias=True))
        return _layernorms_and_biases_drawn(model, "proj.bias")
    if kind == "phi2":  # one LayerNorm, attention and MLP side by side, biases everywhere; RoPE over half a head
        sizes = {**SIZES, "num_hidden_layers": 4, "num_key_value_heads": 4, "pad_token_id": None,
                 "bos_token_id": None, "eos_token_id": None}  # fmt: skip
        return _layernorms_and_biases_drawn(
            tf.AutoModelForCausalLM.from_config(tf.PhiConfig(**sizes, vocab_size=vocab))
        )
    if kind.removesuffix("-structured") == "starcoder2":  # LayerNorm and Linear biases random, no window
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        config = tf.Starcoder2Config(**sizes, sliding_window=None, vocab_size=vocab)
        return _layernorms_and_biases_drawn(tf.AutoModelForCausalLM.from_config(config))
    if kind.removesuffix("-structured") in ("olmo2", "olmo3"):  # post-norms, whole-projection Q/K norms; OLMo 3: window
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        olmo = tf.Olmo2Config(**sizes, vocab_size=vocab) if kind.startswith("olmo2") else tf.Olmo3Config(
            **sizes, vocab_size=vocab, sliding_window=16)  # fmt: skip
        return _perturbed(tf.AutoModelForCausalLM.from_config(olmo), ("norm.weight",), 1.0)
    if kind in ("cohere", "cohere-qk-norm"):  # attention and MLP side by side on one LayerNorm, logits / 16
        qk_norm = kind == "cohere-qk-norm"  # Command R+'s per-head Q/K LayerNorms, and its 64 blocks
        sizes = {**SIZES, "num_hidden_layers": 64 if qk_norm else 4, "pad_token_id": None, "bos_token_id": None,
                 "eos_token_id": None}  # fmt: skip
        config = tf.CohereConfig(**sizes, vocab_size=vocab, logit_scale=0.0625, use_qk_norm=qk_norm)
        return _perturbed(tf.AutoModelForCausalLM.from_config(config), ("layernorm.weight", "_norm.weight"), 1.0)
    if kind.startswith("cohere2"):  # Cohere's block; sliding layers with RoPE, a global one without (layer 1)
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        kinds = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
        config = tf.Cohere2Config(**sizes, vocab_size=vocab, logit_scale=0.0625, sliding_window=16, layer_types=kinds)
        return _perturbed(tf.AutoModelForCausalLM.from_config(config), ("layernorm.weight",), 1.0)
    if kind in ("smollm3", "granite"):  # Llama's tensors; SmolLM3 skips RoPE in layer 3, Granite scales
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        if kind == "smollm3":
            config: Any = tf.SmolLM3Config(**sizes, vocab_size=vocab)
        else:
            config = tf.GraniteConfig(**sizes, vocab_size=vocab, **GRANITE)
        model = tf.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # positions matter
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(8)
                layer.self_attn.k_proj.weight.mul_(8)
        return model.eval()
    if kind == "phi3":  # fused qkv and gate_up; every layer sliding, window 16 (the block is 200 tokens)
        config = tf.Phi3Config(**SIZES, sliding_window=16, vocab_size=vocab, pad_token_id=None, bos_token_id=None,
                               eos_token_id=None)  # fmt: skip
        return tf.AutoModelForCausalLM.from_config(config).eval()
    if kind == "qwen2-padded-vocab":  # 64 embedding rows no token names
        model = tf.AutoModelForCausalLM.from_config(tf.Qwen2Config(**SIZES, vocab_size=vocab + 64))
        return _drawn(model, (lambda name: name.endswith("proj.bias"), lambda p: p.normal_(0, 0.5)))
    if kind in ("llama-structured", "qwen2-structured", "qwen2-structured-heads"):  # positions matter; Qwen2's biases
        sizes = {**SIZES, "num_hidden_layers": 4}
        config = tf.LlamaConfig(**sizes, vocab_size=vocab) if kind == "llama-structured" else tf.Qwen2Config(
            **sizes, vocab_size=vocab)  # fmt: skip
        model = tf.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(8)
                if name.endswith("proj.bias"):
                    p.normal_(0, 0.5)
        return model.eval()
    if kind == "phi3-structured":  # 4 blocks, positions that matter, no window
        sizes = {**SIZES, "num_hidden_layers": 4}
        config = tf.Phi3Config(**sizes, vocab_size=vocab, pad_token_id=None, bos_token_id=None, eos_token_id=None)
        return _fused_qk_scaled(tf.AutoModelForCausalLM.from_config(config))
    if kind.startswith("phi3-longrope"):  # Phi-4-mini's RoPE in small: 3/4 of a head rotated, LongRoPE
        sizes = {**SIZES, "max_position_embeddings": 2048}
        config = tf.Phi3Config(**sizes, vocab_size=vocab, pad_token_id=None, bos_token_id=None, eos_token_id=None,
                               original_max_position_embeddings=256)  # fmt: skip
        config.rope_parameters = dict(LONGROPE)
        return _fused_qk_scaled(tf.AutoModelForCausalLM.from_config(config))
    if kind == "qwen3":
        model = tf.AutoModelForCausalLM.from_config(tf.Qwen3Config(**SIZES, head_dim=128, vocab_size=vocab))
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1, 0.5)
                layer.self_attn.k_norm.weight.normal_(1, 0.5)
        return model.eval()
    if kind in ("ministral3", "ministral3-multimodal"):  # Llama's blocks, YaRN over an original 64, Llama 4's
        # attention temperature; -multimodal: the same text model in a Mistral 3 image-text checkpoint
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        config = tf.Ministral3Config(**sizes, vocab_size=vocab, head_dim=16)
        config.rope_parameters = dict(MINISTRAL3_ROPE)
        text = _perturbed(tf.AutoModelForCausalLM.from_config(config), (), 1.0)
        if kind == "ministral3":
            return text
        vision = tf.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8, head_dim=16)  # fmt: skip
        model = tf.Mistral3ForConditionalGeneration(tf.Mistral3Config(text_config=config, vision_config=vision,
                                                                      tie_word_embeddings=False))  # fmt: skip
        model.model.language_model.load_state_dict(text.model.state_dict())
        model.lm_head.load_state_dict(text.lm_head.state_dict())
        return model.eval()
    if kind == "exaone4":  # norms after the sublayers, per-head Q/K norms, Llama 3 RoPE (EXAONE 4.0 1.2B's)
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        config = tf.Exaone4Config(**sizes, vocab_size=vocab, sliding_window=None, sliding_window_pattern=None,
                                  layer_types=["full_attention"] * 4)  # fmt: skip
        config.rope_parameters = dict(LLAMA3)
        return _perturbed(tf.AutoModelForCausalLM.from_config(config), ("norm.weight",), 1.0)
    if kind == "ernie4_5":  # RoPE on interleaved pairs (no permutation), head_dim 128; positions matter
        sizes = {**SIZES, "num_hidden_layers": 4, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
        model = tf.AutoModelForCausalLM.from_config(tf.Ernie4_5Config(**sizes, vocab_size=vocab, use_bias=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(8)
        return model.eval()
    if (
        kind.removesuffix("-experts").removesuffix("-mxfp4") == "gpt-oss"
    ):  # sinks, biases, clamped SwiGLU, YaRN (gpt-oss's), window 16
        config = tf.GptOssConfig(**{**SIZES, "intermediate_size": 64}, num_local_experts=4, num_experts_per_tok=2,
                                 head_dim=16, sliding_window=16, vocab_size=vocab, pad_token_id=None,
                                 bos_token_id=None, eos_token_id=None)  # fmt: skip
        model = tf.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # experts, router, every bias and the sinks drawn so that each matters
            for name, p in model.named_parameters():
                if ".mlp." in name or name.endswith(("bias", "sinks")):
                    p.normal_(0, 0.2 if ".mlp." in name else 0.5)
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    p.mul_(8)
        return model.eval()
    if kind.removesuffix("-experts").removesuffix("-structured") in ("mixtral", "qwen3-moe", "qwen2-moe", "olmoe",
                                                                     "granitemoe", "granitemoe-shared"):  # fmt: skip
        moe: Any = {
            "mixtral": lambda: tf.MixtralConfig(**SIZES, num_local_experts=4, num_experts_per_tok=2, vocab_size=vocab),
            "qwen3-moe": lambda: tf.Qwen3MoeConfig(**SIZES, moe_intermediate_size=64, num_experts=4,
                                                   num_experts_per_tok=2, norm_topk_prob=True, head_dim=16,
                                                   vocab_size=vocab),
            "qwen2-moe": lambda: tf.Qwen2MoeConfig(**SIZES, moe_intermediate_size=64, num_experts=4,
                                                   shared_expert_intermediate_size=64, num_experts_per_tok=2,
                                                   vocab_size=vocab),
            # whole-projection Q/K norms, routing weights not renormalized
            "olmoe": lambda: tf.OlmoeConfig(**{**SIZES, "num_key_value_heads": 4}, num_experts=4, num_experts_per_tok=2,
                                            vocab_size=vocab),  # as many key/value heads as query heads
            # Granite's multipliers (as the granite row's), the experts under `block_sparse_moe`
            "granitemoe": lambda: tf.GraniteMoeConfig(**SIZES, **GRANITE, num_local_experts=4, num_experts_per_tok=2,
                                                      vocab_size=vocab),
            # and a shared expert beside the routed ones (its fused gate/up drawn too)
            "granitemoe-shared": lambda: tf.GraniteMoeSharedConfig(**SIZES, **GRANITE, num_local_experts=4,
                                                                   num_experts_per_tok=2, shared_intermediate_size=96,
                                                                   vocab_size=vocab),
        }[kind.removesuffix("-experts").removesuffix("-structured")]()  # fmt: skip
        model = tf.AutoModelForCausalLM.from_config(moe)
        with torch.no_grad():  # Qwen2-MoE: its shared expert's gate too
            for name, p in model.named_parameters():
                if (
                    "experts" in name
                    or "shared_mlp" in name
                    or name.endswith(("mlp.gate.weight", "shared_expert_gate.weight", "router.weight"))
                ):
                    p.normal_(0, 0.2)
        return model.eval()
    config = tf.LlamaConfig(**SIZES, vocab_size=vocab)
    config.rope_parameters = dict(LLAMA3)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model.eval()


# layouts exported after `carve extract --structure` (its options; every head kept for phi3 and qwen2: their
# llama.cpp graphs take query rows as wide as the hidden size only, and fail to load a file with fewer; half
# the heads for llama, whose graph sizes them by heads x head_dim, and for qwen2-structured-heads, which the
# export writes as llama.cpp's llama)
_CUT = ["--calib-blocks", "8", "--eval-blocks", "4", "--block-len", "128", "--mlp-keep", "0.5", "--drop-blocks", "1"]
STRUCTURED = {"phi3-structured": [*_CUT, "--heads-keep", "1.0"], "qwen2-structured": [*_CUT, "--heads-keep", "1.0"],
              "llama-structured": [*_CUT, "--heads-keep", "0.5"], "cohere2-structured": [*_CUT, "--heads-keep", "1.0"],
              "qwen2-structured-heads": [*_CUT, "--heads-keep", "0.5"],
              "gemma-structured": [*_CUT, "--heads-keep", "0.5"],  # 4 of 8 query heads, 2 of 4 key/value heads
              "glm4-structured": [*_CUT, "--heads-keep", "0.5"],  # 2 of 4 query heads: 32 wide beside hidden 64
              # heads structured extraction cannot remove (whole-projection Q/K norms; a width attribute): every
              # head kept without being asked
              "olmo2-structured": _CUT, "stablelm-structured": _CUT,
              "starcoder2-structured": [*_CUT, "--heads-keep", "1.0"],
              # whole experts removed: 3 of 4 kept, each token still routed to 2
              "mixtral-experts": [*_CUT[:6], "--experts-keep", "0.75"],
              "qwen2-moe-experts": [*_CUT[:6], "--experts-keep", "0.75"],
              "olmoe-experts": [*_CUT[:6], "--experts-keep", "0.75"],
              "granitemoe-experts": [*_CUT[:6], "--experts-keep", "0.75"],
              "gpt-oss-experts": [*_CUT[:6], "--experts-keep", "0.75"],
              "deepseek-v3-experts": [*_CUT[:6], "--experts-keep", "0.75"],  # 3 of 4 in each of 2 groups
              # hybrids: their Gated DeltaNet / Mamba blocks kept whole, MLP channels and a block cut, and half the
              # attention blocks' heads
              "qwen35-structured": [*_CUT, "--heads-keep", "0.5"], "bamba-structured": [*_CUT, "--heads-keep", "0.5"],
              "nemotron-h-structured": [*_CUT, "--heads-keep", "0.5"],
              # Gemma 4: every head kept (its global layers lay them out otherwise), MLP channels (31B's shape)
              # and a block (never the last, which its config makes global) cut; the MoE's experts kept
              "gemma4-structured": _CUT, "gemma4-moe-structured": [*_CUT[:6], "--drop-blocks", "1"],
              # an MoE's heads and depth (its experts untouched: no dense MLP to narrow)
              "mixtral-structured": [*_CUT[:6], "--heads-keep", "0.5", "--drop-blocks", "1"]}  # fmt: skip


# per layout: where the contrast model is saved, and the config change that removes the feature
CONTRASTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma3": ("export-archs-global", {"layer_types": ["full_attention"] * 3}),  # every layer global
    "deepseek-v3": ("export-archs-deepseek-v3-ungrouped", {"topk_group": 2}),  # every group's experts open
    "deepseek-v2": ("export-archs-deepseek-v2-top1", {"num_experts_per_tok": 1}),
    "glm4-moe": ("export-archs-glm4-moe-ungrouped", {"topk_group": 2}),  # every group's experts open
    "glm4-moe-lite": ("export-archs-glm4-moe-lite-ungrouped", {"topk_group": 2}),
    "dots1": ("export-archs-dots1-ungrouped", {"topk_group": 2}),
    "ernie4_5-moe": ("export-archs-ernie4_5-moe-top1", {"num_experts_per_tok": 1}),
    "hunyuan-moe": ("export-archs-hunyuan-moe-top1", {"moe_topk": 1}),
    "minimax-m2": ("export-archs-minimax-m2-top1", {"num_experts_per_tok": 1}),
    "llama4": ("export-archs-llama4-no-l2", {"use_qk_norm": False}),  # queries and keys not L2-normalized
    "lfm2-moe": ("export-archs-lfm2-moe-top1", {"num_experts_per_tok": 1}),
    "granite-hybrid": ("export-archs-granite-hybrid-top1", {"num_experts_per_tok": 1}),
    "jamba": ("export-archs-jamba-top1", {"num_experts_per_tok": 1}),
    "qwen35-moe": ("export-archs-qwen35-moe-top1", {"num_experts_per_tok": 1}),
    "qwen3-next": ("export-archs-qwen3-next-top1", {"num_experts_per_tok": 1}),
    "gemma4-moe": ("export-archs-gemma4-moe-top1", {"top_k_experts": 1}),
    "gemma3n": ("export-archs-gemma3n-dense", {"activation_sparsity_pattern": [0.0] * 22}),  # no activation sparsity
    # RoPE over every channel of the global heads (not a quarter): llama.cpp's rope_freqs must not match
    "gemma4": (
        "export-archs-gemma4-whole-rope",
        {
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 1.0, "rope_theta": 1000000.0},
            }
        },
    ),
    # every multiplier 1
    "falcon-h1": (
        "export-archs-falcon-h1-no-mup",
        {**dict.fromkeys(FALCON_H1_MUP, 1.0), "ssm_multipliers": [1.0] * 5, "mlp_multipliers": [1.0, 1.0]},
    ),
    "bamba": (
        "export-archs-bamba-nope",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.0}},
    ),  # no channel rotated
    "apertus": ("export-archs-apertus-plain", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "granite-hybrid-rope": ("export-archs-granite-hybrid-nope", {"position_embedding_type": None}),  # no RoPE
    "llama4-llama3-rope": (
        "export-archs-llama4-plain",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    ),
    "deepseek-v2-lite": (
        "export-archs-deepseek-v2-lite-plain",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    ),
    "deepseek-v3-yarn": (
        "export-archs-deepseek-v3-plain",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    ),
    "olmo3": ("export-archs-olmo3-global", {"layer_types": ["full_attention"] * 4}),  # every layer global
    "smollm3": ("export-archs-smollm3-rope", {"no_rope_layers": [1, 1, 1, 1]}),  # RoPE in every layer
    "granite": ("export-archs-granite-plain", {k: 1.0 for k in GRANITE}),  # no multiplier
    "olmo": ("export-archs-olmo-unclipped", {"clip_qkv": None}),  # Q, K and V not clipped
    "hunyuan": ("export-archs-hunyuan-plain", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "arcee": ("export-archs-arcee-plain", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "cohere": ("export-archs-cohere-unscaled", {"logit_scale": 1.0}),  # logits not scaled
    "cohere-qk-norm": ("export-archs-cohere-no-qk-norm", {"use_qk_norm": False}),  # the Q/K norms left out
    "cohere2": ("export-archs-cohere2-sliding", {"layer_types": ["sliding_attention"] * 4}),  # RoPE, window everywhere
    # every layer global and nothing soft-capped
    "gemma2": (
        "export-archs-gemma2-plain",
        {"layer_types": ["full_attention"] * 4, "attn_logit_softcapping": None, "final_logit_softcapping": None},
    ),
    "phi3": ("export-archs-fused-full", {"sliding_window": None}),  # no sliding window
    # plain RoPE over the same 3/4 of each head: no factors, no attention factor
    "phi3-longrope": (
        "export-archs-fused-plain-rope",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}},
    ),
    "phi3-longrope-short": (
        "export-archs-fused-plain-rope-short",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}},
    ),
    "llama3-rope": ("export-archs-plain", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    "exaone4": ("export-archs-exaone4-plain", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    # YaRN kept, the temperature removed: llama.cpp must not match
    "ministral3": (
        "export-archs-ministral3-no-temp",
        {"rope_parameters": {**MINISTRAL3_ROPE, "llama_4_scaling_beta": 0.0}},
    ),
    "mixtral": ("export-archs-mixtral-top1", {"num_experts_per_tok": 1}),  # one expert a token
    "qwen3-moe": ("export-archs-qwen3-moe-top1", {"num_experts_per_tok": 1}),
    "olmoe": ("export-archs-olmoe-top1", {"num_experts_per_tok": 1}),
    "granitemoe": ("export-archs-granitemoe-top1", {"num_experts_per_tok": 1}),
    "qwen2-moe": ("export-archs-qwen2-moe-top1", {"num_experts_per_tok": 1}),
    "gpt-oss": ("export-archs-gpt-oss-top1", {"num_experts_per_tok": 1}),
}


def scored(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, list[int]]:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
    return nll, logits.argmax(-1)[:-1].tolist()


def row(kind: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ensure_model()
    if kind.removesuffix("-structured").removesuffix("-multimodal") in ("gemma", "gemma2", "gemma3", "gemma3n"):
        tok = gemma_style_tokenizer(2000)
    elif kind.removesuffix("-f32").removesuffix("-structured") in (
        "gemma4",
        "gemma4-moe",
    ):  # no token joins newlines to other characters, a BOS before the text
        tok = gemma_style_tokenizer(2000, gemma4=True)
    elif kind == "llama3-tokenizer":  # byte-level BPE split first by Llama 3's rule
        from carve.models.pretokenize import SPLITS

        tok = byte_level_tokenizer(next(k for k, v in SPLITS.items() if v == "llama-bpe"), size=2000)
    elif kind == "deepseek-v3-tokenizer":  # byte-level BPE split by DeepSeek V3's three rules in turn
        from carve.models.pretokenize import SEQUENCES

        tok = byte_level_tokenizer(next(k for k, v in SEQUENCES.items() if v == "deepseek-v3"), size=2000)
    else:
        tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    # llama.cpp gives Phi-3's own special tokens (<s>, </s>, <unk>) attributes when the model's name holds
    # "phi3" and fails to load a vocabulary without them (this one is the embedded default's): not in the name
    name = kind.replace("phi3", "fused-qkv")
    kind_type = TYPE.get(kind, "f16")
    src, gguf = OUT / f"export-archs-{name}", OUT / f"export-archs-{name}.{kind_type}.gguf"
    model = tiny(kind, len(tok))
    model.save_pretrained(src)
    tok.save_pretrained(src)
    source = None
    if kind in STRUCTURED:  # carve's structured extraction of it is what goes to llama.cpp; contrast: the source
        source, src = model, OUT / f"export-archs-{name}-extracted"
        subprocess.run([CARVE, "extract", str(OUT / f"export-archs-{name}"), "--domain", "legal", *STRUCTURED[kind],
                        "--out", str(src), "--overwrite", "--quiet", "--no-speed", "--cloze-items", "0"],
                       check=True, capture_output=True)  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(src).eval()
    out = subprocess.run([CARVE, "export", str(src), "--gguf", str(gguf), "--type", kind_type, "--overwrite", "--json",
                          "--quiet"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    exported = json.loads(out[out.index("{") :])
    ids = torch.randint(0, len(tok), (1, BLOCK.get(kind, 200)), generator=torch.Generator().manual_seed(1))
    nll, top = scored(model, ids)
    texts = held_out_texts()
    tokenized = kind in ("gemma3", "gemma3n", "gemma4") or kind.endswith("-tokenizer")
    cpp = run_gguf(gguf, [ids[0].tolist()], decode_tokens=4, texts=texts if tokenized else None)
    cpp_top = cpp["top1"][0][: len(top)]  # llama.cpp's top-1 at every position but the last, as `top`
    r: dict[str, Any] = {
        "id": kind, "architecture": exported["architecture"], "tensors": exported["tensors"],
        "llamacpp_nll": round(cpp["nll"], 4), "transformers_nll": round(nll, 4),
        "top1_agree": sum(a == b for a, b in zip(cpp_top, top, strict=True)), "positions": len(top),
    }  # fmt: skip
    if tokenized:  # llama.cpp's own tokenizer against transformers'
        want = [tok(t)["input_ids"] for t in texts]
        r.update(texts=len(texts), texts_same=sum(a == b for a, b in zip(cpp["tokenized"], want, strict=True)),
                 text_tokens=sum(map(len, want)))  # fmt: skip
    if kind.endswith("-tokenizer"):  # contrast: the pre-tokenizer carve wrote before it read the split rule
        from carve.export import export as export_gguf
        from carve.models import pretokenize

        old = OUT / f"export-archs-{name}.arch-pre.gguf"
        read = pretokenize.name_of
        pretokenize.name_of = lambda _data: None  # the architecture's name ("default")
        try:
            export_gguf(src, old, "f16", overwrite=True)
        finally:
            pretokenize.name_of = read
        before = run_gguf(old, [ids[0].tolist()], decode_tokens=4, texts=texts)
        r.update(arch_pre_texts_same=sum(a == b for a, b in zip(before["tokenized"], want, strict=True)))
    if source is not None:  # the unsliced source: what llama.cpp must not match
        plain_nll, plain_top = scored(source, ids)
        r.update(plain_nll=round(plain_nll, 4),
                 plain_top1_agree=sum(a == b for a, b in zip(cpp_top, plain_top, strict=True)))  # fmt: skip
        shape = json.loads((src / "config.json").read_text())
        keys = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
                "num_local_experts", "num_experts", "n_routed_experts", "layer_types")  # fmt: skip
        r["shape"] = {k: shape[k] for k in keys if shape.get(k) is not None}
    if kind in CONTRASTS:  # the same weights without the layout's feature: what llama.cpp must not match
        directory, change = CONTRASTS[kind]
        for key, value in change.items():
            setattr(model.config, key, value)
        model.save_pretrained(OUT / directory)
        plain_nll, plain_top = scored(AutoModelForCausalLM.from_pretrained(OUT / directory).eval(), ids)
        r.update(plain_nll=round(plain_nll, 4),
                 plain_top1_agree=sum(a == b for a, b in zip(cpp_top, plain_top, strict=True)))  # fmt: skip
    return {**r, "commit": commit()}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "## GGUF export in llama.cpp: Qwen3, Llama 3 RoPE scaling, Gemma 3, Gemma 2, Gemma, SmolLM3, Granite, OLMo 2 "
        "and 3, "
        "StableLM, Cohere, Cohere 2, "
        "Phi-3 (also LongRoPE and structured), structured Qwen2 and Llama, Mixtral (also with experts removed), "
        "Qwen3-MoE, Qwen2-MoE, OLMoE, Granite MoE, gpt-oss, DeepSeek V2 and V3, GLM-4.5, dots.llm1, ERNIE 4.5 MoE, "
        "Hunyuan-A13B, MiniMax-M2, Llama 4, LFM2, Granite 4.0 H, Bamba, Falcon-H1, Jamba, Nemotron-H, Mamba, "
        "Falcon-Mamba, Mamba-2, Qwen3.5 (also MoE), Qwen3-Next, Gemma 3n, Gemma 4 (also MoE), Apertus, GLM-4, "
        "Nemotron, "
        "OLMo, Seed-OSS, Arcee, HunYuan (tiny random models)",
        "",
        "bench/export_archs.py: a tiny random model per layout (hidden 64, 2 blocks, the embedded default's "
        "tokenizer; Gemma 3: 3 blocks sliding / full / sliding, window 16, a trained Gemma-style SentencePiece "
        "tokenizer (`-multimodal`: the same text model inside a Gemma 3 image-text checkpoint with a tiny SigLIP "
        "tower, carve exporting the text model); Gemma 2: 4 blocks alternating sliding / global, window 16, attention "
        "and final soft-capping at "
        "5 and 3 with query and key weights scaled by 8 so that the caps bite, the Gemma-style tokenizer; Gemma (1): "
        "4 blocks, 8 query heads of 32 in 4 key/value groups (heads x head_dim apart from hidden), norm weights "
        "from N(0, 0.5) (Gemma scales by 1 + w), query and key weights scaled by 8, the Gemma-style tokenizer, and "
        "cut by `--heads-keep 0.5 --mlp-keep 0.5 --drop-blocks 1` (`-structured`); GLM-4 (0414): 4 blocks, its "
        "four norms per block from N(1, 0.5), random Q/K/V biases, query and key weights scaled by 8, GPT-J-style "
        "RoPE over half of each head (`-structured`: cut by `--heads-keep 0.5 --mlp-keep 0.5 --drop-blocks 1`, 2 "
        "query heads of 16 beside a hidden size of 64); Nemotron: 4 blocks, LayerNorm weights (Nemotron scales by "
        "1 + w) and biases from N(0, 0.5), query and key weights scaled by 8, a squared-ReLU MLP, RoPE over half of "
        "each head; OLMo (1): 4 blocks, LayerNorms without weights, Q, K and V clipped at 2 with query and key weights "
        "scaled by 8 (contrast: not clipped); Seed-OSS: 4 blocks, random Q/K/V biases and norm weights, 4 query "
        "heads of 32 (twice the hidden size); Arcee: 4 blocks, squared-ReLU MLP, YaRN with factor 4 over an "
        "original context of 64, query and key weights scaled by 8 (contrast: plain RoPE); HunYuan (dense): 4 "
        "blocks, its norms (per-head Q/K norms after RoPE among them) from N(1, 0.5), NTK alpha 1000 (the RoPE "
        "base stretched about 2.7x10^3-fold here, head_dim 16), query and key weights scaled by 8 (contrast: "
        "plain RoPE); SmolLM3 "
        "and Granite: 4 Llama-style blocks, query and key weights scaled by 8, SmolLM3 without RoPE in layer 3, "
        "Granite's multipliers at attention 1/64, embedding 12, residual 0.22, logits / 8; OLMo 2 and 3: 4 blocks, "
        "norm weights from N(1, 0.5), query and key weights scaled by 8, OLMo 3 three sliding layers then a global "
        "one, window 16; StableLM: 4 blocks with Q/K/V biases, random LayerNorm weights and biases, query and key "
        "weights scaled by 8; Cohere: 4 blocks, attention and MLP side by side on one LayerNorm, query and key "
        "weights scaled by 8, logits scaled by 1/16, and with per-head Q/K LayerNorms and 64 blocks (`-qk-norm`, "
        "Command R+'s); "
        "Cohere 2: the same block, layers sliding (window 16, RoPE), "
        "global (no RoPE), sliding, sliding (not llama.cpp's default pattern), and cut like the structured rows "
        "(`-structured`); Phi-3: "
        "fused qkv and gate/up, every layer sliding, window 16; Phi-3 LongRoPE (Phi-4-mini's RoPE "
        "in small: 3/4 of each head rotated, original context 256 of 2048, 6 long and 6 short factors, query and "
        "key rows scaled by 8), scored on 300 tokens (long factors) and on 200 (`-short`: llama.cpp's context 212, "
        "rounded up to 256, within the original 256, so both take the short factors); Phi-3 structured: 4 "
        "blocks cut by `carve extract --domain legal --heads-keep 1.0 --mlp-keep 0.5 --drop-blocks 1` before the "
        "export (contrast: the unsliced source); Qwen2 and Llama structured: the same cut of 4-block models (Qwen2 "
        "with random Q/K/V biases), Llama with half its heads too (head_dim apart from hidden / heads), Qwen2 "
        "with half its heads as llama.cpp's `llama` (`-heads`); OLMo 2 and StableLM structured: their rows' models "
        "cut by `--mlp-keep 0.5 --drop-blocks 1` (every head kept); Mixtral and "
        "Qwen2-MoE with experts removed: the MoE rows' models cut by `carve extract --experts-keep 0.75` (3 of 4 "
        "experts kept) before the export (contrast: the source); gpt-oss: 4 experts, top-2, attention sinks, "
        "biases, gpt-oss's YaRN, layers sliding / global (window 16), cut the same way for `-experts`; Mixtral, "
        "Qwen3-MoE, OLMoE (whole-projection Q/K norms, routing weights not renormalized, 4 key/value heads; "
        "`-experts`: cut by `--experts-keep 0.75`), Granite MoE (Granite's multipliers as the granite row's; "
        "`-experts` the same cut; `-shared`: a shared expert of width 96 beside them) and "
        "Qwen2-MoE: 4 "
        "experts, top-2, expert and router weights (Qwen2-MoE: its shared expert and its gate too) from N(0, 0.2)); "
        "DeepSeek: 4 blocks, the first dense, latent attention (query rank 32, latent 32, 4 heads of 16 + 8 rotated "
        "key channels), 8 experts, top-2, a shared expert; V3 sigmoid routing with a correction bias in the best 1 of "
        "2 groups (contrast: both open), V2 softmax (contrast: top-1), V2-Lite one query projection and its YaRN "
        "(mscales 0.707; contrast: plain RoPE), `-yarn` V3's YaRN (factor 40 over 64 positions; contrast: plain "
        "RoPE), `-experts` cut by `--experts-keep 0.75`; GLM-4.5: 4 blocks, the first dense, 4 heads of 32 with random "
        "Q/K/V biases and per-head Q/K norms, V3's routing over 8 experts in 2 groups (contrast: both open); "
        "GLM-4.7-Flash: the deepseek-v3 model as a Glm4MoeLite (contrast: both groups open); dots.llm1: 4 blocks, "
        "4 heads of 32 with per-head Q/K norms, V3's routing in 2 groups (contrast: both open); ERNIE 4.5 MoE: 4 "
        "blocks, the first dense, 8 experts, softmax routing with a correction bias (contrast: top-1); Hunyuan-A13B: "
        "HunYuan's attention, a shared MLP beside 8 experts (contrast: top-1); MiniMax-M2: whole-projection Q/K "
        "norms, RoPE over half a head, sigmoid routing with a correction bias over 8 experts (contrast: top-1); "
        "Llama 4: dense and MoE blocks alternating, no RoPE in block 3, 4 experts and a shared one, top-1 "
        "(contrast: without the L2 norm; `-llama3-rope`: Llama 3 RoPE scaling, contrast plain RoPE); LFM2: 4 blocks, "
        "3 of them gated short convolutions with large taps, 1 attention, and with 8 experts after the first block "
        "(`-moe`; contrast: top-1); Granite 4.0 H: Mamba-2 blocks around an attention block, 4 experts and a "
        "shared one (contrast: top-1; `-rope`: with RoPE, contrast without); Nemotron-H: Mamba-2, attention, "
        "Mamba-2 and MLP blocks; Bamba: Mamba-2 blocks around an attention block rotating half of each head "
        "(contrast: none rotated); Falcon-H1: Mamba-2 beside attention in every block, its µP multipliers away from 1 "
        "(contrast: all 1); Jamba: Mamba (1) blocks around an attention block, experts every other block (contrast: "
        "top-1); Apertus: per-head Q/K norms, Llama 3 RoPE, each block's xIELU drawn "
        "(contrast: plain RoPE); Gemma 3n: 22 blocks with llama.cpp's fixed AltUp (4 streams), LAuReL (rank 64), "
        "per-layer embeddings (256), keys and values reused from block 20, activation sparsity in the first 10, "
        "its coefficients and scales drawn, the Gemma-style tokenizer (contrast: no activation sparsity); "
        "Gemma 4: 6 blocks sliding / global alternating (heads of 16 / 32, 2 / 1 key/value "
        "heads, the global ones' values their keys, proportional RoPE over a quarter of the global heads), window "
        "16, per-layer embeddings of 8, the last 2 blocks reusing earlier keys and values with a double-wide MLP, "
        "final soft-capping at 30, norm weights from N(1, 0.5), each block's output scale from U(0.5, 1.5), a "
        "Gemma-4-style tokenizer (newline runs apart, BOS; contrast: RoPE over the whole global heads; `-f32`: the "
        "same model exported as f32), `-moe`: 4 blocks with 4 experts (top-2) beside the MLP, router and "
        "per-expert scales drawn (contrast: top-1), "
        "`carve export --type f16`, "
        "one random 200-token block scored by transformers and by llama.cpp (llama-cpp-python 0.3.36 built from "
        "source). Contrast: the same block scored by transformers with the layout's feature removed (Llama 3: no "
        "RoPE scaling; Gemma 3: every layer global; Gemma 2: every layer global, nothing soft-capped; Phi-3: no "
        "sliding window; SmolLM3: RoPE in every layer; Granite: every multiplier 1; OLMo 3: every layer global; "
        "Cohere: logits not scaled; Cohere 2: every layer sliding; "
        "Phi-3 LongRoPE: plain RoPE "
        "over the same channels; the MoEs: top-1 routing), which "
        "llama.cpp must not match "
        "(Phi-3: it does, llama.cpp disables Phi-3's window; see below). Tokenization: held-out texts tokenized "
        "by llama.cpp and by transformers (Gemma 3 row; llama3-tokenizer row: a byte-level BPE tokenizer split "
        "by Llama 3's rule, and the same model exported with the architecture's pre-tokenizer name, what carve "
        "wrote before it read the rule off the tokenizer; deepseek-v3-tokenizer row: the deepseek-v3 model with a "
        "tokenizer split by DeepSeek V3's three rules in turn, the same contrast).",
        "",
        "| layout | llama.cpp arch | tensors | llama.cpp NLL | transformers NLL | top-1 agreement "
        "| contrast: transformers NLL without the feature | top-1 agreement with it | texts tokenized the same |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        plain = f"{r['plain_nll']:.4f} | {r['plain_top1_agree']} / {r['positions']}" if "plain_nll" in r else "- | -"
        texts = f"{r['texts_same']} / {r['texts']} ({r['text_tokens']} tokens)" if "texts" in r else "-"
        if "arch_pre_texts_same" in r:
            texts += f"; with the architecture's pre-tokenizer name: {r['arch_pre_texts_same']} / {r['texts']}"
        lines.append(
            f"| {r['id']} | {r['architecture']} | {r['tensors']} | {r['llamacpp_nll']:.4f} "
            f"| {r['transformers_nll']:.4f} | {r['top1_agree']} / {r['positions']} | {plain} | {texts} |"
        )
    return "\n".join(lines) + "\n"


def held_out_texts() -> list[str]:
    """Legal documents 20-39 and code documents 0-9 (400 characters each), a line of accented, CJK,
    mathematical and emoji characters, and a line of phone numbers, dates and long numbers."""
    texts = [d[:400] for d in carve.Corpus("legal").documents[20:40] + carve.Corpus("code").documents[:10]]
    texts.append("Café naïve façade — ∑ x² ≤ ∞, 東京 😀 and\ttabs  and   spaces")
    texts.append("Call 555-0123 or +1 (800) 1234567890 by 2024-12-31; pi is 3.14159265, 10^23 ~ 1" + "0" * 23 + ".")
    return texts


def default_tokenizer_row() -> dict[str, Any]:
    """The embedded default's own GGUF tokenized by llama.cpp against the tokenizer carve loads from it
    (its `smollm` rule restored) and against transformers' GGUF tokenizer as it comes (no digit rule)."""
    from transformers import AutoTokenizer

    from carve.models.load import default_gguf, load_model

    gguf, texts = default_gguf(), held_out_texts()
    cpp = run_gguf(gguf, [[1, 2, 3]], decode_tokens=1, texts=texts)["tokenized"]
    ours, plain = load_model("default").tokenizer, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    def same(tok: Any) -> int:
        return sum(tok(t)["input_ids"] == c for t, c in zip(texts, cpp, strict=True))

    return {"id": "default-tokenizer", "texts": len(texts), "carve_same": same(ours),
            "transformers_gguf_same": same(plain), "commit": commit()}  # fmt: skip


KINDS = (
    "qwen3",
    "llama3-rope",
    "gemma3",
    "gemma3-multimodal",
    "gemma2",
    "gemma",
    "gemma-structured",
    "glm4",
    "glm4-structured",
    "nemotron",
    "olmo",
    "seed_oss",
    "arcee",
    "hunyuan",
    "smollm3",
    "granite",
    "olmo2",
    "olmo3",
    "olmo2-structured",
    "stablelm",
    "stablelm-structured",
    "starcoder2",
    "starcoder2-structured",
    "phi2",
    "cohere",
    "cohere-qk-norm",
    "cohere2",
    "cohere2-structured",
    "ernie4_5",
    "exaone4",
    "ministral3",
    "ministral3-multimodal",
    "phi3",
    "phi3-longrope",
    "phi3-longrope-short",
    "phi3-structured",
    "qwen2-structured",
    "qwen2-structured-heads",
    "llama-structured",
    "mixtral",
    "qwen3-moe",
    "olmoe",
    "granitemoe",
    "granitemoe-shared",
    "qwen2-moe",
    "mixtral-experts",
    "mixtral-structured",
    "qwen2-moe-experts",
    "olmoe-experts",
    "granitemoe-experts",
    "deepseek-v3",
    "deepseek-v3-yarn",
    "deepseek-v3-experts",
    "deepseek-v2",
    "deepseek-v2-lite",
    "glm4-moe",
    "glm4-moe-lite",
    "dots1",
    "ernie4_5-moe",
    "hunyuan-moe",
    "hunyuan-moe-f32",
    "minimax-m2",
    "llama4",
    "llama4-llama3-rope",
    "lfm2",
    "lfm2-moe",
    "lfm2-moe-f32",
    "granite-hybrid",
    "granite-hybrid-rope",
    "nemotron-h",
    "nemotron-h-structured",
    "bamba",
    "bamba-structured",
    "falcon-h1",
    "jamba",
    "mamba",
    "falcon-mamba",
    "mamba2",
    "qwen35",
    "qwen35-structured",
    "qwen35-moe",
    "gemma3n",
    "gemma4",
    "gemma4-f32",
    "gemma4-moe",
    "gemma4-moe-f32",
    "gemma4-structured",
    "gemma4-moe-structured",
    "qwen3-next",
    "apertus",
    "gpt-oss",
    "gpt-oss-experts",
    "gpt-oss-mxfp4",
    "llama3-tokenizer",
    "qwen2-padded-vocab",
    "deepseek-v3-tokenizer",
    "default-tokenizer",
)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", default=KINDS, choices=KINDS, help="rows to (re)run; the others are kept")
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the saved rows")
    args = ap.parse_args()
    rows = load_results(RESULTS)
    for kind in [] if args.table_only else args.kinds:
        print(f"running {kind} ...", flush=True)
        r = default_tokenizer_row() if kind == "default-tokenizer" else row(kind)
        save_result(RESULTS, r)
        rows[kind] = r
        print(json.dumps(r), flush=True)
    text = table([rows[k] for k in KINDS if k in rows and k != "default-tokenizer"])
    if "default-tokenizer" in rows:
        r = rows["default-tokenizer"]
        text += (f"\nThe embedded default's GGUF tokenized by llama.cpp against carve's tokenizer of it (SmolLM2's "
                 f"single-digit rule restored): {r['carve_same']} / {r['texts']} held-out texts the same; against "
                 f"transformers' GGUF tokenizer as it comes: {r['transformers_gguf_same']} / {r['texts']} "
                 f"(commit {r['commit']}).\n")  # fmt: skip
    write_section("export-archs", text)
    print(text)


if __name__ == "__main__":
    main()
