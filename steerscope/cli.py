"""The `steerscope` command line: a thin layer over the library, generated from config dataclasses.

Every command is a frozen config dataclass (its flags, their help text and defaults come from
the fields; nested library configs such as `ModelConfig`, `DiscoverConfig` or `RunConfig` are
flattened into it) plus a handler `fn(cfg) -> exit status`, registered with `@command`. Errors a
user can fix exit with status 2 and one line naming the problem and the fix.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .cli_args import Parser, add_config_args, config_from_args
from .config import Config
from .errors import SteerscopeError
from .models.loading import ModelConfig


@dataclass(frozen=True)
class Command:
    name: str  # "info" or "sae train"
    help: str
    description: str
    default: Callable[[], Any]  # the command's config with library defaults
    handler: Callable[[Any], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, description: str = "", default: Callable[[], Any] | None = None):
    """Register `fn(cfg) -> int` as `steerscope NAME`; its flags come from `default()`'s fields."""
    def deco(fn):
        COMMANDS[name] = Command(name, help, description or help, default, fn)
        return fn

    return deco


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pick_index(spec: str) -> int | str:
    """A vector index (negative counts from the end) or an id."""
    return int(spec) if spec.lstrip("-").isdigit() else spec


@dataclass(frozen=True)
class WithModel(Config):
    """Base of every command that loads a model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """the model"""


# ---- info -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InfoCommand(WithModel):
    """`steerscope info`: the model flags only."""


@command("info", "show a model's layers, d_model, architecture and cache location",
         "Show a model's layers, d_model, architecture, fingerprint and cache location.", InfoCommand)
def cmd_info(cfg: InfoCommand) -> int:
    from ._io import cache_root
    from .models.embedded import default_cache_dir

    lm = cfg.model.load()
    n_params = sum(p.numel() for p in lm.model.parameters())
    rows = [
        ("model", lm.model_id),
        ("architecture", f"{type(lm.model).__name__} (model_type={lm.model_type})"),
        ("layers", f"{lm.n_layers} (valid layer indices 0..{lm.n_layers - 1}; layer L = output of block L)"),
        ("d_model", str(lm.d_model)),
        ("parameters", f"{n_params / 1e6:.1f} M"),
        ("vocab", str(len(lm.tokenizer))),
        ("dtype / device", f"{str(lm.dtype).replace('torch.', '')} / {lm.device}"),
        ("chat template", "yes" if lm.has_chat_template else "no"),
        ("fingerprint", lm.fingerprint),
        ("loaded from", lm.source),
        ("cache", str(default_cache_dir() if cfg.model.model is None else cache_root())),
    ]
    for k, v in rows:
        print(f"{k:>15}  {v}")
    return 0


# ---- generate -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateCommand(WithModel):
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
    kv_cache: bool = True
    """decode with the KV cache (--no-kv-cache recomputes every step: slower, the same tokens)"""
    json: bool = False
    """print one JSON object per completion"""


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


@command("generate", "steered and unsteered completions side by side",
         "Generate steered and unsteered completions side by side (greedy by default).", GenerateCommand)
def cmd_generate(cfg: GenerateCommand) -> int:
    from .directions.data import load_prompts
    from .directions.extract import mean_difference
    from .directions.vectors import VectorSet
    from .generation import generate
    from .interventions.positions import Positions

    prompts = list(cfg.prompt)
    if cfg.prompts_file:
        prompts += load_prompts(cfg.prompts_file)
    if not prompts:
        raise SteerscopeError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    if cfg.vector and cfg.contrast:
        raise SteerscopeError("use either --vector DIR or --contrast POS NEG, not both.")
    if not cfg.vector and not cfg.contrast:
        raise SteerscopeError("nothing to steer with: pass --vector DIR (a saved vector set) or --contrast POSITIVE NEGATIVE.")
    positions = Positions.parse(cfg.positions)
    if cfg.save_vector and not cfg.force and Path(cfg.save_vector).exists():
        raise SteerscopeError(f"{cfg.save_vector} already exists; choose another path or pass --force.")
    lm = cfg.model.load()
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
    results = generate(lm, prompts, vectors=vs_list, layer=cfg.layer, coef=cfg.coef, positions=positions,
                       max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                       chat=cfg.chat, system=cfg.system, include_unsteered=True, use_cache=cfg.kv_cache)
    if cfg.json:
        for r in results:
            print(json.dumps(r.to_dict()))
        return 0
    base = {r.prompt_index: r for r in results if r.vector_id is None}
    for r in results:
        if r.vector_id is None:
            continue
        print(f"\n=== prompt {r.prompt_index}: {r.prompt!r}")
        print(_side_by_side("unsteered", base[r.prompt_index].text,
                            f"steered: {r.vector_id} @ layer {r.layer}, coef {r.coef:g}", r.text))
    return 0


# ---- the parser -----------------------------------------------------------------------------------
def build_parser() -> Parser:
    from . import cli_bench, cli_discover, cli_distill, cli_refine, cli_sae, cli_serve, cli_supervised, cli_sweep  # noqa: F401  (they register commands)
    from ._version import __version__

    p = Parser(prog="steerscope", description="Find, apply and judge steering vectors in language models.")
    p.add_argument("--version", action="version", version=f"steerscope {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    groups: dict[str, Any] = {}
    for name, cmd in COMMANDS.items():
        parent = sub
        words = name.split()
        if len(words) == 2:
            if words[0] not in groups:
                g = sub.add_parser(words[0], help=f"{words[0]} commands", description=f"steerscope {words[0]} commands.")
                groups[words[0]] = g.add_subparsers(dest=f"{words[0]}_command", metavar="COMMAND", parser_class=Parser)
                groups[words[0]].required = True
            parent = groups[words[0]]
        sp = parent.add_parser(words[-1], help=cmd.help, description=cmd.description)
        add_config_args(sp, cmd.default())
        sp.set_defaults(_command=cmd)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        cmd: Command = args._command
        cfg = config_from_args(cmd.default(), args)
        return cmd.handler(cfg)
    except SteerscopeError as e:
        print(f"steerscope: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("steerscope: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # `python -m steerscope.cli`: use the importable module, where commands register
    from steerscope.cli import main as _main

    sys.exit(_main())
