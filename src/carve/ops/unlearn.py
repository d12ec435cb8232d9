"""Unlearning objectives and the weights they may change.

A training row is a forget block and a retain block side by side, led by the forget block's index
(`pack_rows`): one tensor for the shared masked training loop (ops.train), which hands each
micro-batch of rows to the objective.  Per row, with ℓ(x) the mean next-token NLL of block x and
S(x) its sum over the block's predicted tokens:

- `ga` (gradient ascent):   −ℓ(forget)
- `graddiff`:              −ℓ(forget) + α·R(retain)
- `npo` (Zhang et al. 2024, arXiv 2404.05868):
      −(2/β)·log σ(β·(S_θ(forget) − S_ref(forget))) + α·R(retain)
  S_ref: the original model's summed NLL of the same block, computed once before training (the
  reference needs no copy of the model); at the start the term is (2/β)·log 2.
- R: `nll`, ℓ(retain); or `kl`, the mean over positions of KL(p_ref ‖ p_θ) on the retain block
  against the original model (a frozen copy is kept for it).

As OpenUnlearning's GradDiff and NPO (forget weight 1, retain weight α).

Masks: `none` trains every targeted weight; `salun`, `wagle`, `fisher`, `random` and
`importance:FILE` keep the top `density` share of the targeted weights over all matrices at once
(the papers select globally) by their importance source's scores (importance/gradient.py: SalUn
|∇ℓ_f|, WAGLE's attribution, carve's empirical-Fisher importance ½·E[g²]·θ² of the forget blocks;
seeded uniform scores; a saved ImportanceMap).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from carve.engines.gradient import next_token_loss
from carve.errors import UsageError
from carve.importance import compute_importance
from carve.importance.gradient import kl_to
from carve.masks.mask import ImportanceMap, select_mask
from carve.models.experts import target_weights
from carve.ops.finetune import load_importance
from carve.settings import Targets

OBJECTIVES = ("ga", "graddiff", "npo")
RETAIN_LOSSES = ("nll", "kl")
MASKS = ("salun", "wagle", "fisher", "random", "none", "importance:FILE")


def pack_rows(forget: torch.Tensor, retain: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """`n` training rows [index, forget block, retain block]: the forget blocks in a seeded order
    epoch after epoch, each beside a seeded random retain block."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(len(forget), generator=gen) for _ in range(-(-n // len(forget)))])[:n]
    partner = torch.randint(0, len(retain), (n,), generator=gen)
    return torch.cat([order[:, None], forget[order], retain[partner]], dim=1)


def unpack_rows(rows: torch.Tensor, block_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rows[:, 0], rows[:, 1 : 1 + block_len], rows[:, 1 + block_len :]


def summed_nll(model: nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    """S(x) per block: the next-token NLL summed over the block's predicted tokens, [n]."""
    per = [next_token_loss(model, b[None]) * (b.numel() - 1) for b in blocks]
    return torch.stack(per)


@dataclass
class Objective:
    """The unlearning loss of a micro-batch of packed rows (see the module docstring)."""

    name: str
    block_len: int
    alpha: float = 1.0
    beta: float = 0.1
    retain_loss: str = "nll"
    reference_nll: torch.Tensor | None = None  # npo: S_ref of every forget block, by index
    reference: nn.Module | None = None  # kl: the original model

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise UsageError(f"objective {self.name!r} is not one of {', '.join(OBJECTIVES)}")
        if self.retain_loss not in RETAIN_LOSSES:
            raise UsageError(f"retain loss {self.retain_loss!r} is not one of {', '.join(RETAIN_LOSSES)}")
        if self.name == "npo" and self.reference_nll is None:
            raise ValueError("npo needs the reference model's summed NLL of the forget blocks")
        if self.name != "ga" and self.retain_loss == "kl" and self.reference is None:
            raise ValueError("the kl retain loss needs the reference model")

    def forget_term(self, model: nn.Module, index: torch.Tensor, forget: torch.Tensor) -> torch.Tensor:
        if self.name != "npo":
            return -next_token_loss(model, forget)
        assert self.reference_nll is not None
        ratio = summed_nll(model, forget) - self.reference_nll[index.cpu()].to(forget.device)
        return -(2 / self.beta) * F.logsigmoid(self.beta * ratio).mean()

    def retain_term(self, model: nn.Module, retain: torch.Tensor) -> torch.Tensor:
        if self.retain_loss == "nll":
            return next_token_loss(model, retain)
        assert self.reference is not None
        return kl_to(self.reference)(model, retain)

    def __call__(self, model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        index, forget, retain = unpack_rows(rows, self.block_len)
        loss = self.forget_term(model, index, forget)
        if self.name != "ga" and self.alpha:
            loss = loss + self.alpha * self.retain_term(model, retain)
        return loss


@dataclass(frozen=True)
class MaskSpec:
    """A parsed `--mask` value."""

    kind: str  # salun | wagle | random | none | importance
    path: str | None = None

    @classmethod
    def parse(cls, spec: str) -> MaskSpec:
        kind, _, path = spec.partition(":")
        if kind == "importance":
            if not path:
                raise UsageError("--mask importance:FILE needs the file, e.g. importance:out/forget-fisher.safetensors")
            if not Path(path).expanduser().is_file():
                raise UsageError(f"importance file {path!r} does not exist")
            return cls(kind, path)
        if kind not in ("salun", "wagle", "fisher", "random", "none") or path:
            raise UsageError(f"--mask {spec!r} is not one of {', '.join(MASKS)}")
        return cls(kind)


def unlearn_mask(
    model: nn.Module,
    spec: MaskSpec,
    density: float,
    targets: Targets,
    forget: torch.Tensor,
    retain: torch.Tensor,
    *,
    mu: float = 1e-6,
    seed: int = 0,
    model_fingerprint: str | None = None,
) -> dict[str, torch.Tensor | None]:
    """Parameter name -> keep-tensor (True: updated) or None (updated whole) over `targets`."""
    names = target_weights(model, targets)
    if spec.kind == "none":
        return dict.fromkeys(names)
    if spec.kind == "importance":
        assert spec.path is not None
        scores = load_importance(spec.path, model, model_fingerprint)
        missing = sorted(set(names) - set(scores))
        if missing:
            raise UsageError(f"importance map {spec.path!r} has no scores for {missing[0]} ({len(missing)} missing)")
        scores = ImportanceMap({n: scores[n] for n in names}, scores.meta)
    elif spec.kind == "wagle":
        scores = compute_importance("wagle", model, targets, data=forget, retain=retain, mu=mu)
    elif spec.kind in ("salun", "fisher"):
        scores = compute_importance(spec.kind, model, targets, data=forget)
    else:
        scores = compute_importance("random", model, targets, seed=seed)
    if density >= 1:
        return dict.fromkeys(names)
    return dict(select_mask(scores, 1 - density, "global").items())
