"""The one place steerscope registers PyTorch hooks.

`hooks([...])` registers every hook inside `try` and removes every handle in `finally`, so no hook
survives an exception raised half-way through registration or inside the `with` body. Hook
functions here receive and return the *hidden-state tensor* only; the wrapping below deals with
tuples and keyword arguments, and never edits a tensor in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn as nn

from ..errors import SteerscopeError

TensorFn = Callable[[torch.Tensor], torch.Tensor]
# "pre"/"post": fn maps the hidden-state tensor to a new one. "observe": fn(args, kwargs) is a
# forward pre-hook that only reads the call (used to track positions); its return is ignored.
HookSpec = tuple[nn.Module, Literal["pre", "post", "observe"], Callable]


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the layer it needs has run; the caller
    catches it. Skips the later blocks and the unembedding."""


def _post_wrapper(fn: TensorFn):
    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            return fn(output)
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (fn(output[0]),) + tuple(output[1:])
        raise SteerscopeError(
            f"steerscope cannot hook {type(module).__name__}: unexpected output type {type(output).__name__}; "
            "register the architecture with the right module paths (register_architecture)."
        )

    return hook


def _pre_wrapper(fn: TensorFn):
    def hook(module, args, kwargs):
        if args and isinstance(args[0], torch.Tensor):
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        raise SteerscopeError(
            f"steerscope cannot find the hidden states passed to {type(module).__name__}; "
            "register the architecture with the right module paths (register_architecture)."
        )

    return hook


def _observe_wrapper(fn):
    def hook(module, args, kwargs):
        fn(args, kwargs)
        return None

    return hook


@contextmanager
def hooks(specs: Sequence[HookSpec] | Callable[[], Sequence[HookSpec]]) -> Iterator[None]:
    """Register `(module, "pre"|"post", fn)` hooks for the duration of the block.

    `specs` may be a callable that builds the list lazily; it is called inside the `try` so a
    failure while building removes whatever was already registered.
    """
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for module, kind, fn in specs() if callable(specs) else specs:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(_pre_wrapper(fn), with_kwargs=True))
            elif kind == "post":
                handles.append(module.register_forward_hook(_post_wrapper(fn)))
            elif kind == "observe":
                handles.append(module.register_forward_pre_hook(_observe_wrapper(fn), with_kwargs=True))
            else:
                raise SteerscopeError(f"hook kind must be 'pre', 'post' or 'observe', got {kind!r}.")
        yield
    finally:
        for h in reversed(handles):
            h.remove()


def count_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks on any submodule; 0 when steerscope left nothing behind."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
