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

from contextlib import contextmanager
from typing import Iterator

import torch

from ..config import parse_last
from ..errors import SteerscopeError
from .compat import IncompatibleTransformers, with_cache
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


class _PrefixKV:
    """Stands in for a transformers `Cache` while blocks are replayed: in "prefix" mode it keeps
    each layer's keys/values (K rows); in "suffix" mode it prepends them, each vector's prefix
    repeated for its P prompts, to the suffix rows' keys/values. Differentiable throughout."""

    def __init__(self, P: int, C: int):
        self.P, self.C, self.mode = P, C, "prefix"
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    # The trailing arguments are named `cache_kwargs` before transformers 5.25 and `kwargs` from
    # it on; they carry nothing this class needs.
    def update(self, key, value, layer_idx, *_args, **_kwargs):  # (B, heads, T, head_dim)
        if self.mode == "prefix":
            self.kv[layer_idx] = (key, value)
            return key, value
        pk, pv = self.kv[layer_idx]
        return (torch.cat([pk.repeat_interleave(self.P, dim=0), key], dim=-2),
                torch.cat([pv.repeat_interleave(self.P, dim=0), value], dim=-2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.mode == "prefix" else self.C


def _swap_cache(obj, new):
    """Replace any transformers Cache among recorded block arguments by `new`."""
    from transformers import Cache

    return _map_leaves(obj, lambda x: new if isinstance(x, Cache) else x)


def common_prefix(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Length of the token prefix shared by every left-padded row, leaving each row >= 1 own token."""
    n = mask.sum(-1)
    T = ids.shape[1]
    rows = [ids[i, T - int(n[i]):] for i in range(ids.shape[0])]
    C = 0
    limit = int(n.min()) - 1
    while C < limit and all(int(r[C]) == int(rows[0][C]) for r in rows):
        C += 1
    return C


class LayerRange:
    """Blocks source+1..target of `lm` on fixed prompts.

    Attributes:
        h_source  (P, T, d) residual stream at the output of block `source` (no grad)
        z_target  (P, T, d) residual stream at the output of block `target`, unsteered
        valid     (P, T) bool, False on padding
        enc       the tokenised prompts
    """

    def __init__(self, lm, prompts: list[str], source: int, target: int, *, chat: bool | None = None,
                 share_prefix: bool = True, min_prefix: int = 4, formatted: bool = False):
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
        C = common_prefix(self.enc["input_ids"], self.enc["attention_mask"]) if share_prefix and self.P > 1 else 0
        self._want_prefix = C if C >= min_prefix else 0
        self.shared_prefix = 0  # tokens actually shared (0 = plain rows), set by capture()
        self.prefix_skipped: str | None = None  # why a wanted shared prefix fell back to plain rows
        self.capture()

    @torch.no_grad()
    def capture(self) -> None:
        """(Re)record h_source, z_target and the arguments of blocks source+1..target. Call again
        after changing the attention implementation (masks differ between implementations)."""
        self.h_source, self.z_target, self._calls = self._record(**self.enc, use_cache=False)
        self.shared_prefix = 0
        if self._want_prefix:
            self._capture_prefix(self._want_prefix)

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
    def _capture_prefix(self, C: int) -> None:
        """Record the blocks' arguments for the prefix alone and for the suffixes after a cached
        prefix; keep them only if replaying that way reproduces the plain forward."""
        from transformers import DynamicCache

        ids, mask = self.enc["input_ids"], self.enc["attention_mask"]
        P, T = ids.shape
        if not bool(mask[:, -1].all()):  # the layout below assumes left padding
            return
        pad = T - mask.sum(-1)  # (P,) left padding per row
        first = int(pad[0])
        pre_ids = ids[:1, first:first + C].expand(P, C)
        suf_ids = torch.stack([torch.cat([ids[i, :int(pad[i])], ids[i, int(pad[i]) + C:]]) for i in range(P)])  # (P, T-C)
        suf_mask = torch.stack([torch.cat([mask[i, :int(pad[i])], mask[i, int(pad[i]) + C:]]) for i in range(P)])
        cache = DynamicCache()
        try:
            h_pre, _, calls_pre = self._record(input_ids=pre_ids, attention_mask=torch.ones_like(pre_ids),
                                               **with_cache(self.lm.model, cache))
            full_mask = torch.cat([torch.ones(P, C, dtype=mask.dtype, device=mask.device), suf_mask], dim=1)  # cached prefix + suffix
            h_suf, _, calls_suf = self._record(input_ids=suf_ids, attention_mask=full_mask,
                                               **with_cache(self.lm.model, cache))
        except IncompatibleTransformers:
            raise  # a transformers internal steerscope cannot read: never hidden behind plain rows
        except Exception as e:  # an architecture whose blocks cannot take a prefix cache: plain rows
            self.prefix_skipped = f"{type(e).__name__}: {e}"  # slower, still exact; tests read why
            return
        # original position j of row p <- position in [prefix | left-padded suffix] layout
        j = torch.arange(T, device=ids.device)[None, :]
        a = pad[:, None]
        self._gather = torch.where(j < a, C + j, torch.where(j < a + C, j - a, j))  # (P, T)
        self._h_pre = h_pre[:1]  # (1, C, d): the same for every prompt
        self._h_suf, self._suf_valid = h_suf, suf_mask.bool()  # (P, T-C, d), (P, T-C)
        self._calls_pre = [_first_row(call, P) for call in calls_pre]
        self._calls_suf = calls_suf
        self.shared_prefix = C
        try:
            z = self.run(torch.zeros(1, self.lm.d_model, dtype=self.h_source.dtype, device=self.h_source.device))
        except Exception as e:  # noqa: BLE001 - a replay that cannot run falls back to plain rows
            self.shared_prefix, self.prefix_skipped = 0, f"{type(e).__name__}: {e}"
            return
        # Per-token relative error: a few tokens (the attention sink) have norms 10^3-10^4 times
        # the rest, so a tolerance on the largest value would hide errors on ordinary tokens.
        # Reordered arithmetic alone gives ~1e-6 in float32 and ~3e-2 in bfloat16 on SmolLM2;
        # a wrong replay gives O(1).
        ref = self.z_target.float()
        rel = ((z.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6))[self.valid].max()
        tol = 1e-4 if self.z_target.dtype in (torch.float32, torch.float64) else 0.1
        if not bool(rel <= tol):
            self.shared_prefix, self.prefix_skipped = 0, f"replay differs from the plain forward (relative error {float(rel):.2g})"

    def run(self, theta: torch.Tensor) -> torch.Tensor:
        """Z_t for each vector: theta (K, d) added at every real token of layer `source`.
        Returns (K * P, T, d) in the model's dtype; differentiable in theta."""
        if self.shared_prefix:
            return self._run_shared(theta)
        K, P = theta.shape[0], self.P
        x = _steered(self.h_source, self.valid, theta)  # (K*P, T, d)
        for block, (args, kwargs) in zip(self.lm.arch.blocks[self.source + 1:self.target + 1], self._calls):
            out = block(x, *_tile(args, P, K), **_tile(kwargs, P, K))
            x = out[0] if isinstance(out, tuple) else out
        return x

    def _run_shared(self, theta: torch.Tensor) -> torch.Tensor:
        K, P, C = theta.shape[0], self.P, self.shared_prefix
        pre = self._h_pre.expand(K, -1, -1) + theta.to(self._h_pre.dtype)[:, None, :]  # (K, C, d): all real tokens
        suf = _steered(self._h_suf, self._suf_valid, theta)  # (K*P, T-C, d)
        kv = _PrefixKV(P, C)
        blocks = self.lm.arch.blocks[self.source + 1:self.target + 1]
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
