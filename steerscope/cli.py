"""The `steerscope` command line: a thin layer over the library. Errors a user can fix exit with
status 2 and one line naming the problem and the fix."""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import textwrap
from pathlib import Path

from .errors import SteerscopeError


def _add_model_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    help_ = "local checkpoint folder or cached hub id (default: the embedded SmolLM2-135M-Instruct)"
    if positional:
        p.add_argument("model", nargs="?", default=None, help=help_)
    else:
        p.add_argument("--model", default=None, help=help_)
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def cmd_info(args) -> int:
    from ._io import cache_root
    from .models.loading import default_cache_dir, load_model

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
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
        ("cache", str(default_cache_dir() if args.model is None else cache_root())),
    ]
    for k, v in rows:
        print(f"{k:>15}  {v}")
    return 0


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


def cmd_generate(args) -> int:
    from .directions.contrast import mean_difference
    from .directions.vectors import VectorSet
    from .generation import generate
    from .interventions.positions import Positions
    from .models.loading import load_model

    prompts = list(args.prompt or [])
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SteerscopeError(f"prompts file {path} does not exist.")
        prompts += [l.strip() for l in path.read_text().splitlines() if l.strip()]
    if not prompts:
        raise SteerscopeError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE.")
    if args.vector and args.contrast:
        raise SteerscopeError("use either --vector DIR or --contrast POS NEG, not both.")
    if not args.vector and not args.contrast:
        raise SteerscopeError("nothing to steer with: pass --vector DIR (a saved vector set) or --contrast POSITIVE NEGATIVE.")

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    if args.vector:
        vs = VectorSet.load(args.vector, lm, check_model=not args.allow_other_model)
        if args.index:
            vs_list = [vs[int(i) if i.lstrip("-").isdigit() else i] for i in args.index]
        else:
            vs_list = list(vs)
    else:
        if args.layer is None:
            raise SteerscopeError(f"--contrast needs --layer (0..{lm.n_layers - 1}).")
        vs = mean_difference(lm, [args.contrast[0]], [args.contrast[1]], [args.layer], chat=False)
        if args.save_vector:
            vs.save(args.save_vector, overwrite=args.force)
            print(f"saved the contrast vector to {args.save_vector}", file=sys.stderr)
        vs_list = list(vs)
    results = generate(lm, prompts, vectors=vs_list, layer=args.layer, coef=args.coef,
                       positions=Positions.parse(args.positions), max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                       chat=False if args.no_chat else None, system=args.system, include_unsteered=True)
    if args.json:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="steerscope", description="Find, apply and judge steering vectors in language models.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"steerscope {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pi = sub.add_parser("info", help="show a model's layers, d_model, architecture and cache location",
                        description="Show a model's layers, d_model, architecture, fingerprint and cache location.")
    _add_model_args(pi, positional=True)
    pi.set_defaults(func=cmd_info)

    pg = sub.add_parser("generate", help="steered and unsteered completions side by side",
                        description="Generate steered and unsteered completions side by side (greedy by default).")
    pg.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    pg.add_argument("--prompts-file", help="a text file with one prompt per line")
    _add_model_args(pg)
    pg.add_argument("--vector", help="a saved vector-set folder")
    pg.add_argument("--index", action="append", help="which vector(s) of the set, by index or id (repeatable; default all)")
    pg.add_argument("--contrast", nargs=2, metavar=("POSITIVE", "NEGATIVE"),
                    help="build an ActAdd vector on the fly: mean activation of POSITIVE minus NEGATIVE at --layer")
    pg.add_argument("--save-vector", help="with --contrast: also save the vector to this folder")
    pg.add_argument("--force", action="store_true", help="overwrite an existing --save-vector folder")
    pg.add_argument("--layer", type=int, help="layer to steer at (overrides the vectors' own layer)")
    pg.add_argument("--coef", type=float, default=1.0, help="coefficient multiplying the vector (default 1)")
    pg.add_argument("--positions", default="all", help="all | prompt | generated | A:B | tail:K (default all)")
    pg.add_argument("--max-new-tokens", type=int, default=48)
    pg.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    pg.add_argument("--top-p", type=float, default=1.0)
    pg.add_argument("--seed", type=int, default=0)
    pg.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    pg.add_argument("--system", help="system prompt for the chat template")
    pg.add_argument("--allow-other-model", action="store_true", help="use vectors whose model fingerprint differs")
    pg.add_argument("--json", action="store_true", help="print one JSON object per completion")
    pg.set_defaults(func=cmd_generate)

    from . import cli_discover, cli_sae, cli_supervised

    cli_supervised.add_commands(sub, _add_model_args)
    cli_discover.add_commands(sub, _add_model_args)
    cli_sae.add_commands(sub, _add_model_args)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SteerscopeError as e:
        print(f"steerscope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("steerscope: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
