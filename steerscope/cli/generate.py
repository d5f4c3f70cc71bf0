"""`steerscope generate`: steered and unsteered completions side by side."""

import itertools
import json
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SteerscopeError
from ._registry import command, pick_index, say, with_model


def generate_config() -> type:
    @dataclass(frozen=True)
    class GenerateCommand(with_model()):
        prompt: list[str] = field(default_factory=list, metadata={"append": True})
        """a prompt (repeat the flag for more)"""
        prompts_file: str | None = None
        """a text file with one prompt per line"""
        vector: str | None = None
        """a saved vector-set folder"""
        index: list[str] = field(default_factory=list, metadata={"append": True})
        """which vector(s) of the set, by index or id (repeatable; default all)"""
        contrast: list[str] = field(default_factory=list, metadata={"nargs": 2, "metavar": ("POSITIVE", "NEGATIVE")})
        """build an ActAdd vector on the fly: mean activation of POSITIVE minus NEGATIVE at --layer"""
        save_vector: str | None = None
        """with --contrast: also save the vector to this folder"""
        force: bool = False
        """overwrite an existing --save-vector folder"""
        layer: int | None = None
        """layer to steer at (auto: the vectors' own layers)"""
        coef: float = 1.0
        """coefficient multiplying the vector"""
        mode: str = field(default="add", metadata={"choices": ("add", "ablate")})
        """add the vector, or ablate its direction at every layer (Arditi et al. 2024; --layer and --coef
        unused), e.g. a direction `steerscope findings --behaviour N --ablation` wrote"""
        positions: str = "all"
        """all | prompt | generated | A:B | last:K (the last K prompt tokens)"""
        max_new_tokens: int = field(default=48, metadata={"min": 1})
        """tokens to generate"""
        temperature: float = field(default=0.0, metadata={"min": 0})
        """0 = greedy"""
        top_p: float = field(default=1.0, metadata={"min": 0, "max": 1})
        """nucleus sampling threshold"""
        seed: int = 0
        """sampling seed (one random stream per prompt, the same for steered and unsteered)"""
        chat: bool | None = None
        """apply the chat template (unset: when the model has one)"""
        system: str | None = None
        """system prompt for the chat template"""
        allow_other_model: bool = False
        """use vectors whose model fingerprint differs (e.g. made on the base of a fine-tune)"""
        when: str | None = None
        """a condition-set folder (`steerscope condition`): steer a prompt only if its mean hidden state meets the condition (CAST)"""
        when_layer: int | None = None
        """with --when: the condition layer (default: the set's best layer)"""
        when_threshold: float | None = None
        """with --when: the cosine threshold (default: the set's at that layer)"""
        when_below: bool = False
        """with --when: steer when the score is below the threshold (default: the set's side)"""
        kv_cache: bool = True
        """decode with the KV cache (--no-kv-cache recomputes every step: slower, the same tokens)"""
        json: bool = False
        """print one JSON object per completion"""

    return GenerateCommand


def _side_by_side(left_title: str, left: str, right_title: str, right: str) -> str:
    width = max(60, min(shutil.get_terminal_size((120, 20)).columns, 160))
    col = (width - 3) // 2

    def wrap(t: str) -> list[str]:
        lines = []
        for para in t.splitlines() or [""]:
            lines.extend(textwrap.wrap(para, col) or [""])
        return lines

    out = [f"{left_title[:col]:<{col}} | {right_title[:col]}", f"{'-' * col}-+-{'-' * col}"]
    for a, b in itertools.zip_longest(wrap(left), wrap(right), fillvalue=""):
        out.append(f"{a:<{col}} | {b}")
    return "\n".join(out)


