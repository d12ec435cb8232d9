"""Importance from activation statistics of each Linear's inputs (the layer-wise engine, on the
dense model, `calib` as in carve.ops.prune): Wanda's |W|·‖X‖ and SparseGPT's OBS saliency
w²/[H⁻¹]²_jj."""

from __future__ import annotations

import torch
from torch import nn

from carve.importance.registry import importance_source
from carve.importance.scoring import activation_scores
from carve.scorers.registry import get_scorer
from carve.settings import DEFAULT_CALIBRATION, Calibration, Targets


@importance_source("wanda", scorer="wanda", needs=("data",))
def wanda(
    model: nn.Module, linears: dict[str, nn.Module], data: torch.Tensor, targets: Targets,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """|W_ij| · ‖X_j‖₂/√n over the n calibration tokens (Wanda, eq. 1, up to the constant √n)."""
    return dict(activation_scores(model, get_scorer("wanda"), data, targets, calib))


@importance_source("obs", scorer="sparsegpt", needs=("data",))
def obs(
    model: nn.Module, linears: dict[str, nn.Module], data: torch.Tensor, targets: Targets,
    calib: Calibration = DEFAULT_CALIBRATION,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The OBS error of removing each weight alone, w²/[H⁻¹]²_jj, H = 2/n·XXᵀ (SparseGPT's saliency)."""
    return dict(activation_scores(model, get_scorer("sparsegpt"), data, targets, calib))
