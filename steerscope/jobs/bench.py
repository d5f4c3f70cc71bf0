"""`steerscope bench`: every steering method on the same concepts, at the same side-effect budget,
judged the same way (see `../shared/reference/evals.md`, AxBench and steering-lite).

Per concept: each method (`jobs.bench_methods`) makes its vector from the train texts; detection
is the AUROC of max-over-tokens projections on held-out texts (`judging.detection`); the
coefficient is searched so that the 95th-percentile per-token KL to the unsteered model over
32-token neutral rollouts is 0.5 nats (`judging.kl_match`); then completions to the concept's
instructions at `curve` multiples of that coefficient are judged (`judging.concept_judges`:
concept rate, relevance, fluency, their harmonic mean, selectivity; an LLM judge when given);
A/B steerability where the concept ships A/B items. Prompting has no strength: its KL is
measured on the same rollouts and reported beside the budget.

A bench is a folder of stages (a killed bench resumes at the concept it was on):
    config.json                the BenchConfig and steerscope version
    discovered/                stage "discover": DCT vectors at the bench layer (unless --discovered)
    concepts/NAME.json         stage "concept:NAME": every measure and completion for the concept
    concepts/NAME.safetensors  the vectors used, one tensor per method
    conditional/NAME.json      stage "when:NAME" (with --when): each vector gated on a condition set, its
                               concept rate on on-topic vs off-topic prompts (`jobs.bench_when`, CAST)
    adapters/NAME/             the distilled LoRA adapter (method distill)
    results.jsonl              one row per (concept, method, multiplier, measure), with settings
    report.html                tables, curves, ROC curves, examples (rebuilt every time)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .._io import write_text_atomic
from .._version import __version__
from ..checkpoint import JobFolder
from ..config import Config, config_from_dict, config_to_dict
from ..directions.concepts import DEFAULT_CONCEPTS, Concept, load_concepts
from ..directions.data import load_prompts
from ..directions.vectors import SteeringVector, VectorSet
from ..errors import SteerscopeError
from ..generation import generate
from ..judging.kl_match import KLMatchConfig, Rollouts, match_kl
from ..models.loading import ModelConfig
from ..progress import say
from .bench_methods import BENCH_METHODS
from .stages import Stage, run_stages

DEFAULT_METHODS = ["diffmean", "pca", "probe", "sae", "discovered", "prompting"]


@dataclass(frozen=True)
class BenchConfig(Config):
    """Everything `steerscope bench` does; every field is a flag of the command."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(dtype="bfloat16"))
    """the model (bfloat16 by default: 1.3-1.8x faster on CPUs with bf16 units and GPUs; detection, relevance
    and fluency match float32 within 0.03 on SmolLM2, concept rates within the noise of 9 prompts; see README)"""
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS), metadata={"choices": BENCH_METHODS})
    """methods compared (distill trains a LoRA adapter per concept: slow, so not in the default)"""
    concepts: list[str] = field(default_factory=lambda: list(DEFAULT_CONCEPTS))
    """shipped concepts (sports, cooking, space, ocean, joy, anger, french, formal, pirate, refusal,
    flattery, uncertainty; all = every one) or JSONL files of the same schema"""
    layer: int | None = field(default=None, metadata={"none": "40% depth"})
    """layer the vectors are made and added at (the SAE's own layer for method sae)"""
    kl: KLMatchConfig = field(default_factory=KLMatchConfig)
    """the side-effect budget every vector is matched to"""
    neutral: str = "neutral"
    """prompt set of the KL rollouts (and of discovery)"""
    n_neutral: int = field(default=16, metadata={"min": 1})
    """neutral prompts in the KL rollouts"""
    report_instructions: int = field(default=24, metadata={"min": 1})
    """report instructions per concept: the concept's own (9 for the shipped ones), topped up from a
    shared pool of generic instructions; every number in the report is over these (with 9, no
    ranking gap was 2 standard errors wide)"""
    max_new_tokens: int = field(default=48, metadata={"min": 1})
    """tokens per steered completion"""
    curve: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    """multiples of the matched coefficient generated at (strength-vs-effect curves; must hold 1)"""
    ab_multipliers: list[float] = field(default_factory=lambda: [-1.0, -0.5, 0.0, 0.5, 1.0])
    """multiples of the matched coefficient for A/B steerability (must hold 0)"""
    sae: str | None = field(default=None, metadata={"none": "none"})
    """SAE folder (SAELens layout, e.g. from `steerscope sae train`) for method sae"""
    sae_candidates: int = field(default=4, metadata={"min": 1})
    """features most active on positives vs negatives, ranked by their effect at the matched KL"""
    discovered: str | None = field(default=None, metadata={"none": "run DCT"})
    """vector-set folder of discovered vectors (e.g. RUN/vectors/learned); default: DCT in the bench"""
    discover_vectors: int = field(default=32, metadata={"min": 1})
    """vectors DCT discovers when --discovered is not given"""
    distill_steps: int = field(default=100, metadata={"min": 1})
    """LoRA training steps of method distill"""
    when: str | None = None
    """a condition-set folder (`steerscope condition`): adds the conditional (CAST) stage, each vector at its
    matched coefficient gated on it, its concept rate on --on-topic vs --off-topic prompts"""
    when_layer: int | None = None
    """with --when: the condition layer (default: the set's best layer)"""
    when_threshold: float | None = None
    """with --when: the cosine threshold (default: the set's at that layer)"""
    on_topic: str | None = None
    """with --when: prompt set (name or file) the gate should fire on"""
    off_topic: str | None = None
    """with --when: prompt set (name or file) the gate should not fire on"""
    n_topic: int = field(default=24, metadata={"min": 1})
    """with --when: prompts used from each of --on-topic and --off-topic (the first N)"""
    judge_url: str | None = field(default=None, metadata={"none": "offline only"})
    """OpenAI-compatible endpoint of an LLM judge (three 0-2 ratings per completion, AxBench)"""
    judge_model: str | None = None
    """model name sent to the judge"""
    judge_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the judge's API key"""
    seed: int = 0
    """seed of discovery and distillation (generation is greedy)"""

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BenchConfig:
        return config_from_dict(cls, d)


