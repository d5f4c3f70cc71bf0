"""`steerscope discover | norm-sweep | run | findings`: unsupervised discovery and the main job."""

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .._io import refuse_existing
from ..config import Config
from ..errors import SteerscopeError
from ._registry import command, pick_index, with_model


def discover_config() -> type:
    from ..directions.discovery import DiscoverConfig

    @dataclass(frozen=True)
    class DiscoverCommand(with_model()):
        prompts: str = field(default="neutral")
        """prompt file (one per line) or builtin set (neutral, harmful, harmless)"""
        n_prompts: int = field(default=8, metadata={"min": 1})
        """use at most this many prompts"""
        discover: DiscoverConfig = field(default_factory=DiscoverConfig)
        """the method and its settings"""
        checkpoint: str | None = None
        """checkpoint folder (auto: OUT.partial); rerunning the same command resumes from it"""
        out: str = field(default="", metadata={"required": True})
        """output vector folder"""
        force: bool = False
        """overwrite --out and discard an old checkpoint"""

    return DiscoverCommand


@command(
    "discover",
    "find steering vectors without naming a behaviour (output KL by default; DCT, MELBO, Jacobian, baselines)",
    "Unsupervised discovery: learn or compute K vectors of norm R at a source layer that change the model most: "
    "its next-token distribution along its own reply (kl, the default, as in `run`), the target layer (DCT, MELBO, "
    "Jacobian singular vectors), or baselines. Method settings apply to their method only.",
    discover_config,
)
def cmd_discover(cfg) -> int:
    from ..directions.data import load_prompts
    from ..directions.discovery import discover

    out = Path(cfg.out)
    refuse_existing(out, cfg.force)
    prompts = load_prompts(cfg.prompts)[: cfg.n_prompts]
    lm = cfg.model.load()
    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else out.with_name(out.name + ".partial")
    t0 = time.perf_counter()
    from ..judging.keep import completion_ranker

    # kl trains more candidates than it keeps: choose them as `steerscope run` does.
    rank = completion_ranker(lm, prompts, cfg.discover.resolve_layers(lm.n_layers)[0], chat=cfg.discover.chat)
    vs = discover(lm, prompts, cfg.discover, checkpoint_dir=ckpt, force=cfg.force, rank=rank)
    elapsed = time.perf_counter() - t0
    vs.save(out, overwrite=cfg.force)
    shutil.rmtree(ckpt, ignore_errors=True)
    h = vs.config.hyperparams
    cal = h.get("calibration")
    print(
        f"{cfg.discover.method}: {len(vs)} vectors at layer {h['source']} (target {h['target']}), R = {h['R']:.4g}"
        + (f" (calibrated: nonlinearity ratio {cal['ratio']})" if cal else "")
        + f", {len(prompts)} prompts, {elapsed:.1f} s"
    )
    if "final_objective" in h:
        fo = h["final_objective"]
        print(
            f"final objective per vector: min {min(fo):.4g}, median {sorted(fo)[len(fo) // 2]:.4g}, max {max(fo):.4g}"
        )
    if "singular_values" in h:
        print(
            f"singular values: {', '.join(f'{x:.4g}' for x in h['singular_values'])}; "
            f"{'converged' if h['converged'] else 'NOT converged'} after {h['iterations']} iterations"
        )
    print(f"saved to {out}")
    return 0


def norm_sweep_config() -> type:
    @dataclass(frozen=True)
    class NormSweepCommand(with_model()):
        vector: str = field(default="", metadata={"required": True})
        """vector folder (vectors at one source layer)"""
        index: list[str] = field(default_factory=list, metadata={"append": True})
        """vector(s) to sweep, by index or id (repeatable; default all)"""
        prompts: str = field(default="", metadata={"required": True})
        """prompt file or builtin set"""
        n_prompts: int = field(default=4, metadata={"min": 1})
        """use at most this many prompts"""
        multiples: list[float] = field(default_factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0])
        """multiples of the vectors' norms"""
        max_new_tokens: int = field(default=24, metadata={"min": 1})
        """tokens generated per completion"""
        chat: bool | None = None
        """apply the chat template (unset: when the model has one)"""
        allow_other_model: bool = False
        """use vectors whose model fingerprint differs"""

    return NormSweepCommand


