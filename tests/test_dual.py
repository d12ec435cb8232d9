"""Gradient scorers (taylor, fisher, dual) and OBS reconstruction under a fixed mask."""

from __future__ import annotations

import pytest
import torch

import carve
from carve.engines import next_token_loss
from carve.engines.gradient import STATISTICS
from carve.models import all_prunable_linears
from carve.scorers import sparsegpt_prune
from carve.scorers.gradient import dual_combine, fisher_score, normalized, taylor_score
from carve.settings import Calibration
from tests.conftest import VOCAB, tiny_model


def _calib(n: int = 4, length: int = 20, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def test_formulas_on_tiny_tensors() -> None:
    W = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    g = torch.tensor([[0.1, 0.3], [-2.0, 5.0]])
    assert torch.allclose(taylor_score(W, {"grad_weight": g * W}), (g * W).abs())
    assert torch.allclose(fisher_score(W, {"grad_sq": g * g}), 0.5 * g**2 * W**2)
    # |ΔL| of setting θ to 0, second order with g² for the Hessian diagonal
    assert torch.allclose(STATISTICS["taylor2_step"](g, W), (-g * W + 0.5 * (g * W) ** 2).abs())
    D, G = torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 4.0]])
    assert torch.allclose(normalized(G), torch.tensor([[0.0, 2.0]]))
    assert torch.allclose(dual_combine(D, G, 0.5), D + 0.5 * 2.0 * torch.tensor([[0.0, 2.0]]))
    assert torch.equal(normalized(torch.zeros(2, 2)), torch.zeros(2, 2))


def _autograd(model: torch.nn.Module, calib: torch.Tensor, names: list[str], micro: int) -> list[list[torch.Tensor]]:
    params = dict(model.named_parameters())
    return [
        list(torch.autograd.grad(next_token_loss(model, mb), [params[n] for n in names])) for mb in calib.split(micro)
    ]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_taylor_and_fisher_scores_of_a_model(arch: str) -> None:
    calib = _calib()
    names = [f"{n}.weight" for n in all_prunable_linears(tiny_model(arch))]
    params = dict(tiny_model(arch).named_parameters())
    per_mb = _autograd(tiny_model(arch), calib, names, 1)
    taylor = carve.score(tiny_model(arch), "taylor", calib)
    fisher = carve.score(tiny_model(arch), "fisher", calib)
    for i, n in enumerate(names):
        g_mean = sum(gs[i] for gs in per_mb) / len(per_mb)
        torch.testing.assert_close(taylor[n], (g_mean * params[n]).abs().detach(), rtol=1e-4, atol=1e-7)
        g_sq = sum(gs[i] ** 2 for gs in per_mb) / len(per_mb)
        torch.testing.assert_close(fisher[n], (0.5 * g_sq * params[n] ** 2).detach(), rtol=1e-4, atol=1e-9)


def test_dual_combines_domain_taylor_with_general_obs_importance() -> None:
    domain, general = _calib(seed=3), _calib(seed=4)
    lam = 0.7
    got = carve.score(tiny_model("llama"), "dual", domain, general_calibration=general, lam=lam)
    G = carve.score(tiny_model("llama"), "sparsegpt", general)
    names = list(G)
    params = dict(tiny_model("llama").named_parameters())
    per_mb = _autograd(tiny_model("llama"), domain, names, 1)
    for i, n in enumerate(names):
        w = params[n].detach()
        D = sum(STATISTICS["taylor2_step"](gs[i], w) for gs in per_mb) / len(per_mb)
        torch.testing.assert_close(got[n], dual_combine(D, G[n], lam), rtol=1e-4, atol=1e-7)
    assert got.meta["lam"] == lam
    with pytest.raises(carve.UsageError, match="needs general"):
        carve.score(tiny_model("llama"), "dual", domain)


