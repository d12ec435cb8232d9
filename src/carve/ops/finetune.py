"""What a sparse fine-tune trains: a trainable Mask from an importance source, a saved map or
mask, or the dense baselines (every parameter; LoRA adapters with a matched trainable count).

Sparse kinds keep the top `density` share of each targeted matrix by its score
(`select_mask(scores, 1 - density, "matrix")`, as LIFT selects per matrix):
- `lift`: |W_r|, the rank-r approximation's magnitudes (principal weights, arXiv 2506.00772);
- `magnitude`: |W|;  `random`: seeded uniform scores;
- `fisher`: the domain's empirical-Fisher importance ½·E[g²]·θ², computed on (up to 64 of) the
  training blocks themselves: fine-tuning where the domain lives, in one command;
- `importance:FILE`: an ImportanceMap (e.g. `carve extract --method fisher --save-importance`),
  fine-tuning where the domain lives;
- `mask:FILE`: a saved Mask, as it is.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carve.errors import UsageError
from carve.importance import compute_importance
from carve.masks.mask import ImportanceMap, Mask, select_mask
from carve.models.arch import weight_matrix
from carve.models.experts import expert_weights, target_weights, unfused
from carve.settings import DEFAULT_TARGETS, Targets

SPARSE_KINDS = ("lift", "fisher", "magnitude", "random")
FISHER_BLOCKS = 64  # training blocks the `fisher` kind's gradient pass reads
KINDS = (*SPARSE_KINDS, "importance:FILE", "mask:FILE", "full", "lora")


@dataclass(frozen=True)
class Trainable:
    """A parsed `--trainable` value."""

    kind: str  # one of lift, fisher, magnitude, random, importance, mask, full, lora
    path: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Trainable:
        kind, _, path = spec.partition(":")
        if kind in ("importance", "mask"):
            if not path:
                raise UsageError(f"--trainable {kind}:FILE needs the file, e.g. {kind}:out/legal/{kind}.safetensors")
            if not Path(path).expanduser().is_file():
                raise UsageError(f"{kind} file {path!r} does not exist")
            return cls(kind, path)
        if kind not in (*SPARSE_KINDS, "full", "lora") or path:
            raise UsageError(f"--trainable {spec!r} is not one of {', '.join(KINDS)}")
        return cls(kind)

    @property
    def sparse(self) -> bool:
        return self.kind not in ("full", "lora")


def trainable_mask(
    model: nn.Module,
    spec: Trainable,
    density: float,
    targets: Targets = DEFAULT_TARGETS,
    *,
    rank: float = 128,
    seed: int = 0,
    model_fingerprint: str | None = None,
    data: torch.Tensor | None = None,
) -> Mask:
    """The entries a sparse fine-tune trains (True), over `targets`' Linear weights."""
    if spec.kind == "mask":
        assert spec.path is not None
        return _checked(Mask.load(Path(spec.path).expanduser()), model, spec.path)
    if spec.kind == "importance":
        assert spec.path is not None
        scores = load_importance(spec.path, model, model_fingerprint)
    else:
        by_kind: dict[str, dict[str, Any]] = {
            "lift": {"rank": rank},
            "random": {"seed": seed},
            "fisher": {"data": None if data is None else data[:FISHER_BLOCKS]},
        }
        params = by_kind.get(spec.kind, {})
        scores = compute_importance(spec.kind, model, targets, **params)
    return select_mask(scores, 1 - density, "matrix")


def load_importance(path: str, model: nn.Module, model_fingerprint: str | None) -> ImportanceMap:
    """A saved ImportanceMap, refused when it was computed on another model or names a weight this
    model does not have in that shape."""
    scores = ImportanceMap.load(Path(path).expanduser())
    saved_for = scores.meta.get("model_fingerprint")
    if model_fingerprint and saved_for and saved_for != model_fingerprint:
        raise UsageError(f"importance map {path!r} was computed on another model ({saved_for} != {model_fingerprint})")
    return _checked(scores, model, path)


def _checked(named: Any, model: nn.Module, path: str) -> Any:
    params = dict(model.named_parameters())
    for name, t in named.items():
        if name not in params or tuple(params[name].shape) != tuple(t.shape):
            raise UsageError(f"{path!r} names {name} {tuple(t.shape)}, which this model does not have in that shape")
    return named


def lora_rank_for(model: nn.Module, density: float, targets: Targets = DEFAULT_TARGETS) -> int:
    """The LoRA rank whose adapters (r·(in + out) per targeted matrix, an MoE's experts each a
    matrix of their own) hold about `density` of the targeted weights: the baseline at an equal
    trainable count."""
    skip = set(expert_weights(model, adaptable=False))  # experts PEFT cannot adapt get no adapters
    with unfused(model) as experts:
        linears = targets.linears(model)
        shapes = [
            weight_matrix(lin).shape for n, lin in linears.items() if experts.fold_names([f"{n}.weight"])[0] not in skip
        ]
    weights = sum(out * inp for out, inp in shapes)
    per_rank = sum(out + inp for out, inp in shapes)
    return max(1, round(density * weights / per_rank))


def add_lora(model: nn.Module, rank: int, targets: Targets = DEFAULT_TARGETS, seed: int = 0) -> nn.Module:
    """LoRA adapters (PEFT, α = 2r, no dropout) on `targets`' Linear modules, and on an MoE's fused
    expert tensors that `targets` selects (PEFT's `target_parameters`: a rank-r pair per expert;
    none on experts PEFT cannot wrap, DBRX's: said on stderr),
    their random initialisation drawn from `seed` (not torch's global generator, so a rerun is the
    same run)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UsageError("LoRA needs PEFT: pip install 'carve[recover]' (or pip install peft)") from None
    fused, skip = expert_weights(model), expert_weights(model, adaptable=False)
    chosen = target_weights(model, targets)
    names = sorted(n.removesuffix(".weight") for n in chosen if n not in fused)
    params = sorted(n for n in chosen if n in fused and n not in skip)
    if any(n in skip for n in chosen):
        said = f"LoRA adapts no expert of {type(model).__name__}: PEFT wraps the module holding each expert weight, "
        print(f"carve: note: {said}which its MoE reads directly (the other targets are adapted)", file=sys.stderr)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=names, target_parameters=params or None
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)
