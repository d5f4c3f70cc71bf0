"""Sparse autoencoders on the residual stream (TopK, BatchTopK, ReLU+L1)."""

from .model import SAE, SAEConfig, SAEOutput
from .train import (ActivationBuffer, ShardBatches, TensorBatches, TrainConfig, cache_activations, load_checkpoint,
                    shard_batches, tensor_batches, train_sae)

__all__ = ["SAE", "SAEConfig", "SAEOutput", "ActivationBuffer", "ShardBatches", "TensorBatches", "TrainConfig",
           "cache_activations", "load_checkpoint", "shard_batches", "tensor_batches", "train_sae"]
