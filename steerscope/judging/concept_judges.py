"""Judges for comparing steering methods (`steerscope bench`), offline by default.

AxBench (Wu et al. 2025; `../shared/reference/evals.md`) rates each steered completion 0-2 for
concept, instruction relevance and fluency and averages the per-completion harmonic mean: a
completion must do all three to score. Without network steerscope judges with the same three
axes, each named in the report:
    concept     embedding judge: MiniLM cosine to the concept's positive texts minus cosine to its
                negatives (hard negatives included), centroids from the train split; a completion
                "shows the concept" above a threshold set on the choose split (max balanced
                accuracy). `rate` = share of completions above it.
    fluency     mean log-probability per token under the unsteered model
                (`vector_metrics.completion_logprobs`); `fluency_ratio` = exp(steered - unsteered)
                clipped to [0, 1]
    relevance   MiniLM cosine between the steered and the unsteered answer to the same instruction
    score       harmonic mean of (concept rate, relevance, fluency ratio), AxBench's aggregate
With an OpenAI-compatible judge (`LLMJudge`), each completion also gets three 0-2 ratings and
their harmonic mean, as in AxBench.

A/B steerability (Rimsky et al. 2024, CAA): P(behaviour answer) against the steering multiplier;
the slope of the mean and the share of items whose own slope is negative (anti-steerable).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..directions.concepts import ABItem, Concept
from ..generation import last_token_logits
from .embed import embed
from .judge import Judge


def harmonic(xs: list[float]) -> float:
    """Harmonic mean; 0 when any term is <= 0 (AxBench: a completion must do all three)."""
    if any(not (x > 0) for x in xs):
        return 0.0
    return len(xs) / sum(1.0 / x for x in xs)


def _best_threshold(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """The cut maximising balanced accuracy (pos above, neg below)."""
    cands = torch.cat([pos, neg]).sort().values
    mids = torch.cat([cands[:1] - 1e-6, (cands[1:] + cands[:-1]) / 2, cands[-1:] + 1e-6])
    acc = torch.stack([((pos > t).float().mean() + (neg <= t).float().mean()) / 2 for t in mids])
    return float(mids[int(acc.argmax())])


@dataclass
class ConceptAxis:
    name: str
    pos: torch.Tensor  # (384,) unit centroid of train positives
    neg: torch.Tensor  # (384,) unit centroid of train negatives + hard negatives
    threshold: float
    heldout_accuracy: float  # balanced accuracy on the report split's texts


class EmbeddingJudge:
    """The offline concept judge, one axis per concept of the bench."""

    name = "embedding (MiniLM)"

    def __init__(self, concepts: list[Concept]):
        self.axes: dict[str, ConceptAxis] = {}
        for c in concepts:
            cp = torch.nn.functional.normalize(embed(c.pos("train")).mean(0), dim=0)
            cn = torch.nn.functional.normalize(embed(c.neg("train")).mean(0), dim=0)

            def s(texts: list[str], cp=cp, cn=cn) -> torch.Tensor:  # bound now: used in this iteration
                e = embed(texts)  # (n, 384)
                return e @ cp - e @ cn

            thr = _best_threshold(s(c.pos("choose")), s(c.neg("choose")))
            rp, rn = s(c.pos("report")), s(c.neg("report"))
            acc = float(((rp > thr).float().mean() + (rn <= thr).float().mean()) / 2)
            self.axes[c.name] = ConceptAxis(c.name, cp, cn, thr, acc)

    def scores(self, texts: list[str]) -> dict[str, list[float]]:
        """concept -> per-text score (cos to positives - cos to negatives)."""
        e = embed(texts)  # (n, 384)
        return {n: (e @ a.pos - e @ a.neg).tolist() for n, a in self.axes.items()}

    def shows(self, concept: str, scores: list[float]) -> list[bool]:
        return [s > self.axes[concept].threshold for s in scores]


def relevance(steered: list[str], unsteered: list[str]) -> list[float]:
    """Cosine between each steered answer and the unsteered answer to the same instruction."""
    return (embed(steered) * embed(unsteered)).sum(-1).clamp(-1, 1).tolist()


RUBRICS = {
    "concept": "Rate how clearly the RESPONSE shows this concept: {concept}. 0 = not at all, 1 = somewhat, "
    "2 = clearly. Reply with the number only.",
    "instruction": "Rate how well the RESPONSE addresses the PROMPT, ignoring style and topic drift. "
    "0 = not at all, 1 = partly, 2 = fully. Reply with the number only.",
    "fluency": "Rate the fluency of the RESPONSE. 0 = broken or repetitive, 1 = somewhat fluent, "
    "2 = fluent. Reply with the number only.",
}


class LLMJudge:
    """AxBench's three 0-2 ratings per completion from an OpenAI-compatible endpoint, cached in
    the base judge's `cache_path` (see `judging.judge.Judge`); `score` is their harmonic mean."""

    def __init__(self, base: Judge):
        # base: endpoint, model, key and cache (`judge.judge_from`); each axis rates with a copy under its own rubric
        self.base = base
        self.name = f"LLM ({base.model})"
        self._judges: dict[str, Judge] = {}

    def _judge(self, axis: str, concept: str) -> Judge:
        key = f"{axis}:{concept if axis == 'concept' else ''}"
        if key not in self._judges:
            self._judges[key] = dataclasses.replace(self.base, rubric=RUBRICS[axis].format(concept=concept))
        return self._judges[key]

    def check_reachable(self) -> None:
        self._judge("fluency", "").check_reachable()

    def rate(self, concept: Concept, prompts: list[str], texts: list[str]) -> list[dict]:
        rows = []
        for p, t in zip(prompts, texts):
            r = {ax: self._judge(ax, concept.description).score(p, t) for ax in RUBRICS}
            vals = [v for v in r.values() if v is not None]
            r["score"] = harmonic([min(2.0, max(0.0, v)) for v in vals]) if len(vals) == 3 else None
            rows.append(r)
        return rows

    @property
    def failures(self) -> int:
        return sum(j.failures for j in self._judges.values())


