"""The `steerscope refine` job (see `jobs.refine` for the fitness and `directions.refine` for the searches).

A refine folder:
    config.json        the RefineConfig
    seeds.json         stage "seeds": the starting vectors' ids and fitness
    search/            the search checkpoint (every generation's candidates and fitness)
    vectors/           stage "search": the refined vectors (refined = the best; refined-Rx<m> = the
                       best at each R multiple), a vector folder for generate, select, export
    refine.json        stage "evaluate": history, held-out comparison, growth, sparsity
    report.html        rebuilt every time
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import write_json_atomic, write_text_atomic
from .._version import __version__
from ..checkpoint import Checkpoint, JobFolder
from ..directions.data import load_prompts
from ..directions.refine import REFINE_METHODS, Start, growth, import_cma, sparsity
from ..directions.vectors import VectorSet
from ..errors import SteerscopeError
from .refine import Evaluator, RefineConfig, _log, search_key
from .stages import Stage, run_stages


@dataclass
class _Ctx:
    cfg: RefineConfig
    folder: JobFolder
    lm: Any
    source: VectorSet
    scorer: Any
    train: list[str]
    heldout: list[str]
    neutral: list[str]
    sae: Any
    artifacts: dict


def default_scorer(cfg: RefineConfig, folder: Path | None = None):
    """--scorer, the judge's rating (--judge-url), or the organism's own detector for --model organism:NAME."""
    if cfg.scorer and cfg.judge_url:
        raise SteerscopeError("give --scorer or --judge-url (the judge's rating is the fitness), not both.")
    if cfg.judge_url:
        from ..judging.judge import judge_from

        return judge_from(cfg, folder / "judge_cache.jsonl" if folder is not None else None).metric()
    if cfg.scorer:
        return cfg.scorer
    from ..models.organisms import get_organism, organism_name

    name = organism_name(cfg.model.model)
    if name is None:
        raise SteerscopeError(
            "refine needs --scorer (e.g. regex:PATTERN, substring:a|b, refusal, sentiment): the "
            "behaviour the search maximises; only organism models have a default (their detector)."
        )
    return get_organism(name).detector


def _validate(cfg: RefineConfig, has_scorer: bool = False) -> tuple[list[str], list[str], list[str]]:
    """Everything checked before the model loads."""
    REFINE_METHODS.get(cfg.method)
    if cfg.method == "cma":
        try:
            import_cma()
        except ImportError:
            raise SteerscopeError(
                "method cma needs the cma package: pip install 'steerscope[refine]' (or use --method cem)."
            ) from None
    if not (Path(cfg.vectors) / "config.json").is_file():
        raise SteerscopeError(
            f"--vectors {cfg.vectors} is not a vector folder (no config.json); export one with "
            "`steerscope findings --run RUN --export N --out DIR` or use RUN/vectors/learned."
        )
    if not cfg.anneal or any(m <= 0 for m in cfg.anneal):
        raise SteerscopeError("--anneal must be positive multiples of R, e.g. 1 1.5 1 0.7 1.")
    if cfg.method in ("cma", "cem") and (len(cfg.ids) or cfg.seeds) < 2:
        raise SteerscopeError(
            f"--method {cfg.method} searches the span of the seeds and needs at least 2 (--seeds 2 "
            "or more, or 2 or more --ids); or use --method local."
        )
    if cfg.sae is not None and not (Path(cfg.sae) / "cfg.json").is_file():
        raise SteerscopeError(
            f"--sae {cfg.sae} is not an SAE folder (no cfg.json); train one with `steerscope sae train`."
        )
    prompts = load_prompts(cfg.prompts)
    if len(prompts) < cfg.n_train + cfg.n_heldout:
        raise SteerscopeError(
            f"--prompts {cfg.prompts} has {len(prompts)} prompts; --n-train + --n-heldout need "
            f"{cfg.n_train + cfg.n_heldout}."
        )
    if not has_scorer:
        default_scorer(cfg)
    return (
        prompts[: cfg.n_train],
        prompts[cfg.n_train : cfg.n_train + cfg.n_heldout],
        load_prompts(cfg.neutral)[-cfg.n_neutral :],
    )


def _seeds(ctx: _Ctx) -> dict:
    """The starting vectors: --ids, or the --seeds best of the folder by fitness (one batched pass
    per layer); and the KL budget (--kl-budget, or the median KL of the folder's vectors)."""
    import statistics

    src, cfg = ctx.source, ctx.cfg
    ids = list(cfg.ids) or src.ids
    layers = {src[i].layer for i in ids}
    ev = Evaluator(ctx.lm, cfg, ctx.scorer, ctx.train, ctx.neutral, src[ids[0]].layer, budget=0.0)
    rows = []
    for layer in sorted(layers):
        at = [i for i in ids if src[i].layer == layer]
        ev.layer = layer
        e, _ = ev.measure(torch.stack([src[i].vector.float() for i in at]), ctx.train)
        rows += list(zip(at, e.score.tolist(), e.kl.tolist()))
    budget = cfg.kl_budget if cfg.kl_budget is not None else statistics.median(k for _, _, k in rows)
    ev.budget = budget
    fit = ev.fitness(torch.tensor([s for _, s, _ in rows]), torch.tensor([k for _, _, k in rows])).tolist()
    fits = [(i, f, s, k) for (i, s, k), f in zip(rows, fit)]
    fits.sort(key=lambda r: -r[1])
    # a folder with several layers: the best vector's layer decides, and seeds come from it
    best_layer = src[fits[0][0]].layer
    chosen = [r for r in fits if src[r[0]].layer == best_layer][: len(cfg.ids) or cfg.seeds]
    _log(f"KL budget {budget:.3g} nats; seeds: " + ", ".join(f"{i} (fitness {f:.3f})" for i, f, _, _ in chosen))
    return {
        "ids": [r[0] for r in chosen],
        "layer": best_layer,
        "kl_budget": budget,
        "all": [{"id": i, "fitness": f, "score": s, "kl": k} for i, f, s, k in fits],
    }


def _start(ctx: _Ctx) -> Start:
    s = ctx.artifacts["seeds"]
    vecs = torch.stack([ctx.source[i].vector.float() for i in s["ids"]])
    fit = {r["id"]: r["fitness"] for r in s["all"]}
    return Start(vecs, list(s["ids"]), [fit[i] for i in s["ids"]], s["layer"], float(vecs[0].norm()))


def _search(ctx: _Ctx) -> VectorSet:
    cfg, start = ctx.cfg, _start(ctx)
    budget = ctx.artifacts["seeds"]["kl_budget"]
    ckpt = Checkpoint(ctx.folder.path("search"), search_key(cfg, start, ctx.lm.fingerprint, budget), "refine search")
    ev = Evaluator(ctx.lm, cfg, ctx.scorer, ctx.train, ctx.neutral, start.layer, budget, ckpt)
    if ev.saved:
        _log(f"resuming: {len(ev.saved)} generation(s) saved")
    REFINE_METHODS[cfg.method](ev, start, cfg)
    best, fit, g = ev.best()
    per = ev.best_per_mult()
    vecs = [best] + list(per.values())
    ids = ["refined"] + [f"refined-Rx{m:g}" for m in per]
    history = [
        {
            "mult": r["mult"],
            "fitness": r["fitness"].tolist(),
            "score": r["score"].tolist(),
            "kl": r["kl"].tolist(),
            "best_text": r["texts"][int(r["fitness"].argmax())],
        }
        for r in ev.history
    ]
    return VectorSet.create(
        ctx.lm,
        torch.stack(vecs),
        start.layer,
        f"refine-{cfg.method}",
        ids=ids,
        hyperparams={
            "refine": {
                "method": cfg.method,
                "scorer": ctx.scorer.name,
                "seeds": start.ids,
                "seed_fitness": start.fitness,
                "best_fitness": fit,
                "best_generation": g,
                "R_seed": start.R,
                "history": history,
            }
        },
    )


def _evaluate(ctx: _Ctx) -> dict:
    """Held-out comparison (best seed, refined, unsteered), growth with R and sparsity."""
    from ..generation import generate

    cfg, start, vs = ctx.cfg, _start(ctx), ctx.artifacts["search"]
    h = vs.config.hyperparams["refine"]
    ev = Evaluator(ctx.lm, cfg, ctx.scorer, ctx.train, ctx.neutral, start.layer, ctx.artifacts["seeds"]["kl_budget"])
    prompts = ctx.heldout or ctx.train
    pair = torch.stack([start.vectors[0], vs.vectors[0]])  # (2, d): best seed, refined
    e, texts = ev.measure(pair, prompts)
    base = [c.text for c in generate(ctx.lm, prompts, max_new_tokens=cfg.max_new_tokens, progress=False)]
    base_score = float(ctx.scorer.score_texts(base, prompts).mean())
    per = {float(i.split("Rx")[1]): vs.vectors[k] for k, i in enumerate(vs.ids) if "Rx" in i}
    named = {f"seed {i}": v for i, v in zip(start.ids, start.vectors)} | {"refined": vs.vectors[0]}
    return {
        "split": "held-out" if ctx.heldout else "train (no held-out prompts)",
        "prompts": prompts,
        "seed_id": start.ids[0],
        "R_seed": start.R,
        "R_refined": float(vs.vectors[0].norm()),
        "cosine_seed_refined": float(torch.nn.functional.cosine_similarity(pair[0], pair[1], 0)),
        "heldout": {
            "seed": {
                "score": float(e.score[0]),
                "kl": float(e.kl[0]),
                "fitness": float(e.fitness[0]),
                "texts": texts[0],
            },
            "refined": {
                "score": float(e.score[1]),
                "kl": float(e.kl[1]),
                "fitness": float(e.fitness[1]),
                "texts": texts[1],
            },
            "unsteered": {"score": base_score, "kl": 0.0, "texts": base},
        },
        "kl_budget": ctx.artifacts["seeds"]["kl_budget"],
        "train": {"seed_fitness": start.fitness[0], "refined_fitness": h["best_fitness"], "history": h["history"]},
        "growth": growth(per, vs.vectors[0]),
        "sparsity": sparsity(named, ctx.sae),
    }


def _check_ids(cfg: RefineConfig, source: VectorSet) -> None:
    for i in cfg.ids:
        source[i]  # an unknown id raises here, naming the ids there are
    layers = sorted({source[i].layer for i in cfg.ids})
    if len(layers) > 1:
        raise SteerscopeError(f"the --ids are at layers {layers}; refine searches at one layer: pick ids of one layer.")


def refine(cfg: RefineConfig, out: str | Path, *, lm=None, scorer=None, force: bool = False) -> Path:
    """Run (or resume) a refine; returns the report's path. `scorer`: a `judging.metrics.Metric`
    (e.g. your own callable) instead of `cfg.scorer`."""
    from ..judging.metrics import parse_metric

    JobFolder.check(out, "refine", cfg, force=force)
    train, heldout, neutral = _validate(cfg, scorer is not None)
    lm = lm or cfg.model.load()
    source = VectorSet.load(cfg.vectors, lm)
    _check_ids(cfg, source)
    scorer = parse_metric(scorer or default_scorer(cfg, Path(out)), lm)
    if scorer.kind != "text":
        raise SteerscopeError(
            f"--scorer {scorer.name} scores logits; refine scores completions: use a text metric "
            "(regex:P, substring:a|b, refusal, sentiment)."
        )
    sae = None
    if cfg.sae is not None:
        from ..sae.formats import load_saelens

        sae = load_saelens(cfg.sae)
        if sae.cfg.d_in != lm.d_model:
            raise SteerscopeError(
                f"--sae reads {sae.cfg.d_in}-dim activations but the model's d_model is {lm.d_model}."
            )
    folder = JobFolder(out, "refine", cfg, force=force, version=__version__)
    if folder.resumed:
        _log(f"resuming the refine in {folder.out}")
    ctx = _Ctx(cfg, folder, lm, source, scorer, train, heldout, neutral, sae, {})
    stages = [
        Stage(
            "seeds", "seeds.json", _seeds, lambda a, p: write_json_atomic(p, a), lambda p, c: json.loads(p.read_text())
        ),
        Stage("search", "vectors", _search, lambda vs, p: vs.save(p), lambda p, c: VectorSet.load(p, c.lm)),
        Stage(
            "evaluate",
            "refine.json",
            _evaluate,
            lambda a, p: write_json_atomic(p, a),
            lambda p, c: json.loads(p.read_text()),
        ),
    ]
    run_stages(folder, stages, ctx, _log)
    from ..report.refine import render_refine

    path = folder.path("report.html")
    write_text_atomic(
        path,
        render_refine(
            cfg.to_dict(), scorer.name, ctx.artifacts["evaluate"], ctx.artifacts["seeds"], lm.model_id, str(folder.out)
        ),
    )
    return path
