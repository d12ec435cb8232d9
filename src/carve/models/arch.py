"""Find the decoder blocks and the Linear layers of any Hugging Face causal LM, without
per-architecture code: the blocks are the ModuleList of layers holding Linear layers that the
config's `num_hidden_layers` counts (model.layers for Llama/Qwen2/Gemma, transformer.h for GPT-2,
model.decoder.layers for OPT, gpt_neox.layers …; `find_blocks`)."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from carve.errors import UsageError


def is_linear(module: nn.Module) -> bool:
    # GPT-2's Conv1D is a Linear with its weight stored transposed ([in, out])
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (a view: writes reach the module)."""
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w if isinstance(module, nn.Linear) else w.t()


def as_param_layout(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A [out, in] tensor (score, mask) in the layout of the module's weight parameter."""
    return t if isinstance(module, nn.Linear) else t.t().contiguous()


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks (qualified name, ModuleList): of the ModuleLists whose every layer holds a
    Linear, the one as long as the config's `num_hidden_layers` (the text config's, for a model with
    other towers), the shortest-named if several are (a vision or audio tower as deep, an experts
    list as long, sit deeper); where none is, the longest list of one layer class.  The layers may be
    of several classes (a hybrid's attention and Mamba or linear-attention layers: Jamba, OLMo-Hybrid)."""
    lists = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0
        and all(any(is_linear(m) for m in layer.modules()) for layer in mod)
    ]  # fmt: skip
    config: Any = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    depth = getattr(text, "num_hidden_layers", None)
    deep = [(name, mod) for name, mod in lists if len(mod) == depth]
    if deep:
        return min(deep, key=lambda nm: nm[0].count("."))
    uniform = [(name, mod) for name, mod in lists if len({type(m) for m in mod}) == 1]
    if not uniform:
        raise UsageError(
            f"no decoder blocks found in {type(model).__name__}: carve needs a causal LM whose "
            "blocks are a ModuleList of layers containing Linear modules"
        )
    return max(uniform, key=lambda nm: len(nm[1]))


DEFAULT_EXCLUDE = ("*embed*", "*lm_head*", "*norm*", "*wte*", "*wpe*")


def prunable_linears(
    block: nn.Module,
    prefix: str,
    include: tuple[str, ...] = ("*",),
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
    earlier: Iterable[nn.Module] = (),
) -> dict[str, nn.Module]:
    """Linear modules of one block, by full module name, filtered by glob patterns; an MoE's router
    is never one (`routers`), nor a Linear whose weight one of the `earlier` blocks holds too (Zamba's
    shared transformer, its weights tied across depths: pruned once, in the first block holding them).
    The default exclusions are matched against the Linear's own name, the last part: they name what
    a Linear is, not where it sits (RoBERTa-PreLayerNorm's every module sits under
    `roberta_prelayernorm.`, DBRX's attention under `norm_attn_norm.attn`); other patterns, the full
    name."""
    out = {}
    skip = routers(block)
    held = {id(p) for b in earlier for p in b.parameters()}
    for name, mod in block.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if not is_linear(mod) or id(mod) in skip or id(mod.weight) in held:
            continue
        if not any(fnmatch.fnmatch(full, p) for p in include):
            continue
        own = name.rpartition(".")[2]
        if any(fnmatch.fnmatch(own if p in DEFAULT_EXCLUDE else full, p) for p in exclude):
            continue
        out[full] = mod
    return out


