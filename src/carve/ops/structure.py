"""Structured extraction: remove whole MLP channels, attention key/value groups and decoder
blocks, leaving a smaller *dense* model whose config is still standard.

The pieces: the block anatomy (models.anatomy), unit importance, shapes and plans (ops.plan),
calibration passes over whole blocks (engines.blocks: distances, greedy drop order, mean
inputs), and here the surgery that slices a model to a plan and the job that ties them together.

Every block keeps the same number of channels and groups (the top ones of that block), so the
config stays standard: `intermediate_size`, `num_attention_heads`, `num_key_value_heads`,
`num_hidden_layers` (and `layer_types`) are rewritten, `head_dim` is written explicitly, the
hidden size, embeddings (tied or not) and rotary settings are untouched.  Blocks are dropped by
one of two rules: "distance", the angular distance between a block's input and output hidden
states (ShortGPT's block influence, Gromov et al.), the blocks that change their input least
dropped first; or "greedy", one block at a time, the one whose removal raises the calibration
loss least (slower, much better on the embedded default: bench/depth_rules.py).

Streamed (`structure(..., source=skeleton)`, a model larger than memory): every pass reads the
blocks one at a time (engines.blocks with a `BlockSource`), the split search measures each
candidate on blocks sliced one at a time (`sliced_copy`), and the model is not sliced here: the
streamed job slices each kept block as it writes it (`slice_block`, `plan_config`: the pieces
`apply_plan` is made of).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from carve.engines.blocks import (
    block_distances,
    blockwise,
    calibration_loss,
    final_losses,
    greedy_drop_order,
    input_means,
    run_order,
)
from carve.errors import UsageError
from carve.masks.mask import ImportanceMap
from carve.models.anatomy import (
    ATTENTION,
    HEAD_COUNT_ATTRIBUTES,
    MLP,
    WIDTH_KEYS,
    Anatomy,
    Parts,
    anatomy,
    compensable,
    config_value,
    per_block_settings,
    text_config,
    text_part,
    width_key,
)
from carve.models.experts import ExpertLinears, is_fused_experts
from carve.ops.plan import (
    Plan,
    Shape,
    ShapeTarget,
    UnitImportance,
    candidate_shapes,
    check_drop_rule,
    decoder_params,
    evenly_spaced,
    make_plan,
    unit_importance,
)
from carve.progress import progress

if TYPE_CHECKING:
    from carve.engines.gradient import BlockSource


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


def compensated_roles(model: nn.Module, plan: Plan, means: Any) -> list[str]:
    """The projections ("o_proj", "down_proj") whose removed inputs become biases under `plan`:
    none without `means`, and only where the plan removes heads or channels and the config can
    carry a bias (see `compensable`)."""
    anat = anatomy(model)
    roles = compensable(model) if means is not None else []
    if plan.shape.kv_groups == anat.kv_heads and "o_proj" in roles:
        roles.remove("o_proj")  # no head removed: nothing to compensate
    if plan.shape.mlp_channels == anat.intermediate and "down_proj" in roles:
        roles.remove("down_proj")
    return roles


def slice_block(p: Parts, anat: Anatomy, plan: Plan, i: int, roles: list[str],
                means: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """Slice block `i` (its `Parts`) in place to the plan's units: its projections replaced by
    sliced copies, never written into; with `roles`, the removed units' mean inputs (`means`, the
    block's entry of `input_means`) folded into biases."""
    cut = {"heads": len(plan.groups[i]) < anat.kv_heads, "mlp": len(plan.channels[i]) < anat.intermediate,
           "depth": bool(plan.drop)}  # fmt: skip
    for dim in (d for d, c in cut.items() if c and d in anat.fixed):
        raise UsageError(anat.fixed[dim])
    hd, rep = anat.head_dim, anat.group_size
    heads = [h for g in plan.groups[i] for h in range(g * rep, (g + 1) * rep)]  # the kept query heads
    # a hybrid's block of another mixer keeps it whole, and what the plan does not cut is left as it is (Gemma 4's
    # held heads and double-wide MLPs are not of the first block's layout)
    heads_cut = p.attention is not None and plan.shape.kv_groups < anat.kv_heads
    mlp_cut = "down_proj" in p.names and plan.shape.mlp_channels < anat.intermediate
    removed = {}
    if heads_cut:
        removed["o_proj"] = sorted(set(range(p.linear("o_proj").in_features)) - set(_head_rows(heads, hd)))
    if mlp_cut:
        removed["down_proj"] = sorted(set(range(p.linear("down_proj").in_features)) - set(plan.channels[i]))
    deltas = {}
    for role in (r for r in roles if r in removed):
        assert means is not None
        lin = p.linear(role)
        cols = removed[role]
        deltas[role] = lin.weight.detach()[:, cols].float() @ means[role][cols].to(lin.weight.device)
    if heads_cut:
        assert p.attention is not None
        kv = _head_rows(plan.groups[i], hd)
        _slice_rows(p, p.attention, {"q_proj": _head_rows(heads, anat.query_rows), "k_proj": kv, "v_proj": kv})
        setattr(p.attention, p.attribute("o_proj"), _sliced(p.linear("o_proj"), cols=_head_rows(heads, hd)))
        for attr in HEAD_COUNT_ATTRIBUTES:
            if isinstance(getattr(p.attention, attr, None), int):
                setattr(p.attention, attr, len(plan.groups[i]) if attr == "num_key_value_heads" else len(heads))
    ch = plan.channels[i]
    if mlp_cut:  # a dense MLP (an MoE block's experts stay as they are)
        assert p.mlp is not None
        _slice_rows(p, p.mlp, {"gate_proj": ch, "up_proj": ch})
        setattr(p.mlp, p.attribute("down_proj"), _sliced(p.linear("down_proj"), cols=ch))
    for role, delta in deltas.items():
        for r in ATTENTION if role == "o_proj" else MLP:
            if r in p.names:  # the config's flag gives every projection it governs a bias
                _with_bias(p.linear(r), delta if r == role else None)


