"""Scorers: the maths of each method as pure tensor functions, registered by name."""

from carve.scorers import gradient, magnitude, sparsegpt, wanda  # noqa: F401  - registers the builtins
from carve.scorers.magnitude import magnitude_score
from carve.scorers.registry import SCORERS, Scorer, get_scorer, register
from carve.scorers.sparsegpt import inverse_hessian_cholesky, obs_saliency, sparsegpt_prune
from carve.scorers.stats import Hessian, RowNorms
from carve.scorers.wanda import wanda_score

__all__ = [
    "SCORERS",
    "Hessian",
    "RowNorms",
    "Scorer",
    "get_scorer",
    "inverse_hessian_cholesky",
    "magnitude_score",
    "obs_saliency",
    "register",
    "sparsegpt_prune",
    "wanda_score",
]
