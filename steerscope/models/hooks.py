"""The one place steerscope registers PyTorch hooks.

`hooks([...])` registers every hook inside `try` and removes every handle in `finally`, so no hook
survives an exception raised half-way through registration or inside the `with` body. Hook
functions here receive and return the *hidden-state tensor* only; the wrapping below deals with
tuples and keyword arguments, and never edits a tensor in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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


@dataclass
class ForwardCount:
    """Tokens read by full-model forward passes (prompt and generated tokens alike; a backward
    pass is not counted), and the number of such passes."""

    tokens: int = 0
    passes: int = 0


@contextmanager
def count_forwards() -> Iterator[ForwardCount]:
    """Count every forward pass of any transformers model (fine-tune, base, a copy) inside the
    block: the compute a job used, comparable across methods (an audit's budget column). A model
    calling its own inner model counts once: only the outermost call is counted. Global hooks,
    removed in `finally` like every other hook here."""
    from transformers import PreTrainedModel

    count, depth = ForwardCount(), [0]

    def pre(module, args):
        if isinstance(module, PreTrainedModel):
            depth[0] += 1

    def post(module, args, kwargs, output=None):  # output None: the pass raised (StopForward: a partial pass)
        if not isinstance(module, PreTrainedModel):
            return
        depth[0] -= 1
        kwargs = kwargs if isinstance(kwargs, dict) else {}  # a raising pass is reported as (module, args, None)
        if depth[0] == 0:
            x = kwargs.get("input_ids")
            x = x if x is not None else kwargs.get("inputs_embeds")
            x = x if x is not None else (args[0] if args else None)
            if isinstance(x, torch.Tensor) and x.dim() >= 2:
                count.tokens += int(x.shape[0] * x.shape[1])
                count.passes += 1

    from torch.nn.modules import module as _module

    handles = []
    try:
        handles.append(_module.register_module_forward_pre_hook(pre))
        handles.append(_module.register_module_forward_hook(post, with_kwargs=True, always_call=True))
        yield count
    finally:
        for h in reversed(handles):
            h.remove()
