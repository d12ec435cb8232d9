"""Activation statistics accumulated over calibration tokens (float32 whatever the model dtype)."""

from __future__ import annotations

from typing import Any

import torch

from carve.distributed import merge_mean


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

    def merge_ranks(self) -> None:
        """The mean over every rank's tokens (carve.distributed; nothing changes with one process)."""
        self.n = merge_mean(self.sq, self.n)


class Hessian:
    """H = 2/n · Σ x xᵀ over the n calibration tokens (SparseGPT eq. for the layer-wise
    squared error), accumulated as a running mean so no token count overflows float32.

    H is symmetric: each update computes only the row-chunks of the upper triangle
    (about 60% of the products for a 1536-wide input) and `H` mirrors it when read."""

    CHUNK = 256
    ROWS = 8192  # tokens per product: a float32 copy of a 16-bit input is made this many at a time

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self._H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self._symmetric = True
        self.n = 0
        # quantities derived from the final H (SparseGPT's inverse Cholesky factor), computed
        # once for all the Linears that share this Hessian
        self.cache: dict[str, Any] = {}

    def update(self, x: torch.Tensor) -> None:
        for rows in x.reshape(-1, x.shape[-1]).split(self.ROWS):
            self._add(rows.float())

    def _add(self, x: torch.Tensor) -> None:
        t, d = x.shape
        keep = self.n / (self.n + t)  # the running mean's weight on what came before
        self.n += t
        for a in range(0, d, self.CHUNK):  # no scaled copy of x: addmm scales the product
            b = min(a + self.CHUNK, d)
            self._H[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:], beta=keep, alpha=2.0 / self.n)
        self._symmetric = False

    @property
    def H(self) -> torch.Tensor:
        if not self._symmetric:
            # diagonal chunks are complete; mirror the upper off-diagonal chunks
            self._H = torch.triu(self._H) + torch.triu(self._H, 1).t()
            self._symmetric = True
        return self._H

    def merge_ranks(self) -> None:
        """The mean over every rank's tokens (carve.distributed; nothing changes with one process)."""
        H = self.H
        n = merge_mean(H, self.n)
        if n != self.n:
            self._H, self.n = H, n
            self.cache.clear()


def merge_statistics(stats: dict[str, Any]) -> None:
    """Each distinct statistic of a block made the mean over every rank's calibration tokens, in
    one order on every rank (Linears that share an input share one statistic)."""
    seen: set[int] = set()
    for name in sorted(stats):
        stat = stats[name]
        if id(stat) not in seen and hasattr(stat, "merge_ranks"):
            seen.add(id(stat))
            stat.merge_ranks()
