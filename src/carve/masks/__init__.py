"""Masks over parameters and the selection of weights to keep."""

from carve.masks.mask import ImportanceMap, Mask, select_mask
from carve.masks.select import check_sparsity, keep_mask, nm_mask, parse_pattern

__all__ = ["ImportanceMap", "Mask", "check_sparsity", "keep_mask", "nm_mask", "parse_pattern", "select_mask"]
