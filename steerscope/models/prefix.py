"""Shared prefixes: prompts that start with the same tokens run those tokens once.

Chat-formatted prompts share their template and system prompt (about half of SmolLM2's tokens in
the demo). Under causal attention those positions see only the prefix, and steering at every
position (Add, Ablate, a discovery vector) is causal too, so for one steering their activations are
the same in every prompt: the prefix runs once per steering, and each prompt's own tokens (its
suffix) attend to the prefix's cached keys/values.

Two callers use it: `generation.last_token_logits` (full forwards through a transformers
DynamicCache) and `LayerRange` (block replays through `PrefixKV`). This module is the one home of
what they share:
  - the layout: `PrefixSplit` cuts a left-padded batch into the common prefix and left-padded
    suffixes, and maps results back (`gather_index`);
  - the self-check: `verified` runs the shared path once against the plain forward, with one
    tolerance (`mismatch`);
  - the fallback: an architecture whose blocks cannot continue a prefix cache raises anything;
    `guarded` turns that into a reason and plain rows (slower, still exact), except
    `IncompatibleTransformers`, which is never hidden.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from .compat import IncompatibleTransformers

T_ = TypeVar("T_")


def common_prefix(ids: torch.Tensor, mask: torch.Tensor) -> int:
    """Length of the token prefix shared by every left-padded row, leaving each row >= 1 own token."""
    n = mask.sum(-1)
    T = ids.shape[1]
    rows = [ids[i, T - int(n[i]) :] for i in range(ids.shape[0])]
    C = 0
    limit = int(n.min()) - 1
    while C < limit and all(int(r[C]) == int(rows[0][C]) for r in rows):
        C += 1
    return C


@dataclass
class PrefixSplit:
    """A left-padded (P, T) batch cut into its common prefix and each row's own tokens."""

    C: int  # prefix length
    prefix: torch.Tensor  # (C,) the shared tokens
    suffix_ids: torch.Tensor  # (P, T-C) each row's own tokens, left-padded (with the batch's pad ids)
    suffix_mask: torch.Tensor  # (P, T-C)
    pad: torch.Tensor  # (P,) each row's left padding in the original layout

    @classmethod
    def find(cls, ids: torch.Tensor, mask: torch.Tensor, min_prefix: int = 4) -> PrefixSplit | None:
        """The split of `ids`/`mask` (P, T), or None when the rows share fewer than `min_prefix`
        tokens or the batch is not left-padded (the layout below assumes it)."""
        if ids.shape[0] < 2 or not bool(mask[:, -1].all()):
            return None
        C = common_prefix(ids, mask)
        if C < min_prefix:
            return None
        T = ids.shape[1]
        pad = T - mask.sum(-1)  # (P,)
        first = int(pad[0])
        rows = range(ids.shape[0])
        # Each row keeps its own padding, then its tokens after the prefix: left-padded to T-C.
        suffix_ids = torch.stack([torch.cat([ids[i, : int(pad[i])], ids[i, int(pad[i]) + C :]]) for i in rows])
        suffix_mask = torch.stack([torch.cat([mask[i, : int(pad[i])], mask[i, int(pad[i]) + C :]]) for i in rows])
        return cls(C, ids[0, first : first + C], suffix_ids, suffix_mask, pad)

    def suffixes(self, rows: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The suffix ids (B, S) of prompts `rows` (default: all, in order) and the attention mask
        (B, C + S) over the cached prefix and them. Columns that are padding in every chosen row
        are dropped, so the suffixes are exactly those rows left-padded on their own."""
        ids, mask = self.suffix_ids, self.suffix_mask
        if rows is not None:
            idx = torch.as_tensor(list(rows), dtype=torch.long, device=ids.device)
            ids, mask = ids[idx], mask[idx]
        first = int(mask.any(0).long().argmax())  # every row has >= 1 own token: some column is real
        ids, mask = ids[:, first:], mask[:, first:]
        full = torch.cat([torch.ones(ids.shape[0], self.C, dtype=mask.dtype, device=mask.device), mask], dim=1)
        return ids, full

    def gather_index(self) -> torch.Tensor:
        """(P, T): for each original position j of row p, its index in the [prefix | left-padded
        suffix] layout, to map results computed that way back to the original layout."""
        P, S = self.suffix_ids.shape
        j = torch.arange(S + self.C, device=self.suffix_ids.device)[None, :]
        a = self.pad.to(j.device)[:, None]
        return torch.where(j < a, self.C + j, torch.where(j < a + self.C, j - a, j))


def mismatch(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, valid: torch.Tensor | None = None) -> str | None:
    """None when `out` reproduces `ref` (the plain forward), else why not.

    Relative error per row of the last axis (a token's hidden state or a row's logits): a few
    tokens (the attention sink) have norms 10^3-10^4 times the rest, so a tolerance on the largest
    value would hide errors on ordinary tokens. Reordered arithmetic alone gives ~1e-6 in float32
    and ~3e-2 in bfloat16 on SmolLM2; a wrong replay gives O(1). `dtype`: the model's; `valid`:
    which rows count (False on padding)."""
    ref = ref.float()
    rel = (out.float() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-6)
    if valid is not None:
        rel = rel[valid.to(rel.device)]
    worst = rel.max()
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 0.1
    if bool(worst <= tol):  # NaN fails too
        return None
    return f"the shared prefix differs from the plain forward (relative error {float(worst):.2g})"


def guarded(fn: Callable[..., T_], *args) -> tuple[T_ | None, str | None]:
    """(fn(*args), None), or (None, why) when it raised: an architecture whose blocks cannot
    continue a prefix cache falls back to plain rows. `IncompatibleTransformers` (a transformers
    internal steerscope cannot read) always propagates."""
    try:
        return fn(*args), None
    except IncompatibleTransformers:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of the shared path means "use plain rows"
        return None, f"{type(e).__name__}: {e}"


def verified(
    shared: Callable[[], torch.Tensor],
    plain: Callable[[], torch.Tensor],
    dtype: torch.dtype,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, str | None]:
    """The self-check, run once per use: the shared path's result and None when it reproduces the
    plain one; else the plain result and why sharing must be switched off."""
    out, why = guarded(shared)
    ref = plain()
    if why is None:
        why = mismatch(out, ref, dtype, valid)
    return (out, None) if why is None else (ref, why)


class PrefixKV:
    """Stands in for a transformers `Cache` while blocks are replayed (`LayerRange`): in "prefix"
    mode it keeps each layer's keys/values (K rows, one per steering); in "suffix" mode it
    prepends them, each steering's prefix repeated for its P prompts (row k*P + p), to the suffix
    rows' keys/values. Differentiable throughout."""

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
        return (
            torch.cat([pk.repeat_interleave(self.P, dim=0), key], dim=-2),
            torch.cat([pv.repeat_interleave(self.P, dim=0), value], dim=-2),
        )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.mode == "prefix" else self.C
