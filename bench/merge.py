"""Benchmark `carve merge` on the embedded default, against mergekit 0.1.5 on the same experts.

    .venv/bin/python bench/merge.py [--rows ROW ...] [--seeds 3] [--rerun ID ...] [--table-only] [--prepare]

Experts: `carve finetune --trainable full` (100 AdamW steps of one 512-token block, lr 5e-5, seed 0,
domain text only), one per domain: legal, code and scripture (the builtin KJV corpus); the legal and
code experts are bench/finetune.py's `full` rows (bench/out/finetune-D-full-100).
Every method at density 0.2 (task arithmetic, RegMean and Fisher merging: dense), weight 1 per
expert, λ 1, `normalize: true` (the merged task vector is the mean of the kept entries), written as
a mergekit config that both tools run: `carve merge CONFIG.yml` and mergekit's
`mergekit-yaml CONFIG.yml` (bench/.venv-mergekit).
carve-only rows: the importance-guided merge (`importance`: each expert's task vector kept where
the Fisher error of reverting it, ½·E[g²]·τ² with g at the expert on 32 blocks of its domain, is
highest, computed in the job; `importance_base_fisher`: kept where the base model's Fisher pruning
score on the domain is highest, bench/out/finetune-fisher-D.safetensors from `carve extract --method
fisher --save-importance`, given as --importance files), TIES with the agreeing entries summed
instead of averaged (`ties_sum`: `--no-normalize`), RegMean (`regmean`: every Linear of the blocks
merged by the experts' input Gram matrices on 32 blocks of their domains, computed in the job;
`regmean_a0.5`: the matrices' off-diagonal halved; `--data-seeds` draws of those blocks, `--seed`),
Fisher merging (`fisher`: every tensor the mean of the task vectors weighted entry by entry by each
expert's diagonal empirical Fisher E[g²] on 32 blocks of its domain, computed in the job; `--data-seeds`
draws, as RegMean's), TIES with nothing trimmed (`ties_d1`: density 1, RegMean's), Consensus TIES
(`--consensus 2`) and TALL masks (`--tall` over task arithmetic's plain sum, not the mean); both
choose λ_t on the held-out blocks after the evaluated ones (`--select-blocks 8`; code has 7).

Per row: each domain's perplexity and the general perplexity (first 16 held-out 512-token blocks),
the normalized gain per task (the share of the expert's log-perplexity gain over the base that the
merge keeps) and its mean, from the merge job's manifest; wall time and peak RSS of a merge-only run
(`--eval-blocks 0`) of each tool, in its own process, one after the other; the largest absolute
difference between the two tools' merged tensors.  DARE draws its masks from each tool's own random
generator, so DARE rows compare the tools' quality over `--seeds` seeds (mergekit's `--random-seed`).
Results accumulate in bench/results/merge.jsonl; the table goes to the `merge` section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, MODEL_DIR, OUT, ROOT, commit, ensure_model, load_results, save_result, timed, write_section
from mergekit_env import VENV, ensure_mergekit

RESULTS = HERE / "results" / "merge.jsonl"
CARVE = str(ROOT / ".venv" / "bin" / "carve")
DOMAINS = ["legal", "code", "scripture"]
DENSITY = 0.2
EVAL = ["--eval-blocks", "16", "--block-len", "512"]
SHARED = ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "dare_ties", "dare_linear"]
ROWS = [*SHARED, "ties_sum", "ties_d1", "importance", "importance_base_fisher", "regmean", "regmean_a0.5",
        "fisher", "consensus_ties", "tall"]  # fmt: skip
DATA_DRIVEN = ("regmean", "fisher")  # rows whose statistics come from blocks drawn by --seed


def seeds_of(row: str, seeds: int, data_seeds: int) -> int:
    """DARE rows run `seeds` random drops; RegMean and Fisher rows `data_seeds` draws of their blocks."""
    return seeds if row.startswith("dare") else data_seeds if row.startswith(DATA_DRIVEN) else 1


def expert(domain: str) -> Path:
    """The domain's full fine-tune (bench/finetune.py's `full` row), made when missing."""
    out = OUT / f"finetune-{domain}-full-100"
    if not (out / "carve.json").exists():
        cmd = [CARVE, "finetune", str(MODEL_DIR), "--domain", domain, "--trainable", "full", "--steps", "100",
               "--eval-blocks", "16", "--cloze-items", "100", "--block-len", "512", "--out", str(out), "--overwrite",
               "--quiet", "--seed", "0"]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
    return out


def importance_map(domain: str) -> Path:
    path = OUT / f"finetune-fisher-{domain}.safetensors"
    if not path.exists():
        cmd = [CARVE, "extract", "--model", str(MODEL_DIR), "--domain", domain, "--method", "fisher", "--sparsity",
               "0.5", "--no-speed", "--quiet", "--save-importance", str(path), "--eval-blocks", "16",
               "--cloze-items", "100", "--block-len", "512"]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True)
    return path


def config(method: str) -> Path:
    """The mergekit config both tools run for `method`."""
    path = OUT / f"merge-{method}.yml"
    models = "".join(f"  - model: {expert(d)}\n    parameters: {{weight: 1.0, density: {DENSITY}}}\n" for d in DOMAINS)
    path.write_text(f"merge_method: {method}\nbase_model: {MODEL_DIR}\ndtype: float32\n"
                    f"parameters: {{normalize: true, lambda: 1.0}}\nmodels:\n{models}")  # fmt: skip
    return path


def carve_args(row: str, seed: int) -> list[str]:
    if row in SHARED:
        return [str(config(row)), "--seed", str(seed), "--domains", *DOMAINS]
    experts = [f"--expert={d}={expert(d)}" for d in DOMAINS]
    common = ["--base", str(MODEL_DIR), *experts, "--density", str(DENSITY), "--normalize"]
    if row == "ties_sum":  # TIES' trim and sign election, the agreeing entries summed (no disjoint mean)
        return [*[a for a in common if a != "--normalize"], "--method", "ties", "--no-normalize"]
    if row == "ties_d1":  # TIES with nothing trimmed: the sign election and disjoint mean at RegMean's density
        return [*common[: common.index("--density")], "--density", "1", "--normalize", "--method", "ties"]
    if row == "importance":  # the maps computed in the job (its default)
        return [*common, "--method", "importance", "--data-blocks", "32"]
    if row == "importance_base_fisher":
        return [*common, "--method", "importance", *[f"--importance={d}={importance_map(d)}" for d in DOMAINS]]
    dense = [a for a in common if a not in ("--density", str(DENSITY))]  # regmean and fisher weigh every entry
    if row.startswith("regmean"):  # the Gram matrices computed in the job, on the same blocks as the importance maps
        alpha = row.partition("_a")[2] or "1"
        return [*dense, "--method", "regmean", "--regmean-alpha", alpha, "--data-blocks", "32", "--seed",
                str(seed)]  # fmt: skip
    if row == "fisher":  # the Fisher diagonals computed in the job, on the same blocks as RegMean's matrices
        return [*dense, "--method", "fisher", "--data-blocks", "32", "--seed", str(seed)]
    if row == "consensus_ties":
        return [*common, "--method", "ties", "--consensus", "2"]
    # TALL over the plain sum τ_MTL = Σ τ_t (the paper's task arithmetic, λ 1): with the mean, an entry
    # only one task moved holds a third of that task's change, and no mask can rebuild the expert
    return [*[a for a in common if a != "--normalize"], "--method", "task_arithmetic", "--tall"]


def run_carve(row: str, seed: int) -> dict[str, Any]:
    """The merge with its evaluation (quality), then a merge-only run (time, RSS)."""
    out = OUT / f"merge-carve-{row}-s{seed}"
    args = carve_args(row, seed)
    whole = timed([CARVE, "merge", *args, *EVAL, "--out", str(out), "--overwrite", "--quiet"])
    manifest = json.loads((out / "carve.json").read_text())
    # TALL and Consensus choose λ_t on the held-out blocks: their merge cannot run without them, so
    # their time is the whole job's (λ search and the per-task evaluation included); so is the
    # importance row's (its maps' gradient passes, then the merge and the evaluation)
    speed = (
        whole
        if row in ("tall", "consensus_ties", "importance") or row.startswith(DATA_DRIVEN)
        else timed(
            [CARVE, "merge", *args, "--eval-blocks", "0", "--out", str(out) + "-timing", "--overwrite", "--quiet"]
        )
    )
    shutil.rmtree(str(out) + "-timing", ignore_errors=True)  # 0.5 GB a copy: only its time is kept
    return {"metrics": manifest["merge_metrics"], "tall": manifest.get("tall"), "size": manifest["size"],
            "inputs": {"base": manifest["source"], "experts": manifest["experts"]}, "merge_only": speed}  # fmt: skip


def run_mergekit(row: str, seed: int) -> dict[str, Any]:
    """mergekit-yaml on the same config (CPU, lazy unpickling), then its output evaluated by carve."""
    out = OUT / f"merge-mergekit-{row}-s{seed}"
    tool = VENV / "bin" / "mergekit-yaml"
    ensure_mergekit()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    speed = timed([str(tool), str(config(row)), str(out), "--random-seed", str(seed), "--lazy-unpickle",
                   "--copy-tokenizer"], env)  # fmt: skip
    theirs = _tensors(out)
    ours = _tensors(OUT / f"merge-carve-{row}-s{seed}")
    common = sorted(set(theirs) & set(ours))
    diff = max(float((theirs[n].float() - ours[n].float()).abs().max()) for n in common)
    metrics = {}
    for d in DOMAINS:
        ev = subprocess.run([CARVE, "eval", str(out), "--domain", d, *EVAL, "--cloze-items", "0", "--json", "--quiet"],
                            capture_output=True, text=True, check=True)  # fmt: skip
        metrics[d] = json.loads(ev.stdout[ev.stdout.index("{") :])["metrics"]
    only = {"only_in_mergekit": sorted(set(theirs) - set(ours)), "only_in_carve": sorted(set(ours) - set(theirs))}
    shutil.rmtree(out, ignore_errors=True)  # compared and evaluated: the numbers are kept, not the copy
    if seed > 0:  # carve's output of this seed served only this comparison
        shutil.rmtree(OUT / f"merge-carve-{row}-s{seed}", ignore_errors=True)
    return {"merge_only": speed, "max_abs_diff": diff, "tensors_compared": len(common), "metrics": metrics, **only}


def _tensors(d: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(d.glob("*.safetensors")):
        if f.name.startswith("model") or f.name.startswith("pytorch"):
            out.update(load_file(str(f)))
    return out


def _gain(rows: dict[str, Any], metrics: dict[str, Any], domain: str) -> float | None:
    """Normalized gain of a merged model's domain perplexity (mergekit's outputs, evaluated by carve)."""
    ties = rows.get("ties/carve/s0", {})
    if "metrics" not in ties:
        return None
    ref = _per_domain(ties)[domain]
    b, e = math.log(ref["base"]["domain_ppl"]), math.log(ref["expert"]["domain_ppl"])
    return (b - math.log(metrics["domain_ppl"])) / (b - e)


def _per_domain(r: dict[str, Any]) -> dict[str, Any]:
    """A carve row's per-task metrics by domain (a mergekit config names each expert by its directory)."""
    per = r["metrics"]["per_task"]
    return {d: next(v for k, v in per.items() if k == d or f"-{d}-" in k) for d in DOMAINS}


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def write_table(rows: dict[str, dict[str, Any]], seeds: int, data_seeds: int) -> str:
    head = "| row | tool | " + " | ".join(f"{d} ppl (gain)" for d in DOMAINS)
    lines = [
        "## Merging (`carve merge`) against mergekit 0.1.5, embedded default",
        "",
        __doc__.split("Experts:", 1)[1].split("Results accumulate", 1)[0].strip().replace("\n", " "),
        "",
        head + " | general ppl | mean gain | merge s | peak RSS MB | max abs diff vs carve |",
        "|---|---|" + "---|" * (len(DOMAINS) + 5),
    ]
    base = _per_domain(rows["ties/carve/s0"]) if "metrics" in rows.get("ties/carve/s0", {}) else {}
    if base:
        cells = [f"{base[d]['base']['domain_ppl']:.3f}" for d in DOMAINS]
        lines.append(f"| base | - | {' | '.join(cells)} | {base[DOMAINS[0]]['base']['general_ppl']:.3f} | 0 | | | |")
        cells = [f"{base[d]['expert']['domain_ppl']:.3f} (1)" for d in DOMAINS]
        lines.append(f"| each domain's expert | - | {' | '.join(cells)} | | 1 | | | |")
    checks: list[str] = []
    shown: list[dict[str, Any]] = []
    for row in ROWS:
        for tool in ("carve", "mergekit"):
            n = seeds_of(row, seeds, data_seeds)
            for seed in range(n):
                r = rows.get(f"{row}/{tool}/s{seed}")
                if r is None or (tool == "mergekit" and row not in SHARED):
                    continue
                label = f"{row}{f' (seed {seed})' if n > 1 else ''}"
                lines.append(_line(label, tool, r, rows))
                shown.append(r)
        checks += _checks(row, rows, seeds)
    checks += _best_single(rows, data_seeds)
    commits = sorted({r["commit"] for r in shown if "commit" in r})  # the rows in the table (seeds beyond it: not)
    return "\n".join([*lines, "", *checks, "", f"Rows measured at carve commit(s) {', '.join(commits)}."])


