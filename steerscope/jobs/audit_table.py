"""The audit's "table" stage (`jobs.audit`): every method's findings in one shape, merged into
behaviours across methods, with the base's own behaviours set apart.

Two methods' findings are one behaviour when they carry the same surface group (in French, in
capitals, a list, ...) or their completions' centroids (meaning, tail and case features,
`judging.change.Texts`) lie within the audit's cluster threshold. Only significant findings make
behaviours. A behaviour the `base` method (discovery on the base) also finds significantly is
something both models do: listed, but not under "What the fine-tune changed". Behaviours are
ranked by how many fine-tune-side methods found them, then by the most prompts one method saw it on,
then by their best q-value.
"""

from __future__ import annotations

import json
from pathlib import Path

FT_SIDE = ("finetune", "weightdiff", "actdiff", "sample", "amplify")
MEMBERS = 16  # completions per finding used for its centroid


def _rows(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "completions.jsonl").read_text().splitlines() if l.strip()]


def _steered_findings(method: str, run: Path) -> tuple[list[dict], dict, dict[str, str]]:
    """A run's findings in the audit's shape, its null-model summary, and its greedy unsteered
    reply per prompt."""
    metrics = json.loads((run / "metrics.json").read_text())
    rows = _rows(run)
    greedy = {r["prompt"]: r["text"] for r in rows if r["set"] == "unsteered"}
    cfg = json.loads((run / "vectors" / "learned" / "config.json").read_text())
    layers, norms = dict(zip(cfg["ids"], cfg["layers"])), dict(zip(cfg["ids"], cfg["norms"]))
    hp = cfg.get("hyperparams", {})
    prov = hp.get("provenance") or hp.get("components") or []
    provenance = dict(zip(cfg["ids"], prov)) if prov else {}
    out = []
    for f in metrics.get("findings", []):
        members = [rows[i] for i in f["rows"]]
        out.append(
            {
                "method": method,
                "rank": f["rank"],
                "significant": f["significant"],
                "q": f["q"],
                "typical": f["typical"],
                "words": f["words"],
                "surface": f.get("surface", ""),
                "reason": f["reason"],
                "prompts": len(f["prompts"]),
                "texts": [r["text"] for r in members[:MEMBERS]],
                "examples": [
                    {"prompt": r["prompt"], "treated": r["text"], "vector": r["vector_id"]} for r in members[:3]
                ],
                "directions": [
                    {"id": v, "layer": layers.get(v), "norm": norms.get(v), "from": provenance.get(v)}
                    for v in f["vectors"]
                ],
            }
        )
    return out, metrics.get("null_model", {}), greedy


def _sampled_findings(method: str, bb: dict, samples: list[dict]) -> list[dict]:
    return [
        {
            "method": method,
            "rank": f["rank"],
            "significant": f["significant"],
            "q": f["q"],
            "typical": f["typical"],
            "words": f["words"],
            "surface": f.get("surface", ""),
            "reason": f["reason"],
            "prompts": f["prompts"],
            "texts": [samples[i]["text"] for i in f["rows"][:MEMBERS]],
            "examples": f["examples"],
            "share": f["share"],
            "share_base": f["share_base"],
        }
        for f in bb["methods"][method]["findings"]
    ]