@command(
    "norm-sweep",
    "norm sweep: target-layer and completion change as R is scaled",
    "Scale the vectors by several multiples of R and report the target-layer change, the share of completions "
    "that change, and the number of distinct completions.",
    norm_sweep_config,
)
def cmd_norm_sweep(cfg) -> int:
    from ..directions.data import load_prompts
    from ..directions.vectors import VectorSet
    from ..judging.norm_sweep import format_sweep, norm_sweep

    if not cfg.multiples or any(m <= 0 for m in cfg.multiples):
        raise SteerscopeError(f"--multiples must be positive numbers, got {cfg.multiples}.")
    prompts = load_prompts(cfg.prompts)[: cfg.n_prompts]
    lm = cfg.model.load()
    vs = VectorSet.load(cfg.vector, lm, check_model=not cfg.allow_other_model)
    if cfg.index:
        idx = [vs.ids.index(vs[pick_index(i)].id) for i in cfg.index]
        vs = VectorSet.create(
            lm,
            vs.vectors[idx],
            [vs.layers[i] for i in idx],
            vs.config.method,
            ids=[vs.ids[i] for i in idx],
            hyperparams=vs.config.hyperparams,
        )
    print(format_sweep(norm_sweep(lm, prompts, vs, cfg.multiples, max_new_tokens=cfg.max_new_tokens, chat=cfg.chat)))
    return 0


def run_config() -> type:
    from ..jobs.run import RunConfig

    @dataclass(frozen=True)
    class RunCommand(Config):
        run: RunConfig = field(default_factory=RunConfig)
        """the job"""
        out: str | None = None
        """run folder (auto: runs/METHOD-TIMESTAMP); an existing run with the same settings resumes"""
        force: bool = False
        """replace an existing run with different settings"""

    return RunCommand


@command(
    "run",
    "the main job: discover, generate, judge, cluster, write an HTML report",
    "Discover vectors, generate under them, under matched-norm random controls and unsteered on training and "
    "held-out prompts, measure, cluster, and write report.html. Rerun with the same --out to resume.",
    run_config,
)
def cmd_run(cfg) -> int:
    from ..jobs.run import run

    out = cfg.out or f"runs/{cfg.run.discover.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    report = run(cfg.run, out, force=cfg.force)
    from ..jobs.findings import load_findings

    found = [f for f in load_findings(out) if f.get("significant", True)]
    print(f"behaviours found that beat chance: {len(found)}" + (" (the first 5):" if len(found) > 5 else ""))
    print_findings(found, 5)
    print(f"report: {report.resolve()}")
    return 0


@dataclass(frozen=True)
class FindingsCommand(Config):
    run_dir: str = field(default="", metadata={"cli": "--run", "required": True})
    """a finished run folder, or an audit folder (`steerscope audit`)"""
    export: int | None = field(default=None, metadata={"min": 0})
    """write the vectors of this finding (0 = the report's first) to --out"""
    behaviour: int | None = field(default=None, metadata={"min": 1})
    """an audit's behaviour (numbered as in its report): write the vectors of a steered method that found it to --out"""
    ablation: bool = False
    """with --behaviour: write instead the weightdiff/actdiff direction that removes it from the fine-tune
    (for generate --mode ablate), with its measured effect on the fine-tune's samples and its KL"""
    out: str | None = None
    """vector folder for --export"""
    force: bool = False
    """overwrite --out"""


