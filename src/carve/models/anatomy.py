"""The anatomy of a decoder block for structured extraction: its attention and MLP projections,
found by module names (q/k/v/o_proj attention, optional gate_proj, up_proj, down_proj MLP:
Llama, Mistral, Qwen2, Gemma/Gemma2/Gemma3), not by model class; the head layout
(grouped-query attention: query head h reads key/value head h // (heads / kv_heads)); and what
a block's parameters cost per key/value group and per MLP channel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from carve.errors import UsageError
from carve.models.arch import find_blocks
from carve.models.experts import ExpertLinears, is_fused_experts

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
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


def text_config(model: nn.Module) -> Any:
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
        mlps = sum(isinstance(getattr(mod, "up_proj", None), nn.Linear) for mod in block.modules())
        if mlps > 1 or any(is_fused_experts(mod) or isinstance(mod, ExpertLinears) for mod in block.modules()):
            raise UsageError(
                f"structured extraction slices one dense MLP per block; {type(model).__name__} block {i} routes "
                "tokens through experts (a mixture of experts): use unstructured or N:M extraction, which prune "
                "each expert"
            )
        missing = [r for r in ATTENTION + MLP[1:] if r not in names]
        if missing:
            raise UsageError(
                f"structured extraction needs Llama-style blocks (q/k/v/o_proj attention, gate/up/down_proj "
                f"MLP); {type(model).__name__} block {i} has no {', '.join(missing)}"
            )
        parts.append(Parts(holders["q_proj"], holders["up_proj"], names))
    config = text_config(model)
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
    _check_sliceable(model, first, head_dim, heads * head_dim, kv_heads * head_dim)
    return Anatomy(prefix, blocks, parts, heads, kv_heads, head_dim, intermediate)


# attention-module attributes that hold head counts or widths: slicing heads cannot update them
# (StableLM reshapes its output to `hidden_size`), so a block that has them is refused
HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_key_value_heads", "num_attention_heads", "hidden_size")


def _check_sliceable(model: nn.Module, parts: Parts, head_dim: int, q_width: int, kv_width: int) -> None:
    """Refuse attention the slicing would leave inconsistent: head counts kept as attributes, or
    parameters spanning the heads besides the projections: OLMo-2's q_norm / k_norm normalize the
    whole projection (removing heads would change every kept head's normalization), Cohere's with
    `use_qk_norm` hold one row per head (they would keep the removed heads' rows)."""
    att = parts.attention
    heads, kv_heads = q_width // head_dim, kv_width // head_dim
    stored = [a for a in HEAD_COUNT_ATTRIBUTES if isinstance(getattr(att, a, None), int)]
    spanning = [
        n
        for n, p in att.named_parameters()
        if n.split(".")[0] not in ATTENTION
        and p.dim() >= 1
        and (p.shape[0] in {q_width, kv_width} - {head_dim} or (p.dim() >= 2 and p.shape[0] in {heads, kv_heads}))
    ]  # per-head parameters shared by every head (Qwen3's and Gemma3's q_norm / k_norm: head_dim wide) are fine
    if stored or spanning:
        what = (f"keeps {', '.join(stored)} as attributes" if stored else
                f"has {', '.join(spanning)} spanning every head")  # fmt: skip
        raise UsageError(
            f"structured extraction cannot remove heads of {type(model).__name__}: its attention {what}; "
            "unstructured and N:M extraction work on it"
        )


def compensable(model: nn.Module) -> list[str]:
    """The projections whose removed inputs can be compensated by a bias the config can carry:
    "down_proj" when the config has `mlp_bias`, "o_proj" when it has `attention_bias`."""
    config = text_config(model)
    return [role for role, flag in (("o_proj", "attention_bias"), ("down_proj", "mlp_bias")) if hasattr(config, flag)]


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
