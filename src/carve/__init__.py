"""carve: carve a compact domain specialist out of a general pretrained language model."""

import os

# Float32 matrix products equal for any thread count (MKL's strict conditional numerical
# reproducibility; measured at no cost here): SparseGPT's greedy choices follow the last bits of the
# Hessians, so without it the mask depends on the thread count.  Takes effect if set before MKL's
# first call; a value already in the environment is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"

from carve.corpora import Corpus
from carve.errors import UsageError
from carve.masks import ImportanceMap, Mask, select_mask
from carve.models import DEFAULT_MODEL, LoadedModel, load_model
from carve.ops import apply_mask, prune, score
from carve.pipeline import Recipe, evaluate, extract

__all__ = [
    "DEFAULT_MODEL",
    "Corpus",
    "ImportanceMap",
    "LoadedModel",
    "Mask",
    "Recipe",
    "UsageError",
    "__version__",
    "apply_mask",
    "evaluate",
    "extract",
    "load_model",
    "prune",
    "score",
    "select_mask",
]
