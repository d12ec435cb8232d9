"""Structured extraction of a mixture of experts: whole experts removed from every MoE block,
leaving a smaller model whose config is still standard (`carve extract --experts-keep F`).

An MoE block (Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss: transformers' experts interface; Llama 4) holds its
experts fused in 3-D parameters (carve.models.experts) beside a router whose weight (and bias, if
any) has one row per expert.  Experts are ranked per block by their routing mass over the
calibration tokens: the sum of the routing weights the router gave each expert where it was among a
token's top-k (the soft count of SEER-MoE, Muzio et al. 2024, arXiv 2404.05089), read from the
experts module's arguments, or from the router's output where the experts take the tokens already
routed (Llama 4: its sigmoid scores, zero outside the top-k).  Every MoE block
keeps the same number of experts (its own heaviest ones), so the config stays standard: the expert
count (`num_local_experts` / `num_experts`) is rewritten, everything else is untouched.  Removing
expert e is what its router row at −∞ computes: no token is routed to it, and the softmax, before or
after the top-k, runs over the kept experts only.  Under group-limited routing (DeepSeek-V3's
`n_group` groups, each ranked by its two best experts) every group keeps the same number, at least
two, so the groups stay as they were and each is ranked by its kept experts as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from carve.engines.blocks import run_hooked
from carve.errors import UsageError
from carve.masks.mask import ImportanceMap
from carve.models.anatomy import text_config
from carve.models.experts import expert_count, fused_experts, layout_of

if TYPE_CHECKING:
    from carve.engines.gradient import BlockSource

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")  # the config's expert count


@dataclass
class MoeBlock:
    """One MoE block's experts (the fused module) and its router."""

    name: str  # the experts module's qualified name
    experts: nn.Module
    router: nn.Module
    holder: nn.Module  # the module holding both (LFM2-MoE keeps its per-expert routing bias there)

    @property
    def count(self) -> int:
        weight: Any = self.router.weight
        return int(weight.shape[0])


def moe_blocks(model: nn.Module, within: bool = False) -> list[MoeBlock]:
    """Every MoE block's experts and router (the sibling whose weight has one row per expert), or
    say why not (`within`: a part of a model, which may hold none)."""
    blocks = []
    for name, experts in fused_experts(model).items():
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        found = layout_of(experts)
        if found.call == "weighted":
            continue  # shared experts every token goes to (Inkling's): none is routed, none dropped
        why = (
            "stacked along the rows of 2-D weights" if found.count
            else "beside identity experts it routes to" if found.routable
            else "banks of Linears its caller routes to" if found.call == "sized"
            else None
        )  # fmt: skip
        if why:
            raise UsageError(f"--experts-keep cannot slice {name} ({type(experts).__name__}: {why}); "
                             "carve prunes those experts but does not remove them")  # fmt: skip
        count = expert_count(experts)
        routers = [
            m for m in parent.children()
            if m is not experts and isinstance(w := getattr(m, "weight", None), torch.Tensor)
            and w.dim() == 2 and w.shape[0] == count
        ]  # fmt: skip
        if len(routers) != 1:
            raise UsageError(f"carve cannot tell the router of {name} ({count} experts) among its siblings")
        blocks.append(MoeBlock(name, experts, routers[0], parent))
    if not blocks and not within:
        raise UsageError(
            f"--experts-keep removes whole experts of a mixture of experts; {type(model).__name__} has none"
        )
    return blocks


def expert_groups(config: Any) -> int:
    """The groups a token's experts are chosen within (DeepSeek-V3's `n_group`: its router first
    picks `topk_group` groups by their two best experts' scores, then the top-k among those), or 1."""
    groups = getattr(config, "n_group", None)
    return groups if isinstance(groups, int) and groups > 1 else 1