def merge(findings: list[dict], threshold: float) -> list[dict]:
    """Significant findings grouped into behaviours (module docstring); each behaviour lists its
    findings (method, rank) and keeps its first finding's typical completion."""
    import torch

    from ..judging.change import Texts

    sig = [f for f in findings if f["significant"]]
    if not sig:
        return []
    cents = []
    for f in sig:
        feats = Texts.of(f["texts"] or [f["typical"]]).features().double()  # (n, dim)
        c = feats.mean(0)
        cents.append(c / c.norm().clamp_min(1e-12))
    behaviours: list[dict] = []
    for f, c in zip(sig, cents):
        home = None
        for b in behaviours:
            near = 1.0 - float(torch.dot(c, b["_centroid"])) <= threshold
            if f["surface"] == b["surface"] and (near or f["surface"]):  # one surface group, or one meaning
                home = b
                break
        if home is None:
            home = {"typical": f["typical"], "surface": f["surface"], "words": f["words"], "found": [], "_centroid": c}
            behaviours.append(home)
        home["found"].append({"method": f["method"], "rank": f["rank"], "q": f["q"], "prompts": f.get("prompts", 1)})
    for b in behaviours:
        del b["_centroid"]
        methods = {x["method"] for x in b["found"]}
        b["methods"] = sorted(methods, key=lambda m: (FT_SIDE + ("base",)).index(m))
        b["ft_methods"] = [m for m in b["methods"] if m in FT_SIDE]
        b["in_base"] = "base" in methods
        b["best_q"] = min(x["q"] for x in b["found"])
        b["prompts"] = max(x["prompts"] for x in b["found"])
    # more methods first, then seen on more prompts (one prompt is a weak claim about a model), then q
    behaviours.sort(
        key=lambda b: (b["in_base"] or not b["ft_methods"], -len(b["ft_methods"]), -b["prompts"], b["best_q"])
    )
    for i, b in enumerate(behaviours):
        b["id"] = i
    return behaviours


def build_table(ctx) -> dict:
    """Stage "table": audit.json's content."""
    cfg, out = ctx.cfg, ctx.folder.out
    methods: dict[str, dict] = {}
    findings: list[dict] = []
    greedy: dict[str, dict[str, str]] = {"finetune": {}, "base": {}}
    for m in ("finetune", "weightdiff", "actdiff", "base"):
        if m not in cfg.methods:
            continue
        art = ctx.artifacts[f"method:{m}"]
        if art.get("skipped"):
            methods[m] = {"status": "skipped", "why": art["skipped"], "findings": [], "significant": 0}
            continue
        fs, null, g = _steered_findings(m, out / art["run"])
        greedy["finetune" if m == "finetune" else "base"].update(g)
        methods[m] = {
            "status": "ran",
            "run": art["run"],
            "findings": fs,
            "significant": sum(f["significant"] for f in fs),
            "null_model": null,
        }
        findings += fs
    if "blackbox" in ctx.artifacts:
        bb, samples = ctx.artifacts["blackbox"], ctx.artifacts["sample"]
        for m in ("sample", "amplify"):
            if m in bb["methods"]:
                fs = _sampled_findings(m, bb, samples)
                methods[m] = {
                    "status": "ran",
                    "findings": fs,
                    "significant": sum(f["significant"] for f in fs),
                    "samples": bb["methods"][m]["samples"],
                    "base_samples": bb["methods"][m]["base_samples"],
                }
                findings += fs
    for f in findings:  # both models' own greedy replies beside each steered example
        for e in f["examples"]:
            e.setdefault("finetune", greedy["finetune"].get(e["prompt"]))
            e.setdefault("base_reply", greedy["base"].get(e["prompt"]))
    c = ctx.compute
    compute = {m: dict(c[m]) for m in STEERED_ORDER if m in c}  # (a reused base run: "reused_from")
    if "sample:finetune" in c:  # the base's samples are the control of both sampling methods
        base_s = c.get("sample:base", {"seconds": 0, "forward_tokens": 0})
        for m, part in (("sample", "sample:finetune"), ("amplify", "sample:amplified")):
            if part in c:
                compute[m] = {k: round(c[part][k] + base_s[k], 3) for k in ("seconds", "forward_tokens")}
    behaviours = merge(findings, cfg.cluster_threshold)
    return {
        "model": cfg.model.model or "embedded",
        "base": cfg.base or "embedded",
        "same_weights": ctx.same,
        "dtype": str(ctx.lm.dtype).removeprefix("torch."),
        "methods": methods,
        "behaviours": behaviours,
        "changed": [b["id"] for b in behaviours if b["ft_methods"] and not b["in_base"]],
        "compute": compute,
        "config": cfg.to_dict(),
    }


STEERED_ORDER = ("finetune", "weightdiff", "actdiff", "base")
