"""`steerscope audit`: what did a fine-tune change? Every method on one table.

An audit compares a fine-tune with the model it was made from (its base) by several methods, each
under the same null-model machinery, and merges what they found:

    finetune     the fine-tune's own unsupervised discovery (`run`, method --discovery, default kl)
    weightdiff   steer the BASE along the top singular directions of the fine-tune's weight
                 differences (both signs): does the difference carry the behaviour over?
    actdiff      the same with the mean and principal components of fine-tune minus base residuals
    base         the same discovery as `finetune` on the base, for contrast: a behaviour both models
                 show is not what the fine-tune changed
    sample       black-box: the fine-tune sampled at temperature vs the base on the same prompts
    amplify      the fine-tune sampled with its difference from the base amplified, vs the base

Each steered method is a whole `steerscope run` (learned vs matched-norm random vectors vs
samples, `jobs.run`) in its own folder; the sampling methods share one stage of samples and their
own exact test (`jobs.audit_sample`). The "table" stage merges findings that describe one
behaviour across methods (`jobs.audit_table`), and the report opens with "What the fine-tune
changed". An audit folder:
    config.json        the AuditConfig
    methods/NAME/      a run folder per steered method (its own report.html)
    samples.jsonl      stage "sample"; blackbox.json: stage "blackbox"
    audit.json         stage "table": every method's findings, the merged table, compute per method
    report.html        stage "report"
A killed audit resumes (each run resumes inside its stage); `--contrast-run DIR` reuses a finished
base run with the same settings (an audit of several fine-tunes of one base computes it once).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import write_json_atomic, write_text_atomic
from .._version import __version__
from ..checkpoint import JobFolder
from ..config import Config, config_from_dict, config_to_dict
from ..directions.data import load_prompts
from ..directions.discovery import DISCOVERY, DiscoverConfig
from ..errors import SteerscopeError
from ..models.loading import ModelConfig
from ..progress import LOG_NAME, job_log, say
from .run import RunConfig
from .run import run as run_job
from .stages import Stage, run_stages

STEERED = ("finetune", "weightdiff", "actdiff", "base")
SAMPLED = ("sample", "amplify")
METHODS = STEERED + SAMPLED
DIFFING = ("weightdiff", "actdiff")  # discovery methods that need the base


@dataclass(frozen=True)
class AuditConfig(Config):
    """Everything `steerscope audit` does; every field is a flag of the command."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """the fine-tune being audited"""
    base: str | None = None
    """the model it was made from: a checkpoint folder, a cached hub id, or embedded (default: for
    organism:NAME the embedded model it was built from; otherwise required)"""
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"choices": METHODS})
    """methods to run (module docstring): finetune weightdiff actdiff base sample amplify"""
    discovery: str = field(default="kl", metadata={"choices": DISCOVERY})
    """the discovery method of `finetune` and `base` (not weightdiff/actdiff, which are methods here)"""
    prompts: str = "neutral"
    """prompts the steered methods train and generate on (as `run --prompts`)"""
    n_train: int = field(default=2, metadata={"min": 1})
    """training prompts of every steered method (as `run`)"""
    n_heldout: int = field(default=2, metadata={"min": 0})
    """held-out prompts of every steered method (as `run`)"""
    source: int | None = field(default=None, metadata={"min": 0})
    """layer the steered methods add their vectors at (auto: each discovery method's own, as `run`)"""
    target: int | None = field(default=None, metadata={"min": 1})
    """layer whose change their discovery measures (auto: as `run`)"""
    R: float | None = field(default=None, metadata={"min": 0, "none": "calibrate"})
    """norm of every steered method's vectors (calibrate: each run calibrates and searches R, as `run`)"""
    n_vectors: int = field(default=8, metadata={"min": 2})
    """vectors per steered method (directions with both signs for weightdiff/actdiff)"""
    n_random: int = field(default=32, metadata={"min": 1})
    """matched-norm random vectors per steered method: its null model (as `run`)"""
    n_samples: int = field(default=16, metadata={"min": 0})
    """unsteered samples per prompt in each steered method's null model (as `run`)"""
    sample_prompts: str = "neutral"
    """prompts the black-box methods sample on (one per line, .jsonl/.csv, or a builtin set); give
    your own to look where you suspect a change"""
    n_sample_prompts: int = field(default=32, metadata={"min": 1})
    """how many of them (the first ones)"""
    draws: int = field(default=4, metadata={"min": 1})
    """samples per prompt from each of fine-tune, amplified fine-tune and base"""
    amplify_alpha: float = field(default=2.0, metadata={"min": 0})
    """amplification (as `steerscope amplify --alpha`; frozen on one tune organism, benchmarks/amplify_zoo.py)"""
    amplify_top_k: int = field(default=20, metadata={"min": 1})
    """the fine-tune's own top-k tokens stay candidates when amplified"""
    max_new_tokens: int = field(default=32, metadata={"min": 1})
    """tokens per completion, every method"""
    alpha: float = field(default=0.05, metadata={"min": 0, "max": 1})
    """false-discovery rate of every method's test"""
    cluster_threshold: float = field(default=0.35, metadata={"min": 0, "max": 2})
    """cosine distance for clusters, and for two methods' findings to be one behaviour in the table"""
    seed: int = 0
    """random seed of every method"""
    contrast_run: str | None = None
    """a finished `base` run folder to reuse (same settings, same base): copied in, not recomputed"""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.methods:
            raise SteerscopeError("--methods: give at least one of " + ", ".join(METHODS) + ".")
        if self.discovery in DIFFING:
            raise SteerscopeError(
                f"--discovery {self.discovery}: weightdiff and actdiff are audit methods of their own (--methods); "
                "give the fine-tune's unsupervised discovery here (kl, dct, melbo, jacobian)."
            )

    def to_dict(self) -> dict:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AuditConfig:
        return config_from_dict(cls, d)

    def base_spec(self) -> str | None:
        """The base as a model spec (None: the embedded model)."""
        from ..models.organisms import organism_name

        if self.base is None:
            if organism_name(self.model.model) is None:
                raise SteerscopeError(
                    "audit compares the fine-tune with the model it was made from: give it with --base MODEL "
                    "(a checkpoint folder, a cached hub id, or embedded)."
                )
            return None
        return None if self.base == "embedded" else self.base

    def run_config(self, method: str) -> RunConfig:
        """The `steerscope run` a steered method is: same budget for every one of them."""
        ft, base = self.model, dataclasses.replace(self.model, model=self.base_spec())
        shared = dict(n_vectors=self.n_vectors, seed=self.seed, source=self.source, target=self.target, R=self.R)
        if method in DIFFING:
            # steer the base along the difference; the "base" of the diffing method is the fine-tune
            d = DiscoverConfig.of(method, base=ft.model or "embedded", **shared)
            model = base
        else:
            d = DiscoverConfig.of(self.discovery, **shared)
            model = ft if method == "finetune" else base
        return RunConfig(
            model=model,
            prompts=self.prompts,
            n_train=self.n_train,
            n_heldout=self.n_heldout,
            discover=d,
            n_random=self.n_random,
            n_samples=self.n_samples,
            alpha=self.alpha,
            max_new_tokens=self.max_new_tokens,
            cluster_threshold=self.cluster_threshold,
            scorers=[],
        )


def _log(msg: str) -> None:
    say(f"steerscope audit: {msg}")


class _AuditContext:
    """What the stages share: the config, both models, the sampling prompts, artifacts, compute."""

    log = staticmethod(_log)

    def __init__(self, cfg: AuditConfig, folder: JobFolder, lm, base, sample_prompts: list[str], same: bool):
        self.cfg, self.folder, self.lm, self.base = cfg, folder, lm, base
        self.sample_prompts, self.same = sample_prompts, same  # same: the two models' weights are equal
        self.chat = None
        self.artifacts: dict[str, Any] = {}
        self.compute = _load_compute(folder.path("compute.json"))

    @contextmanager
    def counted(self, name: str):
        """Wall time and forward tokens of `name`, kept in compute.json as each part ends."""
        from ..models.hooks import count_forwards

        t0 = time.perf_counter()
        with count_forwards() as c:
            yield
        self.compute[name] = {"seconds": round(time.perf_counter() - t0, 3), "forward_tokens": c.tokens}
        write_json_atomic(self.folder.path("compute.json"), self.compute)


def _load_compute(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _steered(method: str):
    """Stage building one steered method's run (resumed inside if it was killed)."""

    def build(ctx: _AuditContext) -> dict:
        cfg = ctx.cfg
        out = ctx.folder.path(f"methods/{method}")
        if method in DIFFING and ctx.same:
            ctx.log(f"{method}: the fine-tune's weights equal the base's; nothing to diff")
            return {
                "method": method,
                "skipped": "the fine-tune's weights equal the base's: no difference to steer along",
            }
        reused = method == "base" and cfg.contrast_run and not out.exists()
        if reused:
            _reuse(Path(cfg.contrast_run), out, cfg.run_config("base"))
        rc = cfg.run_config(method)
        model = ctx.lm if method == "finetune" else ctx.base
        other = ctx.lm if method in DIFFING else None
        ctx.log(
            f"{method}: steerscope run --method {rc.discover.method} on the {'fine-tune' if method == 'finetune' else 'base'}"
        )
        with ctx.counted(method):
            run_job(rc, out, lm=model, base=other)
        if reused:  # its compute was spent by the audit it came from
            ctx.compute[method] = {**ctx.compute[method], "reused_from": str(Path(cfg.contrast_run).resolve())}
            write_json_atomic(ctx.folder.path("compute.json"), ctx.compute)
        metrics = json.loads((out / "metrics.json").read_text())
        return {"method": method, "run": f"methods/{method}", "seconds": metrics.get("seconds")}

    return build


def _check_contrast(src: Path, rc: RunConfig) -> None:
    """One line unless `src` is a finished run with exactly the audit's base-run settings."""
    if not (src / "metrics.json").is_file():
        raise SteerscopeError(f"--contrast-run {src}: not a finished run folder (no metrics.json).")
    try:
        JobFolder.check(src, "run", rc)  # True: the same run; a SteerscopeError naming the difference otherwise
    except SteerscopeError as e:
        raise SteerscopeError(f"--contrast-run: {e}") from None


def _reuse(src: Path, out: Path, rc: RunConfig) -> None:
    """Copy a finished base run in, after checking it is one with these settings."""
    _check_contrast(src, rc)
    shutil.copytree(src, out)


def _save_rows(rows: list[dict], path: Path) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _load_rows(path: Path, ctx=None) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _stages(cfg: AuditConfig) -> list[Stage]:
    from .audit_sample import blackbox, sample_rows
    from .audit_table import build_table

    dump = lambda m, p: write_json_atomic(p, m)  # noqa: E731
    read = lambda p, ctx: json.loads(p.read_text())  # noqa: E731
    out = [Stage(f"method:{m}", f"methods/{m}.json", _steered(m), dump, read) for m in STEERED if m in cfg.methods]
    if any(m in cfg.methods for m in SAMPLED):
        out.append(Stage("sample", "samples.jsonl", sample_rows, _save_rows, _load_rows))
        out.append(Stage("blackbox", "blackbox.json", blackbox, dump, read))
    out.append(Stage("table", "audit.json", build_table, dump, read))
    out.append(Stage("report", None, _report))
    return out


def _report(ctx: _AuditContext) -> Path:
    from ..report.audit import render_audit

    path = ctx.folder.path("report.html")
    write_text_atomic(path, render_audit(ctx.artifacts["table"], str(ctx.folder.out)))
    return path


def audit(cfg: AuditConfig, out: str | Path, *, lm=None, base=None, force: bool = False) -> Path:
    """Run (or resume) the whole audit; returns the report's path."""
    from ..models.loading import check_base, load_model
    from .run import _check_installed

    JobFolder.check(out, "audit", cfg, force=force)
    spec = cfg.base_spec()  # refuses a missing --base before anything loads
    if cfg.contrast_run and "base" in cfg.methods:
        _check_contrast(Path(cfg.contrast_run), cfg.run_config("base"))
    _check_installed(cfg.run_config("finetune"), model_needed=lm is None)
    sample_prompts = load_prompts(cfg.sample_prompts)[: cfg.n_sample_prompts]
    lm = lm or cfg.model.load()
    base = base or load_model(spec, dtype=lm.dtype, device=str(lm.device))
    check_base(base, lm, "audit")
    for m in STEERED:  # every run's own checks (prompt counts, layers) before the first expensive stage
        if m in cfg.methods:
            _check_run(cfg.run_config(m), lm if m == "finetune" else base)
    same = lm.fingerprint == base.fingerprint
    folder = JobFolder(out, "audit", cfg, force=force, version=__version__)
    with job_log(folder.path(LOG_NAME)):
        if folder.resumed:
            _log(f"resuming the audit in {folder.out}")
        ctx = _AuditContext(cfg, folder, lm, base, sample_prompts, same)
        run_stages(folder, _stages(cfg), ctx, _log)
        report = ctx.artifacts["report"]
        _log(f"report: {report.resolve()}")
    return report


def _check_run(rc: RunConfig, lm) -> None:
    from .run import _validate

    _validate(rc, lm)