def kept_count(blocks: list[MoeBlock], config: Any, keep: float) -> int:
    """Experts every block keeps under `keep`, checked against the experts each token is routed to;
    under group-limited routing, the same number in each group (`expert_groups`)."""
    if not 0 < keep <= 1:
        raise UsageError(f"--experts-keep {keep} is outside (0, 1]: it is the share of each MoE block's experts kept")
    count = blocks[0].count
    if any(b.count != count for b in blocks):
        raise UsageError("the MoE blocks differ in their number of experts; carve keeps the same number in each")
    top_k = int(getattr(config, "num_experts_per_tok", None) or getattr(blocks[0].router, "top_k", None) or 1)
    groups = expert_groups(config)
    if groups == 1:
        n = round(keep * count)
        if n < top_k:
            raise UsageError(f"--experts-keep {keep} keeps {n} of {count} experts; "
                             f"every token is routed to {top_k}: keep at least that")  # fmt: skip
        return n
    size = count // groups
    per = round(keep * size)
    chosen = int(getattr(config, "topk_group", None) or groups)
    if per < 2 or per * chosen < top_k:
        least = max(2, -(-top_k // chosen))
        raise UsageError(
            f"--experts-keep {keep} keeps {per} of each group's {size} experts; this MoE routes within {groups} "
            f"groups (n_group), ranks each group by its two best experts and routes a token to {top_k} in "
            f"{chosen} groups: keep at least {least} per group ({least / size:.3g})"
        )
    return per * groups


@torch.no_grad()
def routing_mass(
    model: nn.Module, blocks: list[MoeBlock], calibration: torch.Tensor, batch_size: int,
    source: BlockSource | None = None,
) -> torch.Tensor:  # fmt: skip
    """[MoE blocks, experts]: the routing weights each expert received over the calibration tokens
    (the weights the experts module is called with: zero where an expert was not in a token's top-k);
    with `source` (streamed), the decoder blocks read and run one at a time."""
    mass = torch.zeros(len(blocks), blocks[0].count, dtype=torch.float64)

    def hook(i: int) -> Any:
        def record(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            given = [*args[1:], *kwargs.values()]  # (top-k indices, top-k weights) after the hidden states
            index, weight = given[0].reshape(-1), given[1].reshape(-1)
            routed = index < mass.shape[1]  # an index past the experts stands for none
            mass[i].index_add_(0, index[routed].cpu(), weight[routed].double().cpu())

        return record

    def scores(i: int) -> Any:
        def record(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            weight = out[0] if isinstance(out, tuple) else out  # [tokens, experts], zero outside the top-k
            mass[i] += weight.reshape(-1, mass.shape[1]).double().sum(0).cpu()

        return record

    handles = [
        # experts called on tokens already routed (Llama 4): the weights are the router's output
        b.router.register_forward_hook(scores(i)) if pre_routed(b.experts)
        else b.experts.register_forward_pre_hook(hook(i), with_kwargs=True)
        for i, b in enumerate(blocks)
    ]  # fmt: skip
    run_hooked(model, calibration, handles, batch_size, "routing mass", source)
    return mass


def pre_routed(experts: nn.Module) -> bool:
    return layout_of(experts).call == "pre_routed"


def slice_experts(block: MoeBlock, kept: list[int]) -> None:
    """Keep `kept` experts of `block`: every per-expert parameter and buffer of the experts module and
    the router (DeepSeek-V3's `e_score_correction_bias`), and every per-expert buffer of the module
    holding them (LFM2-MoE's `expert_bias`), replaced by a copy of the kept rows (never written
    into), their expert counts rewritten."""
    rows = torch.tensor(kept, dtype=torch.long)
    count = block.count
    for module in (block.experts, block.router, block.holder):
        for name, p in list(module.named_parameters(recurse=False)):
            if p.shape[0] == count and module is not block.holder:
                setattr(
                    module, name, nn.Parameter(p.detach()[rows.to(p.device)].clone(), requires_grad=p.requires_grad)
                )
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None and b.dim() > 0 and b.shape[0] == count:
                persistent = name not in module._non_persistent_buffers_set
                module.register_buffer(name, b[rows.to(b.device)].clone(), persistent=persistent)
        if getattr(module, "num_experts", None) == count:
            setattr(module, "num_experts", len(kept))  # noqa: B010  (an int attribute; mypy types it a Module)


@dataclass
class ExpertsResult:
    """The Outcome of dropping experts (see ops.outcome)."""

    names: list[str]  # the experts modules
    kept: list[list[int]]  # per MoE block, the experts kept (original indices)
    mass: torch.Tensor  # [blocks, experts]: the routing mass they were ranked by
    count: int  # experts per block before
    groups: int = 1  # the routing's expert groups, each keeping the same number (`expert_groups`)
    importance: ImportanceMap | None = None  # experts are ranked by routing, not by weight scores

    def describe(self, model: nn.Module) -> dict[str, Any]:
        share = self.mass / self.mass.sum(1, keepdim=True).clamp_min(1e-12)
        return {
            "experts_kept": {
                "rule": "routing mass (soft count) on the calibration blocks"
                + (f", the same number in each of the {self.groups} expert groups" if self.groups > 1 else ""),
                "kept": len(self.kept[0]),
                "of": self.count,
                "blocks": {
                    n: {"kept": k, "routing_share": [round(x, 5) for x in s.tolist()]}
                    for n, k, s in zip(self.names, self.kept, share, strict=True)
                },
            }
        }

    def save(self, directory: Path) -> None:
        """The kept experts are in the manifest and the sliced model itself: no file of its own."""


def plan_experts(
    model: nn.Module, calibration: torch.Tensor, keep: float, batch_size: int = 8, source: BlockSource | None = None
) -> ExpertsResult:
    """Which experts every MoE block keeps under `keep`: the heaviest by routing mass over
    `calibration` (the model is not changed)."""
    blocks = moe_blocks(model)
    config = text_config(model)
    n, groups = kept_count(blocks, config, keep), expert_groups(config)
    mass = routing_mass(model, blocks, calibration, batch_size, source)
    kept = [heaviest(m, n, groups) for m in mass]
    return ExpertsResult([b.name for b in blocks], kept, mass, blocks[0].count, groups)


def heaviest(mass: torch.Tensor, n: int, groups: int = 1) -> list[int]:
    """The `n` experts of heaviest routing `mass`, n / groups in each of `groups` equal runs of
    experts (ties, experts no token reached, to the lower index), in index order."""
    size, per = mass.numel() // groups, n // groups
    return sorted(
        g * size + i
        for g, part in enumerate(mass.view(groups, size))
        for i in part.sort(descending=True, stable=True).indices[:per].tolist()
    )


def apply_experts(module: nn.Module, result: ExpertsResult, prefix: str = "") -> None:
    """Slice the MoE blocks inside `module` (the model, or one decoder block whose qualified name is
    `prefix`) to `result`'s kept experts."""
    kept = dict(zip(result.names, result.kept, strict=True))
    for block in moe_blocks(module, within=True):
        slice_experts(block, kept[prefix + block.name])


def experts_config(config: Any, result: ExpertsResult) -> None:
    """Rewrite the expert count of `config` (the text config) in place to `result`'s."""
    for key in EXPERT_COUNT_KEYS:
        if getattr(config, key, None) == result.count:
            setattr(config, key, len(result.kept[0]))


def drop_experts(model: nn.Module, calibration: torch.Tensor, keep: float, batch_size: int = 8) -> ExpertsResult:
    """Keep the `keep` share of every MoE block's experts, the heaviest by routing mass over
    `calibration`; slice `model` in place and rewrite its config's expert count."""
    result = plan_experts(model, calibration, keep, batch_size)
    apply_experts(model, result)
    experts_config(text_config(model), result)
    return result
