"""Benchmark `carve extract` in 1 and 2 processes (torch.distributed, gloo) on this machine.

    .venv/bin/python bench/distributed.py [--method sparsegpt] [--rerun ID ...]

The job: `carve extract --model bench/out/smollm2-f32 --method M --sparsity 0.5 --domain legal
--no-speed --cloze-items 0 --eval-blocks 16` (64 x 512 calibration blocks), one row each:
1 process with 1 thread, 2 processes (`python -m torch.distributed.run --nproc-per-node 2 -m carve`)
with 1 thread each (torchrun's default), 1 process with the default threads (2), and that row again with MKL's strict
reproducibility mode off (`MKL_CBWR=AUTO`; carve sets `AUTO,STRICT` unless told).  Columns: wall
seconds, the largest process's peak RSS, the layer-wise engine's seconds per part from the
manifest (`engine_seconds`: statistics = the calibration forwards and their all-reduce, method =
the OBS sweeps, repeated on every rank, propagate = re-running pruned blocks), and whether the
mask and the saved weights equal the 1-process, 1-thread row's bit for bit.  Results: bench/results/distributed.jsonl;
the table: the `distributed` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, MODEL_DIR, OUT, ROOT, commit, ensure_model, load_results, save_result, timed, write_section

RESULTS = HERE / "results" / "distributed.jsonl"
PYTHON = str(ROOT / ".venv" / "bin" / "python")
# processes x threads; 2 processes x 2 threads (oversubscribed on 2 cores) ran over 9 minutes before it
# was stopped: torchrun's own default is one thread a process, the 2x1 row
# the last row turns MKL's strict reproducibility mode off (carve sets it unless the environment does):
# what it costs, and what it is for
ROWS = [("1x1", 1, 1, {}), ("2x1", 2, 1, {}), ("1x2", 1, 2, {}), ("1x2 MKL_CBWR=AUTO", 1, 2, {"MKL_CBWR": "AUTO"})]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(method: str, procs: int, threads: int, rid: str, extra_env: dict[str, str]) -> dict[str, Any]:
    out = OUT / f"distributed-{method}-{rid.split()[0]}"
    flags = ["extract", "--model", str(MODEL_DIR), "--method", method, "--sparsity", "0.5", "--domain", "legal",
             "--no-speed", "--cloze-items", "0", "--eval-blocks", "16", "--out", str(out), "--overwrite",
             "--quiet"]  # fmt: skip
    launch = [PYTHON, "-m", "carve"] if procs == 1 else [
        PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr", "127.0.0.1",
        "--master-port", str(_port()), "-m", "carve"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **extra_env}
    speed = timed(launch + flags, env)
    manifest = json.loads((out / "carve.json").read_text())
    mask = hashlib.sha256((out / "mask.safetensors").read_bytes()).hexdigest()[:16]
    weights = hashlib.sha256()
    for f in sorted(out.glob("model*.safetensors")):
        weights.update(f.read_bytes())
    return {"speed": speed, "engine_seconds": manifest.get("engine_seconds"), "timings_s": manifest["timings_s"],
            "metrics": manifest["metrics"], "data": manifest["data"], "mask_digest": mask,
            "weights_digest": weights.hexdigest()[:16],
            "source_fingerprint": manifest["source"]["fingerprint"]}  # fmt: skip


def table(rows: dict[str, dict[str, Any]], method: str) -> str:
    lines = [
        f"## One and two processes (torch.distributed, gloo), `carve extract --method {method}`",
        "",
        "The embedded default in float32, 64 x 512 legal calibration blocks, sparsity 0.5, one row at a time on "
        "2 CPU cores (bench/distributed.py). Engine parts from the manifest's `engine_seconds`.",
        "",
        "| processes x threads | wall s | peak RSS MB (largest process) | statistics s | method s | propagate s | "
        "prune stage s | domain ppl after | mask equals 1x1 | weights equal 1x1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = rows.get(f"{method}/1x1", {})
    for rid, r in rows.items():
        if "speed" not in r or not rid.startswith(method + "/"):
            continue
        e = r.get("engine_seconds") or {}
        same = "yes" if r["mask_digest"] == base.get("mask_digest") else "NO"
        same_w = "yes" if r.get("weights_digest") == base.get("weights_digest") else "NO"
        same_w = same_w if "weights_digest" in r else "-"
        lines.append(
            f"| {rid.split('/')[1]} | {r['speed']['wall_s']:.1f} | {r['speed']['peak_rss_mb']:.0f} | "
            f"{e.get('statistics', 0):.1f} | {e.get('method', 0):.1f} | {e.get('propagate', 0):.1f} | "
            f"{r['timings_s'].get('prune', 0):.1f} | {r['metrics']['after']['domain_ppl']:.3f} | {same} | {same_w} |"
        )
    failed = [f"- {k}: {r['error']}" for k, r in rows.items() if "error" in r]
    return "\n".join(lines + (["", *failed] if failed else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="sparsegpt")
    ap.add_argument("--rerun", nargs="*", default=[])
    args = ap.parse_args()
    ensure_model()
    rows = {k: v for k, v in load_results(RESULTS).items() if k not in args.rerun}
    for name, procs, threads, extra_env in ROWS:
        rid = f"{args.method}/{name}"
        if rid in rows and "error" not in rows[rid]:
            continue
        print(f"running {rid} ...", flush=True)
        try:
            rows[rid] = {"id": rid, **run(args.method, procs, threads, name, extra_env), "commit": commit()}
        except (RuntimeError, OSError, ValueError) as exc:
            rows[rid] = {"id": rid, "error": str(exc)[:300]}
        save_result(RESULTS, rows[rid])
        write_section("distributed", table(rows, args.method))
    text = table(rows, args.method)
    print(text)
    write_section("distributed", text)


if __name__ == "__main__":
    main()
