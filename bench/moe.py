"""Pruning a mixture-of-experts model's experts (carve.models.experts) at real size, on real weights.

No MoE checkpoint can be had here (hub only), so the bench builds one from the embedded default by
sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): a Mixtral with SmolLM2-135M's attention,
norms and embeddings, and 4 experts per block, each a copy of that block's MLP, top-2 routing by a
seeded random router (N(0, 1/576), so tokens spread over the experts).  Identical experts make the
MoE compute what the dense model does whatever the routing (checked when it is built: the logits
agree), so its "before" is the dense model's and pruning is what tells the two apart: each expert is
pruned on the tokens its router sends it, and the four copies of an MLP come out pruned differently.

    .venv/bin/python bench/moe.py [--rerun ID ...] [--table-only]
    .venv/bin/python bench/moe.py --gguf      # the MoE specialist in llama.cpp (section moe-gguf)
    .venv/bin/python bench/moe.py --memory [--rerun memory/moe]   # where the job's memory goes (moe-memory)
    .venv/bin/python bench/moe.py --experts [--rerun experts/moe/0.5]   # whole experts removed (moe-experts)

Rows, each one `carve extract` (the CLI) on the legal corpus at 50%, seeds as listed; the output's
weights are deleted, its manifest's metrics and data fingerprints kept (bench/results/moe.jsonl):
- dense SmolLM2 and the MoE, SparseGPT (seeds 0-2), Wanda and dual-obs (seed 0);
- the MoE with `--exclude '*experts*'` added: what carve did before its experts were pruned (only
  the attention pruned; the experts, most of the blocks' weights, dense).

`--gguf` (section moe-gguf; needs bench/llamacpp.py's llama.cpp build): the SparseGPT seed-0
specialist of the MoE and of the dense model (the same `carve extract` as the first rows, output
kept), each `carve export`ed to GGUF f16 and q8_0 (the MoE as llama.cpp's `llama` with experts) and
run in llama.cpp on the first 16 held-out legal blocks: perplexity and top-1 next-token agreement
against transformers on the same blocks, and decode tokens/s of the MoE against the dense
specialist's GGUF of the same type, alternately in the same run, best of 3.

`--experts` (section moe-experts): whole experts removed, `carve extract SRC --experts-keep F --domain
legal` (speed measured), from the upcycled MoE itself (its experts are copies: whichever are kept, the
model computes what it did, so the row checks the surgery at real size and measures the size and
speed gained) and from its SparseGPT seed-0 specialist (the `--gguf` one: each expert pruned on its
own tokens, so the experts differ and which are kept matters), keeping 2 or 3 of 4.

`--memory` (section moe-memory): the SparseGPT seed-0 job of each model once more, its process's
anonymous and file-backed resident memory (/proc/PID/status RssAnon, RssFile) sampled every 0.2 s,
with the manifest's peak RSS after each stage: file-backed pages (a checkpoint's mapped pages) are
clean and the kernel can drop them under pressure, anonymous ones are what the job needs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
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
    extract_row,
    load_results,
    save_result,
    timed,
    write_section,
)

RESULTS = HERE / "results" / "moe.jsonl"
CARVE = str(ROOT / ".venv" / "bin" / "carve")
MOE_DIR = OUT / "smollm2-moe4"
EXPERTS, TOP_K = 4, 2
DEFAULT_EXCLUDE = ("*embed*", "*lm_head*", "*norm*", "*wte*", "*wpe*")  # carve's, as --exclude replaces it
# (model, method, seed, extra options)
ROWS = [
    *[(m, "sparsegpt", s, ()) for s in (0, 1, 2) for m in ("dense", "moe")],
    *[(m, "wanda", 0, ()) for m in ("dense", "moe")],
    ("moe-experts-dense", "sparsegpt", 0, ("--exclude", *DEFAULT_EXCLUDE, "*experts*")),
    *[(m, "dual-obs", 0, ()) for m in ("dense", "moe")],
]


def upcycle(dense: Any, experts: int, top_k: int, widen: int = 1) -> Any:
    """A Mixtral computing what `dense` (a Llama-style model, float32) does: each block's MLP copied into
    `experts` experts, each widened `widen` times (the gate/up rows tiled, the down columns tiled and
    divided by `widen`: the same function), top-k routing by a router seeded at 0, N(0, 1/hidden)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    c = dense.config
    cfg = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size * widen,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=True, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, num_local_experts=experts,
        num_experts_per_tok=top_k, sliding_window=None, router_jitter_noise=0.0, dtype="float32",
    )  # fmt: skip
    moe = MixtralForCausalLM(cfg).eval()
    src = dense.state_dict()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name in src:
                p.copy_(src[name])
            elif name.endswith("mlp.gate.weight"):  # the router
                p.copy_(torch.randn(p.shape, generator=gen) / c.hidden_size**0.5)
            elif name.endswith("experts.gate_up_proj"):  # [E, 2I, H]: the gate rows, then the up rows
                mlp = name.removesuffix("experts.gate_up_proj")
                gate, up = (src[mlp + f"{k}_proj.weight"].repeat(widen, 1) for k in ("gate", "up"))
                p.copy_(torch.cat([gate, up]).expand_as(p))
            elif name.endswith("experts.down_proj"):  # [E, H, I]
                down = src[name.removesuffix("experts.down_proj") + "down_proj.weight"]
                p.copy_((down.repeat(1, widen) / widen).expand_as(p))
            else:
                raise RuntimeError(f"nothing to upcycle {name} from")
    return moe


