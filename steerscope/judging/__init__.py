"""Measuring what steering does: behaviour metrics, side effects (KL), selection by effect."""

from .metrics import METRICS, Metric, kl_divergence, parse_metric
from .selection import SelectConfig, Selection, select

__all__ = ["Metric", "METRICS", "parse_metric", "kl_divergence", "SelectConfig", "Selection", "select"]
