"""The masked training loop: AdamW against torch's, frozen entries bitwise unchanged, optimizer
state proportional to density, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from carve.engines.gradient import next_token_loss
from carve.ops.train import MaskedAdamW, Schedule, train
from tests.conftest import VOCAB, tiny_model

SCHEDULE = Schedule(steps=4, lr=1e-2, warmup=1, checkpoint_every=2)


def _batches(n: int = 8, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def _mask(shape: torch.Size, density: float, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density


def test_dense_entries_step_as_torch_adamw() -> None:
    """Every entry trained: the same weights as torch.optim.AdamW with the same clipping,
    schedule and decoupled weight decay."""
    s = Schedule(steps=3, lr=1e-2, warmup=1, weight_decay=0.1, clip=0.5)
    ours, ref = tiny_model("llama"), tiny_model("llama")
    batches = _batches()
    trainable = {n: None for n, _ in ours.named_parameters()}
    train(ours, batches, next_token_loss, trainable, s)

    opt = torch.optim.AdamW(ref.parameters(), lr=s.lr, betas=s.betas, eps=s.eps, weight_decay=0.1)
    ref.train()
    for step in range(s.steps):
        for g in opt.param_groups:
            g["lr"] = s.lr_at(step)
        next_token_loss(ref, batches[step : step + 1]).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    # to 1e-6, but for entries whose gradient is at Adam's eps scale: there m/(√v + eps) turns the
    # float32 rounding of the gradient into a share of a whole step (one embedding entry of 24,576
    # moved by 1.2% of the last step on an AMD EPYC, 2026-11-30; none on Intel): at most 1 in 10^4
    # entries, each within 2% of the last learning rate
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        off = (a - b).abs() > 1e-6 + 1e-4 * b.abs()
        assert off.sum() <= a.numel() // 10_000, n
        assert ((a - b).abs()[off] <= 0.02 * s.lr_at(s.steps - 1)).all(), n


def test_masked_training_freezes_every_other_entry_bitwise() -> None:
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n: _mask(p.shape, 0.1, i) for i, (n, p) in enumerate(model.named_parameters()) if p.dim() == 2}
    train(model, _batches(), next_token_loss, trainable, SCHEDULE)
    for n, p in model.named_parameters():
        if n not in trainable:
            assert torch.equal(p, before[n]), n  # untouched parameter
            continue
        keep = trainable[n]
        assert torch.equal(p[~keep], before[n][~keep]), n  # frozen entries, bit for bit
        assert not torch.equal(p[keep], before[n][keep]), n  # trained entries moved
    assert all(p.grad is None for p in model.parameters())  # no dense gradient left behind


def test_masked_step_equals_adamw_on_masked_gradients() -> None:
    """With a mask, the trained entries move exactly as torch's AdamW moves them when every
    other entry's gradient is zero (no weight decay: AdamW would decay frozen entries)."""
    ours, ref = tiny_model("llama"), tiny_model("llama")
    batches = _batches()
    masks = {n: _mask(p.shape, 0.3, i) for i, (n, p) in enumerate(ours.named_parameters()) if p.dim() == 2}
    train(ours, batches, next_token_loss, masks, SCHEDULE)
    params = {n: p for n, p in ref.named_parameters() if n in masks}
    for n, p in ref.named_parameters():
        p.requires_grad_(n in masks)
    opt = torch.optim.AdamW(params.values(), lr=SCHEDULE.lr, eps=SCHEDULE.eps, weight_decay=0.0)
    ref.train()
    for step in range(SCHEDULE.steps):
        for g in opt.param_groups:
            g["lr"] = SCHEDULE.lr_at(step)
        next_token_loss(ref, batches[step : step + 1]).backward()
        for n, p in params.items():
            p.grad.mul_(masks[n])  # type: ignore[union-attr]
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        opt.zero_grad()
    for n, p in ours.named_parameters():
        torch.testing.assert_close(p, dict(ref.named_parameters())[n], rtol=1e-4, atol=1e-6, msg=n)


def test_optimizer_state_scales_with_density() -> None:
    model = tiny_model("llama")
    params = dict(model.named_parameters())
    matrices = {n: p for n, p in params.items() if p.dim() == 2}
    full = MaskedAdamW(params, {n: None for n in matrices}, SCHEDULE).state_bytes()
    for density in (0.05, 0.2, 0.5):
        sparse = MaskedAdamW(params, {n: _mask(p.shape, density) for n, p in matrices.items()}, SCHEDULE)
        # moments (2 x float32) and an int32 index per trained entry: 12 bytes against 8 dense
        assert sparse.state_bytes() == pytest.approx(full * density * 12 / 8, rel=0.1)
        assert sparse.trained_entries() == sum(int(_mask(p.shape, density).sum()) for p in matrices.values())


def test_gradient_accumulation_equals_one_batch() -> None:
    """Two micro-batches of one block give the step one batch of two blocks gives (a large ε
    keeps Adam's update smooth in g: near-zero gradients whose rounding differs would otherwise
    step ±lr either way)."""
    a, b = tiny_model("llama"), tiny_model("llama")
    batches = _batches()
    trainable = {n: None for n, p in a.named_parameters() if p.dim() == 2}
    train(a, batches, next_token_loss, trainable, Schedule(steps=2, lr=1e-2, batch_size=2, micro_batch=1, eps=1e-2))
    train(b, batches, next_token_loss, trainable, Schedule(steps=2, lr=1e-2, batch_size=2, micro_batch=2, eps=1e-2))
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=n)


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    batches = _batches()
    straight = tiny_model("llama")
    trainable = {n: _mask(p.shape, 0.2, i) for i, (n, p) in enumerate(straight.named_parameters()) if p.dim() == 2}
    want = train(straight, batches, next_token_loss, trainable, SCHEDULE)

    def crash(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model("llama"), batches, next_token_loss, trainable, SCHEDULE, checkpoint=ckpt, on_step=crash)
    assert sorted(p.name for p in ckpt.iterdir()) == ["progress.json", "state.safetensors"]  # no pickles
    resumed = tiny_model("llama")  # a fresh process: the source weights, then the checkpoint
    got = train(resumed, batches, next_token_loss, trainable, SCHEDULE, checkpoint=ckpt, resume=True)
    assert got.resumed_from_step == 2 and got.losses == pytest.approx(want.losses, abs=1e-6)
    for (n, x), (_, y) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.equal(x, y), n


def test_a_crash_while_checkpointing_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """Killed while writing the second checkpoint: the first is still whole and resumes."""
    import carve.ops.train as train_module

    batches = _batches()
    model = tiny_model("llama")
    trainable = {n: _mask(p.shape, 0.2, i) for i, (n, p) in enumerate(model.named_parameters()) if p.dim() == 2}
    s = Schedule(steps=6, lr=1e-2, warmup=1, checkpoint_every=2)
    want = train(tiny_model("llama"), batches, next_token_loss, trainable, s)
    ckpt = tmp_path / "ckpt"
    real, calls = train_module.write_json, []

    def dies_on_second(path, data):  # type: ignore[no-untyped-def]
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(train_module, "write_json", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        train(model, batches, next_token_loss, trainable, s, checkpoint=ckpt)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left beside it
    got = train(tiny_model("llama"), batches, next_token_loss, trainable, s, checkpoint=ckpt, resume=True)
    assert got.resumed_from_step == 2 and got.losses == pytest.approx(want.losses, abs=1e-6)
