"""Peak memory of `carve extract` (dual-obs, the default: a gradient pass, then the sweep) on a model
with a large vocabulary, against the 3x-the-model goal of issue 25.

    .venv/bin/python bench/vocab_memory.py [--calib-blocks 8] [--eval-blocks 4] [--rerun]

The model: Gemma-3-270M's shapes (Gemma3TextConfig: 18 blocks, hidden 640, MLP 2048, 4 query heads
and 1 key/value head of 256, vocabulary 262,144 tied to the head), randomly initialized with seed 0
and saved once to bench/out/gemma3-270m-random (no weights can be downloaded here; memory depends
on the shapes, not the values).  Text is tokenized with the embedded default's tokenizer (ids below
49,152; the logits are still 262,144 wide).  One `carve extract` process on legal text with
`--calib-blocks` x 512 calibration blocks and `--eval-blocks` x 512 held-out blocks per corpus,
`--no-speed --cloze-items 0`; its peak RSS against the model's float32 size.  Results:
bench/results/vocab_memory.jsonl; the table: the `vocab-memory` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, MODEL_DIR, OUT, ROOT, commit, ensure_model, load_results, save_result, timed, write_section

RESULTS = HERE / "results" / "vocab_memory.jsonl"
MODEL = OUT / "gemma3-270m-random"
CARVE = str(ROOT / ".venv" / "bin" / "carve")


def ensure_gemma() -> Path:
    if (MODEL / "model.safetensors").exists():
        return MODEL
    import torch
    import transformers as tf

    ensure_model()
    config = tf.Gemma3TextConfig(
        vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=32_768, sliding_window=512,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(MODEL)
    tf.AutoTokenizer.from_pretrained(MODEL_DIR).save_pretrained(MODEL)
    return MODEL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-blocks", type=int, default=8)
    ap.add_argument("--eval-blocks", type=int, default=4)
    ap.add_argument("--rerun", action="store_true")
    args = ap.parse_args()
    model = ensure_gemma()
    rows = load_results(RESULTS)
    rid = f"dual-obs/{args.calib_blocks}/{args.eval_blocks}"
    if rid not in rows or args.rerun:
        out = OUT / "vocab-memory-out"
        cmd = [CARVE, "extract", "--model", str(model), "--domain", "legal", "--calib-blocks", str(args.calib_blocks),
               "--eval-blocks", str(args.eval_blocks), "--no-speed", "--cloze-items", "0", "--out", str(out),
               "--overwrite", "--quiet"]  # fmt: skip
        speed = timed(cmd)
        manifest = json.loads((out / "carve.json").read_text())
        params = manifest["size"]["parameters_before"]
        rows[rid] = {"id": rid, **speed, "parameters": params, "model_f32_mb": round(params * 4 / 2**20, 1),
                     "timings_s": manifest["timings_s"], "data": manifest["data"],
                     "source_fingerprint": manifest["source"]["fingerprint"], "commit": commit()}  # fmt: skip
        save_result(RESULTS, rows[rid])
    lines = [
        "## Peak memory on a 262k vocabulary (`carve extract`, dual-obs, Gemma-3-270M's shapes)",
        "",
        "Random weights in Gemma-3-270M's shapes (bench/vocab_memory.py), one process on 2 CPU cores; "
        "the goal (issue 25): the gradient engine within 3x the model's float32 size.",
        "",
        "| calib blocks | eval blocks | parameters | model f32 MB | peak RSS MB | peak / model | wall s | stages s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        c, e = r["id"].split("/")[1:]
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["timings_s"].items() if v >= 1)
        lines.append(f"| {c} | {e} | {r['parameters']:,} | {r['model_f32_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['peak_rss_mb'] / r['model_f32_mb']:.2f}x | {r['wall_s']:.0f} | {stages} |")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    write_section("vocab-memory", text)


if __name__ == "__main__":
    main()
