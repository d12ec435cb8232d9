"""The layer-wise engine: one decoder block at a time, with sequential propagation.

1. Capture the real call of every decoder block (positional args and kwargs: position
   embeddings, masks, layer-specific masks such as Gemma's sliding window) by running the
   model once per batch shape with pre-hooks, and the hidden states entering block 0 for every
   calibration batch (stopping there).
2. Per block: hook its Linear layers so each accumulates a statistic of its inputs, run the
   calibration batches, hand (linears, statistics) to the caller (which scores and/or prunes),
   then re-run the block so the next block sees the outputs of this (possibly pruned) block.

Streamed (`calib.stream`, carve.streamed): `stream.captured()` once the calibration's inputs to
block 0 are captured (the tensors outside the blocks may go), `stream.enter(i)` before block i is
calibrated and `stream.leave(i)` after it is pruned (and re-run), which read it from disk, write it
and free it.

Under torch.distributed (carve.distributed) each rank takes its share of the calibration batches;
each block's statistics are all-reduced before `on_block`, so every rank prunes alike.

Memory: the model, the hidden states of the calibration set for one block boundary (input and
output), one block's activations, and one block's statistics.  Past `calib.max_memory` the hidden
states go to a temporary file; past `calib.statistics_memory` (an MoE block's Hessians: ~7 GB in
Mixtral-8x7B's) the block is calibrated in rounds, each a few of its Linears, the last-called first
so that pruning one round changes no input of the next (`rounds`): the same statistics, for one
more pass over the calibration per round.  The engine never imports a method.

`propagation="fused"` is the one-pass variant: a single forward of the whole calibration set
as one batch, in which every Linear is handed to the caller the moment its input arrives, so
it is pruned before it computes and every later Linear (in its block too: GPTQ's "true
sequential" order) sees the already-pruned ones' outputs.  Each matmul runs once, on pruned
weights; the price is one block's activations for the whole calibration set at once.

`calib_dtype` (e.g. bfloat16 for a float32 model) runs the block forwards under autocast in that
dtype (16-bit forwards, as SparseGPT's and GPTQ's reference code ran float16 models).  The
statistics get each Linear's input as the forward produced it and compute in float32, outside
autocast, as do scoring and pruning; the weights keep the model's dtype.  None (the default)
computes in the model's dtype.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from carve import distributed
from carve.engines.activations import Activations, Budget
from carve.errors import UsageError
from carve.models.arch import find_blocks, prunable_linears, weight_matrix
from carve.models.load import first_parameter
from carve.models.patch import replaced_forwards, without_caches
from carve.progress import bar, progress
from carve.scorers.stats import merge_statistics
from carve.settings import DEFAULT_CALIBRATION, DEFAULT_TARGETS, Calibration, Targets


class _Stop(Exception):
    pass


# other args, kwargs, hidden-as-kwarg, and the arguments the previous block's output gives: (where, k)
# pairs, `where` an index into the other args or a kwarg's name, k an index into that output's tuple
BlockCall = tuple[tuple[Any, ...], dict[str, Any], bool, tuple[tuple[int | str, int], ...]]


def split_hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, BlockCall]:
    """A block call's hidden states and the rest of the call, to be replayed (caches withheld)."""
    args, kwargs = without_caches(args, kwargs)
    if "hidden_states" in kwargs:
        kw = dict(kwargs)
        hidden = kw.pop("hidden_states")
        return hidden, (args, kw, True, ())
    return args[0], (args[1:], dict(kwargs), False, ())


def block_output(block: nn.Module, hidden: torch.Tensor, call: BlockCall, previous: Any = None) -> Any:
    """What the block returns for `hidden` in its recorded call (a tensor, or a tuple led by one);
    with `previous`, the previous block's output for the same batch, the arguments it gives
    (`BlockCall`'s last part) taken from it, not from the recording."""
    args, kwargs, as_kwarg, carried = call
    if carried and previous is not None:
        given, kwargs = list(args), dict(kwargs)
        for where, k in carried:
            if isinstance(where, int):
                given[where] = previous[k]
            else:
                kwargs[where] = previous[k]
        args = tuple(given)
    return block(*args, hidden_states=hidden, **kwargs) if as_kwarg else block(hidden, *args, **kwargs)


