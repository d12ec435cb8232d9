"""Benchmark a model larger than the memory it is given: streamed extraction (`carve extract
--stream`) of a synthetic ~2.5B-parameter Llama checkpoint under a hard 2 GiB memory limit.

    .venv/bin/python bench/scale.py [--methods wanda sparsegpt structured] [--limit-gb 2] [--rerun ID ...]

The checkpoint (bench/out/scale-llama-2.5b, built once, git-ignored): a LlamaConfig with hidden
2560, MLP 6912, 32 blocks, 20 query heads in 4 key/value groups, vocabulary 49,152 (the embedded
default's tokenizer, so real text tokenizes into it), untied head: 2.47B parameters, random normal
weights (std 0.02, seed 0; norms 1), written tensor by tensor as bfloat16 safetensors in 1 GiB
shards with their index (~4.9 GB).  Each row: one `carve extract --stream --dtype bfloat16 --method M
--sparsity 0.5 --domain legal --calib-blocks 16 --block-len 256 --eval-blocks 2 --cloze-items 0
--no-speed` process inside a cgroup-v1 memory cgroup whose limit is `--limit-gb` (memory and
memory+swap), so exceeding it is an OOM kill.  Columns: wall seconds, the process's peak RSS, the
cgroup's peak usage (RSS plus the page cache of the shards it read; the kernel reclaims that cache
at the limit) and how often the limit was hit, perplexity before/after on 2 x 256 held-out tokens
(random weights: large, for the record), the output's size, and whether the output loads with
stock `from_pretrained` and gives finite logits with the asked sparsity.  Results:
bench/results/scale.jsonl; the table: the `scale` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, MODEL_DIR, OUT, ROOT, commit, ensure_model, load_results, save_result, timed, write_section

RESULTS = HERE / "results" / "scale.jsonl"
CARVE = str(ROOT / ".venv" / "bin" / "carve")
MODEL = OUT / "scale-llama-2.5b"
CGROUP = Path("/sys/fs/cgroup/memory/carve-scale")
CALIB = ["--calib-blocks", "16", "--block-len", "256", "--eval-blocks", "2", "--cloze-items", "0", "--no-speed"]


def ensure_checkpoint() -> Path:
    """The synthetic checkpoint, written one tensor at a time (never whole in memory)."""
    if (MODEL / ".complete").exists():
        return MODEL
    import torch
    import transformers as tf

    from carve.models.skeleton import parameters_on_meta
    from carve.models.stream import StreamWriter

    ensure_model()
    shutil.rmtree(MODEL, ignore_errors=True)
    MODEL.mkdir(parents=True)
    config = tf.LlamaConfig(
        hidden_size=2560, intermediate_size=6912, num_hidden_layers=32, num_attention_heads=20,
        num_key_value_heads=4, vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    config.dtype = torch.bfloat16
    with parameters_on_meta():
        skeleton = tf.AutoModelForCausalLM.from_config(config)
    specs = [(n, torch.bfloat16, list(p.shape)) for n, p in skeleton.named_parameters()]
    writer = StreamWriter(MODEL, specs, max_shard_bytes=2**30)
    g = torch.Generator().manual_seed(0)
    for name, _, shape in specs:
        t = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=g) * 0.02
        writer.write(name, t.to(torch.bfloat16))
    writer.close()
    config.save_pretrained(MODEL)
    tf.AutoTokenizer.from_pretrained(MODEL_DIR).save_pretrained(MODEL)
    (MODEL / ".complete").write_text(json.dumps({"parameters": sum(_count(s) for *_, s in specs)}))
    return MODEL


def _count(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _cgroup(limit: int) -> Path:
    CGROUP.mkdir(exist_ok=True)
    (CGROUP / "memory.limit_in_bytes").write_text(str(limit))  # memory+swap may not be below memory
    memsw = CGROUP / "memory.memsw.limit_in_bytes"
    if memsw.exists():
        memsw.write_text(str(limit))
    (CGROUP / "memory.max_usage_in_bytes").write_text("0")  # reset the peak
    (CGROUP / "memory.failcnt").write_text("0")
    return CGROUP


def loads(out: Path) -> dict[str, Any]:
    """Stock from_pretrained of the output (outside the limit), finite logits, the sparsity of one
    pruned matrix."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 300, 4000, 20, 7]])).logits
    layers = model.model.layers
    w = layers[min(16, len(layers) - 1)].mlp.down_proj.weight
    result = {"finite": bool(torch.isfinite(logits).all()), "down_proj_16_sparsity": float((w == 0).float().mean()),
              "parameters": sum(p.numel() for p in model.parameters()), "blocks": len(layers)}  # fmt: skip
    del model
    return result