def _sequential_obs_reference(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Textbook sequential OBS with a fixed mask, float64: for each column j in order, every row
    that drops w_j moves the columns ≥ j by −w_j · [H_j⁻¹]_0,: / [H_j⁻¹]_00, H_j = (H + λI)[j:, j:]."""
    W, H = W.double().clone(), H.double()
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    for j in range(W.shape[1]):
        Hinv = torch.linalg.inv(Hd[j:, j:])
        drop = ~keep[:, j]
        W[drop, j:] -= W[drop, j : j + 1] / Hinv[0, 0] * Hinv[0]
    return W.float()


def test_fixed_mask_reconstruction() -> None:
    g = torch.Generator().manual_seed(5)
    X = torch.randn(400, 24, generator=g) @ torch.randn(24, 24, generator=g)
    H = 2 / 400 * X.t() @ X
    W = torch.randn(8, 24, generator=g)
    new, keep, _ = sparsegpt_prune(W, H, 0.5, blocksize=8)
    # imposing SparseGPT's own mask reproduces SparseGPT exactly
    again, keep2, _ = sparsegpt_prune(W, H, 0.5, blocksize=8, keep=keep)
    assert torch.equal(keep2, keep)
    torch.testing.assert_close(again, new)
    # any mask: exactly those zeros, and the sequential OBS update computed directly
    mask = torch.rand(8, 24, generator=g) > 0.5
    rec, _, _ = sparsegpt_prune(W, H, 0.5, blocksize=8, keep=mask)
    assert torch.equal(rec == 0, ~mask)
    torch.testing.assert_close(rec, _sequential_obs_reference(W, H, mask), rtol=1e-3, atol=1e-4)


def test_dual_prune_with_reconstruction_keeps_the_dual_mask() -> None:
    domain, general = _calib(seed=3), _calib(seed=4)
    model = tiny_model("llama")
    res = carve.prune(
        model, "dual", 0.5, domain, general_calibration=general, reconstruct_with=torch.cat([domain, general])
    )
    expected = carve.select_mask(res.importance, 0.5, "row")
    params = dict(model.named_parameters())
    for n, keep in res.mask.items():
        assert torch.equal(keep, expected[n])
        assert torch.equal(params[n].detach() == 0, ~keep)
    plain = tiny_model("llama")
    carve.apply_mask(plain, res.mask)
    assert any(not torch.equal(params[n], dict(plain.named_parameters())[n]) for n in res.mask)  # weights updated


def test_cloze_items_are_deterministic_and_distractors_come_from_other_documents(tokenizer) -> None:
    from carve.evaluation import build_cloze

    corpus = carve.Corpus("legal")
    a, b = build_cloze(corpus, tokenizer, 30), build_cloze(corpus, tokenizer, 30)
    assert torch.equal(a.choices, b.choices) and torch.equal(a.answers, b.answers)
    assert a.contexts.shape == (30, 48) and a.choices.shape == (30, 4, 16)
    assert 0 < (a.answers == 0).sum() < 30  # the answer's position varies
    # the true continuation follows its passage in one held-out document: find it there
    docs = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in corpus.eval]
    for i in range(5):
        whole = a.contexts[i].tolist() + a.choices[i, a.answers[i]].tolist()
        owner = [j for j, d in enumerate(docs) if any(d[k : k + 64] == whole for k in range(len(d) - 63))]
        assert len(owner) == 1
        for c in range(4):
            if c != int(a.answers[i]):
                wrong = a.contexts[i].tolist() + a.choices[i, c].tolist()
                assert not any(docs[owner[0]][k : k + 64] == wrong for k in range(len(docs[owner[0]]) - 63))


def test_wilson_interval_against_formula() -> None:
    from carve.evaluation import wilson_interval

    lo, hi = wilson_interval(30, 100)
    # textbook values for 30/100
    assert lo == pytest.approx(0.2189, abs=1e-4) and hi == pytest.approx(0.3958, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == pytest.approx(1.0)


def test_cloze_accuracy_picks_highest_mean_loglik() -> None:
    from carve.evaluation import ClozeTask, cloze_accuracy

    model = tiny_model("llama")
    ctx = torch.randint(0, VOCAB, (6, 8), generator=torch.Generator().manual_seed(0))
    cho = torch.randint(0, VOCAB, (6, 4, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = torch.empty(6, 4)
        for i in range(6):
            for c in range(4):
                seq = torch.cat([ctx[i], cho[i, c]])[None]
                logp = torch.log_softmax(model(input_ids=seq).logits[0, -4:-1], -1)
                ref[i, c] = logp.gather(-1, cho[i, c][:, None]).mean()
    task = ClozeTask("t", ctx, cho, ref.argmax(-1))
    assert cloze_accuracy(model, task)["accuracy"] == 1.0
    task = ClozeTask("t", ctx, cho, (ref.argmax(-1) + 1) % 4)
    assert cloze_accuracy(model, task)["accuracy"] == 0.0

    # a forward without `logits_to_keep` is scored from its full logits, and an error raised inside
    # a forward reaches the caller instead of being retried
    class NoKeep(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, use_cache: bool = False):  # type: ignore[no-untyped-def]
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    wrapped = NoKeep(model)
    task = ClozeTask("t", ctx, cho, ref.argmax(-1))
    assert cloze_accuracy(wrapped, task)["accuracy"] == 1.0

    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))  # a device to run on

        def forward(self, input_ids: torch.Tensor, use_cache: bool = False, logits_to_keep: int = 0):  # type: ignore[no-untyped-def]
            raise TypeError("a bug inside the model")

    with pytest.raises(TypeError, match="a bug inside"):
        cloze_accuracy(Broken(), task)


def test_dual_with_sgd_steps_uses_the_refined_loss_and_restores_weights() -> None:
    domain, general = _calib(seed=3), _calib(seed=4)
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    still = carve.score(tiny_model("llama"), "dual", domain, general_calibration=general)
    moved = carve.score(model, "dual", domain, general_calibration=general, lr=0.5)
    assert moved.meta["lr"] == 0.5
    assert any(not torch.allclose(moved[n], still[n]) for n in still)  # steps change the scores
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_reconstruction_after_any_mask_and_refused_for_sparsegpt() -> None:
    calib = _calib()
    model = tiny_model("llama")
    res = carve.prune(model, "wanda", 0.5, calib, reconstruct_with=calib)
    params = dict(model.named_parameters())
    assert res.importance is not None
    expected = carve.select_mask(res.importance, 0.5, "row")
    for n, keep in res.mask.items():
        assert torch.equal(keep, expected[n]) and torch.equal(params[n].detach() == 0, ~keep)
    with pytest.raises(carve.UsageError, match="neither global granularity nor a separate reconstruction"):
        carve.prune(tiny_model("llama"), "sparsegpt", 0.5, calib, reconstruct_with=calib)
    with pytest.raises(carve.UsageError, match="--reconstruct is for score-then-mask methods"):
        carve.Recipe(method="sparsegpt", reconstruct_mix=0.3).resolved()


def test_reconstruction_follows_the_propagation() -> None:
    from carve.ops.prune import reconstruct

    calib = _calib(seed=4)
    # SparseGPT's own mask imposed with a fixed-mask sweep gives SparseGPT's weights, for each
    # propagation, so the reconstruction calibrates each block on the same activations
    results = {}
    for propagation in ("pruned", "dense"):
        ref = tiny_model("llama")
        res = carve.prune(ref, "sparsegpt", 0.5, calib, calib=Calibration(propagation=propagation))
        model = tiny_model("llama")
        reconstruct(model, res.mask, calib, calib=Calibration(propagation=propagation))
        params, expected = dict(model.named_parameters()), dict(ref.named_parameters())
        for n in res.mask:
            torch.testing.assert_close(params[n], expected[n])
        results[propagation] = params
    assert any(not torch.equal(results["pruned"][n], results["dense"][n]) for n in res.mask)


def test_default_mix_is_the_methods() -> None:
    for method, mix in (("sparsegpt", 0.3), ("wanda", 0.3), ("dual", 0.0), ("taylor", 0.0)):
        given = carve.Recipe(method=method)
        assert given.resolved().mix == mix and given.mix is None  # the given recipe is left as it was
    assert carve.Recipe(method="sparsegpt", mix=0.0).resolved().mix == 0.0


def test_guided_sweep_chooses_the_mask_by_obs_error_plus_the_guide() -> None:
    from carve.masks.select import keep_mask, nm_mask
    from carve.scorers.sparsegpt import inverse_hessian_cholesky

    X = torch.randn(300, 16) @ torch.randn(16, 16, generator=torch.Generator().manual_seed(7))
    H = 2 / 300 * X.t() @ X
    W = torch.randn(6, 16, generator=torch.Generator().manual_seed(8))
    C = torch.rand(6, 16, generator=torch.Generator().manual_seed(9)) * 50
    d = torch.diag(inverse_hessian_cholesky(H)[0])
    # one column block: the mask is chosen once, on the dense weights, by w²·(a/U_jj² + C)
    _, keep, _ = sparsegpt_prune(W, H, 0.5, guide=C, obs_weight=0.3)
    assert torch.equal(keep, keep_mask(W**2 * (0.3 / d**2 + C), 0.5, "matrix"))
    assert not torch.equal(keep, sparsegpt_prune(W, H, 0.5)[1])  # the guide changed the choice
    # N:M: the first group of 4 columns is chosen on the dense weights too
    _, keep24, _ = sparsegpt_prune(W, H, None, nm=(2, 4), guide=C, obs_weight=0.3)
    g = slice(0, 4)
    assert torch.equal(keep24[:, g], nm_mask(W[:, g] ** 2 * (0.3 / d[g] ** 2 + C[:, g]), 2, 4))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dual_obs_prune(arch: str) -> None:
    domain, mixed = _calib(seed=3), _calib(seed=4)
    model = tiny_model(arch)
    res = carve.prune(model, "dual-obs", 0.5, domain, reconstruct_with=mixed)
    fisher = carve.score(tiny_model(arch), "fisher", domain)
    params = dict(model.named_parameters())
    for n, keep in res.mask.items():
        torch.testing.assert_close(res.importance[n], fisher[n])  # the domain term is the Fisher error
        assert torch.equal(params[n].detach() == 0, ~keep) and keep.float().mean() == 0.5
    # λ → ∞: the OBS term alone, i.e. SparseGPT on the sweep's blocks; an all-zero guide: the same
    ref = tiny_model(arch)
    ref_res = carve.prune(ref, "sparsegpt", 0.5, mixed)
    heavy = carve.prune(tiny_model(arch), "dual-obs", 0.5, domain, reconstruct_with=mixed, lam=1e12)
    zero = carve.ImportanceMap({n: torch.zeros_like(s) for n, s in fisher.items()}, fisher.meta)
    plain = tiny_model(arch)
    unguided = carve.prune(plain, "dual-obs", 0.5, domain, reconstruct_with=mixed, importance=zero)
    for n in ref_res.mask:
        assert torch.equal(heavy.mask[n], ref_res.mask[n]) and torch.equal(unguided.mask[n], ref_res.mask[n])
        torch.testing.assert_close(dict(plain.named_parameters())[n], dict(ref.named_parameters())[n])
    assert any(not torch.equal(res.mask[n], ref_res.mask[n]) for n in res.mask)  # λ = 1: the guide matters
    # --propagation dense: one pass per block, the same as SparseGPT's dense propagation at λ → ∞
    dense_ref = carve.prune(tiny_model(arch), "sparsegpt", 0.5, mixed, calib=Calibration(propagation="dense"))
    dense = carve.prune(
        tiny_model(arch),
        "dual-obs",
        0.5,
        domain,
        reconstruct_with=mixed,
        lam=1e12,
        calib=Calibration(propagation="dense"),
    )
    assert all(torch.equal(dense.mask[n], dense_ref.mask[n]) for n in dense_ref.mask)
    assert any(not torch.equal(dense.mask[n], heavy.mask[n]) for n in dense_ref.mask)
    # --propagation fused: the same as SparseGPT's fused pass at λ → ∞
    fused_ref = carve.prune(tiny_model(arch), "sparsegpt", 0.5, mixed, calib=Calibration(propagation="fused"))
    fused = carve.prune(
        tiny_model(arch),
        "dual-obs",
        0.5,
        domain,
        reconstruct_with=mixed,
        lam=1e12,
        calib=Calibration(propagation="fused"),
    )
    assert all(torch.equal(fused.mask[n], fused_ref.mask[n]) for n in fused_ref.mask)
    with pytest.raises(carve.UsageError, match="chooses its mask in SparseGPT's sweep"):
        carve.prune(tiny_model(arch), "dual-obs", 0.5, domain, granularity="global")
