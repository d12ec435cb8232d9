"""Operations that change a model: pruning (and later structure, merge, unlearn, finetune)."""

from carve.ops.prune import PruneResult, apply_mask, model_sparsity, prune, reconstruct, score

__all__ = ["PruneResult", "apply_mask", "model_sparsity", "prune", "reconstruct", "score"]