class Relay:
    """What consecutive blocks pass each other besides the hidden states (GLM-MoE-DSA's shared
    layers take the top-k indices of the last layer that computed them), per batch, for engines
    that run the blocks one at a time: `output(block, h, call, j)` runs a block on batch j with
    what the previous block returned for it, and keeps what this one returns; `advance()` moves
    on to the next block.  Inactive (nothing is passed: every other model) it keeps nothing."""

    def __init__(self, calls: dict[tuple[int, ...], list[BlockCall]]) -> None:
        self.active = any(c[3] for per_shape in calls.values() for c in per_shape)
        self.previous: dict[int, Any] = {}  # batch -> the previous block's output
        self.current: dict[int, Any] = {}

    def output(self, block: nn.Module, hidden: torch.Tensor, call: BlockCall, j: int) -> Any:
        out = block_output(block, hidden, call, self.previous.get(j))
        if self.active and isinstance(out, (tuple, list)):
            self.current[j] = (None, *out[1:])  # not the hidden states: those the engine keeps
        return out

    def call(self, block: nn.Module, hidden: torch.Tensor, call: BlockCall, j: int) -> torch.Tensor:
        out = self.output(block, hidden, call, j)
        return out[0] if isinstance(out, (tuple, list)) else out

    def fork(self) -> Relay:
        """A relay for a second stream from here on (a candidate that skips blocks), given what
        this one's next block is given."""
        twin = Relay({})
        twin.active, twin.previous = self.active, dict(self.previous)
        return twin

    def advance(self) -> dict[int, Any]:
        """Done with a block: its outputs become what the next block is given; returns what this
        block was given (a streamed backward replays it)."""
        given, self.previous, self.current = self.previous, self.current, {}
        return given


def arity(out: Any) -> int:
    """How a block returns: 0 for a tensor, else the length of the tuple it returns."""
    return len(out) if isinstance(out, (tuple, list)) else 0


def as_block_output(h: torch.Tensor, arity: int) -> Any:
    """`h` in a block's output structure (`arity`): the tensor, or a tuple led by it, the rest None
    (what follows in a block's tuple, GLM-MoE-DSA's top-k indices for the next block, is read only
    by the blocks, which stand in wherever this is returned)."""
    return (h, *([None] * (arity - 1))) if arity else h


def call_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall, previous: Any = None) -> torch.Tensor:
    out = block_output(block, hidden, call, previous)
    return out[0] if isinstance(out, (tuple, list)) else out


def _forward_until_stop(model: nn.Module, ids: torch.Tensor, handles: list[Any]) -> None:
    """Run the model on `ids` until one of its hooks raises _Stop (or to the end), then remove
    `handles`."""
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture_inputs(
    model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], into: Activations | None = None
) -> tuple[Activations, dict[tuple[int, ...], list[BlockCall]]]:
    """Each batch's input to block 0 (appended to `into`, or to a list without a memory budget), and
    the arguments each block is called with, per batch shape."""
    hidden = Budget(None).new() if into is None else into
    calls: dict[tuple[int, ...], list[BlockCall]] = {}

    def stop_at_first(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        h, _ = split_hidden(args, kwargs)
        hidden.append(h.detach())
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(stop_at_first, with_kwargs=True)
    try:
        for ids in progress(batches, "capturing block inputs"):
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()

    # the per-block calls depend only on the batch shape (no padding), not on the hidden states,
    # so one forward per distinct shape records what each block is really given; block 0 runs,
    # every later block passes its input through (in block 0's output structure), and the
    # forward stops at the last block's pre-hook: no block maths beyond block 0, no logits
    for ids in batches:
        shape = tuple(ids.shape)
        if shape in calls:
            continue
        recorded: list[BlockCall] = []
        leaving: list[torch.Tensor] = []  # what the block called last returned (passed through: its input)
        extras: list[Any] = []  # block 0's output after its hidden states (passed-through blocks return it too)

        def record(
            _m: nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            into: list[BlockCall] = recorded,
            last: list[torch.Tensor] = leaving,
            given: list[Any] = extras,
        ) -> None:
            h, call = split_hidden(args, kwargs)
            if last and not _same(last[0], h):
                _refuse_unchained(model, blocks, len(into))
            if into:  # which of its arguments the previous block's output gives (the same objects)
                call = (*call[:3], _carried(call, given))
            into.append(call)
            last[:] = [h]
            if len(into) == len(blocks):
                raise _Stop

        def first_out(
            _m: nn.Module, _a: Any, out: Any, last: list[torch.Tensor] = leaving, given: list[Any] = extras
        ) -> None:
            last[:] = [out[0] if isinstance(out, (tuple, list)) else out]
            given[:] = list(out) if isinstance(out, (tuple, list)) else [out]

        handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]
        handles.append(blocks[0].register_forward_hook(first_out))
        try:
            with _passing_through(blocks):
                _forward_until_stop(model, ids, handles)
        except (AttributeError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                raise
            # Reformer reads fields of its own output type off each block's output; DBRX's experts
            # add bfloat16 outputs into a float32 buffer under autocast
            said = str(exc).splitlines()[0][:160] if str(exc) else ""
            autocast = torch.is_autocast_enabled(ids.device.type)
            raise UsageError(
                f"{type(model).__name__}'s forward does not take its blocks run one at a time ({type(exc).__name__}: "
                f"{said}); {'if it was 16-bit autocast (try --calib-dtype float32), else ' if autocast else ''}"
                "use --propagation fused (one forward of the whole model; not streamed)"
            ) from None
        calls[shape] = recorded
    return hidden, calls


def _carried(call: BlockCall, previous: list[Any]) -> tuple[tuple[int | str, int], ...]:
    """The arguments of `call` that are elements (after the first) of the previous block's output."""
    args, kwargs, _, _ = call
    places: list[tuple[int | str, Any]] = [*enumerate(args), *kwargs.items()]
    return tuple(
        (where, k)
        for where, value in places
        if isinstance(value, torch.Tensor)
        for k in range(1, len(previous))
        if value is previous[k]
    )


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.to(b.device, b.dtype), b)


