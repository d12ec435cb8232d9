"""Evaluation: perplexity on held-out blocks of the general and domain corpora, and held-out
cloze tasks.

(Named `evaluation` so that `carve.evaluate`, the public function, is never shadowed.)"""

from carve.evaluation.cloze import ClozeTask, build_cloze, cloze_accuracy, wilson_interval
from carve.evaluation.perplexity import perplexity

__all__ = ["ClozeTask", "build_cloze", "cloze_accuracy", "perplexity", "wilson_interval"]