def _line(label: str, tool: str, r: dict[str, Any], rows: dict[str, Any]) -> str:
    if "error" in r:
        return f"| {label} | {tool} | {r['error']} |"
    if tool == "carve":
        per = _per_domain(r)
        cells = [f"{per[d]['merged']['domain_ppl']:.3f} ({_fmt(per[d]['normalized_gain'])})" for d in DOMAINS]
        general = per[DOMAINS[0]]["merged"]["general_ppl"]
        diff = "-"
    else:
        gains = [_gain(rows, r["metrics"][d], d) for d in DOMAINS]
        cells = [f"{r['metrics'][d]['domain_ppl']:.3f} ({_fmt(g)})" for d, g in zip(DOMAINS, gains, strict=True)]
        general = r["metrics"][DOMAINS[0]]["general_ppl"]
        diff = f"{r['max_abs_diff']:.2e}"
    mean, sp = _mean_gain(tool, r, rows), r["merge_only"]
    return (f"| {label} | {tool} | {' | '.join(cells)} | {general:.3f} | {_fmt(mean)} | {sp['wall_s']:.1f} | "
            f"{_fmt(sp['peak_rss_mb'], '.0f')} | {diff} |")  # fmt: skip


def _mean_gain(tool: str, r: dict[str, Any], rows: dict[str, Any]) -> float | None:
    if tool == "carve":
        return r["metrics"]["mean_normalized_gain"]
    gains = [_gain(rows, r["metrics"][d], d) for d in DOMAINS]
    return statistics.mean(g for g in gains if g is not None) if all(g is not None for g in gains) else None