def _log(msg: str) -> None:
    say(f"steerscope bench: {msg}")  # stderr and the job log


def bench_layer(cfg: BenchConfig, lm) -> int:
    return lm.check_layer(cfg.layer if cfg.layer is not None else round(0.4 * lm.n_layers))


def _steer_layers(cfg: BenchConfig, lm, sae, discovered: VectorSet | None) -> dict[str, int]:
    """method -> the (first) layer its vector is added at, for the methods with a vector."""
    layer, out = bench_layer(cfg, lm), {}
    for m in cfg.methods:
        if m == "sae":
            if sae is not None:
                out[m] = sae.cfg.layer
        elif m == "discovered" and discovered is not None:
            if len(discovered):
                out[m] = min(sv.layer for sv in discovered)
        elif m not in ("prompting", "distill"):
            out[m] = layer
    return out


class BenchContext:
    def __init__(self, cfg: BenchConfig, folder: JobFolder, lm, concepts: list[Concept], neutral: list[str], sae):
        self.cfg, self.folder, self.lm, self.concepts, self.neutral, self.sae = cfg, folder, lm, concepts, neutral, sae
        self.layer = bench_layer(cfg, lm)
        self.artifacts: dict[str, Any] = {}
        self.t0 = time.perf_counter()
        self._matched_norms: dict[int, list[float]] = {}
        self.concept_seconds: list[float] = []
        self.condition = None  # with --when: the gate (`bench_when.bench_condition`)
        self.topics: tuple[list[str], list[str]] | None = None  # with --when: on-topic, off-topic prompts

    @cached_property
    def judge(self):
        from ..judging.concept_judges import EmbeddingJudge

        return EmbeddingJudge(self.concepts)

    @cached_property
    def llm_judge(self):
        from ..judging.concept_judges import LLMJudge
        from ..judging.judge import judge_from

        base = judge_from(self.cfg, self.folder.path("judge_cache.jsonl"))
        return None if base is None else LLMJudge(base)

    @cached_property
    def rollouts(self) -> Rollouts:
        return Rollouts(self.lm, self.neutral, self.cfg.kl.tokens)

    @property
    def discovered(self) -> VectorSet | None:
        return self.artifacts.get("discover")

    def reset_matches(self) -> None:
        self._matched_norms = {}

    def match(self, vector: torch.Tensor, layer: int):
        """`match_kl` starting from the perturbation norm earlier matches at this layer needed
        (steering norms at a fixed KL are similar across directions), which saves most of the
        bracketing passes."""
        import dataclasses
        import statistics

        norm = float(vector.norm())
        seen = self._matched_norms.get(layer, [])
        cfg = (
            self.cfg.kl
            if not seen or norm == 0
            else dataclasses.replace(self.cfg.kl, start=statistics.median(seen) / norm)
        )
        m = match_kl(self.rollouts, vector, layer, cfg)
        if m.hit:
            self._matched_norms.setdefault(layer, []).append(m.coef * norm)
        return m

    def kl_at(self, vector, layer: int, coef: float) -> float:
        return float(torch.quantile(self.rollouts.kl(vector, layer, coef), self.cfg.kl.quantile))

    def output_effects(self, concept: Concept, vectors: list[torch.Tensor], layer: int) -> list[float]:
        """Mean concept score of completions to the choose instructions, each vector at its
        matched KL (one batched generate call, a vector per row)."""
        coefs = [self.match(v, layer).coef for v in vectors]
        prompts = concept.instructions["choose"] or concept.instructions["report"][:3]
        svs = [SteeringVector(v, layer, f"c{i}") for i, v in enumerate(vectors)]
        comps = generate(
            self.lm,
            prompts,
            vectors=svs,
            coef=coefs,
            include_unsteered=False,
            max_new_tokens=min(24, self.cfg.max_new_tokens),
            progress=False,
        )
        s = self.judge.scores([c.text for c in comps])[concept.name]
        n = len(prompts)
        return [sum(s[i * n : (i + 1) * n]) / n for i in range(len(vectors))]


