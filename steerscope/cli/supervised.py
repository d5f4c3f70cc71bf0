"""`steerscope extract | condition | select | orthogonalize | export | import`: supervised directions."""

from dataclasses import dataclass, field

from .._io import refuse_existing
from ..config import Config
from ..errors import SteerscopeError
from ._registry import command, pick_index, say, with_model


def extract_config() -> type:
    from ..directions.extract import ExtractConfig

    @dataclass(frozen=True)
    class ExtractCommand(with_model()):
        pairs: str | None = None
        """JSONL/CSV with positive,negative[,prompt] columns, or a builtin: sentiment, formal, french"""
        sets: list[str] = field(default_factory=list, metadata={"nargs": 2, "metavar": ("A", "B")})
        """two prompt files (A has the behaviour), or builtins, e.g. harmful harmless"""
        extract: ExtractConfig = field(default_factory=ExtractConfig)
        """how to extract"""
        out: str = field(default="", metadata={"required": True})
        """output vector folder"""
        force: bool = False
        """overwrite --out"""

    return ExtractCommand


@command(
    "extract",
    "candidate directions from contrastive data, one per layer",
    "Extract one candidate direction per layer (and read position) from contrastive pairs or two prompt sets, "
    "with per-layer statistics.",
    extract_config,
)
def cmd_extract(cfg) -> int:
    from ..directions.data import load_contrast, load_sets
    from ..directions.extract import extract, format_stats

    if bool(cfg.pairs) == bool(cfg.sets):
        raise SteerscopeError("give either --pairs FILE|NAME or --sets A B.")
    refuse_existing(cfg.out, cfg.force)
    data = load_contrast(cfg.pairs) if cfg.pairs else load_sets(*cfg.sets)
    lm = cfg.model.load()
    vs = extract(lm, data, cfg.extract)
    print(format_stats(vs))
    vs.save(cfg.out, overwrite=cfg.force)
    say(f"saved {len(vs)} candidate vectors to {cfg.out}")
    return 0


def condition_config() -> type:
    from ..directions.condition_fit import ConditionFitConfig

    @dataclass(frozen=True)
    class ConditionCommand(with_model()):
        sets: list[str] = field(default_factory=list, metadata={"nargs": 2, "metavar": ("ON", "OFF")})
        """two prompt files or builtins (harmful, harmless, neutral): ON should trigger the behaviour, OFF not"""
        condition: ConditionFitConfig = field(default_factory=ConditionFitConfig)
        """how to fit"""
        out: str = field(default="", metadata={"required": True})
        """output condition-set folder (with report.html)"""
        force: bool = False
        """overwrite --out"""

    return ConditionCommand


@command(
    "condition",
    "find a CAST condition vector and its threshold per layer, with an ROC report",
    "Conditional steering (CAST, Lee et al. 2025): per layer, a condition vector from the prompts' mean hidden "
    "states (ON vs OFF) and the cosine threshold and side that best separate a held-out split; saves the set "
    "(one vector per layer, the best layer chosen) and report.html with ROC curves.",
    condition_config,
)
def cmd_condition(cfg) -> int:
    import json
    from pathlib import Path

    from .._io import write_text_atomic
    from ..directions.condition_fit import find_condition
    from ..directions.data import load_prompts
    from ..report.condition import render_condition

    if len(cfg.sets) != 2:
        raise SteerscopeError("give the two prompt sets: --sets ON OFF (files or builtins, e.g. harmful harmless).")
    refuse_existing(cfg.out, cfg.force)
    on, off = load_prompts(cfg.sets[0]), load_prompts(cfg.sets[1])
    lm = cfg.model.load()
    name = f"{Path(cfg.sets[0]).stem}-vs-{Path(cfg.sets[1]).stem}"
    fit = find_condition(lm, on, off, cfg.condition, name=name)
    vs = fit.to_vector_set(lm)
    print(fit.table())
    vs.save(cfg.out, overwrite=cfg.force)
    write_text_atomic(Path(cfg.out) / "report.html", render_condition(vs, cfg.out))
    b = fit.best
    print(
        f"best layer {fit.best_layer}: steer when cos > {b.threshold:+.4f}"
        if b.above
        else f"best layer {fit.best_layer}: steer when cos < {b.threshold:+.4f}",
        f"(validation AUC {b.auc:.3f}, balanced accuracy {b.val_acc:.3f}, TPR {b.tpr:.2f}, FPR {b.fpr:.2f})",
    )
    when = {"condition": cfg.out, "layer": fit.best_layer, "threshold": round(b.threshold, 6), "above": b.above}
    print(f'use it: steerscope generate ... --when {cfg.out}   or in a steering entry: "when": {json.dumps(when)}')
    if fit.warning:
        say(f"warning: {fit.warning}")
    say(f"saved {len(vs)} condition vectors and report.html to {cfg.out}")
    return 0


