"""steerscope: find, apply and judge steering vectors in language models.

Imports flow one way (enforced by tests/test_architecture.py):

    config, errors, checkpoint, progress, _io, _tensors   (the ground: no steerscope imports but each other)
    -> models -> interventions -> directions -> generation -> sae -> judging -> report -> jobs, serving -> cli

Every method family has one registration shape (`config.Family`): DISCOVERY, EXTRACTORS, METRICS,
SAE_ARCHS, INTERVENTIONS.
"""

from ._version import __version__  # noqa: E402

from .errors import LayerError, ModelLoadError, ModelMismatchError, SteerscopeError, UnknownArchitectureError  # noqa: E402
from .models import LM, ArchSpec, ModelConfig, Site, load_model, register_architecture  # noqa: E402
from .interventions import INTERVENTIONS, Ablate, Add, Clamp, Positions, steer  # noqa: E402
from .directions import SteeringVector, VectorSet  # noqa: E402
from .generation import Completion, generate  # noqa: E402
from . import sae  # noqa: E402,F401  (registers ClampFeature in INTERVENTIONS)

__all__ = [
    "__version__", "LM", "load_model", "ModelConfig", "ArchSpec", "Site", "register_architecture",
    "INTERVENTIONS", "Add", "Ablate", "Clamp", "Positions", "steer", "SteeringVector", "VectorSet",
    "Completion", "generate",
    "SteerscopeError", "LayerError", "ModelLoadError", "ModelMismatchError", "UnknownArchitectureError",
]
