"""Knowledge distillation loss and masked (sparsity-preserving) updates.

Loss per token position t with a next token (Hinton et al. 2015, arXiv 1503.02531; Minitron uses
the logit term alone):

    L = kd_weight · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) + lm_weight · CE(z_s, next token)

averaged over positions; z_t teacher logits, z_s student logits, T the temperature (the T² keeps
the gradient scale independent of T).  `model_distill_loss` computes it from the two models over
chunks of positions, so a large vocabulary's logits never exist for a whole block at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from carve.engines.gradient import head_as_identity, plain_output_head
from carve.models.arch import all_prunable_linears
from carve.models.experts import expert_weights


def _loss_sum(
    s: torch.Tensor, t: torch.Tensor | None, target: torch.Tensor, temperature: float, kd_weight: float,
    lm_weight: float,
) -> torch.Tensor:  # fmt: skip
    """The loss above summed over positions: `s`, `t` student and teacher float logits [positions,
    vocab] (`t` unused without the KD term), `target` the next tokens."""
    total = torch.zeros((), device=s.device)
    if kd_weight:
        assert t is not None
        kl = F.kl_div(
            F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True, reduction="sum"
        )
        total = total + kd_weight * temperature**2 * kl
    if lm_weight:
        total = total + lm_weight * F.cross_entropy(s, target.reshape(-1), reduction="sum")
    return total


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    ids: torch.Tensor,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    lm_weight: float = 0.0,
) -> torch.Tensor:
    """The loss above for [batch, length, vocab] logits of `ids` [batch, length]; the last
    position of each row (no next token) is left out of both terms."""
    s = student_logits[:, :-1].float().flatten(0, 1)
    t = teacher_logits[:, :-1].float().flatten(0, 1) if kd_weight else None
    return _loss_sum(s, t, ids[:, 1:], temperature, kd_weight, lm_weight) / s.shape[0]


def model_distill_loss(
    student: nn.Module,
    teacher: nn.Module,
    ids: torch.Tensor,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    lm_weight: float = 0.0,
    chunk: int = 128,
) -> torch.Tensor:
    """`distill_loss` of the two models on `ids`, with both heads and the loss run over `chunk`
    positions at a time under activation checkpointing (the teacher's head chunk is recomputed in
    the backward pass): the full-vocabulary logits of a block never exist at once.  Models with a
    transform after the head fall back to full logits."""
    s_head, t_head = plain_output_head(student), plain_output_head(teacher)
    if s_head is None or t_head is None or ids.shape[1] - 1 <= chunk:
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        s_logits = student(input_ids=ids, use_cache=False).logits
        return distill_loss(s_logits, t_logits, ids, temperature, kd_weight, lm_weight)
    with torch.no_grad(), head_as_identity(t_head):
        t_hidden = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
    with head_as_identity(s_head):
        s_hidden = student(input_ids=ids, use_cache=False).logits[:, :-1]
    targets = ids[:, 1:]

    def part(h_s: torch.Tensor, h_t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = t_head(h_t).float().flatten(0, 1) if kd_weight else None
        return _loss_sum(s_head(h_s).float().flatten(0, 1), t, target, temperature, kd_weight, lm_weight)

    parts = zip(s_hidden.split(chunk, 1), t_hidden.split(chunk, 1), targets.split(chunk, 1), strict=True)
    loss = sum(checkpoint(part, a, b, c, use_reentrant=False) for a, b, c in parts)
    return loss / targets.numel()


def sparsity_masks(model: nn.Module, min_zero_share: float = 0.01) -> dict[str, torch.Tensor]:
    """Keep-masks (weight != 0) of the decoder Linear weights, and an MoE's fused 3-D expert weights,
    that are pruned (at least `min_zero_share` exact zeros); updates multiplied by them keep the
    model's sparsity."""
    out = {}
    weights = {f"{name}.weight": lin.weight for name, lin in all_prunable_linears(model).items()}
    for name, w in (weights | expert_weights(model)).items():
        assert isinstance(w, torch.Tensor)
        keep = w.detach() != 0
        if 1 - keep.float().mean().item() >= min_zero_share:
            out[name] = keep
    return out


@torch.no_grad()
def reapply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        params[name].masked_fill_(~keep.to(params[name].device, torch.bool), 0)
