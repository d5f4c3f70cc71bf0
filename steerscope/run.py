"""The main job: discover vectors, generate under them (and under matched-norm random controls
and unsteered) on training and held-out prompts, measure, cluster behaviours, write a report.

A run is a folder:
    config.json         the RunConfig and steerscope version
    vectors/learned/    the discovered VectorSet (vectors/learned.partial/ while training)
    vectors/random/     orthogonal random vectors with the same norms: the control
    completions.jsonl   one row per (vector or unsteered, prompt)
    metrics.json        per-vector metrics, behaviour clusters, learned vs random, norm sweep
    report.html         one self-contained page
Each stage is written atomically and skipped when its file exists, so a killed run resumes where
it stopped. An existing folder of a *different* run is never touched (choose another --out, or
--force to replace it).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from ._io import write_json_atomic, write_text_atomic
from .directions.data import load_prompts
from .directions.discovery import DiscoverConfig, discover, random_control
from .directions.discovery.sweep import norm_sweep, sweep_to_dicts
from .directions.vectors import VectorSet
from .errors import SteerscopeError
from .generation import Completion, generate
from .models.layer_range import LayerRange


@dataclass
class RunConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    dtype: str = "float32"
    prompts: str = "neutral"  # file or builtin prompt set
    n_train: int = 2  # prompts the vectors are trained on
    n_heldout: int = 2  # further prompts from the same set, never seen in training
    neutral: str = "neutral"
    n_neutral: int = 8  # for KL side effects (taken from the end of the set)
    discover: DiscoverConfig = field(default_factory=lambda: DiscoverConfig(n_vectors=8, steps=60, R=4.0))
    max_new_tokens: int = 32
    sweep_multiples: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    sweep_top: int = 3  # norm-sweep the vectors with the largest effect
    scorers: list[str] = field(default_factory=lambda: ["refusal", "sentiment"])
    cluster_threshold: float = 0.35
    judge_url: str | None = None
    judge_model: str | None = None
    judge_key_env: str = "OPENAI_API_KEY"
    judge_rubric: str | None = None
    chat: bool | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        d["discover"] = DiscoverConfig(**d.get("discover", {}))
        return cls(**d)


def _log(msg: str) -> None:
    print(f"steerscope run: {msg}", file=sys.stderr, flush=True)


def _open_run_folder(cfg: RunConfig, out: Path, force: bool) -> None:
    meta = {"steerscope_version": __version__, "config": cfg.to_dict()}
    if out.exists():
        cfg_file = out / "config.json"
        if not cfg_file.is_file():
            if any(out.iterdir()) and not force:
                raise SteerscopeError(f"{out} exists and is not a steerscope run; choose another --out.")
        else:
            old = json.loads(cfg_file.read_text())
            if old.get("config") != meta["config"]:
                if not force:
                    raise SteerscopeError(f"{out} holds another run (different settings); choose another --out, "
                                          "or --force to replace it.")
                shutil.rmtree(out)
            else:
                _log(f"resuming the run in {out}")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "config.json").is_file():
        write_json_atomic(out / "config.json", {**meta, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _completions(rows: list[dict]) -> list[Completion]:
    keys = Completion.__dataclass_fields__
    return [Completion(**{k: r[k] for k in keys}) for r in rows]


def run(cfg: RunConfig, out: str | Path, *, lm=None, force: bool = False) -> Path:
    """Run (or resume) the whole job; returns the report's path."""
    from .judging.cluster import cluster_texts
    from .judging.embed import embed
    from .judging.metrics import parse_metric
    from .judging.vector_metrics import compute_vector_metrics, nanmean
    from .models.loading import load_model
    from .report.html import render_report

    out = Path(out)
    prompts = load_prompts(cfg.prompts)
    if len(prompts) < cfg.n_train + cfg.n_heldout or cfg.n_train < 1:
        raise SteerscopeError(f"{cfg.prompts} has {len(prompts)} prompts; the run needs n_train + n_heldout = "
                              f"{cfg.n_train + cfg.n_heldout} (n_train >= 1).")
    train, heldout = prompts[:cfg.n_train], prompts[cfg.n_train:cfg.n_train + cfg.n_heldout]
    neutral = load_prompts(cfg.neutral)[-cfg.n_neutral:]
    _open_run_folder(cfg, out, force)
    t0 = time.perf_counter()
    lm = lm or load_model(cfg.model, dtype=cfg.dtype)
    vec_dir = out / "vectors"

    learned_dir = vec_dir / "learned"
    if learned_dir.is_dir():
        learned = VectorSet.load(learned_dir, lm)
    else:
        _log(f"discovering {cfg.discover.n_vectors} vectors with {cfg.discover.method} on {len(train)} prompts")
        learned = discover(lm, train, cfg.discover, checkpoint_dir=vec_dir / "learned.partial")
        learned.save(learned_dir)
        shutil.rmtree(vec_dir / "learned.partial", ignore_errors=True)
    random_dir = vec_dir / "random"
    if random_dir.is_dir():
        control = VectorSet.load(random_dir, lm)
    else:
        control = random_control(lm, learned, seed=cfg.discover.seed + 1)
        control.save(random_dir)
    sets = {**{i: "learned" for i in learned.ids}, **{i: "random" for i in control.ids}}

    comp_file = out / "completions.jsonl"
    all_prompts = train + heldout
    if comp_file.is_file():
        rows = [json.loads(l) for l in comp_file.read_text().splitlines() if l.strip()]
    else:
        _log(f"generating {(len(learned) + len(control) + 1) * len(all_prompts)} completions")
        res = generate(lm, all_prompts, vectors=list(learned) + list(control), include_unsteered=True,
                       max_new_tokens=cfg.max_new_tokens, chat=cfg.chat)
        rows = [{**r.to_dict(), "split": "train" if r.prompt_index < len(train) else "heldout",
                 "set": sets.get(r.vector_id, "unsteered")} for r in res]
        write_text_atomic(comp_file, "".join(json.dumps(r) + "\n" for r in rows))
    completions = _completions(rows)

    metrics_file = out / "metrics.json"
    if not metrics_file.is_file():
        _log("measuring, clustering and sweeping")
        both = VectorSet.create(lm, torch.cat([learned.vectors, control.vectors]), learned.layers + control.layers,
                                "run", ids=learned.ids + control.ids)
        emb = embed([c.text for c in completions])
        scorers = [parse_metric(s, lm) for s in cfg.scorers]
        if cfg.judge_url:
            from .judging.judge import DEFAULT_RUBRIC, Judge

            judge = Judge(cfg.judge_url, cfg.judge_model or "judge", rubric=cfg.judge_rubric or DEFAULT_RUBRIC,
                          key_env=cfg.judge_key_env, cache_path=out / "judge_cache.jsonl")
            scorers.append(judge.metric({c.text: c.prompt for c in completions}))
        h = learned.config.hyperparams
        lr = LayerRange(lm, train, h["source"], h["target"], chat=cfg.chat)
        per_vector = compute_vector_metrics(lm, both, completions, neutral=neutral, layer_range=lr,
                                            target_tokens=h.get("target_tokens", "all"), scorers=scorers, chat=cfg.chat,
                                            embeddings=dict(zip(map(id, completions), emb)))
        clustering = cluster_texts([c.text for c in completions], emb, cfg.cluster_threshold)
        for vid, m in per_vector.items():
            m["clusters"] = sorted({clustering.labels[i] for i, c in enumerate(completions) if c.vector_id == vid})
        summary = {}
        for s in ("learned", "random"):
            idx = [i for i, r in enumerate(rows) if r["set"] == s]
            vids = [v for v, k in sets.items() if k == s]
            summary[s] = {"vectors": len(vids), "completions": len(idx),
                          "distinct_completions": len({rows[i]["text"] for i in idx}),
                          "clusters": len({clustering.labels[i] for i in idx}),
                          **{f"mean_{k}": nanmean([per_vector[v][k] for v in vids])
                             for k in ("target_change", "kl_neutral", "logprob", "distinct2", "embed_distance", "changed")}}
        top = sorted(learned.ids, key=lambda v: -per_vector[v]["embed_distance"])[:cfg.sweep_top]
        sweep = {}
        for vid in top:
            sv = learned[vid]
            one = VectorSet.create(lm, sv.vector[None], [sv.layer], "sweep", ids=[vid], hyperparams=h)
            sweep[vid] = sweep_to_dicts(norm_sweep(lm, train, one, cfg.sweep_multiples, max_new_tokens=cfg.max_new_tokens,
                                                   chat=cfg.chat))
        write_json_atomic(metrics_file, {
            "vectors": per_vector, "sets": sets, "summary": summary, "sweep": sweep,
            "clusters": [asdict(c) for c in clustering.clusters], "labels": clustering.labels, "map": clustering.xy,
            "discovery": {k: h.get(k) for k in ("method", "source", "target", "R", "target_tokens", "calibration",
                                                 "final_objective", "singular_values")},
            "seconds": round(time.perf_counter() - t0, 1)})
    metrics = json.loads(metrics_file.read_text())
    report = out / "report.html"
    write_text_atomic(report, render_report(json.loads((out / "config.json").read_text()), metrics, rows))
    _log(f"report: {report.resolve()}")
    return report