def _refuse_unchained(model: nn.Module, blocks: nn.ModuleList, i: int) -> None:
    """Blocks the model computes between (XLM: its attention blocks' list, with the layer norms
    and feed-forward layers in the model's own loop) cannot be run one at a time from block 0's
    input: every later block would be fed what the previous one returned, not what it is given."""
    prefix, _ = find_blocks(model)
    raise UsageError(
        f"{type(model).__name__}'s blocks ({prefix}) do not chain: the model computes between them "
        f"(block {i} is not given what block {i - 1} returns), so carve cannot run them one block at a "
        "time; use --propagation fused (one forward of the whole model; not streamed)"
    )


@contextlib.contextmanager
def _passing_through(blocks: nn.ModuleList) -> Iterator[None]:
    """Blocks 1.. return their hidden input, shaped as block 0's output (a tensor, or a tuple
    with the rest of block 0's)."""
    first: list[Any] = []

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        out = first[0] if first else None
        if isinstance(out, list):  # OpenAI GPT's blocks return a list
            return [hidden, *out[1:]]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handle = blocks[0].register_forward_hook(lambda _m, _a, out: first.append(out))
    try:
        with replaced_forwards(list(blocks[1:]), lambda _m, _fwd: passthrough):
            yield
    finally:
        handle.remove()


