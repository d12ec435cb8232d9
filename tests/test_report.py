"""Mask inspection, overlap numbers against a direct computation, saved masks / importance maps,
and report generation from saved manifests."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import carve
from carve.cli.main import main
from carve.inspect import layer_and_type, per_layer_overlap, per_layer_sparsity
from carve.masks import Mask

FAST = ["--calib-blocks", "4", "--block-len", "32", "--eval-blocks", "2", "--cloze-items", "0", "--quiet", "--no-speed"]


def test_layer_and_type() -> None:
    assert layer_and_type("model.layers.12.mlp.down_proj.weight") == (12, "mlp.down_proj")
    assert layer_and_type("transformer.h.3.attn.c_attn.weight") == (3, "attn.c_attn")
    assert layer_and_type("lm_head.weight") == (None, "lm_head")


def test_overlap_and_sparsity_against_a_direct_count() -> None:
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.{m}.weight" for i in range(3) for m in ("self_attn.q_proj", "mlp.up_proj")]
    a = Mask({n: torch.rand(6, 8, generator=g) > 0.5 for n in names})
    b = Mask({n: torch.rand(6, 8, generator=g) > 0.3 for n in names})
    rows = per_layer_overlap(a, b)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    for r in rows:
        ka = torch.cat([a[n].flatten() for n in names if f".{r['layer']}." in n])
        kb = torch.cat([b[n].flatten() for n in names if f".{r['layer']}." in n])
        assert r["jaccard"] == pytest.approx((ka & kb).sum().item() / (ka | kb).sum().item())
        assert r["both"] == pytest.approx((ka & kb).float().mean().item())
        assert r["only_a"] == pytest.approx((ka & ~kb).float().mean().item())
        assert r["only_b"] == pytest.approx((~ka & kb).float().mean().item())
        assert r["both"] + r["only_a"] + r["only_b"] + r["neither"] == pytest.approx(1.0)
    sp = per_layer_sparsity(a)
    assert sp[1]["mlp.up_proj"] == pytest.approx(1 - a["model.layers.1.mlp.up_proj.weight"].float().mean().item())


@pytest.fixture
def code_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps({"text": d[:3000]}) + "\n" for d in carve.Corpus("code").documents[:40]))
    return path


def _extract(model_dir: Path, corpus: Path, *extra: str) -> int:
    return main(["extract", "--model", str(model_dir), "--domain", str(corpus), "--method", "wanda", *FAST, *extra])


def test_two_domains_saved_masks_inspect_and_report(
    tmp_path: Path, model_dir: Path, small_corpus: Path, code_corpus: Path, capsys
) -> None:
    legal, code = tmp_path / "legal", tmp_path / "code"
    assert _extract(model_dir, small_corpus, "--out", str(legal), "--report") == 0
    assert _extract(model_dir, code_corpus, "--out", str(code)) == 0
    # a mask on its own, no model written: the same mask as the full output's
    alone = tmp_path / "code.mask"
    assert _extract(model_dir, code_corpus, "--save-mask", str(alone)) == 0
    a, b = Mask.load(legal / "mask.safetensors"), Mask.load(code / "mask.safetensors")
    assert all(torch.equal(Mask.load(alone)[k], b[k]) for k in b)
    assert (legal / "report.html").is_file() and (legal / "report.md").is_file()
    capsys.readouterr()

    assert main(["inspect", str(legal), str(alone), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    want = sum(int((a[k] & b[k]).sum()) for k in a) / sum(int((a[k] | b[k]).sum()) for k in a)
    assert facts["overlap"]["jaccard"] == pytest.approx(want)
    assert 0 < want < 1 and len(facts["overlap"]["per_layer"]) == 2
    assert facts["sparsity"]["overall"] == pytest.approx(0.5, abs=1e-3)
    assert main(["inspect", str(legal), str(code)]) == 0
    printed = capsys.readouterr().out
    assert "Jaccard" in printed and "mlp.down_proj" in printed

    page = tmp_path / "r" / "report.html"
    assert main(["report", str(legal), str(code), "--out", str(page)]) == 0
    html = page.read_text()
    assert html.count("<tr>") == 3  # header and two runs
    images = re.findall(r"<img alt='(\w+)' src='data:image/png;base64,", html)
    assert images == ["perplexity", "sparsity", "overlap"]
    assert "http://" not in html and "https://" not in html
    md = page.with_suffix(".md").read_text()
    assert f"Jaccard {want:.4f}" in md


def test_importance_saved_on_its_own_and_refused_without_one(
    tmp_path: Path, model_dir: Path, small_corpus: Path, capsys
) -> None:
    imp = tmp_path / "legal.importance"
    assert _extract(model_dir, small_corpus, "--granularity", "global", "--save-importance", str(imp)) == 0
    assert f"-> {imp}" in capsys.readouterr().out
    assert main(["inspect", str(imp), "--top", "3", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["top_modules"]
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
    bad = tmp_path / "x.importance"
    args = ["extract", "--model", str(model_dir), "--domain", str(small_corpus), "--method", "sparsegpt", *FAST]
    assert main([*args, "--save-importance", str(bad)]) == 2
    assert "keeps no importance map" in capsys.readouterr().err and not bad.exists()
    assert main(args) == 2 and "--out is required" in capsys.readouterr().err
    assert main([*args, "--save-mask", str(imp)]) == 2  # exists: refused, not replaced
    assert "already exists" in capsys.readouterr().err
