"""The gradient engine: full forward/backward passes over calibration blocks, folding each
parameter's gradient into float32 per-parameter statistics the moment it is computed.

- Only the parameters asked for require gradients; every other parameter is frozen for the pass.
- Each parameter's gradient is consumed by a post-accumulate-grad hook as soon as backward has
  produced it, folded into the statistics, optionally used for an SGD step (the optimizer steps
  D-Pruner takes while it accumulates), and freed: no second copy of the model's gradients lives
  longer than one micro-batch's backward.
- Decoder blocks are checkpointed (their activations are recomputed in backward), so activation
  memory is one block's plus the block boundaries'.
- Statistics are means over micro-batches of f(g, θ) for named functions f (see STATISTICS); with
  equal-sized micro-batches the mean gradient equals the full-batch gradient.

Memory: the model, one float32 tensor per (parameter, statistic), and one micro-batch's
activations; with `lr > 0` also a float32 copy of the scored parameters (restored at the end).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from carve import distributed
from carve.engines.activations import bound_heap_retention
from carve.models.arch import find_blocks
from carve.models.patch import replaced_forwards
from carve.progress import progress

# f(g, θ) -> the per-micro-batch quantity whose mean is kept
StatFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

STATISTICS: dict[str, StatFn] = {
    "grad": lambda g, w: g,
    "grad_sq": lambda g, w: g * g,
    "grad_weight": lambda g, w: g * w,
    # |ΔL| of removing each weight (δθ = −θ) to second order with the empirical Fisher g² as
    # the Hessian diagonal, per micro-batch: |−g·θ + ½·(g·θ)²|  (D-Pruner's per-step score)
    "taylor2_step": lambda g, w: (0.5 * (g * w) ** 2 - g * w).abs(),
}


@dataclass
class GradientStats:
    """Per-parameter means over micro-batches: stats[statistic][param name] -> float32 tensor."""

    stats: dict[str, dict[str, torch.Tensor]]
    micro_batches: int
    losses: list[float] = field(default_factory=list)


# config attributes of a transform some architectures apply after the output head (Gemma's logit
# soft-capping, Cohere's logit scale): with one of these set the loss is computed from the logits
POST_HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale")


def plain_output_head(model: nn.Module) -> nn.Module | None:
    """The output head when the model's logits are exactly head(final hidden states)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    config = getattr(model, "config", None)
    if head is None or any(getattr(config, a, None) for a in POST_HEAD_TRANSFORMS):
        return None
    return head


def head_as_identity(head: nn.Module) -> Any:
    """The model returns its final hidden states in place of logits while this is active."""
    return replaced_forwards([head], lambda _m, _fwd: lambda hidden: hidden)


def _shifted_targets(ids: torch.Tensor) -> torch.Tensor:
    # each position predicts the next token; the last position of each row is ignored
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


def next_token_loss(model: nn.Module, ids: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Mean cross-entropy of predicting every token from those before it.

    The output head and the cross-entropy run over `chunk` positions at a time under activation
    checkpointing, so the full-vocabulary logits (and their log-softmax and gradient) never exist
    for the whole sequence at once: for a 49k vocabulary and 512 positions that is ~100 MB per
    copy saved.  Models with a transform after the head (see POST_HEAD_TRANSFORMS) or without a
    findable head get the loss from their full logits."""
    targets = _shifted_targets(ids)
    head = plain_output_head(model)
    if head is None or ids.shape[1] <= chunk:
        logits = model(input_ids=ids, use_cache=False).logits.float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    with head_as_identity(head):
        hidden = model(input_ids=ids, use_cache=False).logits

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=-100, reduction="sum")

    total = sum(
        checkpoint(chunk_loss, h, t, use_reentrant=False)
        for h, t in zip(hidden.split(chunk, dim=1), targets.split(chunk, dim=1), strict=True)
    )
    return total / (targets != -100).sum()


def checkpointed_blocks(model: nn.Module) -> Any:
    """Wrap every decoder block's forward in activation checkpointing (architecture-agnostic:
    the blocks are found as in the layer-wise engine, no model-specific flag is needed)."""
    _, blocks = find_blocks(model)

    def make(_block: nn.Module, fwd: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args, **kwargs: checkpoint(fwd, *args, use_reentrant=False, **kwargs)

    return replaced_forwards(list(blocks), make)


@contextmanager
def _only_these_require_grad(model: nn.Module, names: set[str]) -> Iterator[None]:
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])


def accumulate_gradients(
    model: nn.Module,
    calibration: torch.Tensor,
    params: list[str],
    statistics: dict[str, StatFn] | tuple[str, ...] = ("grad", "grad_sq", "grad_weight"),
    *,
    micro_batch: int = 1,
    checkpointing: bool = True,
    lr: float = 0.0,
    penalty: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = next_token_loss,
    desc: str = "gradients",
) -> GradientStats:
    """Means over micro-batches of each statistic f(g, θ) for the named parameters.

    `lr > 0` takes an SGD step θ ← θ − lr·g after each micro-batch's gradient (LOMO-style, fused
    into the hook); the original weights θ₀ are restored at the end.  `penalty(name, θ, θ₀)` is
    the gradient of a regularizer added to g (D-Pruner's refined loss); it only acts once θ has
    moved, so it is ignored without steps."""
    bound_heap_retention()
    fns = statistics if isinstance(statistics, dict) else {s: STATISTICS[s] for s in statistics}
    named = dict(model.named_parameters())
    device = next(model.parameters()).device
    acc = {s: {n: torch.zeros(named[n].shape, dtype=torch.float32, device=device) for n in params} for s in fns}
    original = {n: named[n].detach().float().clone() for n in params} if lr > 0 else {}

    def hook(name: str) -> Callable[[torch.Tensor], None]:
        def fold(p: torch.Tensor) -> None:
            assert p.grad is not None
            with torch.no_grad():
                g = p.grad.float()
                w = p.detach().float()
                if penalty is not None and lr > 0:
                    g = g + penalty(name, w, original[name])
                for s, f in fns.items():
                    acc[s][name].add_(f(g, w))
                if lr > 0:
                    p.sub_((lr * g).to(p.dtype))
            p.grad = None

        return fold

    batches = list(calibration.split(micro_batch))
    if lr == 0:  # steps between micro-batches are sequential: those runs are not sharded
        batches = distributed.shard(batches, "gradient micro-batches")
    losses: list[float] = []
    was_training = model.training
    model.eval()  # no dropout: statistics of the model as it is used
    handles = [named[n].register_post_accumulate_grad_hook(hook(n)) for n in params]
    ckpt = checkpointed_blocks(model) if checkpointing else _null()
    try:
        with _only_these_require_grad(model, set(params)), ckpt, torch.enable_grad():
            for ids in progress(batches, desc):
                loss = loss_fn(model, ids.to(device))
                loss.backward()
                losses.append(loss.item())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        with torch.no_grad():
            for n, w0 in original.items():
                named[n].copy_(w0.to(named[n].dtype))
    total = len(batches)
    for per in acc.values():
        for name in sorted(per):
            per[name].div_(len(batches))
            if lr == 0:
                total = distributed.merge_mean(per[name], len(batches))  # every rank's micro-batches
    return GradientStats(acc, total, losses)


@contextmanager
def _null() -> Iterator[None]:
    yield
