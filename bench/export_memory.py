"""Peak memory of `carve export` (streamed) on a large vocabulary, this commit against an earlier one, in one run.

    .venv/bin/python bench/export_memory.py [--baseline REV]

The source: a Llama-architecture checkpoint with a 262,144-token vocabulary (Gemma's size) and a hidden
size of 2048 (2 blocks of 8 heads, MLP 4096; random weights, seed 0), tied embeddings, saved as bfloat16
safetensors (bench/out/export-memory-source, built once; its embedding alone is 537M values, 1.07 GB
in bfloat16) with the embedded default's tokenizer (the token list padded to the rows). Each row is
`carve export SOURCE --gguf F --type KIND --stream` in its own process (wall seconds, peak RSS, the
file's sha256): with carve at `--baseline` (default: 777c563, before the streamed export read the
tensors outside the blocks at their turn, as stored, and converted and wrote large tensors a slice at a
time; run from a git worktree of it under bench/.cache, with this checkout's environment) and at this
checkout, f16 and q8_0, one after the other. The two commits must write the same bytes.
Results: bench/results/export_memory.jsonl; the table: the `export-memory` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    HERE,
    MODEL_DIR,
    OUT,
    ROOT,
    commit,
    ensure_model,
    file_digest,
    load_results,
    save_result,
    timed,
    write_section,
)

RESULTS = HERE / "results" / "export_memory.jsonl"
SOURCE = OUT / "export-memory-source"
CARVE = [sys.executable, "-m", "carve"]


def source() -> Path:
    """The large-vocabulary checkpoint (built once)."""
    import transformers as tf

    if (SOURCE / "config.json").is_file():
        return SOURCE
    ensure_model()
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=262144, hidden_size=2048, intermediate_size=4096, num_hidden_layers=2,
                            num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True,
                            max_position_embeddings=512, pad_token_id=None, bos_token_id=None,
                            eos_token_id=None)  # fmt: skip
    model = tf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(SOURCE)
    tf.AutoTokenizer.from_pretrained(MODEL_DIR).save_pretrained(SOURCE)
    return SOURCE


def checkout(rev: str) -> Path:
    """carve's sources at `rev` (a git worktree under bench/.cache)."""
    path = HERE / ".cache" / f"carve-{rev}"
    if not path.is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), rev], check=True,
                       capture_output=True)  # fmt: skip
    return path


def row(label: str, src_dir: Path, kind: str) -> dict[str, Any]:
    out = OUT / f"export-memory-{label}-{kind}.gguf"
    env = {**os.environ, "PYTHONPATH": str(src_dir / "src")}
    speed = timed([*CARVE, "export", str(source()), "--gguf", str(out), "--type", kind, "--stream", "--overwrite",
                   "--quiet"], env=env)  # fmt: skip
    digest = file_digest(out)
    size = out.stat().st_size
    out.unlink()
    return {"id": f"{label}/{kind}", "carve": label, "type": kind, **speed, "file_mb": round(size / 2**20, 1),
            "digest": digest}  # fmt: skip


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "## `carve export` peak memory on a 262k-token vocabulary (bench/export_memory.py)",
        "",
        "A Llama-architecture checkpoint with Gemma's vocabulary (262,144 tokens, hidden 2048, 2 blocks, tied "
        "embeddings: 537M values in the embedding), bfloat16 safetensors (1.1 GB), exported with `carve export "
        "--stream` by carve before the streamed export read the tensors outside the blocks at their turn as stored "
        "and converted and wrote large tensors a slice at a time (the baseline commit) and after, each row its own "
        "process, one after the other.",
        "",
        "| carve | type | wall s | peak RSS MB | file MB | sha256 (16) |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['carve']} | {r['type']} | {r['wall_s']} | {r['peak_rss_mb']} | {r['file_mb']} | {r['digest']} |"
              for r in rows]  # fmt: skip
    lines += ["", f"Run at commit {', '.join(sorted({r['commit'] for r in rows}))}; one run each."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", default="777c563", help="the earlier carve commit")
    args = ap.parse_args()
    source()
    ids = []
    for kind in ("f16", "q8_0"):
        for key, label, path in (("baseline", f"{args.baseline} (baseline)", checkout(args.baseline)),
                                 ("head", "this commit", ROOT)):  # fmt: skip
            r = {**row(key, path, kind), "carve": label, "commit": commit()}
            save_result(RESULTS, r)
            ids.append(r["id"])
            print(json.dumps(r), flush=True)
    results = load_results(RESULTS)
    text = table([results[i] for i in ids])
    write_section("export-memory", text)
    print(text)


if __name__ == "__main__":
    main()