def _dare_checks(row: str, rows: dict[str, Any], seeds: int) -> list[str]:
    """DARE's masks come from each tool's own generator: mean gain ± sd over the seeds, and the
    median merge-only time ratio."""
    per: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {}
    for tool in ("carve", "mergekit"):
        runs = [rows.get(f"{row}/{tool}/s{s}") for s in range(seeds)]
        done = [r for r in runs if r is not None and "error" not in r]
        per[tool] = [g for g in (_mean_gain(tool, r, rows) for r in done) if g is not None]
        times[tool] = [r["merge_only"]["wall_s"] for r in done]
    if min(len(v) for v in per.values()) < 2:
        return []
    (mc, sc), (mm, sm) = ((statistics.mean(v), statistics.stdev(v)) for v in (per["carve"], per["mergekit"]))
    same = abs(mc - mm) <= max(sc, sm)
    ratio = statistics.median(times["carve"]) / statistics.median(times["mergekit"])
    return [
        f"- {row}: mean gain over seeds, carve {mc:.4f} ± {sc:.4f} ({len(per['carve'])} seeds), mergekit {mm:.4f} "
        f"± {sm:.4f} ({len(per['mergekit'])}): difference {abs(mc - mm):.4f} "
        f"{'within' if same else 'OUTSIDE'} the larger spread (bar: the same mean quality within its spread: "
        f"{'met' if same else 'NOT met'})",
        f"- {row}: median merge-only wall time over seeds, carve {statistics.median(times['carve']):.1f} s vs "
        f"mergekit {statistics.median(times['mergekit']):.1f} s: {ratio:.2f}x (bar <= 0.5x: "
        f"{'met' if ratio <= 0.5 else 'NOT met'})",
    ]


