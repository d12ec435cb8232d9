"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774), Algorithm 1.

For a Linear W [out, in] with Hessian H = 2/n · X Xᵀ of its inputs:
- dampen: H + λI with λ = 1% of mean(diag H); dead inputs (H_jj = 0) get H_jj = 1 and W_:j = 0;
- U = Cholesky(H⁻¹) (upper): row j of U gives the OBS update for column j with columns < j fixed;
- columns in blocks of B = 128: the mask of the block is chosen once (unstructured) by the OBS
  saliency w²/U_jj², or per group of M columns (N:M) just before the group is reached;
- for each column j: q = w masked, err = (w − q)/U_jj, W_:,j: −= err · U_j,j: (OBS compensation);
- after a block, the remaining columns get the block's accumulated error at once (lazy batch update).

With a `guide` C ([out, in], ≥ 0: an extra curvature per weight, e.g. half a domain Fisher
diagonal) and a weight a, the mask is chosen by w² · (a/U_jj² + C_ij) instead: the layer's OBS error
plus an end-to-end error C·w² of the same weight, both for its current (compensated) value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from carve.errors import UsageError
from carve.masks.select import keep_mask, nm_mask
from carve.scorers.registry import register
from carve.scorers.stats import Hessian

BLOCK_SIZE = 128
PERCDAMP = 0.01
MAX_DAMP_RETRIES = 6


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """LAPACK's factorizations on one CPU thread: their float sums, and the sweep's choices after
    them, then do not depend on the thread count (MKL's strict reproducibility mode covers the
    matrix products, not the factorizations).  The factorizations are a small part of a sweep: three
    per distinct Hessian, O(in³) against the sweep's O(out · in²)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def inverse_hessian_cholesky(H: torch.Tensor, percdamp: float = PERCDAMP) -> tuple[torch.Tensor, dict[str, Any]]:
    """Upper Cholesky factor of (H + λI)⁻¹.  If H + λI is not positive definite (rank-deficient
    calibration, fp noise), λ grows ×10 per retry rather than crashing; the info says so."""
    with _one_thread() if H.device.type == "cpu" else contextlib.nullcontext():
        return _inverse_hessian_cholesky(H, percdamp)


def _inverse_hessian_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, dict[str, Any]]:
    # one [in, in] float32 matrix besides H: the damped copy, factored, inverted and factored again
    # in place (LAPACK's own way; for a 6912-wide down_proj each copy is 191 MB)
    diag = torch.diag(H).float()
    dead = diag == 0
    diag[dead] = 1.0
    scale = torch.mean(diag).abs().item()
    damp = percdamp * scale
    info = torch.empty((), dtype=torch.int32, device=H.device)
    for attempt in range(MAX_DAMP_RETRIES + 1):
        A = H.float().clone()
        A.diagonal().copy_(diag + damp)
        torch.linalg.cholesky_ex(A, out=(A, info))  # L
        if info.item() == 0:
            torch.cholesky_inverse(A, out=A)  # (H + λI)⁻¹
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))  # U
            if info.item() == 0 and torch.isfinite(A).all():
                return A, {"damp": damp, "damp_retries": attempt, "dead_inputs": int(dead.sum())}
        del A
        damp = max(damp * 10.0, 1e-6 * scale)
    raise RuntimeError("Hessian is not positive definite even after growing the damping 1e6-fold")


def obs_saliency(
    W: torch.Tensor, U_diag: torch.Tensor, guide: torch.Tensor | None = None, obs_weight: float = 1.0
) -> torch.Tensor:
    """w² / [H⁻¹]²_jj with [H⁻¹]_jj taken from the Cholesky factor's diagonal (Algorithm 1); with
    `guide` C (same shape as W), w² · (a/[H⁻¹]²_jj + C), a = `obs_weight`."""
    d2 = U_diag.float().unsqueeze(0) ** 2
    if guide is None:
        return W.float() ** 2 / d2
    return W.float() ** 2 * (obs_weight / d2 + guide.float())


@register(
    "sparsegpt",
    paper="Frantar & Alistarh, SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot (2023)",
    url="https://arxiv.org/abs/2301.00774",
    statistic=Hessian,
    granularity="matrix",
    prune=lambda W, stat, s, g, nm: sparsegpt_prune(W, stat.H, s, g, nm, factor=factor_of(stat)),
)
def sparsegpt_score(W: torch.Tensor, stat: Hessian) -> torch.Tensor:
    """The OBS saliency of each weight before any update (what the first block's mask uses)."""
    U, _ = factor_of(stat)
    return obs_saliency(W.detach(), torch.diag(U))


def factor_of(stat: Hessian) -> tuple[torch.Tensor, dict[str, Any]]:
    if "inverse_cholesky" not in stat.cache:
        stat.cache["inverse_cholesky"] = inverse_hessian_cholesky(stat.H)
    return stat.cache["inverse_cholesky"]


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    granularity: str = "matrix",
    nm: tuple[int, int] | None = None,
    blocksize: int = BLOCK_SIZE,
    percdamp: float = PERCDAMP,
    factor: tuple[torch.Tensor, dict[str, Any]] | None = None,
    keep: torch.Tensor | None = None,
    guide: torch.Tensor | None = None,
    obs_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Prune and reconstruct W; returns (new W in W's dtype, keep mask, info).

    `granularity` applies inside each 128-column block: "matrix" removes `sparsity` of the
    block's weights (the paper), "row" removes it from each row of the block.  With `keep`
    ([out, in] bool), that mask is imposed and only the OBS compensation is computed; with
    `guide` ([out, in] curvature), the mask is chosen by obs_saliency(W, U_jj, guide, obs_weight)."""
    if granularity not in ("row", "matrix"):
        raise UsageError(f"sparsegpt supports granularity row or matrix, not {granularity!r}")
    out_dtype = W.dtype
    # work on Wᵀ so that the column walked by the inner loop is a contiguous row in memory
    Wt = W.detach().float().t().contiguous()
    H = H.to(Wt.device)
    cols = Wt.shape[0]
    Wt[torch.diag(H) == 0] = 0
    U, info = factor if factor is not None else inverse_hessian_cholesky(H, percdamp)
    U = U.to(Wt.device)
    keep_t = torch.ones_like(Wt, dtype=torch.bool) if keep is None else keep.t().to(Wt.device, torch.bool)
    fixed = keep is not None
    guide_t = None if guide is None else guide.detach().float().t().to(Wt.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wt[i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diag(U1)
        C1 = None if guide_t is None else guide_t[i1:i2]
        Err1 = torch.zeros_like(W1)
        if fixed:
            keep1 = keep_t[i1:i2]
        elif nm is None:
            keep1 = keep_mask(obs_saliency(W1.t(), d1, _t(C1), obs_weight), sparsity, granularity).t().contiguous()
        else:
            keep1 = torch.ones_like(W1, dtype=torch.bool)
        # per column i: err = (w - q) / U_ii with q = w·keep, i.e. w · (1 - keep) / U_ii; the
        # later columns of the block get −U_i,j · err (one rank-1 update).  `scale` holds
        # (1 - keep) / U_ii per weight, so each column costs two kernels.  Column i is not read or
        # written after its own step, so it becomes q (zeros exact) for the whole block at once.
        keepf = keep1.to(W1.dtype)
        scale = (1 - keepf) / d1.unsqueeze(1)
        rows, errs, us = W1.unbind(0), Err1.unbind(0), U1.unbind(0)
        for i in range(i2 - i1):
            if not fixed and nm is not None and i % nm[1] == 0:
                g = slice(i, i + nm[1])
                keep1[g] = nm_mask(obs_saliency(W1[g].t(), d1[g], _t(C1, g), obs_weight), *nm).t()
                keepf[g] = keep1[g]
                scale[g] = (1 - keepf[g]) / d1[g].unsqueeze(1)
            torch.mul(rows[i], scale[i], out=errs[i])
            W1[i + 1 :].addr_(us[i][i + 1 :], errs[i], alpha=-1)
        Wt[i1:i2] = W1.mul_(keepf)
        keep_t[i1:i2] = keep1
        Wt[i2:].sub_(U[i1:i2, i2:].t() @ Err1)
    keep = keep_t.t()
    return Wt.t().to(out_dtype).masked_fill_(~keep.bool(), 0), keep, info  # +0.0, not -0.0, where removed


def _t(C: torch.Tensor | None, rows: slice = slice(None)) -> torch.Tensor | None:
    """A transposed guide's rows back in [out, in] layout (None stays None)."""
    return None if C is None else C[rows].t()
