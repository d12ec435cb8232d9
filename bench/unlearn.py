"""Benchmark `carve unlearn` on the builtin scenario (`carve unlearn-scenario`, its defaults).

    .venv/bin/python bench/unlearn.py [--objectives ga graddiff npo] [--masks none random salun wagle fisher]
        [--seeds 3] [--rerun ROW_ID ...] [--table-only] [--extra "--lr 1e-4"]

The scenario: 30 King James chapters of the builtin `scripture` corpus drawn with seed 0; 3 to
forget, 3 held out, 24 to retain; the embedded default fine-tuned (every parameter, 4 epochs of
256-token blocks, lr 1e-4) on forget + retain (the target) and on retain alone (the retain model).
Rows: the target and the retain model (the measures of every run's manifest: `before` and
`reference`), then each objective with each mask, `carve unlearn` at its defaults (30 steps of 2
rows, lr 2e-5, density 0.5, 256-token blocks) with `--seed` 0, 1, 2 (data order; the random
mask), each one process.  Columns, mean ± sd over seeds: forget perplexity, verbatim ROUGE-L
(32 forget prompts of 32 tokens, greedy 32-token continuations), min-k% MIA AUC (forget against
holdout 128-token passages) and PrivLeak against the retain model, retain perplexity (the first 16
retain blocks) and cloze accuracy, general perplexity, the run's wall time and peak RSS.  Every run
also measures forget / retain / general perplexity and PrivLeak every 5 steps (`--eval-every 5`):
the second table reads utility at equal forgetting off these curves (where PrivLeak comes down to
+0.05, the edge of the bar's band, and to the retain model's 0), and the plot draws them.  Each
run's weights are deleted once measured (its carve.json stays).  Rows run with `--extra "... --eval-every 1
--stop-privleak 0.05"` stop where PrivLeak first comes down to +0.05: their after-measures (the first
table) are each mask's utility at equal forgetting, measured whole rather than read off a curve.
Results accumulate in bench/results/unlearn.jsonl (with each run's data fingerprints); the table
goes to the `unlearn` section of bench/RESULTS.md and a plot per setting to bench/unlearn.png
(default settings) and bench/unlearn-<setting>.png (rows run with --extra: unlearn-lr-9e-5.png).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, MODEL_DIR, OUT, ROOT, commit, ensure_model, load_results, save_result, write_section

RESULTS = HERE / "results" / "unlearn.jsonl"


def plot_path(tag: str) -> Path:
    """bench/unlearn.png for the default settings' runs, bench/unlearn-<tag>.png for others'."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", tag).strip("-")
    return HERE / (f"unlearn-{slug}.png" if slug else "unlearn.png")


CARVE = str(ROOT / ".venv" / "bin" / "carve")
SCENARIO = OUT / "unlearn-scenario"
OBJECTIVES = ["ga", "graddiff", "npo"]
MASKS = ["none", "random", "salun", "wagle", "fisher"]
EVAL_EVERY = 5  # steps between the measures along training (`carve unlearn --eval-every`)
COLUMNS = [("forget_ppl", "forget ppl", ".2f"), ("verbatim_rougeL", "verbatim ROUGE-L", ".3f"),
           ("mia_auc", "MIA AUC", ".3f"), ("privleak", "PrivLeak", "+.3f"), ("retain_ppl", "retain ppl", ".3f"),
           ("retain_cloze", "retain cloze", ".3f"), ("general_ppl", "general ppl", ".3f")]  # fmt: skip