# ---- validation ------------------------------------------------------------------------------
def _validate(cfg: BenchConfig) -> tuple[list[Concept], list[str]]:
    """Everything checked before the model does any work."""
    for m in cfg.methods:
        BENCH_METHODS.get(m)
    if len(set(cfg.methods)) != len(cfg.methods):
        raise SteerscopeError("a method is listed twice in --methods; list each once.")
    if 1.0 not in cfg.curve or any(m <= 0 for m in cfg.curve):
        raise SteerscopeError("--curve must be positive multiples and include 1 (the matched coefficient).")
    if 0.0 not in cfg.ab_multipliers:
        raise SteerscopeError("--ab-multipliers must include 0 (the unsteered model).")
    if "sae" in cfg.methods and cfg.sae is not None and not (Path(cfg.sae) / "cfg.json").is_file():
        raise SteerscopeError(
            f"--sae {cfg.sae} is not an SAE folder (no cfg.json); train one with `steerscope sae train`."
        )
    if cfg.discovered is not None and not (Path(cfg.discovered) / "config.json").is_file():
        raise SteerscopeError(f"--discovered {cfg.discovered} is not a vector-set folder (no config.json).")
    from ..judging.judge import judge_from

    judge_from(cfg)  # a URL without --judge-model, or not http(s), is refused here
    if "distill" in cfg.methods:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise SteerscopeError(
                "method distill trains LoRA adapters with peft: pip install 'steerscope[distill]'."
            ) from None
    concepts = load_concepts(cfg.concepts)
    neutral = load_prompts(cfg.neutral)[-cfg.n_neutral :]
    return concepts, neutral


# ---- stages ----------------------------------------------------------------------------------
def _discover(ctx: BenchContext) -> VectorSet:
    from ..directions.discovery import DiscoverConfig, discover

    d = DiscoverConfig.of("dct", n_vectors=ctx.cfg.discover_vectors, source=ctx.layer, seed=ctx.cfg.seed)
    train = load_prompts(ctx.cfg.neutral)[:8]
    _log(f"discovering {d.n_vectors} DCT vectors at layer {ctx.layer} (calibrated R) on {len(train)} neutral prompts")
    return discover(ctx.lm, train, d, progress=False)