def ensure_moe() -> dict[str, Any]:
    """The upcycled MoE (built once): its facts, with the largest logit difference from the dense model."""
    facts = MOE_DIR / "upcycled.json"
    if facts.exists():
        return dict(json.loads(facts.read_text()))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ensure_model()
    dense = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    moe = upcycle(dense, EXPERTS, TOP_K)
    import carve

    ids = carve.Corpus("legal").eval_blocks(AutoTokenizer.from_pretrained(MODEL_DIR), 1, 512)
    with torch.no_grad():
        diff = (moe(ids).logits - dense(ids).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"the upcycled MoE computes otherwise than the dense model (logits differ by {diff})")
    tmp = MOE_DIR.with_name(MOE_DIR.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    moe.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(MODEL_DIR).save_pretrained(tmp)
    out = {
        "parameters": sum(p.numel() for p in moe.parameters()),
        "dense_parameters": sum(p.numel() for p in dense.parameters()),
        "experts": EXPERTS,
        "top_k": TOP_K,
        "max_logit_diff_vs_dense": diff,
    }
    (tmp / "upcycled.json").write_text(json.dumps(out))
    shutil.rmtree(MOE_DIR, ignore_errors=True)
    tmp.rename(MOE_DIR)
    return out


def row_id(model: str, method: str, seed: int) -> str:
    return f"{model}/{method}/s{seed}"


def run(model: str, method: str, seed: int, extra: tuple[str, ...]) -> dict[str, Any]:
    src = MODEL_DIR if model == "dense" else MOE_DIR
    out = OUT / f"moe-{model}-{method}-s{seed}"
    cmd = [CARVE, "extract", "--model", str(src), "--method", method, "--sparsity", "0.5", "--domain", "legal",
           "--seed", str(seed), "--no-speed", "--quiet", "--out", str(out), "--overwrite", *extra]  # fmt: skip
    speed = timed(cmd)
    manifest = json.loads((out / "carve.json").read_text())
    shutil.rmtree(out)
    return {
        **extract_row(manifest),
        "wall_s": speed["wall_s"],
        "process_peak_rss_mb": speed["peak_rss_mb"],
        "before": manifest["metrics"]["before"],
        "not_pruned_in_blocks": manifest["sparsity"]["not_pruned_in_blocks"],
        "experts": manifest.get("experts"),
        "parameters": manifest["size"]["parameters_before"],
    }


def _closed(lines: list[str], commits: set[str]) -> str:
    """A table's lines, then the commits its rows were measured at."""
    return "\n".join([*lines, "", f"Rows measured at carve commit(s) {', '.join(sorted(commits))}."]) + "\n"


def _mean_spread(xs: list[float], digits: int = 3) -> str:
    m = sum(xs) / len(xs)
    return f"{m:.{digits}f}" + (f" ± {(max(xs) - min(xs)) / 2:.{digits}f}" if len(xs) > 1 else "")


def _eval_blocks(rows: dict[str, dict[str, Any]]) -> str:
    """The held-out blocks the table's rows were evaluated on (their manifests')."""
    counts = sorted({r["eval_blocks"] for r in rows.values() if "eval_blocks" in r})
    return " / ".join(map(str, counts)) or "?"


def table(rows: dict[str, dict[str, Any]], facts: dict[str, Any]) -> str:
    lines = [
        "## Mixture-of-experts: each expert pruned (`carve extract` on an upcycled SmolLM2), legal, 50%",
        "",
        f"bench/moe.py. The MoE: the embedded default (float32) upcycled to a Mixtral with {facts['experts']} "
        f"experts per block, each a copy of the block's MLP, top-{facts['top_k']} routing by a seeded random router "
        f"({facts['parameters']:,} parameters against {facts['dense_parameters']:,}; its logits equal the dense "
        f"model's within {facts['max_logit_diff_vs_dense']:.1e}). Each row is one `carve extract --sparsity 0.5 "
        "--domain legal` with the method's defaults (64 calibration blocks of 512 tokens; SparseGPT and Wanda mix "
        f"30% general text in), perplexity on the first {_eval_blocks(rows)} held-out 512-token blocks; mean ± half "
        "the range over the "
        "seeds. Sparsity: of the pruned weights (linear) and of all parameters. Experts dense: the MoE with "
        "`--exclude '*experts*'` added (what carve did before its experts were pruned). Time: the job's prune "
        "stage; RSS: the job process's peak.",
        "",
        "| model | method | seeds | linear sparsity | all-parameter sparsity | domain ppl before | domain ppl | "
        "general ppl | experts without tokens | prune s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for model, method, seed, _ in ROWS:
        r = rows.get(row_id(model, method, seed))
        if r is not None:
            groups.setdefault((model, method), []).append(r)
    commits = set()
    for (model, method), rs in groups.items():
        commits |= {r["commit"] for r in rs}
        unrouted = sorted({len((r.get("experts") or {}).get("without_calibration_tokens", [])) for r in rs})
        lines.append(
            f"| {model} | {method} | {len(rs)} | {_mean_spread([r['linear_sparsity'] for r in rs], 4)} | "
            f"{_mean_spread([r['all_sparsity'] for r in rs], 4)} | {rs[0]['before']['domain_ppl']:.3f} | "
            f"{_mean_spread([r['domain_ppl'] for r in rs])} | {_mean_spread([r['general_ppl'] for r in rs])} | "
            f"{'-' if model == 'dense' else ', '.join(map(str, unrouted))} | "
            f"{_mean_spread([r['seconds'] for r in rs], 1)} | "
            f"{_mean_spread([r['process_peak_rss_mb'] for r in rs], 0)} |"
        )
    return _closed(lines, commits)


GGUF_TYPES = ("f16", "q8_0")
EVAL_BLOCKS, BLOCK_LEN = 16, 512


def kept(model: str) -> Path:
    """`model`'s SparseGPT seed-0 specialist (the command of its table row), kept for export."""
    out = OUT / f"moe-gguf-{model}-sparsegpt"
    if not (out / "carve.json").exists():
        src = MODEL_DIR if model == "dense" else MOE_DIR
        subprocess.run([CARVE, "extract", "--model", str(src), "--method", "sparsegpt", "--sparsity", "0.5",
                        "--domain", "legal", "--seed", "0", "--no-speed", "--quiet", "--out", str(out), "--overwrite"],
                       check=True)  # fmt: skip
    return out


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In carve's environment: the first held-out legal blocks, and transformers' top-1 next tokens
    and perplexity on them."""
    import math

    import torch

    import carve

    lm = carve.load_model(spec["model"])
    blocks = carve.Corpus("legal").eval_blocks(lm.tokenizer, EVAL_BLOCKS, BLOCK_LEN)
    top1, nll, n = [], 0.0, 0
    with torch.no_grad():
        for b in blocks:
            logits = lm.model(b[None]).logits[0].float()
            top1.append(logits.argmax(-1).tolist())
            nll += torch.nn.functional.cross_entropy(logits[:-1], b[1:], reduction="sum").item()
            n += len(b) - 1
    return {"blocks": blocks.tolist(), "top1": top1, "ppl": math.exp(nll / n)}


def gguf_row(model: str, kind: str, ref: dict[str, Any]) -> dict[str, Any]:
    """`carve export` of the kept specialist, run in llama.cpp on the reference blocks."""
    from llamacpp import run_gguf

    gguf = OUT / f"moe-gguf-{model}.{kind}.gguf"
    proc = subprocess.run([CARVE, "export", str(kept(model)), "--gguf", str(gguf), "--type", kind, "--overwrite",
                           "--json", "--quiet"], capture_output=True, text=True, check=True)  # fmt: skip
    exported = json.loads(proc.stdout[proc.stdout.index("{") :])
    r = run_gguf(gguf, ref["blocks"], decode_tokens=1)
    pairs = zip(r["top1"], ref["top1"], strict=True)
    same = sum(a == b for x, y in pairs for a, b in zip(x[:-1], y[:-1], strict=True))
    total = sum(len(x) - 1 for x in r["top1"])
    return {"architecture": exported["architecture"], "file_mb": round(gguf.stat().st_size / 1e6, 1),
            "llamacpp_ppl": round(r["ppl"], 4), "transformers_ppl": round(ref["ppl"], 4),
            "top1_agreement": round(same / total, 5), "positions": total}  # fmt: skip


def speed_row(kind: str, block: list[int], rounds: int = 3) -> dict[str, Any]:
    """Decode and prefill tokens/s of the two specialists' GGUFs, alternately, best of `rounds`."""
    from llamacpp import run_gguf

    runs: dict[str, list[dict[str, Any]]] = {"dense": [], "moe": []}
    for _ in range(rounds):
        for name in runs:
            runs[name].append(run_gguf(OUT / f"moe-gguf-{name}.{kind}.gguf", [block], decode_tokens=64, quality=False))
    keys = ("prefill_tokens_per_s", "decode_tokens_per_s")
    return {n: {k: round(max(r[k] for r in rs), 1) for k in keys} for n, rs in runs.items()} | {"rounds": rounds}


def gguf_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "## The MoE specialist in llama.cpp (`carve export` of the upcycled SmolLM2 MoE, 50% SparseGPT)",
        "",
        "bench/moe.py --gguf. The SparseGPT seed-0 specialists of the MoE (each expert pruned) and of the dense "
        "model (the commands of the `moe` table's first rows, outputs kept), each exported by `carve export` and run "
        "in llama.cpp (llama-cpp-python 0.3.36 built from source, 2 threads) on the first 16 held-out legal blocks "
        "of 512 tokens: perplexity there and in transformers (float32, the saved specialist) on the same blocks, "
        "and the share of positions where llama.cpp's top-1 next token is transformers'. Speed: tokens/s in "
        "llama.cpp, the two GGUFs of a type alternately in the same run, best of 3 (64 decoded tokens after a "
        "512-token prompt).",
        "",
        "| specialist | type | llama.cpp arch | file MB | llama.cpp ppl | transformers ppl | top-1 agreement "
        "| prefill tok/s | decode tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    commits = set()
    for kind in GGUF_TYPES:
        speed = rows.get(f"gguf/{kind}/speed", {})
        for model in ("dense", "moe"):
            r = rows.get(f"gguf/{model}/{kind}")
            if r is None:
                continue
            commits.add(r["commit"])
            sp = speed.get(model, {})
            lines.append(
                f"| {model} | {kind} | {r['architecture']} | {r['file_mb']} | {r['llamacpp_ppl']:.3f} "
                f"| {r['transformers_ppl']:.3f} | {r['top1_agreement']:.4f} "
                f"| {sp.get('prefill_tokens_per_s', '-')} | {sp.get('decode_tokens_per_s', '-')} |"
            )
    return _closed(lines, commits)


def run_gguf_rows(rows: dict[str, dict[str, Any]]) -> None:
    refs = {}
    for model in ("dense", "moe"):
        rid = f"gguf/{model}/reference"
        if rid not in rows:
            rows[rid] = {"id": rid, **carve_worker(__file__, {"model": str(kept(model))}), "commit": commit()}
            save_result(RESULTS, rows[rid])
        refs[model] = rows[rid]
    for kind in GGUF_TYPES:
        for model in ("dense", "moe"):
            rid = f"gguf/{model}/{kind}"
            if rid not in rows:
                print(f"running {rid}", flush=True)
                rows[rid] = {"id": rid, **gguf_row(model, kind, refs[model]), "commit": commit()}
                save_result(RESULTS, rows[rid])
        rid = f"gguf/{kind}/speed"
        if rid not in rows:
            print(f"running {rid}", flush=True)
            rows[rid] = {"id": rid, **speed_row(kind, refs["dense"]["blocks"][0]), "commit": commit()}
            save_result(RESULTS, rows[rid])
        write_section("moe-gguf", gguf_table(rows))


# `--experts`: (source, share of experts kept); source "moe" is the upcycled MoE, "moe-sparsegpt" its
# SparseGPT seed-0 specialist (`kept("moe")`)
# (and "stream": the same job with `--stream`, one decoder block in memory at a time)
EXPERT_ROWS = [("moe", 0.5, ""), ("moe-sparsegpt", 0.5, ""), ("moe-sparsegpt", 0.75, ""), ("moe", 0.5, "stream")]


def experts_id(source: str, keep: float, mode: str) -> str:
    return f"experts/{source}/{keep}" + (f"/{mode}" if mode else "")


def experts_row(source: str, keep: float, mode: str) -> dict[str, Any]:
    """`carve extract SRC --experts-keep KEEP --domain legal` (speed measured; `--stream` where `mode`
    says so, which measures none); the output deleted."""
    src = MOE_DIR if source == "moe" else kept("moe")
    out = OUT / f"moe-experts-{source}-{keep}"
    cmd = [CARVE, "extract", str(src), "--experts-keep", str(keep), "--domain", "legal", "--quiet", "--out",
           str(out), "--overwrite", *(["--stream"] if mode == "stream" else [])]  # fmt: skip
    speed = timed(cmd)
    m = json.loads((out / "carve.json").read_text())
    shutil.rmtree(out)
    before, after = m["metrics"]["before"], m["metrics"]["after"]
    return {
        "job": "carve.extract", "source": source, "keep": keep, "mode": mode, "experts_kept": m["experts_kept"],
        "parameters_before": m["size"]["parameters_before"], "parameters_after": m["size"]["parameters_after"],
        "domain_ppl_before": before["domain_ppl"], "domain_ppl": after["domain_ppl"],
        "general_ppl_before": before["general_ppl"], "general_ppl": after["general_ppl"],
        "eval_blocks": after["domain_eval_blocks"], "speed": m.get("speed"),
        "seconds": m["timings_s"].get("plan", m["timings_s"]["prune"]),  # the routing pass (streamed: the plan)
        "wall_s": speed["wall_s"], "process_peak_rss_mb": speed["peak_rss_mb"], "data": m["data"],
        "source_fingerprint": m["source"]["fingerprint"],
    }  # fmt: skip


def experts_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "## Whole experts removed from an MoE (`carve extract --experts-keep`, upcycled SmolLM2), legal",
        "",
        "bench/moe.py --experts. Each row one `carve extract SRC --experts-keep F --domain legal` (every MoE block "
        "keeps its heaviest experts by routing mass on the calibration blocks; 64 of 512 tokens, 30% general), "
        "perplexity on the first 32 held-out 512-token blocks before (the source) and after, the job's own speed "
        "measure (decode and prefill of the output against the source, float32, 2 threads), the routing stage's "
        "time (`prune`; streamed: the plan stage's) and the job process's peak RSS; `--stream`: the same job one "
        "decoder block in memory at a time (no speed measure). Sources: the upcycled MoE (4 identical experts a block: "
        "any choice computes the same) and its SparseGPT seed-0 specialist (each expert pruned on its own tokens).",
        "",
        "| source | job | experts kept | parameters | domain ppl before | domain ppl | general ppl before "
        "| general ppl | decode speedup | prefill speedup | routing s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    commits = set()
    for source, keep, mode in EXPERT_ROWS:
        r = rows.get(experts_id(source, keep, mode))
        if r is None:
            continue
        commits.add(r["commit"])
        e, sp = r["experts_kept"], r.get("speed") or {}
        lines.append(
            f"| {source} | {'--stream' if mode else 'in memory'} | {e['kept']} of {e['of']} "
            f"| {r['parameters_after']:,} of {r['parameters_before']:,} "
            f"| {r['domain_ppl_before']:.3f} | {r['domain_ppl']:.3f} | {r['general_ppl_before']:.3f} "
            f"| {r['general_ppl']:.3f} | {sp.get('decode_speedup', '-')} | {sp.get('prefill_speedup', '-')} "
            f"| {r['seconds']:.1f} | {r['process_peak_rss_mb']:.0f} |"
        )
    return _closed(lines, commits)


_SAMPLER = """
import json, subprocess, sys, time
keys = ("VmRSS", "RssAnon", "RssFile")
proc = subprocess.Popen(sys.argv[2:], stdout=subprocess.DEVNULL)
peak, at_peak = dict.fromkeys(keys, 0), {}
while proc.poll() is None:
    try:
        now = {ln.split(":")[0]: int(ln.split()[1]) // 1024 for ln in open(f"/proc/{proc.pid}/status")
               if ln.startswith(keys)}
    except (OSError, ValueError):
        now = {}
    for k in keys:
        if now.get(k, 0) > peak[k]:
            peak[k] = now[k]
            if k == "VmRSS":
                at_peak = now
    time.sleep(0.2)
json.dump({"rc": proc.returncode, "peak": peak, "at_peak": at_peak}, open(sys.argv[1], "w"))
"""


def memory_row(model: str) -> dict[str, Any]:
    """The SparseGPT seed-0 job of `model` with its memory sampled (anonymous and file-backed)."""
    import tempfile

    src = MODEL_DIR if model == "dense" else MOE_DIR
    out = OUT / f"moe-memory-{model}"
    cmd = [CARVE, "extract", "--model", str(src), "--method", "sparsegpt", "--sparsity", "0.5", "--domain", "legal",
           "--seed", "0", "--no-speed", "--quiet", "--out", str(out), "--overwrite"]  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        report = Path(f.name)
    subprocess.run([sys.executable, "-c", _SAMPLER, str(report), *cmd], check=True)
    r = json.loads(report.read_text())
    report.unlink()
    if r["rc"] != 0:
        raise RuntimeError(f"carve extract failed on {model}")
    manifest = json.loads((out / "carve.json").read_text())
    shutil.rmtree(out)
    weights = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    return {"weights_mb": round(weights / 2**20), "peak": r["peak"], "at_peak": r["at_peak"],
            "stages": manifest["peak_rss_after_stage_mb"], "data": manifest["data"],
            "source_fingerprint": manifest["source"].get("fingerprint")}  # fmt: skip


def memory_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "## Where the MoE job's memory goes (`carve extract`, SparseGPT 50%, seed 0)",
        "",
        "bench/moe.py --memory. The job of the `moe` table's first rows, its process's resident memory sampled every "
        "0.2 s from /proc/PID/status: anonymous (RssAnon: what the job needs) and file-backed (RssFile: mapped "
        "checkpoint pages, clean, which the kernel drops under pressure), and the manifest's peak RSS after each "
        "stage (the peak so far). Weights: the float32 checkpoint's size on disk.",
        "",
        "| model | weights MB | peak RSS MB | of it anonymous / file-backed | peak anonymous MB | after load | "
        "after prune | after evaluation | after save |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    commits = set()
    for model in ("dense", "moe"):
        r = rows.get(f"memory/{model}")
        if r is None:
            continue
        commits.add(r["commit"])
        st = r["stages"]
        lines.append(
            f"| {model} | {r['weights_mb']} | {r['peak']['VmRSS']} | {r['at_peak'].get('RssAnon')} / "
            f"{r['at_peak'].get('RssFile')} | {r['peak']['RssAnon']} | {st['load_model']:.0f} | {st['prune']:.0f} | "
            f"{st['evaluate_after']:.0f} | {st['save']:.0f} |"
        )
    return _closed(lines, commits)


def main() -> None:
    if "--worker" in sys.argv:
        print(json.dumps(worker(json.loads(sys.argv[sys.argv.index("--worker") + 1]))))
        return
    rows = load_results(RESULTS)
    facts = ensure_moe()
    if "--gguf" in sys.argv:
        run_gguf_rows(rows)
        print(gguf_table(rows))
        return
    rerun = set(sys.argv[sys.argv.index("--rerun") + 1 :]) if "--rerun" in sys.argv else set()
    if "--experts" in sys.argv:
        for source, keep, mode in EXPERT_ROWS:
            rid = experts_id(source, keep, mode)
            if rid not in rows or rid in rerun:
                print(f"running {rid}", flush=True)
                rows[rid] = {"id": rid, **experts_row(source, keep, mode), "commit": commit()}
                save_result(RESULTS, rows[rid])
                write_section("moe-experts", experts_table(rows))
        write_section("moe-experts", experts_table(rows))
        print(experts_table(rows))
        return
    if "--memory" in sys.argv:
        for model in ("dense", "moe"):
            if f"memory/{model}" not in rows or f"memory/{model}" in rerun:
                print(f"running memory/{model}", flush=True)
                rows[f"memory/{model}"] = {"id": f"memory/{model}", **memory_row(model), "commit": commit()}
                save_result(RESULTS, rows[f"memory/{model}"])
        write_section("moe-memory", memory_table(rows))
        print(memory_table(rows))
        return
    if "--table-only" not in sys.argv:
        for model, method, seed, extra in ROWS:
            rid = row_id(model, method, seed)
            if rid in rows and rid not in rerun:
                continue
            print(f"running {rid}", flush=True)
            row = {"id": rid, **run(model, method, seed, extra), "commit": commit()}
            save_result(RESULTS, row)
            rows[rid] = row
            write_section("moe", table(rows, facts))
    text = table(rows, facts)
    write_section("moe", text)
    print(text)


if __name__ == "__main__":
    main()
