"""`carve export --gguf` in llama.cpp itself for the layouts the embedded default does not have:
Qwen3 (per-head Q/K norms, head_dim apart from hidden / heads) and Llama 3's RoPE scaling.

    .venv/bin/python bench/export_archs.py

Each row: a tiny random model (hidden 64, 2 blocks, 4 query heads in 2 key/value groups, the
embedded default's tokenizer and vocabulary; seed 0) saved with save_pretrained, exported with
`carve export SRC --gguf OUT --type f16`, and one random 200-token block (seed 1) scored by
transformers and by llama.cpp (bench/llamacpp.py: llama-cpp-python built from its PyPI source):
summed next-token NLL and top-1 agreement.  Qwen3: head_dim 128, Q/K norm weights drawn from
N(1, 0.5) so that a lost or swapped norm shows.  Llama 3 RoPE: original context 64, factor 8, low /
high frequency factors 1 / 4, Q and K weights scaled by 8 so that positions matter; the same block
is also scored by transformers with the scaling removed, which llama.cpp must not match.
Results: bench/results/export_archs.jsonl; the table: the `export-archs` section of bench/RESULTS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, MODEL_DIR, OUT, ROOT, commit, ensure_model, save_result, write_section
from llamacpp import run_gguf

RESULTS = HERE / "results" / "export_archs.jsonl"
CARVE = str(ROOT / ".venv" / "bin" / "carve")
SIZES = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512}  # fmt: skip
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64, "rope_theta": 10000.0}  # fmt: skip


def tiny(kind: str, vocab: int) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if kind == "qwen3":
        model = tf.AutoModelForCausalLM.from_config(tf.Qwen3Config(**SIZES, head_dim=128, vocab_size=vocab))
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1, 0.5)
                layer.self_attn.k_norm.weight.normal_(1, 0.5)
        return model.eval()
    config = tf.LlamaConfig(**SIZES, vocab_size=vocab)
    config.rope_parameters = dict(LLAMA3)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model.eval()


def scored(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, list[int]]:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
    return nll, logits.argmax(-1)[:-1].tolist()


def row(kind: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ensure_model()
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    src, gguf = OUT / f"export-archs-{kind}", OUT / f"export-archs-{kind}.f16.gguf"
    model = tiny(kind, len(tok))
    model.save_pretrained(src)
    tok.save_pretrained(src)
    out = subprocess.run([CARVE, "export", str(src), "--gguf", str(gguf), "--type", "f16", "--overwrite", "--json",
                          "--quiet"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    exported = json.loads(out[out.index("{") :])
    ids = torch.randint(0, len(tok), (1, 200), generator=torch.Generator().manual_seed(1))
    nll, top = scored(model, ids)
    cpp = run_gguf(gguf, [ids[0].tolist()], decode_tokens=4)
    cpp_top = cpp["top1"][0][: len(top)]  # llama.cpp's top-1 at every position but the last, as `top`
    r: dict[str, Any] = {
        "id": kind, "architecture": exported["architecture"], "tensors": exported["tensors"],
        "llamacpp_nll": round(cpp["nll"], 4), "transformers_nll": round(nll, 4),
        "top1_agree": sum(a == b for a, b in zip(cpp_top, top, strict=True)), "positions": len(top),
    }  # fmt: skip
    if kind == "llama3-rope":  # the same weights under plain RoPE: what llama.cpp must not match
        model.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        model.save_pretrained(OUT / "export-archs-plain")
        plain_nll, plain_top = scored(AutoModelForCausalLM.from_pretrained(OUT / "export-archs-plain").eval(), ids)
        r.update(plain_nll=round(plain_nll, 4),
                 plain_top1_agree=sum(a == b for a, b in zip(cpp_top, plain_top, strict=True)))  # fmt: skip
    return {**r, "commit": commit()}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "## GGUF export in llama.cpp: Qwen3 and Llama 3 RoPE scaling (tiny random models)",
        "",
        "bench/export_archs.py: a tiny random model per layout (hidden 64, 2 blocks, the embedded default's "
        "tokenizer), `carve export --type f16`, one random 200-token block scored by transformers and by "
        "llama.cpp (llama-cpp-python 0.3.36 built from source). Llama 3 RoPE: the same block also scored by "
        "transformers with the scaling removed.",
        "",
        "| layout | llama.cpp arch | tensors | llama.cpp NLL | transformers NLL | top-1 agreement "
        "| transformers NLL without the RoPE scaling | top-1 agreement with it |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        plain = f"{r['plain_nll']:.4f} | {r['plain_top1_agree']} / {r['positions']}" if "plain_nll" in r else "- | -"
        lines.append(
            f"| {r['id']} | {r['architecture']} | {r['tensors']} | {r['llamacpp_nll']:.4f} "
            f"| {r['transformers_nll']:.4f} | {r['top1_agree']} / {r['positions']} | {plain} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    rows = []
    for kind in ("qwen3", "llama3-rope"):
        print(f"running {kind} ...", flush=True)
        r = row(kind)
        save_result(RESULTS, r)
        rows.append(r)
        print(json.dumps(r), flush=True)
    write_section("export-archs", table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
