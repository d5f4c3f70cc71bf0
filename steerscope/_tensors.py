"""Checks for user-given tensors: one clear SteerscopeError instead of a shape error deep inside a hook."""

from __future__ import annotations

import torch

from .errors import SteerscopeError


def as_rows(v, d_model: int, what: str, *, unit: bool = False) -> torch.Tensor:
    """A (d,) or (K, d) finite float tensor as (1|K, d); `unit` normalises each row."""
    t = torch.as_tensor(v)
    if not torch.is_floating_point(t):
        t = t.float()
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise SteerscopeError(f"{what} must have shape (d_model,) or (rows, d_model); got {tuple(t.shape)}.")
    if t.shape[1] != d_model:
        raise SteerscopeError(
            f"{what} has size {t.shape[1]} but this model's d_model is {d_model}; the vector was probably made for another model."
        )
    if not bool(torch.isfinite(t).all()):
        raise SteerscopeError(f"{what} contains NaN or inf values; check how it was computed.")
    if unit:
        norms = t.norm(dim=-1, keepdim=True)
        if bool((norms == 0).any()):
            raise SteerscopeError(f"{what} has zero norm, so it defines no direction.")
        t = t / norms
    return t


def as_scalars(v, what: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32) if not isinstance(v, torch.Tensor) else v.float()
    t = t.reshape(-1)
    if not bool(torch.isfinite(t).all()):
        raise SteerscopeError(f"{what} contains NaN or inf values.")
    return t
