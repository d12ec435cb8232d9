"""Engines feed calibration data to the scorers; they know nothing of any method."""

from carve.engines.gradient import GradientStats, accumulate_gradients, next_token_loss
from carve.engines.layerwise import layerwise

__all__ = ["GradientStats", "accumulate_gradients", "layerwise", "next_token_loss"]
