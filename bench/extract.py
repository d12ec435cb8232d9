"""Benchmark `carve extract` on the embedded default against llm-compressor's oneshot.

    .venv/bin/python bench/extract.py [--domains legal code] [--only ID_SUBSTRING] [--rerun ID_SUBSTRING ...]
        [--eval-blocks 16] [--seeds 3]

On SmolLM2-135M-Instruct (the embedded default, dequantized once to bench/out/smollm2-f32),
domains legal and code, 64 calibration blocks x 512 tokens (seed 0): magnitude / Wanda /
SparseGPT at 50% unstructured and 2:4, each calibrated on the domain and on general text.  In
the same run, the same job through llm-compressor 0.14 (`oneshot` with its Wanda and SparseGPT
modifiers, in bench/.venv-llmc which this script creates: it pins an older transformers), and
SparseGPT 2:4 through a textbook reference (`sparsegpt-reference` below).  `--seeds K` runs the
SEEDED tools' SparseGPT 50% rows again on calibration seeds 1 .. K-1 (issue 25's timing bars: each
carve row beside one plain bfloat16 forward, llm-compressor bfloat16 on every seed).

Every configuration runs in its own process, so wall time and peak RSS are its own; every
model is evaluated by the same carve code on the same held-out blocks.  Results accumulate in
bench/results/extract.jsonl (a finished configuration is not rerun) and the table is rewritten
to bench/RESULTS.md after each one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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
    OUT,
    RESULTS_MD,
    ROOT,
    SEED,
    carve_worker,
    commit,
    ensure_model,
    ensure_venv,
    extract_row,
    load_results,
    peak_rss_mb,
    run_json,
    save_result,
    write_section,
)

RESULTS = HERE / "results" / "extract.jsonl"
LLMC_VENV = HERE / ".venv-llmc"
FAST = "carve --propagation dense"  # every block calibrated on the dense model: one pass per block
FUSED = "carve --propagation fused"  # one forward of all blocks, each Linear pruned as its input arrives
F32 = "carve --calib-dtype float32"  # calibration forwards in float32 (carve's default before --calib-dtype)
PROPAGATION = {FAST: "dense", FUSED: "fused"}
CALIB_DTYPE = {F32: "float32"}  # every other carve row: "auto", carve extract's default
BF16 = "carve --dtype bfloat16"  # weights loaded, pruned and kept in bfloat16, as llm-compressor bfloat16
WEIGHTS_DTYPE = {BF16: "bfloat16"}  # every other carve row: the float32 weights of MODEL_DIR
HCALIB = "carve --hessian-dtype calib"  # Hessian products in the calibration forwards' dtype (bfloat16)
BF16H = "carve --dtype bfloat16 --hessian-dtype calib"  # both: bfloat16 weights and bfloat16 Hessian products
WEIGHTS_DTYPE[BF16H] = "bfloat16"
HESSIAN_DTYPE = {HCALIB: "calib", BF16H: "calib"}  # every other carve row: float32 products
CARVE_TOOLS = ("carve", F32, FAST, FUSED, BF16, HCALIB, BF16H)
LLMC_BF16 = "llm-compressor bfloat16"  # the model loaded and pruned in bfloat16: its fastest CPU path
# the tools run again on calibration seeds 1 .. --seeds-1: carve's against one plain forward, llm-compressor's
# bfloat16 row so that every seed's time ratio has its own llm-compressor run
TIMED = ("carve", HCALIB, BF16, BF16H)
SEEDED = (*TIMED, LLMC_BF16)


# --------------------------------------------------------------------------- worker side
def _register_reference() -> None:
    """SparseGPT N:M as a textbook loop (no lazy batches, full-row updates per column)."""
    import torch

    from carve.scorers import Hessian, inverse_hessian_cholesky, register

    def reference(W: torch.Tensor, stat: Hessian, _s: float, _g: str, nm: tuple[int, int]) -> Any:
        n, m = nm
        W, (U, _) = W.detach().double().clone(), inverse_hessian_cholesky(stat.H)
        U, keep = U.double(), torch.ones_like(W, dtype=torch.bool)
        for i in range(W.shape[1]):
            if i % m == 0:
                sal = W[:, i : i + m] ** 2 / torch.diag(U)[i : i + m] ** 2
                keep[:, i : i + m].scatter_(1, sal.topk(m - n, dim=1, largest=False).indices, False)
            err = W[:, i] * ~keep[:, i] / U[i, i]
            W[:, i:] -= err[:, None] * U[i, i:][None, :]
        return (W * keep).float(), keep, {}

    register("sparsegpt-reference", paper="reference", url="", statistic=Hessian, prune=reference)(
        lambda W, stat: W.abs()
    )


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import carve
    from carve.job import calibration_data, tensor_fingerprint
    from carve.progress import set_quiet

    set_quiet(True)
    torch.manual_seed(0)
    _register_reference()
    model_dir = spec.get("model_dir", str(MODEL_DIR))
    domain, general = carve.Corpus(spec["domain"]), carve.Corpus("general")
    mix = 1.0 if spec.get("calibration") == "general" else 0.0
    if spec["kind"] == "calib":  # write the calibration blocks for llm-compressor
        lm = carve.load_model(model_dir)
        blocks = calibration_data(lm.tokenizer, domain, general, CALIB_BLOCKS, BLOCK_LEN, mix, spec.get("seed", SEED))
        torch.save(blocks, spec["path"])
        return {"blocks": len(blocks)}
    if spec["kind"] == "prune":  # carve's own job: `carve extract` through its Python API
        pattern = None if spec["pattern"] == "50%" else spec["pattern"]
        recipe = carve.Recipe(
            model=model_dir, domain=spec["domain"], method=spec["method"], sparsity=None if pattern else 0.5,
            pattern=pattern, mix=mix, propagation=spec.get("propagation", "pruned"),
            calib_dtype=spec.get("calib_dtype", "auto"), dtype=spec.get("dtype"), calib_blocks=CALIB_BLOCKS,
            hessian_dtype=spec.get("hessian_dtype", "float32"), block_len=BLOCK_LEN, eval_blocks=spec["eval_blocks"],
            seed=spec.get("seed", SEED), cloze_items=0, speed=False,
        )  # fmt: skip
        m = carve.extract(recipe, spec.get("out"), overwrite=True)
        retries = m["method_notes"]["hessian_damping_retries"].values()
        return {**extract_row(m), "calib_dtype": m["data"]["calibration"]["dtype"],
                "damp_retries": sum(v["damp_retries"] for v in retries)}  # fmt: skip
    if spec["kind"] == "forward":  # issue 25's yardstick: one plain bfloat16 forward over the calibration tokens
        lm = carve.load_model(model_dir)  # the dense model (zeros or not, dense kernels take the same time)
        calib = calibration_data(lm.tokenizer, domain, general, CALIB_BLOCKS, BLOCK_LEN, mix, spec.get("seed", SEED))
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            for ids in calib.split(8):
                lm.model(input_ids=ids, use_cache=False)
        return {"forward_bf16_s": round(time.perf_counter() - t, 2), "fingerprint": tensor_fingerprint(calib)}
    # kind "eval": a model as saved (dense source, llm-compressor's output, or carve's saved output)
    lm = carve.load_model(model_dir)
    m = carve.evaluate(lm, domain, general, blocks=spec["eval_blocks"], block_len=BLOCK_LEN)
    result = {"domain_ppl": m["domain_ppl"], "general_ppl": m["general_ppl"], "eval_blocks": m["domain_eval_blocks"]}
    # the decoder blocks' weight matrices
    lin = [n for n, p in lm.model.named_parameters() if p.dim() == 2 and ".layers." in n]
    sparsity = carve.ops.model_sparsity(lm.model, lin)
    result.update(linear_sparsity=sparsity["linear"], all_sparsity=sparsity["all_parameters"])
    result["peak_rss_mb"] = peak_rss_mb()
    return result


# --------------------------------------------------------------------------- driver side


def _ensure_llmc() -> Path:
    return ensure_venv(LLMC_VENV, ["torch==2.13.0", "llmcompressor==0.14.0.1"])


def configurations(domains: list[str], seeds: int = 1) -> list[dict[str, Any]]:
    """In priority order: the llm-compressor comparison first, then the grid; with `seeds` > 1, the
    SEEDED tools' SparseGPT 50% rows again on calibration seeds 1 .. seeds-1 (ids end /seedK)."""
    out: list[dict[str, Any]] = []
    for d in domains:
        out.append({"domain": d, "tool": "carve", "method": "dense", "pattern": "-", "calibration": "-"})
        for method in ("sparsegpt", "wanda"):
            for tool in ("carve", "llm-compressor"):
                out.append({"domain": d, "tool": tool, "method": method, "pattern": "50%", "calibration": "domain"})
        out.append({"domain": d, "tool": LLMC_BF16, "method": "sparsegpt", "pattern": "50%", "calibration": "domain"})
        for tool in CARVE_TOOLS[1:]:
            out.append({"domain": d, "tool": tool, "method": "sparsegpt", "pattern": "50%", "calibration": "domain"})
        out.append({"domain": d, "tool": "carve", "method": "sparsegpt", "pattern": "2:4", "calibration": "domain"})
        out.append({"domain": d, "tool": "reference", "method": "sparsegpt", "pattern": "2:4", "calibration": "domain"})
        out.append(
            {"domain": d, "tool": "llm-compressor", "method": "sparsegpt", "pattern": "2:4", "calibration": "domain"}
        )
        out.append({"domain": d, "tool": "carve", "method": "wanda", "pattern": "2:4", "calibration": "domain"})
        for pattern in ("50%", "2:4"):
            out.append({"domain": d, "tool": "carve", "method": "magnitude", "pattern": pattern, "calibration": "-"})
        out.append({"domain": d, "tool": "llm-compressor", "method": "magnitude", "pattern": "50%", "calibration": "-"})
        for method in ("sparsegpt", "wanda"):
            for pattern in ("50%", "2:4"):
                out.append(
                    {"domain": d, "tool": "carve", "method": method, "pattern": pattern, "calibration": "general"}
                )
    for d in domains:
        for seed in range(1, seeds):
            for tool in SEEDED:
                out.append({"domain": d, "tool": tool, "method": "sparsegpt", "pattern": "50%",
                            "calibration": "domain", "seed": seed})  # fmt: skip
    for c in out:
        parts = [c["domain"], c["tool"], c["method"], c["pattern"], c["calibration"]]
        c["id"] = "/".join(parts + ([f"seed{c['seed']}"] if "seed" in c else []))
    return out


