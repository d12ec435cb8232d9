"""Importance as its own layer: registered sources, each `compute(model, data) -> ImportanceMap`."""

from carve.importance import activations, gradient, weights  # noqa: F401  - registers the builtins
from carve.importance.registry import SOURCES, Source, compute_importance, get_source, importance_source
from carve.importance.weights import lift_rank, low_rank

__all__ = ["SOURCES", "Source", "compute_importance", "get_source", "importance_source", "lift_rank", "low_rank"]