def select_config() -> type:
    from ..judging.selection import SelectConfig

    @dataclass(frozen=True)
    class SelectCommand(with_model()):
        vector: str = field(default="", metadata={"required": True})
        """candidate vector folder (from extract)"""
        metric: str = field(default="", metadata={"required": True})
        """logodds:I,Sorry | refusal | substring:a|b | regex:P | sentiment"""
        a: str = field(default="", metadata={"required": True})
        """prompts WITH the behaviour (file or builtin: harmful, harmless, neutral)"""
        b: str = field(default="", metadata={"required": True})
        """prompts WITHOUT the behaviour"""
        neutral: str = "neutral"
        """neutral prompts for KL"""
        test: list[str] = field(default_factory=list, metadata={"nargs": 2, "metavar": ("A_TEST", "B_TEST")})
        """held-out A and B prompts (files or builtins): the chosen direction's ablation, orthogonalisation
        and addition are measured on them (or hold out a share of A and B with --test-fraction)"""
        n_prompts: int = field(default=32, metadata={"min": 1})
        """use at most this many prompts of each set"""
        select: SelectConfig = field(default_factory=SelectConfig)
        """how to score and choose"""
        table: str | None = None
        """also write the table (every candidate, the frontier, the choice) as JSON here"""
        plot: str | None = None
        """also write the effect-vs-KL plot (an .html page with an SVG) here"""
        save_best: str | None = None
        """save the selected vector as its own folder"""
        force: bool = False
        """overwrite --save-best"""
        allow_other_model: bool = False
        """use vectors whose model fingerprint differs"""

    return SelectCommand


@command(
    "select",
    "pick the candidate with the best measured effect (refusal-direction style)",
    "Score every candidate by adding it on B prompts, ablating it on A prompts and its KL on neutral prompts; "
    "check the coherence of the short-listed ones; show the effect-vs-KL Pareto frontier and choose along it "
    "(a KL budget that fits the model, the knee, or an id); with --test or --test-fraction, evaluate the choice "
    "on held-out prompts.",
    select_config,
)
def cmd_select(cfg) -> int:
    from ..directions.data import load_prompts
    from ..directions.vectors import VectorSet
    from ..judging.selection import select

    if cfg.save_best:
        refuse_existing(cfg.save_best, cfg.force)
    n = cfg.n_prompts
    a, b, neutral = load_prompts(cfg.a)[:n], load_prompts(cfg.b)[:n], load_prompts(cfg.neutral)[:n]
    test = (load_prompts(cfg.test[0])[:n], load_prompts(cfg.test[1])[:n]) if cfg.test else None
    if test is not None and cfg.select.test_fraction > 0:
        raise SteerscopeError("give either --test A_TEST B_TEST or --test-fraction, not both.")
    lm = cfg.model.load()
    vs = VectorSet.load(cfg.vector, lm, check_model=not cfg.allow_other_model)
    sel = select(lm, vs, cfg.metric, a, b, neutral, cfg.select, test_prompts=test)
    print(sel.table())
    say(sel.budget_line())
    if sel.warning:
        say(f"warning: {sel.warning}")
    if cfg.table:
        sel.save(cfg.table)
    if cfg.plot:
        from .._io import write_text_atomic
        from ..report.selection import render_selection

        write_text_atomic(cfg.plot, render_selection(sel))
        say(f"wrote the effect-vs-KL plot to {cfg.plot}")
    if cfg.save_best:
        best = sel.best_candidate
        if best is None:
            raise SteerscopeError(
                "no candidate passed the filters, so nothing was saved; "
                + (f"use {sel.advice}." if sel.advice else "see the notes in the table.")
            )
        i = vs.ids.index(best.id)
        hyper = {**vs.config.hyperparams, "selection": sel.to_dict()}
        VectorSet.create(
            lm, vs.vectors[i : i + 1], [vs.layers[i]], vs.config.method, ids=[best.id], hyperparams=hyper
        ).save(cfg.save_best, overwrite=cfg.force)
        say(f"saved the selected vector {best.id} to {cfg.save_best}")
    return 0


