"""What the server does to a row's next-token logits for the OpenAI fields: presence and
frequency penalties, and log-probabilities (the chosen token's and the top k)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def penalised(logits: torch.Tensor, rows: Sequence[tuple[list[int], float, float]]) -> torch.Tensor:
    """(B, vocab) logits with OpenAI's penalties over each row's generated tokens: row i is
    (generated ids, presence penalty, frequency penalty). A new tensor when any row has a
    penalty; `logits` itself otherwise."""
    out = None
    for i, (ids, presence, frequency) in enumerate(rows):
        if (presence or frequency) and ids:
            if out is None:
                out = logits.clone()
            counts = torch.bincount(torch.tensor(ids), minlength=logits.shape[-1])[: logits.shape[-1]]
            counts = counts.to(logits.device, logits.dtype)
            out[i] -= frequency * counts + presence * (counts > 0).to(logits.dtype)
    return logits if out is None else out


def logprobs_of(row_logits: torch.Tensor, token: int, k: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """(log p(token), the k most likely (token id, log p)) from one row's (vocab,) logits."""
    lsm = torch.log_softmax(row_logits.float(), dim=-1)
    top = torch.topk(lsm, k) if k > 0 else None
    pairs = tuple(zip(top.indices.tolist(), top.values.tolist())) if top is not None else ()
    return float(lsm[token]), pairs
