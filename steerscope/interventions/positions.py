"""Which token positions an intervention touches, correct in every forward call.

A forward call may be a full pass over a (left-padded) batch, the prefill of `generate`, or one
cached decoding step that sees a single new token per row. `StepState` is updated by an observer
hook on the decoder stack before every call: from the 2-D attention mask over past + current
tokens and the cache length (`models.compat.past_length`, which raises rather than guess), for
every token of the call,

    abs_pos[b, t]  index of the token in row b's unpadded sequence (0 = first real token)
    valid[b, t]    False on padding, which is never steered
    prompt_len[b]  number of real tokens in row b's first (cache-empty) call

"prompt" = tokens of that first call; "generated" = everything after. A call with no cache is a
new first call, so a plain forward treats every token as prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..config import parse_last
from ..errors import SteerscopeError
from ..models.compat import check_positions, past_length

PositionKind = Literal["all", "prompt", "generated", "range", "prompt_tail"]


@dataclass(frozen=True)
class Positions:
    """A position selector. Build with the constructors below, e.g. `Positions.range(0, 4)`."""

    kind: PositionKind = "all"
    start: int | None = None
    stop: int | None = None
    k: int | None = None  # prompt_tail: how many of the last prompt tokens

    @staticmethod
    def all() -> Positions:
        return Positions("all")

    @staticmethod
    def prompt() -> Positions:
        return Positions("prompt")

    @staticmethod
    def generated() -> Positions:
        return Positions("generated")

    @staticmethod
    def range(start: int = 0, stop: int | None = None) -> Positions:
        """Absolute token indices [start, stop) in each row's unpadded sequence (prompt and
        generated tokens counted together)."""
        if start < 0 or (stop is not None and stop < start):
            raise SteerscopeError(f"Positions.range needs 0 <= start <= stop, got ({start}, {stop}).")
        return Positions("range", start, stop)

    @staticmethod
    def prompt_tail(k: int) -> Positions:
        """The last k prompt tokens (e.g. the post-instruction template tokens of a chat prompt)."""
        if k < 1:
            raise SteerscopeError(f"Positions.prompt_tail needs k >= 1, got {k}.")
        return Positions("prompt_tail", k=k)

    @staticmethod
    def parse(spec: str) -> Positions:
        """CLI form: all | prompt | generated | A:B | A: | last:K (the last K prompt tokens)."""
        s = spec.strip()
        if s in ("all", "prompt", "generated"):
            return Positions(s)  # type: ignore[arg-type]
        if s.startswith(("last:", "tail:")):
            try:
                return Positions.prompt_tail(int(parse_last(s)))
            except SteerscopeError as e:
                raise SteerscopeError(f"cannot parse positions {spec!r}: {e}") from None
        if ":" in s:
            try:
                a, b = s.split(":", 1)
                return Positions.range(int(a or 0), int(b) if b else None)
            except ValueError:
                pass
        raise SteerscopeError(f"cannot parse positions {spec!r}; use all, prompt, generated, A:B, A: or last:K.")

    def mask(self, st: StepState) -> torch.Tensor:
        """(batch, pos) bool: True where this call's tokens are selected (never on padding)."""
        pos = st.abs_pos  # (B, T)
        if self.kind == "all":
            sel = st.valid
        elif self.kind == "range":
            sel = pos >= self.start
            if self.stop is not None:
                sel = sel & (pos < self.stop)
        else:
            plen = st.require_prompt_len()[:, None]  # (B, 1)
            if self.kind == "prompt":
                sel = pos < plen
            elif self.kind == "generated":
                sel = pos >= plen
            elif self.kind == "prompt_tail":
                sel = (pos < plen) & (pos >= plen - self.k)
            else:
                raise SteerscopeError(f"unknown position kind {self.kind!r}.")
        return sel & st.valid


ALL = Positions("all")


class StepState:
    """Per-call token bookkeeping shared by all hooks of one `steer(...)` block."""

    def __init__(self, prompt_len: torch.Tensor | None = None) -> None:
        self.abs_pos: torch.Tensor | None = None  # (B, T) long
        self.valid: torch.Tensor | None = None  # (B, T) bool
        self.prompt_len: torch.Tensor | None = None  # (B,) long
        # Known prompt lengths, for callers whose calls do not start with the prompt pass: a
        # decode loop entering `steer` per step, or decoding without a KV cache (every call
        # then has no cache, and would otherwise count the generated tokens as prompt).
        self.pinned = None if prompt_len is None else torch.as_tensor(prompt_len, dtype=torch.long)
        self.all_valid = True
        self._masks: dict[Positions, torch.Tensor] = {}

    @property
    def batch_size(self) -> int:
        return 0 if self.valid is None else int(self.valid.shape[0])

    def require_prompt_len(self) -> torch.Tensor:
        if self.prompt_len is None or self.prompt_len.shape[0] != self.batch_size:
            raise SteerscopeError(
                "prompt/generated positions need to see the prompt pass: enter `steer(...)` before "
                "the first forward call of the generation."
            )
        return self.prompt_len

    def selection(self, positions: Positions, device: torch.device | None = None) -> torch.Tensor | None:
        """(B, T, 1) bool mask for `positions` on `device` (a block's device when the model is
        split across devices), cached for this call; None means "every token" (no padding and
        all positions selected), which lets hooks skip the masking."""
        if positions.kind == "all" and self.all_valid:
            return None
        m = self._masks.get((positions, device))
        if m is None:
            m = self._masks.get((positions, None))
            if m is None:
                m = self._masks[(positions, None)] = positions.mask(self)[..., None]
            if device is not None and m.device != device:
                m = m.to(device)
            self._masks[(positions, device)] = m
        return m

    # Observer hook on the decoder stack: reads the call's kwargs, changes nothing.
    def observe(self, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise SteerscopeError("steerscope needs input_ids or inputs_embeds to track positions.")
        B, T = int(ref.shape[0]), int(ref.shape[1])
        device = ref.device
        am = kwargs.get("attention_mask")
        if isinstance(am, dict) or (am is not None and am.dim() != 2):
            raise SteerscopeError(
                "steerscope needs a 2-D (batch, seq) attention mask to know which tokens are padding."
            )
        # Never assume an empty cache: past_length raises, naming the transformers version, when
        # this call's cached-token count cannot be read (a cached step read as past = 0 steers
        # the wrong tokens of every left-padded row).
        past = past_length(args, kwargs, T, None if am is None else int(am.shape[1]))
        if am is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=device)
            abs_pos = torch.arange(past, past + T, device=device).expand(B, T)
        else:
            full = am.to(device).bool()[:, : past + T]  # (B, past + T): a static cache may pass a wider mask
            abs_pos = (full.long().cumsum(-1) - 1)[:, -T:]
            valid = full[:, -T:]
        check_positions(kwargs, abs_pos, valid, past)
        self.abs_pos, self.valid = abs_pos, valid
        self.all_valid = bool(valid.all())
        self._masks = {}
        if self.pinned is not None:
            self.prompt_len = self.pinned.to(device)
        elif past == 0:
            self.prompt_len = valid.sum(-1)
