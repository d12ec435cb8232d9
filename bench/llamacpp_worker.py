"""Run inside bench/.venv-llamacpp (llama-cpp-python built from its PyPI source): one GGUF file in
llama.cpp itself.

    python llamacpp_worker.py SPEC.json   -> prints one JSON object

SPEC: {"gguf": PATH, "blocks": [[token ids] ...], "threads": 2, "decode_tokens": 64, "quality": true,
"texts": [str ...], "kv_f32": false, "save_logits": PATH} ("texts", optional: each tokenized by llama.cpp's
own tokenizer, BOS added as the vocabulary says, returned as "tokenized"; "kv_f32": keys and values cached in
float32, not llama.cpp's default f16; "save_logits": the first block's logits saved there as .npy).
With "quality" (the default), per block: llama.cpp's logits at every position (its own
tokenization is not used: the blocks are the token ids carve evaluates), the top-1 next token per
position, and the summed negative log likelihood of each next token; without it llama.cpp computes
the last position's logits only (as in generation) and only the speed is measured.  Speed: prefill
tokens/s over each whole block, decode tokens/s of `decode_tokens` greedy single-token steps after
the first block.  Runs without llama.cpp's extra CPU buffer types (see `_plain_buffers`).
"""

from __future__ import annotations

import json
import sys
import time

import llama_cpp.llama_cpp as _lib
import numpy as np
from llama_cpp import Llama

_defaults = _lib.llama_model_default_params


def _plain_buffers() -> object:
    """llama.cpp's default model parameters without its extra CPU buffer types (weight repacking,
    AMX): in this VM the AMX path crashes on any quantized batch (SIGSEGV; the embedded default's
    own Q4_1 GGUF as well), so every run here uses the plain CPU kernels."""
    params = _defaults()
    params.use_extra_bufts = False
    return params


_lib.llama_model_default_params = _plain_buffers


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    blocks = spec["blocks"]
    quality = spec.get("quality", True)
    n_ctx = max(len(b) for b in blocks) + spec.get("decode_tokens", 64) + 8
    kv = {"type_k": 0, "type_v": 0} if spec.get("kv_f32") else {}  # GGML_TYPE_F32
    llm = Llama(model_path=spec["gguf"], n_ctx=n_ctx, n_threads=spec.get("threads", 2), n_batch=n_ctx,
                logits_all=quality, verbose=False, **kv)  # fmt: skip
    top1, nll, tokens, prefill_s = [], 0.0, 0, 0.0
    for block in blocks:
        llm.reset()
        t = time.perf_counter()
        llm.eval(block)
        prefill_s += time.perf_counter() - t
        if not quality:
            continue
        logits = np.asarray(llm.scores[: len(block)], dtype=np.float64)
        if spec.get("save_logits") and not top1:
            np.save(spec["save_logits"], logits.astype(np.float32))
        top1.append(logits.argmax(-1).tolist())
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float((logz[:-1] - logits[np.arange(len(block) - 1), block[1:]]).sum())
        tokens += len(block) - 1
    tokenized = [llm.tokenize(t.encode("utf-8"), add_bos=True, special=False) for t in spec.get("texts", [])]
    llm.reset()
    llm.eval(blocks[0])
    steps = spec.get("decode_tokens", 64)
    t = time.perf_counter()
    for _ in range(steps):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode_s = time.perf_counter() - t
    print(json.dumps({
        "top1": top1,
        "nll": nll,
        "tokens": tokens,
        "ppl": float(np.exp(nll / tokens)) if tokens else None,
        "prefill_tokens_per_s": sum(len(b) for b in blocks) / prefill_s,
        "decode_tokens_per_s": steps / decode_s,
        "tokenized": tokenized,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
