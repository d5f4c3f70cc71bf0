"""Difference of means between two prompt sets (ActAdd, Turner et al. 2023; CAA, Rimsky et al.
2024): v_L = mean(acts_L | positive) - mean(acts_L | negative), one vector per layer."""

from __future__ import annotations

from typing import Sequence

from ..errors import SteerscopeError
from ..models.activations import Read, get_activations
from .vectors import VectorSet


def mean_difference(lm, positive: Sequence[str], negative: Sequence[str], layers: int | Sequence[int], *,
                    read: Read = "mean", chat: bool | None = False, batch_size: int = 16) -> VectorSet:
    if not positive or not negative:
        raise SteerscopeError("mean_difference needs at least one positive and one negative prompt.")
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    # Accumulate in float64: differences of large, nearly equal means lose digits in float32.
    pos = get_activations(lm, positive, layer_list, read=read, chat=chat, batch_size=batch_size).double().mean(0)
    neg = get_activations(lm, negative, layer_list, read=read, chat=chat, batch_size=batch_size).double().mean(0)
    diff = (pos - neg).float()  # (n_layers, d_model)
    return VectorSet.create(
        lm, diff, [lm.check_layer(l) for l in layer_list], "mean_difference",
        ids=[f"mean_difference-L{lm.check_layer(l)}" for l in layer_list],
        hyperparams={"read": read, "chat": chat, "n_positive": len(positive), "n_negative": len(negative),
                     "positive": list(positive)[:20], "negative": list(negative)[:20]},
    )