def check_calib_dtype(model_dtype: torch.dtype, calib_dtype: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype for a model of `model_dtype` (None: compute in the model's own), or a
    UsageError when `calib_dtype` is not a lower precision than the model's."""
    if calib_dtype is None or calib_dtype == model_dtype:
        return None
    if calib_dtype not in (torch.bfloat16, torch.float16) or model_dtype != torch.float32:
        raise UsageError(
            f"calibration dtype {str(calib_dtype).removeprefix('torch.')} is not a lower precision than the model's "
            f"{str(model_dtype).removeprefix('torch.')}: use bfloat16 or float16 with a float32 model, or the model's"
        )
    return calib_dtype


def _computing(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    """The context the block forwards run in: autocast to `dtype`, or nothing.  No cast cache:
    each weight is used once per context, and a weight pruned inside the context (fused) must
    never be read from a copy cast before."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


class _BlockStatistics:
    """Feeds each Linear's inputs to a statistic, through forward *pre*-hooks (a statistic
    needs only inputs).

    Linears that receive the very same input tensor in a row (q/k/v, gate/up) share one
    statistic object, accumulated once: the grouping is read off the first batch, keeping the
    latest input alive so tensor identity is unambiguous (only the latest: a Linear fed an
    earlier input again would get its own statistic, equal, just computed twice).  With
    `stop_early`, once the first batch has shown which Linear is called last, later batches stop
    the block right after that Linear's input is recorded: its matmul and whatever follows are
    not needed (the block is re-run after pruning)."""

    def __init__(
        self,
        linears: dict[str, nn.Module],
        statistic: Callable[[int, Any], Any],
        device: torch.device,
        stop_early: bool,
        ready: Callable[[str, Any], None] | None = None,
    ) -> None:
        self.stats: dict[str, Any] = {}
        self.linears = linears
        self.pending = set(linears)  # with `ready`: the Linears not handed over yet
        self._ready = ready
        self._statistic, self._device, self._count = statistic, device, len(linears)
        self.leader: dict[str, str] = {}  # Linear -> the one whose statistic it shares, in call order
        self.calls = dict.fromkeys(linears, 0)  # how many times each was called
        self._live: tuple[torch.Tensor, str] | None = None  # the latest input and its leader
        self._last: str | None = None
        self._stop_early = stop_early
        self._seen_all = False  # a whole batch has run: the call order is known
        self._handles = [
            lin.register_forward_pre_hook(lambda _m, args, name=name: self._hook(name, args[0]))
            for name, lin in linears.items()
        ]

    def _hook(self, name: str, x: torch.Tensor) -> None:
        # statistics and whatever `ready` does (pruning) run outside the forward's autocast
        with torch.autocast(self._device.type, enabled=False):
            self._record(name, x)

    def _record(self, name: str, x: torch.Tensor) -> None:
        self.calls[name] += 1
        if name not in self.leader:
            same = self._live[1] if self._live is not None and self._live[0] is x else None
            self.leader[name] = same or name
            if same is not None:
                self.stats[name] = self.stats[same]
            else:
                self._live = (x, name)
                self.stats[name] = self._statistic(x.shape[-1], self._device)
            if len(self.leader) == self._count:
                self._live = None  # grouping complete: release the first batch's input
                self._last = name
        if self.leader[name] == name:
            self.stats[name].update(x)
        if self._ready is not None and name in self.pending:
            # one batch holds the whole calibration set: the statistic is complete
            self.pending.discard(name)
            self._ready(name, self.stats[name])
        if self._stop_early and self._seen_all and name == self._last:
            raise _Stop

    def batch_done(self) -> None:
        self._seen_all = self._last is not None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._live = None


class _Nothing:
    """A statistic that keeps nothing (a block's calls watched, not measured)."""

    def update(self, _x: torch.Tensor) -> None:
        pass


# on_block(i, linears, stats): block i's Linears and their statistics.  With
# `calib.statistics_memory` a block may come in several calls (rounds), each a disjoint part of it
OnBlock = Callable[[int, dict[str, nn.Module], dict[str, Any]], None]


def _calibrate(
    block: nn.Module,
    linears: dict[str, nn.Module],
    hidden: Activations,
    calls: list[BlockCall],
    statistic: Callable[[int, Any], Any] | None,
    device: torch.device,
    autocast: torch.dtype | None,
    stop_early: bool,
    outputs: Activations | None,
    relay: Relay,
) -> dict[str, Any]:
    """Run every batch of `hidden` through `block` (batch j in its recorded call `calls[j]`, with
    what the previous block passed it through `relay`), each of `linears` feeding its statistic, the
    block's outputs appended to `outputs` (when given; a batch stopped early gives none); the
    statistics summed over the ranks."""
    collector = None if statistic is None else _BlockStatistics(linears, statistic, device, stop_early)
    try:
        for j, h in enumerate(hidden):
            try:
                with _computing(device, autocast):
                    out = relay.call(block, h, calls[j], j)
                if outputs is not None:
                    outputs.append(out)
            except _Stop:
                pass
            if collector is not None:
                collector.batch_done()
    finally:
        if collector is not None:
            collector.remove()
    if collector is None or statistic is None:
        return {}
    for name, lin in linears.items():  # never called: its weight read directly (Jamba's dt_proj)
        if name not in collector.stats:
            collector.stats[name] = statistic(weight_matrix(lin).shape[1], device)  # empty: the identity
    merge_statistics(collector.stats)  # over every rank's share of the calibration (one process: as is)
    return collector.stats


@torch.no_grad()
def rounds(
    block: nn.Module,
    linears: dict[str, nn.Module],
    hidden: Activations,
    call: BlockCall,
    size: Callable[[int], int],
    budget: int,
) -> list[dict[str, nn.Module]]:
    """`linears` parted into rounds whose statistics take at most `budget` bytes together
    (`size(in_features)` each; Linears fed the same input share one, and go together), in the
    *reverse* of the order the block calls them, as the first batch of `hidden` shows: a Linear's
    input is computed before it is called, so pruning the Linears of a round changes no input of a
    later round's, and the rounds give the statistics one round would.  One round when everything fits,
    or when a Linear is called twice in a forward (no such order then).  Linears the batch never
    called (carve's unfused experts are all called, token or not; a module may skip one) go in the
    first round, calibrated before anything of the block is pruned.  Under torch.distributed rank
    0's plan is every rank's."""
    width = {n: int(weight_matrix(lin).shape[1]) for n, lin in linears.items()}
    if sum(size(w) for w in width.values()) <= budget:
        plan = [sorted(linears)]
    else:
        first = hidden[0]
        seen = _BlockStatistics(linears, lambda _d, _device: _Nothing(), first.device, False)
        try:
            call_block(block, first, call)
        finally:
            seen.remove()
        leader, called = seen.leader, seen.calls
        if any(c > 1 for c in called.values()):
            plan = [sorted(linears)]
        else:
            groups: dict[str, list[str]] = {}
            for name in leader:  # in the order of their first calls
                groups.setdefault(leader[name], []).append(name)
            unseen = [n for n in sorted(linears) if not called[n]]
            plan, used = [unseen], sum(size(width[n]) for n in unseen)
            for lead in reversed(list(groups)):
                cost = size(width[lead])
                if plan[-1] and used + cost > budget:
                    plan.append([])
                    used = 0
                plan[-1] += groups[lead]
                used += cost
    plan = distributed.broadcast_json(plan, 0)
    if len(plan) == 1:
        return [linears]
    return [{n: lin for n, lin in linears.items() if n in part} for part in map(set, plan)]


@torch.no_grad()
def layerwise(
    model: nn.Module,
    calibration: torch.Tensor,
    on_block: OnBlock,
    statistic: Callable[[int, Any], Any] | None,
    targets: Targets = DEFAULT_TARGETS,
    calib: Calibration = DEFAULT_CALIBRATION,
    desc: str = "calibrating",
) -> dict[str, float]:
    """Run `calibration` [N, L] block by block; returns the seconds spent in each part: `statistics`
    (the calibration forwards that feed the statistics, and their all-reduce), `method` (the
    `on_block` calls), `propagate` (re-running pruned blocks), `stream` (reading and writing blocks);
    with a memory budget also the activations spilled (`spilled_mb`) and the most rounds a block
    took (`most_rounds`).

    For block i, `statistic(in_features, device)` is built for its Linear layers and fed their
    inputs; then `on_block(i, linears, stats)` is called.  With `propagation="pruned"`
    (sequential propagation of a pruned model), the block is re-run on the same inputs so the
    next block sees the pruned block's outputs; with `"dense"` the outputs of the statistics pass
    (the block as it was before `on_block`) are propagated: one pass per block.  With `"fused"`
    (see the module docstring) `on_block(i, {name: linear}, {name: stat})` is called for each
    Linear as its input arrives, in one forward of the model with `calib.batch_size` ignored.
    `calib.statistics_memory`: a block whose statistics would take more is calibrated in rounds
    (`rounds`), `on_block` called once per round; "fused" ignores it.
    `calib.dtype`: see the module docstring; `calib.products`: the dtype of a Hessian's per-batch
    products.  `targets`: the Linear modules handed over."""
    include, exclude, propagation = targets.include, targets.exclude, calib.propagation
    stream = calib.stream
    if stream is not None and propagation == "fused":
        raise UsageError("a streamed extraction calibrates one block at a time: use --propagation pruned or dense")
    if distributed.active() and propagation == "fused":
        raise UsageError(
            "under torch.distributed calibration is sharded block by block: use --propagation pruned or dense"
        )
    param = first_parameter(model)
    device = param.device
    autocast = check_calib_dtype(param.dtype, calib.dtype)
    size = getattr(statistic, "nbytes", None)  # a statistic's bytes for an input width: rounds need it
    if calib.products is not None and getattr(statistic, "PRODUCTS", False):  # a Hessian's XᵀX dtype
        with_products: Any = statistic
        statistic = functools.partial(with_products, products=calib.products)
    prefix, blocks = find_blocks(model)
    seconds = dict.fromkeys(("statistics", "method", "propagate", "stream"), 0.0)
    if propagation == "fused" and statistic is not None:
        start = time.perf_counter()
        with _computing(device, autocast):
            _fused(model, calibration.to(device), blocks, prefix, on_block, statistic, include, exclude, desc)
        seconds["statistics"] = time.perf_counter() - start  # one pass: the methods run inside it
        return seconds
    rerun = propagation == "pruned"
    batches = distributed.shard([b.to(device) for b in calibration.split(calib.batch_size)])
    budget = Budget(calib.max_memory)  # activations past it go to a temporary file
    try:
        with _computing(device, autocast):
            hidden, calls = capture_inputs(model, blocks, batches, budget.new())
        if stream is not None:
            stream.captured()  # only blocks run from here on
        shapes = [tuple(b.shape) for b in batches]
        relay = Relay(calls)
        most_rounds = 1
        clock = time.perf_counter()

        def lap(part: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[part] += now - clock
            clock = now

        for i in progress(range(len(blocks)), desc, total=len(blocks)):
            lap("statistics")  # the capture, before the first block
            if stream is not None:
                stream.enter(i)
                lap("stream")
            block = blocks[i]
            last = i == len(blocks) - 1
            linears = prunable_linears(block, f"{prefix}.{i}", include, exclude, blocks[:i])
            parts = [linears]
            if size is not None and calib.statistics_memory is not None:
                with _computing(device, autocast):
                    parts = rounds(block, linears, hidden, calls[shapes[0]][i], size, calib.statistics_memory)
            most_rounds = max(most_rounds, len(parts))
            outputs = budget.new()
            for r, part in enumerate(parts):
                # a later round's Linears are all called before an earlier round's, so pruning
                # those changes none of their inputs; only the first round's outputs are the
                # block's as it was (propagated with "dense"), later rounds stop once fed
                stats = _calibrate(block, part, hidden, [calls[s][i] for s in shapes], statistic, device,
                                   autocast, rerun or r > 0, outputs if r == 0 else None, relay)  # fmt: skip
                lap("statistics")
                on_block(i, part, stats)
                del stats
                lap("method")
            if rerun and not last:
                outputs.release()
                outputs = budget.new()
                with _computing(device, autocast):
                    for j, h in enumerate(hidden):
                        outputs.append(relay.call(block, h, calls[shapes[j]][i], j))
                lap("propagate")
            relay.advance()  # with "pruned", what the pruned block passes on
            hidden.release()
            hidden = outputs
            if stream is not None:
                stream.leave(i)
                lap("stream")
    finally:
        budget.close()
    if calib.max_memory is not None:
        seconds["spilled_mb"] = budget.spilled / 2**20
    if calib.statistics_memory is not None:
        seconds["most_rounds"] = most_rounds  # of any block (1: every block's statistics at once)
    return {k: round(v, 3) for k, v in seconds.items()}


def _fused(
    model: nn.Module,
    calibration: torch.Tensor,
    blocks: nn.ModuleList,
    prefix: str,
    on_block: OnBlock,
    statistic: Callable[[int, Any], Any],
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    desc: str,
) -> None:
    """One forward of the model on all of `calibration`, every Linear handed to `on_block` from
    its pre-hook (so before it computes); stopped once the last block has run (no logits)."""
    device = calibration.device
    collectors: list[_BlockStatistics] = []
    handles = []
    with bar(desc, len(blocks)) as shown:
        for i, block in enumerate(blocks):
            linears = prunable_linears(block, f"{prefix}.{i}", include, exclude, blocks[:i])

            def ready(name: str, stat: Any, i: int = i, linears: dict[str, nn.Module] = linears) -> None:
                on_block(i, {name: linears[name]}, {name: stat})

            collectors.append(_BlockStatistics(linears, statistic, device, False, ready))

            def finished(_m: nn.Module, _args: Any, _out: Any, i: int = i) -> None:
                # Linears the forward never called are handed over with an empty statistic, as
                # the block-by-block passes do
                c = collectors[i]
                if c.pending:
                    names = sorted(c.pending)
                    c.pending.clear()
                    empty = {n: statistic(weight_matrix(c.linears[n]).shape[1], device) for n in names}
                    with torch.autocast(device.type, enabled=False):
                        on_block(i, {n: c.linears[n] for n in names}, empty)
                c.remove()
                shown.update(1)
                if i == len(blocks) - 1:
                    raise _Stop

            handles.append(block.register_forward_hook(finished))
        try:
            _forward_until_stop(model, calibration, handles)
        finally:
            for c in collectors:
                c.remove()
