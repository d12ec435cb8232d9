"""Build carve's builtin corpora from text that is available offline.

Run once by a maintainer; the output (gzipped JSON lines, one document per line) is committed
under src/carve/corpora/data/ with SOURCES.md.  Sources:

- general: ABC-news articles (Lee et al. 2005 corpus) and English Wikipedia articles, both from
  the test data in the `gensim` wheel (PyPI).
- legal: licence texts in /usr/share/common-licenses and the copyright files in /usr/share/doc
  of a Debian system.
- code: Python standard-library modules of the interpreter running this script.
- scripture: the King James Version of the Bible (1611, public domain) from Debian's
  `bible-kjv-text` package, read with its `bible` program (package `bible-kjv`): every sixth
  chapter, one document per chapter, verses one per line with their numbers.

Usage: python scripts/build_corpora.py GENSIM_WHEEL OUT_DIR [--kjv ROOT] [--only NAME ...]
(ROOT: a directory the two Debian packages were unpacked into with `dpkg-deb -x`, e.g. after
`apt-get download bible-kjv bible-kjv-text`.)
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import re
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

TARGET_BYTES = 700_000


def _dedup(docs: list[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """Drop documents whose normalised paragraphs were all seen before; cap total size."""
    seen: set[str] = set()
    out: list[dict[str, str]] = []
    total = 0
    for doc in docs:
        kept = []
        for para in re.split(r"\n\s*\n", doc["text"]):
            key = hashlib.sha1(" ".join(para.split()).lower().encode()).hexdigest()
            if para.strip() and key not in seen:
                seen.add(key)
                kept.append(para.strip("\n"))
        text = "\n\n".join(kept).strip()
        if len(text) < 400:
            continue
        out.append({"text": text, "source": doc["source"]})
        total += len(text.encode())
        if total >= limit:
            break
    return out


def _strip_wiki(markup: str) -> str:
    text = re.sub(r"<!--.*?-->", "", markup, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref.*?</ref>", "", text, flags=re.S)
    for _ in range(4):  # nested templates and tables, innermost first
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", text)
    text = re.sub(r"\[\[([^|\]]*\|)?([^\]]*)\]\]", r"\2", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://\S+\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\n\1\n", text, flags=re.M)
    text = re.sub(r"<[^>]+>", "", text)
    text = text.replace("&nbsp;", " ").replace("&ndash;", "-").replace("&mdash;", "-")
    lines = [ln for ln in text.splitlines() if not ln.startswith(("*", "|", "!", "{", "}", ":", ";", "#"))]
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def general(wheel: Path) -> list[dict[str, str]]:
    docs = []
    with zipfile.ZipFile(wheel) as zf:
        for name in ("lee_background.cor", "lee.cor"):
            for line in zf.read(f"gensim/test/test_data/{name}").decode("utf-8", "replace").splitlines():
                if line.strip():
                    docs.append({"text": line.strip(), "source": f"gensim test_data/{name} (ABC news)"})
        raw = bz2.decompress(
            zf.read("gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
        ).decode("utf-8", "replace")
    import html

    for page in re.findall(r"<page>(.*?)</page>", raw, flags=re.S):
        title = re.search(r"<title>(.*?)</title>", page)
        body = re.search(r"<text[^>]*>(.*?)</text>", page, flags=re.S)
        if not title or not body or ":" in title.group(1):
            continue
        markup = html.unescape(body.group(1))
        if markup.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = _strip_wiki(markup)
        text = text.split("\nReferences\n")[0].split("\nSee also\n")[0]
        docs.append(
            {
                "text": f"{title.group(1)}\n\n{text[:12000]}",
                "source": "English Wikipedia (gensim test_data enwiki sample)",
            }
        )
    # interleave news and encyclopedic prose so a size cap keeps both
    news = [d for d in docs if "news" in d["source"]]
    wiki = [d for d in docs if "Wikipedia" in d["source"]]
    mixed = []
    for i in range(max(len(news), len(wiki))):
        mixed += news[i : i + 1] + wiki[i : i + 1]
    return _dedup(mixed, TARGET_BYTES)


def legal() -> list[dict[str, str]]:
    docs = []
    for path in sorted(Path("/usr/share/common-licenses").iterdir()):
        if path.is_file() and not path.is_symlink():
            docs.append({"text": path.read_text("utf-8", "replace"), "source": f"Debian {path}"})
    for path in sorted(Path("/usr/share/doc").glob("*/copyright")):
        if path.is_file():
            docs.append({"text": path.read_text("utf-8", "replace"), "source": f"Debian {path}"})
    return _dedup(docs, TARGET_BYTES)


def code() -> list[dict[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text("utf-8", "replace")
        if 2000 < len(text) < 60000:
            docs.append({"text": text, "source": f"CPython {sys.version.split()[0]} Lib/{path.name}"})
    return _dedup(docs, TARGET_BYTES)


def scripture(root: Path) -> list[dict[str, str]]:
    """Every sixth chapter of the KJV, as the `bible` program prints it (heading, numbered verses)."""
    text = subprocess.run(
        [str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-d", "bible.data", "-l0", "Gen1:1-Rev22:21"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    chapters = [c.strip() for c in re.split(r"\n(?=[1-3 A-Za-z]+ \d+\n)", text) if c.strip()]
    docs = []
    for i, chapter in enumerate(chapters):
        if i % 6 == 0:
            heading, _, verses = chapter.partition("\n")
            body = "\n".join(line.strip() for line in verses.strip().splitlines())
            docs.append({"text": f"{heading}\n\n{body}", "source": f"KJV (Debian bible-kjv-text 4.38) {heading}"})
    return _dedup(docs, TARGET_BYTES)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("wheel", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--kjv", type=Path, default=None)
    ap.add_argument("--only", nargs="+", default=None)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    builders = {"general": lambda: general(args.wheel), "legal": legal, "code": code}
    if args.kjv is not None:
        builders["scripture"] = lambda: scripture(args.kjv)
    for name, build in builders.items():
        if args.only and name not in args.only:
            continue
        docs = build()
        with gzip.GzipFile(out / f"{name}.jsonl.gz", "wb", mtime=0) as fh:
            for d in docs:
                fh.write((json.dumps(d, ensure_ascii=False) + "\n").encode())
        size = sum(len(d["text"].encode()) for d in docs)
        print(f"{name}: {len(docs)} documents, {size} bytes")


if __name__ == "__main__":
    main()
