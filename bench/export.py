"""Benchmark deployable outputs (`--save-dtype`, `carve convert`, `carve export`) on the embedded
default, in transformers and in llama.cpp itself.

    .venv/bin/python bench/export.py [--models dense sparsegpt dual-obs structured] [--types f16 q8_0 q4_0]
        [--rounds 3] [--rerun ID ...] [--prepare]

Models (legal; each one carve job, saved in float32 with `--save-dtype float32`):
- dense: the embedded default (`carve convert default --save-dtype float32`);
- sparsegpt / dual-obs: `carve extract --method M --sparsity 0.5 --domain legal` (defaults: 64 x 512
  calibration blocks, 0.3 general mix);
- structured: `carve extract --drop-blocks 15` (half of the decoder blocks, carve's default
  angular-distance rule: the greedy rule recovers better but its search took 20 minutes here), then
  `carve recover --lr 5e-4` (200 steps, its defaults otherwise).
Formats of each: float32 (the job's output), bfloat16 dense and bfloat16 sparse (`carve convert`),
and GGUF f16 / q8_0 / q4_0 (`carve export` of the float32 output).

Measures (the first 16 held-out 512-token legal blocks, the blocks `carve eval` uses):
- file MB of each format (the weights file; directories also hold a 3.5 MB tokenizer);
- domain perplexity of each format: float32 / bfloat16 / sparse with `carve eval` (transformers,
  float32 compute); GGUF types in llama.cpp (llama-cpp-python built from its PyPI source,
  bench/llamacpp.py), on the same token ids;
- llama.cpp against transformers: top-1 next-token agreement with the float32 model in transformers
  at every position of those blocks;
- llama.cpp speed: prefill (one 512-token block) and decode (64 greedy tokens) tokens/s on 2
  threads, the model and the dense model's GGUF of the same type run alternately, `--rounds`
  rounds each, best of them.
Rows accumulate in bench/results/export.jsonl (finished steps are not rerun); the table goes to the
`export` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    HERE,
    MODEL_DIR,
    OUT,
    ROOT,
    carve_worker,
    commit,
    ensure_model,
    load_results,
    save_result,
    write_section,
)
from llamacpp import run_gguf

RESULTS = HERE / "results" / "export.jsonl"
CARVE = str(ROOT / ".venv" / "bin" / "carve")
MODELS = ["dense", "sparsegpt", "dual-obs", "structured"]
TYPES = ["f16", "q8_0", "q4_0"]
DOMAIN, EVAL_BLOCKS, BLOCK_LEN = "legal", 16, 512
JOB_EVAL = ["--eval-blocks", str(EVAL_BLOCKS), "--cloze-items", "0", "--block-len", str(BLOCK_LEN)]


def carve(*args: str) -> dict[str, Any]:
    """One carve command (--json); its printed summary."""
    proc = subprocess.run([CARVE, *args, "--json", "--quiet"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"carve {args[0]}: " + (proc.stderr.strip().splitlines() or ["no output"])[-1])
    out = proc.stdout
    return json.loads(out[out.index("{") :]) if "{" in out else {}


def _dir(model: str, fmt: str) -> Path:
    return OUT / f"export-{model}-{fmt}"


def make_model(model: str) -> Path:
    """The model's float32 output, from carve's own jobs (kept between runs)."""
    out = _dir(model, "f32")
    if (out / "carve.json").exists():
        return out
    common = ["--domain", DOMAIN, *JOB_EVAL, "--save-dtype", "float32", "--overwrite"]
    if model == "dense":
        carve("convert", "default", "--out", str(out), "--save-dtype", "float32", "--overwrite")
    elif model in ("sparsegpt", "dual-obs"):
        carve("extract", "--model", str(MODEL_DIR), "--method", model, "--sparsity", "0.5", "--no-speed",
              *common, "--out", str(out))  # fmt: skip
    else:
        pruned = _dir(model, "extracted")
        if not (pruned / "carve.json").exists():
            carve("extract", "--model", str(MODEL_DIR), "--drop-blocks", "15", "--no-speed",
                  *common, "--out", str(pruned))  # fmt: skip
        carve("recover", str(pruned), "--lr", "5e-4", *common, "--out", str(out))
    return out


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In carve's environment: the eval token blocks and transformers' top-1 of the float32 model."""
    import torch

    import carve as cv

    lm = cv.load_model(spec["model"])
    blocks = cv.Corpus(DOMAIN).eval_blocks(lm.tokenizer, EVAL_BLOCKS, BLOCK_LEN)
    top1 = []
    with torch.no_grad():
        for b in blocks:
            top1.append(lm.model(b[None]).logits[0].argmax(-1).tolist())
    return {"blocks": blocks.tolist(), "top1": top1}


def file_mb(path: Path) -> float:
    files = [path] if path.is_file() else list(path.glob("model*.safetensors"))
    return round(sum(f.stat().st_size for f in files) / 1e6, 1)


