"""Calibration passes over whole decoder blocks, for structured extraction: how much each block
changes its input (ShortGPT's angular distance), the mean inputs of the output projections
(FLAP's bias compensation), the greedy order of block removal by calibration loss, and the
calibration loss itself.  Blocks are stood in for by pass-through forwards (models.patch).

Streamed (a `BlockSource`, carve.models.skeleton): the same passes run one block at a time, each
read from disk, run on every batch and freed, from the hidden states recorded entering block 0;
the hooks see the same tensors as in the whole-model forward (`blockwise`)."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from carve.engines.layerwise import split_hidden
from carve.errors import UsageError
from carve.models.anatomy import anatomy
from carve.models.arch import find_blocks, last_logits
from carve.models.load import first_parameter
from carve.models.patch import replaced_forwards
from carve.progress import bar, progress

if TYPE_CHECKING:
    from carve.engines.gradient import BlockSource


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a, b))/π per position (last dimension compared): 0 = same direction, 1 = opposite."""
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return torch.arccos(cos.clamp(-1, 1)) / math.pi


@torch.no_grad()
def block_distances(
    model: nn.Module, calibration: torch.Tensor, batch_size: int = 8, source: BlockSource | None = None, run: int = 1
) -> torch.Tensor:
    """Mean angular distance arccos(cos(x_in, x_out))/π of each run of `run` consecutive decoder
    blocks (x_in entering block i, x_out leaving block i + run - 1; one entry per first block i)
    over every calibration token: 0 = the run leaves its input's direction unchanged."""
    _, blocks = find_blocks(model)
    total = torch.zeros(len(blocks) - run + 1, dtype=torch.float64)
    entering: list[list[torch.Tensor]] = [[] for _ in blocks]  # per block, its batches' inputs not yet used

    def hook(i: int) -> Any:
        def record(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x_in, _ = split_hidden(args, kwargs)
            if i < len(total):
                entering[i].append(x_in)
            if i >= run - 1:  # batches reach a block in the order they reached the run's first block
                x_out = out[0] if isinstance(out, (tuple, list)) else out
                total[i - run + 1] += angular_distance(entering[i - run + 1].pop(0), x_out).sum().double().cpu()

        return record

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    count = run_hooked(model, calibration, handles, batch_size, "block distances", source)
    return (total / count).float()


def run_order(distances: torch.Tensor, run: int = 1) -> list[int]:
    """Blocks in the order the distance rule drops them: runs of `run` blocks by ascending distance
    (`block_distances`, one entry per first block), each run that overlaps none taken before."""
    order: list[int] = []
    for i in distances.argsort().tolist():
        if not set(range(i, i + run)) & set(order):
            order += range(i, i + run)
    return order


@torch.no_grad()
def input_means(
    model: nn.Module, calibration: torch.Tensor, batch_size: int = 8, source: BlockSource | None = None
) -> list[dict[str, torch.Tensor]]:
    """Per block, the mean over calibration tokens of the inputs of o_proj and down_proj (what
    FLAP's bias compensation adds back for the removed columns)."""
    anat = anatomy(model)
    roles: tuple[str, ...] = ("o_proj", "down_proj")
    sums = [{r: torch.zeros(p.linear(r).in_features, dtype=torch.float64) for r in roles if r in p.names}
            for p in anat.parts]  # fmt: skip  # an MoE block: no dense down_proj

    def hook(i: int, role: str) -> Any:
        def record(_m: nn.Module, args: tuple[Any, ...]) -> None:
            sums[i][role] += args[0].detach().double().reshape(-1, args[0].shape[-1]).sum(0).cpu()

        return record

    handles = [
        p.linear(role).register_forward_pre_hook(hook(i, role)) for i, p in enumerate(anat.parts) for role in sums[i]
    ]
    count = run_hooked(model, calibration, handles, batch_size, "input means", source)
    return [{r: (t / count).float() for r, t in block.items()} for block in sums]


def run_hooked(
    model: nn.Module,
    calibration: torch.Tensor,
    handles: list[Any],
    batch_size: int,
    label: str,
    source: BlockSource | None = None,
) -> int:
    """Run the calibration blocks through the model (the hooks record what they need), remove the
    hooks, and return the number of tokens seen; with `source`, one decoder block at a time."""
    count = 0
    try:
        if source is not None:
            batches = list(calibration.split(batch_size))
            blockwise(source, batches, label)
            return sum(ids.numel() for ids in batches)
        device = first_parameter(model).device
        for ids in progress(list(calibration.split(batch_size)), label):
            model(input_ids=ids.to(device), use_cache=False)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return count


@contextmanager
def _hooks_held(module: nn.Module) -> Iterator[None]:
    """Within, the forward hooks of `module` and its submodules are held back (hooks registered
    within are kept apart and removed by their own handles)."""
    saved = [(m, m._forward_hooks, m._forward_pre_hooks) for m in module.modules()]
    for m, _, _ in saved:
        m._forward_hooks, m._forward_pre_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        for m, post, pre in saved:
            m._forward_hooks, m._forward_pre_hooks = post, pre


def _entering(source: BlockSource, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict[Any, Any]]:
    """The hidden states entering block 0 for `batches` and every block's recorded call (see
    `capture_inputs`); the tensors outside the blocks are freed after (only blocks run next)."""
    from carve.engines.layerwise import capture_inputs

    source.load_others()
    source.load_block(0)
    with _hooks_held(source.blocks):  # the capture runs block 0 once per shape: not a pass the hooks count
        captured, calls = capture_inputs(source.model, source.blocks, batches)
    source.free_others()
    return list(captured), calls


@torch.no_grad()
def blockwise(
    source: BlockSource,
    batches: list[torch.Tensor],
    label: str,
    skip: frozenset[int] = frozenset(),
    stand_in: Callable[[int], nn.Module] | None = None,
) -> tuple[list[torch.Tensor], int]:
    """The decoder blocks of `source` run on `batches` one at a time (each read, run, freed): the
    blocks in `skip` not at all (as dropped), block i replaced by `stand_in(i)` (called once it is
    read) where given.  Returns the final hidden states, one per batch, and how the blocks return
    (`layerwise.arity`)."""
    from carve.engines.layerwise import Relay, arity

    batches = [ids.to(source.device) for ids in batches]
    hidden, calls = _entering(source, batches)
    relay = Relay(calls)
    tuple_out = 0
    for i in progress(range(len(source.blocks)), label):
        if i in skip:
            continue
        source.load_block(i)
        block = source.blocks[i] if stand_in is None else stand_in(i)
        pairs = enumerate(zip(batches, hidden, strict=True))
        outs = [relay.output(block, h, calls[tuple(ids.shape)][i], j) for j, (ids, h) in pairs]
        relay.advance()
        tuple_out = arity(outs[0])
        hidden = [o[0] if tuple_out else o for o in outs]
        del block, outs
        source.free_block(i)
    return hidden, tuple_out


@torch.no_grad()
def final_losses(
    source: BlockSource, seqs: list[torch.Tensor], hidden: list[torch.Tensor], tuple_out: int
) -> list[float]:
    """The next-token loss of each of `seqs` whose final hidden states (the last block's output)
    are in `hidden`: the model's own final norm, head and loss, its blocks standing in (returning
    as `tuple_out`, `layerwise.arity`, says)."""
    from carve.engines.gradient import next_token_loss, returning
    from carve.engines.layerwise import as_block_output

    source.load_others()
    losses = []
    for ids, h in zip(seqs, hidden, strict=True):
        with replaced_forwards(list(source.blocks), returning(as_block_output(h, tuple_out))):
            losses.append(float(next_token_loss(source.model, ids.to(source.device)).item()))
    source.free_others()
    return losses


@contextmanager
def _bypassed(
    blocks: nn.ModuleList, skip: set[int], tuple_out: int, resume: tuple[int, torch.Tensor] | None = None
) -> Iterator[None]:
    """Within, the blocks in `skip` return their input unchanged (what dropping them computes:
    see `zero_plan`), and with `resume=(i, h)` blocks 0..i are not run either, block i returning
    `h` (so a forward starts from a cached hidden state).  `tuple_out`: how the blocks return
    (`layerwise.arity`)."""
    from carve.engines.layerwise import as_block_output

    stubs: dict[int, torch.Tensor | None] = {j: None for j in skip}
    if resume is not None:
        stubs.update({j: None for j in range(resume[0])})
        stubs[resume[0]] = resume[1]
    index = {id(blocks[j]): j for j in stubs}

    def stub(out: torch.Tensor | None) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            h = out if out is not None else split_hidden(args, kwargs)[0]
            return as_block_output(h, tuple_out)

        return forward

    with replaced_forwards([blocks[j] for j in stubs], lambda m, _fwd: stub(stubs[index[id(m)]])):
        yield


def _block_inputs(
    model: nn.Module, blocks: nn.ModuleList, seqs: list[torch.Tensor], dropped: list[int], tuple_out: int
) -> tuple[list[list[torch.Tensor]], int]:
    """The hidden state entering each block (per sequence) of the model without `dropped`, and how
    its blocks return (`layerwise.arity`; `tuple_out`: what they were seen to return before; with
    nothing dropped, it is not needed)."""
    from carve.engines.layerwise import arity

    states: list[list[torch.Tensor]] = [[] for _ in blocks]
    kinds: list[int] = []

    def record(i: int) -> Any:
        def f(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            states[i].append(split_hidden(args, kwargs)[0].detach())

        return f

    kept = next(j for j in range(len(blocks)) if j not in dropped)
    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[kept].register_forward_hook(lambda _m, _a, out: kinds.append(arity(out))))
    try:
        with _bypassed(blocks, set(dropped), tuple_out):
            for ids in seqs:
                last_logits(model, ids, 1)
    finally:
        for h in handles:
            h.remove()
    return states, kinds[0]


def _runs(
    n_blocks: int,
    order: list[int],
    run: int,
    keep_one_of: frozenset[int] = frozenset(),
    never: frozenset[int] = frozenset(),
) -> list[list[int]]:
    """The candidate runs of one greedy step: every `run` consecutive blocks not yet dropped, but none
    that would leave no block of `keep_one_of` (a hybrid's attention blocks) or holds one of `never`."""
    kept = [i for i in range(n_blocks) if i not in order]
    runs = [kept[k : k + run] for k in range(len(kept) - run + 1)]
    return [r for r in runs if not (keep_one_of and keep_one_of <= {*order, *r}) and not never & set(r)]


_NO_RUN = (
    "no run of blocks is left to drop (an attention block and the end blocks the config needs stay); drop fewer "
    "than {n} blocks"
)


@torch.no_grad()
def greedy_drop_order(
    model: nn.Module,
    calibration: torch.Tensor,
    n: int,
    source: BlockSource | None = None,
    run: int = 1,
    keep_one_of: frozenset[int] = frozenset(),
    never: frozenset[int] = frozenset(),
) -> tuple[list[int], list[float]]:
    """The first `n` blocks to drop, a run of `run` consecutive kept blocks at a time (one block by
    default): each time the run whose removal (on top of those already chosen) gives the lowest
    next-token loss on the calibration blocks, never one that would leave no block of `keep_one_of`
    (a hybrid's attention blocks) or that holds a block of `never` (`structure.pinned_blocks`).  Returns
    the order and the loss after each removal (one per run).

    Exact and cheaper than slicing a trial model per candidate: per step, one forward of the
    current model records the hidden state entering every block; a candidate's forward then
    starts from the state entering its first block, so only the blocks after the run run.  With
    `source` (streamed), each step reads every block once and carries every candidate's hidden
    states through it."""
    from carve.engines.gradient import next_token_loss

    _, blocks = find_blocks(model)
    if not 0 <= n < len(blocks) or n % run:
        raise UsageError(
            f"cannot drop {n} of the model's {len(blocks)} blocks in runs of {run}; keep at least one, drop whole runs"
        )
    order: list[int] = []
    losses: list[float] = []
    if source is not None:
        for _ in range(n // run):
            candidates = _streamed_candidates(source, list(calibration), order, run, keep_one_of, never)
            if not candidates:
                raise UsageError(_NO_RUN.format(n=n))
            loss, first = min((loss, r[0]) for r, loss in candidates)
            order += next(r for r in _runs(len(blocks), order, run, keep_one_of, never) if r[0] == first)
            losses.append(round(loss, 5))
        return order, losses
    device = first_parameter(model).device
    seqs = [b[None].to(device) for b in calibration]
    tuple_out = 0
    ticks = bar("greedy block search", sum(len(blocks) - k - run + 1 for k in range(0, n, run)))
    for _ in range(n // run):
        states, tuple_out = _block_inputs(model, blocks, seqs, order, tuple_out)
        best: tuple[float, list[int]] | None = None
        for candidate in _runs(len(blocks), order, run, keep_one_of, never):
            i = candidate[0]
            total = 0.0
            for s, ids in enumerate(seqs):
                with _bypassed(blocks, {*order, *candidate}, tuple_out, resume=(i, states[i][s])):
                    total += next_token_loss(model, ids).item()
            loss = total / len(seqs)
            if best is None or loss < best[0]:
                best = (loss, candidate)
            ticks.update()
        if best is None:
            raise UsageError(_NO_RUN.format(n=n))
        order += best[1]
        losses.append(round(best[0], 5))
    ticks.close()
    return order, losses


@torch.no_grad()
def _streamed_candidates(
    source: BlockSource,
    calibration: list[torch.Tensor],
    order: list[int],
    run: int = 1,
    keep_one_of: frozenset[int] = frozenset(),
    never: frozenset[int] = frozenset(),
) -> list[tuple[list[int], float]]:
    """One step of the greedy search, streamed: (run, loss of the model without `order` and it)
    for every run of `run` consecutive blocks not in `order`.  Each block is read once: the current
    model's hidden states and every candidate's (from the state entering the run's first block,
    which skips the run) pass through it."""
    from carve.engines.layerwise import Relay, arity

    seqs = [b[None].to(source.device) for b in calibration]
    current, calls = _entering(source, seqs)
    relay = Relay(calls)  # the current model's; each candidate forks its own
    tuple_out = 0
    candidates: dict[int, tuple[list[torch.Tensor], Relay]] = {}

    def through(j: int, states: list[torch.Tensor], passing: Relay) -> list[torch.Tensor]:
        nonlocal tuple_out
        pairs = enumerate(zip(seqs, states, strict=True))
        outs = [passing.output(source.blocks[j], h, calls[tuple(ids.shape)][j], s) for s, (ids, h) in pairs]
        passing.advance()
        tuple_out = arity(outs[0])
        return [o[0] if tuple_out else o for o in outs]

    runs = {r[0]: r for r in _runs(len(source.blocks), order, run, keep_one_of, never)}
    for j in progress(range(len(source.blocks)), "greedy block search (streamed)"):
        if j in order:
            continue
        source.load_block(j)
        for i, (states, passing) in candidates.items():
            if j not in runs[i]:
                candidates[i] = (through(j, states, passing), passing)
        if j in runs:  # the candidate dropping the run from block j: the state entering it, carried on
            candidates[j] = (current, relay.fork())
        current = through(j, current, relay)
        source.free_block(j)
    return [(runs[i], sum(final_losses(source, seqs, states, tuple_out)) / len(seqs))
            for i, (states, _) in candidates.items()]  # fmt: skip


@torch.no_grad()
def calibration_loss(model: nn.Module, blocks: torch.Tensor) -> float:
    """Mean next-token loss over `blocks` (one forward each)."""
    from carve.engines.gradient import next_token_loss

    device = first_parameter(model).device
    return float(sum(next_token_loss(model, b[None].to(device)).item() for b in blocks) / len(blocks))
