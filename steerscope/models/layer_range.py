"""Run only blocks s+1..t of a model, for many steering vectors at once.

Unsupervised discovery evaluates Z_t(theta), the residual stream at target layer t when theta is
added at source layer s, thousands of times for the same prompts. The layers before s never see
theta, so their output h_s is computed once and cached; the layers after t are never run.

To stay architecture-agnostic, `LayerRange` does not rebuild attention masks or rotary
embeddings: one ordinary forward pass records the exact arguments transformers passes to each
block s+1..t (masks, position embeddings, ...), and later calls replay the blocks with those
arguments, the batch tiled K times (row k*P + p = vector k on prompt p).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..errors import SteerscopeError
from .hooks import StopForward, hooks


@contextmanager
def eager_attention(lm) -> Iterator[None]:
    """Use eager attention inside the block: forward-mode AD (torch.func.jvp) is not implemented
    for the CPU SDPA kernels."""
    before = lm.model.config._attn_implementation
    if before != "eager":
        lm.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if before != "eager":
            lm.model.set_attn_implementation(before)


@contextmanager
def frozen_weights(lm) -> Iterator[None]:
    """Weights stop requiring grad inside the block (restored after). Gradients are then taken
    with respect to the steering vectors only: no weight gradients are computed or accumulated,
    and function transforms do not chain graphs through the weights across iterations."""
    flags = [(p, p.requires_grad) for p in lm.model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _tile(obj, P: int, K: int):
    if isinstance(obj, torch.Tensor):
        # Per-row tensors (batch first, at least 2-D) are repeated for every vector; 1-D tensors
        # such as cache_position are shared.
        if obj.dim() >= 2 and obj.shape[0] == P and K > 1:
            return obj.repeat(K, *([1] * (obj.dim() - 1)))
        return obj
    if isinstance(obj, tuple):
        return tuple(_tile(o, P, K) for o in obj)
    if isinstance(obj, list):
        return [_tile(o, P, K) for o in obj]
    if isinstance(obj, dict):
        return {k: _tile(v, P, K) for k, v in obj.items()}
    return obj


class LayerRange:
    """Blocks source+1..target of `lm` on fixed prompts.

    Attributes:
        h_source  (P, T, d) residual stream at the output of block `source` (no grad)
        z_target  (P, T, d) residual stream at the output of block `target`, unsteered
        valid     (P, T) bool, False on padding
        enc       the tokenised prompts
    """

    def __init__(self, lm, prompts: list[str], source: int, target: int, *, chat: bool | None = None):
        self.lm = lm
        self.source, self.target = lm.check_layer(source), lm.check_layer(target)
        if self.target <= self.source:
            raise SteerscopeError(f"the target layer ({target}) must come after the source layer ({source}).")
        self.enc = lm.encode(list(prompts), chat=chat)
        self.valid = self.enc["attention_mask"].bool()
        self.P = self.valid.shape[0]
        self._calls: list[tuple[tuple, dict]] = []
        self.capture()

    @torch.no_grad()
    def capture(self) -> None:
        """(Re)record h_source, z_target and the arguments of blocks source+1..target. Call again
        after changing the attention implementation (masks differ between implementations)."""
        lm, s, t = self.lm, self.source, self.target
        store: dict[str, torch.Tensor] = {}
        calls: list[tuple[tuple, dict]] = []

        def keep(name):
            def fn(x):
                store[name] = x
                return x
            return fn

        def stop(x):
            store["t"] = x
            raise StopForward

        def grab(args, kwargs):
            calls.append((tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"}))

        specs = [(lm.arch.blocks[s], "post", keep("s")), (lm.arch.blocks[t], "post", stop)]
        specs += [(lm.arch.blocks[i], "observe", grab) for i in range(s + 1, t + 1)]
        try:
            with hooks(specs):
                lm.forward(**self.enc, use_cache=False)
        except StopForward:
            pass
        if len(calls) != t - s:
            raise SteerscopeError(f"expected {t - s} block calls between layers {s} and {t}, saw {len(calls)}.")
        self.h_source, self.z_target, self._calls = store["s"], store["t"], calls

    def run(self, theta: torch.Tensor) -> torch.Tensor:
        """Z_t for each vector: theta (K, d) added at every real token of layer `source`.
        Returns (K * P, T, d) in the model's dtype; differentiable in theta."""
        K, P = theta.shape[0], self.P
        x = self.h_source.repeat(K, 1, 1)  # (K*P, T, d)
        valid = self.valid.repeat(K, 1)[..., None]  # (K*P, T, 1)
        steer = theta.to(x.dtype).repeat_interleave(P, dim=0)[:, None, :]  # (K*P, 1, d)
        x = x + torch.where(valid, steer, torch.zeros_like(steer))
        for block, (args, kwargs) in zip(self.lm.arch.blocks[self.source + 1:self.target + 1], self._calls):
            out = block(x, *_tile(args, P, K), **_tile(kwargs, P, K))
            x = out[0] if isinstance(out, tuple) else out
        return x

    def delta(self, theta: torch.Tensor) -> torch.Tensor:
        """Z_t(theta) - Z_t(0): (K * P, T, d) float32."""
        return self.run(theta).float() - self.z_target.float().repeat(theta.shape[0], 1, 1)

    def target_mask(self, tokens: str = "all") -> torch.Tensor:
        """(P, T) bool over real tokens: "all", or "last:K" (each prompt's last K tokens)."""
        if tokens == "all":
            return self.valid
        if tokens.startswith("last:") and tokens[5:].isdigit() and int(tokens[5:]) >= 1:
            k = int(tokens[5:])
            pos = self.valid.long().cumsum(-1)  # 1-based position among real tokens
            n = self.valid.sum(-1, keepdim=True)
            return self.valid & (pos > n - k)
        raise SteerscopeError(f"target tokens must be 'all' or 'last:K', got {tokens!r}.")
