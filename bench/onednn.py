"""oneDNN's primitive cache on a bfloat16 model's own jobs: `import carve` caps it at 64 entries
(`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, oneDNN's default 1024), which took ~170 MB off a streamed MoE
job whose bfloat16 expert matmuls had a new shape almost every call (bench section stream-moe-notes).
A job that computes in bfloat16 end to end (`--dtype bfloat16`) runs every matmul, forward and
backward, through oneDNN; its shapes repeat each step, so the cap should cost nothing there.  This
measures that it does not.

    .venv/bin/python bench/onednn.py [--runs 3] [--steps 30]

Jobs, on the embedded default loaded in bfloat16, each in its own process, one after the other:
- `finetune-full`: `carve finetune default --trainable full --dtype bfloat16 --steps N`;
- `finetune-lora`: the same with `--trainable lora`;
- `recover`: `carve recover PRUNED --dtype bfloat16 --steps N` (PRUNED: a 50% magnitude extract of
  the default, built once), which also runs the dense teacher's forwards.
Each with `--eval-blocks 4 --cloze-items 0 --no-cache`, with the environment's
`ONEDNN_PRIMITIVE_CACHE_CAPACITY` at 64 (carve's) and at 1024 (oneDNN's default), the two orders
alternating run by run.  Columns: the training stage's seconds and the job's wall seconds and peak
RSS (mean ± half the range over the runs), and whether every run of a job, at either setting, saved
the same tensors (sha256 of each).  Results: bench/results/onednn.jsonl; the table: section `onednn`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, OUT, ROOT, commit, load_results, save_result, timed, write_section
from stream import digests

RESULTS = HERE / "results" / "onednn.jsonl"
CARVE = str(ROOT / ".venv" / "bin" / "carve")
PRUNED = OUT / "onednn-pruned-magnitude"
CAPS = ("64", "1024")
COMMON = ["--eval-blocks", "4", "--cloze-items", "0", "--no-cache", "--overwrite", "--quiet"]


def ensure_pruned() -> None:
    if (PRUNED / "carve.json").exists():
        return
    timed([CARVE, "extract", "--model", "default", "--method", "magnitude", "--sparsity", "0.5", "--no-speed",
           "--out", str(PRUNED), *COMMON])  # fmt: skip


def command(job: str, steps: int, out: Path) -> list[str]:
    train = ["--dtype", "bfloat16", "--steps", str(steps), "--out", str(out), *COMMON]
    if job == "recover":
        return [CARVE, "recover", str(PRUNED), *train]
    return [CARVE, "finetune", "default", "--trainable", job.removeprefix("finetune-"), *train]


def run(job: str, cap: str, steps: int, index: int) -> dict[str, Any]:
    out = OUT / f"onednn-{job}-{cap}"
    env = {**os.environ, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": cap}
    speed = timed(command(job, steps, out), env)
    m = json.loads((out / "carve.json").read_text())
    tensors = digests(out)
    return {
        "id": f"{job}-{cap}-{index}", "job": job, "cap": cap, "run": index, "steps": steps, **speed,
        "train_s": m["timings_s"]["train"], "manifest_peak_rss_mb": m["peak_rss_mb"],
        "loss_last": m["training"]["loss_last"], "data": m["data"],
        "output_sha256": hashlib.sha256(json.dumps(tensors, sort_keys=True).encode()).hexdigest(),
        "commit": commit(),
    }  # fmt: skip


def spread(values: list[float], digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {(max(values) - min(values)) / 2:.{digits}f}"


def table(rows: dict[str, dict[str, Any]]) -> str:
    jobs = sorted({r["job"] for r in rows.values()})
    lines = [
        "## oneDNN's primitive cache on bfloat16 jobs (`ONEDNN_PRIMITIVE_CACHE_CAPACITY` 64, carve's, against "
        "1024, oneDNN's default)",
        "",
        "bench/onednn.py. The embedded default in bfloat16 (`--dtype bfloat16`), each job in its own process "
        "on 2 CPU cores, one after the other, the two settings alternating run by run; `--eval-blocks 4 "
        "--cloze-items 0 --no-cache`. recover: a 50% magnitude extract of the default, with its dense teacher. "
        "Mean ± half the range over the runs.",
        "",
        "| job | cap | runs | steps | train s | wall s | peak RSS MB | same tensors in every run | commit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for job in jobs:
        mine = [r for r in rows.values() if r["job"] == job]
        same = "yes" if len({r["output_sha256"] for r in mine}) == 1 else "NO"
        for cap in CAPS:
            rs = sorted((r for r in mine if r["cap"] == cap), key=lambda r: r["run"])
            if not rs:
                continue
            lines.append(
                f"| {job} | {cap} | {len(rs)} | {rs[0]['steps']} | {spread([r['train_s'] for r in rs])} | "
                f"{spread([r['wall_s'] for r in rs])} | {spread([r['peak_rss_mb'] for r in rs], 0)} | {same} | "
                f"{', '.join(sorted({r['commit'] for r in rs}))} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--jobs", nargs="+", default=["finetune-full", "finetune-lora", "recover"])
    args = ap.parse_args()
    rows = load_results(RESULTS)
    ensure_pruned()
    for index in range(args.runs):
        for job in args.jobs:
            for cap in CAPS if index % 2 == 0 else CAPS[::-1]:
                rid = f"{job}-{cap}-{index}"
                if rid in rows:
                    continue
                row = run(job, cap, args.steps, index)
                save_result(RESULTS, row)
                rows[rid] = row
                print(f"{rid}: train {row['train_s']} s, wall {row['wall_s']} s, peak {row['peak_rss_mb']} MB",
                      flush=True)  # fmt: skip
    text = table(rows)
    print(text)
    write_section("onednn", text)


if __name__ == "__main__":
    main()