# ---- A/B steerability -------------------------------------------------------------------------
def ab_prompts(items: list[ABItem]) -> tuple[list[str], list[bool]]:
    """Question + two lettered answers; the behaviour is (A) on even items and (B) on odd ones, so
    a letter preference cancels out. Returns the prompts and whether A is the behaviour."""
    prompts, a_is = [], []
    for i, it in enumerate(items):
        a, b = (it.behaviour, it.other) if i % 2 == 0 else (it.other, it.behaviour)
        prompts.append(f"{it.question}\n\n(A) {a}\n(B) {b}\n\nAnswer with A or B.")
        a_is.append(i % 2 == 0)
    return prompts, a_is


@torch.no_grad()
def ab_curve(
    lm,
    items: list[ABItem],
    vector: torch.Tensor | None,
    layer: int,
    multipliers: list[float],
    unit: float = 1.0,
    system: str | None = None,
) -> dict:
    """P(behaviour answer) per item at coefficients `multipliers` x `unit` (the matched
    coefficient, so slopes compare across methods), read at the answer token after "(" (CAA's
    protocol) and renormalised over the two letters. Slopes are per unit multiplier."""
    coefs = list(multipliers)
    prompts, a_is = ab_prompts(items)
    formatted = [lm.format_prompt(p, None, system) + "(" for p in prompts]
    ids_a = lm.tokenizer.encode("A", add_special_tokens=False)[0]
    ids_b = lm.tokenizer.encode("B", add_special_tokens=False)[0]
    a_mask = torch.tensor(a_is)
    if vector is None:
        logits = last_token_logits(lm, formatted, chat=False)[0][None].expand(len(coefs), -1, -1)  # (C, n, V)
    else:  # every multiplier in one batched call, a coefficient per row
        rows = torch.as_tensor(vector, dtype=torch.float32).reshape(1, -1).expand(len(coefs), -1)
        logits = last_token_logits(lm, formatted, vectors=rows, layer=layer, coef=[c * unit for c in coefs], chat=False)
    pa = torch.softmax(logits[..., [ids_a, ids_b]].float(), -1)[..., 0].cpu()  # (C, n) P(A | A or B)
    probs = [torch.where(a_mask, p, 1 - p) for p in pa]
    P = torch.stack(probs)  # (n_coefs, n_items)
    x = torch.tensor(coefs, dtype=torch.float32)
    xc = x - x.mean()
    denom = float((xc**2).sum()) or 1.0
    item_slopes = (xc[:, None] * (P - P.mean(0))).sum(0) / denom  # (n_items,)
    mean = P.mean(1)
    return {
        "multipliers": coefs,
        "unit": unit,
        "p_behaviour": mean.tolist(),
        "per_item": P.T.tolist(),
        "slope": float((xc * (mean - mean.mean())).sum() / denom),
        "anti_steerable": float((item_slopes < 0).float().mean()),
        "p_at_0": float(mean[coefs.index(0.0)]) if 0.0 in coefs else math.nan,
    }
