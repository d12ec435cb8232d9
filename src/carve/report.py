"""`carve report`: one self-contained HTML page (and a Markdown summary) from one or more carve
outputs: a comparison table, domain vs general perplexity, per-layer sparsity, importance
distributions per module type and, for two masks, their overlap per layer.  Plots are matplotlib
PNGs embedded as data URIs, so the page needs no network and no other file."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from carve.errors import UsageError
from carve.inspect import Run, importance_by_type, layer_and_type, load_run, per_layer_overlap
from carve.output import atomic_file, claim


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def run_row(run: Run) -> dict[str, Any]:
    """The comparison-table facts of one run (from its manifest)."""
    m = run.manifest or {}
    r = m.get("recipe", {})
    metrics = m.get("metrics", {})
    after, before = metrics.get("after") or {}, metrics.get("before") or {}
    size = m.get("size", {})
    merged = m.get("merge_metrics") or {}
    if m.get("job") == "merge":  # per task: its merged perplexity and kept share of the expert's gain
        per = merged.get("per_task") or {}
        gains = ", ".join(f"{t} {_fmt(v.get('normalized_gain'), '.3f')}" for t, v in per.items())
        mean = _fmt(merged.get("mean_normalized_gain"), ".3f")
        what = f"merge {(m.get('method') or {}).get('name', r.get('method'))} of {len(per) or '?'} experts"
        what += f": mean gain {mean} ({gains})" if per else ""
        general = next((v["merged"].get("general_ppl") for v in per.values() if v.get("merged")), None)
        after = {"general_ppl": general} if general is not None else {}
    elif m.get("job") == "finetune":
        t, steps = m.get("trainable") or {}, (m.get("training") or {}).get("steps")
        detail = {"lora": f" rank {t.get('lora_rank')}", "full": ""}.get(
            str(t.get("kind")), f" {_fmt(t.get('density'), '.3g')} of the weights"
        )
        what = f"finetune {t.get('kind', '?')}{detail}, {steps} steps"
    elif m.get("job") == "unlearn":
        k, steps = m.get("mask") or {}, (m.get("training") or {}).get("steps")
        kept = "" if k.get("kind") in (None, "none") else f" {_fmt(k.get('density'), 'g')}"
        what = f"unlearn {r.get('objective')}, mask {k.get('kind', '?')}{kept}, {steps} steps"
        forget = (before.get("forget_ppl"), after.get("forget_ppl"))
        leak = (before.get("privleak"), after.get("privleak"))
        what += f": forget ppl {_fmt(forget[0], '.4g')} -> {_fmt(forget[1], '.4g')}"
        what += f", PrivLeak {_fmt(leak[0], '.3f')} -> {_fmt(leak[1], '.3f')}"
    elif m.get("job") == "recover":
        steps = (m.get("training") or {}).get("steps")
        what = f"recover ({steps} steps{', LoRA ' + str(r['lora']) if r.get('lora') else ''})"
    elif m.get("experts_kept"):
        what = f"experts dropped: {m['experts_kept']['kept']} of {m['experts_kept']['of']} kept per MoE block"
    elif m.get("structure"):
        c = {k: "?" for k in ("num_key_value_heads", "intermediate_size", "num_hidden_layers")}
        c |= m["structure"].get("config") or {}
        c = {k: "/".join(map(str, dict.fromkeys(v))) if isinstance(v, list) else v for k, v in c.items()}  # by block
        what = (
            f"{r.get('method')} structured: {c['num_key_value_heads']} kv groups, "
            f"{c['intermediate_size']} MLP, {c['num_hidden_layers']} blocks"
        )
    elif r:
        what = f"{r.get('method')} {r.get('pattern') or _fmt(r.get('sparsity'), 'g')}, mix {_fmt(r.get('mix'), 'g')}"
    elif run.selection is not None:
        what = f"selection ({(run.selection.get('recipe') or {}).get('method', run.selection.get('method'))})"
    else:
        what = "mask / importance file"
    cloze = after.get("domain_cloze") or {}
    tasks = {k: v.get("acc") for k, v in (m.get("tasks") or {}).items() if isinstance(v, dict)}
    return {
        "run": run.name,
        "what": what,
        "domain": _domain(r, merged),
        "parameters": size.get("parameters_after", size.get("parameters")),
        "file_mb": size.get("file_mb"),
        "domain_ppl_before": before.get("domain_ppl"),
        "domain_ppl": after.get("domain_ppl"),
        "general_ppl_before": before.get("general_ppl"),
        "general_ppl": after.get("general_ppl"),
        "cloze": cloze.get("accuracy"),
        "tasks": tasks,
        "decode_speedup": (m.get("speed") or {}).get("decode_speedup"),
        "seconds": round(sum((m.get("timings_s") or {}).values()), 1) if m else None,
        "peak_rss_mb": m.get("peak_rss_mb"),
        "sparsity": (m.get("sparsity") or {}).get("linear"),
    }


def _domain(recipe: dict[str, Any], merged: dict[str, Any]) -> str | None:
    """The text a run is about: its domain, a merge's tasks, or what an unlearning run forgot."""
    if recipe.get("domain"):
        return Path(str(recipe["domain"])).name
    if recipe.get("forget"):
        return Path(str(recipe["forget"])).name
    return ", ".join(merged.get("per_task") or {}) or None


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plots(runs: list[Run], rows: list[dict[str, Any]]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out: dict[str, str] = {}
    pts = [r for r in rows if r["domain_ppl"] and r["general_ppl"]]
    if pts:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        dense = {r["domain"]: r for r in pts if r["domain_ppl_before"]}  # one source point per domain
        for domain, r in dense.items():
            xy = (r["general_ppl_before"], r["domain_ppl_before"])
            ax.scatter(*xy, marker="D", color="black")
            label = f"dense ({domain})" if len(dense) > 1 else "dense"
            ax.annotate(label, xy, fontsize=8, xytext=(3, 3), textcoords="offset points")
        for r in pts:
            ax.scatter(r["general_ppl"], r["domain_ppl"])
            ax.annotate(
                r["run"], (r["general_ppl"], r["domain_ppl"]), fontsize=8, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("general perplexity")
        ax.set_ylabel("domain perplexity")
        ax.set_title("domain vs general perplexity (lower-left is better)")
        out["perplexity"] = _png(fig)
    sparse = [run for run in runs if run.manifest and (run.manifest.get("sparsity") or {}).get("per_module")]
    if sparse:
        fig, axes = plt.subplots(len(sparse), 1, figsize=(9, 2.6 * len(sparse)), squeeze=False)
        for ax, run in zip(axes[:, 0], sparse, strict=True):
            per: dict[str, dict[int, float]] = {}
            for name, sp in run.manifest["sparsity"]["per_module"].items():  # type: ignore[index]
                layer, kind = layer_and_type(name)
                per.setdefault(kind, {})[layer if layer is not None else -1] = sp
            kinds = sorted(per)
            width = 0.8 / len(kinds)
            for j, kind in enumerate(kinds):
                layers = sorted(per[kind])
                ax.bar([x + j * width for x in layers], [per[kind][x] for x in layers], width, label=kind)
            ax.set_ylabel("sparsity")
            ax.set_xlabel("block")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{run.name}: share of weights removed per block and module")
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        out["sparsity"] = _png(fig)
    scored = [run for run in runs if run.importance is not None]
    if scored:
        fig, axes = plt.subplots(len(scored), 1, figsize=(8, 3 * len(scored)), squeeze=False)
        for ax, run in zip(axes[:, 0], scored, strict=True):
            assert run.importance is not None
            for kind, sample in sorted(importance_by_type(run.importance).items()):
                vals = sample[sample > 0].log10().numpy()
                if len(vals):
                    ax.hist(vals, bins=60, histtype="step", label=kind)
            ax.set_xlabel("log10 importance score")
            ax.set_ylabel("weights (sample)")
            ax.set_title(f"{run.name}: importance distribution per module type")
            ax.legend(fontsize=6)
        fig.tight_layout()
        out["importance"] = _png(fig)
    masked = [run for run in runs if run.mask is not None]
    if len(masked) >= 2:
        a, b = masked[:2]
        assert a.mask is not None and b.mask is not None
        rows_o = per_layer_overlap(a.mask, b.mask)
        layers = [r["layer"] if r["layer"] is not None else -1 for r in rows_o]
        fig, ax = plt.subplots(figsize=(9, 3.4))
        bottom: list[float] = [0.0] * len(rows_o)
        for key, label in (("both", "kept by both"), ("only_a", f"{a.name} only"), ("only_b", f"{b.name} only")):
            shares = [float(r[key]) for r in rows_o]
            ax.bar(layers, shares, bottom=bottom, label=label)
            bottom = [x + v for x, v in zip(bottom, shares, strict=True)]
        ax.plot(layers, [r["jaccard"] for r in rows_o], color="black", marker=".", label="Jaccard of kept")
        ax.set_xlabel("block")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("share of weights")
        ax.set_title(f"mask overlap per block: {a.name} vs {b.name}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        out["overlap"] = _png(fig)
    return out


COLUMNS = [
    ("run", "run", None),
    ("what", "method", None),
    ("domain", "domain", None),
    ("parameters", "parameters", ","),
    ("file_mb", "file MB", ".1f"),
    ("sparsity", "linear sparsity", ".3f"),
    ("domain_ppl", "domain ppl", ".3f"),
    ("general_ppl", "general ppl", ".3f"),
    ("cloze", "domain cloze acc", ".3f"),
    ("decode_speedup", "decode x dense", ".2f"),
    ("seconds", "time s", ".0f"),
    ("peak_rss_mb", "peak RSS MB", ".0f"),
]


def _cells(row: dict[str, Any]) -> list[str]:
    return [str(row[k]) if spec is None and row[k] is not None else _fmt(row[k], spec or "") for k, _, spec in COLUMNS]


def write_report(
    targets: list[str | Path], html_path: str | Path, md_path: str | Path | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Write the HTML report (and the Markdown summary), each atomically; an existing file is
    replaced only with `overwrite`.  Returns the table rows and overlap facts."""
    if not targets:
        raise UsageError("give at least one carve output directory, mask or importance file")
    outs = [Path(p).expanduser() for p in (html_path, md_path) if p is not None]
    for p in outs:
        if p.is_dir():
            raise UsageError(f"{str(p)!r} is a directory; give a file path for the report")
        if p.exists() and not overwrite:
            raise UsageError(f"{str(p)!r} already exists: choose another --out or pass --overwrite")
    with claim(*outs):
        return _write_report(targets, html_path, md_path)


def _write_report(targets: list[str | Path], html_path: str | Path, md_path: str | Path | None) -> dict[str, Any]:
    runs = [load_run(t) for t in targets]
    rows = [run_row(r) for r in runs]
    task_names = sorted({t for r in rows for t in r["tasks"]})
    plots = _plots(runs, rows)
    masked = [r for r in runs if r.mask is not None]
    overlap: dict[str, Any] | None = None
    if len(masked) >= 2:
        assert masked[0].mask is not None and masked[1].mask is not None
        overlap = {
            "a": masked[0].name,
            "b": masked[1].name,
            "jaccard": masked[0].mask.jaccard(masked[1].mask),
            "per_layer": per_layer_overlap(masked[0].mask, masked[1].mask),
        }
    head = [label for _, label, _ in COLUMNS] + task_names
    body = [_cells(r) + [_fmt(r["tasks"].get(t)) for t in task_names] for r in rows]
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>carve report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
        "td:first-child,td:nth-child(2){text-align:left}img{max-width:100%;display:block;margin:1em 0}</style>",
        "</head><body><h1>carve report</h1>",
        f"<p>{len(runs)} run(s): {esc(', '.join(str(t) for t in targets))}</p>",
        "<table id='runs'><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>",
        *("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body),
        "</tbody></table>",
    ]
    titles = {
        "perplexity": "Domain vs general perplexity",
        "sparsity": "Per-layer sparsity",
        "importance": "Importance scores per module type",
        "overlap": "Mask overlap per layer",
    }
    for key, title in titles.items():
        if key in plots:
            parts.append(f"<h2>{title}</h2><img alt='{key}' src='data:image/png;base64,{plots[key]}'>")
    if overlap:
        parts.append(
            f"<p>Jaccard of the kept weights, {esc(overlap['a'])} vs {esc(overlap['b'])}: "
            f"{overlap['jaccard']:.4f} overall.</p>"
        )
    tall = _tall_sections(runs)
    for name, cats in tall.items():
        parts.append(f"<h2>TALL masks of {esc(name)}: shared, selfish and catastrophic weights</h2>")
        parts.append(_html_table(_tall_rows(cats)))
    selections = {r.name: r.selection for r in runs if r.selection}
    for name, sel in selections.items():
        parts.append(f"<h2>What {esc(name)} selected</h2>")
        parts.append(_html_table(_selection_rows(sel)))
        hist = _selection_histogram(sel)
        if hist:
            parts.append(f"<img alt='selection scores' src='data:image/png;base64,{hist}'>")
    parts.append("</body></html>")
    out = Path(html_path).expanduser()
    with atomic_file(out) as tmp:
        tmp.write_text("\n".join(parts))
    if md_path is not None:
        md = ["# carve report", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(row) + " |" for row in body]
        if overlap:
            md += ["", f"Mask overlap, {overlap['a']} vs {overlap['b']}: Jaccard {overlap['jaccard']:.4f} overall.", ""]
            md += ["| block | Jaccard | kept by both | only A | only B |", "|---|---|---|---|---|"]
            md += [
                f"| {r['layer']} | {r['jaccard']:.4f} | {r['both']:.3f} | {r['only_a']:.3f} | {r['only_b']:.3f} |"
                for r in overlap["per_layer"]
            ]
        for name, sel in selections.items():
            rows_s = _selection_rows(sel)
            md += ["", f"What {name} selected ({(sel.get('recipe') or {}).get('method', sel.get('method'))}):", ""]
            md += ["| " + " | ".join(rows_s[0]) + " |", "|" + "---|" * len(rows_s[0])]
            md += ["| " + " | ".join(r) + " |" for r in rows_s[1:]]
        for name, cats in tall.items():
            rows_t = _tall_rows(cats)
            md += ["", f"TALL masks of {name} (shares of weights per block):", ""]
            md += ["| " + " | ".join(rows_t[0]) + " |", "|" + "---|" * len(rows_t[0])]
            md += ["| " + " | ".join(r) + " |" for r in rows_t[1:]]
        md += ["", f"Plots: {out.name}"]
        with atomic_file(Path(md_path).expanduser()) as tmp:
            tmp.write_text("\n".join(md) + "\n")
    return {"rows": rows, "overlap": overlap, "plots": sorted(plots), "tall": tall, "selections": selections}


def _selection_rows(sel: dict[str, Any]) -> list[list[str]]:
    """Chosen chunks per source and their share, against each source's share of the pool."""
    chosen = (sel.get("chosen") or {}).get("by_source") or {}
    pool = {k: v.get("chunks", 0) for k, v in ((sel.get("inputs") or {}).get("pool") or {}).items()}
    total_c, total_p = max(1, sum(chosen.values())), max(1, sum(pool.values()))
    rows = [["source", "chosen chunks", "share of chosen", "share of pool"]]
    for src in sorted(set(chosen) | set(pool), key=lambda s: -chosen.get(s, 0)):
        rows.append(
            [src, str(chosen.get(src, 0)), f"{chosen.get(src, 0) / total_c:.3f}", f"{pool.get(src, 0) / total_p:.3f}"]
        )
    return rows


def _selection_histogram(sel: dict[str, Any]) -> str | None:
    hist = sel.get("score_histogram") or {}
    if not (hist.get("pool") or {}).get("counts"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for key, colour in (("pool", "#999"), ("chosen", "#c33")):
        h = hist.get(key) or {}
        if h.get("counts"):
            edges = h["edges"]
            ax.stairs(h["counts"], edges, fill=True, alpha=0.5, color=colour, label=key)
    ax.set_xlabel("score (DSIR: log importance weight; ZIP-FIT: alignment)")
    ax.set_ylabel("chunks")
    ax.legend()
    return _png(fig)


def _tall_sections(runs: list[Run]) -> dict[str, list[dict[str, Any]]]:
    from carve.inspect import tall_categories

    return {r.name: tall_categories(r.tall) for r in runs if r.tall}


def _tall_rows(cats: list[dict[str, Any]]) -> list[list[str]]:
    tasks = [k for k in cats[0] if k not in ("layer", "shared", "selfish", "catastrophic")]
    head = ["block", "shared (2+ tasks)", "selfish (1)", "catastrophic (0)", *(f"kept: {t}" for t in tasks)]
    return [head] + [[str(c["layer"]), *(f"{c[k]:.4f}" for k in ("shared", "selfish", "catastrophic", *tasks))]
                     for c in cats]  # fmt: skip


def _html_table(rows: list[list[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(h)}</th>" for h in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
