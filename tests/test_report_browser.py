"""The generated report in a real browser: headless Chromium opens it from disk; the table and
every image render and the page makes no network request.  Needs Debian's chromium and
chromium-driver (.ci/run installs them and sets CARVE_REQUIRE_BROWSER=1, so CI fails rather than
skips when they are missing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.webdriver import BROWSERS, DRIVERS, Chromium, find

if find(DRIVERS) is None or find(BROWSERS) is None:
    if os.environ.get("CARVE_REQUIRE_BROWSER"):
        raise RuntimeError("CARVE_REQUIRE_BROWSER is set but chromium / chromium-driver are not installed")
    pytest.skip("chromium and chromium-driver are not installed", allow_module_level=True)


def test_report_renders_offline_in_chromium(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    import json

    import carve
    from carve.cli.main import main

    code = tmp_path / "code.jsonl"
    code.write_text("".join(json.dumps({"text": d[:3000]}) + "\n" for d in carve.Corpus("code").documents[:40]))
    fast = ["--calib-blocks", "4", "--block-len", "32", "--eval-blocks", "2", "--cloze-items", "0", "--quiet",
            "--no-speed", "--model", str(model_dir)]  # fmt: skip
    outs = []
    for name, corpus, method in (
        ("legal", small_corpus, "wanda"),
        ("code", code, "wanda"),
        ("g", small_corpus, "magnitude"),
    ):
        out = tmp_path / name
        extra = ["--granularity", "global"] if method == "magnitude" else []
        assert main(["extract", "--domain", str(corpus), "--method", method, "--out", str(out), *fast, *extra]) == 0
        outs.append(str(out))
    page = tmp_path / "report.html"
    assert main(["report", *outs, "--out", str(page)]) == 0

    with Chromium() as browser:
        browser.open(page)
        rows = browser.js("return document.querySelectorAll('#runs tbody tr').length")
        cells = browser.js("return [...document.querySelectorAll('#runs tbody td')].map(td => td.textContent)")
        images = browser.js(
            "return [...document.images].map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])"
        )
        urls = browser.requested_urls()
        browser.screenshot(tmp_path / "shot.png")
    assert rows == 3 and "legal" in cells and "code" in cells
    assert [alt for alt, *_ in images] == ["perplexity", "sparsity", "importance", "overlap"]
    for alt, complete, w, h in images:
        assert complete and w > 0 and h > 0, alt
    # the only request is the page itself, from disk
    assert urls and all(u.startswith(("file://", "data:")) for u in urls), urls
    assert (tmp_path / "shot.png").stat().st_size > 10_000
