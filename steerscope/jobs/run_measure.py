"""The main job's "measure" stage (`jobs.run`): per-vector metrics, the clusters of every
completion (learned, random, unsteered samples), the findings tested against both controls, the
learned-vs-random summary and the norm sweeps, as one dict (the run's metrics.json).

`ctx` is the run's stage context (`jobs.run._RunContext`: cfg, lm, layer_range, artifacts, t0, log).
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from ..directions.vectors import VectorSet
from ..generation import Completion
from ..progress import bar


def completions_of(rows: list[dict]) -> list[Completion]:
    keys = Completion.__dataclass_fields__
    return [Completion(**{k: r[k] for k in keys if k in r}) for r in rows]  # fields added since default


def measure(ctx) -> dict:
    """The run's "measure" stage: metrics.json's content (module docstring)."""
    # A bar over its parts: embedding, log-probabilities, vector metrics, distances, clustering,
    # findings, then one norm sweep per source layer of the swept vectors (kl, melbo: one).
    n_sweeps = min(ctx.cfg.sweep_top, len(set(ctx.artifacts["discover"].layers)))  # at most; the bar may end early
    with bar(6 + n_sweeps, "measure", "part") as parts:
        return _measured(ctx, parts)


def _gate(ctx, rows: list[dict]) -> dict | None:
    """--when's gate and its decision per prompt (None without one). The condition is read before
    any vector is added, so every steered row of a prompt shares its prompt's decision."""
    c = ctx.when
    if c is None:
        return None
    per = {}
    for r in rows:
        if r.get("gate_fired") is not None:
            per.setdefault(r["prompt_index"], {"fired": r["gate_fired"], "score": r["gate_score"]})
    prompts = ctx.train + ctx.heldout
    return {
        "condition": ctx.cfg.when,
        "layer": c.layer,
        "threshold": float(c.threshold),
        "above": bool(c.above),
        "prompts": [{"prompt_index": i, "prompt": prompts[i], **per[i]} for i in sorted(per)],
        "fired": sum(p["fired"] for p in per.values()),
    }


def _then(parts, name: str) -> None:
    """The previous part is done, `name` starts (the bar's lines say which)."""
    parts.set_postfix(now=name)
    parts.update(1)


