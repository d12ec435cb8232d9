"""Structured extraction: remove whole MLP channels, attention key/value groups and decoder
blocks, leaving a smaller *dense* model whose config is still standard.

Units and their importance (from any carve ImportanceMap, i.e. any scorer):
- MLP channel c of a block: the sum of the scores of every weight that exists only for it, the
  c-th rows of gate_proj and up_proj and the c-th column of down_proj.
- Key/value group g of a block (grouped-query attention: query head h reads key/value head
  h // (heads / kv_heads)): the rows of k_proj and v_proj of head g, the rows of q_proj of its
  query heads and the matching columns of o_proj.  Removing whole groups keeps the model valid.
- Decoder block, by one of two drop rules: "distance", the angular distance between its input and
  output hidden states, arccos(cos)/π averaged over calibration tokens (ShortGPT's block
  influence, Gromov et al.), the blocks that change their input least dropped first; or
  "greedy", one block at a time, the one whose removal raises the calibration loss least
  (`greedy_drop_order`; slower, much better on the embedded default: bench/depth_rules.py).

Every block keeps the same number of channels and groups (the top ones of that block), so the
config stays standard: `intermediate_size`, `num_attention_heads`, `num_key_value_heads`,
`num_hidden_layers` (and `layer_types`) are rewritten, `head_dim` is written explicitly, the
hidden size, embeddings (tied or not) and rotary settings are untouched.

Supported: decoder blocks with `q_proj k_proj v_proj o_proj` attention and a `gate_proj`
(optional) `up_proj down_proj` MLP (Llama, Mistral, Qwen2, Gemma/Gemma2/Gemma3, Phi-3 style
names aside), found by module names, not by model class.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from carve.engines.layerwise import split_hidden
from carve.errors import UsageError
from carve.models.arch import find_blocks, last_logits
from carve.models.patch import replaced_forwards
from carve.progress import bar, progress

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
DROP_RULES = ("distance", "greedy")
DEFAULT_DROP_RULE = "distance"
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Parts:
    """The structural handles of one decoder block."""

    attention: nn.Module  # the module holding q/k/v/o_proj
    mlp: nn.Module  # the module holding gate/up/down_proj
    names: dict[str, str]  # role ("q_proj", ...) -> full module name

    def linear(self, role: str) -> nn.Linear:
        holder = self.attention if role in ATTENTION else self.mlp
        lin = getattr(holder, role)
        assert isinstance(lin, nn.Linear)
        return lin


@dataclass
class Anatomy:
    prefix: str  # module path of the blocks' ModuleList ("model.layers")
    blocks: nn.ModuleList
    parts: list[Parts]
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads


def _text_config(model: nn.Module) -> Any:
    config: Any = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def anatomy(model: nn.Module) -> Anatomy:
    """Find the attention and MLP projections of every decoder block, or say why not."""
    prefix, blocks = find_blocks(model)
    parts: list[Parts] = []
    for i, block in enumerate(blocks):
        holders: dict[str, nn.Module] = {}
        names: dict[str, str] = {}
        for name, mod in block.named_modules():
            for role in ATTENTION + MLP:
                lin = getattr(mod, role, None)
                if isinstance(lin, nn.Linear) and role not in names:
                    holders[role] = mod
                    names[role] = f"{prefix}.{i}.{name}.{role}" if name else f"{prefix}.{i}.{role}"
        missing = [r for r in ATTENTION + MLP[1:] if r not in names]
        if missing:
            raise UsageError(
                f"structured extraction needs Llama-style blocks (q/k/v/o_proj attention, gate/up/down_proj "
                f"MLP); {type(model).__name__} block {i} has no {', '.join(missing)}"
            )
        parts.append(Parts(holders["q_proj"], holders["up_proj"], names))
    config = _text_config(model)
    heads, kv_heads = (
        config.num_attention_heads,
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    )
    first = parts[0]
    head_dim = first.linear("k_proj").out_features // kv_heads
    intermediate = first.linear("up_proj").out_features
    if first.linear("q_proj").out_features != heads * head_dim or heads % kv_heads:
        raise UsageError(
            f"{type(model).__name__}: q_proj has {first.linear('q_proj').out_features} outputs, not "
            f"{heads} heads x {head_dim}; carve cannot tell its heads apart"
        )
    return Anatomy(prefix, blocks, parts, heads, kv_heads, head_dim, intermediate)


# --------------------------------------------------------------------------- unit importance
def _rows(t: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum of a [out, in] score matrix over consecutive row groups -> [groups]."""
    return t.float().reshape(groups, -1).sum(1)


