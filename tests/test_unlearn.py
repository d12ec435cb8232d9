"""`carve unlearn`: SalUn's and WAGLE's scores against direct computations, each objective against
its formula, the measures (min-k% MIA AUC, ROUGE-L) against reference computations, an end-to-end
run that raises the forget loss while every weight outside the mask stays bitwise unchanged, bad
input refused with nothing written, and the builtin scenario built and reused."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from carve.cli.main import main
from carve.evaluation.unlearning import min_k_scores, privleak, roc_auc, rouge_l_f1, words
from carve.importance import compute_importance
from carve.inspect import load_run
from carve.ops.unlearn import MaskSpec, Objective, pack_rows, unlearn_mask
from carve.report import run_row
from carve.settings import Targets
from tests.conftest import tiny_model

TARGETS = Targets()


def _blocks(n: int, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 384, (n, length), generator=torch.Generator().manual_seed(seed))


def _ce(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _mean_grads(model: torch.nn.Module, blocks: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    for b in blocks:
        model.zero_grad()
        _ce(model, b[None]).backward()
        for n in names:
            total[n] += params[n].grad / len(blocks)
    model.zero_grad()
    return total


def _names(model: torch.nn.Module) -> list[str]:
    return [f"{n}.weight" for n in TARGETS.linears(model)]


def test_salun_scores_are_the_forget_gradients_magnitude_and_the_mask_its_global_top() -> None:
    model = tiny_model("llama")
    forget = _blocks(3)
    direct = {n: g.abs() for n, g in _mean_grads(model, forget, _names(model)).items()}
    scores = compute_importance("salun", model, TARGETS, data=forget)
    for n, d in direct.items():
        torch.testing.assert_close(scores[n], d, rtol=1e-4, atol=1e-7)
    keep = unlearn_mask(model, MaskSpec.parse("salun"), 0.3, TARGETS, forget, _blocks(2, seed=1))
    flat = torch.cat([scores[n].reshape(-1) for n in direct])
    k = flat.numel() - int(flat.numel() * 0.7)  # the kept count select_mask leaves
    threshold = flat.topk(k).values.min()
    kept = torch.cat([keep[n].reshape(-1) for n in direct])  # type: ignore[union-attr]
    assert int(kept.sum()) == k
    assert bool((flat[kept] >= threshold).all()) and bool((flat[~kept] <= threshold).all())


def test_wagle_scores_follow_the_papers_attribution() -> None:
    model = tiny_model("llama")
    forget, retain, mu = _blocks(2), _blocks(3, seed=1), 1e-2
    names = _names(model)
    g_f, g_r = _mean_grads(model, forget, names), _mean_grads(model, retain, names)
    params = dict(model.named_parameters())
    scores = compute_importance("wagle", model, TARGETS, data=forget, retain=retain, mu=mu)
    for n in names:
        direct = ((params[n].detach() - g_r[n] / mu) * g_f[n]).abs()
        torch.testing.assert_close(scores[n], direct, rtol=1e-3, atol=1e-8)
    with pytest.raises(Exception, match="retain"):
        compute_importance("wagle", model, TARGETS, data=forget)


def _rows(length: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    forget, retain = _blocks(3, length), _blocks(4, length, seed=1)
    return forget, retain, pack_rows(forget, retain, 2, seed=0)


def test_each_objective_is_its_formula() -> None:
    model, ref = tiny_model("llama"), tiny_model("llama", seed=1)
    forget, retain, rows = _rows()
    index, f, r = rows[:, 0], rows[:, 1:25], rows[:, 25:]
    assert torch.equal(f, forget[index]) and bool((r[:, None] == retain[None]).all(-1).any(-1).all())
    with torch.no_grad():
        ga = Objective("ga", 24)(model, rows)
        torch.testing.assert_close(ga, -_ce(model, f), rtol=1e-5, atol=1e-6)
        gd = Objective("graddiff", 24, alpha=0.7)(model, rows)
        torch.testing.assert_close(gd, -_ce(model, f) + 0.7 * _ce(model, r), rtol=1e-5, atol=1e-6)
        ref_nll = torch.stack([_ce(ref, b[None]) * 23 for b in forget])
        npo = Objective("npo", 24, alpha=0.0, beta=0.5, reference_nll=ref_nll)(model, rows)
        s = torch.stack([_ce(model, b[None]) * 23 for b in f])
        direct = (-(2 / 0.5) * torch.log(torch.sigmoid(0.5 * (s - ref_nll[index])))).mean()
        torch.testing.assert_close(npo, direct, rtol=1e-4, atol=1e-5)
        # at the reference itself NPO's forget term is (2/β)·log 2
        own = torch.stack([_ce(model, b[None]) * 23 for b in forget])
        start = Objective("npo", 24, alpha=0.0, beta=0.5, reference_nll=own)(model, rows)
        torch.testing.assert_close(start, torch.tensor(4 * math.log(2)), rtol=1e-4, atol=1e-5)
        kl = Objective("graddiff", 24, alpha=1.0, retain_loss="kl", reference=ref)(model, rows)
        p_ref = F.log_softmax(ref(input_ids=r).logits.float(), -1)
        p = F.log_softmax(model(input_ids=r).logits.float(), -1)
        direct_kl = (p_ref.exp() * (p_ref - p)).sum(-1).mean()
        torch.testing.assert_close(kl, -_ce(model, f) + direct_kl, rtol=1e-4, atol=1e-5)


def test_min_k_auc_and_privleak_against_reference_computations() -> None:
    lp = torch.tensor([[-1.0, -5.0, -2.0, -0.5, -3.0], [-0.1, -0.2, -0.3, -0.4, -9.0]])
    # k = 0.4 of 5 tokens: the two lowest
    torch.testing.assert_close(min_k_scores(lp, 0.4), torch.tensor([-4.0, -4.7]))
    torch.testing.assert_close(min_k_scores(lp, 0.1), torch.tensor([-5.0, -9.0]))  # at least one token
    pos, neg = torch.tensor([3.0, 2.0, 1.0]), torch.tensor([0.0, 2.0])
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos.tolist(), neg.tolist())]
    assert roc_auc(pos, neg) == pytest.approx(sum(pairs) / len(pairs)) == pytest.approx(0.75)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, generator=gen) + 0.5, torch.randn(30, generator=gen)
    brute = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a.tolist() for y in b.tolist()) / (40 * 30)
    assert roc_auc(a, b) == pytest.approx(brute)
    assert privleak(0.6, 0.5) == pytest.approx(0.2) and privleak(0.5, 0.5) == 0.0


def _lcs(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by brute force over a's subsequences (short inputs only)."""
    best = 0
    for r in range(len(a) + 1):
        for sub in itertools.combinations(a, r):
            it = iter(b)
            if all(any(x == y for y in it) for x in sub):
                best = max(best, r)
    return best


