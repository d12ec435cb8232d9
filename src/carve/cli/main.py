"""`carve` command line: flags map one to one onto the Recipe; it imports only the public API."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import carve
from carve import distributed
from carve.cli.flags import add_recipe_flags, recipe_from
from carve.corpora import builtin_corpora
from carve.errors import UsageError
from carve.finetune import FinetuneRecipe, finetune
from carve.job import SAVE_DTYPE_HELP, SAVE_DTYPES, held_out_data
from carve.manifest import MANIFEST_FILE, read_manifest
from carve.merge import MergeRecipe
from carve.models.load import resolve_device, resolve_dtype
from carve.output import CACHE_KINDS, cache_dir, cache_usage, claim, clear_cache, write_json
from carve.progress import set_quiet
from carve.recover import RecoverRecipe, recover
from carve.scenario import ScenarioRecipe, build_scenario
from carve.scorers import SCORERS
from carve.selection import SelectRecipe, select
from carve.streamed import evaluate_streamed, streaming_reason
from carve.unlearn import UnlearnRecipe, unlearn


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


def _job_flags(p: argparse.ArgumentParser) -> None:
    """What every job that writes an output takes beside its recipe."""
    p.add_argument("--no-cache", dest="cache", action="store_false", help="evaluate the source model anew")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON summary")


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
        "source",
        nargs="?",
        default=argparse.SUPPRESS,
        metavar="model",
        help="the model, as the other jobs take it (the same as --model)",
    )
    add_recipe_flags(ex, carve.Recipe, unset=True)
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
    _job_flags(ex)

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
    ev.add_argument(
        "--stream",
        action="store_true",
        help="read one decoder block at a time, for models larger than memory (a local safetensors directory; "
        "perplexity only); on by itself when the weights would take more than half the memory available",
    )
    _common(ev)

    rc = sub.add_parser("recover", help="distil a pruned model back towards its dense teacher")
    rc.add_argument("model", help="the pruned model: a carve output directory (or any model source)")
    add_recipe_flags(rc, RecoverRecipe, skip=("model",))
    rc.add_argument("--out", required=True, help="output directory (written atomically)")
    rc.add_argument("--overwrite", action="store_true", help="replace an existing output (and its checkpoint)")
    rc.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.checkpoint")
    _job_flags(rc)

    ft = sub.add_parser("finetune", help="sparse fine-tuning: train only the weights where the domain lives")
    ft.add_argument("model", nargs="?", default=None, help="'default' (embedded), a directory, a .gguf or a hub id")
    add_recipe_flags(ft, FinetuneRecipe, skip=("model",))
    ft.add_argument("--out", required=True, help="output directory (written atomically)")
    ft.add_argument("--overwrite", action="store_true", help="replace an existing output (and its checkpoint)")
    ft.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.checkpoint")
    _job_flags(ft)

    ins = sub.add_parser("inspect", help="per-layer sparsity, two masks' overlap, top modules by importance")
    ins.add_argument("target", help="a carve output directory, a mask or an importance file")
    ins.add_argument("other", nargs="?", default=None, help="a second one: the overlap of the two masks per layer")
    ins.add_argument("--top", type=int, default=10, help="modules listed by mean importance (default 10)")
    ins.add_argument("--json", action="store_true")
    rp = sub.add_parser("report", help="an HTML page (and Markdown summary) comparing carve outputs")
    rp.add_argument("targets", nargs="+", help="carve output directories (and/or mask / importance files)")
    rp.add_argument("--out", default="carve-report.html", help="HTML file to write (default carve-report.html)")
    rp.add_argument("--overwrite", action="store_true", help="replace existing report files")
    rp.add_argument("--json", action="store_true")

    dn = sub.add_parser("densify", help="a sparse-format output as plain weights for stock from_pretrained")
    dn.add_argument("source", help="a carve output written with --save-format sparse")
    dn.add_argument("--out", required=True, help="output directory (written atomically)")
    dn.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    dn.add_argument("--quiet", action="store_true", help="no progress bars")
    dn.add_argument("--json", action="store_true")

    cv = sub.add_parser("convert", help="a carve output (or a model) saved again in another precision or format")
    cv.add_argument("source", help="a carve output directory (dense, sparse, an update) or a model")
    cv.add_argument("--out", required=True, help="output directory (written atomically)")
    cv.add_argument("--save-dtype", choices=list(SAVE_DTYPES), default=None, help=SAVE_DTYPE_HELP)
    cv.add_argument(
        "--save-format",
        choices=["dense", "sparse"],
        default="dense",
        help="dense: plain safetensors for from_pretrained (default); sparse: kept values + bit-packed mask",
    )
    cv.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    cv.add_argument("--quiet", action="store_true", help="no progress bars")
    cv.add_argument("--json", action="store_true")

    xp = sub.add_parser("export", help="a carve output as a GGUF file for llama.cpp, ollama, LM Studio")
    xp.add_argument("source", help="a carve output directory (dense, sparse, structured, an update) or a model")
    xp.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write (atomically)")
    xp.add_argument(
        "--type",
        default="f16",
        choices=["f32", "f16", "bf16", "q8_0", "q4_0", "mxfp4"],
        help="tensor type (default f16; f32: lossless for a float32 output, e.g. to requantize with llama.cpp's "
        "llama-quantize; mxfp4: an MoE's experts in MXFP4, the other matrices q8_0)",
    )
    xp.add_argument("--overwrite", action="store_true", help="replace an existing file")
    xp.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                    help="one decoder block in memory at a time, or refuse (the default for a local safetensors "
                         "directory); --no-stream loads the whole model")  # fmt: skip
    xp.add_argument("--quiet", action="store_true", help="no progress bars")
    xp.add_argument("--json", action="store_true")

    mg = sub.add_parser("merge", help="task models merged into one: TIES, DARE, Breadcrumbs, task arithmetic ...")
    mg.add_argument("config", nargs="?", default=None, help="a mergekit YAML config (instead of --base/--expert ...)")
    add_recipe_flags(mg, MergeRecipe, skip=("experts", "importance", "origin"), unset=True)
    mg.add_argument("--expert", action="append", dest="experts", metavar="NAME=DIR", default=argparse.SUPPRESS,
                    help="an expert fine-tuned from the base; NAME: its domain (builtin corpus or path)")  # fmt: skip
    mg.add_argument("--importance", action="append", dest="importance", metavar="NAME=FILE", default=argparse.SUPPRESS,
                    help="an expert's importance map (--method importance)")  # fmt: skip
    mg.add_argument("--reconstruct", metavar="TASK", default=None,
                    help="rebuild TASK's expert from a --tall output (--merged DIR) instead of merging")  # fmt: skip
    mg.add_argument("--merged", metavar="DIR", default=None, help="the --tall output --reconstruct reads")
    mg.add_argument("--out", required=True, help="output directory (written atomically)")
    mg.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _job_flags(mg)

    ul = sub.add_parser("unlearn", help="make a model forget a corpus, changing only the weights that carry it")
    ul.add_argument("model", help="the model to unlearn from: a directory, a .gguf, a hub id or 'default'")
    add_recipe_flags(ul, UnlearnRecipe, skip=("model",))
    ul.add_argument("--out", required=True, help="output directory (written atomically)")
    ul.add_argument("--overwrite", action="store_true", help="replace an existing output (and its checkpoint)")
    ul.add_argument("--resume", action="store_true", help="continue an interrupted run from OUT.checkpoint")
    _job_flags(ul)

    us = sub.add_parser("unlearn-scenario", help="build the builtin unlearning scenario: forget/retain/holdout "
                        "text, a target and a retain model")  # fmt: skip
    add_recipe_flags(us, ScenarioRecipe)
    us.add_argument("--out", required=True, help="scenario directory (reused when built with the same settings)")
    us.add_argument("--overwrite", action="store_true", help="rebuild a scenario built with other settings")
    us.add_argument("--quiet", action="store_true", help="no progress bars")
    us.add_argument("--json", action="store_true", help="print a machine-readable JSON summary")

    se = sub.add_parser("select", help="choose the pool text most like a target (DSIR, ZIP-FIT) for calibration "
                        "or fine-tuning")  # fmt: skip
    add_recipe_flags(se, SelectRecipe)
    se.add_argument("--out", required=True, metavar="FILE.jsonl", help="the chosen chunks (a manifest goes beside)")
    se.add_argument("--overwrite", action="store_true", help="replace an existing selection")
    se.add_argument("--quiet", action="store_true", help="no progress bars")
    se.add_argument("--json", action="store_true", help="print a machine-readable JSON summary")

    ca = sub.add_parser("cache", help="what carve's cache holds (evaluations, de-quantized GGUF models, "
                        "selections), or clear it")  # fmt: skip
    ca.add_argument("--clear", nargs="*", metavar="KIND", choices=list(CACHE_KINDS), default=None,
                    help=f"remove these kinds ({', '.join(CACHE_KINDS)}; all when none is named)")  # fmt: skip
    ca.add_argument("--json", action="store_true")
    co = sub.add_parser("corpora", help="list the builtin corpora")
    co.add_argument("--json", action="store_true")
    me = sub.add_parser("methods", help="list the registered scorers")
    me.add_argument("--json", action="store_true")
    return parser


def _recipe(args: argparse.Namespace) -> carve.Recipe:
    if hasattr(args, "source"):  # `carve extract MODEL`, as finetune, recover and eval take it
        if getattr(args, "model", args.source) != args.source:
            raise carve.UsageError(f"two models given: {args.source!r} and --model {args.model!r}; give one")
        args.model = args.source
    base = carve.Recipe.load(args.recipe) if args.recipe else None
    return recipe_from(args, carve.Recipe, base)


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
        cache=args.cache,
    )
    if args.report:
        from carve.report import write_report

        write_report([args.out], Path(args.out) / "report.html", Path(args.out) / "report.md")
    before, after = manifest["metrics"]["before"], manifest["metrics"]["after"]
    r = manifest["recipe"]
    size, speed = manifest["size"], manifest.get("speed")
    structured, experts = manifest.get("structure"), manifest.get("experts_kept")
    if experts:
        what = f"{experts['kept']} of {experts['of']} experts kept in each MoE block (by routing mass)"
        last = f"{size['parameters_after'] / size['parameters_before']:.3f} of the parameters"
    elif structured:
        shape = structured["shape"]
        what = (
            f"structured by {r['method']}: {shape['kv_groups']} key/value groups, {shape['mlp_channels']} MLP "
            f"channels, {manifest['structure']['config']['num_hidden_layers']} blocks"
        )
        last = f"{size['parameters_after'] / size['parameters_before']:.3f} of the parameters"
    else:
        what = f"{r['method']}, sparsity {r['sparsity']:g}{', ' + r['pattern'] if r['pattern'] else ''}"
        last = f"linear sparsity {manifest['sparsity']['linear']:.4f}"
    dense = (manifest.get("sparsity") or {}).get("not_pruned_in_blocks") or {}
    if dense and not args.json:
        share = sum(dense.values())
        print(f"carve: note: {share:.0%} of the decoder blocks' parameters are weight matrices left dense, not "
              f"targeted or not Linear layers: {', '.join(sorted(dense, key=lambda k: -dense[k])[:4])}",
              file=sys.stderr)  # fmt: skip
    blind = sorted({re.sub(r"\.\d+\.", ".N.", k) for k in (manifest.get("method_notes") or {}).get(
        "without_calibration_input", [])})  # fmt: skip
    if blind and not args.json:
        print(f"carve: note: weight matrices no calibration input reached (never called by their block, or an MoE "
              f"expert no token was routed to) were pruned by magnitude: {', '.join(blind[:4])}"
              + (f" and {len(blind) - 4} more" if len(blind) > 4 else ""), file=sys.stderr)  # fmt: skip
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
    manifest = Path(str(args.model or "")).expanduser() / MANIFEST_FILE
    if args.tasks and manifest.is_file():
        read_manifest(manifest)  # the task results go into it: a damaged one is refused before the work
    reason = streaming_reason(args.model, resolve_dtype(args.dtype, resolve_device(args.device)), args.stream)
    if reason is not None:
        if args.tasks:
            raise UsageError(f"--tasks runs lm-eval on the whole model in memory; this evaluation streams ({reason})")
        m, fingerprint = evaluate_streamed(
            str(args.model),
            lambda tok: held_out_data(tok, domain, general, args.eval_blocks, args.block_len, 0),
            args.dtype,
            args.device,
        )
        m["streamed"] = {"why": reason, "cloze": "not measured (needs the whole model)"}
        source, lm = str(args.model), None
    else:
        lm = carve.load_model(args.model, dtype=args.dtype, device=args.device)
        m = carve.evaluate(
            lm, domain, general, blocks=args.eval_blocks, block_len=args.block_len, cloze_items=args.cloze_items
        )
        source, fingerprint = lm.source, lm.fingerprint
    if not args.json:
        print(
            _table(
                [
                    ["model", f"domain ppl ({args.domain})", f"general ppl ({args.general})", "domain cloze acc"],
                    [source, f"{m['domain_ppl']:.3f}", f"{m['general_ppl']:.3f}", _cloze(m)],
                ]
            )
        )
        print(
            f"perplexity over {m['domain_eval_blocks']} / {m['general_eval_blocks']} held-out blocks "
            f"of {m['block_len']} tokens"
        )
    summary: dict[str, Any] = {"model": source, "fingerprint": fingerprint, "metrics": m}
    if args.tasks:
        assert lm is not None
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
        if manifest.is_file():  # a carve output: its manifest records the task results
            with claim(manifest):  # one writer at a time; the old manifest or the new one
                data = read_manifest(manifest)
                data["tasks"] = {**(data.get("tasks") or {}), **tasks}
                data["tasks_settings"] = {"limit": args.limit, "include_path": args.include_path, "harness": "lm-eval"}
                write_json(manifest, data)
    return summary


def _cmd_recover(args: argparse.Namespace) -> dict[str, Any]:
    recipe = recipe_from(args, RecoverRecipe)
    manifest = recover(recipe, args.out, overwrite=args.overwrite, resume=args.resume, cache=args.cache)
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
    if run.tall is not None:
        from carve.inspect import tall_categories

        facts["tall"] = {"tasks": list(run.tall), "per_layer": tall_categories(run.tall)}
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
    if "tall" in facts:
        tasks = facts["tall"]["tasks"]
        print("\nTALL masks per block: shares of weights kept by 2+ tasks (shared), 1 (selfish), none (catastrophic)")
        rows = [["block", "shared", "selfish", "catastrophic", *(f"kept: {t}" for t in tasks)]]
        rows += [[str(r["layer"]), *(f"{r[k]:.4f}" for k in ("shared", "selfish", "catastrophic", *tasks))]
                 for r in facts["tall"]["per_layer"]]  # fmt: skip
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
    facts = write_report(args.targets, html_path, html_path.with_suffix(".md"), overwrite=args.overwrite)
    if not args.json:
        print(f"wrote {html_path} and {html_path.with_suffix('.md')} ({len(facts['rows'])} runs, plots: "
              f"{', '.join(facts['plots']) or 'none'})")  # fmt: skip
    return {"html": str(html_path), "markdown": str(html_path.with_suffix(".md")), **facts}


def _cmd_densify(args: argparse.Namespace) -> dict[str, Any]:
    from carve.models.sparse import densify_output

    manifest = densify_output(args.source, args.out, overwrite=args.overwrite)
    if not args.json:
        print(f"{args.source} -> {args.out}: {manifest['size']['file_mb']:.1f} MB of plain safetensors")
    return {"out": args.out, "size": manifest.get("size")}


def _cmd_merge(args: argparse.Namespace) -> dict[str, Any]:
    from carve.merge import from_mergekit, merge

    if args.reconstruct:
        from carve.tall import reconstruct

        if not args.merged:
            raise carve.UsageError("--reconstruct TASK reads a --tall output: give it with --merged DIR")
        rebuilt = reconstruct(args.merged, args.reconstruct, args.out, overwrite=args.overwrite)
        if not args.json:
            print(f"{args.reconstruct}'s expert rebuilt from {args.merged} -> {args.out}")
        return {"out": args.out, **rebuilt["reconstructed"]}
    base = from_mergekit(args.config) if args.config else None
    manifest = merge(recipe_from(args, MergeRecipe, base=base), args.out, overwrite=args.overwrite, cache=args.cache)
    tasks = manifest.get("merge_metrics")
    if not args.json:
        print(f"merged {len(manifest['experts'])} experts ({manifest['method']['name']}) -> {args.out}: "
              f"{manifest['size']['file_mb']:.1f} MB, {manifest['timings_s']['merge']:.1f} s")  # fmt: skip
        if tasks:
            rows = [["task", "base ppl", "expert ppl", "merged ppl", "normalized gain"]]
            for name, t in tasks["per_task"].items():
                rows.append([name, *(f"{t[k]['domain_ppl']:.3f}" for k in ("base", "expert", "merged")),
                             f"{t['normalized_gain']:.3f}" if t["normalized_gain"] is not None else "-"])  # fmt: skip
            print(_table(rows))
            print(f"mean normalized gain {tasks['mean_normalized_gain']}")
    return {"out": args.out, **{k: manifest[k] for k in ("method", "size", "timings_s", "peak_rss_mb")}, "tasks": tasks}


UNLEARN_COLUMNS = (("forget_ppl", "forget ppl", ".3f"), ("verbatim_rougeL", "verbatim ROUGE-L", ".3f"),
                   ("mia_auc", "MIA AUC", ".3f"), ("privleak", "PrivLeak", "+.3f"), ("retain_ppl", "retain ppl", ".3f"),
                   ("general_ppl", "general ppl", ".3f"))  # fmt: skip


def _unlearn_table(rows: dict[str, dict[str, Any] | None]) -> str:
    table = [["", *(label for _, label, _ in UNLEARN_COLUMNS), "retain cloze"]]
    for name, m in rows.items():
        if m:
            cells = [format(m[k], spec) if k in m else "-" for k, _, spec in UNLEARN_COLUMNS]
            table.append([name, *cells, _cloze({"domain_cloze": m["retain_cloze"]}) if "retain_cloze" in m else "-"])
    return _table(table)


def _cmd_unlearn(args: argparse.Namespace) -> dict[str, Any]:
    manifest = unlearn(
        recipe_from(args, UnlearnRecipe), args.out, overwrite=args.overwrite, resume=args.resume, cache=args.cache
    )
    m, t = manifest["metrics"], manifest["training"]
    if not args.json:
        print(f"\n{manifest['source']['model']} -> {args.out}  ({args.objective}, mask {manifest['mask']['kind']}: "
              f"{manifest['mask']['updatable_parameters']:,} weights may change)")  # fmt: skip
        print(_unlearn_table({"reference": m["reference"], "before": m["before"], "after": m["after"]}))
        print(f"{t['steps']} steps, loss {t['loss_first']:.4f} -> {t['loss_last']:.4f}; "
              f"train {manifest['timings_s']['train']:.0f} s; peak RSS {manifest['peak_rss_mb']:.0f} MB")  # fmt: skip
    return {k: manifest[k] for k in ("metrics", "mask", "timings_s", "peak_rss_mb")} | {
        "out": args.out,
        "training": {k: v for k, v in t.items() if k != "losses"},
    }


def _cmd_unlearn_scenario(args: argparse.Namespace) -> dict[str, Any]:
    result = build_scenario(recipe_from(args, ScenarioRecipe), args.out, overwrite=args.overwrite)
    if not args.json:
        split = ", ".join(f"{k} {v['documents']} documents" for k, v in result["split"].items())
        print(f"scenario in {args.out}: {split}; models: target/, retain-model/")
        print(_unlearn_table(result["measures"]))
    return {"out": args.out, **result}


def _cmd_select(args: argparse.Namespace) -> dict[str, Any]:
    manifest = select(recipe_from(args, SelectRecipe), args.out, overwrite=args.overwrite)
    chosen = manifest["chosen"]
    if not args.json:
        shares = ", ".join(f"{k} {v}" for k, v in sorted(chosen["by_source"].items(), key=lambda kv: -kv[1]))
        print(f"{args.method}: {chosen['chunks']:,} of {manifest['pool_chunks']:,} chunks ({chosen['words']:,} words) "
              f"-> {args.out} in {manifest['seconds']:.1f} s; by source: {shares}")  # fmt: skip
    return {"out": args.out, **{k: manifest[k] for k in ("chosen", "pool_chunks", "eligible_chunks", "seconds")}}


def _cmd_convert(args: argparse.Namespace) -> dict[str, Any]:
    from carve.convert import convert

    manifest = convert(args.source, args.out, args.save_dtype, args.save_format, overwrite=args.overwrite)
    saved = manifest["saved"]
    if not args.json:
        print(f"{args.source} -> {args.out}: {saved['format']}, {saved['dtype']}, {manifest['size']['file_mb']:.1f} MB")
    return {"out": args.out, "saved": saved, "size": manifest.get("size")}


def _cmd_export(args: argparse.Namespace) -> dict[str, Any]:
    from carve.export import export

    info = export(args.source, args.gguf, args.type, overwrite=args.overwrite, stream=args.stream)
    for note in info["notes"]:
        print(f"carve: note: {note}", file=sys.stderr)
    if not args.json:
        print(
            f"{args.source} -> {args.gguf}: {args.type}, {info['file_bytes'] / 2**20:.1f} MB, {info['tensors']} tensors"
        )
    return info


def _cmd_cache(args: argparse.Namespace) -> Any:
    if args.clear is not None:
        gone = clear_cache(args.clear or list(CACHE_KINDS))
        if not args.json:
            for r in gone:
                print(f"removed {r['path']}: {r['entries']} entries, {r['mb']:.1f} MB")
        return {"removed": gone}
    rows = cache_usage()
    if not args.json:
        print(f"carve's cache: {cache_dir()} (set $CARVE_CACHE_DIR to move it; carve cache --clear empties it)")
        print(_table([["kind", "entries", "MB", "holds"]]
                     + [[r["kind"], str(r["entries"]), f"{r['mb']:.1f}", r["holds"]] for r in rows]))  # fmt: skip
    return {"path": str(cache_dir()), "kinds": rows}


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
    "densify": _cmd_densify,
    "convert": _cmd_convert,
    "merge": _cmd_merge,
    "unlearn": _cmd_unlearn,
    "unlearn-scenario": _cmd_unlearn_scenario,
    "select": _cmd_select,
    "export": _cmd_export,
    "cache": _cmd_cache,
    "corpora": _cmd_corpora,
    "methods": _cmd_methods,
}


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: MemoryError, torch's CUDA OutOfMemoryError (a RuntimeError), or
    the CPU allocator's RuntimeError ("can't allocate memory")."""
    text = str(exc)
    return isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower()


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if distributed.init_from_environment() and not distributed.writes():
        args.quiet = True  # under torchrun one progress display and one summary: rank 0's
        args.json = False
        sys.stdout = open(os.devnull, "w")  # for the rest of this process
    set_quiet(getattr(args, "quiet", False) or (getattr(args, "json", False) and not sys.stderr.isatty()))
    try:
        summary = COMMANDS[args.command](args)
        if getattr(args, "json", False):
            print(json.dumps(summary, indent=2))
        sys.stdout.flush()
    except carve.UsageError as exc:
        print(f"carve: error: {exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:  # torch's allocators: CPU RuntimeError, CUDA OutOfMemoryError
        if not _out_of_memory(exc):
            raise
        print(f"carve: error: out of memory ({_first_line(exc)}); nothing was written. A model larger than memory: "
              "`carve extract --stream` reads it a block at a time; else lower --batch-size, or run where more "
              "memory is free", file=sys.stderr)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        print("carve: interrupted; nothing was written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `carve ... | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