def quality(model: str, fmt: str, reference: dict[str, Any]) -> dict[str, Any]:
    """One format's size and domain perplexity (and, for GGUF, llama.cpp's top-1 agreement)."""
    if fmt in TYPES:
        gguf = OUT / f"export-{model}.{fmt}.gguf"
        if not gguf.exists():
            carve("export", str(_dir(model, "f32")), "--gguf", str(gguf), "--type", fmt, "--overwrite")
        r = run_gguf(gguf, reference["blocks"], decode_tokens=1)
        pairs = zip(r["top1"], reference["top1"], strict=True)
        same = sum(a == b for x, y in pairs for a, b in zip(x[:-1], y[:-1], strict=True))
        total = sum(len(x) - 1 for x in r["top1"])
        return {"file_mb": file_mb(gguf), "domain_ppl": round(r["ppl"], 4), "top1_agreement": round(same / total, 5)}
    path = _dir(model, fmt)
    if fmt != "f32" and not (path / "carve.json").exists():
        args = ["--save-dtype", "bfloat16"] if fmt == "bf16" else ["--save-format", "sparse"]
        carve(
            "convert", str(_dir(model, "bf16" if fmt == "sparse" else "f32")), "--out", str(path), *args, "--overwrite"
        )
    m = carve("eval", str(path), "--domain", DOMAIN, *JOB_EVAL)["metrics"]
    return {"file_mb": file_mb(path), "domain_ppl": m["domain_ppl"], "general_ppl": m["general_ppl"]}


def speed(model: str, fmt: str, rounds: int, block: list[int]) -> dict[str, Any]:
    """llama.cpp tokens/s of the model's GGUF and the dense one's, alternately, best of `rounds`."""
    runs: dict[str, list[dict[str, Any]]] = {"dense": [], model: []}
    for _ in range(rounds):
        for name in runs:
            runs[name].append(run_gguf(OUT / f"export-{name}.{fmt}.gguf", [block], decode_tokens=64, quality=False))
    best = {
        n: {k: max(r[k] for r in rs) for k in ("prefill_tokens_per_s", "decode_tokens_per_s")} for n, rs in runs.items()
    }
    return {"model": best[model], "dense": best["dense"], "rounds": rounds}


def formats(model: str) -> list[str]:
    unstructured = model in ("sparsegpt", "dual-obs")
    return ["f32", "bf16", *(["sparse"] if unstructured else []), *TYPES]


def run(models: list[str], types: list[str], rounds: int, rows: dict[str, dict[str, Any]]) -> None:
    def step(rid: str, fn: Any) -> None:
        if rid in rows and "error" not in rows[rid]:
            return
        print(f"running {rid} ...", flush=True)
        t0 = time.perf_counter()
        try:
            row = {"id": rid, **fn(), "wall_s": round(time.perf_counter() - t0, 1), "commit": commit()}
        except RuntimeError as exc:
            row = {"id": rid, "error": str(exc)[:300]}
        rows[rid] = row
        save_result(RESULTS, row)

    for model in ["dense", *[m for m in models if m != "dense"]]:
        step(f"{model}/job", lambda m=model: _job_row(make_model(m)))
        if "error" in rows[f"{model}/job"]:
            continue
        step(f"{model}/reference", lambda m=model: carve_worker(__file__, {"model": str(_dir(m, "f32"))}))
        ref = rows[f"{model}/reference"]
        for fmt in [f for f in formats(model) if f not in TYPES or f in types]:
            step(f"{model}/{fmt}", lambda m=model, f=fmt, r=ref: quality(m, f, r))
    block = rows["dense/reference"]["blocks"][0]
    for model in [m for m in models if m != "dense"]:
        for fmt in types:
            if "error" not in rows.get(f"{model}/{fmt}", {"error": 1}):
                step(f"{model}/{fmt}/speed", lambda m=model, f=fmt: speed(m, f, rounds, block))


def _job_row(out: Path) -> dict[str, Any]:
    manifest = json.loads((out / "carve.json").read_text())
    keep = ("metrics", "data", "source", "saved", "size", "shape", "sparsity", "timings_s", "peak_rss_mb")
    return {"manifest": {k: manifest[k] for k in keep if k in manifest}}


