"""Probe for issue 4: which 15 of the embedded default's 30 blocks to drop (before any recovery)?

Compares the held-out perplexity (8 x 512-token blocks of each corpus) of the model with 15 blocks
dropped by four rules:
  - per-block angular distance (carve's default `--drop-rule distance`, as ShortGPT);
  - the contiguous span of 15 blocks whose input and output are closest in angle (Gromov et al.
    2024, arXiv 2403.17887), also with the last block forced to stay;
  - greedy: drop one block at a time, the one whose removal gives the lowest calibration loss on 2
    calibration blocks (carve's `--drop-rule greedy`, `greedy_drop_order`).

Usage: `python bench/depth_rules.py [legal|code]`; prints one JSON line per rule, writes
`bench/results/depth_rules_<domain>.json` and its section of bench/RESULTS.md (`--table-only`:
only the section, from the saved results). About 15 minutes on 2 cores (most of it the greedy search).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import carve
from carve.engines.blocks import angular_distance, block_distances, greedy_drop_order, run_hooked
from carve.engines.layerwise import split_hidden
from carve.evaluation.perplexity import perplexity
from carve.models.anatomy import anatomy
from carve.ops.plan import Plan, Shape, evenly_spaced
from carve.ops.structure import apply_plan, shared_copy
from carve.pipeline import calibration_data
from common import write_section

HERE = Path(__file__).resolve().parent
MODEL = HERE / "out" / "smollm2-f32"  # written by bench/structured.py (ensure_model)
N = 15


def table() -> str:
    lines = [
        "# Which blocks to drop (bench/depth_rules.py)",
        "",
        f"{N} of the 30 blocks of the embedded default dropped, widths untouched, no recovery; perplexity on the "
        "first 8 held-out 512-token blocks of each corpus (the structured table uses 16). Calibration: 64 x 512 "
        "blocks, 0.3 general; distances on 16 of them, the greedy search's loss on 2.",
        "",
        "| domain | rule | dropped blocks | domain ppl | general ppl |",
        "|---|---|---|---|---|",
    ]
    for path in sorted((HERE / "results").glob("depth_rules_*.json")):
        res = json.loads(path.read_text())
        for r in res["rows"]:
            dropped = ", ".join(map(str, r["dropped"])) or "none"
            lines.append(
                f"| {res['domain']} | {r['rule']} | {dropped} | {r['domain_ppl']:.3f} | {r['general_ppl']:.3f} |"
            )
        lines.append(f"| {res['domain']} | greedy search time | | {res['greedy_seconds']} s | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if "--table-only" in sys.argv:
        write_section("depth_rules", table())
        print(table())
        return
    torch.manual_seed(0)
    domain_name = sys.argv[1] if len(sys.argv) > 1 else "legal"
    lm = carve.load_model(str(MODEL))
    model = lm.model.eval()
    dom, gen = carve.Corpus(domain_name), carve.Corpus("general")
    calib = calibration_data(lm.tokenizer, dom, gen, 64, 512, 0.3, 0)
    held_dom = dom.eval_blocks(lm.tokenizer, 8, 512)
    held_gen = gen.eval_blocks(lm.tokenizer, 8, 512)
    search = evenly_spaced(calib, 2)
    anat = anatomy(model)
    n_blocks = len(anat.blocks)

    def full(drop: list[int]) -> Plan:
        return Plan(
            Shape(anat.kv_heads, anat.intermediate, len(drop)),
            [list(range(anat.kv_heads))] * n_blocks,
            [list(range(anat.intermediate))] * n_blocks,
            sorted(drop),
        )

    # the hidden states entering every block and leaving the last (for the span distances)
    blocks = anat.blocks
    states: list[list[torch.Tensor]] = [[] for _ in range(n_blocks + 1)]

    def pre(i: int) -> Any:
        def f(_m: Any, args: Any, kwargs: Any) -> None:
            x, _ = split_hidden(args, kwargs)
            states[i].append(x.detach().float())

        return f

    def post(_m: Any, args: Any, kwargs: Any, out: Any) -> None:
        states[n_blocks].append((out[0] if isinstance(out, (tuple, list)) else out).detach().float())

    hooks = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    hooks.append(blocks[-1].register_forward_hook(post, with_kwargs=True))
    with torch.no_grad():
        run_hooked(model, evenly_spaced(calib, 16), hooks, 4, "hidden states")
    xs = [torch.cat(s).reshape(-1, s[0].shape[-1]) for s in states]

    def angle(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(angular_distance(a, b).mean())

    d = block_distances(model, evenly_spaced(calib, 16))
    spans = [(angle(xs[start], xs[start + N]), start) for start in range(n_blocks - N + 1)]
    s0 = min(spans)[1]
    s1 = min((s, start) for s, start in spans if start + N < n_blocks)[1]
    rules: dict[str, list[int]] = {
        "dense": [],
        "per-block distance (carve default)": sorted(d.argsort()[:N].tolist()),
        "contiguous span (Gromov)": list(range(s0, s0 + N)),
        "span, last block kept": list(range(s1, s1 + N)),
    }
    out: dict[str, Any] = {"domain": domain_name, "rows": []}

    def report(name: str, drop: list[int]) -> None:
        with torch.no_grad():
            trial = apply_plan(shared_copy(model), full(drop))
            row = {
                "rule": name,
                "dropped": drop,
                "domain_ppl": perplexity(trial, held_dom),
                "general_ppl": perplexity(trial, held_gen),
            }
        out["rows"].append(row)
        print(json.dumps(row), flush=True)

    for name, drop in rules.items():
        report(name, drop)
    t = time.time()
    greedy, losses = greedy_drop_order(model, search, N)  # carve's `--drop-rule greedy`
    print("greedy", greedy, losses, flush=True)
    report("greedy by calibration loss (carve --drop-rule greedy)", sorted(greedy))
    out["greedy_seconds"] = round(time.time() - t)
    print(json.dumps(out))
    (HERE / "results" / f"depth_rules_{domain_name}.json").write_text(json.dumps(out, indent=1) + "\n")
    write_section("depth_rules", table())


if __name__ == "__main__":
    main()
