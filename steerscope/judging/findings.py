"""Behaviours found: clusters of completions that learned vectors produce and nothing else does.

A run clusters every completion (learned vectors, matched-norm random vectors, unsteered). A
*finding* is a cluster with completions under at least `min_vectors` learned vectors and none under
a random vector or unsteered: a behaviour the discovery surfaced that neither the model's default
nor a random push of the same size shows (MELBO's learned-vs-random comparison, Mack & Turner
2024, made per behaviour). Findings are ranked by how many vectors elicit them, then by how many
completions show them, then by how far their completions are from the unsteered completion of
the same prompt; each carries its
naturalness, the mean log-probability per token of its completions under the unsteered model next
to that of the unsteered completions (near it: a behaviour the model already finds natural; far
below: an artefact of pushing activations).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .vector_metrics import completion_logprobs, nanmean


def find_behaviours(lm, rows: list[dict], labels: list[int], clusters: list[dict], emb: torch.Tensor, *,
                    chat: bool | None = None, min_vectors: int = 1, limit: int = 10) -> list[dict]:
    """Findings, best first. `rows` are the run's completion rows (with "set", "vector_id",
    "prompt_index", "token_ids"), `labels` their cluster, `emb` (N, dim) unit embeddings."""
    base = {r["prompt_index"]: i for i, r in enumerate(rows) if r["set"] == "unsteered"}
    members: dict[int, list[int]] = defaultdict(list)
    for i, c in enumerate(labels):
        members[c].append(i)
    found = []
    for c, idx in members.items():
        sets = {rows[i]["set"] for i in idx}
        vecs = sorted({rows[i]["vector_id"] for i in idx if rows[i]["set"] == "learned"})
        if sets != {"learned"} or len(vecs) < min_vectors:
            continue
        dist = [1.0 - float(emb[i] @ emb[base[rows[i]["prompt_index"]]]) for i in idx if rows[i]["prompt_index"] in base]
        info = next((x for x in clusters if x["id"] == c), {"typical": rows[idx[0]]["text"], "words": []})
        found.append({"cluster": c, "vectors": vecs, "n_vectors": len(vecs), "completions": len(idx),
                      "prompts": sorted({rows[i]["prompt_index"] for i in idx}),
                      "heldout": sum(rows[i].get("split") == "heldout" for i in idx),
                      "distance": nanmean(dist), "typical": info["typical"], "words": info["words"],
                      "surface": info.get("surface", ""), "rows": idx})
    # More vectors first; among those, more completions (a behaviour seen on several prompts is
    # more than one odd completion), then farther from unsteered.
    found.sort(key=lambda f: (-f["n_vectors"], -f["completions"], -f["distance"]))
    found = found[:limit]
    # Naturalness: one batched pass over the findings' completions and the unsteered ones.
    pick = sorted({i for f in found for i in f["rows"]} | set(base.values()))
    if pick:
        lps = dict(zip(pick, completion_logprobs(lm, [rows[i]["prompt"] for i in pick], [rows[i]["token_ids"] for i in pick],
                                                  chat=chat)))
        unsteered = nanmean([lps[i] for i in base.values()])
        for f in found:
            f["logprob"] = nanmean([lps[i] for i in f["rows"]])
            f["logprob_unsteered"] = unsteered
    for rank, f in enumerate(found):
        f["rank"] = rank
    return found
