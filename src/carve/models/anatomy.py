"""The anatomy of a decoder block for structured extraction: its attention and MLP projections,
found by module names (q/k/v/o_proj attention, optional gate_proj, up_proj, down_proj MLP:
Llama, Mistral, Qwen2, Gemma/Gemma2/Gemma3; or Phi-3's fused qkv_proj and gate_up_proj, each
role a span of the fused projection's rows; or another family's name for a role, `ALIASES`: Phi's
dense and fc1/fc2, StarCoder2's c_fc/c_proj), not by model class; the head layout
(grouped-query attention: query head h reads key/value head h // (heads / kv_heads)); and what
a block's parameters cost per key/value group and per MLP channel.

Hybrids (Qwen3.5's Gated DeltaNet, Bamba's and Jamba's Mamba, Nemotron-H's single-mixer blocks):
a block whose `layer_types` entry names a mixer other than softmax attention (`KEPT_MIXERS`)
keeps that mixer whole; only its MLP channels, and the block itself, can go.  In such a model a
block may also have no MLP (Nemotron-H's Mamba and attention blocks).

Kinds of attention (Gemma 4): blocks of one layer type share a layout; a type whose layout differs
from the first attention block's (Gemma 4's global layers, its blocks reusing earlier keys and
values) holds the heads whole, and MLPs of differing widths hold the MLP; head counts are read from
the first attention block's own settings (`layer_config`)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from carve.errors import UsageError
from carve.models.arch import find_blocks
from carve.models.experts import ExpertLinears, is_fused_experts

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# fused projections (Phi-3): the roles whose rows they stack, in order
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# other families' names for a role's projection beside q/k/v_proj (Phi: dense, fc1/fc2; OPT, BioGPT,
# XGLM: out_proj, fc1/fc2; StarCoder2: c_fc/c_proj)
ALIASES = {"out_proj": "o_proj", "dense": "o_proj", "fc1": "up_proj", "fc2": "down_proj", "c_fc": "up_proj",
           "c_proj": "down_proj"}  # fmt: skip
UP = tuple(a for a in ("up_proj", *ALIASES) if ALIASES.get(a, a) == "up_proj")
# `layer_types` entries whose block's mixer is not softmax attention (Gated DeltaNet, Mamba, short
# convolutions; Nemotron-H's blocks holding only an MLP or experts): kept whole, never searched for heads
KEPT_MIXERS = frozenset({"linear_attention", "mamba", "conv", "recurrent", "mlp", "moe"})
# model types whose q_proj holds each query head's rows followed by its output gate's (Qwen3.5,
# Qwen3-Next: `view(..., heads, 2 * head_dim).chunk(2)`): a head's rows are 2 * head_dim contiguous ones
GATED_QUERY = frozenset({"qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"})


@dataclass
class Parts:
    """The structural handles of one decoder block."""

    attention: nn.Module | None  # the module holding q/k/v/o_proj (None: a hybrid's block of another mixer)
    # the module holding gate/up/down_proj (an MoE block: the block; it has no dense MLP roles; None: a
    # hybrid's block without an MLP)
    mlp: nn.Module | None
    names: dict[str, str]  # role ("q_proj", ...) -> full name of the module holding its rows
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # role -> its rows of a fused projection

    def attribute(self, role: str) -> str:
        """The holder's attribute that holds `role`'s rows ("qkv_proj" for Phi-3's "k_proj")."""
        return self.names[role].rpartition(".")[2]

    def linear(self, role: str) -> nn.Linear:
        """The projection holding `role`'s rows: its own, or the fused one it is a span of."""
        holder = self.attention if role in ATTENTION else self.mlp
        assert holder is not None, role
        lin = getattr(holder, self.attribute(role))
        assert isinstance(lin, nn.Linear)
        return lin

    def offset(self, role: str) -> int:
        return self.spans[role][0] if role in self.spans else 0

    def width(self, role: str) -> int:
        """`role`'s output rows."""
        start, stop = self.spans.get(role, (0, self.linear(role).out_features))
        return stop - start


@dataclass
class Anatomy:
    prefix: str  # module path of the blocks' ModuleList ("model.layers")
    blocks: nn.ModuleList
    parts: list[Parts]
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    # the dimensions structured extraction must leave whole ("heads", "mlp", "depth") -> why; the
    # others can still be cut (a model with Q/K norms over the whole projection keeps its heads)
    fixed: dict[str, str] = field(default_factory=dict)
    query_rows: int = 0  # q_proj's rows per query head: head_dim, or 2 * head_dim with a gate (GATED_QUERY)

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads


WIDTH_KEYS = ("intermediate_size", "ffn_dim")  # a config's name for the dense MLP's width (OPT, XGLM: ffn_dim)


def width_key(config: Any) -> str:
    """The config's name for the dense MLP's width (`WIDTH_KEYS`), or say it has none."""
    key = next((k for k in WIDTH_KEYS if hasattr(config, k)), None)
    if key is None:
        raise UsageError(f"{type(config).__name__} names no MLP width (intermediate_size or ffn_dim) to rewrite")
    return key


def layer_config(config: Any, i: int) -> Any:
    """Block `i`'s own config where settings vary by block (transformers 5's `per_layer_config`: Gemma 4's
    head widths and key/value heads, whose config-wide values it refuses to read), else the config."""
    return config.per_layer_config[i] if per_block_settings(config) else config


def per_block_settings(config: Any) -> dict[str, Any]:
    """The settings `config` holds for single blocks (transformers 5's `per_layer_config` as written: Gemma 4's
    global layers' head widths and key/value heads, by block index); empty for a config of alike blocks."""
    return dict(config.to_dict().get("per_layer_config") or {})


def config_value(config: Any, key: str) -> Any:
    """`config`'s `key`, None where it has none; one per block where it varies by block (transformers 5
    refuses to read Gemma 4's head counts config-wide)."""
    try:
        return getattr(config, key, None)
    except Exception:  # AmbiguousGlobalPerLayerAttributeError (an AttributeError would have given None)
        return [getattr(layer_config(config, i), key, None) for i in range(config.num_hidden_layers)]


def text_config(model: nn.Module) -> Any:
    return text_part(model.config)


def text_part(config: Any) -> Any:
    """The text model's part of a config (a multimodal one's text config; a text model's itself)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def anatomy(model: nn.Module) -> Anatomy:
    """Find the attention and MLP projections of every decoder block, or say why not.  In a mixture of
    experts every block routes tokens through experts: its attention is found, no dense MLP (the
    `intermediate` width is 0 and "mlp" is among the fixed dimensions: --experts-keep removes experts).
    In a hybrid a block of another mixer (`KEPT_MIXERS`) has no attention roles, and a block may have
    no MLP; the head layout comes from the first attention block, the MLP width from the first MLP."""
    prefix, blocks = find_blocks(model)
    config = text_config(model)
    types = getattr(config, "layer_types", None)
    kept = [isinstance(types, list) and len(types) == len(blocks) and types[i] in KEPT_MIXERS
            for i in range(len(blocks))]  # fmt: skip
    hybrid = any(kept)
    k_eq_v = bool(getattr(config, "attention_k_eq_v", False))  # Gemma 4's global layers: no v_proj, values are keys
    shared = int(getattr(config, "num_kv_shared_layers", 0) or 0)  # the last blocks reuse earlier keys and values
    parts: list[Parts] = []
    kinds: list[str | None] = []  # per block: "dense" MLP, "moe", or None (a hybrid's block without an MLP)
    for i, block in enumerate(blocks):
        holders: dict[str, nn.Module] = {}
        names: dict[str, str] = {}
        # each role from the first module holding its kind's anchor (q_proj, up_proj; or the fused
        # projection holding it): an attention's own output gate (HRM's gate_proj) is not the MLP's
        found = [(name, mod, attr, role) for name, mod in block.named_modules()
                 for attr in (*ATTENTION, *MLP, *FUSED, *ALIASES) if isinstance(getattr(mod, attr, None), nn.Linear)
                 for role in FUSED.get(attr, (ALIASES.get(attr, attr),))
                 if not (kept[i] and role in ATTENTION)]  # fmt: skip  # a kept mixer's projections are its own
        anchors = {r: next((m for _, m, _, role in found if role == r), None) for r in ("q_proj", "up_proj")}
        for name, mod, attr, role in found:
            if role not in names and anchors["q_proj" if role in ATTENTION else "up_proj"] in (mod, None):
                holders[role] = mod
                names[role] = f"{prefix}.{i}.{name}.{attr}" if name else f"{prefix}.{i}.{attr}"
        mlps = sum(any(isinstance(getattr(mod, a, None), nn.Linear) for a in UP) for mod in block.modules())
        moe = mlps > 1 or any(is_fused_experts(m) or isinstance(m, ExpertLinears) for m in block.modules())
        if moe:  # the experts' (and a shared expert's) projections are not a dense MLP's
            names = {r: n for r, n in names.items() if r in ATTENTION}
        kinds.append("moe" if moe else "dense" if "up_proj" in names or not hybrid else None)
        needed = () if kept[i] else ATTENTION if not k_eq_v else tuple(r for r in ATTENTION if r != "v_proj")
        if i >= len(blocks) - shared and "q_proj" in names:  # Gemma 4 builds no key/value projections where they
            needed = ("q_proj", "o_proj")  # are an earlier layer's
        missing = [r for r in needed + ((), MLP[1:])[kinds[-1] == "dense"] if r not in names]
        if missing:
            raise UsageError(
                f"structured extraction needs Llama-style blocks (q/k/v/o_proj or qkv_proj/o_proj attention, "
                f"gate/up/down_proj or gate_up_proj/down_proj MLP or experts; or their names in Phi, OPT and "
                f"StarCoder2: dense or out_proj, fc1/fc2 or c_fc/c_proj); {type(model).__name__} block {i} "
                f"has no {', '.join(missing)}"
            )
        mlp = block if moe else holders.get("up_proj")
        parts.append(Parts(holders.get("q_proj"), mlp, names))
    if {"dense", "moe"} <= set(kinds):
        raise UsageError(
            f"structured extraction slices blocks of one kind; {type(model).__name__} mixes dense MLP blocks with "
            "expert blocks; unstructured and N:M extraction work on it"
        )
    if not any(p.attention is not None for p in parts) or not any(kinds):
        raise UsageError(
            f"structured extraction needs Llama-style blocks; {type(model).__name__} has no "
            f"{'attention' if any(kinds) else 'MLP or expert'} block among its {len(blocks)} (its layer_types: {types})"
        )
    owner: dict[int, int] = {}  # a projection's weight -> the first block holding it
    for i, p in enumerate(parts):
        for role in p.names:
            j = owner.setdefault(id(p.linear(role).weight), i)
            if j != i:  # each block would be sliced to its own units, and the reloaded tie would keep one
                raise UsageError(
                    f"structured extraction slices each block on its own; {type(model).__name__}'s blocks {j} and "
                    f"{i} share their {role} weights (a shared transformer block); unstructured and N:M "
                    "extraction work on it"
                )
    if getattr(config, "num_hidden_layers", len(blocks)) != len(blocks):
        raise UsageError(
            f"structured extraction rewrites the config's block count; {type(model).__name__}'s "
            f"num_hidden_layers ({config.num_hidden_layers}) does not count the blocks of {prefix} ({len(blocks)}); "
            "unstructured and N:M extraction work on it"
        )
    # each kind's first attention block, whose shapes its kind's blocks share: a kind per layer type, and the
    # blocks reusing earlier keys and values a kind of their own
    layer_type = [
        (types[i] if isinstance(types, list) and len(types) == len(blocks) else None, i >= len(blocks) - shared)
        for i in range(len(blocks))
    ]
    firsts: dict[Any, int] = {}
    for i, p in enumerate(parts):
        if p.attention is not None:
            firsts.setdefault(layer_type[i], i)
    at = min(firsts.values())
    layer = layer_config(config, at)  # its head counts (a heterogeneous config: the block's own)
    heads, kv_heads = (
        layer.num_attention_heads,
        getattr(layer, "num_key_value_heads", None) or layer.num_attention_heads,
    )
    for p in parts:
        _fused_spans(p, heads, kv_heads)
    mi = next((i for i, k in enumerate(kinds) if k == "dense"), None)
    attention, dense = parts[at], None if mi is None else parts[mi]
    head_dim = attention.width("k_proj") // kv_heads
    intermediate = 0 if dense is None else dense.width("up_proj")
    gated = getattr(config, "model_type", None) in GATED_QUERY
    query_rows = head_dim * (2 if gated else 1)
    if attention.width("q_proj") != heads * query_rows or heads % kv_heads:
        raise UsageError(
            f"{type(model).__name__}: q_proj has {attention.width('q_proj')} outputs, not "
            f"{heads} heads x {query_rows}; carve cannot tell its heads apart"
        )
    for i, p in enumerate(parts):  # one attention layout per layer type: every block as the first of its type
        j = firsts.get(layer_type[i], at)
        odd = [r for r in ATTENTION if p.attention is not None and _role_shape(p, r) != _role_shape(parts[j], r)]
        if odd:
            raise UsageError(
                f"structured extraction slices blocks of one shape; {type(model).__name__} block {i}'s "
                f"{odd[0]} is not block {j}'s shape (layers of different kinds); unstructured and N:M "
                "extraction work on it"
            )
    # layer types whose attention differs from the first's (Gemma 4's global layers: wider heads, fewer of
    # them, values that are their keys), MLPs of other widths (Gemma 4's double-wide ones): held whole
    apart = [f"{t}{' reusing keys and values' if reuse else ''}" for (t, reuse), j in firsts.items()
             if any(_role_shape(parts[j], r) != _role_shape(attention, r) for r in ATTENTION)]  # fmt: skip
    wide = [i for i, k in enumerate(kinds) if k == "dense" and dense is not None
            and any(_role_shape(parts[i], r) != _role_shape(dense, r) for r in MLP)]  # fmt: skip
    experts = "its blocks route tokens through experts, not one dense MLP: --experts-keep F removes whole experts"
    reasons = {
        "heads": f"its {' and '.join(apart)} layers lay out their heads otherwise than its {layer_type[at][0]} "
        "layers (per-kind head layouts are not cut)"
        if apart
        else _fixed_heads(attention, head_dim, heads * head_dim, kv_heads * head_dim),
        "mlp": experts
        if "moe" in kinds
        else f"its MLPs differ in width (block {wide[0]}'s is not block {mi}'s)"
        if wide
        else None
        if dense is None
        else _fixed_mlp(config, dense, intermediate),
        "depth": _fixed_depth(config, attention),
    }
    what = {"heads": "remove heads of", "mlp": "remove MLP channels of", "depth": "drop blocks of"}
    fixed = {
        dim: f"structured extraction cannot {what[dim]} {type(model).__name__}: {why}"
        for dim, why in reasons.items()
        if why is not None
    }
    return Anatomy(prefix, blocks, parts, heads, kv_heads, head_dim, intermediate, fixed, query_rows)


def _role_shape(p: Parts, role: str) -> tuple[int, int] | None:
    """`role`'s (rows, inputs) in the block, None where it has no such role."""
    return (p.width(role), p.linear(role).in_features) if role in p.names else None


def _fixed_depth(config: Any, parts: Parts) -> str | None:
    """Why no block can be dropped (None: blocks can go): per-layer input embeddings sized by the block
    count (Gemma 3n's and Gemma 4's `hidden_size_per_layer_input`), later layers reading earlier
    layers' keys and values (`num_kv_shared_layers`), or an attention computed from its block's index
    (DiffLlama's λ_init = 0.8 − 0.6·exp(−0.3·index): a renumbered block would get another)."""
    if getattr(config, "hidden_size_per_layer_input", None):
        return "it has per-layer input embeddings sized by the block count"
    if getattr(config, "num_kv_shared_layers", 0):
        return "it has layers that reuse earlier layers' keys and values"
    if hasattr(parts.attention, "lambda_init"):
        return "its attention is computed from each block's index (differential attention's lambda_init)"
    return None


def _fixed_mlp(config: Any, parts: Parts, intermediate: int) -> str | None:
    """Why no MLP channel can go (None: they can): activation sparsity (Gemma 3n) keeps each token's
    activations above a threshold from their mean and spread over all the MLP's channels, so a
    channel removed changes which of the others are kept; a parameter besides the projections that
    spans every channel (BitNet's `ffn_sub_norm`, an RMSNorm over the whole intermediate width)
    normalizes each kept channel by the removed ones too."""
    if any(float(s) > 0 for s in getattr(config, "activation_sparsity_pattern", None) or []):
        return "its MLP keeps activations by statistics over all its channels (activation sparsity)"
    projections = {parts.attribute(r) for r in MLP if r in parts.names}
    assert parts.mlp is not None
    spanning = [
        n for n, p in parts.mlp.named_parameters()
        if n.split(".")[0] not in projections and p.dim() >= 1 and p.shape[0] == intermediate
    ]  # fmt: skip
    if spanning:
        return f"its MLP has {', '.join(spanning)} spanning every channel"
    return None


def _fused_spans(p: Parts, heads: int, kv_heads: int) -> None:
    """Each fused role's rows: qkv_proj stacks `heads` query heads and `kv_heads` key and value
    heads of one width; gate_up_proj the gate's rows, then the up projection's (Phi-3's order)."""
    for attr, roles in FUSED.items():
        if roles[0] not in p.names or p.attribute(roles[0]) != attr:
            continue
        rows = p.linear(roles[0]).out_features
        per = [heads, kv_heads, kv_heads] if attr == "qkv_proj" else [1, 1]
        if rows % sum(per):
            raise UsageError(f"{p.names[roles[0]]} has {rows} outputs, which do not split into {'/'.join(roles)}")
        start = 0
        for role, n in zip(roles, per, strict=True):
            p.spans[role] = (start, start + n * rows // sum(per))
            start = p.spans[role][1]


# attention-module attributes that hold head counts: slicing updates them (Phi-3 splits its fused
# projection by `num_key_value_heads`); one that holds a width slicing cannot change (StableLM
# reshapes its output to `hidden_size`) is refused
HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_key_value_heads", "num_attention_heads")
FIXED_WIDTH_ATTRIBUTES = ("hidden_size",)


def _fixed_heads(parts: Parts, head_dim: int, q_width: int, kv_width: int) -> str | None:
    """Why removing heads would leave the attention inconsistent (None: it would not): a width kept as
    an attribute (StableLM's `hidden_size`), or parameters spanning the heads besides the projections:
    OLMo-2's q_norm / k_norm normalize the whole projection (removing heads would change every kept
    head's normalization), Cohere's with `use_qk_norm` hold one row per head and gpt-oss's attention
    sinks one logit per head (they would keep the removed heads' ones); differential attention
    (DiffLlama) subtracts one half of the heads from the other.  Such a model keeps every head;
    its MLP channels and blocks can go."""
    att = parts.attention
    assert att is not None
    heads, kv_heads = q_width // head_dim, kv_width // head_dim
    stored = [a for a in FIXED_WIDTH_ATTRIBUTES if isinstance(getattr(att, a, None), int)]
    projections = {parts.attribute(r) for r in ATTENTION}
    spanning = [
        n
        for n, p in att.named_parameters()
        if n.split(".")[0] not in projections
        and p.dim() >= 1
        and (p.shape[0] in {q_width, kv_width} - {head_dim} or p.shape[0] in {heads, kv_heads} - {head_dim})
    ]  # per-head parameters shared by every head (Qwen3's and Gemma3's q_norm / k_norm: head_dim wide) are fine;
    # one value or row per head (Cohere's Q/K norms, gpt-oss's attention sinks) would keep the removed heads' ones
    if hasattr(att, "lambda_init"):  # DiffLlama: head h's output is differenced with head h + heads/2's
        return "its attention pairs heads (differential attention)"
    if not (stored or spanning):
        return None
    what = (f"keeps {', '.join(stored)} as attributes" if stored else
            f"has {', '.join(spanning)} spanning every head")  # fmt: skip
    return f"its attention {what}"


def compensable(model: nn.Module) -> list[str]:
    """The projections whose removed inputs can be compensated by a bias the config can carry:
    "down_proj" when the config has `mlp_bias`, "o_proj" when it has `attention_bias`, and the
    model's class builds that projection with a bias when the flag is set (checked on the meta
    device: Helium's, Seed-OSS's and Solar Open's o_proj have none whatever their configs say)."""
    roles = []
    for role, flag in (("o_proj", "attention_bias"), ("down_proj", "mlp_bias")):
        if not hasattr(text_config(model), flag):
            continue
        config = copy.deepcopy(model.config)
        setattr(text_part(config), flag, True)
        with torch.device("meta"):
            built = type(model)(config)
        parts = next((p for p in anatomy(built).parts if role in p.names), None)  # a hybrid: the first holding it
        if parts is not None and parts.linear(role).bias is not None:
            roles.append(role)
    return roles


def block_param_counts(anat: Anatomy) -> list[tuple[int, int, int]]:
    """Per block: (parameters that depend on neither groups nor channels, per kv group, per MLP
    channel); a hybrid's block of another mixer has no groups, a block without an MLP no channels."""
    counts = []
    for p, block in zip(anat.parts, anat.blocks, strict=True):
        per_group = 0
        if p.attention is not None:
            for qkv in [r for r in ("q_proj", "k_proj", "v_proj") if r in p.names]:  # Gemma 4: v_proj may be absent
                lin = p.linear(qkv)
                per_group += p.width(qkv) // anat.kv_heads * (lin.in_features + (lin.bias is not None))
            o = p.linear("o_proj")
            per_group += o.out_features * (o.in_features // anat.kv_heads)
        per_channel = 0
        for role in ("gate_proj", "up_proj"):
            if role in p.names:
                lin = p.linear(role)
                per_channel += lin.in_features + (lin.bias is not None)
        if "down_proj" in p.names:  # an MoE block has no dense MLP: no channel to count
            per_channel += p.linear("down_proj").out_features
        whole = sum(t.numel() for t in block.parameters())
        counts.append((whole - anat.kv_heads * per_group - anat.intermediate * per_channel, per_group, per_channel))
    return counts
