"""Evaluation: perplexity on held-out blocks of the general and domain corpora.

(Named `evaluation` so that `carve.evaluate`, the public function, is never shadowed.)"""

from carve.evaluation.perplexity import perplexity

__all__ = ["perplexity"]
