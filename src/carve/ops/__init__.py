"""Operations that change a model: prune, structure, train (finetune, recover), and later merge."""

from carve.importance.scoring import score
from carve.ops.prune import PruneResult, apply_mask, model_sparsity, prune, reconstruct

__all__ = ["PruneResult", "apply_mask", "model_sparsity", "prune", "reconstruct", "score"]
