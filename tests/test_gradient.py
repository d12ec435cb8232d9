"""The gradient engine against plain full-batch autograd on tiny models."""

from __future__ import annotations

import pytest
import torch

from carve.engines import accumulate_gradients, next_token_loss
from carve.models import all_prunable_linears
from tests.conftest import VOCAB, tiny_model


def _calib(n: int = 6, length: int = 20) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def _weights(model: torch.nn.Module) -> list[str]:
    return [f"{n}.weight" for n in all_prunable_linears(model)]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_mean_gradient_equals_full_batch_autograd(arch: str) -> None:
    model = tiny_model(arch)
    calib = _calib()
    names = _weights(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = accumulate_gradients(model, calib, names, micro_batch=2)

    ref_model = tiny_model(arch)
    loss = next_token_loss(ref_model, calib)
    params = dict(ref_model.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    for n, g in zip(names, grads, strict=True):
        torch.testing.assert_close(got.stats["grad"][n], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got.stats["grad_weight"][n], g * params[n].detach(), rtol=1e-4, atol=1e-6)
    # squared gradients: the mean over micro-batches of each micro-batch's own gradient squared
    sq = {n: torch.zeros_like(params[n]) for n in names}
    for mb in calib.split(2):
        for n, g in zip(
            names, torch.autograd.grad(next_token_loss(ref_model, mb), [params[n] for n in names]), strict=True
        ):
            sq[n] += g * g / 3
    for n in names:
        torch.testing.assert_close(got.stats["grad_sq"][n], sq[n], rtol=1e-4, atol=1e-8)
    # nothing left behind: weights unchanged, no .grad, requires_grad restored
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) and p.grad is None and p.requires_grad


def test_sgd_steps_with_a_penalty_and_weights_restored() -> None:
    """With lr > 0 each micro-batch's refined gradient g + penalty(θ) is used for an SGD step
    before the next micro-batch; the statistics follow that trajectory; θ is restored."""
    model = tiny_model("llama")
    calib = _calib(n=4)
    names = _weights(model)[:3]
    lr, lam = 0.05, 0.5
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    G = {n: torch.rand_like(theta0[n]) for n in names}
    got = accumulate_gradients(
        model,
        calib,
        names,
        ("grad",),
        micro_batch=1,
        lr=lr,
        penalty=lambda n, w, w0: 2 * lam * G[n] * (w - w0),
    )
    ref = tiny_model("llama")
    params = dict(ref.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    for ids in calib.split(1):
        gs = torch.autograd.grad(next_token_loss(ref, ids), [params[n] for n in names])
        with torch.no_grad():
            for n, g in zip(names, gs, strict=True):
                g = g + 2 * lam * G[n] * (params[n] - theta0[n])
                total[n] += g / 4
                params[n] -= lr * g
    for n in names:
        torch.testing.assert_close(got.stats["grad"][n], total[n], rtol=1e-4, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), theta0[n])
