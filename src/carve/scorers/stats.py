"""Activation statistics accumulated over calibration tokens (float32 whatever the model dtype)."""

from __future__ import annotations

from typing import Any

import torch


class RowNorms:
    """Wanda's per-input-feature scale: mean over tokens of x_j², so ||X_j||₂ = sqrt(n·mean)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        self.sq.mul_(self.n / (self.n + t)).add_((x * x).sum(0) / (self.n + t))
        self.n += t

    @property
    def norms(self) -> torch.Tensor:
        return self.sq.sqrt()


class Hessian:
    """H = 2/n · Σ x xᵀ over the n calibration tokens (SparseGPT eq. for the layer-wise
    squared error), accumulated as a running mean so no token count overflows float32."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0
        # quantities derived from the final H (SparseGPT's inverse Cholesky factor), computed
        # once for all the Linears that share this Hessian
        self.cache: dict[str, Any] = {}

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        self.H.mul_(self.n / (self.n + t))
        self.n += t
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.t(), x)