def _best_single(rows: dict[str, Any], data_seeds: int) -> list[str]:
    """Issue 22's bar for the best single merged model: mean gain ≥ 0.9 over its seeds, beating TIES at
    equal density (RegMean and Fisher merging keep every entry: TIES at density 1)."""
    ties = rows.get("ties_d1/carve/s0", {})
    out = []
    for row in DATA_DRIVEN:
        gains = [g for s in range(data_seeds) if "metrics" in rows.get(f"{row}/carve/s{s}", {})
                 for g in [_mean_gain("carve", rows[f"{row}/carve/s{s}"], rows)] if g is not None]  # fmt: skip
        if len(gains) < 2 or "metrics" not in ties:
            continue
        mean, sd, t = statistics.mean(gains), statistics.stdev(gains), _mean_gain("carve", ties, rows) or 0.0
        bar = "met" if mean - sd >= 0.9 else "met on the mean only" if mean >= 0.9 else "NOT met"
        out.append(f"- best single merged model, {row}: mean gain {mean:.4f} ± {sd:.4f} over {len(gains)} draws of "
                   f"its data blocks (bar >= 0.90: {bar}); TIES at equal density (1, nothing trimmed) {t:.4f} "
                   f"(beaten on every draw: {'yes' if min(gains) > t else 'NO'})")  # fmt: skip
    return out


