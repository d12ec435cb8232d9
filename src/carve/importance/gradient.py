"""Importance from gradient statistics under a named objective (see engines/gradient.py).

Objectives: "lm", the next-token loss on the data; "kl", KL(teacher ‖ model) of the next-token
distributions against a teacher (the reference model).  The score is the empirical-Fisher error
of moving each weight to its reference point: ½ · E[g²] · (θ − θ_ref)², with θ_ref = 0 (pruning,
OBD with the Fisher as Hessian diagonal) unless a reference model's weights are given as the
point (`at_reference=True`: the error of reverting a task vector).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from carve.engines.gradient import accumulate_gradients, next_token_loss
from carve.errors import UsageError
from carve.importance.registry import importance_source
from carve.scorers.gradient import fisher_score

OBJECTIVES = ("lm", "kl")


def kl_to(teacher: nn.Module) -> Any:
    """loss_fn(model, ids): mean over positions of KL(teacher ‖ model), both on the same ids."""

    def loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(input_ids=ids, use_cache=False).logits.float()
        s = model(input_ids=ids, use_cache=False).logits.float()
        kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none")
        return kl.sum(-1).mean()

    return loss


@importance_source("fisher", scorer="fisher", needs=("data",))
def fisher(
    model: nn.Module,
    linears: dict[str, nn.Module],
    data: torch.Tensor,
    objective: str = "lm",
    teacher: nn.Module | None = None,
    reference: nn.Module | Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """½ · E[g²] · (θ − θ_ref)², g the gradient of `objective` per block of `data`; `reference`:
    a model, or its tensors by parameter name (read one at a time: e.g. a lazy file reader)."""
    if objective not in OBJECTIVES:
        raise UsageError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if objective == "kl" and teacher is None:
        raise UsageError("objective 'kl' needs a teacher model")
    loss_fn = next_token_loss if objective == "lm" else kl_to(teacher)  # type: ignore[arg-type]
    names = [f"{n}.weight" for n in linears]
    stats = accumulate_gradients(model, data, names, ("grad_sq",), loss_fn=loss_fn, desc=f"gradients ({objective})")
    params = dict(model.named_parameters())
    ref = dict(reference.named_parameters()) if isinstance(reference, nn.Module) else reference or {}
    out = {}
    for n in names:  # the fisher scorer's maths, on the distance to the reference point
        delta = params[n].detach().float() - (ref[n].detach().float().to(params[n].device) if n in ref else 0.0)
        out[n] = fisher_score(delta, {"grad_sq": stats.stats["grad_sq"][n]}).cpu()
    return out


def _mean_gradients(model: nn.Module, names: list[str], data: torch.Tensor, desc: str) -> dict[str, torch.Tensor]:
    """The mean next-token-loss gradient per block of `data` for the named parameters (float32)."""
    return accumulate_gradients(model, data, names, ("grad",), desc=desc).stats["grad"]


@importance_source(
    "salun",
    paper="SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency (Fan et al., ICLR 2024)",
    url="https://arxiv.org/abs/2310.12508",
    needs=("data",),
)
def salun(model: nn.Module, linears: dict[str, nn.Module], data: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weight saliency |∇θ ℓ_f|: the magnitude of the forget loss's gradient, `data` the forget
    blocks (the next-token loss; gradient ascent's gradient differs only in sign)."""
    names = [f"{n}.weight" for n in linears]
    return {n: g.abs().cpu() for n, g in _mean_gradients(model, names, data, "gradients (forget)").items()}


@importance_source(
    "wagle",
    paper="WAGLE: Strategic Weight Attribution for Effective and Modular Unlearning in LLMs (Jia et al., NeurIPS 2024)",
    url="https://arxiv.org/abs/2410.17509",
    needs=("data",),
)
def wagle(
    model: nn.Module,
    linears: dict[str, nn.Module],
    data: torch.Tensor,
    retain: torch.Tensor | None = None,
    mu: float = 1e-6,
) -> dict[str, torch.Tensor]:
    """Weight attribution |(θ − ∇θ ℓ_r / μ) ⊙ ∇θ ℓ_f|: the first-order change of the forget loss
    when a weight is attributed away, with the retain loss's optimality condition folded in
    through the Hessian-diagonal constant μ (the paper's 1/γ; its released code's default 1e-6).
    `data`: the forget blocks; `retain`: the retain blocks."""
    if retain is None or not retain.numel():
        raise UsageError("importance source 'wagle' needs retain blocks (retain=...)")
    if mu <= 0:
        raise UsageError(f"wagle's mu must be positive, not {mu}")
    names = [f"{n}.weight" for n in linears]
    forget = _mean_gradients(model, names, data, "gradients (forget)")
    kept = _mean_gradients(model, names, retain, "gradients (retain)")
    params = dict(model.named_parameters())
    return {n: ((params[n].detach().float() - kept[n] / mu) * forget[n]).abs().cpu() for n in names}
