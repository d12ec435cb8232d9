"""Engines feed calibration data to the scorers; they know nothing of any method."""

from carve.engines.layerwise import layerwise

__all__ = ["layerwise"]