def _f(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def write_table(rows: dict[str, dict[str, Any]], models: list[str], types: list[str]) -> str:
    names = {"f32": "float32", "bf16": "bfloat16", "sparse": "sparse bf16", **{t: f"GGUF {t}" for t in types}}
    lines = [
        "## Deployable outputs (`--save-dtype`, `carve convert`, `carve export`), embedded default, legal",
        "",
        "bench/export.py: each model is one carve job saved in float32 (dense: `carve convert default`;",
        "SparseGPT / dual-obs: `carve extract --sparsity 0.5`; structured: `carve extract --drop-blocks 15`",
        "(distance rule) then `carve recover --lr 5e-4`, 200 steps); bfloat16 and sparse by `carve convert`,",
        "GGUF by `carve export` of the float32 output. File MB (10^6 bytes): the weights file. Domain ppl: the first",
        f"{EVAL_BLOCKS} held-out {BLOCK_LEN}-token legal blocks; safetensors formats in transformers (`carve eval`),",
        "GGUF in llama.cpp (llama-cpp-python from its PyPI source) on the same token ids. Top-1: llama.cpp's",
        "next token against the float32 model's in transformers at every position. Speed: llama.cpp, 2 threads,",
        "prefill of one 512-token block, 64 greedy decode steps; the model and the dense model's GGUF of the",
        "same type run alternately, best of the rounds.",
        "",
        "| model | format | file MB | x dense same format | domain ppl | top-1 agreement | prefill tok/s (x dense) "
        "| decode tok/s (x dense) |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    checks: list[str] = []
    for model in models:
        for fmt in [f for f in formats(model) if f not in TYPES or f in types]:
            r, d = rows.get(f"{model}/{fmt}"), rows.get(f"dense/{'bf16' if fmt == 'sparse' else fmt}")
            if r is None or "error" in r:
                lines.append(f"| {model} | {names[fmt]} | | | | | | {'not run yet' if r is None else r['error']} |")
                continue
            ratio = r["file_mb"] / d["file_mb"] if d and "file_mb" in d else None
            sp = rows.get(f"{model}/{fmt}/speed")
            pre = dec = "-"
            if sp and "error" not in sp:
                m, dn = sp["model"], sp["dense"]
                pre = f"{m['prefill_tokens_per_s']:.0f} ({m['prefill_tokens_per_s'] / dn['prefill_tokens_per_s']:.2f}x)"
                dec = f"{m['decode_tokens_per_s']:.1f} ({m['decode_tokens_per_s'] / dn['decode_tokens_per_s']:.2f}x)"
            cells = [model, names[fmt], f"{r['file_mb']:.1f}", _f(ratio), f"{r['domain_ppl']:.3f}",
                     _f(r.get("top1_agreement"), ".4f"), pre, dec]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        checks += _checks(model, rows)
    lines += [
        "",
        *checks,
        "",
        f"Rows measured at carve commit(s) {', '.join(sorted({r['commit'] for r in rows.values() if 'commit' in r}))}.",
    ]
    return "\n".join(lines)


def _checks(model: str, rows: dict[str, dict[str, Any]]) -> list[str]:
    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    out = []
    sparse, bf16 = rows.get(f"{model}/sparse", {}), rows.get(f"{model}/bf16", {})
    if "file_mb" in sparse and "file_mb" in bf16:
        share = 1 - sparse["file_mb"] / bf16["file_mb"]
        same = sparse["domain_ppl"] == bf16["domain_ppl"]
        out.append(f"- {model}: sparse {share:.1%} smaller than dense bfloat16 (bar >= 40%: {met(share >= 0.4)}); "
                   f"perplexity equal to bfloat16's: {same}")  # fmt: skip
    f16, f32 = rows.get(f"{model}/f16", {}), rows.get(f"{model}/f32", {})
    if "top1_agreement" in f16 and "domain_ppl" in f32:
        gap = f16["domain_ppl"] / f32["domain_ppl"] - 1
        agree = f16["top1_agreement"]
        out.append(f"- {model}: GGUF f16 in llama.cpp agrees on {agree:.2%} of top-1 tokens (bar >= 99%: "
                   f"{met(agree >= 0.99)}), perplexity {gap:+.2%} of transformers' float32 "
                   f"(bar within 1%: {met(abs(gap) <= 0.01)})")  # fmt: skip
    q8, dq8, sp = rows.get(f"{model}/q8_0", {}), rows.get("dense/q8_0", {}), rows.get(f"{model}/q8_0/speed", {})
    if model == "structured" and "file_mb" in q8 and "file_mb" in dq8 and "model" in sp:
        share = q8["file_mb"] / dq8["file_mb"]
        x = sp["model"]["decode_tokens_per_s"] / sp["dense"]["decode_tokens_per_s"]
        out.append(f"- structured q8_0: {share:.1%} of the dense q8_0 file (bar <= 55%: {met(share <= 0.55)}), decode "
                   f"{x:.2f}x the dense q8_0's (bar >= 1.7x: {met(x >= 1.7)})")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--types", nargs="+", default=TYPES, choices=TYPES)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rerun", nargs="*", default=[], help="row ids to measure again")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--prepare", action="store_true", help="only run the jobs that make the models (no measuring)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    ensure_model()
    rows = {k: v for k, v in load_results(RESULTS).items() if k not in args.rerun}
    if args.prepare:
        for model in args.models:
            print(model, make_model(model), flush=True)
        return
    if not args.table_only:
        run(args.models, args.types, args.rounds, rows)
    # every model measured so far, not only this run's: a rerun of some rows keeps the others in the table
    models = [m for m in MODELS if m == "dense" or m in args.models or any(k.startswith(f"{m}/") for k in rows)]
    text = write_table(rows, models, args.types)
    print(text)
    write_section("export", text)


if __name__ == "__main__":
    main()