def routers(block: nn.Module) -> set[int]:
    """The ids of a block's MoE router Linears, which carve keeps dense: in each module holding
    `experts`, the Linears outside the experts with one output per expert (Llama 4's `Llama4Router`
    and PhiMoE's `PhimoeTopKRouter` subclass nn.Linear; AFMoE's `gate`, HunYuan's `wg`, DBRX's
    `router.layer` are plain ones).  The expert count is the length of the `experts` list (a
    ModuleList), the `num_experts` transformers sets on the experts or the block, a fused experts
    module's count (carve.models.experts.expert_counts, with the identity experts LongCat-Flash's router
    scores too), or the leading sizes of the experts' own 3-D weights; where a module holds no
    `experts`, its fused expert banks (JetMoE's) are its experts.  A router that is a network of Linears
    (ZAYA's: a projection, an MLP, and a last Linear scoring the experts and a skip one, count + 1)
    is kept whole: a module beside the experts whose Linears score them and never return to the
    width they read (a shared expert's down projection returns to the hidden size)."""
    from carve.models.experts import expert_counts

    found: set[int] = set()
    for moe in block.modules():
        experts = getattr(moe, "experts", None)
        members: list[nn.Module]
        if isinstance(experts, (list, nn.Module)):
            count = len(experts) if isinstance(experts, (list, nn.ModuleList)) else None
            count = count or getattr(experts, "num_experts", None) or getattr(moe, "num_experts", None)
            counts = {count} if isinstance(count, int) else set()
            if isinstance(experts, nn.Module):  # a fused experts module (or carve's ExpertLinears for
                # it), with identity experts its router scores too (LongCat-Flash); or the leading
                # sizes of another module's 3-D weights
                counts |= expert_counts(experts) or {
                    p.shape[0] for p in experts.parameters(recurse=False) if p.dim() == 3
                }
            members = list(experts) if isinstance(experts, list) else [experts]
        else:  # experts in banks beside the router (JetMoE's input_linear / output_linear)
            members = [c for c in moe.children() if expert_counts(c)]
            counts = set().union(*(expert_counts(c) for c in members))
        counts = {c for c in counts if c >= 2}
        if not counts:
            continue
        inside = {id(m) for e in members for m in e.modules()}
        for name, m in moe.named_modules():
            if not isinstance(m, nn.Linear) or id(m) in inside or m.out_features not in counts:
                continue
            parent = moe.get_submodule(name.rpartition(".")[0]) if "." in name else moe
            if parent is moe or sum(isinstance(x, nn.Linear) for x in parent.modules()) == 1:
                found.add(id(m))  # a shared expert's projections (a module of several Linears) are not
        for child in moe.children():  # a router that is a small network (ZAYA's: its last Linear
            linears = [x for x in child.modules() if isinstance(x, nn.Linear)]  # scores the experts and a skip one)
            if child is experts or len(linears) < 2 or any(id(x) in inside for x in linears):
                continue
            scores = any(x.out_features in counts or x.out_features - 1 in counts for x in linears)
            if scores and all(x.out_features != linears[0].in_features for x in linears):  # none back to its input
                found |= {id(x) for x in linears}  # width: a shared expert's down projection returns to it
    return found


def all_prunable_linears(
    model: nn.Module,
    include: tuple[str, ...] = ("*",),
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE,
) -> dict[str, nn.Module]:
    prefix, blocks = find_blocks(model)
    out: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        out.update(prunable_linears(block, f"{prefix}.{i}", include, exclude, blocks[:i]))
    if not out:
        raise UsageError(
            f"no Linear layers to prune in {type(model).__name__} with include={list(include)} exclude={list(exclude)}"
        )
    return out


def count_zeros(t: torch.Tensor) -> int:
    """Entries equal to zero (for a bool mask: False).  `(t == 0).sum()` would make a bool copy and
    then, to sum it, an int64 one: 9 bytes an entry (1.4 GB for a 262k-entry vocabulary's embedding)."""
    return t.numel() - int(torch.count_nonzero(t))


def count_parameters(model: nn.Module) -> int:
    """Parameters the model holds (a tied embedding / output head counted once)."""
    return sum(p.numel() for p in model.parameters())


def last_logits(model: nn.Module, ids: torch.Tensor, keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions of a cache-less forward over `ids`: only those are
    projected onto the vocabulary when the model's forward takes `logits_to_keep` (asked of its
    signature, so an error raised inside a forward is never mistaken for an unknown argument)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[:, -keep:]
    return model(input_ids=ids, use_cache=False).logits[:, -keep:]