def run(method: str, limit: int) -> dict[str, Any]:
    out = OUT / f"scale-{method}"
    cg = _cgroup(limit)
    how = ["--structure", "--keep", "0.5"] if method == "structured" else ["--method", method, "--sparsity", "0.5"]
    cmd = [CARVE, "extract", "--model", str(MODEL), "--stream", "--dtype", "bfloat16", *how,
           "--domain", "legal", *CALIB, "--out", str(out), "--overwrite", "--quiet"]  # fmt: skip
    inside = ["sh", "-c", f'echo $$ > {cg / "cgroup.procs"} && exec "$@"', "sh", *cmd]
    speed = timed(inside)
    manifest = json.loads((out / "carve.json").read_text())
    row = {
        "speed": speed,
        "cgroup_peak_mb": round(int((cg / "memory.max_usage_in_bytes").read_text()) / 2**20, 1),
        "limit_hits": int((cg / "memory.failcnt").read_text()),
        "limit_mb": limit // 2**20,
        "metrics": manifest["metrics"], "sparsity": manifest.get("sparsity", {}).get("linear"),
        "kept": round(manifest["size"]["parameters_after"] / manifest["size"]["parameters_before"], 4),
        "structure": manifest.get("structure"),
        "timings_s": manifest["timings_s"], "data": manifest["data"], "streamed": manifest["streamed"],
        "source_fingerprint": manifest["source"]["fingerprint"], "file_mb": manifest["size"]["file_mb"],
        "shards": len(list(out.glob("model*.safetensors"))),
    }  # fmt: skip
    row["loads"] = loads(out)
    return row


def _pruned(r: dict[str, Any]) -> str:
    if r.get("structure") is None:
        return f"{r['loads']['down_proj_16_sparsity']:.3f}"
    shape, weighed = r["structure"]["shape"], len(r["structure"]["candidates"])
    return (f"{r['kept']:.3f} of the parameters kept: {r['loads']['blocks']} blocks, MLP {shape['mlp_channels']}, "
            f"{shape['kv_groups']} kv groups ({weighed} candidate splits weighed)")  # fmt: skip


def table(rows: dict[str, dict[str, Any]], parameters: int, source_mb: float) -> str:
    lines = [
        "## A model larger than its memory (`carve extract --stream` under a hard limit)",
        "",
        f"Synthetic Llama checkpoint (bench/scale.py): {parameters / 1e9:.2f}B parameters, random weights, "
        f"bfloat16 safetensors in 1 GiB shards ({source_mb:,.0f} MB). `carve extract --stream --dtype bfloat16 "
        "--method M --sparsity 0.5 --domain legal " + " ".join(CALIB) + "` (structured: `--structure --keep 0.5` "
        "in place of `--method M --sparsity 0.5`; 16 x 256 = 4,096 calibration tokens: "
        "fewer than the default 64 x 512) in a cgroup-v1 memory cgroup with the limit below (memory+swap too: "
        "over it is an OOM kill), 2 CPU cores.",
        "",
        "| method | limit MB | wall s | peak RSS MB | cgroup peak MB (with page cache) | limit hits | "
        "prune s (plan + write) | output MB | loads with from_pretrained | "
        "pruned share (layer 16 down_proj); structured: the kept shape |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rid, r in rows.items():
        if "speed" not in r:
            continue
        ok = r["loads"]
        prune = r["timings_s"].get("prune", 0) + r["timings_s"].get("plan", 0)
        lines.append(
            f"| {rid} | {r['limit_mb']} | {r['speed']['wall_s']:.0f} | {r['speed']['peak_rss_mb']:.0f} | "
            f"{r['cgroup_peak_mb']:.0f} | {r['limit_hits']} | {prune:.0f} | "
            f"{r['file_mb']:.0f} | {'yes, finite logits' if ok['finite'] else 'NO'} | {_pruned(r)} |"
        )
    failed = [f"- {k}: {r['error']}" for k, r in rows.items() if "error" in r]
    return "\n".join(lines + (["", *failed] if failed else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
    ap.add_argument("--limit-gb", type=float, default=2.0)
    ap.add_argument("--rerun", nargs="*", default=[])
    args = ap.parse_args()
    if os.geteuid() != 0 or not CGROUP.parent.is_dir():
        sys.exit("bench/scale.py needs root and a cgroup-v1 memory controller at /sys/fs/cgroup/memory")
    model = ensure_checkpoint()
    parameters = json.loads((model / ".complete").read_text())["parameters"]
    source_mb = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
    rows = {k: v for k, v in load_results(RESULTS).items() if k not in args.rerun}
    for method in args.methods:
        if method in rows and "error" not in rows[method]:
            continue
        print(f"running {method} ...", flush=True)
        try:
            rows[method] = {"id": method, **run(method, int(args.limit_gb * 2**30)), "commit": commit()}
        except (RuntimeError, OSError, ValueError) as exc:
            rows[method] = {"id": method, "error": str(exc)[:300]}
        save_result(RESULTS, rows[method])
        write_section("scale", table(rows, parameters, source_mb))
    text = table(rows, parameters, source_mb)
    print(text)
    write_section("scale", text)


if __name__ == "__main__":
    main()
