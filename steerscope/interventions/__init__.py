"""Interventions on the residual stream, applied through leak-free hooks."""

from .conditional import Condition, Conditional, ConditionResult
from .ops import INTERVENTIONS, Ablate, Add, Clamp, Intervention
from .positions import ALL, Positions, StepState
from .steer import steer

__all__ = [
    "INTERVENTIONS",
    "Intervention",
    "Add",
    "Ablate",
    "Clamp",
    "Conditional",
    "Condition",
    "ConditionResult",
    "Positions",
    "ALL",
    "StepState",
    "steer",
]
