"""`carve` command line: flags map one to one onto the Recipe; it imports only the public API."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import carve
from carve.cli.flags import add_recipe_flags, recipe_from
from carve.corpora import builtin_corpora
from carve.finetune import FinetuneRecipe, finetune
from carve.ops.plan import DROP_RULES
from carve.progress import set_quiet
from carve.scorers import SCORERS

_UNSET = object()  # a recipe flag the user did not give


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON summary")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, bfloat16 on CUDA"
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")


def _data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domain", default="legal", help="builtin corpus name or path (default: legal)")
    p.add_argument(
        "--general",
        "--general-corpus",
        dest="general",
        default="general",
        help="open-domain corpus: builtin name or path (default: general)",
    )
    p.add_argument("--text-field", default="text", help="text field of .jsonl / .parquet / datasets corpora")
    p.add_argument("--block-len", type=int, default=512, help="tokens per calibration and eval block")
    p.add_argument("--eval-blocks", type=int, default=32, help="held-out blocks per corpus for perplexity")
    p.add_argument("--cloze-items", type=int, default=100, help="held-out domain cloze items (0: skip the cloze task)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carve", description=carve.__doc__)
    parser.add_argument("--version", action="version", version=f"carve {carve.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("extract", help="prune a model into a domain specialist")
    ex.add_argument(
        "--model", default=None, help="'default' (embedded SmolLM2-135M-Instruct), a directory, a .gguf or a hub id"
    )
    _data_flags(ex)
    ex.add_argument(
        "--method",
        default=None,
        help=f"scorer: {', '.join(sorted(SCORERS))} (default: dual-obs; wanda with --structure)",
    )
    ex.add_argument("--sparsity", type=float, default=None, help="share of Linear weights to remove (default 0.5)")
    ex.add_argument("--pattern", default=None, help="N:M semi-structured pattern, e.g. 2:4 (keep N of every M)")
    ex.add_argument(
        "--granularity",
        choices=["row", "matrix", "global"],
        default=None,
        help="comparison group (default: the method's paper)",
    )
    ex.add_argument(
        "--mix",
        type=float,
        default=None,
        help="share of calibration blocks from the general corpus (0 = domain only; default 0.3 for "
        "SparseGPT/Wanda, 0 for gradient methods, whose gradients dual-obs takes from these blocks)",
    )
    ex.add_argument(
        "--propagation",
        choices=["pruned", "dense", "fused"],
        default="pruned",
        help="calibrate each block on the pruned blocks' outputs (sequential, default), on the dense "
        "model's (one pass per block, faster), or fused: one forward of all calibration blocks at once, "
        "each Linear pruned as its input arrives (one pass, more memory)",
    )
    ex.add_argument(
        "--calib-dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype the calibration forwards compute in (autocast; statistics, scoring and pruning run in "
        "float32, the weights keep --dtype). auto (default): bfloat16 for a float32 model on a device that "
        "multiplies bfloat16 natively (AVX512-BF16/AMX CPU, CUDA), else the model's",
    )
    ex.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=1.0,
        help="dual: weight of general importance against domain importance; dual-obs: weight of the "
        "layer's OBS error against the domain Fisher error (default 1)",
    )
    ex.add_argument(
        "--grad-lr",
        dest="lr",
        type=float,
        default=0.0,
        help="gradient methods: SGD learning rate of steps taken while accumulating (default 0: none)",
    )
    ex.add_argument(
        "--reconstruct",
        dest="reconstruct_mix",
        type=float,
        default=None,
        metavar="MIX",
        help="score-then-mask methods: keep the mask, update kept weights by OBS compensation with a "
        "Hessian from calibration blocks, MIX of them general; dual-obs: MIX of its sweep's Hessian "
        "blocks general (default 0.3)",
    )
    ex.add_argument(
        "--importance",
        default=None,
        help="importance.safetensors of an earlier extract (same model, data, method) to reuse",
    )
    st = ex.add_argument_group("structured extraction (a smaller dense model)")
    st.add_argument(
        "--structure",
        action="store_true",
        help="remove whole MLP channels, key/value head groups and decoder blocks instead of single weights",
    )
    st.add_argument(
        "--keep",
        type=float,
        default=None,
        help="share of decoder-block parameters kept (default 0.5); carve chooses the split between MLP "
        "width, heads and depth by the calibration loss of each candidate",
    )
    st.add_argument("--mlp-keep", type=float, default=None, help="share of MLP channels kept in every block")
    st.add_argument(
        "--heads-keep", type=float, default=None, help="share of attention heads kept, in whole key/value groups"
    )
    st.add_argument("--drop-blocks", type=int, default=None, help="number of decoder blocks removed")
    st.add_argument(
        "--drop-rule",
        choices=DROP_RULES,
        default=None,
        help="which blocks go: distance (default; least change between a block's input and output, one pass) "
        "or greedy (one at a time, the removal that raises the calibration loss least; about 13 min for "
        "15 of 30 blocks of the embedded default on 2 CPU cores)",
    )
    st.add_argument(
        "--bias-compensation",
        action="store_true",
        help="keep the removed heads' and channels' mean contribution as a bias (FLAP; configs with "
        "mlp_bias / attention_bias, e.g. Llama)",
    )
    ex.add_argument(
        "--no-speed",
        dest="speed",
        action="store_false",
        default=True,
        help="skip measuring prefill / decode tokens/s of the dense and extracted models",
    )
    ex.add_argument("--calib-blocks", type=int, default=64, help="number of calibration blocks")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--include", nargs="+", default=["*"], help="glob patterns of Linear modules to prune")
    ex.add_argument(
        "--exclude", nargs="+", default=None, help="glob patterns to leave dense (default: embeddings, lm_head, norms)"
    )
    ex.add_argument("--batch-size", type=int, default=8, help="calibration blocks per forward pass")
    ex.add_argument("--recipe", help="YAML/JSON recipe (or a carve.json manifest) to start from; flags override it")
    ex.add_argument("--out", default=None, help="output directory (written atomically)")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output directory or file")
    ex.add_argument(
        "--save-mask", default=None, metavar="FILE", help="also write the mask, bit-packed (no --out needed)"
    )
    ex.add_argument(
        "--save-importance", default=None, metavar="FILE", help="also write the importance map (no --out needed)"
    )
    ex.add_argument("--report", action="store_true", help="write report.html and report.md into the output")
    _common(ex)
    # recipe flags the user did not give stay unset, so a --recipe file's values are not
    # overridden by defaults (the Recipe dataclass holds the defaults)
    ex.set_defaults(**{f.name: _UNSET for f in fields(carve.Recipe)})

    ev = sub.add_parser("eval", help="perplexity of a model on general and domain held-out text")
    ev.add_argument("model", nargs="?", default=None, help="'default', a directory, a .gguf or a hub id")
    _data_flags(ev)
    ev.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        help="also run lm-evaluation-harness tasks (carve_cloze_legal/code/general, lm-eval's, or --include-path "
        "ones); results go into MODEL/carve.json when MODEL is a carve output",
    )
    ev.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAMLs (e.g. a local JSONL set)")
    ev.add_argument("--limit", type=int, default=None, help="lm-eval: first N documents of each task only")
    _common(ev)

    rc = sub.add_parser("recover", help="distil a pruned model back towards its dense teacher")
    rc.add_argument("model", help="the pruned model: a carve output directory (or any model source)")
    rc.add_argument("--teacher", default=None, help="dense teacher (default: the source named in MODEL/carve.json)")
    _data_flags(rc)
    rc.add_argument(
        "--eval-domain",
        default=None,
        help="corpus whose held-out split measures the domain (default: --domain's own held-out split)",
    )
    rc.add_argument("--mix", type=float, default=0.5, help="share of training blocks from the general corpus")
    rc.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    rc.add_argument("--batch-size", type=int, default=1, help="blocks per step (default 1)")
    rc.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4; 1e-3 with --lora)")
    rc.add_argument("--warmup", type=int, default=10, help="linear warm-up steps, then cosine decay to 10%%")
    rc.add_argument("--temperature", type=float, default=1.0, help="distillation temperature T")
    rc.add_argument("--kd-weight", type=float, default=1.0, help="weight of T²·KL(teacher ‖ student)")
    rc.add_argument("--lm-weight", type=float, default=0.0, help="weight of the next-token cross-entropy")
    rc.add_argument("--lora", type=int, default=0, metavar="RANK", help="train LoRA adapters of this rank (PEFT)")
    rc.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    rc.add_argument("--seed", type=int, default=0)
    rc.add_argument("--out", required=True, help="output directory (written atomically)")
    rc.add_argument("--overwrite", action="store_true", help="replace an existing output (and its checkpoint)")
    rc.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.checkpoint")
    _common(rc)

    ft = sub.add_parser("finetune", help="sparse fine-tuning: train only the weights where the domain lives")
    ft.add_argument("model", nargs="?", default=None, help="'default' (embedded), a directory, a .gguf or a hub id")
    add_recipe_flags(ft, FinetuneRecipe, skip=("model",))
    ft.add_argument("--out", required=True, help="output directory (written atomically)")
    ft.add_argument("--overwrite", action="store_true", help="replace an existing output (and its checkpoint)")
    ft.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.checkpoint")
    ft.add_argument("--no-cache", dest="cache", action="store_false", help="evaluate the source model anew")
    ft.add_argument("--quiet", action="store_true", help="no progress bars")
    ft.add_argument("--json", action="store_true", help="print a machine-readable JSON summary")

    ins = sub.add_parser("inspect", help="per-layer sparsity, two masks' overlap, top modules by importance")
    ins.add_argument("target", help="a carve output directory, a mask or an importance file")
    ins.add_argument("other", nargs="?", default=None, help="a second one: the overlap of the two masks per layer")
    ins.add_argument("--top", type=int, default=10, help="modules listed by mean importance (default 10)")
    ins.add_argument("--json", action="store_true")
    rp = sub.add_parser("report", help="an HTML page (and Markdown summary) comparing carve outputs")
    rp.add_argument("targets", nargs="+", help="carve output directories (and/or mask / importance files)")
    rp.add_argument("--out", default="carve-report.html", help="HTML file to write (default carve-report.html)")
    rp.add_argument("--json", action="store_true")

    co = sub.add_parser("corpora", help="list the builtin corpora")
    co.add_argument("--json", action="store_true")
    me = sub.add_parser("methods", help="list the registered scorers")
    me.add_argument("--json", action="store_true")
    return parser


def _recipe(args: argparse.Namespace) -> carve.Recipe:
    names = {f.name for f in fields(carve.Recipe)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not _UNSET}
    base = carve.Recipe.load(args.recipe) if args.recipe else carve.Recipe()
    return carve.Recipe(**{**asdict(base), **given})


def _cloze(m: dict[str, Any]) -> str:
    c = m.get("domain_cloze")
    if not c:
        return "-"
    lo, hi = c["ci95"]
    return f"{c['accuracy']:.3f} [{lo:.2f}, {hi:.2f}] n={c['items']}"


def _cmd_extract(args: argparse.Namespace) -> dict[str, Any]:
    if args.out is None and args.save_mask is None and args.save_importance is None:
        raise carve.UsageError("--out is required (or --save-mask / --save-importance to keep only those)")
    if args.report and args.out is None:
        raise carve.UsageError("--report writes into the output directory: give --out")
    manifest = carve.extract(
        _recipe(args),
        args.out,
        overwrite=args.overwrite,
        save_mask=args.save_mask,
        save_importance=args.save_importance,
    )
    if args.report:
        from carve.report import write_report

        write_report([args.out], Path(args.out) / "report.html", Path(args.out) / "report.md")
    before, after = manifest["metrics"]["before"], manifest["metrics"]["after"]
    r = manifest["recipe"]
    size, speed = manifest["size"], manifest.get("speed")
    structured = manifest.get("structure")
    if structured:
        shape = structured["shape"]
        what = (
            f"structured by {r['method']}: {shape['kv_groups']} key/value groups, {shape['mlp_channels']} MLP "
            f"channels, {manifest['structure']['config']['num_hidden_layers']} blocks"
        )
        last = f"{size['parameters_after'] / size['parameters_before']:.3f} of the parameters"
    else:
        what = f"{r['method']}, sparsity {r['sparsity']:g}{', ' + r['pattern'] if r['pattern'] else ''}"
        last = f"linear sparsity {manifest['sparsity']['linear']:.4f}"
    if not args.json:
        dest = args.out or ", ".join(x for x in (args.save_mask, args.save_importance) if x)
        sweep = f", OBS mix {r['reconstruct_mix']:g}" if r.get("reconstruct_mix") is not None else ""
        print(f"\n{manifest['source']['model']} -> {dest}  ({what}, mix {r['mix']:g}{sweep})")
        print(
            _table(
                [
                    [
                        "",
                        f"domain ppl ({r['domain']})",
                        f"general ppl ({r['general']})",
                        "domain cloze acc",
                        "parameters",
                        "decode tok/s",
                    ],
                    [
                        "dense",
                        f"{before['domain_ppl']:.3f}",
                        f"{before['general_ppl']:.3f}",
                        _cloze(before),
                        f"{size['parameters_before']:,}",
                        f"{speed['dense']['decode_tokens_per_s']:.1f}" if speed else "-",
                    ],
                    [
                        "extracted",
                        f"{after['domain_ppl']:.3f}",
                        f"{after['general_ppl']:.3f}",
                        _cloze(after),
                        f"{size['parameters_after']:,}",
                        f"{speed['extracted']['decode_tokens_per_s']:.1f} ({speed['decode_speedup']:.2f}x)"
                        if speed
                        else "-",
                    ],
                ]
            )
        )
        print(last + (f"; {size['file_mb']:.1f} MB of safetensors" if "file_mb" in size else ""))
        print(
            f"perplexity over {after['domain_eval_blocks']} / {after['general_eval_blocks']} held-out blocks of "
            f"{after['block_len']} tokens; peak RSS {manifest['peak_rss_mb']:.0f} MB; "
            f"prune {manifest['timings_s']['prune']:.1f} s"
        )
    return {
        "out": args.out,
        "metrics": manifest["metrics"],
        "sparsity": {k: v for k, v in manifest.get("sparsity", {}).items() if k != "per_module"} or None,
        "structure": {k: v for k, v in (structured or {}).items() if k != "candidates"} or None,
        "size": size,
        "speed": speed,
        "timings_s": manifest["timings_s"],
        "peak_rss_mb": manifest["peak_rss_mb"],
    }


def _cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    domain, general = carve.Corpus(args.domain, args.text_field), carve.Corpus(args.general, args.text_field)
    lm = carve.load_model(args.model, dtype=args.dtype, device=args.device)
    m = carve.evaluate(
        lm, domain, general, blocks=args.eval_blocks, block_len=args.block_len, cloze_items=args.cloze_items
    )
    if not args.json:
        print(
            _table(
                [
                    ["model", f"domain ppl ({args.domain})", f"general ppl ({args.general})", "domain cloze acc"],
                    [lm.source, f"{m['domain_ppl']:.3f}", f"{m['general_ppl']:.3f}", _cloze(m)],
                ]
            )
        )
        print(
            f"perplexity over {m['domain_eval_blocks']} / {m['general_eval_blocks']} held-out blocks "
            f"of {m['block_len']} tokens"
        )
    summary: dict[str, Any] = {"model": lm.source, "fingerprint": lm.fingerprint, "metrics": m}
    if args.tasks:
        from carve.evaluation.lm_eval_bridge import run_tasks

        tasks = run_tasks(lm.model, lm.tokenizer, args.tasks, include_path=args.include_path, limit=args.limit)
        summary["tasks"] = tasks
        if not args.json:
            rows = [["task", "acc", "acc_norm", "other metrics"]]
            for name, t in tasks.items():
                acc = [
                    f"{t[k]:.4f} ± {t.get(k + '_stderr', float('nan')):.4f}" if k in t else "-"
                    for k in ("acc", "acc_norm")
                ]
                rest = ", ".join(f"{k} {v:.4g}" for k, v in t.items() if not k.startswith(("acc", "alias")))
                rows.append([name, *acc, rest or "-"])
            print(_table(rows))
        manifest = Path(str(args.model or "")).expanduser() / "carve.json"
        if manifest.is_file():  # a carve output: its manifest records the task results
            data = json.loads(manifest.read_text())
            data["tasks"] = {**(data.get("tasks") or {}), **tasks}
            data["tasks_settings"] = {"limit": args.limit, "include_path": args.include_path, "harness": "lm-eval"}
            tmp = manifest.with_suffix(".json.carve-tmp")
            tmp.write_text(json.dumps(data, indent=2) + "\n")
            tmp.replace(manifest)
    return summary


def _cmd_recover(args: argparse.Namespace) -> dict[str, Any]:
    from carve.recover import RecoverRecipe, recover

    names = {f.name for f in fields(RecoverRecipe)}
    recipe = RecoverRecipe(**{k: v for k, v in vars(args).items() if k in names})
    manifest = recover(recipe, args.out, overwrite=args.overwrite, resume=args.resume)
    m, t = manifest["metrics"], manifest["training"]
    if not args.json:
        rows = [
            ["", f"domain ppl ({args.eval_domain or args.domain})", f"general ppl ({args.general})", "domain cloze acc"]
        ]
        for key, name in (("dense", "dense teacher"), ("before", "pruned"), ("after", "recovered")):
            if m[key]:
                rows.append([name, f"{m[key]['domain_ppl']:.3f}", f"{m[key]['general_ppl']:.3f}", _cloze(m[key])])
        print(f"\n{manifest['source']['model']} -> {args.out}  (teacher {manifest['teacher']['model']})")
        print(_table(rows))
        print(
            f"{t['steps']} steps, {t['tokens']:,} tokens, loss {t['loss_first']:.4f} -> {t['loss_last']:.4f}; "
            f"train {manifest['timings_s']['train']:.0f} s; peak RSS {manifest['peak_rss_mb']:.0f} MB"
        )
    return {k: manifest[k] for k in ("metrics", "sparsity", "size", "timings_s", "peak_rss_mb")} | {
        "out": args.out,
        "training": {k: v for k, v in t.items() if k != "losses"},
    }


def _cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    manifest = finetune(
        recipe_from(args, FinetuneRecipe), args.out, overwrite=args.overwrite, resume=args.resume, cache=args.cache
    )
    m, t, tr = manifest["metrics"], manifest["training"], manifest["trainable"]
    if not args.json:
        rows = [["", f"domain ppl ({args.domain})", f"general ppl ({args.general})", "domain cloze acc"]]
        for key, name in (("before", "source"), ("after", "fine-tuned")):
            rows.append([name, f"{m[key]['domain_ppl']:.3f}", f"{m[key]['general_ppl']:.3f}", _cloze(m[key])])
        print(f"\n{manifest['source']['model']} -> {args.out}  (trainable: {tr['kind']}, {tr['parameters']:,} entries)")
        print(_table(rows))
        print(
            f"{t['steps']} steps, {t['tokens']:,} tokens, loss {t['loss_first']:.4f} -> {t['loss_last']:.4f}; "
            f"optimizer state {t['optimizer_state_mb']:.1f} MB; train {manifest['timings_s']['train']:.0f} s; "
            f"peak RSS {manifest['peak_rss_mb']:.0f} MB"
        )
    return {k: manifest[k] for k in ("metrics", "trainable", "size", "timings_s", "peak_rss_mb")} | {
        "out": args.out,
        "training": {k: v for k, v in t.items() if k != "losses"},
    }


def _cmd_inspect(args: argparse.Namespace) -> dict[str, Any]:
    from carve.inspect import load_run, per_layer_overlap, per_layer_sparsity, top_modules

    run = load_run(args.target)
    other = load_run(args.other) if args.other else None
    facts: dict[str, Any] = {"target": args.target}
    if run.manifest:
        from carve.report import run_row

        facts["summary"] = {k: v for k, v in run_row(run).items() if v not in (None, {})}
    if run.mask is not None:
        per = per_layer_sparsity(run.mask)
        kinds = sorted({k for v in per.values() for k in v})
        facts["sparsity"] = {"overall": run.mask.sparsity(), "per_layer": per}
    if other is not None:
        if run.mask is None or other.mask is None:
            raise carve.UsageError("comparing two targets needs a mask in each (an unstructured extract's output)")
        facts["overlap"] = {
            "jaccard": run.mask.jaccard(other.mask),
            "per_layer": per_layer_overlap(run.mask, other.mask),
        }
    if run.importance is not None:
        facts["top_modules"] = top_modules(run.importance, args.top)
    if not any(k in facts for k in ("sparsity", "top_modules", "summary")):
        raise carve.UsageError(f"{args.target!r} holds neither a manifest, a mask nor an importance map")
    if args.json:
        return facts
    for k, v in facts.get("summary", {}).items():
        print(f"{k}: {v}")
    if "sparsity" in facts:
        print(f"\nsparsity per block and module (overall {facts['sparsity']['overall']:.4f})")
        rows = [["block", *kinds]]
        rows += [[str(layer), *(_fmt(v.get(k)) for k in kinds)] for layer, v in per.items()]
        print(_table(rows))
    if "overlap" in facts:
        o = facts["overlap"]
        print(f"\nkept-weight overlap, {args.target} (A) vs {args.other} (B): Jaccard {o['jaccard']:.4f}")
        rows = [["block", "Jaccard", "kept by both", "A only", "B only", "neither"]]
        rows += [
            [str(r["layer"]), *(f"{r[k]:.4f}" for k in ("jaccard", "both", "only_a", "only_b", "neither"))]
            for r in o["per_layer"]
        ]
        print(_table(rows))
    if "top_modules" in facts:
        print("\nmodules by mean importance")
        print(_table([["module", "mean score"], *([n, f"{v:.4g}"] for n, v in facts["top_modules"])]))
    return facts


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _cmd_report(args: argparse.Namespace) -> dict[str, Any]:
    from carve.report import write_report

    html_path = Path(args.out)
    facts = write_report(args.targets, html_path, html_path.with_suffix(".md"))
    if not args.json:
        print(f"wrote {html_path} and {html_path.with_suffix('.md')} ({len(facts['rows'])} runs, plots: "
              f"{', '.join(facts['plots']) or 'none'})")  # fmt: skip
    return {"html": str(html_path), "markdown": str(html_path.with_suffix(".md")), **facts}


def _cmd_corpora(args: argparse.Namespace) -> Any:
    rows = builtin_corpora()
    if not args.json:
        print(
            _table(
                [["name", "documents", "KB", "source", "licence"]]
                + [[r["name"], str(r["documents"]), str(r["kilobytes"]), r["source"], r["licence"]] for r in rows]
            )
        )
    return rows


def _cmd_methods(args: argparse.Namespace) -> Any:
    rows: list[dict[str, Any]] = [
        {"name": s.name, "needs_data": s.kind != "weight", "paper": s.paper, "url": s.url} for s in SCORERS.values()
    ]
    if not args.json:
        print(
            _table(
                [["name", "data", "paper"]]
                + [[r["name"], "yes" if r["needs_data"] else "no", f"{r['paper']} {r['url']}"] for r in rows]
            )
        )
    return rows


COMMANDS = {
    "extract": _cmd_extract,
    "recover": _cmd_recover,
    "finetune": _cmd_finetune,
    "inspect": _cmd_inspect,
    "report": _cmd_report,
    "eval": _cmd_eval,
    "corpora": _cmd_corpora,
    "methods": _cmd_methods,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    set_quiet(getattr(args, "quiet", False) or (getattr(args, "json", False) and not sys.stderr.isatty()))
    try:
        summary = COMMANDS[args.command](args)
    except carve.UsageError as exc:
        print(f"carve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("carve: interrupted; nothing was written", file=sys.stderr)
        return 130
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