def _slice_rows(p: Parts, holder: nn.Module, rows: dict[str, list[int]]) -> None:
    """Replace each projection holding the roles' rows by a copy of the kept rows: a role's own
    projection, or a fused one (Phi-3's qkv_proj, gate_up_proj) keeping each role's rows of its span."""
    kept: dict[str, list[int]] = {}
    for role, r in rows.items():
        if role in p.names:
            kept.setdefault(p.attribute(role), []).extend(p.offset(role) + j for j in r)
    for attr, r in kept.items():
        setattr(holder, attr, _sliced(getattr(holder, attr), rows=r))


def shape_config(config: Any, anat: Anatomy, shape: Shape) -> None:
    """Rewrite the widths of `config` in place to what every kept block of `shape` holds."""
    # written explicitly, unless the config holds them by block (Gemma 4's per-kind layouts) and they are not cut
    if not per_block_settings(config) or shape.kv_groups < anat.kv_heads:
        config.head_dim = anat.head_dim  # explicit: most configs derive it from hidden_size / heads otherwise
        config.num_key_value_heads = shape.kv_groups
        config.num_attention_heads = shape.kv_groups * anat.group_size
    # an MoE's intermediate_size (Mixtral: each expert's width) is left as it is, and a width not cut
    if anat.intermediate and shape.mlp_channels != anat.intermediate:
        key = width_key(config)
        width = getattr(config, key)  # Gemma 3n: one per block
        setattr(config, key, [shape.mlp_channels] * len(width) if isinstance(width, list) else shape.mlp_channels)