def _tall_checks(row: str, rows: dict[str, Any]) -> list[str]:
    """Issue 22's TALL bar: each rebuilt expert keeps >= 99% of its expert's domain log-perplexity gain."""
    r = rows.get(f"{row}/carve/s0", {})
    if "metrics" not in r or not r.get("tall"):
        return []
    kept = {d: _per_domain(r)[d].get("tall_retained_gain") for d in DOMAINS}
    if any(v is None for v in kept.values()):
        return []
    size = f"{r['size']['file_mb']:.0f} MB merged + {r['tall']['masks_mb']:.0f} MB of masks"
    ok = min(kept.values()) >= 0.99
    return [f"- {row}: the rebuilt experts keep {', '.join(f'{d} {v:.4f}' for d, v in kept.items())} of their "
            f"gain (bar >= 0.99 each: {'met' if ok else 'NOT met'}), at λ_t "
            f"{' / '.join(str(r['tall']['per_task'][d]['lambda']) for d in _tall_keys(r))}; {size}"]  # fmt: skip


def _tall_keys(r: dict[str, Any]) -> list[str]:
    per = r["tall"]["per_task"]
    return [next(k for k in per if k == d or f"-{d}-" in k) for d in DOMAINS]


def _checks(row: str, rows: dict[str, Any], seeds: int) -> list[str]:
    if row.startswith("dare"):
        return _dare_checks(row, rows, seeds)
    if row.startswith("tall"):
        return _tall_checks(row, rows)
    ours, theirs = rows.get(f"{row}/carve/s0"), rows.get(f"{row}/mergekit/s0")
    out = []
    if ours and theirs and "error" not in ours and "error" not in theirs:
        t, m = ours["merge_only"], theirs["merge_only"]
        ratio = t["wall_s"] / m["wall_s"]
        rss = f"{t['peak_rss_mb']} vs {m['peak_rss_mb']} MB"
        if not row.startswith("dare"):
            out.append(f"- {row}: max |carve − mergekit| = {theirs['max_abs_diff']:.2e} (bar <= 1e-5: "
                       f"{'met' if theirs['max_abs_diff'] <= 1e-5 else 'NOT met'})")  # fmt: skip
        out.append(f"- {row}: carve's merge took {ratio:.2f}x mergekit's wall time (bar <= 0.5x: "
                   f"{'met' if ratio <= 0.5 else 'NOT met'}), peak RSS {rss}")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    ap.add_argument("--seeds", type=int, default=3, help="DARE rows: seeds per tool")
    ap.add_argument("--data-seeds", type=int, default=3, help="RegMean rows: draws of the Gram blocks")
    ap.add_argument("--rerun", nargs="*", default=[])
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--prepare", action="store_true", help="only make the experts and importance maps")
    args = ap.parse_args()
    ensure_model()
    if args.prepare:
        for d in DOMAINS:
            print(expert(d), importance_map(d), flush=True)
        ensure_mergekit()
        return
    rows = {k: v for k, v in load_results(RESULTS).items() if k not in args.rerun}
    if not args.table_only:
        for row in args.rows:
            for seed in range(seeds_of(row, args.seeds, args.data_seeds)):
                for tool, fn in (("carve", run_carve), ("mergekit", run_mergekit)):
                    rid = f"{row}/{tool}/s{seed}"
                    if (tool == "mergekit" and row not in SHARED) or (rid in rows and "error" not in rows[rid]):
                        continue
                    print(f"running {rid} ...", flush=True)
                    try:
                        result = {"id": rid, **fn(row, seed), "commit": commit()}
                    except (RuntimeError, subprocess.CalledProcessError, ValueError) as exc:
                        result = {"id": rid, "error": str(exc)[:300]}
                    rows[rid] = result
                    save_result(RESULTS, result)
                    write_section("merge", write_table(rows, args.seeds, args.data_seeds))
    text = write_table(rows, args.seeds, args.data_seeds)
    print(text)
    write_section("merge", text)


if __name__ == "__main__":
    main()
