"""Turning scores into keep-masks (True = keep): per row, per matrix, or N:M along the input
dimension.  Pure tensor functions; global selection over many matrices lives in Mask."""

from __future__ import annotations

import torch

from carve.errors import UsageError

GRANULARITIES = ("row", "matrix", "global")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep N of every M consecutive input weights (NVIDIA's N:M)."""
    if pattern in (None, "", "none", "unstructured"):
        return None
    assert pattern is not None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise UsageError(f"pattern {pattern!r} is not N:M (for example 2:4 or 4:8)") from None
    if not 0 < n < m:
        raise UsageError(f"pattern {pattern!r} needs 0 < N < M (keep N of every M), for example 2:4")
    return n, m


def check_sparsity(sparsity: float | None, nm: tuple[int, int] | None) -> float:
    """The sparsity to use: N:M fixes it to 1 - N/M, and a given value must agree."""
    if nm is not None:
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-6:
            raise UsageError(
                f"sparsity {sparsity} disagrees with pattern {nm[0]}:{nm[1]}, which means sparsity "
                f"{implied:g}; drop --sparsity or set it to {implied:g}"
            )
        return implied
    if sparsity is None:
        raise UsageError("give a sparsity between 0 and 1 (exclusive), or an N:M pattern")
    if not 0 < sparsity < 1:
        raise UsageError(f"sparsity {sparsity} is outside (0, 1): give the share of weights to remove, e.g. 0.5")
    return float(sparsity)


SELECT_FROM = 64  # last dimensions at least this long select the threshold instead of sorting


def _prune_smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask with the k lowest scores of the last dimension removed: exactly k, ties at the
    threshold removed in position order (what a stable sort gives)."""
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if scores.shape[-1] < SELECT_FROM:  # short groups (N:M): one sort is cheapest
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep.scatter_(-1, torch.sort(scores, dim=-1, stable=True).indices[..., :k], False)
        return keep
    # the k-th smallest by selection, O(n) (a sort of a 128-column SparseGPT block took ~6x longer)
    threshold = torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    below, tie = scores < threshold, scores == threshold
    still = k - below.sum(-1, keepdim=True)  # how many of the ties go
    return ~(below | (tie & (tie.cumsum(-1) <= still)))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest scores in every group of M consecutive columns of each row."""
    rows, cols = scores.shape
    if cols % m:
        raise UsageError(f"pattern {n}:{m} needs the input dimension ({cols}) to be a multiple of {m}")
    groups = scores.reshape(rows, cols // m, m)
    return _prune_smallest(groups, m - n).reshape(rows, cols)


def keep_mask(
    scores: torch.Tensor,
    sparsity: float,
    granularity: str = "row",
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Keep-mask of a [out, in] score matrix removing the lowest-scoring share `sparsity`.

    row: floor(sparsity·in) removed from each output row (Wanda's comparison group);
    matrix: floor(sparsity·numel) removed over the whole matrix; N:M overrides both."""
    if nm is not None:
        return nm_mask(scores, *nm)
    if granularity == "row":
        return _prune_smallest(scores, int(scores.shape[-1] * sparsity))
    if granularity == "matrix":
        return _prune_smallest(scores.reshape(-1), int(scores.numel() * sparsity)).view_as(scores)
    raise UsageError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
