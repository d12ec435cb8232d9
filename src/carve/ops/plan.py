"""Planning a structured extraction: the importance of each unit (MLP channel, key/value group)
from any ImportanceMap, the candidate shapes within a parameter budget, and the plan (which
units of which blocks stay, which blocks go).  Pure functions of tensors and the anatomy.

- MLP channel c of a block: the sum of the scores of every weight that exists only for it, the
  c-th rows of gate_proj and up_proj and the c-th column of down_proj.
- Key/value group g of a block: the rows of k_proj and v_proj of head g, the rows of q_proj of
  its query heads and the matching columns of o_proj.  Removing whole groups keeps the model valid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from carve.errors import UsageError
from carve.models.anatomy import Anatomy, Parts, block_param_counts

DROP_RULES = ("distance", "greedy")
DEFAULT_DROP_RULE = "distance"


@dataclass(frozen=True)
class ShapeTarget:
    """What a structured extraction aims for: a share of the decoder-block parameters kept
    (`keep`), and/or dimensions fixed by the user; how blocks are chosen for dropping; whether
    removed units' mean contributions are kept as biases (FLAP)."""

    keep: float | None = None
    mlp_keep: float | None = None
    heads_keep: float | None = None
    drop_blocks: int | None = None
    drop_rule: str = DEFAULT_DROP_RULE
    bias_compensation: bool = False
    drop_run: int = 1  # blocks are dropped in runs of this many consecutive kept blocks


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
        groups[i], channels[i] = block_unit_importance(scores, p, anat)
    return groups, channels


def block_unit_importance(
    scores: Mapping[str, torch.Tensor], p: Parts, anat: Anatomy
) -> tuple[torch.Tensor, torch.Tensor]:
    """One block's row of `unit_importance`: its key/value groups' and MLP channels' importance."""

    def s(role: str) -> torch.Tensor:
        key = f"{p.names[role]}.weight"
        if key not in scores:
            raise UsageError(f"the importance map has no scores for {key}; score the attention and MLP weights")
        return scores[key][p.offset(role) : p.offset(role) + p.width(role)]  # a fused projection: its span

    # a hybrid's block of another mixer has no heads, and heads held whole (Gemma 4's kinds of other layouts
    # among them) are all kept: nothing to rank
    groups = torch.zeros(anat.kv_heads)
    if p.attention is not None and "heads" not in anat.fixed:
        groups += _rows(s("k_proj"), anat.kv_heads) + _rows(s("v_proj"), anat.kv_heads)
        groups += _rows(s("q_proj"), anat.kv_heads) + _cols(s("o_proj"), anat.kv_heads)
    if "up_proj" not in p.names or "mlp" in anat.fixed:  # an MoE block, a hybrid's block without an MLP, or MLPs
        return groups, torch.zeros(anat.intermediate)  # held whole (Gemma 4's double-wide ones): no channel to rank
    channels = _rows(s("up_proj"), anat.intermediate) + _cols(s("down_proj"), anat.intermediate)
    if "gate_proj" in p.names:
        channels += _rows(s("gate_proj"), anat.intermediate)
    return groups, channels


@dataclass
class UnitImportance:
    """`unit_importance`'s result, for a caller that reduced the scores block by block (a streamed
    extraction, which never holds the whole importance map)."""

    groups: torch.Tensor  # [blocks, kv_heads]
    channels: torch.Tensor  # [blocks, intermediate]


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


def decoder_params(anat: Anatomy, shape: Shape, drop: Sequence[int] | None = None) -> int:
    """The decoder blocks' parameters under `shape`: with the blocks dropped (`drop`), exactly; without,
    the kept share of the whole, (blocks - drop_blocks) / blocks of it (exact where blocks are alike)."""
    counts = block_param_counts(anat)
    sizes = [f + shape.kv_groups * g + shape.mlp_channels * c for f, g, c in counts]
    if drop is not None:
        return sum(n for i, n in enumerate(sizes) if i not in drop)
    return (len(sizes) - shape.drop_blocks) * sum(sizes) // len(sizes)