def _concept_stage(concept: Concept) -> Stage:
    from .bench_eval import evaluate_concept, load_concept_result, save_concept_result

    def build(ctx: BenchContext) -> dict:
        t = time.perf_counter()
        res = evaluate_concept(ctx, concept)
        ctx.concept_seconds.append(time.perf_counter() - t)
        left = sum(1 for c in ctx.concepts if f"concept:{c.name}" not in ctx.artifacts) - 1
        mean = sum(ctx.concept_seconds) / len(ctx.concept_seconds)
        _log(
            f"{concept.name} done in {ctx.concept_seconds[-1]:.0f} s"
            + (f"; {left} concept(s) left, about {left * mean / 60:.0f} min" if left else "")
        )
        return res

    return Stage(
        f"concept:{concept.name}",
        f"concepts/{concept.name}.json",
        build,
        save_concept_result,
        lambda p, ctx: load_concept_result(p),
    )


def _results(ctx: BenchContext) -> list[dict]:
    from .bench_eval import result_rows, run_settings
    from .bench_when import conditional_result_rows

    rows = result_rows(ctx) + conditional_result_rows(ctx, run_settings(ctx))
    path = ctx.folder.path("results.jsonl")
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _report(ctx: BenchContext) -> Path:
    from ..report.bench import render_bench

    per = [ctx.artifacts[f"concept:{c.name}"] for c in ctx.concepts]
    meta = {
        "config": ctx.cfg.to_dict(),
        "layer": ctx.layer,
        "model_id": ctx.lm.model_id,
        "judges": {"offline": ctx.judge.name, "llm": ctx.llm_judge.name if ctx.llm_judge else None},
        "judge_accuracy": {n: a.heldout_accuracy for n, a in ctx.judge.axes.items()},
        "seconds": ctx.artifacts.get("_seconds", {}),
        "out": str(ctx.folder.out),
    }
    cond = [ctx.artifacts[f"when:{c.name}"] for c in ctx.concepts if f"when:{c.name}" in ctx.artifacts]
    path = ctx.folder.path("report.html")
    write_text_atomic(path, render_bench(meta, per, cond))
    return path


def stages(ctx: BenchContext) -> list[Stage]:
    out = []
    if "discovered" in ctx.cfg.methods and ctx.cfg.discovered is None:
        out.append(
            Stage("discover", "discovered", _discover, lambda vs, p: vs.save(p), lambda p, c: VectorSet.load(p, c.lm))
        )
    out += [_concept_stage(c) for c in ctx.concepts]
    if ctx.cfg.when is not None:
        from .bench_when import conditional_stage

        out += [conditional_stage(c) for c in ctx.concepts]
    out.append(Stage("results", None, _results))  # the report follows, with this call's stage times
    return out


def bench(cfg: BenchConfig, out: str | Path, *, lm=None, force: bool = False) -> Path:
    """Run (or resume) the bench; returns the report's path."""
    JobFolder.check(out, "bench", cfg, force=force)
    concepts, neutral = _validate(cfg)
    from .bench_when import bench_condition, validate_when

    topics = validate_when(cfg)
    lm = lm or cfg.model.load()
    if cfg.layer is not None:
        lm.check_layer(cfg.layer)
    sae = None
    if "sae" in cfg.methods and cfg.sae is not None:
        from ..sae.formats import load_saelens

        sae = load_saelens(cfg.sae)
        if sae.cfg.d_in != lm.d_model:
            raise SteerscopeError(
                f"--sae reads {sae.cfg.d_in}-dim activations but the model's d_model is {lm.d_model}."
            )
        lm.check_layer(sae.cfg.layer)
    discovered = VectorSet.load(cfg.discovered, lm) if cfg.discovered is not None else None
    condition = bench_condition(cfg, lm, _steer_layers(cfg, lm, sae, discovered)) if topics else None
    folder = JobFolder(out, "bench", cfg, force=force, version=__version__)
    if folder.resumed:
        _log(f"resuming the bench in {folder.out}")
    ctx = BenchContext(cfg, folder, lm, concepts, neutral, sae)
    ctx.condition, ctx.topics = condition, topics
    if discovered is not None:
        ctx.artifacts["discover"] = discovered
    log = run_stages(folder, stages(ctx), ctx, _log)
    ctx.artifacts["_seconds"] = log.seconds
    ctx.artifacts["report"] = _report(ctx)
    _log(f"report: {ctx.artifacts['report'].resolve()}")
    return ctx.artifacts["report"]
