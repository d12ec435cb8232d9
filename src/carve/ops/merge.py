"""Merging task vectors τ_t = θ_t − θ₀, one tensor at a time (docs/methods.md, "carve merge").

Every method but RegMean is: sparsify each τ_t (keep a share `density` of its entries: by magnitude — TIES;
at random, rescaled — DARE; between the top-γ outliers and the bottom — Breadcrumbs; by the
expert's domain importance — carve's importance-guided merge), weight it by w_t, optionally elect a
sign per entry and keep only the agreeing entries (TIES), sum (optionally dividing by the summed
weights of the entries kept), scale by λ and add to θ₀.  TALL masks and Consensus merging then
localize the merged vector per task.  RegMean (`gram_mean`) instead weights each τ_t by the
expert's input Gram matrices: the least-squares merge of the experts' layer outputs; Fisher merging
(`statistic_mean`) by the expert's diagonal Fisher, entry by entry.  The
arithmetic follows mergekit's generalized task arithmetic (float32, the same order of operations),
so the methods both tools have agree to float rounding; deviations are listed in docs/methods.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from carve.errors import UsageError
from carve.ops.sortslice import sort_slice

SPARSIFIERS = ("magnitude", "random", "outliers", "importance")


@dataclass(frozen=True)
class Method:
    """How a merge method treats the task vectors (mergekit's names where it has the method)."""

    sparsify: str | None  # one of SPARSIFIERS, or None: the whole task vector
    consensus: bool  # TIES sign election: keep the entries whose sign agrees with the weighted sum's
    normalize: bool  # divide by the summed weights of the entries kept (mergekit's `normalize`)
    rescale: bool  # rescale what the sparsification kept by default (DARE)
    paper: str
    # the mean weighted by a statistic of each expert where it is known: its Linears' input Gram
    # matrices ("gram": RegMean, `gram_mean`) or its diagonal Fisher ("fisher": `statistic_mean`)
    statistic: str | None = None
    mergekit: bool = True  # mergekit has it (a mergekit config may name it)


METHODS: dict[str, Method] = {
    "task_arithmetic": Method(None, False, False, False, "Ilharco et al. 2023, arXiv 2212.04089"),
    "ties": Method("magnitude", True, True, False, "Yadav et al. 2023, arXiv 2306.01708"),
    "dare_linear": Method("random", False, False, True, "Yu et al. 2024, arXiv 2311.03099"),
    "dare_ties": Method("random", True, False, True, "Yu et al. 2024, arXiv 2311.03099"),
    "breadcrumbs": Method("outliers", False, False, False, "Davari & Belilovsky 2024, arXiv 2312.06795"),
    "breadcrumbs_ties": Method("outliers", True, False, False, "Davari & Belilovsky 2024, arXiv 2312.06795"),
    "importance": Method(
        "importance", True, True, False, "carve: TIES with the expert's domain importance", mergekit=False
    ),
    "regmean": Method(None, False, True, False, "Jin et al. 2023, arXiv 2212.09849", statistic="gram", mergekit=False),
    "fisher": Method(
        None, False, True, False, "Matena & Raffel 2022, arXiv 2111.09832", statistic="fisher", mergekit=False
    ),
}


def top_share(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Keep-mask of the max(1, int(density·n)) largest `scores`: mergekit's magnitude rule, the first k of
    its descending argsort (so the same entries where ties straddle the boundary; `sort_slice`)."""
    if density >= 1:
        return torch.ones_like(scores, dtype=torch.bool)
    return _sort_slice(scores, 0, max(1, int(density * scores.numel())), descending=True)


def between_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs' keep-mask: drop the int(γ·n) largest |τ| and then the smallest, keeping int(density·n)
    (positions [n_bot, n_bot + target) of mergekit's ascending sort, as it slices them; `sort_slice`)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    n = delta.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)  # fewer outliers dropped when the density needs them
    return _sort_slice(delta.abs(), n_bot, n_bot + target, descending=False)


def _sort_slice(values: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    """The entries at positions [lo, hi) of torch's sort of `values` (float32, not stable)."""
    keep = sort_slice(values, lo, hi, descending)
    if keep is None:  # sort_slice cannot follow this sort: the sort itself
        flat = values.reshape(-1).float()
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        keep[torch.sort(flat, descending=descending).indices[lo:hi]] = True
    return keep.reshape(values.shape)


def random_keep(shape: torch.Size | list[int], density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's keep-mask: each entry kept with probability `density` (drop rate p = 1 − density), as
    float32 ones and zeros (the uniforms compared in place: a float factor multiplies twice as fast as a
    bool one, to the same bits)."""
    if density >= 1:
        return torch.ones(shape)
    return torch.rand(shape, generator=generator).lt_(density)


def rescaled(delta: torch.Tensor, keep: torch.Tensor, rule: str, density: float, inplace: bool = False) -> torch.Tensor:
    """τ ⊙ m rescaled: by 1/density (DARE's paper, `inverse`), to τ's L1 norm (mergekit's `l1`) or not
    (`none`).  `inplace`: τ is the caller's temporary, masked and scaled in place (the same bits)."""
    if rule not in ("none", "inverse"):  # l1: Σ|τ| and Σ|τ ⊙ m| = Σ|τ|·m (m is 0 or 1: the same values)
        magnitude = delta.abs()
        before = magnitude.sum()
        after = magnitude.mul_(keep).sum()
        del magnitude
    masked = delta.mul_(keep) if inplace else delta * keep
    if rule == "none":
        return masked
    if rule == "inverse":
        return masked.div_(density) if density < 1 else masked
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked.mul_(before / after)


def total(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ tensors, bit for bit as `torch.stack(tensors).sum(0)` (mergekit's) computes it — a zero, then
    each in order (tests/test_merge.py checks the bits) — without the stacked copy."""
    acc = tensors[0] + 0.0  # 0 + x: as the reduction starts (-0.0 becomes +0.0)
    for t in tensors[1:]:
        acc += t
    return acc


def elect(weighted: list[torch.Tensor]) -> torch.Tensor:
    """TIES' sign election over weighted task vectors: +1 where the sign of their sum is + (a zero sum
    elects +), else −1, as floats (a vector's entries agree where their sign equals it)."""
    return (total(weighted) >= 0).to(weighted[0].dtype).mul_(2).sub_(1)


def combine(
    deltas: list[torch.Tensor], weights: list[float], method: Method, lam: float = 1.0, normalize: bool | None = None
) -> torch.Tensor:
    """The merged task vector of already-sparsified `deltas` with `weights`: (sign election,) sum,
    (normalization,) λ — mergekit's arithmetic on its stacked vectors, one vector at a time."""
    dtype = deltas[0].dtype
    w = [torch.tensor(x, dtype=dtype) for x in weights]
    # (x·1 is x: the same bits)
    weighted = deltas if all(x == 1 for x in weights) else [d * wt for d, wt in zip(deltas, w, strict=True)]
    normalizing = method.normalize if normalize is None else normalize
    if method.consensus:
        # mergekit's 0/1 agreement as floats, multiplied (a float product is several times faster than
        # torch.where on a bool mask), and summed into the running totals one vector at a time from
        # +0 as the stacked sum is: the same bits, NaN and infinities included
        majority = elect(weighted)
        mixed = divisor = torch.zeros(())
        for i, (x, wt) in enumerate(zip(weighted, w, strict=True)):
            agree = (x.sign() == majority).to(dtype)
            kept = x * agree
            share = (agree if weights[i] == 1 else agree.mul_(wt)) if normalizing else None
            mixed = kept.add_(0.0) if i == 0 else mixed.add_(kept)
            if share is not None:
                divisor = share.add_(0.0) if i == 0 else divisor.add_(share)
            del agree, kept, share
        if normalizing:
            divisor += (divisor == 0).to(dtype)  # mergekit's divisor[divisor == 0] = 1 (x + 0 is x for the others)
            mixed = mixed / divisor
    else:
        mixed = total(weighted)
        if normalizing:
            whole = float(torch.tensor(weights, dtype=dtype).sum())  # the same for every entry
            mixed = mixed / (whole if abs(whole) >= 1e-8 else 1.0)
    return mixed * lam if lam != 1 else mixed


def gram_mean(
    deltas: list[torch.Tensor], grams: list[torch.Tensor], weights: list[float], alpha: float = 1.0, rows: int = 4096
) -> torch.Tensor:
    """RegMean's merged task vector (Jin et al. 2023, arXiv 2212.09849): the Δ that best reproduces
    every expert's outputs on its own inputs, argmin Σ_t w_t·||X_t Δᵀ − X_t τ_tᵀ||².

    For a Linear weight [out, in] with each expert's input Gram matrix G_t [in, in] (off-diagonal
    entries scaled by `alpha`: G̃_t = α·G_t + (1 − α)·diag(G_t)): Δ = (Σ w_t τ_t G̃_t)(Σ w_t G̃_t)⁻¹,
    solved in float64 (least squares where Σ w_t G̃_t is singular).  For an embedding [rows, dim]
    with each expert's row (token) frequencies [rows] — a lookup's Gram matrix is diagonal — each row
    is the frequency-weighted mean of the experts' rows, and a row no expert's data used is the plain
    weighted mean (computed `rows` rows at a time: a large vocabulary's float64 copies stay small)."""
    if grams[0].dim() == 1:
        return statistic_mean(deltas, [g[:, None] for g in grams], weights, rows)
    w = torch.tensor(weights, dtype=torch.float64)
    A = torch.zeros_like(grams[0], dtype=torch.float64)
    B = torch.zeros_like(deltas[0], dtype=torch.float64)
    for tau, g, wt in zip(deltas, grams, w.tolist(), strict=True):
        g = g.double()
        if alpha != 1:
            g = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        A += wt * g
        B += wt * (tau.double() @ g)
    try:
        delta = torch.linalg.solve(A, B.t()).t()  # Δ·A = B, A symmetric
    except torch.linalg.LinAlgError:
        delta = torch.linalg.lstsq(A, B.t(), driver="gelsd").solution.t()
    return delta.to(deltas[0].dtype)


def statistic_mean(
    deltas: list[torch.Tensor], stats: list[torch.Tensor], weights: list[float], rows: int = 4096
) -> torch.Tensor:
    """Σ_t w_t·F_t·τ_t / Σ_t w_t·F_t entry by entry, for per-expert statistics F_t ≥ 0 that
    broadcast against the task vectors (the same shape: Fisher merging's diagonal Fisher; [rows, 1]:
    RegMean's token frequencies of an embedding's rows); where Σ_t w_t·F_t is 0 (no expert's data
    reached the entry), the plain weighted mean Σ_t w_t·τ_t / Σ_t w_t.  In float64, `rows` rows at a
    time (a large vocabulary's float64 copies stay small)."""
    w = torch.tensor(weights, dtype=torch.float64)
    out = torch.empty_like(deltas[0])
    for a in range(0, len(out), rows):
        taus = torch.stack([d[a : a + rows].double() for d in deltas])  # [tasks, rows, ...]
        wt = w.view(-1, *[1] * (taus.dim() - 1))
        f = torch.stack([s[a : a + rows].double().expand_as(taus[0]) for s in stats]) * wt
        seen = f.sum(0)
        plain = (taus * wt).sum(0) / w.sum()
        mixed = (taus * f).sum(0) / seen.clamp_min(torch.finfo(torch.float64).tiny)
        out[a : a + rows] = torch.where(seen > 0, mixed, plain)
    return out


def sparsified(
    delta: torch.Tensor,
    method: Method,
    density: float,
    *,
    gamma: float = 0.01,
    generator: torch.Generator | None = None,
    importance: torch.Tensor | None = None,
    rescale: str = "none",
    drawn: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """One task vector after the method's sparsification (`drawn`: DARE's keep-mask, drawn ahead
    from `generator` in the same order; else it is drawn here; `inplace`: `delta` is the caller's
    temporary and may be overwritten)."""
    if method.sparsify is None or density >= 1:
        return delta
    if method.sparsify == "magnitude":
        keep = top_share(delta.abs(), density)
    elif method.sparsify == "outliers":
        keep = between_outliers(delta, density, gamma)
    elif method.sparsify == "importance":
        if importance is None:
            raise UsageError("the importance-guided merge needs each expert's importance map (--importance)")
        keep = top_share(importance, density)
    elif drawn is not None:
        keep = drawn
    else:
        assert generator is not None
        keep = random_keep(delta.shape, density, generator)
    return rescaled(delta, keep, rescale, density, inplace)


def tall_mask(task: torch.Tensor, merged: torch.Tensor, lam: float) -> torch.Tensor:
    """TALL's mask of one task (Wang et al. 2024, arXiv 2405.07813): m_t = 1{|τ_t| ≥ λ_t·|τ_MTL − τ_t|}."""
    return task.abs() >= lam * (merged - task).abs()


def consensus_mask(masks: list[torch.Tensor], at_least: int) -> torch.Tensor:
    """Consensus merging: the entries at least `at_least` of the tasks' TALL masks select."""
    return torch.stack(masks).sum(dim=0) >= at_least
