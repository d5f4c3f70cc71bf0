"""The audit's black-box baseline: what does sampling the fine-tune show that sampling its base
does not? (`jobs.audit`, stages "sample" and "blackbox").

Stage "sample" draws `draws` completions at temperature 1 per prompt from three models on the same
prompts and random streams: the fine-tune as it is (method `sample`), the fine-tune amplified
against its base (method `amplify`, `steerscope.amplify`), and the base, the control of both.
Stage "blackbox" clusters every one of those completions together (the run's clustering: meaning,
tail, case and surface groups) and asks, per cluster, whether the treated model (fine-tune or
amplified) lands in it more often than the base does on the same prompts: an exact test
stratified by prompt (`judging.significance.compare_samples`), false discoveries controlled over the
clusters. A significant cluster is a finding of that method, ranked by significance and by how
much more often than the base the treated model shows it.

This is the "scaffolded black-box" column of auditing work (frontier notes): no weights, no
activations, only samples and a contrast; the question the audit table answers is whether any
white-box method found something this would not.
"""

from __future__ import annotations

from dataclasses import asdict

MODELS = {"sample": "finetune", "amplify": "amplified"}  # method -> the rows it treats; control: "base"


def sample_rows(ctx) -> list[dict]:
    """Stage "sample": one row per (model, draw, prompt)."""
    from ..amplify import Amplify
    from ..generation import generate

    cfg = ctx.cfg
    prompts = ctx.sample_prompts
    P = len(prompts)
    kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=1.0, seed=cfg.seed, chat=ctx.chat)
    which = [("base", ctx.base, None), ("finetune", ctx.lm, None)]
    if "amplify" in cfg.methods:
        which.append(("amplified", ctx.lm, Amplify(ctx.base, cfg.amplify_alpha, cfg.amplify_top_k)))
    rows = []
    for name, lm, amp in which:
        ctx.log(f"sampling {name}: {cfg.draws} draws x {P} prompts at temperature 1")
        with ctx.counted(f"sample:{name}"):
            # one call per model: prompt i of draw s is row s * P + i, each with its own random stream
            res = generate(lm, prompts * cfg.draws, amplify=amp, **kw)
        rows += [
            {
                "model": name,
                "prompt_index": r.prompt_index % P,
                "draw": r.prompt_index // P,
                "prompt": r.prompt,
                "text": r.text,
                "token_ids": r.token_ids,
            }
            for r in res
        ]
    return rows


def blackbox(ctx) -> dict:
    """Stage "blackbox": clusters of all samples and, per treated model, its findings."""
    from ..judging.change import Texts
    from ..judging.cluster import cluster_texts
    from ..judging.significance import compare_samples

    cfg, rows = ctx.cfg, ctx.artifacts["sample"]
    ctx.log(f"clustering {len(rows)} samples and testing each cluster against the base's samples")
    rep = Texts.of([r["text"] for r in rows])
    clustering = cluster_texts([r["text"] for r in rows], rep, cfg.cluster_threshold)
    info = {c.id: asdict(c) for c in clustering.clusters}
    models, prompts, labels = [r["model"] for r in rows], [r["prompt_index"] for r in rows], clustering.labels
    base_of = {(r["prompt_index"], r["draw"]): i for i, r in enumerate(rows) if r["model"] == "base"}
    n_prompts = len({r["prompt_index"] for r in rows})
    out = {"labels": labels, "clusters": list(info.values()), "methods": {}}
    for method, treated in MODELS.items():
        if treated not in models:
            continue
        tests = compare_samples(models, prompts, labels, treated=treated, control="base", alpha=cfg.alpha)
        n_t = sum(m == treated for m in models) or 1
        n_b = sum(m == "base" for m in models) or 1
        found = []
        for c, t in tests.items():
            idx = [i for i, l in enumerate(labels) if l == c and models[i] == treated]
            share, share_b = t.treated / n_t, t.control / n_b
            examples = [
                {
                    "prompt": rows[i]["prompt"],
                    "treated": rows[i]["text"],
                    "base": rows[base_of[(rows[i]["prompt_index"], rows[i]["draw"])]]["text"],
                }
                for i in idx[:3]
            ]
            found.append(
                {
                    **t.to_dict(),
                    "method": method,
                    "typical": rows[idx[0]]["text"]
                    if info[c]["typical"] not in {rows[i]["text"] for i in idx}
                    else info[c]["typical"],  # one of the treated model's own samples
                    "words": info[c]["words"],
                    "surface": info[c].get("surface", ""),
                    "rows": idx,
                    "share": share,
                    "share_base": share_b,
                    "n_prompts": n_prompts,
                    "examples": examples,
                    "single": "one prompt" if t.prompts == 1 else "",
                    "reason": (
                        f"{'significant' if t.significant else 'not significant'} (q = {t.q:.2g}): "
                        f"{t.treated} of {n_t} {treated} samples ({share:.0%}) on {t.prompts} of {n_prompts} "
                        f"prompts vs {t.control} of {n_b} base samples ({share_b:.0%})"
                    ),
                }
            )
        # significant first; then seen on more prompts (a change that shows on one prompt is a weak
        # claim about the model), then by q and by how much more often than the base
        found.sort(key=lambda f: (not f["significant"], -f["prompts"], f["q"], -(f["share"] - f["share_base"])))
        found = found[:30]
        for rank, f in enumerate(found):
            f["rank"] = rank
        out["methods"][method] = {
            "findings": found,
            "significant": sum(f["significant"] for f in found),
            "samples": n_t,
            "base_samples": n_b,
        }
    return out
