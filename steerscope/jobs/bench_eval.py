"""One concept of `steerscope bench`: make every method's arm, detect, match the KL budget,
generate, judge (see `jobs.bench` for the protocol)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .._io import write_json_atomic
from ..directions.vectors import SteeringVector
from ..generation import generate
from ..judging.concept_judges import ab_curve, harmonic, relevance
from ..judging.detection import auroc, max_projection, roc_curve
from ..judging.vector_metrics import completion_logprobs
from .bench_methods import BENCH_METHODS, Arm


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _thin(points: list[tuple[float, float]], n: int = 40) -> list[list[float]]:
    step = max(1, len(points) // n)
    return [[round(a, 4), round(b, 4)] for a, b in points[::step] + ([points[-1]] if len(points) % step else [])]


def _detection(ctx, concept, arm: Arm) -> dict:
    """AUROC on every text not used to make the direction (choose + report splits)."""
    pos = concept.pos("choose") + concept.pos("report")
    neg = concept.texts["negative"]["choose"] + concept.texts["negative"]["report"]
    hard = concept.texts["hard_negative"]["choose"] + concept.texts["hard_negative"]["report"]
    score = arm.detector or (lambda texts: max_projection(ctx.lm, texts, arm.vector, arm.layer))
    sp, sn, sh = score(pos), score(neg), score(hard) if hard else []
    return {
        "auroc": auroc(sp, sn + sh),
        "auroc_easy": auroc(sp, sn),
        "auroc_hard": auroc(sp, sh) if sh else None,
        "roc": _thin(roc_curve(sp, sn + sh)),
        "n_pos": len(pos),
        "n_neg": len(neg),
        "n_hard": len(hard),
    }


def _judge_rows(
    ctx, concept, prompts: list[str], comps, base_lp: list[float] | None, base_texts: list[str] | None
) -> list[dict]:
    """Per completion: every concept's embedding score, shows (this concept), log p, relevance."""
    texts = [c.text for c in comps]
    scores = ctx.judge.scores(texts)
    lp = completion_logprobs(ctx.lm, prompts, [c.token_ids for c in comps], chat=None)
    rel = relevance(texts, base_texts) if base_texts is not None else [1.0] * len(texts)
    rows = []
    for i, t in enumerate(texts):
        shows = {n: scores[n][i] > a.threshold for n, a in ctx.judge.axes.items()}
        flu = min(1.0, math.exp(lp[i] - base_lp[i])) if base_lp is not None and not math.isnan(lp[i]) else 1.0
        rows.append(
            {
                "text": t,
                "scores": {n: round(scores[n][i], 4) for n in scores},
                "shows": shows,
                "logprob": lp[i],
                "relevance": rel[i],
                "fluency_ratio": flu,
                "hm": harmonic([float(shows[concept.name]), max(0.0, min(1.0, rel[i])), flu]),
            }
        )
    return rows


def _summary(concept, rows: list[dict], base_rows: list[dict], others: list[str]) -> dict:
    name = concept.name
    rate = lambda rs, n: _mean([float(r["shows"][n]) for r in rs])  # noqa: E731
    change = rate(rows, name) - rate(base_rows, name)
    other = _mean([abs(rate(rows, o) - rate(base_rows, o)) for o in others]) if others else 0.0
    return {
        "concept_rate": rate(rows, name),
        "concept_score": _mean([r["scores"][name] for r in rows]),
        "concept_change": change,
        "other_change": other,
        "selectivity": change - 0.1 * other,
        "relevance": _mean([r["relevance"] for r in rows]),
        "fluency_logprob": _mean([r["logprob"] for r in rows]),
        "fluency_ratio": _mean([r["fluency_ratio"] for r in rows]),
        "score": _mean([r["hm"] for r in rows]),
        "ci": {
            "concept_rate": bootstrap_ci([float(r["shows"][name]) for r in rows]),
            "score": bootstrap_ci([r["hm"] for r in rows]),
        },
    }


