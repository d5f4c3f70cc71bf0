"""Per-vector metrics for a set of steered completions.

target_change   mean ||Z_t(v) - Z_t(0)|| / mean ||Z_t(0)|| over the target tokens of the prompts
kl_neutral      mean KL(p_base || p_steered) of the next token at the last position of neutral
                prompts (side effects; Arditi et al. use 0.1 as a bound)
logprob         mean log-probability per token of the steered completion under the UNsteered
                model (naturalness; AxBench's fluency proxy is its exponentiated negative)
distinct2       distinct bigrams / bigrams of the completion's tokens (1 = no repetition)
embed_distance  1 - cosine(embedding(steered), embedding(unsteered)) for the same prompt
changed         share of prompts whose completion differs from the unsteered one
score:<name>    mean of each text scorer (refusal phrases, VADER sentiment, regex, judge, ...)
score:<name>@fired, score:<name>@unfired
                with a gate (`generate(when=)`, CAST): the scorer's mean over the rows whose
                gate fired / did not (NaN when there are none); kl_neutral stays the ungated
                vector's side effect
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..generation import Completion, last_token_logits
from ..models.layer_range import LayerRange
from .metrics import Metric, kl_divergence


def distinct_n(ids: list[int], n: int = 2) -> float:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


@torch.no_grad()
def completion_logprobs(
    lm, prompts: list[str], completions: list[list[int]], *, chat: bool | None = None, batch_size: int = 16
) -> list[float]:
    """Mean log-probability per token of each completion given its prompt, unsteered model."""
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        ps, cs = prompts[i : i + batch_size], completions[i : i + batch_size]
        prompt_ids = [lm.encode([p], chat=chat)["input_ids"][0].tolist() for p in ps]
        seqs = [p + c for p, c in zip(prompt_ids, cs)]
        ids, mask = lm.left_pad(seqs)  # (B, T)
        T = ids.shape[1]
        # Left padding ends every completion at column T: only the last K columns need logits.
        K = min(T, max(len(c) for c in cs) + 1)
        logits = lm.last_logits(ids, mask, k=K)  # (B, K, V)
        logp = torch.log_softmax(logits.float(), -1)
        for b, c in enumerate(cs):
            if not c:
                out.append(float("nan"))
                continue
            start = K - len(c)  # first completion column; predicted from column start - 1
            lp = logp[b, start - 1 : K - 1].gather(-1, torch.tensor(c, device=logp.device)[:, None])
            out.append(float(lp.mean()))
    return out


def compute_vector_metrics(
    lm,
    vs,
    completions: list[Completion],
    *,
    neutral: list[str],
    layer_range: LayerRange | None,
    target_tokens: str = "all",
    scorers: list[Metric] = (),
    chat: bool | None = None,
    embeddings: dict[int, torch.Tensor] | None = None,
    logprobs: dict[int, float] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics for every vector of `vs` from `completions` (which include the unsteered rows,
    vector_id None). `embeddings` maps id(completion) -> its embedding, `logprobs` id(completion)
    -> its `completion_logprobs`, when precomputed."""
    from .embed import embed

    base = {(c.prompt_index, c.prompt): c for c in completions if c.vector_id is None}
    by_vec: dict[str, list[Completion]] = defaultdict(list)
    for c in completions:
        if c.vector_id is not None:
            by_vec[c.vector_id].append(c)
    if embeddings is None:
        embeddings = dict(zip(map(id, completions), embed([c.text for c in completions])))
    metrics: dict[str, dict[str, float]] = {vid: {} for vid in vs.ids}
    # side effects on neutral prompts, one batched pass for all vectors
    logits = last_token_logits(lm, neutral, vectors=vs, include_unsteered=True, chat=chat)  # (1 + K, P, V)
    kl = kl_divergence(logits[:1].expand_as(logits[1:]), logits[1:]).mean(1)
    if layer_range is not None:
        tmask = layer_range.target_mask(target_tokens)
        base_norm = layer_range.z_target.float().norm(dim=-1)[tmask].mean()
        with torch.no_grad():
            delta = layer_range.delta(vs.vectors).norm(dim=-1).view(len(vs), layer_range.P, -1)  # (K, P, T)
        # the layer range adds at its source layer: a vector placed elsewhere has no number here
        change = [
            float(delta[k][tmask].mean() / base_norm) if vs.layers[k] == layer_range.source else float("nan")
            for k in range(len(vs))
        ]
    else:
        change = [float("nan")] * len(vs)
    steered = [c for vid in vs.ids for c in by_vec[vid]]
    if logprobs is not None and all(id(c) in logprobs for c in steered):
        lp_of = logprobs
    else:
        lp_of = dict(
            zip(
                map(id, steered),
                completion_logprobs(lm, [c.prompt for c in steered], [c.token_ids for c in steered], chat=chat),
            )
        )
    score_of = {
        s.name: dict(
            zip(map(id, steered), s.score_texts([c.text for c in steered], [c.prompt for c in steered]).tolist())
        )
        for s in scorers
    }
    for k, vid in enumerate(vs.ids):
        rows = by_vec[vid]
        m = metrics[vid]
        m["target_change"] = change[k]
        m["kl_neutral"] = float(kl[k])
        m["logprob"] = nanmean([lp_of[id(c)] for c in rows])
        m["distinct2"] = nanmean([distinct_n(c.token_ids) for c in rows])
        m["embed_distance"] = nanmean(
            [
                1 - float(embeddings[id(c)] @ embeddings[id(base[(c.prompt_index, c.prompt)])])
                for c in rows
                if (c.prompt_index, c.prompt) in base
            ]
        )
        m["changed"] = nanmean(
            [
                float(c.token_ids != base[(c.prompt_index, c.prompt)].token_ids)
                for c in rows
                if (c.prompt_index, c.prompt) in base
            ]
        )
        for s in scorers:
            m[f"score:{s.name}"] = nanmean([score_of[s.name][id(c)] for c in rows])
            if any(c.gate_fired is not None for c in rows):
                for side, want in (("fired", True), ("unfired", False)):
                    got = [score_of[s.name][id(c)] for c in rows if bool(c.gate_fired) == want]
                    m[f"score:{s.name}@{side}"] = nanmean(got)
    return metrics


def nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]  # drop NaN
    return float(sum(xs) / len(xs)) if xs else float("nan")
