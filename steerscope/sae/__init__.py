"""Sparse autoencoders on the residual stream (architectures in the `SAE_ARCHS` family)."""

from .archs import SAE_ARCHS
from .binding import BindingSAE
from .model import SAE, SAEConfig, SAEOutput
from .steering import ClampFeature, feature_vectors
from .train import (
    ActivationBuffer,
    ShardBatches,
    TensorBatches,
    TrainConfig,
    cache_activations,
    load_checkpoint,
    shard_batches,
    tensor_batches,
    train_sae,
)

__all__ = [
    "SAE_ARCHS",
    "SAE",
    "BindingSAE",
    "SAEConfig",
    "SAEOutput",
    "ClampFeature",
    "feature_vectors",
    "ActivationBuffer",
    "ShardBatches",
    "TensorBatches",
    "TrainConfig",
    "cache_activations",
    "load_checkpoint",
    "shard_batches",
    "tensor_batches",
    "train_sae",
]
