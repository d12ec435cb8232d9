"""Wanda (Sun et al. 2023, arXiv 2306.11695), eq. 1: S_ij = |W_ij| · ||X_j||₂, compared
within each output row."""

from __future__ import annotations

import torch

from carve.scorers.registry import register
from carve.scorers.stats import RowNorms


@register(
    "wanda",
    paper="Sun et al., A Simple and Effective Pruning Approach for Large Language Models (Wanda, 2023)",
    url="https://arxiv.org/abs/2306.11695",
    statistic=RowNorms,
    granularity="row",
)
def wanda_score(W: torch.Tensor, stat: RowNorms) -> torch.Tensor:
    return W.detach().abs().float() * stat.norms.to(W.device).unsqueeze(0)
