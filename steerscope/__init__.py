"""steerscope: find, apply and judge steering vectors in language models.

Data flows one way: models -> directions -> interventions -> generation -> judging -> report.
"""

__version__ = "0.1.0"

from .errors import LayerError, ModelLoadError, ModelMismatchError, SteerscopeError, UnknownArchitectureError  # noqa: E402
from .models import LM, ArchSpec, Site, load_model, register_architecture  # noqa: E402
from .interventions import Ablate, Add, Clamp, Positions, steer  # noqa: E402
from .directions import SteeringVector, VectorSet  # noqa: E402
from .generation import Completion, generate  # noqa: E402

__all__ = [
    "__version__", "LM", "load_model", "ArchSpec", "Site", "register_architecture",
    "Add", "Ablate", "Clamp", "Positions", "steer", "SteeringVector", "VectorSet",
    "Completion", "generate",
    "SteerscopeError", "LayerError", "ModelLoadError", "ModelMismatchError", "UnknownArchitectureError",
]