def plan_config(config: Any, anat: Anatomy, plan: Plan, roles: list[str]) -> None:
    """Rewrite `config` (the text config) in place to the sliced model's shape."""
    for role in roles:
        setattr(config, "attention_bias" if role == "o_proj" else "mlp_bias", True)
    kept = [i for i in range(len(anat.blocks)) if i not in plan.drop]
    shape_config(config, anat, plan.shape)
    for key, value in per_layer_lists(config, len(anat.blocks)).items():  # layer_types, no_rope_layers, ...
        setattr(config, key, [value[i] for i in kept])
    for key in INDEX_LISTS:
        if isinstance(getattr(config, key, None), list):
            setattr(config, key, [kept.index(i) for i in getattr(config, key) if i in kept])
    if (overrides := per_block_settings(config)) and plan.drop:  # by block index: renumbered to the kept blocks
        config.per_layer_config = {str(kept.index(int(k))): v for k, v in overrides.items() if int(k) in kept}
    config.num_hidden_layers = len(kept)


# config lists of block indices (Llama 4's `moe_layers`, Qwen-MoE's `mlp_only_layers`): a plan that
# drops blocks renumbers them to the kept blocks
INDEX_LISTS = ("moe_layers", "mlp_only_layers", "attn_layer_indices")


def attention_last(anat: Anatomy, order: list[int]) -> list[int]:
    """`order` with the attention block it would drop last moved to its end, so that dropping any
    number of blocks short of all keeps one (a hybrid's; transformers' cache needs one)."""
    attention = [i for i in order if anat.parts[i].attention is not None]
    return [i for i in order if i != attention[-1]] + attention[-1:] if attention else order


def _drops_all_attention(model: nn.Module, anat: Anatomy, plan: Plan, refuse: bool = False) -> bool:
    """Whether `plan` drops every attention block (a hybrid whose drop rule picked each one: transformers'
    cache then fails); with `refuse`, say so instead."""
    if any(p.attention is not None for i, p in enumerate(anat.parts) if i not in plan.drop):
        return False
    if refuse:
        raise UsageError(
            f"dropping blocks {plan.drop} removes every attention block of {type(model).__name__} (transformers' "
            "cache needs one); drop fewer blocks"
        )
    return True


