"""steerscope: find, apply and judge steering vectors in language models.

Imports flow one way (enforced by tests/test_architecture.py):

    config, errors, checkpoint, progress, _io, _tensors   (the ground: no steerscope imports but each other)
    -> models -> interventions -> directions -> amplify -> generation -> adapters -> sae -> judging -> report -> jobs, serving -> cli

Every method family has one registration shape (`config.Family`): DISCOVERY, EXTRACTORS, METRICS,
SAE_ARCHS, INTERVENTIONS.
"""

from typing import TYPE_CHECKING

from ._version import __version__
from .errors import LayerError, ModelLoadError, ModelMismatchError, SteerscopeError, UnknownArchitectureError

# The rest imports torch, so it loads on first use (PEP 562): `steerscope --help` stays fast and
# torch-free (tests/test_cli.py). Name -> the module that defines it.
_LAZY = {
    **dict.fromkeys(["LM", "ArchSpec", "ModelConfig", "Site", "load_model", "register_architecture"], "models"),
    **dict.fromkeys(["INTERVENTIONS", "Ablate", "Add", "Clamp", "Positions", "steer"], "interventions"),
    **dict.fromkeys(["SteeringVector", "VectorSet"], "directions"),
    **dict.fromkeys(["Completion", "generate"], "generation"),
}

if TYPE_CHECKING:
    from .directions import SteeringVector, VectorSet
    from .generation import Completion, generate
    from .interventions import INTERVENTIONS, Ablate, Add, Clamp, Positions, steer
    from .models import LM, ArchSpec, ModelConfig, Site, load_model, register_architecture


def __getattr__(name: str):
    import importlib
    import importlib.util

    if name not in _LAZY and (name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    importlib.import_module(".sae", __name__)  # registers ClampFeature in INTERVENTIONS, as an eager import did
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    else:  # a module after a bare `import steerscope`: `ss.directions.mean_difference(...)`
        value = importlib.import_module(f".{name}", __name__)
    globals()[name] = value
    return value


__all__ = [
    "__version__",
    "LM",
    "load_model",
    "ModelConfig",
    "ArchSpec",
    "Site",
    "register_architecture",
    "INTERVENTIONS",
    "Add",
    "Ablate",
    "Clamp",
    "Positions",
    "steer",
    "SteeringVector",
    "VectorSet",
    "Completion",
    "generate",
    "SteerscopeError",
    "LayerError",
    "ModelLoadError",
    "ModelMismatchError",
    "UnknownArchitectureError",
]
