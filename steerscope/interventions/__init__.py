"""Interventions on the residual stream, applied through leak-free hooks."""

from .ops import OPS, Ablate, Add, Clamp, Intervention, register_op
from .positions import ALL, Positions, StepState
from .steer import steer

__all__ = ["OPS", "register_op", "Intervention", "Add", "Ablate", "Clamp", "Positions", "ALL", "StepState", "steer"]
