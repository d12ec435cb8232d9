"""Loading models from any source, finding their blocks and Linear layers, saving them."""

from carve.models.arch import all_prunable_linears, count_parameters, find_blocks, prunable_linears, weight_matrix
from carve.models.load import DEFAULT_MODEL, LoadedModel, default_gguf, load_model

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "all_prunable_linears",
    "count_parameters",
    "default_gguf",
    "find_blocks",
    "load_model",
    "prunable_linears",
    "weight_matrix",
]
