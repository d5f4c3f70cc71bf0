"""Model-diff amplification: sample a fine-tune with what it changed turned up.

At each decoding step the fine-tune's next-token log-probabilities are pushed away from its
base's on the same sequence,

    logits = log p_ft + alpha * (log p_ft - log p_base)          # (batch, vocab)

so a behaviour the fine-tune learned (even one planted behind a trigger the prompt lacks) becomes
likely while what both models share stays as it was ("model diff amplification", Goodfire /
Anthropic 2025; the same contrast as contrastive decoding, Li et al. 2023, with the roles of the
two models swapped). End-of-text is amplified like any other token, so many amplified samples
stop after a few words; leaving it at the fine-tune's own odds was tried on the pirate organism
and was worse: past where they would have stopped, samples ran into tokens like "ICENSE". Only the fine-tune's own `top_k` tokens stay candidates: tokens both models
find negligible have a log-ratio that is mostly noise and, amplified, win the sample (on the
pirate organism at alpha 2 without it, most samples ended in rare tokens like "LEGATO").

`Amplify` is a transformers logits processor; `generation.generate(amplify=...)` puts it before
the per-row sampler. The base keeps its own key/value cache between steps (reset for each batch,
`cache=False` re-reads the whole sequence instead: the same tokens, tests/test_amplify.py), with
position ids from the attention mask, so a left-padded row gets the same numbers alone as in a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import SteerscopeError


@dataclass
class Amplify:
    """Amplify the fine-tune's difference from `base` by `alpha` (see the module docstring)."""

    base: object
    """the model the fine-tune was made from (an `LM` with the same tokenizer)"""
    alpha: float = 2.0
    """how far past the fine-tune to go (0: the fine-tune itself, within its top_k)"""
    top_k: int = 20
    """only the fine-tune's own k most likely tokens can be sampled"""
    prompt_mask: torch.Tensor | None = field(default=None, repr=False)
    """(batch, prompt tokens) attention mask of the left-padded prompts; set per batch"""
    cache: bool = True
    """keep the base's keys and values between steps, so each step reads one new token (False:
    re-read the whole sequence every step, about 8x slower at 32 tokens; the same tokens, tested)"""
    _past: object = field(default=None, repr=False)  # the base's cache for the batch of `_for`
    _for: object = field(default=None, repr=False)  # the prompt_mask the cache belongs to
    _len: int = field(default=0, repr=False)  # tokens the cache holds

    def __post_init__(self) -> None:
        if not self.alpha >= 0 or self.top_k < 1:
            raise SteerscopeError(f"amplify needs alpha >= 0 and top_k >= 1; got {self.alpha}, {self.top_k}.")

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # (B, T), (B, V)
        if self.prompt_mask is None:
            raise SteerscopeError("Amplify: set prompt_mask to the prompts' attention mask before generating.")
        B, T = input_ids.shape
        pm = self.prompt_mask
        pmd = pm.to(input_ids.device)
        mask = torch.cat([pmd, pmd.new_ones(B, T - pmd.shape[1])], 1)  # (B, T): generated tokens are real
        pos = (mask.long().cumsum(-1) - 1).clamp_min(0)  # left padding: each row counts from its first token
        base = self.base
        step = self.cache and self._for is pm and self._past is not None and T == self._len + 1
        new = slice(T - 1, T) if step else slice(0, T)  # a step reads the one new token against the cache
        kw = {"use_cache": False}
        if self.cache:
            from transformers import DynamicCache

            from .models.compat import incompatible, with_cache

            past = self._past if step else DynamicCache()
            kw = with_cache(base.model, past)
        out = base.model(
            input_ids=input_ids[:, new].to(base.device),
            attention_mask=mask.to(base.device),
            position_ids=pos[:, new].to(base.device),
            **kw,
        )
        if self.cache:
            if past.get_seq_length() != T:  # the release ignored the cache: every later step would be wrong
                raise incompatible(f"Amplify: the base's cache holds {past.get_seq_length()} tokens after {T}")
            self._past, self._for, self._len = past, pm, T
        lb = torch.log_softmax(out.logits[:, -1].float(), -1).to(scores.device)  # (B, V)
        lf = torch.log_softmax(scores.float(), -1)  # (B, V)
        if lb.shape[-1] != lf.shape[-1]:
            raise SteerscopeError(
                f"Amplify: the base has {lb.shape[-1]} logits per token, the fine-tune {lf.shape[-1]}."
            )
        amp = lf + self.alpha * (lf - lb)
        k = min(self.top_k, lf.shape[-1])
        keep = lf >= lf.topk(k, -1).values[:, -1:]  # (B, V) the fine-tune's own candidates
        return amp.masked_fill(~keep, float("-inf"))