def _cols(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t.float().reshape(t.shape[0], groups, -1).sum((0, 2))


def unit_importance(scores: Mapping[str, torch.Tensor], anat: Anatomy) -> tuple[torch.Tensor, torch.Tensor]:
    """(key/value group importance [blocks, kv_heads], MLP channel importance [blocks, intermediate])
    as sums of the scores of the weights each unit owns (scores in [out, in] layout)."""
    groups = torch.zeros(len(anat.parts), anat.kv_heads)
    channels = torch.zeros(len(anat.parts), anat.intermediate)
    for i, p in enumerate(anat.parts):

        def s(role: str, p: Parts = p) -> torch.Tensor:
            key = f"{p.names[role]}.weight"
            if key not in scores:
                raise UsageError(f"the importance map has no scores for {key}; score the attention and MLP weights")
            return scores[key]

        groups[i] = _rows(s("k_proj"), anat.kv_heads) + _rows(s("v_proj"), anat.kv_heads)
        groups[i] += _rows(s("q_proj"), anat.kv_heads) + _cols(s("o_proj"), anat.kv_heads)
        channels[i] = _rows(s("up_proj"), anat.intermediate) + _cols(s("down_proj"), anat.intermediate)
        if "gate_proj" in p.names:
            channels[i] += _rows(s("gate_proj"), anat.intermediate)
    return groups, channels


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos(a, b))/π per position (last dimension compared): 0 = same direction, 1 = opposite."""
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    return torch.arccos(cos.clamp(-1, 1)) / math.pi


@torch.no_grad()
def block_distances(model: nn.Module, calibration: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean angular distance arccos(cos(x_in, x_out))/π of each decoder block over every
    calibration token: 0 = the block leaves its input's direction unchanged."""
    _, blocks = find_blocks(model)
    total = torch.zeros(len(blocks), dtype=torch.float64)

    def hook(i: int) -> Any:
        def record(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            x_in, _ = split_hidden(args, kwargs)
            x_out = out[0] if isinstance(out, (tuple, list)) else out
            total[i] += angular_distance(x_in, x_out).sum().double().cpu()

        return record

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    count = run_hooked(model, calibration, handles, batch_size, "block distances")
    return (total / count).float()


@torch.no_grad()
def input_means(model: nn.Module, calibration: torch.Tensor, batch_size: int = 8) -> list[dict[str, torch.Tensor]]:
    """Per block, the mean over calibration tokens of the inputs of o_proj and down_proj (what
    FLAP's bias compensation adds back for the removed columns)."""
    anat = anatomy(model)
    sums = [{r: torch.zeros(p.linear(r).in_features, dtype=torch.float64) for r in ("o_proj", "down_proj")}
            for p in anat.parts]  # fmt: skip

    def hook(i: int, role: str) -> Any:
        def record(_m: nn.Module, args: tuple[Any, ...]) -> None:
            sums[i][role] += args[0].detach().double().reshape(-1, args[0].shape[-1]).sum(0).cpu()

        return record

    handles = [
        p.linear(role).register_forward_pre_hook(hook(i, role))
        for i, p in enumerate(anat.parts)
        for role in ("o_proj", "down_proj")
    ]
    count = run_hooked(model, calibration, handles, batch_size, "input means")
    return [{r: (t / count).float() for r, t in block.items()} for block in sums]


def run_hooked(model: nn.Module, calibration: torch.Tensor, handles: list[Any], batch_size: int, label: str) -> int:
    """Run the calibration blocks through the model (the hooks record what they need), remove the
    hooks, and return the number of tokens seen."""
    device = next(model.parameters()).device
    count = 0
    try:
        for ids in progress(list(calibration.split(batch_size)), label):
            model(input_ids=ids.to(device), use_cache=False)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return count


@contextmanager
def _bypassed(
    blocks: nn.ModuleList, skip: set[int], tuple_out: bool, resume: tuple[int, torch.Tensor] | None = None
) -> Iterator[None]:
    """Within, the blocks in `skip` return their input unchanged (what dropping them computes:
    see `zero_plan`), and with `resume=(i, h)` blocks 0..i are not run either, block i returning
    `h` (so a forward starts from a cached hidden state).  `tuple_out`: the blocks return tuples."""
    stubs: dict[int, torch.Tensor | None] = {j: None for j in skip}
    if resume is not None:
        stubs.update({j: None for j in range(resume[0])})
        stubs[resume[0]] = resume[1]
    index = {id(blocks[j]): j for j in stubs}

    def stub(out: torch.Tensor | None) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            h = out if out is not None else split_hidden(args, kwargs)[0]
            return (h,) if tuple_out else h

        return forward

    with replaced_forwards([blocks[j] for j in stubs], lambda m, _fwd: stub(stubs[index[id(m)]])):
        yield


def _block_inputs(
    model: nn.Module, blocks: nn.ModuleList, seqs: list[torch.Tensor], dropped: list[int], tuple_out: bool
) -> tuple[list[list[torch.Tensor]], bool]:
    """The hidden state entering each block (per sequence) of the model without `dropped`, and
    whether its blocks return tuples (`tuple_out`: what they were seen to return before; with
    nothing dropped, it is not needed)."""
    states: list[list[torch.Tensor]] = [[] for _ in blocks]
    kinds: list[bool] = []

    def record(i: int) -> Any:
        def f(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            states[i].append(split_hidden(args, kwargs)[0].detach())

        return f

    kept = next(j for j in range(len(blocks)) if j not in dropped)
    handles = [b.register_forward_pre_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(blocks[kept].register_forward_hook(lambda _m, _a, out: kinds.append(isinstance(out, (tuple, list)))))
    try:
        with _bypassed(blocks, set(dropped), tuple_out):
            for ids in seqs:
                last_logits(model, ids, 1)
    finally:
        for h in handles:
            h.remove()
    return states, kinds[0]


@torch.no_grad()
def greedy_drop_order(model: nn.Module, calibration: torch.Tensor, n: int) -> tuple[list[int], list[float]]:
    """The first `n` blocks to drop, one at a time: each time the block whose removal (on top of
    those already chosen) gives the lowest next-token loss on the calibration blocks.  Returns the
    order and the loss after each removal.

    Exact and cheaper than slicing a trial model per candidate: per step, one forward of the
    current model records the hidden state entering every block; a candidate's forward then
    starts from the state entering it, so only the blocks after it run."""
    from carve.engines.gradient import next_token_loss

    _, blocks = find_blocks(model)
    if not 0 <= n < len(blocks):
        raise UsageError(f"cannot drop {n} of the model's {len(blocks)} blocks; keep at least one")
    device = next(model.parameters()).device
    seqs = [b[None].to(device) for b in calibration]
    order: list[int] = []
    losses: list[float] = []
    tuple_out = False
    ticks = bar("greedy block search", sum(len(blocks) - k for k in range(n)))
    for _ in range(n):
        states, tuple_out = _block_inputs(model, blocks, seqs, order, tuple_out)
        best: tuple[float, int] | None = None
        for i in range(len(blocks)):
            if i in order:
                continue
            total = 0.0
            for s, ids in enumerate(seqs):
                with _bypassed(blocks, {*order, i}, tuple_out, resume=(i, states[i][s])):
                    total += next_token_loss(model, ids).item()
            loss = total / len(seqs)
            if best is None or loss < best[0]:
                best = (loss, i)
            ticks.update()
        assert best is not None
        order.append(best[1])
        losses.append(round(best[0], 5))
    ticks.close()
    return order, losses


def compensable(model: nn.Module) -> list[str]:
    """The projections whose removed inputs can be compensated by a bias the config can carry:
    "down_proj" when the config has `mlp_bias`, "o_proj" when it has `attention_bias`."""
    config = _text_config(model)
    return [role for role, flag in (("o_proj", "attention_bias"), ("down_proj", "mlp_bias")) if hasattr(config, flag)]


# --------------------------------------------------------------------------- shapes and plans
@dataclass(frozen=True)
class Shape:
    """What every kept block keeps, and how many blocks go."""

    kv_groups: int
    mlp_channels: int
    drop_blocks: int


@dataclass
class Plan:
    """Which units stay: per original block index, the kept groups and channels; dropped blocks."""

    shape: Shape
    groups: list[list[int]]
    channels: list[list[int]]
    drop: list[int]
    search: list[dict[str, Any]] = field(default_factory=list)  # the candidates weighed, if any

    def describe(self) -> dict[str, Any]:
        return {"shape": asdict(self.shape), "dropped_blocks": self.drop, "candidates": self.search}


def block_param_counts(anat: Anatomy) -> tuple[int, int, int]:
    """(parameters of a block that depend on neither groups nor channels, per kv group, per MLP
    channel), from block 0 (every block has the same sizes)."""
    p = anat.parts[0]
    per_group = 0
    for role in ("q_proj", "k_proj", "v_proj"):
        lin = p.linear(role)
        per_group += lin.out_features // anat.kv_heads * (lin.in_features + (lin.bias is not None))
    o = p.linear("o_proj")
    per_group += o.out_features * (o.in_features // anat.kv_heads)
    per_channel = 0
    for role in ("gate_proj", "up_proj"):
        if role in p.names:
            lin = p.linear(role)
            per_channel += lin.in_features + (lin.bias is not None)
    per_channel += p.linear("down_proj").out_features
    whole = sum(t.numel() for t in anat.blocks[0].parameters())
    return whole - anat.kv_heads * per_group - anat.intermediate * per_channel, per_group, per_channel


def decoder_params(anat: Anatomy, shape: Shape) -> int:
    fixed, per_group, per_channel = block_param_counts(anat)
    return (len(anat.blocks) - shape.drop_blocks) * (
        fixed + shape.kv_groups * per_group + shape.mlp_channels * per_channel
    )


def candidate_shapes(
    anat: Anatomy,
    keep: float | None,
    mlp_keep: float | None = None,
    heads_keep: float | None = None,
    drop_blocks: int | None = None,
    multiple: int = 32,
) -> list[Shape]:
    """The shapes within the parameter budget `keep` (share of decoder-block parameters), with
    the dimensions the user fixed held; for each (groups, dropped blocks) the widest MLP that fits
    (a multiple of `multiple` channels).  Without `keep`, the single shape the user asked for."""
    n_blocks = len(anat.blocks)
    if heads_keep is not None:
        g = round(heads_keep * anat.kv_heads)
        if not 1 <= g <= anat.kv_heads:
            raise UsageError(
                f"--heads-keep {heads_keep} keeps {g} of {anat.kv_heads} key/value groups; keep at least one"
            )
        group_options = [g]
    else:
        group_options = list(range(anat.kv_heads, 0, -1)) if keep is not None else [anat.kv_heads]
    if drop_blocks is not None:
        if not 0 <= drop_blocks < n_blocks:
            raise UsageError(f"--drop-blocks {drop_blocks}: the model has {n_blocks} blocks; keep at least one")
        drop_options = [drop_blocks]
    else:
        drop_options = (
            sorted({round(n_blocks * f) for f in (0, 1 / 8, 1 / 4, 3 / 8, 1 / 2)}) if keep is not None else [0]
        )
    multiple = max(1, min(multiple, anat.intermediate // 8))
    fixed_m: int | None = None
    if mlp_keep is not None:
        if not 0 < mlp_keep <= 1:
            raise UsageError(f"--mlp-keep {mlp_keep} is outside (0, 1]")
        fixed_m = max(1, round(mlp_keep * anat.intermediate))
    if keep is None:
        return [Shape(group_options[0], fixed_m or anat.intermediate, drop_options[0])]
    if not 0 < keep < 1:
        raise UsageError(f"--keep {keep} is outside (0, 1): it is the share of decoder-block parameters kept")
    if None not in (mlp_keep, heads_keep, drop_blocks):
        raise UsageError("--keep with all of --mlp-keep, --heads-keep and --drop-blocks leaves nothing to choose")
    budget = keep * decoder_params(anat, Shape(anat.kv_heads, anat.intermediate, 0))
    fixed, per_group, per_channel = block_param_counts(anat)
    shapes = []
    for d in drop_options:
        for g in group_options:
            room = budget / (n_blocks - d) - fixed - g * per_group  # parameters left for the MLP of a block
            if fixed_m is not None:
                if fixed_m * per_channel <= room:
                    shapes.append(Shape(g, fixed_m, d))
                continue
            m = min(anat.intermediate, int(room // per_channel) // multiple * multiple)
            if m >= multiple:
                shapes.append(Shape(g, m, d))
    if not shapes:
        raise UsageError(
            f"no choice of heads, MLP width and blocks keeps {keep:.0%} of the decoder parameters with the "
            "dimensions you fixed; loosen --keep or the explicit targets"
        )
    return shapes


def check_drop_rule(rule: str) -> str:
    if rule not in DROP_RULES:
        raise UsageError(f"drop rule {rule!r} is not one of {', '.join(DROP_RULES)}")
    return rule


def make_plan(shape: Shape, groups: torch.Tensor, channels: torch.Tensor, drop_order: Sequence[int] | None) -> Plan:
    """The top units of each block for `shape`; the first `drop_blocks` blocks of `drop_order`
    dropped (the order of a drop rule: `block_distances` ascending, or `greedy_drop_order`)."""
    drop: list[int] = []
    if shape.drop_blocks:
        if drop_order is None or len(drop_order) < shape.drop_blocks:
            raise UsageError("dropping blocks needs an order of blocks to drop from calibration data")
        drop = sorted(drop_order[: shape.drop_blocks])
    top = lambda t, k: sorted(t.topk(k).indices.tolist())  # noqa: E731
    return Plan(
        shape,
        [top(groups[i], shape.kv_groups) for i in range(len(groups))],
        [top(channels[i], shape.mlp_channels) for i in range(len(channels))],
        drop,
    )


# --------------------------------------------------------------------------- applying a plan
def _sliced(lin: nn.Linear, rows: list[int] | None = None, cols: list[int] | None = None) -> nn.Linear:
    w = lin.weight.detach()
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            assert new.bias is not None
            new.bias.copy_(lin.bias.detach() if rows is None else lin.bias.detach()[rows])
    new.weight.requires_grad_(lin.weight.requires_grad)
    return new


def _head_rows(units: list[int], per_unit: int) -> list[int]:
    return [u * per_unit + j for u in units for j in range(per_unit)]


def _with_bias(lin: nn.Linear, delta: torch.Tensor | None = None) -> None:
    """Give `lin` a bias if it has none (zeros), and add `delta` to it."""
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
    if delta is not None:
        with torch.no_grad():
            lin.bias.add_(delta.to(lin.bias.dtype).to(lin.bias.device))


def apply_plan(model: nn.Module, plan: Plan, means: list[dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """Slice `model` in place to the plan's units and rewrite its config; returns it.  With
    `means` (from `input_means`), the removed heads' and channels' mean contributions are
    compensated by biases where the config can carry them (see `compensable`)."""
    anat = anatomy(model)
    hd, rep = anat.head_dim, anat.group_size
    roles = compensable(model) if means is not None else []
    if plan.shape.kv_groups == anat.kv_heads and "o_proj" in roles:
        roles.remove("o_proj")  # no head removed: nothing to compensate
    if plan.shape.mlp_channels == anat.intermediate and "down_proj" in roles:
        roles.remove("down_proj")
    config = _text_config(model)
    for i, p in enumerate(anat.parts):
        if i in plan.drop:
            continue
        kv = _head_rows(plan.groups[i], hd)
        q = _head_rows([h for g in plan.groups[i] for h in range(g * rep, (g + 1) * rep)], hd)
        removed = {
            "o_proj": sorted(set(range(p.linear("o_proj").in_features)) - set(q)),
            "down_proj": sorted(set(range(p.linear("down_proj").in_features)) - set(plan.channels[i])),
        }
        deltas = {}
        for role in roles:
            assert means is not None
            lin = p.linear(role)
            cols = removed[role]
            deltas[role] = lin.weight.detach()[:, cols].float() @ means[i][role][cols].to(lin.weight.device)
        for role, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            setattr(p.attention, role, _sliced(p.linear(role), rows=rows))
        p.attention.o_proj = _sliced(p.linear("o_proj"), cols=q)
        ch = plan.channels[i]
        for role in ("gate_proj", "up_proj"):
            if role in p.names:
                setattr(p.mlp, role, _sliced(p.linear(role), rows=ch))
        p.mlp.down_proj = _sliced(p.linear("down_proj"), cols=ch)
        for role, delta in deltas.items():
            for r in ATTENTION if role == "o_proj" else MLP:
                if r in p.names:  # the config's flag gives every projection it governs a bias
                    _with_bias(p.linear(r), delta if r == role else None)
    for role in roles:
        setattr(config, "attention_bias" if role == "o_proj" else "mlp_bias", True)
    kept = [i for i in range(len(anat.blocks)) if i not in plan.drop]
    if plan.drop:
        new_list = nn.ModuleList([anat.blocks[i] for i in kept])
        for new_i, block in enumerate(new_list):
            for mod in block.modules():
                if isinstance(getattr(mod, "layer_idx", None), int):
                    mod.layer_idx = new_i  # type: ignore[assignment]  # the KV cache is indexed by it
        parent = model.get_submodule(anat.prefix.rsplit(".", 1)[0]) if "." in anat.prefix else model
        setattr(parent, anat.prefix.rsplit(".", 1)[-1], new_list)
    config.head_dim = hd  # explicit: most configs derive it from hidden_size / heads otherwise
    config.num_key_value_heads = plan.shape.kv_groups
    config.num_attention_heads = plan.shape.kv_groups * rep
    config.intermediate_size = plan.shape.mlp_channels
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in kept]
    return model


def zero_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """The masked equivalent of `apply_plan`: same sizes, the removed units' outputs zeroed (o_proj
    columns of removed heads, down_proj columns of removed channels, and all of o_proj and
    down_proj with their biases in dropped blocks, which makes a pre- or sandwich-norm block the
    identity).  For tests: the sliced model's logits equal this model's."""
    anat = anatomy(model)
    hd, rep = anat.head_dim, anat.group_size
    with torch.no_grad():
        for i, p in enumerate(anat.parts):
            o, down = p.linear("o_proj"), p.linear("down_proj")
            if i in plan.drop:
                for lin in (o, down):
                    lin.weight.zero_()
                    if lin.bias is not None:
                        lin.bias.zero_()
                continue
            kept_q = set(_head_rows([h for g in plan.groups[i] for h in range(g * rep, (g + 1) * rep)], hd))
            o.weight[:, [c for c in range(o.in_features) if c not in kept_q]] = 0
            kept_ch = set(plan.channels[i])
            down.weight[:, [c for c in range(down.in_features) if c not in kept_ch]] = 0
    return model


@torch.no_grad()
def calibration_loss(model: nn.Module, blocks: torch.Tensor) -> float:
    """Mean next-token loss over `blocks` (one forward each)."""
    from carve.engines.gradient import next_token_loss

    device = next(model.parameters()).device
    return float(sum(next_token_loss(model, b[None].to(device)).item() for b in blocks) / len(blocks))


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules and config that shares every parameter and buffer with it.
    `apply_plan` replaces the Linear modules it slices (never writes into a weight), so slicing
    this copy leaves `model` as it was while allocating only the kept units."""
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def search_plan(
    model: nn.Module,
    shapes: list[Shape],
    groups: torch.Tensor,
    channels: torch.Tensor,
    drop_order: Sequence[int] | None,
    blocks: torch.Tensor,
    means: list[dict[str, torch.Tensor]] | None = None,
) -> Plan:
    """The plan among `shapes` whose sliced model (bias-compensated with `means`, if given) has
    the lowest loss on `blocks` (each candidate is sliced from a `shared_copy` of the model,
    measured, and freed: a candidate costs only its sliced weights, not a second model)."""
    if len(shapes) == 1:
        return make_plan(shapes[0], groups, channels, drop_order)
    anat = anatomy(model)
    best: tuple[float, Plan] | None = None
    weighed = []
    for shape in progress(shapes, "split search"):
        plan = make_plan(shape, groups, channels, drop_order)
        trial = apply_plan(shared_copy(model), plan, means)
        loss = calibration_loss(trial, blocks)
        del trial
        weighed.append({**asdict(shape), "decoder_params": decoder_params(anat, shape), "loss": round(loss, 5)})
        if best is None or loss < best[0]:
            best = (loss, plan)
    assert best is not None
    best[1].search = weighed
    return best[1]


@dataclass
class StructureResult:
    plan: Plan
    importance: Any  # the ImportanceMap the units were ranked by
    distances: torch.Tensor | None  # block distances, when dropping blocks by the distance rule was considered
    drop_order: list[int] | None = None  # the blocks in the order the drop rule removes them
    greedy_losses: list[float] | None = None  # the greedy rule's calibration loss after each removal


def evenly_spaced(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """`k` rows spread over `blocks` (calibration blocks are domain first, then general: the
    pick keeps their mix)."""
    if len(blocks) <= k:
        return blocks
    return blocks[torch.linspace(0, len(blocks) - 1, k).round().long()]


def structure(
    model: nn.Module,
    method: str,
    calibration: torch.Tensor,
    *,
    keep: float | None = None,
    mlp_keep: float | None = None,
    heads_keep: float | None = None,
    drop_blocks: int | None = None,
    drop_rule: str = DEFAULT_DROP_RULE,
    general_calibration: torch.Tensor | None = None,
    lam: float = 1.0,
    lr: float = 0.0,
    importance: Any = None,
    batch_size: int = 8,
    search_blocks: int = 8,
    distance_blocks: int = 16,
    greedy_blocks: int = 2,
    bias_compensation: bool = False,
) -> StructureResult:
    """Score the weights with `method`, rank channels / key-value groups / blocks, choose the
    split (the candidate shapes within `keep` with the lowest loss on `search_blocks`
    calibration blocks, explicit targets held), and slice `model` in place; with
    `bias_compensation`, removed units' mean contributions become biases (FLAP).  Blocks are
    dropped by `drop_rule`: "distance" (least-changing first, on `distance_blocks` calibration
    blocks) or "greedy" (`greedy_drop_order` on `greedy_blocks`)."""
    from carve.ops.prune import score

    anat = anatomy(model)  # refuses an unsupported architecture before any long work
    if bias_compensation and not compensable(model):
        raise UsageError(
            f"{type(model).__name__}'s config has neither mlp_bias nor attention_bias: the removed units' "
            "contribution cannot be kept as a bias (bias compensation works for Llama, and Gemma3 attention)"
        )
    check_drop_rule(drop_rule)
    shapes = candidate_shapes(anat, keep, mlp_keep, heads_keep, drop_blocks)
    if importance is None:
        importance = score(
            model,
            method,
            calibration,
            batch_size=batch_size,
            general_calibration=general_calibration,
            lam=lam,
            lr=lr,
        )
    groups, channels = unit_importance(importance, anat)
    distances, order, losses = None, None, None
    most = max(s.drop_blocks for s in shapes)
    if most and drop_rule == "greedy":
        order, losses = greedy_drop_order(model, evenly_spaced(calibration, greedy_blocks), most)
    elif most:
        distances = block_distances(model, evenly_spaced(calibration, distance_blocks), batch_size)
        order = distances.argsort().tolist()
    means = input_means(model, evenly_spaced(calibration, distance_blocks), batch_size) if bias_compensation else None
    plan = search_plan(model, shapes, groups, channels, order, evenly_spaced(calibration, search_blocks), means)
    apply_plan(model, plan, means)
    return StructureResult(plan, importance, distances, order, losses)