@pytest.mark.parametrize(
    ("cand", "ref"),
    [
        ("the cat sat on the mat", "the cat on the mat"),
        ("In the beginning God created", "in the Beginning, God created the heaven"),
        ("a b c d e", "e d c b a"),
        ("nothing shared here", "entirely other words"),
    ],
)
def test_rouge_l_against_a_brute_force_lcs(cand: str, ref: str) -> None:
    a, b = words(cand), words(ref)
    lcs = _lcs(a, b)
    expected = 0.0 if not lcs else 2 * (lcs / len(a)) * (lcs / len(b)) / (lcs / len(a) + lcs / len(b))
    assert rouge_l_f1(cand, ref) == pytest.approx(expected)
    assert rouge_l_f1(ref, ref) == pytest.approx(1.0)


@pytest.fixture
def split_corpora(tmp_path: Path) -> dict[str, Path]:
    """Real legal text split into forget, retain and holdout files."""
    import carve

    docs = carve.Corpus("legal").documents[:24]
    parts = {"forget": docs[:4], "retain": docs[4:20], "holdout": docs[20:24]}
    out = {}
    for name, ds in parts.items():
        out[name] = tmp_path / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps({"text": d[:2500]}) + "\n" for d in ds))
    return out


FAST = ["--steps", "3", "--batch-size", "1", "--block-len", "48", "--mia-len", "32", "--prompt-len", "8",
        "--verbatim-items", "4", "--eval-blocks", "2", "--cloze-items", "8", "--mask-blocks", "4", "--quiet"]  # fmt: skip


