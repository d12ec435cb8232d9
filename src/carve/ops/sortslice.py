"""Which entries a slice of torch's CPU sort holds, in linear expected time.

mergekit keeps TIES' and Breadcrumbs' entries by slicing a full sort: `argsort(|τ|, descending=True)[:k]`
and `sort(|τ|).indices[lo:hi]`.  Fine-tuned task vectors hold many exactly equal magnitudes, so a run
of tied entries usually straddles the slice's boundary, and which of them the slice holds is decided
by the sort's algorithm: torch's CPU sort (not stable unless asked) is libstdc++'s `std::sort`, an
introsort.  A k-th value selection finds the boundary value but not those entries.

`sort_slice` follows the same introsort but only where a boundary is: each partition of a range that
holds a boundary is computed exactly as `std::sort` does it (the median of three moved to the front,
then the Hoare partition `std::__unguarded_partition`, vectorized: the i-th entry that stops the left
scan is swapped with the i-th that stops the right scan while they are in order); a range with no
boundary inside is left as a set; a range of at most 16 entries, which `std::sort` leaves to its final
insertion sort (stable, and no entry crosses a partition), is sorted stably.  Expected work is
linear, like quickselect, where the full sort is n·log n.

It is checked against `torch.sort` once per process on tie-heavy data (`agrees_with_torch`); where
torch's sort is another algorithm (another C++ library, another torch), callers fall back to the sort.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import torch

THRESHOLD = 16  # libstdc++'s _S_threshold: ranges this small are left to the final insertion sort
BLOCK = 1 << 14  # entries per block when counting the partition's stoppers


def sort_slice(values: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor | None:
    """Keep-mask (bool, `values`' shape) of the entries at positions [lo, hi) of
    `torch.sort(values.reshape(-1).float(), descending=descending)` (not stable), or None where it
    cannot be followed (NaN, the introsort's depth limit reached beside a boundary — std::sort then
    heap-sorts — or a torch whose sort this does not reproduce): then sort."""
    n = values.numel()
    if not 0 <= lo <= hi <= n:
        raise ValueError(f"slice [{lo}, {hi}) outside {n} entries")
    flat = values.detach().reshape(-1).float().cpu()
    if bool(torch.isnan(flat).any()) or not agrees_with_torch():
        return None
    keep = _slice(flat.numpy(), lo, hi, descending)
    return None if keep is None else torch.from_numpy(keep).reshape(values.shape)


def _slice(values: np.ndarray, lo: int, hi: int, descending: bool) -> np.ndarray | None:
    a = values.reshape(-1) + np.float32(0)  # a copy, and -0.0 becomes +0.0 (they compare equal)
    n = a.size
    idx = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)  # each entry's index moves with it
    bounds = [b for b in sorted({lo, hi}) if 0 < b < n]

    def cut_inside(first: int, last: int) -> bool:
        return any(first < b < last for b in bounds)

    def before(x: np.float32, y: np.float32) -> bool:  # std::sort's comparator
        return bool(x > y) if descending else bool(x < y)

    stack = [(0, n, 2 * int(math.log2(n)) if n else 0)]  # std::__lg(n) * 2
    while stack:
        first, last, depth = stack.pop()
        if not cut_inside(first, last):
            continue
        if last - first <= THRESHOLD:
            seg = a[first:last]
            order = np.argsort(-seg if descending else seg, kind="stable")
            a[first:last], idx[first:last] = seg[order], idx[first:last][order]
            continue
        if depth == 0:
            return None
        depth -= 1
        _median_to_first(a, idx, first, first + 1, first + (last - first) // 2, last - 1, before)
        x, xi = a[first + 1 : last], idx[first + 1 : last]
        stack += [(f, e, depth) for f, e in _partition(x, xi, a[first], descending, first + 1, (lo, hi), cut_inside)]
    keep = np.zeros(n, dtype=bool)
    keep[idx[lo:hi]] = True
    return keep


def _partition(
    x: np.ndarray,
    xi: np.ndarray,
    pivot: np.float32,
    descending: bool,
    offset: int,
    window: tuple[int, int],
    cut_inside: Callable[[int, int], bool],
) -> list[tuple[int, int]]:
    """std::__unguarded_partition of `x` (the range after its pivot, at `offset`; `xi` its entries'
    indices) around `pivot`, written only into the parts that are followed (`cut_inside`) or held by
    the slice `window`; returns the parts to follow (absolute ranges; the left one starts with the pivot)."""
    lo, hi = window
    # the entries that stop the left scan (not before the pivot) and the right scan (pivot not before them)
    left, right = (x <= pivot, x >= pivot) if descending else (x >= pivot, x <= pivot)
    nl, nr = _block_counts(left), _block_counts(right)
    swaps = _swap_count(left, right, nl, nr)
    cut = min(_nth_true(left, swaps, nl), _nth_true_from_right(right, swaps - 1, nr) if swaps else x.size)
    parts = [(offset - 1, offset + cut), (offset + cut, offset + x.size)]
    follow = [cut_inside(f, e) for f, e in parts]
    # a part with no boundary inside is read only as a set, and only if the slice holds it
    write = [fo or (lo <= f and e <= hi) for fo, (f, e) in zip(follow, parts, strict=True)]
    if swaps and (write[0] or write[1]):
        # the i-th left stopper (ascending) trades places with the i-th right stopper (descending)
        ls = np.flatnonzero(left[:cut])
        rs = np.flatnonzero(right[cut:])[-swaps:][::-1] + cut
        if write[0] and write[1]:
            lv, li = x[ls], xi[ls]
            x[ls], xi[ls] = x[rs], xi[rs]
            x[rs], xi[rs] = lv, li
        elif write[0]:
            x[ls], xi[ls] = x[rs], xi[rs]
        else:
            x[rs], xi[rs] = x[ls], xi[ls]
    return [p for p, fo in zip(parts, follow, strict=True) if fo]


def _median_to_first(
    a: np.ndarray, idx: np.ndarray, result: int, x: int, y: int, z: int, before: Callable[[Any, Any], bool]
) -> None:
    """std::__move_median_to_first."""

    def swap(i: int, j: int) -> None:
        a[i], a[j] = a[j], a[i]
        idx[i], idx[j] = idx[j], idx[i]

    if before(a[x], a[y]):
        if before(a[y], a[z]):
            swap(result, y)
        elif before(a[x], a[z]):
            swap(result, z)
        else:
            swap(result, x)
    elif before(a[x], a[z]):
        swap(result, x)
    elif before(a[y], a[z]):
        swap(result, z)
    else:
        swap(result, y)


def _block_counts(mask: np.ndarray) -> np.ndarray:
    """The Trues in each BLOCK entries of `mask` (the last block may be shorter)."""
    full = mask.size // BLOCK * BLOCK
    counts = np.count_nonzero(mask[:full].reshape(-1, BLOCK), axis=1)
    return np.append(counts, np.count_nonzero(mask[full:])) if full < mask.size else counts


def _swap_count(left: np.ndarray, right: np.ndarray, nl: np.ndarray, nr: np.ndarray) -> int:
    """The Hoare partition's swaps: the number of i with L_i < R_i (L the left stoppers' positions
    ascending, R the right stoppers' descending) = max over j of min(#left in [0, j), #right in [j, m)).
    `nl`, `nr`: the masks' block counts."""
    m = left.size
    if m == 0:
        return 0
    cl = np.concatenate(([0], np.cumsum(nl)))  # at each block's start, and at the end
    cr = np.concatenate((np.cumsum(nr[::-1])[::-1], [0]))
    b = int(np.searchsorted(cl - cr, 0, side="right")) - 1  # the last block start where cl <= cr
    best = min(int(cl[b]), int(cr[b]))
    if b + 1 < cl.size:
        s, e = b * BLOCK, min((b + 1) * BLOCK, m)
        inside = np.minimum(cl[b] + np.cumsum(left[s:e], dtype=np.int64), cr[b] - np.cumsum(right[s:e], dtype=np.int64))
        best = max(best, int(inside.max()))
    return best


def _nth_true(mask: np.ndarray, i: int, counts: np.ndarray) -> int:
    """Position of `mask`'s i-th (from 0) True, or its size if it has fewer (`counts`: its block counts)."""
    total = np.cumsum(counts)
    b = int(np.searchsorted(total, i + 1))
    if b >= counts.size:
        return mask.size
    return b * BLOCK + int(np.flatnonzero(mask[b * BLOCK : (b + 1) * BLOCK])[i - int(total[b] - counts[b])])


def _nth_true_from_right(mask: np.ndarray, i: int, counts: np.ndarray) -> int:
    """Position of `mask`'s i-th (from 0) True counted from the end, or -1."""
    total = np.cumsum(counts[::-1])
    b = int(np.searchsorted(total, i + 1))  # blocks from the end
    if b >= counts.size:
        return -1
    block = counts.size - 1 - b
    inside = np.flatnonzero(mask[block * BLOCK : (block + 1) * BLOCK])
    return block * BLOCK + int(inside[::-1][i - int(total[b] - counts[block])])


@cache
def agrees_with_torch() -> bool:
    """Whether `_slice` reproduces this torch's CPU sort: checked on tie-heavy draws, each order,
    slices through runs of ties (a few milliseconds, once per process)."""
    g = torch.Generator().manual_seed(0)
    for n, levels in ((5000, 3), (3000, 40), (700, 2), (40, 5)):
        x = torch.randint(0, levels, (n,), generator=g).float()
        for descending in (True, False):
            for lo, hi in ((n // 3, n - n // 5), (0, n // 2 + 1)):
                want = np.zeros(n, dtype=bool)
                want[torch.sort(x, descending=descending).indices[lo:hi].numpy()] = True
                got = _slice(x.numpy(), lo, hi, descending)
                if got is None or not np.array_equal(got, want):
                    return False
    return True