def apply_plan(model: nn.Module, plan: Plan, means: list[dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """Slice `model` in place to the plan's units and rewrite its config; returns it.  With
    `means` (from `input_means`), the removed heads' and channels' mean contributions are
    compensated by biases where the config can carry them (see `compensable`)."""
    anat = anatomy(model)
    _drops_all_attention(model, anat, plan, refuse=True)
    roles = compensated_roles(model, plan, means)
    for i, p in enumerate(anat.parts):
        if i not in plan.drop:
            slice_block(p, anat, plan, i, roles, None if means is None else means[i])
    kept = [i for i in range(len(anat.blocks)) if i not in plan.drop]
    if plan.drop:
        new_list = nn.ModuleList([anat.blocks[i] for i in kept])
        for new_i, block in enumerate(new_list):
            for mod in block.modules():
                if isinstance(getattr(mod, "layer_idx", None), int):
                    mod.layer_idx = new_i  # type: ignore[assignment]  # the KV cache is indexed by it
        parent = model.get_submodule(anat.prefix.rsplit(".", 1)[0]) if "." in anat.prefix else model
        setattr(parent, anat.prefix.rsplit(".", 1)[-1], new_list)
    plan_config(text_config(model), anat, plan, roles)
    why = config_mismatch(model)
    if why is not None:
        raise UsageError(f"structured extraction cannot slice {type(model).__name__} to this plan: {why}")
    return model


def config_mismatch(model: nn.Module) -> str | None:
    """Where `model` differs from what its class builds from its config (on the meta device: no
    memory), which is what stock from_pretrained would load it into: a parameter of another shape,
    one the config would not build, or one it would build and the model lacks; None where they agree.
    An MoE's experts seen as Linears for a job (`ExpertLinears`) are left out on both sides."""
    try:
        saved: Any = model.config
        config = type(saved).from_dict(saved.to_dict())  # as saved and read back
        with torch.device("meta"):
            built = type(model)(config)
    except Exception as e:  # the stock class refuses the rewritten config
        return f"its rewritten config is refused ({type(e).__name__}: {e})"
    # a config that rewrites its per-block settings on load (Gemma 4 unified makes its last layer a global one)
    # would build the same shapes and compute otherwise
    written, read = text_part(saved).to_dict(), text_part(config).to_dict()
    n = written.get("num_hidden_layers")
    for key in (*per_layer_lists(text_part(saved), n if isinstance(n, int) else 0), "per_layer_config"):
        if written.get(key) != read.get(key):
            return f"its config rewrites {key} when read back ({written.get(key)} becomes {read.get(key)})"

    def shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
        experts = [f"{n}." for n, mod in m.named_modules() if isinstance(mod, ExpertLinears) or is_fused_experts(mod)]
        return {n: tuple(p.shape) for n, p in m.named_parameters() if not n.startswith(tuple(experts))}

    have, want = shapes(model), shapes(built)
    for name in [*have, *(n for n in want if n not in have)]:  # the first in the model's order
        if have.get(name) != want.get(name):
            built_as = f"as {list(want[name])}" if name in want else "not at all"
            return f"its config builds {name} {built_as}" + (
                f", not {list(have[name])}" if name in have else ", which the sliced model has not"
            )
    return None


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of `model` as its class builds it from its config, on the meta device (no memory)."""
    with torch.device("meta"):
        return type(model)(copy.deepcopy(model.config))


def held_by_config(model: nn.Module, anat: Anatomy, pinned: dict[int, str] | None = None) -> dict[str, str]:
    """The dimensions ("heads", "mlp", "depth") a config cannot describe once cut, though the blocks
    could be sliced (Helium's o_proj is as wide as the hidden size whatever the heads): found by
    slicing one unit of each from a meta-device copy of `model` (no memory) and comparing it with
    what its config builds; depth is held where neither the first nor the last block can go alone
    (`pinned_blocks`, or `pinned` as it gave them)."""
    n = len(anat.blocks)
    cuts = {
        "heads": Shape(anat.kv_heads - 1, anat.intermediate, 0),
        "mlp": Shape(anat.kv_heads, anat.intermediate - 1, 0),
    }
    room = {"heads": anat.kv_heads > 1, "mlp": anat.intermediate > 1, "depth": n > 1}
    what = {"heads": "remove heads of", "mlp": "remove MLP channels of", "depth": "drop blocks of"}
    whys = {dim: _refusal(model, anat, shape, []) for dim, shape in cuts.items() if dim not in anat.fixed and room[dim]}
    if "depth" not in anat.fixed and room["depth"]:
        pinned = pinned_blocks(model, anat) if pinned is None else pinned
        whys["depth"] = next(iter(pinned.values())) if len(pinned) == len(_ends(n)) else None
    return {dim: f"structured extraction cannot {what[dim]} {type(model).__name__}: {why}"
            for dim, why in whys.items() if why is not None}  # fmt: skip


def _ends(n: int) -> list[int]:
    return sorted({0, n - 1})


def pinned_blocks(model: nn.Module, anat: Anatomy) -> dict[int, str]:
    """The end blocks (first, last) that cannot be dropped alone -> why: Gemma 4's config makes its last
    layer a global one, and a hybrid's only attention block cannot go (a meta-device copy, no memory).
    The distance rule orders them last and the greedy rule never weighs them; a block within is checked
    when a plan drops it (`apply_plan`)."""
    shape = Shape(anat.kv_heads, anat.intermediate, 1)
    whys = {b: _refusal(model, anat, shape, [b]) for b in _ends(len(anat.blocks))}
    return {b: why for b, why in whys.items() if why is not None}


def _refusal(model: nn.Module, anat: Anatomy, shape: Shape, drop: list[int]) -> str | None:
    """Why a meta-device copy of `model` cannot be sliced to `shape`, dropping `drop` (None: it can)."""
    n = len(anat.blocks)
    plan = make_plan(shape, torch.zeros(n, anat.kv_heads), torch.zeros(n, anat.intermediate), drop)
    try:
        apply_plan(meta_twin(model), plan)
    except UsageError as e:
        return str(e).partition(": ")[2] or str(e)
    return None


def per_layer_lists(config: Any, layers: int) -> dict[str, list[Any]]:
    """The config's per-block lists (one entry per decoder block: Gemma's and Qwen's `layer_types`,
    SmolLM3's `no_rope_layers`), which follow the blocks a plan keeps; token-id lists (Llama 3's
    three `eos_token_id`s), `architectures` and lists of block indices (`INDEX_LISTS`) are not per
    block, whatever their length."""
    return {
        k: v for k, v in vars(config).items()
        if isinstance(v, list) and len(v) == layers > 1 and k not in ("architectures", *INDEX_LISTS)
        and not k.endswith(("_id", "_ids"))
    }  # fmt: skip


def zero_plan(model: nn.Module, plan: Plan) -> nn.Module:
    """The masked equivalent of `apply_plan`: same sizes, the removed units' outputs zeroed (o_proj
    columns of removed heads, down_proj columns of removed channels, and in dropped blocks every
    o_proj, down_proj and out_proj weight and bias (an MoE's experts' and shared expert's too; a
    hybrid's Mamba branch), which makes a pre- or sandwich-norm block the identity).  For tests: the
    sliced model's logits equal this model's."""
    anat = anatomy(model)
    hd, rep = anat.head_dim, anat.group_size
    with torch.no_grad():
        for i, p in enumerate(anat.parts):
            if i in plan.drop:
                outputs = {id(t) for r in ("o_proj", "down_proj") if r in p.names for t in p.linear(r).parameters()}
                for name, prm in anat.blocks[i].named_parameters():
                    if id(prm) in outputs or any(out in name for out in ("o_proj", "down_proj", "out_proj")):
                        prm.zero_()  # out_proj by name: a Mamba branch's; o_proj, down_proj: experts' too
                continue
            if p.attention is not None and plan.shape.kv_groups < anat.kv_heads:  # as slice_block: what is cut
                o = p.linear("o_proj")
                kept_q = set(_head_rows([h for g in plan.groups[i] for h in range(g * rep, (g + 1) * rep)], hd))
                o.weight[:, [c for c in range(o.in_features) if c not in kept_q]] = 0
            if "down_proj" in p.names and plan.shape.mlp_channels < anat.intermediate:
                down, kept_ch = p.linear("down_proj"), set(plan.channels[i])
                down.weight[:, [c for c in range(down.in_features) if c not in kept_ch]] = 0
    return model


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules and config that shares every parameter and buffer with it.
    `apply_plan` replaces the Linear modules it slices (never writes into a weight), so slicing
    this copy leaves `model` as it was while allocating only the kept units."""
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def sliced_copy(anat: Anatomy, plan: Plan, i: int, roles: list[str],
                means: dict[str, torch.Tensor] | None = None) -> nn.Module:  # fmt: skip
    """Block `i` sliced to the plan (as `apply_plan` slices it) in a `shared_copy` of the block: the
    block itself, and its parameters, stay as they are."""
    twin = shared_copy(anat.blocks[i])
    p = anat.parts[i]
    holder = lambda role: p.names[role].removeprefix(f"{anat.prefix}.{i}.").rpartition(".")[0]  # noqa: E731
    attention = twin.get_submodule(holder("q_proj")) if p.attention is not None else None
    mlp = twin.get_submodule(holder("up_proj")) if "up_proj" in p.names else twin  # an MoE block: the block
    slice_block(Parts(attention, mlp, p.names, p.spans), anat, plan, i, roles, means)
    for m in twin.modules():  # the twin's own config copy, shared by its modules (Phi-3 splits qkv by it)
        if hasattr(config := getattr(m, "config", None), "num_attention_heads"):
            shape_config(config, anat, plan.shape)  # the same values each time
    return twin


def _plan_loss(source: BlockSource, anat: Anatomy, plan: Plan, roles: list[str],
               means: list[dict[str, torch.Tensor]] | None, blocks: torch.Tensor) -> float:  # fmt: skip
    """`calibration_loss` of the model sliced to `plan`, one block at a time from `source`."""
    stand_in = lambda i: sliced_copy(anat, plan, i, roles, None if means is None else means[i])  # noqa: E731
    seqs = [b[None] for b in blocks]  # one sequence at a time, as calibration_loss runs them
    hidden, tuple_out = blockwise(source, seqs, "candidate", frozenset(plan.drop), stand_in)
    return float(sum(final_losses(source, seqs, hidden, tuple_out)) / len(blocks))


def search_plan(
    model: nn.Module,
    shapes: list[Shape],
    groups: torch.Tensor,
    channels: torch.Tensor,
    drop_order: Sequence[int] | None,
    blocks: torch.Tensor,
    means: list[dict[str, torch.Tensor]] | None = None,
    source: BlockSource | None = None,
) -> Plan:
    """The plan among `shapes` whose sliced model (bias-compensated with `means`, if given) has
    the lowest loss on `blocks` (each candidate is sliced from a `shared_copy` of the model,
    measured, and freed: a candidate costs only its sliced weights, not a second model; with
    `source`, one sliced block at a time)."""
    anat = anatomy(model)
    plans = [make_plan(shape, groups, channels, drop_order) for shape in shapes]
    plans = [plan for plan in plans if not _drops_all_attention(model, anat, plan, len(shapes) == 1)]
    if not plans:  # only the searched shapes can be left out; an explicit one was refused
        raise UsageError(
            f"every candidate drops each attention block of {type(model).__name__} (transformers' cache needs "
            "one); drop fewer blocks (--drop-blocks, or a larger --keep)"
        )
    if len(plans) == 1:
        return plans[0]
    best: tuple[float, Plan] | None = None
    weighed = []
    for plan in progress(plans, "split search"):
        shape = plan.shape
        if source is not None:
            loss = _plan_loss(source, anat, plan, compensated_roles(model, plan, means), means, blocks)
        else:
            trial = apply_plan(shared_copy(model), plan, means)
            loss = calibration_loss(trial, blocks)
            del trial
        params = decoder_params(anat, shape, plan.drop)
        weighed.append({**asdict(shape), "decoder_params": params, "loss": round(loss, 5)})
        if best is None or loss < best[0]:
            best = (loss, plan)
    assert best is not None
    best[1].search = weighed
    return best[1]


@dataclass
class StructureResult:
    """The Outcome of structured extraction (see ops.outcome)."""

    plan: Plan
    importance: ImportanceMap | None  # the scores the units were ranked by
    distances: torch.Tensor | None  # block distances, when dropping blocks by the distance rule was considered
    drop_order: list[int] | None = None  # the blocks in the order the drop rule removes them
    greedy_losses: list[float] | None = None  # the greedy rule's calibration loss after each removal
    means: list[dict[str, torch.Tensor]] | None = None  # the mean inputs folded into biases, if any
    config: Any = None  # the output's config where the model itself was not sliced (a streamed extraction)
    held: dict[str, str] = field(default_factory=dict)  # the dimensions the model holds whole -> why (Anatomy.fixed)
    pinned: dict[int, str] = field(default_factory=dict)  # end blocks no drop rule removes -> why (`pinned_blocks`)

    def describe(self, model: nn.Module) -> dict[str, Any]:
        config = text_config(model) if self.config is None else self.config
        config = text_part(config)
        width = [k for k in WIDTH_KEYS if hasattr(config, k)][:1]  # an MoE's config may have none
        keys = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", *width)
        distances = None if self.distances is None else [round(x, 5) for x in self.distances.tolist()]
        return {
            "structure": {
                **self.plan.describe(),
                "config": {k: config_value(config, k) for k in keys},
                "block_distances": distances,
                "drop_order": self.drop_order,
                "greedy_losses": self.greedy_losses,
                "held": self.held,
                "pinned_blocks": {str(b): why for b, why in self.pinned.items()},
            }
        }

    def save(self, directory: Path) -> None:
        """The kept units are in the manifest and the sliced model itself: no file of its own."""


def structure(
    model: nn.Module,
    importance: ImportanceMap | Callable[[], ImportanceMap | UnitImportance],
    calibration: torch.Tensor,
    target: ShapeTarget,
    *,
    batch_size: int = 8,
    search_blocks: int = 8,
    distance_blocks: int = 16,
    greedy_blocks: int = 2,
    source: BlockSource | None = None,
) -> StructureResult:
    """Rank channels / key-value groups by `importance` (a map, or a function computing one or the
    units' importance directly, called once the model and target have been checked) and blocks by
    the drop rule, choose the split (the candidate shapes within `target.keep` with the lowest loss
    on `search_blocks` calibration blocks, explicit targets held), and slice `model` in place; with
    `target.bias_compensation`, removed units' mean contributions become biases (FLAP).  Blocks
    are dropped by `target.drop_rule`: "distance" (least-changing first, on `distance_blocks`
    calibration blocks) or "greedy" (`greedy_drop_order` on `greedy_blocks`).

    With `source` (a streamed extraction: `model` is its skeleton) every pass runs one block at a
    time and `model` is not sliced: the plan is returned for the writer to slice block by block."""
    anat = anatomy(model)  # refuses an unsupported architecture before any long work
    # a cut its config could not describe; the end blocks it cannot lose (probed once: depth and the drop rules)
    pins = pinned_blocks(model, anat) if "depth" not in anat.fixed and len(anat.blocks) > 1 else {}
    anat.fixed.update(held_by_config(model, anat, pins))
    if target.bias_compensation and not compensable(model):
        raise UsageError(
            f"{type(model).__name__}'s config has neither mlp_bias nor attention_bias: the removed units' "
            "contribution cannot be kept as a bias (bias compensation works for Llama, and Gemma3 attention)"
        )
    check_drop_rule(target.drop_rule)
    shapes = candidate_shapes(anat, target.keep, target.mlp_keep, target.heads_keep, target.drop_blocks,
                              drop_run=target.drop_run)  # fmt: skip
    scores = importance() if callable(importance) else importance
    if isinstance(scores, UnitImportance):
        groups, channels, kept_scores = scores.groups, scores.channels, None
    else:
        (groups, channels), kept_scores = unit_importance(scores, anat), scores
    distances, order, losses = None, None, None
    most = max(s.drop_blocks for s in shapes)
    run = target.drop_run
    pinned = frozenset(pins)  # an end block the config needs (Gemma 4's last): the drop rules leave it
    if most and target.drop_rule == "greedy":
        attention = frozenset(i for i, p in enumerate(anat.parts) if p.attention is not None)
        keep = attention if len(attention) < len(anat.parts) else frozenset()  # a hybrid keeps one
        blocks = evenly_spaced(calibration, greedy_blocks)
        order, losses = greedy_drop_order(model, blocks, most, source, run, keep, pinned)
    elif most:
        distances = block_distances(model, evenly_spaced(calibration, distance_blocks), batch_size, source, run)
        order = run_order(distances, run)
        if run == 1:  # the distance rule orders every block: a hybrid's last attention block, then the pinned, last
            order = attention_last(anat, [i for i in order if i not in pinned]) + sorted(pinned)
    spread = evenly_spaced(calibration, distance_blocks)
    means = input_means(model, spread, batch_size, source) if target.bias_compensation else None
    search = evenly_spaced(calibration, search_blocks)
    plan = search_plan(model, shapes, groups, channels, order, search, means, source)
    if source is None:
        apply_plan(model, plan, means)
    else:  # streamed: the blocks are sliced as they are written; the whole plan is checked first, on a
        apply_plan(meta_twin(model), plan)  # no-memory copy (its config must describe every cut)
    return StructureResult(
        plan, kept_scores, distances, order, losses, means, held=dict(anat.fixed), pinned=pins if most else {}
    )
