"""Importance from the weights alone: magnitude, seeded random, and LIFT's principal weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from carve.errors import UsageError
from carve.importance.registry import importance_source
from carve.scorers.magnitude import magnitude_score


def _weight(lin: nn.Module) -> torch.Tensor:
    w = lin.weight
    assert isinstance(w, torch.Tensor)
    return w.detach()


@importance_source("magnitude", scorer="magnitude")
def magnitude(model: nn.Module, linears: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """|θ| (the magnitude scorer's maths)."""
    return {f"{n}.weight": magnitude_score(_weight(lin), None).cpu() for n, lin in linears.items()}


@importance_source("random", paper="uniform random scores (the control of every masking paper)", url="")
def random_scores(model: nn.Module, linears: dict[str, nn.Module], seed: int = 0) -> dict[str, torch.Tensor]:
    """U(0, 1) per weight from a generator seeded with `seed` (the same scores on every machine)."""
    g = torch.Generator().manual_seed(seed)
    return {f"{n}.weight": torch.rand(_weight(lin).shape, generator=g) for n, lin in linears.items()}


def low_rank(W: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-`rank` approximation of W (Eckart-Young): U_r diag(S_r) V_rᵀ from a full
    SVD in float32.  A rank at or above min(W.shape) returns W itself."""
    W = W.float()
    if rank >= min(W.shape):
        return W.clone()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    return (U[:, :rank] * S[:rank]) @ Vh[:rank]


def lift_rank(shape: torch.Size | tuple[int, ...], rank: float) -> int:
    """`rank` >= 1: that rank; 0 < rank < 1: that fraction of min(shape) (at least 1)."""
    if rank <= 0:
        raise UsageError(f"LIFT rank {rank} must be positive: a whole rank (e.g. 128) or a fraction of each matrix's")
    return int(rank) if rank >= 1 else max(1, round(rank * min(shape)))


@importance_source(
    "lift",
    paper="Liu et al., LIFT the Veil for the Truth: Principal Weights Emerge after Rank Reduction (2025)",
    url="https://arxiv.org/abs/2506.00772",
)
def lift(model: nn.Module, linears: dict[str, nn.Module], rank: float = 128) -> dict[str, torch.Tensor]:
    """Principal weights: |W_r|, the magnitudes of each matrix's rank-r approximation; the
    top-density entries by this score are the ones LIFT fine-tunes."""
    return {f"{n}.weight": low_rank(_weight(lin), lift_rank(_weight(lin).shape, rank)).abs().cpu()
            for n, lin in linears.items()}  # fmt: skip


@importance_source(
    "task-vector",
    paper="Ilharco et al., Editing Models with Task Arithmetic (2023): τ = θ − θ₀; TIES/DARE trim by |τ|",
    url="https://arxiv.org/abs/2212.04089",
    needs=("reference",),
)
def task_vector(
    model: nn.Module, linears: dict[str, nn.Module], reference: nn.Module | Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """|θ − θ₀|: how far fine-tuning moved each weight from the reference (base) model, or from its
    tensors by parameter name."""
    ref = dict(reference.named_parameters()) if isinstance(reference, nn.Module) else reference
    out = {}
    for n, lin in linears.items():
        base = ref.get(f"{n}.weight")
        if base is None or base.shape != _weight(lin).shape:
            raise UsageError(f"the reference model has no weight {n}.weight of shape {tuple(_weight(lin).shape)}")
        out[f"{n}.weight"] = (_weight(lin).float() - base.detach().float()).abs().cpu()
    return out
