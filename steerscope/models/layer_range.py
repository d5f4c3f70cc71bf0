"""Run only blocks s+1..t of a model, for many steering vectors at once.

Unsupervised discovery evaluates Z_t(theta), the residual stream at target layer t when theta is
added at source layer s, thousands of times for the same prompts. The layers before s never see
theta, so their output h_s is computed once and cached; the layers after t are never run.

To stay architecture-agnostic, `LayerRange` does not rebuild attention masks or rotary
embeddings: one ordinary forward pass records the exact arguments transformers passes to each
block s+1..t (masks, position embeddings, ...), and later calls replay the blocks with those
arguments, the batch tiled K times (row k*P + p = vector k on prompt p).

Shared prefix: chat-formatted prompts start with the same tokens (the template, often a system
prompt: 24 of 39 tokens for SmolLM2's demo prompts). Under causal attention those positions see only the
prefix, so for a given vector their activations are the same in every prompt. `run` computes them
once per vector (K rows) and lets the P suffix rows attend to the prefix keys/values, through a
stand-in for the transformers KV cache. The result is mapped back to the ordinary left-padded
layout, so callers see no difference; `capture` checks the replay against the plain forward and
falls back to full rows if an architecture does not match.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..config import parse_last
from ..errors import SteerscopeError
from .compat import with_cache
from .hooks import StopForward, hooks
from .prefix import PrefixKV, PrefixSplit, guarded, verified


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


def _map_leaves(obj, fn):
    """Apply `fn` to every leaf of nested tuples / lists / dicts (recorded block arguments)."""
    if isinstance(obj, tuple):
        return tuple(_map_leaves(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_leaves(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_leaves(v, fn) for k, v in obj.items()}
    return fn(obj)


def _per_row(x, P: int) -> bool:
    # Per-row tensors are batch first and at least 2-D; 1-D tensors such as cache_position are shared.
    return isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == P


def _first_row(obj, P: int):
    """Recorded prefix arguments have batch P (identical rows); keep one row."""
    return _map_leaves(obj, lambda x: x[:1] if _per_row(x, P) else x)


def _tile(obj, P: int, K: int):
    """Repeat per-row tensors for every vector (row k*P + p = vector k on prompt p)."""
    if K == 1:
        return obj
    return _map_leaves(obj, lambda x: x.repeat(K, *([1] * (x.dim() - 1))) if _per_row(x, P) else x)


def _steered(h: torch.Tensor, valid: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """h (P, T, d) tiled for K vectors, theta (K, d) added at real tokens: (K*P, T, d)."""
    K, P = theta.shape[0], h.shape[0]
    steer = theta.to(h.device, h.dtype).repeat_interleave(P, dim=0)[:, None, :]  # (K*P, 1, d); h's block device
    valid = valid.to(h.device)
    return h.repeat(K, 1, 1) + torch.where(valid.repeat(K, 1)[..., None], steer, torch.zeros_like(steer))


def _swap_cache(obj, new):
    """Replace any transformers Cache among recorded block arguments by `new`."""
    from transformers import Cache

    return _map_leaves(obj, lambda x: new if isinstance(x, Cache) else x)


class LayerRange:
    """Blocks source+1..target of `lm` on fixed prompts.

    Attributes:
        h_source  (P, T, d) residual stream at the output of block `source` (no grad)
        z_target  (P, T, d) residual stream at the output of block `target`, unsteered
        valid     (P, T) bool, False on padding
        enc       the tokenised prompts
    """

    def __init__(
        self,
        lm,
        prompts: list[str],
        source: int,
        target: int,
        *,
        chat: bool | None = None,
        share_prefix: bool = True,
        min_prefix: int = 4,
        formatted: bool = False,
    ):
        self.lm = lm
        self.source, self.target = lm.check_layer(source), lm.check_layer(target)
        if self.target <= self.source:
            raise SteerscopeError(f"the target layer ({target}) must come after the source layer ({source}).")
        # Kept so a method can build a range over the same prompts to another target (kl.py).
        self.prompts, self.chat, self.formatted = list(prompts), chat, formatted
        self.enc = lm.encode(list(prompts), chat=chat, formatted=formatted)
        self.valid = self.enc["attention_mask"].bool()
        self.P = self.valid.shape[0]
        self._calls: list[tuple[tuple, dict]] = []
        split = (
            PrefixSplit.find(self.enc["input_ids"], self.enc["attention_mask"], min_prefix) if share_prefix else None
        )
        self._split = split
        self._want_prefix = split.C if split is not None else 0
        self.shared_prefix = 0  # tokens actually shared (0 = plain rows), set by capture()
        self.prefix_skipped: str | None = None  # why a wanted shared prefix fell back to plain rows
        self.capture()

    @torch.no_grad()
    def capture(self) -> None:
        """(Re)record h_source, z_target and the arguments of blocks source+1..target. Call again
        after changing the attention implementation (masks differ between implementations)."""
        self.h_source, self.z_target, self._calls = self._record(**self.enc, use_cache=False)
        self.shared_prefix = 0
        if self._split is not None:
            self._capture_prefix(self._split)

    def _record(self, **forward_kw) -> tuple[torch.Tensor, torch.Tensor, list[tuple[tuple, dict]]]:
        """One forward up to block `target`: outputs of blocks `source` and `target`, and the
        arguments blocks s+1..t were called with."""
        lm, s, t = self.lm, self.source, self.target
        store: dict[str, torch.Tensor] = {}
        calls: list[tuple[tuple, dict]] = []

        def keep(x):
            store["s"] = x
            return x

        def stop(x):
            store["t"] = x
            raise StopForward

        def grab(args, kwargs):
            calls.append((tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"}))

        specs = [(lm.arch.blocks[s], "post", keep), (lm.arch.blocks[t], "post", stop)]
        specs += [(lm.arch.blocks[i], "observe", grab) for i in range(s + 1, t + 1)]
        try:
            with hooks(specs):
                lm.forward(**forward_kw)
        except StopForward:
            pass
        if len(calls) != t - s:
            raise SteerscopeError(f"expected {t - s} block calls between layers {s} and {t}, saw {len(calls)}.")
        return store["s"], store["t"], calls

    @torch.no_grad()
    def _capture_prefix(self, split: PrefixSplit) -> None:
        """Record the blocks' arguments for the prefix alone and for the suffixes after a cached
        prefix; keep them only if replaying that way reproduces the plain forward (the shared
        self-check, `prefix.verified`)."""
        from transformers import DynamicCache

        P, C = self.P, split.C
        suf_ids, full_mask = split.suffixes()  # (P, T-C), (P, T): cached prefix + suffix
        pre_ids = split.prefix[None].expand(P, C)

        def record():
            cache = DynamicCache()
            pre = self._record(
                input_ids=pre_ids, attention_mask=torch.ones_like(pre_ids), **with_cache(self.lm.model, cache)
            )
            return pre, self._record(input_ids=suf_ids, attention_mask=full_mask, **with_cache(self.lm.model, cache))

        recorded, why = guarded(record)
        if why is not None:  # an architecture whose blocks cannot take a prefix cache: plain rows
            self.prefix_skipped = why  # slower, still exact; tests read why
            return
        (h_pre, _, calls_pre), (h_suf, _, calls_suf) = recorded
        self._gather = split.gather_index()  # (P, T)
        self._h_pre = h_pre[:1]  # (1, C, d): the same for every prompt
        self._h_suf, self._suf_valid = h_suf, full_mask[:, C:].bool()  # (P, T-C, d), (P, T-C)
        self._calls_pre = [_first_row(call, P) for call in calls_pre]
        self._calls_suf = calls_suf
        self.shared_prefix = C
        zero = torch.zeros(1, self.lm.d_model, dtype=self.h_source.dtype, device=self.h_source.device)
        _, why = verified(lambda: self.run(zero), lambda: self.z_target, self.z_target.dtype, self.valid)
        if why is not None:
            self.shared_prefix, self.prefix_skipped = 0, why

    def run(self, theta: torch.Tensor) -> torch.Tensor:
        """Z_t for each vector: theta (K, d) added at every real token of layer `source`.
        Returns (K * P, T, d) in the model's dtype; differentiable in theta."""
        if self.shared_prefix:
            return self._run_shared(theta)
        K, P = theta.shape[0], self.P
        x = _steered(self.h_source, self.valid, theta)  # (K*P, T, d)
        for block, (args, kwargs) in zip(self.lm.arch.blocks[self.source + 1 : self.target + 1], self._calls):
            out = block(x, *_tile(args, P, K), **_tile(kwargs, P, K))
            x = out[0] if isinstance(out, tuple) else out
        return x

    def _run_shared(self, theta: torch.Tensor) -> torch.Tensor:
        K, P, C = theta.shape[0], self.P, self.shared_prefix
        pre = self._h_pre.expand(K, -1, -1) + theta.to(self._h_pre.dtype)[:, None, :]  # (K, C, d): all real tokens
        suf = _steered(self._h_suf, self._suf_valid, theta)  # (K*P, T-C, d)
        kv = PrefixKV(P, C)
        blocks = self.lm.arch.blocks[self.source + 1 : self.target + 1]
        for block, (a1, k1), (a2, k2) in zip(blocks, self._calls_pre, self._calls_suf):
            kv.mode = "prefix"
            out = block(pre, *_swap_cache(_tile(a1, 1, K), kv), **_swap_cache(_tile(k1, 1, K), kv))
            pre = out[0] if isinstance(out, tuple) else out
            kv.mode = "suffix"
            out = block(suf, *_swap_cache(_tile(a2, P, K), kv), **_swap_cache(_tile(k2, P, K), kv))
            suf = out[0] if isinstance(out, tuple) else out
        both = torch.cat([pre.repeat_interleave(P, dim=0), suf], dim=1)  # (K*P, T, d), [prefix | suffix] layout
        idx = self._gather.repeat(K, 1)[..., None].expand(-1, -1, both.shape[-1])
        return both.gather(1, idx)  # back to the left-padded layout

    def delta(self, theta: torch.Tensor) -> torch.Tensor:
        """Z_t(theta) - Z_t(0): (K * P, T, d) float32."""
        return self.run(theta).float() - self.z_target.float().repeat(theta.shape[0], 1, 1)

    def target_mask(self, tokens: str = "all") -> torch.Tensor:
        """(P, T) bool over real tokens: "all", or "last:K" (each prompt's last K tokens)."""
        k = parse_last(tokens, allow_all=True, what="target tokens:")
        if k == "all":
            return self.valid
        pos = self.valid.long().cumsum(-1)  # 1-based position among real tokens
        n = self.valid.sum(-1, keepdim=True)
        return self.valid & (pos > n - k)
