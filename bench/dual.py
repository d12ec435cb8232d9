"""Benchmark dual importance (D-Pruner) against SparseGPT / Wanda at several calibration mixes.

    .venv/bin/python bench/dual.py [--domains legal code] [--patterns 50% 2:4] [--only ID_SUBSTRING]
        [--rerun ID_SUBSTRING ...]

On SmolLM2-135M-Instruct (the embedded default, de-quantized once to bench/out/smollm2-f32), for
each domain and pattern: dense; magnitude; SparseGPT and Wanda calibrated with a share of general
blocks of 0 (domain only), 0.1, 0.3, 0.5 and 1 (general only); dual (domain gradients with
general OBS importance, λ = 1) and dual with OBS reconstruction of the kept weights from a 0.3
mix; dual-obs (domain Fisher error plus the OBS error, mask chosen in SparseGPT's sweep, λ = 1)
with its sweep's Hessians from a 0.3 and a 0.5 mix.  64 calibration blocks x 512 tokens per
corpus.  Every configuration runs in its own process; metrics: domain and general perplexity
(first 16 held-out blocks), domain cloze accuracy (100 held-out items, Wilson 95% interval), wall
time of scoring + pruning, peak RSS.

Results accumulate in bench/results/dual.jsonl (a finished configuration is not rerun); dual's
(and dual-obs's) importance map is kept per domain under bench/out and reused by the domain's other
rows of that method (its scores depend on neither sparsity, pattern nor reconstruction; the table
says so); the table goes to the `dual` section of bench/RESULTS.md and the plot to bench/dual.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    BLOCK_LEN,
    CALIB_BLOCKS,
    HERE,
    MODEL_DIR,
    SEED,
    carve_worker,
    commit,
    ensure_model,
    extract_row,
    load_results,
    peak_rss_mb,
    save_result,
    write_section,
)

RESULTS = HERE / "results" / "dual.jsonl"
PLOT = HERE / "dual.png"
MIXES = (0.0, 0.1, 0.3, 0.5, 1.0)
SCORED = ("dual", "dual-obs")  # methods whose importance map is cached per domain
DUAL_OBS_MIXES = (0.3, 0.5)
MARKERS = {"dual": "*", "dual-obs": "P", "sparsegpt": "o", "wanda": "s", "magnitude": "x", "dense": "D"}
EVAL_BLOCKS, CLOZE_ITEMS = 16, 100


# --------------------------------------------------------------------------- worker side
def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def memory_worker(blocks: int) -> dict[str, Any]:
    """Memory of the gradient engine alone on the embedded default: RSS after imports, after
    loading the model, and the peak over a dual-score gradient pass of `blocks` domain blocks
    (the statistics and activations do not grow with the number of blocks)."""
    import torch

    import carve
    from carve.engines import accumulate_gradients
    from carve.models import all_prunable_linears
    from carve.progress import set_quiet

    set_quiet(True)
    base = _rss_mb()
    lm = carve.load_model(str(MODEL_DIR))
    loaded = _rss_mb()
    model_mb = sum(p.numel() for p in lm.model.parameters()) * 4 / 2**20
    calib = carve.Corpus("legal").calibration_blocks(lm.tokenizer, blocks, BLOCK_LEN, SEED)
    names = [f"{n}.weight" for n in all_prunable_linears(lm.model)]
    t = time.perf_counter()
    accumulate_gradients(lm.model, calib, names, ("taylor2_step",))
    seconds = time.perf_counter() - t
    peak = peak_rss_mb()
    return {
        "model_fp32_mb": round(model_mb, 1),
        "rss_after_imports_mb": base,
        "rss_after_load_mb": loaded,
        "peak_rss_mb": peak,
        "engine_mb": round(peak - base, 1),
        "ratio_to_model": round((peak - base) / model_mb, 2),
        "seconds_per_block": round(seconds / blocks, 2),
        "torch_threads": torch.get_num_threads(),
    }


def importance_file(spec: dict[str, Any]) -> Path:
    """Where a dual / dual-obs configuration's importance map is kept for the other rows of its
    domain (dual-obs's scores, the domain Fisher term, do not depend on λ)."""
    lam = "" if spec["method"] == "dual-obs" else f"-lam{spec.get('lam')}"
    return MODEL_DIR.parent / f"importance-job-{spec['method']}-{spec['domain']}{lam}.safetensors"


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("kind") == "memory":
        return memory_worker(spec["blocks"])
    import torch

    import carve
    from carve.progress import set_quiet

    set_quiet(True)
    torch.manual_seed(0)
    domain = spec["domain"]
    if spec["method"] == "dense":
        lm = carve.load_model(str(MODEL_DIR))
        m = carve.evaluate(lm, carve.Corpus(domain), carve.Corpus("general"), blocks=EVAL_BLOCKS,
                           block_len=BLOCK_LEN, cloze_items=CLOZE_ITEMS)  # fmt: skip
        return _metrics(m) | {"peak_rss_mb": peak_rss_mb()}
    # carve's own job, `carve extract` through its Python API; dual's and dual-obs's map computed by
    # the first row of its domain (--save-importance) and reused by the others (--importance)
    pattern = None if spec["pattern"] == "50%" else spec["pattern"]
    cached = importance_file(spec) if spec["method"] in SCORED else None
    reuse = cached is not None and cached.is_file()
    recipe = carve.Recipe(
        model=str(MODEL_DIR), domain=domain, method=spec["method"], sparsity=None if pattern else 0.5,
        pattern=pattern, mix=spec["mix"] or 0.0, reconstruct_mix=spec.get("reconstruct"),
        lam=spec.get("lam", 1.0), importance=str(cached) if reuse else None, calib_blocks=CALIB_BLOCKS,
        block_len=BLOCK_LEN, seed=SEED, eval_blocks=EVAL_BLOCKS, cloze_items=CLOZE_ITEMS, speed=False,
    )  # fmt: skip
    save = cached if cached is not None and not reuse else None
    m = carve.extract(recipe, save_importance=save)
    result = {**extract_row(m), **_metrics(m["metrics"]["after"])}
    if reuse:
        result["importance_reused"] = cached.name
        result["scoring_s"] = json.loads(cached.with_suffix(".json").read_text())["scoring_s"]
    elif save is not None:  # how long the scores took, for the rows that reuse them
        save.with_suffix(".json").write_text(json.dumps({"scoring_s": result["seconds"]}))
    return result


def _metrics(m: dict[str, Any]) -> dict[str, Any]:
    cloze = m["domain_cloze"]
    return {"domain_ppl": m["domain_ppl"], "general_ppl": m["general_ppl"], "cloze": cloze["accuracy"],
            "cloze_ci95": cloze["ci95"]}  # fmt: skip


# --------------------------------------------------------------------------- driver side
def configurations(domains: list[str], patterns: list[str]) -> list[dict[str, Any]]:
    """In priority order per domain and pattern: dual first, then the baselines."""
    out: list[dict[str, Any]] = []
    for d in domains:
        out.append({"domain": d, "pattern": "-", "method": "dense", "mix": None})
        for pat in patterns:
            out.append({"domain": d, "pattern": pat, "method": "dual", "mix": 0.0, "lam": 1.0})
            out.append({"domain": d, "pattern": pat, "method": "dual", "mix": 0.0, "lam": 1.0, "reconstruct": 0.3})
            for mix in DUAL_OBS_MIXES:
                obs = {"domain": d, "pattern": pat, "method": "dual-obs", "mix": 0.0, "lam": 1.0, "reconstruct": mix}
                out.append(obs)
            for mix in MIXES:
                out.append({"domain": d, "pattern": pat, "method": "sparsegpt", "mix": mix})
            for mix in MIXES:
                out.append({"domain": d, "pattern": pat, "method": "wanda", "mix": mix})
            out.append({"domain": d, "pattern": pat, "method": "magnitude", "mix": None})
    for c in out:
        c["id"] = "/".join(str(c.get(k)) for k in ("domain", "pattern", "method", "mix", "lam", "reconstruct"))
    return out


def label(c: dict[str, Any]) -> str:
    if c["method"] == "dual-obs":
        return f"dual-obs λ={c['lam']:g}, sweep mix {c['reconstruct']:g}"
    if c["method"] == "dual":
        return f"dual λ={c['lam']:g}" + (f" + OBS rec. mix {c['reconstruct']:g}" if c.get("reconstruct") else "")
    if c["mix"] is None:
        return c["method"]
    return f"{c['method']} mix {c['mix']:g}"


def dominated_by(row: dict[str, Any], others: list[dict[str, Any]]) -> list[str]:
    """Baselines at least as good as `row` on both domain and general perplexity."""
    return [
        label(o)
        for o in others
        if o["method"] not in (*SCORED, "dense")
        and o["domain_ppl"] <= row["domain_ppl"]
        and o["general_ppl"] <= row["general_ppl"]
    ]


def sparsegpt_at(general_ppl: float, rows: list[dict[str, Any]]) -> float | None:
    """Domain ppl of the SparseGPT mix curve at this general ppl: log-log interpolation between
    the two mixes around it (None outside the range the mixes span)."""
    import itertools
    import math

    pts = sorted((r["general_ppl"], r["domain_ppl"]) for r in rows if r["method"] == "sparsegpt")
    for (g0, d0), (g1, d1) in itertools.pairwise(pts):
        if g0 <= general_ppl <= g1:
            t = 0.0 if g1 == g0 else (math.log(general_ppl) - math.log(g0)) / (math.log(g1) - math.log(g0))
            return math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))
    return None


