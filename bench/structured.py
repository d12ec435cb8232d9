"""Benchmark structured extraction and recovery on the embedded default.

    .venv/bin/python bench/structured.py [--domains legal code] [--keeps 0.75 0.5] [--drops 15]
        [--rules distance greedy] [--steps 200 ...] [--only ID]

For each domain: `carve extract --structure --keep K` (K = 0.75 and 0.5: 25% and 50% of the
decoder-block parameters removed; the split between MLP width, heads and blocks chosen by carve;
Wanda scores, 0.3 general calibration mix, 64 x 512-token calibration blocks; blocks dropped by
each `--drop-rule` in `--rules`, the default distance rule first), then `carve recover`
(distillation from the dense model, full fine-tune, `--steps` steps of one 512-token block, half
of them general). Each job runs in its own process with its manifest; prefill / decode tokens/s of
the extracted and of the recovered model are measured against the dense model in the same process
(batch 1, best of 3, 2 threads). Evaluation as in bench/dual.py (first 16 held-out 512-token blocks
per corpus, 100 cloze items) so the unstructured SparseGPT rows of that table compare directly.

Results accumulate in bench/results/structured.jsonl (finished jobs are not rerun); the table goes
to the `structured` section of bench/RESULTS.md.
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
    HERE,
    MODEL_DIR,
    OUT,
    carve_worker,
    commit,
    ensure_model,
    load_results,
    peak_rss_mb,
    save_result,
    write_section,
)

RESULTS = HERE / "results" / "structured.jsonl"
DUAL_RESULTS = HERE / "results" / "dual.jsonl"
EVAL_BLOCKS, CLOZE_ITEMS = 16, 100
STEPS = 200  # the standard recovery length; others (--steps) are listed beside it
# recovery corpora other than the domain's builtin one (`--corpus`): built on first use, evaluated
# on the builtin domain's held-out split all the same
CORPORA = {"stdlib": (OUT / "stdlib-sub", "the 4.3 MB stdlib-subpackage Python corpus of bench/stdlib_corpus.py")}
RULES = ["distance", "greedy"]  # the table lists both drop rules' rows


def _out(spec: dict[str, Any]) -> Path:
    if spec["job"] == "recover" and spec.get("after"):  # a recovery continued from another
        parent = _out(_parent(spec))
        return parent.with_name(f"{parent.name}-then{spec['steps']}" + _corpus_suffix(spec))
    name = f"structured-{spec['domain']}-{spec['keep']}" + (f"-{spec['drop']}drop" if spec.get("drop") else "")
    name += "-greedy" if spec.get("rule") == "greedy" else ""
    if spec["job"] == "recover":
        name += "-rec" + (f"-lr{spec['lr']:g}" if spec.get("lr") else "")
        name += f"-mix{spec['mix']:g}" if spec.get("mix") is not None else ""
        name += _corpus_suffix(spec)
    return OUT / name


def _corpus_suffix(spec: dict[str, Any]) -> str:
    return f"-{spec['corpus']}" if spec.get("corpus") else ""


def _parent(spec: dict[str, Any]) -> dict[str, Any]:
    """The recovery a continued one starts from: `after` steps, same lr and general share, builtin data."""
    return {**{k: v for k, v in spec.items() if k not in ("after", "corpus", "id")}, "steps": spec["after"]}


# --------------------------------------------------------------------------- worker side
def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import shutil

    import carve
    from carve.progress import set_quiet

    set_quiet(True)
    if spec["job"] == "speed":
        return speed_worker(spec)
    out = _out(spec)
    shutil.rmtree(out, ignore_errors=True)
    if spec["job"] == "extract":
        recipe = carve.Recipe(
            model=str(MODEL_DIR),
            domain=spec["domain"],
            structure=True,
            keep=spec["keep"] if not spec.get("drop") else None,
            drop_blocks=spec.get("drop"),
            drop_rule=spec.get("rule"),
            eval_blocks=EVAL_BLOCKS,
            cloze_items=CLOZE_ITEMS,
        )
        m = carve.extract(recipe, out)
    else:
        from carve.recover import RecoverRecipe, recover

        source = _out(_parent(spec) if spec.get("after") else {**spec, "job": "extract"})
        corpus = str(CORPORA[spec["corpus"]][0]) if spec.get("corpus") else None
        m = recover(
            RecoverRecipe(
                model=str(source),
                teacher=str(MODEL_DIR),  # not the path in its manifest: the extraction may have run elsewhere
                domain=corpus or spec["domain"],
                eval_domain=spec["domain"] if corpus else None,  # measured as every other row
                steps=spec["steps"],
                lr=spec.get("lr"),  # None: carve recover's default (1e-4 for a full fine-tune)
                **({"mix": spec["mix"]} if spec.get("mix") is not None else {}),  # else recover's 0.5
                eval_blocks=EVAL_BLOCKS,
                cloze_items=CLOZE_ITEMS,
            ),
            out,
        )
        # the recovered model has the extracted one's shape; its speed measured against dense again
        m["speed"] = side_by_side(out, spec["domain"])
    m["peak_rss_worker_mb"] = peak_rss_mb()
    return m


def speed_worker(spec: dict[str, Any]) -> dict[str, Any]:
    return {"speed": side_by_side(_out({**spec, "job": "extract"}), spec["domain"])}


def side_by_side(model_dir: Path, domain: str, rounds: int = 3) -> dict[str, Any]:
    """Dense and `model_dir` loaded side by side, measured alternately (dense, other, dense,
    other, ...): the best of each, so a disturbance hits both alike."""
    import carve
    from carve.evaluation.speed import measure_speed, speedup

    dense, other = carve.load_model(str(MODEL_DIR)), carve.load_model(str(model_dir))
    prompt = carve.Corpus(domain).eval_blocks(dense.tokenizer, 1, 512)[0]
    runs: dict[str, list[dict[str, Any]]] = {"dense": [], "other": []}
    for _ in range(rounds):
        runs["dense"].append(measure_speed(dense.model, prompt))
        runs["other"].append(measure_speed(other.model, prompt))

    def best(rs: list[dict[str, Any]]) -> dict[str, Any]:
        keys = ("prefill_tokens_per_s", "decode_tokens_per_s")
        return {**rs[0], **{k: max(r[k] for r in rs) for k in keys}, "rounds": len(rs)}

    return speedup(best(runs["dense"]), best(runs["other"]))


# --------------------------------------------------------------------------- driver side
Variant = tuple[float, int | None, str]  # keep, dropped blocks (None: carve's split), drop rule


def _variants(keeps: list[float], drops: list[int], rules: list[str]) -> list[Variant]:
    """(keep, dropped blocks, drop rule): carve's own split for each keep, then depth-only
    variants at 0.5 (whole blocks dropped, widths untouched; 15 of 30 blocks is exactly half the
    decoder); the distance rule's variants first, then the greedy rule's at 0.5."""
    out: list[Variant] = []
    for rule in rules:
        splits = keeps if rule == "distance" else [k for k in keeps if k == 0.5]
        out += [(k, None, rule) for k in splits] + [(0.5, n, rule) for n in drops]
    return out


def _key(d: str, k: float, drop: int | None, rule: str = "distance") -> str:
    return f"{d}/{k}" + (f"/{drop}drop" if drop else "") + ("/greedy" if rule == "greedy" else "")


def _rec_id(
    n: int, lr: float | None, mix: float | None = None, after: int | None = None, corpus: str | None = None
) -> str:
    """`recover/N[/lrX][/mixY]`; a recovery continued from the A-step one: `recover/A+N...[/CORPUS]`."""
    steps = f"{after}+{n}" if after else f"{n}"
    return (
        f"recover/{steps}"
        + (f"/lr{lr:g}" if lr else "")
        + (f"/mix{mix:g}" if mix is not None else "")
        + (f"/{corpus}" if corpus else "")
    )


def configurations(
    domains: list[str],
    keeps: list[float],
    steps: list[int],
    drops: list[int],
    rules: list[str],
    lrs: list[float | None],
    mixes: list[float | None],
    after: int | None = None,
    corpus: str | None = None,
) -> list[dict[str, Any]]:
    """Every job to run; with `after`, the recoveries continue from the `after`-step recovery of
    the same lr and general share (on `corpus` when given)."""
    out = []
    for d in domains:
        for k, drop, rule in _variants(keeps, drops, rules):
            base = _key(d, k, drop, rule)
            jobs: list[tuple[str, int | None, float | None, float | None]] = [
                ("extract", None, None, None),
                ("speed", None, None, None),
            ]
            jobs += [("recover", n, lr, mix) for n in steps for lr in lrs for mix in mixes]
            for job, n, lr, mix in jobs:
                c: dict[str, Any] = {"domain": d, "keep": k, "job": job}
                if drop:
                    c["drop"] = drop
                if rule != "distance":
                    c["rule"] = rule
                if n is not None:
                    c["steps"] = n
                if lr:
                    c["lr"] = lr
                if mix is not None:
                    c["mix"] = mix
                if n is not None and after:
                    c["after"] = after
                if n is not None and corpus:
                    c["corpus"] = corpus
                c["id"] = f"{base}/" + (_rec_id(n, lr, mix, c.get("after"), c.get("corpus")) if n is not None else job)
                out.append(c)
    return out


def _recoveries(rows: dict[str, dict[str, Any]], key: str, steps: int) -> list[dict[str, Any]]:
    """The recovery rows of `key` in the cache, shortest first, each continued one after the one
    it continues; the standard (`steps`, recover's defaults) listed when none ran, so a missing
    one shows as not run."""
    found = [r for i, r in rows.items() if i.startswith(f"{key}/recover/")]
    if not found:
        return [{"id": f"{key}/{_rec_id(steps, None)}", "steps": steps}]

    def order(r: dict[str, Any]) -> tuple[Any, ...]:
        first = r.get("after") or r["steps"]
        return (
            first,
            r.get("lr") or 0,
            r.get("mix") is not None,
            r.get("mix") or 0,
            r["steps"] if r.get("after") else 0,
        )

    return sorted(found, key=order)


def _rec_label(r: dict[str, Any]) -> str:
    n, note = r["steps"], _rec_note(r.get("lr"), r.get("mix"))
    where = f" on {CORPORA[r['corpus']][1]}" if r.get("corpus") else ""
    if not r.get("after"):
        return f"recovered ({n} steps, {n * 512:,} tokens{where}{note})"
    return f"recovered ({r['after']} steps{note}), then {n} more steps ({n * 512:,} tokens{where})"


def _sparsegpt_reference(domain: str) -> dict[str, Any] | None:
    """The 50% unstructured SparseGPT row (0.3 mix, the extract default) of bench/dual.py."""
    rows = load_results(DUAL_RESULTS)
    return rows.get(f"{domain}/50%/sparsegpt/0.3/None/None")


def write_table(
    rows: dict[str, dict[str, Any]],
    domains: list[str],
    keeps: list[float],
    steps: int,
    drops: list[int],
    rules: list[str],
) -> str:
    dense_mb = (MODEL_DIR / "model.safetensors").stat().st_size / 2**20 if MODEL_DIR.exists() else float("nan")
    lines = [
        "# Structured extraction and recovery",
        "",
        "Written by `bench/structured.py` (finished jobs cached in `bench/results/structured.jsonl`). Model: "
        "SmolLM2-135M-Instruct (embedded default, float32, 30 blocks). `keep`: share of decoder-block parameters "
        "kept; carve chose the split (kv groups of 3, MLP channels of 1536, blocks of 30) by the calibration loss "
        "of each candidate (a `drop N` row: only N whole blocks dropped); blocks chosen by angular distance "
        "(carve's default) or, in `greedy rule` rows, by `--drop-rule greedy`; Wanda scores, "
        "0.3 general mix, 64 x 512 calibration blocks. Recovery: full-model "
        "distillation (KL on logits, T = 1) from the dense model, one 512-token block per step, half general, "
        "AdamW lr 1e-4 (carve recover's defaults; another lr or general share where a row says so) with warm-up "
        "and cosine decay. "
        "Perplexity: first 16 held-out 512-token blocks; cloze: 100 "
        "held-out items (95% Wilson interval). Speed: batch 1 on 2 CPU threads, best of 3 after a warm-up "
        "(prefill: 512 tokens; decode: 128 greedy tokens); for an extracted model from a separate process holding "
        "it and the dense model, measured alternately (three rounds; two for the first 0.5 rows; the extract's "
        "own before/after figures are minutes "
        "apart); for a recovered model, in its job's process after training, alternately with the dense model "
        "(three rounds), except where marked `*`: one dense run then one recovered run (a single round, noisier: "
        "the same shape measured side by side differed by up to 0.27x). Time and RSS: whole job (its manifest's "
        "stages; RSS of its process). A `then N more steps` row continues the recovery named before it (that "
        "row's model, `bench/structured.py --after`), on another corpus where it says so (`--corpus`), still "
        "measured on the builtin domain's held-out blocks; its time is its own stage's.",
        "",
    ]
    for d in domains:
        lines += [
            f"## {d}",
            "",
            "| model | shape (kv groups / MLP / blocks) | parameters | file MB | domain ppl | general ppl "
            "| domain cloze [95% CI] | prefill tok/s (x dense) | decode tok/s (x dense) | time s | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        dense_row = None
        for k in keeps:
            ex = rows.get(f"{d}/{k}/extract")
            if ex and "error" not in ex and dense_row is None:
                b, sp = ex["metrics"]["before"], _extract_speed(rows, f"{d}/{k}")["dense"]
                dense_row = b
                lines.append(
                    f"| dense | 3 / 1536 / 30 | {ex['size']['parameters_before']:,} | {dense_mb:.0f} "
                    f"| {b['domain_ppl']:.3f} | {b['general_ppl']:.3f} | {_cloze(b)} "
                    f"| {sp['prefill_tokens_per_s']:.0f} | {sp['decode_tokens_per_s']:.1f} | | |"
                )
        for k, drop, rule in _variants(keeps, drops, rules):
            base = _key(d, k, drop, rule)
            jobs = [("extract", {"id": f"{base}/extract"})] + [("recover", s) for s in _recoveries(rows, base, steps)]
            for job, spec in jobs:
                r = rows.get(spec["id"])
                name = (
                    f"keep {k:g}"
                    + (f", drop {drop} blocks only" if drop else "")
                    + (", greedy rule" if rule == "greedy" else "")
                    + (f", {_rec_label(spec)}" if job == "recover" else "")
                )
                if r is None or "error" in r:
                    lines.append(f"| {name} | | | | | | | | | | {'not run yet' if r is None else r['error']} |")
                    continue
                ex = rows.get(base + "/extract")
                shape = ex["structure"]["config"] if ex and "structure" in ex else {}
                after, sp = r["metrics"]["after"], r["speed"]
                if job == "extract":
                    sp = _extract_speed(rows, base)
                mark = "*" if job == "recover" and "rounds" not in sp["dense"] else ""
                params = r["size"].get("parameters_after", r["size"].get("parameters"))
                total = sum(r["timings_s"].values())
                lines.append(
                    f"| {name} | {shape.get('num_key_value_heads')} / {shape.get('intermediate_size')} / "
                    f"{shape.get('num_hidden_layers')} | {params:,} | {r['size']['file_mb']:.0f} "
                    f"| {after['domain_ppl']:.3f} | {after['general_ppl']:.3f} | {_cloze(after)} "
                    f"| {sp['extracted']['prefill_tokens_per_s']:.0f} ({sp['prefill_speedup']:.2f}x){mark} "
                    f"| {sp['extracted']['decode_tokens_per_s']:.1f} ({sp['decode_speedup']:.2f}x){mark} "
                    f"| {total:.0f} | {r['peak_rss_mb']:.0f} |"
                )
        ref = _sparsegpt_reference(d)
        if ref:
            lines.append(
                f"| SparseGPT 50% unstructured, mix 0.3 (bench/dual.py) | dense shape, zeros stored | "
                f"| {dense_mb:.0f} | {ref['domain_ppl']:.3f} | {ref['general_ppl']:.3f} "
                f"| {ref['cloze']:.2f} | not measured (dense shape) | not measured "
                f"| {ref.get('seconds', 0):.0f} (prune) | {ref['peak_rss_mb']:.0f} |"
            )
        lines.append("")
        for _, drop, rule in [v for v in _variants(keeps, drops, rules) if v[0] == 0.5]:
            lines += _verdicts(rows, d, drop, rule, steps, dense_row, ref, dense_mb)
        lines.append("")
    return "\n".join(lines)


def _rec_note(lr: float | None, mix: float | None) -> str:
    return (f", lr {lr:g}" if lr else "") + (f", {mix:g} general" if mix is not None else "")


def _extract_speed(rows: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    """The extracted model's speed: from the side-by-side job when it ran, else the extract's own."""
    side = rows.get(f"{key}/speed")
    return side["speed"] if side and "error" not in side else rows[f"{key}/extract"]["speed"]


def _cloze(m: dict[str, Any]) -> str:
    c = m.get("domain_cloze")
    if not c:
        return "-"
    return f"{c['accuracy']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]"


def _verdicts(
    rows: dict[str, dict[str, Any]],
    d: str,
    drop: int | None,
    rule: str,
    steps: int,
    dense: dict[str, Any] | None,
    ref: dict[str, Any] | None,
    dense_mb: float,
) -> list[str]:
    key = _key(d, 0.5, drop, rule)
    ex = rows.get(f"{key}/extract")
    out = []
    what = f"50% removed ({f'{drop} blocks dropped' if drop else 'carve split'}, {rule} rule)"
    if ex and "error" not in ex:
        s = _extract_speed(rows, key)["decode_speedup"]
        out.append(f"- {what}, decode speed-up {s:.2f}x dense (bar >= 1.6x: {'met' if s >= 1.6 else 'NOT met'})")
    for spec in _recoveries(rows, key, steps):
        rec = rows.get(spec["id"])
        if not rec or "error" in rec or not dense:
            continue
        n, lr, mix = rec["steps"], rec.get("lr"), rec.get("mix")
        total = n + (rec.get("after") or 0)
        what_n = what + (f", {total} steps" if total != steps else "") + _rec_note(lr, mix)
        if rec.get("corpus"):
            what_n += f" (the last {n} on {rec['corpus']})" if rec.get("after") else f" (on {rec['corpus']})"
        ratio = rec["metrics"]["after"]["domain_ppl"] / dense["domain_ppl"]
        out.append(
            f"- {what_n} and recovered: domain ppl {ratio:.2f}x dense (bar <= 1.5x: "
            f"{'met' if ratio <= 1.5 else 'NOT met'})"
        )
        if ref:
            below = rec["metrics"]["after"]["domain_ppl"] < ref["domain_ppl"]
            half = rec["size"]["file_mb"] <= dense_mb / 2
            out.append(
                f"- aim ({what_n}): recovered domain ppl {rec['metrics']['after']['domain_ppl']:.3f} vs SparseGPT 50% "
                f"{ref['domain_ppl']:.3f} ({'below' if below else 'NOT below'}), file {rec['size']['file_mb']:.0f} MB "
                f"vs {dense_mb:.0f} MB ({'at most half' if half else 'NOT half'})"
            )
    return out


def _has_model(spec: dict[str, Any]) -> bool:
    """The recovery's model directory exists and holds that many steps (runs of other lengths
    share the directory)."""
    manifest = _out(spec) / "carve.json"
    return manifest.exists() and json.loads(manifest.read_text())["training"]["steps"] == spec["steps"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker")
    p.add_argument("--domains", nargs="+", default=["legal", "code"])
    p.add_argument("--keeps", nargs="*", type=float, default=[0.75, 0.5])
    p.add_argument(
        "--steps", nargs="+", type=int, default=[STEPS], help=f"recovery lengths (the table's standard: {STEPS})"
    )
    p.add_argument("--drops", nargs="*", type=int, default=[15], help="depth-only variants at keep 0.5")
    p.add_argument("--rules", nargs="+", default=["distance"], help="drop rules (greedy: at keep 0.5 only)")
    p.add_argument("--lrs", nargs="+", type=float, default=[None], help="recovery learning rates (default: recover's)")
    p.add_argument(
        "--mixes", nargs="+", type=float, default=[None], help="recovery general shares (default: recover's 0.5)"
    )
    p.add_argument("--after", type=int, default=None, help="continue from the recovery of this many steps")
    p.add_argument(
        "--corpus", choices=sorted(CORPORA), default=None, help="recovery text other than the builtin domain"
    )
    p.add_argument("--only", default="")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = load_results(RESULTS)

    def publish() -> None:
        write_section("structured", write_table(rows, ["legal", "code"], [0.75, 0.5], STEPS, [15], RULES))

    if not args.table_only:
        ensure_model()
        todo = configurations(
            args.domains, args.keeps, args.steps, args.drops, args.rules, args.lrs, args.mixes, args.after, args.corpus
        )
        for cfg in todo:
            if cfg["id"] in rows or args.only not in cfg["id"]:
                continue
            base = _key(cfg["domain"], cfg["keep"], cfg.get("drop"), cfg.get("rule", "distance"))
            if cfg["job"] != "extract" and "error" in rows.get(f"{base}/extract", {"error": 1}):
                continue  # nothing to measure or recover
            if cfg["job"] != "extract" and not _out({**cfg, "job": "extract"}).exists():
                # its extraction is cached but its model directory is not (a fresh checkout):
                # rebuild it (deterministic: same seeded calibration blocks) and keep the cached row
                print(f"rebuilding the model of {base}/extract for {cfg['id']} ...", flush=True)
                carve_worker(__file__, {**cfg, "job": "extract", "id": f"{base}/extract"})
            if cfg.get("after") and not _has_model(_parent(cfg)):
                print(f"rebuilding the {cfg['after']}-step recovery {cfg['id']} continues ...", flush=True)
                carve_worker(__file__, _parent(cfg))  # its cached row, if any, is kept
            if cfg.get("corpus") and not CORPORA[cfg["corpus"]][0].exists():
                from stdlib_corpus import build

                build(CORPORA[cfg["corpus"]][0])
            print(f"running {cfg['id']} ...", flush=True)
            t = time.perf_counter()
            res = carve_worker(__file__, cfg)
            res.pop("data", None)
            if "training" in res:
                res["training"].pop("losses", None)
            row = {**cfg, **res, "wall_total_s": round(time.perf_counter() - t, 1), "commit": commit()}
            save_result(RESULTS, row)
            rows[cfg["id"]] = row
            print(json.dumps({k: row.get(k) for k in ("id", "metrics", "speed", "size", "timings_s")}), flush=True)
            publish()
    publish()
    print(write_table(rows, ["legal", "code"], [0.75, 0.5], STEPS, [15], RULES))


if __name__ == "__main__":
    main()
