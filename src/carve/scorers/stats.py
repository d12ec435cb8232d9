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

    @staticmethod
    def nbytes(in_features: int) -> int:
        """What one takes: its float64 sum."""
        return 8 * in_features

    @property
    def sq(self) -> torch.Tensor:
        """The mean of x_j² over the tokens seen (float32); ones when none was seen (an MoE expert the
        calibration never routed to: every input alike, so Wanda keeps the largest weights)."""
        if self.n == 0:
            return torch.ones_like(self._sum, dtype=torch.float32)
        return (self._sum / self.n).float()

    @property
    def norms(self) -> torch.Tensor:
        return self.sq.sqrt()

    def merge_ranks(self) -> None:
        """The sums over every rank's tokens (carve.distributed; nothing changes with one process)."""
        self.n = _merge_sums([self._sum], self.n)


class Hessian:
    """H = 2/n · Σ x xᵀ over the n calibration tokens (SparseGPT eq. for the layer-wise squared
    error), summed in float64 and read as float32.

    H is symmetric: the sum is kept as the row-chunks of its upper triangle only ([256, in − a] for
    the chunk starting at row a: about half the matrix, so the float64 sum takes about the memory of
    a full float32 H), each update computes only those products (about 60% of XᵀX for a 1536-wide
    input), and `H` assembles and mirrors the full float32 matrix when first read, freeing each chunk
    as it goes.  A later update rebuilds the sum from H (to float32 precision).

    `products`: the dtype each batch's XᵀX is computed in (default float32).  A 16-bit dtype
    multiplies the inputs as the calibration forwards produced them (bfloat16 products are ~4x
    faster than float32 ones on an AVX512-BF16 CPU) but rounds each batch's product to that dtype
    before the float64 sum: torch has no 16-bit-in, float32-out product on the CPU."""

    CHUNK = 256
    ROWS = 8192  # tokens per product: a copy of the input in `products` is made this many at a time
    PRODUCTS = True  # the layer-wise engine hands it Calibration.products

    def __init__(
        self, in_features: int, device: torch.device | str = "cpu", products: torch.dtype | None = None
    ) -> None:
        self.d = in_features
        self.products = products or torch.float32
        self._starts = list(range(0, in_features, self.CHUNK))
        self._rows: list[torch.Tensor] | None = [
            torch.zeros(min(self.CHUNK, in_features - a), in_features - a, dtype=torch.float64, device=device)
            for a in self._starts
        ]
        self._H: torch.Tensor | None = None
        self.n = 0
        # quantities derived from the final H (SparseGPT's inverse Cholesky factor), computed
        # once for all the Linears that share this Hessian
        self.cache: dict[str, Any] = {}

    @staticmethod
    def nbytes(in_features: int) -> int:
        """What one takes at most, about: its float64 half-sum, then H and an inverse factor of H
        (SparseGPT's), each a float32 [in, in] matrix."""
        return 8 * in_features * in_features

    def update(self, x: torch.Tensor) -> None:
        if self._rows is None:  # read before: go on from H
            assert self._H is not None
            half_n = self.n / 2.0
            self._rows = [self._H[a : a + self.CHUNK, a:].double().mul_(half_n) for a in self._starts]
            self._H = None
            self.cache.clear()
        for rows in x.reshape(-1, x.shape[-1]).split(self.ROWS):
            self._add(rows.to(self.products))

    def _add(self, x: torch.Tensor) -> None:
        assert self._rows is not None
        self.n += x.shape[0]
        for chunk, a in zip(self._rows, self._starts, strict=True):  # a `products` product, added in float64
            chunk += x[:, a : a + self.CHUNK].t() @ x[:, a:]

    @property
    def H(self) -> torch.Tensor:
        """H as float32; the identity when no token was seen (an MoE expert the calibration never
        routed to: no input outweighs another, and SparseGPT prunes by magnitude, instead of taking
        every input for dead and zeroing the whole matrix)."""
        if self._H is None and self.n == 0:
            assert self._rows is not None
            device = self._rows[0].device
            self._rows = None
            self._H = torch.eye(self.d, dtype=torch.float32, device=device)
        if self._H is None:
            assert self._rows is not None
            rows, self._rows = self._rows, None
            H = torch.empty(self.d, self.d, dtype=torch.float32, device=rows[0].device)
            scale = 2.0 / max(self.n, 1)
            for k, a in enumerate(self._starts):
                H[a : a + self.CHUNK, a:] = rows[k].mul_(scale)
                rows[k] = rows[k].new_empty(0)  # freed as it goes
            for a in self._starts[1:]:  # the lower chunks from the upper ones
                H[a : a + self.CHUNK, :a] = H[:a, a : a + self.CHUNK].t()
            self._H = H
        return self._H

    def merge_ranks(self) -> None:
        """The sums over every rank's tokens (carve.distributed; nothing changes with one process)."""
        if self._rows is None:
            raise RuntimeError("a Hessian's ranks are merged before it is read")
        self.n = _merge_sums(self._rows, self.n)


def _merge_sums(sums: list[torch.Tensor], n: int) -> int:
    """`sums` (each a sum over this rank's `n` tokens) summed over the ranks in place; the total n."""
    if not distributed.active():
        return n
    for total in sums:
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
