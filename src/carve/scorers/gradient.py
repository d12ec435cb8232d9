"""Gradient-based importance, from the gradient engine's per-weight statistics.

- taylor (Molchanov et al. 2019, first order): |ḡ ⊙ θ|, the change of the calibration loss when
  a weight is set to zero, to first order (ḡ: full-batch mean gradient).
- fisher (empirical-Fisher second order, as in Optimal Brain Damage with the Fisher for the
  Hessian diagonal): ½ · E[g²] ⊙ θ², E over micro-batches.
- dual (D-Pruner, Zhang et al. 2024): the domain term D = E_t |−g̃_t θ + ½ (g̃_t θ)²| on the refined
  gradient g̃ (domain loss gradient, plus 2λĜ(θ − θ₀) once optimizer steps have moved θ), plus
  λ · mean(D) · Ĝ, where Ĝ = G / mean(G) is the general OBS importance G = w²/[H⁻¹]²_jj
  (open-domain calibration, layer-wise engine) rescaled per matrix.  See docs/methods.md for how
  this follows the paper and where it deviates.
- dual-obs (carve; D-Pruner's two terms inside SparseGPT's sweep): the importance is the domain
  Fisher term ½ · E[g²] ⊙ θ²; ops.prune.guided_sparsegpt then chooses the mask during SparseGPT's
  OBS sweep by that end-to-end domain error plus λ times the layer's OBS error (Hessian from a
  domain/general mix), both for the weights' current values.
"""

from __future__ import annotations

from typing import Any

import torch

from carve.scorers.registry import register


@register(
    "taylor",
    paper="Molchanov et al., Importance Estimation for Neural Network Pruning (2019): first-order Taylor",
    url="https://arxiv.org/abs/1906.10771",
    gradient=("grad_weight",),
)
def taylor_score(W: torch.Tensor, stats: dict[str, Any]) -> torch.Tensor:
    return stats["grad_weight"].float().abs()


@register(
    "fisher",
    paper="LeCun et al., Optimal Brain Damage (1990), with the empirical Fisher as Hessian diagonal",
    url="https://proceedings.neurips.cc/paper/1989/hash/6c9882bbac1c7093bd25041881277658-Abstract.html",
    gradient=("grad_sq",),
)
def fisher_score(W: torch.Tensor, stats: dict[str, Any]) -> torch.Tensor:
    return 0.5 * stats["grad_sq"].float() * W.detach().float() ** 2


def normalized(t: torch.Tensor) -> torch.Tensor:
    """t / mean(t) (a matrix of zeros stays zeros)."""
    m = t.float().mean()
    return t.float() / m if m > 0 else torch.zeros_like(t, dtype=torch.float32)


def dual_combine(domain: torch.Tensor, general: torch.Tensor, lam: float) -> torch.Tensor:
    """D + λ · mean(D) · G/mean(G): λ = 1 gives the general term the domain term's mean weight."""
    return domain.float() + lam * domain.float().mean() * normalized(general)


@register(
    "dual",
    paper="Zhang et al., Pruning as a Domain-specific LLM Extractor (D-Pruner, NAACL Findings 2024)",
    url="https://arxiv.org/abs/2405.06275",
    gradient=("taylor2_step",),
    needs_general=True,
)
def dual_score(W: torch.Tensor, stats: dict[str, Any]) -> torch.Tensor:
    return dual_combine(stats["taylor2_step"], stats["general"], stats["lambda"])


@register(
    "dual-obs",
    paper="carve: D-Pruner's general + domain importance (arXiv 2405.06275) chosen inside SparseGPT's OBS sweep",
    url="https://arxiv.org/abs/2405.06275",
    gradient=("grad_sq",),
    granularity="matrix",
    sweep=True,
    scores_as="fisher",
)
def dual_obs_score(W: torch.Tensor, stats: dict[str, Any]) -> torch.Tensor:
    """The domain term: empirical-Fisher error ½·E[g²]·θ² (the sweep adds the OBS term)."""
    return fisher_score(W, stats)