def orthogonalize_config() -> type:
    @dataclass(frozen=True)
    class OrthogonalizeCommand(with_model()):
        vector: str = field(default="", metadata={"required": True})
        """vector folder"""
        index: str | None = None
        """which vector of the set (index or id; needed when it holds several)"""
        out: str = field(default="", metadata={"required": True})
        """output checkpoint folder"""
        force: bool = False
        """overwrite --out"""
        allow_other_model: bool = False
        """use vectors whose model fingerprint differs"""

    return OrthogonalizeCommand


@command(
    "orthogonalize",
    "write a checkpoint with a direction projected out of the weights",
    "Weight orthogonalisation: project the direction out of the embeddings and every attention/MLP output "
    "matrix; the result equals ablation through hooks.",
    orthogonalize_config,
)
def cmd_orthogonalize(cfg) -> int:
    from ..directions.vectors import VectorSet
    from ..interventions.orthogonalize import save_orthogonalized

    refuse_existing(cfg.out, cfg.force)
    lm = cfg.model.load()
    vs = VectorSet.load(cfg.vector, lm, check_model=not cfg.allow_other_model)
    if cfg.index is None and len(vs) != 1:
        raise SteerscopeError(f"{len(vs)} vectors in the set; choose one with --index (0..{len(vs) - 1} or an id).")
    sv = vs[pick_index(cfg.index) if cfg.index is not None else 0]
    save_orthogonalized(lm, sv.vector, cfg.out, overwrite=cfg.force)
    print(f"wrote {cfg.out}: {lm.model_id} with {sv.id} projected out of every residual writer")
    return 0


@dataclass(frozen=True)
class ExportCommand(Config):
    vector: str = field(default="", metadata={"required": True})
    """vector folder"""
    gguf: str = field(default="", metadata={"required": True})
    """output .gguf file"""
    index: list[str] = field(default_factory=list, metadata={"append": True})
    """vector(s) to export, by index or id (repeatable; default: every vector whose layer llama.cpp accepts)"""
    layers: list[int] | None = field(default=None, metadata={"none": "all"})
    """export only the vectors at these layers: all, A:B or A,B,C"""
    coef: float = 1.0
    """scale baked into the file"""
    force: bool = False
    """overwrite --gguf"""


@command(
    "export",
    "write a llama.cpp control vector (GGUF)",
    "Write vectors as a llama.cpp control vector: steerscope layer L = direction.L.",
    ExportCommand,
)
def cmd_export(cfg: ExportCommand) -> int:
    from ..directions.llamacpp import export_gguf
    from ..directions.vectors import VectorSet

    vs = VectorSet.load(cfg.vector)
    idx = [vs.ids.index(i) if i in vs.ids else int(pick_index(i)) % len(vs) for i in cfg.index] if cfg.index else None
    if cfg.layers is not None:
        pool = idx if idx is not None else range(len(vs))
        idx = [i for i in pool if vs.layers[i] in set(cfg.layers)]
        if not idx:
            raise SteerscopeError(
                f"no vector of {cfg.vector} is at layers {cfg.layers}; its layers: {sorted(set(vs.layers))}."
            )
    res = export_gguf(vs, cfg.gguf, coef=cfg.coef, indices=idx, overwrite=cfg.force)
    print(
        f"wrote {cfg.gguf}: direction.{{{','.join(map(str, res.layers))}}} x {cfg.coef:g} for {vs.config.model_type}; "
        f"llama.cpp: --control-vector {cfg.gguf}"
    )
    if res.left_out:
        say(f"left out: {res.left_out}")
    return 0


def import_config() -> type:
    @dataclass(frozen=True)
    class ImportCommand(with_model()):
        gguf: str = field(default="", metadata={"required": True})
        """a llama.cpp control-vector file"""
        out: str = field(default="", metadata={"required": True})
        """output vector folder"""
        force: bool = False
        """overwrite --out"""
        allow_other_model: bool = False
        """accept a file whose model hint differs"""

    return ImportCommand


@command(
    "import",
    "read a llama.cpp control vector (GGUF) into a vector folder",
    "Read a llama.cpp control vector into a steerscope vector folder for the model.",
    import_config,
)
def cmd_import(cfg) -> int:
    from ..directions.llamacpp import import_gguf

    refuse_existing(cfg.out, cfg.force)
    lm = cfg.model.load()
    vs = import_gguf(cfg.gguf, lm, check_model=not cfg.allow_other_model)
    vs.save(cfg.out, overwrite=cfg.force)
    print(f"imported layers {vs.layers} into {cfg.out}")
    return 0
