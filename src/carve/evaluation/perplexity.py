"""Perplexity by DESIGN.md's protocol: exp(mean token NLL) over non-overlapping held-out blocks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from carve.progress import progress


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 2, desc: str = "perplexity") -> float:
    """exp of the mean next-token NLL over all predicted tokens of `blocks` [n, L]
    (each block scored on its own: L-1 predictions per block)."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in progress(blocks.split(batch_size), desc, total=math.ceil(len(blocks) / batch_size)):
        ids = batch.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
        del logits
    return math.exp(total_nll / total_tokens)
