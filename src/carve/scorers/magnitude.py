"""Magnitude pruning: keep the largest |W| (the data-free baseline of every pruning paper)."""

from __future__ import annotations

from typing import Any

import torch

from carve.scorers.registry import register


@register(
    "magnitude",
    paper="Han et al., Learning both Weights and Connections for Efficient Neural Networks (2015)",
    url="https://arxiv.org/abs/1506.02626",
    granularity="matrix",
)
def magnitude_score(W: torch.Tensor, stat: Any = None) -> torch.Tensor:
    return W.detach().abs().float()
