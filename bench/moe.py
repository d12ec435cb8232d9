"""Pruning a mixture-of-experts model's experts (carve.models.experts) at real size, on real weights.

No MoE checkpoint can be had here (hub only), so the bench builds one from the embedded default by
sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): a Mixtral with SmolLM2-135M's attention,
norms and embeddings, and 4 experts per block, each a copy of that block's MLP, top-2 routing by a
seeded random router (N(0, 1/576), so tokens spread over the experts).  Identical experts make the
MoE compute what the dense model does whatever the routing (checked when it is built: the logits
agree), so its "before" is the dense model's and pruning is what tells the two apart: each expert is
pruned on the tokens its router sends it, and the four copies of an MLP come out pruned differently.

    .venv/bin/python bench/moe.py [--rerun ID ...] [--table-only]

Rows, each one `carve extract` (the CLI) on the legal corpus at 50%, seeds as listed; the output's
weights are deleted, its manifest's metrics and data fingerprints kept (bench/results/moe.jsonl):
- dense SmolLM2 and the MoE, SparseGPT (seeds 0-2), Wanda and dual-obs (seed 0);
- the MoE with `--exclude '*experts*'` added: what carve did before its experts were pruned (only
  the attention pruned; the experts, most of the blocks' weights, dense).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    HERE,
    MODEL_DIR,
    OUT,
    ROOT,
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


def ensure_moe() -> dict[str, Any]:
    """The upcycled MoE (built once): its facts, with the largest logit difference from the dense model."""
    facts = MOE_DIR / "upcycled.json"
    if facts.exists():
        return dict(json.loads(facts.read_text()))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, MixtralForCausalLM

    ensure_model()
    dense = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    c = dense.config
    cfg = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=True, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K, sliding_window=None, router_jitter_noise=0.0, dtype="float32",
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
            elif name.endswith("experts.gate_up_proj"):
                mlp = name.removesuffix("experts.gate_up_proj")
                p.copy_(torch.cat([src[mlp + "gate_proj.weight"], src[mlp + "up_proj.weight"]]).expand_as(p))
            elif name.endswith("experts.down_proj"):
                p.copy_(src[name.removesuffix("experts.down_proj") + "down_proj.weight"].expand_as(p))
            else:
                raise RuntimeError(f"nothing to upcycle {name} from")
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


def _mean_spread(xs: list[float], digits: int = 3) -> str:
    m = sum(xs) / len(xs)
    return f"{m:.{digits}f}" + (f" ± {(max(xs) - min(xs)) / 2:.{digits}f}" if len(xs) > 1 else "")


def table(rows: dict[str, dict[str, Any]], facts: dict[str, Any]) -> str:
    lines = [
        "## Mixture-of-experts: each expert pruned (`carve extract` on an upcycled SmolLM2), legal, 50%",
        "",
        f"bench/moe.py. The MoE: the embedded default (float32) upcycled to a Mixtral with {facts['experts']} "
        f"experts per block, each a copy of the block's MLP, top-{facts['top_k']} routing by a seeded random router "
        f"({facts['parameters']:,} parameters against {facts['dense_parameters']:,}; its logits equal the dense "
        f"model's within {facts['max_logit_diff_vs_dense']:.1e}). Each row is one `carve extract --sparsity 0.5 "
        "--domain legal` with the method's defaults (64 calibration blocks of 512 tokens; SparseGPT and Wanda mix "
        "30% general text in), perplexity on the first 16 held-out 512-token blocks; mean ± half the range over the "
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
    lines += ["", f"Rows measured at carve commit(s) {', '.join(sorted(commits))}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    rows = load_results(RESULTS)
    facts = ensure_moe()
    if "--table-only" not in sys.argv:
        rerun = set(sys.argv[sys.argv.index("--rerun") + 1 :]) if "--rerun" in sys.argv else set()
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
