"""Calibrating an MoE block in rounds (`--max-memory`): the memory its Hessians take, and what the
rounds cost.

SparseGPT and dual-obs's sweep keep one Hessian per distinct Linear input of a block; an MoE block
has one per expert matrix, each [in, in].  In Mixtral-8x7B that is 8 x (4096² + 14336²) float32
values, ~7 GB per block, against 2.8 GB of bfloat16 block weights; the embedded default's experts are
too narrow (1536 channels) for that regime to show.  The bench builds a model in it from the
embedded default: its first 4 blocks, each MLP upcycled into 8 experts *and widened 4x* (each
expert's gate/up rows tiled 4 times, its down columns tiled and divided by 4: the same function, 6144
channels, so a down_proj's Hessian is 6144 x 6144), top-2 routing by a seeded random router; saved by
transformers as a Mixtral checkpoint (bench/out/smollm2-wide-moe).  A 4-block model is a poor
language model; the perplexities only show both engines compute the same thing.

    .venv/bin/python bench/rounds.py [--rerun ID ...] [--budget 400MB]

Rows, each one `carve extract --method sparsegpt --sparsity 0.5 --domain legal --calib-blocks 32
--eval-blocks 8 --no-speed --cloze-items 0 --no-cache` in its own process, one after the other:
in memory and `--stream`, each without a budget and with `--max-memory BUDGET` (a block whose
Hessians would take more is calibrated in rounds, carve.engines.layerwise.rounds).  Columns: wall
seconds, the prune stage's seconds, peak RSS, the most rounds a block took (the manifest's
engine_seconds), perplexities, and whether the output's tensors are the in-memory row's bit for bit
(sha256 of every tensor).  Results: bench/results/rounds.jsonl; the table: section `rounds`.
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
from common import HERE, MODEL_DIR, OUT, ROOT, commit, ensure_model, load_results, save_result, timed, write_section
from moe import upcycle
from stream import digests

RESULTS = HERE / "results" / "rounds.jsonl"
CARVE = str(ROOT / ".venv" / "bin" / "carve")
WIDE_DIR = OUT / "smollm2-wide-moe"
BLOCKS, EXPERTS, TOP_K, WIDEN = 4, 8, 2, 4
ROWS = [
    ("memory", False, False),
    ("stream", True, False),
    ("stream-rounds", True, True),
    ("memory-rounds", False, True),
]


def ensure_wide() -> dict[str, Any]:
    """The widened MoE (built once): its facts, with the largest logit difference from the dense
    model cut to the same blocks."""
    facts = WIDE_DIR / "built.json"
    if facts.exists():
        return dict(json.loads(facts.read_text()))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ensure_model()
    dense = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    dense.model.layers = dense.model.layers[:BLOCKS]
    dense.config.num_hidden_layers = BLOCKS
    moe = upcycle(dense, EXPERTS, TOP_K, WIDEN)
    import carve

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    ids = carve.Corpus("legal").eval_blocks(tok, 1, 512)
    with torch.no_grad():
        diff = (moe(ids).logits - dense(ids).logits).abs().max().item()
    shutil.rmtree(WIDE_DIR, ignore_errors=True)
    moe.save_pretrained(WIDE_DIR)
    tok.save_pretrained(WIDE_DIR)
    out = {
        "blocks": BLOCKS, "experts": EXPERTS, "top_k": TOP_K, "expert_channels": moe.config.intermediate_size,
        "parameters": sum(p.numel() for p in moe.parameters()),
        "mb": round(sum(f.stat().st_size for f in WIDE_DIR.glob("*.safetensors")) / 2**20),
        "max_logit_diff_from_the_cut_dense_model": diff,
    }  # fmt: skip
    facts.write_text(json.dumps(out, indent=1))
    return out


def run(stream: bool, budget: str | None) -> dict[str, Any]:
    out = OUT / "rounds-out"
    cmd = [CARVE, "extract", "--model", str(WIDE_DIR), "--method", "sparsegpt", "--sparsity", "0.5",
           "--domain", "legal", "--calib-blocks", "32", "--eval-blocks", "8", "--no-speed", "--cloze-items", "0",
           "--no-cache", "--out", str(out), "--overwrite", "--quiet", *(["--stream"] if stream else []),
           *(["--max-memory", budget] if budget else [])]  # fmt: skip
    speed = timed(cmd)
    m = json.loads((out / "carve.json").read_text())
    d = digests(out)
    shutil.rmtree(out)
    return {
        "speed": speed, "timings_s": m["timings_s"], "engine_seconds": m.get("engine_seconds"),
        "metrics": m["metrics"], "data": m["data"], "source_fingerprint": m["source"]["fingerprint"],
        "sparsity": m["sparsity"]["linear"], "streamed": m.get("streamed"),
        "digest": hashlib.sha256(json.dumps(sorted(d.items())).encode()).hexdigest()[:16], "tensors": len(d),
    }  # fmt: skip


def table(rows: dict[str, dict[str, Any]], facts: dict[str, Any], budget: str) -> str:
    lines = [
        "## An MoE block calibrated in rounds (`--max-memory`): Hessian memory against time",
        "",
        f"bench/rounds.py. Source: the embedded default's first {facts['blocks']} blocks, each MLP upcycled into "
        f"{facts['experts']} experts widened {WIDEN}x ({facts['expert_channels']} channels; the same function, "
        f"logits within {facts['max_logit_diff_from_the_cut_dense_model']:.1e} of the cut dense model's), top-{TOP_K} "
        f"random routing; a Mixtral checkpoint of {facts['mb']} MB (float32). Each row one `carve extract --method "
        "sparsegpt --sparsity 0.5 --domain legal --calib-blocks 32 --eval-blocks 8 --no-speed --cloze-items 0 "
        "--no-cache` in its own process on 2 CPU cores, one after the other; `rounds` rows add "
        f"`--max-memory {budget}`. "
        "Same output: the sha256 of every saved tensor equal to the in-memory row's.",
        "",
        "| engine | --max-memory | most rounds a block took | wall s | prune s | peak RSS MB "
        "| domain ppl before / after | linear sparsity | same output as in memory | commit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = rows.get("memory", {}).get("digest")
    for rid, _stream, rounds in ROWS:
        r = rows.get(rid)
        if r is None or "speed" not in r:
            continue
        b, a = r["metrics"]["before"], r["metrics"]["after"]
        most = (r.get("engine_seconds") or {}).get("most_rounds", 1)
        same = "-" if rid == "memory" or ref is None else ("yes" if r["digest"] == ref else "NO")
        lines.append(
            f"| {rid.split('-')[0]} | {budget if rounds else '-'} | {most} | {r['speed']['wall_s']:.1f} | "
            f"{r['timings_s']['prune']:.1f} | {r['speed']['peak_rss_mb']:.0f} | {b['domain_ppl']:.2f} / "
            f"{a['domain_ppl']:.2f} | {r['sparsity']:.4f} | {same} | {r['commit']} |"
        )
    failed = [f"- {k}: {r['error']}" for k, r in rows.items() if "error" in r]
    return "\n".join(lines + (["", *failed] if failed else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rerun", nargs="*", default=[])
    ap.add_argument("--budget", default="400MB")
    args = ap.parse_args()
    facts = ensure_wide()
    rows = {k: v for k, v in load_results(RESULTS).items() if k not in args.rerun}
    for rid, stream, rounds in ROWS:
        if rid in rows and "error" not in rows[rid]:
            continue
        print(f"running {rid} ...", flush=True)
        try:
            row = run(stream, args.budget if rounds else None)
            rows[rid] = {"id": rid, **row, "budget": args.budget if rounds else None, "commit": commit()}
        except (RuntimeError, OSError, ValueError) as exc:
            rows[rid] = {"id": rid, "error": str(exc)[:300]}
        save_result(RESULTS, rows[rid])
        write_section("rounds", table(rows, facts, args.budget))
    text = table(rows, facts, args.budget)
    print(text)
    write_section("rounds", text)


if __name__ == "__main__":
    main()