def write_table(rows: dict[str, dict[str, Any]], domains: list[str], patterns: list[str]) -> str:
    lines = [
        "# dual importance (D-Pruner) against SparseGPT / Wanda calibration mixes",
        "",
        "Written by `bench/dual.py` (finished rows cached in `bench/results/dual.jsonl`). Model: SmolLM2-135M-"
        f"Instruct (embedded default, float32). Calibration: {CALIB_BLOCKS} x {BLOCK_LEN}-token blocks (seed {SEED}); "
        "`mix` = share of them from `general`, the rest from the domain. dual: gradient pass over the domain blocks "
        "plus the OBS importance from 64 general blocks, λ = 1; `+ OBS rec.` keeps dual's mask and updates the kept "
        "weights by OBS compensation with a Hessian from a 0.3 mix. dual-obs: the domain Fisher error ½·E[g²]·θ² "
        "(gradients on the 64 domain blocks) plus λ times the layer's OBS error, the mask chosen inside SparseGPT's "
        "sweep, whose Hessians come from a 0.3 or 0.5 mix (docs/methods.md). Perplexity: first "
        f"{EVAL_BLOCKS} held-out 512-token blocks; cloze: {CLOZE_ITEMS} held-out domain items, 4 choices (chance "
        "0.25), 95% Wilson interval. Rows run carve's extraction job, `carve.extract(Recipe(...))` (what "
        "`carve extract` runs, with `--mix`, `--lambda`, `--reconstruct` and `--importance` as in the row; data "
        "fingerprints kept in bench/results/dual.jsonl); rows marked `†` were measured before the bench ran the "
        "job, through the scoring and pruning call alone (carve.prune), same settings. Time: scoring + pruning "
        "(the job's `prune` stage); peak RSS of the whole process (load, evaluate, prune, evaluate). "
        "Plot: `bench/dual.png`.",
        "",
    ]
    for d in domains:
        for pat in patterns:
            cfgs = [c for c in configurations([d], [pat]) if c["pattern"] in (pat, "-")]
            lines += [
                f"## {d}, {pat}",
                "",
                "| method | domain ppl | general ppl | domain cloze acc [95% CI] | prune s | peak RSS MB |",
                "|---|---|---|---|---|---|",
            ]
            done = []
            for c in cfgs:
                r = rows.get(c["id"])
                if r is None:
                    lines.append(f"| {label(c)} | | | | | not run yet |")
                    continue
                if "error" in r:
                    lines.append(f"| {label(c)} | | | | | {r['error']} |")
                    continue
                done.append({**c, **r})
                ci = r["cloze_ci95"]
                seconds = f"{r.get('seconds', 0):.1f}"
                if r.get("importance_reused"):
                    seconds += f" (scores reused; scoring took {r.get('scoring_s') or 0:.0f})"
                mark = "" if r.get("job") or c["method"] == "dense" else " †"
                lines.append(
                    f"| {label(c)}{mark} | {r['domain_ppl']:.3f} | {r['general_ppl']:.3f} | {r['cloze']:.2f} "
                    f"[{ci[0]:.2f}, {ci[1]:.2f}] | {seconds} | {r['peak_rss_mb']:.0f} |"
                )
            lines.append("")
            for r in done:
                if r["method"] in SCORED:
                    dom = dominated_by(r, done)
                    verdict = f"dominated by {', '.join(dom)}" if dom else "not dominated by any baseline run"
                    ref = sparsegpt_at(r["general_ppl"], done)
                    if ref is None:
                        goal = "general ppl outside the SparseGPT mixes' range, no equal-general comparison"
                    else:
                        ratio = r["domain_ppl"] / ref
                        goal = (
                            f"domain ppl / SparseGPT mix curve at equal general ppl = {ratio:.3f} "
                            f"(goal <= 0.95: {'met' if ratio <= 0.95 else 'NOT met'})"
                        )
                    lines.append(f"- {label(r)}: {verdict}; {goal}")
            lines.append("")
    for key in ("cli", "cli/dual-obs"):  # `carve extract --method M --domain legal` with default settings
        cli = rows.get(key)
        if not cli:
            continue
        t, r = cli["timings_s"], cli["recipe"]
        what = "general OBS + gradients" if r["method"] == "dual" else "gradients + guided OBS sweep"
        lines += [
            f"## `carve extract --method {r['method']} --domain legal` with default settings",
            "",
            f"From the embedded GGUF ({cli['source']}), {r['calib_blocks']} x {r['block_len']} calibration blocks "
            f"for each corpus, {r['eval_blocks']} eval blocks per corpus and 100 cloze items before and after; "
            "stage times from its manifest (their sum omits only interpreter start-up and imports):",
            "",
            f"| total s | load model s | evaluate before s | prune ({what}) s | evaluate after s | peak RSS MB |",
            "|---|---|---|---|---|---|",
            f"| {cli['total_s']:.0f} ({'under' if cli['total_s'] < 900 else 'NOT under'} 15 min) "
            f"| {t['load_model']:.0f} | {t['evaluate_before']:.0f} | {t['prune']:.0f} | {t['evaluate_after']:.0f} "
            f"| {cli['peak_rss_mb']:.0f} |",
            "",
        ]
    mem = rows.get("memory")
    if mem and "error" not in mem:
        lines += [
            "## Gradient engine memory (embedded default)",
            "",
            "A dual-score gradient pass (checkpointed blocks, one 512-token block per micro-batch, one float32 "
            "statistic per scored weight) in its own process; engine memory = peak RSS - RSS after imports "
            "(so it includes the model itself).",
            "",
            "| model fp32 MB | RSS after imports MB | after load MB | peak MB | engine MB | engine / model "
            "| s per block |",
            "|---|---|---|---|---|---|---|",
            f"| {mem['model_fp32_mb']:.0f} | {mem['rss_after_imports_mb']:.0f} | {mem['rss_after_load_mb']:.0f} "
            f"| {mem['peak_rss_mb']:.0f} | {mem['engine_mb']:.0f} | {mem['ratio_to_model']:.2f} "
            f"({'under' if mem['ratio_to_model'] < 3 else 'NOT under'} the 3x target) "
            f"| {mem['seconds_per_block']:.1f} |",
            "",
        ]
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, Any]], domains: list[str], patterns: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(
        len(patterns), len(domains), figsize=(5 * len(domains) + 2.5, 4.2 * len(patterns)), squeeze=False
    )
    colors = [plt.get_cmap("tab20")(k) for k in range(20)]
    styles: dict[str, tuple[str, Any]] = {}  # one marker and colour per method, the same in every panel
    handles: dict[str, Any] = {}
    for i, pat in enumerate(patterns):
        for j, d in enumerate(domains):
            ax = axes[i][j]
            for c in configurations([d], [pat]):
                r = rows.get(c["id"])
                if r is None or "error" in r or (c["pattern"] not in (pat, "-")):
                    continue
                name = label(c)
                marker = MARKERS[c["method"]]
                styles.setdefault(name, (marker, colors[len(styles) % len(colors)]))
                m, color = styles[name]
                handles[name] = ax.scatter(
                    r["general_ppl"], r["domain_ppl"], marker=m, color=color, s=90 if m in "*P" else 40
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            for axis in (ax.xaxis, ax.yaxis):  # plain numbers, major ticks only
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("general perplexity")
            ax.set_ylabel(f"{d} perplexity")
            ax.set_title(f"{d}, {pat} (lower-left is better)")
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1))
    fig.savefig(PLOT, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker")
    p.add_argument("--domains", nargs="+", default=["legal", "code"])
    p.add_argument("--patterns", nargs="+", default=["50%", "2:4"])
    p.add_argument("--only", default="")
    p.add_argument("--rerun", nargs="*", default=[], help="run again the cached rows whose id contains one of these")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--memory", action="store_true", help="measure the gradient engine's memory instead")
    p.add_argument(
        "--cli-manifest",
        help="carve.json of `carve extract --method dual|dual-obs --domain legal` run with default settings "
        "(record it)",
    )
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    all_domains, all_patterns = ["legal", "code"], ["50%", "2:4"]
    rows = load_results(RESULTS)
    if args.cli_manifest:
        m = json.loads(Path(args.cli_manifest).read_text())
        row = {
            "id": "cli" if m["recipe"]["method"] == "dual" else f"cli/{m['recipe']['method']}",
            "recipe": {k: m["recipe"][k] for k in ("method", "domain", "calib_blocks", "block_len", "eval_blocks")},
            "source": m["source"]["model"],
            "timings_s": m["timings_s"],
            "total_s": round(sum(m["timings_s"].values()), 1),
            "peak_rss_mb": m["peak_rss_mb"],
            "metrics": m["metrics"],
            "commit": commit(),
        }
        save_result(RESULTS, row)
        rows[row["id"]] = row
    if args.memory:
        ensure_model()
        row = {"id": "memory", **carve_worker(__file__, {"kind": "memory", "blocks": 8}), "commit": commit()}
        save_result(RESULTS, row)
        rows["memory"] = row

    def publish() -> None:
        write_section("dual", write_table(rows, all_domains, all_patterns))
        plot(rows, all_domains, all_patterns)

    if not args.table_only:
        ensure_model()
        for cfg in configurations(args.domains, args.patterns):
            again = any(r in cfg["id"] for r in args.rerun)
            if (cfg["id"] in rows and not again) or args.only not in cfg["id"]:
                continue
            print(f"running {cfg['id']} ...", flush=True)
            t = time.perf_counter()
            res = carve_worker(__file__, cfg)
            row = {**cfg, **res, "wall_total_s": round(time.perf_counter() - t, 1), "commit": commit()}
            save_result(RESULTS, row)
            rows[cfg["id"]] = row
            print(json.dumps(row), flush=True)
            publish()
    publish()
    print(write_table(rows, all_domains, all_patterns))


if __name__ == "__main__":
    main()
