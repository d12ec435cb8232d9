"""carve: carve a compact domain specialist out of a general pretrained language model."""

import os

# Float32 matrix products equal for any thread count (MKL's strict conditional numerical
# reproducibility): SparseGPT's greedy choices follow the last bits of the Hessians, so without it
# the mask depends on the thread count.  Its cost, measured on this project's 2-core machine: none
# on one thread, ~7% on the products of a SmolLM2 block with two (docs/methods.md).  Takes effect
# if set before MKL's first call; a value already in the environment is kept (MKL_CBWR=AUTO: off).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
# oneDNN (torch's bfloat16 matmuls: the calibration forwards under autocast) keeps a compiled primitive
# per matmul shape, up to 1024 of them; an MoE expert's matmul has a new shape (its routed tokens)
# almost every call, so the cache grew a streamed MoE job by ~200 MB.  64 held the job ~170 MB lower,
# no slower, and did not slow a dense job, whose shapes repeat (bench/RESULTS.md, stream-moe notes).
# Takes effect if set before oneDNN's first primitive; a value already in the environment is kept.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

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