def _measured(ctx, parts) -> dict:
    from ..judging.change import Texts, distance
    from ..judging.cluster import cluster_texts
    from ..judging.findings import find_behaviours
    from ..judging.norm_sweep import norm_sweep, sweep_to_dicts
    from ..judging.significance import power
    from ..judging.vector_metrics import completion_logprobs, compute_vector_metrics, nanmean

    cfg, lm = ctx.cfg, ctx.lm
    learned, control, rows = ctx.artifacts["discover"], ctx.artifacts["control"], ctx.artifacts["generate"]
    sets = {**{i: "learned" for i in learned.ids}, **{i: "random" for i in control.ids}}
    ctx.log("measuring, clustering, testing findings and sweeping")
    parts.set_postfix(now="embedding")
    rep = Texts.of([r["text"] for r in rows])  # every row, samples included: the clusters see them all
    steered_rows = [i for i, r in enumerate(rows) if r["set"] != "sample"]
    completions = completions_of([rows[i] for i in steered_rows])
    both = VectorSet.create(
        lm,
        torch.cat([learned.vectors, control.vectors]),
        learned.layers + control.layers,
        "run",
        ids=learned.ids + control.ids,
    )
    scorers = list(ctx.scorers)
    if cfg.judge_url:
        from ..judging.judge import judge_from

        scorers.append(judge_from(cfg, ctx.folder.path("judge_cache.jsonl"), default_model="judge").metric())
    h = learned.config.hyperparams
    _then(parts, "log-probabilities")
    # Log-probabilities under the unsteered model, once: per-vector naturalness and the findings' both use them.
    lps = completion_logprobs(
        lm, [c.prompt for c in completions], [c.token_ids for c in completions], chat=cfg.discover.chat
    )
    _then(parts, "vector metrics")
    per_vector = compute_vector_metrics(
        lm,
        both,
        completions,
        neutral=ctx.neutral,
        layer_range=ctx.layer_range,
        target_tokens=h.get("target_tokens", "all"),
        scorers=scorers,
        chat=cfg.discover.chat,
        embeddings=dict(zip(map(id, completions), rep.meaning[steered_rows])),
        logprobs=dict(zip(map(id, completions), lps)),
    )
    _then(parts, "distances")
    # Each row's behaviour distance from the greedy unsteered completion of its prompt.
    base = {r["prompt_index"]: i for i, r in enumerate(rows) if r["set"] == "unsteered"}
    other = [i for i, r in enumerate(rows) if r["set"] != "unsteered"]
    dist = [float("nan")] * len(rows)
    steered, unsteered = rep.select(other), rep.select([base[rows[i]["prompt_index"]] for i in other])
    d_all, d_moved = distance(steered, unsteered), distance(steered, unsteered, tails=False)
    for i, d in zip(other, d_all.tolist()):
        dist[i] = d
    moved = {
        s: nanmean([float(d > cfg.cluster_threshold) for i, d in zip(other, d_moved.tolist()) if rows[i]["set"] == s])
        for s in ("learned", "random", "sample")
    }
    _then(parts, "clustering")
    clustering = cluster_texts([r["text"] for r in rows], rep, cfg.cluster_threshold)
    clusters = [asdict(c) for c in clustering.clusters]
    _then(parts, "findings")
    findings = find_behaviours(
        lm,
        rows,
        clustering.labels,
        clusters,
        dist,
        chat=cfg.discover.chat,
        alpha=cfg.alpha,
        logprobs=dict(zip(steered_rows, lps)),
    )
    for vid, m in per_vector.items():
        m["clusters"] = sorted({clustering.labels[i] for i, r in enumerate(rows) if r["vector_id"] == vid})
    summary = {}
    for s in ("learned", "random"):
        idx = [i for i, r in enumerate(rows) if r["set"] == s]
        vids = [v for v, k in sets.items() if k == s]
        summary[s] = {
            "vectors": len(vids),
            "completions": len(idx),
            "distinct_completions": len({rows[i]["text"] for i in idx}),
            "clusters": len({clustering.labels[i] for i in idx}),
            "moved": moved[s],
            **{
                f"mean_{k}": nanmean([per_vector[v][k] for v in vids])
                for k in ("target_change", "kl_neutral", "logprob", "distinct2", "embed_distance", "changed")
            },
        }
    # (a vector at the last layer has no later layer to measure a sweep at: weightdiff --at block)
    top = [v for v in learned.ids if learned[v].layer < lm.n_layers - 1]
    top = sorted(top, key=lambda v: -per_vector[v]["embed_distance"])[: cfg.sweep_top]
    unsteered_train = [c for c in completions if c.vector_id is None and c.prompt_index < len(ctx.train)]
    sweep = {}
    for layer in sorted({learned[v].layer for v in top}):  # one batched sweep per source layer (kl: one)
        ids = [v for v in top if learned[v].layer == layer]
        _then(parts, f"norm sweep, layer {layer}")
        sub = VectorSet.create(
            lm, torch.stack([learned[v].vector for v in ids]), [layer] * len(ids), "sweep", ids=ids, hyperparams=h
        )
        sweep.update(
            {
                v: sweep_to_dicts(r)
                for v, r in norm_sweep(
                    lm,
                    ctx.train,
                    sub,
                    cfg.sweep_multiples,
                    max_new_tokens=cfg.max_new_tokens,
                    chat=cfg.discover.chat,
                    layer_range=ctx.layer_range,
                    unsteered=unsteered_train,
                    each=True,
                ).items()
            }
        )
    sweep = {v: sweep[v] for v in top}
    parts.set_postfix()  # nothing runs now
    parts.update(1)
    n_samples = len({r["vector_id"] for r in rows if r["set"] == "sample"})
    testable = sum(f["testable"] for f in findings)
    return {
        "vectors": per_vector,
        "sets": sets,
        "summary": summary,
        "sweep": sweep,
        "findings": findings,
        "clusters": clusters,
        "labels": clustering.labels,
        "map": clustering.xy,
        "null_model": {
            "alpha": cfg.alpha,
            "learned": len(learned),
            "random": len(control),
            "samples": n_samples,
            "temperature": cfg.sample_temperature,
            "testable": testable,
            "significant": sum(f["significant"] for f in findings),
            "power": power(cfg.alpha, len(learned), len(control), n_samples, testable),
        },
        "moved": moved,
        "discovery": {
            k: h.get(k)
            for k in (
                "method",
                "source",
                "target",
                "R",
                "target_tokens",
                "calibration",
                "final_objective",
                "singular_values",
                "steps_run",
                "iterations",
                "reads",
                "candidates",
                "kept_by",
            )
        },
        "goldilocks": ctx.artifacts["calibrate"],
        "gate": _gate(ctx, rows),
        "model": {"dtype": str(lm.dtype).removeprefix("torch."), "device": str(lm.device)},
        "seconds": round(time.perf_counter() - ctx.t0, 1),
    }