def scenario() -> dict[str, Any]:
    t = time.perf_counter()
    cmd = [CARVE, "unlearn-scenario", "--model", str(MODEL_DIR), "--out", str(SCENARIO), "--quiet", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(out[out.index("{") :])
    result["wall_s"] = round(time.perf_counter() - t, 1)
    return dict(result)


def run(objective: str, mask: str, seed: int, extra: list[str]) -> dict[str, Any]:
    out = OUT / f"unlearn-{objective}-{mask}-s{seed}{tag_of(extra).replace('=', '').replace(',', '-')}"
    parts = {k: str(SCENARIO / f"{k}.jsonl") for k in ("forget", "retain", "holdout")}
    cmd = [CARVE, "unlearn", str(SCENARIO / "target"), "--forget", parts["forget"], "--retain", parts["retain"],
           "--holdout", parts["holdout"], "--reference", str(SCENARIO / "retain-model"), "--objective", objective,
           "--mask", mask, "--seed", str(seed), "--eval-every", str(EVAL_EVERY), *extra, "--out", str(out),
           "--overwrite", "--quiet"]  # fmt: skip
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    manifest = json.loads((out / "carve.json").read_text())
    for f in out.iterdir():  # measured: keep the manifest, not 0.5 GB of weights per run (45 runs)
        if f.name != "carve.json":
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    return {
        "metrics": manifest["metrics"],
        "mask": manifest["mask"],
        "training": {k: v for k, v in manifest["training"].items() if k != "losses"},
        "data": manifest["data"]["blocks"],
        "source": manifest["source"],
        "wall_s": round(wall, 1),
        "peak_rss_mb": manifest["peak_rss_mb"],
        "timings_s": manifest["timings_s"],
        "extra": extra,
    }


def _value(m: dict[str, Any], key: str) -> float | None:
    v = m.get(key)
    if isinstance(v, dict):  # the cloze task: its accuracy
        v = v.get("accuracy")
    return None if v is None else float(v)


def _cell(xs: list[float], spec: str) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return format(xs[0], spec)
    return f"{format(statistics.mean(xs), spec)} ± {statistics.stdev(xs):.3f}"


def tag_of(extra: list[str]) -> str:
    """The row-id suffix of runs with extra flags (e.g. `--lr 1e-4` -> `@lr=1e-4`)."""
    pairs = [f"{a.lstrip('-')}={b}" for a, b in zip(extra[::2], extra[1::2], strict=False)]
    return "@" + ",".join(pairs) if pairs else ""


def write_table(rows: dict[str, dict[str, Any]], objectives: list[str], masks: list[str], seeds: int) -> str:
    runs = [r for r in rows.values() if "metrics" in r]
    lines = ["## Unlearning (`carve unlearn`) on the builtin scenario, embedded default", "",
             "| row | seeds | " + " | ".join(label for _, label, _ in COLUMNS) + " | wall s | peak RSS MB |",
             "|---|---|" + "---|" * (len(COLUMNS) + 2)]  # fmt: skip
    if runs:
        m = runs[0]["metrics"]
        for name, ms in (("target (before unlearning)", m["before"]), ("retain model (the goal)", m["reference"])):
            cells = [_cell([x] if (x := _value(ms, k)) is not None else [], spec) for k, _, spec in COLUMNS]
            lines.append(f"| {name} | - | " + " | ".join(cells) + " | - | - |")
    tags = sorted({r.get("tag", "") for r in runs})
    for tag in tags:
        for objective in objectives:
            for mask in masks:
                ids = [f"{objective}/{mask}/s{s}{tag}" for s in range(seeds)]
                done = [rows[i] for i in ids if "metrics" in rows.get(i, {})]
                if done:
                    lines.append(_row(f"{objective} + {mask}{(' ' + tag) if tag else ''}", done))
    failed = [f"- {k}: {r['error']}" for k, r in rows.items() if "error" in r]
    return "\n".join(lines + (["", *failed] if failed else []))


def _row(name: str, done: list[dict[str, Any]]) -> str:
    cells = []
    for k, _, spec in COLUMNS:
        xs = [x for r in done if (x := _value(r["metrics"]["after"], k)) is not None]
        cells.append(_cell(xs, spec))
    wall = _cell([r["wall_s"] for r in done], ".0f")
    rss = _cell([r["peak_rss_mb"] for r in done], ".0f")
    return f"| {name} | {len(done)} | " + " | ".join(cells) + f" | {wall} | {rss} |"


def _curve(r: dict[str, Any]) -> list[dict[str, Any]]:
    """A run's measures along training, from the target's (step 0) to its own after-measures."""
    m = r["metrics"]
    return [{"step": 0, **m["before"]}, *(m.get("trajectory") or [])]


def crossing(points: list[dict[str, Any]], level: float = 0.0) -> dict[str, float] | None:
    """Where a run's PrivLeak first comes down to `level` (the retain model's is 0), between the two
    measures around it: at the share t of the way that PrivLeak falls to `level`, the step linearly
    and each perplexity geometrically (linear in log-perplexity: perplexities move by factors);
    None if it never does."""
    for a, b in itertools.pairwise(points):
        if a["privleak"] > level >= b["privleak"]:
            t = (a["privleak"] - level) / (a["privleak"] - b["privleak"])
            out = {"step": a["step"] + t * (b["step"] - a["step"])}
            for k in ("forget_ppl", "retain_ppl", "general_ppl"):
                out[k] = math.exp(math.log(a[k]) + t * (math.log(b[k]) - math.log(a[k])))
            return out
    return None


LEVELS = (0.05, 0.0)  # PrivLeak levels read off the curves: the edge of the bar's band (±0.05) and the retain model's


def equal_forgetting_table(rows: dict[str, dict[str, Any]], objectives: list[str], masks: list[str]) -> str:
    """Utility at equal forgetting: each run's retain and general perplexity where its PrivLeak first
    comes down to each of LEVELS (+0.05: it enters the bar's band around the retain model's 0; 0: the
    retain model's), read off its curve (`--eval-every`), mean ± sd over the seeds that reach it."""
    runs = {k: r for k, r in rows.items() if "metrics" in r and r["metrics"].get("trajectory")}
    if not runs:
        return ""
    target = next(iter(runs.values()))["metrics"]["before"]
    lines = ["### Utility at equal forgetting: where PrivLeak comes down to +0.05 and to 0 (the retain model's)", "",
             f"Each run measured every {EVAL_EVERY} steps (`--eval-every {EVAL_EVERY}`; a row tagged "
             "`eval-every=N`, every N); between the two "
             "measures around the crossing, the step interpolated linearly and each perplexity geometrically "
             "(linear in its log). +0.05 is where a run enters the bar's band (PrivLeak within ±0.05 of the "
             "retain model's); a run that settles inside the band above 0 never reaches 0. Target: retain ppl "
             f"{target['retain_ppl']:.3f}, general ppl {target['general_ppl']:.3f} (the bar: within 5%, "
             f"{1.05 * target['retain_ppl']:.3f} / {1.05 * target['general_ppl']:.3f}).", "",
             "| row | PrivLeak level | seeds that reach it | step | forget ppl | retain ppl | general ppl |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for tag in sorted({r.get("tag", "") for r in runs.values()}):
        for objective in objectives:
            for mask in masks:
                done = [r for k, r in runs.items() if k.startswith(f"{objective}/{mask}/s") and r.get("tag", "") == tag]
                if not done:
                    continue
                for level in LEVELS:
                    hits = [c for r in done if (c := crossing(_curve(r), level)) is not None]
                    specs = (("step", ".1f"), ("forget_ppl", ".2f"), ("retain_ppl", ".3f"), ("general_ppl", ".3f"))
                    cells = [_cell([c[k] for c in hits], spec) for k, spec in specs]
                    name = f"{objective} + {mask}{(' ' + tag) if tag else ''}"
                    lines.append(f"| {name} | {level:+.2f} | {len(hits)} of {len(done)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, Any]], tag: str = "") -> None:
    """Left: each run's curve along training (PrivLeak against retain perplexity, from the target);
    right: each run's end point (verbatim ROUGE-L against retain perplexity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(k, r) for k, r in rows.items() if "metrics" in r]
    if not runs:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    marks = {"none": "o", "random": "x", "salun": "s", "wagle": "^", "fisher": "D"}
    colours = {"none": "tab:grey", "random": "tab:orange", "salun": "tab:blue", "wagle": "tab:green",
               "fisher": "tab:purple"}  # fmt: skip
    styles = {"ga": ":", "graddiff": "--", "npo": "-"}
    for key, r in runs:
        objective, mask = key.split("/")[:2]
        curve = _curve(r)
        if len(curve) > 1:
            left.plot([p["privleak"] for p in curve], [p["retain_ppl"] for p in curve], styles.get(objective, "-"),
                      color=colours.get(mask), marker=marks.get(mask), markersize=3, linewidth=1)  # fmt: skip
        a = r["metrics"]["after"]
        right.scatter(a["verbatim_rougeL"], a["retain_ppl"], marker=marks.get(mask, "."), color=colours.get(mask))
    ref, before = runs[0][1]["metrics"]["reference"], runs[0][1]["metrics"]["before"]
    for ax, x in ((left, "privleak"), (right, "verbatim_rougeL")):
        ax.scatter(ref[x], ref["retain_ppl"], marker="*", s=200, color="black", label="retain model", zorder=5)
        ax.scatter(before[x], before["retain_ppl"], marker="P", s=120, color="grey", label="target", zorder=5)
        ax.set_ylabel("retain perplexity (lower: more utility kept)")
        ax.set_yscale("log")
    for name, c in colours.items():
        right.scatter([], [], color=c, marker=marks[name], label=f"mask {name}")
    for name, ls in styles.items():
        left.plot([], [], ls, color="k", label=name)
    left.axvline(0, color="black", linewidth=0.5)
    left.set_xlabel(f"PrivLeak (0: the retain model's), measured every {EVAL_EVERY} steps")
    right.set_xlabel("verbatim ROUGE-L on the forget set after the run (lower: more forgotten)")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    left.set_title("along training (colour: mask, line: objective)")
    right.set_title("after the run")
    fig.suptitle(f"carve unlearn on the builtin scenario{(' ' + tag) if tag else ''}: utility against forgetting")
    fig.tight_layout()
    fig.savefig(plot_path(tag), dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--objectives", nargs="+", default=OBJECTIVES, choices=OBJECTIVES)
    ap.add_argument("--masks", nargs="+", default=MASKS, choices=MASKS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rerun", nargs="*", default=[])
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--extra", default="", help='flags for every carve unlearn run, one string: --extra "--lr 1e-4"')
    args = ap.parse_args()
    args.extra = shlex.split(args.extra)
    rows = {k: v for k, v in load_results(RESULTS).items() if k not in args.rerun}
    if not args.table_only:
        ensure_model()
        if "scenario" not in rows:
            print("building the scenario ...", flush=True)
            rows["scenario"] = {"id": "scenario", **scenario(), "commit": commit()}
            save_result(RESULTS, rows["scenario"])
        elif not (SCENARIO / "target" / "carve.json").is_file():  # a fresh machine: rebuilt, and checked
            print("rebuilding the scenario (its models are not on this machine) ...", flush=True)
            again = {"id": f"scenario-rebuilt-{len([k for k in rows if k.startswith('scenario')])}",
                     **scenario(), "commit": commit()}  # fmt: skip
            again["same_as_recorded"] = again["measures"] == rows["scenario"]["measures"]
            save_result(RESULTS, again)
            print(f"rebuilt scenario measures equal to the recorded ones: {again['same_as_recorded']}", flush=True)
        for seed in range(args.seeds):
            for objective in args.objectives:
                for mask in args.masks:
                    rid = f"{objective}/{mask}/s{seed}{tag_of(args.extra)}"
                    if rid in rows and "error" not in rows[rid]:
                        continue
                    print(f"running {rid} ...", flush=True)
                    try:
                        result = {
                            "id": rid,
                            "tag": tag_of(args.extra),
                            **run(objective, mask, seed, args.extra),
                            "commit": commit(),
                        }
                    except subprocess.CalledProcessError as exc:
                        result = {"id": rid, "error": ((exc.stderr or "").strip().splitlines() or ["failed"])[-1][:300]}
                    rows[rid] = result
                    save_result(RESULTS, result)
                    write_section("unlearn", write_table(rows, OBJECTIVES, MASKS, args.seeds))
    # the tables hold every objective and mask measured: --objectives / --masks choose what runs
    runs = {k: v for k, v in rows.items() if not k.startswith("scenario")}
    text = write_table(runs, OBJECTIVES, MASKS, args.seeds)
    equal = equal_forgetting_table(runs, OBJECTIVES, MASKS)
    print(text + "\n\n" + equal)
    write_section("unlearn", text)
    if equal:
        write_section("unlearn-equal", equal)
    for tag in sorted({v.get("tag", "") for v in runs.values()}):  # a plot per setting (its runs only)
        plot({k: v for k, v in runs.items() if v.get("tag", "") == tag}, tag)


if __name__ == "__main__":
    main()
