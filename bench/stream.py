"""Benchmark streamed extraction (`carve extract --stream`) against the in-memory engine on the
embedded default, de-quantized to a float32 safetensors directory (bench/out/smollm2-f32).

    .venv/bin/python bench/stream.py [--methods sparsegpt wanda dual-obs structured] [--shard-mb 100] [--rerun ID ...]

The source is re-saved in shards of at most `--shard-mb` MB (bench/out/smollm2-f32-shards, the
way large checkpoints come), so streaming reads each block from whichever shard holds it.  Per
method, two rows, one after the other, each `carve extract --model SHARDS --method M --sparsity 0.5
--domain legal --no-speed --cloze-items 0 --eval-blocks 16` in its own process: in memory, and with
`--stream` ("structured": `--structure --keep 0.5` in place of `--method M --sparsity 0.5`: wanda
scores, the distance drop rule, the split search over the candidate shapes).  Columns: wall
seconds and peak RSS of the process, domain and general perplexity before and after (from the
manifest), the share of parameters kept, and whether the two outputs' weights and masks are the same
bit for bit (sha256 of every tensor's bytes).  Results: bench/results/stream.jsonl; the table: the
`stream` section of bench/RESULTS.md.

    .venv/bin/python bench/stream.py --moe [--methods sparsegpt] [--rerun ID ...]

Method `export-KIND` (e.g. `export-q8_0`): `carve export SOURCE --gguf F --type KIND` of the source
itself, `--no-stream` (the whole model loaded) and `--stream`, the GGUF file's sha256 compared (the
rows measured before `--no-stream` existed ran without either flag, which then loaded the model whole).

`--moe` (section stream-moe): the same two rows per method on bench/moe.py's upcycled SmolLM2 MoE
(a Mixtral checkpoint with 4 experts per block, saved by transformers: each expert's w1/w2/w3 its own
tensor, fused into 3-D tensors on load), row ids `moe-METHOD/ENGINE`.  Streamed, each block's fused
experts are built from the checkpoint's tensors with transformers' conversion and written back split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

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

RESULTS = HERE / "results" / "stream.jsonl"
CARVE = str(ROOT / ".venv" / "bin" / "carve")
SHARDS = OUT / "smollm2-f32-shards"


def ensure_shards(shard_mb: int) -> Path:
    """The float32 default re-saved in shards (with transformers' save_pretrained)."""
    done = SHARDS / f".shards-{shard_mb}"
    if done.exists():
        return SHARDS
    ensure_model()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.rmtree(SHARDS, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype="float32")
    model.save_pretrained(SHARDS, max_shard_size=f"{shard_mb}MB")
    AutoTokenizer.from_pretrained(MODEL_DIR).save_pretrained(SHARDS)
    done.write_text("")
    return SHARDS


def digests(directory: Path) -> dict[str, str]:
    """sha256 of every tensor in the output's weights and mask, by name."""
    import torch
    from safetensors import safe_open

    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        if f.name.startswith("importance"):  # an in-memory gradient method's map: a streamed run keeps none
            continue
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                t = fh.get_tensor(k).contiguous()
                raw = t.reshape(-1).view(torch.uint8).numpy()
                out[f"{'mask' if f.name.startswith('mask') else 'model'}:{k}"] = hashlib.sha256(raw).hexdigest()
    return out


def run_export(kind: str, stream: bool, source: Path, tag: str) -> dict[str, Any]:
    """`carve export SOURCE --gguf F --type KIND` in memory or `--stream`: time, peak RSS, the file's sha256."""
    out = OUT / f"stream-{tag}export-{kind}-{'stream' if stream else 'memory'}.gguf"
    cmd = [CARVE, "export", str(source), "--gguf", str(out), "--type", kind, "--overwrite", "--quiet",
           "--stream" if stream else "--no-stream"]  # fmt: skip
    speed = timed(cmd)
    digest = file_digest(out)
    size = out.stat().st_size
    out.unlink()
    return {"speed": speed, "digest": digest, "file_mb": round(size / 2**20, 1), "sparsity": None}


def run(method: str, stream: bool, source: Path, tag: str = "") -> dict[str, Any]:
    if method.startswith("export-"):  # export-q8_0: `carve export` of the source itself
        return run_export(method.removeprefix("export-"), stream, source, tag)
    out = OUT / f"stream-{tag}{method}-{'stream' if stream else 'memory'}"
    how = ["--structure", "--keep", "0.5"] if method == "structured" else ["--method", method, "--sparsity", "0.5"]
    # the MoE rows with --no-cache: both engines measure "before" alike
    cmd = [CARVE, "extract", "--model", str(source), *how, "--domain", "legal",
           "--no-speed", "--cloze-items", "0", "--eval-blocks", "16", "--out", str(out), "--overwrite", "--quiet",
           *(["--stream"] if stream else []), *(["--no-cache"] if tag else [])]  # fmt: skip
    speed = timed(cmd)
    manifest = json.loads((out / "carve.json").read_text())
    d = digests(out)
    return {
        "speed": speed, "metrics": manifest["metrics"], "data": manifest["data"],
        "source_fingerprint": manifest["source"]["fingerprint"],
        "sparsity": manifest["sparsity"]["linear"] if "sparsity" in manifest else None,
        "kept": round(manifest["size"]["parameters_after"] / manifest["size"]["parameters_before"], 4),
        "structure": manifest.get("structure", {}).get("shape"),
        "streamed": manifest.get("streamed"), "shards": len(list(out.glob("model*.safetensors"))),
        "digest": hashlib.sha256(json.dumps(sorted(d.items())).encode()).hexdigest()[:16], "tensors": len(d),
        "experts": manifest.get("experts"), "stages_peak_rss_mb": manifest.get("peak_rss_after_stage_mb"),
    }  # fmt: skip


MOE_SOURCE = (
    "bench/moe.py's upcycled MoE: the embedded default as a Mixtral with 4 experts per block, float32 "
    "({mb} MB), saved by transformers (each expert's w1/w2/w3 its own tensor); both rows with `--no-cache` "
    "(each measures the source's perplexity itself). "
)


def table(rows: dict[str, dict[str, Any]], shard_mb: int, moe_mb: int | None = None) -> str:
    """The dense rows' table, or with `moe_mb` the MoE rows' (ids `moe-METHOD/ENGINE`)."""
    rows = {k: v for k, v in rows.items() if k.startswith("moe-") == (moe_mb is not None)}
    source = (
        f"Source: the embedded default de-quantized to float32 (538 MB) and saved in {shard_mb} MB shards. "
        if moe_mb is None
        else "Source: " + MOE_SOURCE.format(mb=moe_mb)
    )
    lines = [
        "## Streamed extraction (`carve extract --stream`) against the in-memory engine"
        + ("" if moe_mb is None else ": a mixture of experts"),
        "",
        source + "`carve extract --method M --sparsity 0.5 --domain legal --no-speed --cloze-items 0 --eval-blocks 16` "
        "(64 x 512 calibration blocks; structured: `--structure --keep 0.5`), each row its own process on 2 CPU "
        "cores, one after the other. "
        "Same output: the sha256 of every saved tensor (weights and mask) equal to the in-memory row's "
        "(export-KIND rows: `carve export SOURCE --gguf F --type KIND`, the GGUF file's sha256).",
        "",
        "| method | engine | wall s | peak RSS MB | domain ppl before / after | general ppl before / after | "
        "linear sparsity | parameters kept | same output as in memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rid, r in rows.items():
        if "speed" not in r:
            continue
        method, engine = rid.split("/")
        mem = rows.get(f"{method}/memory", {})
        same = "-" if engine == "memory" or "digest" not in mem else ("yes" if mem["digest"] == r["digest"] else "NO")
        if "metrics" in r:
            b, a = r["metrics"]["before"], r["metrics"]["after"]
            ppl = f"{b['domain_ppl']:.3f} / {a['domain_ppl']:.3f} | {b['general_ppl']:.3f} / {a['general_ppl']:.3f}"
        else:  # an export row: the GGUF file, the same or not
            ppl = f"- ({r['file_mb']} MB GGUF) | -"
        lines.append(
            f"| {method} | {engine} | {r['speed']['wall_s']:.1f} | {r['speed']['peak_rss_mb']:.0f} | {ppl} | "
            f"{'-' if r['sparsity'] is None else format(r['sparsity'], '.4f')} | "
            f"{r.get('kept', '-') if r.get('structure') else '-'} | {same} |"
        )
    failed = [f"- {k}: {r['error']}" for k, r in rows.items() if "error" in r]
    return "\n".join(lines + (["", *failed] if failed else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["sparsegpt", "wanda", "dual-obs"])
    ap.add_argument("--shard-mb", type=int, default=100)
    ap.add_argument("--rerun", nargs="*", default=[])
    ap.add_argument("--moe", action="store_true", help="the upcycled MoE of bench/moe.py as the source")
    args = ap.parse_args()
    moe_mb = None
    if args.moe:
        from moe import MOE_DIR, ensure_moe

        ensure_moe()
        source, tag, section = MOE_DIR, "moe-", "stream-moe"
        moe_mb = round(sum(f.stat().st_size for f in MOE_DIR.glob("*.safetensors")) / 2**20)
    else:
        source, tag, section = ensure_shards(args.shard_mb), "", "stream"
    rows = {k: v for k, v in load_results(RESULTS).items() if k not in args.rerun}
    for method in args.methods:
        for stream in (False, True):
            rid = f"{tag}{method}/{'stream' if stream else 'memory'}"
            if rid in rows and "error" not in rows[rid]:
                continue
            print(f"running {rid} ...", flush=True)
            try:
                rows[rid] = {"id": rid, **run(method, stream, source, tag), "commit": commit()}
            except (RuntimeError, OSError, ValueError) as exc:
                rows[rid] = {"id": rid, "error": str(exc)[:300]}
            save_result(RESULTS, rows[rid])
            write_section(section, table(rows, args.shard_mb, moe_mb))
    text = table(rows, args.shard_mb, moe_mb)
    print(text)
    write_section(section, text)


if __name__ == "__main__":
    main()
