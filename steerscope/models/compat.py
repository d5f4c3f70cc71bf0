"""The one home for reading transformers' forward arguments and cache objects.

transformers renames these between releases (5.25 passes the KV cache as `cache=` where earlier
5.x passed `past_key_values=` and `cache_position=`). Code that guessed a default when a name was
missing steered padded rows wrongly with no error, so every reader here either finds what it
needs or raises a `SteerscopeError` that names the installed transformers version.
"""

from __future__ import annotations

import functools
import inspect

import torch

from ..errors import SteerscopeError

# Keyword names a causal LM's forward has taken its KV cache under, newest first.
CACHE_KWARGS = ("cache", "past_key_values")


def transformers_version() -> str:
    import transformers

    return transformers.__version__


class IncompatibleTransformers(SteerscopeError):
    """A transformers internal is not where steerscope expects it (the message names the version).
    Fallback paths (plain rows instead of a shared prefix) never swallow this one."""


def incompatible(what: str) -> IncompatibleTransformers:
    """The error for a transformers internal that is not where steerscope expects it."""
    return IncompatibleTransformers(
        f"{what} (transformers {transformers_version()}). steerscope cannot steer exactly with this "
        "release; install the tested versions (`pip install -r requirements.lock`) or a transformers "
        "version inside the range in pyproject.toml, and report this message."
    )


@functools.cache
def _forward_params(cls: type) -> frozenset[str]:
    # inspect follows functools.wraps (__wrapped__), so deprecation decorators show the real names
    return frozenset(inspect.signature(cls.forward).parameters)


def accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether `model.forward` names the keyword `name` in its signature."""
    return name in _forward_params(type(model))


def cache_kwarg(model: torch.nn.Module) -> str:
    """The keyword under which `model.forward` takes its KV cache in the installed transformers."""
    for name in CACHE_KWARGS:
        if accepts(model, name):
            return name
    raise incompatible(f"{type(model).__name__}.forward takes none of {', '.join(CACHE_KWARGS)} as its KV cache")


def with_cache(model: torch.nn.Module, cache, **kw) -> dict:
    """Forward keywords that pass `cache` under the name this transformers release uses."""
    return {cache_kwarg(model): cache, "use_cache": True, **kw}


def find_cache(args: tuple, kwargs: dict):
    """The KV cache among a forward call's arguments (under any keyword), or None."""
    for name in CACHE_KWARGS:
        c = kwargs.get(name)
        if c is not None:
            return c
    # A release that renames the keyword again still passes a `Cache` object: find it by type.
    for v in (*args, *kwargs.values()):
        if hasattr(v, "get_seq_length") and not isinstance(v, torch.Tensor):
            return v
    return None


def past_length(args: tuple, kwargs: dict, n_new: int, mask_width: int | None) -> int:
    """Number of cached tokens before the `n_new` tokens of this forward call.

    Read from `cache_position` (transformers < 5.2x), else the cache's `get_seq_length()`; a call
    with neither is a fresh call only if its attention mask covers exactly its own tokens. The
    result is checked against the mask width (past + new for a dynamic cache, at least that for
    a static one) and, on cached steps, against `position_ids`.
    """
    cache_pos = kwargs.get("cache_position")
    cache = find_cache(args, kwargs)
    if isinstance(cache_pos, torch.Tensor) and cache_pos.numel():
        past = int(cache_pos.reshape(-1)[0])
    elif cache is not None:
        try:
            past = int(cache.get_seq_length())
        except Exception as e:  # noqa: BLE001 - any failure here means the cache API changed
            raise incompatible(f"the KV cache {type(cache).__name__}.get_seq_length() failed ({e})") from e
    elif mask_width is None or mask_width == n_new:
        return 0
    else:
        raise incompatible(
            f"a forward call with {n_new} new tokens and an attention mask over {mask_width} carries no KV cache "
            f"or cache_position that steerscope can read (keywords: {', '.join(sorted(kwargs))}), so the number "
            "of cached tokens, and with it every steered position, is unknown"
        )
    if mask_width is not None:
        static = bool(getattr(cache, "is_compileable", False))
        if mask_width < past + n_new or (not static and mask_width != past + n_new):
            raise incompatible(
                f"the attention mask covers {mask_width} tokens but the cache reports {past} cached + {n_new} new"
            )
    return past


def check_positions(kwargs: dict, abs_pos: torch.Tensor, valid: torch.Tensor, past: int) -> None:
    """The model's own `position_ids` against the positions steerscope derived: on a cached step
    they must be equal at every real token (an independent check that the past length was read
    right); on a first call each row's first real token must be at position 0 (a later start
    means a cache steerscope did not see). Only the start is checked there, so packed sequences
    whose positions restart inside a row still run."""
    pid = kwargs.get("position_ids")
    if not isinstance(pid, torch.Tensor) or pid.dim() != 2 or pid.shape[-1] != abs_pos.shape[-1]:
        return  # absent, or a layout with extra axes (multimodal RoPE): the mask checks stand alone
    pid = pid.to(abs_pos.device).expand_as(abs_pos)
    if past == 0:
        first = valid.long().argmax(-1, keepdim=True)  # (B, 1) each row's first real token
        if bool((pid.gather(-1, first) != 0)[valid.any(-1, keepdim=True)].any()):
            raise incompatible(
                "a forward call with no readable KV cache has position_ids that do not start at 0 "
                f"(first row: {pid[0].tolist()[:8]}): it continues a cache steerscope cannot see"
            )
        return
    if bool((pid != abs_pos)[valid].any()):
        raise incompatible(
            "the model's position_ids disagree with the token positions derived from the cache "
            f"and attention mask (first row: {pid[0].tolist()[:8]} vs {abs_pos[0].tolist()[:8]})"
        )


def cache_layers(cache) -> list:
    """The per-layer key/value holders of a DynamicCache, which the server pads and joins."""
    layers = getattr(cache, "layers", None)
    if layers is None or not all(
        isinstance(getattr(l, "keys", None), torch.Tensor) and isinstance(getattr(l, "values", None), torch.Tensor)
        for l in layers
    ):
        raise incompatible(f"{type(cache).__name__} has no .layers whose .keys/.values are tensors")
    return list(layers)


def joinable(cache) -> bool:
    """Whether every layer of `cache` is a plain dynamic layer (keys/values that grow by
    concatenation), so rows of two such caches can be left-padded and stacked. Sliding-window
    and other layer kinds cannot (the server then runs a batch per window)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(l) is DynamicLayer for l in cache_layers(cache))
