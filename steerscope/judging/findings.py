"""Behaviours found: clusters of completions that learned vectors show more often than chance.

A run clusters every completion (learned vectors, matched-norm random vectors, unsteered greedy,
unsteered samples at temperature). Every cluster holding a learned completion is a candidate; the
null model (judging.significance) gives it a p-value and a q-value against the random vectors and
the samples, counting vectors, not completions. A candidate is a *finding* when it is significant.

Candidates are ranked by evidence, significant ones first, then by

    score = significance + vectors + prompts + 2 * distance * naturalness

    significance  min(-log10 q, 3) / 3
    vectors       share of the learned vectors that show it
    prompts       share of the prompts it appears on, held-out prompts counting twice
    distance      mean behaviour distance of its completions from the unsteered completion of the
                  same prompt (judging.change: meaning, tail, case, surface)
    naturalness   1 when its completions are as likely under the unsteered model as the unsteered
                  replies are (mean log p per token), falling to 0 at 2 nats per token below

The last term is the product because a behaviour far from the model's default reply that the model
still finds about as likely as its own reply is the signature of a trained-in behaviour (what a
fine-tune plants); a far but unnatural cluster is a degenerate loop, a near and natural one a
rewording. Each candidate carries a one-line `reason` for its rank. The weights were chosen on the
tune half of the organism zoo (models.organisms) before the held-out half was measured.
"""

from __future__ import annotations

import math
from collections import defaultdict

from .significance import test_clusters
from .vector_metrics import completion_logprobs, nanmean

NATURAL_SPAN = 2.0  # nats per token below the unsteered replies at which naturalness reaches 0


def naturalness(logprob: float, unsteered: float) -> float:
    if not (math.isfinite(logprob) and math.isfinite(unsteered)):
        return 0.0
    return max(0.0, min(1.0, 1.0 + (logprob - unsteered) / NATURAL_SPAN))


def find_behaviours(
    lm,
    rows: list[dict],
    labels: list[int],
    clusters: list[dict],
    distances: list[float],
    *,
    chat: bool | None = None,
    alpha: float = 0.05,
    limit: int = 30,
    logprobs: dict[int, float] | None = None,
) -> list[dict]:
    """Candidates, best first (significant ones are the findings). `rows` are the run's
    completion rows ("set", "vector_id", "prompt_index", "split", "prompt", "token_ids"),
    `labels` their cluster, `distances[i]` row i's behaviour distance from the unsteered
    completion of its prompt (NaN for unsteered rows); `logprobs[i]` row i's mean log-probability
    per token under the unsteered model, when already computed (else computed here)."""
    tests = test_clusters(rows, labels, alpha=alpha)
    base = {r["prompt_index"]: i for i, r in enumerate(rows) if r["set"] == "unsteered"}
    n_learned = len({r["vector_id"] for r in rows if r["set"] == "learned"}) or 1
    splits = {r["prompt_index"]: r.get("split", "train") for r in rows}
    weight = {p: 2 if s == "heldout" else 1 for p, s in splits.items()}
    members: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(labels):
        members[c].append(i)
    found = []
    for c, t in tests.items():
        idx = [i for i in members[c] if rows[i]["set"] == "learned"]
        vecs = sorted({rows[i]["vector_id"] for i in idx})
        prompts = sorted({rows[i]["prompt_index"] for i in idx})
        info = next((x for x in clusters if x["id"] == c), {"typical": rows[idx[0]]["text"], "words": []})
        found.append(
            {
                "cluster": c,
                "vectors": vecs,
                "n_vectors": len(vecs),
                "n_learned": n_learned,
                "completions": len(idx),
                "prompts": prompts,
                "heldout": sum(rows[i].get("split") == "heldout" for i in idx),
                "heldout_prompts": sum(splits[p] == "heldout" for p in prompts),
                "distance": nanmean([distances[i] for i in idx]),
                "typical": info["typical"],
                "words": info["words"],
                "surface": info.get("surface", ""),
                "rows": idx,
                "controls": {"random": t.random, "samples": t.samples, "greedy": t.greedy},
                "p": t.p,
                "q": t.q,
                "testable": t.testable,
                "significant": t.significant,
                "single": "one vector, one prompt"
                if len(vecs) == 1 and len(prompts) == 1
                else "one vector"
                if len(vecs) == 1
                else "",
            }
        )
    # Naturalness: one batched pass over the candidates' completions and the unsteered ones.
    pick = sorted({i for f in found for i in f["rows"]} | set(base.values()))
    lps = dict(logprobs or {})
    todo = [i for i in pick if i not in lps]
    if todo:
        lps.update(
            zip(
                todo,
                completion_logprobs(
                    lm, [rows[i]["prompt"] for i in todo], [rows[i]["token_ids"] for i in todo], chat=chat
                ),
            )
        )
    unsteered = nanmean([lps[i] for i in base.values()])
    total_w = sum(weight.values()) or 1
    for f in found:
        f["logprob"] = nanmean([lps[i] for i in f["rows"]])
        f["logprob_unsteered"] = unsteered
        f["naturalness"] = naturalness(f["logprob"], unsteered)
        parts = {
            "significance": min(-math.log10(max(f["q"], 1e-300)), 3.0) / 3.0,
            "vectors": f["n_vectors"] / n_learned,
            "prompts": sum(weight[p] for p in f["prompts"]) / total_w,
            "far and natural": 2.0 * (f["distance"] if math.isfinite(f["distance"]) else 0.0) * f["naturalness"],
        }
        f["score"] = sum(parts.values())
        f["score_parts"] = {k: round(v, 3) for k, v in parts.items()}
        f["reason"] = _reason(f)
    found.sort(key=lambda f: (not f["significant"], -f["score"]))
    found = found[:limit]
    for rank, f in enumerate(found):
        f["rank"] = rank
    return found


def _reason(f: dict) -> str:
    ctrl = f["controls"]
    shown = [
        f"{ctrl['random']} random vector{'s' if ctrl['random'] != 1 else ''}" if ctrl["random"] else "",
        f"{ctrl['samples']} unsteered draw{'s' if ctrl['samples'] != 1 else ''}" if ctrl["samples"] else "",
    ]
    controls = " and ".join(x for x in shown if x) or "no control"
    sig = (
        f"significant (q = {f['q']:.2g})"
        if f["significant"]
        else f"not significant (q = {f['q']:.2g})"
        if f["testable"]
        else "cannot be significant with so few vectors"
    )
    dlp = (
        f["logprob"] - f["logprob_unsteered"]
        if math.isfinite(f["logprob"]) and math.isfinite(f["logprob_unsteered"])
        else float("nan")
    )
    nat = (
        "about as natural to the model as its own reply"
        if f["naturalness"] >= 0.75
        else "less natural than its own reply"
        if f["naturalness"] > 0.25
        else "unnatural to the model"
    )
    return (
        f"{sig}: {f['n_vectors']} of {f['n_learned']} learned vectors vs {controls}; {len(f['prompts'])} prompt"
        f"{'s' if len(f['prompts']) != 1 else ''} ({f['heldout_prompts']} held-out); distance from unsteered "
        f"{f['distance']:.2f}; {nat} (log p {'+' if dlp >= 0 else ''}{dlp:.2f} per token vs unsteered)"
    )
