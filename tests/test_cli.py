"""The command line end to end on a tiny local model, and every bad input: one sentence, exit 2,
nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from carve.cli.main import main

FAST = ["--calib-blocks", "4", "--block-len", "32", "--eval-blocks", "2", "--quiet", "--no-speed"]


def _extract(model_dir: Path, corpus: Path, out: Path, *extra: str) -> int:
    return main(
        [
            "extract",
            "--model",
            str(model_dir),
            "--domain",
            str(corpus),
            "--general",
            "general",
            "--out",
            str(out),
            *FAST,
            *extra,
        ]
    )


def _nothing_written(parent: Path, out: Path) -> bool:
    return not out.exists() and not any(p.name.startswith(f".{out.name}.carve-tmp") for p in parent.iterdir())


def test_extract_end_to_end(tmp_path: Path, model_dir: Path, small_corpus: Path, capsys) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    assert _extract(model_dir, small_corpus, out, "--method", "sparsegpt", "--sparsity", "0.5", "--mix", "0.5") == 0
    printed = capsys.readouterr().out
    assert "domain ppl" in printed and "extracted" in printed and "linear sparsity 0.5" in printed
    manifest = json.loads((out / "carve.json").read_text())
    for key in ("source", "recipe", "data", "sparsity", "metrics", "size", "versions", "timings_s", "peak_rss_mb"):
        assert key in manifest
    assert manifest["recipe"]["method"] == "sparsegpt" and manifest["recipe"]["mix"] == 0.5
    assert manifest["data"]["calibration"]["general_blocks"] == 2
    from carve.models.load import native_bfloat16

    # --calib-dtype auto: bfloat16 forwards where the CPU multiplies bfloat16 natively
    assert manifest["recipe"]["calib_dtype"] == "auto"
    assert manifest["data"]["calibration"]["dtype"] == ("bfloat16" if native_bfloat16("cpu") else "float32")
    assert (
        len(manifest["data"]["eval"]["domain"]["fingerprint"]) == 16
        and manifest["data"]["eval"]["general"]["blocks"] == 2
    )
    for when in ("before", "after"):
        assert manifest["metrics"][when]["domain_ppl"] > 1 and manifest["metrics"][when]["general_ppl"] > 1
    assert manifest["sparsity"]["linear"] == pytest.approx(0.5, abs=1e-3)
    assert 0 < manifest["sparsity"]["all_parameters"] < 0.5
    assert {"prune", "evaluate_before", "evaluate_after", "save"} <= manifest["timings_s"].keys()
    # the peak RSS so far at the end of every stage: never falling, never above the job's peak
    rss = manifest["peak_rss_after_stage_mb"]
    assert rss.keys() == manifest["timings_s"].keys()
    order = [rss[k] for k in manifest["timings_s"]]
    assert order == sorted(order) and 0 < order[-1] <= manifest["peak_rss_mb"]
    # stock transformers loads it, zeros and all
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    w = model.model.layers[0].mlp.down_proj.weight
    assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)


def test_extract_takes_the_model_as_the_other_jobs_do(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    """`carve extract MODEL` as `carve finetune MODEL`: the same recipe as `--model MODEL` (given
    twice, it must be the same model); neither: the recipe's default."""
    import carve
    from carve.cli.main import _recipe, build_parser

    parse = build_parser().parse_args
    assert _recipe(parse(["extract", str(model_dir), "--out", "o"])).model == str(model_dir)
    assert _recipe(parse(["extract", "--model", str(model_dir), str(model_dir), "--out", "o"])).model == str(model_dir)
    assert _recipe(parse(["extract", "--out", "o"])).model == carve.Recipe().model
    out = tmp_path / "out"
    assert main(["extract", str(model_dir), "--domain", str(small_corpus), "--out", str(out), *FAST]) == 0
    assert json.loads((out / "carve.json").read_text())["recipe"]["model"] == str(model_dir)


