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
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from carve import distributed
from carve.engines.activations import Budget, bound_heap_retention
from carve.engines.layerwise import Relay, arity, as_block_output, block_output, capture_inputs
from carve.errors import UsageError
from carve.models.arch import find_blocks
from carve.models.load import first_parameter
from carve.models.patch import replaced_forwards, without_caches
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
    the blocks are found as in the layer-wise engine, no model-specific flag is needed); a cache
    handed to a block is withheld (`without_caches`: the recompute would fill it twice)."""
    _, blocks = find_blocks(model)

    def make(_block: nn.Module, fwd: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            args, kwargs = without_caches(args, kwargs)
            return checkpoint(fwd, *args, use_reentrant=False, **kwargs)

        return run

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
    device = first_parameter(model).device
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
                _fold(acc, fns, name, g, w)
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
                if not loss.requires_grad:  # Reformer: its blocks run inside its own autograd function
                    raise UsageError(
                        f"{type(model).__name__}'s loss does not reach its weights through autograd, so carve cannot "
                        "take its gradients; use a method without them (sparsegpt, wanda or magnitude)"
                    )
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


def _fold(acc: dict[str, dict[str, torch.Tensor]], fns: dict[str, StatFn], name: str, g: torch.Tensor,
          w: torch.Tensor) -> None:  # fmt: skip
    for s, f in fns.items():
        acc[s][name].add_(f(g, w))


def _carried_leaves(previous: Any, wanted: bool) -> tuple[Any, dict[int, torch.Tensor]]:
    """What the block before handed on (its output tuple, hidden states left out: `Relay`), with
    each floating tensor in it a leaf that takes a gradient when `wanted` (ZAYA's router states:
    the next block computes with them, so the loss reaches the block before through them too)."""
    if not wanted or not isinstance(previous, (tuple, list)):
        return previous, {}
    leaves = {k: v.detach().requires_grad_(True) for k, v in enumerate(previous)
              if isinstance(v, torch.Tensor) and v.is_floating_point()}  # fmt: skip
    return tuple(leaves.get(k, v) for k, v in enumerate(previous)), leaves


def _folding(
    acc: dict[str, dict[str, torch.Tensor]], fns: dict[str, StatFn], name: str
) -> Callable[[torch.Tensor], None]:
    """A post-accumulate-grad hook folding the parameter's gradient into `acc`, then freeing it."""

    def fold(p: torch.Tensor) -> None:
        assert p.grad is not None
        with torch.no_grad():
            _fold(acc, fns, name, p.grad.float(), p.detach().float())
        p.grad = None

    return fold


def returning(out: Any) -> Callable[[nn.Module, Callable[..., Any]], Callable[..., Any]]:
    """For replaced_forwards: every block returns `out` (the final hidden states)."""
    return lambda _m, _fwd: lambda *_a, **_k: out


@contextmanager
def _null() -> Iterator[None]:
    yield


class BlockSource(Protocol):
    """A model whose decoder blocks are read from disk when needed (carve.models.skeleton)."""

    model: nn.Module
    blocks: nn.ModuleList
    device: torch.device

    def block_names(self, i: int) -> list[str]: ...
    def parameter(self, name: str) -> torch.Tensor: ...
    def load_block(self, i: int) -> None: ...
    def free_block(self, i: int) -> None: ...
    def load_others(self) -> None: ...
    def free_others(self) -> None: ...


