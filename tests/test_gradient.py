"""The gradient engine against plain full-batch autograd on tiny models."""

from __future__ import annotations

import pytest
import torch

from carve.engines import accumulate_gradients, next_token_loss
from carve.models import all_prunable_linears
from tests.conftest import VOCAB, any_tiny_config, tiny_model


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


def test_a_cache_the_model_builds_anyway_is_not_filled_twice() -> None:
    """XLM builds a key/value cache whatever use_cache says and hands it to its attention blocks;
    under checkpointing the blocks' recompute appended their keys a second time ("expanded size
    of the tensor (64) must match the existing size (32)").  The engine's gradients equal plain
    autograd's on the whole model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(any_tiny_config("xlm")).eval()
    calib = torch.randint(3, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    names = _weights(model)
    got = accumulate_gradients(model, calib, names, ("grad",), micro_batch=4)
    params = dict(model.named_parameters())
    want = torch.autograd.grad(next_token_loss(model, calib), [params[n] for n in names])
    for n, g in zip(names, want, strict=True):
        torch.testing.assert_close(got.stats["grad"][n], g, rtol=1e-4, atol=1e-6)


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


def _full_logits_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2", "opt", "gemma3-softcap"])
def test_chunked_next_token_loss_equals_the_full_logits_loss(arch: str) -> None:
    """Head + cross-entropy over chunks of positions (checkpointed) gives the same loss and the
    same gradients, including those of a tied embedding, as cross-entropy on the full logits;
    an architecture with a transform after the head (Gemma's soft-capping) is computed in full."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    def build() -> torch.nn.Module:
        config = tiny_config(arch.removesuffix("-softcap"))
        if arch.endswith("-softcap"):
            config.final_logit_softcapping = 3.0
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()

    ids = _calib(n=2, length=23)
    got_model, ref_model = build(), build()
    calls: list[int] = []
    got_model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    got = next_token_loss(got_model, ids, chunk=5)
    # chunked: the hidden-states pass through the head, then one call per chunk of 5 positions
    assert len(calls) == (1 if arch.endswith("-softcap") else 1 + 5)
    ref = _full_logits_loss(ref_model, ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    got.backward()
    ref.backward()
    ref_params = dict(ref_model.named_parameters())
    for n, p in got_model.named_parameters():
        torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-4, atol=1e-6, msg=n)
    # the head is the model's own again afterwards
    torch.testing.assert_close(got_model(input_ids=ids).logits, ref_model(input_ids=ids).logits)


def _streamed(directory, calib: torch.Tensor, asked: list[str], fns: dict, budget: int | None):
    """Statistics of the streamed gradient pass, the order blocks were handed over, the blocks
    holding asked weights, the pass's result."""
    from carve.engines.gradient import streamed_gradients
    from carve.models.skeleton import SkeletonModel

    got: dict[str, dict[str, torch.Tensor]] = {}
    seen: list[int] = []
    with SkeletonModel(directory, torch.float32, "cpu") as sk:

        def on_block(i: int, stats: dict) -> None:
            blocks = range(len(sk.blocks))
            real = [b for b in blocks if any(p.device.type != "meta" for p in sk.blocks[b].parameters())]
            assert real == [i]  # the block is in memory, alone
            seen.append(i)
            got.update(stats)

        result = streamed_gradients(sk, calib, asked, fns, on_block, max_memory=budget)
        assert sk.parameter(sk.other_names()[0]).device.type != "meta"  # left with the outer tensors read
        holding = [i for i in range(len(sk.blocks)) if any(n.startswith(f"{sk.prefix}.{i}.") for n in asked)]
    return got, seen, holding, result


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("budget", [None, 0])  # kept in memory; every block input and gradient spilled
def test_streamed_gradients_equal_the_in_memory_engine(tmp_path, arch: str, budget: int | None) -> None:
    """Block by block from disk (forward, loss, backward), the statistics are the in-memory engine's
    bit for bit, each block's handed over while it is in memory, never two blocks read at once;
    a subset of the blocks' Linears leaves the lower blocks out of the backward pass."""
    from carve.engines.gradient import STATISTICS

    model = tiny_model(arch)
    model.save_pretrained(tmp_path / "m")
    calib = _calib(n=4, length=40)
    names = _weights(model)
    upper = [n for n in names if ".1." in n]  # the second block only
    assert upper and len(upper) < len(names)
    fns = {s: STATISTICS[s] for s in ("grad", "grad_sq")}
    for asked in (names, upper):
        want = accumulate_gradients(model, calib, asked, fns)
        got, seen, holding, result = _streamed(tmp_path / "m", calib, asked, fns, budget)
        assert seen == holding[::-1]  # last block first; none below the lowest asked
        assert sorted(got) == sorted(asked)
        for n in asked:
            for s in fns:
                assert torch.equal(got[n][s], want.stats[s][n]), (n, s)
        assert result.micro_batches == want.micro_batches
        assert result.losses == pytest.approx(want.losses, rel=1e-6)
