"""Loading models, the architecture registry, sites, hooks and activation recording."""

from .activations import collect_activations, record
from .hooks import count_hooks, hooks
from .lm import LM, weights_fingerprint
from .loading import ModelConfig, load_model
from .registry import ARCHITECTURES, ArchSpec, Site, register_architecture

__all__ = [
    "LM",
    "ModelConfig",
    "load_model",
    "weights_fingerprint",
    "ARCHITECTURES",
    "ArchSpec",
    "Site",
    "register_architecture",
    "hooks",
    "count_hooks",
    "record",
    "collect_activations",
]
