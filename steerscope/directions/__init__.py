"""Direction-finding methods; all of them produce a `VectorSet`."""

from .extract import EXTRACTORS, ExtractConfig, extract, mean_difference
from .vectors import SteeringVector, VectorSet, VectorSetConfig

__all__ = [
    "SteeringVector",
    "VectorSet",
    "VectorSetConfig",
    "EXTRACTORS",
    "ExtractConfig",
    "extract",
    "mean_difference",
]
