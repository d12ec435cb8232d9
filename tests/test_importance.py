"""Importance sources against direct computations, on tiny tensors and tiny models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from carve.errors import UsageError
from carve.importance import SOURCES, compute_importance, importance_source, low_rank
from carve.masks.mask import select_mask
from carve.settings import Targets
from tests.conftest import VOCAB, tiny_model


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": lin.weight.detach() for n, lin in Targets().linears(model).items()}


def test_magnitude_random_and_task_vector_are_what_they_say() -> None:
    model, base = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    W = _weights(model)
    mag = compute_importance("magnitude", model)
    assert mag.keys() == W.keys() and all(torch.equal(mag[k], W[k].abs()) for k in W)
    r1, r2 = compute_importance("random", model, seed=3), compute_importance("random", model, seed=3)
    assert all(torch.equal(r1[k], r2[k]) and 0 <= r1[k].min() and r1[k].max() < 1 for k in W)
    assert not torch.equal(next(iter(r1.values())), next(iter(compute_importance("random", model, seed=4).values())))
    tv = compute_importance("task-vector", model, reference=base)
    B = _weights(base)
    assert all(torch.equal(tv[k], (W[k] - B[k]).abs()) for k in W)
    assert tv.meta["source"] == "task-vector"
    with pytest.raises(UsageError, match="needs reference"):
        compute_importance("task-vector", model)


def test_lift_mask_against_a_direct_svd() -> None:
    """LIFT's principal weights: the top-density entries of |U_r S_r V_rᵀ| of each matrix, the
    rank-r approximation rebuilt here from numpy's SVD."""
    model = tiny_model("llama")
    W = _weights(model)
    rank, density = 8, 0.1
    mask = select_mask(compute_importance("lift", model, rank=rank), 1 - density, "matrix")
    for name, w in W.items():
        u, s, vt = (torch.from_numpy(x) for x in np.linalg.svd(w.double().numpy(), full_matrices=False))
        approx = (u[:, :rank] * s[:rank]) @ vt[:rank]
        k = w.numel() - int(w.numel() * (1 - density))  # select_mask removes floor(sparsity·n)
        want = torch.zeros(w.numel(), dtype=torch.bool)
        want[approx.abs().reshape(-1).topk(k).indices] = True
        got = mask[name].reshape(-1)
        assert got.sum() == k
        # equal up to ties at the threshold of float32 against float64 rounding
        assert (got != want).sum() <= 2, name
    # the approximation of full rank is the matrix itself; a fraction takes that share of the rank
    w = next(iter(W.values()))
    assert torch.equal(low_rank(w, min(w.shape)), w.float())
    frac = compute_importance("lift", model, rank=0.5)
    direct = low_rank(w, min(w.shape) // 2).abs()
    torch.testing.assert_close(frac[next(iter(W))], direct)


def test_fisher_against_per_block_gradients() -> None:
    """½ · mean over blocks of g² · θ², each block's gradient from a plain backward."""
    model = tiny_model("llama")
    data = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    got = compute_importance("fisher", model, data=data)
    ref = tiny_model("llama")
    params = dict(ref.named_parameters())
    want = {k: torch.zeros_like(params[k]) for k in got}
    for ids in data:
        ref.zero_grad()
        logits = ref(input_ids=ids[None]).logits
        F.cross_entropy(logits[0, :-1], ids[1:]).backward()
        for k in want:
            want[k] += params[k].grad.square() / len(data)  # type: ignore[union-attr]
    for k in got:
        torch.testing.assert_close(got[k], 0.5 * want[k] * params[k].detach().square(), rtol=1e-4, atol=1e-10)


def test_fisher_under_kl_to_a_teacher_and_at_a_reference_point() -> None:
    """The KL objective has zero gradient at the teacher itself; the reference point makes the
    score the error of moving each weight back to the reference, ½·E[g²]·(θ − θ_ref)²."""
    model = tiny_model("llama")
    data = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    at_self = compute_importance("fisher", model, data=data, objective="kl", teacher=tiny_model("llama"))
    assert max(v.abs().max().item() for v in at_self.values()) < 1e-12
    base = tiny_model("llama", seed=1)
    plain = compute_importance("fisher", model, data=data)
    moved = compute_importance("fisher", model, data=data, reference=base)
    W, B = _weights(model), _weights(base)
    for k in plain:
        torch.testing.assert_close(moved[k], plain[k] / W[k].square() * (W[k] - B[k]).square(), rtol=1e-3, atol=1e-12)


def test_a_new_source_is_one_registered_function() -> None:
    @importance_source("test-rows", paper="test", url="")
    def rows(model, linears):  # type: ignore[no-untyped-def]
        return {f"{n}.weight": torch.arange(lin.weight.shape[0]).float()[:, None].expand_as(lin.weight)
                for n, lin in linears.items()}  # fmt: skip

    try:
        imp = compute_importance("test-rows", tiny_model("llama"), Targets(include=("*mlp*",)))
        assert imp.keys() and all("mlp" in k for k in imp)
        assert select_mask(imp, 0.5, "matrix")["model.layers.0.mlp.up_proj.weight"][-1].all()
    finally:
        SOURCES.pop("test-rows")
    with pytest.raises(UsageError, match="unknown importance source"):
        compute_importance("test-rows", tiny_model("llama"))


def test_activation_sources_against_direct_statistics() -> None:
    """wanda: |W|·‖X_j‖₂/√n (Wanda's ranking; the root mean square keeps it free of the token count)
    with X the n tokens' inputs to the Linear on the dense model; obs:
    w²/[H⁻¹]²_jj with H = 2/n·XXᵀ, damped as SparseGPT damps it."""
    from carve.scorers.sparsegpt import inverse_hessian_cholesky

    model = tiny_model("llama")
    data = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    inputs: dict[str, list[torch.Tensor]] = {}
    linears = Targets().linears(model)
    hooks = [lin.register_forward_pre_hook(lambda _m, a, n=n: inputs.setdefault(n, []).append(a[0].detach()))
             for n, lin in linears.items()]  # fmt: skip
    with torch.no_grad():
        model(input_ids=data)
    for h in hooks:
        h.remove()
    wanda = compute_importance("wanda", model, data=data)
    obs = compute_importance("obs", model, data=data)
    for n, lin in linears.items():
        X = torch.cat(inputs[n]).reshape(-1, lin.in_features).double()
        W = lin.weight.detach().double()
        torch.testing.assert_close(
            wanda[f"{n}.weight"].double(), W.abs() * X.norm(dim=0) / len(X) ** 0.5, rtol=1e-4, atol=1e-6
        )
        H = 2 / len(X) * X.T @ X
        U, _ = inverse_hessian_cholesky(H.float())
        want = W.square() / torch.diag(U).double().square()
        torch.testing.assert_close(obs[f"{n}.weight"].double(), want, rtol=1e-3, atol=1e-6)