def run_one(cfg: dict[str, Any], eval_blocks: int) -> dict[str, Any]:
    base = {
        "domain": cfg["domain"],
        "eval_blocks": eval_blocks,
        "model_dir": str(MODEL_DIR),
        "seed": cfg.get("seed", SEED),
    }
    if cfg["method"] == "dense":
        return carve_worker(__file__, {**base, "kind": "eval"})
    if cfg["tool"] in ("reference", *CARVE_TOOLS):
        method = "sparsegpt-reference" if cfg["tool"] == "reference" else cfg["method"]
        spec = {**base, "kind": "prune", "method": method, "pattern": cfg["pattern"], "calibration": cfg["calibration"]}
        tool = cfg["tool"]
        spec.update(propagation=PROPAGATION.get(tool, "pruned"), calib_dtype=CALIB_DTYPE.get(tool, "auto"))
        spec.update(dtype=WEIGHTS_DTYPE.get(tool), hessian_dtype=HESSIAN_DTYPE.get(tool, "float32"))
        if tool in WEIGHTS_DTYPE:  # its output as saved, evaluated in float32 as llm-compressor bfloat16's is
            saved = OUT / ("extract-" + cfg["id"].translate(str.maketrans("/:", "--", "% ")))
            res = carve_worker(__file__, {**spec, "out": str(saved)})
            if "error" not in res:
                evaluated = carve_worker(__file__, {**base, "kind": "eval", "model_dir": str(saved)})
                res |= {f"job_{k}": res[k] for k in ("domain_ppl", "general_ppl")}  # the job's own, in bfloat16
                res |= {k: evaluated[k] for k in ("domain_ppl", "general_ppl")}
        else:
            res = carve_worker(__file__, spec)
        if tool in TIMED and cfg["method"] == "sparsegpt" and cfg["pattern"] == "50%" and "error" not in res:
            fwd = carve_worker(__file__, {**base, "kind": "forward", "calibration": cfg["calibration"]})
            assert fwd["fingerprint"] == res["data"]["calibration"]["fingerprint"], "not the job's tokens"
            res["forward_bf16_s"] = fwd["forward_bf16_s"]
        return res
    # llm-compressor: same calibration blocks, its own process and venv, evaluated by carve
    python = _ensure_llmc()
    seed = f"-seed{cfg['seed']}" if "seed" in cfg else ""
    calib = OUT / f"calib-{cfg['domain']}-{cfg['calibration']}{seed}.pt"
    if cfg["calibration"] != "-" and not calib.exists():
        carve_worker(__file__, {**base, "kind": "calib", "calibration": cfg["calibration"], "path": str(calib)})
    if not calib.exists():
        carve_worker(__file__, {**base, "kind": "calib", "calibration": "domain", "path": str(calib)})
    pruned = OUT / ("llmc-" + cfg["id"].replace("/", "-").replace(":", "-").replace("%", ""))
    pattern = "unstructured" if cfg["pattern"] == "50%" else cfg["pattern"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = run_json(
        [
            str(python),
            str(HERE / "llmc_worker.py"),
            str(MODEL_DIR),
            str(calib),
            cfg["method"],
            pattern,
            str(pruned),
            "bfloat16" if cfg["tool"] == LLMC_BF16 else "float32",
        ],
        env,
    )
    if "error" in res:
        return res
    evaluated = carve_worker(__file__, {**base, "kind": "eval", "model_dir": str(pruned)})
    return {**evaluated, **{k: v for k, v in res.items() if k in ("seconds", "peak_rss_mb", "linear_sparsity")}}


QUICKSTART = ["extract", "--domain", "legal", "--sparsity", "0.5", "--method", "sparsegpt"]


def quickstart(manifest_path: Path | None = None) -> dict[str, Any]:
    """The README's first command, as a user runs it: from the embedded GGUF, default settings.
    With `manifest_path`, the carve.json of such a run made elsewhere (e.g. a fresh clone)."""
    out = OUT / "quickstart-legal-50"
    t = time.perf_counter()
    if manifest_path is None:
        cmd = [sys.executable, "-m", "carve.cli.main", *QUICKSTART, "--out", str(out), "--overwrite", "--quiet"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            return {"id": "quickstart", "error": proc.stderr.strip().splitlines()[-1][:300]}
        manifest_path = out / "carve.json"
    wall = round(time.perf_counter() - t, 1)
    manifest = json.loads(manifest_path.read_text())
    wall = wall if wall > 1 else round(sum(manifest["timings_s"].values()), 1)
    return {
        "id": "quickstart",
        "command": "carve " + " ".join(QUICKSTART) + " --out out/legal-50",
        "peak_rss_mb": manifest["peak_rss_mb"],
        "timings_s": manifest["timings_s"],
        "metrics": manifest["metrics"],
        "linear_sparsity": manifest["sparsity"]["linear"],
        "wall_total_s": wall,
        "output_bytes": {f.name: f.stat().st_size for f in manifest_path.parent.iterdir() if f.is_file()},
        "saved": manifest.get("saved"),
        "commit": commit(),
    }


def _upto_prune(row: dict[str, Any]) -> str:
    """What a row's `peak_rss_prune_mb` covers: the job evaluates the source before it prunes,
    unless carve's cache holds that evaluation."""
    return "load + evaluate + prune" if row.get("job") and not row.get("before_from_cache") else "load + prune"


def _forward_where(row: dict[str, Any]) -> str:
    return "the dense model, its own process" if row.get("job") else "same process, after the prune"


def _mean_sd(values: list[float]) -> str:
    import statistics

    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def _seeded(rows: dict[str, dict[str, Any]], d: str, tool: str) -> dict[int, dict[str, Any]]:
    """A SEEDED tool's finished SparseGPT 50% rows by calibration seed (the table's row is seed 0)."""
    base = f"{d}/{tool}/sparsegpt/50%/domain"
    got = {0: rows.get(base)} | {k: rows.get(f"{base}/seed{k}") for k in range(1, 10)}
    return {k: r for k, r in got.items() if r and "error" not in r}


def _seed_spread(rows: dict[str, dict[str, Any]], d: str) -> list[str]:
    """Issue 25's bars per TIMED tool over its calibration seeds: prune time against one plain
    bfloat16 forward and against llm-compressor bfloat16 on the same seed, peak RSS of load + prune
    against llm-compressor's, domain ppl against llm-compressor's (--seeds adds the seeds)."""
    out, ppl = [], {}
    h = _seeded(rows, d, LLMC_BF16)
    for tool in TIMED:
        done = {k: r for k, r in _seeded(rows, d, tool).items() if "forward_bf16_s" in r}
        if len(done) < 2:
            continue
        rs = list(done.values())
        ratios = [r["seconds"] / r["forward_bf16_s"] for r in rs]
        ppl[tool] = [r["domain_ppl"] for r in rs]
        runs = {r.get("run") for r in rs}
        out.append(
            f"- `{tool}` SparseGPT 50% over {len(rs)} calibration seeds: prune "
            + " / ".join(f"{r['seconds']:.1f}" for r in rs)
            + " s against one plain bfloat16 forward over the same tokens "
            + " / ".join(f"{r['forward_bf16_s']:.1f}" for r in rs)
            + f" s: **{_mean_sd(ratios)}x** (mean ± sd; bar ≤ 2x: met on {sum(x <= 2 for x in ratios)} "
            + f"of {len(ratios)} seeds); domain ppl {_mean_sd(ppl[tool])}"
            + ("" if len(runs) == 1 else f" ({len(runs)} runs)")
        )
        pairs = [(done[k], h[k]) for k in sorted(done) if k in h]
        if len(pairs) < 2:
            continue
        apart = sum(a.get("run") != b.get("run") for a, b in pairs)
        t = [a["seconds"] / b["seconds"] for a, b in pairs]
        q = [a["domain_ppl"] / b["domain_ppl"] for a, b in pairs]
        rss = [(a.get("peak_rss_prune_mb", 0), b["peak_rss_mb"]) for a, b in pairs]
        out.append(
            f"  - against `{LLMC_BF16}` on the same {len(pairs)} seeds "
            + ("(each pair in one run)" if not apart else f"({apart} of the pairs from different runs)")
            + ": wall time "
            f"**{_mean_sd(t)}x** (bar ≤ 0.45x: met on {sum(x <= 0.45 for x in t)} of {len(t)}); domain ppl "
            f"{_mean_sd(q)}x (within 2%: met on {sum(x <= 1.02 for x in q)} of {len(q)}); peak RSS of "
            f"{_upto_prune(pairs[0][0])} "
            + " / ".join(f"{x:.0f} vs {y:.0f}" for x, y in rss)
            + f" MB (bar ≤ llm-compressor's: met on {sum(x <= y for x, y in rss)} of {len(rss)})"
        )
    for tool in TIMED[1:]:
        if tool in ppl and TIMED[0] in ppl:
            a, b = (sum(v) / len(v) for v in (ppl[tool], ppl[TIMED[0]]))
            out.append(f"- `{tool}` against `{TIMED[0]}`, mean domain ppl over the seeds: {a / b:.4f}x")
    return out


def write_table(rows: dict[str, dict[str, Any]], domains: list[str], eval_blocks: int) -> str:
    def f(v: Any, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    lines = [
        "# carve extract: benchmark results",
        "",
        "Written by `bench/extract.py` (rerun it to reproduce; finished rows are cached in "
        "`bench/results/extract.jsonl`). Model: SmolLM2-135M-Instruct, the embedded default, dequantized "
        f"to float32. Calibration: {CALIB_BLOCKS} blocks x {BLOCK_LEN} tokens sampled with seed {SEED} from "
        "the train split of the domain corpus (`calibration=domain`) or of `general` (`calibration=general`). "
        f"Perplexity: the first {eval_blocks} non-overlapping {BLOCK_LEN}-token blocks of each corpus's held-out "
        "split, the same blocks for every row. Sparsity: share of zeros over the decoder Linear weights (linear) "
        "and over all parameters (all). Calib dtype: what carve's calibration forwards computed in "
        "(`--calib-dtype`, default auto: bfloat16 on this AVX512-BF16 CPU; statistics, Hessian products included "
        "except in `carve --hessian-dtype calib`, and pruning run in float32, the saved weights are float32); "
        "rows measured before that option existed "
        "computed in float32 and say so; llm-compressor runs the float32 model as loaded (`llm-compressor bfloat16`: "
        "the model loaded, pruned and saved in bfloat16, evaluated in float32 from those weights). "
        "carve rows run carve's extraction job, `carve.extract(Recipe(...))` (what `carve extract` runs), with "
        "`--mix 0` (domain) or `1` (general), `--cloze-items 0 --no-speed`; their data fingerprints are kept in "
        "bench/results/extract.jsonl. Rows whose note says `carve.prune` were measured before the bench ran the "
        "job (the scoring and pruning call alone, same settings). "
        "Time: wall seconds of scoring + pruning (the job's `prune` stage; for llm-compressor: its "
        "`oneshot` call), each configuration in its own process on 2 CPU cores; peak RSS of that process "
        "(for carve: load + evaluate + prune + evaluate). `carve --dtype bfloat16` is evaluated as "
        "`llm-compressor bfloat16` is: its saved output loaded in float32.",
        "",
    ]
    for d in domains:
        lines += [
            f"## domain: {d}",
            "",
            "| tool | method | pattern | calibration | calib dtype | domain ppl | general ppl | linear sparsity "
            "| all sparsity | prune s | peak RSS MB | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for cfg in configurations([d]):
            r = rows.get(cfg["id"])
            if r is None:
                lines.append(
                    f"| {cfg['tool']} | {cfg['method']} | {cfg['pattern']} | {cfg['calibration']} "
                    "| | | | | | | | not run yet |"
                )
                continue
            note = r.get("error", "") + r.get("note", "")  # a note: what the row's process ran beside
            if cfg["tool"] in ("reference", *CARVE_TOOLS) and cfg["method"] != "dense" and not r.get("job"):
                note += " carve.prune, before the bench ran the job"
            if r.get("damp_retries"):
                note += f" {r['damp_retries']} Hessian damping retries"
            ours = cfg["tool"] in ("reference", *CARVE_TOOLS) and cfg["calibration"] != "-"
            dtype = r.get("calib_dtype", "float32 (before the option)") if ours else ""
            lines.append(
                f"| {cfg['tool']} | {cfg['method']} | {cfg['pattern']} | {cfg['calibration']} | {dtype} "
                f"| {f(r.get('domain_ppl'), '.3f')} | {f(r.get('general_ppl'), '.3f')} "
                f"| {f(r.get('linear_sparsity'), '.4f')} | {f(r.get('all_sparsity'), '.4f')} "
                f"| {f(r.get('seconds'), '.1f')} | {f(r.get('peak_rss_mb'), '.0f')} | {note.strip()} |"
            )
        lines.append("")
        comp = []
        pairs = [
            ("sparsegpt 50%", "sparsegpt/50%/domain", "llm-compressor", "sparsegpt/50%/domain"),
            ("wanda 50%", "wanda/50%/domain", "llm-compressor", "wanda/50%/domain"),
            ("sparsegpt 2:4", "sparsegpt/2:4/domain", "reference", "sparsegpt/2:4/domain"),
        ]
        for label, ours, tool, theirs in pairs:
            a, b = rows.get(f"{d}/carve/{ours}"), rows.get(f"{d}/{tool}/{theirs}")
            if a and b and "error" not in a and "error" not in b:
                comp.append(
                    f"- {label}: carve domain ppl / {tool} = {a['domain_ppl'] / b['domain_ppl']:.4f}; "
                    f"wall time carve / {tool} = {a['seconds'] / b['seconds']:.2f}"
                )
        b = rows.get(f"{d}/llm-compressor/sparsegpt/50%/domain")
        c = rows.get(f"{d}/carve/sparsegpt/50%/domain")
        h = rows.get(f"{d}/{LLMC_BF16}/sparsegpt/50%/domain")
        if c and "forward_bf16_s" in c:
            comp.append(
                f"- `carve` SparseGPT 50%: prune {c['seconds']:.1f} s = {c['seconds'] / c['forward_bf16_s']:.2f}x one "
                f"plain bfloat16 forward over the same tokens ({c['forward_bf16_s']:.1f} s, {_forward_where(c)}); "
                f"peak RSS after {_upto_prune(c)} {c.get('peak_rss_prune_mb', 0):.0f} MB "
                f"(with evaluation {c['peak_rss_mb']:.0f})"
            )
        for tool in (t for t in TIMED if t not in WEIGHTS_DTYPE):
            t = rows.get(f"{d}/{tool}/sparsegpt/50%/domain")
            if t and h and "error" not in t and "error" not in h:
                comp.append(
                    f"- `{tool}` (bfloat16 calibration forwards, float32 weights) against {LLMC_BF16} (the model "
                    f"loaded, pruned and saved in bfloat16) SparseGPT 50%: "
                    f"wall time {t['seconds'] / h['seconds']:.2f}x, "
                    f"domain ppl {t['domain_ppl'] / h['domain_ppl']:.4f}x, peak RSS {t['peak_rss_mb']:.0f} vs "
                    f"{h['peak_rss_mb']:.0f} MB" + ("" if t.get("run") == h.get("run") else " (rows of different runs)")
                )
        for wt in WEIGHTS_DTYPE:
            w = rows.get(f"{d}/{wt}/sparsegpt/50%/domain")
            if not (w and h and "error" not in w and "error" not in h and "forward_bf16_s" in w):
                continue
            comp.append(
                f"- `{wt}` (weights in bfloat16, as {LLMC_BF16}) SparseGPT 50%: wall time "
                f"{w['seconds'] / h['seconds']:.2f}x {LLMC_BF16}'s, "
                f"domain ppl {w['domain_ppl'] / h['domain_ppl']:.4f}x, "
                f"peak RSS of {_upto_prune(w)} {w.get('peak_rss_prune_mb', 0):.0f} vs {h['peak_rss_mb']:.0f} MB; "
                f"prune {w['seconds'] / w['forward_bf16_s']:.2f}x one plain bfloat16 forward "
                f"({w['forward_bf16_s']:.1f} s)" + ("" if w.get("run") == h.get("run") else " (rows of different runs)")
            )
        for tool in CARVE_TOOLS:
            a = rows.get(f"{d}/{tool}/sparsegpt/50%/domain")
            if a and b and "error" not in a and "error" not in b:
                q_ratio, t_ratio = a["domain_ppl"] / b["domain_ppl"], a["seconds"] / b["seconds"]
                both = q_ratio <= 1.02 and t_ratio <= 0.5
                other = " (llm-compressor's row from an earlier run)" if a.get("run") != b.get("run") else ""
                comp.append(
                    f"- targets for `{tool}` SparseGPT 50%{other}: domain ppl / llm-compressor's = {q_ratio:.4f} "
                    f"(within 2%: {'met' if q_ratio <= 1.02 else 'NOT met'}); wall time / llm-compressor's = "
                    f"{t_ratio:.2f} (at most 0.5x: {'met' if t_ratio <= 0.5 else 'NOT met'}) -> "
                    + ("both met" if both else "NOT both met")
                )
            if tool != "carve" and a and c and a.get("run") and a.get("run") == c.get("run"):
                comp.append(
                    f"- `{tool}` against `carve` (sequential propagation) SparseGPT 50%, measured in the same run: "
                    f"wall time {a['seconds'] / c['seconds']:.2f}x, "
                    f"domain ppl {a['domain_ppl'] / c['domain_ppl']:.4f}x, "
                    f"peak RSS {a['peak_rss_mb']:.0f} vs {c['peak_rss_mb']:.0f} MB"
                )
        comp += _seed_spread(rows, d)
        if comp:
            head = "Ratios from the rows above (same blocks; rows of one run unless a line says otherwise):"
            lines += [head, "", *comp, ""]
    q = rows.get("quickstart")
    if q and "error" not in q:
        m, t = q["metrics"], q["timings_s"]
        lines += [
            "## The README's quick start",
            "",
            f"`{q['command']}` from the embedded GGUF with default settings (64 x 512 calibration blocks, "
            f"{m['after']['domain_eval_blocks']} x {m['after']['block_len']} eval blocks per corpus), "
            "measured from its own manifest:",
            "",
            "| peak RSS MB | total s | load model s | evaluate before s | prune s | evaluate after s | save s "
            "| domain ppl before -> after | general ppl before -> after |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {q['peak_rss_mb']:.0f} ({'within' if q['peak_rss_mb'] <= 2560 else 'OVER'} the 2.5 GB target) "
            f"| {q['wall_total_s']:.0f} | {t['load_model']:.0f} | {t['evaluate_before']:.0f} "
            f"| {t['prune']:.0f} | {t['evaluate_after']:.0f} | {t['save']:.0f} "
            f"| {m['before']['domain_ppl']:.3f} -> {m['after']['domain_ppl']:.3f} "
            f"| {m['before']['general_ppl']:.3f} -> {m['after']['general_ppl']:.3f} |",
            "",
        ]
        if q.get("output_bytes"):
            files = q["output_bytes"]
            total = sum(files.values()) / 1e6
            parts = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in sorted(files.items(), key=lambda kv: -kv[1])[:4])
            lines += [
                f"Output directory: {total:.1f} MB ({parts} MB ...), weights saved as "
                f"{(q.get('saved') or {}).get('dtype', '?')}; before `--save-dtype` (issue 21) it was 541 MB "
                f"(float32): {total / 541:.1%} of that (issue 21's bar: at most 50%).",
                "",
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker")
    p.add_argument("--domains", nargs="+", default=["legal", "code"])
    p.add_argument("--only", default="")
    p.add_argument(
        "--rerun", nargs="*", default=[], help="run again the cached rows whose id contains one of these (same run)"
    )
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--seeds", type=int, default=1, help="time the TIMED tools' SparseGPT 50%% on this many seeds")
    p.add_argument(
        "--quickstart",
        nargs="?",
        const="",
        help="time the README's quick-start command instead (or read the carve.json a user's run of it wrote)",
    )
    p.add_argument("--table-only", action="store_true", help="rewrite bench/RESULTS.md from the cached rows")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.table_only or args.quickstart is not None:
        rows = load_results(RESULTS)
        if args.quickstart is not None:
            rows["quickstart"] = quickstart(Path(args.quickstart) if args.quickstart else None)
            save_result(RESULTS, rows["quickstart"])
        write_section("extract", write_table(rows, ["legal", "code"], args.eval_blocks))
        print(RESULTS_MD.read_text())
        return
    ensure_model()
    rows = load_results(RESULTS)
    run = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # rows of one invocation share it
    for cfg in configurations(args.domains, args.seeds):
        again = any(r in cfg["id"] for r in args.rerun)
        if (cfg["id"] in rows and not again) or args.only not in cfg["id"]:
            continue
        t = time.perf_counter()
        print(f"running {cfg['id']} ...", flush=True)
        res = run_one(cfg, args.eval_blocks)
        row = {
            **cfg,
            **res,
            "eval_blocks": args.eval_blocks,
            "wall_total_s": round(time.perf_counter() - t, 1),
            "commit": commit(),
            "run": run,
        }
        save_result(RESULTS, row)
        rows[cfg["id"]] = row
        print(json.dumps(row), flush=True)
        write_section("extract", write_table(rows, ["legal", "code"], args.eval_blocks))
    write_section("extract", write_table(rows, ["legal", "code"], args.eval_blocks))
    print(RESULTS_MD.read_text())


if __name__ == "__main__":
    main()
