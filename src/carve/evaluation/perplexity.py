"""Perplexity by DESIGN.md's protocol: exp(mean token NLL) over non-overlapping held-out blocks.

The output head and the cross-entropy run over `CHUNK` positions at a time (as the gradient
engine's loss), so the full-vocabulary logits of a whole batch never exist at once: for a 262k
vocabulary (Gemma 3) two 512-token blocks' float32 logits are 1 GiB, and their shifted copy and
log-softmax as much again each.  Models with a transform after the head (Gemma 2's soft-capping,
Cohere's logit scale) or without a findable head are scored from their full logits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from carve import distributed
from carve.engines.gradient import head_as_identity, plain_output_head
from carve.models.load import first_parameter
from carve.progress import progress

CHUNK = 128  # positions per head + cross-entropy


@torch.no_grad()
def nll_sum(model: nn.Module, ids: torch.Tensor, chunk: int = CHUNK) -> float:
    """Sum over the rows of `ids` [b, L] of the NLL of each token given those before it (L-1
    predictions per row)."""
    head = plain_output_head(model)
    if head is None:
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
    with head_as_identity(head):
        hidden = model(input_ids=ids, use_cache=False).logits[:, :-1]  # the final hidden states
    total = 0.0
    for a in range(0, hidden.shape[1], chunk):
        logits = head(hidden[:, a : a + chunk]).float()
        target = ids[:, 1 + a : 1 + a + chunk]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").item()
    return total


def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 2, desc: str = "perplexity") -> float:
    """exp of the mean next-token NLL over all predicted tokens of `blocks` [n, L]
    (each block scored on its own: L-1 predictions per block).  Under torch.distributed each rank
    scores batches rank, rank+N, ... and the sums are all-reduced (float64)."""
    device = first_parameter(model).device
    total_nll, total_tokens = 0.0, 0
    batches = list(blocks.split(batch_size))[distributed.rank() :: distributed.world()]
    for batch in progress(batches, desc, total=len(batches)):
        ids = batch.to(device)
        total_nll += nll_sum(model, ids)
        total_tokens += ids[:, 1:].numel()
    return math.exp(distributed.sum_float(total_nll) / distributed.sum_float(float(total_tokens)))