def _unlearn(model_dir: Path, c: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["unlearn", str(model_dir), "--forget", str(c["forget"]), "--retain", str(c["retain"]),
                 "--holdout", str(c["holdout"]), *FAST, "--out", str(out), *extra])  # fmt: skip


@pytest.mark.parametrize(
    ("objective", "mask"), [("ga", "salun"), ("npo", "wagle"), ("graddiff", "random"), ("graddiff", "fisher")]
)
def test_unlearning_raises_forget_loss_and_leaves_weights_outside_the_mask_bitwise_unchanged(
    tmp_path: Path, model_dir: Path, split_corpora: dict[str, Path], objective: str, mask: str
) -> None:
    out = tmp_path / "out"
    flags = [
        "--objective",
        objective,
        "--mask",
        mask,
        "--density",
        "0.3",
        "--lr",
        "3e-3",
        "--alpha",
        "0.1",
        "--reference",
        str(model_dir),
    ]
    assert _unlearn(model_dir, split_corpora, out, *flags) == 0
    manifest = json.loads((out / "carve.json").read_text())
    m = manifest["metrics"]
    assert m["after"]["forget_ppl"] > m["before"]["forget_ppl"]
    for key in ("verbatim_rougeL", "mia_auc", "privleak", "retain_ppl", "general_ppl", "holdout_ppl", "retain_cloze"):
        assert key in m["after"] and key in m["before"]
    assert m["reference"]["privleak"] == 0.0 and m["before"]["privleak"] == 0.0  # the reference is the source here
    # the mask, recomputed on the source model, holds every changed entry
    from carve import load_model
    from carve.unlearn import UnlearnRecipe, unlearn_data

    lm = load_model(str(model_dir))
    recipe = UnlearnRecipe(forget=str(split_corpora["forget"]), retain=str(split_corpora["retain"]), block_len=48)
    data, _ = unlearn_data(lm.tokenizer, recipe)
    keep = unlearn_mask(lm.model, MaskSpec.parse(mask), 0.3, TARGETS, data.forget[:4], data.retain[:4])
    before, after = load_file(str(model_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    changed = 0
    for name, w in before.items():
        moved = after[name] != w
        k = keep.get(name)
        if name not in keep:
            assert not bool(moved.any()), f"{name} is outside the targets but changed"
        elif k is not None:
            assert not bool((moved & ~k).any()), f"{name} changed outside its mask"
            changed += int(moved.sum())
    assert 0 < changed <= manifest["mask"]["updatable_parameters"]
    # inspect and report say what the run was
    row = run_row(load_run(out))
    assert row["what"].startswith(f"unlearn {objective}, mask {mask}") and "PrivLeak 0.000 -> " in row["what"]
    assert row["domain"] == split_corpora["forget"].name and row["general_ppl"] == m["after"]["general_ppl"]
    assert manifest["mask"]["updatable_parameters"] == sum(int(k.sum()) for k in keep.values())  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"forget": "empty"}, "contains no text"),
        ({"retain": "forget"}, "same text"),
        ({"density": "0"}, "outside (0, 1]"),
        ({"density": "1.5"}, "outside (0, 1]"),
        ({"mask": "sailun"}, "is not one of"),
        ({"stop-privleak": "0.05"}, "needs --reference"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(
    tmp_path: Path, model_dir: Path, split_corpora: dict[str, Path], capsys, change: dict[str, str], message: str
) -> None:
    c = dict(split_corpora)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    flags: list[str] = []
    for key, value in change.items():
        if key in ("forget", "retain"):
            c[key] = empty if value == "empty" else c[value]
        else:
            flags += [f"--{key}", value]
    out = tmp_path / "never"
    assert _unlearn(model_dir, c, out, *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() and not list(tmp_path.glob(".never*")) and not list(tmp_path.glob("never.*"))


def test_scenario_is_built_once_and_reused(tmp_path: Path, model_dir: Path, small_corpus: Path) -> None:
    out = tmp_path / "scenario"
    flags = ["--model", str(model_dir), "--corpus", str(small_corpus), "--documents", "12", "--epochs", "1",
             "--block-len", "64", "--batch-size", "2", "--quiet", "--json"]  # fmt: skip
    assert main(["unlearn-scenario", *flags, "--out", str(out)]) == 0
    record = json.loads((out / "scenario.json").read_text())
    assert {k: v["documents"] for k, v in record["split"].items()} == {"forget": 1, "holdout": 1, "retain": 10}
    for role in ("target", "retain-model"):
        assert json.loads((out / role / "carve.json").read_text())["role"] == role
    assert set(record["measures"]) == {"base", "target", "retain_model"}
    assert record["measures"]["retain_model"]["privleak"] == 0.0
    # the target trained on the forget document: it predicts it better than the base does
    assert record["measures"]["target"]["forget_ppl"] < record["measures"]["base"]["forget_ppl"]
    stamp = (out / "target" / "model.safetensors").stat().st_mtime_ns
    assert main(["unlearn-scenario", *flags, "--out", str(out)]) == 0
    assert (out / "target" / "model.safetensors").stat().st_mtime_ns == stamp
    assert main(["unlearn-scenario", *flags[:-4], "--epochs", "2", "--quiet", "--out", str(out)]) == 2


def test_eval_every_records_the_curve_and_leaves_the_run_unchanged(
    tmp_path: Path, model_dir: Path, split_corpora: dict[str, Path]
) -> None:
    flags = ["--objective", "npo", "--mask", "salun", "--lr", "3e-3", "--reference", str(model_dir)]
    plain, curve = tmp_path / "plain", tmp_path / "curve"
    assert _unlearn(model_dir, split_corpora, plain, *flags) == 0
    assert _unlearn(model_dir, split_corpora, curve, *flags, "--eval-every", "1") == 0
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(curve / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # measuring changed nothing
    m = json.loads((curve / "carve.json").read_text())["metrics"]
    assert json.loads((plain / "carve.json").read_text())["metrics"]["trajectory"] is None
    points = m["trajectory"]
    assert [p["step"] for p in points] == [1, 2, 3]
    keys = {"forget_ppl", "retain_ppl", "general_ppl", "mia_auc", "privleak"}
    assert {k: points[-1][k] for k in keys} == {k: m["after"][k] for k in keys}
    assert all(set(p) == {"step", *keys} for p in points)
    assert points[0]["forget_ppl"] != points[1]["forget_ppl"]  # measured at each step, not copied
    # --stop-privleak: training stops at the first measure at or below the level (here the first, step 1);
    # the model saved is the step-1 model the full run measured there
    stopped = tmp_path / "stopped"
    assert _unlearn(model_dir, split_corpora, stopped, *flags, "--eval-every", "1", "--stop-privleak", "100") == 0
    manifest = json.loads((stopped / "carve.json").read_text())
    assert manifest["training"]["stopped_at_step"] == 1 and len(manifest["training"]["losses"]) == 1
    assert manifest["training"]["tokens"] == 48 and manifest["training"]["steps"] == 3
    assert manifest["metrics"]["trajectory"] == [points[0]]
    assert json.loads((curve / "carve.json").read_text())["training"]["stopped_at_step"] is None
