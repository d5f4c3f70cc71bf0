"""Direction-finding methods; all of them produce a `VectorSet`."""

from .contrast import mean_difference
from .vectors import SteeringVector, VectorSet, VectorSetConfig

__all__ = ["SteeringVector", "VectorSet", "VectorSetConfig", "mean_difference"]