def test_json_summary_and_eval(tmp_path: Path, model_dir: Path, small_corpus: Path, capsys) -> None:
    out = tmp_path / "out"
    assert _extract(model_dir, small_corpus, out, "--method", "wanda", "--pattern", "2:4", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sparsity"]["linear"] == pytest.approx(0.5, abs=1e-3)
    assert (
        main(
            [
                "eval",
                str(out),
                "--domain",
                str(small_corpus),
                "--block-len",
                "32",
                "--eval-blocks",
                "2",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["metrics"]["domain_ppl"] == pytest.approx(summary["metrics"]["after"]["domain_ppl"], rel=1e-4)


def test_corpora_and_methods_listings(capsys) -> None:
    assert main(["corpora", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {"general", "legal", "code", "scripture"}
    assert all(r["kilobytes"] >= 300 and r["licence"] and r["source"] for r in rows)
    assert main(["methods"]) == 0
    printed = capsys.readouterr().out
    assert "2301.00774" in printed and "2306.11695" in printed


def test_overwrite_replaces_atomically(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert _extract(model_dir, small_corpus, out, "--method", "magnitude", "--overwrite") == 0
    assert (out / "carve.json").exists() and not (out / "old.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupt_leaves_nothing(tmp_path: Path, model_dir: Path, small_corpus: Path, monkeypatch) -> None:
    import carve.job

    def interrupted(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(carve.job, "write_json", interrupted)  # dies mid-save
    out = tmp_path / "out"
    assert _extract(model_dir, small_corpus, out, "--method", "magnitude") == 130
    assert _nothing_written(tmp_path, out)


def _truncated_model(tmp_path: Path, model_dir: Path) -> Path:
    bad = tmp_path / "truncated"
    bad.mkdir()
    for f in model_dir.iterdir():
        data = f.read_bytes()
        (bad / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    return bad


def _not_weights(tmp_path: Path, _model_dir: Path) -> Path:
    p = tmp_path / "model.gguf"
    p.write_bytes(b"this is not a gguf file at all")
    return p


def _no_blocks(tmp_path: Path, model_dir: Path) -> Path:
    """A causal LM whose config has no decoder layers: nothing to prune."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    config = tiny_config("llama")
    config.num_hidden_layers = 0
    d = tmp_path / "no-layers"
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    for f in model_dir.glob("tokenizer*"):
        (d / f.name).write_bytes(f.read_bytes())
    return d


BAD = [
    # (label, args builder, expected message part)
    ("unknown model", lambda t, m, c: ["--model", "no-such-model"], "no model at 'no-such-model'"),
    ("missing model dir", lambda t, m, c: ["--model", str(t / "nowhere/")], "no model at"),
    ("truncated weights", lambda t, m, c: ["--model", str(_truncated_model(t, m))], "truncated or not safetensors"),
    ("not gguf", lambda t, m, c: ["--model", str(_not_weights(t, m))], "is not a complete GGUF file"),
    ("unknown corpus", lambda t, m, c: ["--model", str(m), "--domain", "astrology"], "unknown corpus 'astrology'"),
    ("two models", lambda t, m, c: [str(t / "other"), "--model", str(m)], "two models given"),
    (
        "short corpus",
        lambda t, m, c: ["--model", str(m), "--domain", str(_short(t))],
        "too few for one calibration block",
    ),
    ("no held-out", lambda t, m, c: ["--model", str(m), "--domain", str(_one_doc(t))], "no held-out text"),
    ("sparsity 0", lambda t, m, c: ["--model", str(m), "--domain", str(c), "--sparsity", "0"], "outside (0, 1)"),
    ("sparsity 1.5", lambda t, m, c: ["--model", str(m), "--domain", str(c), "--sparsity", "1.5"], "outside (0, 1)"),
    ("bad N:M", lambda t, m, c: ["--model", str(m), "--domain", str(c), "--pattern", "4:2"], "needs 0 < N < M"),
    (
        "N:M vs sparsity",
        lambda t, m, c: ["--model", str(m), "--domain", str(c), "--pattern", "2:4", "--sparsity", "0.6"],
        "disagrees with pattern 2:4",
    ),
    ("unknown method", lambda t, m, c: ["--model", str(m), "--domain", str(c), "--method", "voodoo"], "unknown method"),
    (
        "global sweep",
        lambda t, m, c: ["--model", str(m), "--domain", str(c), "--method", "dual-obs", "--granularity", "global"],
        "chooses its mask in SparseGPT's sweep",
    ),
    (
        "calib dtype above the model's",
        lambda t, m, c: ["--model", str(m), "--domain", str(c), "--dtype", "bfloat16", "--calib-dtype", "float32"],
        "is not a lower precision than the model's bfloat16",
    ),
    (
        "no decoder blocks",
        lambda t, m, c: ["--model", str(_no_blocks(t, m)), "--domain", str(c)],
        "no decoder blocks found",
    ),
]


def _short(tmp_path: Path) -> Path:
    from carve.corpora.corpus import _doc_is_eval

    docs = [f"tiny {i}" for i in range(200)]
    train = [d for d in docs if not _doc_is_eval(d, 0.15)][:2]
    held = [d for d in docs if _doc_is_eval(d, 0.15)][:1]
    p = tmp_path / "short.jsonl"
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in train + held))
    return p


def _one_doc(tmp_path: Path) -> Path:
    p = tmp_path / "onedoc"
    p.mkdir()
    # one document: the hash puts it in train, so nothing is held out
    for text in (f"document {i} " * 400 for i in range(100)):
        from carve.corpora.corpus import _doc_is_eval

        if not _doc_is_eval(text, 0.15):
            (p / "a.txt").write_text(text)
            break
    return p


@pytest.mark.parametrize(("label", "build", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input(
    label: str, build, message: str, tmp_path: Path, model_dir: Path, small_corpus: Path, capsys
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    args = build(work, model_dir, small_corpus)
    if "--domain" not in args:
        args += ["--domain", str(small_corpus)]
    out = tmp_path / "out"
    rc = main(["extract", *args, "--general", str(small_corpus), "--out", str(out), *FAST])
    err = capsys.readouterr().err
    assert rc == 2, label
    assert message in err
    assert err.startswith("carve: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert _nothing_written(tmp_path, out)


def test_existing_output_is_refused(tmp_path: Path, model_dir: Path, small_corpus: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert _extract(model_dir, small_corpus, out) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_python_api(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    import carve

    lm = carve.load_model(str(model_dir))
    corpus = carve.Corpus(str(small_corpus))
    calib = corpus.calibration_blocks(lm.tokenizer, 4, 32)
    scores = carve.score(lm.model, "wanda", calib)
    mask = carve.select_mask(scores, 0.5, "row")
    carve.apply_mask(lm.model, mask)
    w = dict(lm.model.named_parameters())
    assert all(torch.equal(w[k] == 0, ~mask[k]) for k in mask)
    metrics = carve.evaluate(lm, corpus, corpus, blocks=2, block_len=32)
    assert metrics["domain_ppl"] == metrics["general_ppl"]
    res = carve.prune(carve.load_model(str(model_dir)).model, "sparsegpt", 0.5, calib)
    assert res.mask.sparsity() == pytest.approx(0.5, abs=1e-6)


def test_recipe_file_with_flag_overrides_and_manifest_replay(
    tmp_path: Path, model_dir: Path, small_corpus: Path
) -> None:
    recipe = tmp_path / "legal.yaml"
    recipe.write_text(
        f"model: {model_dir}\ndomain: {small_corpus}\nmethod: wanda\nsparsity: 0.6\n"
        "calib-blocks: 4\nblock_len: 32\neval_blocks: 2\nmix: 0.25\n"
    )
    out = tmp_path / "a"
    assert main(["extract", "--recipe", str(recipe), "--method", "magnitude", "--out", str(out), "--quiet"]) == 0
    r = json.loads((out / "carve.json").read_text())["recipe"]
    assert r["method"] == "magnitude" and r["sparsity"] == 0.6 and r["mix"] == 0.25 and r["calib_blocks"] == 4
    # a manifest is a recipe: replaying it reproduces the same model
    again = tmp_path / "b"
    assert main(["extract", "--recipe", str(out / "carve.json"), "--out", str(again), "--quiet"]) == 0
    assert json.loads((again / "carve.json").read_text())["recipe"] == r
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def test_bad_recipe_file(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("methd: wanda\n")
    assert main(["extract", "--recipe", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "unknown fields ['methd']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dual_extract_saves_importance_and_a_second_extract_reuses_it(
    tmp_path: Path, model_dir: Path, small_corpus: Path, capsys
) -> None:
    from carve import ImportanceMap

    first = tmp_path / "dual-50"
    assert _extract(model_dir, small_corpus, first, "--method", "dual", "--lambda", "0.5", "--reconstruct", "0.3") == 0
    manifest = json.loads((first / "carve.json").read_text())
    assert manifest["recipe"]["lam"] == 0.5 and manifest["importance"]["reused_from"] is None
    assert "domain_cloze" in manifest["metrics"]["after"] or "skipped" in manifest["data"]["eval"]["domain_cloze"]
    imp = ImportanceMap.load(first / "importance.safetensors")
    assert imp.meta["model_fingerprint"] == manifest["source"]["fingerprint"]
    assert imp.meta["data_fingerprint"] == manifest["importance"]["data_fingerprint"]

    # same model, data and settings at another sparsity: reused, no gradient pass
    second = tmp_path / "dual-70"
    imp_path = str(first / "importance.safetensors")
    assert (
        _extract(
            model_dir,
            small_corpus,
            second,
            "--method",
            "dual",
            "--lambda",
            "0.5",
            "--sparsity",
            "0.7",
            "--importance",
            imp_path,
        )
        == 0
    )
    m2 = json.loads((second / "carve.json").read_text())
    assert m2["importance"]["reused_from"] == imp_path
    assert m2["sparsity"]["linear"] == pytest.approx(0.7, abs=0.02)  # whole weights per 64-wide row
    reloaded = ImportanceMap.load(second / "importance.safetensors")
    for k in imp:
        assert torch.equal(reloaded[k], imp[k])

    # other data or settings (the calibration forwards' dtype among them): refused before any work, nothing written
    capsys.readouterr()
    other_dtype = "float32" if manifest["data"]["calibration"]["dtype"] == "bfloat16" else "bfloat16"
    for extra, what in (
        (["--lambda", "2"], "calibration data and settings"),
        (["--calib-dtype", other_dtype], "calibration data and settings"),
        (["--method", "taylor"], "method"),
    ):
        out = tmp_path / "refused"
        args = ["--method", "dual", "--lambda", "0.5", *extra, "--importance", imp_path]
        assert _extract(model_dir, small_corpus, out, *args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("carve: error: importance file") and what in err and "\n" not in err
        assert _nothing_written(tmp_path, out)


def test_dual_obs_extract_records_its_sweep_mix_and_reuses_its_scores_at_another_lambda(
    tmp_path: Path, model_dir: Path, small_corpus: Path
) -> None:
    first = tmp_path / "dual-obs"
    assert _extract(model_dir, small_corpus, first) == 0  # dual-obs is extract's default method
    manifest = json.loads((first / "carve.json").read_text())
    r = manifest["recipe"]
    assert (r["method"], r["mix"], r["reconstruct_mix"], r["lam"]) == ("dual-obs", 0.0, 0.3, 1.0)
    assert manifest["sparsity"]["linear"] == pytest.approx(0.5)
    # its scores (the domain Fisher term) do not depend on λ: reused at λ = 4 and 2:4
    second = tmp_path / "dual-obs-24"
    imp = str(first / "importance.safetensors")
    assert (
        _extract(
            model_dir,
            small_corpus,
            second,
            "--method",
            "dual-obs",
            "--lambda",
            "4",
            "--pattern",
            "2:4",
            "--importance",
            imp,
        )
        == 0
    )
    m2 = json.loads((second / "carve.json").read_text())
    assert m2["importance"]["reused_from"] == imp and m2["sparsity"]["linear"] == pytest.approx(0.5)
    # its scores are fisher's: a fisher extract takes the map (same calibration: both domain only)
    # and gives the mask that ranking selects; a wanda map is not taken
    third = tmp_path / "fisher"
    assert _extract(model_dir, small_corpus, third, "--method", "fisher", "--importance", imp) == 0
    m3 = json.loads((third / "carve.json").read_text())
    assert m3["importance"]["reused_from"] == imp and m3["recipe"]["method"] == "fisher"
    fisher_imp = str(third / "importance.safetensors")
    fourth = tmp_path / "dual-obs-from-fisher"
    assert _extract(model_dir, small_corpus, fourth, "--importance", fisher_imp) == 0
    assert json.loads((fourth / "carve.json").read_text())["importance"]["reused_from"] == fisher_imp
    wanda = tmp_path / "wanda"
    assert _extract(model_dir, small_corpus, wanda, "--method", "wanda", "--granularity", "global", "--mix", "0") == 0
    refused = tmp_path / "refused"
    assert _extract(model_dir, small_corpus, refused, "--importance", str(wanda / "importance.safetensors")) == 2
    assert _nothing_written(tmp_path, refused)


def test_structured_extract_is_smaller_reloads_and_reports_speed(
    tmp_path: Path, model_dir: Path, small_corpus: Path, capsys
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    fast = [a for a in FAST if a != "--no-speed"]
    assert main(["extract", "--model", str(model_dir), "--domain", str(small_corpus), "--out", str(out), *fast,
                 "--structure", "--keep", "0.6", "--cloze-items", "0"]) == 0  # fmt: skip
    assert "structured by wanda" in capsys.readouterr().out
    m = json.loads((out / "carve.json").read_text())
    assert m["recipe"]["method"] == "wanda" and m["recipe"]["structure"] and "sparsity" not in m
    assert m["recipe"]["drop_rule"] == "distance"  # the default, resolved in the recipe
    size, shape = m["size"], m["structure"]["shape"]
    assert size["parameters_after"] < size["parameters_before"] and size["file_mb"] > 0
    assert len(m["structure"]["candidates"]) > 1  # the split was searched
    assert m["structure"]["held"] == {}  # a Llama holds no dimension whole
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == size["parameters_after"]
    assert model.config.intermediate_size == shape["mlp_channels"] == m["structure"]["config"]["intermediate_size"]
    assert model.config.num_hidden_layers == 2 - shape["drop_blocks"]
    speed = m["speed"]
    for key in ("prefill", "decode"):
        d, e = speed["dense"][f"{key}_tokens_per_s"], speed["extracted"][f"{key}_tokens_per_s"]
        # the speed-up is rounded to 3 decimals (a tiny ratio under load, e.g. 0.039, is off by up to 1.3%)
        assert d > 0 and e > 0 and speed[f"{key}_speedup"] == pytest.approx(e / d, rel=1e-2, abs=1e-3)
    assert {"speed_before", "speed_after"} <= m["timings_s"].keys()


def test_hessian_products_in_the_calibration_dtype_are_used_and_recorded(
    tmp_path: Path, model_dir: Path, small_corpus: Path
) -> None:
    """--hessian-dtype calib: SparseGPT's Hessians multiply in the calibration forwards' dtype
    (bfloat16 here: autocast over float32 weights, or the weights' own with --dtype bfloat16), which
    the manifest records and which changes the pruned weights; float32 products (the default) are
    recorded as such."""
    from safetensors.torch import load_file

    for weights in ((), ("--dtype", "bfloat16")):
        outs = {}
        for choice in ("float32", "calib"):
            outs[choice] = out = tmp_path / f"{choice}{len(weights)}"
            flags = ("--method", "sparsegpt", "--hessian-dtype", choice, "--cloze-items", "0", *weights)
            calib = () if weights else ("--calib-dtype", "bfloat16")  # autocast over float32 weights
            assert _extract(model_dir, small_corpus, out, *flags, *calib) == 0
            m = json.loads((out / "carve.json").read_text())
            assert m["recipe"]["hessian_dtype"] == choice and m["data"]["calibration"]["dtype"] == "bfloat16"
            assert m["data"]["calibration"]["hessian_products"] == (None if choice == "float32" else "bfloat16")
        a, b = (load_file(outs[c] / "model.safetensors") for c in ("float32", "calib"))
        assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a), weights


def test_structured_extract_with_the_greedy_drop_rule(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert main(["extract", "--model", str(model_dir), "--domain", str(small_corpus), "--out", str(out), *FAST,
                 "--drop-blocks", "1", "--drop-rule", "greedy", "--cloze-items", "0"]) == 0  # fmt: skip
    m = json.loads((out / "carve.json").read_text())
    st = m["structure"]
    assert m["recipe"]["drop_rule"] == "greedy" and "drop_rule" not in st and st["block_distances"] is None
    assert len(st["drop_order"]) == len(st["greedy_losses"]) == 1 and st["dropped_blocks"] == st["drop_order"]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--structure", "--sparsity", "0.5"], "--sparsity do not apply"),
        (["--structure", "--hessian-dtype", "calib"], "--hessian-dtype do not apply"),
        (["--keep", "0.5", "--pattern", "2:4"], "--pattern do not apply"),
        (["--keep", "1.5"], "outside (0, 1)"),
        (["--heads-keep", "0.01"], "keep at least one"),
        (["--drop-blocks", "2"], "keep at least one"),
        (["--structure", "--model", "GPT2"], "Llama-style blocks"),
    ],
)
def test_structured_bad_input(
    tmp_path: Path, model_dir: Path, small_corpus: Path, tokenizer, capsys, flags, message
) -> None:
    if "GPT2" in flags:  # an architecture without Llama-style projections
        from tests.conftest import tiny_model

        model_dir = tmp_path / "gpt2"
        tiny_model("gpt2").save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        flags = ["--structure"]
    out = tmp_path / "out"
    assert _extract(model_dir, small_corpus, out, *flags) == 2
    assert message in capsys.readouterr().err
    assert _nothing_written(tmp_path, out)


def test_structured_with_bias_compensation(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert _extract(model_dir, small_corpus, out, "--keep", "0.6", "--bias-compensation", "--cloze-items", "0") == 0
    m = json.loads((out / "carve.json").read_text())
    assert m["recipe"]["structure"] and m["recipe"]["bias_compensation"]
    model = AutoModelForCausalLM.from_pretrained(out)
    shape = m["structure"]["shape"]
    if shape["mlp_channels"] < 128:
        assert model.config.mlp_bias and model.model.layers[0].mlp.down_proj.bias.abs().sum() > 0
    assert sum(p.numel() for p in model.parameters()) == m["size"]["parameters_after"]


def test_cache_lists_and_clears_what_carve_cached(tmp_path: Path, model_dir: Path, capsys) -> None:
    """`carve cache` shows each kind's entries and size; `--clear KIND` removes only that kind,
    `--clear` all; an unknown kind is refused."""
    import carve
    from carve.output import cache_dir

    gguf = tmp_path / "m.gguf"
    assert main(["export", str(model_dir), "--gguf", str(gguf), "--type", "q8_0"]) == 0
    carve.load_model(str(gguf))  # de-quantized once, kept under models/
    (cache_dir() / "eval").mkdir(parents=True)
    (cache_dir() / "eval" / "k.json").write_text("{}")
    capsys.readouterr()
    assert main(["cache", "--json"]) == 0
    kinds = {r["kind"]: r for r in json.loads(capsys.readouterr().out)["kinds"]}
    assert kinds["models"]["entries"] == 1 and kinds["models"]["mb"] > 0.1
    assert kinds["eval"]["entries"] == 1 and kinds["select"]["entries"] == 0
    assert main(["cache", "--clear", "models"]) == 0
    assert "removed" in capsys.readouterr().out
    assert not (cache_dir() / "models").exists() and (cache_dir() / "eval" / "k.json").is_file()
    assert main(["cache", "--clear"]) == 0 and not (cache_dir() / "eval").exists()
    with pytest.raises(SystemExit):
        main(["cache", "--clear", "weights"])
    assert main(["cache"]) == 0 and str(cache_dir()) in capsys.readouterr().out


def test_a_reader_that_leaves_early_ends_carve_quietly() -> None:
    """`carve methods --json | head -0`: the pipe is closed before carve writes; carve stops with
    141 (as Unix tools killed by SIGPIPE report) and no traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "carve", "methods", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the child has imported carve and written anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err