def streamed_gradients(
    source: BlockSource,
    calibration: torch.Tensor,
    params: list[str],
    statistics: dict[str, StatFn],
    on_block: Callable[[int, dict[str, dict[str, torch.Tensor]]], None],
    *,
    micro_batch: int = 1,
    max_memory: int | None = None,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] = next_token_loss,
    desc: str = "gradients",
) -> GradientStats:
    """`accumulate_gradients` (without steps) for a model whose decoder blocks live on disk, one
    block in memory at a time: the same per-parameter statistics, bit for bit on the same device.

    1. Forward, block by block: each micro-batch's input to every block is kept (in memory up to
       `max_memory` bytes, the rest in a temporary file: carve.engines.activations).
    2. The loss: the tensors outside the blocks are read, each micro-batch's final hidden states
       go through the model's own norm and head (`loss_fn`, every block's forward replaced by one
       that returns them) and the loss's gradient with respect to them is kept.
    3. Backward, last block first: each block is read again, re-run on its kept inputs with
       gradients on (what activation checkpointing does in memory), and back-propagated from the
       gradient of its output; its parameters' statistics are folded per micro-batch exactly as in
       memory, and the gradient of its input goes on to the block before.

    `on_block(i, {param: {statistic: mean}})` gets block i's statistics while the block is still
    in memory (its weights readable through the model), then the block is freed.  Every asked
    parameter must be in a decoder block.  The source is left with the tensors outside the blocks
    read, and block 0 read if it was.  Returns the micro-batch count and losses (the statistics
    went to `on_block`).  Memory: one block, the tensors outside the blocks, and the blocks' inputs
    (blocks x calibration tokens x hidden size) within `max_memory`."""
    bound_heap_retention()
    model, blocks, device = source.model, source.blocks, source.device
    asked = set(params)
    prefix, _ = find_blocks(model)

    def block_params(i: int) -> dict[str, torch.Tensor]:
        """Block i's asked parameters by name, as its modules hold them now (an MoE's unfused experts
        are views of the fused tensors read: carve.models.experts)."""
        return {n: p for n, p in blocks[i].named_parameters(prefix=f"{prefix}.{i}") if n in asked}

    by_block = [list(block_params(i)) for i in range(len(blocks))]
    outside = set(params) - {n for names in by_block for n in names}
    if outside:
        raise UsageError(f"a streamed gradient pass scores decoder-block parameters only, not {sorted(outside)[:3]}")
    lowest = next((i for i, names in enumerate(by_block) if names), None)
    batches = distributed.shard(list(calibration.split(micro_batch)), "gradient micro-batches")
    block0_read = all(source.parameter(n).device.type != "meta" for n in source.block_names(0))
    model.eval()
    budget = Budget(max_memory)
    losses: list[float] = []
    total = len(batches)
    try:
        source.load_block(0)
        hidden, calls = capture_inputs(model, blocks, [b.to(device) for b in batches], budget.new())
        shapes = [tuple(b.shape) for b in batches]
        source.free_others()
        inputs, given = [], []  # per block: its hidden inputs, and what the block before passed it
        tuple_out = 0
        relay = Relay(calls)
        with torch.no_grad():
            for i in progress(range(len(blocks)), f"{desc}: forward", total=len(blocks)):
                source.load_block(i)
                out = budget.new()
                for j, h in enumerate(hidden):
                    y = relay.output(blocks[i], h, calls[shapes[j]][i], j)
                    tuple_out = arity(y)
                    out.append(y[0] if tuple_out else y)
                inputs.append(hidden)
                given.append(relay.advance())
                hidden = out
                if i > 0 or not block0_read:
                    source.free_block(i)
        source.load_others()
        grads = budget.new()
        for ids, h in progress(list(zip(batches, hidden, strict=True)), f"{desc}: loss"):
            leaf = h.detach().requires_grad_(True)
            with replaced_forwards(list(blocks), returning(as_block_output(leaf, tuple_out))), torch.enable_grad():
                loss = loss_fn(model, ids.to(device))
                if not loss.requires_grad:  # Reformer: its blocks run inside its own autograd function
                    raise UsageError(
                        f"{type(model).__name__}'s loss does not reach its weights through autograd, so carve cannot "
                        "take its gradients; use a method without them (sparsegpt, wanda or magnitude)"
                    )
                loss.backward()
            assert leaf.grad is not None
            grads.append(leaf.grad)
            losses.append(loss.item())
        hidden.release()
        source.free_others()
        passed: dict[int, dict[int, torch.Tensor]] = {}  # batch -> gradients of what block i handed on, by place
        for i in progress(range(len(blocks) - 1, -1, -1), f"{desc}: backward", total=len(blocks)):
            if lowest is None or i < lowest:
                break
            source.load_block(i)
            named = block_params(i)
            acc = {s: {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in named.items()}
                   for s in statistics}  # fmt: skip
            for p in named.values():
                p.requires_grad_(True)
            handles = [p.register_post_accumulate_grad_hook(_folding(acc, statistics, n)) for n, p in named.items()]
            upstream, passed_up = budget.new(), {}
            try:
                with torch.enable_grad():
                    for j, h in enumerate(inputs[i]):
                        x = h.detach().requires_grad_(i > lowest)
                        previous, leaves = _carried_leaves(given[i].get(j), i > lowest)
                        out = block_output(blocks[i], x, calls[shapes[j]][i], previous)
                        roots = [(out[0] if arity(out) else out, grads[j])]
                        roots += [(out[k], g) for k, g in passed.get(j, {}).items()]
                        torch.autograd.backward([r for r, _ in roots], [g for _, g in roots])
                        if x.grad is not None:
                            upstream.append(x.grad)
                        passed_up[j] = {k: t.grad for k, t in leaves.items() if t.grad is not None}
            finally:
                for handle in handles:
                    handle.remove()
                for p in named.values():
                    p.requires_grad_(False)
            grads.release()
            grads, passed = upstream, passed_up
            inputs[i].release()
            for per in acc.values():
                for name in sorted(per):
                    per[name].div_(len(batches))
                    total = distributed.merge_mean(per[name], len(batches))
            on_block(i, {n: {s: acc[s][n] for s in acc} for n in named})
            if i > 0 or not block0_read:
                source.free_block(i)
    finally:
        budget.close()
    source.load_others()
    return GradientStats({}, total, losses)
