"""Activation statistics accumulated over calibration tokens.

Each is a float64 *sum* over tokens of float32 per-batch products, divided by the token count only
when read, so the result does not depend on how the batches were ordered or shared out: one process
or several (each rank's sums all-reduced), the same float32 statistic but for float64 rounding,
which the final cast hides.  The per-batch products are float32 matrix products, equal for any thread
count under MKL's strict reproducibility mode (`MKL_CBWR=AUTO,STRICT`, which `import carve` sets
unless the environment already says otherwise)."""

from __future__ import annotations

from typing import Any

import torch

from carve import distributed


class RowNorms:
    """Wanda's per-input-feature scale: mean over tokens of x_j², so ||X_j||₂ = sqrt(n·mean)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self._sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.n = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self._sum += (x * x).sum(0)
        self.n += x.shape[0]

    @property
    def sq(self) -> torch.Tensor:
        """The mean of x_j² over the tokens seen (float32)."""
        return (self._sum / max(self.n, 1)).float()

    @property
    def norms(self) -> torch.Tensor:
        return self.sq.sqrt()

    def merge_ranks(self) -> None:
        """The sums over every rank's tokens (carve.distributed; nothing changes with one process)."""
        self.n = _merge_sum(self._sum, self.n)


class Hessian:
    """H = 2/n · Σ x xᵀ over the n calibration tokens (SparseGPT eq. for the layer-wise squared
    error), summed in float64 and read as float32.

    H is symmetric: each update computes only the row-chunks of the upper triangle (about 60% of
    the products for a 1536-wide input) and `H` mirrors it when first read.  Once `H` is read, the
    accumulation's float64 sum is freed (a later update rebuilds it from H, to float32 precision)."""

    CHUNK = 256
    ROWS = 8192  # tokens per product: a float32 copy of a 16-bit input is made this many at a time

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self._sum: torch.Tensor | None = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self._H: torch.Tensor | None = None
        self.n = 0
        # quantities derived from the final H (SparseGPT's inverse Cholesky factor), computed
        # once for all the Linears that share this Hessian
        self.cache: dict[str, Any] = {}

    def update(self, x: torch.Tensor) -> None:
        if self._sum is None:  # read before: go on from H
            assert self._H is not None
            self._sum, self._H = self._H.double().mul_(self.n / 2.0), None
            self.cache.clear()
        for rows in x.reshape(-1, x.shape[-1]).split(self.ROWS):
            self._add(rows.float())

    def _add(self, x: torch.Tensor) -> None:
        assert self._sum is not None
        d = x.shape[1]
        self.n += x.shape[0]
        for a in range(0, d, self.CHUNK):  # one float32 product per chunk, added in float64
            b = min(a + self.CHUNK, d)
            self._sum[a:b, a:] += x[:, a:b].t() @ x[:, a:]

    @property
    def H(self) -> torch.Tensor:
        if self._H is None:
            assert self._sum is not None
            H = self._sum.mul_(2.0 / max(self.n, 1)).float()
            self._sum = None
            d = H.shape[0]
            for a in range(self.CHUNK, d, self.CHUNK):  # the lower chunks from the upper ones
                H[a : a + self.CHUNK, :a] = H[:a, a : a + self.CHUNK].t()
            self._H = H
        return self._H

    def merge_ranks(self) -> None:
        """The sums over every rank's tokens (carve.distributed; nothing changes with one process)."""
        if self._sum is None:
            raise RuntimeError("a Hessian's ranks are merged before it is read")
        self.n = _merge_sum(self._sum, self.n)


def _merge_sum(total: torch.Tensor, n: int) -> int:
    """`total` (a sum over `n` tokens on this rank) and `n` summed over the ranks, in place."""
    if not distributed.active():
        return n
    distributed.sum_(total)
    return int(distributed.sum_float(float(n)))


def merge_statistics(stats: dict[str, Any]) -> None:
    """Each distinct statistic of a block summed over every rank's calibration tokens, in one order
    on every rank (Linears that share an input share one statistic)."""
    seen: set[int] = set()
    for name in sorted(stats):
        stat = stats[name]
        if id(stat) not in seen and hasattr(stat, "merge_ranks"):
            seen.add(id(stat))
            stat.merge_ranks()