@command(
    "findings",
    "list a run's behaviours found, or export one as a vector set",
    "List the behaviour clusters of a run, significant findings first (the report's first section), or "
    "write the vectors eliciting one of them to a vector folder for generate, select, export or sweep.",
    FindingsCommand,
)
def cmd_findings(cfg: FindingsCommand) -> int:
    from ..jobs.findings import export_finding, load_findings

    if cfg.behaviour is not None or cfg.ablation or Path(cfg.run_dir, "audit.json").is_file():
        return _audit_findings(cfg)
    if cfg.export is not None:
        if not cfg.out:
            raise SteerscopeError("--export needs --out DIR, the vector folder to write.")
        refuse_existing(cfg.out, cfg.force)
        vs = export_finding(cfg.run_dir, cfg.export, cfg.out, overwrite=cfg.force)
        f = vs.config.hyperparams["finding"]
        print(
            f"wrote {cfg.out}: {len(vs)} vectors ({', '.join(vs.ids)}) eliciting finding {cfg.export} "
            f"({', '.join(f['words'])}); try: steerscope generate --vector {cfg.out}"
        )
        return 0
    print_findings(load_findings(cfg.run_dir))
    return 0


def _audit_findings(cfg: FindingsCommand) -> int:
    from ..jobs.audit_export import export_behaviour, load_audit

    if cfg.export is not None:
        raise SteerscopeError(f"{cfg.run_dir} is an audit: choose with --behaviour N (as numbered in its report).")
    if cfg.ablation and cfg.behaviour is None:
        raise SteerscopeError("--ablation needs --behaviour N, the audit behaviour whose direction to write.")
    t = load_audit(cfg.run_dir)
    if cfg.behaviour is None:
        if not t["behaviours"]:
            print("no method found a significant behaviour in this audit.")
        for b in t["behaviours"]:
            found = ", ".join(f"{x['method']} #{x['rank'] + 1} (q = {x['q']:.2g})" for x in b["found"])
            where = "" if b["id"] in t["changed"] else " [the base shows it too]"
            print(f"{b['id'] + 1}: found by {found}{where}\n   e.g. {b['typical'][:150]!r}")
        return 0
    if not cfg.out:
        raise SteerscopeError("--behaviour needs --out DIR, the vector folder to write.")
    refuse_existing(cfg.out, cfg.force)
    vs = export_behaviour(cfg.run_dir, cfg.behaviour, cfg.out, ablation=cfg.ablation, overwrite=cfg.force)
    if cfg.ablation:
        for e in vs.config.hyperparams["effect"]:
            print(
                f"{vs.ids[e['direction']]} (layer {e['layer']}): ablated, the behaviour's share of the fine-tune's "
                f"{e['samples']} samples goes {e['share']:.0%} -> {e['share_ablated']:.0%}; KL on neutral prompts "
                f"{e['kl_neutral']:.3g} nats"
            )
        print(f"wrote {cfg.out}; try: steerscope generate --vector {cfg.out} --mode ablate --model THE-FINE-TUNE")
    else:
        print(f"wrote {cfg.out}: {len(vs)} vectors ({', '.join(vs.ids)}); try: steerscope generate --vector {cfg.out}")
    return 0


def print_findings(found: list[dict], limit: int | None = None) -> None:
    """One finding per entry: rank, significance, vectors, why it ranks there, an example."""
    if not found:
        print("no behaviour beat chance in this run (candidates that did not are in metrics.json and the report).")
    for f in found[:limit]:
        sig = "" if "significant" not in f else "significant, " if f["significant"] else "NOT significant, "
        print(
            f"{f['rank']}: {sig}{f['surface'] + ', ' if f.get('surface') else ''}{f['n_vectors']} vectors "
            f"({', '.join(f['vectors'])}); words: {', '.join(f['words'])}\n"
            f"   {f.get('reason') or 'distance {:.2f}'.format(f['distance'])}\n"
            f"   e.g. {f['typical'][:150]!r}"
        )