def candidate_shapes(
    anat: Anatomy,
    keep: float | None,
    mlp_keep: float | None = None,
    heads_keep: float | None = None,
    drop_blocks: int | None = None,
    multiple: int = 32,
    drop_run: int = 1,
) -> list[Shape]:
    """The shapes within the parameter budget `keep` (share of decoder-block parameters), with
    the dimensions the user fixed held; for each (groups, dropped blocks) the widest MLP that fits
    (a multiple of `multiple` channels).  Without `keep`, the single shape the user asked for.
    Dropped blocks come in whole runs of `drop_run`."""
    n_blocks = len(anat.blocks)
    if drop_run < 1 or drop_run >= n_blocks:
        raise UsageError(f"--drop-run {drop_run}: runs of 1 to {n_blocks - 1} blocks (the model has {n_blocks})")
    if drop_blocks is not None and drop_blocks % drop_run:
        raise UsageError(f"--drop-blocks {drop_blocks} is not a whole number of runs of --drop-run {drop_run}")
    if heads_keep is not None:
        g = round(heads_keep * anat.kv_heads)
        if not 1 <= g <= anat.kv_heads:
            raise UsageError(
                f"--heads-keep {heads_keep} keeps {g} of {anat.kv_heads} key/value groups; keep at least one"
            )
        if "heads" in anat.fixed and g < anat.kv_heads:
            raise UsageError(f"{anat.fixed['heads']}; extract with --heads-keep 1.0")
        group_options = [g]
    else:  # --keep searches the number of groups too, where heads can go
        search = keep is not None and "heads" not in anat.fixed
        group_options = list(range(anat.kv_heads, 0, -1)) if search else [anat.kv_heads]
    if drop_blocks is not None:
        if not 0 <= drop_blocks < n_blocks:
            raise UsageError(f"--drop-blocks {drop_blocks}: the model has {n_blocks} blocks; keep at least one")
        if "depth" in anat.fixed and drop_blocks:
            raise UsageError(f"{anat.fixed['depth']}; extract with --drop-blocks 0")
        drop_options = [drop_blocks]
    else:  # --keep searches the number of blocks dropped too, where blocks can go
        drop_options = (
            sorted({round(n_blocks * f / drop_run) * drop_run for f in (0, 1 / 8, 1 / 4, 3 / 8, 1 / 2)})
            if keep is not None and "depth" not in anat.fixed
            else [0]
        )
    multiple = max(1, min(multiple, anat.intermediate // 8))
    fixed_m: int | None = None
    if mlp_keep is not None:
        if not 0 < mlp_keep <= 1:
            raise UsageError(f"--mlp-keep {mlp_keep} is outside (0, 1]")
        fixed_m = max(1, round(mlp_keep * anat.intermediate))
        if "mlp" in anat.fixed and mlp_keep < 1:
            raise UsageError(f"{anat.fixed['mlp']}; extract with --mlp-keep 1.0")
    if "mlp" in anat.fixed:  # --keep cuts heads and depth only (an MoE: no dense MLP, width 0)
        fixed_m = anat.intermediate
    if keep is None:
        return [Shape(group_options[0], anat.intermediate if fixed_m is None else fixed_m, drop_options[0])]
    if not 0 < keep < 1:
        raise UsageError(f"--keep {keep} is outside (0, 1): it is the share of decoder-block parameters kept")
    if None not in (mlp_keep, heads_keep, drop_blocks):
        raise UsageError("--keep with all of --mlp-keep, --heads-keep and --drop-blocks leaves nothing to choose")
    budget = keep * decoder_params(anat, Shape(anat.kv_heads, anat.intermediate, 0))
    # a block's mean counts (a hybrid's blocks differ; alike blocks give each block's own, exactly)
    fixed, per_group, per_channel = (sum(c) / n_blocks for c in zip(*block_param_counts(anat), strict=True))
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
        held = f" (held by the model: {', '.join(anat.fixed)})" if anat.fixed else ""
        raise UsageError(
            f"no choice of heads, MLP width and blocks keeps {keep:.0%} of the decoder parameters with the "
            f"dimensions fixed{held}; loosen --keep or the explicit targets"
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


def evenly_spaced(blocks: torch.Tensor, k: int) -> torch.Tensor:
    """`k` rows spread over `blocks` (calibration blocks are domain first, then general: the
    pick keeps their mix)."""
    if len(blocks) <= k:
        return blocks
    return blocks[torch.linspace(0, len(blocks) - 1, k).round().long()]
