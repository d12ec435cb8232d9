"""Benchmark sparse fine-tuning (`carve finetune`) on the embedded default.

    .venv/bin/python bench/finetune.py [--domains legal code] [--rows full lora lift ...] [--steps 100]
        [--rerun ROW_ID ...]

Per domain, the same data for every row: `--steps` optimizer steps of one 512-token training
block (the domain's train split, no general text: `--mix 0`, seed 0), evaluated on the first 16
held-out 512-token blocks of the domain and of the general corpus and 100 domain cloze items.
Rows: the base model (the jobs' cached "before" metrics), full fine-tuning, LoRA with the
trainable count of 5% of the targeted weights, and 5% of each targeted matrix chosen by LIFT
(rank 128), by a Fisher importance map of the domain (`carve extract --method fisher
--save-importance`, 64 domain blocks), by magnitude and at random.  Each row is one
`carve finetune` process (the product's CLI, default learning rate of its kind); its manifest's
data fingerprints, optimizer state, peak RSS and stage times are kept in
bench/results/finetune.jsonl (finished rows are not rerun); the table goes to the `finetune`
section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, MODEL_DIR, OUT, ROOT, commit, ensure_model, load_results, save_result, write_section

RESULTS = HERE / "results" / "finetune.jsonl"
ROWS = ["full", "lora", "lift", "importance", "magnitude", "random"]
EVAL = ["--eval-blocks", "16", "--cloze-items", "100", "--block-len", "512"]
DENSITY = 0.05
CARVE = str(ROOT / ".venv" / "bin" / "carve")


def _importance_map(domain: str) -> Path:
    """The domain's Fisher importance of the dense model, from carve's own extract."""
    path = OUT / f"finetune-fisher-{domain}.safetensors"
    if not path.exists():
        cmd = [CARVE, "extract", "--model", str(MODEL_DIR), "--domain", domain, "--method", "fisher",
               "--sparsity", "0.5", "--no-speed", "--quiet", "--save-importance", str(path), *EVAL]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
    return path


def row_id(domain: str, row: str, steps: int, lr: float | None, seed: int) -> str:
    """`domain/row/steps`, `domain/row@lr/steps` for another learning rate, `/sN` after it for a seed other than 0."""
    return f"{domain}/{row}{'' if lr is None else f'@{lr:g}'}/{steps}{f'/s{seed}' if seed else ''}"


def run_row(domain: str, row: str, steps: int, lr: float | None = None, seed: int = 0) -> dict[str, Any]:
    out = OUT / ("finetune-" + row_id(domain, row, steps, lr, seed).replace("/", "-"))
    trainable = f"importance:{_importance_map(domain)}" if row == "importance" else row
    cmd = [CARVE, "finetune", str(MODEL_DIR), "--domain", domain, "--trainable", trainable,
           "--density", str(DENSITY), "--steps", str(steps), *EVAL, "--out", str(out), "--overwrite",
           "--quiet", "--json", "--seed", str(seed), *(["--lr", str(lr)] if lr is not None else [])]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    manifest = json.loads((out / "carve.json").read_text())
    return {
        "wall_s": round(wall, 1),
        "metrics": manifest["metrics"],
        "trainable": manifest["trainable"],
        "training": {k: v for k, v in manifest["training"].items() if k != "losses"},
        "data": {"train": manifest["data"]["train"], "eval": manifest["data"]["eval"]},
        "timings_s": manifest["timings_s"],
        "peak_rss_mb": manifest["peak_rss_mb"],
        "source_fingerprint": manifest["source"]["fingerprint"],
    }


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _gain(base: dict[str, Any], after: dict[str, Any]) -> float:
    return math.log(base["domain_ppl"]) - math.log(after["domain_ppl"])


def write_table(rows: dict[str, dict[str, Any]], domains: list[str], steps: int) -> str:
    lines = [
        "## Sparse fine-tuning (`carve finetune`), embedded default",
        "",
        f"bench/finetune.py: {steps} AdamW steps of one 512-token block of the domain's train split (no general",
        "text, seed 0, the same blocks for every row: each row's train fingerprint is in results/finetune.jsonl),",
        "peak lr: each row says its own (full 5e-5, LoRA 1e-3, other masks 5e-4 were the CLI defaults;",
        "LIFT's is 2e-3 since 2026-11-29; 10 warm-up steps, cosine to 10%). Perplexity: the first 16 held-out",
        "512-token blocks per corpus; 100 domain cloze items.",
        "Sparse rows train 5% of each decoder Linear weight matrix; LoRA's rank gives the same trainable count.",
        "Optimizer state: AdamW moments (and int32 indices of the trained entries). One run (seed 0) per row.",
        "Gain share: the row's domain log-perplexity gain over the base as a share of full fine-tuning's.",
        "Times are wall seconds of each row's own process, rows run one after another (not side by side).",
        "",
    ]
    for domain in domains:
        mine = [r for r in rows.values() if r.get("domain") == domain and r.get("steps") == steps and not r.get("seed")]
        mine = [r for r in mine if "metrics" in r]
        base = mine[0]["metrics"]["before"] if mine else None
        got = {r["row"]: r for r in mine if not r.get("lr")}  # the rows at the kind's default lr
        lines += [f"### {domain}", "",
                  "| row | domain ppl | general ppl | Δ general ppl | domain cloze acc | trainable params | "
                  "optimizer state MB | peak RSS MB | train s | wall s | gain share of full |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        if base:
            cloze = _fmt(base.get("domain_cloze", {}).get("accuracy"))
            lines.append(f"| base | {base['domain_ppl']:.3f} | {base['general_ppl']:.3f} | - | {cloze} |" + " - |" * 6)
        full = got.get("full")
        extra = sorted(k for k in rows if k.startswith(f"{domain}/") and "@" in k and k.endswith(f"/{steps}"))
        for rid in [f"{domain}/{row}/{steps}" for row in ROWS] + extra:
            r = rows.get(rid)
            if r and "error" in r:
                lines.append(f"| {rid} | error: {r['error']} |")
            if not r or "metrics" not in r or base is None:
                continue
            a = r["metrics"]["after"]
            share = _gain(base, a) / _gain(base, full["metrics"]["after"]) if full else None
            row = r["row"]
            label = row + (f" (rank {r['trainable']['lora_rank']})" if row == "lora" else "")
            label += f", lr {r['training']['lr']:g}"  # the peak lr the run used (the manifest's)
            lines.append(
                f"| {label} | {a['domain_ppl']:.3f} | {a['general_ppl']:.3f} | "
                f"{a['general_ppl'] - base['general_ppl']:+.3f} | {_fmt(a.get('domain_cloze', {}).get('accuracy'))} | "
                f"{r['trainable']['parameters']:,} | {r['training']['optimizer_state_mb']:.1f} | "
                f"{r['peak_rss_mb']:.0f} | {r['timings_s']['train']:.0f} | {r['wall_s']:.0f} | {_fmt(share, '.3f')} |"
            )
        lines += ["", *_verdicts(base, got, [r for r in mine if r["row"] in ("lift", "importance")]), ""]
    commits = sorted({r.get("commit", "?") for r in rows.values()})
    lines.append(f"Rows measured at carve commit(s) {', '.join(commits)}.")
    return "\n".join(lines)


def _verdicts(
    base: dict[str, Any] | None, got: dict[str, dict[str, Any]], candidates: list[dict[str, Any]]
) -> list[str]:
    """Issue 19's bar, row by row: ≥ 95% of full fine-tuning's domain log-ppl gain, general perplexity
    raised at most 80% as much as full fine-tuning raises it, domain ppl below LoRA's, optimizer state at
    most 10% of full's, peak RSS at most LoRA's."""
    if base is None or "full" not in got or "lora" not in got:
        return []
    full, lora = got["full"], got["lora"]
    full_rise = full["metrics"]["after"]["general_ppl"] - base["general_ppl"]
    out = []
    for r in candidates:
        a = r["metrics"]["after"]
        row = r["row"] + f" (lr {r['training']['lr']:g})"
        share = _gain(base, a) / _gain(base, full["metrics"]["after"])
        rise = a["general_ppl"] - base["general_ppl"]
        state, rss = r["training"]["optimizer_state_mb"], r["peak_rss_mb"]
        full_state, lora_ppl = full["training"]["optimizer_state_mb"], lora["metrics"]["after"]["domain_ppl"]
        checks = {
            f"gain {share:.3f} of full's (bar 0.95)": share >= 0.95,
            f"general Δ {rise:+.3f} vs 0.8 x full's {full_rise:+.3f}": rise <= 0.8 * full_rise,
            f"domain ppl {a['domain_ppl']:.3f} vs LoRA's {lora_ppl:.3f}": a["domain_ppl"] < lora_ppl,
            f"optimizer state {state / full_state:.3f} of full's (bar 0.10)": state <= 0.1 * full_state,
            f"peak RSS {rss:.0f} vs LoRA's {lora['peak_rss_mb']:.0f} MB": rss <= lora["peak_rss_mb"],
        }
        met = ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in checks.items())
        out.append(f"- {row}: {met}.")
    if full_rise <= 0:
        out.append(
            f"- Full fine-tuning lowered general perplexity here ({full_rise:+.3f}), so the bar's 'raise it at most "
            "80% as much' reads as: lower it by at least 80% as much."
        )
    return out


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def write_seeds(rows: dict[str, dict[str, Any]], domains: list[str], steps: int) -> str:
    """Rows measured under several seeds (data order, LoRA initialisation): mean ± sample standard
    deviation, and the bar checked on the means."""
    lines = [
        "## Sparse fine-tuning over seeds",
        "",
        f"bench/finetune.py --seed N: the rows above ({steps} steps) repeated with `carve finetune --seed N`, which",
        "changes the order of the training blocks and LoRA's initialisation (the evaluation data stay the same).",
        "Mean ± sample standard deviation over the seeds; the bar is checked on the means.",
        "",
    ]
    for domain in domains:
        groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
        for r in rows.values():
            if r.get("domain") == domain and r.get("steps") == steps and "metrics" in r:
                groups.setdefault((r["row"], r["training"]["lr"]), []).append(r)
        groups = {k: v for k, v in groups.items() if len(v) > 1}
        if not groups:
            continue
        lines += [f"### {domain}", "", "| row | seeds | domain ppl | general ppl | domain cloze acc |"]
        lines.append("|---|---|---|---|---|")
        means: dict[tuple[str, Any], dict[str, Any]] = {}
        for (row, lr), rs in sorted(groups.items(), key=lambda kv: (ROWS.index(kv[0][0]), kv[0][1] or 0)):
            cols = {}
            for key in ("domain_ppl", "general_ppl"):
                cols[key] = _mean_sd([r["metrics"]["after"][key] for r in rs])
            cloze = _mean_sd([r["metrics"]["after"]["domain_cloze"]["accuracy"] for r in rs])
            seeds = ",".join(str(r.get("seed", 0)) for r in sorted(rs, key=lambda r: r.get("seed", 0)))
            label = f"{row}, lr {lr:g}"
            lines.append(
                f"| {label} | {seeds} | {cols['domain_ppl'][0]:.3f} ± {cols['domain_ppl'][1]:.3f} | "
                f"{cols['general_ppl'][0]:.3f} ± {cols['general_ppl'][1]:.3f} | {cloze[0]:.3f} ± {cloze[1]:.3f} |"
            )
            first = rs[0]
            means[(row, lr)] = {**first, "metrics": {**first["metrics"], "after": {k: v[0] for k, v in cols.items()}},
                                "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}  # fmt: skip
        base = rs[0]["metrics"]["before"]
        got = {row: r for (row, _), r in means.items() if row in ("full", "lora")}
        candidates = [r for (row, _), r in means.items() if row in ("lift", "importance")]
        lines += ["", *_verdicts(base, got, candidates), ""]
    lines.append("Peak RSS in the checks: the largest over a row's seeds.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", nargs="+", default=["legal", "code"])
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rerun", nargs="*", default=[], help="row ids (domain/row/steps) to measure again")
    ap.add_argument(
        "--lr", type=float, default=None, help="a peak learning rate other than the kind's default (extra rows)"
    )
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="carve finetune --seed values (extra rows)")
    args = ap.parse_args()
    ensure_model()
    rows = load_results(RESULTS)
    for domain in args.domains:
        for row in args.rows:
            for seed in args.seeds:
                rid = row_id(domain, row, args.steps, args.lr, seed)
                if rid in rows and "error" not in rows[rid] and rid not in args.rerun:
                    continue
                print(f"running {rid} ...", flush=True)
                result = {"id": rid, "domain": domain, "row": row, "steps": args.steps, "lr": args.lr, "seed": seed,
                          "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M"),
                          **run_row(domain, row, args.steps, args.lr, seed)}  # fmt: skip
                save_result(RESULTS, result)
                rows[rid] = result
                shown = list(dict.fromkeys(r["domain"] for r in rows.values() if "domain" in r))  # all measured
                write_section("finetune", write_table(rows, shown, args.steps))
                write_section("finetune-seeds", write_seeds(rows, shown, args.steps))
                print(result.get("error") or json.dumps(result["metrics"]["after"]), flush=True)
    print(write_table(rows, args.domains, args.steps))
    print(write_seeds(rows, args.domains, args.steps))


if __name__ == "__main__":
    main()