@command(
    "generate",
    "steered and unsteered completions side by side",
    "Generate steered and unsteered completions side by side (greedy by default).",
    generate_config,
)
def cmd_generate(cfg) -> int:
    from ..directions.condition import check_when_flags, when_from_flags
    from ..directions.data import load_prompts
    from ..directions.extract import mean_difference
    from ..directions.vectors import VectorSet
    from ..generation import generate
    from ..interventions.positions import Positions

    prompts = list(cfg.prompt)
    if cfg.prompts_file:
        prompts += load_prompts(cfg.prompts_file)
    if not prompts:
        raise SteerscopeError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    if cfg.vector and cfg.contrast:
        raise SteerscopeError("use either --vector DIR or --contrast POS NEG, not both.")
    if not cfg.vector and not cfg.contrast:
        raise SteerscopeError(
            "nothing to steer with: pass --vector DIR (a saved vector set) or --contrast POSITIVE NEGATIVE."
        )
    positions = Positions.parse(cfg.positions)
    if cfg.save_vector and not cfg.force and Path(cfg.save_vector).exists():
        raise SteerscopeError(f"{cfg.save_vector} already exists; choose another path or pass --force.")
    check_when_flags(cfg)  # before the model loads
    lm = cfg.model.load()
    when = when_from_flags(cfg, lm, chat=cfg.chat, check_model=not cfg.allow_other_model)
    if cfg.vector:
        vs = VectorSet.load(cfg.vector, lm, check_model=not cfg.allow_other_model)
        vs_list = [vs[pick_index(i)] for i in cfg.index] if cfg.index else list(vs)
    else:
        if cfg.layer is None:
            raise SteerscopeError(f"--contrast needs --layer (0..{lm.n_layers - 1}).")
        vs = mean_difference(lm, [cfg.contrast[0]], [cfg.contrast[1]], [cfg.layer], chat=False)
        if cfg.save_vector:
            vs.save(cfg.save_vector, overwrite=cfg.force)
            say(f"saved the contrast vector to {cfg.save_vector}")
        vs_list = list(vs)
    results = generate(
        lm,
        prompts,
        vectors=vs_list,
        layer=cfg.layer,
        coef=cfg.coef,
        positions=positions,
        mode=cfg.mode,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
        chat=cfg.chat,
        system=cfg.system,
        include_unsteered=True,
        use_cache=cfg.kv_cache,
        when=when,
    )
    if cfg.json:
        for r in results:
            print(json.dumps(r.to_dict()))
        return 0
    base = {r.prompt_index: r for r in results if r.vector_id is None}
    for r in results:
        if r.vector_id is None:
            continue
        print(f"\n=== prompt {r.prompt_index}: {r.prompt!r}")
        if r.gate_fired is not None:
            print(f"gate: {'fired' if r.gate_fired else 'did not fire'} (score {r.gate_score:.3f}, {_gate_rule(when)})")
        print(
            _side_by_side(
                "unsteered",
                base[r.prompt_index].text,
                f"ablated: {r.vector_id} at every layer"
                if cfg.mode == "ablate"
                else f"steered: {r.vector_id} @ layer {r.layer}, coef {r.coef:g}",
                r.text,
            )
        )
    return 0


def _gate_rule(c) -> str:
    return f"steers when {'>' if c.above else '<'} {c.threshold:.3f} at layer {c.layer}"


def amplify_config() -> type:
    @dataclass(frozen=True)
    class AmplifyCommand(with_model()):
        base: str | None = None
        """the model it was fine-tuned from: a checkpoint folder, a cached hub id, or embedded
        (default: for organism:NAME, the embedded model it was built from)"""
        prompt: list[str] = field(default_factory=list, metadata={"append": True})
        """a prompt (repeat the flag for more; default: the first --n-prompts of the neutral set)"""
        n_prompts: int = field(default=4, metadata={"min": 1})
        """neutral prompts used when no --prompt is given"""
        alpha: float = field(default=2.0, metadata={"min": 0})
        """amplification: log p_ft + alpha (log p_ft - log p_base); 0 samples the fine-tune as it is"""
        top_k: int = field(default=20, metadata={"min": 1})
        """only the fine-tune's own k most likely tokens can be sampled"""
        samples: int = field(default=2, metadata={"min": 1})
        """samples per prompt (each draw its own random stream)"""
        temperature: float = field(default=1.0, metadata={"min": 0.01})
        """sampling temperature"""
        max_new_tokens: int = field(default=32, metadata={"min": 1})
        """tokens to generate"""
        seed: int = 0
        """sampling seed"""
        chat: bool | None = None
        """apply the chat template (unset: when the model has one)"""
        json: bool = False
        """print one JSON object per completion"""

    return AmplifyCommand


@command(
    "amplify",
    "sample a fine-tune with its difference from its base amplified",
    "Sample a fine-tune beside its base and with what it changed amplified (model-diff amplification): "
    "a behaviour it learned shows even without the prompt that triggers it.",
    amplify_config,
)
def cmd_amplify(cfg) -> int:
    from ..amplify import Amplify
    from ..directions.data import load_prompts
    from ..generation import generate
    from ..models.loading import load_base

    prompts = list(cfg.prompt) or load_prompts("neutral")[: cfg.n_prompts]
    lm = cfg.model.load()
    base = load_base(cfg.base, lm, "amplify")
    kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, chat=cfg.chat, progress=False)
    rows = prompts * cfg.samples  # draw s of prompt i is row s * P + i, each with its own stream
    out = {
        "base": generate(base, rows, seed=cfg.seed, **kw),
        "fine-tune": generate(lm, rows, seed=cfg.seed, **kw),
        f"amplified x{cfg.alpha:g}": generate(
            lm, rows, seed=cfg.seed, amplify=Amplify(base, cfg.alpha, cfg.top_k), **kw
        ),
    }
    P = len(prompts)
    if cfg.json:
        for name, res in out.items():
            for r in res:
                print(json.dumps({**r.to_dict(), "model": name, "prompt_index": r.prompt_index % P}))
        return 0
    for i, p in enumerate(prompts):
        print(f"\n=== prompt {i}: {p!r}")
        for name, res in out.items():
            for s in range(cfg.samples):
                print(f"{name:>14} [{s}] {res[s * P + i].text!r}")
    return 0
