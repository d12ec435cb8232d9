"""Build a larger Python corpus for recovery experiments from this interpreter's own standard
library, disjoint from carve's builtin `code` corpus.

    .venv/bin/python bench/stdlib_corpus.py [OUT_DIR]      (default bench/out/stdlib-sub)

The builtin `code` corpus is the top-level modules of CPython's `Lib/*.py` (see
src/carve/corpora/SOURCES.md); this takes the modules of its subpackages instead (asyncio, email,
json, multiprocessing, ...; 2-60 KB each, like the builtin's), leaving out test suites,
site-packages, lib2to3 and idlelib, and any file sharing more than 20% of its long lines
(over 60 characters) with a builtin document. Python Software Foundation License 2.0, as the
builtin corpus. It is a user corpus (a directory of text files for `--domain PATH`), written
under bench/out (not committed); carve evaluates on the builtin corpus's held-out split, which
this never touches.
"""

from __future__ import annotations

import gzip
import json
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
BUILTIN = HERE.parent / "src" / "carve" / "corpora" / "data" / "code.jsonl.gz"
SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
SKIP_PACKAGES = {"lib2to3", "idlelib", "turtledemo", "ensurepip"}


def build(out: Path) -> tuple[int, int]:
    with gzip.open(BUILTIN, "rt", encoding="utf-8") as fh:
        builtin = [json.loads(line)["text"] for line in fh if line.strip()]
    long_lines = {ln.strip() for t in builtin for ln in t.splitlines() if len(ln.strip()) > 60}
    root = Path(sysconfig.get_paths()["stdlib"])
    out.mkdir(parents=True, exist_ok=True)
    files = chars = 0
    for p in sorted(root.rglob("*.py")):
        parts = p.relative_to(root).parts
        if len(parts) < 2 or parts[0] in SKIP_PACKAGES or parts[0].startswith("config-"):
            continue  # top-level modules are the builtin corpus
        if SKIP_PARTS.intersection(parts) or not 2000 <= p.stat().st_size <= 60000:
            continue
        text = p.read_text(encoding="utf-8", errors="ignore")
        mine = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 60]
        if text in builtin or (mine and sum(ln in long_lines for ln in mine) / len(mine) > 0.2):
            continue
        (out / "__".join(parts)).write_text(text, encoding="utf-8")
        files, chars = files + 1, chars + len(text)
    return files, chars


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "out" / "stdlib-sub"
    n, size = build(target)
    print(f"{n} files, {size:,} characters -> {target}")