def bootstrap_ci(xs: list[float], n: int = 2000, level: float = 0.95, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of the mean over instructions (resampled with replacement);
    None for fewer than 2 values."""
    x = torch.tensor([v for v in xs if v is not None and not math.isnan(v)], dtype=torch.float64)
    if len(x) < 2:
        return None
    g = torch.Generator().manual_seed(seed)
    means = x[torch.randint(len(x), (n, len(x)), generator=g)].mean(-1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)).tolist()
    return [lo, hi]


def evaluate_concept(ctx, concept) -> dict:
    cfg, lm = ctx.cfg, ctx.lm
    from ..directions.concepts import report_instructions

    choose, report = concept.instructions["choose"], report_instructions(concept, cfg.report_instructions)
    prompts = choose + report
    nc = len(choose)
    others = [c.name for c in ctx.concepts if c.name != concept.name]
    import time

    clock = {"t": time.perf_counter()}
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = round(seconds.get(name, 0.0) + now - clock["t"], 1)
        clock["t"] = now

    ctx.reset_matches()  # searches start from this concept's own matches: a resumed bench gives the same numbers
    arms: dict[str, Arm] = {}
    for m in cfg.methods:
        if m != "distill":
            arms[m] = BENCH_METHODS[m](ctx, concept)
    out: dict = {
        "concept": concept.name,
        "group": concept.group,
        "description": concept.description,
        "source": concept.source,
        "n_instructions": {"choose": nc, "report": len(report)},
        "instructions": prompts,
        "methods": {},
    }
    vec_arms = [a for a in arms.values() if a.kind == "vector"]
    tensors: dict[str, torch.Tensor] = {}
    lap("methods")
    for a in vec_arms:
        det = _detection(ctx, concept, a)
        mk = ctx.match(a.vector, a.layer)
        kls = {str(m): (mk.kl if m == 1.0 else ctx.kl_at(a.vector, a.layer, m * mk.coef)) for m in cfg.curve}
        out["methods"][a.method] = {
            "kind": "vector",
            "layer": a.layer,
            "norm": float(a.vector.norm()),
            "coef": mk.coef,
            "kl": mk.kl,
            "kl_hit": mk.hit,
            "kl_search": mk.curve,
            "kl_at": kls,
            "detection": det,
            "info": a.info,
        }
        tensors[a.method] = a.vector.float().contiguous()
    lap("detect+match")
    # one generate call: every vector arm at every multiple, per-row steering, plus unsteered
    variants, coefs = [], []
    for a in vec_arms:
        for m in cfg.curve:
            variants.append(SteeringVector(a.vector, a.layer, f"{a.method}@{m:g}"))
            coefs.append(m * out["methods"][a.method]["coef"])
    comps = generate(
        lm,
        prompts,
        vectors=variants or None,
        coef=coefs or 1.0,
        include_unsteered=True,
        max_new_tokens=cfg.max_new_tokens,
        progress=None,
    )
    lap("generate")
    by_variant: dict[str | None, list] = {}
    for c in comps:
        by_variant.setdefault(c.vector_id, []).append(c)
    base = by_variant[None]
    base_lp = completion_logprobs(lm, prompts, [c.token_ids for c in base], chat=None)
    base_texts = [c.text for c in base]
    base_rows = _judge_rows(ctx, concept, prompts, base, base_lp, base_texts)
    out["unsteered"] = {"rows": base_rows, **_summary(concept, base_rows[nc:], base_rows[nc:], others)}

    def judged(comps_: list) -> dict:
        rows = _judge_rows(ctx, concept, prompts, comps_, base_lp, base_texts)
        s = _summary(concept, rows[nc:], base_rows[nc:], others)
        s["choose_rate"] = _summary(concept, rows[:nc], base_rows[:nc], others)["concept_rate"] if nc else float("nan")
        s["rows"] = rows
        return s

    for a in vec_arms:
        out["methods"][a.method]["at"] = {f"{m:g}": judged(by_variant[f"{a.method}@{m:g}"]) for m in cfg.curve}
    lap("judge")
    if "prompting" in arms:
        a = arms["prompting"]
        pc = generate(lm, prompts, system=a.system, max_new_tokens=cfg.max_new_tokens, progress=None)
        kl = float(torch.quantile(ctx.rollouts.kl_prompted(a.system), cfg.kl.quantile))
        out["methods"]["prompting"] = {
            "kind": "prompt",
            "system": a.system,
            "kl": kl,
            "kl_hit": None,
            "at": {"1": judged(pc)},
            "info": a.info,
        }
    for m, a in arms.items():
        if a.kind == "skip":
            out["methods"][m] = {"kind": "skip", "info": a.info}
    lap("prompting")
    if "distill" in cfg.methods:
        out["methods"]["distill"] = _distill(ctx, concept, out, tensors, prompts, judged)
    lap("distill")
    if concept.ab:
        out["ab"] = {"unsteered": ab_curve(lm, concept.ab, None, ctx.layer, [0.0])["p_at_0"]}
        for a in vec_arms:
            out["methods"][a.method]["ab"] = ab_curve(
                lm, concept.ab, a.vector, a.layer, list(cfg.ab_multipliers), unit=out["methods"][a.method]["coef"]
            )
        if "prompting" in arms:
            out["methods"]["prompting"]["ab"] = {
                "p_at_0": ab_curve(lm, concept.ab, None, ctx.layer, [0.0], system=arms["prompting"].system)["p_at_0"]
            }
    if ctx.llm_judge is not None:
        for r in out["methods"].values():
            if "at" in r:
                at1 = r["at"]["1"]
                ratings = ctx.llm_judge.rate(concept, report, [x["text"] for x in at1["rows"][nc:]])
                at1["llm"] = {k: _mean([x[k] for x in ratings]) for k in ("concept", "instruction", "fluency", "score")}
                # A judge that often answers without a number (a small model) leaves means over few
                # completions: record how many had all three ratings, so no cell looks firmer than it is.
                at1["llm"]["rated"] = sum(x["score"] is not None for x in ratings) / max(1, len(ratings))
    lap("ab+llm")
    out["seconds"] = seconds
    out["_tensors"] = tensors
    return out


def _distill(ctx, concept, out: dict, tensors: dict, prompts: list[str], judged) -> dict:
    """LoRA adapter trained on the steered generations of the best vector (choose split)."""
    from ..adapters.distill import DistillConfig, adapter_in_place, distill

    cands = [
        (r["at"]["1"]["choose_rate"], r["at"]["1"]["concept_score"], m)
        for m, r in out["methods"].items()
        if r.get("kind") == "vector"
    ]
    if not cands:
        return {"kind": "skip", "info": {"skipped": "no vector method to distil"}}
    _, _, src = max(cands, key=lambda t: (-1 if math.isnan(t[0]) else t[0], t[1]))
    r = out["methods"][src]
    folder = ctx.folder.path(f"adapters/{concept.name}")
    dcfg = DistillConfig(
        coef=r["coef"],
        prompts=ctx.cfg.neutral,
        n_train=24,
        n_heldout=8,
        n_neutral=8,
        max_new_tokens=32,
        steps=ctx.cfg.distill_steps,
        seed=ctx.cfg.seed,
    )
    res = distill(ctx.lm, tensors[src], r["layer"], folder, dcfg, source=f"bench:{concept.name}:{src}", force=True)
    with adapter_in_place(ctx.lm, folder):
        dc = generate(ctx.lm, prompts, max_new_tokens=ctx.cfg.max_new_tokens, progress=None)
        kl = float(torch.quantile(ctx.rollouts.kl_model(), ctx.cfg.kl.quantile))
    return {
        "kind": "adapter",
        "source_method": src,
        "adapter": str(folder),
        "kl": kl,
        "kl_hit": None,
        "distill": res["evaluation"],
        "at": {"1": judged(dc)},
        "info": {"source": src},
    }


def save_concept_result(res: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = res.pop("_tensors", {})
    path.parent.mkdir(parents=True, exist_ok=True)
    if tensors:
        tmp = path.with_suffix(".safetensors.tmp")
        save_file(tensors, str(tmp), metadata={"concept": res["concept"]})
        tmp.replace(path.with_suffix(".safetensors"))
    write_json_atomic(path, res)


def load_concept_result(path: Path) -> dict:
    return json.loads(path.read_text())


MEASURES = (
    "concept_rate",
    "concept_score",
    "concept_change",
    "selectivity",
    "relevance",
    "fluency_logprob",
    "fluency_ratio",
    "score",
)


def run_settings(ctx) -> dict:
    """What every results row carries to be reproduced: model, budget, decoding, version."""
    cfg = ctx.cfg
    return {
        "model_id": ctx.lm.model_id,
        "model_fingerprint": ctx.lm.fingerprint,
        "dtype": str(ctx.lm.dtype).removeprefix("torch."),
        "device": str(ctx.lm.device),
        "kl_target": cfg.kl.target,
        "kl_quantile": cfg.kl.quantile,
        "kl_tokens": cfg.kl.tokens,
        "n_neutral": cfg.n_neutral,
        "neutral": cfg.neutral,
        "max_new_tokens": cfg.max_new_tokens,
        "seed": cfg.seed,
        "decoding": "greedy",
        "steerscope_version": __import__("steerscope").__version__,
    }


def result_rows(ctx) -> list[dict]:
    """Flat rows: one per (concept, method, multiplier, measure), with what reproduces it."""
    cfg, settings = ctx.cfg, run_settings(ctx)
    rows = []
    for c in ctx.concepts:
        res = ctx.artifacts[f"concept:{c.name}"]
        for m, r in res["methods"].items():
            base = {
                "concept": c.name,
                "method": m,
                "layer": r.get("layer"),
                "coef": r.get("coef"),
                "kl_p": r.get("kl"),
                "split": "report",
                "n_instructions": res["n_instructions"]["report"],
                **settings,
            }
            if r["kind"] == "skip":
                rows.append(
                    {**base, "measure": "skipped", "value": None, "judge": None, "reason": r["info"]["skipped"]}
                )
                continue
            for mult, s in r.get("at", {}).items():
                coef = r["coef"] * float(mult) if r.get("coef") is not None else None
                for meas in MEASURES:
                    judge = "log-prob under the unsteered model" if meas.startswith("fluency") else ctx.judge.name
                    rows.append(
                        {
                            **base,
                            "multiplier": float(mult),
                            "coef": coef,
                            "measure": meas,
                            "value": s[meas],
                            "judge": judge,
                        }
                    )
                for k, v in (s.get("llm") or {}).items():
                    rows.append(
                        {
                            **base,
                            "multiplier": float(mult),
                            "coef": coef,
                            "measure": f"llm_{k}",
                            "value": v,
                            "judge": ctx.llm_judge.name if ctx.llm_judge else "LLM",
                        }
                    )
            if "detection" in r:
                for k in ("auroc", "auroc_easy", "auroc_hard"):
                    rows.append(
                        {
                            **base,
                            "multiplier": None,
                            "measure": f"detection_{k}",
                            "value": r["detection"][k],
                            "judge": "max-over-tokens projection",
                            "split": "choose+report",
                        }
                    )
            if "ab" in r and "slope" in r["ab"]:
                for k in ("slope", "anti_steerable"):
                    rows.append(
                        {
                            **base,
                            "multiplier": None,
                            "measure": f"ab_{k}",
                            "value": r["ab"][k],
                            "judge": "P(behaviour letter)",
                            "split": "ab",
                            "ab_multipliers": cfg.ab_multipliers,
                        }
                    )
    return rows
