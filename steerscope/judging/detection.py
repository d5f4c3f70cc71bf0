"""Detection: does a direction tell texts with a concept from texts without it?

AxBench's detection measure (Wu et al. 2025; see `../shared/reference/evals.md`): score every
text by the maximum over its tokens of the projection of the residual stream on the unit
direction, then the AUROC of positives against negatives (and, separately, against hard
negatives: texts that share surface features with the concept but lack it). Max-over-tokens,
because a concept present in one phrase of a text should count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SteerscopeError
from ..models.activations import read_layer


@dataclass
class Detection:
    """AUROC of max-over-tokens projection scores; `scores_*` are kept for ROC curves."""

    auroc: float  # positives vs negatives
    auroc_hard: float | None  # positives vs hard negatives
    scores_pos: list[float]
    scores_neg: list[float]
    scores_hard: list[float] | None


def auroc(pos: list[float] | torch.Tensor, neg: list[float] | torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting half (the
    Mann-Whitney form of the area under the ROC curve)."""
    p = torch.as_tensor(pos, dtype=torch.float64).reshape(-1, 1)
    n = torch.as_tensor(neg, dtype=torch.float64).reshape(1, -1)
    if p.numel() == 0 or n.numel() == 0:
        raise SteerscopeError("AUROC needs at least one positive and one negative text.")
    return float((p > n).double().mean() + 0.5 * (p == n).double().mean())


def roc_curve(pos: list[float], neg: list[float]) -> list[tuple[float, float]]:
    """(false-positive rate, true-positive rate) points, from the highest threshold down."""
    thresholds = sorted(set(pos) | set(neg), reverse=True)
    pts = [(0.0, 0.0)]
    for t in thresholds:
        pts.append((sum(s >= t for s in neg) / len(neg), sum(s >= t for s in pos) / len(pos)))
    return pts


@torch.no_grad()
def max_projection(
    lm, texts: list[str], direction: torch.Tensor, layer: int, *, batch_size: int = 16, skip_first: bool = True
) -> list[float]:
    """Max over each text's tokens of (residual at `layer`) . unit(direction). The first token
    (BOS or the first word, whose residual norm is often an outlier) is skipped when the text
    has more than one token."""
    d = torch.as_tensor(direction, dtype=torch.float32).reshape(-1)
    if d.shape[0] != lm.d_model or float(d.norm()) == 0.0:
        raise SteerscopeError(f"the direction must be a non-zero vector of size {lm.d_model}.")
    d = d / d.norm()
    out: list[float] = []
    for i in range(0, len(texts), batch_size):
        enc = lm.encode(texts[i : i + batch_size], chat=False)
        h = read_layer(lm, layer, enc["input_ids"], enc["attention_mask"]).float()  # (B, T, d) on its block's device
        proj = h @ d.to(h.device)  # (B, T)
        valid = enc["attention_mask"].bool().to(h.device)
        if skip_first:
            first = valid & (valid.long().cumsum(-1) == 1)
            valid = valid & ~(first & (valid.sum(-1, keepdim=True) > 1))
        out += proj.masked_fill(~valid, float("-inf")).max(-1).values.cpu().tolist()
    return out


def detect(
    lm,
    direction: torch.Tensor,
    layer: int,
    positives: list[str],
    negatives: list[str],
    hard_negatives: list[str] | None = None,
) -> Detection:
    """AUROC of `direction` at `layer` on held-out texts."""
    sp = max_projection(lm, positives, direction, layer)
    sn = max_projection(lm, negatives, direction, layer)
    sh = max_projection(lm, hard_negatives, direction, layer) if hard_negatives else None
    return Detection(auroc(sp, sn), auroc(sp, sh) if sh else None, sp, sn, sh)
